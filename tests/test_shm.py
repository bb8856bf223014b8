"""Shared-memory handover of decoded pixels (ichscan.shm) and the GPU path's CPU-testable parts."""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CT_SMALL, copy_ct_small
import ichscan.shm as shm_module
from ichscan.dicom import OK, decode_instance
from ichscan.pipeline.decode import DecodePool
from ichscan.pipeline.run import run_stream
from ichscan.pipeline.screener import Screener
from ichscan.pipeline.sizing import fit_batch_size
from ichscan.imaging import resize_stored
from ichscan.models import load_model
from ichscan.plugins import get_plugin_manager
from ichscan.preprocess import PreprocessSettings, _stack, _stack_stored, _widen, preprocess
from ichscan.reporting import Reporter, ReporterSet
from ichscan.shm import PICKLE, SHM, SLAB_PREFIX, TRANSFER_ENV, SlabPool, default_transfer

SHM_DIR = Path("/dev/shm")
needs_dev_shm = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm to inspect")


def in_shared_memory(arr: np.ndarray) -> bool:
    base = arr.base
    return isinstance(base, mmap.mmap) or (isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap))


def shm_names_left(names) -> list[str]:
    return [name for name in names if (SHM_DIR / name).exists()]


@pytest.fixture
def slab_names(monkeypatch) -> list[str]:
    """The names of the slabs this test creates, in order."""
    names: list[str] = []
    create = SlabPool._create

    def recorded(self):
        slab = create(self)
        if slab is not None:
            names.append(slab.ticket.name)
        return slab

    monkeypatch.setattr(SlabPool, "_create", recorded)
    return names


class Collect(Reporter):
    name = "collect"

    def __init__(self):
        self.rows = {}

    def on_results(self, results, studies):
        for r in results:
            assert r.path not in self.rows, f"{r.path} reported twice"
            self.rows[r.path] = (r.status, r.error, None if r.probabilities is None else dict(r.probabilities))


@pytest.fixture(scope="module")
def phantoms(make_phantoms) -> list[str]:
    """512x512 uncompressed phantoms (int16 and uint16 storage) plus small CT copies."""
    folder, _ = make_phantoms("phantoms", studies=3, slices=3, seed=7, size=512, transfer_syntaxes=["ExplicitVRLittleEndian"])
    for i in range(6):
        shutil.copy(CT_SMALL, folder / f"small{i}.dcm")
    return sorted(str(p) for p in folder.rglob("*.dcm"))


@pytest.fixture(scope="module")
def many_ct(tmp_path_factory) -> list[str]:
    return copy_ct_small(tmp_path_factory.mktemp("many"), 48)


@pytest.fixture(scope="module")
def screener() -> Screener:
    pm = get_plugin_manager()
    return Screener(pm, load_model(pm), "cpu")


# -- the pool -----------------------------------------------------------------------------


@needs_dev_shm
def test_shm_pool_hands_over_the_same_arrays_as_pickle(phantoms, slab_names):
    with DecodePool(1, chunk_size=4, display=True) as pool:
        pickled = {d.path: d for d in pool.decode(phantoms)}
    with DecodePool(2, chunk_size=4, transfer=SHM, display=True) as pool:
        shared = {d.path: d for d in pool.decode(phantoms)}
        assert pool.slabs.chunks_shared > 0 and pool.slabs.chunks_pickled == 0
        assert slab_names and shm_names_left(slab_names) == slab_names  # alive while the pool is
    assert shm_names_left(slab_names) == []  # unlinked at close, though views are still alive
    assert sorted(shared) == sorted(phantoms)
    dtypes = set()
    for path, d in shared.items():
        assert d.status == OK
        dtypes.add(d.pixels.dtype)
        assert d.pixels.dtype == pickled[path].pixels.dtype
        assert np.array_equal(d.pixels, pickled[path].pixels)
        assert in_shared_memory(d.pixels) and not in_shared_memory(pickled[path].pixels)
        assert np.array_equal(d.display, pickled[path].display)
        assert (d.slope, d.intercept) == (pickled[path].slope, pickled[path].intercept)
    assert len(dtypes) >= 2  # phantoms store int16 or uint16; CT_small int16


