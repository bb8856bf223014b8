"""Disk faults under ``ichscan serve-scp``: a full store, full outputs, fsync failing with EIO.

Run as root (it mounts tmpfs file systems) from the repository root::

    python benchmarks/faults/disk.py [--scenario NAME ...] [--instances N]

Scenarios (each writes ``.bench/faults/results/<name>.json`` with the figures of
``common.account``: sent, stored, screened, rows, duplicates, lost, and its own):

``disk-full-store``
    ``--store`` on a tmpfs with room for about a third of what two dcmtk senders send. What
    does not fit must be refused (0xA700, no Success) and leave nothing half-written, the
    server must keep serving (C-ECHO answered while full), and once the tmpfs is grown
    (``mount -o remount,size=``) the senders' re-sends complete: every instance that got
    Success screened once.
``disk-full-csv``
    ``--out`` (and the studies CSV beside it) on a tiny tmpfs that fills while rows are
    written; the store and the state file elsewhere. The ledger keeps the truth: the server
    must log a one-line error (no traceback) and keep receiving and screening; once space is
    back and the server restarted, every sent instance has exactly one complete row.
``disk-full-outputs``
    The same with the state file on that tmpfs too (the default layout: the state file
    beside --out), so the ledger itself cannot commit: the server must stop with a one-line
    error (not a traceback), and once space is back and it is restarted (as a service
    manager would), every sent instance has exactly one complete row.
``eio-fsync``
    The server runs with ``eio_fsync.c`` preloaded (compiled here into .bench/faults/):
    every ``--eio-every``-th fsync/fdatasync on a descriptor under the store fails with EIO.
    An instance whose file or folder fsync failed must be answered with a failure (not
    Success) and leave no file behind; the senders' re-sends complete; 0 lost, 0 duplicates.
``eio-fsync-state``
    The same shim aimed at the state file's folder (SQLite's fsync/fdatasync of the
    ledger and its WAL). What the server does when the ledger cannot commit, and that after
    a restart without the fault every sent instance has exactly one row.

Each scenario starts from an empty work folder under ``.bench/faults/disk/``. The server is
this tree's ichscan (PYTHONPATH is set to the repository root for it).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    WORK,
    Sender,
    ServerProcess,
    account,
    free_port,
    phantoms,
    save_result,
    split_by_study,
)

os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

ECHOSCU = Path("/usr/bin/echoscu")
SHIM_SOURCE = Path(__file__).resolve().parent / "eio_fsync.c"
SCENARIOS = ("disk-full-store", "disk-full-csv", "disk-full-outputs", "eio-fsync", "eio-fsync-state")
REFUSED = "answered as out of resources"


# -- the parts ---------------------------------------------------------------------


@contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder`` (made if missing), unmounted on leaving."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def grow(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def free_kib(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize // 1024


def compile_shim() -> Path:
    """gcc the EIO shim into .bench/faults/ (never committed)."""
    out = WORK / "eio_fsync.so"
    if not out.exists() or out.stat().st_mtime < SHIM_SOURCE.stat().st_mtime:
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out), str(SHIM_SOURCE), "-ldl"], check=True)
    return out


def start_server(work: Path, port: int, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    """ServerProcess with ``env`` added to the environment of the server only."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return ServerProcess(work, port, "--workers", "1", "--threads", "1", *extra)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def echo(port: int) -> bool:
    """A C-ECHO answered: the server is still serving."""
    return subprocess.run([str(ECHOSCU), "-aec", "ICHSCAN", "-to", "10", "127.0.0.1", str(port)], capture_output=True).returncode == 0


def log_text(work: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(work.glob("serve-*.log")))


def log_lines(work: Path, needle: str) -> int:
    return sum(line.count(needle) for line in log_text(work).splitlines())


def tracebacks(work: Path) -> int:
    return log_text(work).count("Traceback (most recent call last)")


def done_in_ledger(state: Path) -> int:
    """Files the ledger has recorded as screened (read-only, while the server runs)."""
    try:
        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute("SELECT count(*) FROM files WHERE state = 'done'").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return -1


def csv_shape(path: Path) -> dict:
    """Rows of the results CSV with the wrong number of cells (torn or merged), and
    whether the file ends with a line break."""
    if not path.exists():
        return {"malformed_rows": 0, "ends_with_newline": True}
    data = path.read_bytes()
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        malformed = sum(1 for row in reader if len(row) != len(header))
    return {"malformed_rows": malformed, "ends_with_newline": data.endswith(b"\n") or not data}


