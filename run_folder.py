"""The files of one training run, their names, and where runs go, in one place.

Every run gets a folder of its own, so that no run replaces another: `--out_dir` names it, or
else it is a new folder under out/ named by the time the run starts (out/run-20261123-164512).
out/latest.txt names the run started last under out/, which generation, the web demo and
--resume use when they are not told which run to take. A run folder holds:

    ckpt_last.pth    the latest checkpoint: what --resume continues
    ckpt_best.pth    the checkpoint with the lowest validation loss: what sampling uses
    metrics.jsonl    one line per evaluation (see training_log.py)
    loss.png         the loss curves
    config.json      the run's settings, for people to read
    events.out.tfevents.*   TensorBoard's log: `tensorboard --logdir out` compares the runs
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import UserFacingError, write_atomically

RUNS_ROOT = Path("out")  # where runs go when no --out_dir is given
LATEST = "latest.txt"  # in RUNS_ROOT: the name of the run started last there


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
        """The settings config.json records ({} if it is missing or unreadable)."""
        try:
            settings = json.loads(self.settings.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return settings if isinstance(settings, dict) else {}

    def event_files(self) -> list[Path]:
        """TensorBoard's event files of the run."""
        return sorted(self.path.glob("events.out.tfevents.*"))

    def holds_a_run(self) -> bool:
        """Whether a run has saved a checkpoint here (one that another run must not replace)."""
        return self.last_checkpoint.exists() or self.best_checkpoint.exists()

    def clear(self) -> None:
        """Delete the run's files (for --overwrite); other files in the folder stay."""
        files = [self.last_checkpoint, self.best_checkpoint, self.metrics, self.loss_plot]
        for path in [*files, self.settings, *self.event_files()]:
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one training process; another is refused until this one ends.

        The lock is a file holding the process id; one left by a process that no longer
        exists (killed) is taken over.
        """
        created = not self.path.exists()
        self.make()
        lock = self.path / ".lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = _lock_owner(lock)
                if owner is not None and _process_exists(owner):
                    raise UserFacingError(
                        f"another training run (process {owner}) is using {self.path}; wait "
                        "for it to finish, or train into another --out_dir"
                    ) from None
                lock.unlink(missing_ok=True)  # its process is gone: take the folder over
                continue
            with os.fdopen(fd, "w") as file:
                file.write(str(os.getpid()))
            break
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            if created:  # a run that failed before writing anything leaves no empty folder
                with contextlib.suppress(OSError):
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

    def start(self, settings: dict[str, Any], replace: bool = False) -> None:
        """Create the folder, clear what a killed run left, record the settings in config.json.

        With replace (--overwrite), the run the folder held is deleted first.
        """
        self.make()
        if replace:
            self.clear()
        for leftover in self.path.glob(".*.tmp"):  # from common.write_atomically, cut short
            leftover.unlink()
        write_atomically(self.settings, json.dumps(settings, indent=2).encode("utf-8"))


def _lock_owner(lock: Path) -> int | None:
    """The process id a lock file holds (None if unreadable)."""
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _process_exists(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)  # signal 0 checks, and sends nothing
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, but belongs to another user
    return True


# ----------------------------------------------------------------------------------------------
# Finding runs


def new_run_folder(root: Path = RUNS_ROOT) -> RunFolder:
    """A folder under root for a new run, named by the time (a suffix if the name is taken)."""
    name = time.strftime("run-%Y%m%d-%H%M%S")
    candidate, number = root / name, 2
    while candidate.exists():
        candidate, number = root / f"{name}-{number}", number + 1
    return RunFolder(candidate)


def mark_latest(folder: RunFolder, root: Path = RUNS_ROOT) -> None:
    """Remember the folder as the latest run, if it lies directly under root."""
    if folder.path.resolve().parent == root.resolve():
        write_atomically(root / LATEST, (folder.path.name + "\n").encode("utf-8"))


def latest_run(root: Path = RUNS_ROOT) -> RunFolder:
    """The run started last under root; root itself if it is a run folder of its own."""
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if name and Path(name).name == name:  # a plain name: never a path out of root
            return RunFolder(root / name)
    return RunFolder(root)  # a run trained into out/ itself, or none yet


def chosen_run(out_dir: str) -> RunFolder:
    """--out_dir's run if one is named, else the latest run under out/."""
    return RunFolder(Path(out_dir)) if out_dir else latest_run()


def checkpoint_to_sample(ckpt: str, out_dir: str) -> Path:
    """--ckpt if given, else the sampling checkpoint of --out_dir's run (or the latest run)."""
    return Path(ckpt) if ckpt else chosen_run(out_dir).sampling_checkpoint


def folder_for_new_run(out_dir: str, overwrite: bool) -> RunFolder:
    """--out_dir, or a new folder under out/, for a new run.

    A folder that holds a run is refused unless --overwrite says to replace it: no run
    silently replaces another.
    """
    folder = RunFolder(Path(out_dir)) if out_dir else new_run_folder()
    if folder.holds_a_run() and not overwrite:
        raise UserFacingError(
            f"{folder.path} holds another run; continue it with --resume, train into another "
            "--out_dir (or none: a new folder under out/), or replace it with --overwrite"
        )
    return folder


def runs_under(root: Path) -> list[RunFolder]:
    """Every run folder directly under root (and root itself if it is one), by name."""
    if not root.is_dir():
        return []
    subfolders = sorted(path for path in root.iterdir() if path.is_dir())
    folders = [RunFolder(root), *(RunFolder(path) for path in subfolders)]
    return [folder for folder in folders if folder.metrics.is_file()]
