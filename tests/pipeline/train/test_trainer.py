"""pipeline/train/trainer.py: the key-figures progress bar of the Trainer stages (the stages' own tests run
TrainerStage end to end: tests/stages/test_sft.py, test_reward.py)."""

from types import SimpleNamespace

from pipeline.train.trainer import KeyFiguresBar, is_local_main_process


def test_the_bar_follows_the_steps_and_keeps_the_latest_key_figures(capsys):
    bar = KeyFiguresBar("sft")
    state = SimpleNamespace(is_local_process_zero=True, max_steps=10, global_step=2)
    bar.on_train_begin(None, state, None)
    assert bar.bar.n == 2 and bar.bar.total == 10  # a resumed run starts its bar where it resumes
    state.global_step = 5
    bar.on_step_end(None, state, None)
    bar.on_log(None, state, None, logs={"loss": 1.23456, "learning_rate": 0.0005, "epoch": 0.3, "num_tokens": 9.0})
    bar.on_log(None, state, None, logs={"eval_loss": 2.5, "eval_runtime": 0.1})
    assert bar.bar.n == 5
    assert bar.bar.postfix == "loss=1.23, lr=5.00e-04, eval_loss=2.5"  # the train figures stay beside the eval one
    bar.on_train_end(None, state, None)
    assert bar.bar is None and "sft: 100%" not in capsys.readouterr().err  # closed where it stood


def test_other_processes_draw_no_bar():
    bar = KeyFiguresBar("reward")
    state = SimpleNamespace(is_local_process_zero=False, max_steps=10, global_step=0)
    bar.on_train_begin(None, state, None)
    bar.on_log(None, state, None, logs={"loss": 1.0})
    bar.on_step_end(None, state, None)
    bar.on_train_end(None, state, None)
    assert bar.bar is None


def test_a_lone_process_is_its_machines_main_process():
    assert is_local_main_process() is True
