"""DICOMweb as a client: ``ichscan pull`` (QIDO-RS, WADO-RS) and ``--forward URL`` (STOW-RS).

Against a real Orthanc with its DICOMweb plugin (Debian package orthanc-dicomweb): phantom
studies uploaded by its REST API, pulled and screened, the SR and key image stored back by
STOW-RS and found again by QIDO-RS; a second pull screens nothing; forwarding waits out an
Orthanc that is down. A small local HTTP server stands in where Orthanc cannot: a 401.
"""

from __future__ import annotations

import http.server
import json
import sqlite3
import threading
import urllib.request
from pathlib import Path

import pytest

from helpers import Orthanc, dicom_files, free_port, needs_orthanc_dicomweb, read_csv, run_ichscan
from ichscan.dicom_results import SC_SOP_CLASS_UID, SR_SOP_CLASS_UID
from ichscan.dicomweb import WebDestination, parse_base_url, read_token
from ichscan.labels import LABELS
from ichscan.pipeline import BatchOptions, run_batch
from ichscan.reporting import ResultsOutput
from ichscan.state.forwarder import Destination, parse_destination
from ichscan.synth import generate

SCREENING = ("--overlays-for", "none", "--threshold", "0.3", "--workers", "0", "--forward-wait", "60")


def test_forward_accepts_dicomweb_urls_and_refuses_credentials(tmp_path):
    assert parse_destination("http://pacs.example.org:8042/dicom-web/") == WebDestination("http://pacs.example.org:8042/dicom-web")
    assert str(parse_destination("HTTPS://pacs/dicom-web")) == "https://pacs/dicom-web"
    assert parse_destination("ORTHANC@pacs:4242") == Destination("ORTHANC", "pacs", 4242)
    for bad, why in (
        ("http://user:secret@pacs/dicom-web", "credentials"),
        ("http://token@pacs/dicom-web", "credentials"),
        ("http://pacs/dicom-web?access_token=x", "query"),
        ("http:///dicom-web", "no host"),
        ("http://pacs:x/dicom-web", "port"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_base_url(bad)
    # The token is no part of a destination's identity (the state file keys deliveries by
    # str(), which never shows it).
    with_token = WebDestination("http://pacs/dicom-web", "s3cret")
    assert with_token == WebDestination("http://pacs/dicom-web") and "s3cret" not in f"{with_token} {with_token!r}"
    token = tmp_path / "token"
    token.write_text(" abc.def-ghi \n")
    assert read_token(token) == "abc.def-ghi"
    token.write_text("two tokens")
    with pytest.raises(ValueError, match="one token"):
        read_token(token)
    # On the command line: a URL with credentials, or a token file without a DICOMweb destination.
    data = tmp_path / "data"
    data.mkdir()
    proc = run_ichscan("batch", str(data), "--forward", "http://u:p@127.0.0.1:9/dicom-web")
    assert proc.returncode == 2 and "must not carry credentials" in proc.stderr
    proc = run_ichscan("batch", str(data), "--forward", "A@127.0.0.1:9", "--forward-token-file", str(token))
    assert proc.returncode == 2 and "DICOMweb destinations" in proc.stderr


def test_pull_filters_are_checked():
    from ichscan.sources.dicomweb import PullQuery, _when

    for good in (PullQuery(study_date="20240101-20240131"), PullQuery(study_date="-20240131"), PullQuery(since="last"), PullQuery(since="20240101123000")):
        good.check()
    for bad in (PullQuery(study_date="2024-01-01"), PullQuery(study_date="-"), PullQuery(study_uid="1.2.x"), PullQuery(since="yesterday"), PullQuery(accession="A" * 17)):
        with pytest.raises(ValueError):
            bad.check()
    assert not PullQuery(since="last").filtered and PullQuery(accession="A1").filtered
    # StudyDate + StudyTime as one sortable stamp; TM may be short or carry fractions.
    assert _when("20240101", "0930") == "20240101093000" and _when("20240101", "093015.123") == "20240101093015"
    assert _when("", "0930") == ""


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    """Answers every request 401 and remembers the Authorization headers it saw."""

    seen: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.seen.append(self.headers.get("Authorization", ""))
        self.send_response(401)
        self.send_header("WWW-Authenticate", "Bearer")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def unauthorized():
    _Unauthorized.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", _Unauthorized.seen
    server.shutdown()


def test_pull_errors_are_one_line(tmp_path, unauthorized):
    url, seen = unauthorized
    token = tmp_path / "token"
    token.write_text("not-the-right-one\n")
    for args, expected in (
        ([f"http://127.0.0.1:{free_port()}/dicom-web"], "cannot reach http://127.0.0.1:"),
        ([url, "--token-file", str(token)], "HTTP 401 Unauthorized"),
        (["ftp://pacs/dicom-web"], "not an http:// or https:// URL"),
        ([url, "--study-date", "2024-01-01"], "--study-date"),
    ):
        proc = run_ichscan("pull", *args, "--out", str(tmp_path / "r.csv"), "--store", str(tmp_path / "store"))
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode in (1, 2) and len(lines) >= 1 and expected in lines[-1], proc.stderr
        assert "Traceback" not in proc.stderr
    assert "Bearer not-the-right-one" in seen  # the token went in the header, not the URL
    assert not (tmp_path / "r.csv").exists()  # refused before anything was screened


def test_forwarding_to_a_server_refusing_our_token_keeps_the_results_pending(tmp_path, unauthorized, make_phantoms):
    url, seen = unauthorized
    data = make_phantoms("dweb-401", studies=1, slices=3, seed=4, size=96)[0]
    opts = BatchOptions(
        input_dir=data,
        out=tmp_path / "results.csv",
        overlays_for="none",
        workers=0,
        progress=False,
        results=ResultsOutput(forward=(WebDestination(url, "s3cret-xyz"),), forward_wait=2),
    )
    run_batch(opts)
    db = sqlite3.connect(tmp_path / "ichscan-state.sqlite")
    rows = db.execute("SELECT destination, state, last_error FROM deliveries").fetchall()
    assert rows and all(r[0] == url and r[1] == "pending" and "401" in r[2] for r in rows)
    assert "s3cret-xyz" not in json.dumps(rows)
    assert seen and set(seen) == {"Bearer s3cret-xyz"}


# -- against Orthanc -----------------------------------------------------------------------


def _qido(orthanc: Orthanc, path: str) -> list[dict]:
    req = urllib.request.Request(f"{orthanc.dicomweb_url}{path}", headers={"Accept": "application/dicom+json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = resp.read()
    return json.loads(body) if body else []


def _uids(items: list[dict], tag: str) -> list[str]:
    return [item[tag]["Value"][0] for item in items]


@pytest.mark.slow
@needs_orthanc_dicomweb
def test_pull_screens_orthanc_studies_and_stores_results_back_by_stow(tmp_path):
    records = generate(tmp_path / "data", studies=2, slices=4, seed=12, size=128, positive_fraction=1.0)
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=True)
    try:
        for record in records:
            orthanc.upload(Path(record.path))
        studies = sorted({r.study_instance_uid for r in records})
        work = tmp_path / "ichscan"
        url = orthanc.dicomweb_url
        args = ("pull", url, "--since", "last", "--forward", url, "--out", str(work / "results.csv"), "--store", str(work / "store"), *SCREENING)
        first = run_ichscan(*args, timeout=600)
        assert first.returncode == 0, first.stderr
        rows = read_csv(work / "results.csv")
        assert sorted(r["sop_instance_uid"] for r in rows) == sorted(r.sop_instance_uid for r in records)
        assert {r["status"] for r in rows} == {"ok"}
        made = sorted(p.stem for p in dicom_files(work / "ichscan-outbox"))
        for study in studies:
            # The results, seen through Orthanc's QIDO-RS: an SR series, and the key image.
            sr_series = _qido(orthanc, f"/studies/{study}/series?Modality=SR")
            assert len(sr_series) == 1
            instances = _qido(orthanc, f"/studies/{study}/instances?includefield=00080016")
            classes = [item["00080016"]["Value"][0] for item in instances]
            assert classes.count(SR_SOP_CLASS_UID) == 1 and classes.count(SC_SOP_CLASS_UID) <= 1
        stored_back = [
            uid
            for study in studies
            for item in _qido(orthanc, f"/studies/{study}/instances?includefield=00080016")
            if item["00080016"]["Value"][0] in (SR_SOP_CLASS_UID, SC_SOP_CLASS_UID)
            for uid in [item["00080018"]["Value"][0]]
        ]
        assert sorted(stored_back) == made  # every result object, once
        db = sqlite3.connect(work / "ichscan-state.sqlite")
        assert {state for (state,) in db.execute("SELECT state FROM deliveries")} == {"sent"}
        (mark,) = db.execute("SELECT value FROM watermarks").fetchone()
        db.close()
        assert len(mark) == 14

        # Again: the watermark and the ledger leave nothing to fetch or screen; our own SR
        # and key images in Orthanc (not CT) are not pulled either.
        second = run_ichscan(*args, timeout=600)
        assert second.returncode == 0, second.stderr
        assert "0 instances fetched" in second.stderr and "screened 0 instances" in second.stderr
        assert len(read_csv(work / "results.csv")) == len(records)
        assert sorted(p.stem for p in dicom_files(work / "ichscan-outbox")) == made
        assert len(_qido(orthanc, f"/studies/{studies[0]}/series?Modality=SR")) == 1

        # A filter picks one study; a non-DICOMweb URL (Orthanc's own REST root) is named as such.
        proc = run_ichscan("pull", f"http://127.0.0.1:{orthanc.http_port}/", "--out", str(tmp_path / "x.csv"))
        assert proc.returncode == 1 and "DICOMweb base URL" in proc.stderr.strip().splitlines()[-1], proc.stderr
    finally:
        orthanc.close()


@pytest.mark.slow
@needs_orthanc_dicomweb
def test_stow_forwarding_retries_while_orthanc_is_down_then_delivers_once(tmp_path, make_phantoms):
    """As test_forward's C-STORE test: the target comes up 3 s into the run."""
    data = make_phantoms("dweb-retry", studies=2, slices=3, seed=21, size=96, positive_fraction=1.0)[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}/dicom-web"
    target: list[Orthanc] = []
    timer = threading.Timer(3.0, lambda: target.append(Orthanc(tmp_path / "orthanc", dicomweb=True, http_port=port)))
    timer.start()
    try:
        opts = BatchOptions(
            input_dir=data,
            out=tmp_path / "results.csv",
            overlays_for="none",
            thresholds={label: 0.3 for label in LABELS},
            workers=0,
            progress=False,
            results=ResultsOutput(forward=(parse_destination(url),), forward_wait=90),
        )
        assert run_batch(opts).reporter_errors == {}
        timer.join()
        made = sorted(p.stem for p in dicom_files(tmp_path / "ichscan-outbox"))
        assert len(made) >= 2
        db = sqlite3.connect(tmp_path / "ichscan-state.sqlite")
        assert {row for row in db.execute("SELECT state, destination FROM deliveries")} == {("sent", url)}
        assert max(attempts for (attempts,) in db.execute("SELECT attempts FROM deliveries")) == 0  # unreachable is no refusal
        received = [uid for study in _qido(target[0], "/studies") for uid in _uids(_qido(target[0], f"/studies/{_uids([study], '0020000D')[0]}/instances"), "00080018")]
        assert sorted(received) == made  # everything, once
    finally:
        timer.cancel()
        for orthanc in target:
            orthanc.close()
