"""``ichscan watch``: screen files as they land in a folder, exactly once, across crashes.

The run loop ties together the folder watcher (:mod:`ichscan.sources.watch`), the
SQLite ledger (:mod:`ichscan.state.ledger`), streaming decode workers and micro-batches
(:mod:`ichscan.engine`) and the reporters:

1. events, the startup scan and periodic rescans make *candidates*; a candidate the
   ledger has screened under the same identity (path, size, mtime) is dropped;
2. a candidate whose size and mtime stay unchanged for ``settle`` seconds is recorded
   as ``queued`` in the ledger and handed to a decode worker;
3. decoded slices form a batch that goes to the model when full or after
   ``max_latency`` seconds;
4. each batch's results are committed to the ledger, *then* handed to the reporters
   (the CSV appends its rows); error files are moved to the quarantine folder;
5. a study with no new instance for ``study_timeout`` seconds gets its summary row.

On start the results CSV is reconciled with the ledger (torn last line cut, missing
rows appended), so a SIGKILL at any moment loses nothing and duplicates nothing.
SIGINT/SIGTERM finish the files in flight, write the study rows, close the ledger.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from ichscan.batch import RunError, collect_reporters, default_studies_out, prepare_folder, prepare_output_file
from ichscan.default_plugins.csv_report import RESULT_COLUMNS, result_row, write_studies_csv
from ichscan.dicom import DEFAULT_LIMITS, ERROR, DecodeLimits
from ichscan.engine import (
    MicroBatcher,
    StreamingDecodePool,
    prepare_screening,
    screen_decoded,
)
from ichscan.state import DEFAULT_STATE_NAME, FileIdentity, Ledger, LedgerError, StateStore, reconcile_csv, state_files
from ichscan.overlay import OVERLAY_CHOICES
from ichscan.plugins import get_plugin_manager
from ichscan.reporting import ReporterSet, ResultsOutput, RunConfig, RunSummary, SliceResult, StudySummary, StudyTable
from ichscan.shm import default_transfer
from ichscan.sources.folder import Outputs, check_input_folder
from ichscan.sources.watch import FolderWatcher, IgnoredLog, Settler, classify, is_temporary, scan_tree

log = logging.getLogger(__name__)

#: How often the loop wakes up at most to look at settling files, timeouts and the folder.
_TICK_S = 0.25
#: How often the watched folder itself is checked (removed, recreated, observer dead).
_HEALTH_S = 1.0
#: Rescan interval while events are unavailable (watch limits, folder gone).
_FALLBACK_RESCAN_S = 5.0


@dataclass
class WatchOptions:
    """Settings of ``ichscan watch`` (see ``ichscan watch --help``)."""

    input_dir: Path
    out: Path = Path("results.csv")
    studies_out: Path | None = None  # default: <out stem>_studies.csv beside out
    state: Path | None = None  # default: ichscan-state.sqlite beside out
    overlays_dir: Path | None = None  # default: overlays/ beside out
    overlays_for: str = "positive"
    quarantine_dir: Path | None = None
    poll: bool = False
    poll_interval: float = 1.0
    settle: float = 2.0
    max_latency: float = 1.0
    rescan_interval: float = 60.0
    study_timeout: float = 60.0
    #: With a model that needs neighbouring slices: seconds a series must be quiet before
    #: its slices with missing neighbours are screened anyway.
    series_timeout: float = 10.0
    weights: Path | None = None
    model_name: str | None = None
    thresholds: dict[str, float] | None = None
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    threads: int | None = None
    plugins_dirs: tuple[Path, ...] = ()
    limits: DecodeLimits = DEFAULT_LIMITS
    results: ResultsOutput = field(default_factory=ResultsOutput)
    options: dict = field(default_factory=dict)


@dataclass
class WatchSummary(RunSummary):
    """Counts of one ``ichscan watch`` run (this process only; the ledger has all runs)."""

    studies_summarised: int = 0
    quarantined: int = 0
    csv_rows_restored: int = 0
    csv_torn_bytes: int = 0


def default_state(out: Path) -> Path:
    return out.with_name(DEFAULT_STATE_NAME)


class _StudyClock:
    """Which studies have gone quiet for ``timeout`` seconds with unwritten results."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.last_seen: dict[str, float] = {}  # studies with results not yet in the study CSV

    def touch(self, uids: set[str], now: float) -> None:
        for uid in uids:
            self.last_seen[uid] = now

    def quiet(self, now: float) -> list[str]:
        due = [uid for uid, seen in self.last_seen.items() if now - seen >= self.timeout]
        for uid in due:
            del self.last_seen[uid]
        return due

    def pending(self) -> list[str]:
        out = list(self.last_seen)
        self.last_seen.clear()
        return out


