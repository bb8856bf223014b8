"""The watch ledger: the part of the state file that is the source of truth for ``ichscan watch``.

Each file handed to the engine gets a row: its identity (path, size, mtime and, once
decoded, its SOPInstanceUID), its state (``queued`` while in flight, ``done`` once
screened) and its result (the exact ``results.csv`` row and the probabilities). A
result is committed here *before* it is appended to the CSV, so after a crash the
CSV can only lack rows or end in a torn line, never hold a row the ledger does not
know; :func:`reconcile_csv` repairs both on start. A file whose identity is already
``done`` is not screened again; a ``queued`` one (in flight when the process died)
is.

The ledger is the ``files`` and ``studies`` tables of the state file
(:class:`ichscan.state.store.StateStore`: connection, lock, durability, schema); one
transaction per batch. ``files`` is also where the outbox reads each instance's
result for its study's SR, so a result is stored once.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ichscan.durable import flush_to_disk
from ichscan.labels import LABELS
from ichscan.records import SliceResult, top_finding
from ichscan.reporting import StudySummary
from ichscan.state.schema import DONE, QUEUED
from ichscan.state.store import DEFAULT_STATE_NAME, StateError, StateStore, state_files

#: Rows of an earlier run whose outputs a later run rewrote (batch without --resume).
SUPERSEDED = "superseded"

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STATE_NAME",
    "DONE",
    "QUEUED",
    "CsvRepair",
    "InstanceResult",
    "FileIdentity",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "decode_path",
    "encode_path",
    "printable",
    "reconcile_csv",
    "repair_torn_csv",
    "state_files",
]

#: The ledger's errors are the state file's (watch and its tests know this name).
LedgerError = StateError

_P_COLUMNS = ", ".join([*(f"p_{label}" for label in LABELS), "p_series_any"])
#: The done_seq of the next committed result: from the table, not a counter, because the
#: outbox's :meth:`Ledger.record_screened` commits results through the same store.
_NEXT_SEQ = "(SELECT COALESCE(MAX(done_seq), 0) + 1 FROM files)"


# -- paths in SQLite and in text ----------------------------------------------------
#
# On POSIX a file name is bytes; Python decodes one that is not valid UTF-8 with
# ``surrogateescape`` (b"bad\xff.dcm" -> "bad\udcff.dcm"), and such a str can be
# neither stored by sqlite3 nor written to a UTF-8 file. The state file keeps every
# valid-UTF-8 path as TEXT, unchanged (ledgers written before keep working), and only
# a path with surrogates as a BLOB of its file-system bytes: a BLOB never equals a TEXT
# value in SQLite, so the two cannot be confused, and os.fsdecode gives back exactly
# the str that opens the file again. Text for people (the CSV, the HTML report) gets
# the bad bytes as backslash escapes: "bad\xff.dcm".


def encode_path(path: str) -> str | bytes:
    """The value a path is stored as in SQLite: the path itself when it is valid UTF-8,
    else its file-system bytes (a BLOB). :func:`decode_path` reverses it exactly."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return os.fsencode(path)
        except UnicodeEncodeError:
            # A surrogate that no file name decodes to, so no file has this name:
            # stored all the same (a path is never what stops a run).
            return path.encode("utf-8", "surrogatepass")
    return path


def decode_path(value: str | bytes) -> str:
    """The path :func:`encode_path` stored as ``value``."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return os.fsdecode(raw)
        except UnicodeDecodeError:  # a non-UTF-8 file-system encoding without surrogateescape
            return raw.decode("utf-8", "surrogatepass")
    return value


def printable(text: str) -> str:
    """``text`` as valid UTF-8 for people: bytes that are not UTF-8 in a file name
    (surrogates) become backslash escapes (``bad\\xff.dcm``); other text is unchanged."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return os.fsencode(text).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@dataclass(frozen=True)
