"""One way to sample from a policy and to read its log-likelihoods, used by PPO, reward normalisation, the
comparison report and `rlhf generate/chat`:

    left-pad prompts → generate with one explicit GenerationConfig → cut each response at its first EOS
    (the EOS kept, everything after it padding and masked) → token ids.

Why explicit: `generate` fills every setting it is not given from the checkpoint's generation_config.json, and
in transformers 5 an unset field is None, so a GenerationConfig of our own cannot even express "no
suppress_tokens" or "no min_p". A real chat model's file often sets repetition_penalty,
no_repeat_ngram_size or top_k; any of them makes the samples come from a distribution other than π, and PPO's
ratio and KL (which assume samples from π at the temperature) go wrong from the first step. So decoding runs
with the checkpoint's defaults replaced by a blank GenerationConfig, under a config built here from scratch.

A model whose pad token is its EOS works too: the cut is at the first EOS, and masks (never token values)
tell padding from the EOS that ends a response.

Sampling from π itself (PPO's rollouts, reward normalisation, the comparison) runs `decode_from_pi`, a decoding
loop of our own with no generation config at all: a KV cache written in place, one uniform per unfinished row
per token, and rows that have ended dropped from the batch. bench/rollout_throughput.py measures it against
`generate`. Greedy, top-k and top-p (the CLI) and models it cannot run (sliding-window attention, ...) use
`generate` under the explicit config.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicLayer

from pipeline.generation.padding import pad_sequences, position_ids_of
from pipeline.rl.masked import response_mask


def sampling_config(max_new_tokens: int, eos_token_id: int, pad_token_id: int, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> GenerationConfig:
    """The GenerationConfig every sampler uses. The defaults (no top-k, no top-p) sample from π itself at the
    temperature, as PPO's rollouts must; top-k / top-p / greedy are for the CLI's generate and chat only."""
    neutral = dict(
        max_new_tokens=max_new_tokens, min_length=0, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, bos_token_id=None, num_beams=1, num_return_sequences=1, use_cache=True,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, length_penalty=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        guidance_scale=1.0, renormalize_logits=False, remove_invalid_values=False, output_scores=False,
        output_logits=False, return_dict_in_generate=False)
    if greedy:
        return GenerationConfig(do_sample=False, **neutral)
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, **neutral)


@contextlib.contextmanager
def without_checkpoint_generation_defaults(model: torch.nn.Module) -> Iterator[None]:
    """Decode as if the checkpoint had no generation_config.json: `generate` fills unset fields from it
    (None cannot be set explicitly), so each wrapped model's (a LoRA wrapper's base too) is blank meanwhile."""
    # Only where the attribute really lives: a PEFT wrapper forwards attribute reads to the model it wraps.
    saved = [(module, vars(module)["generation_config"]) for module in model.modules()
             if isinstance(vars(module).get("generation_config"), GenerationConfig)]
    try:
        for module, _ in saved:
            module.generation_config = GenerationConfig()
        yield
    finally:
        for module, config in saved:
            module.generation_config = config


def generate_with_config(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig,
                         streamer=None) -> torch.Tensor:
    """`model.generate` under exactly `config` (the prompt columns included in the output)."""
    with without_checkpoint_generation_defaults(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                              streamer=streamer)


def cut_at_first_eos(generated: torch.Tensor, eos_token_id: int, pad_token_id: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(responses, mask): each row kept up to and including its first EOS, pad after it, and the columns that
    are padding in every row dropped. The mask, not the token values, says what is real: pad may equal EOS."""
    mask, _, _ = response_mask(generated, eos_token_id)
    responses = torch.where(mask, generated, torch.full_like(generated, pad_token_id))
    width = max(int(mask.sum(1).max()), 1) if len(generated) else 0
    return responses[:, :width], mask[:, :width]