class Watcher:
    """One ``ichscan watch`` run; :func:`run_watch` is the entry point."""

    def __init__(self, opts: WatchOptions, pm: pluggy.PluginManager | None, stop: threading.Event | None):
        self.opts = opts
        self.stop_event = stop or threading.Event()
        self.summary = WatchSummary()
        try:
            check_input_folder(opts.input_dir)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        if opts.overlays_for not in OVERLAY_CHOICES:
            raise RunError(f"--overlays-for must be one of {', '.join(OVERLAY_CHOICES)}")
        for name in ("settle", "max_latency", "study_timeout", "poll_interval"):
            if getattr(opts, name) < 0:
                raise RunError(f"--{name.replace('_', '-')} must not be negative")
        # Absolute paths: the process runs for days and results must name files unambiguously.
        self.root = os.path.abspath(opts.input_dir)
        self.out = Path(os.path.abspath(opts.out))
        self.studies_out = Path(os.path.abspath(opts.studies_out or default_studies_out(self.out)))
        self.state = Path(os.path.abspath(opts.state or default_state(self.out)))
        self.overlays_dir: Path | None = None
        if opts.overlays_for != "none":
            self.overlays_dir = Path(os.path.abspath(opts.overlays_dir or self.out.parent / "overlays"))
        self.quarantine = Path(os.path.abspath(opts.quarantine_dir)) if opts.quarantine_dir else None
        results = opts.results
        self.html = Path(os.path.abspath(results.html)) if results.html else None
        self.dicom_out = Path(os.path.abspath(results.dicom_out)) if results.dicom_out else None
        if self.html is not None:
            prepare_output_file(self.html, "--html")
        if self.dicom_out is not None:
            prepare_folder(self.dicom_out, "--dicom-out folder")
        prepare_output_file(self.out, "--out")
        prepare_output_file(self.studies_out, "--studies-out")
        prepare_output_file(self.state, "--state")
        for folder, what in ((self.overlays_dir, "overlays folder"), (self.quarantine, "quarantine folder")):
            if folder is not None:
                prepare_folder(folder, what)
        if self.quarantine is not None and os.path.realpath(self.root) == os.path.realpath(self.quarantine):
            raise RunError("--quarantine must not be the watched folder itself")
        from ichscan.default_plugins.dicom_report import OUTBOX_FOLDER_NAME

        outbox = self.dicom_out or (self.state.parent / OUTBOX_FOLDER_NAME if results.forward else None)
        self.exclusions = Outputs(
            [p for p in (self.out, self.studies_out, self.html, *state_files(self.state)) if p is not None],
            [p for p in (self.overlays_dir, self.quarantine, outbox) if p is not None],
        )
        self.pm = pm or get_plugin_manager(opts.plugins_dirs)
        self.ignored = IgnoredLog()
        self.settler = Settler(opts.settle)
        # Settled, not yet handed to a worker; by path, so a file settling twice is queued once.
        self.backlog: OrderedDict[str, FileIdentity] = OrderedDict()
        self.in_flight: dict[str, int] = {}  # path -> ledger row id
        self.studies_clock = _StudyClock(opts.study_timeout)

    # -- set-up ----------------------------------------------------------------------

    def open(self) -> None:
        try:
            # The one connection to the state file, held for the whole run: the ledger
            # here and the DICOM results reporter (config.store) share it.
            self.store = StateStore(self.state)
        except LedgerError as exc:
            raise RunError(str(exc)) from None
        self.ledger = Ledger(self.store)
        try:
            self._restore()
            self._load_model()
        except BaseException:
            self.store.close()
            raise

    def _restore(self) -> None:
        """Reconcile the CSV with the ledger; settle what was in flight at the last stop."""
        try:
            repair = reconcile_csv(self.out, self.ledger, RESULT_COLUMNS)
        except (LedgerError, OSError) as exc:
            raise RunError(f"cannot reconcile {self.out}: {exc}") from None
        self.summary.csv_torn_bytes, self.summary.csv_rows_restored = repair.torn_bytes, repair.appended
        if repair.torn_bytes:
            log.warning("cut a torn last line (%d bytes) from %s", repair.torn_bytes, self.out)
        if repair.appended:
            log.warning("restored %d rows to %s from the ledger", repair.appended, self.out)
        if repair.unknown:
            log.warning("%s holds %d rows the ledger %s does not know (another run?)", self.out, repair.unknown, self.state)
        counts = self.ledger.counts()
        if counts:
            log.info(
                "ledger %s: %d files screened before (%s)",
                self.state,
                sum(counts.values()),
                ", ".join(f"{n} {status}" for status, n in sorted(counts.items())),
            )
        vanished: list[tuple[int, SliceResult]] = []
        for entry in self.ledger.queued():
            if os.path.lexists(entry.path):
                log.info("screening again %s: it was in flight when the last run stopped", entry.path)
                continue  # the startup scan finds it; queue() reuses its row
            # Accepted (handed to the engine) but gone now: it still gets its row.
            vanished.append((entry.id, SliceResult(entry.path, ERROR, "file disappeared before it was screened")))
        if vanished:
            self._commit(vanished, reporters=None)

    def _load_model(self) -> None:
        opts = self.opts
        setup = prepare_screening(
            self.pm,
            weights=opts.weights,
            model_name=opts.model_name,
            thresholds=opts.thresholds,
            device=opts.device,
            workers=opts.workers,
            batch_size=opts.batch_size,
            threads=opts.threads,
        )
        self.screener, self.loaded, self.device = setup.screener, setup.loaded, setup.device
        self.workers, self.batch_size = setup.workers, setup.batch_size
        loaded = self.loaded
        self.studies = StudyTable(loaded.thresholds)
        self.studies.studies.update(self.ledger.study_summaries(loaded.thresholds))
        # Studies with results newer than their summary (a late instance, then a crash
        # within --study-timeout) are not summarised yet: their clock restarts too.
        self.summarised = (self.ledger.summarised_studies() - self.ledger.changed_since_summary()) & set(self.studies.studies)
        # Studies with results but no summary row yet: their clock restarts now.
        self.studies_clock.touch(set(self.studies.studies) - self.summarised, time.monotonic())
        self._write_studies()
        config = RunConfig(
            out=self.out,
            studies_out=self.studies_out,
            overlays_dir=self.overlays_dir,
            overlays_for=opts.overlays_for,
            thresholds=loaded.thresholds,
            model_name=loaded.name,
            weights=loaded.source,
            trained=loaded.trained,
            input_root=Path(self.root),
            state=self.state,
            store=self.store,
            **{**opts.results.config_fields(), "html": self.html, "dicom_out": self.dicom_out},
            options={**opts.options, "append": True, "watch": True},
        )
        try:
            self.reporters = ReporterSet(collect_reporters(self.pm, config))
        except (OSError, ValueError, sqlite3.Error) as exc:
            raise RunError(f"cannot open output: {exc}") from None

    # -- candidates ------------------------------------------------------------------

    def consider(self, path: str) -> None:
        """A path seen by an event or a scan: settle it unless ignored or already screened."""
        if is_temporary(os.path.basename(path)) or self._hidden_below_root(path, False) or path in self.exclusions:
            return
        try:
            st = os.lstat(path)
        except OSError:
            self.settler.discard(path)
            return
        why = classify(st)
        if why is not None:
            if why != "folder":
                self.ignored.note(path, why)
            return
        ident = FileIdentity(path, st.st_size, st.st_mtime_ns)
        done = self.ledger.is_done(ident)
        if done is not None:
            self.settler.discard(path)
            if done.status == ERROR and self.quarantine is not None:
                self._quarantine([path])  # screened before its move: finish the job
            return
        self.settler.observe(path, st)

    def _hidden_below_root(self, path: str, is_dir: bool) -> bool:
        """True outside the root or inside a hidden folder (as :func:`scan_tree` skips them)."""
        rel = os.path.relpath(path, self.root)
        if rel == ".":
            return False
        folders = rel.split(os.sep) if is_dir else rel.split(os.sep)[:-1]
        return rel.startswith("..") or any(part.startswith(".") for part in folders)

    def scan(self, why: str) -> None:
        start = time.monotonic()
        before = len(self.settler)
        n = 0
        for path in scan_tree(self.root, skip_dir=lambda d: d in self.exclusions):
            n += 1
            self.consider(path)
        log.debug("%s: %d files looked at, %d new candidates, %.2f s", why, n, len(self.settler) - before, time.monotonic() - start)

    def handle_events(self) -> None:
        for kind, path in self.watcher.drain():
            if kind == "file":
                self.consider(path)
            elif kind == "dir":
                if not self._hidden_below_root(path, True) and path not in self.exclusions:
                    for sub in scan_tree(path, skip_dir=lambda d: d in self.exclusions):
                        self.consider(sub)
            elif kind == "gone":
                self.settler.discard(path)

    # -- screening -------------------------------------------------------------------

    def hand_over(self, now: float) -> None:
        """Move settled files to the backlog and from it to free decode workers."""
        for ident in self.settler.settled(now, hold=self.in_flight.__contains__):
            if self.ledger.is_done(ident) is None:
                self.backlog.pop(ident.path, None)
                self.backlog[ident.path] = ident
        free = self.pool.free_slots()
        if not self.backlog or free <= 0:
            return
        batch: list[FileIdentity] = []
        while self.backlog and len(batch) < free:
            _, ident = self.backlog.popitem(last=False)
            batch.append(ident)
        if batch:
            # Queued in the ledger before a worker sees it: a crash from here on means
            # "screen it again", never "forget it".
            self.in_flight.update(self.ledger.queue(batch))
            self.pool.submit([ident.path for ident in batch])

    def screen_batch(self, decoded: list) -> None:
        results = screen_decoded(decoded, self.screener, self.overlays_dir, self.opts.overlays_for)
        committed = []
        for result in results:
            row_id = self.in_flight.pop(result.path, None)
            if row_id is None:  # cannot happen: every decoded path was handed over by us
                log.error("internal: result for %s that was not in flight", result.path)
                continue
            committed.append((row_id, result))
        self._commit(committed, self.reporters)

    def _commit(self, items: list[tuple[int, SliceResult]], reporters: ReporterSet | None) -> None:
        """Ledger first, then reporters (the CSV), then quarantine and study clocks."""
        if not items:
            return
        results = [result for _, result in items]
        self.ledger.record((row_id, result, result_row(result)) for row_id, result in items)
        studies = getattr(self, "studies", None)
        if studies is not None:
            studies.add(results)
            self.studies_clock.touch(
                {r.study_instance_uid or "(no study uid)" for r in results if r.status == "ok"}, time.monotonic()
            )
        self.summary.count(results)
        if reporters is not None:
            reporters.on_results(results, self.studies)
        else:
            # Before the reporters exist (start-up): the CSV gets these rows directly.
            reconcile_csv(self.out, self.ledger, RESULT_COLUMNS)
        for result in results:
            result.pixels = result.display = None
        errors = [r.path for r in results if r.status == ERROR]
        if errors and self.quarantine is not None:
            self._quarantine(errors)
        n_ok = sum(r.status == "ok" for r in results)
        log.info(
            "screened %d files: %d ok (%d positive), %d skipped, %d error",
            len(results),
            n_ok,
            sum(r.is_positive for r in results),
            sum(r.status == "skipped" for r in results),
            len(errors),
        )

    def _quarantine(self, paths: list[str]) -> None:
        assert self.quarantine is not None
        for path in paths:
            if not os.path.lexists(path):
                continue
            rel = os.path.relpath(path, self.root)
            dest = self.quarantine / rel
            n = 1
            while os.path.lexists(dest):
                dest = self.quarantine / f"{rel}.{n}"
                n += 1
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, dest)
            except OSError as exc:
                log.error("cannot move %s to quarantine: %s", path, exc.strerror or exc)
                continue
            self.summary.quarantined += 1
            log.warning("moved %s to %s", path, dest)

    # -- studies -----------------------------------------------------------------------

    def summarise(self, uids: list[str], complete: bool = True) -> None:
        """Write the study rows of ``uids``; ``complete``: the studies went quiet, so they
        also get their DICOM results and count as summarised in the ledger. At a stop,
        studies still within --study-timeout get their rows only: they may be cut short,
        and the next run completes them once they go quiet."""
        uids = [uid for uid in uids if uid in self.studies.studies]
        if not uids:
            return
        if complete:
            # SR and key images before the ledger says "summarised": after a crash in
            # between, the study is completed again and the outbox sees nothing new.
            self.reporters.on_study_complete(sorted(uids), self.studies)
            self.ledger.mark_summarised(uids)
        self.summarised.update(uids)
        self.summary.studies_summarised += len(uids)
        self._write_studies()
        for uid in sorted(uids):
            study = self.studies.studies[uid]
            log.info("%s", describe_study(study))

    def _write_studies(self) -> None:
        view = StudyTable(self.studies.thresholds)
        view.studies = {uid: self.studies.studies[uid] for uid in self.summarised if uid in self.studies.studies}
        try:
            write_studies_csv(self.studies_out, view)
        except OSError as exc:
            log.error("cannot write %s: %s", self.studies_out, exc.strerror or exc)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> WatchSummary:
        opts = self.opts
        start = time.monotonic()
        self.watcher = FolderWatcher(self.root, poll=opts.poll, poll_interval=opts.poll_interval)
        resize_to = self.screener.settings.size if self.device.type == "cpu" else None
        self.pool = StreamingDecodePool(
            self.workers,
            opts.limits,
            chunk_size=max(1, min(8, self.batch_size)),
            resize_to=resize_to,
            display=self.overlays_dir is not None,
            transfer=default_transfer(self.device.type),
            batch_size=self.batch_size,
        )
        batcher = MicroBatcher(self.batch_size, opts.max_latency)
        log.info(
            "watching %s with %s (%s) on %s: %s, settle %.1f s, batch %d or %.1f s, %d decode workers -> %s",
            self.root,
            self.loaded.name,
            self.loaded.source,
            self.device,
            "polling" if opts.poll else "events",
            opts.settle,
            self.batch_size,
            opts.max_latency,
            self.workers,
            self.out,
        )
        try:
            # Events first, then the scan: a file landing in between is seen by one or both.
            self.watcher.start()
            self.scan("startup scan")
            root_present = True
            next_health = time.monotonic() + _HEALTH_S
            next_rescan = time.monotonic() + self._rescan_interval()
            while True:
                now = time.monotonic()
                stopping = self.stop_event.is_set()
                if stopping and not self.pool.pending and not len(batcher):
                    break
                if not stopping:
                    self.handle_events()
                    if now >= next_health:
                        next_health = now + _HEALTH_S
                        root_present = self._check_root(root_present)
                    if self.watcher.overflowed.is_set():
                        self.watcher.overflowed.clear()
                        log.warning("events were lost (queue overflow); rescanning %s", self.root)
                        self.scan("rescan after overflow")
                    if root_present and now >= next_rescan:
                        self.scan("periodic rescan")
                        next_rescan = time.monotonic() + self._rescan_interval()
                    self.hand_over(now)
                due = batcher.due_in(now)
                wait = _TICK_S if due is None else min(_TICK_S, due)
                if self.pool.pending:
                    batcher.add(self.pool.collect(wait))
                elif wait > 0 and not stopping:
                    self.watcher.wakeup.wait(wait)
                    self.watcher.wakeup.clear()
                now = time.monotonic()
                batch = batcher.take(now, force=stopping and not self.pool.pending)
                if batch:
                    self.screen_batch(batch)
                quiet = self.studies_clock.quiet(time.monotonic())
                if quiet:
                    self.summarise(quiet)
        finally:
            self.watcher.stop()
            self.pool.close()
        # A clean stop writes the rows of studies still waiting for their timeout.
        self.summarise(self.studies_clock.pending(), complete=False)
        self.summary.seconds = time.monotonic() - start
        self.reporters.on_finish(self.summary, self.studies)
        return self.summary

    def _rescan_interval(self) -> float:
        interval = self.opts.rescan_interval if self.opts.rescan_interval > 0 else float("inf")
        return interval if self.watcher.events_ok else min(interval, _FALLBACK_RESCAN_S)

    def _check_root(self, was_present: bool) -> bool:
        if self.watcher.healthy():
            return True
        if not os.path.isdir(self.root):
            if was_present:
                log.warning("watched folder %s is gone; waiting for it to come back", self.root)
                self.watcher.stop()
            return False
        if not was_present:
            log.warning("watched folder %s is back", self.root)
        elif self.watcher.events_ok:
            log.warning("restarting the watch on %s (folder replaced or observer stopped)", self.root)
        else:
            return True  # running on rescans alone already
        self.watcher.start()
        self.scan("rescan after restart")
        return True

    def close(self) -> None:
        self.store.close()


