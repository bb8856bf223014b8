"""The SQLite ledger behind ``ichscan watch`` and the CSV reconciliation it drives."""

import csv
import os
import sqlite3

import pytest

from ichscan.default_plugins.csv_report import RESULT_COLUMNS, result_row
from ichscan.state.ledger import (
    DONE,
    QUEUED,
    FileIdentity,
    Ledger,
    LedgerError,
    decode_path,
    encode_path,
    printable,
    reconcile_csv,
    repair_torn_csv,
)
from ichscan.labels import LABELS
from ichscan.records import Instance, Prediction, SliceResult, Status
from ichscan.reporting import StudyTable

STUDY = "1.2.3"


def ok_result(path, sop, p_any=0.7, study=STUDY):
    probs = {label: 0.1 for label in LABELS}
    probs["subdural"] = probs["any"] = p_any
    positive = {label: probs[label] >= 0.5 for label in LABELS}
    top = "subdural" if positive["any"] else "none"
    return SliceResult(
        Instance(path, sop_instance_uid=sop, study_instance_uid=study, series_instance_uid="1.2.3.4", instance_number=1),
        Status.OK,
        prediction=Prediction(probs, positive, top, p_any),
    )


def screen(ledger, results, sizes=None):
    """Queue and record ``results`` as the watcher does; returns their identities."""
    idents = [FileIdentity(r.path, (sizes or {}).get(r.path, 100), 1_000) for r in results]
    ids = ledger.queue(idents)
    ledger.record((ids[r.path], r, result_row(r)) for r in results)
    return idents


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_done_only_for_the_same_identity(tmp_path):
    with Ledger(tmp_path / "state.sqlite") as ledger:
        ident = FileIdentity("/in/a.dcm", 100, 1_000)
        assert ledger.is_done(ident) is None
        screen(ledger, [ok_result("/in/a.dcm", "1.1")])
        assert ledger.is_done(ident).status == "ok"
        # Rewritten in place (new size or mtime): a new file that needs screening.
        assert ledger.is_done(FileIdentity("/in/a.dcm", 101, 1_000)) is None
        assert ledger.is_done(FileIdentity("/in/a.dcm", 100, 2_000)) is None


def test_results_survive_reopening_and_queued_rows_are_reused(tmp_path):
    state = tmp_path / "state.sqlite"
    with Ledger(state) as ledger:
        screen(ledger, [ok_result("/in/a.dcm", "1.1")])
        ids = ledger.queue([FileIdentity("/in/b.dcm", 5, 6)])  # in flight when "killed"
    with Ledger(state) as ledger:
        queued = ledger.queued()
        assert [(e.path, e.state) for e in queued] == [("/in/b.dcm", QUEUED)]
        # Queued again after the restart: the same row, not a second one.
        again = ledger.queue([FileIdentity("/in/b.dcm", 7, 8)])
        assert again == ids
        assert ledger.counts() == {"ok": 1}
    rows = sqlite3.connect(state).execute("SELECT path, state, size FROM files ORDER BY id").fetchall()
    assert rows == [("/in/a.dcm", DONE, 100), ("/in/b.dcm", QUEUED, 7)]


def test_a_second_process_cannot_share_the_ledger(tmp_path):
    with Ledger(tmp_path / "state.sqlite"):
        with pytest.raises(LedgerError, match="in use by another ichscan process"):
            Ledger(tmp_path / "state.sqlite")
    Ledger(tmp_path / "state.sqlite").close()  # released on close


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path):
    bogus = tmp_path / "state.sqlite"
    bogus.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(LedgerError, match="not an ichscan ledger"):
        Ledger(bogus)


def test_study_summaries_match_the_study_table(tmp_path):
    results = [ok_result(f"/in/{i}.dcm", f"1.{i}", p_any=p) for i, p in enumerate([0.2, 0.9, 0.6])]
    results.append(ok_result("/in/other.dcm", "2.1", p_any=0.1, study="9.9"))
    results.append(SliceResult.failed("/in/bad", "not a DICOM file"))
    table = StudyTable({label: 0.5 for label in LABELS})
    table.add(results)
    with Ledger(tmp_path / "state.sqlite") as ledger:
        screen(ledger, results)
        restored = ledger.study_summaries({label: 0.5 for label in LABELS})
    assert set(restored) == set(table.studies) == {STUDY, "9.9"}
    for uid, study in table.studies.items():
        got = restored[uid]
        assert (got.slices, got.positive_slices, got.top_label) == (study.slices, study.positive_slices, study.top_label)
        assert got.max_probabilities == pytest.approx(study.max_probabilities)


