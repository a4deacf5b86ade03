#!/usr/bin/env bash
# Our PPO step against TRL 0.19.1's PPOTrainer on identical work (bench/side_by_side.py builds both sides'
# models, prompts and batch split), run alternately on this machine, and the ratio of their medians.
#
#     bench/compare_trl.sh [--rounds N] [shape flags of bench/ppo_step.py, e.g. --dtype bf16]
#
# TRL 0.19.1 (the last TRL with a PPOTrainer) needs transformers < 4.54, so it lives in its own virtual
# environment, made once in .bench-venv-trl/ (gitignored; delete it to rebuild). Each round runs both, the
# one that went first going second in the next round, so that neither profits from a quieter moment.
# Torch uses one thread per core; on a machine that others load, OMP_NUM_THREADS=1 (recorded in the output)
# keeps both sides from losing their time slices to threads that spin-wait for each other.
set -euo pipefail
cd "$(dirname "$0")/.."

command="bench/compare_trl.sh $*"
rounds=2
if [[ "${1:-}" == "--rounds" ]]; then
    rounds="${2:-}"
    shift 2 || true
fi
if ! [[ "$rounds" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --rounds must be a whole number ≥ 1, got '$rounds'" >&2
    exit 2
fi

ours_python="${OURS_PYTHON:-.venv/bin/python}"
trl_venv="${TRL_VENV:-.bench-venv-trl}"
if [[ ! -x "$ours_python" ]]; then
    echo "error: no project virtualenv at $ours_python; run 'make setup' first (or set OURS_PYTHON)" >&2
    exit 2
fi
if [[ ! -f "$trl_venv/.installed" ]]; then
    echo "making TRL 0.19.1's virtualenv in $trl_venv (once; a few minutes)" >&2
    rm -rf "$trl_venv"
    python3 -m venv "$trl_venv"
    if ! "$trl_venv/bin/pip" install -q torch==2.13.0 "trl==0.19.1" "transformers<4.54" "accelerate<1.10" \
            "datasets<4" > "$trl_venv/install.log" 2>&1; then
        tail -n 20 "$trl_venv/install.log" >&2
        echo "error: installing TRL 0.19.1 into $trl_venv failed (log above); it will be retried next time" >&2
        exit 1
    fi
    touch "$trl_venv/.installed"
fi

echo "# ${OMP_NUM_THREADS:+OMP_NUM_THREADS=$OMP_NUM_THREADS }$command"
echo "# date: $(date -u '+%Y-%m-%d %H:%M UTC'); nproc: $(env -u OMP_NUM_THREADS nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $rounds rounds, alternating which side runs first; each figure is the mean of the timed steps of one run"

results="$(mktemp)"
errors="$(mktemp)"
trap 'rm -f "$results" "$errors"' EXIT
# stdout (a readable line and a JSON line) is kept; stderr (progress bars, library warnings) only on failure.
run_side() {
    if ! "$@" 2> "$errors" | tee -a "$results"; then
        tail -n 20 "$errors" >&2
        echo "error: '$*' failed (its last lines above)" >&2
        exit 1
    fi
}
for round in $(seq 1 "$rounds"); do
    if (( round % 2 )); then
        run_side "$trl_venv/bin/python" bench/trl_ppo_step.py "$@"; run_side "$ours_python" bench/ppo_step.py "$@"
    else
        run_side "$ours_python" bench/ppo_step.py "$@"; run_side "$trl_venv/bin/python" bench/trl_ppo_step.py "$@"
    fi
done
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$ours_python" bench/side_by_side.py summary < "$results"
