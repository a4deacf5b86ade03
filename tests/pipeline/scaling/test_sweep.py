"""`rlhf sweep` end to end on 4 points of tiny models: results, page, resume after a kill, bad grids."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli.main import main
from pipeline.scaling.sweep import available_cores
from tests.helpers import REPO, environment

pytestmark = pytest.mark.slow

# 1x32 and 1x16 at two budgets: 10, 38, 20 and 77 steps of 4 × 32 tokens, in that order (cheapest budget first).
TINY = {
    "model": {"max_position_embeddings": 256},
    "tokenizer": {"vocab_size": 512, "training_texts": 500},
    "data": {"builtin": {"pretrain_stories": 1000, "pretrain_eval_stories": 50}},
    "pretrain": {"per_device_train_batch_size": 4, "seq_length": 32, "eval_batches": 2, "per_device_eval_batch_size": 8},
    "sweep": {"sizes": [[1, 16, 2], [1, 32, 2]], "compute": [1.0e8, 2.0e8], "min_steps": 2, "fit_min_steps": 2, "probe_steps": 5,
              "probe_questions": 8, "bootstrap": 5},
}


def tiny_config(tmp_path: Path, **sections) -> Path:
    raw = {**TINY, **sections, "run": {"name": "tiny", "output_dir": str(tmp_path / "runs")}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_four_point_sweep_writes_every_run_and_the_page(tmp_path, capsys):
    assert main(["sweep", str(tiny_config(tmp_path))]) == 0
    directory = tmp_path / "runs" / "tiny-sweep"
    results = json.loads((directory / "results.json").read_text())
    assert [run["name"] for run in results["runs"]] == ["1x16-C1.00e08", "1x16-C2.00e08", "1x32-C1.00e08",
                                                        "1x32-C2.00e08"]
    for run in results["runs"]:
        assert run["eval_loss"] > 0 and run["steps"] == run["tokens"] // 128
        assert 0 <= run["reading_probe"]["accuracy"] <= 1 and run["reading_probe"]["questions"] == 8
        assert (directory / "points" / run["name"] / "pretrain" / "final" / "model.safetensors").is_file()
    # More compute, same size: lower held-out loss.
    losses = {run["name"]: run["eval_loss"] for run in results["runs"]}
    assert losses["1x16-C2.00e08"] < losses["1x16-C1.00e08"]
    assert results["law"] is None and "needs at least 6 runs" in results["law_reason"]
    assert results["threads_per_point"] == available_cores()
    page = (directory / "scaling.html").read_text()
    assert "<svg" in page and "1x32-C2.00e08" in page and "Reading probe" in page
    assert "needs at least 6 runs" in capsys.readouterr().out


def test_a_killed_sweep_resumes_without_redoing_finished_points(tmp_path):
    config = tiny_config(tmp_path)
    halted = tmp_path / "halted"
    command = [sys.executable, "-m", "pipeline.cli", "sweep", str(config)]
    # The second point (1x16 at 1e8, 38 steps, a checkpoint at step 20) stops dead at step 25; the first is done.
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               env={**environment(), "RLHF_HALT_AT": "pretrain:25", "RLHF_HALT_FILE": str(halted)})
    deadline = time.time() + 240
    while not halted.exists():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.time() < deadline, "the sweep never reached the halt"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    points = tmp_path / "runs" / "tiny-sweep" / "points"
    finished = points / "1x32-C1.00e08" / "pretrain" / "final" / "model.safetensors"
    written = finished.stat().st_mtime_ns
    assert not (points / "1x16-C1.00e08" / "pretrain" / "final").exists()

    again = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert finished.stat().st_mtime_ns == written
    assert "pretrain: finished earlier, skipped" in (points / "1x32-C1.00e08" / "log.txt").read_text()
    assert "pretrain: resuming from checkpoint-20" in (points / "1x16-C1.00e08" / "log.txt").read_text()
    results = json.loads((tmp_path / "runs" / "tiny-sweep" / "results.json").read_text())
    assert all(run["eval_loss"] for run in results["runs"])


@pytest.mark.parametrize("overrides, message", [
    (["sweep.sizes=[[2, 48, 5]]"], "error: sweep.sizes[0]: hidden size 48 does not divide into 5 heads"),
    (["sweep.sizes=[]"], "error: sweep.sizes: the grid is empty"),
    (["sweep.compute=[1000]"], "error: sweep.compute: budget 1e+03 gives size 1x16"),
    (["model.name_or_path=models/x"], "error: model.name_or_path: a sweep trains every size from scratch"),
])
def test_a_bad_grid_is_one_line_exit_2_before_anything_is_written(tmp_path, capsys, overrides, message):
    assert main(["sweep", str(tiny_config(tmp_path)), *overrides]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(message) and "\n" not in error
    assert not (tmp_path / "runs").exists()


def test_a_plain_text_corpus_is_split_at_blank_lines_with_a_seeded_held_out_share(tmp_path):
    from pipeline.config.loading import config_from_mapping
    from pipeline.scaling.corpus import paragraphs_of_text_file, user_corpus

    text = tmp_path / "plays.txt"
    text.write_text("\n\n".join(f"SPEAKER {i}:\nline {i}" for i in range(40)) + "\n\n\n")
    assert paragraphs_of_text_file(text)[:2] == ["SPEAKER 0:\nline 0", "SPEAKER 1:\nline 1"]
    config = config_from_mapping({"data": {"pretrain": {"path": str(text), "eval_fraction": 0.1}}})
    train, held = user_corpus(config)
    assert len(train) == 36 and len(held) == 4 and not set(train) & set(held)
    assert user_corpus(config) == (train, held)
    (tmp_path / "one.txt").write_text("just one block\n")
    with pytest.raises(Exception, match="fewer than two blocks"):
        paragraphs_of_text_file(tmp_path / "one.txt")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_available_cores_follows_the_affinity_mask():
    # `taskset -c 0` gives a sweep one core: it must train on one thread, not on os.cpu_count().
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert available_cores() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert available_cores() == len(before)


def test_a_size_with_its_own_learning_rate_trains_at_it_on_its_share_of_the_corpus(tmp_path):
    # The point's learning rate is the last override: its record must not read the corpus share from there.
    sweep = {**TINY["sweep"], "sizes": [{"layers": 1, "hidden": 16, "heads": 2, "learning_rate": 0.01}],
             "compute": [1.0e8], "probe_steps": 0}
    assert main(["sweep", str(tiny_config(tmp_path, sweep=sweep))]) == 0
    [run] = json.loads((tmp_path / "runs" / "tiny-sweep" / "results.json").read_text())["runs"]
    assert run["learning_rate"] == 0.01 and 0 < run["epochs"] < 1 and run["eval_loss"] > 0
