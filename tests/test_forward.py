"""DICOM results (SR, key images): --dicom-out, --forward with retries, revisions, Orthanc.

Real parts throughout: real phantom studies through the real model, dcmtk's storescp and
a real Orthanc as forwarding targets, dciodvfy-clean objects built by highdicom.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

from helpers import (
    DCIODVFY,
    STORESCP,
    Orthanc,
    dicom_files,
    free_port,
    needs_orthanc,
    needs_storescp,
    port_open,
    read_csv,
    start_ichscan,
    wait_for,
)
from ichscan.pipeline import BatchOptions, run_batch
from ichscan.dicom import decode_instance
from ichscan.dicom_results import SC_SOP_CLASS_UID, SR_SOP_CLASS_UID, read_sr_findings
from ichscan.labels import LABELS
from ichscan.state.forwarder import Destination
from ichscan.reporting import ResultsOutput
from ichscan.synth import generate


def batch(data: Path, work: Path, **results) -> None:
    opts = BatchOptions(
        input_dir=data,
        out=work / "results.csv",
        overlays_for="none",
        thresholds={label: 0.3 for label in LABELS},
        workers=0,
        progress=False,
        state=work / "state.sqlite",
        results=ResultsOutput(**results),
    )
    summary = run_batch(opts)
    assert summary.reporter_errors == {}


@pytest.fixture(scope="module")
def phantoms(make_phantoms) -> Path:
    return make_phantoms("phantoms", studies=3, slices=5, seed=31, size=128, positive_fraction=0.67)[0]


def test_destination_parse():
    assert Destination.parse("ORTHANC@pacs.example.org:4242") == Destination("ORTHANC", "pacs.example.org", 4242)
    assert Destination.parse("A@[::1]:104") == Destination("A", "::1", 104)
    assert str(Destination.parse("A@[::1]:104")) == "A@[::1]:104"
    for bad in ("pacs:104", "@host:1", "A@host", "A@host:0", "A@host:x", "TOO_LONG_AE_TITLE_X@h:1", "A\\B@h:1"):
        with pytest.raises(ValueError):
            Destination.parse(bad)


def test_dicom_out_sr_per_study_key_image_per_positive_study(phantoms, tmp_path):
    out_dir = tmp_path / "dicom"
    batch(phantoms, tmp_path, dicom_out=out_dir)
    results = [r for r in read_csv(tmp_path / "results.csv") if r["status"] == "ok"]
    studies = {r["study_instance_uid"]: r for r in read_csv(tmp_path / "results_studies.csv")}
    assert len(studies) == 3
    written = dicom_files(out_dir)
    by_study: dict[str, list[pydicom.Dataset]] = {}
    for path in written:
        ds = pydicom.dcmread(path)
        assert path.parent.name == ds.StudyInstanceUID and path.stem == ds.SOPInstanceUID
        by_study.setdefault(ds.StudyInstanceUID, []).append(ds)
        # Our own objects are never screened again.
        assert decode_instance(path).status == "skipped"
    assert set(by_study) == set(studies)
    for uid, objects in by_study.items():
        srs = [ds for ds in objects if ds.SOPClassUID == SR_SOP_CLASS_UID]
        scs = [ds for ds in objects if ds.SOPClassUID == SC_SOP_CLASS_UID]
        assert len(srs) == 1
        positive = float(studies[uid]["p_any"]) >= 0.3
        assert len(scs) == (1 if positive else 0)
        findings = read_sr_findings(srs[0])
        for label in LABELS:
            assert findings["probabilities"][label] == pytest.approx(float(studies[uid][f"p_{label}"]), abs=2e-6)
        sources = {r["sop_instance_uid"] for r in results if r["study_instance_uid"] == uid}
        assert set(findings["referenced_instances"]) == sources
        assert set(findings["positive_instances"]) == {
            r["sop_instance_uid"] for r in results if r["study_instance_uid"] == uid and r["any"] == "1"
        }
        assert findings["not_for_diagnostic_use"] is True  # the bundled demo weights
        source = pydicom.dcmread(next(r["path"] for r in results if r["study_instance_uid"] == uid), stop_before_pixels=True)
        for ds in objects:
            assert ds.PatientID == source.PatientID and ds.StudyInstanceUID == source.StudyInstanceUID
            assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        if scs:
            best = max((r for r in results if r["study_instance_uid"] == uid), key=lambda r: float(r["p_any"]))
            assert scs[0].PhotometricInterpretation == "RGB"
            assert scs[0].Rows >= 512
            assert best["sop_instance_uid"] in json.dumps(scs[0].to_json_dict())  # references its source slice

    # What the pipeline wrote (not only what the builders make in isolation) is valid DICOM.
    if DCIODVFY.exists():
        for path in written:
            proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
            errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
            assert errors == [], (path, errors)

    # The same folder again: same content, so no new objects and no new UIDs.
    batch(phantoms, tmp_path, dicom_out=out_dir)
    assert dicom_files(out_dir) == written


def test_late_instance_gives_a_revised_sr(tmp_path):
    data = tmp_path / "data"
    records = generate(data, studies=1, slices=5, seed=47, size=128)
    held = tmp_path / "held.dcm"
    last = sorted(records, key=lambda r: r.sop_instance_uid)[-1]
    shutil.move(last.path, held)
    out_dir = tmp_path / "dicom"
    batch(data, tmp_path, dicom_out=out_dir)
    first = [pydicom.dcmread(p) for p in dicom_files(out_dir) if pydicom.dcmread(p).SOPClassUID == SR_SOP_CLASS_UID]
    assert len(first) == 1
    assert len(read_sr_findings(first[0])["referenced_instances"]) == 4

    shutil.move(held, last.path)
    batch(data, tmp_path, dicom_out=out_dir)
    srs = sorted(
        (ds for ds in map(pydicom.dcmread, dicom_files(out_dir)) if ds.SOPClassUID == SR_SOP_CLASS_UID),
        key=lambda ds: int(ds.InstanceNumber),
    )
    assert len(srs) == 2
    old, new = srs
    assert new.SOPInstanceUID != old.SOPInstanceUID
    assert new.SeriesInstanceUID == old.SeriesInstanceUID and new.StudyInstanceUID == old.StudyInstanceUID
    assert int(new.InstanceNumber) == 2
    predecessors = [
        item.ReferencedSOPInstanceUID
        for study in new.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    assert predecessors == [old.SOPInstanceUID]
    assert set(read_sr_findings(new)["referenced_instances"]) == {r.sop_instance_uid for r in records}
    assert read_csv(tmp_path / "results_studies.csv")[0]["slices"] == "5"


class StoreSCP:
    """dcmtk's storescp as the forwarding target; counts what it received."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(STORESCP), "--output-directory", str(folder), "--aetitle", "TARGET", "--unique-filenames", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def received(self) -> list[str]:
        """SOP Instance UIDs of every file received, duplicates included."""
        return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in dicom_files(self.folder)]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@needs_storescp
