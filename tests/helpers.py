"""Plain helpers and constants the test files share (one copy here, not one per file).

Import them as ``from helpers import ...``: pytest puts ``tests/`` on ``sys.path`` (rootdir-based
import, no ``__init__.py``), as it does for ``from conftest import ...``. Fixtures, which have
set-up and tear-down, live in ``conftest.py``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The console script of the environment running the tests (this worktree's venv).
ICHSCAN = Path(sys.executable).with_name("ichscan")

#: pydicom's bundled test files (listed from disk, never downloaded).
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT_SMALL = TEST_FILES / "CT_small.dcm"
MR_SMALL = TEST_FILES / "MR_small.dcm"

#: External DICOM tools, as .ci/run installs them.
DCMTK = Path("/usr/bin")
STORESCP = DCMTK / "storescp"
DCIODVFY = Path("/usr/bin/dciodvfy")
ORTHANC = Path("/usr/sbin/Orthanc")
needs_dcmtk = pytest.mark.skipif(not (DCMTK / "storescu").exists(), reason="dcmtk is not installed (.ci/run installs it)")
needs_storescp = pytest.mark.skipif(not STORESCP.exists(), reason="dcmtk is not installed (.ci/run installs it)")
needs_dciodvfy = pytest.mark.skipif(
    not os.access(DCIODVFY, os.X_OK), reason="dicom3tools' dciodvfy is not installed (apt-get install dicom3tools)"
)
needs_orthanc = pytest.mark.skipif(not ORTHANC.exists(), reason="Orthanc is not installed (.ci/run installs it)")
#: Orthanc's DICOMweb plugin, as the Debian package orthanc-dicomweb installs it.
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
needs_orthanc_dicomweb = pytest.mark.skipif(
    not (ORTHANC.exists() and ORTHANC_DICOMWEB.exists()), reason="Orthanc's DICOMweb plugin is not installed (.ci/run installs orthanc-dicomweb)"
)

#: A file name that is not valid UTF-8, and one for a file that is not DICOM either.
ODD = b"bad\xff.dcm"
ODD_JUNK = b"junk\xfe.dcm"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something accepts connections on ``127.0.0.1:port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(condition, timeout=60.0, what="condition", proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``condition`` until it returns something true, and return that.

    Fails the test after ``timeout`` seconds, or at once when ``proc`` (if given) has exited;
    either failure quotes ``log`` (the process's stderr file) when given.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}: {log.read_text() if log else ''}")
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{log.read_text()[-4000:]}" if log else ""))


def read_csv_header(path, missing_ok: bool = False) -> tuple[list[str] | None, list[dict]]:
    """``(header, rows)`` of a UTF-8 CSV (decoded strictly); ``(None, [])`` for a missing file when ``missing_ok``."""
    if missing_ok and not Path(path).exists():
        return None, []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def read_csv(path, missing_ok: bool = False) -> list[dict]:
    """The rows of a UTF-8 CSV as dicts; ``[]`` for a missing file when ``missing_ok``."""
    return read_csv_header(path, missing_ok)[1]


def dicom_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` but hidden ones, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def copy_ct_small(folder: Path, n: int) -> list[str]:
    """``n`` copies of pydicom's CT_small.dcm in ``folder`` (made if missing), named 000.dcm...; their sorted paths."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shutil.copy(CT_SMALL, folder / f"{i:03d}.dcm")
    return sorted(str(p) for p in folder.iterdir())


def rename_to_odd(path, name: bytes = ODD) -> str:
    """Rename ``path`` to ``name`` (not UTF-8) in its folder; returns the new path as Python sees it
    (with a surrogate). Skips the test on a file system that only takes UTF-8 names."""
    target = os.path.join(os.fsencode(Path(path).parent), name)
    try:
        os.rename(os.fsencode(path), target)
    except OSError as exc:
        pytest.skip(f"cannot create a file named {name!r} here: {exc}")
    return os.fsdecode(target)


