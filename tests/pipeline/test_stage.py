"""pipeline/stage.py: when bf16 autocast is on; what counts as a changed config."""

import warnings

import pytest

import pipeline.stage as stage


def test_bf16_follows_the_request_and_defaults_to_gpus_only(monkeypatch):
    monkeypatch.setattr(stage.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(stage, "cpu_has_bf16_matmuls", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stage.bf16_enabled(None) is False and stage.bf16_enabled(False) is False
        assert stage.bf16_enabled(True) is True


def test_bf16_on_a_cpu_without_bf16_matmuls_is_kept_but_warned_about(monkeypatch):
    monkeypatch.setattr(stage.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(stage, "cpu_has_bf16_matmuls", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 matrix instructions"):
        assert stage.bf16_enabled(True) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stage.bf16_enabled(None) is False  # nobody asked: nothing to warn about


def test_cpu_bf16_support_is_a_plain_answer():
    assert stage.cpu_has_bf16_matmuls() in (True, False)


def test_leaving_the_process_group_is_a_no_op_in_a_lone_process():
    import torch.distributed as dist

    from pipeline.stage import leave_process_group

    leave_process_group()
    assert not dist.is_initialized()
