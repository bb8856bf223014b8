"""Results back into PACS: the outbox of DICOM objects and the C-STORE forwarder.

Per completed study, :class:`Outbox` builds a structured report (SR) and, for a positive
study, a Secondary Capture key image (see :mod:`ichscan.dicom_objects`), writes them to a
folder and records them, with one delivery per destination, in the SQLite state file
(the watch ledger's file, in tables of its own). :class:`Forwarder` sends pending
deliveries by C-STORE in a background thread, with back-off, and marks them sent.

Why it cannot lose or double a result:

* An object is written to a temporary file (fsync), then recorded with its deliveries in
  one transaction, then renamed into place. After a crash, a recorded object whose file
  is still temporary is renamed on start; an unrecorded temporary file is deleted
  (nothing was sent from it).
* A study whose content (instances, probabilities, thresholds, model) equals that of its
  latest recorded SR gets no new SR: a restart that completes the same study again
  sends nothing new. Different content (late instances) gives a revised SR: new SOP
  Instance UID, same series, a reference to its predecessor.
* A delivery is marked sent only after the destination answered Success. A crash in
  between re-sends the same object with the same UIDs, which PACS treat as a duplicate.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ichscan.dicom import OK, decode_instance, is_valid_uid
from ichscan.labels import LABELS
from ichscan.reporting import SliceResult

log = logging.getLogger(__name__)

PENDING = "pending"
SENT = "sent"
FAILED = "failed"
SR = "sr"
SC = "sc"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS result_instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    probabilities TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS result_instances_study ON result_instances (study_instance_uid);
CREATE TABLE IF NOT EXISTS result_objects (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    revision INTEGER NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    content_key TEXT NOT NULL,
    file TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS result_objects_study ON result_objects (study_instance_uid, kind, revision);
CREATE TABLE IF NOT EXISTS deliveries (
    sop_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    sent_at REAL,
    PRIMARY KEY (sop_instance_uid, destination)
);
"""

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash


@dataclass(frozen=True)
class Destination:
    """A C-STORE target, written ``AE@HOST:PORT`` (``AE@[::1]:PORT`` for IPv6)."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AE@HOST:PORT``; raises ValueError with a one-line reason."""
        ae, sep, rest = text.rpartition("@")
        if not sep or not ae:
            raise ValueError(f"{text!r} is not AE@HOST:PORT (e.g. ORTHANC@pacs.example.org:4242)")
        if not _AE_RE.match(ae) or not ae.strip():
            raise ValueError(f"AE title {ae!r} must be 1-16 printable characters without a backslash")
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} has no :PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"port {port_text!r} in {text!r} is not a number") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} in {text!r} is not in 1-65535")
        return cls(ae.strip(), host, port)


@dataclass
class ModelInfo:
    """What the SR says about the model."""

    name: str
    version: str
    demo: bool
    thresholds: dict[str, float]


def weights_version(source: str) -> str:
    """``<file name> sha256:<12 hex>`` for a checkpoint file, else the source as given."""
    path = Path(source)
    if not path.is_file():
        return source
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"{path.name} sha256:{digest.hexdigest()[:12]}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


