"""The files of one training run, their names, and where runs go, in one place.

Every run gets a folder of its own, so that no run replaces another: `--out_dir` names it, or
else it is a new folder under out/ named by the time the run starts (out/run-20261123-164512).
out/latest.txt names the run started or resumed last under out/, which generation, the web
demo and --resume use when they are not told which run to take. A run folder holds:

    ckpt_last.pth    the latest checkpoint: what --resume continues
    ckpt_best.pth    the checkpoint with the lowest validation loss: what sampling uses
    metrics.jsonl    one line per evaluation (see training_log.py)
    loss.png         the loss curves
    config.json      the run's settings, for people to read, marked as this project's run
    events.out.tfevents.*   TensorBoard's log: `tensorboard --logdir out` compares the runs
    .lock            held by the training process while it runs (see RunFolder.lock)
    hf/              the model in Hugging Face's layout, if tools/export_model.py wrote it

A new run goes only into a folder that holds nothing else, so that --overwrite, which deletes
the run's files, never deletes a file the project did not write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support.common import UserFacingError, write_atomically

try:
    import fcntl  # POSIX file locks
except ImportError:  # Windows
    fcntl = None

RUNS_ROOT = Path("out")  # where runs go when no --out_dir is given
MAX_NAME_BYTES = 255  # the longest file name most file systems take
LATEST = "latest.txt"  # in RUNS_ROOT: the name of the run started or resumed last there
# config.json's mark: the folder holds a run of this project. config.json files written
# before the mark existed are known by their three sections of settings.
RUN_MARK = {"made_by": "mini-gpt train_model.py"}
SETTINGS_SECTIONS = ("model", "data", "train")
EXPORT_FOLDER = "hf"  # where tools/export_model.py writes inside a run folder
EXPORT_MARK = ".mini-gpt-export"  # the file that marks a folder an export wrote
TENSORBOARD_PREFIX = "events.out.tfevents."


def is_run_settings(settings: Any) -> bool:
    """Whether a config.json's contents are a run's settings as train_model.py writes them."""
    if not isinstance(settings, dict):
        return False
    marked = settings.get("made_by") == RUN_MARK["made_by"]
    return marked or all(isinstance(settings.get(key), dict) for key in SETTINGS_SECTIONS)


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

    def read_settings(self) -> dict[str, Any]:
        """The settings config.json records ({} if it is missing, unreadable or not a run's)."""
        try:
            settings = json.loads(self.settings.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return settings if is_run_settings(settings) else {}

    def foreign_entries(self) -> list[str]:
        """The names in the folder that no run of this project writes, sorted."""
        try:
            entries = list(self.path.iterdir())
        except OSError:  # missing, or not a folder: nothing in it to lose
            return []
        return sorted(entry.name for entry in entries if not self._is_own(entry))

    def _is_own(self, entry: Path) -> bool:
        run_files = [self.last_checkpoint, self.best_checkpoint, self.metrics, self.loss_plot]
        name = entry.name
        if name in {path.name for path in run_files} | {".lock"}:
            return entry.is_file() and not entry.is_symlink()
        if name == self.settings.name:
            return bool(self.read_settings())
        if name == EXPORT_FOLDER:
            return (entry / EXPORT_MARK).is_file()
        # TensorBoard's logs, and what an atomic write cut short left behind.
        return name.startswith(TENSORBOARD_PREFIX) or (
            name.startswith(".") and name.endswith(".tmp")
        )

    def event_files(self) -> list[Path]:
        """TensorBoard's event files of the run."""
        return sorted(self.path.glob(TENSORBOARD_PREFIX + "*"))

    def holds_a_run(self) -> bool:
        """Whether a run has saved a checkpoint here (one that another run must not replace)."""
        return self.last_checkpoint.exists() or self.best_checkpoint.exists()

    def clear(self) -> None:
        """Delete the run's files (for --overwrite); other files in the folder stay."""
        files = [self.last_checkpoint, self.best_checkpoint, self.metrics, self.loss_plot]
        for path in [*files, self.settings, *self.event_files()]:
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, discard_if_unsaved: bool = False) -> Iterator[None]:
        """Hold the folder for this training process: another one is refused while it runs.

        The operating system releases the lock when the process ends, however it ends (a kill
        too), so a lock never outlives its run; the file names the process that holds it. With
        discard_if_unsaved, a new run that stops before its first checkpoint leaves none of
        its files behind, nor the folder if that is then empty. (Without fcntl, on Windows,
        nothing is locked.)
        """
        self.make()
        lock = self.path / ".lock"
        with lock.open("a+") as file:
            if fcntl is not None:
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    file.seek(0)
                    owner = file.read().strip() or "?"
                    raise UserFacingError(
                        f"another training run (process {owner}) is using {self.path}; wait "
                        "for it to finish, or train into another --out_dir"
                    ) from None
            file.seek(0)
            file.truncate()
            file.write(str(os.getpid()))
            file.flush()
            try:
                yield
            finally:
                if discard_if_unsaved and not self.holds_a_run():
                    self.clear()
                    lock.unlink(missing_ok=True)  # (the whole folder may have been deleted)
                    with contextlib.suppress(OSError):  # not empty: it holds an export
                        self.path.rmdir()

    def make(self) -> None:
        """Create the folder if it is not there; say so in one line if it cannot be."""
        # is_dir is False for a file, a device and a symlink that loops or leads nowhere.
        if (self.path.exists() or self.path.is_symlink()) and not self.path.is_dir():
            raise UserFacingError(f"{self.path} is not a folder; choose another --out_dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserFacingError(f"cannot create {self.path} ({err.strerror or err})") from None

    def start(self, settings: dict[str, Any], run_id: str, replace: bool = False) -> None:
        """Create the folder, clear what a killed run left, record the settings in config.json.

        config.json carries the project's mark and the run's identity (its checkpoints carry it
        too). With replace (--overwrite), the run the folder held is deleted first.
        """
        self.make()
        if replace:
            self.clear()
        for leftover in self.path.glob(".*.tmp"):  # from common.write_atomically, cut short
            leftover.unlink()
        recorded = {**RUN_MARK, "run_id": run_id, **settings}
        write_atomically(self.settings, json.dumps(recorded, indent=2).encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# Finding runs


def new_run_folder(root: Path = RUNS_ROOT, claim: bool = True) -> RunFolder:
    """A new folder under root for a new run, named by the time.

    With claim, the folder is created, which claims the name: a run started in the same
    second gets a suffix (-2, -3...).
    """
    name = time.strftime("run-%Y%m%d-%H%M%S")
    if not claim:
        return RunFolder(root / name)
    root.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        candidate = root / (name if number == 1 else f"{name}-{number}")
        try:
            candidate.mkdir()
            return RunFolder(candidate)
        except FileExistsError:
            number += 1


def mark_latest(folder: RunFolder, root: Path = RUNS_ROOT) -> None:
    """Remember the folder as the latest run, if it lies directly under root."""
    if folder.path.resolve().parent == root.resolve():
        write_atomically(root / LATEST, (folder.path.name + "\n").encode("utf-8"))


def is_run_name(name: str) -> bool:
    """Whether name can be a run folder's name inside a folder: one path part, not . or .."""
    return (
        bool(name)
        and len(name.encode("utf-8", errors="replace")) <= MAX_NAME_BYTES
        and Path(name).name == name
        and name not in (".", "..")
        and "\0" not in name
    )


def latest_run(root: Path = RUNS_ROOT) -> RunFolder:
    """The run started or resumed last under root.

    If latest.txt names no folder that exists (deleted), the last run folder by name (they
    are named by time); root itself for a run trained into it, or when there is none yet.
    """
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if is_run_name(name) and (root / name).is_dir():
            return RunFolder(root / name)
        if name and not is_run_name(name):  # written by hand, or damaged: never out of root
            print(f"warning: ignored {pointer}: it names no folder inside {root}", file=sys.stderr)
    runs = [run for run in runs_under(root) if run.path != root]
    return runs[-1] if runs else RunFolder(root)


def chosen_run(out_dir: str) -> RunFolder:
    """--out_dir's run if one is named, else the latest run under out/."""
    return RunFolder(Path(out_dir)) if out_dir else latest_run()


def checkpoint_to_sample(ckpt: str, out_dir: str) -> Path:
    """--ckpt if given, else the sampling checkpoint of --out_dir's run (or the latest run)."""
    return Path(ckpt) if ckpt else chosen_run(out_dir).sampling_checkpoint


def folder_for_new_run(out_dir: str, overwrite: bool, claim: bool = True) -> RunFolder:
    """--out_dir, or a new folder under out/ (created if claim), for a new run.

    A folder holding anything but a run's files is refused, --overwrite or not; one that holds
    a run is refused unless --overwrite says to replace it: no run silently replaces another.
    """
    folder = RunFolder(Path(out_dir)) if out_dir else new_run_folder(claim=claim)
    foreign = folder.foreign_entries()
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise UserFacingError(
            f"{folder.path} holds files that are not a training run's ({shown}); train into an "
            "empty or new --out_dir (or none: a new folder under out/)"
        )
    if folder.holds_a_run() and not overwrite:
        raise UserFacingError(
            f"{folder.path} holds another run; continue it with --resume, train into another "
            "--out_dir (or none: a new folder under out/), or replace it with --overwrite"
        )
    return folder


def runs_under(root: Path) -> list[RunFolder]:
    """Every run folder directly under root (and root itself if it is one), by name."""
    try:
        subfolders = sorted(path for path in root.iterdir() if path.is_dir())
    except OSError:  # missing, or not readable
        return []
    folders = [RunFolder(root), *(RunFolder(path) for path in subfolders)]
    return [folder for folder in folders if folder.metrics.is_file()]