def test_held_views_are_never_overwritten(many_ct):
    """Results that keep their pixels keep their slabs; further chunks are pickled."""
    reference = decode_instance(CT_SMALL).pixels
    with DecodePool(1, chunk_size=4, transfer=SHM, max_slabs=2) as pool:
        held = list(pool.decode(many_ct))
        assert pool.slabs.chunks_pickled > 0 and len(pool.slabs) == 2
        for d in held:
            assert np.array_equal(d.pixels, reference), d.path
        tensor = torch.from_numpy(held[0].pixels[10:20])  # a derived view keeps the slab too
        del held, d
        assert len(pool.slabs._free) == 1  # the slab behind `tensor` is still taken
        del tensor
        assert len(pool.slabs._free) == 2
        again = list(pool.decode(many_ct[:8]))  # reuses the slabs
        assert pool.slabs.chunks_shared >= 4 and len(pool.slabs) == 2
        assert all(np.array_equal(d.pixels, reference) for d in again)


def test_images_that_do_not_fit_are_pickled(phantoms):
    big = [p for p in phantoms if "small" not in p][:3]
    with DecodePool(1, chunk_size=3, transfer=SHM) as pool:
        pool.slabs.slab_bytes = 600_000  # room for one 512x512 int16 slice per chunk
        out = {d.path: d for d in pool.decode(big)}
    in_slab = [d for d in out.values() if in_shared_memory(d.pixels)]
    assert len(out) == 3 and all(d.status == OK for d in out.values())
    assert len(in_slab) == 1
    for path, d in out.items():
        assert np.array_equal(d.pixels, decode_instance(path).pixels)


@needs_dev_shm
def test_killed_worker_loses_no_file_and_leaks_no_slab(many_ct, slab_names):
    seen = []
    with DecodePool(workers=1, chunk_size=4, max_in_flight=4, transfer=SHM) as pool:
        for i, decoded in enumerate(pool.decode(many_ct)):
            seen.append(decoded)
            if i == 5:
                os.kill(list(pool._executor._processes)[0], signal.SIGKILL)
        retired = [n for n in slab_names if not (SHM_DIR / n).exists()]
        assert retired, "the slabs of the chunks in flight are retired"
    assert sorted(d.path for d in seen) == many_ct
    assert all(d.status == OK for d in seen), [d.error for d in seen if d.status != OK]
    reference = decode_instance(CT_SMALL).pixels
    assert all(np.array_equal(d.pixels, reference) for d in seen)
    assert shm_names_left(slab_names) == []


@needs_dev_shm
def test_streaming_pool_over_shm(many_ct, slab_names):
    with DecodePool(workers=1, chunk_size=2, max_in_flight=3, transfer=SHM) as pool:
        out = []
        pending = list(many_ct[:12])
        while pending or pool.pending:
            take = min(pool.free_slots(), len(pending))
            pool.submit(pending[:take])
            pending = pending[take:]
            out.extend(pool.collect(timeout=5))
        assert pool.slabs.chunks_shared > 0
    assert sorted(d.path for d in out) == many_ct[:12]
    assert all(d.status == OK for d in out)
    assert slab_names and shm_names_left(slab_names) == []


@needs_dev_shm
def test_ctrl_c_while_a_slab_is_made_leaves_no_name(monkeypatch):
    pool = SlabPool(1 << 20, 4)
    made = []
    real = shm_module.shared_memory.SharedMemory

    def interrupted(name, create, size):
        real(name, create=create, size=size)  # created and registered, then Ctrl-C
        made.append(name)
        raise KeyboardInterrupt

    monkeypatch.setattr(shm_module.shared_memory, "SharedMemory", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.acquire()
    monkeypatch.undo()
    assert made and shm_names_left(made) == []
    from multiprocessing import resource_tracker

    for name in made:  # what the fake left registered (the real one would be interrupted too)
        resource_tracker.unregister("/" + name, "shared_memory")

    def fallocate_interrupted(fd, offset, length):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "posix_fallocate", fallocate_interrupted, raising=False)
    before = set(os.listdir(SHM_DIR))
    with pytest.raises(KeyboardInterrupt):
        pool.acquire()
    assert not {n for n in set(os.listdir(SHM_DIR)) - before if n.startswith(f"{SLAB_PREFIX}{os.getpid()}-")}
    assert len(pool) == 0
    pool.close()


