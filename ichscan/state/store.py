"""The SQLite state file: one owner of its connection, lock, transactions and schema.

Whoever runs the screening (``batch`` with DICOM results, ``watch``, ``serve-scp``) opens
one :class:`StateStore` and hands it to the ledger, the outbox and the forwarder, which
all use its one connection. It

* holds ``<state>.lock`` exclusively, so a second run on the same file stops at once with
  a one-line error (two runs would screen and send everything twice);
* opens the database in WAL mode with ``synchronous=FULL``: a committed transaction
  survives a SIGKILL and a power cut;
* serialises every use of the connection with one re-entrant lock (the forwarder thread
  shares it with the screening thread), and runs transactions as ``BEGIN IMMEDIATE`` ...
  ``COMMIT``;
* brings the schema up to date on open: ``schema_versions`` records a version per table,
  and the migrations of :mod:`ichscan.state.schema` newer than it are applied in order,
  each in the transaction that records its version.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ichscan.state.schema import LEGACY_USER_VERSION, MIGRATIONS, USER_VERSION

log = logging.getLogger(__name__)

#: The state file's name beside --out when --state is not given.
DEFAULT_STATE_NAME = "ichscan-state.sqlite"


def state_files(state: Path) -> list[Path]:
    """The state file and the files SQLite and the lock keep beside it."""
    return [state.with_name(state.name + suffix) for suffix in ("", "-wal", "-shm", "-journal", ".lock")]


class StateError(Exception):
    """The state file cannot be opened or used; the message is one line."""


class StateStore:
    """The open state file; share one instance per process, close it once.

    Parameters
    ----------
    path
        The database file (created with its folder when missing).

    Raises
    ------
    StateError
        When the file is not an ichscan state file, is from a newer version, or another
        process holds it.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(os.path.abspath(path))
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._mutex = threading.RLock()
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fh = open(self.lock_path, "a+")  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise StateError(f"cannot open state file {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_fh.close()
            raise StateError(
                f"state file {self.path} is in use by another ichscan process (batch, watch or serve-scp)"
            ) from None
        try:
            # isolation_level=None: transactions are explicit; check_same_thread=False: the
            # forwarder thread uses this connection too, serialised by self._mutex.
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed result survives a power cut, not only a killed process.
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.OperationalError as exc:
            # The file could not be read or written (disk full, I/O error, read-only), which
            # says nothing about what it holds.
            self._close_connection(checkpoint=False)
            self._lock_fh.close()
            raise StateError(f"cannot open state file {self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            self._close_connection(checkpoint=False)
            self._lock_fh.close()
            raise StateError(f"state file {self.path} is not an ichscan ledger: {exc}") from None
        except StateError:
            self._close_connection(checkpoint=False)
            self._lock_fh.close()
            raise

    # -- schema ------------------------------------------------------------------------

    def _migrate(self) -> None:
        db = self._db
        assert db is not None
        user_version = db.execute("PRAGMA user_version").fetchone()[0]
        if user_version > USER_VERSION:
            raise StateError(f"state file {self.path} was written by a newer ichscan (schema {user_version})")
        db.execute("CREATE TABLE IF NOT EXISTS schema_versions (name TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        versions = self.table_versions()
        newest: dict[str, int] = {}
        for migration in MIGRATIONS:
            newest[migration.table] = max(newest.get(migration.table, 0), migration.version)
        for table, version in versions.items():
            if version > newest.get(table, 0):
                raise StateError(f"state file {self.path} was written by a newer ichscan ({table} schema {version})")
        for migration in MIGRATIONS:
            if versions.get(migration.table, 0) >= migration.version:
                continue
            with self.transaction():
                migration.apply(db)
                db.execute(
                    "INSERT INTO schema_versions (name, version) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET version = excluded.version",
                    (migration.table, migration.version),
                )
            versions[migration.table] = migration.version
            log.debug("state file %s: %s at schema %d (%s)", self.path, migration.table, migration.version, migration.why)
        if user_version != USER_VERSION:
            # Past LEGACY_USER_VERSION, so the release before schema_versions (which only
            # knew user_version) refuses the file instead of misreading it.
            assert user_version in (0, LEGACY_USER_VERSION)
            db.execute(f"PRAGMA user_version={USER_VERSION}")

    def table_versions(self) -> dict[str, int]:
        """``table -> schema version`` as recorded in the file."""
        return dict(self.query("SELECT name, version FROM schema_versions"))

    # -- use ---------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run one statement and return all its rows."""
        with self._mutex:
            return self._connection().execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        """The first row of one statement, or ``None``."""
        with self._mutex:
            return self._connection().execute(sql, params).fetchone()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int | None:
        """Run one changing statement; returns the row id it inserted (if any).
        Outside :meth:`transaction` it commits on its own."""
        with self._mutex:
            return self._connection().execute(sql, params).lastrowid

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._mutex:
            self._connection().executemany(sql, rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """``with store.transaction():`` BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an
        exception; other threads wait until it ends. Not nestable."""
        with self._mutex:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def watermark(self, name: str) -> str | None:
        """The watermark recorded under ``name`` (e.g. where ``pull --since last`` resumes)."""
        row = self.query_one("SELECT value FROM watermarks WHERE name = ?", (name,))
        return None if row is None else str(row[0])

    def set_watermark(self, name: str, value: str) -> None:
        import time

        with self.transaction():
            self.execute(
                "INSERT INTO watermarks (name, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (name, value, time.time()),
            )

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError(f"state file {self.path} is closed")
        return self._db

    # -- close -------------------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint and close the database, then release the lock (idempotent)."""
        with self._mutex:
            self._close_connection(checkpoint=True)
        if not self._lock_fh.closed:
            self._lock_fh.close()

    def _close_connection(self, *, checkpoint: bool) -> None:
        if self._db is None:
            return
        if checkpoint:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.DatabaseError as exc:
                log.warning("state file checkpoint failed: %s", exc)
        self._db.close()
        self._db = None

    @property
    def closed(self) -> bool:
        return self._db is None

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
