"""The STOW-RS receiver over real HTTP: dicomweb-client, curl, and `ichscan serve-scp` itself."""

import io
import json
import shutil
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient

from helpers import CT_SMALL, MR_SMALL, RELATED, ServerProcess, free_port, multipart, port_open, read_csv, wait_for
from ichscan.sources.scp import CANNOT_UNDERSTAND, INVALID_UID, OUT_OF_RESOURCES, ScpOptions, StoreHandler, tls_context
from ichscan.sources.stow import (
    SOP_CLASS_NOT_SUPPORTED,
    STUDY_UID_MISMATCH,
    StowOptions,
    start_stow_server,
)
from ichscan.synth import generate

TOKEN = "s3cret-token-for-tests"


class Receiver:
    """An in-process STOW-RS server on a free loopback port, as `ichscan serve-scp --dicomweb-port` builds it."""

    def __init__(self, store: Path, tokens: Path | None = None, ssl_context=None, **options):
        self.store = store
        self.received: list[str] = []
        self.handler = StoreHandler(store, self.received.append)
        store.mkdir(parents=True, exist_ok=True)
        self.server = start_stow_server(StowOptions(port=0, token_file=tokens, **options), self.handler, ssl_context)
        self.url = self.server.url
        self.studies = self.url + "/studies"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(f"# allowed\nother-token\n\n{TOKEN}\n")
    return path


@pytest.fixture
def receiver(tmp_path, tokens):
    rcv = Receiver(tmp_path / "store", tokens)
    yield rcv
    rcv.stop()


def client(url: str, token: str | None = TOKEN, **kwargs) -> DICOMwebClient:
    return DICOMwebClient(url, headers={"Authorization": f"Bearer {token}"} if token else None, **kwargs)


def stored_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file()) if store.exists() else []


def file_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when it writes the invalid UIDs
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def post(url: str, body: bytes, token: str | None = TOKEN, content_type: str = RELATED, **kwargs) -> requests.Response:
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(url, data=body, headers=headers, timeout=60, **kwargs)


def reasons(response_json: dict) -> dict[str, int]:
    """SOP Instance UID ("" when unknown) -> FailureReason of each failed instance."""
    ds = pydicom.Dataset.from_json(response_json)
    return {str(item.get("ReferencedSOPInstanceUID", "")): int(item.FailureReason) for item in ds.get("FailedSOPSequence", [])}


def test_dicomweb_client_stores_every_instance_durably(receiver, tmp_path):
    records = generate(tmp_path / "ph", studies=5, slices=2, seed=3, size=96)
    assert len({r.transfer_syntax_uid for r in records}) >= 2
    datasets = [pydicom.dcmread(r.path) for r in records]
    answer = client(receiver.url).store_instances(datasets)
    assert {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence} == {r.sop_instance_uid for r in records}
    assert "FailedSOPSequence" not in answer
    for record in records:  # stored as sent: same bytes as the file (file meta included)
        target = receiver.store / record.study_instance_uid / record.series_instance_uid / f"{record.sop_instance_uid}.dcm"
        assert pydicom.dcmread(target).SOPInstanceUID == record.sop_instance_uid
        assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == record.transfer_syntax_uid
        assert str(target) in receiver.received
    assert len(receiver.received) == len(records)
    # A study's instances to its own URL; then a re-send: kept the first copy, answered as stored.
    study = records[0].study_instance_uid
    same_study = [ds for ds in datasets if ds.StudyInstanceUID == study]
    again = client(receiver.url).store_instances(same_study, study_instance_uid=study)
    assert len(again.ReferencedSOPSequence) == len(same_study)
    assert len(receiver.received) == len(records) and receiver.handler.stats.duplicates == len(same_study)
    assert not [p for p in stored_files(receiver.store) if p.name.endswith(".tmp")]