class PreallocatedKVLayer(DynamicLayer):
    """One layer's KV cache in buffers allocated once for the whole rollout: each step writes its keys and values
    in place and attention reads the filled prefix as a view. DynamicCache copies the whole cache every step
    (torch.cat), StaticCache attends over its unfilled tail too."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads = key_states.shape[:2]
        self.key_buffer = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length: end] = key_states
        self.value_buffer[:, :, self.length: end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


def supports_lean_decoding(model) -> bool:
    """Whether `decode_from_pi` can run this model: a decoder whose every layer attends to the full context
    (sliding-window, chunked, shared-KV and linear-attention layers need transformers' own caches)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    text = config.get_text_config(decoder=True)
    if getattr(text, "kv_sharing_modes", None) is not None:
        return False
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(text, "sliding_window", None) is None and getattr(text, "attention_chunk_size", None) is None


def draw_from(probabilities: torch.Tensor) -> torch.Tensor:
    """One token per row, drawn exactly from each row's distribution by inverting its CDF with one uniform.
    torch.multinomial draws one exponential per vocabulary entry: a sixth of a small model's decoding time."""
    cumulative = probabilities.cumsum(-1)
    uniform = torch.rand(len(probabilities), 1, device=probabilities.device, dtype=cumulative.dtype)
    # right=True: a token of probability 0 (a flat stretch of the CDF) is never drawn, even for a uniform of 0.
    token = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    return token.squeeze(1).clamp(max=probabilities.shape[-1] - 1)


def _cache_argument(model) -> str:
    """transformers 5.24 renamed the forward's `past_key_values` to `cache`; earlier 5.x only know the former."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def decode_from_pi(model, queries: torch.Tensor, query_mask: torch.Tensor, temperature: float,
                   max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Sample [B, max_new_tokens] tokens from softmax(logits / T), pad after each row's EOS: `generate`'s sampling
    without its per-step machinery (logits processors, stopping criteria, mask and cache rebuilding), which
    costs a tiny model more than its forward. Positions are counted over real tokens, as in PPO's scoring.

    Rows that have ended stop costing compute: one uniform is drawn per unfinished row only, and once a quarter
    of the rows the model still runs have ended, they leave its batch (and the cache)."""
    batch, width = queries.shape
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = Cache(layers=[PreallocatedKVLayer(width + max_new_tokens) for _ in range(layers)])
    cache_argument = {_cache_argument(model): cache}
    attention_mask = torch.cat([query_mask, query_mask.new_ones(batch, max_new_tokens)], 1)
    positions = position_ids_of(query_mask)
    next_position = positions[:, -1:] + 1
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=queries.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=queries.device)
    running = torch.arange(batch, device=queries.device)  # the rows in the model's batch, in its order
    logits = model(input_ids=queries, attention_mask=query_mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **cache_argument).logits[:, -1]
    for step in range(max_new_tokens):
        unfinished = ~finished[running]
        rows = running[unfinished]
        drawn = draw_from(torch.softmax(logits[unfinished].float() / temperature, -1))
        tokens[rows, step] = drawn
        finished[rows] |= drawn == eos_token_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        still = ~finished[running]
        if 4 * int(still.sum()) <= 3 * len(running):
            keep = still.nonzero().squeeze(1)
            for layer in cache.layers:
                layer.batch_select_indices(keep)
            running = running[keep]
        logits = model(input_ids=tokens[running, step: step + 1],
                       attention_mask=attention_mask[running, : width + step + 1],
                       position_ids=next_position[running] + step, use_cache=True, **cache_argument).logits[:, -1]
    return tokens


def samples_from_pi_itself(config: GenerationConfig) -> bool:
    """Whether `config` asks for plain sampling at a temperature, which `decode_from_pi` does exactly."""
    return (config.do_sample and config.num_beams == 1 and config.top_k == 0 and config.top_p == 1.0
            and config.num_return_sequences == 1)


@torch.no_grad()
def sample_batch(model, queries: torch.Tensor, query_mask: torch.Tensor, config: GenerationConfig,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(responses, mask) for left-padded prompts, generated `batch_size` rows at a time and cut at the first EOS.
    Sampling from π itself runs `decode_from_pi`; anything else (greedy, top-k, top-p) `generate`."""
    lean = samples_from_pi_itself(config) and supports_lean_decoding(model)
    pieces = []
    for start in range(0, len(queries), batch_size):
        rows, row_mask = queries[start: start + batch_size], query_mask[start: start + batch_size]
        if lean:
            pieces.append(decode_from_pi(model, rows, row_mask, config.temperature, config.max_new_tokens,
                                         config.eos_token_id, config.pad_token_id))
            continue
        piece = generate_with_config(model, rows, row_mask, config)[:, queries.shape[1]:]
        # generate stops when every row of its batch has finished: batches end at different lengths
        pieces.append(torch.nn.functional.pad(piece, (0, config.max_new_tokens - piece.shape[1]),
                                              value=config.pad_token_id))
    return cut_at_first_eos(torch.cat(pieces), config.eos_token_id, config.pad_token_id)


@torch.no_grad()
def sample_token_ids(model, prompts: list[list[int]], config: GenerationConfig, batch_size: int = 64,
                     description: str | None = None) -> list[list[int]]:
    """Each prompt's response token ids as sampled, ending with EOS only if the policy produced one.
    `description` shows a progress bar over the batches."""
    device = next(model.parameters()).device
    responses = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=description, disable=description is None,
                      leave=False):
        queries, query_mask = pad_sequences(prompts[start: start + batch_size], config.pad_token_id, "left")
        ids, mask = sample_batch(model, queries.to(device), query_mask.to(device), config, batch_size)
        responses += [row[: int(valid.sum())].tolist() for row, valid in zip(ids.cpu(), mask.cpu())]
    return responses
