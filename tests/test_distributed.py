"""Training with several processes through torchrun (gloo on CPU): two ranks on this machine.

Run alone: python -m pytest tests/test_distributed.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import PROJECT_ROOT, SMALL_TEXT, tiny_train_argv

TRAIN = str(PROJECT_ROOT / "train_model.py")
GENERATE = str(PROJECT_ROOT / "generate_text.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def run(command: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same training as 2 processes x batch 8 and as 1 process x batch 16 (dropout 0).

    The two processes take their batches in passes of 3, 3 and 2 sequences, so gradients are
    averaged across processes only after the last pass.
    """
    workdir = tmp_path_factory.mktemp("ddp")
    corpus = workdir / "corpus.txt"
    corpus.write_text(SMALL_TEXT * 3, encoding="utf-8")
    common = {"max_iters": 12, "eval_interval": 4, "eval_iters": 4, "learning_rate": 3e-3}
    started = time.perf_counter()
    two = run(
        [*TORCHRUN, "--nproc_per_node=2", TRAIN,
         *tiny_train_argv(workdir / "two", corpus, batch_size=8, sequences_per_pass=3,
                          **common)],
        cwd=workdir,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert two.returncode == 0, two.stderr
    assert "= 16 sequences" in two.stdout  # the global batch: 8 x 1 x 2
    assert "3 sequences per forward and backward pass" in two.stdout
    one = run([sys.executable, TRAIN, *tiny_train_argv(workdir / "one", corpus, batch_size=16,
                                                       **common)], cwd=workdir)  # fmt: skip
    assert one.returncode == 0, one.stderr
    print(f"\n2 processes, 12 steps: {seconds:.1f} s including start-up")
    return {"workdir": workdir, "two": workdir / "two", "one": workdir / "one"}


@pytest.mark.slow
def test_two_processes_learn_like_one_process_with_twice_the_batch(runs):
    two, one = metrics(runs["two"]), metrics(runs["one"])
    for a, b in zip(two, one, strict=True):
        print(
            f"step {a['step']}: val loss 2 x 8 = {a['val_loss']:.4f}, 1 x 16 = {b['val_loss']:.4f}"
        )
    assert [r["step"] for r in two] == [0, 4, 8, 12]
    # Evaluation batches depend on batch_size, so even step 0 differs a little.
    for a, b in zip(two, one, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=0.05)
    assert two[-1]["val_loss"] < two[0]["val_loss"] - 0.3  # and both learn


@pytest.mark.slow
def test_checkpoint_of_two_processes_loads_in_generate_text(runs):
    checkpoint = torch.load(runs["two"] / "ckpt_last.pth", weights_only=True)
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in checkpoint["model"])
    result = run(
        [sys.executable, GENERATE, f"--out_dir={runs['two']}", "--prompt=All:",
         "--max_new_tokens=30"],
        cwd=runs["workdir"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("All:")


@pytest.mark.slow
def test_resume_under_torchrun(runs):
    corpus = runs["workdir"] / "corpus.txt"
    argv = tiny_train_argv(runs["two"], corpus, batch_size=8, max_iters=16, eval_interval=4,
                           eval_iters=4, learning_rate=3e-3)  # fmt: skip
    result = run([*TORCHRUN, "--nproc_per_node=2", TRAIN, *argv, "--resume"], cwd=runs["workdir"])
    assert result.returncode == 0, result.stderr
    assert "resuming from step 12" in result.stdout
    assert [r["step"] for r in metrics(runs["two"])] == [0, 4, 8, 12, 16]


@pytest.mark.slow
def test_a_failing_rank_ends_the_whole_job(tmp_path):
    started = time.perf_counter()
    result = run(
        [*TORCHRUN, "--nproc_per_node=2", TRAIN, "--data=missing.txt", "--device=cpu"],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode != 0
    assert "corpus missing.txt not found" in result.stderr
    assert time.perf_counter() - started < 60


def worker_with_rank(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker (a descendant of `parent`) whose RANK is `rank`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid")))
        if f"RANK={rank}".encode() in environ and ppid != 0 and is_descendant(ppid, parent):
            return int(proc.name)
    return None


def is_descendant(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        status = Path(f"/proc/{pid}/status").read_text()
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid")))
    return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the worker through /proc")
def test_a_rank_that_dies_mid_training_ends_the_whole_job(tmp_path):
    (tmp_path / "corpus.txt").write_text(SMALL_TEXT * 3, encoding="utf-8")
    argv = tiny_train_argv(tmp_path / "out", tmp_path / "corpus.txt", max_iters=100_000)
    job = subprocess.Popen(
        [*TORCHRUN, "--nproc_per_node=2", TRAIN, *argv],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "ckpt_last.pth").exists():
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    victim = worker_with_rank(job.pid, rank=1)
    assert victim is not None
    subprocess.run(["kill", "-9", str(victim)], check=True)
    _, stderr = job.communicate(timeout=90)  # ends by itself: no hang waiting for rank 1
    assert job.returncode != 0
    assert "Root Cause" in stderr  # torchrun's report names the rank that failed first
    assert "rank      : 1" in stderr


@pytest.mark.slow
def test_fitted_bpe_trains_under_torchrun_and_generates(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SMALL_TEXT * 3, encoding="utf-8")
    options = tiny_train_argv(
        tmp_path / "bpe", corpus, tokenizer="bpe", max_iters=4, eval_interval=2, eval_iters=2
    )
    trained = run([*TORCHRUN, "--nproc_per_node=2", TRAIN, *options], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "fitted" in trained.stdout  # the corpus summary names the vocabulary
    settings = json.loads((tmp_path / "bpe" / "config.json").read_text())
    assert settings["data"]["bpe_vocabulary"] == "fitted"
    assert settings["model"]["vocab_size"] < 50257
    result = run(
        [sys.executable, GENERATE, f"--out_dir={tmp_path / 'bpe'}", "--prompt=Café au lait",
         "--max_new_tokens=20"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Café au lait")
