"""``ichscan serve-scp``: receive by C-STORE, store durably, screen through the watch engine.

The SCP's handler stores each instance under ``--store`` and answers; the same engine as
``ichscan watch`` (ledger, micro-batches, study timeouts) screens what lands there. The
ledger and a startup scan of ``--store`` make every instance that got Success screened
exactly once, across a SIGKILL and restart.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pluggy
import pydicom
import pydicom.config

from ichscan.batch import RunError, prepare_folder
from ichscan.sources.scp import ScpOptions, StoreHandler, build_ae, decodable_transfer_syntaxes, tls_context
from ichscan.watch import Watcher, WatchOptions, WatchSummary

log = logging.getLogger(__name__)

#: Files are complete when they appear (atomic rename), so a short settle is enough.
SCP_SETTLE_S = 0.2


@dataclass
class ServeOptions:
    scp: ScpOptions = field(default_factory=ScpOptions)
    watch: WatchOptions | None = None  # input_dir is set to scp.store
    drain_timeout: float = 30.0


def run_serve(opts: ServeOptions, pm: pluggy.PluginManager | None = None, stop: threading.Event | None = None) -> WatchSummary:
    """Serve until SIGINT/SIGTERM (or ``stop``); return the screening counts.

    On a stop: no new associations, open ones get ``drain_timeout`` seconds to finish
    (then they are aborted), what was received is screened, files are flushed.
    """
    from pynetdicom import evt

    store = Path(opts.scp.store)
    prepare_folder(store, "--store")
    watch_opts = opts.watch or WatchOptions(input_dir=store)
    watch_opts.input_dir = store
    watch_opts.settle = min(watch_opts.settle, SCP_SETTLE_S)
    stop = stop or threading.Event()
    engine_stop = threading.Event()
    watcher = Watcher(watch_opts, pm, engine_stop)
    # Received data sets are checked by ichscan itself (UIDs, SOP class, pixel data) and
    # refused with one line; pydicom's own per-element warnings would repeat each problem
    # several times over (a bad UID: ~8 lines and a raw UserWarning).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    handler = StoreHandler(store, on_stored=lambda path: log.debug("stored %s", path))
    try:
        ssl_context = tls_context(opts.scp)
    except (OSError, ValueError, __import__("ssl").SSLError) as exc:
        raise RunError(f"TLS: {exc}") from None
    ae = build_ae(opts.scp)
    # Signals first: a SIGTERM while the model loads must still mean "stop cleanly".
    previous = _install_signals(stop)
    try:
        # Listen first: a port in use fails at once, before the model loads.
        server = ae.start_server(
            (opts.scp.bind, opts.scp.port), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)], ssl_context=ssl_context
        )
    except OSError as exc:
        _restore_signals(previous)
        raise RunError(f"cannot listen on {opts.scp.bind}:{opts.scp.port}: {exc.strerror or exc}") from None
    try:
        # What arrives before the engine is up is stored durably and found by its startup scan.
        watcher.open()
    except BaseException:
        server.shutdown()
        _restore_signals(previous)
        raise
    try:
        syntaxes = ", ".join(uid.name for uid in decodable_transfer_syntaxes())
        log.info(
            "serving C-STORE as %s on %s:%d%s -> %s (transfer syntaxes: %s)",
            opts.scp.ae_title,
            opts.scp.bind,
            server.server_address[1],
            " with TLS" if ssl_context else "",
            store,
            syntaxes,
        )

        def drain() -> None:
            stop.wait()
            log.warning("stopping: no new associations; waiting up to %.0f s for open ones", opts.drain_timeout)
            server.shutdown()
            deadline = time.monotonic() + opts.drain_timeout
            # Only established associations are waited for: a connection that never
            # sent an association request (a port check, a stalled peer) is not work.
            while any(a.is_established for a in server.active_associations) and time.monotonic() < deadline:
                time.sleep(0.1)
            for assoc in server.active_associations:
                if assoc.is_established:
                    log.warning("aborting association with %s after the drain timeout", assoc.requestor.ae_title)
                assoc.abort()
            # Let what was just stored settle, so this run screens it.
            time.sleep(watch_opts.settle + 0.5)
            engine_stop.set()

        drainer = threading.Thread(target=drain, name="ichscan-drain", daemon=True)
        drainer.start()
        try:
            summary = watcher.run()
        finally:
            stop.set()
            drainer.join(timeout=opts.drain_timeout + 10)
            _restore_signals(previous)
    finally:
        watcher.close()
    stats = handler.stats
    log.info("received %d instances (%d duplicates, %d refused, %d failed to store)", stats.stored, stats.duplicates, stats.refused, stats.failed)
    return summary


def _restore_signals(previous: dict) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


def _install_signals(stop: threading.Event) -> dict:
    previous: dict = {}
    if threading.current_thread() is not threading.main_thread():
        return previous

    def on_signal(signum, frame) -> None:
        log.warning("%s received", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    return previous
