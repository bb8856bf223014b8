"""Overlay PNGs: the brain-window image with the screening result drawn on it (Pillow)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ichscan.dicom import is_valid_uid
from ichscan.imaging import brain_window_image
from ichscan.labels import LABELS
from ichscan.reporting import SliceResult

OVERLAY_CHOICES = ("positive", "all", "none")
MIN_OVERLAY_SIDE = 512


def overlay_name(result: SliceResult) -> str | None:
    """File name from validated UIDs only; None when the slice has no usable UIDs."""
    uids = (result.study_instance_uid, result.series_instance_uid, result.sop_instance_uid)
    if not all(is_valid_uid(uid) for uid in uids):
        return None
    return "_".join(uids) + ".png"


def wants_overlay(result: SliceResult, overlays_for: str) -> bool:
    if result.status != "ok" or overlays_for == "none":
        return False
    return overlays_for == "all" or result.is_positive


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def render_overlay(image: np.ndarray, result: SliceResult) -> Image.Image:
    """Draw the top label, its probability and all six probabilities on the image.

    Small images are enlarged to at least 512 pixels so the text stays readable.
    """
    grey = Image.fromarray(image, mode="L")
    if max(grey.size) < MIN_OVERLAY_SIDE:
        scale = MIN_OVERLAY_SIDE / max(grey.size)
        grey = grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.BILINEAR)
    rgb = grey.convert("RGB")
    draw = ImageDraw.Draw(rgb)
    size = max(12, rgb.height // 36)
    font = _font(size)
    positive = result.is_positive
    colour = (255, 64, 64) if positive else (96, 255, 96)
    probs = result.probabilities or {}
    if result.top_probability is not None:
        headline = f"{result.top_label} {result.top_probability:.2f}"
    else:
        headline = result.top_label
    pad = max(2, size // 4)
    line_height = size + pad
    label_width = max(draw.textlength(label, font=font) for label in LABELS)
    value_x = pad + int(label_width) + 2 * pad
    box_w = max(int(draw.textlength(headline, font=font)) + 2 * pad, value_x + int(draw.textlength("0.00", font=font)) + pad)
    draw.rectangle((0, 0, box_w, line_height * (len(LABELS) + 1) + pad), fill=(0, 0, 0))
    draw.text((pad, pad), headline, fill=colour, font=font)
    for i, label in enumerate(LABELS, start=1):
        y = pad + i * line_height
        draw.text((pad, y), label, fill=(230, 230, 230), font=font)
        draw.text((value_x, y), f"{probs.get(label, 0.0):.2f}", fill=(230, 230, 230), font=font)
    if positive:
        draw.rectangle((0, 0, rgb.width - 1, rgb.height - 1), outline=colour, width=max(2, rgb.height // 128))
    draw.text((pad, rgb.height - line_height - pad), "not for diagnostic use", fill=(200, 200, 0), font=font)
    return rgb


def write_overlay(result: SliceResult, directory: Path) -> str | None:
    """Render and save the overlay for ``result`` (atomically); return its path."""
    name = overlay_name(result)
    if name is None:
        return None
    if result.display is not None:
        image = result.display
    elif result.pixels is not None:
        image = brain_window_image(result.pixels, result.slope, result.intercept)
    else:
        return None
    target = directory / name
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    render_overlay(image, result).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, target)
    return str(target)
