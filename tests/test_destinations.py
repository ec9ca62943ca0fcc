"""Commands replace only what they made: export folders, figures, the benchmark's figures file.

Each refusal is one line with exit status 2, and every file that was there keeps its bytes.
Run alone: python -m pytest tests/test_destinations.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import train_model
from conftest import tiny_train_argv
from tools import bench, compare_runs, export_model


@pytest.fixture
def workdir(tmp_path, tiny_corpus, monkeypatch):
    """A folder holding a corpus, a note of the user's and a finished 2-step run under out/."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    assert (
        train_model.main(tiny_train_argv(tmp_path / "out" / "run", tiny_corpus, max_iters=2)) == 0
    )
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refused(status: int, capsys, words: str) -> str:
    """The one line of a refusal, which says words."""
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert words in err
    assert len(err.splitlines()) == 1
    return err


@pytest.mark.parametrize(
    ("to", "words"),
    [
        (".", "is the current folder or holds it"),
        ("..", "is the current folder or holds it"),
        ("out", "holds a training run"),
        ("out/run", "holds a training run"),
    ],
)
def test_an_export_never_replaces_the_current_folder_or_a_run(workdir, capsys, to, words):
    before = snapshot(workdir)
    status = export_model.main(["--out_dir=out/run", f"--to={to}", "--overwrite"])
    refused(status, capsys, words)
    assert snapshot(workdir) == before


def test_an_export_replaces_an_earlier_export_only_when_asked(workdir, capsys):
    assert export_model.main(["--out_dir=out/run", "--to=exported"]) == 0
    assert (workdir / "exported" / export_model.EXPORT_MARK).is_file()
    capsys.readouterr()
    refused(export_model.main(["--out_dir=out/run", "--to=exported"]), capsys, "--overwrite")
    assert export_model.main(["--out_dir=out/run", "--to=exported", "--overwrite"]) == 0


def test_an_export_refuses_a_folder_holding_other_files(workdir, capsys):
    assert export_model.main(["--out_dir=out/run", "--to=exported"]) == 0
    (workdir / "exported" / "README.md").write_text("a model card of mine", encoding="utf-8")
    other = workdir / "someone_elses"
    other.mkdir()
    (other / "config.json").write_text("{}", encoding="utf-8")  # the right name, not our export
    before = snapshot(workdir)
    for to in ("exported", "someone_elses"):
        status = export_model.main(["--out_dir=out/run", f"--to={to}", "--overwrite"])
        refused(status, capsys, "holds files export_model.py did not write")
    assert snapshot(workdir) == before


@pytest.mark.parametrize(("name", "words"), [("notes.txt", "ends in .png"), ("x.png", "not a PNG")])
def test_a_figure_replaces_only_a_figure(workdir, capsys, name, words):
    (workdir / "x.png").write_text("not a picture", encoding="utf-8")
    before = snapshot(workdir)
    refused(compare_runs.main(["out/run", f"--png={name}"]), capsys, words)
    assert snapshot(workdir) == before
    assert compare_runs.main(["out/run", "--png=curves.png"]) == 0  # new: drawn
    assert compare_runs.main(["out/run", "--png=curves.png"]) == 0  # a figure: redrawn


def test_the_benchmark_adds_its_figures_to_earlier_ones(workdir):
    figures = workdir / "bench.json"
    figures.write_text(json.dumps({"threads": 2, "torch": "x", "roof": {"gflops": 1.0}}))
    assert bench.main(["--only", "--metrics", "out/run", f"--json={figures}"]) == 0
    merged = json.loads(figures.read_text())
    assert merged["roof"] == {"gflops": 1.0}  # an earlier measurement stays
    assert "quality" in merged


def test_the_benchmark_refuses_a_file_it_did_not_write(workdir, capsys):
    before = snapshot(workdir)
    status = bench.main(["--only", "--metrics", "out/run", "--json=notes.txt"])
    refused(status, capsys, "holds no figures of bench.py")
    assert snapshot(workdir) == before


