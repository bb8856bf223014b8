"""``ichscan batch --engine ray``: the batch pipeline's steps on a Ray cluster (Ray Data).

::

    driver   source (walk or manifest; --resume) -> ledger (queued)
    cluster    -> decode tasks (CPU; decode_entries = decode_many, as the local decode
                  workers run it; torch-free)
                  [slice_context k > 0: header keys -> group by series -> SeriesAssembler]
               -> model actors (Screener: the preprocess hook + model; batches of
                  --batch-size, as locally; one actor per GPU, else one per node)
    driver   results streamed back (iter_batches) -> overlay writer -> ledger (done)
             -> reporters (Pipeline.deliver / report: the local engine's own)

Only the middle moves to the cluster: the driver runs the same :class:`Pipeline` as the
local engine (:meth:`Pipeline.run` with this engine instead of :meth:`Pipeline.stream`),
so the ledger, the study table, the reporters, the overlays and the end of the run are
the local engine's. What crosses Ray's object store: each file's pickled
:class:`~ichscan.pipeline.series.ContextSlice` (decoded pixels, with its neighbours for a
model with slice context) from the decode tasks to the actors, and one compact
:class:`ResultRecord` per file back to the driver.

A worker that dies costs nothing: decode tasks are retried, actors restarted and their
batches retried (Ray); a result that arrives twice (a retried task) is recorded once,
as the ledger knows each path in flight once. Ray is imported only here, and only when
the engine is used; this module imports no torch at its top, so decode tasks stay
torch-free (the actor imports it in its constructor).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ichscan.dicom import read_header_instance
from ichscan.pipeline.decode import decode_entries
from ichscan.pipeline.options import BatchOptions, RunError
from ichscan.pipeline.series import ContextSlice, SeriesAssembler
from ichscan.records import Instance, Prediction, SliceResult, Status, StoredImage

if TYPE_CHECKING:
    from ichscan.pipeline.run import Pipeline
    from ichscan.sources.base import Entry

log = logging.getLogger(__name__)

RAY_MISSING = "--engine ray needs Ray: pip install 'ichscan[ray]'"
#: Files per decode task (as a local decode worker's chunk).
DECODE_CHUNK = 8
#: Headers read per task to find each file's series (models with slice context).
HEADER_CHUNK = 64
#: Retries of a decode task whose worker died (a task that raises is not retried: it
#: cannot, as decoding turns every failure into an error row).
TASK_RETRIES = 4
#: The error of a file whose decode task failed on every try (and once more alone).
LOST = "decoding failed on the Ray cluster: the task's worker died on every retry (decoder crash?)"
#: Entries taken from the source (and queued in the ledger) at a time.
QUEUE_CHUNK = 4096


def import_ray() -> Any:
    """Ray, or a one-line :class:`RunError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] extra
    except ImportError:
        raise RunError(RAY_MISSING) from None
    return ray


# -- what crosses the object store ---------------------------------------------------------


class ResultRecord(NamedTuple):
    """One file's result as it travels from a model actor to the driver: identity, status,
    probabilities, and the image to draw on only where an overlay or a thumbnail needs it.

    :meth:`result` makes the :class:`SliceResult` that the local engine would report (the
    thresholds applied on the driver, as the actor applied them).
    """

    instance: Instance
    status: str
    error: str
    probabilities: tuple[float, ...] | None = None
    series_any: float | None = None
    #: The brain-window image overlays and thumbnails draw on (``overlay_image``), uint8.
    display: np.ndarray | None = None
    heatmap: np.ndarray | None = None
    slope: float = 1.0
    intercept: float = 0.0
    rsna_fixed: bool = False
    frame: tuple[int, int, int, int, int] | None = None

    @classmethod
    def of(cls, result: SliceResult, with_image: bool) -> ResultRecord:
        prediction, image = result.prediction, result.image
        record = cls(result.instance, str(result.status), result.error)
        if prediction is not None:
            record = record._replace(
                probabilities=tuple(prediction.probabilities.values()), series_any=prediction.series_any
            )
        if image is not None:
            display = None
            if with_image:
                from ichscan.overlay import overlay_image

                display = overlay_image(result)
            record = record._replace(
                display=display,
                heatmap=result.heatmap,
                slope=image.slope,
                intercept=image.intercept,
                rsna_fixed=image.rsna_fixed,
                frame=image.frame,
            )
        return record

    def result(self, thresholds: dict[str, float]) -> SliceResult:
        prediction = None
        if self.probabilities is not None:
            prediction = Prediction.from_probabilities(np.asarray(self.probabilities), thresholds, series_any=self.series_any)
        image = None
        if self.status == Status.OK:
            image = StoredImage(None, self.slope, self.intercept, self.display, self.rsna_fixed, self.frame)
        result = SliceResult(self.instance, Status(self.status), self.error, image, prediction)
        result.heatmap = self.heatmap
        return result


def _column(values: list[Any]) -> np.ndarray:
    """A column of pickled objects (bytes: Arrow carries them as they are, file names that are
    not UTF-8 included)."""
    column = np.empty(len(values), dtype=object)
    column[:] = [pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL) for v in values]
    return column


def _objects(column: np.ndarray) -> list[Any]:
    return [pickle.loads(value) for value in column]


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line :class:`RunError` when nothing answers at ``HOST:PORT`` (``ray://`` or
    the GCS address): ``ray.init`` would retry for minutes."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or not port:
        raise RunError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise RunError(f"cannot reach Ray at {address}: {exc.strerror or exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- the cluster's steps (Ray tasks and actors) ----------------------------------------------


def decode_batch(batch: dict[str, np.ndarray], work_args: tuple) -> dict[str, np.ndarray]:
    """Decode task (no slice context): each entry decoded, passed on as a slice alone."""
    decoded = decode_entries(_objects(batch["entry"]), work_args)
    return {"item": _column([ContextSlice(d) for d in decoded])}


def series_keys(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Header task (slice context): each entry's series from its header, so that a series is
    decoded and given its neighbours together. A file without a series, a position or a
    readable header is a group of its own (it passes through series context alone)."""
    keys = []
    for number, entry in zip(batch["number"], _objects(batch["entry"]), strict=True):
        instance = None if entry.refusal else read_header_instance(entry.path)
        if instance is not None and instance.series_instance_uid and instance.position is not None:
            keys.append(instance.series_instance_uid)
        else:
            keys.append(f"~{number}")  # never a UID (digits and dots)
    return {"entry": batch["entry"], "series": np.array(keys, dtype=object)}


def decode_series(group: dict[str, np.ndarray], work_args: tuple, context: int) -> dict[str, np.ndarray]:
    """Decode task (slice context): one series, each slice with its neighbours as the local
    engine finds them (the same :class:`SeriesAssembler`, given the whole series)."""
    assembler = SeriesAssembler(context)
    assembler.add(decode_entries(_objects(group["entry"]), work_args), now=0.0)
    return {"item": _column(assembler.take(0.0, flush=True))}


class ScreenActor:
    """Model actor: a :class:`~ichscan.pipeline.screener.Screener` (the plugins' preprocess
    hook and the model) loaded once, screening batches of slices with their neighbours."""

    def __init__(self, model_settings: dict[str, Any], plugins_dirs: tuple, overlays_for: str, html: bool):
        from ichscan.pipeline.sizing import prepare_screening
        from ichscan.plugins import get_plugin_manager

        self.screener = prepare_screening(get_plugin_manager(plugins_dirs), **model_settings).screener
        self.overlays_for = overlays_for
        self.html = html

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ichscan.overlay import wants_overlay

        items: list[ContextSlice] = _objects(batch["item"])
        results = self.screener.screen([c.slice for c in items], [c.neighbours for c in items])
        return {
            "record": _column(
                [ResultRecord.of(r, (r.status == Status.OK and self.html) or wants_overlay(r, self.overlays_for)) for r in results]
            )
        }


# -- the driver --------------------------------------------------------------------------


class RayEngine:
    """Runs a batch :class:`Pipeline`'s files through Ray: ``pipeline.run(RayEngine(opts))``.

    Construct it before the run's outputs are opened: without Ray, or with an ``--address``
    where nothing answers, it raises a one-line :class:`RunError`.
    """

    def __init__(self, opts: BatchOptions):
        self.ray = import_ray()
        self.opts = opts
        if opts.address not in (None, "auto"):
            _check_reachable(opts.address)

    def check(self, pipeline: Pipeline) -> None:
        """Refuse what the engine cannot do (one line), before anything runs."""
        if pipeline.screener.series_head:
            raise RunError(
                f"--engine ray cannot run {pipeline.screener.loaded.name}: a series head needs every slice of a "
                "series in one process; use --engine local"
            )

    def __call__(self, pipeline: Pipeline) -> None:
        started = self.connect()
        try:
            actors = self.actors()  # before anything is queued: a cluster without the GPU asked for
            entries = self.queue(pipeline)
            seen: set[str] = set()
            # A task that failed for good (its retries spent: a file that kills the decoder
            # every time) loses its block, not the run; its files go round once more, one a
            # task, as the local engine retries a crashed worker's files one at a time.
            for chunk in (DECODE_CHUNK, 1):
                if not entries or pipeline.summary.interrupted:
                    break
                self.consume(pipeline, self.dataset(pipeline, entries, actors, chunk), seen)
                entries = [e for e in entries if e.path not in seen]
            if entries and not pipeline.summary.interrupted:
                log.error("Ray: %d files were lost by tasks that failed after %d retries", len(entries), TASK_RETRIES)
                pipeline.deliver([SliceResult.failed(e.path, LOST) for e in entries])
        except self.ray.exceptions.RayError as exc:
            # E.g. model actors that cannot start on the workers (a plugin or the weights missing there).
            raise RunError(f"the Ray run failed: {_first_line(exc)} (rows recorded so far are kept; --resume continues)") from None
        finally:
            if started:
                self.ray.shutdown()

    def connect(self) -> bool:
        """Join the cluster at ``--address`` (or start a local Ray); ``True`` if we started it."""
        ray, address = self.ray, self.opts.address
        if ray.is_initialized():
            return False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        main = threading.current_thread() is threading.main_thread()
        # ray.init replaces the SIGTERM handler with an exit; ours finishes what is in flight.
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        try:
            if address is None:
                ray.init(include_dashboard=False, configure_logging=False)
            else:
                ray.init(address=address, configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - Ray raises several kinds; the user needs one line
            where = f"at {address}" if address else "(local)"
            raise RunError(f"cannot start or reach Ray {where}: {_first_line(exc)}") from None
        finally:
            if sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
        ray.data.DataContext.get_current().enable_progress_bars = False
        return True

    def queue(self, pipeline: Pipeline) -> list[Entry]:
        """Every entry of the source, queued in the ledger (the local engine queues as it
        hands over; here the cluster takes them all at once)."""
        source, entries = pipeline.source, []
        while not source.finished:
            if pipeline.stop_event.is_set():
                pipeline.summary.interrupted = True
                source.stop()
                break
            chunk = source.poll(time.monotonic(), QUEUE_CHUNK)
            pipeline.queue(chunk)
            entries.extend(chunk)
        return entries

    def dataset(self, pipeline: Pipeline, entries: list[Entry], actors: tuple[int, dict[str, Any]], chunk: int = DECODE_CHUNK) -> Any:
        """The Ray Data dataset: entries -> decode (and series context) -> model -> records;
        ``chunk`` files per decode task (a model with slice context: a series per task)."""
        import warnings

        # A block whose task failed for good is left out (its files have no result: the
        # caller sees which) instead of failing the whole run.
        self.ray.data.DataContext.get_current().max_errored_blocks = -1
        with warnings.catch_warnings():
            # Recent Ray deprecates passing max_retries/max_restarts as remote arguments
            # but has no other way to set them yet.
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._dataset(pipeline, entries, chunk, *actors)

    def _dataset(self, pipeline: Pipeline, entries: list[Entry], chunk: int, actors: int, per_actor: dict[str, Any]) -> Any:
        ray = self.ray
        screener = pipeline.screener
        work_args = pipeline.pool.work_args
        retried = {"max_retries": TASK_RETRIES}
        if screener.context > 0:
            rows = [{"entry": pickle.dumps(e), "number": n} for n, e in enumerate(entries)]
            ds = ray.data.from_items(rows).map_batches(series_keys, batch_size=HEADER_CHUNK, batch_format="numpy", **retried)
            ds = ds.groupby("series").map_groups(
                decode_series, batch_format="numpy", fn_kwargs={"work_args": work_args, "context": screener.context}, **retried
            )
        else:
            ds = ray.data.from_items([{"entry": pickle.dumps(e)} for e in entries])
            ds = ds.map_batches(decode_batch, batch_size=chunk, batch_format="numpy", fn_kwargs={"work_args": work_args}, **retried)
        settings = self.opts.model_settings()
        if per_actor.get("num_gpus") and not self.opts.batch_size:
            import torch

            from ichscan.pipeline.sizing import default_batch_size

            # The driver may have no GPU: the actors' batch is a GPU's (not fitted to its memory).
            settings["batch_size"] = default_batch_size(torch.device("cuda"))
        batch_size = settings["batch_size"] or pipeline.batch_size
        log.info("Ray: %d model actors (%s), batches of %d", actors, ", ".join(f"{k} {v}" for k, v in per_actor.items()), batch_size)
        return ds.map_batches(
            ScreenActor,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={
                "model_settings": settings,
                "plugins_dirs": tuple(self.opts.plugins_dirs),
                "overlays_for": self.opts.overlays_for if pipeline.overlays is not None else "none",
                "html": self.opts.results.html is not None,
            },
            # A killed actor is restarted and its batches retried (Ray Data's defaults too).
            max_restarts=-1,
            max_task_retries=-1,
            **per_actor,
        )

    def actors(self) -> tuple[int, dict[str, Any]]:
        """How many model actors and what each takes, the local engine's split of a machine:
        one actor per GPU with one core to feed it (the decode tasks get the rest), else one
        actor per node that reserves no core, its torch threads sharing the node's cores with
        a decode task per core (measured faster, as locally: docs/scaling.md)."""
        ray = self.ray
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if self.opts.device.startswith("cuda") and not gpus:
            raise RunError(f"--device {self.opts.device}: the Ray cluster has no GPU (try --device auto)")
        if gpus and self.opts.device != "cpu":
            return gpus, {"num_gpus": 1, "num_cpus": 1}
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        # Reserving nothing, they would all land on one node: spread them.
        return max(1, nodes), {"num_cpus": 0, "scheduling_strategy": "SPREAD"}

    def consume(self, pipeline: Pipeline, ds: Any, seen: set[str]) -> None:
        """Stream the results back and hand them to the local engine's delivery (overlays,
        ledger, reporters); ``seen`` gets the paths delivered, and a path's second result
        (a retried task) is dropped."""
        thresholds = pipeline.screener.thresholds
        repeated = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            results = [record.result(thresholds) for record in _objects(batch["record"])]
            fresh = [r for r in results if r.path not in seen and r.path in pipeline.in_flight]
            seen.update(r.path for r in fresh)
            repeated += len(results) - len(fresh)
            pipeline.deliver(fresh)
            pipeline.report_overlaid()
            if pipeline.stop_event.is_set():
                # Files not yet reported stay queued in the ledger: --resume screens them.
                pipeline.summary.interrupted = True
                break
        if repeated:
            log.info("Ray: %d results of retried tasks were already recorded; dropped", repeated)
