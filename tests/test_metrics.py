"""--metrics-port: /metrics, /healthz and /readyz over real HTTP while studies flow through
``serve-scp`` (sent with dcmtk's storescu) and ``watch``; the JSON log of the same run."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import DCMTK, RELATED, ServerProcess, free_port, multipart, needs_dcmtk, read_csv, run_ichscan, save, wait_for
from ichscan.metrics import RunMetrics, start_metrics_server
from ichscan.pipeline import WatchOptions, run_watch
from ichscan.state.store import StateStore

#: A patient name no ichscan output may contain (set on every phantom sent).
PATIENT_NAME = "Zyxwvut^Secretname"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """Every sample of ``base/metrics``: (name, sorted labels) -> value."""
    status, body = get(f"{base}/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def ready(base: str) -> tuple[int, dict]:
    """``/readyz``'s status and body; ``(0, {})`` while nothing listens yet."""
    try:
        status, body = get(f"{base}/readyz")
    except urllib.error.URLError:
        return 0, {}
    return status, json.loads(body)


@pytest.fixture(scope="module")
def phantoms(make_phantoms):
    """One study of 4 small slices, every one with :data:`PATIENT_NAME`."""
    folder, records = make_phantoms("metrics", studies=1, slices=4, seed=5, size=128, transfer_syntaxes=["ExplicitVRLittleEndian"])
    for record in records:
        ds = pydicom.dcmread(record.path)
        ds.PatientName = PATIENT_NAME
        save(ds, record.path)
    return folder, records


# -- the endpoints, on their own -------------------------------------------------------------


def test_readiness_says_loading_then_ready_and_names_what_fails(tmp_path):
    stop = threading.Event()
    metrics = RunMetrics([("store", tmp_path)], stop)
    server = start_metrics_server(metrics, "127.0.0.1", 0)
    try:
        status, body = ready(server.url)
        assert status == 503 and body["checks"]["model"] == "loading"
        assert get(f"{server.url}/healthz") == (200, b'{"status": "starting"}\n')
        metrics.loaded()
        metrics.tick(time.monotonic(), lambda: ({"decode": 3}, 1))
        status, body = ready(server.url)
        assert status == 200, body
        assert body["checks"] == {"model": "ok", "pipeline": "ok", "store": "ok", "outbox": "ok"}
        samples = scrape(server.url)
        assert value(samples, "ichscan_queue_depth", stage="decode") == 3
        assert value(samples, "ichscan_series_waiting_for_context") == 1
        assert value(samples, "ichscan_model_loaded") == 1
        # A loop that stopped turning: not alive, not ready.
        metrics.last_tick = time.monotonic() - metrics.stall_after - 1
        assert get(f"{server.url}/healthz")[0] == 503
        assert ready(server.url)[1]["checks"]["pipeline"] == "stalled"
        metrics.tick(time.monotonic(), lambda: ({}, 0))
        stop.set()  # draining: alive, no longer ready
        assert get(f"{server.url}/healthz")[0] == 200
        assert ready(server.url)[1]["checks"]["pipeline"] == "stopping"
        assert get(f"{server.url}/nothing")[0] == 404
    finally:
        server.close()


def test_readiness_fails_for_an_unwritable_folder_and_a_stuck_outbox(tmp_path):
    metrics = RunMetrics([("store", tmp_path / "missing" / "store")], outbox_stuck_after=60)
    metrics.loaded()
    metrics.tick(time.monotonic(), lambda: ({}, 0))
    state = StateStore(tmp_path / "state.sqlite")
    try:
        metrics.attach_state(state, ["PACS@127.0.0.1:104"])
        old = time.time() - 3600
        for sop, error, created in (("1.2.3", "cannot connect", old), ("1.2.4", "", old), ("1.2.5", "cannot connect", time.time())):
            state.execute(
                "INSERT INTO result_objects VALUES (?, '1.2', 'sr', 1, '1.2.9', '1.2.840.10008.5.1.4.1.1.88.34', 'k', 'f.dcm', ?)", (sop, created)
            )
            state.execute("INSERT INTO deliveries (sop_instance_uid, destination, state, last_error) VALUES (?, 'PACS@127.0.0.1:104', 'pending', ?)", (sop, error))
        ok, body = metrics.readiness()
        assert not ok
        assert body["checks"]["store"].endswith("is not writable")
        # Only the delivery that failed and is older than the limit counts.
        assert body["checks"]["outbox"] == "1 deliveries failing for over 1 min"
        families = {m.name: m for m in metrics.outbox_metrics()}
        assert {s.labels["state"]: s.value for s in families["ichscan_outbox_deliveries"].samples}["pending"] == 3
        assert families["ichscan_outbox_retrying_deliveries"].samples[0].value == 2
        assert families["ichscan_outbox_oldest_retrying_seconds"].samples[0].value >= 3500
    finally:
        state.close()