def test_target_down_at_first_then_up_gets_everything_once(phantoms, tmp_path):
    port = free_port()
    destination = Destination("TARGET", "127.0.0.1", port)
    target: list[StoreSCP] = []
    # The target comes up 3 s into the run; the forwarder's back-off (1, 2, 4 s...) finds it.
    timer = threading.Timer(3.0, lambda: target.append(StoreSCP(tmp_path / "received", port)))
    timer.start()
    try:
        batch(phantoms, tmp_path, forward=(destination,), forward_wait=60)
        timer.join()
        made = [p.stem for p in dicom_files(tmp_path / "ichscan-outbox")]
        assert len(made) >= 3  # an SR per study, plus key images
        wait_for(lambda: len(target[0].received()) >= len(made), 30, "the target to store everything")
        assert sorted(target[0].received()) == sorted(made)  # everything, once
    finally:
        timer.cancel()
        for t in target:
            t.close()


@needs_storescp
def test_restart_sends_pending_results_once_with_the_same_uids(phantoms, tmp_path):
    port = free_port()
    destination = Destination("TARGET", "127.0.0.1", port)
    # Run 1: the target is down and the run does not wait: the results stay pending.
    batch(phantoms, tmp_path, forward=(destination,), forward_wait=0)
    made = sorted(p.stem for p in dicom_files(tmp_path / "ichscan-outbox"))
    assert made
    target = StoreSCP(tmp_path / "received", port)
    try:
        # Run 2 on the same state: nothing new is made, the pending results go out once.
        batch(phantoms, tmp_path, forward=(destination,), forward_wait=60)
        assert sorted(p.stem for p in dicom_files(tmp_path / "ichscan-outbox")) == made
        wait_for(lambda: len(target.received()) >= len(made), 30, "the target to store everything")
        assert sorted(target.received()) == made
        # Run 3: everything was delivered; nothing is sent again.
        batch(phantoms, tmp_path, forward=(destination,), forward_wait=5)
        time.sleep(0.5)
        assert sorted(target.received()) == made
    finally:
        target.close()


