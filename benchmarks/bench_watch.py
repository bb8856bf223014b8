"""Latency and throughput of ``ichscan watch`` (a benchmark, not a test).

Runs the watcher as a subprocess (``python -m ichscan watch``) on a temporary folder
and measures, from the outside, what a sender sees:

- **trickle**: single files, one at a time, each written as ``NAME.part`` and renamed
  (as senders do); latency from the rename (the file's last change) to its row in
  ``results.csv``; median and p95;
- **burst**: many files moved in at once; throughput from the first file landing to the
  last row, in files/s.

    python benchmarks/bench_watch.py                        # defaults: --settle 2 --max-latency 1
    python benchmarks/bench_watch.py --settle 0.5 --max-latency 0.2 --trickle 20 --burst 1000
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trickle", type=int, default=15, help="single files, one after the other")
    parser.add_argument("--burst", type=int, default=600, help="files moved in at once")
    parser.add_argument("--size", type=int, default=512, help="image size of the phantoms")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--max-latency", type=float, default=1.0)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between trickle files, after each row")
    parser.add_argument("--watch-args", default="", help="more options for ichscan watch, space separated")
    args = parser.parse_args(argv)

    from ichscan.synth import generate

    work = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    try:
        studies = max(1, (args.trickle + args.burst + 1 + 49) // 50)
        records = generate(
            work / "staging",
            studies=studies,
            slices=50,
            seed=3,
            size=args.size,
            transfer_syntaxes=["ExplicitVRLittleEndian"],
        )
        files = [Path(r.path) for r in records][: args.trickle + args.burst + 1]
        incoming, out = work / "incoming", work / "out" / "results.csv"
        incoming.mkdir()
        out.parent.mkdir()
        cmd = [
            sys.executable,
            "-m",
            "ichscan",
            "watch",
            str(incoming),
            "--out",
            str(out),
            "--overlays-for",
            "none",
            "--settle",
            str(args.settle),
            "--max-latency",
            str(args.max_latency),
            "--study-timeout",
            "3600",
            *args.watch_args.split(),
        ]
        log = open(work / "watch.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        tail = CsvTail(out)
        try:
            # Warm-up: start-up, model load, first batch.
            warm = incoming / "warmup.dcm"
            shutil.copy(files[0], warm)
            wait_rows(tail, {str(warm)}, 120)

            latencies = []
            # Numbered names: the phantom generator can repeat a SOPInstanceUID across studies.
            for i, src in enumerate(files[1 : 1 + args.trickle]):
                dest = incoming / f"trickle-{i:05d}.dcm"
                part = dest.with_name(dest.name + ".part")
                shutil.copy(src, part)
                os.rename(part, dest)
                written = time.monotonic()
                seen = wait_rows(tail, {str(dest)}, 60)
                latencies.append(seen[str(dest)] - written)
                time.sleep(args.gap)

            burst = files[1 + args.trickle :]
            burst_dir = work / "burst"
            burst_dir.mkdir()
            staged = [shutil.copy(src, burst_dir / f"{i:05d}.dcm") for i, src in enumerate(burst)]
            first = time.monotonic()
            wanted = set()
            for path in staged:
                dest = incoming / "burst" / Path(path).name
                dest.parent.mkdir(exist_ok=True)
                os.rename(path, dest)
                wanted.add(str(dest))
            last_write = time.monotonic()
            seen = wait_rows(tail, wanted, 600)
            done = max(seen.values())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            log.close()

        print(f"ichscan watch, {args.size}x{args.size} phantoms, settle {args.settle} s, max latency {args.max_latency} s")
        if latencies:
            print(
                f"trickle ({len(latencies)} files): latency from last write to CSV row: "
                f"median {statistics.median(latencies):.2f} s, p95 {percentile(latencies, 0.95):.2f} s, "
                f"max {max(latencies):.2f} s"
            )
        if burst:
            print(
                f"burst ({len(burst)} files, moved in within {last_write - first:.2f} s): "
                f"{len(burst) / (done - first):.1f} files/s from first file to last row "
                f"({done - first:.1f} s; includes the {args.settle} s settle)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
