"""ICHNet: the recommended built-in model, a plain CNN that sees its neighbouring slices.

``ichnet`` takes each slice with the slice below and the slice above it in its series
(``slice_context = 1``: 3 slices x 3 CT windows = 9 channels); ``ichnet-2d`` is the same
network on the slice alone (3 channels), so the gain from context can be measured. Both
are trained from scratch (no pretrained weights, nothing downloaded).

Why this backbone (timings in docs/benchmarks.md, ``benchmarks/bench_models.py``): stages
of a 3x3 convolution with batch norm, each followed by a 2x2 max-pool, then a global max
pool and one linear layer: the plain CNN that issue 13 found to generalise (a ResNet-style
network is not needed for phantom-sized data), with a fifth stage. A bleed is a small
local finding, so the strongest response anywhere in the image (global max pool) decides;
the fifth stage doubles the receptive field (about 90 pixels at 224 px), enough to place a
bleed against the skull and the ventricles, which tells the subtypes apart, for about 10 %
more time per image than four stages. On the 2-core development machine, forward and
backward cost about 110 ms per 9-channel image when idle (125 ms in the real training loop),
so the default 5 epochs on 2,000 slices take about 18 minutes from a cold cache, inside the
25-minute budget; a ResNet-18
(about 215 ms) or an EfficientNet-B0 (about 125 ms) would not leave that margin.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ichscan import hookimpl
from ichscan.labels import LABELS
from ichscan.models import has_series_head  # noqa: F401  (re-exported: where the model is)

#: Feature widths of the stages; each stage halves the image side.
WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 256)
#: CT windows per slice (the built-in preprocessing's brain, subdural and bone).
WINDOWS = 3


def conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution, 2x2 max-pool, batch norm, ReLU.

    Pooling before the normalisation and ReLU gives the same kind of network as the usual
    conv-BN-ReLU-pool order at a quarter of the element-wise work (and of the memory for
    the backward pass), which dominates on the CPU at full resolution.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PlainCNN(nn.Module):
    """Convolution stages (:func:`conv_stage`), global max pool, one linear layer -> logits.

    Parameters
    ----------
    in_channels
        Input channels.
    widths
        Output channels of each stage.
    num_labels
        Logits out (six, in the order of :data:`ichscan.LABELS`).
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = WIDTHS, num_labels: int = len(LABELS)):
        super().__init__()
        stages, previous = [], in_channels
        for width in widths:
            stages.append(conv_stage(previous, width))
            previous = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(previous, num_labels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The per-slice embedding (``(N, widths[-1])``) the logits are read from."""
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class ICHNet(PlainCNN):
    """The recommended model: :class:`PlainCNN` on a slice and its two neighbours.

    Input ``(N, 9, S, S)``: channel ``3 j + w`` is window ``w`` of neighbour ``j`` (below,
    the slice itself, above), as the pipeline's series context and the training dataset
    build it. Any input size works (global pooling); 224 is the default.
    """

    #: Neighbouring slices per side the pipeline and training hand over.
    slice_context = 1
    #: ``ichscan train`` defaults for this model (each overridable on the command line): Adam
    #: 0.001 as issue 13 measured, batches of 16 (twice the steps of 32 for the same time per
    #: epoch: on 2,000 small-faint phantoms, with framing, AUC(any) 0.986 and subdural 0.91
    #: after 2 epochs, docs/benchmarks.md), 5 epochs to stay inside 25 minutes for 2,000
    #: slices on the 2-core machine (about 14 when idle).
    train_defaults = {"epochs": 5, "lr": 1e-3, "batch_size": 16}

    def __init__(self, windows: int = WINDOWS, num_labels: int = len(LABELS)):
        super().__init__((2 * self.slice_context + 1) * windows, WIDTHS, num_labels)


class ICHNet2D(ICHNet):
    """:class:`ICHNet` on the slice alone (``(N, 3, S, S)``): the baseline for the gain from context."""

    slice_context = 0


class SeriesHead(nn.Module):
    """A bidirectional GRU over the per-slice embeddings of one series, in position order.

    It refines every slice's logits (the backbone's plus a correction read from the GRU's
    state there, so a slice learns from the slices above and below it, however far) and
    gives the series' own logits: the highest refined slice logit per label plus a
    correction read from the GRU's states max-pooled over the series. Both corrections
    start at zero, so an untrained head changes nothing: the series' probability is then
    the highest slice probability, the rule for models without a head.

    A missing slice (a gap in the series) simply is not in the sequence; a lone slice is
    a series of one.
    """

    def __init__(self, features: int, hidden: int = 64, num_labels: int = len(LABELS)):
        super().__init__()
        self.reduce = nn.Sequential(nn.Linear(features, 2 * hidden), nn.ReLU(inplace=True), nn.Dropout(0.2))
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True, bidirectional=True)
        self.slice_out = nn.Linear(2 * hidden, num_labels)
        self.series_out = nn.Linear(2 * hidden, num_labels)
        for layer in (self.slice_out, self.series_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, embeddings: torch.Tensor, logits: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``embeddings (B, L, D)`` and the backbone's ``logits (B, L, labels)`` of ``B``
        series padded to ``L`` slices (``lengths``: the real lengths; all ``L`` when None)
        -> refined slice logits ``(B, L, labels)`` and series logits ``(B, labels)``."""
        batch, length = embeddings.shape[:2]
        if lengths is None:
            lengths = torch.full((batch,), length, dtype=torch.long)
        reduced = self.reduce(embeddings)
        packed = nn.utils.rnn.pack_padded_sequence(reduced, lengths.cpu(), batch_first=True, enforce_sorted=False)
        states, _ = self.gru(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(states, batch_first=True, total_length=length)
        refined = logits + self.slice_out(states)
        real = (torch.arange(length, device=embeddings.device)[None, :] < lengths.to(embeddings.device)[:, None])[..., None]
        lowest = torch.finfo(refined.dtype).min
        pooled_states = states.masked_fill(~real, lowest).amax(dim=1)
        series = refined.masked_fill(~real, lowest).amax(dim=1) + self.series_out(pooled_states)
        return refined, series


class ICHNetSeries(ICHNet):
    """:class:`ICHNet` with a :class:`SeriesHead`: each slice's probabilities refined by its
    whole series, and a probability for the series (and so the study) as a whole.

    ``forward`` is the backbone alone (the slice-level logits it is trained on first);
    :meth:`refine` applies the head to the embeddings of whole series. ``ichscan train``
    trains the backbone as ``ichnet``, then the head on the embeddings of the training
    series (:mod:`ichscan.train.series_head`); the pipeline screens such a model's slices
    series by series, once a series is complete (``batch``) or quiet for
    ``--series-timeout`` (``watch``, ``serve-scp``).
    """

    #: The pipeline and training look for this: slices go through :meth:`refine` by series.
    series_head = True

    def __init__(self, windows: int = WINDOWS, num_labels: int = len(LABELS)):
        super().__init__(windows, num_labels)
        self.sequence = SeriesHead(WIDTHS[-1], num_labels=num_labels)

    def refine(
        self, embeddings: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``(B, L, D)`` of series in position order (from :meth:`embed`) ->
        refined slice logits ``(B, L, 6)`` and series logits ``(B, 6)``."""
        return self.sequence(embeddings, self.head(embeddings), lengths)


@hookimpl
def ichscan_register_models(register):
    register("ichnet", ICHNet)
    register("ichnet-2d", ICHNet2D)
    register("ichnet-series", ICHNetSeries)
