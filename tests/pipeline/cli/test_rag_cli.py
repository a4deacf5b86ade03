"""`rlhf generate/chat --docs DIR`: answers name their sources; bad folders are one line and exit 2."""

import subprocess
import sys

import pytest

from pipeline.cli.main import main
from tests.helpers import REPO, environment


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "mia.txt").write_text("Mia had a red kite. Mia went to the park.")
    (folder / "tom.txt").write_text("Tom found a blue ball by the door.")
    return folder


def test_generate_with_docs_answers_and_names_its_source(tiny_causal_lm, docs, capsys):
    assert main(["generate", str(tiny_causal_lm), "--docs", str(docs), "--prompt", "What colour was Tom's ball?",
                 "--greedy", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "### What colour was Tom's ball?" and lines[2] == "sources:"
    assert lines[3].startswith("  [1] tom.txt, passage 1 (similarity ")
    assert "[docs] 2 passages from 2 file(s): 2 indexed, 0 from the cache" in captured.err


def test_chat_with_docs_reads_piped_input_like_the_plain_chat(tiny_causal_lm, docs):
    command = [sys.executable, "-m", "pipeline.cli", "chat", str(tiny_causal_lm), "--docs", str(docs),
               "--max-new-tokens", "4"]
    result = subprocess.run(command, input="Where did Mia go?\nWhat did Tom find?\n", cwd=REPO, env=environment(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("assistant> ") == 2
    sources = [line for line in result.stdout.splitlines() if line.startswith("  [1] ")]
    assert [s.split(",")[0] for s in sources] == ["  [1] mia.txt", "  [1] tom.txt"]
    assert "from the cache" in result.stderr


@pytest.mark.parametrize("case", ["missing", "empty", "binary"])
def test_a_folder_with_nothing_to_read_exits_2_with_one_line(tiny_causal_lm, tmp_path, capsys, case):
    folder = tmp_path / "docs"
    if case != "missing":
        folder.mkdir()
    if case == "binary":
        (folder / "data.txt").write_bytes(b"\0\xff\xfe")
    assert main(["generate", str(tiny_causal_lm), "--docs", str(folder), "--prompt", "Hi"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: --docs {folder}: ")
    assert main(["generate", str(tiny_causal_lm), "--docs", str(tmp_path), "--prompt", "Hi", "--passages", "0"]) == 2


def test_passages_longer_than_the_context_are_cut_and_the_output_says_so(tiny_causal_lm, tmp_path, capsys):
    folder = tmp_path / "long"
    folder.mkdir()
    (folder / "long.txt").write_text(" ".join(f"Mia saw a red kite number {i}." for i in range(400)))
    assert main(["generate", str(tiny_causal_lm), "--docs", str(folder), "--prompt", "What did Mia see?",
                 "--passages", "5", "--max-new-tokens", "4", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert "cut or left out to fit the model's context)" in out and "  [1] long.txt, passage 1" in out
