"""The default model: the SimpleCNN of the original design."""

from __future__ import annotations

import torch
from torch import nn

from ichscan import hookimpl
from ichscan.labels import LABELS


class SimpleCNN(nn.Module):
    """conv 3->16 (3x3), ReLU, 2x2 max-pool; conv 16->32, ReLU, 2x2 max-pool; flatten;
    fully connected -> 128, ReLU; -> 6 logits (apply a sigmoid for probabilities).

    Parameters
    ----------
    in_channels
        Input channels (three CT windows by default).
    input_size
        Square input size; fixes the width of the first fully connected layer.
    """

    def __init__(self, in_channels: int = 3, input_size: int = 224, num_labels: int = len(LABELS)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = input_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_labels),
        )

    #: On the CPU, run the convolutions a few images at a time: their activations
    #: (3 MB per image after conv1) then stay in cache (docs/benchmarks.md), while
    #: the fully connected layer still sees the whole batch (its 51 MB of weights are
    #: read once per batch, not once per chunk).
    cpu_chunk = 4

    def forward(self, x):
        if x.device.type == "cpu" and x.shape[0] > self.cpu_chunk:
            features = torch.cat([self._features(part) for part in x.split(self.cpu_chunk)])
        else:
            features = self._features(x)
        return self.classifier(features)

    def _features(self, x):
        conv1, relu1, pool1, conv2, relu2, pool2 = self.features
        # Max-pool before ReLU: the two commute exactly, and ReLU then touches a quarter
        # of the values (these element-wise passes dominate the CPU time of this model).
        x = relu1(pool1(conv1(x)))
        return relu2(pool2(conv2(x)))


@hookimpl
def ichscan_register_models(register):
    register("simplecnn", SimpleCNN)
