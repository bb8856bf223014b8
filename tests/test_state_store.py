"""The state store: lock, schema versions, and state files written by the release before it."""

import json
import sqlite3

import pytest

from ichscan.default_plugins.csv_report import result_row
from ichscan.labels import LABELS
from ichscan.state import FileIdentity, Ledger, StateError, StateStore
from ichscan.state.forwarder import Destination, Forwarder
from ichscan.state.outbox import ModelInfo, Outbox
from ichscan.state.schema import MIGRATIONS, USER_VERSION
from test_ledger import ok_result

# The state file of the release at d821cff, as its Ledger and Outbox created it (read back
# from sqlite_master of a file they wrote; ``PRAGMA user_version`` was 1).
D821CFF_SCHEMA = """
CREATE TABLE files (
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
    p_epidural REAL, p_intraparenchymal REAL, p_intraventricular REAL, p_subarachnoid REAL, p_subdural REAL, p_any REAL,
    csv_row TEXT
);
CREATE INDEX files_path ON files (path, id);
CREATE INDEX files_done ON files (done_seq);
CREATE INDEX files_study ON files (study_instance_uid);
CREATE TABLE studies (
    study_instance_uid TEXT PRIMARY KEY,
    summarised_at REAL NOT NULL
);
CREATE TABLE result_instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    probabilities TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT ''
);
CREATE INDEX result_instances_study ON result_instances (study_instance_uid);
CREATE TABLE result_objects (
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
CREATE INDEX result_objects_study ON result_objects (study_instance_uid, kind, revision);
CREATE TABLE studies_to_complete (
    study_instance_uid TEXT PRIMARY KEY,
    since REAL NOT NULL
);
CREATE TABLE deliveries (
    sop_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    sent_at REAL,
    PRIMARY KEY (sop_instance_uid, destination)
);
PRAGMA user_version=1;
"""
STUDY = "1.2.3"
CT = "1.2.840.10008.5.1.4.1.1.2"
PACS = "PACS@127.0.0.1:104"


def write_d821cff_state(path, tmp_path):
    """A watch run with DICOM results, as the d821cff code left it: three files screened
    (two ok, one error), one in flight, the study summarised, its SR recorded and pending
    delivery; and one instance only the outbox knew (a batch run on the same file)."""
    db = sqlite3.connect(path)
    db.executescript(D821CFF_SCHEMA)
    screened = [ok_result(str(tmp_path / "a.dcm"), "1.2.3.1", 0.9), ok_result(str(tmp_path / "b.dcm"), "1.2.3.2", 0.2)]
    error = ok_result(str(tmp_path / "c.txt"), "", 0.0)
    error.status, error.error, error.probabilities, error.positive = "error", "not a DICOM file", None, None
    for seq, result in enumerate([*screened, error], start=1):
        probs = result.probabilities or {}
        db.execute(
            f"""INSERT INTO files (path, size, mtime_ns, state, queued_at, done_seq, done_at, status, error,
                sop_instance_uid, study_instance_uid, positive, {", ".join(f"p_{label}" for label in LABELS)}, csv_row)
                VALUES (?, 100, 1000, 'done', 10.0, ?, 20.0, ?, ?, ?, ?, ?, {", ".join("?" * len(LABELS))}, ?)""",
            (
                result.path, seq, result.status, result.error, result.sop_instance_uid, result.study_instance_uid,
                int(result.is_positive) if result.probabilities is not None else None,
                *(probs.get(label) for label in LABELS),
                json.dumps(["" if c is None else str(c) for c in result_row(result)]),
            ),
        )  # fmt: skip
    db.execute(
        "INSERT INTO files (path, size, mtime_ns, state, queued_at) VALUES (?, 5, 6, 'queued', 30.0)",
        (str(tmp_path / "d.dcm"),),
    )
    db.execute("INSERT INTO studies VALUES (?, 25.0)", (STUDY,))
    for result in screened:
        db.execute(
            "INSERT INTO result_instances VALUES (?, ?, ?, ?, ?, ?)",
            (result.sop_instance_uid, STUDY, result.path, json.dumps(result.probabilities), "1.2.3.4", CT),
        )
    batch_only = {label: 0.4 for label in LABELS}
    db.execute(
        "INSERT INTO result_instances VALUES ('1.2.3.3', ?, ?, ?, '1.2.3.4', ?)",
        (STUDY, str(tmp_path / "e.dcm"), json.dumps(batch_only), CT),
    )
    db.execute(
        "INSERT INTO result_objects VALUES ('1.2.3.99', ?, 'sr', 1, '1.2.3.98', '1.2.840.10008.5.1.4.1.1.88.33', 'k', ?, 40.0)",
        (STUDY, str(tmp_path / "dicom" / STUDY / "1.2.3.99.dcm")),
    )
    db.execute("INSERT INTO deliveries (sop_instance_uid, destination, state) VALUES ('1.2.3.99', ?, 'pending')", (PACS,))
    db.execute("INSERT INTO studies_to_complete VALUES ('7.7', 41.0)")
    db.commit()
    db.close()
    return screened, error, batch_only


