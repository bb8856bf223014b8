"""A test model with ``slice_context = 1`` that reports which slices it was given.

Its input slices carry their position in their pixel values (``HU = 5 * index + 2``, see
``tests/test_series.py``); the model reads the brain-window channel of each of the three
neighbours back to that index and answers ``p = (index + 1) / 100`` for them, in the first
three labels: epidural (neighbour below), intraparenchymal (the slice itself) and
intraventricular (neighbour above). A test then reads from the results CSV exactly which
slices reached the model, in which order.
"""

from __future__ import annotations

import torch
from torch import nn

from ichscan import hookimpl

#: HU of the slice at position index i: 5 * i + 2 (inside the brain window, 0..80 HU).
HU_STEP, HU_OFFSET, BRAIN_WIDTH = 5.0, 2.0, 80.0


class ContextProbe(nn.Module):
    slice_context = 1

    def __init__(self, **kwargs):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)  # a module with state, like a real one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 9, x.shape  # 3 neighbours x 3 windows
        brain = x[:, 0::3].float().mean(dim=(2, 3)) * self.scale  # window 0 of each neighbour: HU / 80
        index = (brain * BRAIN_WIDTH - HU_OFFSET) / HU_STEP
        p = ((index.round() + 1) / 100).clamp(1e-4, 1 - 1e-4)
        logits = torch.full((x.shape[0], 6), -8.0, device=x.device)
        logits[:, :3] = torch.log(p / (1 - p))
        return logits


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


class SeriesProbe(ContextProbe):
    """``slice_context = 1`` and a series head that reports which slices it refined together.

    Its embedding of a slice is the slice's index (read from its pixels). Refined, each
    slice answers, in probabilities of ``(value + 1) / 100``: epidural its own index,
    intraparenchymal the length of its series minus one, intraventricular its rank in the
    series (0 for the lowest position); its p_any stays tiny. The series' own p_any is
    ``(sum of its indexes + 1) / 100``, so a study's p_any says which series it took.
    """

    series_head = True

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        brain = x[:, 3].float().mean(dim=(1, 2)) * self.scale  # window 0 of the slice itself
        index = ((brain * BRAIN_WIDTH - HU_OFFSET) / HU_STEP).round()
        return torch.stack([index, torch.ones_like(index)], dim=1)

    def refine(self, embeddings: torch.Tensor, lengths: torch.Tensor | None = None):
        batch, length, _ = embeddings.shape
        index = embeddings[..., 0]
        logits = torch.full((batch, length, 6), -8.0)
        logits[..., 0] = _logit((index + 1) / 100)
        logits[..., 1] = _logit(torch.full_like(index, float(length)) / 100)
        logits[..., 2] = _logit((torch.arange(length, dtype=torch.float32) + 1).expand(batch, length) / 100)
        series = torch.full((batch, 6), -8.0)
        series[:, 5] = _logit((index.sum(dim=1) + 1) / 100)
        return logits, series


@hookimpl
def ichscan_register_models(register):
    register("context-probe", ContextProbe)
    register("series-probe", SeriesProbe)
