"""Training with several processes (gloo on CPU): two ranks on this machine, started by
train_model.py --processes=2 or by torchrun.

Run alone: python -m pytest tests/test_distributed.py
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import PROJECT_ROOT, SMALL_TEXT, tiny_train_argv
from support.checkpoint import load_checkpoint
from support.devices import Distributed, as_process_lost
from support.launcher import Workers, how_it_ended

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

    The two processes (started by --processes=2) take their batches in passes of 3, 3 and 2
    sequences, so gradients are averaged across processes only after the last pass.
    """
    workdir = tmp_path_factory.mktemp("ddp")
    corpus = workdir / "corpus.txt"
    corpus.write_text(SMALL_TEXT * 3, encoding="utf-8")
    common = {"max_iters": 12, "eval_interval": 4, "eval_iters": 4, "learning_rate": 3e-3}
    started = time.perf_counter()
    two = run(
        [sys.executable, TRAIN, "--processes=2",
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
def test_resume_under_torchrun(runs):  # of the run that --processes=2 started
    corpus = runs["workdir"] / "corpus.txt"
    argv = tiny_train_argv(runs["two"], corpus, batch_size=8, max_iters=16, eval_interval=4,
                           eval_iters=4, learning_rate=3e-3)  # fmt: skip
    result = run([*TORCHRUN, "--nproc_per_node=2", TRAIN, *argv, "--resume"], cwd=runs["workdir"])
    assert result.returncode == 0, result.stderr
    assert "resuming from step 12" in result.stdout
    assert [r["step"] for r in metrics(runs["two"])] == [0, 4, 8, 12, 16]


LAUNCHERS = {
    "torchrun": [*TORCHRUN, "--nproc_per_node=2", TRAIN],
    "processes": [sys.executable, TRAIN, "--processes=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_failing_rank_ends_the_whole_job(tmp_path, launcher):
    started = time.perf_counter()
    result = run(
        [*LAUNCHERS[launcher], "--data=missing.txt", "--device=cpu"], cwd=tmp_path, timeout=120
    )
    assert result.returncode != 0
    assert "corpus missing.txt not found" in result.stderr
    assert time.perf_counter() - started < 60
    if launcher == "processes":  # at most one line from each process, and nothing else
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        missing = "train_model.py: error: corpus missing.txt not found; pass --data PATH to a " \
            "UTF-8 text file"  # fmt: skip
        # (a process slower to fail is stopped by the launcher after 5 s: "interrupted")
        stopped = "train_model.py: interrupted; nothing had been saved yet"
        assert missing in lines, result.stderr
        assert len(lines) <= 2, result.stderr
        assert set(lines) <= {missing, stopped}, result.stderr


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
    # Process 0 says in one line why it stopped; the only traceback is torchrun's own report.
    # (torchrun may also send it SIGTERM twice before it finds rank 1 gone: it then quits.)
    assert "[rank0]" not in stderr, stderr
    ends = ("another training process ended", "interrupted; the last checkpoint is intact")
    assert any(end in stderr for end in ends), stderr


class FakeProcess:
    def __init__(self, returncode: int | None) -> None:
        self.returncode = returncode

    def poll(self) -> int | None:
        return self.returncode


@pytest.mark.parametrize(
    ("returncodes", "received", "first"),
    [
        ([0, 0], [], None),
        ([130, 130], [], None),  # stopped as asked
        ([1, -9], [], (1, -9)),  # the killed one is the likelier cause
        ([2, None], [], (0, 2)),
        ([-2, -2], [(signal.SIGINT, 2)], None),  # a Ctrl-C passed on while they loaded
        ([-2, 0], [], (0, -2)),  # a SIGINT that did not come through the launcher
    ],
)
def test_the_launcher_names_the_process_that_failed_first(returncodes, received, first):
    workers = Workers()
    workers.processes = [FakeProcess(code) for code in returncodes]
    workers.received = received
    assert workers.first_failure() == first


def test_only_a_lost_connection_reads_as_a_lost_process():
    two = Distributed(rank=0, world_size=2)
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:17057: "
                        "Connection reset by peer. This is typically caused by ...")  # fmt: skip
    lost = as_process_lost(gloo, two)
    assert lost is not None
    assert "another training process ended (Read error [127.0.0.1]:17057: Connection reset by " \
        "peer), so process 0 stops too" in str(lost)  # fmt: skip
    assert as_process_lost(gloo, Distributed()) is None  # one process has no peers
    for other in ("mat1 and mat2 shapes cannot be multiplied", "CUDA error: out of memory",
                  "[gloo] Timed out waiting 1800000ms for recv operation"):  # fmt: skip
        assert as_process_lost(RuntimeError(other), two) is None, other
    assert how_it_ended(-9) == "killed by SIGKILL"
    assert how_it_ended(2) == "exit status 2"


def start_two_processes(tmp_path: Path, **options: object) -> subprocess.Popen:
    """train_model.py --processes=2 on a tiny model, its output in pipes."""
    (tmp_path / "corpus.txt").write_text(SMALL_TEXT * 3, encoding="utf-8")
    argv = tiny_train_argv(tmp_path / "out", tmp_path / "corpus.txt", **options)
    return subprocess.Popen(
        [sys.executable, TRAIN, "--processes=2", *argv],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(process: subprocess.Popen, words: str, timeout: float = 120) -> None:
    """Read the process's output until a line holding `words` comes."""
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        if words in line:
            return
        assert time.monotonic() < deadline, f"no line with {words!r}"
    raise AssertionError(f"the output ended without {words!r}")


def stderr_lines(stderr: str) -> list[str]:
    """The lines a user reads (the progress bar's redraws left out)."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("training:")]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the worker through /proc")
def test_a_process_killed_under_processes_ends_the_job_in_one_line_each(tmp_path):
    job = start_two_processes(tmp_path, max_iters=100_000, eval_interval=50)
    wait_for_line(job, "step 50:")
    victim = worker_with_rank(job.pid, rank=1)
    assert victim is not None
    subprocess.run(["kill", "-9", str(victim)], check=True)
    _, stderr = job.communicate(timeout=90)
    assert job.returncode == 1
    assert "Traceback" not in stderr
    lines = stderr_lines(stderr)
    assert len(lines) == 2, lines
    assert "another training process ended" in lines[0]
    assert "process 1 of 2 failed first (killed by SIGKILL)" in lines[1]
    assert load_checkpoint(tmp_path / "out" / "ckpt_last.pth")["step"] >= 50  # intact


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the workers through /proc")
def test_the_processes_save_and_stop_when_their_launcher_is_killed(tmp_path):
    job = start_two_processes(tmp_path, max_iters=100_000, eval_interval=50)
    wait_for_line(job, "step 50:")
    workers = [worker_with_rank(job.pid, rank) for rank in (0, 1)]
    assert None not in workers
    job.kill()
    job.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "the processes trained on without their launcher"
        time.sleep(0.2)
    stderr = job.stderr.read()  # the processes', written after their launcher died
    assert "Traceback" not in stderr
    stopped_at = int(stderr.split("stopped at step ")[1].split(";")[0])  # they saved
    assert load_checkpoint(tmp_path / "out" / "ckpt_last.pth")["step"] == stopped_at


# A step of 10,000 passes: long enough (about 40 s on 2 cores) that only a stop within the
# step can end the job within 15 s, even on a machine a few times faster.
GIANT_STEP = {"batch_size": 40_000, "sequences_per_pass": 4, "max_iters": 5}


def steps_evaluated(out_dir: Path) -> list[int]:
    return [row["step"] for row in metrics(out_dir)] if (out_dir / "metrics.jsonl").exists() else []


def stop_within_15_s(job: subprocess.Popen, sig: signal.Signals) -> str:
    """Send the signal; the job must end saved (130) within 15 s, in lines, not tracebacks."""
    job.send_signal(sig)
    asked = time.monotonic()
    _, stderr = job.communicate(timeout=60)
    assert time.monotonic() - asked < 15, "the stop waited for the step's end"
    assert job.returncode == 130, stderr
    assert "Traceback" not in stderr
    return stderr


@pytest.mark.slow
def test_two_processes_stop_within_seconds_during_the_first_evaluation(tmp_path):
    job = start_two_processes(tmp_path, **GIANT_STEP, eval_iters=2)  # 40,000 passes
    wait_for_line(job, "global batch")
    time.sleep(2)
    assert "stopped at step 0" in stop_within_15_s(job, signal.SIGINT)
    assert steps_evaluated(tmp_path / "out") == []  # dropped: --resume evaluates step 0 again


@pytest.mark.slow
def test_two_processes_stop_within_seconds_during_a_step(tmp_path):
    job = start_two_processes(tmp_path, **GIANT_STEP, eval_iters=1)
    wait_for_line(job, "step 0:")
    time.sleep(2)
    assert "stopped at step 0" in stop_within_15_s(job, signal.SIGTERM)
    assert steps_evaluated(tmp_path / "out") == [0]


@pytest.mark.slow
def test_a_stop_during_the_final_evaluation_resumes_into_it(tmp_path):
    # Process 0 evaluates alone while the other waits to finish: both must still end together.
    (tmp_path / "corpus.txt").write_text(SMALL_TEXT * 3, encoding="utf-8")
    argv = [sys.executable, TRAIN, "--processes=2",
            *tiny_train_argv(tmp_path / "out", tmp_path / "corpus.txt", max_iters=2)]  # fmt: skip
    assert run(argv, cwd=tmp_path).returncode == 0
    longer = [*argv, "--resume", "--max_iters=3", "--eval_iters=20000"]  # 40,000 passes
    job = subprocess.Popen(longer, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    wait_for_line(job, "global batch")
    time.sleep(2)
    assert "stopped at step 3" in stop_within_15_s(job, signal.SIGINT)
    assert steps_evaluated(tmp_path / "out") == [0, 2]
    finish = run([*argv, "--resume", "--max_iters=3", "--eval_iters=2"], cwd=tmp_path)
    assert finish.returncode == 0, finish.stderr
    assert steps_evaluated(tmp_path / "out") == [0, 2, 3]


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
