"""Shared-memory transport of decoded pixels from decode workers to the main process.

The main process owns a pool of shared-memory *slabs* (one per chunk of files in flight).
A worker decodes its chunk, copies the pixel arrays into the slab it was given and
returns only the metadata and where each array lies; the main process wraps those places
in numpy arrays without copying, and the batch is built straight from them. Nothing the
size of an image crosses the pool's pipe, which on a GPU machine is what otherwise limits
throughput (a 512x512 int16 slice is 512 KiB: pickled, sent, read and unpickled by one
thread of the main process).

A slab goes back to the pool only when the last array made from it has been garbage
collected, so a result that keeps its pixels (a reporter, a caller holding results) can
never see them overwritten. When no slab is free, a chunk travels the old way (pickled),
so holding results never stalls the pool.

This module runs in decode workers: no torch here.

Selection: ``ICHSCAN_TRANSFER=shm`` or ``pickle`` overrides the default of
:func:`default_transfer`.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import TYPE_CHECKING

import numpy as np

from ichscan.dicom import DEFAULT_LIMITS, DecodedSlice, DecodeLimits, decode_many

if TYPE_CHECKING:
    from ichscan.rules import SelectionRules

log = logging.getLogger(__name__)

SHM = "shm"
PICKLE = "pickle"
TRANSFERS = (SHM, PICKLE)
TRANSFER_ENV = "ICHSCAN_TRANSFER"

#: Bytes a slab holds per file: a 512x512 int16 slice (display images add 512x512 bytes).
SLICE_BYTES = 512 * 512 * 2
DISPLAY_BYTES = 512 * 512
_ALIGN = 64  # cache-line aligned arrays
_FIELDS = ("pixels", "display")
#: Slab names are ``ichscan-<pid of the owner>-<8 hex digits>`` (under /dev/shm on Linux).
SLAB_PREFIX = "ichscan-"


def default_transfer(device_type: str) -> str:
    """``shm`` on every device, unless ``ICHSCAN_TRANSFER`` (``shm`` or ``pickle``) says otherwise.

    The main process receives a file faster from shared memory than through the pool's
    pipe, most of all for the full-size pixels of the GPU path (figures in
    docs/benchmarks.md). ``device_type`` is kept for a future per-device choice.
    """
    chosen = os.environ.get(TRANSFER_ENV, "").strip().lower()
    if chosen:
        if chosen not in TRANSFERS:
            raise ValueError(f"{TRANSFER_ENV}={chosen!r}: expected one of {', '.join(TRANSFERS)}")
        return chosen
    return SHM


@dataclass(frozen=True)
class SlabTicket:
    """What a worker needs to write into a slab: its name and size."""

    name: str
    size: int


@dataclass(frozen=True)
class Placed:
    """Where a worker put one array of result ``index`` in its slab."""

    index: int
    field: str
    offset: int
    shape: tuple[int, ...]
    dtype: str


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# -- worker side ---------------------------------------------------------------------------

#: Slabs this worker has mapped, most recently used last.
_ATTACHED: OrderedDict[str, mmap.mmap] = OrderedDict()
_MAX_ATTACHED = 512


def _attach(name: str) -> mmap.mmap:
    """Map a slab the main process created, without registering it with a resource tracker.

    Python < 3.13 registers every attached segment with the resource tracker, which the
    workers share with the main process: the tracker would then unlink it, or warn about
    a "leak", behind the owner's back. The owner alone registers and unlinks.
    """
    mapped = _ATTACHED.get(name)
    if mapped is not None:
        _ATTACHED.move_to_end(name)
        return mapped
    import _posixshmem  # what multiprocessing.shared_memory uses itself (POSIX, as forkserver)

    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        mapped = mmap.mmap(fd, 0)
    finally:
        os.close(fd)
    _ATTACHED[name] = mapped
    while len(_ATTACHED) > _MAX_ATTACHED:
        _, old = _ATTACHED.popitem(last=False)
        old.close()
    return mapped


def pack(results: list[DecodedSlice], ticket: SlabTicket) -> list[Placed]:
    """Move the arrays of ``results`` into the slab (as many as fit); say where they are.

    Arrays that do not fit stay on their result and are pickled with it.
    """
    buf = _attach(ticket.name)
    placed: list[Placed] = []
    offset = 0
    for index, result in enumerate(results):
        image = result.image
        if image is None:
            continue
        for name in _FIELDS:
            arr = getattr(image, name)
            if arr is None or arr.dtype.hasobject or offset + arr.nbytes > ticket.size:
                continue
            np.ndarray(arr.shape, arr.dtype, buffer=buf, offset=offset)[...] = arr
            placed.append(Placed(index, name, offset, tuple(arr.shape), arr.dtype.str))
            setattr(image, name, None)
            offset = _aligned(offset + arr.nbytes)
    return placed


def decode_into_slab(
    paths: list[str],
    ticket: SlabTicket,
    limits: DecodeLimits = DEFAULT_LIMITS,
    resize_to: int | None = None,
    display: bool = False,
    crop: bool = False,
    rules: SelectionRules | None = None,
) -> tuple[list[DecodedSlice], list[Placed]]:
    """:func:`ichscan.dicom.decode_many`, handing the arrays over in the slab (worker side)."""
    results = decode_many(paths, limits, resize_to, display, crop, rules)
    return results, pack(results, ticket)


# -- main-process side ------------------------------------------------------------------


def _unlink_name(name: str) -> None:
    import _posixshmem

    try:
        _posixshmem.shm_unlink("/" + name)
    except OSError:  # never created, or already gone
        pass


class Slab:
    """One shared-memory segment, owned by a :class:`SlabPool`."""

    def __init__(self, segment: shared_memory.SharedMemory):
        self.segment = segment
        self.ticket = SlabTicket(segment.name, segment.size)
        #: The chunk in flight (1) plus every live array made from this slab.
        self.users = 0
        self.retired = False


class SlabPool:
    """Shared-memory slabs for chunks in flight; each goes back when nothing uses it.

    Parameters
    ----------
    slab_bytes
        Size of one slab (one chunk of files).
    max_slabs
        At most this many slabs exist at once; beyond, :meth:`acquire` returns ``None``
        and the chunk is pickled instead.
    """

    def __init__(self, slab_bytes: int, max_slabs: int):
        self.slab_bytes = _aligned(max(1, slab_bytes))
        self.max_slabs = max(1, max_slabs)
        self._free: list[Slab] = []
        self._live: dict[str, Slab] = {}
        # Re-entrant: a finalizer may run inside a locked section when the garbage collector
        # frees a view there.
        self._lock = threading.RLock()
        self._closed = False
        self._failed = False  # /dev/shm full or unusable: pickle from now on
        #: Chunks that went through a slab / were pickled because none was free.
        self.chunks_shared = 0
        self.chunks_pickled = 0

    def __len__(self) -> int:
        return len(self._live)

    def acquire(self) -> Slab | None:
        """A free slab for one chunk, or ``None`` (the chunk is then pickled)."""
        with self._lock:
            if self._closed:
                return None
            slab = self._free.pop() if self._free else None
            if slab is None and not self._failed and len(self._live) < self.max_slabs:
                slab = self._create()
            if slab is None:
                self.chunks_pickled += 1
                return None
            slab.users = 1
            self.chunks_shared += 1
            return slab

    def _create(self) -> Slab | None:
        try:
            segment = self._new_segment()
        except OSError as exc:
            self._failed = True
            log.warning("shared memory unavailable (%s); decoded pixels are pickled instead", exc)
            return None
        try:
            fd = getattr(segment, "_fd", -1)
            if fd >= 0 and hasattr(os, "posix_fallocate"):
                # Reserve the pages now: a full /dev/shm (64 MB in a default Docker
                # container) then fails here instead of killing a worker with SIGBUS.
                os.posix_fallocate(fd, 0, self.slab_bytes)
            slab = Slab(segment)
            self._live[slab.ticket.name] = slab
            return slab
        except BaseException as exc:  # a full /dev/shm, or Ctrl-C right here: leave no name behind
            segment.close()
            segment.unlink()
            if not isinstance(exc, OSError):
                raise
            self._failed = True
            log.warning(
                "shared memory full after %d slabs of %d bytes (%s); the rest is pickled",
                len(self._live),
                self.slab_bytes,
                os.strerror(exc.errno) if exc.errno else exc,
            )
            return None

    def _new_segment(self) -> shared_memory.SharedMemory:
        """A new segment named ``ichscan-<pid>-<random>``: whose it is shows in /dev/shm."""
        while True:
            name = f"{SLAB_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            try:
                return shared_memory.SharedMemory(name, create=True, size=self.slab_bytes)
            except FileExistsError:
                continue  # someone else's: never touch it
            except BaseException:
                # Interrupted (Ctrl-C) after the name was created but before the segment
                # was registered for clean-up: it is ours, remove it.
                _unlink_name(name)
                raise

    def unpack(self, slab: Slab, results: list[DecodedSlice], placed: list[Placed]) -> list[DecodedSlice]:
        """Put the arrays a worker wrote back on ``results`` as zero-copy views.

        Ends the chunk's own use of ``slab``; the slab stays taken while any view (or an
        array derived from one) is alive.
        """
        buf = slab.segment.buf
        for where in placed:
            arr = np.ndarray(where.shape, np.dtype(where.dtype), buffer=buf, offset=where.offset)
            with self._lock:
                slab.users += 1
            # Views of `arr` keep `arr` as their base, so this runs once all are gone.
            weakref.finalize(arr, self._release, slab).atexit = False
            setattr(results[where.index].image, where.field, arr)
        self._release(slab)
        return results

    def release_unused(self, slab: Slab) -> None:
        """A chunk that came back without using its slab (a pickled fallback, a failure)."""
        self._release(slab)

    def retire(self, slab: Slab) -> None:
        """Never reuse ``slab`` (its worker died and others may still write to it)."""
        with self._lock:
            slab.retired = True
            self._unlink(slab)
        self._release(slab)

    def _release(self, slab: Slab) -> None:
        with self._lock:
            slab.users -= 1
            if slab.users > 0:
                return
            if slab.retired or self._closed:
                self._destroy(slab)
            else:
                self._free.append(slab)

    def _unlink(self, slab: Slab) -> None:
        if self._live.pop(slab.ticket.name, None) is None:
            return
        try:
            slab.segment.unlink()
        except FileNotFoundError:
            pass

    def _destroy(self, slab: Slab) -> None:
        self._unlink(slab)
        try:
            slab.segment.close()
        except BufferError:  # a view is still alive: the mapping goes with it
            pass

    def close(self) -> None:
        """Unlink every slab now (``/dev/shm`` is clean); mappings still viewed go with the views."""
        with self._lock:
            self._closed = True
            for slab in list(self._live.values()):
                self._unlink(slab)
                if slab.users <= 0:
                    self._destroy(slab)
            self._free.clear()

    def stats(self) -> dict[str, int]:
        return {"slabs": len(self._live), "chunks_shared": self.chunks_shared, "chunks_pickled": self.chunks_pickled}


def slab_bytes_for(chunk_size: int, display: bool, resize_to: int | None = None) -> int:
    """A slab for ``chunk_size`` files: 512x512 int16 slices, or ``resize_to`` squared
    float32 when the workers resize, plus 512x512 display images when asked for."""
    pixels = resize_to * resize_to * 4 if resize_to else SLICE_BYTES
    per_file = _aligned(pixels) + (_aligned(DISPLAY_BYTES) if display else 0)
    return chunk_size * per_file