def test_message_outbox_metrics_by_kind(tmp_path):
    """Webhook events and FHIR Bundles in the message outbox, by kind and state."""
    from ichscan.state.messages import MessageOutbox

    metrics = RunMetrics([])
    state = StateStore(tmp_path / "state.sqlite")
    try:
        metrics.attach_state(state)
        outbox = MessageOutbox(state)
        outbox.enqueue("webhook", "1.2.3", "a", b"{}", "application/json", ["http://127.0.0.1:9/hook"])
        outbox.enqueue("webhook", "1.2.4", "b", b"{}", "application/json", ["http://127.0.0.1:9/hook"])
        outbox.enqueue("fhir", "1.2.3", "a", b"{}", "application/fhir+json", ["http://127.0.0.1:9/fhir"])
        state.execute("UPDATE message_deliveries SET state = 'sent' WHERE event_id IN (SELECT event_id FROM messages WHERE kind = 'fhir')")
        families = {m.name: m for m in metrics.message_metrics()}
        counts = {(s.labels["kind"], s.labels["state"]): s.value for s in families["ichscan_message_deliveries"].samples}
        assert counts == {("webhook", "pending"): 2, ("fhir", "sent"): 1}
        oldest = {s.labels["kind"]: s.value for s in families["ichscan_message_oldest_pending_seconds"].samples}
        assert oldest["fhir"] == 0.0 and oldest["webhook"] >= 0.0
    finally:
        state.close()


