"""The one route from a source to the reporters, the same for every command.

::

    source -> ledger (queued) -> decode workers -> series context -> batcher
           -> screener -> overlay writer -> ledger (done) -> reporters

:class:`Pipeline` runs it for any :class:`~ichscan.sources.base.Source`: a finite source
(a folder) simply has no latency bound and ends when it is exhausted; a live one runs
until it is stopped. With a ledger, a file is recorded as queued before a worker sees it
and its result is committed before any reporter does, so a crash at any moment means
"screen it again", never "forget it" or "report it twice".
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ichscan.dicom import DEFAULT_LIMITS, DecodeLimits
from ichscan.logs import uid_fields
from ichscan.state.ledger import FileIdentity, Ledger
from ichscan.overlay import OverlayWriter
from ichscan.pipeline.batcher import MicroBatcher
from ichscan.pipeline.decode import DecodePool
from ichscan.pipeline.progress import Progress
from ichscan.pipeline.screener import Screener
from ichscan.pipeline.series import ContextSlice, SeriesAssembler, WholeSeries
from ichscan.pipeline.sizing import cpu_count
from ichscan.records import SliceResult, Status
from ichscan.reporting import ReporterSet, RunSummary, StudySummary, StudyTable
from ichscan.rows import result_row
from ichscan.rules import SelectionRules
from ichscan.shm import default_transfer
from ichscan.sources.base import Entry, FiniteSource, Source
from ichscan.sources.largest_series import LargestSeriesSource

if TYPE_CHECKING:
    from ichscan.metrics import RunMetrics

log = logging.getLogger(__name__)

#: How often a live run wakes up at most (settling files, timeouts, the source's health).
TICK_S = 0.25


@dataclass
class LiveSummary(RunSummary):
    """Counts of one live run (this process only; the ledger has all runs)."""

    studies_summarised: int = 0
    quarantined: int = 0


class StudyClock:
    """Which studies have gone quiet for ``timeout`` seconds since their last result.

    A study with files still in the pipeline (``busy``) is not quiet, however long its
    screening takes: with a backlog longer than ``timeout``, it would otherwise be summarised
    with part of its slices and revised later (its clock starts again instead)."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.last_seen: dict[str, float] = {}

    def touch(self, uids: Iterable[str], now: float) -> None:
        for uid in uids:
            self.last_seen[uid] = now

    def due_in(self, now: float) -> float | None:
        if not self.last_seen:
            return None
        return max(0.0, min(self.last_seen.values()) + self.timeout - now)

    def quiet(self, now: float, busy: Callable[[str], bool] = lambda uid: False) -> list[str]:
        due = []
        for uid, seen in list(self.last_seen.items()):
            if now - seen < self.timeout:
                continue
            if busy(uid):
                self.last_seen[uid] = now
            else:
                del self.last_seen[uid]
                due.append(uid)
        return due

    def pending(self) -> list[str]:
        out = list(self.last_seen)
        self.last_seen.clear()
        return out


def describe_study(study: StudySummary) -> str:
    """One log line per study: what was screened and the top label."""
    finding = (
        f"top {study.top_label} {study.top_probability:.2f}"
        if study.top_label != "none"
        else f"no finding (highest subtype {study.top_probability:.2f})"
    )
    return f"study {study.study_instance_uid}: {study.slices} slices, {study.positive_slices} positive, {finding}"


def log_screened(results: list[SliceResult]) -> None:
    """One log line per study (and one for files without one) of a batch of results."""
    by_study: dict[str, list[SliceResult]] = {}
    for result in results:
        by_study.setdefault(result.instance.study_instance_uid or "", []).append(result)
    for study, group in by_study.items():
        series = {r.instance.series_instance_uid for r in group}
        log.info(
            "screened %d files%s: %d ok (%d positive), %d skipped, %d error",
            len(group),
            f" of study {study}" if study else "",
            sum(r.status == Status.OK for r in group),
            sum(r.is_positive for r in group),
            sum(r.status == Status.SKIPPED for r in group),
            sum(r.status == Status.ERROR for r in group),
            extra=uid_fields(study, series.pop() if len(series) == 1 else None, group[0].instance.sop_instance_uid if len(group) == 1 else None),
        )


