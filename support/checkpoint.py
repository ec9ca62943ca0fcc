"""The checkpoint format, in one place: making, saving, loading and restoring checkpoints.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(..., weights_only=True)`, which never runs code hidden in a file:

    format_version   FORMAT_VERSION
    model_config, data_config, train_config   the run's settings (dataclasses as dicts)
    tokenizer        {"kind": "char", "chars": ...} or {"kind": "bpe", "encoding": "gpt2", ...}
    model            the raw model's state_dict (never a torch.compile or DDP wrapper's), or
                     with --weight_average, its moving average's: what generation loads
    training_weights, averaged_steps   with --weight_average only: the weights training goes
                     on from, and how many steps the average has taken in
    optimizer, scaler               their state_dicts, to resume exactly
    step, best_val_loss, tokens_seen, elapsed_s   the run's progress
    tokens_per_char  {"train": ..., "val": ...}: turns a loss per token into one per character
    corpus_sha256    the text trained on, so that --resume cannot switch corpora unnoticed
    rng              the random streams: torch's (dropout), the batches', CUDA's if any
    torch_version    for diagnostics

Checkpoints written by earlier versions of the project lack some settings; load_checkpoint
brings them up to date (support/older_checkpoints.py), so everything here reads one form.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from hyperparameters import DataConfig, ModelConfig, RunSettings, TrainConfig
from model_architecture import GPT
from optimization import Optimizer, model_to_keep
from support.common import UserFacingError, first_line, write_atomically
from support.devices import (
    model_memory,
    note_random_streams,
    put_back_random_streams,
    require_memory,
)
from support.older_checkpoints import bring_up_to_date
from tokenization import Tokenizer, tokenizer_from_dict

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model_config", "tokenizer", "model")
# What --resume needs beyond REQUIRED_KEYS, and the type each must have.
RESUME_KEYS = {
    "data_config": dict,
    "optimizer": dict,
    "scaler": dict,
    "rng": dict,
    "step": int,
    "best_val_loss": float,
}
HOW_TO_TRAIN = "train one with `python train_model.py`"


@dataclasses.dataclass
class TrainingState:
    """Where a training run stands: its progress, its evaluations and its batch stream."""

    batch_generator: torch.Generator  # draws the training batches
    step: int = 0  # optimizer steps done
    best_val_loss: float = math.inf
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # seconds of training and evaluation, over every session of the run
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # metrics.jsonl rows


@dataclasses.dataclass(frozen=True)
class RunDescription:
    """What a checkpoint says about its run besides weights and progress."""

    settings: RunSettings
    tokenizer: Tokenizer
    tokens_per_char: dict[str, float]  # of the corpus' "train" and "val" splits
    corpus_sha256: str = ""  # the text trained on
    run_id: str = ""  # the run's identity, which its folder's config.json records too


# ----------------------------------------------------------------------------------------------
# Writing


def make_checkpoint(
    model: GPT,
    optimizer: Optimizer,
    scaler: torch.amp.GradScaler,
    description: RunDescription,
    state: TrainingState,
    average: AveragedModel | None = None,
) -> dict[str, Any]:
    """A weights_only-safe dict with everything needed to generate from or resume a run.

    With a moving average of the weights, "model" holds the average (what generation uses)
    and "training_weights" the weights that training goes on from.
    """
    rng = note_random_streams(state.batch_generator)
    settings = description.settings
    checkpoint = {
        "format_version": FORMAT_VERSION,
        "model_config": dataclasses.asdict(settings.model),
        "data_config": dataclasses.asdict(settings.data),
        "train_config": dataclasses.asdict(settings.train),
        "tokenizer": description.tokenizer.to_dict(),
        # The raw module (no torch.compile key prefixes), or its average.
        "model": model_to_keep(model, average).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": state.step,
        "best_val_loss": state.best_val_loss,
        "tokens_seen": state.tokens_seen,
        "elapsed_s": state.elapsed_s,
        "tokens_per_char": description.tokens_per_char,
        "corpus_sha256": description.corpus_sha256,
        "run_id": description.run_id,
        "rng": rng,
        "torch_version": str(torch.__version__),  # a plain str: weights_only-safe
    }
    if average is not None:
        checkpoint["training_weights"] = model.state_dict()
        checkpoint["averaged_steps"] = int(average.n_averaged)
    return checkpoint


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically: a crash mid-save leaves the previous file intact, never half a file."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    try:
        write_atomically(path, buffer.getvalue())
    except OSError as err:
        reason = err.strerror or str(err)
        raise OSError(f"could not save {path} ({reason}); the previous file is intact") from err


# ----------------------------------------------------------------------------------------------
# Reading


def _check_archive(path: Path) -> None:
    """Refuse, before unpacking anything, files that torch.save did not write.

    torch.save writes a zip archive of stored (never compressed) entries, so a compressed
    entry means a foreign file, perhaps one that would unpack to far more than its size.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UserFacingError(
            f"{path} is not a readable checkpoint (not the zip archive torch.save writes, or a "
            "damaged one)"
        ) from None
    if any(entry.compress_type != zipfile.ZIP_STORED for entry in entries):
        raise UserFacingError(
            f"{path} is not a checkpoint of this project (its contents are compressed, which "
            "torch.save never does)"
        )


