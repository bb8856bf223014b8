"""Latency and throughput of ``ichscan watch`` (a benchmark, not a test).

Runs the watcher as a subprocess (``python -m ichscan watch``) on a temporary folder
and measures, from the outside, what a sender sees:

- **trickle**: single files, one at a time, each written as ``NAME.part`` and renamed
  (as senders do); latency from the rename (the file's last change) to its row in
  ``results.csv``; median and p95;
- **burst**: many files moved in at once; throughput from the first file landing to the
  last row, in files/s.

With ``--compare-overlays`` it measures instead what overlays cost a burst: the same
burst (default 1,000 files) with ``--overlays-for none`` and with ``--overlays-for all``,
as ``--pairs`` paired runs (none, all, none, all, ...: a fresh watcher and output folder
each, the same files and settings), and prints each run's time, each pair's ratio
all / none and the median of the pair ratios. A run's time is from the first file landing
to the last row, less the settle interval (every file of the burst settles at once, that
long after it lands, whatever the overlays); the ratio with the settle included is
printed too. The target of issue 12 is a median of at most 1.6.

    python benchmarks/bench_watch.py                        # defaults: --settle 2 --max-latency 1
    python benchmarks/bench_watch.py --settle 0.5 --max-latency 0.2 --trickle 20 --burst 1000
    python benchmarks/bench_watch.py --compare-overlays --pairs 3     # burst of 1,000, none vs all
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class CsvTail:
    """Reads the rows appended to a CSV since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.rest = ""

    def new_paths(self) -> list[str]:
        if not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
            self.offset = fh.tell()
        text = self.rest + chunk
        complete, _, self.rest = text.rpartition("\n")
        if not complete:
            self.rest = text
            return []
        return [row[0] for row in csv.reader(io.StringIO(complete + "\n")) if row and row[0] != "path"]


