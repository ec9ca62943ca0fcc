"""Training runs side by side: what differs between them, how they did, and their curves.

    python tools/compare_runs.py                          # every run under out/
    python tools/compare_runs.py out/run-a out/run-b      # these runs
    python tools/compare_runs.py --png runs.png           # where to draw the curves

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

import sys
from pathlib import Path

# Run by its path (python tools/compare_runs.py), Python looks for imports in tools/; the project's
# modules sit one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
from pathlib import Path

from support.common import (
    UserFacingError,
    check_figure_destination,
    figure_png,
    print_error,
    write_atomically,
)
from support.run_folder import RUNS_ROOT, RunFolder, runs_under
from support.training_log import read_history, runs_figure, runs_table

PROG = "compare_runs.py"


def chosen_folders(paths: list[str]) -> list[RunFolder]:
    """The run folders named, each with a training log; or every run under out/ that has one.

    A run found under out/ whose log holds no evaluation (a run killed at once, a damaged
    file) is skipped with a warning, so that one such run does not hide all the others.
    """
    named = [RunFolder(Path(path)) for path in paths]
    folders = []
    for folder in named or runs_under(RUNS_ROOT):
        if read_history(folder.metrics):
            folders.append(folder)
        elif named:
            raise UserFacingError(f"{folder.path} holds no training log ({folder.metrics.name})")
        else:
            print(f"{PROG}: skipped {folder.path}: no evaluations in its log", file=sys.stderr)
    if not folders:
        raise UserFacingError(
            f"no runs found under {RUNS_ROOT}/; train one with `python train_model.py`"
        )
    return folders


def command_line() -> argparse.ArgumentParser:
    """Which runs, and where to draw their curves."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", help="run folders (default: every run under out/)")
    parser.add_argument(
        "--png",
        default=str(RUNS_ROOT / "runs.png"),
        help="where to draw the curves (default: out/runs.png)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the runs table and draw the curves; returns the exit status."""
    args = command_line().parse_args(argv)
    try:
        check_figure_destination(Path(args.png))  # before any work: nothing else is replaced
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
