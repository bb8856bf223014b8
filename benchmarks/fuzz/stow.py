#!/usr/bin/env python3
"""Fuzz the STOW-RS receiver: any request body (and Content-Type) -> an HTTP response, never an exception.

The harness sends one HTTP request through ``StowRequestHandler.handle_one_request`` (the
standard library's request-line and header parsing, then ``do_POST``: header checks,
de-chunking, python-multipart, each part through ``parse_dicom_bytes`` and the C-STORE
receiver's ``store_instance``), reading from and writing to memory instead of a socket.
The input's first byte says how (``tests/helpers.py``: ``STOW_CONTENT_TYPE``, ``STOW_STUDY_URL``, ``STOW_CHUNKED``); the
rest is the optional Content-Type line, the optional study UID line, then the body. A
bug is an exception out of the handler (the server would drop the connection without an
answer), no response, or a status the receiver does not document. Run::

    python benchmarks/fuzz/stow.py CORPUS_DIR [SEED_DIR] -timeout=5 -rss_limit_mb=1024
"""

from __future__ import annotations

import io
import json
import os
import sys
import warnings

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Finding, check_log_calls, empty_folder, scratch  # noqa: E402
from helpers import stow_fuzz_request as request_bytes  # noqa: E402 - the input layout, shared with the regression tests

with atheris.instrument_imports(include=["ichscan", "pydicom", "python_multipart"]):
    from ichscan.sources.scp import StoreHandler
    from ichscan.sources.stow import StowOptions, StowRequestHandler, StowServer

#: What the receiver answers: results (200, 202, 409) and refusals of the whole request.
STATUSES = {200, 202, 409, 400, 401, 404, 405, 411, 413, 415, 501}
STORE = scratch("stow")
STORED: list[str] = []
# A real server object, bound to a free loopback port but never serving: the handler reads
# its options, store handler and accepted transfer syntaxes from it.
SERVER = StowServer(StowOptions(port=0), StoreHandler(STORE, STORED.append), None, ())


def respond(request: bytes) -> bytes:
    """What the receiver writes back for ``request``."""
    handler = StowRequestHandler.__new__(StowRequestHandler)  # no socket: setup() and handle() skipped
    handler.server, handler.client_address, handler.request = SERVER, ("127.0.0.1", 40000), None
    handler.rfile, handler.wfile = io.BytesIO(request), io.BytesIO()
    handler.close_connection = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handler.handle_one_request()
    return handler.wfile.getvalue()


def TestOneInput(data: bytes) -> None:
    STORED.clear()
    response = respond(request_bytes(data))
    status_line, _, rest = response.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise Finding(f"no HTTP response: {response[:200]!r}")
    status = int(parts[1])
    if status not in STATUSES:
        raise Finding(f"HTTP {status} is not a status the receiver documents")
    if status in (200, 202, 409):
        body = rest.partition(b"\r\n\r\n")[2]
        answer = json.loads(body)  # a DICOM JSON response; not JSON is a finding
        if not isinstance(answer, dict) or not ({"00081198", "00081199"} & answer.keys()):
            raise Finding(f"HTTP {status} without a FailedSOPSequence or ReferencedSOPSequence: {body[:200]!r}")
    if len(os.listdir(STORE)) > 200:  # mutated UIDs fill the store: start again
        empty_folder(STORE)
        SERVER.store_handler._dirs_made.clear()


if __name__ == "__main__":
    check_log_calls()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
