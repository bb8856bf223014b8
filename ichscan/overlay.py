"""Overlay PNGs: the brain-window image with the screening result drawn on it (Pillow).

Overlays are the slowest output, so they are cheap to draw and written off the model's
path:

- the image is a palette ("P") PNG: grey levels 0-252 are themselves, the last three
  entries are the colours. Pillow writes a palette image without PNG's per-row filter
  search and zlib's run-length strategy suits it: several times faster and half the
  size of an RGB PNG (docs/benchmarks.md). Only a slice with a heat map (``--saliency``,
  positive slices) is an RGB PNG: a translucent colour map blends with every grey;
- text is rasterised once per string and font size (a small cache) and pasted;
- :class:`OverlayWriter` renders and writes them in a thread pool (Pillow releases the
  GIL while it encodes, so threads scale), with a bounded number in
  flight, and hands each batch of results back once its overlays are on disk.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import zlib
from collections import deque
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ichscan.dicom import is_valid_uid
from ichscan.durable import replacing
from ichscan.imaging import brain_window_image
from ichscan.labels import LABELS, SUBTYPES
from ichscan.records import NO_FINDING, SliceResult, Status

log = logging.getLogger(__name__)

OVERLAY_CHOICES = ("positive", "all", "none")
MIN_OVERLAY_SIDE = 512

# Palette indices: greys 0..252 are themselves; brighter greys (above ~119 HU in the brain
# window, i.e. bone) show as 252, which the eye cannot tell from 255.
_GREY_LEVELS = 253
_BLACK, _TEXT, _RED, _GREEN, _YELLOW = 0, 230, 253, 254, 255
_PALETTE = [v for g in range(_GREY_LEVELS) for v in (g, g, g)] + [255, 64, 64, 96, 255, 96, 200, 200, 0]
_CLAMP = [min(g, _GREY_LEVELS - 1) for g in range(256)]
_NOT_FOR_DIAGNOSIS = "not for diagnostic use"


def overlay_name(result: SliceResult) -> str | None:
    """File name from validated UIDs only; None when the slice has no usable UIDs."""
    return overlay_file_name(result.study_instance_uid, result.series_instance_uid, result.sop_instance_uid)


def overlay_file_name(study_uid: str, series_uid: str, sop_uid: str) -> str | None:
    """``<study>_<series>_<sop>.png``, from validated UIDs only (None otherwise)."""
    uids = (study_uid, series_uid, sop_uid)
    if not all(is_valid_uid(uid) for uid in uids):
        return None
    return "_".join(uids) + ".png"


def wants_overlay(result: SliceResult, overlays_for: str) -> bool:
    if result.status != Status.OK or overlays_for == "none":
        return False
    return overlays_for == "all" or result.is_positive


def overlay_image(result: SliceResult) -> np.ndarray | None:
    """The brain-window image to draw on: the decode worker's full-resolution one, else
    one computed from the stored pixels; None when the result has neither."""
    if result.display is not None:
        return result.display
    if result.pixels is not None:
        return brain_window_image(result.pixels, result.slope, result.intercept)
    return None


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


# FreeType faces are not safe to use from two threads at once.
_font_lock = threading.Lock()


@lru_cache(maxsize=4096)
def _text_mask(text: str, size: int) -> Image.Image:
    """``text`` as a 1-bit mask holding every inked pixel, drawn as ``ImageDraw.text`` would
    at (0, 0) (shifted right or down only where a glyph would ink left of or above it).

    The mask is measured by the same drawing object, in the same font mode, that inks it:
    a "1" image is drawn without anti-aliasing, with FreeType's monochrome hinting, whose
    glyphs are wider than the anti-aliased ones ``font.getbbox(text)`` measures by default
    (at size 17, "intraparenchymal" is 138 pixels wide, not 134), so a mask sized that way
    cut off the end of the last glyph.
    """
    with _font_lock:
        font = _font(size)
        draw = ImageDraw.Draw(Image.new("1", (1, 1)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        dx, dy = max(0, -int(left)), max(0, -int(top))
        mask = Image.new("1", (max(1, int(right) + dx), max(1, int(bottom) + dy)))
        ImageDraw.Draw(mask).text((dx, dy), text, fill=1, font=font)
    return mask


#: The smallest font size of the legend that reads (pixels); below it only where an image
#: narrower than 256 pixels (or a headline no model here writes) leaves no room.
_READABLE_SIZE = 12
_SMALLEST_SIZE = 8
#: The widest headlines a model writes: the top label and its probability.
_HEADLINES = tuple(f"{label} 1.00" for label in (*SUBTYPES, NO_FINDING))
#: Every probability as the legend writes it.
_VALUES = tuple(f"{i / 100:.2f}" for i in range(101))


@lru_cache(maxsize=64)
def _layout(size: int) -> tuple[int, int, int, int]:
    """``(pad, line height, x of the values, narrowest box width)`` for a font size."""
    pad = max(2, size // 4)
    label_width = max(_text_mask(label, size).width for label in LABELS)
    value_x = pad + label_width + 2 * pad
    values = [_text_mask(value, size) for value in _VALUES]  # hinted digits differ by a pixel at some sizes
    tallest = max(_text_mask(text, size).height for text in (*LABELS, *_VALUES, _NOT_FOR_DIAGNOSIS))
    return pad, max(size + pad, tallest), value_x, value_x + max(mask.width for mask in values) + pad


def _frame_width(height: int) -> int:
    return max(2, height // 128)


def _fits(size: int, width: int, height: int, headline: str) -> bool:
    """Whether the legend at ``size`` lies whole inside a ``width`` x ``height`` canvas,
    clear of the frame: the box (with ``headline``) and the notice across, the box above
    the notice."""
    pad, line_height, _, box_w = _layout(size)
    edge = _frame_width(height)
    box_w = max(box_w, _text_mask(headline, size).width + 2 * pad)
    notice = _text_mask(_NOT_FOR_DIAGNOSIS, size).width
    across = edge + max(box_w, pad + notice) < width - edge
    down = edge + line_height * (len(LABELS) + 1) + pad < height - edge - line_height - pad
    return across and down


@lru_cache(maxsize=256)
def _legend_size(width: int, height: int) -> int:
    """The legend's font size on a ``width`` x ``height`` canvas: 1/36 of the height (at
    least :data:`_READABLE_SIZE`), smaller where the widest headline would not fit across."""
    size = max(_READABLE_SIZE, height // 36)
    while size > _SMALLEST_SIZE and not all(_fits(size, width, height, headline) for headline in _HEADLINES):
        size -= 1
    return size


def _display_grey(image: np.ndarray) -> Image.Image:
    """The brain-window image as "L", enlarged to at least 512 pixels so the text stays readable."""
    grey = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))  # 2-D uint8: "L"
    if max(grey.size) < MIN_OVERLAY_SIDE:
        scale = MIN_OVERLAY_SIDE / max(grey.size)
        grey = grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.BILINEAR)
    return grey


def render_overlay_indexed(image: np.ndarray, result: SliceResult) -> Image.Image:
    """The overlay as a palette ("P") image: what :class:`OverlayWriter` saves for a slice
    without a heat map.

    The brain-window image (enlarged to at least 512 pixels so the text stays
    readable), a box with the top label, its probability and all six probabilities, a
    red border on a positive slice, and "not for diagnostic use".
    """
    canvas = _display_grey(image).point(_CLAMP)  # a fresh image, free for the colour entries
    canvas.putpalette(_PALETTE)  # "L" -> "P"
    _annotate(canvas, result)
    return canvas


#: Heat below this fraction of a map's peak is not drawn: the image stays plain grey there.
HEAT_FLOOR = 0.2
#: Opacity of the colour map at the heat map's peak (it fades to 0 towards the floor).
HEAT_OPACITY = 0.55


@lru_cache(maxsize=1)
def _heat_luts() -> tuple[list[int], list[int]]:
    """For heat levels 0-255: a "jet"-like palette (blue, green, yellow, red), flat RGB
    triples, and the opacity of each level (0 below :data:`HEAT_FLOOR`)."""
    x = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3.0, 2.0, 1.0)], axis=1)
    alpha = HEAT_OPACITY * np.clip((x - HEAT_FLOOR) / (1 - HEAT_FLOOR), 0, 1)
    return [int(v) for v in np.round(rgb * 255).ravel()], [int(v) for v in np.round(alpha * 255)]


def blend_heatmap(grey: Image.Image, heatmap: np.ndarray) -> Image.Image:
    """``grey`` ("L") as RGB with ``heatmap`` (values in [0, 1], any grid covering the whole
    image) stretched over it as a translucent colour map; below :data:`HEAT_FLOOR` it
    stays grey. Pillow does the per-pixel work (look-up tables and one composite)."""
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2 or 0 in heat.shape:
        raise ValueError(f"a heat map must be a 2-D array, not {heat.shape}")
    palette, opacity = _heat_luts()
    level = Image.fromarray(np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8)).resize(grey.size, Image.BILINEAR)
    colour = level.copy()
    colour.putpalette(palette)  # "L" -> "P": each level its colour
    return Image.composite(colour.convert("RGB"), grey.convert("RGB"), level.point(opacity))


def render_overlay_heatmap(image: np.ndarray, result: SliceResult) -> Image.Image:
    """The overlay as an RGB image with ``result.heatmap`` blended under the annotations."""
    if result.heatmap is None:
        raise ValueError("the result has no heat map")
    canvas = blend_heatmap(_display_grey(image), result.heatmap)
    _annotate(canvas, result)
    return canvas


def render_overlay_image(image: np.ndarray, result: SliceResult) -> Image.Image:
    """The overlay :class:`OverlayWriter` saves: palette ("P"), or RGB with a heat map."""
    if result.heatmap is not None:
        return render_overlay_heatmap(image, result)
    return render_overlay_indexed(image, result)


def _paint(canvas: Image.Image, index: int) -> int | tuple[int, int, int]:
    """Palette entry ``index`` as ``canvas`` takes a colour: itself, or its RGB."""
    if canvas.mode == "P":
        return index
    return tuple(_PALETTE[3 * index : 3 * index + 3])  # type: ignore[return-value]


def _annotate(canvas: Image.Image, result: SliceResult) -> None:
    """Draw the label box, the probabilities, the frame and the notice onto ``canvas``."""
    positive = result.is_positive
    colour = _paint(canvas, _RED if positive else _GREEN)
    black, text, yellow = _paint(canvas, _BLACK), _paint(canvas, _TEXT), _paint(canvas, _YELLOW)
    probs = result.probabilities or {}
    if result.top_probability is not None:
        headline = f"{result.top_label} {result.top_probability:.2f}"
    else:
        headline = result.top_label
    size = _legend_size(canvas.width, canvas.height)
    while size > _SMALLEST_SIZE and not _fits(size, canvas.width, canvas.height, headline):
        size -= 1  # a top label wider than any model here writes
    pad, line_height, value_x, box_w = _layout(size)
    box_w = max(box_w, _text_mask(headline, size).width + 2 * pad)
    # Box and text sit inside the border's width on every slice, so the border never covers them.
    edge = _frame_width(canvas.height)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((edge, edge, edge + box_w, edge + line_height * (len(LABELS) + 1) + pad), fill=black)
    x = edge + pad
    canvas.paste(colour, (x, edge + pad), _text_mask(headline, size))
    for i, label in enumerate(LABELS, start=1):
        y = edge + pad + i * line_height
        canvas.paste(text, (x, y), _text_mask(label, size))
        canvas.paste(text, (edge + value_x, y), _text_mask(f"{probs.get(label, 0.0):.2f}", size))
    canvas.paste(yellow, (x, canvas.height - edge - line_height - pad), _text_mask(_NOT_FOR_DIAGNOSIS, size))
    if positive:
        draw.rectangle((0, 0, canvas.width - 1, canvas.height - 1), outline=colour, width=edge)


def render_overlay(image: np.ndarray, result: SliceResult) -> Image.Image:
    """The overlay as an RGB image (for thumbnails, key images, ``predict --save``), with
    the result's heat map when it has one."""
    return render_overlay_image(image, result).convert("RGB")


