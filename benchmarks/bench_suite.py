"""Throughput suite: per-image core times, the pipeline bound, the naive loop, `ichscan batch`
end to end (CSV only and with every overlay) and its peak memory, in one run.

    python benchmarks/bench_suite.py [--data DIR] [--files N] [--device auto|cpu|cuda]
        [--json PATH] [--memory-files 1000,4000] [--skip-naive] [--quick]

Generates uncompressed 512x512 phantoms (cached under .bench/) unless --data names a
folder of CT slices, then measures on the same files and the same model (the bundled
weights):

1. per-image core time of each side, each measured alone in this process:
   - decode: ``decode_many`` on one core, as a decode worker runs it (read, HU
     conversion, and on the CPU the resize to the model's input size the engine does in
     its workers), in chunks of 8 files;
   - model: the preprocessing hook + model (``Screener.predict``) with torch threads = 1
     at the engine's batch size (on a GPU: the batch's wall time per image);
   CPU time of this process on the CPU path, wall time for the model side on a GPU;
2. bounds, from those times, with ``cores`` usable CPUs, W decode workers and T torch
   threads, the engine's defaults on this machine:
   - CPU: pipeline bound = cores / (t_decode + t_model): every image costs
     t_decode + t_model core-seconds and nothing else is counted. The bound with the
     engine's split = min(cores / (t_decode + t_model), min(W, cores) / t_decode,
     min(T, cores) / t_model): each side can use at most the cores it has. The CPU
     defaults (W = T = cores, the sides share every core) make it equal the pipeline
     bound; a dedicated split (W + T <= cores) is limited by its slower side;
   - GPU: pipeline bound = min(cores / t_decode, 1 / t_model); with the engine's split
     min(W / t_decode, 1 / t_model) (W = cores - 1: one core feeds the GPU);
3. the naive per-file loop (see benchmarks/_common.py) on the same device;
4. `ichscan batch` in this process, steady state: files/s from the batch that completes
   20 % of the run to the last one (model load and pool start-up excluded), CSV only and
   with ``--overlays-for all``; ``--repeats`` alternating runs, medians reported. Both
   sides are measured again right before and right after each CSV-only run, and that run
   is compared with the bound from those two measurements (paired): the ratio to the bound
   is the median of the paired ratios, as a shared machine's speed drifts over minutes.
   Over the same steady-state window, CPU per image of the whole machine and of this
   process tree alone (``pipeline.*``): on a shared machine they tell CPU the pipeline
   adds from cores other processes took;
5. peak resident memory of the `ichscan batch` process tree (main process, forkserver,
   decode workers; /proc sampled every 50 ms) on phantom sets of each --memory-files size.

Every figure and ratio is printed and, with --json, written as JSON (``formulas`` in it
says how each bound is computed). Not a test: run it by hand on a quiet machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as the ichscan command does

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import pydicom
import torch

from _common import engine_rate, files_in, naive_loop, peak_memory_mb, phantoms
from ichscan.dicom import OK, decode_many
from ichscan.pipeline.sizing import cpu_count, prepare_screening, resolve_device
from ichscan.models import load_model
from ichscan.plugins import get_plugin_manager
from ichscan.shm import default_transfer

#: Targets of the throughput issue, checked in the ``targets`` section of the output.
TARGETS = {
    "batch_csv_vs_pipeline_bound": (">=", 0.8),
    "batch_csv_vs_naive": (">=", 2.5),
    "overlays_all_time_vs_csv": ("<=", 2.0),
    "peak_memory_largest_vs_smallest": ("<=", 1.3),
}


def machine_facts(device: torch.device) -> dict:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        memory_gb = None
    return {
        "cores": cpu_count(),
        "os_cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "machine": platform.machine(),
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "pydicom": pydicom.__version__,
        "pillow": PIL.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def decode_seconds(paths: list[str], resize_to: int | None, chunk: int = 8, warmup: int = 16) -> tuple[float, float]:
    """(CPU, wall) seconds per image of ``decode_many`` here, on one thread."""
    decode_many(paths[:warmup], resize_to=resize_to)
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, len(paths), chunk):
        decode_many(paths[start : start + chunk], resize_to=resize_to)
    return (time.process_time() - cpu) / len(paths), (time.perf_counter() - wall) / len(paths)


def model_seconds(screener, decoded: list, batch_size: int, batches: int) -> tuple[float, float]:
    """(CPU, wall) seconds per image of preprocessing + model at ``batch_size``, cycling
    through ``decoded`` (torch threads as set by the caller)."""

    def batch(i: int) -> list:
        return [decoded[(i * batch_size + j) % len(decoded)] for j in range(batch_size)]

    def run(b: list) -> None:
        screener.predict([d.pixels for d in b], [d.slope for d in b], [d.intercept for d in b])

    run(batch(0))  # warm-up: first-call allocations, cuDNN autotuning
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(batches):
        run(batch(i))
    if screener.device.type == "cuda":
        torch.cuda.synchronize()
    n = batches * batch_size
    return (time.process_time() - cpu) / n, (time.perf_counter() - wall) / n


def bounds(device_type: str, cores: int, workers: int, threads: int, t_decode: float, t_model: float) -> dict:
    if device_type == "cuda":
        pipeline = min(cores / t_decode, 1 / t_model)
        split = min(max(1, workers) / t_decode, 1 / t_model)
        formulas = {
            "pipeline_bound": "min(cores / t_decode, 1 / t_model)",
            "engine_split_bound": "min(W / t_decode, 1 / t_model)",
        }
    else:
        pipeline = cores / (t_decode + t_model)
        split = min(pipeline, min(max(1, workers), cores) / t_decode, min(max(1, threads), cores) / t_model)
        formulas = {
            "pipeline_bound": "cores / (t_decode + t_model)",
            "engine_split_bound": "min(cores / (t_decode + t_model), min(W, cores) / t_decode, min(T, cores) / t_model)",
        }
    formulas["t_decode"] = "CPU seconds per image of decode_many in one process, one thread (per_image_ms.decode)"
    formulas["t_model"] = (
        "wall seconds per image of Screener.predict on the GPU at the engine's batch size (per_image_ms.model)"
        if device_type == "cuda"
        else "CPU seconds per image of Screener.predict, torch threads = 1, at the engine's batch size (per_image_ms.model)"
    )
    formulas["W, T"] = "the engine's default decode workers and torch threads (settings.workers, settings.threads)"
    return {"pipeline_bound_images_per_s": pipeline, "engine_split_bound_images_per_s": split, "formulas": formulas}


def parse_sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError("expected positive file counts, e.g. 1000,4000")
    return sizes


def flatten(figures: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, value in figures.items():
        if isinstance(value, dict):
            rows.extend(flatten(value, f"{prefix}{key}."))
        else:
            rows.append((prefix + key, value))
    return rows


def rounded(value):
    if isinstance(value, float):
        return round(value, 4) if abs(value) < 10 else round(value, 1)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def say(name: str, value) -> None:
    print(f"{name:48s} {rounded(value)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="a folder of CT slices instead of generated phantoms")
    parser.add_argument("--files", type=int, default=1200, help="phantoms to generate for the timings (default 1200; with --data every file under it is used)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--memory-files", type=parse_sizes, default=[1000, 4000], help="phantom sets for peak memory (default 1000,4000)")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the naive loop")
    parser.add_argument("--quick", action="store_true", help="one repeat and smaller samples (to check the suite works)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating end-to-end runs (default 5; 1 with --quick)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)

    device = resolve_device(args.device)
    folder = args.data.resolve() if args.data else phantoms(args.files)
    files = files_in(folder)
    if not files:
        parser.error(f"no files under {folder}")
    figures: dict = {"machine": machine_facts(device)}
    for name, value in figures["machine"].items():
        say(f"machine.{name}", value)

    # The engine's own sizing on this machine (what `ichscan batch` picks with no options).
    pm = get_plugin_manager()
    setup = prepare_screening(pm, device=str(device))
    screener = setup.screener
    workers, batch_size, threads = setup.workers, setup.batch_size, torch.get_num_threads()
    resize_to = screener.settings.size if device.type == "cpu" else None
    figures["settings"] = {
        "data": str(folder),
        "files": len(files),
        "workers": workers,
        "threads": threads if device.type == "cpu" else None,
        "batch_size": batch_size,
        "overlay_threads": cpu_count(),
        "transfer": default_transfer(device.type),
        "resize_in_workers": resize_to,
        "repeats": repeats,
    }
    for name, value in figures["settings"].items():
        say(f"settings.{name}", value)

    # 1. Each side alone, on one core, measured right before and right after every
    # CSV-only run: a shared machine's speed drifts by tens of percent over minutes, so each
    # end-to-end run is compared with a bound measured around it (paired), and the target
    # is the median of those paired ratios.
    paths = [str(p) for p in files[: 120 if args.quick else 400]]
    decoded = [d for d in decode_many(paths[: max(batch_size, 64)], resize_to=resize_to) if d.status == OK]
    if not decoded:
        parser.error(f"none of the first files under {folder} decodes as a CT slice")
    side_runs: list[tuple[float, float, float, float]] = []

    def measure_sides(n_paths: int, batches: int) -> tuple[float, float]:
        """(t_decode, t_model) now, in seconds: CPU times on the CPU, the model's wall time on a GPU."""
        t_decode_cpu, t_decode_wall = decode_seconds(paths[:n_paths], resize_to)
        torch.set_num_threads(1)
        t_model_cpu, t_model_wall = model_seconds(screener, decoded, batch_size, batches)
        torch.set_num_threads(threads)
        side_runs.append((t_decode_cpu, t_decode_wall, t_model_cpu, t_model_wall))
        say("per_image_ms (decode, model) (run)", (round(1000 * t_decode_cpu, 3), round(1000 * t_model_cpu, 3)))
        return t_decode_cpu, (t_model_wall if device.type == "cuda" else t_model_cpu)

    side_paths, side_batches = (120, 3) if args.quick else (len(paths), 8)

    # 2-3. Naive loop and the engine, alternating so a noisy neighbour hits both alike.
    naive_model = None if args.skip_naive else load_model(pm).model
    naive_runs, csv_runs, overlay_runs, paired, paired_split = [], [], [], [], []
    pipeline_runs: list[tuple[float, float, float, float]] = []
    for repeat in range(repeats):
        if naive_model is not None:
            torch.set_num_threads(threads)
            naive_runs.append(naive_loop(files[: 150 if args.quick else 400], naive_model, device=device))
            say("naive_images_per_s (run)", naive_runs[-1])
        before = measure_sides(side_paths, side_batches)
        # With the machine's busy core-seconds per file over the same steady-state window:
        # where the run's time goes when it falls short of the bound (other processes
        # count too: read it with the load average).
        csv_runs.append(engine_rate(folder, "none", None, None, device=str(device), cpu=pipeline_runs))
        say("batch_csv_images_per_s (run)", csv_runs[-1])
        after = measure_sides(side_paths, side_batches)
        around = bounds(device.type, cpu_count(), workers, threads, (before[0] + after[0]) / 2, (before[1] + after[1]) / 2)
        paired.append(csv_runs[-1] / around["pipeline_bound_images_per_s"])
        paired_split.append(csv_runs[-1] / around["engine_split_bound_images_per_s"])
        say("batch_csv_vs_pipeline_bound (run)", paired[-1])
        overlay_runs.append(engine_rate(folder, "all", None, None, device=str(device)))
        say("batch_overlays_all_images_per_s (run)", overlay_runs[-1])
    t_decode_cpu, t_decode_wall, t_model_cpu, t_model_wall = (statistics.median(column) for column in zip(*side_runs))
    t_model = t_model_wall if device.type == "cuda" else t_model_cpu
    figures["per_image_ms"] = {
        "decode": 1000 * t_decode_cpu,
        "decode_wall": 1000 * t_decode_wall,
        "model": 1000 * t_model,
        "model_wall": 1000 * t_model_wall,
        "runs": [[1000 * t for t in run] for run in side_runs],
    }
    bound = bounds(device.type, cpu_count(), workers, threads, t_decode_cpu, t_model)
    figures["bounds"] = bound
    figures["pipeline"] = {
        "core_ms_per_image": statistics.median(run[0] for run in pipeline_runs),
        "alone_core_ms_per_image": 1000 * (t_decode_cpu + t_model),
        "cores_busy_fraction": statistics.median(run[1] for run in pipeline_runs),
        # This process tree alone (main process, forkserver, decode workers): on a shared
        # machine, own_core_ms_per_image > alone_core_ms_per_image means the pipeline itself
        # costs more CPU per image than its two sides; own_cores_fraction well below
        # cores_busy_fraction means other processes took the cores.
        "own_core_ms_per_image": statistics.median(run[2] for run in pipeline_runs),
        "own_cores_fraction": statistics.median(run[3] for run in pipeline_runs),
    }
    csv_rate, overlay_rate = statistics.median(csv_runs), statistics.median(overlay_runs)
    figures["naive_images_per_s"] = statistics.median(naive_runs) if naive_runs else None
    figures["batch_csv_images_per_s"] = csv_rate
    figures["batch_overlays_all_images_per_s"] = overlay_rate
    figures["runs"] = {
        "naive": naive_runs,
        "batch_csv": csv_runs,
        "batch_overlays_all": overlay_runs,
        "batch_csv_vs_pipeline_bound": paired,
    }
    ratios = {
        # Median of the paired ratios (each run against the bound measured around it).
        "batch_csv_vs_pipeline_bound": statistics.median(paired),
        "batch_csv_vs_engine_split_bound": statistics.median(paired_split),
        # The same from the medians of all runs, unpaired (more exposed to drift).
        "batch_csv_vs_pipeline_bound_unpaired": csv_rate / bound["pipeline_bound_images_per_s"],
        "batch_csv_vs_naive": csv_rate / figures["naive_images_per_s"] if naive_runs else None,
        "overlays_all_time_vs_csv": csv_rate / overlay_rate,
    }
    figures["ratios"] = ratios

    # 4. Peak memory on growing phantom sets (CSV only).
    memory: dict[str, float] = {}
    for n in args.memory_files:
        memory[str(n)] = peak_memory_mb(phantoms(n), device=str(device))
        say(f"peak_memory_mb.{n}", memory[str(n)])
    figures["peak_memory_mb"] = memory
    if len(memory) >= 2:
        sizes = sorted(args.memory_files)
        ratios["peak_memory_largest_vs_smallest"] = memory[str(sizes[-1])] / memory[str(sizes[0])]

    figures["targets"] = {
        name: {"value": ratios[name], "target": f"{op} {limit}", "met": (ratios[name] >= limit) if op == ">=" else (ratios[name] <= limit)}
        for name, (op, limit) in TARGETS.items()
        if ratios.get(name) is not None
    }
    figures["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    figures = rounded(figures)

    print("\nsummary", flush=True)
    for name, value in flatten({k: v for k, v in figures.items() if k not in ("machine", "settings")}):
        say(name, value)
    say("machine.load_average_at_end", figures["machine"]["load_average_at_end"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
