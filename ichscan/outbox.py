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
from ichscan.ledger import Transaction, decode_path, encode_path, printable
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
    probabilities TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT ''
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
CREATE TABLE IF NOT EXISTS studies_to_complete (
    study_instance_uid TEXT PRIMARY KEY,
    since REAL NOT NULL
);
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
        self.state = Path(os.path.abspath(state))
        self.folder = Path(os.path.abspath(folder))
        self.destinations = list(dict.fromkeys(destinations))
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
        known = {decode_path(row[0]) for row in self._db.execute("SELECT file FROM result_objects")}
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
        """Objects made before a destination was added are sent to it too; deliveries
        given up by an earlier run get one more round of tries."""
        with Transaction(self._db):
            self._db.execute(
                "UPDATE deliveries SET state = ?, attempts = 0, next_try = 0 WHERE state = ?", (PENDING, FAILED)
            )
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
            (
                r.sop_instance_uid,
                r.study_instance_uid,
                # Absolute: a later run may start from another folder. encode_path: a
                # name that is not UTF-8 is kept exactly (as the ledger keeps it).
                encode_path(os.path.abspath(r.path)),
                json.dumps(r.probabilities),
                r.series_instance_uid,
                r.sop_class_uid,
            )
            for r in results
            if r.status == OK and r.probabilities and is_valid_uid(r.sop_instance_uid) and is_valid_uid(r.study_instance_uid)
        ]
        if not rows:
            return
        with Transaction(self._db):
            self._db.executemany(
                "INSERT OR REPLACE INTO result_instances (sop_instance_uid, study_instance_uid, path, probabilities, "
                "series_instance_uid, sop_class_uid) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def complete_studies(self, uids: Sequence[str]) -> tuple[list[Path], list[str]]:
        """:meth:`complete_study` for each study, remembered until it succeeds: a study
        whose objects failed (full disk, files gone) or were cut short by a crash is
        tried again by :meth:`complete_unfinished` on the next start.

        Returns the new files and one error line per study that failed.
        """
        uids = [uid for uid in dict.fromkeys(uids) if is_valid_uid(uid)]
        with Transaction(self._db):
            self._db.executemany(
                "INSERT OR IGNORE INTO studies_to_complete (study_instance_uid, since) VALUES (?, ?)",
                [(uid, time.time()) for uid in uids],
            )
        files: list[Path] = []
        errors: list[str] = []
        for uid in uids:
            try:
                files += self.complete_study(uid)
            except Exception as exc:  # noqa: BLE001 - one study's objects must not stop the others
                errors.append(f"study {uid}: cannot make its DICOM results: {type(exc).__name__}: {exc}")
                continue
            with Transaction(self._db):
                self._db.execute("DELETE FROM studies_to_complete WHERE study_instance_uid = ?", (uid,))
        return files, errors

    def unfinished(self) -> list[str]:
        """Studies whose objects an earlier run did not finish."""
        return [uid for (uid,) in self._db.execute("SELECT study_instance_uid FROM studies_to_complete ORDER BY since")]

    def complete_study(self, study_uid: str) -> list[Path]:
        """Build (or revise) the study's SR and key image when their content changed.

        The study-level values come from every recorded result of the study; the source
        files are read for their headers (patient and study modules, references), and a
        file gone since it was screened is referenced by its recorded UIDs.

        Returns the files of the new objects (empty when nothing changed). Raises
        ValueError/OSError with a one-line reason when the objects cannot be made.
        """
        if not is_valid_uid(study_uid):
            return []
        rows = self._db.execute(
            "SELECT sop_instance_uid, path, probabilities, series_instance_uid, sop_class_uid FROM result_instances "
            "WHERE study_instance_uid = ? ORDER BY sop_instance_uid",
            (study_uid,),
        ).fetchall()
        if not rows:
            return []
        rows = [(uid, decode_path(path), *rest) for uid, path, *rest in rows]
        probabilities = {uid: json.loads(p) for uid, _, p, _, _ in rows}
        sr_key = self._content_key(probabilities)
        best_uid = max(probabilities, key=lambda uid: (probabilities[uid]["any"], uid))
        positive = probabilities[best_uid]["any"] >= self.model.thresholds["any"]
        sc_key = hashlib.sha256(
            json.dumps([best_uid, [round(probabilities[best_uid][label], 5) for label in LABELS]]).encode()
        ).hexdigest()
        latest_sr, latest_sc = self._latest(study_uid, SR), self._latest(study_uid, SC)
        need_sr = latest_sr is None or latest_sr["content_key"] != sr_key
        # A key image that could not be made before is tried again even when the SR stands.
        need_sc = positive and (latest_sc is None or latest_sc["content_key"] != sc_key)
        if not need_sr and not need_sc:
            return []
        findings = self._findings(study_uid, rows, probabilities)
        made: list[_NewObject] = []
        if need_sr:
            made.append(self._make_sr(study_uid, findings, sr_key, latest_sr))
        if need_sc:
            sc = self._make_key_image(study_uid, findings, best_uid, sc_key, latest_sc)
            if sc is not None:
                made.append(sc)
        if made:
            self._commit(made)
        return [obj.path for obj in made]

    def _findings(self, study_uid: str, rows: list[tuple], probabilities: dict[str, dict[str, float]]):
        from pydicom import Dataset

        from ichscan.dicom_objects import InstanceFinding, StudyFindings

        thresholds = self.model.thresholds
        instances: list[InstanceFinding] = []
        gone = 0
        for sop_uid, path, _, series_uid, sop_class in rows:
            probs = probabilities[sop_uid]
            positive = {label: probs[label] >= thresholds[label] for label in LABELS}
            header = _read_header(path)
            if header is None or str(header.get("SOPInstanceUID", "")) != sop_uid:
                if not (is_valid_uid(series_uid) and is_valid_uid(sop_class)):
                    log.warning("study %s: %s is gone or changed; it is left out of the report's references", study_uid, path)
                    continue
                # Gone since it was screened (a pruned store): referenced by its recorded UIDs.
                header = Dataset()
                header.StudyInstanceUID, header.SeriesInstanceUID = study_uid, series_uid
                header.SOPInstanceUID, header.SOPClassUID = sop_uid, sop_class
                gone += 1
            instances.append(InstanceFinding(header, probs, positive))
        if gone == len(rows) or not instances:
            raise ValueError(f"study {study_uid}: none of its {len(rows)} screened files can be read any more")
        # Every recorded result counts, read back or not: the same values as the study CSV.
        study_probs = {label: max(p[label] for p in probabilities.values()) for label in LABELS}
        return StudyFindings(
            instances=instances,
            probabilities=study_probs,
            positive={label: study_probs[label] >= thresholds[label] for label in LABELS},
            thresholds=dict(thresholds),
            model_name=self.model.name,
            model_version=self.model.version,
            demo=self.model.demo,
        )

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
                previous = pydicom.dcmread(decode_path(previous_row["file"]), stop_before_pixels=True)
            except (OSError, InvalidDicomError) as exc:
                log.warning(
                    "cannot read the earlier SR %s (%s): the revision will not reference it", decode_path(previous_row["file"]), exc
                )
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

    def _make_key_image(self, study_uid: str, findings, best_uid: str, key: str, latest) -> _NewObject | None:
        import numpy as np
        from pydicom.uid import generate_uid

        from ichscan.dicom_objects import build_key_image
        from ichscan.imaging import brain_window_image
        from ichscan.overlay import render_overlay
        from ichscan.records import Prediction, SliceResult, top_finding

        best = next((i for i in findings.instances if str(i.dataset.SOPInstanceUID) == best_uid), None)
        path = self._path_of(best_uid)
        if best is None:  # gone, and too old a record to reference it
            log.warning("study %s: key image slice %s is gone", study_uid, path)
            return None
        decoded = decode_instance(path)
        if decoded.status != OK or decoded.pixels is None:
            log.warning("study %s: key image slice %s cannot be decoded now: %s", study_uid, path, decoded.error or "file gone")
            return None
        top_label, top_probability = top_finding(best.probabilities, best.positive["any"])
        prediction = Prediction(dict(best.probabilities), dict(best.positive), top_label, top_probability)
        result = SliceResult.of(decoded, prediction)
        overlay = render_overlay(brain_window_image(decoded.pixels, decoded.slope, decoded.intercept), result)
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
        return decode_path(row[0])

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
        with Transaction(self._db):
            for obj in made:
                self._db.execute(
                    "INSERT INTO result_objects (sop_instance_uid, study_instance_uid, kind, revision, series_instance_uid, "
                    "sop_class_uid, content_key, file, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (obj.sop_uid, obj.study_uid, obj.kind, obj.revision, obj.series_uid, obj.sop_class_uid, obj.key, encode_path(str(obj.path)), now),
                )
                self._db.executemany(
                    "INSERT OR IGNORE INTO deliveries (sop_instance_uid, destination, state) VALUES (?, ?, ?)",
                    [(obj.sop_uid, str(d), PENDING) for d in self.destinations],
                )
        for obj in made:
            os.replace(_tmp_name(obj.path), obj.path)
        for folder in {obj.path.parent for obj in made}:
            _fsync_dir(folder)


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


#: Refusals (a failure status, SOP class not accepted, file unreadable) before a delivery
#: is given up; an unreachable destination is retried without limit.
_MAX_REFUSALS = 8
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
        self.state = Path(os.path.abspath(state))
        # Only this run's destinations: one dropped from the command line gets nothing more.
        self.destinations = list(dict.fromkeys(str(d) for d in destinations))
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
                try:
                    delay = self._round()
                except Exception as exc:  # noqa: BLE001 - the thread must outlive any one bad round
                    log.error("forwarding round failed: %s: %s; trying again in %.0f s", type(exc).__name__, exc, self.max_backoff)
                    delay = self.max_backoff
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
        rows = [(*row[:3], decode_path(row[3]), *row[4:]) for row in rows]
        due: dict[str, list[tuple]] = {}
        for row in rows:
            if row[5] <= now:
                due.setdefault(row[0], []).append(row)
        for destination, items in due.items():
            if self._stop_event.is_set():
                break
            self._send(Destination.parse(destination), items)
        (next_due,) = self._db.execute(
            f"SELECT MIN(next_try) FROM deliveries d WHERE {self._where}", (PENDING, *self.destinations)
        ).fetchone()
        return 3600.0 if next_due is None else max(0.05, next_due - time.time())

    def _send(self, destination: Destination, items: list[tuple]) -> None:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.uid import UID
        from pynetdicom import AE

        key = str(destination)
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        # Only the SOP classes being sent, each in Explicit and Implicit VR Little Endian.
        for sop_class in sorted({item[2] for item in items}):
            ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        try:
            assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        except (OSError, ValueError, RuntimeError) as exc:
            self._unreachable(key, items, f"cannot connect: {exc}")
            return
        if not assoc.is_established:
            if assoc.is_aborted:
                # pynetdicom aborts when the peer accepted none of the proposed SOP classes:
                # a refusal of these objects, counted towards giving up, not "unreachable".
                names = ", ".join(sorted({UID(item[2]).name for item in items}))
                for item in items:
                    self._refused(key, item, f"association aborted: {key} does not accept {names}?")
                return
            if assoc.is_rejected:
                reason = "association rejected (check our --calling-ae and its AE title)"
            else:
                reason = "no association (connection refused or timed out)"
            self._unreachable(key, items, reason)
            return
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        try:
            for n, (_, sop_uid, sop_class, file, attempts, _) in enumerate(items):
                if self._stop_event.is_set():
                    break
                if sop_class not in accepted:
                    self._refused(key, items[n], f"{key} does not accept {UID(sop_class).name}")
                    continue
                try:
                    ds = pydicom.dcmread(file)
                except (OSError, InvalidDicomError) as exc:
                    # Recorded a moment before its rename, or damaged: a few more tries.
                    self._refused(key, items[n], f"cannot read {file}: {exc}", retry_in=self.min_backoff)
                    continue
                try:
                    status = assoc.send_c_store(ds)
                except (ValueError, RuntimeError, AttributeError) as exc:
                    status, error = None, f"{type(exc).__name__}: {exc}"
                else:
                    error = "no answer to C-STORE"
                code = getattr(status, "Status", None) if status else None
                if code in _STORED:
                    self._mark(key, sop_uid, SENT, "")
                    self._failures.pop(key, None)
                    log.info("forwarded %s to %s", file, key)
                elif code is None:
                    if not assoc.is_established:
                        # The association is gone: this object and the rest wait for the next round.
                        self._unreachable(key, items[n:], f"association lost during C-STORE ({error})")
                        return
                    self._refused(key, items[n], error)
                else:
                    self._refused(key, items[n], f"C-STORE failed with status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()

    def _backoff(self, key: str) -> float:
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        return min(self.max_backoff, self.min_backoff * 2 ** (n - 1))

    def _unreachable(self, key: str, items: list[tuple], reason: str) -> None:
        """The destination cannot be reached: retried for as long as we run, never given up."""
        wait = self._backoff(key)
        with Transaction(self._db):
            self._db.executemany(
                "UPDATE deliveries SET next_try = ?, last_error = ? WHERE sop_instance_uid = ? AND destination = ?",
                [(time.time() + wait, printable(reason), item[1], key) for item in items],
            )
        log.warning("forwarding %d objects to %s failed (%s); retrying in %.0f s", len(items), key, reason, wait)

    def _refused(self, key: str, item: tuple, reason: str, retry_in: float | None = None) -> None:
        """This object was refused (or cannot be read): retried, then given up after
        :data:`_MAX_REFUSALS` tries; a later run tries a given-up delivery once more."""
        sop_uid, attempts = item[1], item[4] + 1
        if attempts >= _MAX_REFUSALS:
            self._mark(key, sop_uid, FAILED, reason)
            log.error("giving up forwarding %s to %s after %d tries: %s", sop_uid, key, attempts, reason)
            return
        wait = retry_in if retry_in is not None else min(self.max_backoff, self.min_backoff * 2 ** (attempts - 1))
        with Transaction(self._db):
            self._db.execute(
                "UPDATE deliveries SET attempts = ?, next_try = ?, last_error = ? WHERE sop_instance_uid = ? AND destination = ?",
                (attempts, time.time() + wait, printable(reason), sop_uid, key),
            )
        log.warning("forwarding %s to %s failed (%s); try %d of %d in %.0f s", sop_uid, key, reason, attempts, _MAX_REFUSALS, wait)

    def _mark(self, key: str, sop_uid: str, state: str, error: str) -> None:
        with Transaction(self._db):
            self._db.execute(
                "UPDATE deliveries SET state = ?, last_error = ?, sent_at = ? WHERE sop_instance_uid = ? AND destination = ?",
                (state, printable(error), time.time() if state == SENT else None, sop_uid, key),
            )
