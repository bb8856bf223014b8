"""The screening commands: each is a source and a stop condition on the same pipeline.

:func:`open_pipeline` does what they share: resolve and check the outputs, open the state
file (ledger and outbox), restore what a previous run left, load and size the model,
collect the reporters. :func:`run_batch`, :func:`run_watch`, :func:`run_serve` and
:func:`run_pull` add their source and run it under the same signal handling.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy
import torch

from ichscan.durable import remove_orphaned_temporaries
from ichscan.state.ledger import Ledger, LedgerError
from ichscan.events import study_event_reporters
from ichscan.pipeline.options import (
    ENGINES,
    BatchOptions,
    RunError,
    RunOutputs,
    ScreeningOptions,
    WatchOptions,
    prepare_folder,
)
from ichscan.pipeline.progress import Progress
from ichscan.pipeline.run import LiveSummary, Pipeline, stop_on_signals
from ichscan.pipeline.sizing import prepare_screening
from ichscan.plugins import get_plugin_manager
from ichscan.records import SliceResult
from ichscan.reporting import Reporter, ReporterSet, RunConfig, RunMode, RunSummary, StudyTable
from ichscan.sources.base import Source
from ichscan.sources.dicomweb import DicomWebSource, PullQuery, PullStats
from ichscan.sources.folder import FolderSource, check_input_folder
from ichscan.sources.manifest import ManifestSource, check_manifest
from ichscan.sources.scp import DIMSE, STOW, ScpOptions, ScpSource, StoreHandler, build_ae, decodable_transfer_syntaxes, start_server, tls_context
from ichscan.sources.stow import StowOptions, start_stow_server
from ichscan.sources.watch import WatchSource

if TYPE_CHECKING:
    from ichscan.metrics import RunMetrics

log = logging.getLogger(__name__)

#: The former name of :class:`LiveSummary`.
WatchSummary = LiveSummary


def collect_reporters(pm: pluggy.PluginManager, config: RunConfig) -> list[Reporter]:
    reporters: list[Reporter] = []
    pm.hook.ichscan_register_reporters(register=reporters.append, config=config)
    return reporters


def open_pipeline(
    opts: ScreeningOptions,
    mode: RunMode,
    source: Source,
    pm: pluggy.PluginManager | None,
    *,
    input_root: Path,
    outputs: RunOutputs,
    stop: threading.Event | None = None,
    resume: bool = False,
    max_latency: float = 1.0,
    study_timeout: float = 60.0,
    series_timeout: float = 10.0,
    metrics: RunMetrics | None = None,
) -> tuple[Pipeline, Ledger]:
    """Everything a run needs, ready to :meth:`~Pipeline.run`; the caller closes the ledger.

    Raises
    ------
    RunError, ValueError, ichscan.models.ModelError, ichscan.plugins.PluginError
        When the run cannot happen; each carries a one-line message.
    """
    pm = pm or get_plugin_manager(opts.plugins_dirs)
    try:
        ledger = Ledger(outputs.state)
    except LedgerError as exc:
        raise RunError(str(exc)) from None
    try:
        append = mode.live or resume
        if append:
            _record_vanished(ledger)
        setup = prepare_screening(pm, **opts.model_settings())
        loaded = setup.loaded
        if not append:
            ledger.start_over()
        outputs.create_folders()
        studies = StudyTable(loaded.thresholds)
        if append:
            studies.studies.update(ledger.study_summaries(loaded.thresholds))
            # Studies with results newer than their summary (a late instance, then a crash
            # within --study-timeout) are not complete yet: their clock restarts.
            studies.complete = (ledger.summarised_studies() - ledger.changed_since_summary()) & set(studies.studies)
        # The resolved (absolute) paths of the outputs override the options' own.
        config = RunConfig(
            **{**opts.results.config_fields(), **outputs.config_fields()},
            **loaded.config_fields(),
            overlays_for=opts.overlays_for,
            saliency=opts.saliency,
            input_root=input_root,
            mode=mode,
            resume=resume,
            store=ledger.store,
            options=dict(opts.options),
        )
        try:
            # Study events last: they see the DICOM results the reporters before them made.
            reporters = ReporterSet([*collect_reporters(pm, config), *study_event_reporters(pm, config)])
        except (OSError, ValueError, sqlite3.Error, LedgerError) as exc:
            raise RunError(f"cannot open output: {exc}") from None
        log.debug("reporters: %s", ", ".join(r.name for r in reporters.reporters) or "none")
        pipeline = Pipeline(
            source,
            setup.screener,
            reporters,
            studies,
            batch_size=setup.batch_size,
            workers=setup.workers,
            ledger=ledger,
            limits=opts.limits,
            max_latency=max_latency,
            study_timeout=study_timeout,
            series_timeout=series_timeout,
            overlays_dir=outputs.overlays_dir,
            overlays_for=opts.overlays_for,
            stop=stop,
            rules=opts.rules,
            metrics=metrics,
        )
        pipeline.exclusions = outputs.exclusions()
        if metrics is not None:
            metrics.attach_state(ledger.store, [str(d) for d in opts.results.forward])
        if mode.live:
            import time

            pipeline.clock.touch(set(studies.studies) - studies.complete, time.monotonic())
        if append:
            # The studies file as the state says (a crash may have left it behind).
            reporters.on_study_complete([], studies)
    except BaseException:
        ledger.close()
        raise
    if metrics is not None:
        metrics.loaded()
    log.info(
        "%s with %s (%s) on %s: batch %d, %d decode workers, %d torch threads, slice context %d",
        {RunMode.BATCH: f"screening {input_root}", RunMode.WATCH: f"watching {input_root}", RunMode.SERVE: f"screening what arrives in {input_root}"}[mode],
        loaded.name,
        loaded.source,
        setup.device,
        setup.batch_size,
        setup.workers,
        torch.get_num_threads(),
        setup.screener.context,
    )
    return pipeline, ledger


def _record_vanished(ledger: Ledger) -> None:
    """Files queued when the last run stopped that are gone now still get their row.

    Those still there are found again by the source (its scan) and screened; the ledger
    reuses their rows.
    """
    vanished = [
        (entry.id, SliceResult.failed(entry.path, "file disappeared before it was screened"))
        for entry in ledger.queued()
        if not os.path.lexists(entry.path)
    ]
    for entry in ledger.queued():
        if os.path.lexists(entry.path):
            log.info("screening again %s: it was in flight when the last run stopped", entry.path)
    if vanished:
        from ichscan.rows import result_row

        ledger.record((row_id, result, result_row(result)) for row_id, result in vanished)


@contextmanager
def serving_metrics(opts: WatchOptions, writable: Sequence[tuple[str, Path]], stop: threading.Event) -> Iterator[RunMetrics | None]:
    """The run's metrics, served on ``--metrics-port`` until the block ends (``None`` without it).

    Raises
    ------
    RunError
        When the port cannot be listened on (one line, before the model loads).
    """
    if opts.metrics_port is None:
        yield None
        return
    from ichscan.metrics import RunMetrics, start_metrics_server

    metrics = RunMetrics(writable, stop)
    try:
        server = start_metrics_server(metrics, opts.metrics_bind, opts.metrics_port)
    except OSError as exc:
        raise RunError(f"cannot serve metrics on {opts.metrics_bind}:{opts.metrics_port}: {exc.strerror or exc}") from None
    log.info("serving metrics at %s/metrics (health: /healthz, /readyz)", server.url)
    try:
        yield metrics
    finally:
        server.close()


def _writable(outputs: RunOutputs, **more: Path) -> list[tuple[str, Path]]:
    """What /readyz checks for writes: the outputs' folder, the state file, ``more``."""
    return [*more.items(), ("outputs", outputs.out.parent), ("state", outputs.state)]


