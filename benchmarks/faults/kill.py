"""SIGKILL the receiver at random moments while instances arrive, restart it, count.

    python benchmarks/faults/kill.py [scp|watch|all] [--instances 2000] [--kills 20]

``scp``: 4 dcmtk ``storescu`` senders send 2,000 instances (512 x 512 phantoms, 20 slices a
study, each study from one sender, 25 files an association and 1.5 s between associations,
so that the sending outlasts the kills) to ``ichscan serve-scp``. It is
SIGKILLed (with its decode workers) at 20 random moments, each 0.5-4 s after it listens again,
and restarted on the same port, store and state file. A sender whose association breaks sends
again only the files it has no Success for. When every file has a Success the server is given
time to screen the backlog, stopped with SIGTERM, and counted (common.account).

``watch``: files are copied into a watched folder (a plain chunked copy, as ``cp`` does, 64 KiB
at a time, up to 2,000 files) while ``ichscan watch`` is SIGKILLed at 20 random moments and
restarted; a file counts as sent once its copy is complete.

Figures go to .bench/faults/results/kill-scp.json and kill-watch.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    WORK,
    Sender,
    ServerProcess,
    account,
    free_port,
    kill_tree,
    phantoms,
    random_moments,
    read_csv,
    save_result,
    split_by_study,
    start_ichscan,
    wait_for,
)


def rows_cover(out: Path, uids: set[str]) -> bool:
    return uids <= {r["sop_instance_uid"] for r in read_csv(out, missing_ok=True)}


def scp(args: argparse.Namespace) -> dict:
    items = phantoms(args.instances, size=args.size)
    work = WORK / "kill-scp"
    shutil.rmtree(work, ignore_errors=True)
    port = free_port()
    start = time.monotonic()
    server = ServerProcess(work, port)
    senders = [Sender(port, share, batch=args.batch, pace_s=args.send_pace).start() for share in split_by_study(items, args.senders)]
    kills_while_sending = 0
    for i, wait in enumerate(random_moments(args.kills, 0.5, 4.0, seed=args.seed)):
        time.sleep(wait)
        sending = not all(s.done for s in senders)
        kills_while_sending += sending
        kill_tree(server.proc)
        acked = sum(len(s.acked) for s in senders)
        print(f"kill {i + 1}/{args.kills} at {time.monotonic() - start:.0f} s: {acked} with Success so far, {'while sending' if sending else 'after sending'}", flush=True)
        server = ServerProcess(work, port)
    for s in senders:
        s.join(args.timeout)
    acked = {p: t for s in senders for p, t in s.acked.items()}
    sent_uids = {i.sop_instance_uid for i in items if str(i.path) in acked}
    wait_for(lambda: rows_cover(server.out, sent_uids), args.timeout, "rows for every instance with Success", server.proc, server.log)
    status = server.stop()
    figures = account(
        "kill-scp",
        acked,
        items,
        server.out,
        server.store,
        senders=args.senders,
        instances=len(items),
        kills=args.kills,
        kills_while_sending=kills_while_sending,
        associations_broken=sum(s.broken_runs for s in senders),
        associations_refused=sum(s.failed_runs - s.broken_runs for s in senders),
        exit_status_after_sigterm=status,
        wall_s=round(time.monotonic() - start),
        tracebacks_in_logs=count_tracebacks(work),
    )
    return save_result(figures)


def copy_in(items: list, incoming: Path, copied: dict[str, float], stop: threading.Event, pace_s: float) -> None:
    """Copy each phantom into ``incoming`` the way ``cp`` does (64 KiB writes to the final name)."""
    for item in items:
        if stop.is_set():
            return
        target = incoming / item.study_instance_uid[-12:] / item.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(item.path, "rb") as src, open(target, "wb") as dst:
            while chunk := src.read(65536):
                dst.write(chunk)
                dst.flush()
        copied[str(item.path)] = time.time()
        if pace_s:
            stop.wait(pace_s)


def watch(args: argparse.Namespace) -> dict:
    items = phantoms(args.instances, size=args.size)
    work = WORK / "kill-watch"
    shutil.rmtree(work, ignore_errors=True)
    incoming = work / "incoming"
    incoming.mkdir(parents=True)
    out = work / "results.csv"
    command = ["watch", str(incoming), "--out", str(out), "--overlays-for", "none", "--study-timeout", "1", "--max-latency", "0.2", "--settle", "1"]

    def launch(n: int):
        log = work / f"watch-{n}.log"
        proc = start_ichscan(log, *command)
        wait_for(lambda: "watching" in log.read_text().lower() or "ready" in log.read_text().lower(), 120, "watch to start", proc, log)
        return proc

    start = time.monotonic()
    copied: dict[str, float] = {}
    stop = threading.Event()
    copier = threading.Thread(target=copy_in, args=(items, incoming, copied, stop, args.pace), daemon=True)
    proc = launch(0)
    copier.start()
    kills_while_copying = 0
    for i, wait in enumerate(random_moments(args.kills, 1.0, 6.0, seed=args.seed + 1)):
        time.sleep(wait)
        copying = copier.is_alive()
        kills_while_copying += copying
        kill_tree(proc)
        print(f"kill {i + 1}/{args.kills} at {time.monotonic() - start:.0f} s: {len(copied)} copied so far", flush=True)
        proc = launch(i + 1)
    copier.join(args.timeout)
    sent_uids = {i.sop_instance_uid for i in items if str(i.path) in copied}
    wait_for(lambda: rows_cover(out, sent_uids), args.timeout, "rows for every file copied in", proc)
    proc.terminate()
    status = proc.wait(timeout=120)
    figures = account(
        "kill-watch",
        copied,
        items,
        out,
        None,
        instances=len(items),
        kills=args.kills,
        kills_while_copying=kills_while_copying,
        exit_status_after_sigterm=status,
        wall_s=round(time.monotonic() - start),
        tracebacks_in_logs=count_tracebacks(work),
    )
    return save_result(figures)


def count_tracebacks(work: Path) -> int:
    return sum(p.read_text(errors="replace").count("Traceback") for p in work.glob("*.log"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", nargs="?", choices=["scp", "watch", "all"], default="all")
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--size", type=int, default=512, help="phantom rows and columns")
    parser.add_argument("--batch", type=int, default=25, help="scp: files per association")
    parser.add_argument("--send-pace", type=float, default=1.5, help="scp: seconds a sender waits between associations (so the sending outlasts the kills)")
    parser.add_argument("--pace", type=float, default=0.08, help="watch: seconds between copied files")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.scenario in ("scp", "all"):
        scp(args)
    if args.scenario in ("watch", "all"):
        watch(args)


if __name__ == "__main__":
    main()
