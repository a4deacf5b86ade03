from pipeline.config.validation import looks_like_local_path


def test_hub_ids_are_not_local_paths():
    assert not looks_like_local_path("gpt2")
    assert not looks_like_local_path("Anthropic/hh-rlhf")
    assert looks_like_local_path("./model")
    assert looks_like_local_path("data/file.jsonl")
    assert looks_like_local_path("/abs/path")


def test_hub_ids_with_dots_are_not_local_paths(tmp_path):
    assert not looks_like_local_path("Qwen/Qwen2.5-0.5B-Instruct")
    assert not looks_like_local_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert looks_like_local_path("sft.jsonl") and looks_like_local_path("data/x.jsonl.gz")
    assert looks_like_local_path("./model") and looks_like_local_path("runs/default/sft/final")
    assert looks_like_local_path(str(tmp_path))
