"""A DICOMweb STOW-RS receiver that stores exactly as the C-STORE one does.

``POST {base}/studies`` and ``POST {base}/studies/{StudyInstanceUID}`` with a
``multipart/related; type="application/dicom"`` body. The body is streamed through
python-multipart's parser into one spooled temporary file per part (in memory up to
1 MiB, then an unnamed file in the store's folder), under the request and part size
limits; only a body that parsed to its closing boundary is stored, part by part, through
the C-STORE receiver's own :meth:`StoreHandler.store_instance <ichscan.sources.scp.StoreHandler.store_instance>`
(UID checks, durable write, hand-over to the pipeline). The response is sent after the
last part is durably on disk.

The HTTP server is the standard library's ``ThreadingHTTPServer`` (one thread per
connection): the work per request is the durable write, which the C-STORE path already
does per association thread, so a framework would add a dependency and nothing else.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO

from pydicom.dataset import Dataset

from ichscan.dicom import DEFAULT_LIMITS, Refused, is_valid_uid, parse_dicom_bytes
from ichscan.sources.scp import (
    CANNOT_UNDERSTAND,
    CT_IMAGE_STORAGE,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    STOW,
    SUCCESS,
    StoreHandler,
    UnreadableElement,
    decodable_transfer_syntaxes,
    read_uids,
)

log = logging.getLogger(__name__)

# STOW-RS failure reasons (PS3.18 10.5.3: the PS3.4 status codes) beyond the C-STORE ones.
SOP_CLASS_NOT_SUPPORTED = 0x0122  # not CT Image Storage (without --accept-all-storage)
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # no installed decoder reads it (C-STORE would not negotiate it)
STUDY_UID_MISMATCH = 0xC409  # the part's StudyInstanceUID is not the one in the URL (as dcm4chee-arc answers)

#: A part is kept in memory up to this size, then spooled to an unnamed file.
SPOOL_IN_MEMORY = 1024 * 1024
READ_SIZE = 64 * 1024
#: Longest multipart boundary accepted: RFC 2046 allows 70 characters; python-multipart
#: refuses over 256 (in its constructor, with an exception of its own).
MAX_BOUNDARY = 256


@dataclass
class StowOptions:
    """How the STOW-RS receiver listens and what it accepts.

    ``max_part_bytes`` is the decoder's file size cap (a larger instance could never be
    screened); ``max_request_bytes`` bounds one request, whatever its parts.
    """

    port: int = 8042
    bind: str = "127.0.0.1"
    base: str = "/dicom-web"
    token_file: Path | None = None
    max_request_bytes: int = 2 * 1024**3
    max_part_bytes: int = DEFAULT_LIMITS.max_file_bytes
    idle_timeout: float = 60.0
    accept_all_storage: bool = False


def load_tokens(path: Path) -> tuple[bytes, ...]:
    """The bearer tokens in ``path``: one a line; blank lines and ``#`` comments ignored."""
    tokens = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(line.encode("utf-8"))
    if not tokens:
        raise ValueError(f"{path} holds no token")
    return tuple(tokens)


def token_allowed(given: bytes, tokens: tuple[bytes, ...]) -> bool:
    """Compare ``given`` with every allowed token in constant time (no early exit)."""
    allowed = False
    for token in tokens:
        allowed |= hmac.compare_digest(given, token)
    return allowed


@dataclass
class _Part:
    file: IO[bytes]
    headers: dict[str, str]
    size: int = 0
    too_large: bool = False


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class StowServer(ThreadingHTTPServer):
    """The listening server; :func:`start_stow_server` builds and starts it."""

    daemon_threads = True

    def __init__(self, opts: StowOptions, handler: StoreHandler, ssl_context: ssl.SSLContext | None, tokens: tuple[bytes, ...]):
        self.opts = opts
        self.store_handler = handler
        self.tokens = tokens
        self.base = "/" + opts.base.strip("/") if opts.base.strip("/") else ""
        self.syntaxes = {str(uid) for uid in decodable_transfer_syntaxes()}
        self.busy = 0
        self._busy_lock = threading.Lock()
        super().__init__((opts.bind, opts.port), StowRequestHandler)
        if ssl_context is not None:
            # The handshake happens in the connection's own thread (StowRequestHandler.setup),
            # so a slow or silent client cannot hold up the accept loop.
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self.tls = ssl_context is not None

    def handle_error(self, request, client_address) -> None:
        import sys

        exc = sys.exc_info()[1]
        log.warning("STOW-RS connection from %s failed: %s: %s", client_address[0], type(exc).__name__, exc)

    def working(self, delta: int) -> None:
        with self._busy_lock:
            self.busy += delta

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}{self.base}"


