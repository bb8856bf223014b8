"""The overlay's legend reads at every image size from 256 to 1,024 pixels wide and tall:
no glyph of the headline, the labels, the values or the notice loses a pixel, and every
line lies inside the image, clear of its frame."""

from functools import lru_cache

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ichscan.labels import LABELS, SUBTYPES
from ichscan.overlay import _font, _legend_size, _text_mask, render_overlay, render_overlay_heatmap
from ichscan.records import NO_FINDING, Instance, Prediction, SliceResult, Status

SIDES = (256, 300, 384, 511, 628, 777, 1024)
#: Every width with every height: square, narrower than tall (256 x 1024), wider than tall (1024 x 256).
SHAPES = [(width, height) for width in SIDES for height in SIDES]
GREY = 100  # the image under the legend: no legend colour is this grey
TEXT, RED, GREEN, YELLOW, BLACK = (230, 230, 230), (255, 64, 64), (96, 255, 96), (200, 200, 0), (0, 0, 0)
NOTICE = "not for diagnostic use"
VALUES = tuple(f"{i / 100:.2f}" for i in range(101))
HEADLINES = tuple(f"{label} {value}" for label in (*SUBTYPES, NO_FINDING) for value in ("0.00", "0.47", "0.93", "1.00"))


@lru_cache(maxsize=None)
def reference(text: str, size: int) -> np.ndarray:
    """``text`` drawn with the overlay's font on a canvas far larger than it, cropped to its ink."""
    font = _font(size)
    canvas = Image.new("1", (4 * size * (len(text) + 4), 8 * size))
    ImageDraw.Draw(canvas).text((2 * size, 2 * size), text, fill=1, font=font)
    ink = np.asarray(canvas, dtype=bool)
    assert not ink[0].any() and not ink[-1].any() and not ink[:, 0].any() and not ink[:, -1].any()
    return crop(ink)


def crop(ink: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def canvas_size(width: int, height: int) -> tuple[int, int]:
    """The size the overlay of a ``width`` x ``height`` image has (enlarged to at least 512)."""
    probe = screened(NO_FINDING, 0.5, positive=False)
    return render_overlay(np.zeros((height, width), np.uint8), probe).size


def screened(top_label: str, probability: float, *, positive: bool) -> SliceResult:
    probabilities = {label: probability for label in LABELS}
    prediction = Prediction(probabilities, {label: positive for label in LABELS}, top_label, probability)
    return SliceResult(Instance(path="x.dcm"), Status.OK, prediction=prediction)


def font_sizes() -> list[int]:
    return sorted({_legend_size(*canvas_size(width, height)) for width, height in SHAPES})


def test_the_font_is_sized_for_width_and_height():
    sizes = {shape: _legend_size(*canvas_size(*shape)) for shape in SHAPES}
    assert sizes[(628, 628)] == 17  # the README's first run: as large as before
    assert min(sizes.values()) >= 12  # never below the smallest size that reads
    assert sizes[(256, 1024)] < sizes[(1024, 1024)]  # narrow images get a smaller font, not a cut one


@pytest.mark.parametrize("size", font_sizes())
def test_each_text_is_drawn_whole(size):
    """(a) Each label, value, headline and the notice, drawn alone through the overlay's text
    function, has exactly the ink of the same text on a large canvas."""
    for text in (*LABELS, *VALUES, *HEADLINES, NOTICE):
        mask = np.asarray(_text_mask(text, size), dtype=bool)
        expected = reference(text, size)
        assert mask.sum() == expected.sum(), f"{text!r} at size {size} lost {expected.sum() - mask.sum()} ink pixels"
        assert np.array_equal(crop(mask), expected), f"{text!r} at size {size}"


def legend_ink(overlay: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return (overlay == colour).all(axis=2)


def frame_width(overlay: np.ndarray) -> int:
    """Columns of the red frame on the left (0 on a negative slice)."""
    red_columns = legend_ink(overlay, RED).all(axis=0)
    return int(np.argmin(red_columns))


@pytest.mark.parametrize(("width", "height"), SHAPES)
def test_the_legend_lies_whole_inside_every_overlay(width, height):
    """(b) In the whole overlay, every line of the legend has all its ink, inside the black
    box, inside the image and clear of the red frame."""
    widest = sorted(SUBTYPES, key=lambda label: -len(label))[:2]  # each headline alone: test (a)
    cases = [(screened(label, 1.0, positive=True), f"{label} 1.00", RED) for label in widest]
    cases.append((screened(NO_FINDING, 0.0, positive=False), f"{NO_FINDING} 0.00", GREEN))
    for result, headline, colour in cases:
        overlay = np.asarray(render_overlay(np.full((height, width), GREY, np.uint8), result))
        rows, cols = overlay.shape[:2]
        size = _legend_size(cols, rows)
        # The box starts as far from the top left corner as the frame is wide, drawn or not.
        box = legend_ink(overlay, BLACK)
        box_rows, box_cols = np.flatnonzero(box.any(axis=1)), np.flatnonzero(box.any(axis=0))
        edge = int(box_cols[0])
        assert box_rows[0] == edge > 0 and frame_width(overlay) == (edge if result.is_positive else 0)
        inside = np.zeros((rows, cols), bool)
        inside[edge : rows - edge, edge : cols - edge] = True
        # Nothing lost: each colour's ink inside the frame is the sum of its texts' whole ink.
        texts = {colour: [headline], TEXT: [*LABELS] + ["1.00" if result.is_positive else "0.00"] * len(LABELS), YELLOW: [NOTICE]}
        for paint, strings in texts.items():
            ink = legend_ink(overlay, paint) & inside
            whole = sum(int(reference(text, size).sum()) for text in strings)
            assert int(ink.sum()) == whole, f"{width}x{height} ({cols}x{rows}), size {size}: {strings} lost {whole - int(ink.sum())} pixels"
        # Inside the image, clear of the frame, with a blank margin on the far sides.
        for paint in (TEXT, YELLOW) + ((GREEN,) if colour == GREEN else ()):
            ink = legend_ink(overlay, paint)
            assert not (ink & ~inside).any()
            assert not ink[:, cols - edge - 1].any() and not ink[rows - edge - 1].any()
        # The box holds the headline, the labels and the values, and stays inside the frame.
        assert box_cols[-1] < cols - edge
        box_area = np.zeros_like(inside)
        box_area[box_rows[0] + 1 : box_rows[-1], box_cols[0] + 1 : box_cols[-1]] = True
        lines = legend_ink(overlay, TEXT) | (legend_ink(overlay, colour) & inside)
        assert not (lines & ~box_area).any()


def test_a_heat_map_overlay_has_the_same_legend():
    result = screened("subarachnoid", 1.0, positive=True)
    image = np.full((1024, 256), GREY, np.uint8)
    result.heatmap = np.zeros((8, 8), np.float32)  # below the floor everywhere: grey stays grey
    with_map = np.asarray(render_overlay_heatmap(image, result))
    result.heatmap = None
    assert np.array_equal(with_map, np.asarray(render_overlay(image, result)))


def test_an_unknown_headline_still_fits():
    """A top label no model here produces (a plugin's) shrinks the font rather than run off."""
    label = "intraparenchymal-and-intraventricular"
    result = screened(label, 1.0, positive=False)
    overlay = np.asarray(render_overlay(np.full((1024, 256), GREY, np.uint8), result))
    ink = legend_ink(overlay, GREEN)
    assert ink.any() and not ink[:, -1].any()
    cols = np.flatnonzero(ink.any(axis=0))
    assert cols[-1] < overlay.shape[1] - 2