def _run(pipeline: Pipeline, ledger: Ledger, stop: threading.Event, engine: Callable[[Pipeline], None] | None = None) -> RunSummary:
    try:
        with stop_on_signals(stop), ledger_failures(ledger):
            return pipeline.run(engine)
    finally:
        ledger.close()


@contextmanager
def ledger_failures(ledger: Ledger) -> Iterator[None]:
    """A state file that cannot commit (disk full, I/O error) ends the run with one line.

    Nothing is lost by stopping: a result is recorded in the ledger before any output shows
    it, and what was queued or received but not recorded is screened by the next run.

    Raises
    ------
    RunError
        For any ``sqlite3.Error`` raised out of the block.
    """
    try:
        yield
    except sqlite3.Error as exc:
        raise RunError(f"state file {ledger.path}: {exc}; stopped (the next run screens what was not recorded)") from None


def source_factories(pm: pluggy.PluginManager) -> dict[str, Callable[[str], Source]]:
    """Every source registered through ``ichscan_register_sources``, by name."""
    factories: dict[str, Callable[[str], Source]] = {}

    def register(name: str, factory: Callable[[str], Source]) -> None:
        if name in factories:
            raise RunError(f"two plugins register a source named {name!r}")
        factories[name] = factory

    pm.hook.ichscan_register_sources(register=register)
    return factories


