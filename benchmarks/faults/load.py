"""Sustained load on ``ichscan serve-scp``: 8 dcmtk senders, flat out, for 10 minutes.

    python benchmarks/faults/load.py [--senders 8] [--minutes 10] [--size 256] [--rate R] [--name load]

Each sender sends one study (20 slices, one association) after another, as fast as the
server takes them (or, with ``--rate``, so that all senders together offer R instances/s), with fresh Study/Series/SOP Instance UIDs every time (a pool of phantoms
whose UIDs are rewritten in place, same length, so every instance is new to the server and
the senders cost little CPU). The server runs with its defaults but for ``--overlays-for none``.

Measured:
- received instances/s (Successes the senders saw, over the sending time) and screened/s;
- screening lag per instance: from the sender's Success to the row's commit in the ledger
  (``files.done_at``; the CSV row is written in the same step), p50 / p95 / max, overall and
  per minute of the run, so a growing backlog shows;
- the server's resident memory (its process tree, decode workers included) every 5 s: per
  minute median and max, and the peak;
- disk: the store, the state file and the CSVs at the end;
- the accounting of common.account (0 lost, 0 duplicates).

Figures go to .bench/faults/results/<name>.json.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, Phantom, Sender, ServerProcess, account, du_mb, free_port, phantoms, rss_mb, save_result, split_by_study, wait_for  # noqa: E402


class FreshStudies:
    """Copies of one study's files with new UIDs each round, written over the same files.

    The phantom generator's UIDs are ``<root>.<39 digits>``; the last 9 digits of each of the
    study's Study, Series, SOP Instance and Frame of Reference UIDs are replaced by a counter,
    everywhere the UID's bytes occur (file meta included), so lengths and values stay valid."""

    def __init__(self, study: list[Phantom], folder: Path, sender: int):
        import pydicom

        self.study, self.folder, self.sender, self.round = study, folder, sender, 0
        folder.mkdir(parents=True, exist_ok=True)
        self.blobs = [item.path.read_bytes() for item in study]
        ds = pydicom.dcmread(study[0].path, stop_before_pixels=True)
        self.uids = {study[0].study_instance_uid, str(ds.SeriesInstanceUID), str(ds.get("FrameOfReferenceUID", ""))} - {""}
        self.uids |= {item.sop_instance_uid for item in study}

    def next(self) -> list[Phantom]:
        self.round += 1
        tag = f"{self.sender:02d}{self.round:07d}"
        new = {uid: uid[:-9] + tag for uid in self.uids}
        items = []
        for i, (item, blob) in enumerate(zip(self.study, self.blobs)):
            for old, fresh in new.items():
                blob = blob.replace(old.encode(), fresh.encode())
            path = self.folder / f"{i:03d}.dcm"
            path.write_bytes(blob)
            items.append(Phantom(path, new[item.sop_instance_uid], new[item.study_instance_uid]))
        return items


