"""What ``--saliency`` costs: per positive slice, and for ``ichscan batch`` end to end.

    python benchmarks/bench_saliency.py [--files N] [--device auto|cpu|cuda] [--repeats R]
        [--json PATH] [--quick]

On the suite's uncompressed 512x512 phantoms (cached under .bench/, about half of the
slices with bleeds) and the bundled weights:

1. model side, per image, torch threads = 1 (as bench_suite.py measures it), CPU time on
   the CPU, wall time on a GPU:
   - ``model``: ``Screener.predict`` at the engine's batch size (what every slice costs);
   - ``saliency``: ``Screener.saliency`` (forward with the hook, backward to the last
     convolution, Grad-CAM) on batches of positive slices only: what each positive slice
     adds;
2. overlay side, per overlay, one thread: render and save the palette PNG, and the RGB PNG
   with the heat map (what a positive slice's overlay costs with --saliency);
3. ``ichscan batch --overlays-for positive`` in this process, steady state, without and
   with ``--saliency``, alternating ``--repeats`` times; medians and their ratio.

Not a test: run it by hand on a quiet machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as the ichscan command does

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import engine_rate, files_in, phantoms
from ichscan.dicom import OK, decode_many
from ichscan.overlay import save_overlay
from ichscan.pipeline.sizing import prepare_screening, resolve_device
from ichscan.plugins import get_plugin_manager


def rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def seconds(run, count: int, device: torch.device) -> float:
    """Seconds per item of ``run()`` over ``count`` items: CPU time, wall time on a GPU."""
    run()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / count
    start = time.process_time()
    run()
    return (time.process_time() - start) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=600, help="phantoms for the end-to-end runs (default 600)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=None, help="alternating end-to-end runs (default 3; 1 with --quick)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer files and one repeat (to check the script works)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    files = 200 if args.quick else args.files
    device = resolve_device(args.device)
    folder = phantoms(files)
    paths = [str(p) for p in files_in(folder)][:files]

    pm = get_plugin_manager()
    setup = prepare_screening(pm, device=str(device), saliency=True)
    screener, batch_size = setup.screener, setup.batch_size
    threads = torch.get_num_threads()
    resize_to = screener.settings.size if device.type == "cpu" else None
    sample = paths[: max(2 * batch_size, 96)]
    decoded = [d for d in decode_many(sample, resize_to=resize_to, display=True) if d.status == OK]
    results = screener.screen(decoded)
    positives = [(d, r) for d, r in zip(decoded, results, strict=True) if r.is_positive]
    if not positives:
        parser.error("no positive slices among the phantoms: nothing to measure")
    figures: dict = {
        "settings": {
            "device": str(device),
            "files": len(paths),
            "batch_size": batch_size,
            "threads": threads,
            "positive_fraction_of_sample": len(positives) / len(decoded),
            "heatmap_shape": list(positives[0][1].heatmap.shape),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        }
    }

    # 1. Model side, one thread.
    torch.set_num_threads(1)
    batch = [decoded[i % len(decoded)] for i in range(batch_size)]
    t_model = seconds(lambda: screener.predict([d.pixels for d in batch], [d.slope for d in batch], [d.intercept for d in batch]), batch_size, device)
    pos = [positives[i % len(positives)] for i in range(batch_size)]
    with torch.no_grad():
        inputs = screener.model_input([d.pixels for d, _ in pos], [d.slope for d, _ in pos], [d.intercept for d, _ in pos])
    labels = [r.top_label for _, r in pos]
    t_saliency = seconds(lambda: screener.saliency(inputs, labels), batch_size, device)
    torch.set_num_threads(threads)

    # 2. Overlay side, one thread: render and save, palette vs RGB with the heat map.
    overlays = [r for _, r in positives][:32]
    heatmaps = [r.heatmap for r in overlays]
    with tempfile.TemporaryDirectory() as tmp:

        def write_all() -> None:
            for i, result in enumerate(overlays):
                save_overlay(result.display, result, Path(tmp) / f"{i}.png")

        for result in overlays:
            result.heatmap = None
        t_palette = seconds(write_all, len(overlays), torch.device("cpu"))
        palette_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir()) / len(overlays)
        for result, heatmap in zip(overlays, heatmaps, strict=True):
            result.heatmap = heatmap
        t_heat = seconds(write_all, len(overlays), torch.device("cpu"))
        heat_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir()) / len(overlays)
    figures["per_image_ms"] = {
        "model": 1000 * t_model,
        "saliency_per_positive": 1000 * t_saliency,
        "overlay_palette": 1000 * t_palette,
        "overlay_heatmap_rgb": 1000 * t_heat,
    }
    figures["overlay_kb"] = {"palette": palette_bytes / 1024, "heatmap_rgb": heat_bytes / 1024}

    # 3. batch end to end, positive overlays, without and with --saliency (alternating).
    plain_runs, saliency_runs = [], []
    for _ in range(repeats):
        plain_runs.append(engine_rate(folder, "positive", None, None, device=str(device)))
        print(f"batch_positive_overlays_images_per_s (run) {plain_runs[-1]:.1f}", flush=True)
        saliency_runs.append(engine_rate(folder, "positive", None, None, device=str(device), saliency=True))
        print(f"batch_positive_overlays_saliency_images_per_s (run) {saliency_runs[-1]:.1f}", flush=True)
    plain, with_saliency = statistics.median(plain_runs), statistics.median(saliency_runs)
    figures["batch_images_per_s"] = {
        "overlays_positive": plain,
        "overlays_positive_saliency": with_saliency,
        "time_with_vs_without_saliency": plain / with_saliency,
        "runs": {"without": plain_runs, "with": saliency_runs},
    }
    figures["settings"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(rounded(figures), indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