def test_reconcile_appends_missing_rows_once_and_cuts_a_torn_line(tmp_path):
    out = tmp_path / "results.csv"
    results = [ok_result(f"/in/{i}.dcm", f"1.{i}") for i in range(5)]
    with Ledger(tmp_path / "state.sqlite") as ledger:
        screen(ledger, results)
        # As after a SIGKILL mid-write: two rows made it, the third is half written.
        with open(out, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(RESULT_COLUMNS)
            writer.writerows(result_row(r) for r in results[:2])
            fh.write("/in/2.dcm,1.2,1.2.3,1.2.3.4,1,o")
        repair = reconcile_csv(out, ledger, RESULT_COLUMNS)
        assert repair.torn_bytes == len("/in/2.dcm,1.2,1.2.3,1.2.3.4,1,o")
        assert repair.appended == 3
        header, rows = read_rows(out)
        assert tuple(header) == RESULT_COLUMNS
        assert [r[0] for r in rows] == [f"/in/{i}.dcm" for i in range(5)]
        assert rows == [[str(c) for c in result_row(r)] for r in results]
        # Idempotent: a second start changes nothing.
        before = out.read_bytes()
        assert reconcile_csv(out, ledger, RESULT_COLUMNS).appended == 0
        assert out.read_bytes() == before


def test_a_disk_full_mid_batch_leaves_no_torn_row_and_the_rows_follow_when_there_is_room(tmp_path, monkeypatch):
    """The live CSV reporter meets a full disk in the middle of a batch (a short write, then
    ENOSPC, as a file system does): the half-written rows are cut, so no half row ends up
    before later rows, and once there is room the rows that failed are written from the
    ledger with the next batch, each once."""
    from ichscan.default_plugins.csv_report import CsvReporter

    out = tmp_path / "results.csv"
    table = StudyTable({label: 0.5 for label in LABELS})
    batches = [[ok_result(f"/in/{b}-{i}.dcm", f"1.{b}.{i}") for i in range(30)] for b in range(4)]
    real_write, room = os.write, {"bytes": None}

    def disk(fd, data):
        if room["bytes"] is None or fd != reporter._fh.fileno():
            return real_write(fd, data)
        if room["bytes"] == 0:
            raise OSError(28, "No space left on device")
        n = real_write(fd, bytes(data[: room["bytes"]]))
        room["bytes"] -= n
        return n

    monkeypatch.setattr(os, "write", disk)
    with Ledger(tmp_path / "state.sqlite") as ledger:
        reporter = CsvReporter(out, None, ledger=ledger, live=True)
        for b, batch in enumerate(batches):
            screen(ledger, batch)  # the ledger first, as Pipeline.report does
            if b == 1:
                room["bytes"] = 1000  # three rows and a half fit
                with pytest.raises(OSError, match="cannot append to .*results.csv: No space left on device; its rows are in the state file"):
                    reporter.on_results(batch, table)
                assert [len(row) for row in read_rows(out)[1]] == [len(RESULT_COLUMNS)] * 30  # cut back to batch 0
                room["bytes"] = None  # room again
            else:
                reporter.on_results(batch, table)
        reporter.on_finish(None, table)
    header, rows = read_rows(out)
    assert header == list(RESULT_COLUMNS) and all(len(row) == len(RESULT_COLUMNS) for row in rows)
    assert sorted(row[1] for row in rows) == sorted(r.sop_instance_uid for batch in batches for r in batch)


def test_reconcile_keeps_both_rows_of_a_file_screened_twice(tmp_path):
    out = tmp_path / "results.csv"
    with Ledger(tmp_path / "state.sqlite") as ledger:
        screen(ledger, [ok_result("/in/a.dcm", "1.1")], sizes={"/in/a.dcm": 100})
        screen(ledger, [ok_result("/in/a.dcm", "1.1", p_any=0.2)], sizes={"/in/a.dcm": 200})  # rewritten file
        reconcile_csv(out, ledger, RESULT_COLUMNS)
        _, rows = read_rows(out)
        assert [r[0] for r in rows] == ["/in/a.dcm", "/in/a.dcm"]
        assert reconcile_csv(out, ledger, RESULT_COLUMNS).appended == 0


def test_reconcile_refuses_a_csv_with_other_columns(tmp_path):
    out = tmp_path / "results.csv"
    out.write_text("name,score\nx,1\n")
    with Ledger(tmp_path / "state.sqlite") as ledger, pytest.raises(LedgerError, match="other columns"):
        reconcile_csv(out, ledger, RESULT_COLUMNS)
    assert out.read_text() == "name,score\nx,1\n"  # untouched


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        (b"a,b,c\r\n1,2,3\r\n", b"a,b,c\r\n1,2,3\r\n"),
        (b"a,b,c\r\n1,2,3\r\n4,5", b"a,b,c\r\n1,2,3\r\n"),
        (b"a,b,c\r\n1,2,3\r\n4,5,6\r", b"a,b,c\r\n1,2,3\r\n"),  # cut between \r and \n
        (b'a,b,c\r\n"x\r\ny",2,3\r\n"p\r\nq', b'a,b,c\r\n"x\r\ny",2,3\r\n'),  # line breaks inside quotes
        (b"a,b", b""),  # torn header
    ],
)
def test_repair_torn_csv(tmp_path, content, kept):
    path = tmp_path / "x.csv"
    path.write_bytes(content)
    assert repair_torn_csv(path, ("a", "b", "c")) == len(content) - len(kept)
    assert path.read_bytes() == kept


