"""Checkpoints: safe round trip, no compile-wrapper keys, atomic writes, friendly errors.

Run alone: python -m pytest tests/test_checkpoint.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import data_handling
from checkpoint import (
    MODEL_SETTINGS_BEFORE_THEY_EXISTED,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    saved_model_config,
)
from conftest import tiny_train_argv
from hyperparameters import UserFacingError
from train_model import build_run, make_checkpoint


@pytest.fixture
def run(tmp_path, tiny_corpus):
    run, _, _, _ = build_run(tiny_train_argv(tmp_path / "out", tiny_corpus, dropout=0.1))
    return run


@pytest.fixture
def saved(run, tmp_path) -> Path:
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, make_checkpoint(run, step=3, best_val_loss=2.5))
    return path


def test_round_trip_gives_bit_identical_logits(run, saved):
    checkpoint = load_checkpoint(saved)  # uses weights_only=True
    model, tokenizer = model_from_checkpoint(checkpoint, torch.device("cpu"))
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16))
    run.model.eval()
    torch.testing.assert_close(model(idx)[0], run.model(idx)[0], atol=0, rtol=0)
    assert checkpoint["step"] == 3
    assert checkpoint["best_val_loss"] == 2.5
    assert tokenizer.to_dict() == run.tokenizer.to_dict()


def test_checkpoint_loads_with_weights_only_directly(saved):
    checkpoint = torch.load(saved, weights_only=True)
    assert checkpoint["format_version"] == 1
    assert set(checkpoint["rng"]) >= {"torch", "batches"}
    assert checkpoint["tokenizer"]["kind"] == "char"


def test_checkpoint_of_a_compiled_model_loads_uncompiled(run, tmp_path):
    run.compiled = torch.compile(run.model)
    assert any(k.startswith("_orig_mod.") for k in run.compiled.state_dict())
    path = tmp_path / "compiled.pth"
    save_checkpoint(path, make_checkpoint(run, step=1, best_val_loss=math.inf))
    checkpoint = load_checkpoint(path)
    assert not any(k.startswith("_orig_mod.") for k in checkpoint["model"])
    model_from_checkpoint(checkpoint, torch.device("cpu"))


def test_failed_save_keeps_the_previous_file(saved, run, monkeypatch):
    before = saved.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_handling.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(saved, make_checkpoint(run, step=9, best_val_loss=1.0))
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir() if p.is_file()) == [
        "ckpt.pth",
        "corpus.txt",
    ]


class Marker:
    """Unpickling this would create a file: a stand-in for a malicious checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def write_file(path: Path, kind: str, saved: Path) -> None:
    if kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "future version":
        checkpoint = torch.load(saved, weights_only=True)
        torch.save({**checkpoint, "format_version": 99}, path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("zero bytes", "is empty"),
        ("truncated", "not a readable checkpoint"),
        ("text", "not a readable checkpoint"),
        ("list", "not a checkpoint of this project"),
        ("future version", "format version 99"),
    ],
)
def test_broken_files_give_one_line_errors(tmp_path, saved, kind, message):
    path = tmp_path / "broken.pth"
    write_file(path, kind, saved)
    with pytest.raises(UserFacingError, match=message) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(UserFacingError, match=r"python train_model\.py"):
        load_checkpoint(tmp_path / "nope.pth")


def test_pickle_with_code_is_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"format_version": 1, "payload": Marker(str(marker))}, path)
    with pytest.raises(UserFacingError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_vocabulary_mismatch_is_refused(saved):
    checkpoint = load_checkpoint(saved)
    checkpoint["tokenizer"] = {"kind": "char", "chars": "abc"}
    with pytest.raises(UserFacingError, match="tokenizer has 3 tokens"):
        model_from_checkpoint(checkpoint, torch.device("cpu"))


def test_weights_of_other_dimensions_are_refused(saved):
    checkpoint = load_checkpoint(saved)
    checkpoint["model_config"] = {**checkpoint["model_config"], "n_embd": 64}
    with pytest.raises(UserFacingError, match="do not fit"):
        model_from_checkpoint(checkpoint, torch.device("cpu"))


def test_no_temporary_files_are_left_after_saving(saved):
    assert not [p for p in saved.parent.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_from_before_rotary_positions_loads_as_it_was_built(tmp_path, tiny_corpus):
    argv = tiny_train_argv(tmp_path / "out", tiny_corpus, position="learned")
    run, _, _, _ = build_run(argv)
    checkpoint = make_checkpoint(run, step=0, best_val_loss=math.inf)
    for name in MODEL_SETTINGS_BEFORE_THEY_EXISTED:
        del checkpoint["model_config"][name]  # what an older checkpoint holds
    assert saved_model_config(checkpoint).position == "learned"
    model, _ = model_from_checkpoint(checkpoint, torch.device("cpu"))
    assert model.position_embedding is not None


OPTIONS = [{"position": "rope"}, {"position": "learned"}]


@pytest.mark.parametrize("options", OPTIONS)
def test_architecture_options_travel_in_the_checkpoint(tmp_path, tiny_corpus, options):
    run, _, _, _ = build_run(tiny_train_argv(tmp_path / "out", tiny_corpus, **options))
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, make_checkpoint(run, step=0, best_val_loss=math.inf))
    model, _ = model_from_checkpoint(load_checkpoint(path), torch.device("cpu"))
    for name, value in options.items():
        assert getattr(model.config, name) == value
    idx = torch.randint(0, model.config.vocab_size, (1, 16))
    run.model.eval()
    torch.testing.assert_close(model(idx)[0], run.model(idx)[0], atol=0, rtol=0)
