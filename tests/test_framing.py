"""Framing on the head: the head fills the model's input whatever the field of view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ichscan.dicom import decode_many
from ichscan.imaging import crop_frame, frame_stored, head_frame, unframe_heatmap
from ichscan.models import load_model
from ichscan.pipeline.screener import Screener
from ichscan.plugins import get_plugin_manager
from ichscan.preprocess import PreprocessSettings
from ichscan.synth import generate
from ichscan.synth_style import resolve_style
from ichscan.train.dataset import RSNADataset


def head_width(image: np.ndarray, slope: float, intercept: float) -> int:
    """The head's longer extent (rows or columns with head, above -300 HU, in them)."""
    head = image * slope + intercept > -300
    return int(max((head.sum(axis=0) > 0).sum(), (head.sum(axis=1) > 0).sum()))


def test_a_small_head_in_a_large_field_of_view_fills_the_input_like_a_large_one(tmp_path):
    """The same heads (same seed) drawn at 100 % and 70 % of the field of view: unframed they
    differ by 30 % in width, framed by little."""
    widths = {}
    for scale in (1.0, 0.7):
        records = generate(tmp_path / str(scale), studies=2, slices=3, seed=5, layout="rsna", size=256, style=resolve_style("default", head_scale=scale))
        decoded = decode_many([str(r.path) for r in records], resize_to=224, crop=True)
        plain = decode_many([str(r.path) for r in records], resize_to=224)
        widths[scale] = (
            np.mean([head_width(d.pixels, d.slope, d.intercept) for d in decoded]),
            np.mean([head_width(d.pixels, d.slope, d.intercept) for d in plain]),
        )
        assert all(d.image.frame is not None and d.image.frame[3:] == (256, 256) for d in decoded)
        assert all(d.image.frame is None for d in plain)
    (framed_big, plain_big), (framed_small, plain_small) = widths[1.0], widths[0.7]
    assert plain_small / plain_big == pytest.approx(0.7, abs=0.08)
    assert framed_small / framed_big == pytest.approx(1.0, abs=0.08)
    assert framed_big >= 0.8 * 224  # the head fills most of the input


def test_frame_is_square_padded_with_air_and_never_too_small():
    pixels = np.full((200, 300), -1000, np.int16)
    pixels[150:200, 250:300] = 40  # a "head" in a corner, touching two edges
    top, left, side = head_frame(pixels, 1.0, 0.0)
    assert side == 150  # at least half of the longer side
    assert top + side > 200 and left + side > 300  # centred on the head: reaches past the image
    framed = crop_frame(pixels, (top, left, side), fill=-1000.0)
    assert framed.shape == (150, 150)
    assert framed.max() == 40 and (framed == -1000).mean() > 0.5
    # Stored units: the threshold follows the rescale (unsigned storage, intercept -1024).
    stored = (pixels.astype(np.int32) + 1024).astype(np.uint16)
    assert head_frame(stored, 1.0, -1024.0) == (top, left, side)


def test_blank_and_all_tissue_slices_frame_the_whole_image():
    assert head_frame(np.zeros((64, 64), np.int16), 1.0, -1024.0) == (0, 0, 64)
    assert head_frame(np.full((64, 64), 2000, np.int16), 1.0, -1024.0) == (0, 0, 64)
    image, frame = frame_stored(np.zeros((64, 32), np.int16), 1.0, -1024.0, 16)
    assert image.shape == (16, 16) and frame == (0, -16, 64)


def test_heatmap_of_a_framed_input_lands_where_the_frame_was():
    heat = np.zeros((14, 14), np.float32)
    heat[3, 10] = 1.0  # upper right of the frame
    frame, shape = (100, 200, 280), (512, 512)
    whole = unframe_heatmap(heat, frame, shape)
    assert whole.shape == (round(512 * 14 / 280),) * 2
    (y, x), = np.argwhere(whole == 1.0)
    # Back in pixels of the image: inside the frame, at its cell.
    cell = 280 / 14
    assert 100 + 3 * cell <= (y + 0.5) * cell <= 100 + 4 * cell + cell
    assert 200 + 10 * cell <= (x + 0.5) * cell <= 200 + 11 * cell + cell
    assert whole.sum() == 1.0


def test_checkpoints_without_the_setting_are_not_framed():
    assert PreprocessSettings.from_dict({"windows": [[40, 80]], "size": 224}).crop is False
    assert PreprocessSettings.from_dict(PreprocessSettings(crop=True).to_dict()).crop is True


def test_framed_training_input_equals_the_screener_input(tmp_path):
    generate(tmp_path / "set", studies=1, slices=3, seed=9, layout="rsna", size=128)
    root = tmp_path / "set"
    pm = get_plugin_manager()
    settings = PreprocessSettings(crop=True)
    loaded = load_model(pm, model_name="ichnet-2d")
    loaded.preprocessing = settings
    screener = Screener(pm, loaded, device="cpu")
    dataset = RSNADataset(root, root / "stage_2_train.csv", settings=settings)
    for i, item in enumerate(dataset.items):
        [decoded] = decode_many([str(item.path)], resize_to=settings.size, crop=True)
        expected = screener.model_input([decoded.pixels], [decoded.slope], [decoded.intercept])
        assert torch.equal(dataset.model_input(i), expected[0])