def test_slab_pool_falls_back_when_shared_memory_is_full(monkeypatch):
    pool = SlabPool(1 << 20, 4)

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    assert pool.acquire() is None and pool.acquire() is None
    assert pool.chunks_pickled == 2 and len(pool) == 0
    pool.close()


def test_transfer_default_and_override(monkeypatch):
    monkeypatch.delenv(TRANSFER_ENV, raising=False)
    assert default_transfer("cuda") == SHM
    assert default_transfer("cpu") == SHM
    monkeypatch.setenv(TRANSFER_ENV, "shm")
    assert default_transfer("cpu") == SHM
    monkeypatch.setenv(TRANSFER_ENV, "PICKLE")
    assert default_transfer("cuda") == PICKLE
    monkeypatch.setenv(TRANSFER_ENV, "carrier-pigeon")
    with pytest.raises(ValueError, match=TRANSFER_ENV):
        default_transfer("cpu")
    with pytest.raises(ValueError, match="transfer"):
        DecodePool(1, transfer="carrier-pigeon")


# -- whole runs ---------------------------------------------------------------------------


@needs_dev_shm
def test_run_stream_shm_matches_pickle_on_the_cpu(phantoms, screener, tmp_path):
    entries = phantoms + [str(tmp_path / "missing.dcm")]
    (tmp_path / "junk.dcm").write_bytes(b"DICM" * 10)
    entries.append(str(tmp_path / "junk.dcm"))
    runs = {}
    for transfer in (PICKLE, SHM):
        collect = Collect()
        summary, _ = run_stream(
            entries, screener, ReporterSet([collect]), batch_size=4, workers=2, transfer=transfer
        )
        assert summary.files == len(entries) and summary.error == 2
        runs[transfer] = collect.rows
    assert runs[PICKLE].keys() == runs[SHM].keys() == set(entries)
    for path, (status, error, probs) in runs[PICKLE].items():
        other = runs[SHM][path]
        assert (status, error) == other[:2]
        if probs is not None:
            assert other[2] == pytest.approx(probs, abs=1e-6)


def test_gpu_style_handover_matches_the_cpu_path(phantoms, screener):
    """Full-size stored pixels through shared memory, resized by torch (the GPU route),
    give the probabilities of worker-side Pillow resizing (the CPU route)."""
    size = screener.settings.size
    with DecodePool(1, chunk_size=4, transfer=SHM) as pool:
        full = [d for d in pool.decode(phantoms) if d.status == OK]
    with DecodePool(1, chunk_size=4, resize_to=size) as pool:
        small = {d.path: d for d in pool.decode(phantoms)}
    resized = [small[d.path] for d in full]
    args = lambda ds: ([d.pixels for d in ds], [d.slope for d in ds], [d.intercept for d in ds])  # noqa: E731
    a = screener.predict(*args(full))
    b = screener.predict(*args(resized))
    assert np.abs(a - b).max() < 1e-3


@needs_dev_shm
def test_hostile_files_get_one_row_each_over_shm(tmp_path, monkeypatch, slab_names):
    """The bad-input corpus of test_dicom through `ichscan batch` with shared memory."""
    import csv

    from test_dicom import build_bad_files

    from ichscan.pipeline import BatchOptions, run_batch

    folder = tmp_path / "in"
    folder.mkdir()
    expect = build_bad_files(folder)
    shutil.copy(CT_SMALL, folder / "CT_small.dcm")
    expected = {name: e.status for name, e in expect.items()} | {"CT_small.dcm": OK}
    monkeypatch.setenv(TRANSFER_ENV, SHM)
    out = tmp_path / "r.csv"
    summary = run_batch(BatchOptions(input_dir=folder, out=out, overlays_for="none", progress=False, workers=2, device="cpu"))
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    by_name = {Path(row["path"].lstrip("'")).name: row["status"] for row in rows}
    assert len(rows) == len(by_name) == summary.files
    assert by_name == expected
    assert slab_names and shm_names_left(slab_names) == []


