"""Writing a file so that nothing is lost: all of it or none of it.

The content goes to a temporary file in the target's folder, which is flushed to disk
and then renamed over the target in one step (``os.replace``): a crash, a full disk or
Ctrl-C leaves either the old file or the new one, never half of one.  Used for
checkpoints, metrics, plots, downloads and the generated modules.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["folder_problem", "replace_atomically"]

_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


def _create_beside(path: Path):
    """(file descriptor, name) of a new, empty temporary file in ``path``'s folder.

    Made with mode 0666 and the umask applied by the kernel, so that the renamed file gets
    the permissions of any new file (tempfile.mkstemp makes 0600 files, and reading the
    umask to correct that would change it, for a moment, for every thread)."""
    for _ in range(100):
        name = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _BINARY, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def replace_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary binary file beside ``path``, then rename it to
    ``path``.  If ``write`` raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    handle, temporary = _create_beside(path)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into ``folder`` (made if missing), or None if they can.

    Checked by writing a temporary file into the folder, or into its nearest existing
    parent when the folder is still to be made: permissions alone do not tell (root,
    read-only mounts).  Nothing is left behind.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"{existing} is not writable ({error.strerror or error})"
    return None