class Pipeline:
    """One run of the pipeline over one source (see the module docstring).

    Parameters
    ----------
    source
        Where the files come from; ``source.live`` decides the run's character.
    screener
        The model side.
    reporters
        Every reporter of the run.
    studies
        The study table (restored from the ledger for a live run or ``--resume``).
    batch_size, workers
        Model batch size and decode worker processes.
    ledger
        Records every file queued and done (``None``: no record, e.g. a library call).
    max_latency
        Seconds a partial batch waits for more slices (live sources; a finite run only
        ever runs full batches and the last one).
    study_timeout
        Live: seconds without a new result after which a study is complete.
    series_timeout
        Seconds a series must be quiet before slices with missing neighbours go
        (models with ``slice_context``; live sources).
    overlays_dir, overlays_for
        Overlay PNGs, written by a thread pool while the model goes on.
    stop
        Set to stop: the source takes nothing new, what was handed over is finished.
    rules
        Selection rules (:mod:`ichscan.rules`): files failing one get a ``skipped`` row
        naming it; ``None`` screens every CT image. With ``largest-series`` on, the source
        is wrapped in a :class:`~ichscan.sources.largest_series.LargestSeriesSource`.
    metrics
        Counts, latencies and queue depths for ``--metrics-port``
        (:class:`ichscan.metrics.RunMetrics`); ``None`` (``batch``, library calls): none.
    """

    def __init__(
        self,
        source: Source,
        screener: Screener,
        reporters: ReporterSet,
        studies: StudyTable,
        *,
        batch_size: int,
        workers: int,
        ledger: Ledger | None = None,
        limits: DecodeLimits = DEFAULT_LIMITS,
        max_latency: float = 1.0,
        study_timeout: float = 60.0,
        series_timeout: float = 10.0,
        overlays_dir=None,
        overlays_for: str = "positive",
        progress: Progress | None = None,
        transfer: str | None = None,
        overlay_threads: int | None = None,
        stop: threading.Event | None = None,
        summary: RunSummary | None = None,
        rules: SelectionRules | None = None,
        metrics: RunMetrics | None = None,
    ):
        if rules is not None and rules.largest_series_only:
            source = LargestSeriesSource(source, rules, study_timeout if source.live else math.inf)
        self.source = source
        self.metrics = metrics
        self.live = bool(source.live)
        self.screener = screener
        self.reporters = reporters
        self.studies = studies
        self.ledger = ledger
        self.batch_size = batch_size
        self.stop_event = stop or threading.Event()
        self.summary = summary or (LiveSummary() if self.live else RunSummary())
        self.progress = progress or Progress(enabled=False)
        self.clock = StudyClock(study_timeout)
        self.in_flight: dict[str, int | None] = {}  # path -> ledger row id
        # In-flight paths whose study is known (from the source, or once decoded), per study:
        # a study with files still in the pipeline is not quiet.
        self._study_of: dict[str, str] = {}
        self._busy_studies: Counter[str] = Counter()
        self.exclusions = None  # set by the command: our own outputs (sources skip them)
        self.series = SeriesAssembler(screener.context, series_timeout if self.live else math.inf)
        # A model with a series head refines whole series: screened slices wait here.
        self.whole = WholeSeries(series_timeout if self.live else math.inf) if screener.series_head else None
        self.batcher = MicroBatcher(batch_size, max_latency if self.live else math.inf)
        # On the CPU the workers also resize to the model's input size: that balances the
        # cores (the model process is the slower side) and shrinks what crosses the pipe.
        # A GPU resizes faster itself, so there the workers hand over full-size pixels.
        # Framing on the head happens before the resize: in the workers on any device.
        resize_to = screener.settings.size if screener.device.type == "cpu" or screener.settings.crop else None
        self.pool = DecodePool(
            workers,
            limits,
            chunk_size=max(1, min(8, batch_size)) if self.live else 8,
            resize_to=resize_to,
            crop=screener.settings.crop,
            display=overlays_dir is not None,
            transfer=transfer or default_transfer(screener.device.type),
            batch_size=batch_size,
            rules=rules,
            on_chunk=metrics.decode_chunk if metrics is not None else None,
        )
        # At most two batches of overlays in flight: the model runs one batch ahead of them.
        self.overlays = (
            OverlayWriter(overlays_dir, overlays_for, threads=overlay_threads or cpu_count(), max_pending=2 * batch_size)
            if overlays_dir is not None
            else None
        )
        log.debug(
            "decoding: %d workers, chunks of %d files, up to %d chunks in flight, transfer %s, "
            "resized in the workers to %s; overlays: %s; slice context %d",
            self.pool.workers,
            self.pool.chunk_size,
            self.pool.max_in_flight,
            self.pool.transfer,
            resize_to or "no",
            f"{overlays_for} by {self.overlays.threads} threads" if self.overlays is not None else "none",
            screener.context,
        )

    # -- the loop ------------------------------------------------------------------------

    def run(self, engine: Callable[[Pipeline], None] | None = None) -> RunSummary:
        """Run until the source is finished (or stopped) and everything handed over is reported.

        ``engine`` moves the files from the source to :meth:`deliver` (default
        :meth:`stream`, this machine's decode workers and model); the Ray engine
        (:mod:`ichscan.pipeline.ray_engine`) is another. Opening and closing the source,
        the overlays, the end of the run and a second Ctrl-C are the same for both.
        """
        start = time.monotonic()
        source = self.source
        try:
            source.open(self)
            (engine or Pipeline.stream)(self)
            if self.overlays is not None:
                for done in self.overlays.drain():
                    self.report(done)
        except KeyboardInterrupt:
            # A second Ctrl-C: what was screened is reported and the files are closed
            # properly; files still in flight get no row now (the ledger has them queued).
            self.summary.interrupted = True
            if self.overlays is not None:
                try:  # screened rows whose overlays are being written: finish those (bounded)
                    pending = self.overlays.drain()
                except KeyboardInterrupt:  # again: the rows, without the overlays not started
                    pending = self.overlays.abandon()
                for done in pending:
                    self.report(done)
        finally:
            self.pool.close()
            if self.overlays is not None:
                self.overlays.close()
            source.close()
        self.summary.seconds = time.monotonic() - start
        self.finish()
        return self.summary

    def stream(self) -> None:
        """The local engine: decode workers and the model on this machine, until the
        source is finished and nothing handed over is held."""
        source, stopping = self.source, False
        while True:
            now = time.monotonic()
            if self.stop_event.is_set() and not stopping:
                stopping = True
                self.summary.interrupted = not self.live
                source.stop()
            if not source.finished:
                # Polled even when the workers are busy (limit 0): a live source keeps
                # up with its events and health checks meanwhile.
                self.hand_over(source.poll(now, self.pool.free_slots()))
            held = self.pool.pending or len(self.series) or len(self.batcher) or len(self.whole or ())
            if source.finished and not held:
                break
            if self.metrics is not None:
                self.metrics.tick(now, self.queue_depths)
            now = self._advance(source)
            self.report_overlaid()
            if self.live:
                quiet = self.clock.quiet(time.monotonic(), self._busy_studies.__contains__)
                if quiet:
                    self.complete_studies(quiet)

    def _advance(self, source: Source) -> float:
        """Collect decoded slices, form what batches are due and screen them.

        A method of its own so that its references to decoded slices end with it: a
        slice's pixels may be views of a shared-memory slab, which the decode workers can
        reuse only once no view is left (a slab held a loop longer is a chunk pickled).
        """
        decoded = self._wait(source, time.monotonic())
        now = time.monotonic()
        final = source.finished and not self.pool.pending
        if decoded:
            for piece in decoded:
                self._hold(piece.path, piece.instance.study_key)
            self.series.add(decoded, now)
        self.batcher.add(self.series.take(now, flush=final))
        # Every batch that is due: one collect may bring several chunks, and slices left
        # waiting would hold their shared-memory slabs (and memory) for nothing.
        while batch := self.batcher.take(now, force=final):
            self.screen(batch)
        if self.whole is not None and len(self.whole):
            # Only while slices wait: the busy set walks what the assembler and batcher hold.
            busy = self.series.busy() | self.batcher.series() if not final else set()
            for series in self.whole.take(now, busy, self.series.indexed, flush=final):
                started = time.perf_counter()
                self.screener.refine(series)
                if self.metrics is not None:
                    self.metrics.model_batch(time.perf_counter() - started, len(series), "refine")
                self.deliver(series)
        return now

    def _wait(self, source: Source, now: float) -> list:
        """Decoded slices, waiting as long as nothing else is due."""
        if self.live:
            dues = [TICK_S, self.batcher.due_in(now), self.series.due_in(now), self.clock.due_in(now)]
            if self.whole is not None:
                dues.append(self.whole.due_in(now))
            wait = min(d for d in dues if d is not None)
        else:
            wait = None  # a finite run: nothing is due but the next decoded chunk
        if self.pool.pending:
            return self.pool.collect(wait)
        if not source.finished and wait is not None and wait > 0:
            source.wait(wait)
        return []

    def queue_depths(self) -> tuple[dict[str, int], int]:
        """Instances held per stage, and the series waiting for neighbours (for metrics)."""
        stages = {
            "decode": self.pool.pending,
            "series_context": len(self.series),
            "batcher": len(self.batcher),
            "whole_series": len(self.whole or ()),
            "overlays": self.overlays.pending if self.overlays is not None else 0,
        }
        return stages, self.series.waiting_series()

    # -- steps ---------------------------------------------------------------------------

    def hand_over(self, entries: list[Entry]) -> None:
        """Queue entries in the ledger (before a worker sees them), then to the decoders."""
        if not entries:
            return
        self.queue(entries)
        self.pool.submit(entries)

    def _hold(self, path: str, study: str) -> None:
        if study and path not in self._study_of:
            self._study_of[path] = study
            self._busy_studies[study] += 1

    def _release(self, path: str) -> None:
        study = self._study_of.pop(path, None)
        if study is not None:
            self._busy_studies[study] -= 1
            if self._busy_studies[study] <= 0:
                del self._busy_studies[study]

    def queue(self, entries: list[Entry]) -> None:
        """Record entries as queued (ledger) and in flight: each then gets its row once."""
        for entry in entries:
            self._hold(entry.path, entry.study)
        if self.ledger is not None:
            ids = self.ledger.queue([FileIdentity(e.path, e.size, e.mtime_ns) for e in entries])
            self.in_flight.update(ids)
        else:
            self.in_flight.update((e.path, None) for e in entries)
        if self.metrics is not None:
            self.metrics.files_queued(len(entries))

    def screen(self, batch: list[ContextSlice]) -> None:
        started = time.perf_counter()
        results = self.screener.screen([c.slice for c in batch], [c.neighbours for c in batch])
        if self.metrics is not None:
            self.metrics.model_batch(time.perf_counter() - started, len(batch))
        if self.whole is not None:
            self.whole.add(results, time.monotonic())  # refined by series in _advance
            return
        self.deliver(results)

    def deliver(self, results: list[SliceResult]) -> None:
        """Screened results: overlays (when asked for), then the report."""
        for done in self.overlays.submit(results) if self.overlays is not None else [results]:
            self.report(done)

    def report_overlaid(self) -> None:
        """Report the results whose overlays are on disk now."""
        if self.overlays is not None:
            for done in self.overlays.ready():
                self.report(done)

    def report(self, results: list[SliceResult]) -> None:
        """Ledger first, then the study table and the reporters; then the pixels go."""
        if not results:
            return
        if self.ledger is not None:
            rows = []
            for result in results:
                row_id = self.in_flight.pop(result.path, None)
                if row_id is None:  # cannot happen: every decoded path was handed over by us
                    log.error("internal: result for %s that was not in flight", result.path)
                    continue
                rows.append((row_id, result, result_row(result)))
            self.ledger.record(rows)
        else:
            for result in results:
                self.in_flight.pop(result.path, None)
        for result in results:
            self._release(result.path)
        self.studies.add(results)
        self.summary.count(results)
        if self.metrics is not None:
            self.metrics.results(results)
        if self.live:
            self.clock.touch({r.instance.study_key for r in results if r.status == Status.OK}, time.monotonic())
        self.reporters.on_results(results, self.studies)
        for result in results:
            result.drop_image()
        self.progress.update(len(results))
        self.source.on_results(results)
        if self.live:
            log_screened(results)

    def complete_studies(self, uids: list[str], final: bool = True) -> None:
        """These studies are complete: reporters write their DICOM results and study rows.

        ``final`` false (a live run stopping): the studies still within --study-timeout
        get their study rows only; the next run completes them once they go quiet.
        """
        uids = sorted(uid for uid in uids if uid in self.studies.studies)
        if not uids:
            return
        if final:
            # DICOM results before the ledger says "summarised": after a crash in between,
            # the study is completed again and the outbox sees nothing new.
            self.studies.complete.update(uids)
            self.reporters.on_study_complete(uids, self.studies)
            if self.ledger is not None:
                self.ledger.mark_summarised(uids)
            if self.metrics is not None:
                self.metrics.studies_completed(len(uids))
        if isinstance(self.summary, LiveSummary):
            self.summary.studies_summarised += len(uids)
            for uid in uids:
                log.info("%s", describe_study(self.studies.studies[uid]), extra=uid_fields(study=uid))

    def finish(self) -> None:
        if self.live:
            # A clean stop: studies still waiting for their timeout get their rows (only).
            self.complete_studies(self.clock.pending(), final=False)
        elif not self.summary.interrupted:
            # A folder run is complete at its end; an interrupted one may have cut studies.
            self.complete_studies(list(self.studies.studies))
        self.reporters.on_finish(self.summary, self.studies)
        self.progress.close()


# -- library use ------------------------------------------------------------------------------


def run_stream(
    entries: Iterable[Entry | str],
    screener: Screener,
    reporters: ReporterSet,
    *,
    batch_size: int,
    workers: int,
    **kwargs,
) -> tuple[RunSummary, StudyTable]:
    """Screen every entry through the pipeline, without a ledger; for library callers.

    Keyword arguments are those of :class:`Pipeline`.
    """
    studies = StudyTable(screener.thresholds)
    pipeline = Pipeline(FiniteSource(entries), screener, reporters, studies, batch_size=batch_size, workers=workers, **kwargs)
    return pipeline.run(), studies


# -- signals --------------------------------------------------------------------------------


@contextmanager
def stop_on_signals(stop: threading.Event, what: str = "finishing the files in flight, then stopping") -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop``; a second one acts as usual (Ctrl-C: KeyboardInterrupt).

    Installed only in the main thread; elsewhere (tests, embedding) set ``stop`` yourself.
    """
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, frame: object) -> None:
            log.warning("%s: %s", signal.Signals(signum).name, what)
            stop.set()
            # A second signal acts at once: the ledger still guarantees nothing is lost.
            for sig, handler in previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
