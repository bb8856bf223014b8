"""Built-in reporter: per-slice results CSV and the per-study summary CSV."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from ichscan import hookimpl
from ichscan.durable import replacing
from ichscan.labels import LABELS
from ichscan.state.ledger import printable
from ichscan.reporting import Reporter, RunConfig, RunSummary, SliceResult, StudyTable

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


def _prob(value: float | None) -> str:
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
        *(_prob(probs[label]) if probs else "" for label in LABELS),
        *(int(positive[label]) if positive else "" for label in LABELS),
        result.top_label if probs else "",
        _prob(result.top_probability) if probs else "",
        result.overlay,
    ]
    return [neutralise(cell) for cell in row]


def write_studies_csv(path: Path, studies: StudyTable) -> None:
    """Rewrite the study summary atomically (temporary file + rename)."""
    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(STUDY_COLUMNS)
        for study in studies.sorted():
            writer.writerow(
                [
                    neutralise(study.study_instance_uid),
                    study.slices,
                    study.positive_slices,
                    *(_prob(study.max_probabilities[label]) for label in LABELS),
                    study.top_label,
                    _prob(study.top_probability),
                ]
            )


class CsvReporter(Reporter):
    """Appends one row per file to ``--out``; keeps ``--studies-out`` current.

    Parameters
    ----------
    out
        The per-slice results CSV.
    studies_out
        The per-study CSV, rewritten as studies change; ``None`` to leave it alone.
    append
        Keep the rows already in ``out`` and append (the header only into an empty
        file), for ``ichscan watch``, which reconciles ``out`` with its ledger before
        it starts; by default ``out`` is rewritten from scratch.
    """

    name = "csv"
    #: Rewrite the study file at most this often during a run (always at the end).
    studies_interval_s = 2.0

    def __init__(self, out: Path, studies_out: Path | None, *, append: bool = False):
        self.out = out
        self.studies_out = studies_out
        self._fh = open(out, "a" if append else "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in on_finish
        self._writer = csv.writer(self._fh)
        if self._fh.tell() == 0:
            self._writer.writerow(RESULT_COLUMNS)
        self._fh.flush()
        self._last_studies = 0.0
        self._studies_dirty = False

    def on_results(self, results: list[SliceResult], studies: StudyTable) -> None:
        self._writer.writerows(result_row(r) for r in results)
        self._fh.flush()
        self._studies_dirty |= bool(studies.changed)
        now = time.monotonic()
        if self.studies_out and self._studies_dirty and now - self._last_studies >= self.studies_interval_s:
            write_studies_csv(self.studies_out, studies)
            self._last_studies, self._studies_dirty = now, False

    def on_finish(self, summary: RunSummary, studies: StudyTable) -> None:
        self._fh.close()
        if self.studies_out:
            write_studies_csv(self.studies_out, studies)


@hookimpl
def ichscan_register_reporters(register, config: RunConfig):
    if config.out is not None:
        if config.options.get("append"):
            # ichscan watch: the results CSV grows across runs (reconciled with the
            # ledger on start) and the watcher writes study rows as studies complete.
            register(CsvReporter(config.out, None, append=True))
        else:
            register(CsvReporter(config.out, config.studies_out))
