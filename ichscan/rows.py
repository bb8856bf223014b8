"""The flat row of a result: the columns of the results CSV, also kept in the ledger.

The core's view of "one row per input"; the CSV reporter writes these rows, the ledger
stores them so that a results file cut by a crash can be completed, and plugins
(JSONL, databases) can reuse them.
"""

from __future__ import annotations

from ichscan.labels import LABELS
from ichscan.state.ledger import printable
from ichscan.records import SliceResult

RESULT_COLUMNS: tuple[str, ...] = (
    "path",
    "sop_instance_uid",
    "study_instance_uid",
    "series_instance_uid",
    "instance_number",
    "status",
    "error",
    *(f"p_{label}" for label in LABELS),
    *LABELS,
    "top_label",
    "top_probability",
    "overlay",
)
STUDY_COLUMNS: tuple[str, ...] = (
    "study_instance_uid",
    "slices",
    "positive_slices",
    *(f"p_{label}" for label in LABELS),
    "top_label",
    "top_probability",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: object) -> object:
    """Make text safe for the CSV: bytes of a file name that are not UTF-8 (surrogates)
    become backslash escapes (``bad\\xff.dcm``), so the file stays valid UTF-8; and
    spreadsheet formulas are defused: text starting with = + - @ gets a leading quote."""
    if isinstance(cell, str):
        cell = printable(cell)
        if cell.startswith(_FORMULA_START):
            return "'" + cell
    return cell


def probability_cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def result_row(result: SliceResult) -> list[object]:
    probs = result.probabilities
    positive = result.positive
    row: list[object] = [
        result.path,
        result.sop_instance_uid,
        result.study_instance_uid,
        result.series_instance_uid,
        "" if result.instance_number is None else result.instance_number,
        result.status,
        result.error,
        *(probability_cell(probs[label]) if probs else "" for label in LABELS),
        *(int(positive[label]) if positive else "" for label in LABELS),
        result.top_label if probs else "",
        probability_cell(result.top_probability) if probs else "",
        result.overlay,
    ]
    return [neutralise(cell) for cell in row]
