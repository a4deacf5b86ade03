import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config.loading import config_from_mapping
from pipeline.config.parsing import ConfigError
from pipeline.scaling.grid import DEFAULT_GRID, QUICK_GRID, ModelSize, parse_grid, plan_points


def test_non_embedding_parameters_count_what_the_built_model_holds():
    size = ModelSize(3, 96, 3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=size.mlp_width,
                                         num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3,
                                         tie_word_embeddings=True))
    counted = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    assert size.non_embedding_parameters() == counted
    assert size.mlp_width == 264 and size.name == "3x96"


def test_default_and_quick_grids_meet_the_sweep_minimums():
    default = parse_grid({})
    parameters = [size.non_embedding_parameters() for size in default.sizes]
    assert len(default.sizes) >= 6 and len(default.compute) >= 4
    assert max(parameters) / min(parameters) >= 30
    plan = plan_points(default, config_from_mapping({}))
    for size in default.sizes:
        assert sum(point.size == size for point in plan.points) >= 4
    quick = parse_grid(QUICK_GRID)
    assert quick.compute == sorted(QUICK_GRID["compute"]) and DEFAULT_GRID["sizes"] != QUICK_GRID["sizes"]


def test_points_train_on_c_over_6n_tokens_and_short_ones_are_set_aside():
    grid = parse_grid({"sizes": [[1, 16, 2], [2, 64, 2]], "compute": [1e9, 1e11], "min_steps": 20})
    config = config_from_mapping({"pretrain": {"per_device_train_batch_size": 4, "seq_length": 32}})
    plan = plan_points(grid, config)
    for point in plan.points + plan.too_short:
        wanted = point.compute / (6 * point.size.non_embedding_parameters())
        assert point.tokens == point.steps * 128 and wanted - 128 < point.tokens <= wanted
    assert [p.name for p in plan.too_short] == ["2x64-C1.00e09"]


@pytest.mark.parametrize("raw, message", [
    ({"sizes": []}, "sweep.sizes: the grid is empty"),
    ({"compute": []}, "sweep.compute: the grid is empty"),
    ({"sizes": [[2, 48, 5]]}, "sweep.sizes[0]: hidden size 48 does not divide into 5 heads"),
    ({"sizes": [[2, 48, 2], [2, 36, 4]]}, "sweep.sizes[1]: head size 9"),
    ({"sizes": [[2, 48]]}, "sweep.sizes[0]: a size is [layers, hidden, heads]"),
    ({"sizes": [[2, 48, 2], [2, 48, 4]]}, "listed twice"),
    ({"compute": [1e12, -1]}, "sweep.compute[1]: must be a positive number"),
    ({"budgets": [1e12]}, "sweep.budgets: unknown key"),
    ({"parallel": 0}, "sweep.parallel: must be a whole number ≥ 1"),
    ([1, 2], "sweep: must be a mapping"),
])
def test_bad_grids_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_grid(raw)


def test_a_budget_under_one_batch_is_an_error_naming_the_size():
    grid = parse_grid({"sizes": [[2, 64, 2]], "compute": [1e8]})
    with pytest.raises(ConfigError, match=r"budget 1e\+08 gives size 2x64 .* under one batch of 2,048"):
        plan_points(grid, config_from_mapping({}))
