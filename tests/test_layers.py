"""The tree is the architecture: packages import only from the layers below them, RL math imports only torch,
and no module reaches itself through its imports. Every import counts, also one inside a function."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("pipeline", "data", "reward_model", "stages")

# Lowest first. A package imports from packages of lower layers only, never from its own layer's neighbours.
LAYERS = [
    ("pipeline.rl",),  # pure tensor math
    ("pipeline.config",),  # what a run is
    ("data",),  # datasets, formats, the built-in task
    ("pipeline.run", "pipeline.generation"),  # the run directory and stage graph; decoding and scoring forwards
    ("pipeline.train", "pipeline.retrieval"),  # loops, engines, saving; passages of a folder and their index
    ("reward_model", "pipeline.plan"),
    ("pipeline.ppo",),
    ("pipeline.evaluation",),
    ("pipeline.scaling",),  # sweeps of pretraining runs, the laws fitted to them, their page
    ("pipeline.cli",),
    ("stages",),
]
LAYER_OF = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def package_of(module: str) -> str:
    """The layered package a module belongs to: `pipeline.<subpackage>`, or a top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipeline" and len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (`from x import y` counts x, and x.y when
    that is a module of ours)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def our_modules() -> dict[str, Path]:
    return {module_name(path): path for top in OURS for path in sorted((REPO / top).rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Our modules and the modules of ours each imports."""
    modules = our_modules()
    return {name: {target for target in imports_of(path) if target in modules and target != name}
            for name, path in modules.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    violations = []
    for source, targets in graph.items():
        source_package = package_of(source)
        if source == "pipeline":  # the namespace's own __init__: a docstring
            violations += [f"pipeline/__init__.py imports {target}" for target in targets]
            continue
        if source_package not in LAYER_OF:
            violations.append(f"{source}: package {source_package} is in no layer")
            continue
        for target in targets:
            target_package = package_of(target)
            if target_package == source_package or target_package == "pipeline":
                continue
            if LAYER_OF.get(target_package, len(LAYERS)) >= LAYER_OF[source_package]:
                violations.append(f"{source} imports {target}: {target_package} is not below {source_package}")
    return violations


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each an import circle."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_every_package_imports_only_from_the_layers_below_it():
    assert layer_violations(import_graph()) == []


def test_rl_math_imports_only_torch_and_the_standard_library():
    for path in sorted((REPO / "pipeline" / "rl").rglob("*.py")):
        for target in imports_of(path):
            top = target.split(".")[0]
            assert top in ("torch", "pipeline") or top in sys.stdlib_module_names, f"{path.name} imports {target}"
            assert top != "pipeline" or target.startswith("pipeline.rl"), f"{path.name} imports {target}"


@pytest.mark.parametrize("source, forbidden", [("pipeline.generation", "reward_model"), ("pipeline.config", "data"),
                                                ("pipeline.rl", "pipeline.config")])
def test_named_arrows_do_not_exist(source, forbidden):
    graph = import_graph()
    wrong = [f"{name} imports {target}" for name, targets in graph.items() if package_of(name) == source
             for target in targets if package_of(target) == forbidden]
    assert wrong == []


def test_no_module_reaches_itself_through_its_imports():
    assert import_cycles(import_graph()) == []


def test_the_checks_catch_a_wrong_arrow_and_a_circle():
    """The checks themselves, on a made-up graph: generation importing the reward model, and a circle."""
    graph = {"pipeline.generation.padding": {"reward_model.model"}, "reward_model.model": set(),
             "pipeline.config.schema": {"pipeline.config.validation"},
             "pipeline.config.validation": {"pipeline.config.schema"}}
    assert layer_violations(graph) == [
        "pipeline.generation.padding imports reward_model.model: reward_model is not below pipeline.generation"]
    assert import_cycles(graph) == [["pipeline.config.schema", "pipeline.config.validation"]]
    assert layer_violations({"pipeline.misc.helpers": set()}) == ["pipeline.misc.helpers: package pipeline.misc is in "
                                                                  "no layer"]
