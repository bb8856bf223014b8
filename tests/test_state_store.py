"""The state store: lock, schema versions, and state files written by the release before it."""

import shutil
import sqlite3
from pathlib import Path

import pytest

from ichscan.default_plugins.csv_report import RESULT_COLUMNS
from ichscan.labels import LABELS
from ichscan.state import FileIdentity, Ledger, StateError, StateStore
from ichscan.state.forwarder import Destination, Forwarder
from ichscan.state.outbox import ModelInfo, Outbox
from ichscan.state.schema import MIGRATIONS, USER_VERSION
from test_ledger import ok_result

#: Written by the release at d821cff (see tests/data/make_state_d821cff.py for its content).
D821CFF_STATE = Path(__file__).parent / "data" / "state_d821cff.sqlite"
STUDY = "1.2.3"
CT = "1.2.840.10008.5.1.4.1.1.2"
PACS = "PACS@127.0.0.1:104"


def test_a_state_file_of_the_previous_release_is_migrated_and_reads_back(tmp_path):
    state = tmp_path / "state.sqlite"
    shutil.copyfile(D821CFF_STATE, state)
    for _ in range(2):  # the second open finds nothing to migrate and changes nothing
        with StateStore(state) as store:
            ledger = Ledger(store)
            # Screened files: done for exactly their identity; the one in flight is not.
            assert ledger.is_done(FileIdentity("/legacy/a.dcm", 100, 1000)).status == "ok"
            assert ledger.is_done(FileIdentity("/legacy/c.txt", 100, 1000)).status == "error"
            assert ledger.is_done(FileIdentity("/legacy/a.dcm", 101, 1000)) is None
            assert ledger.is_done(FileIdentity("/legacy/d.dcm", 5, 6)) is None
            assert [(e.path, e.size) for e in ledger.queued()] == [("/legacy/d.dcm", 5)]
            # The instance only the outbox knew counts as ok, with no row in the watch CSV.
            assert ledger.counts() == {"ok": 3, "error": 1}
            status = RESULT_COLUMNS.index("status")
            rows = [(row[0], row[1], row[status]) for row in ledger.csv_rows()]
            assert rows == [("/legacy/a.dcm", "1.2.3.1", "ok"), ("/legacy/b.dcm", "1.2.3.2", "ok"), ("/legacy/c.txt", "", "error")]
            # Study summaries and the summary bookkeeping.
            summary = ledger.study_summaries({label: 0.5 for label in LABELS})[STUDY]
            assert (summary.slices, summary.positive_slices, summary.top_label) == (3, 1, "subdural")
            assert summary.max_probabilities["any"] == pytest.approx(0.9)
            assert ledger.summarised_studies() == {STUDY}
            # The outbox's instances: from files, with the series and SOP class result_instances had.
            instances = ledger.instance_results(STUDY)
            assert [(i.sop_instance_uid, i.path, i.series_instance_uid, i.sop_class_uid) for i in instances] == [
                ("1.2.3.1", "/legacy/a.dcm", "1.2.3.4", CT),
                ("1.2.3.2", "/legacy/b.dcm", "1.2.3.4", CT),
                ("1.2.3.3", "/legacy/e.dcm", "1.2.3.4", CT),
            ]
            assert [i.probabilities["any"] for i in instances] == [0.9, 0.2, 0.4]
            assert instances[0].probabilities["subdural"] == 0.9 and instances[0].probabilities["epidural"] == 0.1
            # The moved row never marks a real file as screened (its identity is unknown).
            assert ledger.is_done(FileIdentity("/legacy/e.dcm", 100, 1000)) is None
            # Outbox objects: the unfinished study, the recorded SR, its pending delivery.
            model = ModelInfo("simplecnn", "demo", True, {label: 0.5 for label in LABELS})
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


def test_batch_with_dicom_results_on_a_state_file_in_use_stops_with_one_line(tmp_path):
    """The runner takes the lock (not a reporter): a second run on the same file stops with
    the store's one-line error and writes no DICOM results."""
    from ichscan.pipeline import BatchOptions, RunError, run_batch
    from ichscan.reporting import ResultsOutput
    from ichscan.synth import generate

    generate(tmp_path / "in", studies=1, slices=2, seed=5, size=64)
    opts = BatchOptions(
        input_dir=tmp_path / "in",
        out=tmp_path / "results.csv",
        overlays_for="none",
        workers=0,
        progress=False,
        results=ResultsOutput(dicom_out=tmp_path / "dicom"),
    )
    with StateStore(tmp_path / "ichscan-state.sqlite"):
        with pytest.raises(RunError, match="in use by another ichscan process") as err:
            run_batch(opts)
        assert "\n" not in str(err.value)
    assert not any((tmp_path / "dicom").rglob("*.dcm"))
    run_batch(opts)  # released: the same run now makes its results
    assert any((tmp_path / "dicom").rglob("*.dcm"))


def test_a_state_file_that_cannot_be_written_is_not_called_foreign(tmp_path):
    """A full disk at open (here: a file size limit of 0 bytes, which SQLite meets as a
    failed write) is reported as the file not opening, not as a file of something else."""
    import resource
    import subprocess
    import sys

    code = "import sys\nfrom ichscan.state import StateError, StateStore\ntry:\n    StateStore(sys.argv[1])\nexcept StateError as exc:\n    print(exc)\n"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))  # noqa: E731
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "state.sqlite")], capture_output=True, text=True, preexec_fn=limit, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"cannot open state file {tmp_path / 'state.sqlite'}: "), proc.stdout
    assert "not an ichscan ledger" not in proc.stdout


def test_a_state_file_that_stops_committing_ends_the_run_with_one_line_and_loses_nothing(tmp_path, monkeypatch):
    """The ledger's commit failing mid-run (SQLite's 'database or disk is full') ends the run
    with a one-line RunError, not a traceback; the next run gives every file one row."""
    from ichscan.pipeline import BatchOptions, RunError, run_batch
    from ichscan.state.ledger import Ledger as LedgerClass
    from ichscan.synth import generate
    from helpers import read_csv

    generate(tmp_path / "in", studies=1, slices=4, seed=5, size=64)
    opts = BatchOptions(input_dir=tmp_path / "in", out=tmp_path / "results.csv", overlays_for="none", workers=0, batch_size=1, progress=False)
    real, calls = LedgerClass.record, []

    def full_after_one(self, rows):
        calls.append(len(rows))
        if len(calls) > 1:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, rows)

    monkeypatch.setattr(LedgerClass, "record", full_after_one)
    with pytest.raises(RunError, match=r"state file .*state\.sqlite: database or disk is full; stopped") as err:
        run_batch(opts)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(LedgerClass, "record", real)
    opts.resume = True
    run_batch(opts)
    rows = read_csv(tmp_path / "results.csv")
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in (tmp_path / "in").rglob("*.dcm"))
