"""The one sampler: explicit GenerationConfig (nothing inherited from the checkpoint), cut at the first EOS
(pad == EOS included), and the one way to score token ids and their log-likelihoods."""

import pipeline.generation.sampling as rollout
import pytest
import torch
from transformers import GenerationConfig, TemperatureLogitsWarper, TopKLogitsWarper
from transformers.generation.utils import GenerationMixin

from pipeline.generation.padding import pad_sequences, prompt_response_batch
from pipeline.generation.sampling import (
    cut_at_first_eos, generate_with_config, sample_batch, sample_token_ids, sampling_config,
    without_checkpoint_generation_defaults)
from pipeline.generation.scoring import sequence_logprobs
from reward_model.model import reward_scores
from tests.helpers import sample_from_pi_by_hand

MESSAGES = ("Hi", "Tell me about Mia and her red kite.", "Tom went to the park.", "Sure!")


@pytest.fixture
def tiny(tiny_causal_lm):
    from data.tokenizer import load_tokenizer
    from pipeline.train.models import load_causal_lm

    tokenizer = load_tokenizer(tiny_causal_lm)
    model = load_causal_lm(tiny_causal_lm, tokenizer).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for m in MESSAGES]
    return model, tokenizer, prompts


def hostile_generation_config(model, token: int) -> None:
    """What a real chat checkpoint's generation_config.json may hold: each setting changes the distribution."""
    model.generation_config.update(repetition_penalty=1.3, no_repeat_ngram_size=2, top_k=5, min_p=0.2, typical_p=0.5,
                                   suppress_tokens=[token], bad_words_ids=[[token + 1]], min_new_tokens=6,
                                   temperature=0.3, do_sample=False)


@pytest.fixture
def processors_used(monkeypatch):
    """The logits processors `generate` builds, call by call."""
    seen = []
    original = GenerationMixin._get_logits_processor

    def recording(self, *args, **kwargs):
        processors = original(self, *args, **kwargs)
        seen.append([type(p) for p in processors])
        return processors

    monkeypatch.setattr(GenerationMixin, "_get_logits_processor", recording)
    return seen


