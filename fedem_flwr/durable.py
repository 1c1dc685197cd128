"""Writing a file so that it survives a crash of the process or the machine.

Two acts, each done in one place so every caller is durable to the same degree:

- :func:`atomic_write` puts new content at a path: written to a temporary file in the same folder,
  flushed and fsynced, renamed into place (or linked, when an existing file must win), then the
  folder is fsynced so the rename itself is on disk. Readers see the old content or the new, never
  a part; on any error the temporary file is removed and the old content stays.
- :func:`rename_into_place` moves something already written under a temporary name (a finished
  folder, a file a library wrote by path) to its final name: its content is fsynced first, then the
  rename, then the folders involved.

Temporary names start with ``.`` and end with :data:`TMP_SUFFIX`, so a crash's debris is easy to tell apart.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Union

TMP_SUFFIX = ".tmp"
_MODES = ("w", "wb")

PathLike = Union[str, os.PathLike]


@contextmanager
def atomic_write(path: PathLike, mode: str = "wb", *, permissions: int = 0o666, encoding: str = "utf-8",
                 overwrite: bool = True) -> Iterator[IO[Any]]:
    """A handle (``mode`` ``"wb"`` or ``"w"``) whose content replaces ``path`` once the block ends without error.

    ``permissions`` is the new file's mode, applied at creation (the umask still applies, as with
    ``open``), so a secret is never readable by others, even briefly. With ``overwrite=False`` the
    file is linked into place instead: a ``FileExistsError`` leaves a file already there untouched,
    so the first of two writers wins.
    """
    if mode not in _MODES:
        raise ValueError(f"atomic_write: `mode` is {mode!r}; expected one of {', '.join(map(repr, _MODES))}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    handle = open(tmp, mode, encoding=None if "b" in mode else encoding,
                  opener=lambda name, flags: os.open(name, flags | os.O_EXCL, permissions))
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # never replaces: FileExistsError if another writer got there first
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def rename_into_place(src: PathLike, dst: PathLike) -> None:
    """Rename the finished file or folder ``src`` to ``dst`` durably: its content (every file of a
    folder) is fsynced before the rename, so the new name never shows an empty file after a crash.

    Same rules as ``os.rename``: a file at ``dst`` is replaced, a non-empty folder is an ``OSError``.
    """
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        for folder, _dirs, files in os.walk(src):
            for name in files:
                fsync_path(Path(folder) / name)
            fsync_path(Path(folder))
    else:
        fsync_path(src)
    os.rename(src, dst)
    fsync_path(dst.parent)
    if src.parent != dst.parent:
        fsync_path(src.parent)  # the name left the old folder too


def fsync_path(path: PathLike) -> None:
    """Flush a file or folder named by path (through a read-only descriptor, which fsync accepts)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
