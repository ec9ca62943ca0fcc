"""Training: accumulation, learning, resume, devices.

Run alone: python -m pytest tests/test_train_model.py
"""

from __future__ import annotations

import json
import math
import os
import random
import signal

import pytest
import torch

import train_model
from conftest import build_training, tiny_train_argv
from hyperparameters import ModelConfig
from support.checkpoint import load_checkpoint
from support.common import UserFacingError
from support.devices import resolve_device, sequences_per_pass, training_memory
from support.training_log import bits_per_char
from train_model import train_step


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_bits_per_char():
    assert bits_per_char(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_char(math.log(2), 0.25) == pytest.approx(0.25)  # 4 characters per token


@pytest.mark.parametrize(
    ("accumulation", "per_pass", "passes"),
    [(2, 4, [4, 4]), (1, 3, [3, 3, 2]), (2, 3, [3, 1, 3, 1])],
    ids=["accumulation", "passes", "both"],
)
def test_accumulation_and_passes_give_the_whole_batch_gradient(
    tmp_path, tiny_corpus, monkeypatch, accumulation, per_pass, passes
):
    big_x = torch.randint(0, 20, (8, 16))
    big_y = torch.randint(0, 20, (8, 16))

    def gradients_and_loss(batch_size, accumulation, sequences_per_pass):
        run, state, _ = build_training(
            tiny_train_argv(
                tmp_path / f"out{accumulation}-{sequences_per_pass}",
                tiny_corpus,
                batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                sequences_per_pass=sequences_per_pass,
                grad_clip=0,
            )
        )
        assert run.sequences_per_pass == sequences_per_pass
        chunks = iter(zip(big_x.split(batch_size), big_y.split(batch_size), strict=True))
        monkeypatch.setattr(train_model, "get_batch", lambda *args: next(chunks))
        seen = []
        real_forward = run.compiled.forward
        run.compiled.forward = lambda x, y: seen.append(len(x)) or real_forward(x, y)
        captured = {}
        run.optimizer.step = lambda: captured.update(
            {n: p.grad.clone() for n, p in run.model.named_parameters()}
        )
        loss, _ = train_step(run, state)
        return captured, loss, seen

    whole, whole_loss, whole_passes = gradients_and_loss(8, 1, 8)
    batch_size = 8 // accumulation
    split, split_loss, split_passes = gradients_and_loss(batch_size, accumulation, per_pass)
    assert whole_passes == [8]
    assert split_passes == passes
    torch.testing.assert_close(split_loss, whole_loss, atol=1e-6, rtol=1e-5)
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, atol=1e-6, rtol=1e-5)


def test_evaluation_in_passes_gives_the_whole_batch_loss(tmp_path, tiny_corpus):
    losses = {}
    for per_pass in (8, 3):
        run, _, _ = build_training(
            tiny_train_argv(
                tmp_path / f"out{per_pass}", tiny_corpus, batch_size=8, sequences_per_pass=per_pass
            )
        )
        losses[per_pass] = train_model.estimate_loss(run)
    for split in ("train", "val"):
        assert losses[3][split] == pytest.approx(losses[8][split], rel=1e-6)


def test_the_memory_check_counts_one_pass_of_activations_and_the_whole_batchs_ids():
    config = ModelConfig(vocab_size=65)
    in_passes = training_memory(config, batch_size=64, sequences_per_pass=8)
    assert training_memory(config, batch_size=64, sequences_per_pass=64) > 4 * in_passes
    more_sequences = training_memory(config, batch_size=128, sequences_per_pass=8)
    # The gathered windows, then inputs and targets, as int64.
    assert more_sequences - in_passes == 3 * 8 * 64 * (config.block_size + 1)


def test_a_cpu_takes_passes_of_at_most_2048_tokens_and_a_gpu_the_whole_batch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sequences_per_pass(0, 64, 256, cpu) == 8  # nanoGPT's Shakespeare shape
    assert sequences_per_pass(0, 12, 64, cpu) == 12  # 768 tokens: one pass
    assert sequences_per_pass(0, 12, 256, cpu) == 6  # two equal passes, not 8 + 4
    assert sequences_per_pass(0, 4, 4096, cpu) == 1  # a block longer than 2048: one sequence
    assert sequences_per_pass(0, 64, 256, cuda) == 64
    assert sequences_per_pass(5, 64, 256, cuda) == 5  # asked for: as asked
    assert sequences_per_pass(100, 64, 256, cpu) == 64  # never more than the micro-batch


def test_a_learnable_corpus_reaches_a_low_loss(tmp_path):
    # A fixed random string of period 23, repeated: the next character is fully determined by
    # the few before it, so a working model drives the loss close to zero.
    rng = random.Random(0)
    period = "".join(rng.choice("abcdefgh") for _ in range(23))
    corpus = tmp_path / "pattern.txt"
    corpus.write_text(period * 200)
    out_dir = tmp_path / "out"
    argv = tiny_train_argv(out_dir, corpus, max_iters=200, eval_interval=100, learning_rate=1e-2)
    assert train_model.main(argv) == 0
    final = read_metrics(out_dir)[-1]
    assert final["step"] == 200
    assert final["val_loss"] < 0.1
    assert read_metrics(out_dir)[0]["val_loss"] > 1.5


