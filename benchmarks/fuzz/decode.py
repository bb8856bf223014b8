#!/usr/bin/env python3
"""Fuzz the decoder: any bytes as a file -> exactly one row (ok, skipped or error with a reason).

``decode_instance`` must never raise (dicom.py promises it); ``decode_many`` is called as the
decode worker calls it on the CPU (resize to 224 with framing, the default rules, the display
image for overlays). Run::

    python benchmarks/fuzz/decode.py CORPUS_DIR [SEED_DIR] -timeout=5 -rss_limit_mb=1024
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Finding, check_reason, scratch  # noqa: E402

import numpy as np  # noqa: E402 - not instrumented: only ours and pydicom's code guide the fuzzer

with atheris.instrument_imports(include=["ichscan", "pydicom", "pylibjpeg", "libjpeg", "openjpeg", "rle"]):
    from ichscan.dicom import decode_instance, decode_many
    from ichscan.records import DecodedSlice, Status
    from ichscan.rules import DEFAULT_RULES

FOLDER = scratch("decode")
PATH = os.path.join(FOLDER, "input.dcm")


def check_row(result: DecodedSlice, what: str, resized: int | None = None) -> None:
    if not isinstance(result, DecodedSlice) or result.status not in (Status.OK, Status.SKIPPED, Status.ERROR):
        raise Finding(f"{what}: not a row: {result!r}")
    if result.status != Status.OK:
        check_reason(result.error, f"{what} ({result.status})")
        if result.image is not None:
            raise Finding(f"{what}: a {result.status} row with pixels")
        return
    if result.error or result.image is None:
        raise Finding(f"{what}: an ok row with a reason ({result.error!r}) or without pixels")
    pixels = result.image.pixels
    if resized is not None and (pixels.shape != (resized, resized) or pixels.dtype != np.float32):
        raise Finding(f"{what}: resized pixels of shape {pixels.shape} and type {pixels.dtype}")
    if resized is None and (pixels.ndim != 2 or pixels.dtype.kind not in "iu"):
        raise Finding(f"{what}: stored pixels of shape {pixels.shape} and type {pixels.dtype}")


def TestOneInput(data: bytes) -> None:
    with open(PATH, "wb") as fh:
        fh.write(data)
    # Deepest reach: any modality, no rules (a mutated Modality must not hide the pixel decoders).
    check_row(decode_instance(PATH, any_modality=True), "decode_instance")
    # As the decode worker on the CPU calls it.
    rows = decode_many([PATH], resize_to=224, display=True, crop=True, rules=DEFAULT_RULES)
    if len(rows) != 1:
        raise Finding(f"decode_many gave {len(rows)} rows for one file")
    check_row(rows[0], "decode_many", resized=224)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