def run_source(
    name: str,
    location: str,
    opts: ScreeningOptions,
    pm: pluggy.PluginManager | None = None,
    stop: threading.Event | None = None,
) -> RunSummary:
    """Screen what the source registered as ``name`` finds at ``location``.

    A finite source runs like ``batch``, a live one like ``watch`` (until SIGINT/SIGTERM
    or ``stop``), with the live settings of ``opts`` when it has them
    (:class:`WatchOptions`).

    Raises
    ------
    RunError
        For an unknown source name, or when the run cannot happen.
    """
    pm = pm or get_plugin_manager(opts.plugins_dirs)
    factories = source_factories(pm)
    if name not in factories:
        raise RunError(f"unknown source {name!r}; registered: {', '.join(sorted(factories)) or 'none'}")
    try:
        source = factories[name](location)
    except (OSError, ValueError) as exc:
        raise RunError(f"source {name} at {location}: {exc}") from None
    mode = RunMode.WATCH if source.live else RunMode.BATCH
    outputs = RunOutputs.resolve(opts)
    stop = stop or threading.Event()
    live = _live(opts) if isinstance(opts, WatchOptions) else {}
    pipeline, ledger = open_pipeline(opts, mode, source, pm, input_root=Path(os.path.abspath(location)), outputs=outputs, stop=stop, **live)
    return _run(pipeline, ledger, stop)


def run_batch(opts: BatchOptions, pm: pluggy.PluginManager | None = None, stop: threading.Event | None = None) -> RunSummary:
    """Screen ``opts.input_dir`` (or the files ``opts.manifest`` lists) on this machine or,
    with ``opts.engine == "ray"``, on a Ray cluster; write the CSVs (and overlays); return
    the counts.

    SIGINT/SIGTERM stop taking new files; what is in flight is finished and reported
    (``summary.interrupted``). Every file is recorded in the state file, so
    ``resume`` skips what an earlier run screened.

    Raises
    ------
    RunError, ValueError, ichscan.models.ModelError, ichscan.plugins.PluginError
        When the run cannot happen; each carries a one-line message.
    """
    root, source = _batch_source(opts)
    outputs = RunOutputs.resolve(opts)
    stop = stop or threading.Event()
    engine = None
    if opts.engine == "ray":
        from ichscan.pipeline.ray_engine import RayEngine

        engine = RayEngine(opts)  # checks that Ray is there before anything is opened
    pipeline, ledger = open_pipeline(opts, RunMode.BATCH, source, pm, input_root=root, outputs=outputs, stop=stop, resume=opts.resume)
    if engine is not None:
        try:
            engine.check(pipeline)
        except BaseException:
            ledger.close()
            raise
    if opts.progress:
        pipeline.progress = Progress(total=source.count(pipeline.exclusions), enabled=True)
    summary = _run(pipeline, ledger, stop, engine)
    if source.resumed:
        log.info("%d files were screened by an earlier run (--resume): kept their rows", source.resumed)
    return summary


def _batch_source(opts: BatchOptions) -> tuple[Path, FolderSource]:
    """The input root and the source of a batch run: a folder walk or a manifest."""
    if opts.engine not in ENGINES:
        raise RunError(f"--engine must be one of {', '.join(ENGINES)}, not {opts.engine!r}")
    if opts.address is not None and opts.engine != "ray":
        raise RunError("--address needs --engine ray")
    if opts.input_dir is not None and opts.manifest is not None:
        raise RunError("give either a FOLDER or --manifest FILE, not both")
    if opts.input_dir is None and opts.manifest is None:
        raise RunError("nothing to screen: give a FOLDER or --manifest FILE")
    # The Ray engine groups series on the cluster: the driver reads no headers.
    by_series = opts.engine == "local"
    try:
        if opts.manifest is not None:
            manifest = check_manifest(opts.manifest)
            return manifest.parent, ManifestSource(manifest, resume=opts.resume, by_series=by_series)
        root = check_input_folder(opts.input_dir)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    return root, FolderSource(root, resume=opts.resume, by_series=by_series)


