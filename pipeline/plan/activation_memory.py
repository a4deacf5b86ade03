"""Bytes of what a forward pass holds besides the weights: activations saved for backward by a Llama-style decoder,
the vocabulary logits and their fp32 copies, the hidden states of a forward without gradients, and generation's
KV cache. All of it for a given number of sequences at a given length (the plan passes upper bounds)."""

from __future__ import annotations

from pipeline.plan.model_shape import ModelShape


def layer_activation_bytes_per_token(shape: ModelShape, seq_length: int, bf16: bool, eager_attention: bool,
                                     residual_bytes: int = 4) -> int:
    """Bytes one decoder layer saves for backward, per token.

    RMSNorm saves its input and normalised output in fp32 (HF upcasts), and autocast a bf16 copy for the next
    linear; then q, k, v; RoPE's rotated q, k; attention output and its reshaped copy; SwiGLU's gate, silu(gate),
    up and their product. Eager attention (bf16 on CPU) also saves the heads × length probabilities, fp32 from
    the softmax plus a cast; SDPA's fused kernels keep only a log-sum-exp."""
    h, q = shape.hidden_size, shape.num_attention_heads * shape.head_dim
    kv, i = shape.num_key_value_heads * shape.head_dim, shape.intermediate_size
    act = 2 if bf16 else 4
    norm_fp32 = 4 if residual_bytes == 4 else 2
    norms = 2 * (2 * h * norm_fp32 + (h * act if act != norm_fp32 else 0))
    attention = (q + 2 * kv) * act + (q + kv) * act + 2 * q * act
    if eager_attention:
        attention += shape.num_attention_heads * seq_length * (4 + (act if act != 4 else 0))
    mlp = 4 * i * act
    return norms + attention + mlp


def training_activation_bytes(shape: ModelShape, sequences: int, seq_length: int, bf16: bool, eager_attention: bool,
                              gradient_checkpointing: bool = False, logit_tokens: int | None = None,
                              logit_copies: int = 3, residual_bytes: int = 4) -> int:
    """Activations of one forward/backward of `sequences` × `seq_length` tokens through the decoder, plus the
    logits of `logit_tokens` tokens (all of them when None; 0 for a scalar head): the loss keeps `logit_copies`
    fp32 tensors of batch × vocab at the backward's peak (log-softmax, its gradient, the logits' gradient)."""
    tokens = sequences * seq_length
    per_layer = layer_activation_bytes_per_token(shape, seq_length, bf16, eager_attention, residual_bytes) * tokens
    if gradient_checkpointing:  # each layer keeps only its input; one layer's activations are rebuilt at a time
        layers = shape.num_hidden_layers * tokens * shape.hidden_size * residual_bytes + per_layer
    else:
        layers = shape.num_hidden_layers * per_layer
    final_norm = 2 * tokens * shape.hidden_size * residual_bytes
    logit_tokens = tokens if logit_tokens is None else logit_tokens
    logits = logit_tokens * shape.vocab_size * (4 * logit_copies + (2 if bf16 else 0))
    return layers + final_norm + logits


def layer_forward_bytes(shape: ModelShape, tokens: int, bf16: bool) -> int:
    """The hidden states of one decoder layer in a forward without gradients, which frees each layer's before the
    next: 4 of the hidden size and 3 of the intermediate size per token."""
    return tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size) * (2 if bf16 else 4)


def no_grad_forward_bytes(shape: ModelShape, sequences: int, seq_length: int, bf16: bool, logit_copies: int,
                          logit_tokens: int | None = None) -> int:
    """A forward without gradients: one layer's hidden states at a time, then the logits and their copies."""
    tokens = sequences * seq_length
    logit_tokens = tokens if logit_tokens is None else logit_tokens
    return layer_forward_bytes(shape, tokens, bf16) + logit_tokens * shape.vocab_size * 4 * logit_copies


def kv_cache_bytes(shape: ModelShape, sequences: int, seq_length: int, bf16: bool) -> int:
    """The generation KV cache: sequences × length × layers × 2 (K and V) × kv_heads × head_dim × bytes."""
    return sequences * seq_length * shape.num_hidden_layers * 2 * shape.num_key_value_heads * shape.head_dim \
        * (2 if bf16 else 4)


def generation_transient_bytes(shape: ModelShape, sequences: int, seq_length: int, bf16: bool,
                               eager_attention: bool) -> int:
    """Besides the cache, the prefill of one layer at a time (and its attention matrix when eager)."""
    scores = sequences * shape.num_attention_heads * seq_length * seq_length * 4 if eager_attention else 0
    return layer_forward_bytes(shape, sequences * seq_length, bf16) + scores + sequences * shape.vocab_size * 4 * 3
