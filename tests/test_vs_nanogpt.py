"""The side-by-side comparison's plumbing (bench.py --vs-nanogpt), without nanoGPT itself: a
stand-in checkout whose scripts only record how they were called."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hyperparameters import SampleConfig, TrainConfig
from support.command_line import build_parser, parse_configs
from support.common import UserFacingError
from tools import vs_nanogpt

STAND_IN = """import json, sys
with open("calls.jsonl", "a") as f:
    f.write(json.dumps([__file__.rsplit("/", 1)[-1], sys.argv[1:]]) + "\\n")
"""


def stand_in_checkout(root: Path) -> Path:
    root.mkdir()
    for name in vs_nanogpt.NANOGPT_FILES:
        (root / name).write_text(STAND_IN)
    (root / "data" / "shakespeare_char").mkdir(parents=True)
    (root / "data" / "shakespeare_char" / "prepare.py").write_text(STAND_IN)
    return root


def test_nanogpt_runs_from_a_scratch_copy_with_the_corpus_prepared(tmp_path):
    checkout = stand_in_checkout(tmp_path / "nanoGPT")
    corpus = tmp_path / "input.txt"
    corpus.write_text("To be, or not to be\n")
    copy = vs_nanogpt.prepare_nanogpt(checkout, corpus, tmp_path / "work")
    data = copy / "data" / "shakespeare_char"
    assert (data / "input.txt").read_text() == corpus.read_text()
    assert json.loads((data / "calls.jsonl").read_text())[0] == "prepare.py"
    assert sorted(p.name for p in checkout.iterdir()) == sorted([*vs_nanogpt.NANOGPT_FILES, "data"])


def test_a_folder_that_is_not_nanogpt_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserFacingError, match="is not a nanoGPT checkout") as caught:
        vs_nanogpt.prepare_nanogpt(tmp_path / "empty", tmp_path / "x.txt", tmp_path / "work")
    assert "\n" not in str(caught.value)


def test_a_failing_command_is_one_line(tmp_path):
    command = [sys.executable, "-c", "import sys; sys.exit('broken: no data')"]
    with pytest.raises(UserFacingError, match="broken: no data"):
        vs_nanogpt.run_measured(command, tmp_path)


@pytest.mark.parametrize(
    "case",
    [c for c in vs_nanogpt.TRAINING_CASES if c.nanogpt_passes == 1],
    ids=lambda c: c.name,
)
def test_both_projects_get_the_same_work(case):
    theirs = vs_nanogpt.nanogpt_training(case, case.steps, Path("out"))
    ours = vs_nanogpt.our_training(case, case.steps, Path("out"), Path("input.txt"))
    for setting in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "dropout"):
        value = getattr(case, setting)
        assert f"--{setting}={value}" in theirs
        assert f"--{setting}={value}" in ours
    assert f"--max_iters={case.steps - 1}" in theirs  # nanoGPT's loop runs max_iters + 1 steps
    assert f"--max_iters={case.steps}" in ours
    assert "--optimizer=adamw" in ours
    assert "--position=learned" in ours
    assert Path(ours[1]).is_file()  # this project's own train_model.py


def test_our_sampling_runs_this_projects_generate_text():
    assert Path(vs_nanogpt.our_sampling(Path("out"), 10)[1]).is_file()


def test_nanogpt_in_passes_takes_the_same_batch_through_its_accumulation():
    case = next(c for c in vs_nanogpt.TRAINING_CASES if c.nanogpt_passes == 8)
    theirs = vs_nanogpt.nanogpt_training(case, case.steps, Path("out"))
    assert case.batch_size == 64
    assert "--batch_size=8" in theirs
    assert "--gradient_accumulation_steps=8" in theirs
    assert "--batch_size=64" in vs_nanogpt.our_training(case, 3, Path("out"), Path("input.txt"))


def test_per_step_time_leaves_start_up_out_and_ratios_compare_tokens_per_second():
    assert vs_nanogpt.per_unit((12.0, 0), (2.0, 0), extra=100) == pytest.approx(0.1)
    runs = {
        "nanogpt": [{"step_s": 0.2, "process_s": 30, "peak_mb": 400}],
        "ours": [{"step_s": 0.1, "process_s": 20, "peak_mb": 200}],
    }
    figures = vs_nanogpt.summarise(runs, tokens=768, unit="step")
    assert figures["ours"]["tokens_per_s"] == pytest.approx(7680)
    assert figures["speed_ratio"] == pytest.approx(2.0)
    assert figures["memory_ratio"] == pytest.approx(0.5)


def test_a_chatty_command_does_not_block_on_its_error_output(tmp_path):
    # 1 MB on stderr: more than a pipe holds, as a long progress bar writes.
    command = [sys.executable, "-c", "import sys; sys.stderr.write('x' * 1_000_000)"]
    seconds, peak_mb = vs_nanogpt.run_measured(command, tmp_path)
    assert seconds < 60
    assert peak_mb > 0


@pytest.mark.parametrize("case", vs_nanogpt.GENERATION_CASES, ids=lambda case: case.name)
def test_each_generation_case_compiles_whom_it_names(case):
    commands = vs_nanogpt.generation_commands(case, (Path("theirs"), Path("ours")), 2000)
    theirs, ours = commands["nanogpt"], commands["ours"]
    assert "--out_dir=theirs" in theirs
    assert "--out_dir=ours" in ours
    assert f"--compile={case.nanogpt_compile}" in theirs
    assert f"--compile={case.our_compile}" in ours
    assert "--dtype=float32" in theirs
    assert f"--precision={case.our_precision}" in ours
    assert "--max_new_tokens=2000" in theirs
    assert "--max_new_tokens=2000" in ours
    parser = build_parser("", [(SampleConfig, ["precision"]), (TrainConfig, ["compile"])])
    options = [a for a in ours if a.startswith(("--compile", "--precision"))]
    (sampling, training), _ = parse_configs(parser, [SampleConfig, TrainConfig], options)
    assert training.compile is case.our_compile
    assert sampling.precision == case.our_precision
