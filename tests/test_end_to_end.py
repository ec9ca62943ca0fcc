"""The real scripts, run as a user would: train, resume, generate, and the error paths.

Each script runs as a subprocess in a temporary folder with a small corpus and a tiny model.
Run alone: python -m pytest tests/test_end_to_end.py
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PROJECT_ROOT, SMALL_TEXT

TRAIN = str(PROJECT_ROOT / "train_model.py")
GENERATE = str(PROJECT_ROOT / "generate_text.py")
TINY_MODEL = [
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=32",
    "--batch_size=8",
    "--eval_iters=2",
    "--warmup_iters=5",
    "--learning_rate=3e-3",
    "--device=cpu",
]


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def latest_run(workdir: Path) -> Path:
    """The run folder that out/latest.txt names."""
    return workdir / "out" / (workdir / "out" / "latest.txt").read_text().strip()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder where input.txt was trained for 60 steps, then resumed up to 90 steps."""
    workdir = tmp_path_factory.mktemp("e2e")
    (workdir / "input.txt").write_text(SMALL_TEXT * 3, encoding="utf-8")
    first = run_script(TRAIN, *TINY_MODEL, "--max_iters=60", "--eval_interval=30", cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert "best validation loss" in first.stdout
    first_metrics = (latest_run(workdir) / "metrics.jsonl").read_text()
    (workdir / "first_metrics.jsonl").write_text(first_metrics)
    resumed = run_script(  # no --out_dir: the latest run
        TRAIN, *TINY_MODEL, "--max_iters=90", "--eval_interval=30", "--resume", cwd=workdir
    )
    assert resumed.returncode == 0, resumed.stderr
    # The best loss so far, per character like every headline figure of the log.
    said = re.search(
        r"resuming from step 60 \(best validation loss ([0-9.]+) nats/char\)", resumed.stdout
    )
    assert said, resumed.stdout
    best_bpc = min(json.loads(line)["val_bpc"] for line in first_metrics.splitlines())
    assert float(said.group(1)) == pytest.approx(best_bpc * math.log(2), abs=1e-4)
    return workdir


def logged_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_training_writes_checkpoints_metrics_and_plot(trained):
    run = latest_run(trained)
    assert run.parent == trained / "out"
    assert run.name.startswith("run-")  # a folder of its own, named by the time
    for name in ("ckpt_best.pth", "ckpt_last.pth", "metrics.jsonl", "loss.png", "config.json"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))  # the TensorBoard log
    assert logged_steps(trained / "first_metrics.jsonl") == [0, 30, 60]


def test_resume_continues_from_the_latest_checkpoint(trained):
    assert logged_steps(latest_run(trained) / "metrics.jsonl") == [0, 30, 60, 90]  # none twice
    checkpoint = torch.load(latest_run(trained) / "ckpt_last.pth", weights_only=True)
    assert checkpoint["step"] == 90


