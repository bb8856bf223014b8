"""--log-format json: one JSON object per line, the UIDs an event is about, never a patient name."""

from __future__ import annotations

import json
import logging

import pydicom

from helpers import run_ichscan, save
from ichscan.logs import JsonFormatter, uid_fields

PATIENT_NAME = "Qwertzuiop^Hiddenname"


def record(message: str, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("ichscan.test", logging.INFO, __file__, 1, message, (), None)
    rec.__dict__.update(extra)
    return rec


def test_json_line_has_the_fixed_fields_and_only_the_uid_extras():
    line = JsonFormatter().format(record("stored", **uid_fields("1.2", None, "1.2.3"), patient_name=PATIENT_NAME, other="x"))
    event = json.loads(line)
    assert set(event) == {"timestamp", "level", "logger", "message", "study_instance_uid", "sop_instance_uid"}
    assert event["level"] == "INFO" and event["logger"] == "ichscan.test" and event["message"] == "stored"
    assert event["timestamp"].endswith("Z") and event["study_instance_uid"] == "1.2"
    assert "\n" not in line and PATIENT_NAME not in line


def test_json_exception_is_one_line():
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        rec = logging.LogRecord("ichscan", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "ValueError: bad\nthing" in json.loads(line)["exception"]


def test_batch_debug_log_as_json_names_no_patient(make_phantoms, tmp_path):
    folder, records = make_phantoms("logs", studies=1, slices=2, seed=7, size=96, transfer_syntaxes=["ExplicitVRLittleEndian"])
    for r in records:
        ds = pydicom.dcmread(r.path)
        ds.PatientName = PATIENT_NAME
        save(ds, r.path)
    proc = run_ichscan(
        "--log-format", "json", "-v", "batch", str(folder), "--out", str(tmp_path / "r.csv"), "--overlays-for", "none",
        "--workers", "0", "--device", "cpu", "--no-progress", "--html", str(tmp_path / "r.html"), "--dicom-out", str(tmp_path / "dcm"),
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    assert any(e["level"] == "DEBUG" for e in events)
    assert any(e.get("study_instance_uid") == records[0].study_instance_uid for e in events)
    assert "Qwertzuiop" not in proc.stderr and "Hiddenname" not in proc.stderr


def test_bad_log_format_is_a_usage_error():
    proc = run_ichscan("--log-format", "xml", "plugins")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "'xml' is not one of 'text', 'json'" in proc.stderr
