"""Overlay PNGs: what they show, and the thread pool that writes them off the model's path."""

import csv
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import CT_SMALL
from ichscan.pipeline import BatchOptions, run_batch
from ichscan.dicom import decode_instance
from ichscan.records import Prediction, SliceResult
from ichscan.labels import LABELS
from ichscan.overlay import MIN_OVERLAY_SIDE, OverlayWriter, overlay_name, render_overlay, render_overlay_indexed
from ichscan.synth import generate

RED = (255, 64, 64)


def screened(path, index=0, positive=True):
    """A decoded slice with made-up probabilities, as the engine hands it on."""
    probabilities = {label: 0.9 if positive else 0.1 for label in LABELS}
    prediction = Prediction(probabilities, {label: positive for label in LABELS}, "subdural" if positive else "none", probabilities["subdural"])
    result = SliceResult.of(decode_instance(str(path)), prediction)
    result.instance.sop_instance_uid = f"1.2.3.{index + 1}"
    return result


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


def test_render_enlarges_small_images_and_marks_positives():
    positive, negative = screened(CT_SMALL, positive=True), screened(CT_SMALL, positive=False)
    assert positive.pixels.shape == (128, 128)
    image = render_overlay_indexed(positive.pixels.astype(np.uint8), positive)
    assert image.mode == "P" and image.size == (MIN_OVERLAY_SIDE, MIN_OVERLAY_SIDE)
    pos = np.asarray(render_overlay(positive.pixels.astype(np.uint8), positive))
    neg = np.asarray(render_overlay(negative.pixels.astype(np.uint8), negative))
    assert pos.shape == (512, 512, 3)
    assert tuple(pos[256, 0]) == RED and tuple(pos[511, 256]) == RED  # border on a positive slice
    assert not (neg == RED).all(axis=2).any()  # none on a negative one
    box = neg[:60, :60]
    assert (box == 0).all(axis=2).any() and (box > 200).all(axis=2).any()  # the label box with text in it
    assert ((neg[-30:, :200] == (200, 200, 0)).all(axis=2)).any()  # "not for diagnostic use" in yellow


def test_writer_writes_every_overlay_and_returns_batches_in_order(tmp_path):
    results = [screened(CT_SMALL, i, positive=i % 3 == 0) for i in range(24)]
    out = tmp_path / "overlays"
    out.mkdir()
    returned = []
    with OverlayWriter(out, "all", threads=2, max_pending=5) as writer:
        for start in range(0, len(results), 4):
            returned += writer.submit(results[start : start + 4])
            assert writer.pending <= 5  # bounded: submit waited for the oldest batches
        returned += writer.drain()
    assert [r for batch in returned for r in batch] == results  # every row, once, in order
    for result in results:
        assert result.overlay == str(out / overlay_name(result))
        with Image.open(result.overlay) as png:
            assert png.format == "PNG" and png.size == (512, 512) and png.mode == "P"
    assert len(list(out.iterdir())) == len(results) and leftovers(out) == []


def test_writer_only_draws_what_was_asked_for(tmp_path):
    results = [screened(CT_SMALL, i, positive=i < 2) for i in range(5)]
    results[4].status = "error"
    with OverlayWriter(tmp_path, "positive", threads=2) as writer:
        writer.submit(results)
        writer.drain()
    assert [bool(r.overlay) for r in results] == [True, True, False, False, False]


def test_a_failed_overlay_is_logged_once_and_its_row_kept(tmp_path, caplog):
    results = [screened(CT_SMALL, i) for i in range(3)]
    (tmp_path / overlay_name(results[1])).mkdir()  # the target name is taken by a folder
    caplog.set_level(logging.ERROR, logger="ichscan")
    with OverlayWriter(tmp_path, "all", threads=2) as writer:
        returned = writer.submit(results) + writer.drain()
    assert returned == [results]
    assert results[1].overlay == "" and results[0].overlay and results[2].overlay
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and results[1].path in errors[0].getMessage()
    assert leftovers(tmp_path) == []  # the temporary file went too


def test_abandon_keeps_every_row_and_leaves_no_partial_files(tmp_path):
    results = [screened(CT_SMALL, i) for i in range(40)]
    gate = threading.Event()
    writer = OverlayWriter(tmp_path, "all", threads=1, max_pending=1000)
    writer._pool().submit(gate.wait)  # hold the only thread, so the overlays queue up
    for start in range(0, len(results), 8):
        assert writer.submit(results[start : start + 8]) == []
    threading.Timer(0.2, gate.set).start()
    returned = writer.abandon()  # as on a second Ctrl-C
    writer.close()
    assert [r for batch in returned for r in batch] == results
    assert all(r.overlay == "" for r in results)  # none had started: all dropped
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_batch_run_writes_all_overlays_and_survives_a_failed_one(tmp_path, caplog):
    folder = tmp_path / "dicom"
    records = generate(folder, studies=2, slices=6, seed=5, size=512)
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    blocked = records[3]
    (overlays / f"{blocked.study_instance_uid}_{blocked.series_instance_uid}_{blocked.sop_instance_uid}.png").mkdir()
    caplog.set_level(logging.ERROR, logger="ichscan")
    out = tmp_path / "r.csv"
    summary = run_batch(
        BatchOptions(input_dir=folder, out=out, overlays_for="all", device="cpu", workers=2, batch_size=4, progress=False)
    )
    assert summary.ok == len(records)
    with open(out, newline="") as fh:
        rows = {row["sop_instance_uid"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {r.sop_instance_uid for r in records}  # no row lost
    assert rows[blocked.sop_instance_uid]["overlay"] == ""
    for sop, row in rows.items():
        if sop == blocked.sop_instance_uid:
            continue
        assert Path(row["overlay"]).parent == overlays
        with Image.open(row["overlay"]) as png:
            assert png.format == "PNG" and png.size == (512, 512)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("cannot write overlay for ") and blocked.sop_instance_uid in errors[0]
    assert leftovers(overlays) == []


def test_ctrl_c_reports_every_overlay_written_and_leaves_no_partial_files(tmp_path):
    import ichscan
    from ichscan.plugins import get_plugin_manager

    class CtrlCOnThirdBatch:
        calls = 0

        @ichscan.hookimpl
        def ichscan_preprocess(self, pixels, slopes, intercepts, settings, device, channels_last):
            CtrlCOnThirdBatch.calls += 1
            if CtrlCOnThirdBatch.calls == 3:
                raise KeyboardInterrupt
            return None  # the built-in preprocessing runs

    folder = tmp_path / "dicom"
    generate(folder, studies=2, slices=10, seed=6, size=128)
    pm = get_plugin_manager()
    pm.register(CtrlCOnThirdBatch(), name="ctrl-c")
    out, overlays = tmp_path / "r.csv", tmp_path / "overlays"
    summary = run_batch(
        BatchOptions(input_dir=folder, out=out, overlays_for="all", device="cpu", workers=0, batch_size=4, progress=False), pm
    )
    assert summary.interrupted
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8  # the two batches screened before the Ctrl-C, with their overlays finished
    assert sorted(row["overlay"] for row in rows) == sorted(str(p) for p in overlays.iterdir())
    for row in rows:
        with Image.open(row["overlay"]) as png:
            png.load()  # whole files only
    assert leftovers(overlays) == []