def test_a_second_run_keeps_the_first_and_becomes_the_latest(trained, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(trained, workdir)
    first = latest_run(workdir)
    before = {path.name: path.read_bytes() for path in first.iterdir() if path.is_file()}
    second = run_script(TRAIN, *TINY_MODEL, "--max_iters=10", "--eval_interval=10", cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert latest_run(workdir) != first
    assert {path.name: path.read_bytes() for path in first.iterdir() if path.is_file()} == before
    # Sampling with no flags takes the run just trained.
    sample = ["--prompt=All:", "--max_new_tokens=30", "--seed=3"]
    newest = run_script(GENERATE, *sample, cwd=workdir)
    explicit = run_script(GENERATE, *sample, f"--out_dir={latest_run(workdir)}", cwd=workdir)
    assert newest.returncode == 0, newest.stderr
    assert newest.stdout == explicit.stdout
    assert newest.stdout != run_script(GENERATE, *sample, f"--out_dir={first}", cwd=workdir).stdout


def test_a_run_into_a_folder_that_holds_one_is_refused_unless_overwritten(trained, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(trained, workdir)
    run = latest_run(workdir)
    before = (run / "ckpt_last.pth").read_bytes()
    options = [*TINY_MODEL, "--max_iters=4", "--eval_interval=2", f"--out_dir={run}"]
    refused = run_script(TRAIN, *options, cwd=workdir)
    assert_one_line_error(refused, "holds another run", "--resume", "--out_dir", "--overwrite")
    assert (run / "ckpt_last.pth").read_bytes() == before
    replaced = run_script(TRAIN, *options, "--overwrite", cwd=workdir)
    assert replaced.returncode == 0, replaced.stderr
    assert logged_steps(run / "metrics.jsonl") == [0, 2, 4]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the old run's log went with it


def test_generation_is_reproducible_and_needs_only_the_checkpoint(trained, tmp_path):
    args = ["--prompt=All:", "--max_new_tokens=80", "--seed=3", f"--out_dir={latest_run(trained)}"]
    first = run_script(GENERATE, *args, cwd=tmp_path)  # another folder: no corpus anywhere
    second = run_script(GENERATE, *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.startswith("All:")
    assert len(first.stdout) >= len("All:") + 80
    other_seed = run_script(
        GENERATE, *args[:-2], "--seed=4", f"--out_dir={latest_run(trained)}", cwd=tmp_path
    )
    assert other_seed.stdout != first.stdout


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_compiled_generation_writes_the_same_text(trained, tmp_path, precision):
    args = ["--prompt=All:", "--max_new_tokens=80", f"--precision={precision}"]
    args += ["--seed=3", f"--out_dir={latest_run(trained)}"]
    compiled = run_script(GENERATE, *args, "--compile", cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    assert "compiling the model" in compiled.stderr
    assert "torch.compile failed" not in compiled.stderr
    assert compiled.stdout == run_script(GENERATE, *args, cwd=tmp_path).stdout


def test_generation_in_bfloat16_is_reproducible(trained, tmp_path):
    args = ["--prompt=All:", "--max_new_tokens=60", "--precision=bfloat16"]
    first = run_script(GENERATE, *args, f"--out_dir={latest_run(trained)}", cwd=tmp_path)
    second = run_script(GENERATE, *args, f"--out_dir={latest_run(trained)}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.startswith("All:")
    assert len(first.stdout) >= len("All:") + 60


def test_generation_from_an_explicit_checkpoint_with_several_samples(trained):
    result = run_script(
        GENERATE,
        f"--ckpt={latest_run(trained) / 'ckpt_last.pth'}",
        "--num_samples=2",
        "--max_new_tokens=20",
        "--temperature=0",
        cwd=trained,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("-" * 40) == 1


@pytest.mark.parametrize("vocabulary", ["fitted", "full"])
def test_bpe_model_trains_resumes_and_generates(tmp_path, vocabulary):
    (tmp_path / "text.txt").write_text(SMALL_TEXT * 2, encoding="utf-8")
    args = [*TINY_MODEL, "--block_size=16", "--tokenizer=bpe", "--data=text.txt"]
    args.append(f"--bpe_vocabulary={vocabulary}")
    trained = run_script(TRAIN, *args, "--max_iters=4", "--eval_interval=2", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    expected = "fitted to the training text (" if vocabulary == "fitted" else "(50,257 tokens)"
    assert expected in trained.stdout
    resumed = run_script(TRAIN, "--data=text.txt", "--resume", "--max_iters=6", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 4" in resumed.stdout
    # "café" is not in the training text: a fitted vocabulary spells it with byte tokens.
    result = run_script(GENERATE, "--prompt=Speak, café", "--max_new_tokens=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Speak, café")


def test_prompt_with_unknown_characters_is_named(trained):
    result = run_script(GENERATE, "--prompt=Zebra ©", cwd=trained)
    assert_one_line_error(result, "not in the vocabulary", "'©'")


def test_missing_checkpoint_says_how_to_train(tmp_path):
    result = run_script(GENERATE, cwd=tmp_path)
    assert_one_line_error(result, "not found", "python train_model.py")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--no_such_option=3"], "unrecognized arguments"),
        (["--n_embd=30", "--n_head=4"], "divisible"),
        (["--learning_rate=-0.1"], "learning_rate"),
        (["--block_size=abc"], "invalid int value"),
        (["--data=missing.txt"], "not found"),
    ],
)
def test_bad_training_options_and_input_give_one_line(tmp_path, args, needle):
    assert_one_line_error(run_script(TRAIN, *args, cwd=tmp_path), needle)


def test_non_utf8_corpus_gives_one_line(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1") * 100)
    assert_one_line_error(run_script(TRAIN, "--data=latin1.txt", cwd=tmp_path), "not UTF-8")


def test_help_explains_every_option(tmp_path):
    result = run_script(TRAIN, "--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in ("--n_layer", "--tokenizer", "--resume", "--max_iters", "--data"):
        assert option in result.stdout
    result = run_script(GENERATE, "--help", cwd=tmp_path)
    for option in ("--prompt", "--temperature", "--top_k", "--top_p", "--ckpt", "--seed"):
        assert option in result.stdout
    assert "--n_layer" not in result.stdout  # the model's shape comes from the checkpoint