def test_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "in").mkdir()
        proc = run_ichscan("watch", str(tmp_path / "in"), "--out", str(tmp_path / "r.csv"), "--metrics-port", str(port), timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"Error: cannot serve metrics on 127.0.0.1:{port}: Address already in use", proc.stderr
    bad = run_ichscan("serve-scp", "--metrics-port", "70000", timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "Invalid value for '--metrics-port'" in bad.stderr


# -- serve-scp: a study sent with storescu ------------------------------------------------------


@needs_dcmtk
def test_serve_scp_metrics_move_as_a_study_flows_and_json_log_has_no_patient_name(tmp_path, phantoms, monkeypatch):
    folder, records = phantoms
    n = len(records)
    metrics_port = free_port()
    monkeypatch.setenv("ICHSCAN_LOG_FORMAT", "json")
    web_port = free_port()
    server = ServerProcess(
        tmp_path / "work", free_port(), "--metrics-port", str(metrics_port), "--dicomweb-port", str(web_port), "--workers", "1", "--device", "cpu"
    )
    base = f"http://127.0.0.1:{metrics_port}"
    try:
        wait_for(lambda: ready(base)[0] == 200, 120, "/readyz 200 once the model is loaded", server.proc, server.log)
        before = scrape(base)
        assert value(before, "ichscan_instances_received_total", protocol="c-store", outcome="stored") == 0
        assert value(before, "ichscan_instances_screened_total", status="ok") == 0
        assert get(f"{base}/healthz")[0] == 200
        proc = subprocess.run(
            [str(DCMTK / "storescu"), "-aec", "ICHSCAN", "+sd", "+r", "127.0.0.1", str(server.port), str(folder)],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        wait_for(lambda: value(scrape(base), "ichscan_studies_completed_total") >= 1, 120, "the study completed", server.proc, server.log)
        after = scrape(base)
        assert value(after, "ichscan_instances_received_total", protocol="c-store", outcome="stored") == n
        assert value(after, "ichscan_files_queued_total") == n
        assert value(after, "ichscan_instances_screened_total", status="ok") == n
        assert value(after, "ichscan_instances_screened_total", status="error") == 0
        assert value(after, "ichscan_instances_positive_total") == sum(row["any"] == "1" for row in read_csv(server.out))
        assert value(after, "ichscan_model_batch_seconds_count", step="screen") > 0
        assert value(after, "ichscan_model_batch_size_sum") == n
        assert value(after, "ichscan_decode_chunk_seconds_count") > 0
        assert value(after, "ichscan_queue_depth", stage="decode") == 0
        assert value(after, "ichscan_outbox_deliveries", state="pending") == 0
        assert len(read_csv(server.out)) == n
        # STOW-RS, counted under its own protocol: an instance already stored, and junk.
        request = urllib.request.Request(
            f"http://127.0.0.1:{web_port}/dicom-web/studies",
            data=multipart(Path(records[0].path).read_bytes(), b"not DICOM at all"),
            headers={"Content-Type": RELATED},
        )
        assert urllib.request.urlopen(request, timeout=60).status == 202  # one stored (a duplicate), one failed
        stow = scrape(base)
        assert value(stow, "ichscan_instances_received_total", protocol="stow-rs", outcome="duplicate") == 1
        assert value(stow, "ichscan_instances_received_total", protocol="stow-rs", outcome="refused") == 1
        assert value(stow, "ichscan_instances_received_total", protocol="stow-rs", outcome="stored") == 0
        assert value(stow, "ichscan_instances_received_total", protocol="c-store", outcome="stored") == n
        assert value(stow, "ichscan_files_queued_total") == n  # a duplicate is not screened again
    finally:
        assert server.stop() == 0
    lines = server.log.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"timestamp", "level", "logger", "message"} <= set(e) for e in events)
    study = records[0].study_instance_uid
    assert any(e.get("study_instance_uid") == study and e["message"].startswith("screened ") for e in events)
    assert any(e.get("study_instance_uid") == study and e["message"].startswith(f"study {study}") for e in events)
    text = server.log.read_text()
    assert "Zyxwvut" not in text and "Secretname" not in text


# -- watch: files moved in --------------------------------------------------------------------


def test_watch_metrics_move_as_files_arrive(tmp_path, phantoms):
    folder, records = phantoms
    root = tmp_path / "in"
    root.mkdir()
    port = free_port()
    opts = WatchOptions(
        input_dir=root, out=tmp_path / "out" / "results.csv", settle=0.2, max_latency=0.2, study_timeout=1.0, rescan_interval=3600.0,
        overlays_for="none", workers=0, batch_size=8, device="cpu", threads=1, metrics_port=port,
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            run_watch(opts, stop=stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: errors or ready(base)[0] == 200, 120, "/readyz 200")
        assert not errors, errors
        assert value(scrape(base), "ichscan_files_queued_total") == 0
        for record in records:
            shutil.copy(record.path, root / Path(record.path).name)
        wait_for(lambda: value(scrape(base), "ichscan_studies_completed_total") >= 1, 120, "the study completed")
        samples = scrape(base)
        assert value(samples, "ichscan_files_queued_total") == len(records)
        assert value(samples, "ichscan_instances_screened_total", status="ok") == len(records)
        assert value(samples, "ichscan_decode_chunk_seconds_count") > 0
        assert value(samples, "ichscan_model_batch_seconds_count", step="screen") > 0
        assert ("ichscan_instances_received_total", (("outcome", "stored"), ("protocol", "c-store"))) not in samples
    finally:
        stop.set()
        thread.join(120)
    assert not errors, errors
    with pytest.raises(OSError):  # the server is closed with the run
        urllib.request.urlopen(f"{base}/healthz", timeout=5)
