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
from pathlib import Path

import numpy as np
import torch

from _common import engine_rate, files_in, naive_loop, peak_memory_mb, phantoms
from ichscan.pipeline.sizing import cpu_count
from ichscan.models import load_model
from ichscan.plugins import get_plugin_manager


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
