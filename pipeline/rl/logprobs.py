"""Log-probabilities of sampled tokens under a policy's logits, computed in row blocks so that no
[batch, length, vocab] float32 copy is ever held whole (the largest tensor of a PPO step)."""

from __future__ import annotations

import torch
from torch import Tensor

# On a CPU the vocabulary-wide work runs over blocks of rows of about this many bytes, which stay in the cache
# between the passes over them; one pass over all logits at once re-reads them from memory every time.
CPU_BLOCK_BYTES = 1 << 20


def row_blocks(rows: int, vocabulary: int, device: torch.device) -> list[slice]:
    """Slices of rows for vocabulary-wide work: cache-sized blocks on a CPU, all rows at once elsewhere (a GPU
    gains nothing from blocks and pays a kernel launch for each)."""
    size = rows if device.type != "cpu" else max(1, CPU_BLOCK_BYTES // (4 * vocabulary))
    return [slice(start, start + size) for start in range(0, rows, size)]


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits · inv_temperature)[token] with a backward of its own. Autograd's gather − logsumexp keeps
    several [batch, length, vocab] temporaries alive (the scaled copy, the logsumexp's shifted copy, the gather's
    zero-filled gradient, the logsumexp gradient's product); here the backward writes (onehot − softmax) · g into
    its one output, and on a CPU both passes run block by block in the cache (`row_blocks`). On a small model
    this vocabulary-wide elementwise work costs as much as the LM head's matmuls."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, inv_temperature: float) -> Tensor:
        flat, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        log_normaliser = torch.empty(flat.shape[0], 1, dtype=dtype, device=logits.device)
        picked = torch.empty_like(log_normaliser)
        for rows in row_blocks(flat.shape[0], flat.shape[1], logits.device):
            scaled = flat[rows].to(dtype) * inv_temperature
            torch.logsumexp(scaled, dim=-1, keepdim=True, out=log_normaliser[rows])
            torch.gather(scaled, -1, flat_tokens[rows], out=picked[rows])
        ctx.save_for_backward(logits, tokens, log_normaliser)
        ctx.inv_temperature = inv_temperature
        return (picked - log_normaliser).view(tokens.shape)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        logits, tokens, log_normaliser = ctx.saved_tensors
        flat, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        grad = grad_output.reshape(-1, 1).to(log_normaliser.dtype)
        grad_logits = torch.empty(flat.shape, dtype=log_normaliser.dtype, device=logits.device)
        for rows in row_blocks(flat.shape[0], flat.shape[1], logits.device):
            # d logprob / d scaled = onehot(token) − softmax(scaled); the scaling's chain rule multiplies by it.
            block = grad_logits[rows]
            block.copy_(flat[rows]).mul_(ctx.inv_temperature)  # in float32, as the forward scaled them
            block.sub_(log_normaliser[rows]).exp_().mul_(-grad[rows])
            block.scatter_add_(-1, flat_tokens[rows], grad[rows]).mul_(ctx.inv_temperature)
        return grad_logits.view(logits.shape).to(logits.dtype), None, None


def logprobs_of_tokens(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log π(token) at the sampling temperature, in float32 whatever the logits' dtype (bf16 log-softmax loses
    the small differences PPO's ratio is made of). TRL divides by temperature + 1e-7; so do we."""
    # Not trl.trainer.utils.selective_log_softmax (trl 1.16): for bf16 logits it takes the log-softmax in bf16.
    return _TokenLogprobs.apply(logits, tokens.long(), 1.0 / (temperature + 1e-7))


@torch.no_grad()
def logprobs_and_entropy(logits: Tensor, tokens: Tensor | None, temperature: float = 1.0
                         ) -> tuple[Tensor | None, Tensor]:
    """(log π(token), entropy) per position in one blockwise pass over the logits, for the no-gradient scoring
    forward: H = log Z − Σ p·x, so no log-softmax of the whole batch is ever materialised. The logprobs are the
    same numbers `logprobs_of_tokens` computes, so PPO's first ratio is exactly 1."""
    flat = logits.reshape(-1, logits.shape[-1])
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_normaliser = torch.empty(flat.shape[0], 1, dtype=dtype, device=logits.device)
    picked, expected_logit = torch.empty_like(log_normaliser), torch.empty(flat.shape[0], dtype=dtype,
                                                                          device=logits.device)
    inv_temperature = 1.0 / (temperature + 1e-7)
    for rows in row_blocks(flat.shape[0], flat.shape[1], logits.device):
        scaled = flat[rows].to(dtype) * inv_temperature
        torch.logsumexp(scaled, dim=-1, keepdim=True, out=log_normaliser[rows])
        if tokens is not None:
            torch.gather(scaled, -1, tokens.reshape(-1, 1)[rows].long(), out=picked[rows])
        # A token masked to −inf has p·x = 0·(−inf) = NaN; a finite floor makes its term 0 (its p is still 0).
        floored = scaled.clamp(min=torch.finfo(dtype).min)
        expected_logit[rows] = scaled.sub_(log_normaliser[rows]).exp_().mul_(floored).sum(-1)
    shape = logits.shape[:-1]
    logprobs = None if tokens is None else (picked - log_normaliser).view(shape)
    return logprobs, (log_normaliser.squeeze(-1) - expected_logit).view(shape)
