"""Checkpoints: safe round trip, no compile-wrapper keys, atomic writes, friendly errors.

Run alone: python -m pytest tests/test_checkpoint.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import SMALL_TEXT
from hyperparameters import DataConfig, ModelConfig, RunSettings, TrainConfig
from model_architecture import GPT
from optimization import make_optimizer
from support import common
from support.checkpoint import (
    RunDescription,
    TrainingState,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    restore_training_state,
    save_checkpoint,
    saved_model_config,
    saved_settings,
    saved_tokenizer,
)
from support.common import UserFacingError
from support.fast_paths import AllCoresLinear, Int8Linear, for_inference
from support.older_checkpoints import MODEL_SETTINGS_BEFORE_THEY_EXISTED, bring_up_to_date
from tokenization import BPETokenizer, CharTokenizer

CPU = torch.device("cpu")


class Parts:
    """What a checkpoint is made from, built directly: no command line, no corpus on disk."""

    def __init__(self, **model_options):
        self.tokenizer = CharTokenizer.from_text(SMALL_TEXT)
        model_config = ModelConfig(
            n_layer=2,
            n_head=2,
            n_embd=32,
            block_size=16,
            dropout=0.1,
            vocab_size=self.tokenizer.vocab_size,
            **model_options,
        )
        settings = RunSettings(model_config, DataConfig(data="corpus.txt"), TrainConfig())
        self.model = GPT(model_config)
        self.optimizer = make_optimizer(self.model, settings.train, CPU)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.description = RunDescription(settings, self.tokenizer, {"train": 1.0, "val": 1.0})

    def checkpoint(self, step=0, best_val_loss=math.inf, seed=0):
        state = TrainingState(torch.Generator().manual_seed(seed), step, best_val_loss)
        return make_checkpoint(self.model, self.optimizer, self.scaler, self.description, state)


@pytest.fixture
def parts():
    return Parts()


@pytest.fixture
def saved(parts, tmp_path) -> Path:
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, parts.checkpoint(step=3, best_val_loss=2.5))
    return path


def test_round_trip_gives_bit_identical_logits(parts, saved):
    checkpoint = load_checkpoint(saved)  # uses weights_only=True
    model, tokenizer = model_from_checkpoint(checkpoint, CPU)
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16))
    parts.model.eval()
    torch.testing.assert_close(model(idx)[0], parts.model(idx)[0], atol=0, rtol=0)
    assert checkpoint["step"] == 3
    assert checkpoint["best_val_loss"] == 2.5
    assert tokenizer.to_dict() == parts.tokenizer.to_dict()
    assert saved_settings(checkpoint) == parts.description.settings


def test_a_checkpoint_loads_as_trained_and_for_inference_prepares_it(saved):
    def block_layer_types(model) -> set[type]:
        return {type(m) for m in model.blocks.modules() if hasattr(m, "weight")} - {nn.LayerNorm}

    trained, _ = model_from_checkpoint(load_checkpoint(saved), CPU)  # to train on or export
    assert block_layer_types(trained) == {nn.Linear}
    generating = for_inference(model_from_checkpoint(load_checkpoint(saved), CPU)[0], "float32")
    assert block_layer_types(generating) == {AllCoresLinear}
    int8 = for_inference(model_from_checkpoint(load_checkpoint(saved), CPU)[0], "int8")
    assert block_layer_types(int8) == {Int8Linear}


def test_restored_state_continues_the_saved_streams(parts, saved):
    saved_generator = torch.Generator().manual_seed(0)  # the state Parts saved
    expected_draw = torch.randint(0, 1000, (5,), generator=saved_generator)
    generator = torch.Generator().manual_seed(123)  # a fresh run's, about to be overwritten
    state = restore_training_state(
        load_checkpoint(saved),
        parts.optimizer,
        parts.scaler,
        generator,
        history=[{"step": 0, "elapsed_s": 7.0}],
        restore_random_streams=True,
    )
    assert (state.step, state.best_val_loss) == (3, 2.5)
    assert state.history == [{"step": 0, "elapsed_s": 7.0}]
    assert state.batch_generator is generator
    assert torch.equal(torch.randint(0, 1000, (5,), generator=generator), expected_draw)


def test_checkpoint_loads_with_weights_only_directly(saved):
    checkpoint = torch.load(saved, weights_only=True)
    assert checkpoint["format_version"] == 1
    assert set(checkpoint["rng"]) >= {"torch", "batches"}
    assert checkpoint["tokenizer"]["kind"] == "char"


def test_checkpoint_of_a_compiled_model_loads_uncompiled(parts, tmp_path):
    compiled = torch.compile(parts.model)
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    path = tmp_path / "compiled.pth"
    save_checkpoint(path, parts.checkpoint(step=1))
    checkpoint = load_checkpoint(path)
    assert not any(k.startswith("_orig_mod.") for k in checkpoint["model"])
    model_from_checkpoint(checkpoint, CPU)


def test_failed_save_keeps_the_previous_file(saved, parts, monkeypatch):
    before = saved.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(saved, parts.checkpoint(step=9, best_val_loss=1.0))
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir() if p.is_file()) == ["ckpt.pth"]


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
    with pytest.raises(UserFacingError, match=r"refused: loading it would run code \(it calls"):
        load_checkpoint(path)
    assert not marker.exists()


def test_vocabulary_mismatch_is_refused(saved):
    checkpoint = load_checkpoint(saved)
    checkpoint["tokenizer"] = {"kind": "char", "chars": "abc"}
    with pytest.raises(UserFacingError, match="tokenizer has 3 tokens"):
        model_from_checkpoint(checkpoint, CPU)


def test_weights_of_other_dimensions_are_refused(saved):
    checkpoint = load_checkpoint(saved)
    checkpoint["model_config"] = {**checkpoint["model_config"], "n_embd": 64}
    with pytest.raises(UserFacingError, match="do not fit"):
        model_from_checkpoint(checkpoint, CPU)


def test_no_temporary_files_are_left_after_saving(saved):
    assert not [p for p in saved.parent.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_from_before_rotary_positions_loads_as_it_was_built():
    checkpoint = Parts(position="learned").checkpoint()
    for name in MODEL_SETTINGS_BEFORE_THEY_EXISTED:
        del checkpoint["model_config"][name]  # what an older checkpoint holds
    bring_up_to_date(checkpoint)
    assert saved_model_config(checkpoint).position == "learned"
    model, _ = model_from_checkpoint(checkpoint, CPU)
    assert model.position_embedding is not None


def test_older_training_settings_are_brought_up_to_date_in_one_place():
    checkpoint = Parts().checkpoint()
    train = checkpoint["train_config"]
    del train["optimizer"]  # checkpoints from before Muon trained with AdamW
    del train["min_lr_fraction"]
    train["min_lr"] = train["learning_rate"] / 4  # the schedule's floor, as older runs saved it
    settings = saved_settings(bring_up_to_date(checkpoint))
    assert settings.train.optimizer == "adamw"
    assert settings.train.min_lr_fraction == pytest.approx(0.25)


def test_bpe_checkpoints_from_before_fitted_vocabularies_load_with_all_of_gpt2():
    checkpoint = Parts().checkpoint()
    checkpoint["tokenizer"] = BPETokenizer().to_dict()  # GPT-2, with no "gpt2_ids"
    del checkpoint["data_config"]["bpe_vocabulary"]  # what an older checkpoint holds
    assert saved_settings(bring_up_to_date(checkpoint)).data.bpe_vocabulary == "full"
    assert saved_tokenizer(checkpoint).vocab_size == 50257


OPTIONS = [{"position": "rope"}, {"position": "learned"}]


@pytest.mark.parametrize("options", OPTIONS)
def test_architecture_options_travel_in_the_checkpoint(tmp_path, options):
    parts = Parts(**options)
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, parts.checkpoint())
    model, _ = model_from_checkpoint(load_checkpoint(path), CPU)
    for name, value in options.items():
        assert getattr(model.config, name) == value
    idx = torch.randint(0, model.config.vocab_size, (1, 16))
    parts.model.eval()
    torch.testing.assert_close(model(idx)[0], parts.model(idx)[0], atol=0, rtol=0)


def test_loading_brings_an_older_checkpoint_up_to_date(tmp_path):
    checkpoint = Parts().checkpoint()
    del checkpoint["train_config"]["optimizer"]
    del checkpoint["tokens_seen"]  # older versions did not count tokens
    save_checkpoint(tmp_path / "old.pth", checkpoint)
    loaded = load_checkpoint(tmp_path / "old.pth")
    assert loaded["train_config"]["optimizer"] == "adamw"
    assert loaded["tokens_seen"] == 0