def save_overlay(image: np.ndarray, result: SliceResult, target: Path) -> str:
    """Render the overlay and write it to ``target`` atomically (temporary file, rename).

    Safe to call from several threads at once, also for the same target.
    """
    with replacing(target) as tmp:
        render_overlay_image(image, result).save(tmp, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return str(target)


def write_overlay(result: SliceResult, directory: Path) -> str | None:
    """Render and save the overlay for ``result`` (atomically); return its path.

    None when the result has no usable UIDs or no image.
    """
    name = overlay_name(result)
    image = overlay_image(result)
    if name is None or image is None:
        return None
    return save_overlay(image, result, Path(directory) / name)


class OverlayWriter:
    """Writes overlay PNGs in a thread pool while the caller goes on screening.

    :meth:`submit` takes a batch of results and returns the batches whose overlays are
    all written (oldest first), each result's ``overlay`` naming its file; a failed
    write is logged as one line and leaves ``overlay`` empty, and the row goes on. When
    more than ``max_pending`` overlays are in flight, :meth:`submit` waits for the
    oldest batch, so memory stays bounded. :meth:`drain` waits for all of them;
    :meth:`abandon` drops those not started (a Ctrl-C), finishes the ones being
    written (no torn or temporary files stay behind) and still returns every batch.

    Parameters
    ----------
    directory
        Folder for the PNGs (it must exist).
    overlays_for
        One of :data:`OVERLAY_CHOICES`: which results get an overlay.
    threads
        Threads that render and write.
    max_pending
        Overlays queued or being written before :meth:`submit` waits.
    """

    def __init__(self, directory: os.PathLike[str] | str, overlays_for: str = "positive", *, threads: int, max_pending: int = 64):
        self.directory = Path(directory)
        self.overlays_for = overlays_for
        self.threads = max(1, threads)
        self.max_pending = max(1, max_pending)
        self._executor: cf.ThreadPoolExecutor | None = None
        self._batches: deque[tuple[list[SliceResult], list[tuple[SliceResult, cf.Future]]]] = deque()
        self._pending = 0

    def __enter__(self) -> OverlayWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Overlays queued or being written."""
        return self._pending

    def submit(self, results: list[SliceResult]) -> list[list[SliceResult]]:
        """Start the overlays ``results`` want; return the batches now complete, oldest first."""
        jobs: list[tuple[SliceResult, cf.Future]] = []
        for result in results:
            if not wants_overlay(result, self.overlays_for):
                continue
            name = overlay_name(result)
            image = overlay_image(result)
            if name is None or image is None:
                continue
            jobs.append((result, self._pool().submit(save_overlay, image, result, self.directory / name)))
        self._batches.append((results, jobs))
        self._pending += len(jobs)
        done = self._take(wait=False)
        while self._pending > self.max_pending:
            done.extend(self._take(wait=True, limit=1))
        return done

    def ready(self) -> list[list[SliceResult]]:
        """The batches complete now, oldest first (does not wait)."""
        return self._take(wait=False)

    def drain(self) -> list[list[SliceResult]]:
        """Wait for every overlay; return the remaining batches, oldest first."""
        return self._take(wait=True)

    def abandon(self) -> list[list[SliceResult]]:
        """Drop the overlays not yet started, wait for those being written; return every
        remaining batch (the dropped ones with ``overlay`` empty)."""
        cancelled = sum(future.cancel() for _, jobs in self._batches for _, future in jobs)
        if cancelled:
            log.warning("left %d overlays unwritten", cancelled)
        return self._take(wait=True)

    def close(self) -> None:
        """Stop the threads; overlays not started are dropped, ones being written finish."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _pool(self) -> cf.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = cf.ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="ichscan-overlay")
        return self._executor

    def _take(self, wait: bool, limit: int | None = None) -> list[list[SliceResult]]:
        done: list[list[SliceResult]] = []
        while self._batches and (limit is None or len(done) < limit):
            results, jobs = self._batches[0]
            futures = [future for _, future in jobs]
            if not wait and not all(future.done() for future in futures):
                break
            cf.wait(futures)
            _finish(jobs)
            self._batches.popleft()
            self._pending -= len(jobs)
            done.append(results)
        return done


def _finish(jobs: Iterable[tuple[SliceResult, cf.Future]]) -> None:
    for result, future in jobs:
        if future.cancelled():
            continue
        try:
            result.overlay = future.result()
        except Exception as exc:  # noqa: BLE001 - a failed overlay is logged; its row goes on
            log.error("cannot write overlay for %s: %s", result.path, _reason(exc))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # the file names are temporary ones: the result's path says which
    return f"{type(exc).__name__}: {exc}"
