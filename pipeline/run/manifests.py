"""What a stage records about itself in the run directory: manifest.json (config, inputs, status,
library versions) and metrics.jsonl (one line per logged step)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.run.files import write_json_atomically


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


def write_manifest(stage_dir: Path, **fields: Any) -> None:
    """Record what a stage did: merged into any existing manifest, with library versions added."""
    path = Path(stage_dir) / "manifest.json"
    manifest = read_manifest(stage_dir) or {}
    manifest.update(fields)
    manifest["versions"] = library_versions()
    write_json_atomically(path, manifest)


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / "manifest.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


class MetricsLog:
    """Append-only metrics jsonl that a resumed stage first cuts back to its checkpoint's step."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and self._step_of(line) is not None and self._step_of(line) <= resume_step]
            with open(self.path, "w", encoding="utf-8") as handle:
                handle.write("".join(line + "\n" for line in kept))

    @staticmethod
    def _step_of(line: str) -> int | None:
        try:
            return json.loads(line).get("step")
        except json.JSONDecodeError:  # a line cut short by a kill
            return None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
