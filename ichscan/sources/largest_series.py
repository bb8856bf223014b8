"""The ``largest-series`` selection rule: per study, only the series with the most slices.

:class:`LargestSeriesSource` wraps the run's source (the pipeline puts it in place when the
rule is on). It reads each entry's header (pixel data not read), holds the entries of a
study until the study is decided, then hands them all over: those of the chosen series as
they are, the others marked ``skip`` with a reason naming the rule, so they get a
``skipped`` row without being decoded. A study is decided when it has had no new entry for
``timeout`` seconds (live sources; the run's ``--study-timeout``) or when the source has
nothing more to give (a folder). Only slices that pass the per-file rules count; files
that fail one, have no study or cannot be read pass straight on (their row says why).

Held entries are in no ledger yet: after a crash the sources find them again (the folder
walk, the watched folder's and the store's scan at start). A stop drops them the same way;
the next run finds them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ichscan.dicom import is_ours_or_directory, read_header
from ichscan.rules import choose_series, largest_series_reason
from ichscan.sources.base import Entry, Source

if TYPE_CHECKING:
    from ichscan.pipeline.run import Pipeline
    from ichscan.records import SliceResult
    from ichscan.rules import SelectionRules

log = logging.getLogger(__name__)

#: Entries taken from the wrapped source per poll: held entries use no decoder slot.
_POLL_CHUNK = 256
#: Studies whose series counts are remembered after they were decided (for late slices).
_DECIDED_KEPT = 10000


class _Study:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}  # path -> entry, arrival order; a repeat replaces
        self.series: dict[str, str] = {}  # path -> series of the entries that count
        self.last_seen = 0.0


class LargestSeriesSource:
    """A :class:`~ichscan.sources.base.Source` that hands over ``inner``'s entries a study at
    a time, marking those outside each study's largest series (see the module docstring)."""

    def __init__(self, inner: Source, rules: SelectionRules, timeout: float):
        self.inner = inner
        self.rules = rules
        self.timeout = timeout
        self.live = inner.live
        self._held: dict[str, _Study] = {}  # study -> what waits, first seen first
        self._ready: list[Entry] = []
        #: Slices per series of studies decided (a late slice is decided with them).
        self._decided: dict[str, dict[str, int]] = {}
        self._stopped = False

    # -- Source --------------------------------------------------------------------------

    def open(self, pipeline: Pipeline) -> None:
        self.inner.open(pipeline)

    def poll(self, now: float, limit: int) -> list[Entry]:
        if not self._stopped and not self.inner.finished:
            # Held entries take no decoder slot: take more than ``limit``, but none while
            # the decoders are full (a source may block for work when asked for some).
            for entry in self.inner.poll(now, _POLL_CHUNK if limit > 0 else 0):
                self._take(entry, now)
        if self._stopped:
            return []
        done = self.inner.finished
        for study in [uid for uid, s in self._held.items() if done or now - s.last_seen >= self.timeout]:
            self._decide(study)
        out, self._ready = self._ready[:limit], self._ready[limit:]
        return out

    def wait(self, timeout: float) -> None:
        self.inner.wait(timeout)

    def stop(self) -> None:
        self.inner.stop()
        held = sum(len(s.entries) for s in self._held.values())
        if held:
            log.info("largest-series: %d files of undecided studies are left for the next run", held)
        self._held.clear()
        self._stopped = True

    @property
    def finished(self) -> bool:
        return self.inner.finished and not self._held and not self._ready

    def on_results(self, results: list[SliceResult]) -> None:
        self.inner.on_results(results)

    def close(self) -> None:
        self.inner.close()

    # -- deciding --------------------------------------------------------------------------

    def _take(self, entry: Entry, now: float) -> None:
        header = None if entry.refusal or entry.skip else read_header(entry.path)
        instance, ds = header or (None, None)
        if instance is None or not (instance.study_instance_uid and instance.series_instance_uid) or is_ours_or_directory(ds) or self.rules.failure(ds):
            self._ready.append(entry)  # not a candidate: the decoder gives its row
            return
        study = self._held.setdefault(instance.study_instance_uid, _Study())
        before = study.entries.pop(entry.path, None)  # a repeat (a rescan, a rewrite) replaces the entry
        if before is None or (before.size, before.mtime_ns) != (entry.size, entry.mtime_ns):
            study.last_seen = now  # a rescan offering a held file again is no news: the study stays quiet
        study.entries[entry.path] = Entry(entry.path, entry.refusal, entry.size, entry.mtime_ns, instance=instance)
        study.series[entry.path] = instance.series_instance_uid

    def _decide(self, uid: str) -> None:
        study = self._held.pop(uid)
        counts = dict(self._decided.pop(uid, {}))
        for series in study.series.values():
            counts[series] = counts.get(series, 0) + 1
        log.info("largest-series: study %s: series %s chosen (%s)", uid, choose_series(counts),
                 ", ".join(f"{s}: {n}" for s, n in sorted(counts.items(), key=lambda c: -c[1])))
        self._decided[uid] = counts
        while len(self._decided) > _DECIDED_KEPT:
            del self._decided[next(iter(self._decided))]
        for path, entry in study.entries.items():
            why = largest_series_reason(study.series[path], counts)
            if why:
                entry = Entry(entry.path, entry.refusal, entry.size, entry.mtime_ns, skip=why, instance=entry.instance)
            self._ready.append(entry)
