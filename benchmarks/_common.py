"""Helpers the throughput benchmarks share: phantoms, the naive loop, engine runs, memory.

Not a test and not part of the package: imported by the scripts in this folder, which
are run by hand (``python benchmarks/bench_suite.py``).
"""

from __future__ import annotations

import os

# As the ichscan command does: OpenMP threads sleep instead of spinning (before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image
from torchvision import transforms

from ichscan.pipeline import BatchOptions, run_batch
from ichscan.plugins import get_plugin_manager
from ichscan.reporting import Reporter
from ichscan.synth import generate

ROOT = Path(__file__).resolve().parents[1]


def phantoms(n: int) -> Path:
    """``n`` uncompressed 512x512 phantoms (20 slices a study), cached under ``.bench/``."""
    folder = ROOT / ".bench" / f"explicit512_{n}"
    marker = folder / ".complete"
    if not marker.exists():
        slices = 20
        generate(folder, studies=(n + slices - 1) // slices, slices=slices, seed=12345, size=512, transfer_syntaxes=["ExplicitVRLittleEndian"])
        marker.write_text("ok")
    return folder


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def naive_loop(files: list[Path], model: torch.nn.Module, warmup: int = 10, device: str | torch.device = "cpu") -> float:
    """Images/s of the naive per-file loop: dcmread -> pixel_array min-max to 8 bits ->
    PIL RGB -> torchvision Resize((224, 224)), ToTensor, Normalize(ImageNet) -> model on
    one image under no_grad (on ``device``)."""
    tf = transforms.Compose(
        [
            transforms.Resize((224, 224)),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    model = model.to(device).eval()

    def one(path: Path) -> None:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float32)
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6) * 255.0
        img = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
        x = tf(img).unsqueeze(0).to(device)
        with torch.no_grad():
            torch.sigmoid(model(x)).cpu()

    for path in files[:warmup]:
        one(path)
    start = time.perf_counter()
    for path in files[warmup:]:
        one(path)
    return (len(files) - warmup) / (time.perf_counter() - start)


def cpu_busy_seconds() -> float:
    """Busy core-seconds of the whole machine since boot (/proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def _descendants(root_pid: int) -> list[int]:
    """``root_pid`` and every process below it (Linux /proc; just ``root_pid`` elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [root_pid]
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root_pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by a process and its live descendants
    (this process by default: main process, forkserver, decode workers). Unlike
    :func:`cpu_busy_seconds` it leaves out other processes on a shared machine."""
    total = 0
    for pid in _descendants(os.getpid() if root_pid is None else root_pid):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


class Clock(Reporter):
    """A reporter that notes when each batch of results arrives, the machine's busy
    core-seconds and the CPU seconds of this process tree at that moment."""

    name = "bench-clock"

    def __init__(self) -> None:
        self.marks: list[tuple[float, int, float, float]] = []
        self.count = 0

    def on_results(self, results, studies) -> None:
        self.count += len(results)
        self.marks.append((time.perf_counter(), self.count, cpu_busy_seconds(), tree_cpu_seconds()))

    def _window(self, total: int):
        start = next(m for m in self.marks if m[1] >= 0.2 * total)
        return start, self.marks[-1]

    def steady_rate(self, total: int) -> float:
        """Files/s from the batch that completes 20 % of the run to the last one
        (model load and pool start-up excluded)."""
        start, end = self._window(total)
        if end[0] <= start[0]:  # one batch only: no steady state to measure
            return float("nan")
        return (end[1] - start[1]) / (end[0] - start[0])

    def steady_cpu(self, total: int) -> tuple[float, float, float, float]:
        """Over the same window: (busy core-ms per file, fraction of all cores busy) of the
        whole machine, where other processes count too (read it with the load average),
        then the same two for this process tree only (main process, forkserver, workers)."""
        start, end = self._window(total)
        if end[0] <= start[0] or end[1] <= start[1]:
            return float("nan"), float("nan"), float("nan"), float("nan")
        files, capacity = end[1] - start[1], (end[0] - start[0]) * (os.cpu_count() or 1)
        busy, own = end[2] - start[2], end[3] - start[3]
        return 1000 * busy / files, busy / capacity, 1000 * own / files, own / capacity


def engine_rate(
    folder: Path,
    overlays_for: str,
    workers: int | None,
    batch_size: int | None,
    threads: int | None = None,
    device: str = "cpu",
    cpu: list | None = None,
    saliency: bool = False,
    engine: str = "local",
    model_name: str | None = None,
) -> float:
    """Steady-state images/s of ``ichscan batch`` (in this process) on ``folder``;
    ``cpu`` (a list) gets ``Clock.steady_cpu`` of the run appended; ``saliency``: with
    ``--saliency``; ``engine``: ``--engine`` (``ray`` joins the Ray session this process
    started, if any)."""
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
                device=device,
                workers=workers,
                batch_size=batch_size,
                threads=threads,
                progress=False,
                saliency=saliency,
                engine=engine,
                model_name=model_name,
            ),
            pm,
        )
    assert summary.ok == summary.files, summary
    if cpu is not None:
        cpu.append(clock.steady_cpu(summary.files))
    return clock.steady_rate(summary.files)


def tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    total = 0
    for pid in _descendants(root_pid):
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def peak_memory_mb(folder: Path, device: str = "auto", overlays_for: str = "none") -> float:
    """Peak resident memory of `ichscan batch` on ``folder``, decode workers included
    (sampled every 50 ms)."""
    ichscan = Path(sys.executable).with_name("ichscan")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                str(ichscan), "-q", "batch", str(folder), "--out", str(Path(tmp) / "r.csv"),
                "--overlays-for", overlays_for, "--device", device, "--no-progress",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss_bytes(proc.pid))
            time.sleep(0.05)
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"ichscan batch failed ({proc.returncode}): {stderr.strip()[-500:]}")
    return peak / 2**20
