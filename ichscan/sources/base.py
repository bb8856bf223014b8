"""What a source is: something that finds or receives instances and hands over complete files.

A source never decodes or screens: it says which paths are ready (complete on disk), and
the pipeline (:mod:`ichscan.pipeline.run`) does the rest, the same way for every source.
Built-in sources: the folder walk (``batch``), the folder watch (``watch``) and the
C-STORE receiver (``serve-scp``). A plugin adds one with ``ichscan_register_sources``.
"""

from __future__ import annotations

import os

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ichscan.pipeline.run import Pipeline
    from ichscan.records import Instance, SliceResult


@dataclass(frozen=True)
class Entry:
    """A file to screen, or one refused before reading (``refusal`` says why).

    ``size`` and ``mtime_ns`` identify the version of the file that was handed over
    (the ledger screens a path again when they change); ``-1`` when not known.
    ``skip``: a reason to give the file a ``skipped`` row without decoding it (a selection
    rule decided on its header, e.g. ``largest-series``), its identity in ``instance``.
    ``study``: its StudyInstanceUID when the source knows it before decoding (a receiver's
    store path), so the study does not go quiet while the file waits to be screened.
    """

    path: str
    refusal: str = ""
    size: int = -1
    mtime_ns: int = -1
    skip: str = ""
    instance: Instance | None = field(default=None, compare=False, repr=False)
    study: str = field(default="", compare=False)


def stored_entry(path: str) -> Entry | None:
    """An entry with the identity (size, mtime) of a file a receiver stored, and its study
    (``STORE/<study>/<series>/<sop>.dcm``); None if it is gone."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return Entry(path, "", st.st_size, st.st_mtime_ns, study=os.path.basename(os.path.dirname(os.path.dirname(path))))


#: The former name of :class:`Entry`.
FolderEntry = Entry


@runtime_checkable
class Source(Protocol):
    """The protocol every source follows; the runner calls these from one thread.

    Attributes
    ----------
    live
        ``True`` for a source that runs until it is stopped (outputs then grow across
        runs, studies are completed when they go quiet); ``False`` for a finite one.
    """

    live: bool

    def open(self, pipeline: Pipeline) -> None:
        """Start: begin watching or listening. ``pipeline`` gives access to the ledger
        (``pipeline.ledger``), the run's own outputs (``pipeline.exclusions``) and the
        paths being screened (``pipeline.in_flight``)."""

    def poll(self, now: float, limit: int) -> list[Entry]:
        """At most ``limit`` entries that are ready now (``limit`` may be 0: the decoders
        are busy, but a live source may look after its events); never blocks."""

    def wait(self, timeout: float) -> None:
        """Block until something may be ready, at most ``timeout`` seconds."""

    def stop(self) -> None:
        """The run is stopping: accept nothing new (a receiver finishes the associations
        in progress; what they store is still handed over)."""

    @property
    def finished(self) -> bool:
        """Nothing more will come: a finite source has handed over everything, or a
        stopped one has handed over what it accepted."""

    def on_results(self, results: list[SliceResult]) -> None:
        """Results of entries this source handed over, once they are recorded (e.g. to
        move error files to a quarantine)."""

    def close(self) -> None:
        """Release what :meth:`open` started."""


class FiniteSource:
    """A source that hands over the entries of an iterable, then is finished.

    Subclasses set :attr:`entries` in :meth:`open` (or pass them in) and may override
    :meth:`accept` to skip or change an entry on its way out.
    """

    live = False

    def __init__(self, entries: Iterable[Entry | str] = ()):
        self.entries: Iterator[Entry | str] = iter(entries)
        self._finished = False

    def open(self, pipeline: Pipeline) -> None:
        pass

    def accept(self, entry: Entry) -> Entry | None:
        """The entry to hand over (``None``: skip it)."""
        return entry

    def poll(self, now: float, limit: int) -> list[Entry]:
        chunk: list[Entry] = []
        if limit <= 0:
            return chunk
        for item in self.entries:
            entry = self.accept(Entry(item) if isinstance(item, str) else item)
            if entry is not None:
                chunk.append(entry)
                if len(chunk) >= limit:
                    return chunk
        self._finished = True
        return chunk

    def wait(self, timeout: float) -> None:
        pass

    def stop(self) -> None:
        self._finished = True

    @property
    def finished(self) -> bool:
        return self._finished

    def on_results(self, results: list[SliceResult]) -> None:
        pass

    def close(self) -> None:
        pass
