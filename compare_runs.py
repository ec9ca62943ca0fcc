"""Training runs side by side: what differs between them, how they did, and their curves.

    python compare_runs.py                          # every run under out/
    python compare_runs.py out/run-a out/run-b      # these runs
    python compare_runs.py --png runs.png           # where to draw the curves

Prints one row per run: the settings in which the runs differ, the steps done, the training
time, the best validation loss in nats per character, and how far into training the run
first reached each of 2.0, 1.8, 1.6 and 1.5 nats per character ("-": not reached). Draws
every run's validation curve, by step and by time, into one PNG.
"""

from __future__ import annotations

import signal

# Ctrl-C while the libraries below still load: the default action ends the program at once,
# without a traceback (Python's KeyboardInterrupt comes back before main runs).
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
from pathlib import Path
from typing import Any

from common import UserFacingError, figure_png, print_error, write_atomically
from run_folder import RUNS_ROOT, RunFolder, runs_under
from training_log import first_reached, flat_settings, nats_per_char, read_history, runs_figure

PROG = "compare_runs.py"
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
    """Seconds as people read them: "48 s", "9.5 min"."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


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


def chosen_folders(paths: list[str]) -> list[RunFolder]:
    """The run folders named, or every run under out/; each must hold a training log."""
    folders = [RunFolder(Path(path)) for path in paths] or runs_under(RUNS_ROOT)
    if not folders:
        raise UserFacingError(
            f"no runs found under {RUNS_ROOT}/; train one with `python train_model.py`"
        )
    for folder in folders:
        if not read_history(folder.metrics):
            raise UserFacingError(f"{folder.path} holds no training log ({folder.metrics.name})")
    return folders


def main(argv: list[str] | None = None) -> int:
    """Print the runs table and draw the curves; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", help="run folders (default: every run under out/)")
    parser.add_argument(
        "--png",
        default=str(RUNS_ROOT / "runs.png"),
        help="where to draw the curves (default: out/runs.png)",
    )
    args = parser.parse_args(argv)
    try:
        folders = chosen_folders(args.runs)
        print(runs_table(folders))
        figure = runs_figure({f.path.name: read_history(f.metrics) for f in folders})
        write_atomically(Path(args.png), figure_png(figure))
    except (UserFacingError, OSError) as err:
        print_error(PROG, err)
        return 2
    print(f"curves drawn in {args.png}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C as usual again
    raise SystemExit(main())
