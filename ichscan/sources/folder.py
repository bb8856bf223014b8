"""Walk a PACS-style folder tree for candidate DICOM files."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ichscan.sources.base import Entry, FiniteSource, FolderEntry

if TYPE_CHECKING:
    from ichscan.pipeline.run import Pipeline

__all__ = ["Entry", "FolderEntry", "FolderSource", "Outputs", "check_input_folder", "count_folder", "iter_folder"]

log = logging.getLogger(__name__)


class Outputs:
    """Our own output files and folders: never screened when they lie inside the input."""

    def __init__(self, files: Iterable[str | os.PathLike[str]] = (), folders: Iterable[str | os.PathLike[str]] = ()):
        self.files = {os.path.realpath(p) for p in files}
        self.folders = [os.path.realpath(p) for p in folders]
        #: Names the output files have (a link to one may have another: see iter_folder).
        self.file_names = {os.path.basename(p) for p in files} | {os.path.basename(p) for p in self.files}

    def __contains__(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real in self.files or any(real == d or real.startswith(d + os.sep) for d in self.folders)

    def __bool__(self) -> bool:
        return bool(self.files or self.folders)


def iter_folder(root: str | os.PathLike[str], outputs: Outputs | None = None) -> Iterator[FolderEntry]:
    """Yield every non-hidden file under ``root``, recursively, in sorted order.

    Files with or without ``.dcm`` are candidates: the decoder decides what is DICOM.
    Hidden files and folders (leading dot) are skipped, and so are ``outputs`` (ours).
    A folder that cannot be read is yielded with a refusal (so it gets a result row
    instead of vanishing). Symbolic links are followed only while their target stays
    inside ``root``; a file link that leaves it is yielded with a refusal, a folder link
    that leaves it or loops back is logged and not entered, and so is a folder link to a
    folder inside ``root`` that the walk reaches under its own path anyway (its files
    would otherwise be screened twice).
    """
    root_real = os.path.realpath(root)
    seen_dirs = {root_real}
    outputs = outputs or Outputs()
    unreadable: list[OSError] = []

    def refused_folders() -> Iterator[FolderEntry]:
        while unreadable:
            exc = unreadable.pop(0)
            yield FolderEntry(str(exc.filename), f"cannot read folder: {exc.strerror or exc}")

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable.append):
        yield from refused_folders()
        kept = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if outputs and full in outputs:
                continue
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not _inside(target, root_real):
                    log.warning("not following folder link %s: it leaves %s", full, root)
                    continue
                if target in seen_dirs:
                    log.warning("not following folder link %s: already visited", full)
                    continue
                if not _hidden(os.path.relpath(target, root_real)):
                    log.info("not following folder link %s: %s is screened under its own path", full, target)
                    continue
                seen_dirs.add(target)
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            # By name first: resolving every file's path would cost the walk a stat per
            # folder level (output folders are pruned above, so only files are checked).
            if (name in outputs.file_names or os.path.islink(full)) and full in outputs:
                continue
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not _inside(target, root_real):
                    yield FolderEntry(full, "symbolic link leaves the input folder; not followed")
                    continue
                if not os.path.exists(target):
                    yield FolderEntry(full, "broken symbolic link (its target does not exist)")
                    continue
                if not os.path.isfile(target):
                    yield FolderEntry(full, "symbolic link to something that is not a regular file")
                    continue
            yield FolderEntry(full)
    yield from refused_folders()


def count_folder(root: str | os.PathLike[str], outputs: Outputs | None = None) -> int:
    """How many entries :func:`iter_folder` will yield (for progress)."""
    return FolderSource(root).count(outputs)


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in Path(relative).parts)


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


class FolderSource(FiniteSource):
    """The folder walk as a finite source (``ichscan batch``).

    Each file is stat'ed when handed over (its identity in the ledger). With
    ``resume``, files the ledger has screened under the same identity are skipped.
    With a model that looks at neighbouring slices, the headers are read first and the
    files handed over series by series in position order, so that a slice's neighbours
    are decoded close together and the pixels held stay few.
    """

    def __init__(self, root: str | os.PathLike[str], *, resume: bool = False, by_series: bool = True):
        super().__init__()
        self.root = root
        self.resume = resume
        #: Hand files over series by series for a model with slice context (the local
        #: engine); the Ray engine groups series on the cluster instead.
        self.by_series = by_series
        self.resumed = 0
        self._ledger = None

    def open(self, pipeline: Pipeline) -> None:
        self._ledger = pipeline.ledger if self.resume else None
        entries: Iterable[Entry] = self.walk(pipeline.exclusions)
        if self.by_series and pipeline.series.context > 0:
            entries = order_by_series(list(entries), pipeline.series)
        self.entries = iter(entries)

    def walk(self, outputs: Outputs | None = None) -> Iterator[Entry]:
        """Every candidate file, our own ``outputs`` left out."""
        return iter_folder(self.root, outputs)

    def count(self, outputs: Outputs | None = None) -> int:
        """How many entries :meth:`walk` yields (for progress)."""
        return sum(1 for _ in self.walk(outputs))

    def accept(self, entry: Entry) -> Entry | None:
        entry = _with_identity(entry)
        if self._ledger is not None and not entry.refusal:
            from ichscan.state.ledger import FileIdentity

            if self._ledger.is_done(FileIdentity(entry.path, entry.size, entry.mtime_ns)) is not None:
                self.resumed += 1
                return None
        return entry


def _with_identity(entry: Entry) -> Entry:
    if entry.refusal or entry.size >= 0:
        return entry
    try:
        st = os.stat(entry.path)
    except OSError:
        return entry  # the decoder says what is wrong with it
    return Entry(entry.path, "", st.st_size, st.st_mtime_ns)


def order_by_series(entries: list[Entry], series) -> list[Entry]:
    """Entries series by series (first seen first), each in position order; the series
    announced to ``series`` (a :class:`~ichscan.pipeline.series.SeriesAssembler`).
    Files whose header gives no series or position keep their order, at the end."""
    from ichscan.dicom import read_header_instance

    placed: dict[str, list[tuple[float, Entry]]] = {}
    rest: list[Entry] = []
    for entry in entries:
        instance = None if entry.refusal else read_header_instance(entry.path)
        if instance is None or not instance.series_instance_uid or instance.position is None:
            rest.append(entry)
            continue
        placed.setdefault(instance.series_instance_uid, []).append((instance.position, entry))
        series.expect(instance.series_instance_uid, entry.path, instance.position, instance.spacing)
    ordered = [entry for members in placed.values() for _, entry in sorted(members, key=lambda m: m[0])]
    log.debug("read %d headers: %d series, %d files without series geometry", len(entries), len(placed), len(rest))
    return ordered + rest
