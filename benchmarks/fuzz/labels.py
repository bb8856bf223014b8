#!/usr/bin/env python3
"""Fuzz the RSNA labels reader: any bytes as a labels CSV -> a mapping or a one-line LabelsError.

``read_rsna_labels`` is what ``ichscan train`` and ``ichscan evaluate`` call on ``--labels``;
it documents ``LabelsError`` (a ValueError naming the file and line) for every malformed
file. The mapping must hold, for every image, six labels of 0 or 1 as float32. Run::

    python benchmarks/fuzz/labels.py CORPUS_DIR [SEED_DIR] -timeout=5 -rss_limit_mb=1024
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Finding, check_reason, scratch  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402,F401 - imported by the dataset module; not instrumented (too big, not ours)

with atheris.instrument_imports(include=["ichscan.train.dataset", "csv"]):
    from ichscan.train.dataset import LabelsError, read_rsna_labels

PATH = os.path.join(scratch("labels"), "stage_2_train.csv")


def TestOneInput(data: bytes) -> None:
    with open(PATH, "wb") as fh:
        fh.write(data)
    try:
        labels = read_rsna_labels(PATH)
    except LabelsError as exc:
        check_reason(str(exc), "LabelsError", limit=100_000)
        return
    if not isinstance(labels, dict) or not labels:
        raise Finding(f"read_rsna_labels returned {labels!r}")
    for image, target in labels.items():
        if not image.startswith("ID_") or target.shape != (6,) or target.dtype != np.float32 or not np.isin(target, (0, 1)).all():
            raise Finding(f"{image!r}: labels {target!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
