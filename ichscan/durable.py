"""Writing files so that a reader never sees half of one, and a crash never loses one.

Two guarantees, one way to get each:

* **atomic** (:func:`replacing` with ``durable=False``): the new content goes to a hidden
  temporary file in the target's folder and is renamed over the target, so a reader sees
  the old file or the new one, never a torn one. For outputs that are rewritten anyway
  (the studies CSV, the HTML report, overlay PNGs, checkpoints).
* **durable** (:func:`replacing` with ``durable=True``, :func:`write_durably`): the same,
  plus fsync of the file before the rename and of the folder after it, so the file is on
  disk when the call returns. For what we promised to keep: an instance answered with
  C-STORE Success, a DICOM result object recorded in the state file.

The temporary file is in the same folder because a rename is only atomic within one file
system; its name starts with a dot and ends in ``.tmp`` so that folder walks and watchers
ignore it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def temporary_name(target: Path) -> Path:
    """A hidden name beside ``target``, unique per process and thread, so that writers of
    the same target at the same time never share a temporary file."""
    return target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")


_TEMPORARY = re.compile(r"^\..+\.(\d+)\.\d+\.tmp$")

log = logging.getLogger(__name__)


def remove_orphaned_temporaries(root: Path) -> int:
    """Remove the temporary files under ``root`` that a killed process left, and count them.

    A SIGKILL or a power cut between the first write and the rename leaves the hidden
    ``.name.<pid>.<thread>.tmp`` behind (nothing was promised for it: its Success was never
    sent). A file is removed only when the process named in it is gone, so a live writer's
    file, this process's included, is never touched; a recycled process id keeps it for a
    later start."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            match = _TEMPORARY.match(name)
            if match is None or _alive(int(match.group(1))):
                continue
            try:
                os.unlink(os.path.join(dirpath, name))
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove the orphaned temporary file %s: %s", os.path.join(dirpath, name), exc.strerror or exc)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a number no process has): leave it
    return True


def fsync_file(path: Path) -> None:
    """Flush ``path``'s content to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename or a new file in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_to_disk(fh: IO) -> None:
    """Flush an open file's buffers and fsync it (for files appended in place)."""
    fh.flush()
    os.fsync(fh.fileno())


@contextmanager
def replacing(target: Path, *, durable: bool = False) -> Iterator[Path]:
    """``with replacing(target) as tmp:`` write ``tmp``; on leaving, it replaces ``target``.

    Parameters
    ----------
    target
        The file to create or replace; its folder must exist.
    durable
        Also fsync the file before the rename and the folder after it.

    Raises
    ------
    OSError
        From writing, syncing or renaming; the temporary file is removed and ``target``
        is left as it was (unless the folder fsync failed after the rename).
    """
    target = Path(target)
    tmp = temporary_name(target)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        # rename, not replace: the same call on POSIX (which the lock code needs anyway),
        # and the one the storage-failure tests break on purpose.
        os.rename(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)


def write_durably(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` so that it is complete on disk when this returns.

    The temporary file is created exclusively (never shared with another writer).
    """
    with replacing(target, durable=True) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def rename_durably(moves: Iterable[tuple[Path, Path]]) -> None:
    """Rename each already-synced ``(temporary, target)`` pair, then fsync every folder
    once: the second half of a write whose first half (write and fsync of the temporary
    file) happened before something else had to be committed (the outbox records an
    object in the state file between the two)."""
    folders: set[Path] = set()
    for tmp, target in moves:
        os.rename(tmp, target)
        folders.add(Path(target).parent)
    for folder in folders:
        fsync_dir(folder)
