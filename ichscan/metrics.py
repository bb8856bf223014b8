"""Prometheus metrics and health endpoints of a live run (``watch``, ``serve-scp`` with
``--metrics-port``).

:class:`RunMetrics` holds the run's metrics in a :class:`~prometheus_client.CollectorRegistry`
of its own (never the process-wide default one, so runs in one process, tests and library
callers do not collide). The pipeline calls a few cheap methods on it (counters and
histograms; the queue depths at most once a second from its loop); what other parts
already count (the receivers' :class:`~ichscan.sources.scp.StoreStats`, the state file's
``deliveries``) is read when Prometheus scrapes. :class:`MetricsServer` serves, on one
thread:

``/metrics``
    the Prometheus text format;
``/healthz``
    live: 200 while the process is up and the pipeline loop has turned within
    ``stall_after`` seconds (or has not started yet: the model loads), else 503;
``/readyz``
    ready: 200 once the model is loaded and the pipeline runs, the store and outputs are
    writable with space left, and no delivery has failed for longer than
    ``outbox_stuck_after``; else 503 with a JSON body naming what is not ready.

The server starts before the model loads (``/readyz`` then says ``"model": "loading"``),
so a port in use is a one-line error before any time is spent.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from ichscan.records import SliceResult
    from ichscan.sources.scp import StoreStats
    from ichscan.state.store import StateStore

log = logging.getLogger(__name__)

#: The queues of the pipeline, as the ``stage`` label of ``ichscan_queue_depth`` names them.
STAGES = ("decode", "series_context", "batcher", "whole_series", "overlays")
STATUSES = ("ok", "skipped", "error")
#: Seconds between updates of the queue gauges (the loop may turn many times a second).
GAUGE_INTERVAL_S = 1.0
#: /healthz fails once the pipeline loop has not turned for this long (it turns at least
#: every 0.25 s when idle; a model batch takes well under a second on a CPU).
STALL_AFTER_S = 60.0
#: /readyz fails while a delivery with a failed attempt has been pending this long.
OUTBOX_STUCK_AFTER_S = 15 * 60.0
#: /readyz fails when a folder that must be written has less free space than this.
MIN_FREE_BYTES = 16 * 1024**2

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class RunMetrics:
    """The metrics of one run and what its health endpoints need to know.

    Parameters
    ----------
    writable
        Folders (and the state file) that must stay writable for the run to be ready:
        ``(name, path)`` pairs, e.g. ``("store", Path("/var/lib/ichscan/store"))``.
    stop
        The run's stop event: once set, the run is draining and no longer ready.
    """

    def __init__(
        self,
        writable: Sequence[tuple[str, Path]] = (),
        stop: threading.Event | None = None,
        *,
        stall_after: float = STALL_AFTER_S,
        outbox_stuck_after: float = OUTBOX_STUCK_AFTER_S,
    ):
        self.registry = CollectorRegistry(auto_describe=False)
        self.writable = list(writable)
        self.stop = stop or threading.Event()
        self.stall_after = stall_after
        self.outbox_stuck_after = outbox_stuck_after
        self.model_loaded = False
        self.last_tick: float | None = None  # time.monotonic() of the pipeline loop's last turn
        self._next_gauges = 0.0
        self._store_stats: StoreStats | None = None
        self._protocols: tuple[str, ...] = ()
        self._state: StateStore | None = None
        self._destinations: list[str] = []
        r = self.registry
        self.queued = Counter(
            "ichscan_files_queued", "Files handed to the pipeline (watch: seen and settled; serve-scp: stored or found in the store at start).", registry=r
        )
        self.screened = Counter("ichscan_instances_screened", "Result rows, by status.", ["status"], registry=r)
        for status in STATUSES:
            self.screened.labels(status)
        self.positive = Counter("ichscan_instances_positive", "Screened instances positive for any label.", registry=r)
        self.studies = Counter("ichscan_studies_completed", "Studies completed (quiet for --study-timeout): study row and DICOM results written.", registry=r)
        self.model_seconds = Histogram(
            "ichscan_model_batch_seconds",
            "Seconds per model call in the main process (preprocessing, model, thresholds; refine: a series head over a whole series).",
            ["step"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_seconds.labels("screen")
        self.batch_size = Histogram("ichscan_model_batch_size", "Slices per model batch.", buckets=_BATCH_BUCKETS, registry=r)
        self.decode_seconds = Histogram(
            "ichscan_decode_chunk_seconds",
            "Seconds from handing a chunk of files to the decode workers until its pixels are back in the main process "
            "(waiting for a free worker, reading and decoding, transfer).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.depth = Gauge("ichscan_queue_depth", "Instances held in each pipeline stage.", ["stage"], registry=r)
        for stage in STAGES:
            self.depth.labels(stage)
        self.series_waiting = Gauge("ichscan_series_waiting_for_context", "Series with slices waiting for their neighbours.", registry=r)
        self.loaded_gauge = Gauge("ichscan_model_loaded", "1 once the model is loaded and the pipeline runs.", registry=r)
        self.tick_age = Gauge("ichscan_pipeline_loop_age_seconds", "Seconds since the pipeline loop last turned.", registry=r)
        self.tick_age.set_function(lambda: self.loop_age() or 0.0)
        r.register(_ScrapeTimeCollector(self))
        ProcessCollector(registry=r)  # process_*: CPU seconds, resident memory, open files (Linux /proc)

    # -- what the run tells us -------------------------------------------------------------

    def watch_receiver(self, stats: StoreStats, protocols: tuple[str, ...]) -> None:
        """Report what the receivers listening (``"c-store"``, ``"stow-rs"``) count, by outcome."""
        self._store_stats = stats
        self._protocols = protocols

    def attach_state(self, store: StateStore, destinations: Iterable[str] = ()) -> None:
        """The open state file (its ``deliveries``) and this run's --forward destinations."""
        self._state = store
        self._destinations = list(destinations)

    def loaded(self) -> None:
        """The model is loaded; the pipeline is about to run."""
        self.model_loaded = True
        self.loaded_gauge.set(1)

    def tick(self, now: float, depths: Callable[[], tuple[dict[str, int], int]]) -> None:
        """The pipeline loop turned; ``depths`` (the queues, series waiting) is read at most once a second."""
        self.last_tick = now
        if now >= self._next_gauges:
            self._next_gauges = now + GAUGE_INTERVAL_S
            stages, waiting = depths()
            for stage, n in stages.items():
                self.depth.labels(stage).set(n)
            self.series_waiting.set(waiting)

    def files_queued(self, n: int) -> None:
        self.queued.inc(n)

    def results(self, results: Sequence[SliceResult]) -> None:
        counts = dict.fromkeys(STATUSES, 0)
        positive = 0
        for result in results:
            counts[result.status.value] = counts.get(result.status.value, 0) + 1
            positive += bool(result.is_positive)
        for status, n in counts.items():
            if n:
                self.screened.labels(status).inc(n)
        if positive:
            self.positive.inc(positive)

    def model_batch(self, seconds: float, size: int, step: str = "screen") -> None:
        self.model_seconds.labels(step).observe(seconds)
        if step == "screen":
            self.batch_size.observe(size)

    def decode_chunk(self, seconds: float) -> None:
        """A chunk's turnaround (see ``ichscan_decode_chunk_seconds``); thread-safe (the
        decode pool's result thread calls it)."""
        self.decode_seconds.observe(seconds)

    def studies_completed(self, n: int) -> None:
        self.studies.inc(n)

    # -- what the endpoints say ----------------------------------------------------------

    def loop_age(self) -> float | None:
        return None if self.last_tick is None else max(0.0, time.monotonic() - self.last_tick)

    def health(self) -> tuple[bool, dict]:
        """``/healthz``: (alive, body)."""
        age = self.loop_age()
        if age is None:
            return True, {"status": "starting"}
        if age > self.stall_after:
            return False, {"status": "stalled", "loop_age_s": round(age, 1)}
        return True, {"status": "ok", "loop_age_s": round(age, 3)}

    def readiness(self) -> tuple[bool, dict]:
        """``/readyz``: (ready, body); the body names every check and what failed."""
        checks: dict[str, str] = {}
        checks["model"] = "ok" if self.model_loaded else "loading"
        if self.model_loaded and self.last_tick is None:
            checks["pipeline"] = "starting"
        elif self.stop.is_set():
            checks["pipeline"] = "stopping"
        else:
            alive, body = self.health()
            checks["pipeline"] = "ok" if alive else body["status"]
        for name, path in self.writable:
            checks[name] = _writable(path)
        checks["outbox"] = self._outbox_check()
        ready = all(value == "ok" for value in checks.values())
        return ready, {"status": "ready" if ready else "not ready", "checks": checks}

    def _outbox_check(self) -> str:
        state, destinations = self._state, self._destinations
        if state is None or not destinations:
            return "ok"
        marks = ", ".join("?" * len(destinations))
        try:
            row = state.query_one(
                "SELECT COUNT(*) FROM deliveries d JOIN result_objects o USING (sop_instance_uid) "
                f"WHERE d.state = 'pending' AND d.last_error != '' AND o.created_at < ? AND d.destination IN ({marks})",
                (time.time() - self.outbox_stuck_after, *destinations),
            )
        except Exception as exc:  # noqa: BLE001 - a closed or busy state file: say so, do not fail the scrape
            return f"state file cannot be read: {exc}"
        stuck = int(row[0]) if row else 0
        if stuck:
            return f"{stuck} deliveries failing for over {self.outbox_stuck_after / 60:.0f} min"
        return "ok"

    def outbox_metrics(self) -> Iterator[Metric]:
        state = self._state
        if state is None:
            return
        try:
            counts = dict(state.query("SELECT state, COUNT(*) FROM deliveries GROUP BY state"))
            (retrying, oldest) = state.query_one(
                "SELECT COUNT(*), MIN(o.created_at) FROM deliveries d JOIN result_objects o USING (sop_instance_uid) "
                "WHERE d.state = 'pending' AND d.last_error != ''"
            ) or (0, None)
            (oldest_pending,) = state.query_one(
                "SELECT MIN(o.created_at) FROM deliveries d JOIN result_objects o USING (sop_instance_uid) WHERE d.state = 'pending'"
            ) or (None,)
        except Exception:  # noqa: BLE001 - the run is closing its state file: leave these out
            log.debug("outbox metrics: state file not readable", exc_info=True)
            return
        deliveries = GaugeMetricFamily("ichscan_outbox_deliveries", "Deliveries of DICOM results in the state file, by state.", labels=["state"])
        for name in ("pending", "sent", "failed"):
            deliveries.add_metric([name], counts.get(name, 0))
        yield deliveries
        yield GaugeMetricFamily("ichscan_outbox_retrying_deliveries", "Pending deliveries whose last attempt failed.", value=retrying or 0)
        now = time.time()
        yield GaugeMetricFamily(
            "ichscan_outbox_oldest_pending_seconds",
            "Age of the oldest pending delivery's object (0: none pending).",
            value=max(0.0, now - oldest_pending) if oldest_pending else 0.0,
        )
        yield GaugeMetricFamily(
            "ichscan_outbox_oldest_retrying_seconds",
            "Age of the oldest pending delivery whose last attempt failed (0: none).",
            value=max(0.0, now - oldest) if oldest else 0.0,
        )

    def message_metrics(self) -> Iterator[Metric]:
        """The message outbox (``--notify`` webhooks, ``--fhir-forward``), by kind."""
        state = self._state
        if state is None:
            return
        try:
            rows = state.query(
                "SELECT m.kind, d.state, COUNT(*), MIN(m.created_at) FROM message_deliveries d JOIN messages m USING (event_id) "
                "GROUP BY m.kind, d.state"
            )
        except Exception:  # noqa: BLE001 - the run is closing its state file: leave these out
            log.debug("message metrics: state file not readable", exc_info=True)
            return
        deliveries = GaugeMetricFamily(
            "ichscan_message_deliveries", "Deliveries of webhook events and FHIR results in the state file, by kind and state.", labels=["kind", "state"]
        )
        oldest = GaugeMetricFamily(
            "ichscan_message_oldest_pending_seconds", "Age of the oldest pending message delivery, by kind (0: none pending).", labels=["kind"]
        )
        now, kinds = time.time(), set()
        for kind, delivery_state, count, created in rows:
            deliveries.add_metric([kind, delivery_state], count)
            kinds.add(kind)
            if delivery_state == "pending":
                oldest.add_metric([kind], max(0.0, now - created))
        for kind in kinds - {kind for kind, delivery_state, *_ in rows if delivery_state == "pending"}:
            oldest.add_metric([kind], 0.0)
        yield deliveries
        yield oldest

    def receiver_metrics(self) -> Iterator[Metric]:
        stats = self._store_stats
        if stats is None:
            return
        family = CounterMetricFamily(
            "ichscan_instances_received", "Instances received by serve-scp, by protocol and outcome.", labels=["protocol", "outcome"]
        )
        for (protocol, outcome), n in sorted(stats.by_protocol(self._protocols).items()):
            family.add_metric([protocol, outcome], n)
        yield family


