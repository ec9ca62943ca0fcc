"""Faults injected into real training runs: kills, Ctrl-C, divergence, a failing disk.

The kill and Ctrl-C tests run train_model.py as a subprocess and send it real signals.
Run alone: python -m pytest tests/test_reliability.py
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_model
from conftest import PROJECT_ROOT, SMALL_TEXT, tiny_train_argv
from support import common
from support.checkpoint import load_checkpoint

TRAIN = str(PROJECT_ROOT / "train_model.py")


def big_run_argv(workdir: Path, **overrides: object) -> list[str]:
    # A model with about 10 MB of checkpoint (weights + AdamW state) that evaluates and saves
    # every other step, so a good share of its time is spent inside a save.
    options: dict[str, object] = {
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "block_size": 32,
        "batch_size": 4,
        "eval_interval": 2,
        "eval_iters": 1,
        "max_iters": 100_000,
    }
    options.update(overrides)
    return tiny_train_argv(workdir / "out", workdir / "corpus.txt", **options)


def start_training(workdir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, TRAIN, *big_run_argv(workdir), *extra],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, timeout: float = 60.0, interval: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


@pytest.fixture
def workdir(tmp_path) -> Path:
    (tmp_path / "corpus.txt").write_text(SMALL_TEXT * 3, encoding="utf-8")
    return tmp_path


def temporary_checkpoints(out_dir: Path) -> set[Path]:
    return set(out_dir.glob(".ckpt_last.pth.*.tmp"))


@pytest.mark.slow
def test_sigkill_at_twenty_moments_never_breaks_the_latest_checkpoint(workdir):
    out_dir = workdir / "out"
    latest = out_dir / "ckpt_last.pth"
    steps = []
    during_save = 0
    for kill in range(20):
        left_before = temporary_checkpoints(out_dir)  # by earlier kills; cleared at start
        process = start_training(workdir, *(["--resume"] if latest.exists() else []))
        if kill == 0:
            # The first kill lands right after the first checkpoint is complete.
            wait_for(lambda p=process: latest.exists() or p.poll() is not None)
        elif kill % 2 == 0:
            # Even kills aim inside a save: right after a new temporary file appears.
            wait_for(
                lambda p=process, old=left_before: (
                    bool(temporary_checkpoints(out_dir) - old) or p.poll() is not None
                )
            )
        elif kill in (1, 3):
            # Two kills land during start-up: importing, loading the checkpoint.
            time.sleep(0.3 * kill)
        else:
            # The other odd kills land after the run has saved once more, 0.1 to 0.38 s later:
            # training steps, an evaluation. Waiting for that save, rather than a fixed time,
            # makes sure the runs get somewhere however slow the machine is.
            saved = latest.stat().st_mtime_ns
            wait_for(
                lambda p=process, old=saved: (
                    latest.stat().st_mtime_ns != old or p.poll() is not None
                )
            )
            time.sleep(0.02 * kill)
        process.kill()  # SIGKILL: no handler runs, nothing is cleaned up
        process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read()
        # A temporary file that outlived the process proves the kill cut a save short.
        during_save += bool(temporary_checkpoints(out_dir) - left_before)
        steps.append(load_checkpoint(latest)["step"])  # loads: never a partial file
    print(f"checkpoint step after each kill: {steps}; kills inside a save: {during_save}")
    assert during_save >= 5
    assert steps == sorted(steps)  # each resumed run carried on from the last one
    assert steps[-1] > steps[0]
    finish = subprocess.run(
        [sys.executable, TRAIN, *big_run_argv(workdir, max_iters=steps[-1] + 4), "--resume"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finish.returncode == 0, finish.stderr
    assert load_checkpoint(latest)["step"] == steps[-1] + 4
    assert not list(out_dir.glob(".*.tmp"))  # the leftovers of killed saves were cleared


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_and_says_how_to_resume(workdir, sig):
    out_dir = workdir / "out"
    process = start_training(workdir)
    wait_for(lambda: (out_dir / "ckpt_last.pth").exists(), interval=0.05)
    time.sleep(0.5)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert "--resume" in stderr
    step = load_checkpoint(out_dir / "ckpt_last.pth")["step"]
    assert f"stopped at step {step}" in stderr


def test_second_ctrl_c_quits_at_once(workdir):
    out_dir = workdir / "out"
    process = start_training(workdir)
    wait_for(lambda: (out_dir / "ckpt_last.pth").exists(), interval=0.05)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    load_checkpoint(out_dir / "ckpt_last.pth")


def test_divergence_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_corpus, monkeypatch, capsys
):
    real_step = train_model.train_step

    def step_that_blows_up(run, state):
        loss = real_step(run, state)
        if state.step == 12:  # what a too-high learning rate does, in one step
            with torch.no_grad():
                run.model.blocks[0].mlp.fc_in.weight.fill_(float("nan"))
        return loss

    monkeypatch.setattr(train_model, "train_step", step_that_blows_up)
    out_dir = tmp_path / "out"
    argv = tiny_train_argv(out_dir, tiny_corpus, eval_interval=5, log_interval=10)
    assert train_model.main(argv) == 1
    err = capsys.readouterr().err
    assert "by step 15" in err
    assert len(err.strip().splitlines()) == 1
    checkpoint = load_checkpoint(out_dir / "ckpt_last.pth")
    assert checkpoint["step"] == 10
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_full_disk_while_saving_is_reported_and_keeps_the_previous_checkpoint(
    tmp_path, tiny_corpus, monkeypatch, capsys
):
    out_dir = tmp_path / "out"
    assert train_model.main(tiny_train_argv(out_dir, tiny_corpus, max_iters=10)) == 0
    before = (out_dir / "ckpt_last.pth").read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.os, "fsync", disk_full)
    argv = tiny_train_argv(out_dir, tiny_corpus, max_iters=20)
    assert train_model.main([*argv, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err
    assert len(err.strip().splitlines()) == 1
    assert (out_dir / "ckpt_last.pth").read_bytes() == before
    assert not list(out_dir.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"abc\x00def" * 100, "NUL bytes"), (b"a" * 1000, "single character")],
)
def test_degenerate_corpora_are_refused(tmp_path, content, message, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    assert train_model.main(tiny_train_argv(tmp_path / "out", corpus)) == 2
    assert message in capsys.readouterr().err


def test_resume_with_another_tokenizer_is_refused(tmp_path, tiny_corpus, capsys):
    out_dir = tmp_path / "out"
    assert train_model.main(tiny_train_argv(out_dir, tiny_corpus, max_iters=5)) == 0
    argv = tiny_train_argv(out_dir, tiny_corpus, max_iters=10, tokenizer="bpe")
    assert train_model.main([*argv, "--resume"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def giant_batch_argv(workdir: Path, **overrides: object) -> list[str]:
    """A tiny model whose steps are 2,000 passes of 8 sequences (seconds each)."""
    options = {"batch_size": 16_000, "sequences_per_pass": 8, "eval_iters": 1, "max_iters": 2}
    options.update(overrides)
    return tiny_train_argv(workdir / "out", workdir / "corpus.txt", **options)


@pytest.mark.slow
def test_a_long_step_stops_within_seconds(workdir):
    out_dir = workdir / "out"
    process = subprocess.Popen(
        [sys.executable, TRAIN, *giant_batch_argv(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: (out_dir / "config.json").exists(), timeout=300, interval=0.05)
    time.sleep(1.0)  # inside step 0's evaluation or the step itself: thousands of passes
    process.send_signal(signal.SIGTERM)
    asked = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - asked < 15, "the stop request waited for the step's end"
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert load_checkpoint(out_dir / "ckpt_last.pth")["step"] == 0
    assert "stopped at step 0" in stderr


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_a_step_dropped_midway_resumes_exactly(tmp_path, tiny_corpus, monkeypatch):
    from support.training_session import TrainingSession

    options = {"batch_size": 64, "sequences_per_pass": 4, "eval_interval": 3, "eval_iters": 1}
    reference = tiny_train_argv(tmp_path / "reference", tiny_corpus, max_iters=3, **options)
    assert train_model.main(reference) == 0
    # Passes are asked about in order: step 0's evaluation (16 passes a split), then step 0's
    # own 16 passes (calls 32 to 47): the stop comes in the middle of step 0.
    calls = iter(range(1000))
    monkeypatch.setattr(TrainingSession, "stop_asked_between_passes", lambda _: next(calls) == 40)
    argv = tiny_train_argv(tmp_path / "stopped", tiny_corpus, max_iters=3, **options)
    assert train_model.main(argv) == 130
    assert load_checkpoint(tmp_path / "stopped" / "ckpt_last.pth")["step"] == 0
    monkeypatch.undo()
    assert train_model.main([*argv, "--resume"]) == 0
    ours = final_weights(tmp_path / "stopped" / "ckpt_last.pth")
    theirs = final_weights(tmp_path / "reference" / "ckpt_last.pth")
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=1e-6), name


def test_a_stop_during_the_final_evaluation_is_resumed_into_it(tmp_path, tiny_corpus, monkeypatch):
    from support.training_session import TrainingSession

    argv = tiny_train_argv(tmp_path / "out", tiny_corpus, max_iters=4, eval_interval=2)
    final = lambda session: session._evaluating and session.state.step == 4  # noqa: E731
    monkeypatch.setattr(TrainingSession, "stop_asked_between_passes", final)
    assert train_model.main(argv) == 130
    assert load_checkpoint(tmp_path / "out" / "ckpt_last.pth")["step"] == 4
    monkeypatch.undo()
    assert train_model.main([*argv, "--resume"]) == 0  # not "already did 4 steps"
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert steps == [0, 2, 4]


def test_a_long_step_is_announced_at_start(tmp_path, tiny_corpus, capsys, monkeypatch):
    from support import training_session

    monkeypatch.setattr(training_session, "LONG_STEP_S", 0.0)  # every step counts as long
    argv = tiny_train_argv(tmp_path / "out", tiny_corpus, batch_size=64, sequences_per_pass=8)
    assert train_model.main([*argv, "--max_iters=2"]) == 0
    warning = capsys.readouterr().err
    assert "warning: a step is 8 passes of 8 sequences, about" in warning
    assert "Lower --batch_size" in warning


def test_a_step_stopped_midway_changes_no_weight(tmp_path, tiny_corpus):
    from conftest import build_training

    argv = tiny_train_argv(tmp_path / "out", tiny_corpus, batch_size=32, sequences_per_pass=4)
    run, state, _ = build_training(argv)
    before = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    asked = iter([False, False, False, True])  # the stop comes before the step's fourth pass
    run.stop_asked = lambda: next(asked)
    with pytest.raises(train_model.StoppedMidway):
        train_model.train_step(run, state)
    for name, p in run.model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None, name


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_compiling_ends_in_one_line_and_leaves_no_folder(workdir, sig):
    out_dir = workdir / "out"
    process = subprocess.Popen(
        [sys.executable, TRAIN, *big_run_argv(workdir, compile="true")],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:  # the model is built: torch.compile comes next
        if line.startswith("global batch"):
            break
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("train_model.py: interrupted"), stderr
    assert "Traceback" not in stderr
    assert not out_dir.exists()


def test_a_run_folder_deleted_during_training_is_written_again(workdir):
    out_dir = workdir / "out"
    process = start_training(workdir)
    wait_for(lambda: (out_dir / "ckpt_last.pth").exists(), interval=0.05)
    shutil.rmtree(out_dir)
    wait_for(lambda: (out_dir / "ckpt_last.pth").exists(), interval=0.05)  # the next save
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "Exception in thread" not in stderr  # TensorBoard's writer thread
    assert "warning: TensorBoard's log stopped" in stderr
    step = load_checkpoint(out_dir / "ckpt_last.pth")["step"]
    assert f"stopped at step {step}" in stderr
