"""What runs leave for people: run folders, TensorBoard logs, and runs side by side.

The TensorBoard logs are read back with TensorBoard's own reader (EventAccumulator), which
also applies the purge a resumed run asks for.
Run alone: python -m pytest tests/test_training_log.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_model
from conftest import tiny_train_argv
from support.run_folder import (
    LATEST,
    RunFolder,
    latest_run,
    mark_latest,
    new_run_folder,
    runs_under,
)
from support.training_log import (
    BEST_VAL_TAG,
    first_reached,
    nats_per_char,
    read_history,
    runs_figure,
    runs_table,
)
from tools import compare_runs

STEP_TAGS = {"step/loss", "step/learning_rate", "step/grad_norm", "step/tokens_per_s"}
EVAL_TAGS = {
    "eval/train_loss",
    "eval/val_loss",
    "eval/train_nats_per_char",
    "eval/val_nats_per_char",
    "eval/train_bits_per_char",
    "eval/val_bits_per_char",
    BEST_VAL_TAG,
}


def board(out_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(out_dir))
    accumulator.Reload()
    return accumulator


def steps(accumulator: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


def test_tensorboard_log_holds_every_figure_at_its_steps(tmp_path, tiny_corpus):
    out_dir = tmp_path / "out"
    argv = tiny_train_argv(out_dir, tiny_corpus, max_iters=20, eval_interval=10, log_interval=5)
    assert train_model.main(argv) == 0
    accumulator = board(out_dir)
    assert set(accumulator.Tags()["scalars"]) == STEP_TAGS | EVAL_TAGS
    assert steps(accumulator, "step/loss") == [5, 10, 15, 20]
    assert steps(accumulator, "eval/val_loss") == [0, 10, 20]
    # The same numbers as metrics.jsonl, per token and per character.
    rows = read_history(out_dir / "metrics.jsonl")
    logged = [event.value for event in accumulator.Scalars("eval/val_nats_per_char")]
    assert logged == pytest.approx([nats_per_char(row["val_bpc"]) for row in rows], rel=1e-6)
    best = accumulator.Scalars(BEST_VAL_TAG)[-1].value
    assert best == pytest.approx(min(logged), rel=1e-6)
    assert all(event.value > 0 for event in accumulator.Scalars("step/grad_norm"))
    samples = accumulator.Tensors("sample/text_summary")
    assert [event.step for event in samples] == [0, 10, 20]
    assert len(samples[-1].tensor_proto.string_val[0]) > 100  # 200 generated characters


def test_tensorboard_log_holds_the_settings_as_hyperparameters(tmp_path, tiny_corpus):
    out_dir = tmp_path / "out"
    assert train_model.main(tiny_train_argv(out_dir, tiny_corpus, max_iters=2)) == 0
    accumulator = board(out_dir)
    plugin = accumulator.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(plugin)
    assert b"model/n_layer" in plugin["_hparams_/session_start_info"]
    assert BEST_VAL_TAG.encode() in plugin["_hparams_/experiment"]


def test_resumed_run_appends_to_its_log_without_repeating_steps(tmp_path, tiny_corpus, monkeypatch):
    out_dir = tmp_path / "out"
    options = {"max_iters": 20, "eval_interval": 5, "log_interval": 2}
    real_step = train_model.train_step

    def crash_at_step_nine(run, state):
        if state.step == 9:  # logged up to step 8, but the last checkpoint is step 5's
            raise RuntimeError("the machine went down")
        return real_step(run, state)

    with monkeypatch.context() as patch:
        patch.setattr(train_model, "train_step", crash_at_step_nine)
        with pytest.raises(RuntimeError, match="went down"):
            train_model.main(tiny_train_argv(out_dir, tiny_corpus, **options))
    assert steps(board(out_dir), "step/loss") == [2, 4, 6, 8]
    assert train_model.main([f"--out_dir={out_dir}", f"--data={tiny_corpus}", "--resume"]) == 0
    accumulator = board(out_dir)
    # Steps 6 and 8 of the lost session are dropped and logged again by the resumed one.
    assert steps(accumulator, "step/loss") == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert steps(accumulator, "eval/val_loss") == [0, 5, 10, 15, 20]


def test_no_run_folder_is_chosen_twice_and_latest_names_the_newest(tmp_path):
    first = new_run_folder(tmp_path)
    second = new_run_folder(tmp_path)  # the same second: the name is taken, a suffix follows
    assert second != first
    assert first.path.is_dir()
    assert second.path.is_dir()
    assert second.path.parent == tmp_path
    assert latest_run(tmp_path) == RunFolder(tmp_path)  # nothing marked, no run logged yet
    mark_latest(first, tmp_path)
    assert latest_run(tmp_path) == first
    (tmp_path / LATEST).write_text("../../etc\n")  # a name that leaves the folder is ignored
    assert latest_run(tmp_path) == RunFolder(tmp_path)


def test_latest_falls_back_to_the_newest_run_when_its_folder_is_gone(tmp_path, tiny_corpus):
    for name in ("run-20260101-000000", "run-20260102-000000"):
        assert train_model.main(tiny_train_argv(tmp_path / name, tiny_corpus, max_iters=2)) == 0
    (tmp_path / LATEST).write_text("run-20990101-000000\n")  # deleted since
    assert latest_run(tmp_path) == RunFolder(tmp_path / "run-20260102-000000")


@pytest.mark.parametrize("name", ["..", ".", "x" * 300, "../elsewhere", "/tmp", "a\0b"])
def test_a_latest_txt_naming_no_folder_inside_is_ignored_with_a_warning(tmp_path, capsys, name):
    (tmp_path / "run-20260101-000000").mkdir()
    (tmp_path / "run-20260101-000000" / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / LATEST).write_text(name + "\n")
    assert latest_run(tmp_path) == RunFolder(tmp_path / "run-20260101-000000")
    assert capsys.readouterr().err.startswith(f"warning: ignored {tmp_path / LATEST}")


def two_runs(tmp_path, tiny_corpus):
    for name, rate in (("fast", 1e-2), ("slow", 1e-3)):
        argv = tiny_train_argv(tmp_path / "runs" / name, tiny_corpus, learning_rate=rate)
        assert train_model.main(argv) == 0
    return runs_under(tmp_path / "runs")


def test_runs_table_names_the_setting_that_differs(tmp_path, tiny_corpus):
    runs = two_runs(tmp_path, tiny_corpus)
    assert [folder.path.name for folder in runs] == ["fast", "slow"]
    lines = runs_table(runs).splitlines()
    header = lines[0].split()
    assert header[:2] == ["run", "train/learning_rate"]  # the only setting that differs
    assert "train/max_iters" not in header
    assert lines[1].split()[:3] == ["fast", "0.01", "20"]
    assert lines[2].split()[:3] == ["slow", "0.001", "20"]


def test_compare_runs_prints_the_table_and_draws_every_curve(tmp_path, tiny_corpus, capsys):
    runs = two_runs(tmp_path, tiny_corpus)
    png = tmp_path / "runs.png"
    paths = [str(folder.path) for folder in runs]
    assert compare_runs.main([*paths, f"--png={png}"]) == 0
    assert "train/learning_rate" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = runs_figure({f.path.name: read_history(f.metrics) for f in runs})
    for ax in figure.axes:  # by step and by time: one line per run in each
        assert [line.get_label() for line in ax.get_lines()] == ["fast", "slow"]


def test_compare_runs_skips_a_run_without_evaluations_and_shows_the_others(
    tmp_path, tiny_corpus, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert train_model.main(tiny_train_argv(tmp_path / "out" / "good", tiny_corpus)) == 0
    (tmp_path / "out" / "broken").mkdir()
    (tmp_path / "out" / "broken" / "metrics.jsonl").write_text("", encoding="utf-8")
    capsys.readouterr()
    assert compare_runs.main([]) == 0
    out, err = capsys.readouterr()
    assert "good" in out
    assert err.strip().splitlines() == [
        f"compare_runs.py: skipped {Path('out/broken')}: no evaluations in its log"
    ]


def test_compare_runs_without_runs_is_a_one_line_error(tmp_path, capsys):
    assert compare_runs.main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "holds no training log" in err
    assert len(err.strip().splitlines()) == 1


def test_first_reached_finds_the_first_evaluation_at_the_mark():
    history = [
        {"step": step, "val_bpc": bpc / nats_per_char(1.0), "elapsed_s": step}
        for step, bpc in ((0, 4.0), (10, 1.9), (20, 1.7), (30, 1.75))
    ]
    assert first_reached(history, 2.0)["step"] == 10
    assert first_reached(history, 1.8)["step"] == 20
    assert first_reached(history, 1.5) is None


def test_settings_are_recorded_for_people_and_for_comparison(tmp_path, tiny_corpus):
    out_dir = tmp_path / "out"
    assert train_model.main(tiny_train_argv(out_dir, tiny_corpus, max_iters=2)) == 0
    settings = json.loads((out_dir / "config.json").read_text())
    assert RunFolder(out_dir).read_settings() == settings
    assert settings["train"]["out_dir"] == str(out_dir)


def test_rows_with_numbers_that_are_not_finite_are_skipped(tmp_path, capsys):
    from support.training_log import read_history

    good = {"step": 0, "train_loss": 4.0, "val_loss": 4.1, "train_bpc": 5.8, "val_bpc": 5.9}
    good["elapsed_s"] = 1.0
    lines = [
        good,
        {**good, "step": 10, "val_bpc": math.nan},
        {**good, "step": 20, "elapsed_s": 1e999},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))
    assert [row["step"] for row in read_history(path)] == [0]
    assert "skipped 2 damaged line(s)" in capsys.readouterr().err