def test_chunked_request_from_dicomweb_client(receiver, tmp_path):
    """dicomweb-client sends a body over its chunk size with chunked transfer encoding."""
    records = generate(tmp_path / "ph", studies=1, slices=4, seed=6, size=256, transfer_syntaxes=["ExplicitVRLittleEndian"])
    answer = client(receiver.url, chunk_size=50_000).store_instances([pydicom.dcmread(r.path) for r in records])
    assert len(answer.ReferencedSOPSequence) == 4 and len(receiver.received) == 4


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_stores_and_gets_the_dicom_json_answer(receiver, tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    body = tmp_path / "body"
    body.write_bytes(multipart(CT_SMALL.read_bytes()))
    for extra in ([], ["-H", "Transfer-Encoding: chunked"]):  # Content-Length, then chunked
        proc = subprocess.run(
            ["curl", "-sS", "-w", "\n%{http_code}", "-X", "POST", "-H", f"Content-Type: {RELATED}", "-H", f"Authorization: Bearer {TOKEN}", *extra,
             "--data-binary", f"@{body}", f"{receiver.studies}/{ds.StudyInstanceUID}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        payload, code = proc.stdout.rsplit("\n", 1)
        assert code == "200"
        answer = pydicom.Dataset.from_json(json.loads(payload))
        assert answer.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert answer.ReferencedSOPSequence[0].ReferencedSOPClassUID == ds.SOPClassUID
    assert len(receiver.received) == 1


def test_refusals_are_answered_per_instance_and_nothing_is_written(receiver, monkeypatch):
    # As serve-scp does: ichscan refuses bad UIDs itself; pydicom need not warn about them.
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    good = pydicom.dcmread(CT_SMALL)
    bad_uid = pydicom.dcmread(CT_SMALL)
    bad_uid.SOPInstanceUID = "1.2.3.4.5"
    bad_uid.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on setting the invalid UID
        bad_uid.SeriesInstanceUID = "../../x"
    other_study = pydicom.dcmread(CT_SMALL)
    other_study.StudyInstanceUID = "1.2.3.999"
    other_study.SOPInstanceUID = other_study.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.6"
    mr = pydicom.dcmread(MR_SMALL)  # not CT, and no --accept-all-storage
    body = multipart(file_bytes(good), file_bytes(bad_uid), b"this is not DICOM at all", file_bytes(other_study), file_bytes(mr))
    response = post(f"{receiver.studies}/{good.StudyInstanceUID}", body)
    assert response.status_code == 202  # some stored, some failed
    assert response.headers["Content-Type"] == "application/dicom+json"
    assert reasons(response.json()) == {
        "1.2.3.4.5": INVALID_UID,
        "": CANNOT_UNDERSTAND,
        "1.2.3.4.6": STUDY_UID_MISMATCH,
        mr.SOPInstanceUID: SOP_CLASS_NOT_SUPPORTED,
    }
    answer = pydicom.Dataset.from_json(response.json())
    assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [good.SOPInstanceUID]
    assert [p.stem for p in stored_files(receiver.store)] == [good.SOPInstanceUID]
    assert not (receiver.store.parent / "x").exists()
    # All refused: 409, and still nothing written.
    response = post(receiver.studies, multipart(file_bytes(bad_uid), b"\x00" * 300))
    assert response.status_code == 409
    assert reasons(response.json()) == {"1.2.3.4.5": INVALID_UID, "": CANNOT_UNDERSTAND}
    assert len(stored_files(receiver.store)) == 1 and len(receiver.received) == 1
    assert receiver.handler.stats.refused == 6


def test_dicomweb_client_sees_a_refusal(receiver):
    mismatched = pydicom.dcmread(CT_SMALL)
    with pytest.raises(requests.HTTPError) as caught:  # all failed: 409
        client(receiver.url).store_instances([mismatched], study_instance_uid="1.2.3.4")
    assert caught.value.response.status_code == 409
    assert reasons(caught.value.response.json()) == {mismatched.SOPInstanceUID: STUDY_UID_MISMATCH}
    assert stored_files(receiver.store) == []


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", "other-token "])
def test_missing_or_bad_token_is_401_and_nothing_written(receiver, token):
    response = post(receiver.studies, multipart(CT_SMALL.read_bytes()), token=token)
    if token == "other-token ":  # surrounding space is not part of the token: this one is allowed
        assert response.status_code == 200
        return
    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="ichscan"')
    assert ('error="invalid_token"' in challenge) == (token is not None)
    assert stored_files(receiver.store) == [] and receiver.received == []
    with pytest.raises(requests.HTTPError):
        client(receiver.url, token).store_instances([pydicom.dcmread(CT_SMALL)])
    assert stored_files(receiver.store) == []


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_bad_token_is_answered_before_the_body_is_sent(receiver, tmp_path):
    """With Expect: 100-continue, the 401 comes instead of the go-ahead."""
    body = tmp_path / "body"
    body.write_bytes(multipart(CT_SMALL.read_bytes()))
    proc = subprocess.run(
        ["curl", "-sS", "-v", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect: 100-continue", "-H", f"Content-Type: {RELATED}",
         "-H", "Authorization: Bearer nope", "--data-binary", f"@{body}", receiver.studies],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.stdout == "401", proc.stderr
    assert "100 Continue" not in proc.stderr
    assert stored_files(receiver.store) == []


def test_bad_requests_are_refused_whole(receiver):
    part = multipart(CT_SMALL.read_bytes())
    assert post(receiver.studies, part, content_type="application/dicom").status_code == 415
    assert post(receiver.studies, part, content_type='multipart/related; type="application/dicom+json"; boundary=ICHSCANBOUNDARY').status_code == 415
    assert post(receiver.studies, part, content_type='multipart/related; type="application/dicom"').status_code == 400  # no boundary
    assert post(receiver.studies, b"plain junk, not multipart").status_code == 400
    assert post(receiver.studies, part[: len(part) // 2]).status_code == 400  # no closing boundary: nothing of it is stored
    assert post(receiver.studies + "/../../etc", part).status_code in (400, 404)
    assert post(receiver.url + "/studies/not-a-uid", part).status_code == 400
    assert post(receiver.url + "/series", part).status_code == 404
    assert requests.get(receiver.studies, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).status_code == 405
    assert stored_files(receiver.store) == [] and receiver.received == []


def test_size_limits(tmp_path, tokens):
    size = CT_SMALL.stat().st_size
    rcv = Receiver(tmp_path / "store", tokens, max_part_bytes=size - 1, max_request_bytes=3 * size)
    try:
        response = post(rcv.studies, multipart(CT_SMALL.read_bytes()))
        assert response.status_code == 409 and reasons(response.json()) == {"": OUT_OF_RESOURCES}
        response = post(rcv.studies, multipart(*[CT_SMALL.read_bytes()] * 4))
        assert response.status_code == 413
        # Chunked: the limit is counted as the body comes.
        chunks = (multipart(*[CT_SMALL.read_bytes()] * 4)[i : i + 4096] for i in range(0, 4 * size + 400, 4096))
        response = post(rcv.studies, chunks)
        assert response.status_code == 413
    finally:
        rcv.stop()
    assert stored_files(rcv.store) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--no-dimse"], "--no-dimse needs --dicomweb-port"), (["--dicomweb-token-file", "TOKENS"], "--dicomweb-token-file needs --dicomweb-port")],
)
def test_serve_scp_dicomweb_usage_errors(tmp_path, tokens, args, message):
    from click.testing import CliRunner

    from ichscan.cli import cli

    args = [str(tokens) if a == "TOKENS" else a for a in args]
    result = CliRunner().invoke(cli, ["serve-scp", "--port", "0", "--store", str(tmp_path / "s"), *args])
    assert result.exit_code == 2 and message in result.output


def test_a_token_file_without_tokens_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# no token yet\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        Receiver(tmp_path / "store", empty)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_with_a_self_signed_certificate(tmp_path, tokens):
    from test_scp import make_certificates

    cert, key = make_certificates(tmp_path)
    rcv = Receiver(tmp_path / "store", tokens, ssl_context=tls_context(ScpOptions(tls_cert=cert, tls_key=key)))
    try:
        assert rcv.url.startswith("https://127.0.0.1:")
        session = requests.Session()
        session.trust_env = False  # else REQUESTS_CA_BUNDLE, where set, wins over session.verify
        session.verify = str(cert)
        answer = client(rcv.url, session=session).store_instances([pydicom.dcmread(CT_SMALL)])
        assert len(answer.ReferencedSOPSequence) == 1
        with pytest.raises(requests.exceptions.SSLError):  # a client that does not trust the certificate
            post(rcv.studies, multipart(CT_SMALL.read_bytes()))
        with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP to the TLS port
            post(rcv.studies.replace("https://", "http://"), multipart(CT_SMALL.read_bytes()))
    finally:
        rcv.stop()
    assert len(rcv.received) == 1


# `ichscan serve-scp --dicomweb-port` as a real process.


def stow_one(url: str, path: Path) -> int:
    """POST one instance; the HTTP status, or 0 when no answer came (the server was killed)."""
    try:
        return post(url, multipart(path.read_bytes())).status_code
    except requests.exceptions.ConnectionError:
        return 0


@pytest.mark.slow
def test_serve_scp_screens_stow_instances_like_c_store_ones(tmp_path, tokens):
    records = generate(tmp_path / "ph", studies=2, slices=4, seed=12, size=128)
    web = free_port()
    srv = ServerProcess(tmp_path / "work", free_port(), "--dicomweb-port", str(web), "--dicomweb-token-file", str(tokens))
    try:
        wait_for(lambda: port_open(web), 60, "the DICOMweb port", srv.proc, srv.log)
        answer = client(f"http://127.0.0.1:{web}/dicom-web").store_instances([pydicom.dcmread(r.path) for r in records])
        assert len(answer.ReferencedSOPSequence) == len(records)
        expected = {r.sop_instance_uid for r in records}
        wait_for(lambda: expected <= {row["sop_instance_uid"] for row in read_csv(srv.out, missing_ok=True)}, 120, "rows", srv.proc, srv.log)
        rows = read_csv(srv.out)
        assert len(rows) == len(expected) and {row["status"] for row in rows} == {"ok"}
        assert all(row["path"].startswith(str(srv.store)) for row in rows)
        studies = {r.study_instance_uid for r in records}
        wait_for(lambda: studies <= {row["study_instance_uid"] for row in read_csv(srv.work / "results_studies.csv", missing_ok=True)}, 60, "study rows")
    finally:
        assert srv.stop() == 0
    log = srv.log.read_text()
    assert "serving STOW-RS at http://127.0.0.1:" in log and "Traceback" not in log
    assert f"received {len(records)} instances" in log


@pytest.mark.slow
def test_dicomweb_only(tmp_path):
    web = free_port()
    # --port is unused with --no-dimse: ServerProcess waits for the DICOMweb port instead.
    srv = ServerProcess(tmp_path, web, "--no-dimse", "--dicomweb-port", str(web))
    assert stow_one(f"http://127.0.0.1:{web}/dicom-web/studies", CT_SMALL) == 200
    wait_for(lambda: read_csv(srv.out, missing_ok=True), 60, "the row", srv.proc, srv.log)
    assert srv.stop() == 0
    log = srv.log.read_text()
    assert "serving C-STORE" not in log and "without authentication" in log


@pytest.mark.slow
def test_sigkill_while_storing_then_restart_exactly_once(tmp_path):
    records = generate(tmp_path / "ph", studies=4, slices=15, seed=43, size=128, transfer_syntaxes=["ExplicitVRLittleEndian"])
    paths = [r.path for r in records]
    port, web = free_port(), free_port()
    extra = ("--dicomweb-port", str(web))
    url = f"http://127.0.0.1:{web}/dicom-web/studies"
    srv = ServerProcess(tmp_path / "work", port, *extra)
    wait_for(lambda: port_open(web), 60, "the DICOMweb port", srv.proc, srv.log)
    statuses: dict[Path, int] = {}

    def send_all() -> None:  # one instance per request: each answer acknowledges one instance
        for path in paths:
            status = stow_one(url, path)
            if status == 0:
                break
            statuses[path] = status

    sender = threading.Thread(target=send_all)
    sender.start()
    wait_for(lambda: len(statuses) >= 10, 120, "some instances sent")
    srv.proc.kill()  # SIGKILL while requests are coming in
    srv.proc.wait(timeout=30)
    sender.join(timeout=60)
    acknowledged = [p for p, status in statuses.items() if status == 200]
    assert 10 <= len(acknowledged) < len(paths)
    by_path = {r.path: r for r in records}
    for path in acknowledged:  # 200 means on disk
        r = by_path[path]
        assert (srv.store / r.study_instance_uid / r.series_instance_uid / f"{r.sop_instance_uid}.dcm").is_file()
    for stored in srv.store.rglob("*.dcm"):  # what the kill interrupted is at most a hidden temporary file
        if not stored.name.startswith("."):
            assert pydicom.dcmread(stored).SOPInstanceUID == stored.stem
    srv = ServerProcess(tmp_path / "work", port, *extra)
    try:
        wait_for(lambda: port_open(web), 60, "the DICOMweb port", srv.proc, srv.log)
        # The rows of what was acknowledged come without any re-send: the start-up scan finds them.
        acked_uids = {by_path[p].sop_instance_uid for p in acknowledged}
        wait_for(lambda: acked_uids <= {row["sop_instance_uid"] for row in read_csv(srv.out, missing_ok=True)}, 180, "rows of the acknowledged instances", srv.proc, srv.log)
        assert {stow_one(url, p) for p in paths} == {200}  # the sender re-sends everything
        expected = {r.sop_instance_uid for r in records}
        wait_for(lambda: expected <= {row["sop_instance_uid"] for row in read_csv(srv.out, missing_ok=True)}, 180, "all rows after restart", srv.proc, srv.log)
        time.sleep(1.0)
        uids = [row["sop_instance_uid"] for row in read_csv(srv.out, missing_ok=True)]
        assert len(uids) == len(set(uids)) == len(expected)  # exactly once, across the crash
    finally:
        assert srv.stop(signal.SIGTERM) == 0
    assert "Traceback" not in srv.log.read_text()