def start_stow_server(opts: StowOptions, handler: StoreHandler, ssl_context: ssl.SSLContext | None = None) -> StowServer:
    """Listen on ``opts.bind:opts.port`` and serve in a background thread.

    Raises
    ------
    OSError
        The port cannot be bound; ``ValueError``: the token file names no token.
    """
    tokens = load_tokens(opts.token_file) if opts.token_file is not None else ()
    server = StowServer(opts, handler, ssl_context, tokens)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="ichscan-stow", daemon=True).start()
    return server


class StowRequestHandler(BaseHTTPRequestHandler):
    server: StowServer
    protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as DICOMweb clients expect
    server_version = "ichscan"
    sys_version = ""

    def setup(self) -> None:
        self.timeout = self.server.opts.idle_timeout
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("STOW-RS %s: " + format, self.client_address[0], *args)

    # Requests other than POST
    def do_GET(self) -> None:
        self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "only STOW-RS (POST) is served", {"Allow": "POST"})

    do_PUT = do_DELETE = do_HEAD = do_GET

    def handle_expect_100(self) -> bool:
        # Answer a request we would refuse before the client sends its body.
        try:
            self._check_headers()
        except _BadRequest as exc:
            self._refuse(exc.status, str(exc))
            return False
        return super().handle_expect_100()

    def do_POST(self) -> None:
        try:
            study, boundary = self._check_headers()
            parts = self._read_parts(boundary)
        except _BadRequest as exc:
            self._refuse(exc.status, str(exc))
            return
        self.server.working(+1)
        try:
            self._store(parts, study)
        finally:
            self.server.working(-1)
            for part in parts:
                part.file.close()

    def _check_headers(self) -> tuple[str | None, bytes]:
        """The study UID in the URL and the multipart boundary, or :class:`_BadRequest`."""
        if self.server.tokens:
            scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                raise _BadRequest(HTTPStatus.UNAUTHORIZED, "a bearer token is required")
            if not token_allowed(given.strip().encode("utf-8", "replace"), self.server.tokens):
                raise _BadRequest(HTTPStatus.UNAUTHORIZED, "the bearer token is not valid")
        path = self.path.split("?", 1)[0]
        studies = self.server.base + "/studies"
        if path.rstrip("/") == studies:
            study = None
        elif path.startswith(studies + "/") and "/" not in path[len(studies) + 1 :].rstrip("/"):
            study = path[len(studies) + 1 :].rstrip("/")
            if not is_valid_uid(study):
                raise _BadRequest(HTTPStatus.BAD_REQUEST, "the study UID in the URL is not a dotted-decimal UID of at most 64 characters")
        else:
            raise _BadRequest(HTTPStatus.NOT_FOUND, f"STOW-RS is served at {studies} and {studies}/{{StudyInstanceUID}}")
        from python_multipart.multipart import parse_options_header

        media, params = parse_options_header(self.headers.get("Content-Type") or "")
        part_type = params.get(b"type", b"application/dicom").strip(b'"').lower()
        if media.lower() != b"multipart/related" or part_type != b"application/dicom":
            raise _BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, 'the body must be multipart/related; type="application/dicom"')
        boundary = params.get(b"boundary")
        if not boundary:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "the Content-Type has no boundary")
        if len(boundary) > MAX_BOUNDARY:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, f"the multipart boundary is {len(boundary)} characters, over {MAX_BOUNDARY}")
        encoding = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        if encoding not in ("", "chunked"):
            raise _BadRequest(HTTPStatus.NOT_IMPLEMENTED, f"transfer encoding {encoding!r} is not supported")
        if not encoding:
            length = self.headers.get("Content-Length")
            if length is None or not length.strip().isdigit():
                raise _BadRequest(HTTPStatus.LENGTH_REQUIRED, "a Content-Length or chunked transfer encoding is required")
            if int(length) > self.server.opts.max_request_bytes:
                raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request is over the {self.server.opts.max_request_bytes} byte limit")
        return study, boundary

    def _body(self) -> Iterator[bytes]:
        """The request body in pieces, de-chunked, never more than the request limit."""
        limit = self.server.opts.max_request_bytes
        if (self.headers.get("Transfer-Encoding") or "").strip().lower() == "chunked":
            total = 0
            while True:
                line = self.rfile.readline(1024)
                if not line.endswith(b"\n"):
                    raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed chunked body")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed chunk size") from None
                if size == 0:
                    while self.rfile.readline(1024).strip():  # trailer fields, then the empty line
                        pass
                    return
                total += size
                if total > limit:
                    raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request is over the {limit} byte limit")
                while size:
                    piece = self.rfile.read(min(size, READ_SIZE))
                    if not piece:
                        raise _BadRequest(HTTPStatus.BAD_REQUEST, "the body ended inside a chunk")
                    size -= len(piece)
                    yield piece
                if self.rfile.readline(3).strip():
                    raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed chunked body")
        else:
            left = int(self.headers["Content-Length"])
            while left:
                piece = self.rfile.read(min(left, READ_SIZE))
                if not piece:
                    raise _BadRequest(HTTPStatus.BAD_REQUEST, f"the body ended {left} bytes short of its Content-Length")
                left -= len(piece)
                yield piece

    def _read_parts(self, boundary: bytes) -> list[_Part]:
        """Parse the whole body into spooled parts; a body that does not end with its
        closing boundary is a bad request (nothing of it is stored)."""
        from python_multipart.exceptions import FormParserError
        from python_multipart.multipart import MultipartParser

        max_part = self.server.opts.max_part_bytes
        parts: list[_Part] = []
        header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}
        headers: dict[str, str] = {}
        ended = []

        def on_part_begin() -> None:
            headers.clear()

        def on_header_field(data: bytes, start: int, end: int) -> None:
            header["field"] += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            header["value"] += data[start:end]

        def on_header_end() -> None:
            headers[header["field"].decode("latin-1").strip().lower()] = header["value"].decode("latin-1").strip()
            header["field"].clear()
            header["value"].clear()

        def on_headers_finished() -> None:
            parts.append(_Part(tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, dir=self.server.store_handler.store), dict(headers)))

        def on_part_data(data: bytes, start: int, end: int) -> None:
            part = parts[-1]
            part.size += end - start
            if part.size > max_part:
                part.too_large = True  # keep parsing (the response names it), stop keeping it
                part.file.truncate(0)
            elif not part.too_large:
                part.file.write(data[start:end])

        callbacks = {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_end": lambda: ended.append(True),
        }
        try:
            parser = MultipartParser(boundary, callbacks)  # it checks the boundary too
            for piece in self._body():
                parser.write(piece)
            parser.finalize()
        except FormParserError as exc:  # MultipartParseError and the constructor's refusals
            for part in parts:
                part.file.close()
            raise _BadRequest(HTTPStatus.BAD_REQUEST, f"malformed multipart body: {exc}") from None
        except BaseException:
            for part in parts:
                part.file.close()
            raise
        if not ended or not parts:
            for part in parts:
                part.file.close()
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "the multipart body has no parts or no closing boundary")
        return parts

    def _store(self, parts: list[_Part], study: str | None) -> None:
        sender = f"STOW-RS from {self.client_address[0]}"
        stored, failed = [], []
        for number, part in enumerate(parts, 1):
            sop_class, sop_instance, status = self._store_part(part, study, f"{sender} (part {number})")
            item = Dataset()
            if is_valid_uid(sop_class):
                item.ReferencedSOPClassUID = sop_class
            if is_valid_uid(sop_instance):
                item.ReferencedSOPInstanceUID = sop_instance
            if status == SUCCESS:
                stored.append(item)
            else:
                item.FailureReason = status
                failed.append(item)
        response = Dataset()  # no RetrieveURL: nothing is served back for retrieval
        if failed:
            response.FailedSOPSequence = failed
        if stored:
            response.ReferencedSOPSequence = stored
        body = json.dumps(response.to_json_dict()).encode()
        status = HTTPStatus.OK if not failed else HTTPStatus.ACCEPTED if stored else HTTPStatus.CONFLICT
        log.info("%s: %d stored, %d failed (HTTP %d)", sender, len(stored), len(failed), status)
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _store_part(self, part: _Part, study: str | None, sender: str) -> tuple[str, str, int]:
        """``(SOPClassUID, SOPInstanceUID, status)`` of one part, stored when it passes
        the same checks a C-STORE gets (the SOP class and transfer syntax ones are what
        C-STORE's negotiation does)."""
        from python_multipart.multipart import parse_options_header

        def refused(reason: str, status: int, sop_class: str = "", sop_instance: str = "") -> tuple[str, str, int]:
            self.server.store_handler.stats.add("refused", STOW)
            log.warning("%s refused: %s (nothing written)", sender, reason)
            return sop_class, sop_instance, status

        if part.too_large:
            return refused(f"{part.size} bytes, over the {self.server.opts.max_part_bytes} byte limit", OUT_OF_RESOURCES)
        media, _ = parse_options_header(part.headers.get("content-type", "application/dicom"))
        if media.lower() != b"application/dicom":
            return refused(f"a part of type {media.decode('latin-1')[:80]!r}", CANNOT_UNDERSTAND)
        part.file.seek(0)
        data = part.file.read()
        try:
            ds = parse_dicom_bytes(data)
        except Refused as exc:
            return refused(str(exc), CANNOT_UNDERSTAND)
        meta = getattr(ds, "file_meta", None)
        try:
            sop_class, sop_instance, part_study = read_uids(ds, "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")
            meta_class, meta_instance, syntax = read_uids(meta or {}, "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
        except UnreadableElement as exc:
            return refused(str(exc), CANNOT_UNDERSTAND)
        if meta is None or "TransferSyntaxUID" not in meta:
            return refused("not a DICOM file (no file meta information)", CANNOT_UNDERSTAND, sop_class, sop_instance)
        if meta_class != sop_class or meta_instance != sop_instance:
            return refused("the file meta information names another instance than its data set", DATASET_MISMATCH, sop_class, sop_instance)
        if sop_class != CT_IMAGE_STORAGE and not self.server.opts.accept_all_storage:
            return refused(f"SOP class {sop_class[:70]} is not CT Image Storage", SOP_CLASS_NOT_SUPPORTED, sop_class, sop_instance)
        if syntax not in self.server.syntaxes:
            return refused(f"transfer syntax {syntax[:70]} cannot be decoded here", TRANSFER_SYNTAX_NOT_SUPPORTED, sop_class, sop_instance)
        if study is not None and part_study != study:
            return refused(f"StudyInstanceUID {part_study[:80]!r} is not the URL's {study}", STUDY_UID_MISMATCH, sop_class, sop_instance)
        return sop_class, sop_instance, self.server.store_handler.store_instance(ds, lambda: data, sender, STOW)

    def _refuse(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        """Answer the whole request with ``status``; the connection is closed (its body,
        if any, is not read)."""
        log.warning("STOW-RS from %s: %d %s (%s)", self.client_address[0], status, status.phrase, message)
        body = (message + "\n").encode()
        self.send_response(status)
        if status == HTTPStatus.UNAUTHORIZED:
            error = ', error="invalid_token"' if "not valid" in message else ""
            self.send_header("WWW-Authenticate", f'Bearer realm="ichscan"{error}')
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True