def run_watch(opts: WatchOptions, pm: pluggy.PluginManager | None = None, stop: threading.Event | None = None) -> LiveSummary:
    """Watch ``opts.input_dir`` until SIGINT/SIGTERM (or ``stop`` is set); return the counts.

    Raises
    ------
    RunError, ValueError, ichscan.models.ModelError, ichscan.plugins.PluginError
        When the run cannot start; each carries a one-line message.
    """
    try:
        check_input_folder(opts.input_dir)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    for name in ("settle", "max_latency", "study_timeout", "series_timeout", "poll_interval"):
        if getattr(opts, name) < 0:
            raise RunError(f"--{name.replace('_', '-')} must not be negative")
    root = Path(os.path.abspath(opts.input_dir))
    if opts.quarantine_dir is not None and os.path.realpath(root) == os.path.realpath(opts.quarantine_dir):
        raise RunError("--quarantine must not be the watched folder itself")
    outputs = RunOutputs.resolve(opts, quarantine=opts.quarantine_dir)
    source = WatchSource(
        root,
        settle=opts.settle,
        poll=opts.poll,
        poll_interval=opts.poll_interval,
        rescan_interval=opts.rescan_interval,
        quarantine=outputs.quarantine,
    )
    stop = stop or threading.Event()
    with serving_metrics(opts, _writable(outputs), stop) as metrics:
        pipeline, ledger = open_pipeline(
            opts, RunMode.WATCH, source, pm, input_root=root, outputs=outputs, stop=stop, metrics=metrics, **_live(opts)
        )
        summary = _run(pipeline, ledger, stop)
    summary.quarantined = source.quarantined
    return summary


def _live(opts: WatchOptions) -> dict[str, float]:
    return {"max_latency": opts.max_latency, "study_timeout": opts.study_timeout, "series_timeout": opts.series_timeout}


@dataclass
class ServeOptions:
    scp: ScpOptions = field(default_factory=ScpOptions)
    watch: WatchOptions | None = None  # the screening settings; input_dir is set to scp.store
    drain_timeout: float = 30.0
    stow: StowOptions | None = None  # also receive by STOW-RS (DICOMweb)
    dimse: bool = True  # listen for C-STORE (off: DICOMweb only)


def run_serve(opts: ServeOptions, pm: pluggy.PluginManager | None = None, stop: threading.Event | None = None) -> LiveSummary:
    """Serve until SIGINT/SIGTERM (or ``stop``); return the screening counts.

    On a stop: no new associations or connections, open ones get ``drain_timeout`` seconds
    to finish (then associations are aborted), what was received is screened, files are
    flushed. C-STORE and STOW-RS share one :class:`StoreHandler`: the same checks, the
    same durable write, the same hand-over to the pipeline.
    """
    import ssl

    import pydicom.config
    from pynetdicom import evt

    if not opts.dimse and opts.stow is None:
        raise RunError("nothing to serve: without C-STORE, a DICOMweb port is needed")
    store = Path(os.path.abspath(opts.scp.store))
    prepare_folder(store, "--store")
    orphans = remove_orphaned_temporaries(store)
    if orphans:
        log.info("removed %d half-written temporary file(s) that a killed run left in %s", orphans, store)
    watch_opts = opts.watch or WatchOptions(input_dir=store)
    watch_opts.input_dir = store
    outputs = RunOutputs.resolve(watch_opts)
    stop = stop or threading.Event()
    source = ScpSource(store, opts.drain_timeout)
    # Received data sets are checked by ichscan itself (UIDs, SOP class, pixel data) and
    # refused with one line; pydicom's own per-element warnings would repeat each problem
    # several times over (a bad UID: ~8 lines and a raw UserWarning).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    handler = StoreHandler(store, on_stored=source.received)
    try:
        ssl_context = tls_context(opts.scp)
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise RunError(f"TLS: {exc}") from None
    ae = build_ae(opts.scp)
    # Signals first: a SIGTERM while the model loads must still mean "stop cleanly".
    with stop_on_signals(stop, "no new associations; finishing what was received, then stopping"):
        # Metrics first: a port in use fails before anything else starts.
        with serving_metrics(watch_opts, _writable(outputs, store=store), stop) as metrics:
            if metrics is not None:
                metrics.watch_receiver(handler.stats, tuple(p for p, on in ((DIMSE, opts.dimse), (STOW, opts.stow is not None)) if on))
            # Then the DICOM listeners: a port in use fails at once, before the model loads. What
            # arrives before the pipeline is up is stored durably and handed over.
            server = web = None
            try:
                if opts.dimse:
                    try:
                        server = start_server(ae, (opts.scp.bind, opts.scp.port), evt_handlers=[(evt.EVT_C_STORE, handler)], ssl_context=ssl_context)
                    except OSError as exc:
                        raise RunError(f"cannot listen on {opts.scp.bind}:{opts.scp.port}: {exc.strerror or exc}") from None
                    source.server = server
                if opts.stow is not None:
                    try:
                        web = start_stow_server(opts.stow, handler, ssl_context)
                    except OSError as exc:
                        raise RunError(f"cannot listen for DICOMweb on {opts.stow.bind}:{opts.stow.port}: {exc.strerror or exc}") from None
                    except ValueError as exc:
                        raise RunError(f"--dicomweb-token-file: {exc}") from None
                    source.web = web
                pipeline, ledger = open_pipeline(
                    watch_opts, RunMode.SERVE, source, pm, input_root=store, outputs=outputs, stop=stop, metrics=metrics, **_live(watch_opts)
                )
            except BaseException:
                if server is not None:
                    server.shutdown()
                if web is not None:
                    web.shutdown()
                    web.server_close()
                raise
            if server is not None:
                log.info(
                    "serving C-STORE as %s on %s:%d%s -> %s (transfer syntaxes: %s)",
                    opts.scp.ae_title,
                    opts.scp.bind,
                    server.server_address[1],
                    " with TLS" if ssl_context else "",
                    store,
                    ", ".join(uid.name for uid in decodable_transfer_syntaxes()),
                )
            if web is not None:
                log.info(
                    "serving STOW-RS at %s/studies%s -> %s",
                    web.url,
                    " (bearer tokens required)" if web.tokens else " without authentication (no --dicomweb-token-file)",
                    store,
                )
            try:
                with ledger_failures(ledger):
                    summary = pipeline.run()
            finally:
                ledger.close()
    stats = handler.stats
    log.info("received %d instances (%d duplicates, %d refused, %d failed to store)", stats.stored, stats.duplicates, stats.refused, stats.failed)
    return summary


