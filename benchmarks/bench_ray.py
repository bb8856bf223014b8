"""The Ray engine against the local engine on this machine, and the per-slice costs that size a cluster.

    python benchmarks/bench_ray.py [--files 2000] [--rounds 2] [--model simplecnn] [--json out.json]

On the same uncompressed 512x512 phantoms (cached in .bench/) and the same weights:
  1. ``ichscan batch`` with ``--engine local`` and ``--engine ray``, interleaved (local, ray,
     local, ray, ...) so that a noisy neighbour on a shared machine hits both alike.
     Steady state: files/s from the result batch that completes 20 % of the run to the last
     (the reporter's own timestamps), so start-up is left out: Ray's (one session, started
     here once with num_cpus = cores, before the first run), the actors' model load, the
     decode pool's start. The ratio is ray / local per pair, and its median.
  2. Per-slice costs, one core: decode (``decode_many`` with the resize to 224 x 224, as a
     decode worker or Ray decode task runs it: CPU seconds per slice) and the model
     (``Screener.predict``: preprocessing + model, CPU seconds per slice with one torch
     thread and wall seconds per slice with one per core), at the engine's batch size.
The load average is printed before every run. Not a test: run it by hand.
"""

from __future__ import annotations

import os

# As the ichscan command does: OpenMP threads sleep instead of spinning (before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse
import json
import statistics
import subprocess
import time

import torch

from _common import engine_rate, files_in, phantoms
from bench_suite import decode_seconds, model_seconds
from ichscan.dicom import decode_many
from ichscan.pipeline.sizing import cpu_count, prepare_screening
from ichscan.plugins import get_plugin_manager
from ichscan.records import Status


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def per_slice_costs(folder, model_name: str | None, batch_size: int, n: int = 200) -> dict[str, float]:
    """Decode and model costs per slice, in seconds (see the module docstring)."""
    setup = prepare_screening(get_plugin_manager(), model_name=model_name, device="cpu", batch_size=batch_size)
    screener = setup.screener
    paths = [str(p) for p in files_in(folder)[:n]]
    size = screener.settings.size
    t_decode, _ = decode_seconds(paths, size)
    decoded = [d for d in decode_many(paths[:64], resize_to=size) if d.status == Status.OK]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t_model_1, _ = model_seconds(screener, decoded, batch_size, 8)
    torch.set_num_threads(cpu_count())
    _, t_model_all = model_seconds(screener, decoded, batch_size, 8)
    torch.set_num_threads(threads)
    return {
        "decode_cpu_s": t_decode,
        "model_cpu_s_1_thread": t_model_1,
        f"model_wall_s_{cpu_count()}_threads": t_model_all,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (local, ray)")
    parser.add_argument("--model", default=None, help="registered model  [default: simplecnn]")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import ray

    folder = phantoms(args.files)
    print(f"{len(files_in(folder))} phantoms in {folder}; {cpu_count()} cores")
    print("before Ray:", load())
    started = time.perf_counter()
    ray.init(num_cpus=cpu_count(), include_dashboard=False, configure_logging=False)
    print(f"Ray started in {time.perf_counter() - started:.1f} s (not counted below)")
    runs: list[dict] = []
    try:
        for round_ in range(args.rounds):
            for engine in ("local", "ray"):
                before, cpu = load(), time.process_time()
                rate = engine_rate(folder, "none", None, None, engine=engine, model_name=args.model)
                # The driver's own CPU (all its threads; with Ray, only the driver: decode
                # and model run in Ray's worker processes), start-up included.
                driver_ms = 1000 * (time.process_time() - cpu) / args.files
                runs.append({"round": round_, "engine": engine, "slices_per_s": rate, "load_before": before, "process_cpu_ms_per_slice": driver_ms})
                print(f"round {round_} {engine:5s}: {rate:7.1f} slices/s, this process {driver_ms:.2f} CPU ms/slice  ({before})")
    finally:
        ray.shutdown()
    ratios = [r["slices_per_s"] / l["slices_per_s"] for l, r in zip(runs[::2], runs[1::2], strict=True)]
    costs = per_slice_costs(folder, args.model, 32)
    figures = {
        "files": args.files,
        "cores": cpu_count(),
        "model": args.model or "simplecnn",
        "runs": runs,
        "ray_over_local": ratios,
        "ray_over_local_median": statistics.median(ratios),
        "per_slice": costs,
        "load_after": load(),
    }
    print("ray / local per pair:", ", ".join(f"{r:.2f}" for r in ratios), f"(median {figures['ray_over_local_median']:.2f})")
    print("per slice:", ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in costs.items()))
    print("after:", figures["load_after"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
