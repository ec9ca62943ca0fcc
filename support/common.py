"""Helpers every other file uses: one-line errors for people, safe file writes, PNG figures.

Nothing here knows about models or text; it sits below every other module.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


class UserFacingError(Exception):
    """A problem the user can fix (bad option, missing file...): shown as one line, exit 2."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (or its type's name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def print_error(prog: str, err: BaseException) -> None:
    """Print a user-facing failure as one line on stderr (if anyone can still read it)."""
    print_line(f"{prog}: error: {err}")


def print_line(text: str) -> None:
    """One line on stderr, written at once: processes sharing it cannot mix their lines."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.write(text + "\n")  # print() writes the newline apart
        sys.stderr.flush()


class ForgivingStream:
    """A text stream that stops writing, instead of failing, once nobody reads it.

    Training must not die because its terminal closed or its pipe's reader went away (the
    progress bar would raise BrokenPipeError): it goes on, saves, and can be resumed.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.broken = stream is None

    def write(self, text: str) -> int:
        """Write, or drop the text once the stream has failed."""
        if not self.broken:
            try:
                return self.stream.write(text)
            except (OSError, ValueError):
                self._give_up()
        return len(text)

    def flush(self) -> None:
        """Flush, or do nothing once the stream has failed."""
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._give_up()

    def _give_up(self) -> None:
        self.broken = True
        # Python flushes stdout and stderr at exit; pointed at /dev/null, that cannot fail.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name: str) -> Any:
        if name == "stream":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.stream, name)  # isatty, encoding, fileno...


# ----------------------------------------------------------------------------------------------
# Files


def sha256_hex(data: bytes | memoryview) -> str:
    """The sha256 digest of `data` as 64 hex characters."""
    return hashlib.sha256(data).hexdigest()


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp_path = Path(tmp_name)
    try:
        # mkstemp makes the file private (0600); give it the mode any new file would get.
        tmp_path.chmod(0o666 & ~_umask())
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())  # the bytes are on disk before the name points at them
        tmp_path.replace(path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process' umask (reading it means setting it, and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file


def check_figure_destination(path: Path) -> None:
    """Refuse, in one line, to draw a figure anywhere but a .png name that is new or a figure."""
    if path.suffix.lower() != ".png":
        raise UserFacingError(f"{path}: a figure's file name ends in .png")
    if not path.exists():
        return
    head = b""
    if path.is_file():
        with contextlib.suppress(OSError), path.open("rb") as file:
            head = file.read(len(PNG_SIGNATURE))
    if head != PNG_SIGNATURE:
        raise UserFacingError(f"{path} exists and is not a PNG picture; give another file name")


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """Render a matplotlib figure as PNG bytes and free the figure."""
    import matplotlib.pyplot as plt  # imported on first use: slow, and only drawing needs it

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
