"""Atomic writes (temp file in the same folder + ``os.replace``) that keep ordinary permissions.

``tempfile.mkstemp`` creates its file 0600 and ``os.replace`` keeps that mode, so a plain mkstemp-based write
leaves outputs unreadable to the group / other users of a shared cluster. :func:`atomic_path` gives the file
the mode ``open()`` would have (``0o666 & ~umask``) before moving it into place. Standard library only, so
every layer (``data_converters`` included) can use it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set, then restore at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success give it mode ``0o666 & ~umask`` (not mkstemp's
    0600) and move it onto ``path``; on any exception remove it and re-raise (``path`` is left as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, with the umask's permissions (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
