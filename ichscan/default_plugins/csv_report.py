"""Built-in reporter: per-slice results CSV and the per-study summary CSV."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

from ichscan import hookimpl
from ichscan.durable import replacing
from ichscan.labels import LABELS
from ichscan.rows import RESULT_COLUMNS, STUDY_COLUMNS, neutralise, probability_cell, result_row
from ichscan.state.ledger import Ledger, reconcile_csv
from ichscan.reporting import Reporter, RunConfig, RunSummary, SliceResult, StudyTable

log = logging.getLogger(__name__)


def write_studies_csv(path: Path, studies: StudyTable, only: set[str] | None = None) -> None:
    """Rewrite the study summary atomically (temporary file + rename)."""
    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(STUDY_COLUMNS)
        for study in studies.sorted(only):
            writer.writerow(
                [
                    neutralise(study.study_instance_uid),
                    study.slices,
                    study.positive_slices,
                    *(probability_cell(study.max_probabilities[label]) for label in LABELS),
                    study.top_label,
                    probability_cell(study.top_probability),
                ]
            )


class CsvReporter(Reporter):
    """Appends one row per file to ``--out``; keeps ``--studies-out`` current.

    Parameters
    ----------
    out
        The per-slice results CSV.
    studies_out
        The per-study CSV; ``None`` to leave it alone.
    ledger
        Keep the rows already in ``out`` and append: first ``out`` is reconciled with the
        ledger (a torn last line cut, rows the ledger has and the file lacks appended),
        for a live run or ``batch --resume``. Without it ``out`` is rewritten from scratch.
    live
        Study rows are written as studies complete (and all of them at the end), rather
        than rewritten as they change.
    """

    name = "csv"
    #: Rewrite the study file at most this often during a run (always at the end).
    studies_interval_s = 2.0

    def __init__(self, out: Path, studies_out: Path | None, *, ledger: Ledger | None = None, live: bool = False):
        self.out = out
        self.studies_out = studies_out
        self.live = live
        if ledger is not None:
            repair = reconcile_csv(out, ledger, RESULT_COLUMNS)
            if repair.torn_bytes:
                log.warning("cut a torn last line (%d bytes) from %s", repair.torn_bytes, out)
            if repair.appended:
                log.warning("restored %d rows to %s from the ledger", repair.appended, out)
            if repair.unknown:
                log.warning("%s holds %d rows the ledger %s does not know (another run?)", out, repair.unknown, ledger.path)
        self._fh = open(out, "a" if ledger is not None else "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in on_finish
        self._writer = csv.writer(self._fh)
        if self._fh.tell() == 0:
            self._writer.writerow(RESULT_COLUMNS)
        self._fh.flush()
        self._last_studies = 0.0
        self._studies_dirty = False

    def on_results(self, results: list[SliceResult], studies: StudyTable) -> None:
        self._writer.writerows(result_row(r) for r in results)
        self._fh.flush()
        if self.live:
            return
        self._studies_dirty |= bool(studies.changed)
        now = time.monotonic()
        if self.studies_out and self._studies_dirty and now - self._last_studies >= self.studies_interval_s:
            self._write_studies(studies)
            self._last_studies, self._studies_dirty = now, False

    def on_study_complete(self, uids: list[str], studies: StudyTable) -> None:
        self._write_studies(studies, studies.complete if self.live else None)

    def on_finish(self, summary: RunSummary, studies: StudyTable) -> None:
        self._fh.close()
        self._write_studies(studies)

    def _write_studies(self, studies: StudyTable, only: set[str] | None = None) -> None:
        if self.studies_out is None:
            return
        try:
            write_studies_csv(self.studies_out, studies, only)
        except OSError as exc:
            log.error("cannot write %s: %s", self.studies_out, exc.strerror or exc)


@hookimpl
def ichscan_register_reporters(register, config: RunConfig):
    if config.out is not None:
        ledger = Ledger(config.store) if config.append and config.store is not None else None
        register(CsvReporter(config.out, config.studies_out, ledger=ledger, live=config.mode.live))
