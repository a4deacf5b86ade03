from data.builtin_task import is_held_out_prompt, prompt_family
from data.gold_judge import story_answer_correct
from data.tokenizer import train_bpe_tokenizer
from pipeline.config.schema import ModelSection
from pipeline.scaling.probe import ANSWER_CUE, probe_batches, reading_probe, story_questions
from pipeline.train.models import build_llama_from_config, save_hf_model


def test_story_questions_come_from_the_asked_part_with_right_answers():
    for held_out in (False, True):
        questions = story_questions(3, 20, held_out)
        assert len(questions) == 20
        for prompt, answer in questions:
            assert prompt_family(prompt) == "story_qa" and is_held_out_prompt(prompt) == held_out
            assert story_answer_correct(prompt, answer)


def tiny_tokenizer():
    prompts = [p + ANSWER_CUE + a for p, a in story_questions(0, 300, False)]
    return train_bpe_tokenizer(prompts, 400)


def test_probe_batches_put_the_loss_on_the_answer_and_its_eos_only():
    tokenizer = tiny_tokenizer()
    questions = story_questions(1, 8, False)
    ids, mask, labels = next(probe_batches(tokenizer, questions, 4, 1, 0, 256))
    for row in range(4):
        answer = labels[row][labels[row] != -100].tolist()
        assert answer[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(answer[:-1])
        assert any(text == a for _, a in questions)
        start = (labels[row] != -100).nonzero()[0].item()
        assert tokenizer.decode(ids[row, :start]).endswith(ANSWER_CUE)
        assert mask[row, : start + len(answer)].all()


def test_reading_probe_fine_tunes_a_copy_and_grades_held_out_answers(tmp_path):
    tokenizer = tiny_tokenizer()
    model = build_llama_from_config(ModelSection(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                 intermediate_size=64), tokenizer, 0)
    save_hf_model(model, tokenizer, tmp_path / "model")
    result = reading_probe(tmp_path / "model", tmp_path / "model", steps=3, questions=6, seed=0)
    assert result["questions"] == 6 and 0 <= result["accuracy"] <= 1 and result["steps"] == 3
    assert len(result["examples"]) == 3 and result["final_train_loss"] > 0
    # The model on disk is the pretrained one, untouched.
    reloaded = build_llama_from_config(ModelSection(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                    intermediate_size=64), tokenizer, 0)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all((saved[k] == v).all() for k, v in reloaded.state_dict().items() if k in saved)
