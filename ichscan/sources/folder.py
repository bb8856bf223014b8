"""Walk a PACS-style folder tree for candidate DICOM files."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderEntry:
    """A file to screen, or one refused before reading (``refusal`` says why)."""

    path: str
    refusal: str = ""


def iter_folder(root: str | os.PathLike[str]) -> Iterator[FolderEntry]:
    """Yield every non-hidden file under ``root``, recursively, in sorted order.

    Files with or without ``.dcm`` are candidates: the decoder decides what is DICOM.
    Hidden files and folders (leading dot) are skipped. Symbolic links are followed
    only while their target stays inside ``root``; a file link that leaves it is
    yielded with a refusal (so it gets a result row), a folder link that leaves it or
    loops back is logged and not entered.
    """
    root_real = os.path.realpath(root)
    seen_dirs = {root_real}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not _inside(target, root_real):
                    log.warning("not following folder link %s: it leaves %s", full, root)
                    continue
                if target in seen_dirs:
                    log.warning("not following folder link %s: already visited", full)
                    continue
                seen_dirs.add(target)
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not _inside(target, root_real):
                    yield FolderEntry(full, "symbolic link leaves the input folder; not followed")
                    continue
                if not os.path.isfile(target):
                    yield FolderEntry(full, "symbolic link to something that is not a regular file")
                    continue
            yield FolderEntry(full)


def count_folder(root: str | os.PathLike[str]) -> int:
    """How many entries :func:`iter_folder` will yield (for progress)."""
    return sum(1 for _ in iter_folder(root))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_input_folder(root: str | os.PathLike[str]) -> Path:
    """Return ``root`` as a Path, or raise ``ValueError`` with a one-line reason."""
    path = Path(root)
    if not path.exists():
        raise ValueError(f"input folder {root} does not exist")
    if not path.is_dir():
        raise ValueError(f"{root} is not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"input folder {root} is not readable")
    return path
