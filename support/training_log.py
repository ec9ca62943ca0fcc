"""What a training run leaves for people to read: metrics.jsonl, the loss plot, TensorBoard.

metrics.jsonl holds one JSON object per evaluation: step, train_loss and val_loss (nats per
token), train_bpc and val_bpc (bits per character, comparable across tokenizers), lr and
elapsed_s (seconds of training so far). loss.png draws the two losses against the step. The
TensorBoard log holds the same and more (see `TensorBoardLog`); `tensorboard --logdir out`
overlays every run under out/.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model_architecture import GPT, generate
from support.common import figure_png, first_line, write_atomically
from support.run_folder import RunFolder
from tokenization import Tokenizer

SAMPLE_TOKENS = 200  # the length of the sample logged at each evaluation


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


ROW_NUMBERS = ("step", "train_loss", "val_loss", "train_bpc", "val_bpc", "elapsed_s")


def read_history(path: Path, up_to_step: float = math.inf) -> list[dict[str, Any]]:
    """A run's evaluations from its metrics.jsonl, up to a step (a resumed run's checkpoint).

    A damaged line (cut short, edited, not UTF-8, a number that is NaN or infinite) is skipped
    with a warning: the log is for reading, and losing one row must not stop a resumed run or
    the web demo.
    """
    if not path.is_file():
        return []
    rows, damaged = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        row = _parse_row(line) if line.strip() else {}
        if row is None:
            damaged += 1
        elif row and row["step"] <= up_to_step:
            rows.append(row)
    if damaged:
        print(f"warning: skipped {damaged} damaged line(s) of {path}", file=sys.stderr)
    return rows


def _parse_row(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl line as a dict, or None if it is not a whole, sound row."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    numbers = [row.get(name) for name in ROW_NUMBERS] if isinstance(row, dict) else [None]
    sound = all(
        isinstance(n, int | float) and not isinstance(n, bool) and math.isfinite(n) for n in numbers
    )
    return row if sound else None


def best_evaluation(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluation with the lowest validation loss (None before the first)."""
    return min(history, key=lambda row: row["val_loss"], default=None)


def first_reached(history: list[dict[str, Any]], nats_per_char_target: float) -> Any:
    """The first evaluation at or below a validation loss in nats per character, or None."""
    return next(
        (row for row in history if nats_per_char(row["val_bpc"]) <= nats_per_char_target), None
    )