def test_training_writes_checkpoints_metrics_plot_and_config(tmp_path, tiny_corpus):
    out_dir = tmp_path / "out"
    assert train_model.main(tiny_train_argv(out_dir, tiny_corpus)) == 0
    assert [row["step"] for row in read_metrics(out_dir)] == [0, 10, 20]
    assert (out_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out_dir / "config.json").read_text())["model"]["n_layer"] == 2
    best = load_checkpoint(out_dir / "ckpt_best.pth")
    last = load_checkpoint(out_dir / "ckpt_last.pth")
    assert last["step"] == 20
    assert best["best_val_loss"] == min(row["val_loss"] for row in read_metrics(out_dir))


def stop_after(steps: int, monkeypatch) -> None:
    """Make training receive a real SIGINT right after the given number of steps."""
    real_step = train_model.train_step
    calls = {"n": 0}

    def counting_step(run, state):
        loss = real_step(run, state)
        calls["n"] += 1
        if calls["n"] == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(train_model, "train_step", counting_step)


@pytest.mark.parametrize(("optimizer", "average"), [("muon", 0.0), ("adamw", 0.0), ("muon", 0.9)])
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(
    tmp_path, tiny_corpus, monkeypatch, optimizer, average
):
    # dropout: the RNG state must resume too; the optimizer's state must come back whole, and
    # so must the weights' moving average when one is kept.
    options = {
        "dropout": 0.1,
        "eval_interval": 5,
        "optimizer": optimizer,
        "weight_average": average,
    }
    straight = tmp_path / "straight"
    assert train_model.main(tiny_train_argv(straight, tiny_corpus, **options)) == 0

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        stop_after(8, patch)
        assert train_model.main(tiny_train_argv(resumed, tiny_corpus, **options)) == 130
    assert load_checkpoint(resumed / "ckpt_last.pth")["step"] == 8
    # Nothing needs repeating: the checkpoint carries every setting.
    resume_argv = [f"--out_dir={resumed}", f"--data={tiny_corpus}", "--resume"]
    assert train_model.main(resume_argv) == 0

    def losses(out_dir):
        return [(r["step"], r["train_loss"], r["val_loss"]) for r in read_metrics(out_dir)]

    assert losses(resumed) == losses(straight)
    saved_a = load_checkpoint(straight / "ckpt_last.pth")
    saved_b = load_checkpoint(resumed / "ckpt_last.pth")
    for weights in ["model", "training_weights"] if average else ["model"]:
        for name, tensor in saved_a[weights].items():
            assert torch.equal(tensor, saved_b[weights][name]), (weights, name)


def test_a_run_resumed_without_its_average_goes_on_from_its_weights(
    tmp_path, tiny_corpus, monkeypatch
):
    plain = tmp_path / "plain"
    assert train_model.main(tiny_train_argv(plain, tiny_corpus)) == 0
    averaged = tmp_path / "averaged"
    with monkeypatch.context() as patch:
        stop_after(8, patch)
        argv = tiny_train_argv(averaged, tiny_corpus, weight_average=0.9)
        assert train_model.main(argv) == 130
    resume_argv = [f"--out_dir={averaged}", f"--data={tiny_corpus}", "--resume"]
    assert train_model.main([*resume_argv, "--weight_average=0"]) == 0
    # The average never changes training: the weights end where the plain run's end.
    expected = load_checkpoint(plain / "ckpt_last.pth")["model"]
    resumed = load_checkpoint(averaged / "ckpt_last.pth")
    assert "training_weights" not in resumed
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed["model"][name]), name


@pytest.mark.parametrize(
    ("name", "value"), [("n_layer", 3), ("position", "learned"), ("optimizer", "adamw")]
)
def test_resume_refuses_a_conflicting_model_or_optimizer(
    tmp_path, tiny_corpus, capsys, name, value
):
    out_dir = tmp_path / "out"
    assert train_model.main(tiny_train_argv(out_dir, tiny_corpus, max_iters=10)) == 0
    argv = tiny_train_argv(out_dir, tiny_corpus, max_iters=20, **{name: value})
    assert train_model.main([*argv, "--resume"]) == 2
    assert f"keeps the saved run's {name}" in capsys.readouterr().err


def test_resume_without_a_checkpoint_says_how_to_start(tmp_path, tiny_corpus, capsys):
    assert train_model.main([*tiny_train_argv(tmp_path / "empty", tiny_corpus), "--resume"]) == 2
    assert "python train_model.py" in capsys.readouterr().err


def test_compile_falls_back_to_eager_when_it_fails(tmp_path, tiny_corpus, monkeypatch, capsys):
    def broken_compile(model):
        def fail(*args, **kwargs):
            raise RuntimeError("no C compiler found")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    argv = tiny_train_argv(tmp_path / "out", tiny_corpus, max_iters=2, compile="true")
    assert train_model.main(argv) == 0
    assert "torch.compile failed (no C compiler found)" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_user_error():
    with pytest.raises(UserFacingError, match="not available"):
        resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "mps"}


def test_corpus_shorter_than_block_size_is_a_one_line_error(tmp_path, capsys):
    corpus = tmp_path / "short.txt"
    corpus.write_text("too short")
    assert train_model.main(tiny_train_argv(tmp_path / "out", corpus)) == 2
    err = capsys.readouterr().err
    assert "block_size" in err
    assert len(err.strip().splitlines()) == 1