def test_a_target_that_refuses_connections_is_retried_past_the_refusal_limit(phantoms, tmp_path):
    """A PACS that is down (connection refused) is unreachable, not a refusal of the objects:
    pynetdicom reports the failed connection as an aborted association, which once counted
    towards MAX_REFUSALS, so a PACS down for a few minutes got its results given up."""
    import sqlite3

    from ichscan.state import StateStore
    from ichscan.state.forwarder import Forwarder
    from ichscan.state.rounds import MAX_REFUSALS

    destination = Destination("TARGET", "127.0.0.1", free_port())  # nothing listens there
    batch(phantoms, tmp_path, forward=(destination,), forward_wait=0)
    rounds: list[int] = []
    with StateStore(tmp_path / "state.sqlite") as store:
        forwarder = Forwarder(store, [destination], min_backoff=0.01, max_backoff=0.01)
        deliver = forwarder._deliver
        forwarder._deliver = lambda key, items: (rounds.append(len(items)), deliver(key, items))
        forwarder.start()
        try:
            # Twice the rounds after which a refusal is given up (or until nothing is pending).
            wait_for(lambda: len(rounds) > 2 * MAX_REFUSALS or not forwarder._pending(), 60, "rounds past the refusal limit")
        finally:
            forwarder.stop()
            forwarder.join(timeout=10)
    rows = sqlite3.connect(tmp_path / "state.sqlite").execute("SELECT state, attempts, last_error FROM deliveries").fetchall()
    assert rows and all(state == "pending" and attempts == 0 for state, attempts, _ in rows), rows
    assert all("does not accept" not in error and error for _, _, error in rows)


# -- Orthanc ---------------------------------------------------------------------------------


