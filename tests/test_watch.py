"""``ichscan watch`` on real folders: real watchdog observers, real files, real signals.

Most tests run :func:`ichscan.pipeline.run_watch` in a thread (stopped through its
``stop`` event); the crash tests run the command as a subprocess and SIGKILL it.
Nothing here asserts on durations: tests wait (with generous timeouts) for
conditions, and latency figures live in ``benchmarks/bench_watch.py``.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import ROOT, escaped, read_csv, read_csv_header, rename_to_odd, start_ichscan, wait_for
from ichscan.cli.screening import watch_command
from ichscan.default_plugins.csv_report import RESULT_COLUMNS, STUDY_COLUMNS
from ichscan.records import DecodedSlice, Instance, Status
from ichscan.pipeline.batcher import MicroBatcher
from ichscan.pipeline.decode import DecodePool
from ichscan.pipeline.series import ContextSlice
from ichscan.sources.watch import Settler, is_temporary
from ichscan.synth import generate
from ichscan.pipeline import WatchOptions, run_watch

EXPLICIT = ["ExplicitVRLittleEndian"]


# -- helpers --------------------------------------------------------------------------


def phantoms(folder, studies=1, slices=4, seed=1):
    """Small phantoms (128 x 128) written to ``folder``; returns their records."""
    return generate(folder, studies=studies, slices=slices, seed=seed, size=128, transfer_syntaxes=EXPLICIT)


def move_in(src: Path, dest_dir: Path) -> list[Path]:
    """Move every file under ``src`` into ``dest_dir`` (same tree), each by an atomic rename."""
    moved = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        dest = dest_dir / path.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        moved.append(dest)
    return moved


class Watching:
    """``run_watch`` in a thread on ``root``, with fast settings for tests."""

    def __init__(self, tmp_path: Path, root: Path, **options):
        self.out = options.get("out", tmp_path / "out" / "results.csv")
        defaults = dict(
            out=self.out,
            settle=0.3,
            max_latency=0.2,
            study_timeout=3600.0,
            rescan_interval=3600.0,
            overlays_for="none",
            workers=0,
            batch_size=8,
            device="cpu",
            threads=1,
        )
        defaults.update(options)
        self.opts = WatchOptions(input_dir=root, **defaults)
        self.stop = threading.Event()
        self.summary = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.summary = run_watch(self.opts, stop=self.stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            self.error = exc

    def __enter__(self) -> Watching:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def rows(self) -> list[dict]:
        return read_csv(self.out, missing_ok=True)

    def wait_rows(self, n: int, timeout: float = 60.0) -> list[dict]:
        def enough():
            if self.error is not None:
                raise self.error
            rows = self.rows()
            return rows if len(rows) >= n else None

        return wait_for(enough, timeout, f"{n} result rows")

    def finish(self):
        self.stop.set()
        self.thread.join(120)
        assert not self.thread.is_alive(), "watcher did not stop"
        if self.error is not None:
            raise self.error
        return self.summary


# -- units: settle, names, micro-batches, streaming decode ----------------------------------


def test_temporary_names():
    for name in ("x.dcm.part", "X.PART", "x.tmp", ".hidden.dcm", "a.dcm~", "b.filepart"):
        assert is_temporary(name), name
    for name in ("x.dcm", "IM0001", "part", "x.partition"):
        assert not is_temporary(name), name


def test_settler_waits_for_size_and_mtime_to_stay_still(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a")
    settler = Settler(settle=2.0)
    settler.observe(str(path), os.lstat(path), now=100.0)
    assert settler.settled(now=101.0) == []  # not long enough
    with open(path, "ab") as fh:  # the writer goes on: the interval starts over
        fh.write(b"more")
    assert settler.settled(now=102.5) == []
    assert settler.settled(now=104.0) == []
    ready = settler.settled(now=104.6)
    assert [(r.path, r.size) for r in ready] == [(str(path), 5)]
    assert len(settler) == 0
    # Deleted before it settled: dropped, nothing to hand over.
    settler.observe(str(path), os.lstat(path), now=200.0)
    path.unlink()
    assert settler.settled(now=300.0) == [] and len(settler) == 0


def test_settler_holds_a_file_still_in_flight(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a")
    settler = Settler(settle=0.0)
    settler.observe(str(path), os.lstat(path), now=0.0)
    assert settler.settled(now=1.0, hold=lambda p: True) == []
    assert [r.path for r in settler.settled(now=2.0)] == [str(path)]


def _slice(i, status="ok"):
    return ContextSlice(DecodedSlice(Instance(f"/f{i}"), Status(status)))


def test_micro_batcher_full_batch_or_latency_bound():
    batcher = MicroBatcher(batch_size=4, max_latency=1.0)
    assert batcher.due_in(0.0) is None and batcher.take(0.0) == []
    batcher.add([_slice(0)], now=10.0)
    assert batcher.due_in(10.5) == pytest.approx(0.5)
    assert batcher.take(10.5) == []  # neither full nor waited long enough
    assert [d.path for d in batcher.take(11.0)] == ["/f0"]  # the latency bound
    batcher.add([_slice(i) for i in range(1, 11)] + [_slice(99, "error")], now=20.0)
    first = batcher.take(20.0)  # full: no wait
    assert [d.path for d in first] == ["/f1", "/f2", "/f3", "/f4", "/f99"]
    assert batcher.due_in(20.0) == 0.0  # still a full batch left
    assert len(batcher.take(20.0)) == 4
    # The remainder already waited: it is due at once, without a new latency wait.
    assert [d.path for d in batcher.take(20.0)] == ["/f9", "/f10"]
    assert len(batcher) == 0


def test_streaming_pool_returns_one_result_per_file_across_a_killed_worker(tmp_path):
    records = phantoms(tmp_path / "in", slices=12)
    paths = [str(r.path) for r in records] + [str(tmp_path / "missing.dcm")]
    seen: list[DecodedSlice] = []
    with DecodePool(workers=1, chunk_size=2, max_in_flight=3) as pool:
        assert pool.free_slots() == 6
        pool.submit(paths[:6])
        assert pool.free_slots() == 0 and pool.pending == 6
        seen += wait_for(lambda: pool.collect(0.5), what="first results")
        os.kill(next(iter(pool._executor._processes)), signal.SIGKILL)  # a decoder crash
        pool.submit(paths[6:])
        deadline = time.monotonic() + 60
        while pool.pending and time.monotonic() < deadline:
            seen += pool.collect(0.5)
    assert sorted(d.path for d in seen) == sorted(paths)
    assert sum(d.status == "ok" for d in seen) == 12
    assert [d.status for d in seen if d.path.endswith("missing.dcm")] == ["error"]


# -- the watcher, in a thread ----------------------------------------------------------


def test_startup_scan_events_and_moved_in_folders(tmp_path):
    root = tmp_path / "incoming"
    before = phantoms(root, studies=1, slices=4, seed=1)
    with Watching(tmp_path, root, workers=1) as w:
        w.wait_rows(4)
        # A whole study folder moved in, and single files renamed into place.
        later = phantoms(tmp_path / "staging", studies=2, slices=3, seed=2)
        (tmp_path / "staging").rename(root / "moved-study")
        rows = w.wait_rows(10)
        summary = w.finish()
    assert len(rows) == 10
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(r.sop_instance_uid for r in before + later)
    assert {r["status"] for r in rows} == {"ok"}
    assert summary.files == 10 and summary.ok == 10
    # A clean stop writes every study's summary row.
    header, studies = read_csv_header(w.out.with_name("results_studies.csv"), missing_ok=True)
    assert tuple(header) == STUDY_COLUMNS
    assert {s["study_instance_uid"]: int(s["slices"]) for s in studies} == {
        before[0].study_instance_uid: 4,
        **{r.study_instance_uid: 3 for r in later},
    }


def test_slow_writer_is_screened_once_when_complete(tmp_path):
    root = tmp_path / "incoming"
    root.mkdir()
    record = phantoms(tmp_path / "staging", slices=1)[0]
    data = Path(record.path).read_bytes()
    with Watching(tmp_path, root, settle=0.6) as w:
        target = root / "slow.dcm"
        with open(target, "wb") as fh:
            # Pauses shorter than the settle interval: it must wait for the whole file.
            for start in range(0, len(data), len(data) // 8 + 1):
                fh.write(data[start : start + len(data) // 8 + 1])
                fh.flush()
                time.sleep(0.25)
        rows = w.wait_rows(1)
        time.sleep(1.5)  # would a premature (truncated) read have produced a second row?
        rows = w.rows()
        w.finish()
    assert [(r["path"], r["status"], r["sop_instance_uid"]) for r in rows] == [(str(target), "ok", record.sop_instance_uid)]


def test_part_and_hidden_files_wait_until_renamed(tmp_path):
    root = tmp_path / "incoming"
    root.mkdir()
    records = phantoms(tmp_path / "staging", slices=3)
    with Watching(tmp_path, root) as w:
        shutil.copy(records[0].path, root / "a.dcm.part")
        shutil.copy(records[1].path, root / ".b.dcm")
        shutil.copy(records[2].path, root / "c.tmp")
        time.sleep(1.5)  # several settle intervals
        assert w.rows() == []
        os.rename(root / "a.dcm.part", root / "a.dcm")
        os.rename(root / ".b.dcm", root / "b.dcm")
        rows = w.wait_rows(2)
        w.finish()
    assert sorted(r["path"] for r in rows) == [str(root / "a.dcm"), str(root / "b.dcm")]
    assert {r["status"] for r in rows} == {"ok"}


def test_polling_observer_finds_new_files(tmp_path):
    root = tmp_path / "incoming"
    root.mkdir()
    # No rescans: only the polling observer can find files that arrive after start.
    with Watching(tmp_path, root, poll=True, poll_interval=0.2) as w:
        time.sleep(0.5)
        records = phantoms(tmp_path / "staging", slices=3, seed=5)
        move_in(tmp_path / "staging", root)
        rows = w.wait_rows(3)
        w.finish()
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(r.sop_instance_uid for r in records)


def test_bad_files_get_one_error_row_and_go_to_quarantine(tmp_path):
    root = tmp_path / "incoming"
    records = phantoms(root / "good", slices=3)
    (root / "bad").mkdir()
    (root / "bad" / "notdicom.dcm").write_text("not a DICOM file at all")
    (root / "bad" / "empty.dcm").write_bytes(b"")
    quarantine = tmp_path / "quarantine"
    # Frequent rescans: a bad file must not come back as a new row on each of them.
    with Watching(tmp_path, root, quarantine_dir=quarantine, rescan_interval=0.2) as w:
        rows = w.wait_rows(5)
        time.sleep(1.0)
        rows = w.rows()
        summary = w.finish()
    assert len(rows) == 5
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["status"] == "error"}
    assert set(errors) == {"notdicom.dcm", "empty.dcm"} and all(errors.values())
    assert sum(r["status"] == "ok" for r in rows) == 3
    assert summary.quarantined == 2
    assert (quarantine / "bad" / "notdicom.dcm").is_file() and (quarantine / "bad" / "empty.dcm").is_file()
    assert not (root / "bad" / "notdicom.dcm").exists()
    assert all(Path(r.path).exists() for r in records)  # good files stay


def test_error_files_are_not_retried_without_quarantine(tmp_path):
    root = tmp_path / "incoming"
    root.mkdir()
    bad = root / "bad.dcm"
    bad.write_text("garbage")
    with Watching(tmp_path, root, rescan_interval=0.2) as w:
        w.wait_rows(1)
        st = bad.stat()
        os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))  # an event, same identity
        os.chmod(bad, 0o644)
        time.sleep(1.0)
        assert len(w.rows()) == 1
        bad.write_text("garbage, rewritten")  # a new file under the same name
        rows = w.wait_rows(2)
        w.finish()
    assert [r["status"] for r in rows] == ["error", "error"]


def test_restart_screens_only_new_and_changed_files(tmp_path):
    root = tmp_path / "incoming"
    records = phantoms(root, slices=4)
    with Watching(tmp_path, root) as w:
        w.wait_rows(4)
    first = w.out.read_bytes()
    changed = Path(records[0].path)
    extra = phantoms(tmp_path / "staging", slices=1, seed=9)
    move_in(tmp_path / "staging", root)
    with Watching(tmp_path, root) as w2:
        rows = w2.wait_rows(5)
        changed.write_bytes(changed.read_bytes() + b"\0\0")  # rewritten: a new version
        rows = w2.wait_rows(6)
        time.sleep(0.8)
        rows = w2.rows()
        summary = w2.finish()
    assert w2.out.read_bytes().startswith(first)  # appended, nothing rewritten
    assert summary.files == 2
    assert len(rows) == 6
    assert [r["path"] for r in rows].count(str(changed)) == 2
    assert extra[0].sop_instance_uid in {r["sop_instance_uid"] for r in rows}


def _odd_names(root: Path, slices: int = 2) -> str:
    """Phantoms in ``root``, the first renamed to b"bad\\xff.dcm" (not UTF-8); returns its
    path as Python sees it (with a surrogate)."""
    records = phantoms(root, slices=slices)
    return rename_to_odd(records[0].path)


def test_non_utf8_names_are_screened_once_across_restarts(tmp_path):
    root = tmp_path / "incoming"
    odd = _odd_names(root)
    junk = os.path.join(os.fsencode(root), b"junk\xfe.dcm")  # and an unreadable one
    Path(os.fsdecode(junk)).write_bytes(b"not a DICOM file at all")
    quarantine = tmp_path / "quarantine"
    with Watching(tmp_path, root, quarantine_dir=quarantine, rescan_interval=0.2) as w:
        w.wait_rows(3)  # read_csv decodes strictly: the CSV is valid UTF-8
        time.sleep(0.8)  # rescans: none of them comes back
        rows = w.rows()
        w.finish()
    assert len(rows) == 3
    by_path = {r["path"]: r for r in rows}
    assert by_path[escaped(odd)]["status"] == "ok"
    assert by_path[escaped(os.fsdecode(junk))]["status"] == "error"
    assert os.path.exists(os.path.join(os.fsencode(quarantine), b"junk\xfe.dcm"))
    extra = phantoms(tmp_path / "staging", slices=1, seed=9)
    move_in(tmp_path / "staging", root)
    with Watching(tmp_path, root, quarantine_dir=quarantine) as w2:
        rows = w2.wait_rows(4)
        time.sleep(0.8)
        rows = w2.rows()
        summary = w2.finish()
    assert summary.files == 1  # only the new file: the odd one is known to the ledger
    assert len(rows) == 4 and [r["path"] for r in rows].count(escaped(odd)) == 1
    assert rows[-1]["sop_instance_uid"] == extra[0].sop_instance_uid


def test_non_utf8_name_in_flight_at_a_crash_is_screened_again_from_the_ledger(tmp_path):
    from ichscan.state.ledger import FileIdentity, Ledger

    root = tmp_path / "incoming"
    odd = _odd_names(root)
    out = tmp_path / "out" / "results.csv"
    st = os.stat(odd)
    with Ledger(out.with_name("ichscan-state.sqlite")) as ledger:  # as left by a SIGKILL
        (row_id,) = ledger.queue([FileIdentity(odd, st.st_size, st.st_mtime_ns)]).values()
    with Watching(tmp_path, root, out=out) as w:
        w.wait_rows(2)
        time.sleep(0.5)
        rows = w.rows()
        summary = w.finish()
    assert summary.files == 2
    assert sorted(r["status"] for r in rows) == ["ok", "ok"]  # found again, not "disappeared"
    state = sqlite3.connect(out.with_name("ichscan-state.sqlite"))
    stored = state.execute("SELECT id, path, state FROM files ORDER BY id").fetchall()
    assert len(stored) == 2 and stored[0] == (row_id, os.fsencode(odd), "done")  # its queued row was reused


def test_study_row_after_timeout_and_updated_by_a_late_image(tmp_path):
    root = tmp_path / "incoming"
    root.mkdir()
    staged = phantoms(tmp_path / "staging", slices=4, seed=3)
    for record in staged[:3]:
        shutil.copy(record.path, root / Path(record.path).name)
    studies_out = tmp_path / "out" / "results_studies.csv"

    def study_slices():
        rows = read_csv(studies_out, missing_ok=True)
        return {r["study_instance_uid"]: int(r["slices"]) for r in rows}

    with Watching(tmp_path, root, study_timeout=0.5) as w:
        assert wait_for(lambda: study_slices(), what="the study row") == {staged[0].study_instance_uid: 3}
        shutil.copy(staged[3].path, root / Path(staged[3].path).name)  # a late image
        wait_for(lambda: study_slices() == {staged[0].study_instance_uid: 4}, what="the updated study row")
        w.finish()


def test_outputs_inside_the_watched_folder_are_never_screened(tmp_path):
    root = tmp_path / "incoming"
    phantoms(root, slices=2)
    with Watching(tmp_path, root, out=root / "results.csv", overlays_for="all", rescan_interval=0.2, study_timeout=0.2) as w:
        w.wait_rows(2)
        time.sleep(1.5)  # several rescans over results.csv, the ledger, overlays, study CSV
        rows = w.rows()
        w.finish()
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    assert all(Path(r["overlay"]).is_file() for r in rows)


def test_folder_removed_and_recreated_symlinks_and_fifos(tmp_path, caplog):
    root = tmp_path / "incoming"
    root.mkdir()
    staged = phantoms(tmp_path / "staging", slices=3, seed=4)
    outside = Path(staged[0].path)
    os.symlink(outside, root / "link.dcm")
    os.mkfifo(root / "pipe.dcm")
    caplog.set_level("WARNING", logger="ichscan")
    with Watching(tmp_path, root) as w:
        shutil.copy(staged[1].path, root / "one.dcm")
        w.wait_rows(1)
        shutil.rmtree(root)
        time.sleep(1.5)  # the health check notices
        root.mkdir()
        shutil.copy(staged[2].path, root / "two.dcm")
        rows = w.wait_rows(2)
        w.finish()
    assert sorted(Path(r["path"]).name for r in rows) == ["one.dcm", "two.dcm"]
    text = caplog.text
    assert "link.dcm: symbolic link" in text and "pipe.dcm: named pipe" in text
    assert "is gone" in text and "is back" in text


# -- the command, as a process -----------------------------------------------------------------


class WatchProcess:
    """``ichscan watch`` (the installed console script) as a subprocess; stderr goes to a file.

    Not a pipe: after a SIGKILL, decode workers may hold a pipe open for a moment.
    """

    def __init__(self, root, out, *extra):
        self.log = Path(out).parent / f"watch-{time.monotonic_ns()}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = start_ichscan(self.log, "watch", str(root), "--out", str(out), "--overlays-for", "none", *extra, cwd=ROOT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int, timeout: float = 60) -> tuple[int, str]:
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        finally:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.log.read_text()


def test_missing_folder_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(watch_command, [str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_help_lists_the_options():
    result = CliRunner().invoke(watch_command, ["--help"])
    assert result.exit_code == 0
    for option in ("--out", "--state", "--poll", "--settle", "--max-latency", "--quarantine", "--study-timeout", "--rescan"):
        assert option in result.output


def test_sigint_finishes_and_exits_0(tmp_path):
    root = tmp_path / "incoming"
    records = phantoms(root, studies=2, slices=3)
    out = tmp_path / "out" / "results.csv"
    watcher = WatchProcess(root, out, "--settle", "0.2", "--workers", "1", "--study-timeout", "3600")
    try:
        wait_for(lambda: len(read_csv(out, missing_ok=True)) == 6 or not watcher.alive(), 120, "6 rows")
    finally:
        returncode, stderr = watcher.stop(signal.SIGINT)
    assert returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "SIGINT: finishing" in stderr and "stopped after" in stderr
    # Log lines name each study with its top label.
    for record in records[::3]:
        assert f"study {record.study_instance_uid}: 3 slices" in stderr
    assert len(read_csv(out.with_name("results_studies.csv"), missing_ok=True)) == 2
    state = sqlite3.connect(out.with_name("ichscan-state.sqlite"))
    assert state.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall() == [("done", 6)]


@pytest.mark.slow
def test_sigkill_during_a_burst_then_restart_loses_and_duplicates_nothing(tmp_path):
    root = tmp_path / "incoming"
    root.mkdir()
    records = phantoms(tmp_path / "staging", studies=10, slices=50, seed=7)
    (tmp_path / "staging" / "junk.dcm").write_text("not DICOM")
    out = tmp_path / "out" / "results.csv"
    args = ("--settle", "0.2", "--max-latency", "0.2", "--batch-size", "16", "--study-timeout", "3600")
    total = len(records) + 1
    watcher = WatchProcess(root, out, *args)
    try:
        wait_for(lambda: out.exists() or not watcher.alive(), 120, "the watcher to start")
        move_in(tmp_path / "staging", root)  # a burst of 501 files
        wait_for(lambda: len(read_csv(out, missing_ok=True)) >= total // 10 or not watcher.alive(), 120, "a tenth of the rows")
    finally:
        watcher.stop(signal.SIGKILL)
    killed_at = len(read_csv(out, missing_ok=True))
    assert total // 10 <= killed_at < total, "the kill must land inside the burst"
    state = sqlite3.connect(out.with_name("ichscan-state.sqlite"))
    in_flight = state.execute("SELECT COUNT(*) FROM files WHERE state = 'queued'").fetchone()[0]
    state.close()

    watcher = WatchProcess(root, out, *args)
    try:
        wait_for(lambda: len(read_csv(out, missing_ok=True)) >= total or not watcher.alive(), 180, "every row")
        time.sleep(1.0)  # anything extra would show now
    finally:
        returncode, stderr = watcher.stop(signal.SIGTERM)
    assert returncode == 0, stderr
    header, rows = read_csv_header(out, missing_ok=True)  # parses as CSV
    assert tuple(header) == RESULT_COLUMNS
    assert len(rows) == total
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in root.rglob("*") if p.is_file())
    sops = [r["sop_instance_uid"] for r in rows if r["status"] == "ok"]
    assert len(sops) == len(set(sops)) == len(records)
    assert [r["status"] for r in rows if r["path"].endswith("junk.dcm")] == ["error"]
    if in_flight:
        assert "in flight when the last run stopped" in stderr


def test_micro_batcher_without_a_latency_bound_runs_full_batches_only():
    batcher = MicroBatcher(batch_size=4, max_latency=math.inf)
    batcher.add([_slice(i) for i in range(10)], now=0.0)
    assert [len(b) for b in iter(lambda: batcher.take(1e12), [])] == [4, 4]  # the 2 left wait to fill up
    assert batcher.due_in(1e12) == math.inf and len(batcher) == 2
    assert [d.path for d in batcher.take(1e12, force=True)] == ["/f8", "/f9"]  # the end of the run
