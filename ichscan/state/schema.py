"""The state file's tables and the migrations that build them, oldest first.

:class:`ichscan.state.store.StateStore` applies, on open, every migration whose version is
above the one ``schema_versions`` records for its table. A migration never edits an
earlier one: a file written by any release is brought forward by the same steps. The
version-1 steps are the tables of the release before ``schema_versions`` (``CREATE ...
IF NOT EXISTS``, so they adopt a file of that release as it is).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from ichscan.labels import LABELS

#: ``PRAGMA user_version`` of the release before ``schema_versions``: it refuses a file
#: above it, which is what keeps it from misreading a migrated file.
LEGACY_USER_VERSION = 1
USER_VERSION = 2

QUEUED = "queued"
DONE = "done"


@dataclass(frozen=True)
class Migration:
    table: str
    version: int
    why: str
    apply: Callable[[sqlite3.Connection], None]


def _script(sql: str) -> Callable[[sqlite3.Connection], None]:
    def apply(db: sqlite3.Connection) -> None:
        # One statement at a time: executescript() would COMMIT the migration's transaction.
        for statement in sql.split(";"):
            if statement.strip():
                db.execute(statement)

    return apply


_FILES_V1 = f"""
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL,
    queued_at REAL NOT NULL,
    done_seq INTEGER,
    done_at REAL,
    status TEXT,
    error TEXT,
    sop_instance_uid TEXT,
    study_instance_uid TEXT,
    positive INTEGER,
    {", ".join(f"p_{label} REAL" for label in LABELS)},
    csv_row TEXT
);
CREATE INDEX IF NOT EXISTS files_path ON files (path, id);
CREATE INDEX IF NOT EXISTS files_done ON files (done_seq);
CREATE INDEX IF NOT EXISTS files_study ON files (study_instance_uid)
"""

_STUDIES_V1 = """
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    summarised_at REAL NOT NULL
)
"""

_RESULT_OBJECTS_V1 = """
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
CREATE INDEX IF NOT EXISTS result_objects_study ON result_objects (study_instance_uid, kind, revision)
"""

_STUDIES_TO_COMPLETE_V1 = """
CREATE TABLE IF NOT EXISTS studies_to_complete (
    study_instance_uid TEXT PRIMARY KEY,
    since REAL NOT NULL
)
"""

_DELIVERIES_V1 = """
CREATE TABLE IF NOT EXISTS deliveries (
    sop_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    sent_at REAL,
    PRIMARY KEY (sop_instance_uid, destination)
)
"""


_WATERMARKS_V1 = """
CREATE TABLE IF NOT EXISTS watermarks (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
)
"""


_MESSAGES_V1 = """
CREATE TABLE IF NOT EXISTS messages (
    event_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    content_key TEXT NOT NULL,
    positive INTEGER,
    body BLOB NOT NULL,
    content_type TEXT NOT NULL,
    headers TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_study ON messages (kind, study_instance_uid, revision)
"""

_MESSAGE_DELIVERIES_V1 = """
CREATE TABLE IF NOT EXISTS message_deliveries (
    event_id TEXT NOT NULL REFERENCES messages (event_id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    sent_at REAL,
    PRIMARY KEY (event_id, destination)
);
CREATE INDEX IF NOT EXISTS message_deliveries_state ON message_deliveries (state, destination)
"""


def _files_v2(db: sqlite3.Connection) -> None:
    """Per-instance results live in ``files`` only: it gains the two columns the outbox's
    ``result_instances`` had, and that table's rows move in.

    A row whose instance ``files`` already holds as an ``ok`` result (watch recorded both)
    only lends its series and SOP class. Any other row (a batch run, which kept results
    only there) becomes a ``done``/``ok`` row with an unknown identity (size and mtime
    -1, so it never marks a real file as screened) and no CSV row (it was never in a
    watch CSV).
    """
    db.execute("ALTER TABLE files ADD COLUMN series_instance_uid TEXT")
    db.execute("ALTER TABLE files ADD COLUMN sop_class_uid TEXT")
    has_old = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'result_instances'").fetchone()
    if not has_old:
        return
    db.execute(
        """UPDATE files SET
               series_instance_uid = (SELECT r.series_instance_uid FROM result_instances r
                                      WHERE r.sop_instance_uid = files.sop_instance_uid),
               sop_class_uid = (SELECT r.sop_class_uid FROM result_instances r
                                WHERE r.sop_instance_uid = files.sop_instance_uid)
           WHERE state = ? AND status = 'ok'
             AND sop_instance_uid IN (SELECT sop_instance_uid FROM result_instances)""",
        (DONE,),
    )
    now = time.time()
    columns = ", ".join(f"p_{label}" for label in LABELS)
    values = ", ".join(f"json_extract(r.probabilities, '$.{label}')" for label in LABELS)
    db.execute(
        f"""INSERT INTO files (path, size, mtime_ns, state, queued_at, done_seq, done_at, status, error,
                               sop_instance_uid, study_instance_uid, {columns}, series_instance_uid, sop_class_uid)
            SELECT r.path, -1, -1, ?, ?, (SELECT COALESCE(MAX(done_seq), 0) FROM files) + r.rowid, ?, 'ok', '',
                   r.sop_instance_uid, r.study_instance_uid, {values}, r.series_instance_uid, r.sop_class_uid
            FROM result_instances r
            WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.sop_instance_uid = r.sop_instance_uid
                              AND f.state = ? AND f.status = 'ok')
            ORDER BY r.rowid""",
        (DONE, now, now, DONE),
    )
    db.execute("DROP TABLE result_instances")


MIGRATIONS: tuple[Migration, ...] = (
    Migration("files", 1, "screened files (the watch ledger)", _script(_FILES_V1)),
    Migration("studies", 1, "studies whose summary row was written", _script(_STUDIES_V1)),
    Migration("result_objects", 1, "SR and key images made per study", _script(_RESULT_OBJECTS_V1)),
    Migration("studies_to_complete", 1, "studies whose DICOM results are unfinished", _script(_STUDIES_TO_COMPLETE_V1)),
    Migration("deliveries", 1, "C-STORE deliveries per object and destination", _script(_DELIVERIES_V1)),
    Migration("files", 2, "results stored once: result_instances merged into files", _files_v2),
    Migration("files", 3, "the series probability of a model with a series head", _script("ALTER TABLE files ADD COLUMN p_series_any REAL")),
    Migration("watermarks", 1, "where a source resumes (pull --since last: StudyDate/StudyTime per server)", _script(_WATERMARKS_V1)),
    Migration("messages", 1, "study results to POST (webhook notifications; FHIR later), one row per distinct result", _script(_MESSAGES_V1)),
    Migration("message_deliveries", 1, "HTTP deliveries per message and destination", _script(_MESSAGE_DELIVERIES_V1)),
)