def test_a_state_file_of_the_previous_release_is_migrated_and_reads_back(tmp_path):
    state = tmp_path / "state.sqlite"
    screened, error, batch_only = write_d821cff_state(state, tmp_path)
    for _ in range(2):  # the second open finds nothing to migrate and changes nothing
        with StateStore(state) as store:
            ledger = Ledger(store)
            # Screened files: done for exactly their identity, the one in flight is not.
            assert ledger.is_done(FileIdentity(screened[0].path, 100, 1000)).status == "ok"
            assert ledger.is_done(FileIdentity(error.path, 100, 1000)).status == "error"
            assert ledger.is_done(FileIdentity(screened[0].path, 101, 1000)) is None
            assert ledger.is_done(FileIdentity(str(tmp_path / "d.dcm"), 5, 6)) is None
            assert [e.path for e in ledger.queued()] == [str(tmp_path / "d.dcm")]
            # The moved batch-only instance counts as ok but has no CSV row of the watch run.
            assert ledger.counts() == {"ok": 3, "error": 1}
            assert [row[0] for row in ledger.csv_rows()] == [screened[0].path, screened[1].path, error.path]
            # Study summaries and the summary bookkeeping.
            summary = ledger.study_summaries({label: 0.5 for label in LABELS})[STUDY]
            assert (summary.slices, summary.positive_slices, summary.top_label) == (3, 1, "subdural")
            assert summary.max_probabilities["any"] == pytest.approx(0.9)
            assert ledger.summarised_studies() == {STUDY}
            # Outbox instances: from files, with the series and SOP class result_instances had.
            instances = ledger.instance_results(STUDY)
            assert [(i.sop_instance_uid, i.path, i.series_instance_uid, i.sop_class_uid) for i in instances] == [
                ("1.2.3.1", screened[0].path, "1.2.3.4", CT),
                ("1.2.3.2", screened[1].path, "1.2.3.4", CT),
                ("1.2.3.3", str(tmp_path / "e.dcm"), "1.2.3.4", CT),
            ]
            assert instances[0].probabilities == screened[0].probabilities
            assert instances[2].probabilities == batch_only
            # The moved row never marks a real file as screened (its identity is unknown).
            assert ledger.is_done(FileIdentity(str(tmp_path / "e.dcm"), 100, 1000)) is None
            # Outbox objects: the unfinished study, the recorded SR, its pending delivery.
            model = ModelInfo("m", "v", True, {label: 0.5 for label in LABELS})
            outbox = Outbox(store, tmp_path / "dicom", [Destination.parse(PACS)], model)
            assert outbox.unfinished() == ["7.7"]
            assert outbox._latest(STUDY, "sr")["sop_instance_uid"] == "1.2.3.99"
            assert Forwarder(store, [Destination.parse(PACS)])._pending_count() == 1
            assert store.table_versions() == {m.table: m.version for m in MIGRATIONS}
    db = sqlite3.connect(state)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "result_instances" not in tables  # results are stored once
    # Above the old release's version 1: that release refuses the file instead of misreading it.
    assert db.execute("PRAGMA user_version").fetchone()[0] == USER_VERSION > 1
    db.close()


def test_a_second_store_on_the_same_file_is_refused_until_the_first_closes(tmp_path):
    store = StateStore(tmp_path / "state.sqlite")
    with pytest.raises(StateError, match="in use by another ichscan process"):
        StateStore(tmp_path / "state.sqlite")
    store.close()
    StateStore(tmp_path / "state.sqlite").close()


def test_a_table_from_a_newer_release_is_refused(tmp_path):
    StateStore(tmp_path / "state.sqlite").close()
    db = sqlite3.connect(tmp_path / "state.sqlite")
    db.execute("UPDATE schema_versions SET version = 99 WHERE name = 'deliveries'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="newer ichscan"):
        StateStore(tmp_path / "state.sqlite")
    # Refused without keeping the lock.
    db = sqlite3.connect(tmp_path / "state.sqlite")
    db.execute("UPDATE schema_versions SET version = 1 WHERE name = 'deliveries'")
    db.commit()
    db.close()
    StateStore(tmp_path / "state.sqlite").close()


def test_a_failed_transaction_leaves_nothing(tmp_path):
    with StateStore(tmp_path / "state.sqlite") as store:
        with pytest.raises(RuntimeError):
            with store.transaction():
                store.execute("INSERT INTO studies VALUES ('1.2', 1.0)")
                raise RuntimeError("boom")
        assert store.query("SELECT * FROM studies") == []


def test_record_screened_does_not_record_a_result_twice(tmp_path):
    a = tmp_path / "a.dcm"
    a.write_bytes(b"x" * 10)
    result = ok_result(str(a), "1.1", 0.8)
    with Ledger(tmp_path / "state.sqlite") as ledger:
        ledger.record_screened([result])
        ledger.record_screened([result])  # watch recorded it already: nothing new
        st = a.stat()
        assert ledger.is_done(FileIdentity(str(a), st.st_size, st.st_mtime_ns)).status == "ok"
        assert len(ledger.instance_results("1.2.3")) == 1
        changed = ok_result(str(a), "1.1", 0.3)  # screened again with another model
        ledger.record_screened([changed])
        assert ledger.instance_results("1.2.3")[0].probabilities["any"] == 0.3
        assert list(ledger.csv_rows()) == []
