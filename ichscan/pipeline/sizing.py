"""Sizing a run for the machine: device, decode workers, model threads, batch size."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy
import torch

from ichscan.models import LoadedModel

if TYPE_CHECKING:
    from ichscan.pipeline.screener import Screener

log = logging.getLogger(__name__)


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (try --device auto or cpu)")
    return device


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA (bf16 where supported, else fp16); ``None`` (float32) elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_workers(device: torch.device) -> int:
    """Decode workers: one per core on the CPU, all cores but one with a GPU.

    On the CPU, workers and model threads share the cores on purpose: each side idles
    while the other works, so sharing beats splitting them (figures in docs/benchmarks.md).
    """
    cores = cpu_count()
    if device.type == "cuda":
        return max(1, cores - 1)
    return cores


def default_threads(workers: int) -> int:
    """Model threads on the CPU: every core (see :func:`default_workers`)."""
    return cpu_count()


def default_batch_size(device: torch.device) -> int:
    # CPU: 32 amortises the fully connected layer's weights; see SimpleCNN.cpu_chunk.
    # CUDA: the most a GPU gets; Screener.fit_batch_size lowers it when memory is short.
    return 256 if device.type == "cuda" else 32


def fit_batch_size(free_bytes: int, per_image_bytes: int, preferred: int, share: float = 0.5) -> int:
    """The largest batch up to ``preferred`` whose working memory fits ``share`` of ``free_bytes``.

    Batches below ``preferred`` are rounded down to a multiple of 8 (tensor-core
    friendly) when that leaves at least 8; never below 1.
    """
    if per_image_bytes <= 0:
        return preferred
    fits = int(free_bytes * share) // per_image_bytes
    if fits >= preferred:
        return preferred
    return max(1, fits // 8 * 8 if fits >= 8 else fits)


@dataclass
class ScreeningSetup:
    """The model side of a run with the worker, batch and thread counts it uses."""

    screener: Screener
    workers: int
    batch_size: int

    @property
    def loaded(self) -> LoadedModel:
        return self.screener.loaded

    @property
    def device(self) -> torch.device:
        return self.screener.device


def prepare_screening(
    pm: pluggy.PluginManager,
    *,
    weights: os.PathLike[str] | str | None = None,
    model_name: str | None = None,
    thresholds: dict[str, float] | None = None,
    device: str = "auto",
    workers: int | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    saliency: bool = False,
) -> ScreeningSetup:
    """Load the model, tell the user what its weights are, and size the run for the machine
    (the part ``batch``, ``watch`` and ``serve-scp`` share); ``saliency``: the screener
    gives positive slices a heat map."""
    from ichscan.models import load_model

    resolved = resolve_device(device)
    loaded = load_model(pm, weights, model_name=model_name, thresholds=thresholds)
    if loaded.notice():
        log.warning("%s", loaded.notice())
    workers = default_workers(resolved) if workers is None else workers
    if threads:
        torch.set_num_threads(threads)
    elif resolved.type == "cpu":
        torch.set_num_threads(default_threads(workers))
    from ichscan.pipeline.screener import Screener

    screener = Screener(pm, loaded, resolved, saliency=saliency)
    if not batch_size:
        batch_size = default_batch_size(resolved)
        if resolved.type == "cuda":
            batch_size = screener.fit_batch_size(batch_size)
    return ScreeningSetup(screener, workers, batch_size)
