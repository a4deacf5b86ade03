#!/usr/bin/env bash
# The GPU checks of issue 12 in one command, then one table to paste into the README (dated, the GPU named):
#   - tests/gpu: every stage of the smoke preset (and SmolLM2-135M where models/ has it) under one GPU or DDP,
#     FSDP2, DeepSpeed ZeRO-2 and ZeRO-3; PPO's first-minibatch invariant under each; DDP vs ZeRO-3 final weights;
#   - bench/ppo_step.py (fp32 and bf16) and bench/pretrain_throughput.py (bf16) on the GPU.
#
#     bash bench/gpu_check.sh            # PYTHON=... to choose the interpreter; logs under bench/results/
#
# Exits 2 without a CUDA GPU, else with pytest's status (benchmarks that fail show as such in the table).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench/results/gpu_check-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU visible to $PYTHON; nothing to check" >&2
    exit 2
fi

"$PYTHON" -m pytest tests/gpu -q -rA -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
"$PYTHON" bench/ppo_step.py --dtype fp32 2>&1 | tee "$OUT/ppo_step_fp32.log"
"$PYTHON" bench/ppo_step.py --dtype bf16 2>&1 | tee "$OUT/ppo_step_bf16.log"
"$PYTHON" bench/pretrain_throughput.py --dtype bf16 --no-compile 2>&1 | tee "$OUT/pretrain_bf16.log"

"$PYTHON" - "$OUT" <<'EOF'
"""One markdown table: the GPU test outcomes, then the benchmark figures (from each bench's last JSON line)."""
import datetime
import json
import sys
import xml.etree.ElementTree as ElementTree
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

out = Path(sys.argv[1])


def installed(package):
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def last_json(name):
    for line in reversed((out / name).read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


gpu = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
print(f"\n### GPU check, {datetime.date.today().isoformat()}, {gpu}")
print(f"torch {torch.__version__}, accelerate {installed('accelerate')}, transformers {installed('transformers')}, "
      f"trl {installed('trl')}, deepspeed {installed('deepspeed')}\n")
print("| check | outcome | figure |")
print("|---|---|---|")
tests = out / "gpu_tests.xml"
cases = ElementTree.parse(tests).getroot().iter("testcase") if tests.is_file() else []
for case in cases:
    outcome = "passed"
    for kind in ("failure", "error", "skipped"):
        found = case.find(kind)
        if found is not None:
            outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[kind]
            if kind == "skipped":
                outcome += f" ({(found.get('message') or '').strip()[:60]})"
    print(f"| {case.get('name')} | {outcome} | {float(case.get('time', 0)):.0f} s |")
for name, label in (("ppo_step_fp32.log", "bench/ppo_step.py fp32"), ("ppo_step_bf16.log", "bench/ppo_step.py bf16")):
    result = last_json(name)
    if result is None or "sec_per_step" not in result:
        print(f"| {label} | FAILED | see {out / name} |")
        continue
    print(f"| {label} | ran | {result['sec_per_step']} s/step (rollout {result['rollout']}, scoring "
          f"{result['scoring']}, optimisation {result['optimisation']}) |")
result = last_json("pretrain_bf16.log")
if result is None or "stage_tokens_per_s" not in result:
    print(f"| bench/pretrain_throughput.py bf16 | FAILED | see {out / 'pretrain_bf16.log'} |")
else:
    print(f"| bench/pretrain_throughput.py bf16 | ran | {result['stage_tokens_per_s']} tokens/s, MFU "
          f"{result['stage_mfu']} |")
EOF
exit "$tests_status"
