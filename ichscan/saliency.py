"""Grad-CAM heat maps: where in a slice the model saw its top finding (``--saliency``).

Grad-CAM (Selvaraju et al., 2017) weights the channels of a convolutional feature map by
the mean gradient of one logit over each channel, sums them and keeps the positive part:
a coarse map of the regions that raised that logit. Here the feature map is the output of
the model's last ``nn.Conv2d`` (or of the module its ``saliency_layer`` attribute names),
found when the screener is built, so it works for SimpleCNN and for any CNN a plugin
registers, without knowing its architecture.

Gradients need the model outside ``torch.inference_mode()``: the screener asks for heat
maps of its positive slices after their probabilities are known, in the main process. The
forward hook that captures the feature map is installed for that one call and removed
after it, so with ``--saliency`` off nothing here runs at all.

The backward pass starts at the captured feature map (it is detached there and made a leaf
that requires gradients): only the layers after it are differentiated, and no parameter
gradients are computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class SaliencyError(ValueError):
    """The model has no layer Grad-CAM can use; the message says what to do."""


def saliency_layer(model: nn.Module) -> nn.Module:
    """The layer whose output Grad-CAM reads.

    The model's ``saliency_layer`` attribute when it has one (a module, or the dotted name
    of a submodule), else its last ``nn.Conv2d`` in definition order, which for a plain
    CNN is the last one it runs.

    Raises
    ------
    SaliencyError
        When the model has neither.
    """
    chosen = getattr(model, "saliency_layer", None)
    if isinstance(chosen, str):
        try:
            return model.get_submodule(chosen)
        except AttributeError:
            raise SaliencyError(f"saliency_layer {chosen!r} names no submodule of {type(model).__name__}") from None
    if isinstance(chosen, nn.Module):
        return chosen
    convolutions = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise SaliencyError(
            f"--saliency needs a convolutional model: {type(model).__name__} has no nn.Conv2d "
            "(a model can name the layer to use in its saliency_layer attribute)"
        )
    return convolutions[-1]


class GradCam:
    """Grad-CAM heat maps for a model, one label per input.

    Parameters
    ----------
    model
        The model (in eval mode, on its device).
    context
        The model's ``slice_context`` k. A model that runs its layer on each of the
        ``2k + 1`` neighbours separately (``N * (2k + 1)`` feature maps for ``N`` inputs,
        neighbours of one input together, as reshaping the model input's channel blocks
        into the batch gives them) gets the heat map of the centre slice; a model that
        mixes the neighbours before the layer has one map per input, aligned with the
        centre slice anyway.
    """

    def __init__(self, model: nn.Module, context: int = 0):
        self.model = model
        self.layer = saliency_layer(model)
        self.group = 2 * context + 1

    def __call__(self, batch: torch.Tensor, labels: Sequence[int]) -> list[np.ndarray]:
        """Heat maps for ``batch`` (the model's input), the logit of ``labels[i]`` for input i.

        Returns
        -------
        list of numpy.ndarray
            Per input a float32 ``h x w`` map on the feature map's grid (which covers the
            whole model input, so the whole image), scaled to [0, 1] by its maximum; all
            zeros where nothing raised the logit.
        """
        n = batch.shape[0]
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} inputs")
        if n == 0:
            return []
        features: list[torch.Tensor] = []

        def capture(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
            # A leaf that requires gradients: the backward pass starts here. The clone is
            # what the model goes on with, so an in-place activation after the layer
            # does not touch the leaf. (Called once per chunk by a model that runs its
            # convolutions a few images at a time, like SimpleCNN on the CPU.)
            leaf = output.detach().requires_grad_(True)
            features.append(leaf)
            return leaf.clone()

        handle = self.layer.register_forward_hook(capture)
        try:
            with torch.enable_grad():
                logits = self.model(batch).float()
                if not features:
                    raise SaliencyError(f"the saliency layer {type(self.layer).__name__} did not run")
                index = torch.as_tensor(list(labels), device=logits.device)
                score = logits[torch.arange(n, device=logits.device), index].sum()
                grads = torch.autograd.grad(score, features, allow_unused=True)
        finally:
            handle.remove()
        maps = torch.cat([f.detach() for f in features]).float()
        weights = torch.cat(
            [torch.zeros_like(f) if g is None else g for f, g in zip(features, grads, strict=True)]
        ).float()
        if maps.ndim != 4:
            raise SaliencyError(f"the saliency layer gives {maps.ndim}-D output, not (N, C, H, W)")
        if maps.shape[0] == n * self.group and self.group > 1:
            centre = self.group // 2
            maps = maps.unflatten(0, (n, self.group))[:, centre]
            weights = weights.unflatten(0, (n, self.group))[:, centre]
        elif maps.shape[0] != n:
            raise SaliencyError(f"the saliency layer ran on {maps.shape[0]} images for {n} inputs")
        cam = torch.relu((weights.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1))
        peak = cam.amax(dim=(1, 2), keepdim=True)
        cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
        return list(cam.cpu().numpy().astype(np.float32, copy=False))
