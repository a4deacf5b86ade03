"""Whether a stage trains under bf16 autocast, by device."""

from __future__ import annotations

import warnings

import torch


def bf16_enabled(requested: bool | None) -> bool:
    """bf16 autocast by default on GPUs that support it (Ampere on). Not on CPU: for 128-wide models it pays in
    pretraining (bench/pretrain_throughput.py on 2 AMX cores: 27k tokens/s vs 23k fp32) but not in PPO, whose
    generation and scoring are dominated by small ops that autocast only makes dearer (bench/ppo_step.py:
    2.7 s/step vs 2.6 fp32); ask for it with `bf16: true` where it pays, e.g. wider models on CPUs with AMX."""
    if requested and not torch.cuda.is_available() and not cpu_has_bf16_matmuls():
        warnings.warn("bf16 was asked for, but this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX): its bf16 "
                      "matmuls run some 50x slower than fp32 (2.8 vs 156 GFLOP/s on a 2-core AVX2 EPYC); set bf16: false")
    if requested is not None:
        return requested
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def cpu_has_bf16_matmuls() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 or AMX), not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