def test_resume_and_overwrite_together_are_refused(workdir, tiny_corpus, capsys):
    before = snapshot(workdir)
    argv = tiny_train_argv(workdir / "out" / "run", tiny_corpus, max_iters=4)
    refused(train_model.main([*argv, "--resume", "--overwrite"]), capsys, "give one")
    assert snapshot(workdir) == before


def hf_folder(folder: Path) -> None:
    """A Hugging Face model folder, as another tool writes one."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "gpt2"}', encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"weights")


def test_training_refuses_a_folder_holding_files_it_did_not_write(workdir, tiny_corpus, capsys):
    hf_folder(workdir / "hf_model")
    assert export_model.main(["--out_dir=out/run"]) == 0  # out/run/hf
    (workdir / "mine").mkdir()
    (workdir / "mine" / "draft.txt").write_text("my own words", encoding="utf-8")
    train_model.main(tiny_train_argv(workdir / "run_with_a_note", tiny_corpus, max_iters=2))
    (workdir / "run_with_a_note" / "notes.md").write_text("why this run", encoding="utf-8")
    capsys.readouterr()
    before = snapshot(workdir)
    for out_dir in ["hf_model", "out/run/hf", "out", ".", "mine", "run_with_a_note"]:
        for overwrite in ([], ["--overwrite"]):
            argv = tiny_train_argv(workdir / out_dir, tiny_corpus, max_iters=2)
            status = train_model.main([*argv, *overwrite])
            refused(status, capsys, "holds files that are not a training run's")
    assert snapshot(workdir) == before


def test_overwrite_replaces_a_run_but_keeps_its_export(workdir, tiny_corpus, capsys):
    assert export_model.main(["--out_dir=out/run"]) == 0
    export = snapshot(workdir / "out" / "run" / "hf")
    old_settings = json.loads((workdir / "out" / "run" / "config.json").read_text())
    argv = tiny_train_argv(workdir / "out" / "run", tiny_corpus, max_iters=3)
    assert train_model.main([*argv, "--overwrite"]) == 0
    assert snapshot(workdir / "out" / "run" / "hf") == export
    new_settings = json.loads((workdir / "out" / "run" / "config.json").read_text())
    assert new_settings["made_by"] == "mini-gpt train_model.py"
    assert new_settings["run_id"] != old_settings["run_id"]


@pytest.mark.parametrize(
    ("other_options", "words"),
    [({"n_embd": 16}, "differ in: n_embd)"), ({}, "differ in: run identity")],
)
def test_resume_refuses_another_runs_checkpoint(workdir, tiny_corpus, capsys, other_options, words):
    other = workdir / "out" / "other"
    assert train_model.main(tiny_train_argv(other, tiny_corpus, max_iters=2, **other_options)) == 0
    run = workdir / "out" / "run"
    (run / "ckpt_last.pth").write_bytes((other / "ckpt_last.pth").read_bytes())  # by hand
    capsys.readouterr()
    before = snapshot(workdir)
    argv = tiny_train_argv(run, tiny_corpus, max_iters=4)
    refusal = refused(
        train_model.main([*argv, "--resume"]), capsys, "is not the checkpoint of the run"
    )
    assert words in refusal
    assert snapshot(workdir) == before


def test_a_run_from_before_the_mark_still_resumes(workdir, tiny_corpus):
    settings_file = workdir / "out" / "run" / "config.json"
    settings = json.loads(settings_file.read_text())
    for key in ("made_by", "run_id"):
        del settings[key]
    settings_file.write_text(json.dumps(settings))
    argv = tiny_train_argv(workdir / "out" / "run", tiny_corpus, max_iters=4)
    assert train_model.main([*argv, "--resume"]) == 0
    assert json.loads(settings_file.read_text())["made_by"] == "mini-gpt train_model.py"