@dataclass(kw_only=True)
class PullOptions(ScreeningOptions):
    """Settings of ``ichscan pull`` (see ``ichscan pull --help``)."""

    url: str
    query: PullQuery = field(default_factory=PullQuery)
    store: Path = Path("ichscan-store")
    #: Bearer token for the server pulled from (``--token-file``).
    token: str | None = None
    progress: bool = False


@dataclass
class PullResult:
    summary: RunSummary
    stats: PullStats


def run_pull(opts: PullOptions, pm: pluggy.PluginManager | None = None, stop: threading.Event | None = None) -> PullResult:
    """Screen the CT studies a DICOMweb server lists (and the filters allow) that are not
    screened yet; forward the results; return the counts and the studies that failed.

    Runs like ``batch --resume`` on the store: rows are appended, nothing screened twice.
    The server is asked once before the model loads, so a wrong URL or token fails at once.

    Raises
    ------
    RunError, ValueError, ichscan.models.ModelError, ichscan.plugins.PluginError
        When the run cannot happen (the server unreachable, a 401, not DICOMweb...); each
        carries a one-line message.
    """
    from ichscan.dicomweb import DicomWebError, explain

    store = Path(os.path.abspath(opts.store))
    try:
        source = DicomWebSource(opts.url, store, opts.query, opts.token)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    try:
        source.client.search_for_studies(search_filters={"ModalitiesInStudy": "CT"}, limit=1)
    except Exception as exc:  # noqa: BLE001 - requests and dicomweb-client errors alike
        error = exc if isinstance(exc, DicomWebError) else explain(exc, source.url, "QIDO-RS")
        raise RunError(str(error)) from None
    prepare_folder(store, "--store")
    outputs = RunOutputs.resolve(opts)
    stop = stop or threading.Event()
    pipeline, ledger = open_pipeline(opts, RunMode.BATCH, source, pm, input_root=store, outputs=outputs, stop=stop, resume=True)
    summary = _run(pipeline, ledger, stop)
    stats = source.stats
    log.info(
        "pulled from %s: %d studies looked at, %d instances fetched%s",
        source.url,
        len(source.studies or []),
        stats.fetched,
        f", {len(stats.failed)} studies failed" if stats.failed else "",
    )
    return PullResult(summary, stats)
