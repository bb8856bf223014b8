"""Decode workers: files in, :class:`~ichscan.records.DecodedSlice` out, one per file.

Decoding runs in worker processes (``forkserver``: they import pydicom and numpy, never
torch); the caller submits paths as they come and collects results in completion order.
At most a few batches of decoded images are in flight, so memory does not grow with the
number of files.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from ichscan.dicom import DEFAULT_LIMITS, FATAL_EXCEPTIONS, DecodeLimits, _one_line, decode_many
from ichscan.records import DecodedSlice, Instance, Status
from ichscan.shm import PICKLE, SHM, TRANSFERS, Slab, SlabPool, decode_into_slab, slab_bytes_for
from ichscan.sources.base import Entry
from ichscan.worker_init import guard_decode_worker

if TYPE_CHECKING:
    from ichscan.rules import SelectionRules

log = logging.getLogger(__name__)


def _refused(entry: Entry) -> DecodedSlice:
    """The row of an entry decided before decoding: refused (``error``) or skipped by a rule."""
    if entry.refusal:
        return DecodedSlice.failed(entry.path, entry.refusal)
    return DecodedSlice(entry.instance or Instance(entry.path), Status.SKIPPED, entry.skip)


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
        return [DecodedSlice.failed(paths[0], f"decoding failed: {_failure_text(exc)}")]


def _timer(on_chunk: Callable[[float], None], started: float) -> Callable[[cf.Future], None]:
    """A done-callback: the chunk's turnaround, unless it failed (those are retried)."""

    def done(future: cf.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            on_chunk(time.monotonic() - started)

    return done


def decode_entries(entries: Iterable[Entry], work_args: tuple) -> list[DecodedSlice]:
    """One result per entry, in order, decoded in this process as a decode worker decodes
    (:func:`decode_many` with a pool's :attr:`DecodePool.work_args`); a refused entry
    becomes its ``error`` result, one marked ``skip`` its ``skipped`` one, without being read.
    The Ray engine's decode tasks run this."""
    entries = list(entries)
    decoded = iter(_decode_inline([e.path for e in entries if not (e.refusal or e.skip)], work_args))
    return [_refused(e) if e.refusal or e.skip else next(decoded) for e in entries]


def default_in_flight(workers: int, batch_size: int | None, chunk_size: int) -> int:
    """Chunks submitted to the decode workers at most: about four model batches.

    Fewer starve the workers while the model runs, more gain nothing (docs/benchmarks.md);
    the cap of 64 bounds the shared memory a large GPU batch would take.
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

    ``rules`` (:class:`ichscan.rules.SelectionRules`) go to the workers with every chunk: a
    file that fails one is ``skipped`` there, its pixels never decoded.
    ``on_chunk`` is called with the seconds from submitting each chunk until its result
    reached this process (from the pool's result thread; in-process: the decode time).
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
        crop: bool = False,
        transfer: str = PICKLE,
        max_slabs: int | None = None,
        batch_size: int | None = None,
        rules: SelectionRules | None = None,
        on_chunk: Callable[[float], None] | None = None,
    ):
        self.workers = workers
        self.on_chunk = on_chunk
        self.limits = limits
        self._work_args = (limits, resize_to, display, crop, rules)
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
        self._in_flight: dict[cf.Future, list[str]] = {}
        self._done: list[DecodedSlice] = []

    @property
    def work_args(self) -> tuple:
        """The settings after the paths in every :func:`decode_many` call of this pool:
        limits, resize, display image, framing, selection rules."""
        return self._work_args

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._in_flight.clear()
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

    # -- streaming: submit entries as they come, collect results as they finish ------------

    @property
    def pending(self) -> int:
        """Files submitted and not yet collected."""
        return sum(len(paths) for paths in self._in_flight.values()) + len(self._done)

    def free_slots(self) -> int:
        """How many more files :meth:`submit` takes without exceeding ``max_in_flight`` chunks."""
        if self.workers <= 0:
            return self.chunk_size
        return max(0, self.max_in_flight - len(self._in_flight)) * self.chunk_size

    def submit(self, entries: Iterable[Entry | str]) -> None:
        """Start decoding ``entries`` (in chunks of at most ``chunk_size``); a refused entry
        becomes its ``error`` result, one marked ``skip`` its ``skipped`` one, without being read."""
        paths: list[str] = []
        for entry in entries:
            entry = Entry(entry) if isinstance(entry, str) else entry
            if entry.refusal or entry.skip:
                self._done.append(_refused(entry))
            else:
                paths.append(entry.path)
        if self.workers <= 0:
            started = time.monotonic()
            self._done.extend(d for path in paths for d in _decode_inline([path], self._work_args))
            if self.on_chunk is not None and paths:
                self.on_chunk(time.monotonic() - started)
            return
        for start in range(0, len(paths), self.chunk_size):
            chunk = paths[start : start + self.chunk_size]
            future = self._submit(chunk)
            if self.on_chunk is not None:
                future.add_done_callback(_timer(self.on_chunk, time.monotonic()))
            self._in_flight[future] = chunk

    def collect(self, timeout: float | None) -> list[DecodedSlice]:
        """Results finished within ``timeout`` seconds (``None``: wait for at least one chunk);
        possibly none. Every submitted file comes back exactly once."""
        out, self._done = self._done, []
        if not self._in_flight:
            return out
        done, _ = cf.wait(self._in_flight, timeout=0 if out else timeout, return_when=cf.FIRST_COMPLETED)
        finished, broken, failed = self._sort_done(done, self._in_flight)
        for results in finished:
            out.extend(results)
        out.extend(self._retry(broken, failed, self._in_flight))
        return out

    def decode(self, entries: Iterable[Entry | str]) -> Iterator[DecodedSlice]:
        """Decode every entry, keeping the workers busy; yields one result per entry."""
        entries = iter(entries)
        exhausted = False
        while True:
            while not exhausted and self.free_slots() > 0:
                chunk = [e for _, e in zip(range(self.free_slots()), entries, strict=False)]
                exhausted = not chunk
                self.submit(chunk)
            if not self.pending:
                return
            yield from self.collect(None)

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
                yield DecodedSlice.failed(path, "decoder process crashed while reading this file")
                continue
            except (DecodeWorkerStartError, *FATAL_EXCEPTIONS):
                raise
            except BaseException as exc:  # noqa: BLE001 - e.g. a PicklingError: this file fails, the run goes on
                log.error("decoding %s failed: %s", path, _failure_text(exc))
                yield DecodedSlice.failed(path, f"decoding failed: {_failure_text(exc)}")
                continue
            yield from results
