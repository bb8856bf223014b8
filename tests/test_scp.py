"""The C-STORE receiver over real associations: pynetdicom's SCU and dcmtk's tools."""

import errno
import logging
import os
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt

from helpers import CT_SMALL, DCMTK, associate_rq, needs_dcmtk, p_data_tf, raw_associate
from ichscan.sources.scp import (
    CT_IMAGE_STORAGE,
    DATASET_MISMATCH,
    INVALID_UID,
    OUT_OF_RESOURCES,
    ScpOptions,
    StoreHandler,
    build_ae,
    decodable_transfer_syntaxes,
    start_server,
    tls_context,
)
from ichscan.synth import generate


class Server:
    """An in-process SCP on a free loopback port, as `ichscan serve-scp` builds it."""

    def __init__(self, store: Path, **options):
        self.received: list[str] = []
        self.opts = ScpOptions(port=0, store=store, **options)
        self.handler = StoreHandler(store, self.received.append)
        self.ae = build_ae(self.opts)
        self.server = start_server(self.ae, (self.opts.bind, 0), evt_handlers=[(evt.EVT_C_STORE, self.handler)], ssl_context=tls_context(self.opts))
        self.port = self.server.server_address[1]

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "store")
    yield srv
    srv.stop()


def scu(ae_title="TESTSCU", contexts=(CT_IMAGE_STORAGE,), transfer_syntaxes=None):
    ae = AE(ae_title=ae_title)
    for context in contexts:
        ae.add_requested_context(context, transfer_syntaxes or decodable_transfer_syntaxes()[:4])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def send(server, ds, **kwargs):
    assoc = scu(**kwargs).associate("127.0.0.1", server.port, ae_title=server.opts.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return status.Status if status else None
    finally:
        assoc.release()


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_store_writes_instance_at_uid_path(server, tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    assert send(server, ds) == 0x0000
    target = server.opts.store / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert target.is_file()
    assert server.received == [str(target)]
    back = pydicom.dcmread(target)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert (back.pixel_array == ds.pixel_array).all()
    assert not [p for p in leftovers(server.opts.store) if p.name.endswith(".tmp")]


def test_several_transfer_syntaxes_from_phantoms(server, tmp_path):
    records = generate(tmp_path / "ph", studies=5, slices=1, seed=3, size=96)
    syntaxes = {r.transfer_syntax_uid for r in records}
    assert len(syntaxes) >= 3
    for record in records:
        ds = pydicom.dcmread(record.path)
        assert send(server, ds, transfer_syntaxes=[ds.file_meta.TransferSyntaxUID]) == 0x0000
        stored = server.opts.store / record.study_instance_uid / record.series_instance_uid / f"{record.sop_instance_uid}.dcm"
        # Stored as received: same transfer syntax, same pixels.
        assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert (pydicom.dcmread(stored).pixel_array == ds.pixel_array).all()


def test_duplicate_keeps_first_and_reports_once(server):
    ds = pydicom.dcmread(CT_SMALL)
    assert send(server, ds) == 0x0000
    assert send(server, ds) == 0x0000
    assert len(server.received) == 1 and server.handler.stats.duplicates == 1


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_path_traversal_uid_refused_and_nothing_written(server, tmp_path, keyword):
    ds = pydicom.dcmread(CT_SMALL)
    setattr(ds, keyword, "../../x")
    assert send(server, ds) == INVALID_UID
    assert leftovers(server.opts.store) == []
    assert not (tmp_path / "x").exists() and server.received == []


def test_mismatched_sop_instance_gets_a900(server, tmp_path, monkeypatch):
    """A file whose meta header names another instance than its data set, sent as is."""
    from pynetdicom import _config

    ds = pydicom.dcmread(CT_SMALL)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"  # the request will carry this
    odd = tmp_path / "odd.dcm"
    ds.save_as(odd, enforce_file_format=False)
    assert pydicom.dcmread(odd).file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5.6.7"
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes unparsed
    assoc = scu(transfer_syntaxes=[ds.file_meta.TransferSyntaxUID]).associate("127.0.0.1", server.port, ae_title="ICHSCAN")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(odd).Status == DATASET_MISMATCH
    finally:
        assoc.release()
    assert leftovers(server.opts.store) == [] and server.received == []


@pytest.mark.parametrize("failing", ["write", "fsync", "rename"])
def test_storage_failure_answers_a700_leaves_nothing_and_keeps_serving(server, monkeypatch, failing):
    real = getattr(os, failing)

    def broken(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # only the SCP's handler thread
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, failing, broken)
    ds = pydicom.dcmread(CT_SMALL)
    assert send(server, ds) == OUT_OF_RESOURCES
    monkeypatch.setattr(os, failing, real)
    assert [p for p in leftovers(server.opts.store)] == []
    assert server.received == []
    assert send(server, ds) == 0x0000  # the same server, still serving
    assert len(server.received) == 1


def test_a_folder_fsync_failing_after_the_rename_is_not_taken_for_a_duplicate(server, monkeypatch):
    """EIO from the folder's fsync after the rename: 0xA700, and the file (complete) stays.
    The re-send must sync the folder and hand the file on to be screened, not answer
    Success as for a duplicate of something already handed on (it never was)."""
    real = os.fsync

    def eio_on_a_folder_with_the_file(fd):
        if threading.current_thread() is not threading.main_thread() and stat.S_ISDIR(os.fstat(fd).st_mode):
            if any(name.endswith(".dcm") and not name.startswith(".") for name in os.listdir(fd)):
                raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", eio_on_a_folder_with_the_file)
    ds = pydicom.dcmread(CT_SMALL)
    assert send(server, ds) == OUT_OF_RESOURCES
    assert server.received == []
    assert send(server, ds) == OUT_OF_RESOURCES  # the folder still does not sync
    monkeypatch.setattr(os, "fsync", real)
    assert send(server, ds) == 0x0000
    stored = [p for p in leftovers(server.opts.store)]
    assert server.received == [str(p) for p in stored] and len(stored) == 1
    assert send(server, ds) == 0x0000  # from now on a plain duplicate
    assert len(server.received) == 1 and server.handler.stats.duplicates == 1


def test_called_and_calling_ae_titles_are_enforced(tmp_path):
    srv = Server(tmp_path / "store", allow_calling=("MODALITY1",))
    try:
        assoc = scu("INTRUDER").associate("127.0.0.1", srv.port, ae_title="ICHSCAN")
        assert assoc.is_rejected
        assoc = scu("MODALITY1").associate("127.0.0.1", srv.port, ae_title="WRONGAE")
        assert assoc.is_rejected
        assoc = scu("MODALITY1").associate("127.0.0.1", srv.port, ae_title="ICHSCAN")
        assert assoc.is_established
        assoc.release()
    finally:
        srv.stop()


def test_association_limit_and_idle_timeout(tmp_path):
    srv = Server(tmp_path / "store", max_associations=1, idle_timeout=1.0)
    try:
        first = scu().associate("127.0.0.1", srv.port, ae_title="ICHSCAN")
        assert first.is_established
        second = scu().associate("127.0.0.1", srv.port, ae_title="ICHSCAN")
        assert not second.is_established  # over the limit
        deadline = time.monotonic() + 15
        while first.is_established and time.monotonic() < deadline:
            time.sleep(0.1)  # an idle peer: the server drops it
        assert not first.is_established
        deadline = time.monotonic() + 15
        while True:  # the server frees the slot once the dropped association's thread ends
            third = scu().associate("127.0.0.1", srv.port, ae_title="ICHSCAN")
            if third.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert third.is_established
        third.release()
    finally:
        srv.stop()


def answer_then_close(sock) -> bytes:
    """What the server sends before it closes the connection (b"" if it sent nothing)."""
    sock.settimeout(30)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.mark.parametrize(("kind", "length"), [(0x04, 0xFFFFFFFF), (0x04, 65536 + 1), (0x05, 2**30)])
def test_a_pdu_announcing_more_than_allowed_is_aborted_at_once(tmp_path, kind, length):
    # pynetdicom buffered whatever followed such a header (up to the 4 GB it announced).
    srv = Server(tmp_path / "store", max_pdu=65536)
    try:
        sock, context = raw_associate(srv.port)
        sock.sendall(struct.pack(">BBI", kind, 0, length) + bytes(1000))
        answer = answer_then_close(sock)
        assert answer[:1] == b"\x07"  # A-ABORT
        assert answer[8:10] == b"\x02\x06"  # by the service provider: invalid PDU parameter value
        sock.close()
        ok, _ = raw_associate(srv.port)  # and it keeps serving
        ok.close()
    finally:
        srv.stop()
    assert leftovers(tmp_path / "store") == []


@pytest.mark.parametrize("established", [False, True], ids=["association-request", "p-data"])
def test_a_peer_trickling_a_pdu_is_dropped_before_it_is_through(tmp_path, caplog, established):
    # Bytes that keep coming, one at a time, never tripped the socket timeout: such a peer
    # held its association slot for as long as it liked (ten of them: every slot).
    srv = Server(tmp_path / "store", idle_timeout=1.0)
    caplog.set_level(logging.WARNING)
    try:
        if established:
            sock, context = raw_associate(srv.port)
            pdu = p_data_tf(context, bytes(600), command=True, last=False)
        else:
            sock, pdu = socket.create_connection(("127.0.0.1", srv.port), timeout=30), associate_rq()
        sent = 0
        try:
            for byte in pdu:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.2)
                sock.setblocking(False)
                try:
                    if sock.recv(4096)[:1] in (b"", b"\x07"):  # closed, or an A-ABORT
                        break
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
        except OSError:
            pass
        assert sent < len(pdu)
        sock.close()
        deadline = time.monotonic() + 30
        while srv.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        srv.stop()
    # One line: ours, or (established) pynetdicom's "Network timeout reached" if it came first.
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_a_peer_gone_mid_data_set_stores_nothing_and_logs_no_traceback(tmp_path, caplog, rst):
    # A reset in the middle of a PDU made pynetdicom log the ConnectionResetError's traceback.
    srv = Server(tmp_path / "store")
    ds = pydicom.dcmread(CT_SMALL)
    try:
        with caplog.at_level(logging.WARNING):
            sock, context = raw_associate(srv.port)
            sock.sendall(p_data_tf(context, bytes(200), command=False, last=False))  # a fragment, not the last
            sock.sendall(struct.pack(">BBI", 0x04, 0, 1000) + bytes(100))  # and a PDU cut short
            if rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            deadline = time.monotonic() + 30
            while srv.ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not srv.ae.active_associations
        assert [r.getMessage() for r in caplog.records if r.exc_info] == []
        assert send(srv, ds) == 0x0000  # and it keeps serving
    finally:
        srv.stop()
    assert srv.received == [str(tmp_path / "store" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm")]


def make_certificates(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_association_and_plain_refused(tmp_path):
    cert, key = make_certificates(tmp_path)
    srv = Server(tmp_path / "store", tls_cert=cert, tls_key=key)
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        client.check_hostname = False
        ae = scu()
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="ICHSCAN", tls_args=(client, None))
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(CT_SMALL)).Status == 0x0000
        assoc.release()
        plain = scu().associate("127.0.0.1", srv.port, ae_title="ICHSCAN")
        assert not plain.is_established
    finally:
        srv.stop()
    assert len(srv.received) == 1


@needs_dcmtk
def test_dcmtk_echoscu_and_storescu(server, tmp_path):
    echo = subprocess.run([str(DCMTK / "echoscu"), "-aec", "ICHSCAN", "127.0.0.1", str(server.port)], capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    records = generate(tmp_path / "ph", studies=5, slices=2, seed=8, size=96)
    # storescu proposes one family of transfer syntaxes per run: send each group with its own.
    option = {
        "1.2.840.10008.1.2": "-xi",
        "1.2.840.10008.1.2.1": "-x=",
        "1.2.840.10008.1.2.1.99": "-xd",
        "1.2.840.10008.1.2.5": "-xr",
        "1.2.840.10008.1.2.4.90": "-xv",
    }
    groups = {}
    for record in records:
        groups.setdefault(str(record.transfer_syntax_uid), []).append(str(record.path))
    assert len(groups) >= 3
    for syntax, paths in groups.items():
        proc = subprocess.run(
            [str(DCMTK / "storescu"), "-aec", "ICHSCAN", option[syntax], "127.0.0.1", str(server.port), *paths],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, (syntax, proc.stderr)
    stored = {Path(p).stem for p in server.received}
    assert stored == {r.sop_instance_uid for r in records}
