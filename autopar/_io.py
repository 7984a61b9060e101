"""Writing files so that an interrupted run leaves the old file or the new one, never half of one.

``write_atomic`` writes to a temporary file in the destination's directory, flushes
and fsyncs it, then ``os.replace``-s it over the destination: a rename within one
file system is atomic on POSIX and Windows. ``check_writable`` is the cheap test a
command runs before minutes of work whose result it will write.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from autopar.errors import UserInputError

TEMP_PREFIX = ".autopar-tmp-"
"""Prefix of the temporary files ``write_atomic`` creates (and removes on failure)."""


def write_atomic(path: str | Path, data: str | bytes, *, what: str = "output file") -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    Args:
        path: Destination; its directory must exist.
        data: Text (written as UTF-8) or bytes.
        what: How error messages name the path (e.g. ``"--out"``, ``"cannot write chart"``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        UserInputError: The directory does not exist, ``path`` is a directory, or
            the file system refuses the write (the message carries the OS reason).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> write_atomic(d / "a.txt", "hello").read_text()
        'hello'
    """
    out = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    check_writable(out, what=what)
    try:
        with _temporary(out) as (handle, tmp):
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(tmp, out)
    except OSError as e:
        raise UserInputError(f"{what} {str(out)!r}: cannot write it: {e.strerror or e}") from e
    return out


@contextlib.contextmanager
def _temporary(out: Path) -> Iterator[tuple[BinaryIO, str]]:
    """An open temporary file next to ``out``, removed unless it was renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=out.suffix, dir=out.parent if str(out.parent) else ".")
    os.fchmod(fd, _file_mode(out))  # mkstemp makes 0600; give the mode a plain open() would
    handle = os.fdopen(fd, "wb")
    try:
        yield handle, tmp
    finally:  # on success the rename moved it; on any failure or interrupt, remove the half-written file
        if not handle.closed:
            handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _file_mode(out: Path) -> int:
    """The replaced file's permission bits, or 0666 less the umask for a new file."""
    try:
        return out.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def check_writable(path: str | Path, *, what: str = "output file") -> Path:
    """Refuse, before any work, an output path that cannot be written.

    Raises:
        UserInputError: The path is a directory, its parent does not exist or is
            not a directory, or the parent is not writable.

    Example:
        >>> check_writable("/nonexistent-dir/p.json")
        Traceback (most recent call last):
        ...
        autopar.errors.UserInputError: output file '/nonexistent-dir/p.json': directory '/nonexistent-dir' does not exist; create it first
    """
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise UserInputError(f"{what} {str(out)!r} is a directory; give a file name, e.g. {str(out / 'plan.json')!r}")
    if not parent.exists():
        raise UserInputError(f"{what} {str(out)!r}: directory {str(parent)!r} does not exist; create it first")
    if not parent.is_dir():
        raise UserInputError(f"{what} {str(out)!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserInputError(f"{what} {str(out)!r}: directory {str(parent)!r} is not writable")
    return out


__all__ = ["TEMP_PREFIX", "check_writable", "write_atomic"]