def describe_study(study: StudySummary) -> str:
    """One log line per study: what was screened and the top label."""
    finding = (
        f"top {study.top_label} {study.top_probability:.2f}"
        if study.top_label != "none"
        else f"no finding (highest subtype {study.top_probability:.2f})"
    )
    return f"study {study.study_instance_uid}: {study.slices} slices, {study.positive_slices} positive, {finding}"


def run_watch(
    opts: WatchOptions,
    pm: pluggy.PluginManager | None = None,
    stop: threading.Event | None = None,
) -> WatchSummary:
    """Watch ``opts.input_dir`` until SIGINT/SIGTERM (or ``stop`` is set); return the counts.

    Signal handlers are installed only when called from the main thread; elsewhere
    (tests, embedding) set ``stop`` to end the run cleanly.

    Raises
    ------
    RunError, ValueError, ichscan.models.ModelError, ichscan.plugins.PluginError
        When the run cannot start; each carries a one-line message.
    """
    watcher = Watcher(opts, pm, stop)
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, frame: object) -> None:
            log.warning("%s: finishing the files in flight, then stopping", signal.Signals(signum).name)
            watcher.stop_event.set()
            # A second signal stops at once: the ledger still guarantees nothing is lost.
            for sig, handler in previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        watcher.open()
        try:
            return watcher.run()
        finally:
            watcher.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