class Outbox:
    """DICOM result objects per study, their files and their deliveries.

    Parameters
    ----------
    state
        SQLite file (shared with the watch ledger when there is one).
    folder
        Where the objects are written: ``FOLDER/<StudyInstanceUID>/<SOPInstanceUID>.dcm``.
    destinations
        Where each object is to be sent (a pending delivery per destination).
    model
        Model name, version, demo flag and thresholds, for the SR.
    lock
        Hold ``<state>.lock`` so that two runs cannot share the state file (``watch``
        holds it already through its ledger).

    Raises
    ------
    ValueError
        When another process holds the state file.
    """

    def __init__(
        self, state: Path, folder: Path, destinations: Sequence[Destination], model: ModelInfo, *, lock: bool = False
    ):
        self.state = Path(state)
        self.folder = Path(folder)
        self.destinations = list(destinations)
        self.model = model
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fh = None
        if lock:
            self._lock_fh = open(self.state.with_name(self.state.name + ".lock"), "a+")  # noqa: SIM115 - held until close()
            try:
                fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock_fh.close()
                raise ValueError(f"state file {self.state} is in use by another ichscan process") from None
        self._db = _connect(self.state)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._backfill_from_ledger()
        self._recover_files()
        self._queue_new_destinations()

    def close(self) -> None:
        self._db.close()
        if self._lock_fh is not None:
            self._lock_fh.close()

    # -- start-up ----------------------------------------------------------------------

    def _backfill_from_ledger(self) -> None:
        """Screened instances the watch ledger has and we do not (a crash between the
        two commits); the ledger's results are the truth."""
        has_files = self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='files'").fetchone()
        if not has_files:
            return
        cols = ", ".join(f"'{label}', p_{label}" for label in LABELS)
        self._db.execute(
            f"""INSERT OR IGNORE INTO result_instances (sop_instance_uid, study_instance_uid, path, probabilities)
                SELECT sop_instance_uid, study_instance_uid, path, json_object({cols})
                FROM files WHERE state = 'done' AND status = 'ok'
                  AND sop_instance_uid != '' AND study_instance_uid != ''"""
        )

    def _recover_files(self) -> None:
        """Finish renames cut short by a crash; delete temporary files nobody recorded."""
        known = {row[0] for row in self._db.execute("SELECT file FROM result_objects")}
        for path_text in known:
            path = Path(path_text)
            tmp = _tmp_name(path)
            if not path.exists() and tmp.exists():
                os.replace(tmp, path)
                log.info("finished writing %s after an interrupted run", path)
            elif not path.exists():
                log.error("result object %s is recorded but its file is gone", path)
        for tmp in self.folder.glob("*/.ichscan-*.tmp"):
            if str(tmp.parent / tmp.name[len(".ichscan-") : -len(".tmp")]) not in known:
                tmp.unlink(missing_ok=True)

    def _queue_new_destinations(self) -> None:
        """Objects made before a destination was added are sent to it too."""
        with self._lock, _Transaction(self._db):
            for destination in self.destinations:
                self._db.execute(
                    "INSERT OR IGNORE INTO deliveries (sop_instance_uid, destination, state) "
                    "SELECT sop_instance_uid, ?, ? FROM result_objects",
                    (str(destination), PENDING),
                )

    # -- while screening ---------------------------------------------------------------

    def record_results(self, results: Iterable[SliceResult]) -> None:
        """Remember every ``ok`` instance (path and probabilities) for its study's SR."""
        rows = [
            (r.sop_instance_uid, r.study_instance_uid, r.path, json.dumps(r.probabilities))
            for r in results
            if r.status == OK and r.probabilities and is_valid_uid(r.sop_instance_uid) and is_valid_uid(r.study_instance_uid)
        ]
        if not rows:
            return
        with self._lock, _Transaction(self._db):
            self._db.executemany(
                "INSERT OR REPLACE INTO result_instances (sop_instance_uid, study_instance_uid, path, probabilities) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )

    def complete_study(self, study_uid: str) -> list[Path]:
        """Build (or revise) the study's SR and key image when its content changed.

        Returns the files of the new objects (empty when nothing changed). Raises
        ValueError/OSError with a one-line reason when the objects cannot be made.
        """
        from ichscan.dicom_objects import InstanceFinding, StudyFindings

        if not is_valid_uid(study_uid):
            return []
        rows = self._db.execute(
            "SELECT sop_instance_uid, path, probabilities FROM result_instances WHERE study_instance_uid = ? "
            "ORDER BY sop_instance_uid",
            (study_uid,),
        ).fetchall()
        if not rows:
            return []
        thresholds = self.model.thresholds
        probabilities = {uid: json.loads(p) for uid, _, p in rows}
        key = self._content_key(probabilities)
        latest_sr = self._latest(study_uid, SR)
        if latest_sr is not None and latest_sr["content_key"] == key:
            return []
        instances: list[InstanceFinding] = []
        for sop_uid, path, _ in rows:
            header = _read_header(path)
            if header is None or str(header.get("SOPInstanceUID", "")) != sop_uid:
                log.warning("study %s: %s is gone or changed; it is left out of the report", study_uid, path)
                continue
            probs = probabilities[sop_uid]
            instances.append(
                InstanceFinding(header, probs, {label: probs[label] >= thresholds[label] for label in LABELS})
            )
        if not instances:
            raise ValueError(f"study {study_uid}: none of its {len(rows)} screened files can be read any more")
        study_probs = {label: max(i.probabilities[label] for i in instances) for label in LABELS}
        findings = StudyFindings(
            instances=instances,
            probabilities=study_probs,
            positive={label: study_probs[label] >= thresholds[label] for label in LABELS},
            thresholds=dict(thresholds),
            model_name=self.model.name,
            model_version=self.model.version,
            demo=self.model.demo,
        )
        made = [self._make_sr(study_uid, findings, key, latest_sr)]
        if findings.positive["any"]:
            sc = self._make_key_image(study_uid, findings)
            if sc is not None:
                made.append(sc)
        self._commit(made)
        return [obj.path for obj in made]

    def _content_key(self, probabilities: dict[str, dict[str, float]]) -> str:
        payload = {
            "instances": sorted((uid, [round(p[label], 5) for label in LABELS]) for uid, p in probabilities.items()),
            "thresholds": [round(self.model.thresholds[label], 6) for label in LABELS],
            "model": [self.model.name, self.model.version],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _latest(self, study_uid: str, kind: str) -> sqlite3.Row | None:
        self._db.row_factory = sqlite3.Row
        try:
            return self._db.execute(
                "SELECT * FROM result_objects WHERE study_instance_uid = ? AND kind = ? ORDER BY revision DESC LIMIT 1",
                (study_uid, kind),
            ).fetchone()
        finally:
            self._db.row_factory = None

    def _make_sr(self, study_uid: str, findings, key: str, previous_row) -> _NewObject:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.uid import generate_uid

        from ichscan.dicom_objects import build_sr

        previous = None
        if previous_row is not None:
            try:
                previous = pydicom.dcmread(previous_row["file"], stop_before_pixels=True)
            except (OSError, InvalidDicomError) as exc:
                log.warning("cannot read the earlier SR %s (%s): the revision will not reference it", previous_row["file"], exc)
        series = previous_row["series_instance_uid"] if previous_row is not None else generate_uid()
        revision = previous_row["revision"] + 1 if previous_row is not None else 1
        ds = build_sr(
            findings,
            series_instance_uid=series,
            sop_instance_uid=generate_uid(),
            instance_number=revision,
            previous=previous,
        )
        return self._write(study_uid, SR, revision, key, ds)

    def _make_key_image(self, study_uid: str, findings) -> _NewObject | None:
        from pydicom.uid import generate_uid

        from ichscan.dicom_objects import build_key_image
        from ichscan.engine import to_result
        from ichscan.overlay import render_overlay
        from ichscan.imaging import brain_window_image
        from ichscan.reporting import top_finding

        best = max(findings.instances, key=lambda i: i.probabilities["any"])
        best_uid = str(best.dataset.SOPInstanceUID)
        key = hashlib.sha256(
            json.dumps([best_uid, [round(best.probabilities[label], 5) for label in LABELS]]).encode()
        ).hexdigest()
        latest = self._latest(study_uid, SC)
        if latest is not None and latest["content_key"] == key:
            return None
        path = self._path_of(best_uid)
        decoded = decode_instance(path)
        if decoded.status != OK or decoded.pixels is None:
            log.warning("study %s: key image slice %s cannot be decoded now: %s", study_uid, path, decoded.error)
            return None
        result = to_result(decoded)
        result.probabilities = dict(best.probabilities)
        result.positive = dict(best.positive)
        result.top_label, result.top_probability = top_finding(result.probabilities, result.positive["any"])
        overlay = render_overlay(brain_window_image(decoded.pixels, decoded.slope, decoded.intercept), result)
        import numpy as np

        series = latest["series_instance_uid"] if latest is not None else generate_uid()
        revision = latest["revision"] + 1 if latest is not None else 1
        ds = build_key_image(
            best.dataset,
            np.asarray(overlay.convert("RGB")),
            series_instance_uid=series,
            sop_instance_uid=generate_uid(),
            instance_number=revision,
            demo=self.model.demo,
        )
        return self._write(study_uid, SC, revision, key, ds)

    def _path_of(self, sop_uid: str) -> str:
        row = self._db.execute("SELECT path FROM result_instances WHERE sop_instance_uid = ?", (sop_uid,)).fetchone()
        return row[0]

    def _write(self, study_uid: str, kind: str, revision: int, key: str, ds) -> _NewObject:
        """Write ``ds`` to its temporary file (fsync); :meth:`_commit` records and renames it."""
        folder = self.folder / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        sop_uid = str(ds.SOPInstanceUID)
        path = folder / f"{sop_uid}.dcm"
        tmp = _tmp_name(path)
        ds.save_as(tmp, enforce_file_format=True)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        return _NewObject(
            sop_uid, study_uid, kind, revision, str(ds.SeriesInstanceUID), str(ds.SOPClassUID), key, path
        )

    def _commit(self, made: list[_NewObject]) -> None:
        now = time.time()
        with self._lock, _Transaction(self._db):
            for obj in made:
                self._db.execute(
                    "INSERT INTO result_objects (sop_instance_uid, study_instance_uid, kind, revision, series_instance_uid, "
                    "sop_class_uid, content_key, file, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (obj.sop_uid, obj.study_uid, obj.kind, obj.revision, obj.series_uid, obj.sop_class_uid, obj.key, str(obj.path), now),
                )
                self._db.executemany(
                    "INSERT INTO deliveries (sop_instance_uid, destination, state) VALUES (?, ?, ?)",
                    [(obj.sop_uid, str(d), PENDING) for d in self.destinations],
                )
        for obj in made:
            os.replace(_tmp_name(obj.path), obj.path)
        for folder in {obj.path.parent for obj in made}:
            _fsync_dir(folder)

    # -- queries -----------------------------------------------------------------------

    def objects(self, study_uid: str | None = None) -> list[dict]:
        """Recorded objects (oldest first), as dicts of their columns."""
        self._db.row_factory = sqlite3.Row
        try:
            sql = "SELECT * FROM result_objects"
            args: tuple = ()
            if study_uid is not None:
                sql, args = sql + " WHERE study_instance_uid = ?", (study_uid,)
            return [dict(row) for row in self._db.execute(sql + " ORDER BY created_at, kind", args)]
        finally:
            self._db.row_factory = None

    def delivery_counts(self) -> dict[str, int]:
        return {state: n for state, n in self._db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state")}


@dataclass
class _NewObject:
    sop_uid: str
    study_uid: str
    kind: str
    revision: int
    series_uid: str
    sop_class_uid: str
    key: str
    path: Path


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".ichscan-{path.name}.tmp")


def _read_header(path: str):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError) as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


#: Tries to read an object's file before its delivery is given up as failed.
_READ_ATTEMPTS = 5
#: C-STORE statuses that mean the object is stored (Success and the storage Warnings).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007, 0x0107, 0x0116}


class Forwarder(threading.Thread):
    """Sends pending deliveries by C-STORE until stopped; one association per round.

    Each round proposes only the SOP classes of the objects it sends. A failure (no
    connection, association rejected or aborted, a failure status) is retried with
    exponential back-off from ``min_backoff`` to ``max_backoff`` seconds, for as long as
    the process runs; what is still pending at exit is sent by the next run.
    """

    def __init__(
        self,
        state: Path,
        destinations: Sequence[Destination],
        calling_ae: str = "ICHSCAN",
        *,
        min_backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 30.0,
    ):
        super().__init__(name="ichscan-forwarder", daemon=True)
        self.state = Path(state)
        # Only this run's destinations: one dropped from the command line gets nothing more.
        self.destinations = [str(d) for d in destinations]
        marks = ", ".join("?" * len(self.destinations))
        self._where = f"d.state = ? AND d.destination IN ({marks})"
        self.calling_ae = calling_ae
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.wake = threading.Event()
        self._stop_event = threading.Event()
        self._idle = threading.Event()
        self._failures: dict[str, int] = {}
        self._db = _connect(self.state)
        self._db.executescript(_SCHEMA)
        self.sent = 0

    def stop(self) -> None:
        self._stop_event.set()
        self.wake.set()

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for every pending delivery to go out; return how many are left."""
        deadline = time.monotonic() + timeout
        while True:
            self.wake.set()
            left = self._pending_count()
            if left == 0 or time.monotonic() >= deadline or not self.is_alive():
                return left
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _pending_count(self) -> int:
        db = _connect(self.state)
        try:
            return db.execute(f"SELECT COUNT(*) FROM deliveries d WHERE {self._where}", (PENDING, *self.destinations)).fetchone()[0]
        finally:
            db.close()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                delay = self._round()
                self.wake.wait(delay)
                self.wake.clear()
        finally:
            self._db.close()

    def _round(self) -> float:
        """Send what is due; return how long to sleep before the next round."""
        now = time.time()
        rows = self._db.execute(
            "SELECT d.destination, d.sop_instance_uid, o.sop_class_uid, o.file, d.attempts, d.next_try "
            "FROM deliveries d JOIN result_objects o USING (sop_instance_uid) "
            f"WHERE {self._where} ORDER BY o.created_at",
            (PENDING, *self.destinations),
        ).fetchall()
        if not rows:
            return 3600.0
        due: dict[str, list[tuple]] = {}
        next_due = min(row[5] for row in rows)
        for row in rows:
            if row[5] <= now:
                due.setdefault(row[0], []).append(row)
        for destination, items in due.items():
            if self._stop_event.is_set():
                break
            self._send(Destination.parse(destination), items)
        later = [r[0] for r in self._db.execute(f"SELECT MIN(next_try) FROM deliveries d WHERE {self._where}", (PENDING, *self.destinations))]
        if later and later[0] is not None:
            next_due = later[0]
        return max(0.05, next_due - time.time())

    def _send(self, destination: Destination, items: list[tuple]) -> None:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pynetdicom import AE

        key = str(destination)
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for sop_class in sorted({item[2] for item in items}):
            ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        try:
            assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        except (OSError, ValueError) as exc:
            self._failed(key, items, f"cannot connect: {exc}")
            return
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "no association (connection refused or timed out)"
            self._failed(key, items, reason)
            return
        try:
            for n, (_, sop_uid, _, file, attempts, _) in enumerate(items):
                if self._stop_event.is_set():
                    break
                try:
                    ds = pydicom.dcmread(file)
                except (OSError, InvalidDicomError) as exc:
                    # Recorded a moment before its rename, or damaged: a few more tries.
                    if attempts + 1 >= _READ_ATTEMPTS:
                        self._mark(key, sop_uid, FAILED, f"cannot read {file}: {exc}")
                        log.error("cannot forward %s to %s: cannot read %s: %s", sop_uid, key, file, exc)
                    else:
                        self._retry_later(key, sop_uid, f"cannot read {file}: {exc}")
                    continue
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code in _STORED:
                    self._mark(key, sop_uid, SENT, "")
                    self.sent += 1
                    self._failures.pop(key, None)
                    log.info("forwarded %s to %s", file, key)
                elif code is None or not assoc.is_established:
                    # No answer: the association is gone; this object and the rest wait.
                    self._failed(key, items[n:], "association lost during C-STORE")
                    return
                else:
                    self._failed(key, [items[n]], f"C-STORE status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()

    def _failed(self, key: str, items: list[tuple], reason: str) -> None:
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        wait = min(self.max_backoff, self.min_backoff * 2 ** (n - 1))
        now = time.time()
        with _Transaction(self._db):
            self._db.executemany(
                "UPDATE deliveries SET attempts = attempts + 1, next_try = ?, last_error = ? "
                "WHERE sop_instance_uid = ? AND destination = ?",
                [(now + wait, reason, item[1], key) for item in items],
            )
        if items:
            log.warning("forwarding %d objects to %s failed (%s); retrying in %.0f s", len(items), key, reason, wait)

    def _retry_later(self, key: str, sop_uid: str, reason: str) -> None:
        with _Transaction(self._db):
            self._db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_try = ?, last_error = ? "
                "WHERE sop_instance_uid = ? AND destination = ?",
                (time.time() + self.min_backoff, reason, sop_uid, key),
            )

    def _mark(self, key: str, sop_uid: str, state: str, error: str) -> None:
        with _Transaction(self._db):
            self._db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?, sent_at = ? "
                "WHERE sop_instance_uid = ? AND destination = ?",
                (state, error, time.time() if state == SENT else None, sop_uid, key),
            )
