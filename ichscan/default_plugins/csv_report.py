"""Built-in reporter: per-slice results CSV and the per-study summary CSV."""

from __future__ import annotations

import csv
import io
import logging
import os
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

    Each batch of rows goes to the file as one write of whole rows, unbuffered: when it
    fails (a full disk), the file is cut back to its last whole row, so no half row is
    ever followed by other rows. With a ``ledger``, the rows that could not be written are
    written with the next batch once there is room (the ledger records every result
    before any reporter sees it); without one they are missing until ``batch --resume``.

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
        self.ledger = ledger
        if ledger is not None:
            repair = reconcile_csv(out, ledger, RESULT_COLUMNS)
            if repair.torn_bytes:
                log.warning("cut a torn last line (%d bytes) from %s", repair.torn_bytes, out)
            if repair.appended:
                log.warning("restored %d rows to %s from the ledger", repair.appended, out)
            if repair.unknown:
                log.warning("%s holds %d rows the ledger %s does not know (another run?)", out, repair.unknown, ledger.path)
        self._open("a" if ledger is not None else "w")
        if self._end == 0:
            self._append([RESULT_COLUMNS])
        self._behind = False  # rows failed to be written; the ledger has them
        self._last_studies = 0.0
        self._studies_dirty = False

    def _open(self, mode: str) -> None:
        self._fh = open(self.out, mode + "b", buffering=0)  # noqa: SIM115 - closed in on_finish
        self._end = os.fstat(self._fh.fileno()).st_size  # where the whole rows end

    def _append(self, rows) -> None:
        text = io.StringIO(newline="")
        csv.writer(text).writerows(rows)
        encoded = text.getvalue().encode("utf-8")
        data = memoryview(encoded)
        try:
            while data:
                data = data[os.write(self._fh.fileno(), data) :]
        except OSError as exc:
            try:
                os.ftruncate(self._fh.fileno(), self._end)  # the half-written rows go
            except OSError:
                pass  # still torn at the end: the next reconcile_csv cuts it
            behind = "; its rows are in the state file and are written once there is room" if self.ledger is not None else ""
            raise OSError(exc.errno, f"cannot append to {self.out}: {exc.strerror or exc}{behind}") from None
        self._end += len(encoded)

    def _catch_up(self) -> None:
        """Write the rows the ledger has and the file lacks (this batch's among them)."""
        self._fh.close()
        try:
            repair = reconcile_csv(self.out, self.ledger, RESULT_COLUMNS)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot append to {self.out}: {exc.strerror or exc}; still behind the state file") from None
        finally:
            self._open("a")
        self._behind = False
        log.warning("%s caught up: %d rows that could not be written before are written now", self.out, repair.appended)

    def on_results(self, results: list[SliceResult], studies: StudyTable) -> None:
        if self._behind:
            self._catch_up()
        else:
            try:
                self._append(result_row(r) for r in results)
            except OSError:
                self._behind = self.ledger is not None
                raise
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
        try:
            if self._behind:
                self._catch_up()
        finally:
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
