"""Training throughput on this machine, images per second.

    python benchmarks/bench_train.py [--images 400] [--json out.json]

Generates RSNA-layout phantoms (uncompressed 512x512, cached in .bench/), then runs
`ichscan train` for two epochs with the decode cache on and reports, from the run's own
history: epoch 1 (decoding DICOM and filling the cache) and epoch 2 (reading the cache),
each as training images per second (validation time excluded by timing it separately).
Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from ichscan.pipeline.sizing import cpu_count
from ichscan.synth import generate
from ichscan.train import loop
from ichscan.train.loop import TrainOptions, run_training

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    data = ROOT / ".bench" / f"rsna512_{args.images}"
    if not (data / ".complete").exists():
        generate(data, studies=max(10, args.images // 20), slices=20, seed=99, layout="rsna", size=512, transfer_syntaxes=["ExplicitVRLittleEndian"])
        (data / ".complete").write_text("ok")

    # Time validation separately so the figures are training images per second.
    val_seconds: list[float] = []
    original = loop.predict_loader

    def timed_predict(*a, **k):
        start = time.monotonic()
        try:
            return original(*a, **k)
        finally:
            val_seconds.append(time.monotonic() - start)

    loop.predict_loader = timed_predict
    with tempfile.TemporaryDirectory() as tmp:
        opts = TrainOptions(data_dir=data, labels=data / "stage_2_train.csv", out_dir=Path(tmp), epochs=2, progress=False)
        summary = run_training(opts)
        train_images = sum(1 for line in (Path(tmp) / "split.csv").read_text().splitlines() if line.endswith(",train"))
    history = summary["history"]
    rates = [train_images / (h["seconds"] - v) for h, v in zip(history, val_seconds, strict=True)]
    figures = {
        "machine": f"{platform.machine()}, {cpu_count()} cores, torch {torch.__version__}",
        "train_images_per_epoch": train_images,
        "epoch1_decode_and_train_images_per_s": round(rates[0], 1),
        "epoch2_cached_images_per_s": round(rates[1], 1),
    }
    for key, value in figures.items():
        print(f"{key:40s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
