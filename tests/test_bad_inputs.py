"""Bad input, table by table: each case gives its exit status and one line on stderr, never a
traceback, never a hang, and leaves the files it must not touch as they were.

The tables run the scripts' main() in this process (fast); the cases that need a real process
(closed or full output, a closed pipe, signals) run them as subprocesses.
Run alone: python -m pytest tests/test_bad_inputs.py
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import app
import generate_text
import train_model
from conftest import PROJECT_ROOT, SMALL_TEXT, tiny_train_argv
from support.checkpoint import load_checkpoint, save_checkpoint
from support.devices import StopRequest

TRAIN = str(PROJECT_ROOT / "train_model.py")
GENERATE = str(PROJECT_ROOT / "generate_text.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder holding a corpus and a finished 20-step run (out/) to damage copies of."""
    workdir = tmp_path_factory.mktemp("bad")
    (workdir / "corpus.txt").write_text(SMALL_TEXT, encoding="utf-8")
    assert train_model.main(tiny_train_argv(workdir / "out", workdir / "corpus.txt")) == 0
    return workdir


def one_line_error(capsys, status: int, expected: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert status == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def run_main(main, argv: list[str]) -> int:
    """main(argv)'s exit status, also when argparse exits."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


# ---------------------------------------------------------------------------- training options


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def sparse_file(path: Path, size: int) -> Path:
    with path.open("wb") as file:
        file.truncate(size)  # no disk blocks: instant, whatever the size
    return path


TRAINING_CASES = [
    # (id, options, setup of the working folder, expected status, words in the message)
    ("batch too large", {"batch_size": 10**11}, None, 2, ["needs about", "--batch_size"]),
    (
        "context too long",
        {"block_size": 100_000, "max_iters": 1},
        "long corpus",
        2,
        ["needs about", "--block_size"],
    ),
    ("too wide", {"n_embd": 1_000_000}, None, 2, ["needs about", "--n_embd"]),
    ("too deep", {"n_layer": 100_000}, None, 2, ["needs about", "--n_layer"]),
    ("corpus is /dev/zero", {"data": "/dev/zero"}, None, 2, ["not a regular file"]),
    ("corpus is a pipe", {"data": "{tmp}/pipe"}, "pipe", 2, ["not a regular file"]),
    ("corpus over 1 GiB", {"data": "{tmp}/huge.txt"}, "huge", 2, ["train on a part of it"]),
    ("over 65,536 characters", {"data": "{tmp}/cjk.txt"}, "cjk", 2, ["65,536", "bpe"]),
    ("seed overflows", {"seed": 10**23}, None, 2, ["seed must be in"]),
    ("nan learning rate", {"learning_rate": "nan"}, None, 2, ["finite"]),
    ("out_dir is a file", {"out_dir": "{tmp}/file"}, "file", 2, ["is not a folder"]),
    (
        "cache_dir is a file",
        {"cache_dir": "{tmp}/file"},
        "file",
        2,
        ["--cache_dir", "not a folder"],
    ),
    ("out_dir is /dev/full", {"out_dir": "/dev/full"}, None, 2, ["is not a folder"]),
    ("out_dir is a loop", {"out_dir": "{tmp}/loop"}, "loop", 2, ["is not a folder"]),
    ("a path with \\n", {"data": "{tmp}/my\\new.txt"}, None, 2, ["my\\new.txt not found"]),
    ("unknown attention", {"attention": "evil"}, None, 2, ["invalid choice"]),
    ("no processes", {"processes": 0}, None, 2, ["processes must be >= 1"]),
    ("more processes than cores", {"processes": 100_000}, None, 2, ["a process needs one"]),
    # With --processes, the settings are checked once, before any process starts.
    ("two processes, a bad number", {"processes": 2, "n_layer": "x"}, None, 2, ["--n_layer"]),
    ("two processes, a nan", {"processes": 2, "learning_rate": "nan"}, None, 2, ["finite"]),
    (
        "a learned vocabulary of 100",
        {"tokenizer": "bpe", "bpe_vocabulary": "trained", "bpe_vocab_size": 100},
        None,
        2,
        ["bpe_vocab_size must be in 257..65536"],
    ),
]


def prepare(kind: str | None, tmp_path: Path) -> None:
    if kind == "pipe":
        fifo(tmp_path / "pipe")
    elif kind == "huge":
        sparse_file(tmp_path / "huge.txt", (1 << 30) + 1)
    elif kind == "cjk":
        text = "".join(map(chr, range(0x10000, 0x10000 + 70_000)))  # no surrogates there
        (tmp_path / "cjk.txt").write_text(text * 2, encoding="utf-8")
    elif kind == "file":
        (tmp_path / "file").write_text("not a folder")
    elif kind == "loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
    elif kind == "long corpus":
        (tmp_path / "corpus.txt").write_text(SMALL_TEXT * 300)


@pytest.mark.parametrize(
    ("options", "setup", "status", "needles"),
    [case[1:] for case in TRAINING_CASES],
    ids=[case[0] for case in TRAINING_CASES],
)
def test_bad_training_input_is_one_line(tmp_path, capsys, options, setup, status, needles):
    (tmp_path / "corpus.txt").write_text(SMALL_TEXT)
    prepare(setup, tmp_path)
    options = {k: str(v).replace("{tmp}", str(tmp_path)) for k, v in options.items()}
    out_dir = Path(options.pop("out_dir", tmp_path / "out"))
    argv = tiny_train_argv(out_dir, tmp_path / "corpus.txt", **options)
    before = {p.name: p.lstat().st_mtime_ns for p in tmp_path.iterdir()}
    one_line_error(capsys, run_main(train_model.main, argv), status, *needles)
    assert not (tmp_path / "out").exists()  # a run that could not start leaves nothing
    for name, mtime in before.items():  # what was there is untouched (the token cache may come)
        assert (tmp_path / name).lstat().st_mtime_ns == mtime, name


def test_gpt2s_weights_on_a_learned_vocabulary_are_refused(tmp_path, tiny_corpus, capsys):
    argv = ["--init_from=gpt2", "--bpe_vocabulary=trained", f"--data={tiny_corpus}"]
    status = run_main(train_model.main, [*argv, f"--out_dir={tmp_path / 'out'}"])
    one_line_error(capsys, status, 2, "--init_from reads GPT-2's tokens", "fitted or full")
    assert not (tmp_path / "out").exists()


def test_a_torchrun_variable_that_is_not_a_number(tmp_path, tiny_corpus, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "abc")
    status = train_model.main(tiny_train_argv(tmp_path / "out", tiny_corpus))
    one_line_error(capsys, status, 2, "RANK must be a whole number")


def test_a_torchrun_job_without_its_rendezvous(tmp_path, tiny_corpus, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    status = train_model.main(tiny_train_argv(tmp_path / "out", tiny_corpus))
    one_line_error(capsys, status, 2, "cannot join the torchrun job", "torchrun")


def test_more_processes_than_gpus_are_refused(tmp_path, tiny_corpus, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = tiny_train_argv(tmp_path / "out", tiny_corpus, device="cuda", processes=2)
    one_line_error(capsys, train_model.main(argv), 2, "needs a GPU each", "this machine has 1")
    assert not (tmp_path / "out").exists()


def test_processes_that_torchrun_did_not_start_are_refused(
    tmp_path, tiny_corpus, capsys, monkeypatch
):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    argv = tiny_train_argv(tmp_path / "out", tiny_corpus, processes=3)
    one_line_error(capsys, train_model.main(argv), 2, "processes is 3", "torchrun started 2")


HOLD_THE_LOCK = """
import fcntl, sys, time
from pathlib import Path
lock = Path(sys.argv[1]).open("a+")
fcntl.flock(lock, fcntl.LOCK_EX)
lock.write("4242")
lock.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_folder_another_run_is_using_is_refused(tmp_path, tiny_corpus, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(out_dir / ".lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        status = train_model.main(tiny_train_argv(out_dir, tiny_corpus))
        one_line_error(capsys, status, 2, "another training run (process 4242)")
        assert sorted(p.name for p in out_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    # Its holder gone (killed: no clean-up ran), the folder is free again.
    assert train_model.main(tiny_train_argv(out_dir, tiny_corpus, max_iters=2)) == 0


def test_a_hangup_is_left_alone_under_nohup():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopRequest():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize(
    ("option", "words"),
    [("--init_from=gpt2", "keeps the saved run's init_from"), ("--n_embd=64", "n_embd")],
)
def test_resume_with_an_option_it_cannot_apply_is_refused(trained, capsys, option, words):
    out_dir = trained / "out"
    before = {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()}
    argv = [f"--out_dir={out_dir}", f"--data={trained / 'corpus.txt'}", "--resume", option]
    one_line_error(capsys, run_main(train_model.main, [*argv, "--max_iters=40"]), 2, words)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()} == before


def test_resume_on_another_corpus_is_refused(trained, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(SMALL_TEXT[::-1])  # the same characters, another text
    out_dir = trained / "out"
    before = (out_dir / "ckpt_last.pth").read_bytes()
    argv = [f"--out_dir={out_dir}", f"--data={other}", "--resume", "--max_iters=30"]
    one_line_error(capsys, train_model.main(argv), 2, "not the text this run trained on")
    assert (out_dir / "ckpt_last.pth").read_bytes() == before


def test_an_empty_cache_dir_means_no_cache(tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = tiny_train_argv(tmp_path / "out", tiny_corpus, max_iters=2, cache_dir="")
    assert train_model.main(argv) == 0
    assert not list(tmp_path.rglob("tokens-*.npz"))


def test_interrupted_before_the_first_checkpoint_says_so(
    tmp_path, tiny_corpus, capsys, monkeypatch
):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_model, "load_splits", interrupted)
    status = train_model.main(tiny_train_argv(tmp_path / "out", tiny_corpus))
    assert status == 130
    assert "nothing had been saved yet" in capsys.readouterr().err


# ---------------------------------------------------------------------------- damaged checkpoints


def damage(checkpoint: dict, kind: str) -> dict:
    model_config, weights = checkpoint["model_config"], checkpoint["model"]
    if kind == "unknown attention":
        model_config["attention"] = "evil"
    elif kind == "config not a dict":
        checkpoint["model_config"] = [1, 2]
    elif kind == "n_layer a string":
        model_config["n_layer"] = "2"
    elif kind == "duplicate characters":
        chars = checkpoint["tokenizer"]["chars"]
        checkpoint["tokenizer"]["chars"] = chars[:-1] + chars[0]
    elif kind == "tokenizer not a dict":
        checkpoint["tokenizer"] = "char"
    elif kind == "a nan weight":
        weights["final_norm.weight"][0] = math.nan
    elif kind == "an inf weight":
        weights["token_embedding.weight"][3, 1] = math.inf
    elif kind == "context of 10**9":
        model_config["block_size"] = 10**9
    elif kind == "10**6 layers":
        model_config["n_layer"] = 10**6
    elif kind == "future version":
        checkpoint["format_version"] = "2"
    elif kind == "a merge of later tokens":
        checkpoint["tokenizer"] = {"kind": "bpe", "encoding": "trained", "merges": [[97, 300]]}
    return checkpoint


CHECKPOINT_CASES = [
    ("unknown attention", "attention must be one of"),
    ("config not a dict", "invalid model config"),
    ("n_layer a string", "n_layer must be int"),
    ("duplicate characters", "duplicates"),
    ("tokenizer not a dict", "describes its tokenizer"),
    ("a nan weight", "not all finite"),
    ("an inf weight", "not all finite"),
    ("context of 10**9", "needs about"),
    ("10**6 layers", "needs about"),
    ("future version", "format version '2'"),
    ("a merge of later tokens", "not two earlier token ids"),
]


@pytest.mark.parametrize(("kind", "needle"), CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_damaged_checkpoint_fields_are_one_line(trained, tmp_path, capsys, kind, needle):
    path = tmp_path / "damaged.pth"
    save_checkpoint(path, damage(load_checkpoint(trained / "out" / "ckpt_best.pth"), kind))
    status = generate_text.main([f"--ckpt={path}", "--max_new_tokens=5"])
    one_line_error(capsys, status, 2, needle)


def evil_pickle(path: Path) -> None:
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format_version": 1, "payload": RunsCode()}, path)


def deflated(path: Path, source: Path) -> None:
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w") as packed:
        for entry in original.infolist():
            packed.writestr(entry.filename, original.read(entry), zipfile.ZIP_DEFLATED)


FILE_CASES = [
    ("a pipe", "not a regular file"),
    ("/dev/urandom", "not a regular file"),
    ("runs code", "refused: loading it would run code (it calls posix.system)"),
    ("random bytes", "not a readable checkpoint"),
    ("deflated", "compressed"),
]


@pytest.mark.parametrize(("kind", "needle"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_files_that_are_no_checkpoints_are_one_line(trained, tmp_path, capsys, kind, needle):
    path = tmp_path / "file.pth"
    if kind == "a pipe":
        fifo(path)
    elif kind == "/dev/urandom":
        path = Path("/dev/urandom")
    elif kind == "runs code":
        evil_pickle(path)
    elif kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "deflated":
        deflated(path, trained / "out" / "ckpt_best.pth")
    status = generate_text.main([f"--ckpt={path}", "--max_new_tokens=5"])
    one_line_error(capsys, status, 2, needle)


@pytest.mark.parametrize("missing", ["optimizer", "rng", "step", "data_config", "scaler"])
def test_resume_from_a_checkpoint_missing_its_state_is_one_line(trained, tmp_path, capsys, missing):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    checkpoint = load_checkpoint(trained / "out" / "ckpt_last.pth")
    del checkpoint[missing]
    save_checkpoint(out_dir / "ckpt_last.pth", checkpoint)
    argv = [f"--out_dir={out_dir}", f"--data={trained / 'corpus.txt'}", "--resume"]
    one_line_error(capsys, train_model.main([*argv, "--max_iters=40"]), 2, missing)


@pytest.mark.parametrize(
    ("field", "damaged"),
    [
        ("training_weights", "nan"),
        ("training_weights", "not a dict"),
        ("training_weights", "another shape"),
        ("averaged_steps", -1),
    ],
)
def test_resume_from_a_damaged_weight_average_is_one_line(
    trained, tmp_path, capsys, field, damaged
):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    checkpoint = load_checkpoint(trained / "out" / "ckpt_last.pth")
    checkpoint["training_weights"] = dict(checkpoint["model"])  # as a run with an average
    checkpoint["averaged_steps"] = 20
    name = next(iter(checkpoint["training_weights"]))
    if damaged == "nan":
        checkpoint["training_weights"][name] = torch.full_like(checkpoint["model"][name], math.nan)
    elif damaged == "another shape":
        checkpoint["training_weights"][name] = torch.zeros(3)
    else:
        checkpoint[field] = damaged
    save_checkpoint(out_dir / "ckpt_last.pth", checkpoint)
    argv = [f"--out_dir={out_dir}", f"--data={trained / 'corpus.txt'}", "--resume"]
    one_line_error(capsys, train_model.main([*argv, "--max_iters=40"]), 2, field)


# ---------------------------------------------------------------------------- sampling options

SAMPLING_CASES = [
    ("temperature underflows", ["--temperature=1e-40"], "temperature must be 0 or in"),
    ("seed overflows", ["--seed=99999999999999999999999"], "seed must be in"),
    ("a billion tokens", ["--max_new_tokens=1000000000"], "max_new_tokens must be in"),
    ("prompt and prompt file", ["--prompt=a", "--prompt_file={tmp}/p.txt"], "not both"),
    ("prompt file is a pipe", ["--prompt_file={tmp}/pipe"], "not a regular file"),
    ("a lone surrogate", ["--prompt=\udcff"], "not a character"),
    ("top_p of 0", ["--top_p=0"], "top_p must be in"),
    ("compile, no cache", ["--compile", "--use_cache=false"], "--compile needs --use_cache"),
]


@pytest.mark.parametrize(
    ("options", "needle"), [c[1:] for c in SAMPLING_CASES], ids=[c[0] for c in SAMPLING_CASES]
)
def test_bad_sampling_input_is_one_line(trained, tmp_path, capsys, options, needle):
    (tmp_path / "p.txt").write_text("All:")
    fifo(tmp_path / "pipe")
    argv = [f"--out_dir={trained / 'out'}", *(o.replace("{tmp}", str(tmp_path)) for o in options)]
    one_line_error(capsys, run_main(generate_text.main, argv), 2, needle)


def test_a_vanishing_top_p_still_samples(trained, capsys):
    argv = [f"--out_dir={trained / 'out'}", "--top_p=1e-300", "--max_new_tokens=20"]
    assert generate_text.main(argv) == 0
    assert len(capsys.readouterr().out) >= 20


@pytest.mark.parametrize("port", ["-1", "99999", "http"])
def test_bad_port_is_one_line(capsys, port):
    one_line_error(capsys, run_main(app.main, [f"--port={port}"]), 2, "1..65535")


def test_an_address_that_is_not_this_computers_is_one_line(capsys):
    status = run_main(app.main, ["--host=256.1.1.1", "--port=7861"])
    one_line_error(capsys, status, 2, "cannot serve on 256.1.1.1:7861")


def test_a_port_in_use_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = run_main(app.main, [f"--port={port}"])
    one_line_error(capsys, status, 2, f"cannot serve on 127.0.0.1:{port}", "in use")


def test_damaged_metrics_lines_are_skipped(trained, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name in ("ckpt_last.pth", "ckpt_best.pth", "metrics.jsonl"):
        (out_dir / name).write_bytes((trained / "out" / name).read_bytes())
    lines = (out_dir / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (out_dir / "metrics.jsonl").write_bytes(
        lines[0] + b'{"step": 5, "val\xff\n' + b"".join(lines[1:])
    )
    argv = [
        f"--out_dir={out_dir}",
        f"--data={trained / 'corpus.txt'}",
        "--resume",
        "--max_iters=30",
    ]
    assert train_model.main(argv) == 0
    assert "skipped 1 damaged line" in capsys.readouterr().err
    steps = [
        json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 10, 20, 30]


# ---------------------------------------------------------------------------- real processes


def run(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_output_to_a_full_disk_is_one_line(trained):
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, GENERATE, f"--out_dir={trained / 'out'}", "--max_new_tokens=50"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "generate_text.py: error: cannot write the text (No space left on device)"
    ]


def test_closed_output_is_one_line(trained):
    result = subprocess.run(
        [sys.executable, GENERATE, f"--out_dir={trained / 'out'}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.close(1),
    )
    assert result.returncode == 2
    assert "the output is closed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_ascii_terminal_gets_the_text_escaped(tmp_path):
    (tmp_path / "corpus.txt").write_text(SMALL_TEXT.replace("a", "é"), encoding="utf-8")
    assert train_model.main(tiny_train_argv(tmp_path / "out", tmp_path / "corpus.txt")) == 0
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    result = run(GENERATE, f"--out_dir={tmp_path / 'out'}", "--prompt=Spé", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Sp\\xe9")
    assert not result.stderr


def test_terminal_escapes_in_the_text_are_shown_escaped(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert generate_text.shown("a\x1b[2Jb\n\tc\x07") == "a\\x1b[2Jb\n\tc\\x07"


def test_training_survives_a_closed_pipe_and_a_closed_terminal(tmp_path, tiny_corpus):
    argv = tiny_train_argv(tmp_path / "out", tiny_corpus, max_iters=300, eval_interval=100)
    process = subprocess.Popen(
        [sys.executable, TRAIN, *argv, "--log_interval=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.read(200)  # the run has started writing
    process.stdout.close()  # the reader goes away, like `| head`
    process.stderr.close()
    assert process.wait(timeout=300) == 0
    assert load_checkpoint(tmp_path / "out" / "ckpt_last.pth")["step"] == 300


def hangup_as_a_terminal_sends_it() -> None:
    """In a child, before it runs: SIGHUP's default, even when the tests run under nohup."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def test_a_hangup_saves_like_ctrl_c(tmp_path, tiny_corpus):
    out_dir = tmp_path / "out"
    argv = tiny_train_argv(out_dir, tiny_corpus, max_iters=100_000, eval_interval=50)
    process = subprocess.Popen(
        [sys.executable, TRAIN, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=hangup_as_a_terminal_sends_it,  # (under nohup the run rightly ignores it)
    )
    try:
        deadline = time.monotonic() + 120
        while not (out_dir / "ckpt_last.pth").exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        process.send_signal(signal.SIGHUP)  # the terminal closed
        assert process.wait(timeout=120) == 130
    finally:
        process.kill()  # never left training after a failure
    err = process.stderr.read()
    assert "Continue with: python train_model.py --resume" in err
    stopped_at = int(err.split("stopped at step ")[1].split(";")[0])
    assert load_checkpoint(out_dir / "ckpt_last.pth")["step"] == stopped_at


@pytest.mark.parametrize("script", [TRAIN, GENERATE])
def test_ctrl_c_while_the_libraries_load_is_no_traceback(tmp_path, script):
    process = subprocess.Popen(
        [sys.executable, script, "--help"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    time.sleep(0.3)  # torch takes a second or more to import: this lands during the imports
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGINT  # ended by the signal, as Ctrl-C should
    assert "Traceback" not in err
