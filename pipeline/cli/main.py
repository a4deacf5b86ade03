"""The `rlhf` command: run the pipeline, see where a run stands, compare policies, sample from checkpoints.

    rlhf run CONFIG [key=value ...] [--restart STAGE]   pretrain → sft → reward → ppo, then the report
    rlhf plan CONFIG [key=value ...] [--gpus N ...]     memory per device of each stage: will it fit?
    rlhf status RUN_DIR                                 which stages are done, stale, in progress, or pending
    rlhf compare RUN_DIR [--best-of N ...]              SFT vs PPO (and best-of-N) samples, scored; RUN_DIR/report/
    rlhf generate CHECKPOINT --prompt TEXT              sample (greedy, temperature, top-k, top-p)
    rlhf generate CHECKPOINT --docs DIR --prompt Q      answer from the most similar passages of a folder
    rlhf chat CHECKPOINT                                an interactive, streaming chat
    rlhf sweep CONFIG [key=value ...] [--quick]         pretrain sizes × budgets, fit scaling laws; a page of plots
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.loading import DataError
from pipeline.config.loading import load_config
from pipeline.config.parsing import ConfigError
from pipeline.config.schema import STAGES
from pipeline.train.entry import quiet_transformers, set_offline_mode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the whole pipeline, skipping finished stages and resuming the rest")
    run.add_argument("config", help="YAML run config, e.g. configs/default.yaml")
    run.add_argument("overrides", nargs="*", metavar="key=value")
    run.add_argument("--restart", action="append", default=[], choices=STAGES, metavar="STAGE",
                     help="discard this stage's checkpoints and run it from scratch (repeatable)")
    run.add_argument("--no-report", action="store_true", help="skip the comparison report at the end")

    plan = commands.add_parser("plan", help="the memory each stage needs per device, whether it fits, what would")
    plan.add_argument("config", help="YAML run config, e.g. configs/gpu.yaml")
    plan.add_argument("overrides", nargs="*", metavar="key=value")
    plan.add_argument("--gpus", type=int, help="plan for N GPUs (default: this machine's, or its CPU)")
    plan.add_argument("--gpu-memory", type=float, metavar="GiB", help="memory of each GPU, to plan for GPUs elsewhere")
    plan.add_argument("--engine", choices=("ddp", "fsdp2", "zero2", "zero3"),
                      help="default: what run.accelerate_config launches, else ddp")

    sweep = commands.add_parser("sweep", help="pretrain a grid of model sizes × compute budgets and fit scaling laws")
    sweep.add_argument("config", help="YAML run config with an optional sweep: section, e.g. configs/default.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="also sweep.* keys, e.g. sweep.parallel=2")
    sweep.add_argument("--quick", action="store_true", help="a small grid of tiny models (about 3 minutes)")
    sweep.add_argument("--restart", action="store_true", help="train every point again from scratch")

    status = commands.add_parser("status", help="which stages of a run are done, in progress, or pending")
    status.add_argument("run_dir", type=Path)

    compare = commands.add_parser("compare", help="compare the SFT and PPO policies; write RUN_DIR/report/")
    compare.add_argument("run_dir", type=Path)
    compare.add_argument("--prompts", type=int, default=None, help="held-out prompts to sample (default: all)")
    compare.add_argument("--samples-per-prompt", type=int, default=4)
    compare.add_argument("--include-pretrained", action="store_true", help="also sample the pretrained model")
    compare.add_argument("--best-of", type=int, nargs="*", default=[4, 16], metavar="N",
                         help="best-of-N baselines from the SFT policy, from a pool of max(N) SFT samples per prompt "
                              "(default: 4 16; none, or 0: off)")
    compare.add_argument("--snapshot-samples-per-prompt", type=int, default=2, metavar="K",
                         help="samples per prompt of each intermediate PPO policy (ppo/policy-step-N/) on the "
                              "over-optimisation curve (0: skip them)")

    for name, text in (("generate", "sample from any stage checkpoint"), ("chat", "chat with a checkpoint")):
        command = commands.add_parser(name, help=text)
        command.add_argument("checkpoint", help="a checkpoint directory (e.g. runs/default/ppo/final) or hub id")
        if name == "generate":
            command.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
            command.add_argument("--compare", metavar="OTHER", help="also answer with this checkpoint, side by side")
        add_retrieval_arguments(command)
        add_sampling_arguments(command)

    arguments = parser.parse_args(argv)
    if arguments.command in ("compare", "generate", "chat", "sweep"):  # they load models in this process
        quiet_transformers()
    try:
        return COMMANDS[arguments.command](arguments)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def add_retrieval_arguments(parser: argparse.ArgumentParser) -> None:
    retrieval = parser.add_argument_group("retrieval (answers from a folder of documents)")
    retrieval.add_argument("--docs", metavar="DIR", help="answer from the passages of this folder's .txt, .md and "
                                                         ".jsonl files that are most similar to the question")
    retrieval.add_argument("--passages", type=int, default=None,
                           help="passages put into the prompt (default: 1 for the story template, 3 for chat)")
    retrieval.add_argument("--embedding", choices=("tfidf", "model"), default="tfidf",
                           help="how passages are compared with the question (bench/rag.py measures both)")
    retrieval.add_argument("--rag-template", choices=("auto", "story", "chat"), default="auto",
                           help="auto: the story-question template for policies trained on the built-in task, "
                                "else a user message listing the passages")
    retrieval.add_argument("--index-dir", metavar="DIR", help="where the index cache lives (default: DIR/.rlhf-index)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set with mass p")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)


def command_run(arguments: argparse.Namespace) -> int:
    from pipeline.plan.memory_plan import check_run_fits
    from pipeline.run.launch import (
        LocalStageLauncher,
        StageFailed,
        machine_rank,
        run_directory_lock,
        run_stages,
        summary_table,
    )
    from pipeline.run.preflight import preflight

    config = load_config(arguments.config, arguments.overrides)
    set_offline_mode(config.run.offline)
    # Started first, so that its server imports the stages' libraries while this process checks the run.
    local_launcher = None if config.run.accelerate_config else LocalStageLauncher(config).start()
    preflight(config)  # bad rows, checkpoints and tokenizers fail here, before anything is written
    check_run_fits(config)  # a stage that cannot fit this machine's memory fails here, not at its first step
    machine = machine_rank(config)
    with run_directory_lock(config.run_dir, machine):
        try:
            outcomes = run_stages(config, arguments.overrides, set(arguments.restart), local_launcher)
        except StageFailed as failure:
            print(f"\nerror: {failure}", file=sys.stderr)
            return failure.code if 0 < failure.code < 128 else 1
        print("\n" + summary_table(outcomes))
        if not arguments.no_report and "ppo" in config.run.stages and machine == 0:
            from pipeline.evaluation.compare import compare_run

            compare_run(config.run_dir)
    return 0


def command_plan(arguments: argparse.Namespace) -> int:
    from pipeline.plan.hardware import machine_hardware
    from pipeline.plan.memory_plan import format_plan, plan_run

    config = load_config(arguments.config, arguments.overrides)
    set_offline_mode(config.run.offline)
    hardware = machine_hardware(config, arguments.gpus, arguments.gpu_memory, arguments.engine)
    plans = plan_run(config, hardware)
    print(format_plan(plans, hardware))
    return 0 if all(plan.fits for plan in plans) else 1


def command_sweep(arguments: argparse.Namespace) -> int:
    from pipeline.run.launch import StageFailed
    from pipeline.scaling.sweep import load_sweep, run_sweep

    sweep = load_sweep(arguments.config, arguments.overrides, arguments.quick)
    set_offline_mode(sweep.config.run.offline)
    print(f"sweep: {len(sweep.plan.points)} points ({len(sweep.grid.sizes)} sizes × {len(sweep.grid.compute)} "
          f"budgets{f', {len(sweep.plan.too_short)} under {sweep.grid.min_steps} steps left out' if sweep.plan.too_short else ''}"
          f") in {sweep.directory}")
    try:
        page = run_sweep(sweep, restart=arguments.restart)
    except StageFailed as failure:
        print(f"\nerror: {failure}", file=sys.stderr)
        return failure.code if 0 < failure.code < 128 else 1
    import json

    from pipeline.scaling.page import summary_sentences

    print("\n" + "\n".join(summary_sentences(json.loads((page.parent / "results.json").read_text()))))
    print(f"\n{page}\n{page.parent / 'results.json'}")
    return 0


def command_status(arguments: argparse.Namespace) -> int:
    from pipeline.run.launch import stage_status

    if not arguments.run_dir.is_dir():
        raise ConfigError(f"run directory {arguments.run_dir} does not exist")
    for stage in STAGES:
        print(f"{stage:<9} {stage_status(arguments.run_dir, stage)}")
    return 0


def command_compare(arguments: argparse.Namespace) -> int:
    from pipeline.evaluation.compare import compare_run

    set_offline_mode(True)
    compare_run(arguments.run_dir, prompts=arguments.prompts, samples_per_prompt=arguments.samples_per_prompt,
                include_pretrained=arguments.include_pretrained, best_of=arguments.best_of,
                snapshot_samples_per_prompt=arguments.snapshot_samples_per_prompt)
    return 0


def command_generate(arguments: argparse.Namespace) -> int:
    from pipeline.cli.generate import generate_command

    return generate_command(arguments)


def command_chat(arguments: argparse.Namespace) -> int:
    from pipeline.cli.generate import chat_command

    return chat_command(arguments)


COMMANDS = {"run": command_run, "plan": command_plan, "status": command_status, "compare": command_compare,
            "generate": command_generate, "chat": command_chat,
            "sweep": command_sweep}


if __name__ == "__main__":
    raise SystemExit(main())