class FileIdentity:
    """What makes a file "the same file": a changed size or mtime makes it a new one."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    path: str
    size: int
    mtime_ns: int
    state: str
    status: str | None

    @property
    def identity(self) -> FileIdentity:
        return FileIdentity(self.path, self.size, self.mtime_ns)


class Ledger:
    """The ledger tables of a state file; use from one thread.

    Parameters
    ----------
    store
        The open state file (shared with the outbox and the forwarder), or a path: the
        ledger then opens the store itself and closes it in :meth:`close`.

    Raises
    ------
    LedgerError
        When a path is given and the file is not a state file, is from a newer version,
        or another process holds it.
    """

    def __init__(self, store: StateStore | str | os.PathLike[str]):
        if isinstance(store, StateStore):
            self.store, self._owns_store = store, False
        else:
            self.store, self._owns_store = StateStore(store), True
        self.path = self.store.path

    def close(self) -> None:
        """Close the store when this ledger opened it; a shared one is its opener's to close."""
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files ---------------------------------------------------------------------

    def latest(self, path: str) -> LedgerEntry | None:
        """The most recent row for ``path``, or ``None`` if it was never queued."""
        row = self.store.query_one(
            "SELECT id, path, size, mtime_ns, state, status FROM files WHERE path = ? ORDER BY id DESC LIMIT 1",
            (encode_path(path),),
        )
        return _entry(row) if row else None

    def is_done(self, identity: FileIdentity) -> LedgerEntry | None:
        """The ``done`` row for exactly this identity, or ``None`` when it still needs screening."""
        entry = self.latest(identity.path)
        if entry is not None and entry.state == DONE and entry.identity == identity:
            return entry
        return None

    def queue(self, identities: Sequence[FileIdentity]) -> dict[str, int]:
        """Record files as handed to the engine (one transaction); returns ``path -> row id``.

        A path whose latest row is still ``queued`` (in flight when a previous run died)
        reuses that row, so a file never gets two rows for one screening.
        """
        ids: dict[str, int] = {}
        now = time.time()
        with self.store.transaction():
            for ident in identities:
                entry = self.latest(ident.path)
                if entry is not None and entry.state == QUEUED:
                    self.store.execute(
                        "UPDATE files SET size = ?, mtime_ns = ?, queued_at = ? WHERE id = ?",
                        (ident.size, ident.mtime_ns, now, entry.id),
                    )
                    ids[ident.path] = entry.id
                else:
                    ids[ident.path] = int(
                        self.store.execute(
                            "INSERT INTO files (path, size, mtime_ns, state, queued_at) VALUES (?, ?, ?, ?, ?)",
                            (encode_path(ident.path), ident.size, ident.mtime_ns, QUEUED, now),
                        )
                    )
        return ids

    def record(self, results: Iterable[tuple[int, SliceResult, Sequence[object]]]) -> None:
        """Commit results (one transaction): ``(row id, result, its CSV row)`` each."""
        now = time.time()
        with self.store.transaction():
            for row_id, result, csv_row in results:
                self.store.execute(
                    f"""UPDATE files SET state = ?, done_seq = {_NEXT_SEQ}, done_at = ?, status = ?, error = ?,
                        sop_instance_uid = ?, study_instance_uid = ?, series_instance_uid = ?, sop_class_uid = ?,
                        positive = ?, {", ".join(f"{column} = ?" for column in _P_COLUMNS.split(", "))}, csv_row = ?
                        WHERE id = ?""",
                    (DONE, now, *_result_values(result), json.dumps([_cell(c) for c in csv_row]), row_id),
                )

    def record_screened(self, results: Iterable[SliceResult]) -> None:
        """Commit results of files that were never queued (``batch``), one transaction.

        A result the path's latest row already holds (``watch`` records each result
        before the reporters see it) is not recorded again, so calling this for every
        result is safe whoever runs the screening. The identity is the file's size and
        mtime now (-1 when it is gone); the row has no CSV row (``csv_rows`` is the watch
        CSV's). Paths are stored absolute: a later run may start from another folder.
        """
        now = time.time()
        with self.store.transaction():
            for result in results:
                path = os.path.abspath(result.path)
                if self._holds(path, result) or (path != result.path and self._holds(result.path, result)):
                    continue
                try:
                    st = os.stat(path)
                    size, mtime_ns = st.st_size, st.st_mtime_ns
                except OSError:
                    size, mtime_ns = -1, -1
                self.store.execute(
                    f"""INSERT INTO files (path, size, mtime_ns, state, queued_at, done_seq, done_at, status, error,
                        sop_instance_uid, study_instance_uid, series_instance_uid, sop_class_uid, positive, {_P_COLUMNS})
                        VALUES (?, ?, ?, ?, ?, {_NEXT_SEQ}, ?, {", ".join("?" * (8 + len(LABELS)))})""",
                    (encode_path(path), size, mtime_ns, DONE, now, now, *_result_values(result)),
                )

    def _holds(self, path: str, result: SliceResult) -> bool:
        """Whether ``path``'s latest row is this very result (same instance, same values)."""
        row = self.store.query_one(
            f"SELECT state, status, sop_instance_uid, {_P_COLUMNS} FROM files WHERE path = ? ORDER BY id DESC LIMIT 1",
            (encode_path(path),),
        )
        if row is None or row[0] != DONE:
            return False
        probs = result.probabilities or {}
        series_any = result.prediction.series_any if result.prediction is not None else None
        return tuple(row[1:]) == (result.status, result.sop_instance_uid, *(probs.get(label) for label in LABELS), series_any)

    def start_over(self) -> None:
        """A run that rewrites its outputs from scratch (``batch`` without ``--resume``):
        rows of earlier runs no longer stand for a row of the results CSV."""
        with self.store.transaction():
            self.store.execute("UPDATE files SET state = ? WHERE state IN (?, ?)", (SUPERSEDED, DONE, QUEUED))

    def queued(self) -> list[LedgerEntry]:
        """Rows still ``queued``: files in flight when a previous run stopped."""
        rows = self.store.query(
            "SELECT id, path, size, mtime_ns, state, status FROM files WHERE state = ? ORDER BY id", (QUEUED,)
        )
        return [_entry(row) for row in rows]

    def counts(self) -> Counter[str]:
        """``done`` rows per status."""
        rows = self.store.query("SELECT status, COUNT(*) FROM files WHERE state = ? GROUP BY status", (DONE,))
        return Counter({status: n for status, n in rows})

    def csv_rows(self) -> Iterator[list[str]]:
        """Every ``done`` file's CSV row, in the order the results were committed (files
        recorded without one, by :meth:`record_screened`, were never in a watch CSV)."""
        rows = self.store.query(
            "SELECT csv_row FROM files WHERE state = ? AND csv_row IS NOT NULL ORDER BY done_seq", (DONE,)
        )
        for (raw,) in rows:
            # Rows are recorded printable; printable() again for any recorded otherwise.
            yield [printable(cell) for cell in json.loads(raw)]

    def screened_instances(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs of a study with a current result of any status (not superseded)."""
        rows = self.store.query(
            "SELECT DISTINCT sop_instance_uid FROM files WHERE study_instance_uid = ? AND state = ? AND sop_instance_uid IS NOT NULL",
            (study_uid, DONE),
        )
        return {str(uid) for (uid,) in rows}

    def instance_results(self, study_uid: str) -> list[InstanceResult]:
        """The latest ``ok`` result of each instance of a study, by SOP Instance UID."""
        rows = self.store.query(
            f"""SELECT sop_instance_uid, path, COALESCE(series_instance_uid, ''), COALESCE(sop_class_uid, ''), {_P_COLUMNS}
                FROM files WHERE done_seq IN (
                    SELECT MAX(done_seq) FROM files
                    WHERE study_instance_uid = ? AND state = ? AND status = 'ok' AND p_any IS NOT NULL
                    GROUP BY sop_instance_uid)
                ORDER BY sop_instance_uid""",
            (study_uid, DONE),
        )
        return [
            InstanceResult(sop, decode_path(path), series, sop_class, dict(zip(LABELS, probs, strict=True)), series_any)
            for sop, path, series, sop_class, *probs, series_any in rows
        ]

    # -- studies -------------------------------------------------------------------

    def study_summaries(self, thresholds: dict[str, float]) -> dict[str, StudySummary]:
        """Per-study maxima over the ``ok`` results, as :class:`ichscan.reporting.StudyTable` keeps them
        (``any``: the highest series probability where a series head gave one)."""
        cols = ", ".join("COALESCE(MAX(p_series_any), MAX(p_any))" if label == "any" else f"MAX(p_{label})" for label in LABELS)
        rows = self.store.query(
            f"""SELECT COALESCE(NULLIF(study_instance_uid, ''), '(no study uid)'), COUNT(*), SUM(positive), {cols}
                FROM files WHERE state = ? AND status = 'ok' GROUP BY 1""",
            (DONE,),
        )
        out: dict[str, StudySummary] = {}
        for uid, slices, positives, *maxima in rows:
            study = StudySummary(uid, slices=int(slices), positive_slices=int(positives or 0))
            study.max_probabilities = {label: float(p or 0.0) for label, p in zip(LABELS, maxima, strict=True)}
            positive = study.max_probabilities["any"] >= thresholds["any"]
            study.top_label, study.top_probability = top_finding(study.max_probabilities, positive)
            out[uid] = study
        return out

    def summarised_studies(self) -> set[str]:
        """Studies whose summary row was written at least once."""
        return {uid for (uid,) in self.store.query("SELECT study_instance_uid FROM studies")}

    def changed_since_summary(self) -> set[str]:
        """Summarised studies with a result committed after their summary."""
        rows = self.store.query(
            """SELECT f.study_instance_uid FROM files f JOIN studies s ON s.study_instance_uid = f.study_instance_uid
               WHERE f.state = ? AND f.status = 'ok' GROUP BY f.study_instance_uid
               HAVING MAX(f.done_at) > MAX(s.summarised_at)""",
            (DONE,),
        )
        return {uid for (uid,) in rows}

    def mark_summarised(self, uids: Iterable[str]) -> None:
        now = time.time()
        with self.store.transaction():
            self.store.executemany(
                "INSERT INTO studies (study_instance_uid, summarised_at) VALUES (?, ?) "
                "ON CONFLICT (study_instance_uid) DO UPDATE SET summarised_at = excluded.summarised_at",
                [(uid, now) for uid in uids],
            )


@dataclass(frozen=True)
class InstanceResult:
    """One screened instance as the outbox needs it for its study's SR."""

    sop_instance_uid: str
    path: str
    series_instance_uid: str
    sop_class_uid: str
    probabilities: dict[str, float]
    series_any: float | None = None  # its series' probability, from a model with a series head


def _result_values(result: SliceResult) -> tuple:
    """status, error, UIDs, positive and probabilities, in the column order of
    :meth:`Ledger.record` and :meth:`Ledger.record_screened`."""
    probs = result.probabilities or {}
    return (
        result.status,
        result.error,
        result.sop_instance_uid,
        result.study_instance_uid,
        result.series_instance_uid,
        result.sop_class_uid,
        int(result.is_positive) if result.probabilities is not None else None,
        *(probs.get(label) for label in LABELS),
        result.prediction.series_any if result.prediction is not None else None,
    )


def _cell(value: object) -> str:
    # Exactly what csv.writer writes, so a row read back from the CSV compares equal.
    return "" if value is None else printable(str(value))


def _entry(row: Sequence) -> LedgerEntry:
    return LedgerEntry(row[0], decode_path(row[1]), *row[2:])


# -- the CSV side ------------------------------------------------------------------


@dataclass
class CsvRepair:
    """What :func:`reconcile_csv` did."""

    torn_bytes: int = 0
    appended: int = 0
    unknown: int = 0  # rows in the CSV the ledger does not know (written by another run)


def repair_torn_csv(path: Path, columns: Sequence[str]) -> int:
    """Cut a torn last line (a write interrupted by a crash); returns the bytes removed.

    A complete row has ``len(columns)`` cells and ends with a line break; the file is
    cut back to the end of its last complete row (a torn header leaves it empty).
    Line breaks inside quoted cells are handled by parsing, not by splitting lines.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    if not data:
        return 0
    ends: list[int] = []  # byte offset after each line fed to the parser

    def lines() -> Iterator[str]:
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            nxt = len(data) if nl < 0 else nl + 1
            ends.append(nxt)
            yield data[pos:nxt].decode("utf-8", errors="replace")
            pos = nxt

    keep = 0
    try:
        for row in csv.reader(lines()):
            if len(row) == len(columns) and data[ends[-1] - 1 : ends[-1]] == b"\n":
                keep = ends[-1]
    except csv.Error:
        pass  # an unterminated quote at the end: a torn row
    removed = len(data) - keep
    if removed:
        with open(path, "r+b") as fh:
            fh.truncate(keep)
            flush_to_disk(fh)
    return removed


def _check_header(path: Path, columns: Sequence[str]) -> None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(64 * 1024)
    except FileNotFoundError:
        return
    expected = ",".join(columns).encode()
    line, newline, _ = head.partition(b"\n")
    line = line.rstrip(b"\r")
    # A complete first line must be our header; an incomplete one (torn) a prefix of it.
    if (newline and line != expected) or (not newline and not expected.startswith(line)):
        raise LedgerError(f"{path} exists with other columns; move it away or choose another --out")


def reconcile_csv(path: Path, ledger: Ledger, columns: Sequence[str]) -> CsvRepair:
    """Make ``path`` hold every result in ``ledger`` exactly once.

    Cuts a torn last line, writes the header into a new or empty file, then appends,
    in commit order, the ledger rows that the CSV lacks. Rows are matched by
    ``(path, sop_instance_uid)`` as a multiset, so a file screened twice (changed in
    between) keeps both rows and none is duplicated.

    Raises
    ------
    LedgerError
        When the file exists with other columns (not a results CSV of this version).
    """
    _check_header(path, columns)  # before any repair: never cut rows out of someone else's CSV
    repair = CsvRepair(torn_bytes=repair_torn_csv(path, columns))
    present: Counter[tuple[str, str]] = Counter()
    header: list[str] | None = None
    if path.exists():
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            for row in reader:
                if len(row) >= 2:
                    present[(row[0], row[1])] += 1
    if header is not None and tuple(header) != tuple(columns):
        raise LedgerError(f"{path} exists with other columns; move it away or choose another --out")
    missing: list[list[str]] = []
    for row in ledger.csv_rows():
        key = (row[0], row[1])
        if present[key] > 0:
            present[key] -= 1
        else:
            missing.append(row)
    repair.unknown = sum(present.values())
    if header is None or missing:
        with open(path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            if header is None:
                writer.writerow(columns)
            writer.writerows(missing)
            flush_to_disk(fh)
    repair.appended = len(missing)
    return repair
