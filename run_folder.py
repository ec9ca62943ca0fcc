"""The files of one training run, and their names, in one place.

A run folder (`--out_dir`, `out/` by default) holds:

    ckpt_last.pth    the latest checkpoint: what --resume continues
    ckpt_best.pth    the checkpoint with the lowest validation loss: what sampling uses
    metrics.jsonl    one line per evaluation (see training_log.py)
    loss.png         the loss curves
    config.json      the run's settings, for people to read
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from common import write_atomically


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """Where one training run keeps its checkpoints, metrics, plot and settings."""

    path: Path

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunFolder:
        """The run folder a checkpoint file was saved in."""
        return cls(checkpoint.parent)

    @property
    def last_checkpoint(self) -> Path:
        """The latest checkpoint, written at every evaluation and when training stops."""
        return self.path / "ckpt_last.pth"

    @property
    def best_checkpoint(self) -> Path:
        """The checkpoint with the lowest validation loss so far."""
        return self.path / "ckpt_best.pth"

    @property
    def sampling_checkpoint(self) -> Path:
        """The checkpoint generation and the web demo use unless told otherwise."""
        return self.best_checkpoint

    @property
    def metrics(self) -> Path:
        """metrics.jsonl: one JSON object per evaluation."""
        return self.path / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        """loss.png: the training and validation loss curves."""
        return self.path / "loss.png"

    @property
    def settings(self) -> Path:
        """config.json: the run's settings, written when it starts."""
        return self.path / "config.json"

    def start(self, settings: dict[str, Any]) -> None:
        """Create the folder, clear what a killed run left, record the settings in config.json."""
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.glob(".*.tmp"):  # from common.write_atomically, cut short
            leftover.unlink()
        write_atomically(self.settings, json.dumps(settings, indent=2).encode("utf-8"))
