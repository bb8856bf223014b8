"""Throughput of `ichscan batch` against the naive per-file loop, in one process.

    python benchmarks/bench_batch.py [--files 800] [--json out.json]

Generates uncompressed 512x512 phantoms (cached in .bench/), then measures on the same
files and the same SimpleCNN weights:
  1. the naive loop: dcmread -> pixel_array min-max to 8 bits -> PIL RGB -> torchvision
     Resize((224, 224)), ToTensor, Normalize(ImageNet) -> model on one image, no_grad;
  2. ichscan's engine (CSV only), steady state: files/s between 20% and 100% of the run,
     timed from the reporter's own batch timestamps (start-up excluded);
  3. the same with overlays for every slice.
Ratios are against (1), measured in this same process. Not a test: run it by hand.
"""

from __future__ import annotations

import os

# As the ichscan command does: OpenMP threads sleep instead of spinning (before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image
from torchvision import transforms

from ichscan.batch import BatchOptions, run_batch
from ichscan.engine import cpu_count
from ichscan.models import load_model
from ichscan.plugins import get_plugin_manager
from ichscan.reporting import Reporter
from ichscan.synth import generate

ROOT = Path(__file__).resolve().parents[1]


def phantoms(n: int) -> Path:
    folder = ROOT / ".bench" / f"explicit512_{n}"
    marker = folder / ".complete"
    if not marker.exists():
        slices = 20
        generate(folder, studies=(n + slices - 1) // slices, slices=slices, seed=12345, size=512, transfer_syntaxes=["ExplicitVRLittleEndian"])
        marker.write_text("ok")
    return folder


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm") if not p.name.startswith("."))


def naive_loop(files: list[Path], model: torch.nn.Module, warmup: int = 10) -> float:
    tf = transforms.Compose(
        [
            transforms.Resize((224, 224)),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    model.eval()

    def one(path: Path) -> None:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float32)
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6) * 255.0
        img = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
        x = tf(img).unsqueeze(0)
        with torch.no_grad():
            torch.sigmoid(model(x))

    for path in files[:warmup]:
        one(path)
    start = time.perf_counter()
    for path in files[warmup:]:
        one(path)
    return (len(files) - warmup) / (time.perf_counter() - start)


class Clock(Reporter):
    name = "bench-clock"

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []
        self.count = 0

    def on_results(self, results, studies) -> None:
        self.count += len(results)
        self.marks.append((time.perf_counter(), self.count))

    def steady_rate(self, total: int) -> float:
        start = next((t, c) for t, c in self.marks if c >= 0.2 * total)
        end = self.marks[-1]
        return (end[1] - start[1]) / (end[0] - start[0])


def engine_rate(folder: Path, overlays_for: str, workers: int | None, batch_size: int | None, threads: int | None = None) -> float:
    import ichscan

    clock = Clock()

    class ClockPlugin:
        @ichscan.hookimpl
        def ichscan_register_reporters(self, register, config):
            register(clock)

    pm = get_plugin_manager()
    pm.register(ClockPlugin(), name="bench-clock")
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_batch(
            BatchOptions(
                input_dir=folder,
                out=Path(tmp) / "r.csv",
                overlays_for=overlays_for,
                device="cpu",
                workers=workers,
                batch_size=batch_size,
                threads=threads,
                progress=False,
            ),
            pm,
        )
    assert summary.ok == summary.files, summary
    return clock.steady_rate(summary.files)


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def peak_memory_mb(folder: Path) -> float:
    """Peak resident memory of `ichscan batch` on ``folder``, decode workers included."""
    import subprocess

    ichscan = Path(sys.executable).with_name("ichscan")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [str(ichscan), "-q", "batch", str(folder), "--out", str(Path(tmp) / "r.csv"), "--overlays-for", "none", "--no-progress"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_bytes(proc.pid))
            time.sleep(0.05)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=800)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sweep", action="store_true", help="also try workers x threads x batch size combinations")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="alternating naive/engine runs (medians reported)")
    args = parser.parse_args()

    folder = phantoms(args.files)
    files = files_in(folder)
    pm = get_plugin_manager()
    model = load_model(pm).model
    torch.set_num_threads(cpu_count())
    # Alternate the two, so a noisy neighbour on this shared machine hits both alike;
    # the figures are the medians.
    naive_runs, csv_runs = [], []
    for _ in range(args.repeats):
        torch.set_num_threads(cpu_count())
        naive_runs.append(naive_loop(files[: min(len(files), 300)], model))
        csv_runs.append(engine_rate(folder, "none", args.workers, args.batch_size, args.threads))
    naive, csv_only = float(np.median(naive_runs)), float(np.median(csv_runs))
    if args.sweep:
        for workers in (1, 2):
            for threads in (1, 2):
                for batch_size in (8, 16, 32):
                    rate = engine_rate(folder, "none", workers, batch_size, threads)
                    print(f"sweep workers {workers} threads {threads} batch {batch_size}: {rate:.1f} images/s", flush=True)
    overlays_all = engine_rate(folder, "all", args.workers, args.batch_size, args.threads)
    small = phantoms(max(100, args.files // 4))
    memory_small, memory_large = peak_memory_mb(small), peak_memory_mb(folder)
    figures = {
        "machine": f"{platform.machine()}, {cpu_count()} cores, torch {torch.__version__}",
        "files": len(files),
        "naive_images_per_s": round(naive, 1),
        "batch_csv_images_per_s": round(csv_only, 1),
        "batch_overlays_all_images_per_s": round(overlays_all, 1),
        "ratio_batch_vs_naive": round(csv_only / naive, 2),
        "ratios_per_repeat": [round(c / n, 2) for n, c in zip(naive_runs, csv_runs)],
        "ratio_overlays_all_time_vs_csv": round(csv_only / overlays_all, 2),
        f"peak_memory_mb_{len(files_in(small))}_files": round(memory_small),
        f"peak_memory_mb_{len(files)}_files": round(memory_large),
        "ratio_peak_memory": round(memory_large / memory_small, 2),
    }
    for key, value in figures.items():
        print(f"{key:34s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
