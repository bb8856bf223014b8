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


#: HU above which a pixel belongs to the head (soft tissue, brain and bone; not air).
HEAD_HU = -300.0
#: Margin around the head's bounding square, per side, as a fraction of its side.
FRAME_MARGIN = 0.06
#: The frame is never smaller than this fraction of the image's longer side, so a slice
#: through the top of the skull (a small cross-section) is not blown up out of scale.
MIN_FRAME_FRACTION = 0.5


def head_frame(pixels: np.ndarray, slope: float, intercept: float) -> tuple[int, int, int]:
    """The square ``(top, left, side)`` in pixels that frames the head of a slice.

    The head is every row and column with more than 1 % of its pixels above
    :data:`HEAD_HU`; the frame is the square around its bounding box (centred on it,
    :data:`FRAME_MARGIN` wider on each side, at least :data:`MIN_FRAME_FRACTION` of the
    image's longer side). It may reach past the image: :func:`crop_frame` pads there.
    A slice with no head (blank, or all above the threshold) frames the whole image.
    """
    rows, cols = pixels.shape
    whole = (0, 0, max(rows, cols)) if rows == cols else ((rows - max(rows, cols)) // 2, (cols - max(rows, cols)) // 2, max(rows, cols))
    if not math.isfinite(slope) or not math.isfinite(intercept) or slope == 0:
        return whole
    # The threshold in stored units, so no HU image is made.
    limit = (HEAD_HU - intercept) / slope
    with np.errstate(invalid="ignore"):
        mask = pixels > limit if slope > 0 else pixels < limit
    row_hits = np.flatnonzero(mask.sum(axis=1) > cols * 0.01)
    col_hits = np.flatnonzero(mask.sum(axis=0) > rows * 0.01)
    if row_hits.size == 0 or col_hits.size == 0 or (row_hits.size == rows and col_hits.size == cols):
        return whole
    top, bottom, left, right = row_hits[0], row_hits[-1] + 1, col_hits[0], col_hits[-1] + 1
    side = max(bottom - top, right - left) * (1.0 + 2.0 * FRAME_MARGIN)
    side = int(round(max(side, MIN_FRAME_FRACTION * max(rows, cols))))
    centre_y, centre_x = (top + bottom) / 2.0, (left + right) / 2.0
    return int(round(centre_y - side / 2.0)), int(round(centre_x - side / 2.0)), side


def crop_frame(pixels: np.ndarray, frame: tuple[int, int, int], fill: float) -> np.ndarray:
    """The ``side x side`` square of ``pixels`` at ``frame`` (float32); ``fill`` outside the image."""
    top, left, side = frame
    rows, cols = pixels.shape
    if (top, left) == (0, 0) and side == rows == cols:
        return pixels.astype(np.float32, copy=False)
    out = np.full((side, side), fill, dtype=np.float32)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, rows), min(left + side, cols)
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = pixels[y0:y1, x0:x1]
    return out


def frame_stored(pixels: np.ndarray, slope: float, intercept: float, size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Stored values framed on the head (:func:`head_frame`) and resized to ``size x size``;
    outside the image is air (-1000 HU). Returns the image and its frame."""
    frame = head_frame(pixels, slope, intercept)
    air = (-1000.0 - intercept) / slope if math.isfinite(slope) and slope != 0 and math.isfinite(intercept) else float(pixels.min())
    return resize_stored(crop_frame(pixels, frame, air), size), frame


def unframe_heatmap(heatmap: np.ndarray, frame: tuple[int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """A heat map over a framed image (:func:`frame_stored`) as a map over the whole image
    of ``shape`` (rows, cols), on a grid as fine as the original; zero outside the frame."""
    top, left, side = frame
    rows, cols = shape
    grid = heatmap.shape[0]
    # The whole image on a grid with the heat map's resolution inside the frame.
    scale = grid / side
    out_rows, out_cols = max(1, int(round(rows * scale))), max(1, int(round(cols * scale)))
    out = np.zeros((out_rows, out_cols), dtype=np.float32)
    y0, x0 = int(round(top * scale)), int(round(left * scale))
    ys, xs = slice(max(y0, 0), min(y0 + grid, out_rows)), slice(max(x0, 0), min(x0 + grid, out_cols))
    if ys.stop > ys.start and xs.stop > xs.start:
        out[ys, xs] = heatmap[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return out


def rsna_12bit_fix(pixels: np.ndarray) -> np.ndarray:
    """Undo the RSNA 2019 wrap-around: stored values are HU modulo 4096 (intercept -1000).

    Some RSNA images declare BitsStored 12, PixelRepresentation 0 and an intercept
    above -100 while storing ``HU mod 4096``; adding 1000 and wrapping values
    >= 4096 back by 4096 gives values that read correctly with intercept -1000.
    """
    # (x + 1000) mod 4096 for 12-bit x, in three cheap uint16 passes.
    fixed = pixels.astype(np.uint16) & 0x0FFF
    fixed += 1000
    fixed &= 0x0FFF
    return fixed
