"""pipeline/train/precision.py: when bf16 autocast is on."""

import warnings

import pipeline.train.precision as precision
import pytest


def test_bf16_follows_the_request_and_defaults_to_gpus_only(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_bf16_matmuls", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.bf16_enabled(None) is False and precision.bf16_enabled(False) is False
        assert precision.bf16_enabled(True) is True


def test_bf16_on_a_cpu_without_bf16_matmuls_is_kept_but_warned_about(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_bf16_matmuls", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 matrix instructions"):
        assert precision.bf16_enabled(True) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.bf16_enabled(None) is False  # nobody asked: nothing to warn about


def test_cpu_bf16_support_is_a_plain_answer():
    assert precision.cpu_has_bf16_matmuls() in (True, False)
