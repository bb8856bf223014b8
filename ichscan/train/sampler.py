"""Balanced sampling: every epoch draws equally from each subtype and from negatives."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ichscan.labels import LABELS, SUBTYPES


class BalancedSampler(Sampler[int]):
    """Draw ``num_samples`` indices per epoch, with replacement, in equal shares from six
    groups: one per hemorrhage subtype (images positive for it) and the negatives
    (``any`` = 0). An image with two subtypes belongs to both groups. Empty groups are
    left out and the others share their draws. Rare subtypes (epidural is under 0.5 %
    of RSNA images) are thus seen about as often as common ones.

    Parameters
    ----------
    targets
        ``(N, 6)`` labels in :data:`ichscan.LABELS` order.
    num_samples
        Draws per epoch (default: N).
    seed
        Base seed; epoch ``e`` uses ``seed + e`` (call :meth:`set_epoch`).
    """

    def __init__(self, targets: np.ndarray, num_samples: int | None = None, seed: int = 0):
        targets = np.asarray(targets)
        any_col = LABELS.index("any")
        groups = [np.flatnonzero(targets[:, LABELS.index(s)] > 0.5) for s in SUBTYPES]
        groups.append(np.flatnonzero(targets[:, any_col] < 0.5))
        self.groups = [g for g in groups if len(g)]
        if not self.groups:
            raise ValueError("no samples to draw from")
        self.num_samples = num_samples or len(targets)
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's draws; ``skip`` drops the first ones (resuming mid-epoch)."""
        self.epoch, self.skip = epoch, max(0, skip)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        which = torch.randint(len(self.groups), (self.num_samples,), generator=gen)
        out = np.empty(self.num_samples, dtype=np.int64)
        for g, members in enumerate(self.groups):
            picks = (which == g).nonzero().flatten().numpy()
            out[picks] = members[torch.randint(len(members), (len(picks),), generator=gen).numpy()]
        return iter(out[self.skip :].tolist())
