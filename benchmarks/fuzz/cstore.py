#!/usr/bin/env python3
"""Fuzz the C-STORE receiver's handler: any data set bytes -> a C-STORE status, never an exception.

The input is what pynetdicom hands the handler: the first byte picks the presentation
context's transfer syntax (an index into the syntaxes the receiver accepts), the rest is the
data set as the peer sent it (P-DATA fragments joined, no file meta). The harness builds a
real ``pynetdicom.events.Event`` around it (pynetdicom decodes the data set lazily, on first
access, inside the handler) and calls :class:`~ichscan.sources.scp.StoreHandler` as
``serve-scp`` binds it to ``EVT_C_STORE``, storing into a scratch folder. The request's
affected SOP class and instance are taken from the data set when it has usable ones (a
well-behaved peer), so the fuzzer reaches the store path. Run::

    python benchmarks/fuzz/cstore.py CORPUS_DIR [SEED_DIR] -timeout=5 -rss_limit_mb=1024
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from types import SimpleNamespace

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Finding, accepted_syntaxes, check_log_calls, empty_folder, scratch  # noqa: E402

with atheris.instrument_imports(include=["ichscan", "pydicom", "pynetdicom"]):
    from pydicom.uid import UID
    from pynetdicom import evt
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import decode
    from pynetdicom.events import Event
    from pynetdicom.presentation import PresentationContextTuple

    from ichscan.sources.scp import (
        CANNOT_UNDERSTAND,
        CT_IMAGE_STORAGE,
        DATASET_MISMATCH,
        INVALID_UID,
        OUT_OF_RESOURCES,
        SUCCESS,
        StoreHandler,
    )

STATUSES = {SUCCESS, OUT_OF_RESOURCES, DATASET_MISMATCH, CANNOT_UNDERSTAND, INVALID_UID}
SYNTAXES = [UID(uid) for uid in accepted_syntaxes()]
STORE = scratch("cstore")
STORED: list[str] = []
HANDLER = StoreHandler(STORE, STORED.append)
ASSOC = SimpleNamespace(requestor=SimpleNamespace(ae_title="FUZZ", address="127.0.0.1"))


def request_uids(data: bytes, syntax: UID) -> tuple[str, str]:
    """The SOP class and instance a consistent peer would put in the C-STORE request."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = decode(io.BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
            return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - the handler meets the same data set and must cope
        return CT_IMAGE_STORAGE, "1.2.3.4"


def store_event(syntax: UID, data: bytes, sop_class: str, sop_instance: str) -> Event:
    """A C-STORE request event as pynetdicom builds it for the handler."""
    request = C_STORE()
    request.MessageID = 1
    request.Priority = 2
    try:
        request.AffectedSOPClassUID = sop_class
        request.AffectedSOPInstanceUID = sop_instance
    except (TypeError, ValueError):  # pynetdicom refuses such a request before any handler
        request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CT_IMAGE_STORAGE, "1.2.3.4"
    request.DataSet = io.BytesIO(data)
    context = PresentationContextTuple(1, UID(CT_IMAGE_STORAGE), syntax)
    return Event(ASSOC, evt.EVT_C_STORE, {"request": request, "context": context})


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    syntax, dataset = SYNTAXES[data[0] % len(SYNTAXES)], data[1:]
    event = store_event(syntax, dataset, *request_uids(dataset, syntax))
    STORED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = HANDLER(event)
    if status not in STATUSES:
        raise Finding(f"status {status!r} is not a C-STORE status the handler documents")
    if status == SUCCESS and STORED:
        path = os.path.realpath(STORED[0])
        if os.path.commonpath([path, os.path.realpath(STORE)]) != os.path.realpath(STORE):
            raise Finding(f"stored outside the store: {path}")
        with open(path, "rb") as fh:
            if fh.read() != event.encoded_dataset(include_meta=True):
                raise Finding("the stored file is not the instance as received")
    if len(os.listdir(STORE)) > 200:  # mutated UIDs fill the store: start again
        empty_folder(STORE)
        HANDLER._dirs_made.clear()


if __name__ == "__main__":
    check_log_calls()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