def test_cut_keeps_the_first_eos_and_masks_everything_after_it():
    generated = torch.tensor([[5, 2, 7, 2, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    responses, mask = cut_at_first_eos(generated, eos_token_id=2, pad_token_id=0)
    assert responses.tolist() == [[5, 2, 0, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]]
    assert mask.sum(1).tolist() == [2, 5, 1]
    short, short_mask = cut_at_first_eos(generated[[0, 2]], eos_token_id=2, pad_token_id=0)
    assert short.tolist() == [[5, 2], [2, 0]] and short_mask.tolist() == [[True, True], [True, False]]


def test_cut_with_pad_equal_to_eos_is_told_apart_by_the_mask():
    generated = torch.tensor([[5, 2, 2, 2], [2, 2, 2, 2], [5, 6, 7, 2]])
    responses, mask = cut_at_first_eos(generated, eos_token_id=2, pad_token_id=2)
    assert responses.tolist() == generated.tolist()
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False], [True, True, True, True]]


@pytest.fixture(params=["lean", "generate"])
def sampler_path(request, monkeypatch):
    """Run a test through both samplers: the lean decoding loop and `generate` (models the loop cannot run)."""
    if request.param == "generate":
        monkeypatch.setattr(rollout, "supports_lean_decoding", lambda model: False)
    return request.param


def oracle_draws(path: str) -> dict:
    """How the hand-written sampler must draw to use the random numbers as the sampler on `path` does."""
    if path == "lean":
        return {"draw": rollout.draw_from, "only_unfinished": True}
    return {}  # torch.multinomial over the whole batch, as generate draws


def test_sampling_ignores_a_checkpoint_generation_config_and_draws_from_pi(tiny, processors_used, sampler_path):
    model, tokenizer, prompts = tiny
    hostile_generation_config(model, token=40)
    queries, query_mask = pad_sequences(prompts, tokenizer.pad_token_id, "left")
    config = sampling_config(16, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=0.7)
    torch.manual_seed(3)
    responses, mask = sample_batch(model, queries, query_mask, config, batch_size=4)
    torch.manual_seed(3)
    expected, expected_mask = cut_at_first_eos(sample_from_pi_by_hand(
        model, queries, query_mask, 0.7, 16, tokenizer.eos_token_id, tokenizer.pad_token_id, 4,
        **oracle_draws(sampler_path)), tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert torch.equal(responses, expected) and torch.equal(mask, expected_mask)
    assert processors_used == ([] if sampler_path == "lean" else [[TemperatureLogitsWarper]])
    assert model.generation_config.repetition_penalty == 1.3  # the checkpoint's own config is left as it was


@pytest.mark.filterwarnings("ignore:Unfeasible length constraints")  # the checkpoint's min_new_tokens, shown leaking
def test_generate_fills_unset_fields_from_the_checkpoint_unless_its_defaults_are_set_aside(tiny, processors_used):
    # "No min_p" or "no suppress_tokens" can only be said as None, which generate fills from the checkpoint.
    model, tokenizer, prompts = tiny
    hostile_generation_config(model, token=40)
    queries, query_mask = pad_sequences(prompts, tokenizer.pad_token_id, "left")
    config = sampling_config(4, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=0.7)
    model.generate(input_ids=queries, attention_mask=query_mask, generation_config=config)
    generate_with_config(model, queries, query_mask, config)
    assert {"MinPLogitsWarper", "SuppressTokensLogitsProcessor"} <= {p.__name__ for p in processors_used[0]}
    assert processors_used[1] == [TemperatureLogitsWarper]


def test_draw_from_follows_the_distribution_and_never_draws_an_impossible_token(monkeypatch):
    probabilities = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    torch.manual_seed(0)
    drawn = rollout.draw_from(probabilities)
    frequencies = torch.bincount(drawn[0::2], minlength=5).float() / 20000
    assert frequencies.tolist() == pytest.approx([0.0, 0.5, 0.0, 0.3, 0.2], abs=0.015)
    assert (drawn[1::2] == 4).all()
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.zeros(*shape, dtype=kwargs.get("dtype")))
    assert rollout.draw_from(probabilities[:2]).tolist() == [1, 4]  # a uniform of exactly 0 skips p = 0


def test_lean_decoding_runs_a_lora_policy(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer, prompts = tiny
    policy = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                              task_type="CAUSAL_LM")).eval()
    assert rollout.supports_lean_decoding(policy)
    queries, query_mask = pad_sequences(prompts, tokenizer.pad_token_id, "left")
    config = sampling_config(8, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=1.0)
    torch.manual_seed(2)
    responses, _ = sample_batch(policy, queries, query_mask, config, batch_size=3)
    torch.manual_seed(2)
    expected = sample_from_pi_by_hand(policy, queries, query_mask, 1.0, 8, tokenizer.eos_token_id,
                                      tokenizer.pad_token_id, 3, **oracle_draws("lean"))
    assert torch.equal(responses, cut_at_first_eos(expected, tokenizer.eos_token_id, tokenizer.pad_token_id)[0])


def test_a_sliding_window_model_is_sampled_by_generate(processors_used):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    shape = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    assert rollout.supports_lean_decoding(LlamaForCausalLM(LlamaConfig(**shape)))
    model = MistralForCausalLM(MistralConfig(sliding_window=4, **shape)).eval()
    assert not rollout.supports_lean_decoding(model)
    queries, query_mask = pad_sequences([[5, 6, 7, 8, 9, 10], [11, 12]], 0, "left")
    responses, mask = sample_batch(model, queries, query_mask, sampling_config(6, 1, 0), batch_size=2)
    assert processors_used == [[]] and responses.shape[0] == 2 and mask[:, 0].all()


