"""Torch-free image helpers shared by decode workers, overlays and the API."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

BRAIN_WINDOW = (40.0, 80.0)


def brain_window_image(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored pixels -> brain window (40/80 HU) as an H x W uint8 image."""
    centre, width = BRAIN_WINDOW
    low = centre - width / 2.0
    # In place, the same arithmetic: this runs for every slice when overlays are on.
    # Absurd rescale values (decoding refuses them; other callers may not) overflow
    # float32: no numpy warning on stderr, and inf/nan pixels render as 255/0.
    with np.errstate(over="ignore", invalid="ignore"):
        hu = pixels.astype(np.float32)
        hu *= np.float32(slope)
        hu += np.float32(intercept - low)
        hu *= np.float32(255.0 / width)
        np.clip(hu, 0, 255, out=hu)
        if not _cannot_overflow(slope, intercept):
            np.nan_to_num(hu, copy=False, nan=0.0)
        return hu.astype(np.uint8)


def _cannot_overflow(slope: float, intercept: float) -> bool:
    """True when stored values (below 2**32) times ``slope`` plus ``intercept`` stay finite in float32."""
    return math.isfinite(slope) and math.isfinite(intercept) and abs(slope) < 1e20 and abs(intercept) < 1e20


def resize_stored(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize stored values to ``size x size`` float32, bilinear and antialiased.

    Pillow's bilinear filter widens its support when shrinking (antialiasing), the
    behaviour torch's ``interpolate(..., antialias=True)`` reproduces on the GPU; the
    two agree to about 0.03 stored units (1e-3 of a brain-window step).
    """
    if pixels.shape == (size, size):
        return pixels.astype(np.float32, copy=False)
    image = Image.fromarray(pixels.astype(np.float32, copy=False), mode="F")
    return np.array(image.resize((size, size), Image.BILINEAR), dtype=np.float32)  # writable copy
