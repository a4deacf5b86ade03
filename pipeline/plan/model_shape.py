"""The shape of the run's Llama-style decoder and its parameter counts (LM, reward/value model, LoRA adapters),
read from the config or a checkpoint's config.json without loading weights; what the memory plan sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config.parsing import ConfigError
from pipeline.config.schema import PeftSection, PipelineConfig

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a Llama-style decoder."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False


def model_shape(config: PipelineConfig) -> ModelShape:
    """The shape of the run's model: the `model` section, or model.name_or_path's config.json (no weights read)."""
    model, tokenizer = config.model, config.tokenizer
    if model.name_or_path is None:
        vocab = tokenizer.vocab_size if tokenizer.name_or_path is None else tokenizer_length(tokenizer.name_or_path, config)
        return ModelShape(model.num_hidden_layers, model.hidden_size, model.intermediate_size, model.num_attention_heads,
                          model.num_attention_heads, model.hidden_size // model.num_attention_heads, vocab,
                          model.max_position_embeddings)
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.name_or_path: cannot read the config.json of {model.name_or_path} to plan memory "
                          f"({str(error).splitlines()[0]})") from None
    hf = getattr(hf, "text_config", None) or hf
    heads = hf.num_attention_heads
    attention_bias = bool(getattr(hf, "attention_bias", False))
    vocab = hf.vocab_size
    tokenizer_path = tokenizer.name_or_path or model.name_or_path
    if Path(tokenizer_path).is_dir():  # the pipeline grows the embeddings when the tokenizer gains a pad token
        vocab = max(vocab, tokenizer_length(tokenizer_path, config))
    return ModelShape(
        num_hidden_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_attention_heads=heads, num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads, vocab_size=vocab,
        max_position_embeddings=getattr(hf, "max_position_embeddings", None) or 2048,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=attention_bias or hf.model_type.startswith("qwen2"), o_bias=attention_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)))


def tokenizer_length(name_or_path: str, config: PipelineConfig) -> int:
    """The tokenizer's vocabulary with its added tokens: the rows the model's embeddings need."""
    from data.tokenizer import load_tokenizer

    try:
        return len(load_tokenizer(name_or_path, config.model.trust_remote_code))
    except (OSError, ValueError) as error:
        raise ConfigError(f"tokenizer.name_or_path: cannot load {name_or_path} ({str(error).splitlines()[0]})") from None


def projection_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one decoder layer."""
    h, q, kv, i = shape.hidden_size, shape.num_attention_heads * shape.head_dim, \
        shape.num_key_value_heads * shape.head_dim, shape.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def decoder_layer_parameters(shape: ModelShape) -> int:
    """Parameters of one decoder layer: the seven projections, their biases if any, two RMSNorm weights."""
    projections = projection_shapes(shape)
    weights = sum(n_in * n_out for n_in, n_out in projections.values())
    biases = (sum(projections[p][1] for p in ("q_proj", "k_proj", "v_proj")) if shape.qkv_bias else 0) \
        + (shape.hidden_size if shape.o_bias else 0) \
        + (2 * shape.intermediate_size + shape.hidden_size if shape.mlp_bias else 0)
    return weights + biases + 2 * shape.hidden_size


def backbone_parameters(shape: ModelShape) -> int:
    """Embeddings, every decoder layer and the final norm: what the LM and the reward model share."""
    return shape.vocab_size * shape.hidden_size + shape.num_hidden_layers * decoder_layer_parameters(shape) \
        + shape.hidden_size


def causal_lm_parameters(shape: ModelShape) -> int:
    """Parameters of the LM (the LM head counted once when tied to the embeddings)."""
    head = 0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size
    return backbone_parameters(shape) + head


def reward_model_parameters(shape: ModelShape) -> int:
    """Parameters of the sequence classifier used as reward and value model: the backbone and a 1-output head."""
    return backbone_parameters(shape) + shape.hidden_size


def lora_parameters(shape: ModelShape, peft: PeftSection | dict[str, Any]) -> int:
    """Parameters of LoRA adapters: r × (in + out) for each targeted projection of each layer."""
    peft = peft if isinstance(peft, PeftSection) else PeftSection(**peft)
    targets = LLAMA_PROJECTIONS if peft.target_modules in ("all-linear", ["all-linear"]) else peft.target_modules
    projections = projection_shapes(shape)
    unknown = [t for t in targets if t not in projections]
    if unknown:
        raise ConfigError(f"peft.target_modules: {unknown[0]!r} is not a projection of a Llama-style decoder layer "
                          f"({', '.join(LLAMA_PROJECTIONS)}); the memory plan cannot size it")
    return shape.num_hidden_layers * sum(peft.r * sum(projections[t]) for t in targets)