@pytest.mark.slow
@needs_orthanc
def test_orthanc_sends_a_study_and_gets_sr_and_key_image_back_then_a_revision(tmp_path):
    data = tmp_path / "data"
    records = sorted(generate(data, studies=1, slices=6, seed=5, size=128, positive_fraction=1.0), key=lambda r: r.sop_instance_uid)
    held, first_part = records[-1], records[:-1]
    scp_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", scp_port)
    work = tmp_path / "ichscan"
    work.mkdir()
    log = work / "serve.log"
    server = start_ichscan(
        log, "serve-scp", "--port", str(scp_port), "--store", str(work / "store"), "--out", str(work / "results.csv"),
        "--overlays-for", "none", "--study-timeout", "1", "--max-latency", "0.2", "--threshold", "0.3",
        "--forward", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--html", str(work / "report.html"),
    )
    try:
        wait_for(lambda: port_open(scp_port), 120, "serve-scp to listen", server, log)
        for record in first_part:
            orthanc.upload(record.path)
        study_id = orthanc.get("/studies")[0]
        # Orthanc sends the study to ichscan by C-STORE (its REST API drives a real SCU).
        orthanc.send_to_ichscan([study_id])
        wait_for(lambda: len(orthanc.instances_of_class(study_id, SR_SOP_CLASS_UID)) == 1, 120, "the SR in Orthanc", server, log)
        wait_for(lambda: len(orthanc.instances_of_class(study_id, SC_SOP_CLASS_UID)) == 1, 60, "the key image in Orthanc", server, log)

        (sr,) = orthanc.instances_of_class(study_id, SR_SOP_CLASS_UID)
        (sc,) = orthanc.instances_of_class(study_id, SC_SOP_CLASS_UID)
        study_row = read_csv(work / "results_studies.csv")[0]
        findings = read_sr_findings(sr)
        for label in LABELS:
            assert findings["probabilities"][label] == pytest.approx(float(study_row[f"p_{label}"]), abs=2e-6)
        assert set(findings["referenced_instances"]) == {r.sop_instance_uid for r in first_part}
        ct = pydicom.dcmread(first_part[0].path, stop_before_pixels=True)
        for ds in (sr, sc):
            assert ds.StudyInstanceUID == ct.StudyInstanceUID and ds.PatientID == ct.PatientID
            assert ds.SOPInstanceUID not in {r.sop_instance_uid for r in records}
        assert sr.SeriesInstanceUID != sc.SeriesInstanceUID != ct.SeriesInstanceUID
        results = read_csv(work / "results.csv")
        best = max(results, key=lambda r: float(r["p_any"] or 0))
        assert best["sop_instance_uid"] in json.dumps(sc.to_json_dict())

        # A late instance: Orthanc sends it, ichscan re-screens the study and sends a
        # revised SR (new SOP Instance UID, same series, the old one as predecessor).
        late = orthanc.upload(held.path)
        orthanc.send_to_ichscan([late["ID"]])
        wait_for(lambda: len(orthanc.instances_of_class(study_id, SR_SOP_CLASS_UID)) == 2, 120, "the revised SR", server, log)
        srs = sorted(orthanc.instances_of_class(study_id, SR_SOP_CLASS_UID), key=lambda ds: int(ds.InstanceNumber))
        assert srs[0].SOPInstanceUID == sr.SOPInstanceUID
        revised = srs[1]
        assert revised.SeriesInstanceUID == sr.SeriesInstanceUID and revised.SOPInstanceUID != sr.SOPInstanceUID
        assert set(read_sr_findings(revised)["referenced_instances"]) == {r.sop_instance_uid for r in records}
        wait_for(lambda: read_csv(work / "results_studies.csv")[0]["slices"] == "6", 30, "the study row update")
        assert (work / "report.html").exists()
        # Nothing more arrives later: no duplicate under new UIDs.
        time.sleep(3)
        assert len(orthanc.instances_of_class(study_id, SR_SOP_CLASS_UID)) == 2
        assert 1 <= len(orthanc.instances_of_class(study_id, SC_SOP_CLASS_UID)) <= 2
    finally:
        server.terminate()
        try:
            assert server.wait(timeout=60) == 0, log.read_text()
        finally:
            orthanc.close()


def test_outbox_recovers_interrupted_writes(phantoms, tmp_path):
    from ichscan.state import StateStore
    from ichscan.state.outbox import ModelInfo, Outbox, _tmp_name

    out_dir = tmp_path / "dicom"
    batch(phantoms, tmp_path, dicom_out=out_dir)
    written = dicom_files(out_dir)
    # A crash after the record but before the rename leaves the object under its temporary name...
    renamed = written[0]
    renamed.rename(_tmp_name(renamed))
    # ...and one before the record leaves a temporary file nobody knows about.
    stray = _tmp_name(written[1].with_name("1.2.3.dcm"))
    stray.write_bytes(b"partial")
    model = ModelInfo("simplecnn", "x", True, {label: 0.3 for label in LABELS})
    with StateStore(tmp_path / "state.sqlite") as store:
        Outbox(store, out_dir, [], model)
    assert renamed.exists() and not _tmp_name(renamed).exists()
    assert not stray.exists()
    assert dicom_files(out_dir) == written


