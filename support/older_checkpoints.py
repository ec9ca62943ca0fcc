"""Checkpoints written by earlier versions of the project, brought up to today's form.

Format version 1 grew new settings over time. A checkpoint saved before a setting existed was
made the way the values below say, whatever today's defaults are; `bring_up_to_date` fills
them in as the file is loaded, so the rest of the project reads one form of settings and
progress.
"""

from __future__ import annotations

from typing import Any

MODEL_SETTINGS_BEFORE_THEY_EXISTED = {"position": "learned"}
TRAIN_SETTINGS_BEFORE_THEY_EXISTED = {"optimizer": "adamw"}
DATA_SETTINGS_BEFORE_THEY_EXISTED = {
    "bpe_vocabulary": "full",
    "bpe_min_count": 1,
    "bpe_spell_fraction": 0.0,
}
PROGRESS_BEFORE_IT_WAS_SAVED = {"tokens_seen": 0, "corpus_sha256": "", "run_id": ""}


def bring_up_to_date(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint, in place, with what older versions did not save filled in.

    Settings that are not dicts are left alone: reading them reports the damage.
    """
    tables = (
        ("model_config", MODEL_SETTINGS_BEFORE_THEY_EXISTED),
        ("train_config", TRAIN_SETTINGS_BEFORE_THEY_EXISTED),
        ("data_config", DATA_SETTINGS_BEFORE_THEY_EXISTED),
    )
    for key, before in tables:
        if isinstance(checkpoint.get(key), dict):
            checkpoint[key] = {**before, **checkpoint[key]}
    train = checkpoint.get("train_config")
    if isinstance(train, dict) and "min_lr" in train:
        # Older runs saved the schedule's floor itself, not its share of the learning rate.
        floor, peak = train.pop("min_lr"), train.get("learning_rate")
        valid = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (floor, peak))
        train["min_lr_fraction"] = floor / peak if valid and peak else None
    checkpoint.setdefault("train_config", {})  # the first checkpoints saved no training settings
    for key, value in PROGRESS_BEFORE_IT_WAS_SAVED.items():
        checkpoint.setdefault(key, value)
    return checkpoint
