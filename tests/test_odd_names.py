"""File names that are not valid UTF-8 (bytes such as b"bad\\xff.dcm" on Linux).

Python hands such a name over as a str with a surrogate ("bad\\udcff.dcm"), which
neither a UTF-8 file nor SQLite can hold as it is. These files are screened like any
other: the CSV and the HTML report show the bad bytes as backslash escapes
("bad\\xff.dcm") and stay valid UTF-8; the state file keeps the exact name.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pydicom

from helpers import ODD_JUNK, escaped, read_csv, rename_to_odd, run_ichscan
from ichscan.dicom_results import SR_SOP_CLASS_UID, read_sr_findings
from ichscan.state.ledger import decode_path
from ichscan.synth import generate


def odd_folder(folder: Path, slices: int = 3, seed: int = 1) -> tuple[Path, str]:
    """Phantoms in ``folder``, one of them renamed to a name that is not UTF-8; returns
    the folder and that file's path as Python sees it (with a surrogate)."""
    records = generate(folder, studies=1, slices=slices, seed=seed, size=64)
    return folder, rename_to_odd(records[0].path)


def test_batch_screens_a_non_utf8_name_and_every_file_gets_its_row(tmp_path):
    data, odd = odd_folder(tmp_path / "in")
    files = sorted(p for p in data.rglob("*") if p.is_file())
    assert len(files) == 3
    out = tmp_path / "out" / "results.csv"
    proc = run_ichscan("batch", str(data), "--out", str(out), "--no-progress", "--workers", "1", "--overlays-for", "none")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr
    rows = read_csv(out)
    assert len(rows) == 3
    assert [r["status"] for r in rows] == ["ok"] * 3
    paths = {r["path"] for r in rows}
    assert escaped(odd) in paths and escaped(odd).endswith("bad\\xff.dcm")
    assert paths == {escaped(str(p)) for p in files}
    read_csv(out.with_name("results_studies.csv"))


def test_batch_with_dicom_out_and_html_on_non_utf8_names(tmp_path):
    data, odd = odd_folder(tmp_path / "in", slices=3, seed=2)
    # An unreadable file with an odd name too: it is listed (escaped) in the HTML report.
    junk = os.path.join(os.fsencode(data), ODD_JUNK)
    with open(junk, "wb") as fh:
        fh.write(b"not a DICOM file at all")
    out = tmp_path / "out"
    proc = run_ichscan(
        "batch", str(data), "--out", str(out / "results.csv"), "--no-progress", "--workers", "0",
        "--dicom-out", str(out / "dicom"), "--html", str(out / "report.html"), "--threshold", "0.01",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "failed" not in proc.stderr, proc.stderr
    rows = read_csv(out / "results.csv")
    assert sorted(r["status"] for r in rows) == ["error", "ok", "ok", "ok"]
    odd_row = next(r for r in rows if r["path"] == escaped(odd))
    assert odd_row["status"] == "ok"
    srs = [ds for ds in map(pydicom.dcmread, sorted((out / "dicom").rglob("*.dcm"))) if ds.SOPClassUID == SR_SOP_CLASS_UID]
    assert len(srs) == 1
    # The SR references the odd file's instance too: its header was read back from its real name.
    assert odd_row["sop_instance_uid"] in read_sr_findings(srs[0])["referenced_instances"]
    # The state file keeps the odd file's real name, so its header can be read back.
    state = sqlite3.connect(out / "ichscan-state.sqlite")
    stored = dict(state.execute("SELECT sop_instance_uid, path FROM files WHERE status = 'ok'").fetchall())
    state.close()
    assert os.path.exists(decode_path(stored[odd_row["sop_instance_uid"]]))
    assert decode_path(stored[odd_row["sop_instance_uid"]]) == odd
    report = (out / "report.html").read_bytes().decode("utf-8")
    assert "junk\\xfe.dcm" in report