def _refused_global(err: pickle.UnpicklingError) -> str:
    """What the file wanted to run, as weights_only's refusal names it."""
    named = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f"it calls {named.group(1)}" if named else first_line(err)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely, turning every way it can be wrong into a one-line error."""
    if not path.exists():
        raise UserFacingError(f"checkpoint {path} not found; {HOW_TO_TRAIN}")
    if path.is_dir():
        raise UserFacingError(f"checkpoint {path} is a directory, not a file")
    if not path.is_file():  # a device or a pipe: reading could block or never end
        raise UserFacingError(f"checkpoint {path} is not a regular file")
    if path.stat().st_size == 0:
        raise UserFacingError(f"checkpoint {path} is empty (0 bytes); {HOW_TO_TRAIN}")
    _check_archive(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an object it does not know
        reason = _refused_global(err)
        raise UserFacingError(f"{path} is refused: loading it would run code ({reason})") from None
    except Exception as err:  # a damaged file can fail inside the unpickler in many ways
        raise UserFacingError(f"{path} is not a readable checkpoint ({first_line(err)})") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        raise UserFacingError(f"{path} is not a checkpoint of this project")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise UserFacingError(
            f"checkpoint {path} has format version {checkpoint['format_version']!r:.20}; "
            f"this version of the project reads version {FORMAT_VERSION}"
        )
    return bring_up_to_date(checkpoint)


def is_state_dict(weights: object) -> bool:
    """Whether `weights` has a state_dict's form: a dict of tensors."""
    return isinstance(weights, dict) and all(isinstance(t, torch.Tensor) for t in weights.values())