@pytest.mark.slow
@needs_storescp
def test_serve_scp_sigkill_before_delivery_then_restart_sends_once(tmp_path):
    """serve-scp makes the SR while the target is down, is SIGKILLed, and the restarted
    server delivers the same objects (same UIDs) exactly once."""
    import signal

    from pynetdicom import AE

    records = generate(tmp_path / "data", studies=1, slices=4, seed=8, size=128)
    scp_port, target_port = free_port(), free_port()
    work = tmp_path / "ichscan"
    work.mkdir()

    def start(log: Path) -> subprocess.Popen:
        proc = start_ichscan(
            log, "serve-scp", "--port", str(scp_port), "--store", str(work / "store"), "--out", str(work / "results.csv"),
            "--overlays-for", "none", "--study-timeout", "0.5", "--max-latency", "0.2", "--threshold", "0.3",
            "--forward", f"TARGET@127.0.0.1:{target_port}",
        )
        wait_for(lambda: port_open(scp_port), 120, "serve-scp to listen", proc, log)
        return proc

    first = start(work / "first.log")
    try:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", scp_port, ae_title="ICHSCAN")
        assert assoc.is_established
        for record in records:
            assert assoc.send_c_store(pydicom.dcmread(record.path)).Status == 0
        assoc.release()
        outbox = work / "ichscan-outbox"
        wait_for(lambda: outbox.exists() and len(dicom_files(outbox)) >= 1, 120, "the SR in the outbox", first, work / "first.log")
        time.sleep(1.0)  # the forwarder tries and fails: the target is down
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    made = sorted(p.stem for p in dicom_files(work / "ichscan-outbox"))
    target = StoreSCP(tmp_path / "received", target_port)
    second = start(work / "second.log")
    try:
        wait_for(lambda: len(target.received()) >= len(made), 60, "the delivery after restart", second, work / "second.log")
        time.sleep(1.0)
        assert sorted(target.received()) == made
        assert sorted(p.stem for p in dicom_files(work / "ichscan-outbox")) == made
    finally:
        second.terminate()
        assert second.wait(timeout=60) == 0
        target.close()


