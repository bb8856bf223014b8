"""Series context: neighbours in position order, whatever the arrival order, in all three commands."""

from __future__ import annotations

import math
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from helpers import free_port, read_csv, wait_for
from ichscan.dicom import decode_instance, slice_position
from ichscan.pipeline import BatchOptions, ServeOptions, WatchOptions, run_batch, run_serve, run_watch
from ichscan.pipeline.series import SeriesAssembler
from ichscan.plugins import get_plugin_manager
from ichscan.records import DecodedSlice, Instance, Status
from ichscan.sources.scp import ScpOptions

PLUGIN_DIR = Path(__file__).parent / "context_plugin"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# -- slices whose pixels say where they are ----------------------------------------------------


def write_slice(path: Path, *, study: str, series: str, index: int, z: float, instance_number: int, spacing: float) -> Path:
    """A 32x32 CT slice of constant HU ``5 * index + 2`` at height ``z`` (what the probe model reads)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientID = "CT", "SERIES-TEST"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = spacing
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.full((32, 32), 5 * index + 2, dtype=np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_series(root: Path, seed: int = 7) -> dict[str, int]:
    """Two series in one study, 8 and 5 slices, written in shuffled order: each series split
    across two folders, InstanceNumbers that disagree with positions, one slice missing
    (index 5 of the first series) so its neighbours must repeat. Returns path -> index."""
    rng = random.Random(seed)
    study = generate_uid()
    where: dict[str, int] = {}
    plan = []
    for series_no, (count, spacing, top) in enumerate(((8, 2.5, 40.0), (5, 5.0, -10.0))):
        series = generate_uid()
        for index in range(count):
            if series_no == 0 and index == 5:
                continue  # never sent
            # Descending z with ascending index on purpose: index = position order of z ascending.
            plan.append((series, index, top + index * spacing, spacing))
    rng.shuffle(plan)
    numbers = list(range(1, len(plan) + 1))
    rng.shuffle(numbers)
    for n, ((series, index, z, spacing), number) in enumerate(zip(plan, numbers, strict=True)):
        folder = root / ("a" if n % 2 else "b") / series[-6:]
        path = write_slice(
            folder / f"{generate_uid()[-12:]}.dcm", study=study, series=series, index=index, z=z, instance_number=number, spacing=spacing
        )
        where[str(path)] = (series, index)
    return where


def expected_neighbours(where: dict) -> dict[tuple[str, int], tuple[int, int, int]]:
    """For each (series, index): the indexes the model must see below, itself, above."""
    present: dict[str, set[int]] = {}
    for series, index in where.values():
        present.setdefault(series, set()).add(index)
    out = {}
    for series, indexes in present.items():
        for i in indexes:
            below = i - 1 if i - 1 in indexes else i
            above = i + 1 if i + 1 in indexes else i
            out[(series, i)] = (below, i, above)
    return out


def seen_by_model(csv_path: Path, where: dict) -> dict[tuple[str, int], tuple[int, int, int]]:
    rows = read_csv(csv_path)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    by_name = {Path(p).name: key for p, key in where.items()}
    out = {}
    for row in rows:
        key = by_name[Path(row["path"]).name]
        assert key not in out, f"two rows for {key}"
        out[key] = tuple(round(float(row[f"p_{label}"]) * 100) - 1 for label in ("epidural", "intraparenchymal", "intraventricular"))
    return out


# -- the position along the normal --------------------------------------------------------------


def test_position_is_ipp_projected_on_the_normal_and_falls_back_to_instance_number(tmp_path):
    path = write_slice(tmp_path / "s.dcm", study=generate_uid(), series=generate_uid(), index=0, z=12.5, instance_number=3, spacing=2.0)
    ds = pydicom.dcmread(path)
    assert slice_position(ds, 3) == (pytest.approx(12.5), 2.0)
    # A tilted gantry: rows along x, columns along (0, cos, sin); the normal is (0, -sin, cos).
    angle = math.radians(20)
    ds.ImageOrientationPatient = [1, 0, 0, 0, math.cos(angle), math.sin(angle)]
    ds.ImagePositionPatient = [5.0, 3.0, 10.0]
    position, _ = slice_position(ds, 3)
    assert position == pytest.approx(-3.0 * math.sin(angle) + 10.0 * math.cos(angle))
    del ds.ImageOrientationPatient
    assert slice_position(ds, 3) == (3.0, 1.0)
    decoded = decode_instance(path)
    assert (decoded.instance.position, decoded.instance.spacing) == (pytest.approx(12.5), 2.0)


# -- the assembler ----------------------------------------------------------------------------------


def _slice(series: str, position: float, spacing: float | None = 1.0, name: str | None = None) -> DecodedSlice:
    instance = Instance(name or f"/{series}/{position}", series_instance_uid=series, position=position, spacing=spacing)
    return DecodedSlice(instance, Status.OK)


def positions(ready) -> dict[float, tuple[float, ...]]:
    return {c.slice.instance.position: tuple(n.instance.position for n in c.neighbours) for c in ready}


def test_live_slices_wait_for_neighbours_or_the_series_timeout():
    assembler = SeriesAssembler(context=1, timeout=10.0)
    assembler.add([_slice("s", 3.0), _slice("s", 1.0)], now=0.0)
    assert assembler.take(1.0) == []  # neither has both neighbours yet
    assembler.add([_slice("s", 2.0)], now=2.0)
    assert positions(assembler.take(2.0)) == {2.0: (1.0, 2.0, 3.0)}
    assert assembler.due_in(2.0) == pytest.approx(10.0)
    # The series goes quiet: the edges go with themselves repeated.
    assert positions(assembler.take(12.0)) == {1.0: (1.0, 1.0, 2.0), 3.0: (2.0, 3.0, 3.0)}
    assert len(assembler) == 0 and assembler.take(30.0) == []


def test_known_series_releases_at_once_and_repeats_a_missing_slice():
    assembler = SeriesAssembler(context=1)
    # Index from the headers: positions 0, 1, 3 (2 is not in the series).
    for p in (0.0, 1.0, 3.0):
        assembler.expect("s", f"/s/{p}", p)
    assembler.add([_slice("s", 1.0)], now=0.0)
    assert assembler.take(0.0) == []  # 0 is still to come
    assembler.add([_slice("s", 0.0)], now=0.0)
    assert positions(assembler.take(0.0)) == {0.0: (0.0, 0.0, 1.0), 1.0: (0.0, 1.0, 1.0)}
    assembler.add([_slice("s", 3.0)], now=0.0)
    assert positions(assembler.take(0.0)) == {3.0: (3.0, 3.0, 3.0)}
    assert len(assembler) == 0


def test_known_series_neighbour_that_fails_to_decode_is_missing_for_good():
    assembler = SeriesAssembler(context=1)
    for p in (0.0, 1.0, 2.0):
        assembler.expect("s", f"/s/{p}", p)
    assembler.add([_slice("s", 0.0), _slice("s", 2.0)], now=0.0)
    assert assembler.take(0.0) == []
    assembler.add([DecodedSlice.failed("/s/1.0", "broken")], now=0.0)
    ready = assembler.take(0.0)
    assert [c.slice.status for c in ready].count(Status.ERROR) == 1
    assert positions([c for c in ready if c.neighbours]) == {0.0: (0.0, 0.0, 0.0), 2.0: (2.0, 2.0, 2.0)}


def test_context_zero_and_slices_without_geometry_pass_through():
    assembler = SeriesAssembler(context=0)
    assembler.add([_slice("s", 1.0)], now=0.0)
    assert [c.neighbours for c in assembler.take(0.0)] == [()]
    assembler = SeriesAssembler(context=2, timeout=5.0)
    loose = DecodedSlice(Instance("/x", series_instance_uid="s"), Status.OK)
    assembler.add([loose], now=0.0)
    assert [c.slice for c in assembler.take(0.0)] == [loose]


def test_spacing_from_the_smallest_gap_and_context_two():
    assembler = SeriesAssembler(context=2, timeout=5.0)
    assembler.add([_slice("s", p, spacing=None) for p in (10.0, 12.0, 14.0, 16.0, 20.0)], now=0.0)
    assert positions(assembler.take(0.0)) == {}  # live: 8 and 18 may still come
    everything = positions(assembler.take(0.0, flush=True))
    assert everything[14.0] == (10.0, 12.0, 14.0, 16.0, 16.0)  # 18 missing: the nearest towards 14
    assert everything[16.0] == (12.0, 14.0, 16.0, 16.0, 20.0)  # 20 is there, two spacings up
    assert everything[20.0] == (16.0, 20.0, 20.0, 20.0, 20.0)  # s-2 = 16 is there, s-1 = 18 is not


# -- all three commands ---------------------------------------------------------------------------


@pytest.fixture
def series_files(tmp_path):
    where = make_series(tmp_path / "src")
    return tmp_path / "src", where


def common(tmp_path: Path, name: str) -> dict:
    return dict(
        out=tmp_path / name / "results.csv",
        model_name="context-probe",
        overlays_for="none",
        device="cpu",
        workers=1,
        batch_size=4,
        threads=1,
        progress=False,
    )


def test_batch_gives_the_model_neighbours_in_position_order(tmp_path, series_files):
    root, where = series_files
    pm = get_plugin_manager([PLUGIN_DIR])
    run_batch(BatchOptions(input_dir=root, **common(tmp_path, "batch")), pm)
    assert seen_by_model(tmp_path / "batch" / "results.csv", where) == expected_neighbours(where)


def test_watch_gives_the_model_neighbours_in_position_order(tmp_path, series_files):
    root, where = series_files
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    pm = get_plugin_manager([PLUGIN_DIR])
    opts = WatchOptions(
        input_dir=incoming, settle=0.2, max_latency=0.2, series_timeout=2.0, rescan_interval=3600, **common(tmp_path, "watch")
    )
    stop = threading.Event()
    thread = threading.Thread(target=run_watch, args=(opts, pm, stop), daemon=True)
    thread.start()
    paths = list(where)
    random.Random(3).shuffle(paths)
    moved = {}
    for i, path in enumerate(paths):  # arriving one by one, in shuffled order
        dest = incoming / f"{i:03d}-{Path(path).name}"
        shutil.copy(path, dest.with_suffix(".part"))
        dest.with_suffix(".part").rename(dest)
        moved[str(dest)] = where[path]
        time.sleep(0.05)
    out = tmp_path / "watch" / "results.csv"
    wait_for(lambda: len(read_csv(out, missing_ok=True)) >= len(where), 60, "a row for every slice")
    stop.set()
    thread.join(60)
    assert seen_by_model(out, moved) == expected_neighbours(where)


def test_serve_scp_gives_the_model_neighbours_in_position_order(tmp_path, series_files):
    from pynetdicom import AE

    root, where = series_files
    pm = get_plugin_manager([PLUGIN_DIR])
    port = free_port()
    store = tmp_path / "store"
    watch = WatchOptions(input_dir=store, max_latency=0.2, series_timeout=2.0, **common(tmp_path, "serve"))
    stop = threading.Event()
    opts = ServeOptions(scp=ScpOptions(port=port, store=store), watch=watch, drain_timeout=5)
    thread = threading.Thread(target=run_serve, args=(opts, pm, stop), daemon=True)
    thread.start()
    paths = list(where)
    random.Random(5).shuffle(paths)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    half = len(paths) // 2
    for part in (paths[:half], paths[half:]):  # two associations
        deadline = time.monotonic() + 60
        while True:
            assoc = ae.associate("127.0.0.1", port, ae_title="ICHSCAN")
            if assoc.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert assoc.is_established
        for path in part:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
        assoc.release()
    out = tmp_path / "serve" / "results.csv"
    wait_for(lambda: len(read_csv(out, missing_ok=True)) >= len(where), 60, "a row for every slice")
    stop.set()
    thread.join(60)
    by_sop = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: key for p, key in where.items()}
    stored = {str(p): by_sop[p.stem] for p in store.rglob("*.dcm")}
    assert seen_by_model(out, stored) == expected_neighbours(where)


def test_a_study_with_slices_waiting_for_neighbours_is_summarised_once_when_whole(tmp_path, series_files, caplog):
    """--study-timeout shorter than the wait for a missing neighbour (--series-timeout): the
    study's slices next to the gap are still in the pipeline when the others' results are a
    study-timeout old, so the study is not quiet yet; it is summarised once, with every slice
    (it used to be summarised with part of them and revised when the rest came)."""
    import logging

    from pynetdicom import AE

    root, where = series_files
    study = pydicom.dcmread(next(iter(where)), stop_before_pixels=True).StudyInstanceUID
    pm = get_plugin_manager([PLUGIN_DIR])
    port = free_port()
    store = tmp_path / "store"
    watch = WatchOptions(input_dir=store, max_latency=0.0, series_timeout=3.0, study_timeout=0.3, **common(tmp_path, "serve"))
    stop = threading.Event()
    opts = ServeOptions(scp=ScpOptions(port=port, store=store), watch=watch, drain_timeout=5)
    caplog.set_level(logging.INFO, logger="ichscan.pipeline.run")
    thread = threading.Thread(target=run_serve, args=(opts, pm, stop), daemon=True)
    thread.start()
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = wait_for(lambda: (a := ae.associate("127.0.0.1", port, ae_title="ICHSCAN")).is_established and a, 60, "an association")
    for path in where:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    assoc.release()
    summaries = lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"study {study}:")]  # noqa: E731
    wait_for(summaries, 60, "the study's summary")
    time.sleep(1.0)  # a second, late summary would come now
    stop.set()
    thread.join(60)
    assert len(read_csv(tmp_path / "serve" / "results.csv")) == len(where)
    assert summaries() == [summaries()[0]]
    assert summaries()[0].startswith(f"study {study}: {len(where)} slices")