class _ScrapeTimeCollector:
    """What is read when Prometheus scrapes: the receivers' counts and the outbox."""

    def __init__(self, metrics: RunMetrics):
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # names vary with what is attached; nothing to check against

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics.receiver_metrics()
        yield from self.metrics.outbox_metrics()
        yield from self.metrics.message_metrics()


def _writable(path: Path) -> str:
    """``"ok"``, or why ``path`` (a folder, or a file beside which we write) cannot take writes."""
    folder = path if path.is_dir() else path.parent
    if not os.access(folder, os.W_OK) or (path.is_file() and not os.access(path, os.W_OK)):
        return f"{path} is not writable"
    try:
        st = os.statvfs(folder)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if st.f_bavail * st.f_frsize < MIN_FREE_BYTES:
        return f"{path}: less than {MIN_FREE_BYTES // 1024**2} MiB free"
    return "ok"


# -- the HTTP server ------------------------------------------------------------------------


class MetricsServer(HTTPServer):
    """``/metrics``, ``/healthz`` and ``/readyz`` on one daemon thread (see the module docstring)."""

    #: A client that stalls holds the (single) thread this long at most.
    request_timeout = 10.0

    def __init__(self, metrics: RunMetrics, bind: str, port: int):
        self.metrics = metrics
        super().__init__((bind, port), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, name="ichscan-metrics", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def start_metrics_server(metrics: RunMetrics, bind: str, port: int) -> MetricsServer:
    """Listen on ``bind:port`` (0: a free port) and serve on a thread of its own.

    Raises
    ------
    OSError
        When the address cannot be bound (port in use, unknown address).
    """
    return MetricsServer(metrics, bind, port).start()


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    server_version = "ichscan-metrics"

    def setup(self) -> None:
        self.timeout = self.server.request_timeout
        super().setup()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("metrics %s: " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        metrics = self.server.metrics
        if path == "/metrics":
            self._send(HTTPStatus.OK, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, body = metrics.health() if path == "/healthz" else metrics.readiness()
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            self._send(status, (json.dumps(body) + "\n").encode(), "application/json")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)