def sender_loop(port: int, fresh: FreshStudies, until: float, acked: dict[str, float], items: dict[str, Phantom], stop: threading.Event, study_every_s: float) -> None:
    while time.monotonic() < until and not stop.is_set():
        began = time.monotonic()
        study = fresh.next()
        sender = Sender(port, study, batch=len(study), retry_s=1.0)
        sender.run()
        for item in study:
            if str(item.path) in sender.acked:
                acked[item.sop_instance_uid] = sender.acked[str(item.path)]
                items[item.sop_instance_uid] = item
        stop.wait(max(0.0, study_every_s - (time.monotonic() - began)))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rate", type=float, default=0.0, help="instances/s from all senders together (0: as fast as the server takes them)")
    parser.add_argument("--drain-timeout", type=float, default=1800)
    parser.add_argument("--name", default="load", help="the scenario's name in the results")
    args = parser.parse_args()

    pool = split_by_study(phantoms(args.senders * 20, size=args.size, slices=20, seed=4242), args.senders)
    work = WORK / args.name
    shutil.rmtree(work, ignore_errors=True)
    port = free_port()
    server = ServerProcess(work, port, "--study-timeout", "5", "--max-latency", "1")
    time.sleep(5)  # the model loads before the clock starts
    fresh = [FreshStudies(study, work / "senders" / str(n), n) for n, study in enumerate(pool)]
    acked: dict[str, float] = {}
    items: dict[str, Phantom] = {}
    stop = threading.Event()
    start_wall, start = time.time(), time.monotonic()
    until = start + args.minutes * 60
    study_every_s = 20 * args.senders / args.rate if args.rate else 0.0
    threads = [threading.Thread(target=sender_loop, args=(port, f, until, acked, items, stop, study_every_s), daemon=True) for f in fresh]
    for t in threads:
        t.start()
    samples: list[tuple[float, float]] = []
    while any(t.is_alive() for t in threads):
        samples.append((time.monotonic() - start, rss_mb(server.proc.pid)))
        time.sleep(5)
    sending_s = time.monotonic() - start
    db = server.work / "ichscan-state.sqlite"

    def screened() -> int:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("SELECT COUNT(*) FROM files WHERE state = 'done'").fetchone()[0]

    def drained() -> bool:
        samples.append((time.monotonic() - start, rss_mb(server.proc.pid)))
        return screened() >= len(acked)

    wait_for(drained, args.drain_timeout, "the backlog to be screened", server.proc, server.log)
    drained_s = time.monotonic() - start
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        done_at = dict(con.execute("SELECT sop_instance_uid, done_at FROM files WHERE state = 'done'").fetchall())
    disk = {"store_mb": round(du_mb(server.store)), "state_mb": round(du_mb(*db.parent.glob("ichscan-state.sqlite*")), 1), "csv_mb": round(du_mb(*server.work.glob("results*.csv")), 1)}
    status = server.stop()

    lags = [(acked[u] - start_wall, done_at[u] - acked[u]) for u in acked if u in done_at]
    per_minute = []
    for minute in range(int(args.minutes + 0.999)):
        in_minute = [lag for t, lag in lags if minute * 60 <= t < (minute + 1) * 60]
        rss = [r for t, r in samples if minute * 60 <= t < (minute + 1) * 60]
        per_minute.append(
            {
                "minute": minute + 1,
                "received": len(in_minute),
                "screened": sum(1 for t in done_at.values() if minute * 60 <= t - start_wall < (minute + 1) * 60),
                "lag_p50_s": round(percentile(in_minute, 0.5), 2),
                "lag_p95_s": round(percentile(in_minute, 0.95), 2),
                "lag_max_s": round(max(in_minute, default=float("nan")), 2),
                "rss_median_mb": round(statistics.median(rss)) if rss else None,
                "rss_max_mb": round(max(rss)) if rss else None,
            }
        )
    all_lags = [lag for _t, lag in lags]
    rss_all = [r for _t, r in samples]
    half = len(rss_all) // 2
    figures = account(
        args.name,
        # account() keys on file paths; the senders reuse theirs every round, so each gets its UID.
        {str(items[u].path) + "#" + u: t for u, t in acked.items()},
        [Phantom(Path(str(i.path) + "#" + u), u, i.study_instance_uid) for u, i in items.items()],
        server.out,
        None,
        senders=args.senders,
        minutes=args.minutes,
        rate_asked=args.rate or "flat out",
        size=args.size,
        sending_s=round(sending_s),
        drained_after_s=round(drained_s),
        received_per_s=round(len(acked) / sending_s, 1),
        screened_per_s=round(len(done_at) / drained_s, 1),
        lag_p50_s=round(percentile(all_lags, 0.5), 2),
        lag_p95_s=round(percentile(all_lags, 0.95), 2),
        lag_max_s=round(max(all_lags, default=float("nan")), 2),
        rss_peak_mb=round(max(rss_all)),
        rss_median_first_half_mb=round(statistics.median(rss_all[:half])) if half else None,
        rss_median_second_half_mb=round(statistics.median(rss_all[half:])) if half else None,
        per_minute=per_minute,
        exit_status_after_sigterm=status,
        **disk,
    )
    save_result(figures)


if __name__ == "__main__":
    main()
