"""`ichscan serve-scp` as a real process: receive, screen exactly once, survive a SIGKILL."""

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from helpers import DCMTK, MR_SMALL, ServerProcess, free_port, needs_dcmtk, read_csv, run_ichscan, wait_for
from ichscan.sources.scp import CT_IMAGE_STORAGE, decodable_transfer_syntaxes
from ichscan.synth import generate


def send_files(port: int, paths: list[Path], results: dict | None = None, ae_title="SENDER") -> dict:
    """Send with pynetdicom, one association; returns path -> status."""
    results = {} if results is None else results
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CT_IMAGE_STORAGE, decodable_transfer_syntaxes()[:4])  # the uncompressed ones
    for syntax in (pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless):
        ae.add_requested_context(CT_IMAGE_STORAGE, syntax)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")  # MR Image Storage
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHSCAN")
    if not assoc.is_established:
        return results
    try:
        for path in paths:
            try:
                status = assoc.send_c_store(pydicom.dcmread(path))
            except RuntimeError:  # the peer went away (killed)
                break
            if not status:  # no response: not stored as far as the sender knows
                break
            results[path] = status.Status
    finally:
        if assoc.is_established:
            assoc.release()
    return results


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    srv = ServerProcess(work, free_port(), "--accept-all-storage")
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()


@pytest.mark.slow
@needs_dcmtk
def test_concurrent_senders_several_syntaxes_screened_once(server, tmp_path):
    records = generate(tmp_path / "ph", studies=6, slices=3, seed=31, size=128)
    assert len({r.transfer_syntax_uid for r in records}) >= 3
    by_study: dict[str, list] = {}
    for r in records:
        by_study.setdefault(r.study_instance_uid, []).append(r)
    studies = list(by_study.values())
    # Three studies through pynetdicom in a thread, three through dcmtk storescu, at once.
    statuses: dict = {}
    sender = threading.Thread(target=send_files, args=(server.port, [r.path for s in studies[:3] for r in s], statuses))
    sender.start()
    option = {"1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-x=", "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.90": "-xv"}
    for study in studies[3:]:
        for r in study:
            proc = subprocess.run([str(DCMTK / "storescu"), "-aec", "ICHSCAN", option[str(r.transfer_syntax_uid)], "127.0.0.1", str(server.port), str(r.path)], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
    sender.join(timeout=120)
    assert set(statuses.values()) == {0}
    expected = {r.sop_instance_uid for r in records}
    wait_for(lambda: expected <= {row["sop_instance_uid"] for row in read_csv(server.out, missing_ok=True)}, 120, "all instances screened")
    mine = [row for row in read_csv(server.out, missing_ok=True) if row["sop_instance_uid"] in expected]
    assert len(mine) == len(expected)  # exactly once
    assert all(row["status"] == "ok" for row in mine)
    wait_for(lambda: set(by_study) <= {row["study_instance_uid"] for row in read_csv(server.work / "results_studies.csv", missing_ok=True)}, 60, "study rows")


@pytest.mark.slow
def test_duplicate_and_other_storage_class(server):
    first = send_files(server.port, [MR_SMALL])
    second = send_files(server.port, [MR_SMALL])  # a re-send: kept first, answered Success
    assert first == second == {MR_SMALL: 0}
    uid = pydicom.dcmread(MR_SMALL).SOPInstanceUID
    wait_for(lambda: any(row["sop_instance_uid"] == uid for row in read_csv(server.out, missing_ok=True)), 60, "the MR row")
    time.sleep(1.0)
    mr_rows = [row for row in read_csv(server.out, missing_ok=True) if row["sop_instance_uid"] == uid]
    assert len(mr_rows) == 1
    assert mr_rows[0]["status"] == "skipped" and "not CT" in mr_rows[0]["error"]


@pytest.mark.slow
def test_sigkill_mid_transfer_restart_and_resend(tmp_path):
    records = generate(tmp_path / "ph", studies=4, slices=15, seed=41, size=128, transfer_syntaxes=["ExplicitVRLittleEndian"])
    paths = [r.path for r in records]
    port = free_port()
    srv = ServerProcess(tmp_path / "work", port)
    statuses: dict = {}
    sender = threading.Thread(target=send_files, args=(port, paths, statuses))
    sender.start()
    wait_for(lambda: len(statuses) >= 10, 120, "some instances sent")
    srv.proc.kill()  # SIGKILL in the middle of the association
    srv.proc.wait(timeout=30)
    sender.join(timeout=60)
    succeeded = [p for p, status in statuses.items() if status == 0]
    assert 10 <= len(succeeded) < len(paths)
    by_path = {r.path: r for r in records}
    for path in succeeded:  # Success means on disk
        r = by_path[path]
        assert (srv.store / r.study_instance_uid / r.series_instance_uid / f"{r.sop_instance_uid}.dcm").is_file()
    # Whatever the kill interrupted is at most a hidden temporary file; every visible one is whole.
    for stored in srv.store.rglob("*.dcm"):
        if not stored.name.startswith("."):
            assert pydicom.dcmread(stored).SOPInstanceUID == stored.stem
    # A half-written instance of the killed server, whether or not the kill left one itself.
    r = records[-1]
    orphan = srv.store / r.study_instance_uid / r.series_instance_uid / f".{r.sop_instance_uid}.dcm.{srv.proc.pid}.1.tmp"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"DICM half")
    srv = ServerProcess(tmp_path / "work", port)
    try:
        # The restart removed what the killed run left half-written (before it listened).
        assert [p for p in srv.store.rglob(".*") if p.is_file()] == []
        assert "half-written temporary file(s) that a killed run left" in srv.log.read_text()
        again = send_files(port, paths)  # the sender re-sends everything
        assert set(again.values()) == {0}
        expected = {r.sop_instance_uid for r in records}
        wait_for(lambda: expected <= {row["sop_instance_uid"] for row in read_csv(srv.out, missing_ok=True)}, 180, "all rows after restart")
        time.sleep(1.0)
        uids = [row["sop_instance_uid"] for row in read_csv(srv.out, missing_ok=True)]
        assert len(uids) == len(set(uids)) == len(expected)  # exactly once, across the crash
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log.read_text()


@pytest.mark.slow
def test_sigterm_exits_zero_and_bad_options_are_one_line(tmp_path):
    srv = ServerProcess(tmp_path, free_port())
    assert srv.stop(signal.SIGTERM) == 0
    log = srv.log.read_text()
    assert "SIGTERM" in log and "Traceback" not in log
    with socket.socket() as taken:  # a port someone else already listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_ichscan("serve-scp", "--port", str(port), "--store", str(tmp_path / "s2"), "--out", str(tmp_path / "r2.csv"), timeout=120)
    assert busy.returncode == 1 and "cannot listen" in busy.stderr and "Traceback" not in busy.stderr
