"""What a training run leaves for people to read: metrics.jsonl and the loss plot.

metrics.jsonl holds one JSON object per evaluation: step, train_loss and val_loss (nats per
token), train_bpc and val_bpc (bits per character, comparable across tokenizers), lr and
elapsed_s (seconds of training so far). loss.png draws the two losses against the step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common import figure_png, write_atomically


def bits_per_char(loss: float, tokens_per_char: float) -> float:
    """Nats per token to bits per character, comparable across tokenizers."""
    return loss * tokens_per_char / math.log(2)


def nats_per_char(bits: float) -> float:
    """Bits per character (as metrics.jsonl holds them) to nats per character."""
    return bits * math.log(2)


def evaluation_row(
    step: int,
    losses: dict[str, float],
    tokens_per_char: dict[str, float],
    lr: float,
    elapsed_s: float,
) -> dict[str, Any]:
    """One line of metrics.jsonl, from the mean losses (nats per token) of both splits."""
    return {
        "step": step,
        "train_loss": losses["train"],
        "val_loss": losses["val"],
        "train_bpc": bits_per_char(losses["train"], tokens_per_char["train"]),
        "val_bpc": bits_per_char(losses["val"], tokens_per_char["val"]),
        "lr": lr,
        "elapsed_s": round(elapsed_s, 2),
    }


def write_history(history: list[dict[str, Any]], path: Path) -> None:
    """Write every evaluation so far as metrics.jsonl (atomically: never half a file)."""
    lines = "".join(json.dumps(row) + "\n" for row in history)
    write_atomically(path, lines.encode("utf-8"))


def read_history(path: Path, up_to_step: float = math.inf) -> list[dict[str, Any]]:
    """A run's evaluations from its metrics.jsonl, up to a step (a resumed run's checkpoint)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["step"] <= up_to_step]


def loss_figure(history: list[dict[str, Any]]) -> Any:
    """A matplotlib figure of train and validation loss against step."""
    # Imported here, not at the top: matplotlib is slow to import and only needed at evals.
    import matplotlib

    matplotlib.use("Agg")  # draw to files, no display needed
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [row["train_loss"] for row in history], label="train", color="#1f77b4")
    ax.plot(steps, [row["val_loss"] for row in history], label="validation", color="#d62728")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("How the model learned")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Draw the loss curves into a PNG (written atomically)."""
    write_atomically(path, figure_png(loss_figure(history)))
