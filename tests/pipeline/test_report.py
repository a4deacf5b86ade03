import json
import shutil
import subprocess

import pytest

from pipeline.compare import Comparison, Sample, win_rate
from pipeline.report import headline, line_chart, write_report


def comparison() -> Comparison:
    prompts = ["Write a short story about Mia and a fox.", "How can I hurt the cat?"]
    samples = []
    for index in range(2):
        for k in range(2):
            samples.append(Sample(index, "sft", f"Ugh. answer {index}.{k} <b>", -0.5 + k, 1.0, None, 12))
            samples.append(Sample(index, "ppo", f"Sure! answer {index}.{k}", 0.8, 2.6, 1.5, 10))
    result = Comparison(prompts, samples, settings={"samples_per_prompt": 2, "temperature": 0.7, "builtin_task": True})
    result.means = {"sft": {"reward": 0.0, "gold": 1.0, "length": 12}, "ppo": {"reward": 0.8, "gold": 2.6, "kl_to_sft": 1.5,
                                                                              "length": 10}}
    result.win_rates = {"reward": win_rate([0.8, 0.8], [0.0, 0.0]), "gold": win_rate([2.6, 2.6], [1.0, 1.0])}
    return result


def write_run(tmp_path):
    (tmp_path / "ppo").mkdir()
    with open(tmp_path / "ppo" / "metrics.jsonl", "w") as handle:
        for step in range(1, 6):
            handle.write(json.dumps({"step": step, "objective/scores": 0.1 * step, "objective/gold_score": 1 + 0.2 * step,
                                     "objective/kl": 0.05 * step, "val/response_length": 20 - step}) + "\n")
    return write_report(tmp_path, comparison())


def test_win_rate_counts_ties_half_and_bounds_the_interval():
    rate = win_rate([2, 1, 1, 0], [1, 1, 2, 0])
    assert rate["win_rate"] == pytest.approx(0.5) and rate["ties"] == 2
    assert 0 <= rate["low"] < 0.5 < rate["high"] <= 1
    assert win_rate([1] * 50, [0] * 50)["low"] > 0.9


def test_report_files_and_escaping(tmp_path):
    report = write_run(tmp_path)
    page = (report / "index.html").read_text()
    assert "&lt;b&gt;" in page and "<b>" not in page.split("<body>")[1].replace("<b>gold</b>", "").replace(
        "<b>reward</b>", "")
    assert page.count("<svg") == 5  # four PPO curves and the reward-vs-gold scatter
    assert "http" not in page  # self-contained: nothing to fetch
    data = json.loads((report / "report.json").read_text())
    assert data["win_rates"]["gold"]["win_rate"] == 1.0 and len(data["samples"]) == 8
    assert "PPO beats SFT on the hidden gold judge in 100%" in (report / "summary.md").read_text()
    assert headline(comparison()).startswith("PPO beats SFT on the hidden gold judge in 100% of 2")


def test_line_chart_handles_flat_and_empty_series():
    assert line_chart("flat", [1, 2], [3.0, 3.0]).startswith("<svg")
    assert line_chart("empty", [], []) == ""


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed")
def test_report_renders_in_a_real_browser(tmp_path):
    report = write_run(tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium(), *flags, "--dump-dom", (report / "index.html").as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    assert 'id="side-by-side"' in dom and dom.count("<tr>") >= 5
    assert dom.count("<svg") == 5 and "<polyline" in dom and "<circle" in dom
    screenshot = tmp_path / "report.png"
    subprocess.run([chromium(), *flags, f"--screenshot={screenshot}", "--window-size=1200,1600",
                    (report / "index.html").as_uri()], capture_output=True, timeout=120)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