# -- file names that are not valid UTF-8 ------------------------------------------------

ODD = os.fsdecode(b"/in/bad\xff.dcm")  # "/in/bad\udcff.dcm", as os.listdir gives it


@pytest.mark.parametrize("path", ["/in/a.dcm", "/in/ünï cödé/€.dcm", "/in/\\xff.dcm", "relative/b.dcm", ""])
def test_path_codec_keeps_valid_utf8_paths_unchanged(path):
    stored = encode_path(path)
    assert type(stored) is str and stored == path  # ledgers written before keep working
    assert decode_path(stored) == path
    assert printable(path) == path


@pytest.mark.parametrize("raw", [b"/in/bad\xff.dcm", b"/in/\xff\xfe/\x80x.dcm", b"/in/caf\xe9.dcm", b"/in/\xed\xa0\x80.dcm"])
def test_path_codec_round_trips_surrogate_paths_exactly(raw, tmp_path):
    path = os.fsdecode(raw)
    stored = encode_path(path)
    assert stored != path and decode_path(stored) == path
    assert os.fsencode(decode_path(stored)) == raw  # the real file's name, byte for byte
    # Unambiguous: never equal to what any valid-UTF-8 path is stored as.
    escaped = printable(path)
    assert escaped.encode("utf-8") and encode_path(escaped) == escaped != stored
    # Through SQLite and back.
    db = sqlite3.connect(tmp_path / "x.sqlite")
    db.execute("CREATE TABLE t (path TEXT NOT NULL)")
    db.execute("INSERT INTO t VALUES (?), (?)", (stored, escaped))
    assert [decode_path(v) for (v,) in db.execute("SELECT path FROM t ORDER BY rowid")] == [path, escaped]
    assert db.execute("SELECT COUNT(*) FROM t WHERE path = ?", (stored,)).fetchone() == (1,)


def test_printable_escapes_the_bad_bytes():
    assert printable(ODD) == "/in/bad\\xff.dcm"
    assert printable("not a path \udcff") == "not a path \\xff"


def test_ledger_keeps_a_non_utf8_path_across_restarts_and_the_csv_stays_utf8(tmp_path):
    state, out = tmp_path / "state.sqlite", tmp_path / "results.csv"
    with Ledger(state) as ledger:
        screen(ledger, [ok_result(ODD, "1.1"), ok_result("/in/a.dcm", "1.2")])
        ledger.queue([FileIdentity(os.fsdecode(b"/in/q\xfe.dcm"), 5, 6)])  # in flight when "killed"
    with Ledger(state) as ledger:
        assert ledger.is_done(FileIdentity(ODD, 100, 1_000)).path == ODD
        assert ledger.is_done(FileIdentity(ODD, 101, 1_000)) is None
        (queued,) = ledger.queued()
        assert queued.path == os.fsdecode(b"/in/q\xfe.dcm")  # the real name: the file can be found again
        assert ledger.queue([FileIdentity(queued.path, 5, 6)]) == {queued.path: queued.id}  # its row is reused
        reconcile_csv(out, ledger, RESULT_COLUMNS)
        text = out.read_bytes().decode("utf-8")  # strict
        rows = list(csv.reader(text.splitlines()))[1:]
        assert [r[0] for r in rows] == ["/in/bad\\xff.dcm", "/in/a.dcm"]
        # The CSV's text and the ledger's rows agree: nothing is appended a second time.
        assert reconcile_csv(out, ledger, RESULT_COLUMNS).appended == 0
    # Valid names are stored as before (TEXT); only the odd one is kept as its bytes.
    stored = sqlite3.connect(state).execute("SELECT path FROM files ORDER BY id").fetchall()
    assert stored == [(b"/in/bad\xff.dcm",), ("/in/a.dcm",), (b"/in/q\xfe.dcm",)]