def _pyplot() -> Any:
    """matplotlib.pyplot, drawing to files (no display needed)."""
    # Imported on first use, not at the top: matplotlib is slow to import.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_figure(history: list[dict[str, Any]]) -> Any:
    """A matplotlib figure of train and validation loss (nats per character) against step.

    Per character, not per token: a character model's and a BPE model's curves compare.
    """
    plt = _pyplot()
    steps = [row["step"] for row in history]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for split, label, color in (("train", "train", "#1f77b4"), ("val", "validation", "#d62728")):
        per_char = [nats_per_char(row[f"{split}_bpc"]) for row in history]
        ax.plot(steps, per_char, label=label, color=color)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.set_title("How the model learned")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Draw the loss curves into a PNG (written atomically)."""
    write_atomically(path, figure_png(loss_figure(history)))


def runs_figure(histories: dict[str, list[dict[str, Any]]]) -> Any:
    """Several runs' validation loss per character, by step and by training time, overlaid."""
    plt = _pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, history in histories.items():
        val = [nats_per_char(row["val_bpc"]) for row in history]
        by_step.plot([row["step"] for row in history], val, label=name)
        by_time.plot([row["elapsed_s"] / 60 for row in history], val, label=name)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training time (minutes)")
    by_step.set_ylabel("validation loss (nats per character)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    fig.suptitle("Runs side by side")
    return fig


@torch.no_grad()
def model_sample(model: GPT, tokenizer: Tokenizer, prompt: list[int], seed: int) -> str:
    """A short text from the model as it is now, for the log.

    The same prompt and seed each time, so that the evaluations' samples compare.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=model.token_embedding.weight.device).manual_seed(seed)
    new_ids = generate(model, prompt, SAMPLE_TOKENS, temperature=0.8, generator=generator)
    text = tokenizer.decode([*prompt, *new_ids])
    model.train(was_training)
    return text


# ----------------------------------------------------------------------------------------------
# TensorBoard

BEST_VAL_TAG = "eval/best_val_nats_per_char"  # the metric TensorBoard's HParams table compares


def flat_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """{"model": {"n_layer": 4}, ...} -> {"model/n_layer": 4, ...}: TensorBoard's hparams.

    Entries that are no group of settings (config.json's mark and run identity) are left out.
    """
    return {
        f"{group}/{name}": value
        for group, values in settings.items()
        if isinstance(values, dict)
        for name, value in values.items()
    }


class TensorBoardLog:
    """The run's TensorBoard event file, in its folder (written by process 0 only).

    Every log_interval steps: the training loss, learning rate, gradient norm (before
    clipping) and tokens/s. At every evaluation: both losses per token, per character in nats
    and in bits, the best validation loss so far, and a generated sample as text; events reach
    the disk then. The run's settings are its hyperparameters, so TensorBoard's HParams table
    sets runs side by side with their best validation loss.
    """

    def __init__(
        self, folder: Path, settings: dict[str, dict[str, Any]], resumed: int | None
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used
        from torch.utils.tensorboard.summary import hparams

        # A resumed run drops what the interrupted one logged after its checkpoint's step
        # (TensorBoard discards events from that step on), so no step is there twice.
        purge_step = None if resumed is None else resumed + 1
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)
        for summary in hparams(flat_settings(settings), {BEST_VAL_TAG: 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.working = True  # until the file cannot be written (the folder gone, a full disk)
        _quiet_writer_threads()

    def log_step(
        self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float
    ) -> None:
        """The latest training step's figures."""
        if not self.working:
            return
        with self._stopping_on_failure():
            self.writer.add_scalar("step/loss", loss, step)
            self.writer.add_scalar("step/learning_rate", lr, step)
            self.writer.add_scalar("step/grad_norm", grad_norm, step)
            self.writer.add_scalar("step/tokens_per_s", tokens_per_s, step)

    def log_evaluation(self, row: dict[str, Any], best_val_bpc: float, sample: str) -> None:
        """An evaluation (a metrics.jsonl row), and a sample of text; then flush to disk."""
        step = row["step"]
        if not self.working:
            return
        with self._stopping_on_failure():
            for split in ("train", "val"):
                self.writer.add_scalar(f"eval/{split}_loss", row[f"{split}_loss"], step)
                self.writer.add_scalar(f"eval/{split}_bits_per_char", row[f"{split}_bpc"], step)
                nats = nats_per_char(row[f"{split}_bpc"])
                self.writer.add_scalar(f"eval/{split}_nats_per_char", nats, step)
            self.writer.add_scalar(BEST_VAL_TAG, nats_per_char(best_val_bpc), step)
            # TensorBoard renders text as Markdown; four spaces of indent keep it verbatim.
            self.writer.add_text("sample", "    " + sample.replace("\n", "\n    "), step)
            self.writer.flush()

    def close(self) -> None:
        """Write what is left and close the file."""
        if not self.working:
            return
        with self._stopping_on_failure():
            self.writer.close()

    @contextlib.contextmanager
    def _stopping_on_failure(self) -> Iterator[None]:
        """Around a write: the first failure says so in one line, and ends the log.

        The log is for reading: a run whose log cannot be written trains on (and a save that
        fails for the same reason stops it, in one line of its own).
        """
        try:
            yield
        except OSError as err:
            self.working = False
            print(f"warning: TensorBoard's log stopped ({first_line(err)})", file=sys.stderr)


def _quiet_writer_threads() -> None:
    """Keep TensorBoard's writer thread from printing a traceback when its file fails.

    The thread keeps the error, and the writer raises it again on its next call, in this
    process' own thread, where TensorBoardLog says it in one line.
    """
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class Progress:
    """What a run shows as it goes: a progress bar, and the TensorBoard log on process 0."""

    def __init__(
        self, total: int, initial: int, tokens_per_step: int, board: TensorBoardLog | None
    ) -> None:
        # Progress is output: it goes to stdout, and stderr stays for warnings and errors.
        self.bar = tqdm(
            total=total, initial=initial, desc="training", file=sys.stdout, dynamic_ncols=True
        )
        self.tokens_per_step, self.board = tokens_per_step, board
        self.logged_step, self.logged_time = initial, time.perf_counter()

    def log_step(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        """Show the latest step's figures, with the throughput since the previous call."""
        now = time.perf_counter()
        tokens_per_s = (step - self.logged_step) * self.tokens_per_step / (now - self.logged_time)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if self.board is not None:
            self.board.log_step(step, loss, lr, grad_norm, tokens_per_s)
        self.logged_step, self.logged_time = step, now

    def close(self) -> None:
        """Close the bar and the TensorBoard file."""
        self.bar.close()
        if self.board is not None:
            self.board.close()


# ----------------------------------------------------------------------------------------------
# Runs side by side (tools/compare_runs.py and the web demo's Training tab)

MARKS = (2.0, 1.8, 1.6, 1.5)  # validation nats per character
# Where a run was written and how it was started, not how it trains.
NOT_COMPARED = frozenset({"train/out_dir", "train/resume", "train/overwrite"})


def differing_settings(settings: dict[str, dict[str, Any]]) -> list[str]:
    """The names of the settings whose values are not the same in every run."""
    names = sorted({name for values in settings.values() for name in values} - NOT_COMPARED)
    return [
        name for name in names if len({repr(values.get(name)) for values in settings.values()}) > 1
    ]


def duration(seconds: float) -> str:
    """Seconds as people read them: "48 s", "9.5 min", "3.2 h", "41 days"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 120 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"


def runs_table(folders: list[RunFolder]) -> str:
    """The runs as a text table, one row each."""
    settings = {str(f.path): flat_settings(f.read_settings()) for f in folders}
    differing = differing_settings(settings)
    header = ["run", *differing, "steps", "time", "best val", *(f"to {m}" for m in MARKS)]
    rows = [header]
    for folder in folders:
        history = read_history(folder.metrics)
        values = settings[str(folder.path)]
        best = min(nats_per_char(row["val_bpc"]) for row in history)
        reached = [first_reached(history, mark) for mark in MARKS]
        rows.append(
            [
                folder.path.name,
                *(str(values.get(name, "-")) for name in differing),
                str(history[-1]["step"]),
                duration(history[-1]["elapsed_s"]),
                f"{best:.3f}",
                *(duration(row["elapsed_s"]) if row else "-" for row in reached),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )
