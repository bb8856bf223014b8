"""The streaming engine: decode workers -> batches -> preprocess + model -> reporters.

Decoding runs in worker processes (``forkserver``: they import pydicom and numpy, never
torch); the main process runs full batches through the model and hands results to the
reporters. At most a few batches of decoded images are in flight, so memory does not
grow with the number of files.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pluggy
import torch

from ichscan.dicom import (
    DEFAULT_LIMITS,
    ERROR,
    FATAL_EXCEPTIONS,
    OK,
    DecodedSlice,
    DecodeLimits,
    _one_line,
    decode_many,
)
from ichscan.labels import LABELS
from ichscan.models import LoadedModel
from ichscan.overlay import OverlayWriter
from ichscan.reporting import ReporterSet, RunSummary, SliceResult, StudyTable, top_finding
from ichscan.shm import PICKLE, SHM, TRANSFERS, Slab, SlabPool, decode_into_slab, default_transfer, slab_bytes_for
from ichscan.sources.folder import FolderEntry
from ichscan.worker_init import guard_decode_worker

log = logging.getLogger(__name__)


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (try --device auto or cpu)")
    return device


def default_workers(device: torch.device) -> int:
    """Decode workers: one per core on the CPU, all cores but one with a GPU.

    On the CPU, workers and model threads share the cores on purpose: measured on the
    2-core development machine (benchmarks/bench_batch.py), 2 workers + 2 threads ran
    ~1.4x faster than splitting the cores 1 + 1, as each side idles while the other
    works.
    """
    cores = cpu_count()
    if device.type == "cuda":
        return max(1, cores - 1)
    return cores


def default_threads(workers: int) -> int:
    """Model threads on the CPU: every core (see :func:`default_workers`)."""
    return cpu_count()


def default_batch_size(device: torch.device) -> int:
    # CPU: 32 amortises the fully connected layer's weights; see SimpleCNN.cpu_chunk.
    # CUDA: the most a GPU gets; Screener.fit_batch_size lowers it when memory is short.
    return 256 if device.type == "cuda" else 32


def fit_batch_size(free_bytes: int, per_image_bytes: int, preferred: int, share: float = 0.5) -> int:
    """The largest batch up to ``preferred`` whose working memory fits ``share`` of ``free_bytes``.

    Batches below ``preferred`` are rounded down to a multiple of 8 (tensor-core
    friendly) when that leaves at least 8; never below 1.
    """
    if per_image_bytes <= 0:
        return preferred
    fits = int(free_bytes * share) // per_image_bytes
    if fits >= preferred:
        return preferred
    return max(1, fits // 8 * 8 if fits >= 8 else fits)


@dataclass
class ScreeningSetup:
    """The model side of a run with the worker, batch and thread counts it uses."""

    screener: Screener
    workers: int
    batch_size: int

    @property
    def loaded(self) -> LoadedModel:
        return self.screener.loaded

    @property
    def device(self) -> torch.device:
        return self.screener.device


def prepare_screening(
    pm: pluggy.PluginManager,
    *,
    weights: os.PathLike[str] | str | None = None,
    model_name: str | None = None,
    thresholds: dict[str, float] | None = None,
    device: str = "auto",
    workers: int | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
) -> ScreeningSetup:
    """Load the model, tell the user what its weights are, and size the run for the machine
    (the part ``batch``, ``watch`` and ``serve-scp`` share)."""
    from ichscan.models import load_model

    resolved = resolve_device(device)
    loaded = load_model(pm, weights, model_name=model_name, thresholds=thresholds)
    if loaded.notice():
        log.warning("%s", loaded.notice())
    workers = default_workers(resolved) if workers is None else workers
    if threads:
        torch.set_num_threads(threads)
    elif resolved.type == "cpu":
        torch.set_num_threads(default_threads(workers))
    screener = Screener(pm, loaded, resolved)
    if not batch_size:
        batch_size = default_batch_size(resolved)
        if resolved.type == "cuda":
            batch_size = screener.fit_batch_size(batch_size)
    return ScreeningSetup(screener, workers, batch_size)


class Screener:
    """The model side: preprocessing hook + model + thresholds on one device."""

    def __init__(self, pm: pluggy.PluginManager, loaded: LoadedModel, device: torch.device | str = "auto"):
        self.pm = pm
        self.loaded = loaded
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.thresholds = loaded.thresholds
        self.settings = loaded.preprocessing
        # channels-last is the faster convolution layout on both CPU and GPU.
        self.channels_last = True
        self.model = loaded.model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.amp_dtype: torch.dtype | None = None
        if self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def predict(self, pixels: list[np.ndarray], slopes: list[float], intercepts: list[float]) -> np.ndarray:
        """Probabilities ``(N, 6)`` for stored pixel arrays."""
        with torch.inference_mode():
            batch = self.pm.hook.ichscan_preprocess(
                pixels=pixels,
                slopes=slopes,
                intercepts=intercepts,
                settings=self.settings,
                device=self.device,
                channels_last=self.channels_last,
            )
            autocast = (
                torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
            )
            with autocast:
                logits = self.model(batch)
            # One copy back per batch.
            return torch.sigmoid(logits.float()).cpu().numpy()

    def fit_batch_size(self, preferred: int, probe: int = 8, side: int = 512) -> int:
        """On a GPU: the batch size that fits its free memory, at most ``preferred``.

        Runs ``probe`` blank ``side`` x ``side`` slices through preprocessing and the
        model (which also warms both up), takes the peak memory per image and fits a
        batch into half of what is free. On the CPU: ``preferred``.
        """
        if self.device.type != "cuda":
            return preferred
        device = self.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        self.predict([np.zeros((side, side), np.int16)] * probe, [1.0] * probe, [-1024.0] * probe)
        torch.cuda.synchronize(device)
        per_image = -(-(torch.cuda.max_memory_allocated(device) - base) // probe)
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks torch's caching allocator holds but does not use are free for us too.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        size = fit_batch_size(free, per_image, preferred)
        log.info(
            "GPU batch %d (%.1f MiB per image, %.0f MiB free on %s)",
            size,
            per_image / 2**20,
            free / 2**20,
            torch.cuda.get_device_name(device),
        )
        return size

    def screen(self, decoded: list[DecodedSlice]) -> list[SliceResult]:
        """Results for a list of decoded slices; only ``ok`` ones go through the model."""
        results = [to_result(d) for d in decoded]
        ok = [r for r in results if r.status == OK]
        if ok:
            try:
                probs = self.predict([r.pixels for r in ok], [r.slope for r in ok], [r.intercept for r in ok])
            except Exception as exc:  # noqa: BLE001 - a failed batch becomes error rows, the run goes on
                log.error("model failed on a batch of %d: %s: %s", len(ok), type(exc).__name__, exc)
                for r in ok:
                    r.status, r.error = ERROR, f"model failed: {type(exc).__name__}: {exc}"
                return results
            for r, row in zip(ok, probs, strict=True):
                self.annotate(r, row)
        return results

    def annotate(self, result: SliceResult, row: np.ndarray) -> None:
        result.probabilities = {label: float(p) for label, p in zip(LABELS, row, strict=True)}
        result.positive = {label: result.probabilities[label] >= self.thresholds[label] for label in LABELS}
        result.top_label, result.top_probability = top_finding(result.probabilities, result.positive["any"])


def to_result(decoded: DecodedSlice) -> SliceResult:
    return SliceResult(
        path=decoded.path,
        status=decoded.status,
        error=decoded.error,
        sop_instance_uid=decoded.sop_instance_uid,
        study_instance_uid=decoded.study_instance_uid,
        series_instance_uid=decoded.series_instance_uid,
        instance_number=decoded.instance_number,
        sop_class_uid=decoded.sop_class_uid,
        pixels=decoded.pixels,
        display=decoded.display,
        slope=decoded.slope,
        intercept=decoded.intercept,
    )


def _refused(entry: FolderEntry) -> DecodedSlice:
    return DecodedSlice(path=entry.path, status=ERROR, error=entry.refusal)


class DecodeWorkerStartError(RuntimeError, ValueError):
    """The decode worker processes cannot be started (the run cannot happen).

    A ValueError too, so that the commands' usual one-line error handling shows it
    (``ichscan batch``, ``watch`` and ``serve-scp`` catch ValueError).
    """


#: What starting a worker can raise: the forkserver failing to start or to answer
#: (OSError: BrokenPipeError, ConnectionRefusedError...; EOFError from its socket).
_START_FAILURES = (OSError, EOFError)


def _failure_text(exc: BaseException) -> str:
    return _one_line(f"{type(exc).__name__}: {exc}")


def _decode_inline(paths: list[str], work_args: tuple) -> list[DecodedSlice]:
    """:func:`decode_many` in this process; a failure costs only the file it happened on."""
    try:
        return decode_many(paths, *work_args)
    except FATAL_EXCEPTIONS:
        raise
    except BaseException as exc:  # noqa: BLE001 - decode_many does not raise; if it ever does, no file is lost
        if len(paths) > 1:
            return [d for path in paths for d in _decode_inline([path], work_args)]
        log.error("decoding %s failed: %s", paths[0], _failure_text(exc))
        return [DecodedSlice(path=paths[0], status=ERROR, error=f"decoding failed: {_failure_text(exc)}")]


def default_in_flight(workers: int, batch_size: int | None, chunk_size: int) -> int:
    """Chunks submitted to the decode workers at most: about four model batches.

    Fewer starve the workers while the model runs (measured on 2 cores, 1,200 files,
    alternating runs: 16 chunks of 8 ran 8-27 % faster than the former 6, and 32 no
    faster than 16); the cap of 64 bounds the shared memory a large GPU batch would take.
    """
    per_batch = -(-(batch_size or 32) // max(1, chunk_size))
    return max(2, 3 * workers, min(64, 4 * per_batch))


class DecodePool:
    """Decodes files in worker processes, streaming results in completion order.

    ``workers=0`` decodes in the calling process. A worker that dies (a decoder crash
    on a hostile file) is replaced; the files it held are retried one at a time, and
    the one that kills a worker again gets an ``error`` row instead of being lost.

    ``transfer="shm"`` hands the decoded arrays over in shared memory (see
    :mod:`ichscan.shm`): results then carry zero-copy views, and a slab is reused once
    no view of it is alive. ``"pickle"`` sends them through the pool's pipe.
    ``max_slabs`` bounds the shared memory (default: chunks in flight plus those a
    batch of ``batch_size`` holds); a chunk finding no free slab is pickled.
    """

    def __init__(
        self,
        workers: int,
        limits: DecodeLimits = DEFAULT_LIMITS,
        chunk_size: int = 8,
        max_in_flight: int | None = None,
        *,
        resize_to: int | None = None,
        display: bool = False,
        transfer: str = PICKLE,
        max_slabs: int | None = None,
        batch_size: int | None = None,
    ):
        self.workers = workers
        self.limits = limits
        self._work_args = (limits, resize_to, display)
        self.chunk_size = max(1, chunk_size)
        self.max_in_flight = max_in_flight or default_in_flight(workers, batch_size, self.chunk_size)
        self._executor: cf.ProcessPoolExecutor | None = None
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {', '.join(TRANSFERS)}, not {transfer!r}")
        self.transfer = transfer if workers > 0 else PICKLE  # in-process: nothing to transfer
        self.slabs: SlabPool | None = None
        if self.transfer == SHM:
            # Chunks in flight plus those waiting in a forming batch (views keep slabs taken).
            held = -(-(batch_size or 32) // self.chunk_size) + 2
            slab_bytes = slab_bytes_for(self.chunk_size, display, resize_to)
            self.slabs = SlabPool(slab_bytes, max_slabs or self.max_in_flight + held)
        self._slab_of: dict[cf.Future, Slab] = {}

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        # After the workers are gone: nothing writes to a slab any more.
        self._slab_of.clear()
        if self.slabs is not None:
            self.slabs.close()

    def _pool_submit(self, fn, *args) -> cf.Future:
        """Submit to the worker pool, starting it (or a worker) as needed.

        Raises
        ------
        DecodeWorkerStartError
            When worker processes cannot be started (one-line message).
        """
        try:
            return self._pool().submit(fn, *args)
        except BrokenProcessPool:
            raise
        except _START_FAILURES as exc:
            self._discard_pool()
            log.debug("starting decode workers failed", exc_info=True)
            raise DecodeWorkerStartError(
                f"cannot start decode worker processes: {_failure_text(exc)} (try --workers 0)"
            ) from None

    def _discard_pool(self) -> None:
        """Drop a pool that failed to start: end the workers it did start, without waiting."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            try:
                process.terminate()
            except Exception:  # noqa: BLE001 - best effort: it may never have started
                pass
        try:
            executor.shutdown(wait=False, cancel_futures=True)
        except Exception:  # noqa: BLE001
            log.debug("shutting down a pool that failed to start", exc_info=True)

    def _pool(self) -> cf.ProcessPoolExecutor:
        if self._executor is None:
            ctx = multiprocessing.get_context("forkserver")
            # Workers import the decoder only: a CUDA build of torch costs seconds per process.
            ctx.set_forkserver_preload(["ichscan.dicom", "ichscan.shm"])
            self._executor = cf.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=ctx,
                # Workers ignore Ctrl-C (the main process decides how to stop) and exit
                # when the main process is gone, even after a SIGKILL.
                initializer=guard_decode_worker,
                initargs=(os.getpid(),),
            )
        return self._executor

    def _restart(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _submit(self, chunk: list[str]) -> cf.Future:
        """Start decoding one chunk, in a slab when one is free.

        A pool that broke since the last look (a worker died) refuses new work: the
        chunk then gets a future that failed with BrokenProcessPool, and goes down the
        same retry path as the chunks that were in flight.
        """
        slab = self.slabs.acquire() if self.slabs is not None else None
        try:
            if slab is None:
                return self._pool_submit(decode_many, chunk, *self._work_args)
            future = self._pool_submit(decode_into_slab, chunk, slab.ticket, *self._work_args)
        except BrokenProcessPool as exc:
            if slab is not None:
                self.slabs.release_unused(slab)
            failed: cf.Future = cf.Future()
            failed.set_exception(exc)
            return failed
        except BaseException:
            if slab is not None:
                self.slabs.release_unused(slab)
            raise
        self._slab_of[future] = slab
        return future

    def _result(self, future: cf.Future) -> list[DecodedSlice]:
        """The slices of a finished chunk; raises what the future raises (BrokenProcessPool,
        or e.g. a PicklingError when a worker's result or exception cannot be sent back)."""
        slab = self._slab_of.pop(future, None)
        if slab is None:
            return future.result()
        try:
            results, placed = future.result()
        except BaseException:
            self.slabs.retire(slab)  # a dying worker may have been writing to it
            raise
        return self.slabs.unpack(slab, results, placed)

    def _abandon(self, futures: Iterable[cf.Future]) -> None:
        """Futures of a broken pool: their slabs are never reused (old workers may write)."""
        for future in futures:
            slab = self._slab_of.pop(future, None)
            if slab is not None:
                self.slabs.retire(slab)

    def decode(self, entries: Iterable[FolderEntry | str]) -> Iterator[DecodedSlice]:
        """Decode every entry; yields exactly one :class:`DecodedSlice` per entry."""
        entries = (FolderEntry(e) if isinstance(e, str) else e for e in entries)
        if self.workers <= 0:
            for entry in entries:
                yield _refused(entry) if entry.refusal else _decode_inline([entry.path], self._work_args)[0]
            return
        in_flight: dict[cf.Future, list[str]] = {}
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < self.max_in_flight:
                chunk: list[str] = []
                for entry in entries:
                    if entry.refusal:
                        yield _refused(entry)
                        continue
                    chunk.append(entry.path)
                    if len(chunk) >= self.chunk_size:
                        break
                else:
                    exhausted = True
                if chunk:
                    in_flight[self._submit(chunk)] = chunk
            if not in_flight:
                return
            done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
            finished, broken, failed = self._sort_done(done, in_flight)
            for results in finished:
                yield from results
            yield from self._retry(broken, failed, in_flight)

    def _sort_done(
        self, done: Iterable[cf.Future], in_flight: dict[cf.Future, list[str]]
    ) -> tuple[list[list[DecodedSlice]], list[str], list[str]]:
        """Finished chunks: their results, the files of chunks a dead worker held (``broken``)
        and those of chunks that failed otherwise (``failed``), e.g. a result that could not
        be pickled back from the worker."""
        finished: list[list[DecodedSlice]] = []
        broken: list[str] = []
        failed: list[str] = []
        for future in done:
            paths = in_flight.pop(future)
            try:
                finished.append(self._result(future))
            except BrokenProcessPool:
                broken.extend(paths)
            except FATAL_EXCEPTIONS:
                raise
            except BaseException as exc:  # noqa: BLE001 - one bad chunk must not end the run
                log.warning("decoding %d files failed (%s); retrying them one at a time", len(paths), _failure_text(exc))
                failed.extend(paths)
        return finished, broken, failed

    def _retry(self, broken: list[str], failed: list[str], in_flight: dict[cf.Future, list[str]]) -> Iterator[DecodedSlice]:
        """Retry files one at a time: after a worker died, every file in flight (the pool is
        restarted); after a chunk failed otherwise, that chunk's files."""
        retry = broken + failed
        if broken:
            retry.extend(p for paths in in_flight.values() for p in paths)
            self._abandon(in_flight)
            in_flight.clear()
            log.warning("a decode worker died; retrying %d files one at a time", len(retry))
            self._restart()
        if retry:
            yield from self._decode_isolated(retry)

    def _decode_isolated(self, paths: list[str]) -> Iterator[DecodedSlice]:
        for path in paths:
            try:
                results = self._pool_submit(decode_many, [path], *self._work_args).result()
            except BrokenProcessPool:
                self._restart()
                log.error("decoder crashed on %s", path)
                yield DecodedSlice(path=path, status=ERROR, error="decoder process crashed while reading this file")
                continue
            except (DecodeWorkerStartError, *FATAL_EXCEPTIONS):
                raise
            except BaseException as exc:  # noqa: BLE001 - e.g. a PicklingError: this file fails, the run goes on
                log.error("decoding %s failed: %s", path, _failure_text(exc))
                yield DecodedSlice(path=path, status=ERROR, error=f"decoding failed: {_failure_text(exc)}")
                continue
            yield from results


@dataclass
class Progress:
    """A progress line on a terminal; a plain log line every ``interval`` s otherwise."""

    total: int | None = None
    enabled: bool = True
    interval: float = 10.0
    label: str = "screened"
    unit: str = "files"

    def __post_init__(self) -> None:
        import sys

        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._tty = self.enabled and sys.stderr.isatty()
        self._stream = sys.stderr

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if self._tty:
            if now - self._last >= 0.1:
                self._last = now
                self._stream.write("\r" + self._line(now))
                self._stream.flush()
        elif now - self._last >= self.interval:
            self._last = now
            log.info("%s", self._line(now))

    def close(self) -> None:
        if self.enabled and self._tty:
            self._stream.write("\r" + self._line(time.monotonic()) + "\n")
            self._stream.flush()

    def _line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            return f"{self.label} {self.done}/{self.total} {self.unit} ({pct:3.0f}%) {rate:6.1f} {self.unit}/s, ETA {eta:5.0f} s "
        return f"{self.label} {self.done} {self.unit}, {rate:6.1f} {self.unit}/s "


def run_stream(
    entries: Iterable[FolderEntry | str],
    screener: Screener,
    reporters: ReporterSet,
    *,
    batch_size: int,
    workers: int,
    limits: DecodeLimits = DEFAULT_LIMITS,
    overlays_dir: os.PathLike[str] | str | None = None,
    overlays_for: str = "positive",
    progress: Progress | None = None,
    transfer: str | None = None,
    overlay_threads: int | None = None,
) -> tuple[RunSummary, StudyTable]:
    """Screen every entry, in full batches, and hand each batch of results to reporters.

    Overlays are written by ``overlay_threads`` threads (default: one per core) while
    the model goes on; a batch reaches the reporters once its overlays are on disk.

    ``transfer`` is how decoded pixels reach this process, ``shm`` or ``pickle``
    (default: :func:`ichscan.shm.default_transfer` for the screener's device).
    """
    from pathlib import Path

    overlay_path = Path(overlays_dir) if overlays_dir is not None else None
    studies = StudyTable(screener.thresholds)
    summary = RunSummary()
    progress = progress or Progress(enabled=False)
    start = time.monotonic()
    ready: list[DecodedSlice] = []
    other: list[DecodedSlice] = []

    # At most two batches of overlays in flight: the model runs one batch ahead of them.
    overlays = (
        OverlayWriter(overlay_path, overlays_for, threads=overlay_threads or cpu_count(), max_pending=2 * batch_size)
        if overlay_path is not None
        else None
    )

    def report(results: list[SliceResult]) -> None:
        studies.add(results)
        summary.count(results)
        reporters.on_results(results, studies)
        for result in results:
            result.pixels = result.display = None
        progress.update(len(results))

    def flush() -> None:
        results = screen_decoded(ready + other, screener)
        ready.clear()
        other.clear()
        for done in overlays.submit(results) if overlays is not None else [results]:
            report(done)

    # On the CPU the workers also resize to the model's input size: that balances the
    # cores (the model process is the slower side) and shrinks what crosses the pipe.
    # A GPU resizes faster itself, so there the workers hand over full-size pixels.
    resize_to = screener.settings.size if screener.device.type == "cpu" else None
    display = overlay_path is not None
    transfer = transfer or default_transfer(screener.device.type)
    try:
        with DecodePool(
            workers, limits, resize_to=resize_to, display=display, transfer=transfer, batch_size=batch_size
        ) as pool:
            log.debug(
                "decoding: %d workers, chunks of %d files, up to %d chunks in flight, transfer %s, "
                "resized in the workers to %s; overlays: %s",
                pool.workers,
                pool.chunk_size,
                pool.max_in_flight,
                pool.transfer,
                resize_to or "no",
                f"{overlays_for} by {overlays.threads} threads" if overlays is not None else "none",
            )
            for decoded in pool.decode(entries):
                (ready if decoded.status == OK else other).append(decoded)
                if len(ready) >= batch_size or len(other) >= batch_size:
                    flush()
            if ready or other:
                flush()
            for done in overlays.drain() if overlays is not None else []:
                report(done)
    except KeyboardInterrupt:
        # Ctrl-C: what was screened is reported and the files are closed properly; the
        # files still in flight get no row (nothing was recorded about them).
        summary.interrupted = True
        if overlays is not None:
            try:  # screened rows whose overlays are being written: finish those (bounded)
                pending = overlays.drain()
            except KeyboardInterrupt:  # a second Ctrl-C: the rows, without the overlays not started
                pending = overlays.abandon()
            for done in pending:
                report(done)
    finally:
        if overlays is not None:
            overlays.close()
    summary.seconds = time.monotonic() - start
    if not summary.interrupted:
        # A folder run is complete at its end; an interrupted one may have cut studies.
        reporters.on_study_complete(sorted(studies.studies), studies)
    reporters.on_finish(summary, studies)
    progress.close()
    return summary, studies


def screen_decoded(
    decoded: list[DecodedSlice],
    screener: Screener,
    overlays_dir: os.PathLike[str] | str | None = None,
    overlays_for: str = "positive",
) -> list[SliceResult]:
    """Results for one batch of decoded slices: model on the ``ok`` ones, then overlays.

    The per-batch step of :func:`run_stream`, for callers that form batches themselves
    (``ichscan watch``); the pixels stay on the results until the caller drops them.
    With ``overlays_dir``, the batch's overlays are written (one thread per core) before
    it returns; :func:`run_stream` writes them alongside the model instead.
    """
    ready = [d for d in decoded if d.status == OK]
    results = screener.screen(ready) if ready else []
    results += [to_result(d) for d in decoded if d.status != OK]
    if overlays_dir is not None:
        with OverlayWriter(overlays_dir, overlays_for, threads=cpu_count(), max_pending=len(results) + 1) as writer:
            writer.submit(results)
            writer.drain()
    return results


class MicroBatcher:
    """Collects decoded slices until a batch is full or its oldest slice waited too long.

    Parameters
    ----------
    batch_size
        A batch goes to the model as soon as it holds this many ``ok`` slices.
    max_latency
        ...or once its first slice has waited this many seconds, so a trickle of single
        files is screened promptly while a burst still runs full batches.
    """

    def __init__(self, batch_size: int, max_latency: float):
        self.batch_size = max(1, batch_size)
        self.max_latency = max(0.0, max_latency)
        self._ok: list[DecodedSlice] = []
        self._other: list[DecodedSlice] = []
        self._since: float | None = None

    def __len__(self) -> int:
        return len(self._ok) + len(self._other)

    def add(self, decoded: Iterable[DecodedSlice], now: float | None = None) -> None:
        for item in decoded:
            if self._since is None:
                self._since = time.monotonic() if now is None else now
            (self._ok if item.status == OK else self._other).append(item)

    def due_in(self, now: float) -> float | None:
        """Seconds until the latency bound forces a batch; ``None`` when empty, 0 when due."""
        if self._since is None:
            return None
        if len(self._ok) >= self.batch_size or len(self._other) >= self.batch_size:
            return 0.0
        return max(0.0, self._since + self.max_latency - now)

    def take(self, now: float | None = None, force: bool = False) -> list[DecodedSlice]:
        """The next batch when it is due (or ``force``); ``[]`` otherwise.

        At most ``batch_size`` ``ok`` slices; slices that need no model (``skipped``,
        ``error``) ride along with them.
        """
        now = time.monotonic() if now is None else now
        due = self.due_in(now)
        if due is None or (due > 0 and not force):
            return []
        batch = self._ok[: self.batch_size] + self._other
        self._ok = self._ok[self.batch_size :]
        self._other = []
        # What stays behind already waited: it goes with the next batch without a new wait.
        self._since = now - self.max_latency if self._ok else None
        return batch


class StreamingDecodePool(DecodePool):
    """A :class:`DecodePool` fed incrementally: :meth:`submit` paths, :meth:`collect` results.

    For sources where files arrive over time (``ichscan watch``). The workers run
    :func:`ichscan.worker_init.guard_decode_worker`: they ignore a Ctrl-C sent to the
    whole process group (the main process finishes the files in flight, then closes
    the pool) and exit when the main process is gone, even after a SIGKILL.
    """

    def __init__(self, *args, **kwargs):  # as DecodePool
        super().__init__(*args, **kwargs)
        self._in_flight: dict[cf.Future, list[str]] = {}
        self._done: list[DecodedSlice] = []

    @property
    def pending(self) -> int:
        """Files submitted and not yet collected."""
        return sum(len(paths) for paths in self._in_flight.values()) + len(self._done)

    def free_slots(self) -> int:
        """How many more files :meth:`submit` takes without exceeding ``max_in_flight`` chunks."""
        if self.workers <= 0:
            return self.chunk_size
        return max(0, self.max_in_flight - len(self._in_flight)) * self.chunk_size

    def submit(self, paths: list[str]) -> None:
        """Start decoding ``paths`` (in chunks of at most ``chunk_size``)."""
        if self.workers <= 0:
            self._done.extend(_decode_inline(list(paths), self._work_args))
            return
        for start in range(0, len(paths), self.chunk_size):
            chunk = list(paths[start : start + self.chunk_size])
            self._in_flight[self._submit(chunk)] = chunk

    def collect(self, timeout: float) -> list[DecodedSlice]:
        """Results finished within ``timeout`` seconds (possibly none); one per submitted file."""
        out, self._done = self._done, []
        if not self._in_flight:
            return out
        done, _ = cf.wait(self._in_flight, timeout=0 if out else timeout, return_when=cf.FIRST_COMPLETED)
        finished, broken, failed = self._sort_done(done, self._in_flight)
        for results in finished:
            out.extend(results)
        out.extend(self._retry(broken, failed, self._in_flight))
        return out

    def close(self) -> None:
        self._in_flight.clear()
        super().close()