CHILD = textwrap.dedent(
    """
    import itertools, signal, sys
    import ichscan.shm as shm

    # A Ctrl-C on a terminal reaches a process whose SIGINT is neither blocked nor ignored.
    # What this one inherited from the test run is printed (a failure shows it), then reset:
    # the full test run hung here three times (no output at all after the SIGINT), never
    # when the test ran alone.
    print("INHERITED", sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])), signal.getsignal(signal.SIGINT), file=sys.stderr, flush=True)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.default_int_handler)

    created = shm.SlabPool._create

    def announce(self):
        slab = created(self)
        if slab is not None:
            print("SLAB", slab.ticket.name, flush=True)
        return slab

    shm.SlabPool._create = announce

    if __name__ == "__main__":
        from ichscan.pipeline.run import run_stream
        from ichscan.pipeline.screener import Screener
        from ichscan.models import load_model
        from ichscan.plugins import get_plugin_manager
        from ichscan.reporting import ReporterSet

        pm = get_plugin_manager()
        summary, _ = run_stream(
            itertools.cycle(sys.argv[1:]), Screener(pm, load_model(pm), "cpu"), ReporterSet([]),
            batch_size=4, workers=1, transfer="shm",
        )
        print("INTERRUPTED", summary.interrupted, flush=True)
    """
)


@needs_dev_shm
@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_no_slab_outlives_a_stopped_run(how, many_ct, tmp_path):
    """Ctrl-C: the run stops and unlinks its slabs; SIGKILL: the resource tracker does."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), *many_ct[:8]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a Ctrl-C reaches the whole process group, as on a terminal
    )
    names = []
    try:
        for line in proc.stdout:
            if line.startswith("SLAB"):
                names.append(line.split()[1])
                if len(names) >= 2:
                    break
        assert names, proc.stderr.read()
        assert shm_names_left(names) == names
        if how == "sigint":
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C on a terminal: the whole group
        else:
            os.kill(proc.pid, signal.SIGKILL)  # the main process only (OOM killer, kill -9)
            proc.wait(timeout=60)  # reaped: the workers see their owner gone (not a zombie)
        if how == "sigint":
            out, err = proc.communicate(timeout=120)
            assert "INTERRUPTED True" in out, err
            assert shm_names_left(names) == []
            assert list(SHM_DIR.glob(f"{SLAB_PREFIX}{proc.pid}-*")) == []  # not even one being made
        else:
            # The resource tracker (its own process) unlinks what the main process
            # registered, once the workers, which exit when their owner is gone, let go.
            deadline = time.monotonic() + 60
            while shm_names_left(names) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert shm_names_left(names) == []
            # A kill between creating a segment and registering it leaves a name holding
            # no memory (pages are reserved after registration): the only trace allowed.
            stray = list(SHM_DIR.glob(f"{SLAB_PREFIX}{proc.pid}-*"))
            assert all(path.stat().st_blocks == 0 for path in stray)
            for path in stray:
                path.unlink()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        proc.wait()


# -- the GPU path's host side, on the CPU ---------------------------------------------


def test_stored_width_staging_round_trips_every_dtype():
    rng = np.random.default_rng(1)
    cases = {
        np.uint16: rng.integers(0, 65536, (2, 40, 40)),
        np.int16: rng.integers(-32768, 32768, (2, 40, 40)),
        np.uint8: rng.integers(0, 256, (2, 40, 40)),
        np.int32: rng.integers(-(2**31), 2**31, (2, 40, 40)),
        np.float32: rng.normal(0, 500, (2, 40, 40)),
    }
    for dtype, values in cases.items():
        pixels = [v.astype(dtype) for v in values]
        host, unsigned16 = _stack_stored(pixels, [0, 1], pin=False)
        assert host.element_size() == np.dtype(dtype).itemsize  # no widening before the copy
        assert unsigned16 == (dtype == np.uint16)
        widened = _widen(host, unsigned16, torch.device("cpu"))
        assert widened.dtype == torch.float32
        assert torch.equal(widened, _stack(pixels, [0, 1], torch.device("cpu"))), dtype


def test_gpu_route_of_preprocess_runs_on_the_cpu(monkeypatch):
    """The staged route (stored width, widen on the device) gives the CPU route's numbers."""
    import ichscan.preprocess as pre

    rng = np.random.default_rng(2)
    pixels = [
        rng.integers(0, 4096, (300, 300)).astype(np.uint16),
        rng.integers(-1024, 3000, (300, 300)).astype(np.int16),
        rng.integers(0, 65536, (512, 512)).astype(np.uint16),
        rng.integers(0, 4096, (300, 300)).astype(np.uint16),
    ]
    args = (pixels, [1.0, 1.0, 0.5, 1.0], [-1024.0, 0.0, -1000.0, -1024.0])
    cpu_route = preprocess(*args, channels_last=True)
    monkeypatch.setattr(pre, "STAGED_DEVICES", frozenset({"cuda", "cpu"}))
    gpu_route = preprocess(*args, channels_last=True)
    assert gpu_route.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cpu_route, gpu_route)
    one_group = preprocess([pixels[0], pixels[3]], [1.0, 1.0], [-1024.0, -1024.0])
    assert torch.equal(one_group, cpu_route[[0, 3]])
    mixed, unsigned16 = _stack_stored(pixels, [0, 1, 3], pin=False)  # uint16 + int16, one size
    assert mixed.dtype == torch.int32 and not unsigned16


