"""Training on several processes: ``torchrun --nproc-per-node N -m ichscan train ...``.

torchrun starts N copies of ``ichscan train`` with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and the rendezvous address in the environment. :func:`init_distributed` joins them into
one process group (NCCL on GPUs, gloo on CPUs); the model is wrapped in
``DistributedDataParallel``.

The design keeps a distributed run the same optimisation as a single-process one with the
same seed and ``--batch-size``:

* ``--batch-size`` is the global batch. Every rank draws the same epoch from the same
  :class:`~ichscan.train.sampler.BalancedSampler` and takes its share of each step's
  draws (:class:`RankBatches`): the union of the shares of a step is exactly the batch
  single-process training would take.
* The loss of a rank is its share's summed loss divided by the step's global count
  (times the number of ranks, which DDP's averaging of gradients takes back), so the
  gradient is that of the global batch's mean loss, whatever the shares' sizes, also when
  images are unreadable. A rank with nothing to do in a step (the last, short step of an
  epoch) still takes part with a zero loss: every rank runs the same number of steps.
* Validation is split across the ranks and gathered; rank 0 computes the metrics, writes
  ``best.pt``, ``last.pt``, ``history.csv`` and logs. Every rank resumes from ``last.pt``.

Only Batch normalisation differs (statistics per rank's share, as DDP does by default).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank, number of processes, rank on this node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Ranks()


def ranks_from_env(env: dict[str, str] | None = None) -> Ranks:
    """The ranks torchrun set (``WORLD_SIZE`` absent or 1: a single process)."""
    env = dict(os.environ) if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    return Ranks(
        rank=int(env["RANK"]),
        world=world,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world=int(env.get("LOCAL_WORLD_SIZE", str(world))),
    )


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group when there is one; return the ranks and this rank's device.

    On CUDA each rank takes the GPU of its local rank (NCCL); on the CPU the ranks share the
    cores (gloo) and the caller divides threads and loader workers among them.
    """
    ranks = ranks_from_env()
    if not ranks.enabled:
        return ranks, device
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {ranks.local_rank} has no GPU: {torch.cuda.device_count()} visible on this node")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if not ranks.main:
        # One voice: rank 0 logs what the run does; the others only warnings and errors.
        logging.getLogger("ichscan").setLevel(logging.WARNING)
    log.info("distributed training: %d processes (%s), this is rank %d on %s", ranks.world, backend, ranks.rank, device)
    return ranks, device


def shutdown(ranks: Ranks) -> None:
    if ranks.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.enabled:
        dist.barrier()


def step_totals(ranks: Ranks, count: int, stop: bool, device: torch.device) -> tuple[int, bool]:
    """Over all ranks, in one all-reduce: the step's readable images, and whether any rank
    was asked to stop (so that all stop after the same step)."""
    if not ranks.enabled:
        return count, stop
    values = torch.tensor([float(count), 1.0 if stop else 0.0], device=device)
    dist.all_reduce(values)
    return int(values[0].item()), bool(values[1].item() > 0)


def gather(ranks: Ranks, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (a list of one without distribution)."""
    if not ranks.enabled:
        return [value]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out


def broadcast(ranks: Ranks, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not ranks.enabled:
        return value
    box = [value if ranks.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RankBatches(Sampler[list[int]]):
    """This rank's share of every global step's draws, one list of indices per step.

    Step ``s`` of the epoch is draws ``[s*B, (s+1)*B)`` of ``sampler`` (``B`` the global
    batch), cut into ``world`` consecutive shares of ``ceil(n / world)`` (the last share,
    or several in a short last step, smaller or empty). Every rank yields the same number
    of steps, ``ceil(len(sampler) / B)``; with one rank it is the plain batching of the
    sampler's draws.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, ranks: Ranks = SINGLE):
        self.sampler = sampler
        self.batch_size = batch_size
        self.ranks = ranks

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        draws = list(self.sampler)
        for start in range(0, len(draws), self.batch_size):
            yield share(draws[start : start + self.batch_size], self.ranks)


def share(block: Sequence[int], ranks: Ranks) -> list[int]:
    """This rank's consecutive share of one step's draws."""
    size = math.ceil(len(block) / ranks.world)
    return list(block[ranks.rank * size : (ranks.rank + 1) * size])


def shard(indices: Sequence[int], ranks: Ranks) -> list[int]:
    """Every ``world``-th index from this rank's (validation: gathered again afterwards)."""
    return list(indices[ranks.rank :: ranks.world])