def wait_rows(tail: CsvTail, wanted: set[str], timeout: float) -> dict[str, float]:
    """Poll until every path in ``wanted`` has a row; returns ``path -> time seen``."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while wanted - seen.keys():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {len(wanted - seen.keys())} rows missing")
        now = time.monotonic()
        for path in tail.new_paths():
            seen.setdefault(path, now)
        time.sleep(0.005)
    return seen


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def watch_command(incoming: Path, out: Path, args: argparse.Namespace, overlays_for: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ichscan",
        "watch",
        str(incoming),
        "--out",
        str(out),
        "--overlays-for",
        overlays_for,
        "--settle",
        str(args.settle),
        "--max-latency",
        str(args.max_latency),
        "--study-timeout",
        "3600",
        *args.watch_args.split(),
    ]


def run_watch(work: Path, files: list[Path], args: argparse.Namespace, overlays_for: str, trickle: int) -> dict:
    """One watcher on a fresh folder under ``work``: warm-up file, ``trickle`` single files,
    then the rest of ``files`` as one burst. Returns the measurements."""
    incoming, out = work / "incoming", work / "out" / "results.csv"
    incoming.mkdir(parents=True)
    out.parent.mkdir(parents=True)
    log = open(work / "watch.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(watch_command(incoming, out, args, overlays_for), stdout=subprocess.DEVNULL, stderr=log)
    tail = CsvTail(out)
    latencies: list[float] = []
    burst = files[1 + trickle :]
    first = last_write = done = 0.0
    try:
        # Warm-up: start-up, model load, first batch.
        warm = incoming / "warmup.dcm"
        shutil.copy(files[0], warm)
        wait_rows(tail, {str(warm)}, 120)

        # Numbered names: the phantom generator can repeat a SOPInstanceUID across studies.
        for i, src in enumerate(files[1 : 1 + trickle]):
            dest = incoming / f"trickle-{i:05d}.dcm"
            part = dest.with_name(dest.name + ".part")
            shutil.copy(src, part)
            os.rename(part, dest)
            written = time.monotonic()
            seen = wait_rows(tail, {str(dest)}, 60)
            latencies.append(seen[str(dest)] - written)
            time.sleep(args.gap)

        if burst:
            # Copied beside the watched folder first (not timed), then renamed in at once.
            burst_dir = work / "burst"
            burst_dir.mkdir()
            staged = [shutil.copy(src, burst_dir / f"{i:05d}.dcm") for i, src in enumerate(burst)]
            (incoming / "burst").mkdir()
            first = time.monotonic()
            wanted = set()
            for path in staged:
                dest = incoming / "burst" / Path(path).name
                os.rename(path, dest)
                wanted.add(str(dest))
            last_write = time.monotonic()
            seen = wait_rows(tail, wanted, 600)
            done = max(seen.values())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            log.close()
    return {
        "latencies": latencies,
        "burst": len(burst),
        "move_seconds": last_write - first,
        "seconds": done - first,
        "overlays": sum(1 for _ in (out.parent / "overlays").rglob("*.png")) if overlays_for != "none" else 0,
    }


def compare_overlays(work: Path, files: list[Path], args: argparse.Namespace) -> None:
    """Paired bursts: --overlays-for none, then all, ``args.pairs`` times."""
    print(
        f"ichscan watch, burst of {len(files) - 1} files, {args.size}x{args.size} phantoms, settle {args.settle} s, "
        f"max latency {args.max_latency} s, {args.pairs} pairs (none, all alternated)"
        + (f", watch options: {args.watch_args}" if args.watch_args.strip() else ""),
        flush=True,
    )
    ratios, gross_ratios = [], []
    for pair in range(1, args.pairs + 1):
        runs = {}
        for overlays_for in ("none", "all"):
            run_dir = work / f"pair{pair}-{overlays_for}"
            runs[overlays_for] = run = run_watch(run_dir, files, args, overlays_for, trickle=0)
            net = run["seconds"] - args.settle
            print(
                f"  pair {pair} --overlays-for {overlays_for:4s}: {run['seconds']:.2f} s first file to last row "
                f"({net:.2f} s less the settle; {run['burst'] / net:.1f} files/s; moved in within "
                f"{run['move_seconds']:.2f} s; {run['overlays']} overlays)",
                flush=True,
            )
            shutil.rmtree(run_dir, ignore_errors=True)
        none, all_ = runs["none"]["seconds"], runs["all"]["seconds"]
        ratios.append((all_ - args.settle) / (none - args.settle))
        gross_ratios.append(all_ / none)
        print(f"pair {pair}: all / none = {ratios[-1]:.3f} (settle included: {gross_ratios[-1]:.3f})", flush=True)
    median = statistics.median(ratios)
    print(
        f"overlays all / none, median of {len(ratios)} pairs: {median:.3f} "
        f"(pairs {', '.join(f'{r:.3f}' for r in ratios)}; settle included: {statistics.median(gross_ratios):.3f}); "
        f"target <= 1.6: {'met' if median <= 1.6 else 'NOT met'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trickle", type=int, default=15, help="single files, one after the other")
    parser.add_argument("--burst", type=int, default=None, help="files moved in at once (default 600; 1000 with --compare-overlays)")
    parser.add_argument("--size", type=int, default=512, help="image size of the phantoms")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--max-latency", type=float, default=1.0)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between trickle files, after each row")
    parser.add_argument("--watch-args", default="", help="more options for ichscan watch, space separated")
    parser.add_argument(
        "--compare-overlays",
        action="store_true",
        help="paired bursts with --overlays-for none and all instead of trickle + burst (no trickle)",
    )
    parser.add_argument("--pairs", type=int, default=3, help="paired runs with --compare-overlays (default 3)")
    args = parser.parse_args(argv)
    if args.burst is None:
        args.burst = 1000 if args.compare_overlays else 600
    if args.compare_overlays:
        if "--overlays-for" in args.watch_args.split():
            parser.error("--compare-overlays sets --overlays-for itself; leave it out of --watch-args")
        if args.pairs < 1 or args.burst < 1:
            parser.error("--compare-overlays needs --pairs >= 1 and --burst >= 1")
    trickle = 0 if args.compare_overlays else args.trickle

    from ichscan.synth import generate

    work = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    try:
        studies = max(1, (trickle + args.burst + 1 + 49) // 50)
        records = generate(
            work / "staging",
            studies=studies,
            slices=50,
            seed=3,
            size=args.size,
            transfer_syntaxes=["ExplicitVRLittleEndian"],
        )
        files = [Path(r.path) for r in records][: trickle + args.burst + 1]
        if args.compare_overlays:
            compare_overlays(work, files, args)
            return
        run = run_watch(work / "run", files, args, "none", trickle)
        latencies = run["latencies"]
        print(f"ichscan watch, {args.size}x{args.size} phantoms, settle {args.settle} s, max latency {args.max_latency} s")
        if latencies:
            print(
                f"trickle ({len(latencies)} files): latency from last write to CSV row: "
                f"median {statistics.median(latencies):.2f} s, p95 {percentile(latencies, 0.95):.2f} s, "
                f"max {max(latencies):.2f} s"
            )
        if run["burst"]:
            print(
                f"burst ({run['burst']} files, moved in within {run['move_seconds']:.2f} s): "
                f"{run['burst'] / run['seconds']:.1f} files/s from first file to last row "
                f"({run['seconds']:.1f} s; includes the {args.settle} s settle)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