def test_target_refusing_the_sr_class_still_gets_key_images(phantoms, tmp_path):
    """A PACS that does not take Comprehensive SR: the key images go, the SR waits and is
    retried, the forwarder survives; a repeated --forward is one destination."""
    import sqlite3

    from pynetdicom import AE, evt

    received: list[str] = []

    def on_store(event):
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    scp = AE(ae_title="SCONLY")
    scp.add_supported_context(SC_SOP_CLASS_UID, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        destination = Destination("SCONLY", "127.0.0.1", port)
        batch(phantoms, tmp_path, forward=(destination, destination), forward_wait=3)
    finally:
        server.shutdown()
    db = sqlite3.connect(tmp_path / "state.sqlite")
    rows = db.execute(
        "SELECT o.kind, d.state, d.attempts, d.last_error, d.destination FROM deliveries d JOIN result_objects o USING (sop_instance_uid)"
    ).fetchall()
    sent_sc = {uid for (uid,) in db.execute("SELECT sop_instance_uid FROM result_objects WHERE kind = 'sc'")}
    assert sent_sc and sorted(received) == sorted(sent_sc)  # every key image, once
    assert {r[4] for r in rows} == {str(destination)}
    srs = [r for r in rows if r[0] == "sr"]
    assert len(srs) == 3
    assert all(r[1] == "pending" and r[2] >= 1 and "does not accept" in r[3] for r in srs)


@needs_storescp
def test_state_paths_survive_a_change_of_working_folder(phantoms, tmp_path, monkeypatch):
    port = free_port()
    destination = Destination("TARGET", "127.0.0.1", port)
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    opts = dict(overlays_for="none", thresholds={label: 0.3 for label in LABELS}, workers=0, progress=False)
    # Run 1 with relative paths and the target down...
    run_batch(BatchOptions(input_dir=phantoms, out=Path("results.csv"), results=ResultsOutput(forward=(destination,), forward_wait=0), **opts))
    made = sorted(p.stem for p in dicom_files(first / "ichscan-outbox"))
    # ...run 2 from elsewhere, on the same state file, with the target up.
    monkeypatch.chdir(tmp_path)
    target = StoreSCP(tmp_path / "received", port)
    try:
        run_batch(
            BatchOptions(
                input_dir=phantoms,
                out=tmp_path / "results.csv",
                state=first / "ichscan-state.sqlite",
                results=ResultsOutput(forward=(destination,), forward_wait=60),
                **opts,
            )
        )
        wait_for(lambda: len(target.received()) >= len(made), 30, "the target to store everything")
        assert sorted(target.received()) == made
    finally:
        target.close()


@pytest.mark.slow
def test_watch_completes_studies_once_they_go_quiet_across_stops_and_crashes(tmp_path):
    """A stop within --study-timeout makes no SR (the study may be cut short); the next run
    makes it once the study is quiet. A late instance screened just before a SIGKILL still
    gives a revised SR after the restart."""
    import signal

    records = sorted(generate(tmp_path / "stash", studies=1, slices=4, seed=3, size=128), key=lambda r: r.sop_instance_uid)
    data = tmp_path / "in"
    data.mkdir()
    out_dir = tmp_path / "dicom"

    def start(timeout: float, log: Path) -> subprocess.Popen:
        return start_ichscan(
            log, "watch", str(data), "--out", str(tmp_path / "r.csv"), "--dicom-out", str(out_dir),
            "--overlays-for", "none", "--settle", "0.3", "--max-latency", "0.2", "--study-timeout", str(timeout),
            "--workers", "0", "--poll", "--poll-interval", "0.3",
        )

    def srs() -> list[pydicom.Dataset]:
        found = [pydicom.dcmread(p) for p in dicom_files(out_dir)] if out_dir.exists() else []
        return sorted((ds for ds in found if ds.SOPClassUID == SR_SOP_CLASS_UID), key=lambda ds: int(ds.InstanceNumber))

    def rows() -> int:
        return len(read_csv(tmp_path / "r.csv", missing_ok=True))

    for record in records[:3]:
        shutil.copy(record.path, data / Path(record.path).name)
    a = start(600, tmp_path / "a.log")
    wait_for(lambda: rows() == 3, 120, "3 rows", a, tmp_path / "a.log")
    a.send_signal(signal.SIGTERM)
    assert a.wait(60) == 0
    assert srs() == []  # stopped within the study timeout: no SR yet
    assert read_csv(tmp_path / "r_studies.csv")[0]["slices"] == "3"  # but the row is written

    b = start(1, tmp_path / "b.log")
    wait_for(lambda: len(srs()) == 1, 120, "the SR after restart", b, tmp_path / "b.log")
    b.send_signal(signal.SIGTERM)
    assert b.wait(60) == 0
    assert len(read_sr_findings(srs()[0])["referenced_instances"]) == 3

    c = start(600, tmp_path / "c.log")
    shutil.copy(records[3].path, data / Path(records[3].path).name)
    wait_for(lambda: rows() == 4, 120, "the late instance's row", c, tmp_path / "c.log")
    c.send_signal(signal.SIGKILL)
    c.wait(30)
    assert len(srs()) == 1

    d = start(1, tmp_path / "d.log")
    try:
        wait_for(lambda: len(srs()) == 2, 120, "the revised SR after the crash", d, tmp_path / "d.log")
        time.sleep(2)
        revised = srs()
        assert len(revised) == 2 and revised[1].SeriesInstanceUID == revised[0].SeriesInstanceUID
        assert set(read_sr_findings(revised[1])["referenced_instances"]) == {r.sop_instance_uid for r in records}
    finally:
        d.send_signal(signal.SIGTERM)
        assert d.wait(60) == 0
