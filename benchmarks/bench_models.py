"""Backbone candidates for ``ichnet``: training cost per image on this machine.

    python benchmarks/bench_models.py [--threads 2] [--batch 32] [--steps 3] [--only NAME ...]

For each candidate: forward + backward + Adam step per image (train mode, batch 32,
224 x 224, channels-last, random inputs), and forward alone (eval, inference mode, for
validation). The candidates take turns, one step each per round, for ``--steps`` rounds
after a warm-up step, so a change of load on a shared machine hits all of them alike;
figures are medians, in wall-clock and in CPU time of this process (``cpu``: what an idle
machine would give is about ``cpu / threads``), with the load average over the run.
Then the estimated wall clock of
``ichscan train DATA --labels CSV --out RUN --model M`` on 2,000 slices from a cold cache:

    headers + decode of 2,000 slices (measured here on 512 x 512 phantoms)
    + epochs x (1,600 x (forward + backward + augmentation) + 200 x forward)

with ``ichnet``'s default epochs (its ``train_defaults``; ``--epochs`` to change), once from the
wall-clock figures and once from ``cpu / threads`` (an idle machine). Not a test: run it by
hand, on an otherwise idle machine where possible. Its 2026-11-30 run (dev-2c, load 5 to 7)
is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as the ichscan command does

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ichscan.default_plugins.ichnet import ICHNet, PlainCNN
from ichscan.labels import LABELS

TRAIN_IMAGES, VAL_IMAGES, ALL_IMAGES = 1600, 200, 2000
BUDGET_S = 25 * 60


def _resnet18(channels: int) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=len(LABELS))
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _efficientnet_b0(channels: int) -> nn.Module:
    from torchvision.models import efficientnet_b0

    model = efficientnet_b0(weights=None, num_classes=len(LABELS))
    first = model.features[0][0]
    model.features[0][0] = nn.Conv2d(channels, first.out_channels, kernel_size=3, stride=2, padding=1, bias=False)
    return model


class _IssueCNN(nn.Module):
    """The plain 4-layer CNN of issue 13 as it describes it: conv-BN-ReLU-pool x 4 (32-64-128-128),
    global max pool, one linear layer."""

    def __init__(self, channels: int, widths=(32, 64, 128, 128)):
        super().__init__()
        layers, previous = [], channels
        for width in widths:
            layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            previous = width
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(previous, len(LABELS))

    def forward(self, x):
        return self.head(self.features(x))


#: name -> (description, factory(channels))
CANDIDATES: dict[str, tuple[str, Callable[[int], nn.Module]]] = {
    "plain4": ("issue 13's CNN: conv-BN-ReLU-pool x4, 32-64-128-128, global max pool", lambda c: _IssueCNN(c)),
    "plain4-poolfirst": ("the same, conv-pool-BN-ReLU (a quarter of the element-wise work)", lambda c: PlainCNN(c, (32, 64, 128, 128))),
    "plain5": ("5 stages conv-pool-BN-ReLU, 32-64-128-256-256 (ichnet)", lambda c: PlainCNN(c, (32, 64, 128, 256, 256))),
    "plain5-wide": ("5 stages conv-pool-BN-ReLU, 48-96-192-256-256", lambda c: PlainCNN(c, (48, 96, 192, 256, 256))),
    "resnet18": ("torchvision resnet18, weights=None", _resnet18),
    "efficientnet_b0": ("torchvision efficientnet_b0, weights=None", _efficientnet_b0),
}


class Candidate:
    """One model with its batch, optimizer and timings."""

    def __init__(self, model: nn.Module, channels: int, batch: int, size: int):
        self.model = model.to(memory_format=torch.channels_last)
        self.batch = batch
        self.x = torch.rand(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
        self.y = (torch.rand(batch, len(LABELS)) < 0.3).float()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.times: dict[str, list[tuple[float, float]]] = {"train": [], "eval": []}

    def train_step(self) -> tuple[float, float]:
        self.model.train()
        wall, cpu = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.model(self.x), self.y).backward()
        self.optimizer.step()
        return time.perf_counter() - wall, time.process_time() - cpu

    def eval_step(self) -> tuple[float, float]:
        self.model.eval()
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            self.model(self.x)
        return time.perf_counter() - wall, time.process_time() - cpu

    def figures(self) -> dict:
        def ms(kind: str, which: int) -> float:
            return 1000 * statistics.median(t[which] for t in self.times[kind]) / self.batch

        return {
            "params": sum(p.numel() for p in self.model.parameters()),
            "train_ms": ms("train", 0),
            "train_cpu_ms": ms("train", 1),
            "eval_ms": ms("eval", 0),
            "eval_cpu_ms": ms("eval", 1),
        }


def time_candidates(candidates: dict[str, Candidate], steps: int) -> None:
    """Warm up each, then ``steps`` rounds in which every candidate takes one step of each kind."""
    for candidate in candidates.values():
        candidate.train_step()
        candidate.eval_step()
    for round_ in range(steps):
        for name, candidate in candidates.items():
            candidate.times["train"].append(candidate.train_step())
            candidate.times["eval"].append(candidate.eval_step())
        print(f"  round {round_ + 1}/{steps} done, load {os.getloadavg()[0]:.2f}", flush=True)


def time_data(count: int = 16) -> dict:
    """Per-slice cost of header reading, decoding (+ resize to 224) and augmentation of a 9-channel input."""
    from ichscan.dicom import decode_many, read_header_instance
    from ichscan.synth import generate
    from ichscan.train.dataset import augment

    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, studies=2, slices=count // 2, seed=5, layout="rsna", size=512, transfer_syntaxes=["ExplicitVRLittleEndian"])
        paths = sorted(str(p) for p in Path(tmp, "stage_2_train").glob("*.dcm"))
        start = time.perf_counter()
        for p in paths:
            read_header_instance(p)
        header = (time.perf_counter() - start) / len(paths)
        start = time.perf_counter()
        decode_many(paths, resize_to=224)
        decode = (time.perf_counter() - start) / len(paths)
    x = torch.rand(9, 224, 224)
    augment(x)  # the first call imports torchvision's transforms
    start = time.perf_counter()
    for _ in range(count):
        augment(x)
    aug = (time.perf_counter() - start) / count
    return {"header_ms": 1000 * header, "decode_ms": 1000 * decode, "augment9_ms": 1000 * aug}


def estimate_s(train_ms: float, eval_ms: float, data: dict, epochs: int) -> float:
    cold = ALL_IMAGES * (data["header_ms"] * 2 + data["decode_ms"]) / 1000  # headers: split + series
    per_epoch = (TRAIN_IMAGES * (train_ms + data["augment9_ms"]) + VAL_IMAGES * eval_ms) / 1000
    return cold + epochs * per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--channels", type=int, nargs="+", default=[9], help="input channels to time (9: ichnet, 3: ichnet-2d)")
    parser.add_argument("--only", nargs="*", default=None, help="candidates to time (default: all)")
    parser.add_argument("--epochs", type=int, default=ICHNet.train_defaults["epochs"], help="epochs for the estimate")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = time_data()
    print(f"data: header {data['header_ms']:.2f} ms, decode+resize {data['decode_ms']:.2f} ms, augment (9 ch) {data['augment9_ms']:.2f} ms per slice")
    candidates: dict[tuple[str, int], Candidate] = {}
    for name, (description, factory) in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        for channels in args.channels:
            candidates[(name, channels)] = Candidate(factory(channels), channels, args.batch, args.size)
    load_before = os.getloadavg()[0]
    time_candidates(candidates, args.steps)  # type: ignore[arg-type]
    load_after = os.getloadavg()[0]
    rows = []
    print(f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after; {args.threads} threads, batch {args.batch}, {args.size} px")
    print(
        f"{'candidate':18s} {'ch':>3s} {'params':>8s} {'train ms/img':>13s} {'(cpu)':>7s} {'eval ms/img':>12s} {'(cpu)':>7s}"
        f" {'est. wall':>10s} {'(idle: cpu/threads)':>20s}"
    )
    for (name, channels), candidate in candidates.items():
        figures = candidate.figures()
        total = estimate_s(figures["train_ms"], figures["eval_ms"], data, args.epochs)
        idle = estimate_s(figures["train_cpu_ms"] / args.threads, figures["eval_cpu_ms"] / args.threads, data, args.epochs)
        rows.append({"candidate": name, "description": CANDIDATES[name][0], "channels": channels, **figures, "estimate_s": total, "estimate_idle_s": idle, "epochs": args.epochs})
        print(
            f"{name:18s} {channels:3d} {figures['params'] / 1e6:7.2f}M {figures['train_ms']:13.1f} {figures['train_cpu_ms']:7.1f}"
            f" {figures['eval_ms']:12.1f} {figures['eval_cpu_ms']:7.1f} {total / 60:6.1f} min {idle / 60:16.1f} min"
        )
    if args.json:
        summary = {"data": data, "threads": args.threads, "batch": args.batch, "size": args.size, "load": [load_before, load_after], "rows": rows}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