def escaped(path: str) -> str:
    """``path`` as ichscan writes it to UTF-8 outputs: undecodable bytes backslash-escaped."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def run_ichscan(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``ichscan *args`` to completion, output captured as text."""
    return subprocess.run([str(ICHSCAN), *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def start_ichscan(log: Path, *args: str, **kwargs) -> subprocess.Popen:
    """``ichscan *args`` in the background, stderr to the file ``log`` (not a pipe: after a SIGKILL,
    decode workers may hold a pipe open for a moment), stdout discarded."""
    with open(log, "w") as fh:
        return subprocess.Popen([str(ICHSCAN), *args], stdout=subprocess.DEVNULL, stderr=fh, **kwargs)


def save(ds: pydicom.Dataset, path: Path) -> Path:
    """Write ``ds`` as a proper DICOM file (preamble and file meta) at ``path``; returns ``path``."""
    ds.save_as(path, enforce_file_format=True)
    return path


#: The Content-Type of a STOW-RS request built by :func:`multipart`.
RELATED = 'multipart/related; type="application/dicom"; boundary=ICHSCANBOUNDARY'

#: The STOW-RS fuzz input (benchmarks/fuzz/stow.py; seeds.py writes it, the regression tests
#: replay it): the first byte's bits. Without STOW_CONTENT_TYPE the Content-Type is RELATED;
#: with it, the line up to the first newline is the Content-Type. STOW_STUDY_URL: a line with
#: the study UID for /studies/{uid}. STOW_CHUNKED: the body is sent as it is with
#: ``Transfer-Encoding: chunked`` (the input holds the chunk framing); otherwise it gets a
#: Content-Length.
STOW_CONTENT_TYPE, STOW_STUDY_URL, STOW_CHUNKED = 1, 2, 4


def stow_fuzz_request(data: bytes) -> bytes:
    """The HTTP request a STOW-RS fuzz input describes (see :data:`STOW_CONTENT_TYPE`)."""
    flags, rest = (data[0], data[1:]) if data else (0, b"")
    content_type = RELATED.encode()
    if flags & STOW_CONTENT_TYPE:
        content_type, _, rest = rest.partition(b"\n")
    path = b"/dicom-web/studies"
    if flags & STOW_STUDY_URL:
        study, _, rest = rest.partition(b"\n")
        path += b"/" + study
    framing = b"Transfer-Encoding: chunked" if flags & STOW_CHUNKED else b"Content-Length: %d" % len(rest)
    return b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: %s\r\n%s\r\n\r\n" % (path, content_type, framing) + rest


def multipart(*parts: bytes, part_type: str = "application/dicom") -> bytes:
    """A STOW-RS request body (Content-Type :data:`RELATED`) with these parts."""
    body = b""
    for part in parts:
        body += b"--ICHSCANBOUNDARY\r\nContent-Type: " + part_type.encode() + b"\r\n\r\n" + part + b"\r\n"
    return body + b"--ICHSCANBOUNDARY--\r\n"


class ServerProcess:
    """``ichscan serve-scp`` as a subprocess on ``port`` (C-STORE), storing under ``work/store``,
    rows in ``work/results.csv``; ``extra`` options are passed on. Waits until it listens."""

    def __init__(self, work: Path, port: int, *extra: str):
        self.work, self.port = work, port
        self.out = work / "results.csv"
        self.store = work / "store"
        work.mkdir(parents=True, exist_ok=True)
        self.log = work / f"serve-{time.monotonic_ns()}.log"
        self.proc = start_ichscan(
            self.log, "serve-scp", "--port", str(port), "--store", str(self.store), "--out", str(self.out), "--overlays-for", "none", "--study-timeout", "1", "--max-latency", "0.2", *extra
        )
        wait_for(lambda: port_open(port), 120, "the server to listen", self.proc, self.log)

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)


class Orthanc:
    """A real Orthanc on loopback with a generated configuration.

    ``ichscan_port``: a DICOM modality "ichscan" (AE ICHSCAN) it can send to;
    ``dicomweb``: load the DICOMweb plugin (root ``/dicom-web/``, at :attr:`dicomweb_url`);
    ``http_port``, ``dicom_port``: reuse ports (a restarted Orthanc at the same URL and AE address);
    ``extra``: more configuration entries (e.g. ``LuaScripts``), added to the generated ones.
    """

    def __init__(
        self,
        work: Path,
        ichscan_port: int | None = None,
        *,
        dicomweb: bool = False,
        http_port: int | None = None,
        dicom_port: int | None = None,
        extra: dict | None = None,
    ):
        self.http_port, self.dicom_port = http_port or free_port(), dicom_port or free_port()
        work.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ichscan-test",
            "StorageDirectory": str(work / "db"),
            "IndexDirectory": str(work / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "Plugins": [str(ORTHANC_DICOMWEB)] if dicomweb else [],
            "DicomModalities": {"ichscan": ["ICHSCAN", "127.0.0.1", ichscan_port]} if ichscan_port else {},
        }
        if dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        config.update(extra or {})
        path = work / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = work / "orthanc.log"
        with open(self.log, "a") as fh:
            self.proc = subprocess.Popen([str(ORTHANC), str(path)], stdout=fh, stderr=subprocess.STDOUT)
        wait_for(self._up, 60, "Orthanc to start", self.proc, self.log)

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def _up(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
        return json.loads(data) if resp.headers.get_content_type() in ("application/json", "application/dicom+json") else data

    def get(self, path: str):
        return self.request("GET", path)

    def upload(self, path: Path) -> dict:
        return self.request("POST", "/instances", path.read_bytes(), "application/dicom")

    def send_to_ichscan(self, resources: list[str]) -> None:
        body = json.dumps({"Resources": resources, "Synchronous": True}).encode()
        self.request("POST", "/modalities/ichscan/store", body)

    def instances_of_class(self, study_id: str, sop_class: str) -> list[pydicom.Dataset]:
        out = []
        for instance in self.get(f"/studies/{study_id}/instances"):
            tags = self.get(f"/instances/{instance['ID']}/simplified-tags")
            if tags.get("SOPClassUID") == sop_class:
                raw = self.request("GET", f"/instances/{instance['ID']}/file")
                out.append(pydicom.dcmread(io.BytesIO(raw)))
        return out

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Receiver:
    """A webhook receiver on 127.0.0.1: answers each request as ``plan`` says (first entry
    first; then ``then``): an HTTP status, or ``("stall", seconds)`` before a 200."""

    def __init__(self, plan=(), then: int = 200):
        self.plan = list(plan)
        self.then = then
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append({"headers": dict(self.headers), "body": body, "path": self.path})
                    step = receiver.plan.pop(0) if receiver.plan else receiver.then
                if isinstance(step, tuple):
                    time.sleep(step[1])
                    step = 200
                self.send_response(step)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def event_ids(self) -> list[str]:
        with self.lock:
            return [r["headers"]["X-Ichscan-Event-Id"] for r in self.requests]

    def bodies(self) -> list[dict]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# Raw DICOM upper-layer PDUs (PS3.8 9.3), for peers that misbehave on purpose: the fault
# scenarios (benchmarks/faults/network.py) and the receiver's regression tests.
CT_IMAGE_STORAGE_UID = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE_UID = "1.2.840.10008.1.2.1"


def _pdu_item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(called: str = "ICHSCAN", calling: str = "ABUSER", max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing CT Image Storage in Explicit VR Little Endian (context 1)."""
    context = _pdu_item(0x20, bytes([1, 0, 0, 0]) + _pdu_item(0x30, CT_IMAGE_STORAGE_UID.encode()) + _pdu_item(0x40, EXPLICIT_LE_UID.encode()))
    user = _pdu_item(0x50, _pdu_item(0x51, struct.pack(">I", max_pdu)) + _pdu_item(0x52, b"1.2.826.0.1.3680043.10.1717"))
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
    body += _pdu_item(0x10, b"1.2.840.10008.3.1.1.1") + context + user
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data_tf(context_id: int, data: bytes, *, command: bool, last: bool) -> bytes:
    """A P-DATA-TF PDU holding one PDV (a command or data set fragment)."""
    pdv = bytes([context_id, (1 if command else 0) | (2 if last else 0)]) + data
    return struct.pack(">BBI", 0x04, 0, 4 + len(pdv)) + struct.pack(">I", len(pdv)) + pdv


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed by the peer after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU from ``sock``: its type and its body."""
    kind, _, length = struct.unpack(">BBI", recv_exact(sock, 6))
    return kind, recv_exact(sock, length)


def raw_associate(port: int, calling: str = "ABUSER", called: str = "ICHSCAN") -> tuple[socket.socket, int]:
    """A plain socket with an association established (by :func:`associate_rq`) and the
    accepted presentation context's id."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(associate_rq(called, calling))
    kind, body = read_pdu(sock)
    items = body[68:] if kind == 0x02 else b""
    while items:
        item_type, _, length = struct.unpack(">BBH", items[:4])
        if item_type == 0x21 and items[6] == 0:  # a presentation context, accepted
            return sock, items[4]
        items = items[4 + length :]
    sock.close()
    raise ConnectionError(f"association not accepted (PDU type 0x{kind:02X})")
