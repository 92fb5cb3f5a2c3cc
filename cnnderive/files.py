"""Writing a file so that nothing is lost: all of it or none of it.

The content goes to a temporary file in the target's folder, which is flushed to disk
and then renamed over the target in one step (``os.replace``): a crash, a full disk or
Ctrl-C leaves either the old file or the new one, never half of one.  Used for
checkpoints, metrics, plots, downloads and the generated modules.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["folder_problem", "replace_atomically"]


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def replace_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary binary file beside ``path``, then rename it to
    ``path``.  If ``write`` raises, the temporary file is removed and ``path`` is untouched.

    The file gets the permissions of any new file (0666 less the umask): mkstemp makes
    its files readable by their owner only, and the rename would keep that.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
            if hasattr(os, "fchmod"):
                os.fchmod(stream.fileno(), 0o666 & ~_umask())
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