def test_mixed_precision_predict_is_close(screener, monkeypatch, phantoms):
    """Screener.predict under autocast (bf16 on a GPU; exercised here with the CPU's)."""
    decoded = [d for d in map(decode_instance, phantoms[:6]) if d.status == OK]
    args = ([d.pixels for d in decoded], [d.slope for d in decoded], [d.intercept for d in decoded])
    full = screener.predict(*args)
    monkeypatch.setattr(screener, "amp_dtype", torch.bfloat16)
    mixed = screener.predict(*args)
    assert mixed.dtype == np.float32 and mixed.shape == full.shape
    assert np.abs(mixed - full).max() < 0.05


def test_preprocess_groups_by_shape_in_order():
    a = np.full((64, 64), 1064, np.uint16)  # 40 HU at intercept -1024
    b = np.full((64, 64), 40, np.int16)  # 40 HU at intercept 0
    c = np.full((32, 32), 80, np.int16)  # 80 HU
    out = preprocess([a, b, c, a], [1.0] * 4, [-1024.0, 0.0, 0.0, -1024.0], PreprocessSettings(size=32))
    assert [round(out[i, 0].mean().item(), 4) for i in range(4)] == [0.5, 0.5, 1.0, 0.5]


def test_torch_resize_matches_worker_pillow_resize():
    """The GPU route resizes with torch (antialiased bilinear) what the CPU route resizes
    with Pillow in the workers; the model must see (almost) the same numbers."""
    image = decode_instance(CT_SMALL).pixels  # 128x128: enlarged
    rng = np.random.default_rng(3)
    phantom = (rng.normal(1000, 300, (512, 512)).clip(0, 4095)).astype(np.uint16)
    for pixels in (image, phantom):
        for size in (224, 96):
            settings = PreprocessSettings(size=size)
            on_device = preprocess([pixels], [1.0], [-1024.0], settings)
            in_worker = preprocess([resize_stored(pixels, size)], [1.0], [-1024.0], settings)
            # Brain window: 1/80 per HU; 0.05 stored units of disagreement is ~6e-4.
            assert (on_device - in_worker).abs().max().item() < 2e-3


def test_fit_batch_size():
    mib = 2**20
    assert fit_batch_size(80_000 * mib, 5 * mib, 256) == 256
    assert fit_batch_size(1000 * mib, 5 * mib, 256) == 96  # 500 MiB / 5 MiB = 100 -> 96
    assert fit_batch_size(30 * mib, 5 * mib, 256) == 3
    assert fit_batch_size(1 * mib, 5 * mib, 256) == 1
    assert fit_batch_size(1000 * mib, 0, 256) == 256


def test_fit_batch_size_is_the_preference_on_the_cpu(screener):
    assert screener.fit_batch_size(77) == 77


def test_decode_worker_with_shm_does_not_import_torch(many_ct):
    with DecodePool(1, transfer=SHM) as pool:
        (result,) = list(pool.decode(many_ct[:1]))
        assert result.status == OK
        assert pool._pool().submit(eval, "'torch' in __import__('sys').modules", {}).result(timeout=60) is False