def test_pad_equal_to_eos_cuts_at_the_first_eos(tiny, sampler_path):
    model, tokenizer, prompts = tiny
    draws = oracle_draws(sampler_path)
    queries, query_mask = pad_sequences(prompts, tokenizer.pad_token_id, "left")
    torch.manual_seed(5)
    free = sample_from_pi_by_hand(model, queries, query_mask, 1.0, 12, -1, 0, 4, **draws)
    # Make a token the policy drew in the middle of row 0 its EOS and its pad: a pad == EOS tokenizer.
    stop_at = next(i for i in range(2, 12) if free[0, i] not in free[0, :i])
    eos = int(free[0, stop_at])
    queries, query_mask = pad_sequences(prompts, eos, "left")
    config = sampling_config(12, eos, eos, temperature=1.0)
    torch.manual_seed(5)
    responses, mask = sample_batch(model, queries, query_mask, config, batch_size=4)
    torch.manual_seed(5)
    expected = sample_from_pi_by_hand(model, queries, query_mask, 1.0, 12, eos, eos, 4, **draws)
    assert int(mask[0].sum()) == stop_at + 1 and responses[0, stop_at] == eos
    for row in range(len(prompts)):
        length = int(mask[row].sum())
        assert responses[row, :length].tolist() == expected[row, :length].tolist()
        ended = (expected[row] == eos).any()
        assert length == (int((expected[row] == eos).int().argmax()) + 1 if ended else 12)
        assert (responses[row, :length - 1] != eos).all()  # nothing before the cut is an EOS
    torch.manual_seed(5)
    lists = sample_token_ids(model, prompts, config, batch_size=4)
    assert lists == [responses[row, : int(mask[row].sum())].tolist() for row in range(len(prompts))]
    assert lists[0][-1] == eos and eos not in lists[0][:-1]


def test_cli_settings_give_greedy_or_truncated_sampling_and_nothing_else(tiny, processors_used):
    from pipeline.cli.generate import SamplingSettings

    model, tokenizer, prompts = tiny
    hostile_generation_config(model, token=40)
    ids, mask = torch.tensor([prompts[1]]), torch.ones(1, len(prompts[1]), dtype=torch.long)
    greedy_config = SamplingSettings(greedy=True, max_new_tokens=6).generation_config(tokenizer)
    greedy = generate_with_config(model, ids, mask, greedy_config)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    assert greedy[0, ids.shape[1]] == logits.argmax()  # no suppressed or penalised token in the way
    generate_with_config(model, ids, mask, SamplingSettings(top_k=5, temperature=0.5).generation_config(tokenizer))
    assert processors_used == [[], [TemperatureLogitsWarper, TopKLogitsWarper]]


def test_checkpoint_defaults_are_restored_even_when_generation_fails(tiny):
    model, _, _ = tiny
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(RuntimeError), without_checkpoint_generation_defaults(model):
        assert model.generation_config.repetition_penalty is None
        raise RuntimeError("probabilities became nan")
    assert model.generation_config.repetition_penalty == 1.3
    assert isinstance(model.generation_config, GenerationConfig)


def test_sequence_logprobs_are_the_tempered_log_likelihoods_whatever_the_batch(tiny):
    model, tokenizer, prompts = tiny
    responses = [[7, 12, tokenizer.eos_token_id], [9], [30, 31, 32, 33, 34], [tokenizer.eos_token_id]]
    expected = []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double() / 0.7
            logprobs = torch.log_softmax(logits[len(prompt) - 1:], -1)
            expected.append(sum(logprobs[i, t] for i, t in enumerate(response)).item())
    batched = sequence_logprobs(model, prompts, responses, 0.7, tokenizer.pad_token_id, batch_size=3)
    assert batched == pytest.approx(expected, abs=1e-4)


def test_reward_scores_read_the_sampled_ids_as_they_are(tiny_causal_lm, tiny):
    from reward_model.model import load_reward_model, score_token_ids

    _, tokenizer, prompts = tiny
    torch.manual_seed(0)
    reward_model, _ = load_reward_model(tiny_causal_lm)
    reward_model.eval()
    responses = [[7, 12, 13], [9, tokenizer.eos_token_id], [30, 31], [tokenizer.eos_token_id]]
    scores = reward_scores(reward_model, prompts, responses, tokenizer.pad_token_id, batch_size=3)
    with torch.no_grad():
        def alone(ids):
            return score_token_ids(reward_model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()

        unpadded = [alone(p + r) for p, r in zip(prompts, responses)]
        with_eos_added = alone(prompts[0] + responses[0] + [tokenizer.eos_token_id])
    assert scores.tolist() == pytest.approx(unpadded, abs=1e-5)
    assert abs(scores[0].item() - with_eos_added) > 1e-4  # a truncated response is scored as truncated


def test_prompt_response_batch_lays_out_a_rollout():
    sequences, attention_mask, mask = prompt_response_batch([[5, 6, 7], [8]], [[1], [2, 3, 4]], pad_token_id=0)
    assert sequences.tolist() == [[5, 6, 7, 1, 0, 0], [0, 0, 8, 2, 3, 4]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert mask.tolist() == [[True, False, False], [True, True, True]]
