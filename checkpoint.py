"""Saving and loading checkpoints, in one place for training, generation and the web demo.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(..., weights_only=True)`, which never runs code hidden in a file:

    format_version, model_config, data_config, train_config   (dataclasses as dicts)
    tokenizer        {"kind": "char", "chars": ...} or {"kind": "bpe", "encoding": "gpt2", ...}
    model            the raw model's state_dict (never a torch.compile wrapper's)
    optimizer, step, best_val_loss, tokens_seen, rng, torch_version
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import torch

from data_handling import Tokenizer, tokenizer_from_dict, write_atomically
from hyperparameters import ModelConfig, UserFacingError, first_line
from model_architecture import GPT

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model_config", "tokenizer", "model")
HOW_TO_TRAIN = "train one with `python train_model.py`"
# Settings added after format version 1 was fixed: a checkpoint without them was made the way
# these values say, whatever today's defaults are.
MODEL_SETTINGS_BEFORE_THEY_EXISTED = {"position": "learned"}
TRAIN_SETTINGS_BEFORE_THEY_EXISTED = {"optimizer": "adamw"}


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically: a crash mid-save leaves the previous file intact, never half a file."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    try:
        write_atomically(path, buffer.getvalue())
    except OSError as err:
        reason = err.strerror or str(err)
        raise OSError(f"could not save {path} ({reason}); the previous file is intact") from err


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely, turning every way it can be wrong into a one-line error."""
    if not path.exists():
        raise UserFacingError(f"checkpoint {path} not found; {HOW_TO_TRAIN}")
    if path.is_dir():
        raise UserFacingError(f"checkpoint {path} is a directory, not a file")
    if path.stat().st_size == 0:
        raise UserFacingError(f"checkpoint {path} is empty (0 bytes); {HOW_TO_TRAIN}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file can fail inside the unpickler in many ways
        # weights_only refuses any object it does not know, so a malicious file lands here too.
        reason = first_line(err)
        raise UserFacingError(f"{path} is not a readable checkpoint ({reason:.120})") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        raise UserFacingError(f"{path} is not a checkpoint of this project")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise UserFacingError(
            f"checkpoint {path} has format version {checkpoint['format_version']}; "
            f"this version of the project reads version {FORMAT_VERSION}"
        )
    return checkpoint


def saved_model_config(checkpoint: dict[str, Any]) -> ModelConfig:
    """The model settings a checkpoint was trained with."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = {**MODEL_SETTINGS_BEFORE_THEY_EXISTED, **checkpoint["model_config"]}
    try:
        return ModelConfig(**{k: v for k, v in saved.items() if k in known})
    except (TypeError, ValueError) as err:
        raise UserFacingError(f"checkpoint holds an invalid model config ({err})") from None


def model_from_checkpoint(
    checkpoint: dict[str, Any], device: torch.device, precision: str = "float32"
) -> tuple[GPT, Tokenizer]:
    """Rebuild the model (in eval mode, on `device`) and its tokenizer from a checkpoint alone.

    precision "bfloat16" halves the weights' size: generating a token reads every weight once,
    so that makes generation faster.
    """
    model_config = saved_model_config(checkpoint)
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    if tokenizer.vocab_size != model_config.vocab_size:
        raise UserFacingError(
            f"checkpoint's tokenizer has {tokenizer.vocab_size} tokens but its model expects "
            f"{model_config.vocab_size}"
        )
    model = GPT(model_config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        # PyTorch lists every mismatch on its own line after a heading; show the first one.
        details = str(err).strip().splitlines()
        first = details[1].strip() if len(details) > 1 else details[0]
        raise UserFacingError(f"checkpoint's weights do not fit its model ({first:.160})") from None
    return model.to(device, getattr(torch, precision)).eval(), tokenizer