def store_leftovers(store: Path, sent_uids: set[str]) -> dict:
    """Temporary files left in the store, and stored instances that never got Success."""
    temporary = [p for p in store.rglob(".*") if p.is_file()]
    unacked = [p for p in store.rglob("*.dcm") if not p.name.startswith(".") and p.stem not in sent_uids]
    return {"temporary_files": len(temporary), "stored_without_success": len(unacked)}


def incomplete_in_store(store: Path) -> int:
    """Stored instances that do not read back whole (pixel data shorter than its image)."""
    import pydicom

    bad = 0
    for path in store.rglob("*.dcm"):
        if path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(path)
            if len(ds.PixelData) < ds.Rows * ds.Columns * ds.BitsAllocated // 8:
                bad += 1
        except Exception:  # noqa: BLE001 - anything unreadable counts
            bad += 1
    return bad


def wait_until(check, timeout: float, what: str, poll: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(poll)
    print(f"timed out after {timeout:.0f} s waiting for {what}", file=sys.stderr)
    return False


def senders_for(port: int, items, count: int, batch: int) -> list[Sender]:
    return [Sender(port, share, batch=batch, retry_s=1.0) for share in split_by_study(items, count)]


def acked(senders: list[Sender]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in senders:
        out.update(s.acked)
    return out


def rows_for(out_csv: Path, items, acks) -> int:
    try:
        return account("probe", acks, items, out_csv)["rows"]
    except (OSError, UnicodeDecodeError, csv.Error):
        return -1


def fresh(name: str) -> Path:
    work = WORK / "disk" / name
    if work.exists():
        subprocess.run(["umount", "-R", str(work)], capture_output=True)  # a mount left by a killed run
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def stop(server: ServerProcess) -> int | None:
    if server.proc.poll() is not None:
        return server.proc.returncode
    return server.stop()


# -- the scenarios -------------------------------------------------------------------


def disk_full_store(args) -> dict:
    items = phantoms(args.instances)
    each_kib = items[0].path.stat().st_size // 1024 + 4
    small_kib = max(each_kib * 4, each_kib * args.instances // 3)
    work = fresh("disk-full-store")
    port = free_port()
    with tmpfs(work / "store", f"{small_kib}k") as store:
        server = start_server(work, port)
        senders: list[Sender] = []
        try:
            senders += [s.start() for s in senders_for(port, items, args.senders, args.batch)]
            # Full: refusals come, and every sender has been refused five more times since.
            wait_until(lambda: log_lines(work, REFUSED) > 0, args.timeout, "the store to fill")
            rounds = [s.attempts for s in senders]
            wait_until(lambda: all(s.attempts >= r + 5 or s.done for s, r in zip(senders, rounds)), args.timeout, "re-sends against the full store")
            sent_while_full = len(acked(senders))
            refused_while_full = log_lines(work, REFUSED)
            serving_while_full = echo(port)
            alive_while_full = server.proc.poll() is None
            free_while_full = free_kib(store)
            print(f"full: {sent_while_full} acked, {refused_while_full} refused, {free_while_full} KiB free, echo {serving_while_full}", flush=True)
            grow(store, f"{each_kib * args.instances * 2}k")
            wait_until(lambda: all(s.done for s in senders), args.timeout, "the senders' re-sends")
            for s in senders:
                s.stop()
                s.join(60)
            acks = acked(senders)
            wait_until(lambda: rows_for(server.out, items, acks) >= len(acks), args.timeout, "the rows")
        finally:
            for s in senders:
                s.stop()
            exit_status = stop(server)
        sent_uids = {i.sop_instance_uid for i in items if str(i.path) in acks}
        figures = account(
            "disk-full-store",
            acks,
            items,
            server.out,
            store,
            instances=len(items),
            senders=args.senders,
            store_tmpfs_kib=small_kib,
            refused=log_lines(work, REFUSED),
            sent_while_full=sent_while_full,
            refused_while_full=refused_while_full,
            free_kib_while_full=free_while_full,
            echo_while_full=serving_while_full,
            alive_while_full=alive_while_full,
            incomplete_in_store=incomplete_in_store(store),
            **store_leftovers(store, sent_uids),
            tracebacks=tracebacks(work),
            exit_status=exit_status,
        )
    return figures


def disk_full_csv(args, state_on_full: bool) -> dict:
    items = phantoms(args.instances)
    name = "disk-full-outputs" if state_on_full else "disk-full-csv"
    size = args.outputs_tmpfs if state_on_full else args.csv_tmpfs
    work = fresh(name)
    port = free_port()
    out_dir = work / "out"
    with tmpfs(out_dir, size):
        out = out_dir / "results.csv"
        state = (out_dir if state_on_full else work) / "state.sqlite"
        # Batches of 64 rows (about 30 KB, as a GPU's larger batches are): a write that fills
        # the disk can stop inside a batch, not only at its start.
        extra = ["--out", str(out), "--state", str(state), "--batch-size", "64"]
        server = start_server(work, port, *extra)
        first_half, second_half = items[: len(items) // 2], items[len(items) // 2 :]
        senders: list[Sender] = []
        try:
            senders += [s.start() for s in senders_for(port, first_half, args.senders, args.batch)]
            dead = lambda: server.proc.poll() is not None  # noqa: E731
            wait_until(lambda: all(s.done for s in senders) or dead(), args.timeout, "the first half")
            screened = lambda: done_in_ledger(state) >= len(acked(senders)) or dead()  # noqa: E731
            wait_until(screened, args.timeout, "the first half screened (ledger)")
            time.sleep(3)  # the studies CSV too (--study-timeout 1)
            while_full = {
                "alive_while_full": not dead(),
                "echo_while_full": echo(port),
                "sent_while_full": len(acked(senders)),
                "csv_errors_logged": log_lines(work, "cannot write") + log_lines(work, "reporter csv failed"),
                "state_errors_logged": log_lines(work, "Error: state file") + log_lines(work, "Error: cannot open state file"),
                "ledger_done_while_full": done_in_ledger(state),
                "rows_while_full": rows_for(out, items, acked(senders)),
                "free_kib_while_full": free_kib(out_dir),
            }
            print(f"full: {while_full}", flush=True)
            grow(out_dir, "64m")
            # Space is back: the second half goes to the same server, or to a restarted one
            # if it stopped (the first half's senders, still re-sending, go there too).
            if dead():
                while_full["exit_status_while_full"] = server.proc.returncode
                server = start_server(work, port, *extra)
            senders += [s.start() for s in senders_for(port, second_half, args.senders, args.batch)]
            wait_until(lambda: all(s.done for s in senders), args.timeout, "every sender")
            acks = acked(senders)
            wait_until(lambda: done_in_ledger(state) >= len(acks), args.timeout, "everything screened (ledger)")
            time.sleep(3)
            before_restart = {"rows_before_restart": rows_for(out, items, acks), **{f"{k}_before_restart": v for k, v in csv_shape(out).items()}}
            exit_status = stop(server)
            server = start_server(work, port, *extra)  # the restart: the CSV reconciled with the ledger
            exit_status_2 = stop(server)
            figures = account(
                name,
                acks,
                items,
                out,
                server.store,
                instances=len(items),
                senders=args.senders,
                out_tmpfs=size,
                state_on_full=state_on_full,
                **while_full,
                **before_restart,
                **csv_shape(out),
                studies_csv_rows=max(0, len(out.with_name("results_studies.csv").read_text().splitlines()) - 1) if out.with_name("results_studies.csv").exists() else None,
                tracebacks=tracebacks(work),
                exit_status=exit_status,
                exit_status_after_restart=exit_status_2,
            )
        finally:
            for s in senders:
                s.stop()
            if server.proc.poll() is None:
                stop(server)
            shutil.copytree(out_dir, work / "out-kept")  # for a look after the tmpfs is gone
    return figures


def eio_fsync(args, target: str) -> dict:
    items = phantoms(args.instances)
    name = "eio-fsync" if target == "store" else "eio-fsync-state"
    work = fresh(name)
    port = free_port()
    shim = compile_shim()
    state_dir = work / "state"
    state_dir.mkdir()
    state = state_dir / "state.sqlite"
    eio_log = work / "eio.log"
    under = work / "store" if target == "store" else state_dir
    (work / "store").mkdir()
    every = args.eio_every if target == "store" else args.eio_every_state
    env = {"LD_PRELOAD": str(shim), "EIO_FSYNC_UNDER": str(under), "EIO_FSYNC_EVERY": str(every), "EIO_FSYNC_LOG": str(eio_log)}
    extra = ["--state", str(state)]
    server = start_server(work, port, *extra, env=env)
    restarts = 0
    senders: list[Sender] = []
    try:
        senders += [s.start() for s in senders_for(port, items, args.senders, args.batch)]
        deadline = time.monotonic() + args.timeout
        while not all(s.done for s in senders) and time.monotonic() < deadline:
            if server.proc.poll() is not None:  # it died of the fault: what a service manager does
                restarts += 1
                print(f"server exited with {server.proc.returncode}; restarting (with the fault)", flush=True)
                server = start_server(work, port, *extra, env=env)
            time.sleep(0.5)
        for s in senders:
            s.stop()
            s.join(60)
        acks = acked(senders)
        under_fault = {
            "alive_at_end_of_sending": server.proc.poll() is None,
            "restarts_under_fault": restarts,
            "rows_under_fault": rows_for(server.out, items, acks),
        }
        wait_until(lambda: rows_for(server.out, items, acks) >= len(acks) or server.proc.poll() is not None, 60, "the rows under the fault")
        under_fault["rows_under_fault"] = rows_for(server.out, items, acks)
        exit_status = stop(server)
        # A restart without the fault: what the ledger and the store say now.
        server = start_server(work, port, *extra)
        wait_until(lambda: rows_for(server.out, items, acks) >= len(acks), args.timeout, "the rows after a restart")
        exit_status_2 = stop(server)
    finally:
        for s in senders:
            s.stop()
        if server.proc.poll() is None:
            stop(server)
    injected = eio_log.read_text().splitlines() if eio_log.exists() else []
    sent_uids = {i.sop_instance_uid for i in items if str(i.path) in acks}
    return account(
        name,
        acks,
        items,
        server.out,
        server.store,
        instances=len(items),
        senders=args.senders,
        eio_target=target,
        eio_every=every,
        eio_injected=len(injected),
        **eio_kinds(injected, under),
        refused=log_lines(work, REFUSED),
        **under_fault,
        **store_leftovers(server.store, sent_uids),
        incomplete_in_store=incomplete_in_store(server.store),
        tracebacks=tracebacks(work),
        exit_status=exit_status,
        exit_status_after_restart=exit_status_2,
    )


def eio_kinds(injected: list[str], under: Path) -> dict:
    """The failed calls by what they synced: files (temporary files, SQLite's), a series
    folder (in the store: the fsync after the rename), other folders (made for a new
    study or series, before any write)."""
    kinds = {"eio_on_files": 0, "eio_on_series_folders": 0, "eio_on_other_folders": 0}
    for line in injected:
        path = Path(line.split(" ", 2)[2])
        if not path.is_dir():
            kinds["eio_on_files"] += 1
        elif len(path.relative_to(under).parts) == 2:
            kinds["eio_on_series_folders"] += 1
        else:
            kinds["eio_on_other_folders"] += 1
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeatable; default: all")
    parser.add_argument("--instances", type=int, default=400, help="phantoms sent (20 a study)")
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--batch", type=int, default=50, help="files per storescu association")
    parser.add_argument("--csv-tmpfs", default="64k", help="size of the tmpfs holding --out (disk-full-csv)")
    parser.add_argument("--outputs-tmpfs", default="512k", help="size of the tmpfs holding --out and the state file (disk-full-outputs)")
    parser.add_argument("--eio-every", type=int, default=7, help="every Nth fsync under the store fails (eio-fsync)")
    parser.add_argument("--eio-every-state", type=int, default=10, help="every Nth fsync under the state file's folder fails (eio-fsync-state)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds each wait may take")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: the disk-full scenarios mount tmpfs file systems")
    failed = []
    for name in args.scenario or SCENARIOS:
        if name == "disk-full-store":
            figures = disk_full_store(args)
        elif name in ("disk-full-csv", "disk-full-outputs"):
            figures = disk_full_csv(args, state_on_full=name == "disk-full-outputs")
        else:
            figures = eio_fsync(args, "store" if name == "eio-fsync" else "state")
        save_result(figures)
        if figures["lost"] or figures["duplicates"]:
            failed.append(name)
    if failed:
        print(f"lost or duplicated instances in: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
