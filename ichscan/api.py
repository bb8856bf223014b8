"""The Python API of the original design: ``predict_image``."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from ichscan.dicom import OK, decode_many
from ichscan.labels import LABELS


@lru_cache(maxsize=4)
def _screener(weights: str | None, device: str = "auto", saliency: bool = False):
    from ichscan.pipeline.screener import Screener
    from ichscan.models import load_model
    from ichscan.plugins import get_plugin_manager

    pm = get_plugin_manager()
    return Screener(pm, load_model(pm, weights), device, saliency=saliency)


def screen_file(path, weights=None, thresholds=None, pm=None, device: str = "auto", saliency: bool = False):
    """Screen one file; return ``(SliceResult, brain-window image, LoadedModel)``.

    With ``saliency`` a positive result carries a Grad-CAM heat map of its top finding
    (``result.heatmap``), which :func:`ichscan.overlay.render_overlay` draws.

    Raises ValueError when the file cannot be screened (also
    :class:`ichscan.saliency.SaliencyError`, for ``saliency`` with a model without a
    convolution).
    """
    from ichscan.pipeline.screener import Screener
    from ichscan.models import load_model

    if pm is None and thresholds is None:
        screener = _screener(os.fspath(weights) if weights is not None else None, device, saliency)
    else:
        from ichscan.plugins import get_plugin_manager

        pm = pm or get_plugin_manager()
        screener = Screener(pm, load_model(pm, weights, thresholds=thresholds), device, saliency=saliency)
    # The same decode path as `ichscan batch` on this device, so the numbers agree.
    resize_to = screener.settings.size if screener.device.type == "cpu" or screener.settings.crop else None
    [decoded] = decode_many([os.fspath(path)], resize_to=resize_to, display=True, crop=screener.settings.crop)
    if decoded.status != OK or decoded.pixels is None or decoded.display is None:
        raise ValueError(f"{path}: {decoded.status}: {decoded.error}")
    image = decoded.display
    result = screener.screen([decoded])[0]
    if result.status != OK or result.probabilities is None or result.positive is None:
        raise ValueError(f"{path}: {result.status}: {result.error}")
    return result, image, screener.loaded


def predict_image(
    path: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None, show: bool = False
) -> tuple[list[str], dict[str, float], np.ndarray]:
    """Screen one DICOM file.

    Parameters
    ----------
    path
        A CT DICOM file.
    weights
        A checkpoint from ``ichscan train``; default: the bundled weights.
    show
        Display the image with the prediction in a matplotlib window.

    Returns
    -------
    predictions
        Label names at or above their threshold (``any`` included when positive).
    probabilities
        ``label -> probability`` for all six labels.
    image
        The brain-window (40/80 HU) image, H x W uint8.

    Raises
    ------
    ValueError
        When the file cannot be screened (not DICOM, not CT, unreadable...).
    """
    result, image, _ = screen_file(path, weights)
    predictions = [label for label in LABELS if result.positive[label]]
    if show:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(image, cmap="gray")
        ax.set_title(f"{result.top_label} {result.top_probability:.2f} | any {result.probabilities['any']:.2f}")
        ax.axis("off")
        plt.show()
    return predictions, dict(result.probabilities), image