def first_non_finite(weights: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding inf or nan (a diverged run's), or None."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_resumable(checkpoint: dict[str, Any]) -> None:
    """Refuse, in one line, a checkpoint that lacks what --resume needs."""
    problems = [
        name
        for name, kind in RESUME_KEYS.items()
        if not isinstance(checkpoint.get(name), kind) or isinstance(checkpoint.get(name), bool)
    ]
    rng = checkpoint.get("rng")
    if isinstance(rng, dict) and not all(
        isinstance(rng.get(name), torch.Tensor) for name in ("torch", "batches")
    ):
        problems.append("rng")
    if "training_weights" in checkpoint:  # a run that kept a moving average of its weights
        weights = checkpoint["training_weights"]
        if not is_state_dict(weights) or first_non_finite(weights) is not None:
            problems.append("training_weights")
        steps = checkpoint.get("averaged_steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            problems.append("averaged_steps")
    if problems:
        raise UserFacingError(
            f"the checkpoint cannot be resumed: {', '.join(problems)} missing or damaged"
        )


def _known_fields(config_class: type, saved: dict[str, Any]) -> dict[str, Any]:
    """The entries of a saved config that config_class still has (retired ones are dropped)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    return {name: value for name, value in saved.items() if name in known}


def saved_model_config(checkpoint: dict[str, Any]) -> ModelConfig:
    """The model settings a checkpoint was trained with."""
    if not isinstance(checkpoint["model_config"], dict):
        raise UserFacingError("checkpoint holds an invalid model config (not a dict)")
    try:
        return ModelConfig(**_known_fields(ModelConfig, checkpoint["model_config"]))
    except (TypeError, ValueError) as err:
        raise UserFacingError(f"checkpoint holds an invalid model config ({err})") from None


def saved_settings(checkpoint: dict[str, Any]) -> RunSettings:
    """Every setting a checkpoint's run was made with, as this version of the project names them."""
    data, train = checkpoint["data_config"], checkpoint["train_config"]
    if not isinstance(data, dict) or not isinstance(train, dict):
        raise UserFacingError("the saved run's settings are not valid (data_config, train_config)")
    try:
        return RunSettings(
            model=saved_model_config(checkpoint),
            data=DataConfig(**_known_fields(DataConfig, data)),
            train=TrainConfig(**_known_fields(TrainConfig, train)),
        )
    except (KeyError, TypeError, ValueError) as err:  # a damaged or hand-edited checkpoint
        raise UserFacingError(f"the saved run's settings are not valid ({err})") from None


def saved_tokenizer(checkpoint: dict[str, Any]) -> Tokenizer:
    """The tokenizer a checkpoint's model reads and writes."""
    return tokenizer_from_dict(checkpoint["tokenizer"])


def saved_corpus_sha256(checkpoint: dict[str, Any]) -> str:
    """The sha256 of the text a checkpoint's run trained on ("" if older versions did not say)."""
    saved = checkpoint["corpus_sha256"]
    return saved if isinstance(saved, str) else ""


def model_from_checkpoint(
    checkpoint: dict[str, Any], device: torch.device
) -> tuple[GPT, Tokenizer]:
    """Rebuild the model (in eval mode, on `device`) and its tokenizer from a checkpoint alone.

    The model is the readable one, as it trained; generation prepares it with
    support.fast_paths.for_inference.
    """
    model_config = saved_model_config(checkpoint)
    tokenizer = saved_tokenizer(checkpoint)
    if tokenizer.vocab_size != model_config.vocab_size:
        raise UserFacingError(
            f"checkpoint's tokenizer has {tokenizer.vocab_size} tokens but its model expects "
            f"{model_config.vocab_size}"
        )
    require_memory(
        model_memory(model_config), device, "the checkpoint's model", "use a smaller model"
    )
    model = GPT(model_config)
    load_saved_weights(model, checkpoint)
    return model.to(device).eval(), tokenizer


def check_weights(checkpoint: dict[str, Any]) -> None:
    """Refuse, in one line, weights that are not tensors or not finite (a diverged run's)."""
    weights = checkpoint["model"]
    if not is_state_dict(weights):
        raise UserFacingError("checkpoint's weights are not a dict of tensors")
    name = first_non_finite(weights)
    if name is not None:
        raise UserFacingError(
            f"checkpoint's weights are not all finite numbers ({name}): the run had "
            "diverged; use an earlier checkpoint"
        )


def load_saved_weights(model: GPT, checkpoint: dict[str, Any]) -> None:
    """Copy a checkpoint's weights into a model of its shape; a mismatch is one line."""
    check_weights(checkpoint)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        # PyTorch lists every mismatch on its own line after a heading; show the first one.
        details = str(err).strip().splitlines()
        first = details[1].strip() if len(details) > 1 else details[0]
        raise UserFacingError(f"checkpoint's weights do not fit its model ({first:.160})") from None


def restore_weights(checkpoint: dict[str, Any], model: GPT, average: AveragedModel | None) -> None:
    """Put back the weights training goes on from, and their moving average if one is kept.

    `model` holds the checkpoint's "model" on entry (model_from_checkpoint). A checkpoint
    without "training_weights" kept no average: its "model" is both. Resuming with an average
    that the checkpoint lacks starts it from the weights (at its first update).
    """
    if "training_weights" in checkpoint:
        try:
            model.load_state_dict(checkpoint["training_weights"])
        except RuntimeError:
            raise UserFacingError("checkpoint's training_weights do not fit its model") from None
    if average is not None and checkpoint.get("averaged_steps", 0) > 0:
        # Loaded by name, not copied from `model`, so that the order above cannot matter.
        average.module.load_state_dict(checkpoint["model"])
        average.n_averaged.fill_(checkpoint["averaged_steps"])


def restore_training_state(
    checkpoint: dict[str, Any],
    optimizer: Optimizer,
    scaler: torch.amp.GradScaler,
    batch_generator: torch.Generator,
    history: list[dict[str, Any]],
    restore_random_streams: bool,
) -> TrainingState:
    """Put the optimizer back where the run left it; return the run's progress.

    `history` holds the run's evaluations up to the checkpoint's step (from metrics.jsonl).
    With restore_random_streams, the batch generator and torch's generator (dropout) continue
    where they stopped, so the same batches and masks follow; under torchrun only process 0
    does that, since the saved streams are process 0's.
    """
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:  # empty when the run did not scale its loss (not float16)
        scaler.load_state_dict(checkpoint["scaler"])
    if restore_random_streams:
        put_back_random_streams(checkpoint["rng"], batch_generator)
    return TrainingState(
        batch_generator=batch_generator,
        step=checkpoint["step"],
        best_val_loss=checkpoint["best_val_loss"],
        tokens_seen=checkpoint["tokens_seen"],
        # Older checkpoints do not hold the time; their last logged evaluation does.
        elapsed_s=checkpoint.get("elapsed_s", history[-1]["elapsed_s"] if history else 0.0),
        history=history,
    )
