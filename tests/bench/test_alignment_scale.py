import json

import alignment_scale  # bench/, put on the path by conftest.py
import pytest
from test_alignment import fake_run

from pipeline.scaling.grid import ModelSize


def test_pretraining_compute_is_6nd_of_the_configured_run():
    compute = alignment_scale.pretraining_compute(alignment_scale.REPO / "configs" / "default.yaml",
                                                  ["pretrain.max_steps=100"])
    parameters = ModelSize(4, 128, 4, 352).non_embedding_parameters()
    assert compute == {"non_embedding_parameters": parameters, "tokens": 100 * 16 * 128,
                       "compute": pytest.approx(6.0 * parameters * 100 * 16 * 128)}


def test_scales_from_the_command_line():
    assert alignment_scale.parse_scales(None) == alignment_scale.DEFAULT_SCALES
    assert alignment_scale.parse_scales(["big=pretrain.max_steps=800,model.hidden_size=192", "same="]) == {
        "big": ["pretrain.max_steps=800", "model.hidden_size=192"], "same": []}


def test_the_table_and_plot_of_each_scale(tmp_path, monkeypatch):
    runs = {"small-": fake_run(tmp_path / "small", 0.7, 0.6), "large-": fake_run(tmp_path / "large", 0.85, 0.8)}
    monkeypatch.setattr(alignment_scale, "run_seed", lambda config, out, seed, overrides, name: runs[name])
    assert alignment_scale.main(["--output-dir", str(tmp_path / "out"), "--scale", "small=pretrain.max_steps=100",
                                 "--scale", "large=pretrain.max_steps=800"]) == 0
    written = json.loads((tmp_path / "out" / "alignment_scale.json").read_text())
    assert written["scales"]["large"]["tokens"] == 8 * written["scales"]["small"]["tokens"]
    assert written["scales"]["large"]["summary"]["ppo_gold_win_rate"]["mean"] == 0.85
    table = (tmp_path / "out" / "alignment_scale.md").read_text()
    assert "| small |" in table and "| large |" in table
    assert "<svg" in (tmp_path / "out" / "alignment_scale.html").read_text()
