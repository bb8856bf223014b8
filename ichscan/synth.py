"""Synthetic head-CT phantoms with exactly known hemorrhage labels.

The generator draws axial head-CT slices (air, scalp, skull, grey/white matter, sulci,
ventricles, noise) and paints the five RSNA 2019 hemorrhage subtypes in their typical shapes
and places. It then writes them as CT Image Storage DICOM files with the variety a real
screening tool meets: several pixel-storage conventions (including the RSNA 12-bit quirk),
several image sizes and five transfer syntaxes. Everything is reproducible from one seed.

Styles (:class:`~ichscan.synth_style.SynthStyle`, presets in
:data:`~ichscan.synth_style.STYLES`) change the look: head size within the field of view, bleed
size, contrast and edges, noise, reconstruction kernel, storage conventions. The default style
is the original look, byte for byte. The volumetric mode (:mod:`ichscan.synth_volume`) makes
each series one 3-D head with bleeds spanning neighbouring slices.

It exists for demos, tests and benchmarks: the phantoms are only loosely anatomical and are
no substitute for real data when judging a model.

Only numpy and pydicom (with the pylibjpeg plugins for RLE and JPEG 2000 encoding) are used,
so the generator runs in decode workers and on machines without torch or scipy.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from ichscan.labels import LABELS, SUBTYPES
from ichscan.synth_style import STYLES, SynthStyle, resolve_style
from ichscan.synth_volume import HEAD_HEIGHT_MM, VolumeBleed, VolumeFields, plan_bleeds, stack_positions

__all__ = [
    "MIN_VISIBLE_MM2",
    "SCANNER_CONVENTIONS",
    "SLICE_THICKNESS_MM",
    "STYLES",
    "TRANSFER_SYNTAXES",
    "VISIBLE_RISE_HU",
    "ScannerConvention",
    "SynthRecord",
    "SynthStyle",
    "available_transfer_syntaxes",
    "generate",
    "is_visible",
    "make_anatomy",
    "make_dataset",
    "pixel_spacing_mm",
    "render_record",
    "render_slice",
    "render_slice_with_masks",
    "resolve_style",
    "resolve_transfer_syntax",
    "save_dataset",
]

log = logging.getLogger(__name__)

FloatImage = NDArray[np.float32]
BoolImage = NDArray[np.bool_]
Box = tuple[slice, slice]

#: A bleed pixel counts as visible when it is at least this much brighter than the same
#: pixel without any bleed (noise-free), so a label never rests on a change no reader could see.
VISIBLE_RISE_HU = 20.0
#: A bleed is labelled present only if its visible pixels cover at least this area.
MIN_VISIBLE_MM2 = 10.0
_MIN_VISIBLE_PX = 20

#: Slice thickness written to every file (RSNA 2019 head CTs were mostly 5 mm axials).
SLICE_THICKNESS_MM = 5.0

_TWO_PI = 2.0 * math.pi


# --------------------------------------------------------------------------------------------
# Pixel storage conventions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScannerConvention:
    """How one (imaginary) scanner stores Hounsfield units in its pixel data.

    Parameters
    ----------
    name
        Short identifier, also the key in :data:`SCANNER_CONVENTIONS`.
    bits_stored
        DICOM BitsStored (BitsAllocated is always 16).
    pixel_representation
        0 for unsigned, 1 for two's complement signed pixels.
    rescale_intercept
        DICOM RescaleIntercept written to the file (RescaleSlope is always 1).
    rsna_quirk
        Store ``HU mod 4096`` in 12 unsigned bits with an intercept that does not undo it,
        as in part of the RSNA 2019 data. Readers must apply the known fix.
    """

    name: str
    bits_stored: int
    pixel_representation: int
    rescale_intercept: int
    rsna_quirk: bool = False

    @property
    def high_bit(self) -> int:
        """DICOM HighBit (always ``bits_stored - 1``)."""
        return self.bits_stored - 1

    @property
    def dtype(self) -> np.dtype[Any]:
        """numpy dtype of the stored pixel array."""
        return np.dtype(np.int16 if self.pixel_representation else np.uint16)

    @property
    def hu_range(self) -> tuple[int, int]:
        """Inclusive range of HU the convention can represent; values outside are clipped."""
        if self.rsna_quirk:
            # The fix (stored + 1000, wrap at 4096, intercept -1000) recovers this window only.
            return (-1000, 4095 - 1000)
        if self.pixel_representation:
            lo, hi = -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        else:
            lo, hi = 0, (1 << self.bits_stored) - 1
        return (lo + self.rescale_intercept, hi + self.rescale_intercept)

    def hu_to_stored(self, hu: NDArray[np.floating[Any]]) -> NDArray[Any]:
        """Convert an HU image to stored pixel values (rounded, clipped to :attr:`hu_range`)."""
        lo, hi = self.hu_range
        rounded = np.clip(np.rint(hu), lo, hi).astype(np.int32)
        if self.rsna_quirk:
            stored = np.mod(rounded, 4096)
        else:
            stored = rounded - self.rescale_intercept
        return stored.astype(self.dtype)

    def stored_to_hu(self, stored: NDArray[Any]) -> NDArray[np.float32]:
        """Recover HU from stored values the way a correct reader does.

        For the RSNA quirk this is the usual fix: add 1000, subtract 4096 from values
        >= 4096 and use intercept -1000. Otherwise it is the plain modality LUT.
        """
        if self.rsna_quirk:
            fixed = stored.astype(np.int32) + 1000
            fixed[fixed >= 4096] -= 4096
            return (fixed - 1000).astype(np.float32)
        return (stored.astype(np.float32) + np.float32(self.rescale_intercept)).astype(np.float32)


#: The per-study pixel storage conventions the generator picks from, by name.
SCANNER_CONVENTIONS: Mapping[str, ScannerConvention] = {
    c.name: c
    for c in (
        ScannerConvention("signed16", 16, 1, 0),
        ScannerConvention("signed16_offset", 16, 1, -1024),
        ScannerConvention("unsigned16", 16, 0, -1024),
        ScannerConvention("unsigned12", 12, 0, -1024),
        ScannerConvention("rsna12_quirk", 12, 0, 0, rsna_quirk=True),
    )
}


# --------------------------------------------------------------------------------------------
# Transfer syntaxes
# --------------------------------------------------------------------------------------------

#: Transfer syntaxes the generator writes, in the order a study picks from.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
)
_COMPRESSED = {RLELossless, JPEG2000Lossless}


def resolve_transfer_syntax(spec: str) -> UID:
    """Return the supported transfer syntax named by a UID or a pydicom keyword.

    Parameters
    ----------
    spec
        ``"1.2.840.10008.1.2.1"``, ``"ExplicitVRLittleEndian"``, a :class:`pydicom.uid.UID`...

    Raises
    ------
    ValueError
        If it names none of :data:`TRANSFER_SYNTAXES`.
    """
    text = str(spec).strip()
    for uid in TRANSFER_SYNTAXES:
        if text in (str(uid), uid.keyword):
            return uid
    names = ", ".join(uid.keyword for uid in TRANSFER_SYNTAXES)
    raise ValueError(f"unsupported transfer syntax {spec!r}; choose from: {names}")


def _encoder_plugin(uid: UID) -> str | None:
    """Pick the encoding plugin for a compressed syntax, or ``None`` if none is installed."""
    try:
        from pydicom.pixels import get_encoder

        encoder = get_encoder(uid)
    except Exception:  # pragma: no cover - pydicom without an encoder for this syntax
        return None
    if not encoder.is_available:
        return None
    plugins = encoder.available_plugins
    # pylibjpeg-rle is compiled, far faster than pydicom's pure-Python RLE encoder.
    return "pylibjpeg" if "pylibjpeg" in plugins else plugins[0]


def available_transfer_syntaxes() -> tuple[UID, ...]:
    """Transfer syntaxes that can be written in this environment (encoders installed)."""
    return tuple(uid for uid in TRANSFER_SYNTAXES if uid not in _COMPRESSED or _encoder_plugin(uid))


# --------------------------------------------------------------------------------------------
# Anatomy and geometry
# --------------------------------------------------------------------------------------------


def make_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """Draw the per-study anatomy, so that every slice of one study looks like the same head.

    Returns
    -------
    dict
        Plain floats and lists (JSON-serialisable). Lengths are in mm, angles in degrees
        or radians as named, densities in HU. ``fov_mm`` is the field of view, chosen so the
        head spans about 80% of it.
    """

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    semi_lr, semi_ap = u(66.0, 76.0), u(86.0, 97.0)
    fill = u(0.76, 0.84)
    n_sulci = int(rng.integers(34, 47))
    return {
        "semi_axes_mm": [semi_lr, semi_ap],
        "rotation_deg": u(-8.0, 8.0),
        "center_mm": [u(-4.0, 4.0), u(-4.0, 4.0)],
        "fov_mm": 2.0 * semi_ap / fill,
        # Low-order harmonics make the outline a skull rather than a perfect ellipse.
        "outline_harmonics": [[k, u(0.0, 0.018), u(0.0, _TWO_PI)] for k in (2, 3, 4, 5)],
        "scalp_mm": u(3.5, 6.0),
        "skull_mm": u(6.3, 7.5),
        "csf_gap_mm": u(0.8, 1.8),
        "cortex_mm": u(2.5, 3.5),
        "scalp_hu": u(25.0, 45.0),
        "table_hu": u(1450.0, 1750.0),
        "diploe_hu": u(600.0, 900.0),
        "grey_hu": u(36.0, 41.0),
        "white_hu": u(24.0, 29.0),
        "csf_hu": u(3.0, 10.0),
        "noise_sigma": u(3.0, 8.0),
        "texture_hu": u(1.0, 2.0),
        "sulci": {
            "count": n_sulci,
            "phase_harmonics": [[k, u(0.0, 2.5 / k), u(0.0, _TWO_PI)] for k in (1, 2, 3, 5, 7)],
            "curl_rad_per_mm": u(-0.12, 0.12),
            "wiggle_rad": u(1.0, 1.5),
            # About one sulcus in eight is missing in a slice; the rest are 7-19 mm deep.
            "depths_mm": [0.0 if rng.random() < 0.12 else u(7.0, 19.0) for _ in range(n_sulci)],
            # A pixel is sulcal CSF where cos(phase) exceeds this: 0.84 wide ... 0.94 narrow.
            "widths_cos": [u(0.84, 0.94) for _ in range(n_sulci)],
        },
        "ventricles": {
            "half_length_mm": u(26.0, 33.0),
            "center_v_mm": u(-2.0, 6.0),
            "septum_mm": u(1.2, 2.2),
            "width_mm": u(4.0, 6.0),
            "anterior_offset_mm": u(1.0, 3.0),
            "posterior_offset_mm": u(9.0, 15.0),
            "asymmetry_mm": u(-1.0, 1.0),
        },
        "fissure_mm": u(0.6, 1.1),
        "falx_hu": u(10.0, 20.0),
    }


def pixel_spacing_mm(anatomy: Mapping[str, Any], size: int, style: SynthStyle | str | None = None) -> float:
    """Pixel spacing (mm) used for ``anatomy`` at ``size`` pixels, rounded as written to DICOM.

    A ``style`` whose ``head_scale`` is not 1 widens or narrows the field of view.
    """
    head_scale = 1.0 if style is None else resolve_style(style).head_scale
    return round(float(anatomy["fov_mm"]) / head_scale / size, 6)


def _outline_radius(anatomy: Mapping[str, Any], phi: Any) -> Any:
    """Outer head radius (mm) along direction ``phi`` (array or scalar), before z scaling."""
    a, b = anatomy["semi_axes_mm"]
    c, s = np.cos(phi), np.sin(phi)
    r = 1.0 / np.sqrt((c / a) ** 2 + (s / b) ** 2)
    wobble = 1.0
    for k, amp, phase in anatomy["outline_harmonics"]:
        wobble = wobble + amp * np.cos(k * phi + phase)
    return r * wobble


def _skull_thickness(anatomy: Mapping[str, Any], phi: Any) -> Any:
    """Skull thickness (mm): thinner at the temples (phi near 0 or pi) than front and back."""
    return anatomy["skull_mm"] * (1.0 - 0.12 * np.cos(2.0 * phi))


def _sulcus_phase(anatomy: Mapping[str, Any], phi: Any) -> Any:
    """Sulcus pattern phase: sulci sit where it is a multiple of 2 pi."""
    sulci = anatomy["sulci"]
    arg = sulci["count"] * phi
    for k, amp, phase in sulci["phase_harmonics"]:
        arg = arg + amp * np.sin(k * phi + phase)
    return arg


def _outline_scale(z: float) -> float:
    """Head outline scale: the head is widest mid-way and a little smaller near its ends."""
    return 0.84 + 0.16 * math.sqrt(math.sin(math.pi * min(max(z, 0.0), 1.0)))


def _ventricle_scale(z: float) -> float:
    """Lateral ventricle scale: largest at mid-ventricular level, smaller above and below."""
    return 0.55 + 0.45 * math.exp(-(((z - 0.55) / 0.25) ** 2))


@dataclass
class _Geometry:
    """Pixel coordinates of one (anatomy, size) pair, cached because every slice needs them.

    ``u``/``v`` are head coordinates in mm (u to the image right, v to the image bottom,
    i.e. posterior, rotated with the head), ``rho``/``phi`` their polar form; ``y`` is the
    unrotated image y (mm, downwards), which is what gravity follows.
    """

    size: int
    spacing: float
    cos: float
    sin: float
    cx: float
    cy: float
    u: FloatImage
    v: FloatImage
    rho: FloatImage
    phi: FloatImage
    y: NDArray[np.float32]  # column vector (size, 1): image y of each row, mm
    r_outline: FloatImage
    inner_offset: FloatImage  # depth of the inner table below the skin, mm
    skull_t: FloatImage
    sulcus_arg0: FloatImage

    def to_pixels(self, u: NDArray[Any], v: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        """Head coordinates (mm) to fractional (row, col) pixel indices."""
        x = self.cos * u - self.sin * v + self.cx
        y = self.sin * u + self.cos * v + self.cy
        half = (self.size - 1) / 2.0
        return y / self.spacing + half, x / self.spacing + half

    def box(self, u: NDArray[Any], v: NDArray[Any], margin_px: int = 3) -> Box:
        """Pixel bounding box (clipped to the image) of head-coordinate points."""
        rows, cols = self.to_pixels(np.asarray(u, float), np.asarray(v, float))
        r0 = max(int(math.floor(rows.min())) - margin_px, 0)
        r1 = min(int(math.ceil(rows.max())) + margin_px + 1, self.size)
        c0 = max(int(math.floor(cols.min())) - margin_px, 0)
        c1 = min(int(math.ceil(cols.max())) + margin_px + 1, self.size)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


_GEOMETRY_CACHE: OrderedDict[tuple[int, str], _Geometry] = OrderedDict()
_GEOMETRY_CACHE_SIZE = 4
_INTERP_CACHE: dict[tuple[int, int], NDArray[np.float32]] = {}
_CACHE_LOCK = threading.Lock()


def _geometry(anatomy: Mapping[str, Any], size: int) -> _Geometry:
    key = (size, repr(sorted(anatomy.items())))
    with _CACHE_LOCK:
        geom = _GEOMETRY_CACHE.get(key)
        if geom is not None:
            _GEOMETRY_CACHE.move_to_end(key)
            return geom
    spacing = pixel_spacing_mm(anatomy, size)
    theta = math.radians(anatomy["rotation_deg"])
    cos, sin = math.cos(theta), math.sin(theta)
    cx, cy = anatomy["center_mm"]
    coords = ((np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * spacing).astype(np.float32)
    x = coords[None, :] - np.float32(cx)
    y = coords[:, None] - np.float32(cy)
    u = (cos * x + sin * y).astype(np.float32)
    v = (-sin * x + cos * y).astype(np.float32)
    phi = np.arctan2(v, u).astype(np.float32)
    skull_t = _skull_thickness(anatomy, phi).astype(np.float32)
    geom = _Geometry(
        size=size,
        spacing=spacing,
        cos=cos,
        sin=sin,
        cx=float(cx),
        cy=float(cy),
        u=u,
        v=v,
        rho=np.hypot(u, v).astype(np.float32),
        phi=phi,
        y=np.ascontiguousarray(y),
        r_outline=_outline_radius(anatomy, phi).astype(np.float32),
        inner_offset=(skull_t + np.float32(anatomy["scalp_mm"])).astype(np.float32),
        skull_t=skull_t,
        sulcus_arg0=_sulcus_phase(anatomy, phi).astype(np.float32),
    )
    with _CACHE_LOCK:
        _GEOMETRY_CACHE[key] = geom
        if len(_GEOMETRY_CACHE) > _GEOMETRY_CACHE_SIZE:
            _GEOMETRY_CACHE.popitem(last=False)
    return geom


def _interp_matrix(size: int, n: int) -> NDArray[np.float32]:
    """Bilinear interpolation weights (size x n) from an n-point grid to size points."""
    key = (size, n)
    mat = _INTERP_CACHE.get(key)
    if mat is None:
        pos = np.linspace(0.0, n - 1.0, size)
        lo = np.minimum(np.floor(pos).astype(int), n - 2)
        frac = pos - lo
        mat = np.zeros((size, n), dtype=np.float32)
        mat[np.arange(size), lo] = 1.0 - frac
        mat[np.arange(size), lo + 1] += frac
        _INTERP_CACHE[key] = mat
    return mat


def _smooth_noise(
    rng: np.random.Generator, size: int, n: int, box: Box, grid: NDArray[np.float32] | None = None
) -> FloatImage:
    """Smooth unit-variance-ish noise over ``box``: an n x n random grid upsampled bilinearly.

    Separable bilinear interpolation is two small matrix products (no scipy needed). The
    whole grid is drawn whatever the box, so the random stream does not depend on it. A
    given ``grid`` (a volume's field at this slice) is used instead of drawing one.
    """
    if grid is None:
        grid = rng.standard_normal((n, n)).astype(np.float32)
    mat = _interp_matrix(size, n)
    return (mat[box[0]] @ grid @ mat[box[1]].T).astype(np.float32)


def _wrap(angle: Any) -> Any:
    """Wrap angles to [-pi, pi)."""
    return (angle + math.pi) % _TWO_PI - math.pi


def _ventricle_masks(
    anatomy: Mapping[str, Any], z: float, u: NDArray[Any], v: NDArray[Any], margin_mm: float = 0.0
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Masks of the (image-left, image-right) lateral ventricles at points (u, v).

    Each ventricle is a band along a centreline that keeps a thin septum from the midline
    in front and diverges towards the back; it widens at the frontal horn and at the atrium
    and has rounded ends. ``margin_mm`` grows it, for keeping other structures clear of it.
    """
    vent = anatomy["ventricles"]
    scale = _ventricle_scale(z)
    half_len = vent["half_length_mm"] * scale
    center_v = vent["center_v_mm"]
    t = (v - center_v) / (half_len + margin_mm)
    ends = np.sqrt(np.clip(1.0 - t**8, 0.0, None))
    bulges = (1.0 + 0.5 * np.exp(-(((t + 0.62) / 0.28) ** 2))
              + 0.9 * np.exp(-(((t - 0.55) / 0.3) ** 2)))
    half_width = 0.5 * vent["width_mm"] * (0.55 + 0.45 * scale) * bulges
    # Closest approach a little in front of the middle; quadratic divergence either side.
    s = (t + 0.45) / np.where(t > -0.45, 1.45, 0.55)
    spread = np.where(t > -0.45, vent["posterior_offset_mm"], vent["anterior_offset_mm"])
    centre = 0.5 * vent["septum_mm"] + half_width + scale * spread * s * s
    extent = half_width * ends + margin_mm
    inside = np.abs(t) < 1.0
    shift = 0.5 * vent["asymmetry_mm"]
    left = inside & (np.abs(u + centre + shift) < extent)
    right = inside & (np.abs(u - centre + shift) < extent)
    return left, right


def _ventricle_extent(
    anatomy: Mapping[str, Any], z: float, margin_mm: float = 0.0
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Corner points (u, v) of a box containing both ventricles (plus margin)."""
    vent = anatomy["ventricles"]
    scale = _ventricle_scale(z)
    half_len = vent["half_length_mm"] * scale + margin_mm
    reach = (0.5 * vent["septum_mm"] + abs(vent["asymmetry_mm"])
             + scale * max(vent["posterior_offset_mm"], vent["anterior_offset_mm"])
             + 2.5 * vent["width_mm"] + margin_mm + 2.0)
    cv = vent["center_v_mm"]
    return (np.array([-reach, reach, -reach, reach]),
            np.array([cv - half_len, cv - half_len, cv + half_len, cv + half_len]))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

@dataclass
class _Canvas:
    """Intermediate state of one slice while bleeds are painted.

    Outside the head there is only air, so every array here covers just the head's box
    ``hb`` (coordinates views included); boxes used with them are relative to it.
    """

    geom: _Geometry
    anatomy: Mapping[str, Any]
    z: float
    scale: float
    hb: Box
    u: FloatImage
    v: FloatImage
    phi: FloatImage
    y: NDArray[np.float32]  # column vector: image y (mm) of each row
    depth_inner: FloatImage  # mm below the inner table (negative: skull, scalp, air)
    depth_brain: FloatImage  # mm below the brain surface
    sulcus: BoolImage  # CSF-filled sulci
    sulcus_margin: FloatImage  # cos(phase) minus the sulcus threshold: > 0 inside a sulcus
    sulcus_index: NDArray[np.int32]  # which sulcus a pixel belongs to (use modulo count)
    texture: FloatImage
    ic: FloatImage  # intracranial densities (HU), painted in place
    vent_box: Box
    vent_masks: tuple[BoolImage, BoolImage]  # within vent_box
    owner: NDArray[np.int8]
    boxes: dict[str, Box]
    base: FloatImage | None = None  # the bleed-free ``ic``, once bleeds are painted
    contrasts: dict[str, float] = field(default_factory=dict)  # per bleed, 1.0 if missing


def _canvas_box(canvas: _Canvas, u: NDArray[Any], v: NDArray[Any]) -> Box:
    """Box (relative to the head box, clipped to it) around head-coordinate points."""
    rows, cols = canvas.geom.box(u, v)
    hr, hc = canvas.hb
    r0 = min(max(rows.start, hr.start), hr.stop) - hr.start
    r1 = min(max(rows.stop, hr.start), hr.stop) - hr.start
    c0 = min(max(cols.start, hc.start), hc.stop) - hc.start
    c1 = min(max(cols.stop, hc.start), hc.stop) - hc.start
    return slice(r0, r1), slice(c0, c1)


def _inner_radius(canvas: _Canvas, phi: Any) -> Any:
    """Radius (mm) of the inner table along ``phi`` in this slice."""
    return _inner_radius_at(canvas.anatomy, canvas.scale, phi)


def _inner_radius_at(a: Mapping[str, Any], scale: float, phi: Any) -> Any:
    """Radius (mm) of the inner table along ``phi`` where the outline has ``scale``."""
    return scale * _outline_radius(a, phi) - a["scalp_mm"] - _skull_thickness(a, phi)


def _sector_box(canvas: _Canvas, phi0: float, half: float, depth_mm: float) -> Box:
    """Pixel box of the rim of the skull cavity within ``phi0 +- half``, ``depth_mm`` deep."""
    angles = phi0 + np.linspace(-half, half, 33)
    r_in = _inner_radius(canvas, angles)
    radii = np.concatenate([r_in + 1.0, np.maximum(r_in - depth_mm, 0.0)])
    angles = np.concatenate([angles, angles])
    return _canvas_box(canvas, radii * np.cos(angles), radii * np.sin(angles))


def _paint(canvas: _Canvas, name: str, box: Box, mask: BoolImage, values: Any) -> None:
    """Write ``values`` into the intracranial image where ``mask`` is set and record owner."""
    code = SUBTYPES.index(name) + 1
    target = canvas.ic[box]
    contrast = canvas.contrasts.get(name, 1.0)
    if contrast != 1.0 and canvas.base is not None:
        # Scale the difference from the bleed-free tissue, not the density itself.
        base = canvas.base[box]
        values = base + np.float32(contrast) * (np.asarray(values, dtype=np.float32) - base)
    if np.ndim(values):
        target[mask] = values[mask]
    else:
        target[mask] = values
    canvas.owner[box][mask] = code
    prev = canvas.boxes.get(name)
    canvas.boxes[name] = box if prev is None else _union_box(prev, box)


def _union_box(a: Box, b: Box) -> Box:
    return (slice(min(a[0].start, b[0].start), max(a[0].stop, b[0].stop)),
            slice(min(a[1].start, b[1].start), max(a[1].stop, b[1].stop)))


def _draw_epidural(canvas: _Canvas, rng: np.random.Generator, phi0: float, size: float = 1.0) -> None:
    """Biconvex lens against the inner table: thickest in the middle, ends meet the skull.

    ``size`` scales arc and thickness (style and volumetric cross-section); so for the others.
    """
    r_in = float(_inner_radius(canvas, phi0))
    arc_mm = rng.uniform(35.0, 70.0) * size
    half = min(arc_mm / (2.0 * r_in), 2.5)
    thick = min(rng.uniform(8.0, 20.0) * size, 0.3 * r_in)
    hu = rng.uniform(60.0, 85.0)
    box = _sector_box(canvas, phi0, half, thick)
    dphi = _wrap(canvas.phi[box] - phi0) / half
    profile = thick * np.sqrt(np.clip(1.0 - dphi * dphi, 0.0, None))
    di = canvas.depth_inner[box]
    mask = (di > -0.5 * canvas.geom.spacing) & (di < profile)
    _paint(canvas, "epidural", box, mask, hu + 0.6 * canvas.texture[box])


def _draw_subdural(canvas: _Canvas, rng: np.random.Generator, phi0: float, size: float = 1.0) -> None:
    """Crescent along the inner table over a long arc: constant depth, tapered ends."""
    half = min(rng.uniform(0.6, 1.25) * size, 2.5)
    thick = (2.0 + 10.0 * rng.random() ** 1.5) * size  # mostly thin, from 2 mm up to 12 mm
    hu = rng.uniform(55.0, 80.0)
    box = _sector_box(canvas, phi0, half, thick)
    dphi = _wrap(canvas.phi[box] - phi0) / half
    profile = thick * np.sqrt(np.clip(1.0 - dphi**4, 0.0, None))
    di = canvas.depth_inner[box]
    mask = (di > -0.5 * canvas.geom.spacing) & (di < profile)
    _paint(canvas, "subdural", box, mask, hu + 0.6 * canvas.texture[box])


def _draw_subarachnoid(canvas: _Canvas, rng: np.random.Generator, phi0: float, size: float = 1.0) -> None:
    """Blood filling a run of neighbouring sulci, from the surface to part of their depth."""
    sulci = canvas.anatomy["sulci"]
    n = sulci["count"]
    half = min(rng.uniform(0.5, 1.0) * size, 2.5)
    hu = rng.uniform(55.0, 80.0)
    fill = rng.uniform(0.6, 1.0) * size
    keep = rng.random(n) < 0.85  # a few sulci in the region stay clear
    interhemispheric = rng.random() < 0.6
    # Pick sulci by where they meet the surface, so whole sulci fill, not a wedge of them.
    centres = np.linspace(-math.pi, math.pi, 4097)
    k_at = np.floor(_sulcus_phase(canvas.anatomy, centres) / _TWO_PI + 0.5).astype(np.intp) % n
    chosen = np.zeros(n, dtype=bool)
    chosen[np.unique(k_at[np.abs(_wrap(centres - phi0)) < half])] = True
    chosen &= keep
    depths = np.asarray(sulci["depths_mm"], dtype=np.float32)
    box = _sector_box(canvas, phi0, half + 0.35, float(depths.max()) + 6.0)
    k = canvas.sulcus_index[box]
    db = canvas.depth_brain[box]
    # Blood distends the sulcus a little, so it fills slightly more than the CSF did.
    mask = ((canvas.sulcus_margin[box] > -0.04) & (db >= 0) & np.take(chosen, k, mode="wrap")
            & (db < fill * np.take(depths, k, mode="wrap") + 0.5))
    if interhemispheric:
        # Blood in the interhemispheric fissure where the arc crosses the midline.
        a = canvas.anatomy
        vent, vs = a["ventricles"], _ventricle_scale(canvas.z)
        v = canvas.v[box]
        away = ((v < vent["center_v_mm"] - vent["half_length_mm"] * vs - 6.0)
                | (v > vent["center_v_mm"] + vent["half_length_mm"] * vs + 10.0))
        mask |= ((np.abs(canvas.u[box]) < a["fissure_mm"] + 0.3) & away & (db >= 0)
                 & (np.abs(_wrap(canvas.phi[box] - phi0)) < half))
    _paint(canvas, "subarachnoid", box, mask, hu + 0.6 * canvas.texture[box])


def _draw_intraparenchymal(
    canvas: _Canvas, rng: np.random.Generator, size: float = 1.0, place: tuple[float, float] | None = None
) -> None:
    """Irregular hyperdense blob in the parenchyma with a hypodense oedema rim.

    ``place`` is ``(z, scale)``: the slice where the blob is placed (clear of skull and
    ventricles) with its full ``scale``, when that is not this slice, so that the cuts of one
    3-D blob share their centre; the drawn size is then ``size``.
    """
    a = canvas.anatomy
    place_z, full = (canvas.z, size) if place is None else place
    place_scale = _outline_scale(place_z)
    radius = rng.uniform(6.0, 16.0) * full
    rim = rng.uniform(2.0, 4.5) * full
    harmonics = [(k, rng.uniform(0.0, 0.22) / math.sqrt(k), rng.uniform(0.0, _TWO_PI))
                 for k in (2, 3, 4, 5, 6)]
    rim_harmonic = (int(rng.integers(2, 5)), rng.uniform(0.0, _TWO_PI))
    hu = rng.uniform(60.0, 85.0)
    oedema_hu = rng.uniform(10.0, 18.0)
    ring = np.linspace(0.0, _TWO_PI, 48, endpoint=False)
    uc = vc = 0.0
    for attempt in range(400):
        if attempt and attempt % 50 == 0:
            radius = max(4.0, radius * 0.8)
        reach = radius * 1.5 + rim * 1.3
        phi = rng.uniform(-math.pi, math.pi)
        r_in = float(_inner_radius_at(a, place_scale, phi))
        dist = rng.uniform(0.1, 1.0) * (r_in - reach - 4.0)
        if dist < 0:
            continue
        uc, vc = dist * math.cos(phi), dist * math.sin(phi)
        pu = uc + np.concatenate([[0.0], reach * np.cos(ring), 0.5 * reach * np.cos(ring)])
        pv = vc + np.concatenate([[0.0], reach * np.sin(ring), 0.5 * reach * np.sin(ring)])
        left, right = _ventricle_masks(a, place_z, pu, pv, margin_mm=2.0)
        clear_of_skull = np.hypot(pu, pv) < _inner_radius_at(a, place_scale, np.arctan2(pv, pu)) - 4.0
        if not (left.any() or right.any()) and clear_of_skull.all():
            break
    if place is not None:  # a cut away from the blob's middle: smaller, same centre
        radius, rim = radius * size / full, rim * size / full
    reach = radius * 1.5 + rim * 1.3
    box = _canvas_box(canvas, np.array([uc - reach, uc + reach]),
                      np.array([vc - reach, vc + reach]))
    du, dv = canvas.u[box] - uc, canvas.v[box] - vc
    dist_c = np.hypot(du, dv)
    psi = np.arctan2(dv, du)
    edge = np.full(dist_c.shape, radius, dtype=np.float32)
    for k, amp, phase in harmonics:
        edge += radius * amp * np.cos(k * psi + phase)
    core = dist_c < edge
    oedema_edge = edge + rim * (1.0 + 0.3 * np.cos(rim_harmonic[0] * psi + rim_harmonic[1]))
    oedema = ~core & (dist_c < oedema_edge)
    # Only parenchyma swells: oedema does not replace extra-axial CSF or other bleeds.
    oedema &= (canvas.owner[box] == 0) & (canvas.depth_brain[box] > 0)
    _paint(canvas, "intraparenchymal", box, oedema, oedema_hu + 0.5 * canvas.texture[box])
    _paint(canvas, "intraparenchymal", box, core, hu + 0.8 * canvas.texture[box])


def _draw_intraventricular(canvas: _Canvas, rng: np.random.Generator, size: float = 1.0) -> None:
    """Blood layering in the dependent (image-bottom) part of one or both lateral ventricles."""
    box = canvas.vent_box
    masks = canvas.vent_masks
    sides = [int(rng.integers(0, 2))]
    if rng.random() < 0.3:
        sides = [0, 1]
    hu = rng.uniform(55.0, 80.0)
    frac = min(rng.uniform(0.25, 0.5) * size, 0.95)
    y = np.broadcast_to(canvas.y[box[0]], masks[0].shape)
    for side in sides:
        mask = masks[side]
        if not mask.any():
            continue
        ys = y[mask]
        lo, hi = float(ys.min()), float(ys.max())
        # Patients lie supine, so blood settles towards the image bottom: a horizontal level.
        level = hi - frac * (hi - lo)
        _paint(canvas, "intraventricular", box, mask & (y > level), np.float32(hu))


def _background(
    rng: np.random.Generator,
    geom: _Geometry,
    anatomy: Mapping[str, Any],
    z: float,
    grids: Callable[[int, int], NDArray[np.float32]] | None = None,
) -> tuple[_Canvas, Box, FloatImage, FloatImage]:
    """Draw the bleed-free slice.

    Returns the canvas (intracranial densities, painted on later), the box around the head
    (outside it there is only air) and, within that box, the scalp/skull/air layer and the
    weight of the intracranial part (soft at the inner table). ``grids(index, n)``, when
    given, supplies the smooth fields' random grids (volumetric mode) instead of ``rng``.
    """
    a = anatomy
    sp = geom.spacing
    size = geom.size
    scale = _outline_scale(z)
    # Everything outside the head is air, so the work is done in the head's box only.
    ring = np.linspace(-math.pi, math.pi, 128, endpoint=False)
    r_head = scale * _outline_radius(a, ring) + sp
    hb = geom.box(r_head * np.cos(ring), r_head * np.sin(ring))

    def field(index: int, n: int) -> FloatImage:
        return _smooth_noise(rng, size, n, hb, None if grids is None else grids(index, n))

    texture = field(0, 9) * np.float32(a["texture_hu"])
    texture += field(1, 40) * np.float32(0.6 * a["texture_hu"])
    sulci = a["sulci"]
    wiggle = field(2, 28) * np.float32(sulci["wiggle_rad"])

    depth = scale * geom.r_outline[hb] - geom.rho[hb]  # mm below the skin
    depth_inner = depth - geom.inner_offset[hb]
    depth_brain = depth_inner - np.float32(a["csf_gap_mm"])

    # Sulci: ridges of cos(arg), bending with depth (curl) and meandering (wiggle).
    arg = geom.sulcus_arg0[hb] + np.float32(sulci["curl_rad_per_mm"]) * depth_brain + wiggle
    cos_arg = np.cos(arg)
    index = np.floor(arg * np.float32(1.0 / _TWO_PI) + np.float32(0.5)).astype(np.int32)
    depths = np.asarray(sulci["depths_mm"], dtype=np.float32)
    widths = np.asarray(sulci["widths_cos"], dtype=np.float32)
    # Sulci narrow towards their floor: the cos threshold rises with depth.
    taper = np.where(depths > 0, (1.0 - widths) * 0.6 / np.maximum(depths, 1.0), 0.0)
    sulcal_depth = np.take(depths, index, mode="wrap")
    threshold = np.take(widths, index, mode="wrap")
    threshold += np.take(taper.astype(np.float32), index, mode="wrap") * depth_brain
    sulcus = (depth_brain >= 0) & (depth_brain < sulcal_depth) & (cos_arg > threshold)

    # Grey matter: a cortical ribbon under the surface and along the walls of each sulcus.
    grey_w = np.clip((np.float32(a["cortex_mm"]) - depth_brain) * np.float32(0.8), 0.0, 1.0)
    wall = np.clip((cos_arg - np.float32(0.2)) * np.float32(1.6), 0.0, 1.0)
    wall *= depth_brain < sulcal_depth + np.float32(2.0)
    np.maximum(grey_w, wall, out=grey_w)
    grey, white = np.float32(a["grey_hu"]), np.float32(a["white_hu"])
    ic_box = white + (grey - white) * grey_w + texture

    csf = np.float32(a["csf_hu"]) + np.float32(0.3) * texture
    # Narrow sulci are partly averaged with the brain beside them (partial volume).
    sulcal_csf = np.clip((cos_arg - threshold) * np.float32(25.0), 0.0, 1.0) * sulcus
    ic_box += (csf - ic_box) * sulcal_csf
    csf_mask = depth_brain < 0
    # Interhemispheric fissure with a faint falx, in front of and behind the ventricles.
    vent = a["ventricles"]
    vs = _ventricle_scale(z)
    v_front = vent["center_v_mm"] - vent["half_length_mm"] * vs - 6.0
    v_back = vent["center_v_mm"] + vent["half_length_mm"] * vs + 10.0
    u_box, v_box = geom.u[hb], geom.v[hb]
    abs_u = np.abs(u_box)
    fissure = (abs_u < np.float32(a["fissure_mm"])) & ((v_box < v_front) | (v_box > v_back))
    csf_mask |= fissure
    ic_box = np.where(csf_mask, csf, ic_box)
    falx = np.clip(np.float32(1.0) - abs_u * np.float32(1.0 / 0.4), 0.0, 1.0) * fissure
    ic_box += np.float32(a["falx_hu"]) * falx

    # Soft (partial-volume) edges at the skin and at both tables of the skull.
    inv_sp = np.float32(1.0 / sp)
    w_head = np.clip(depth * inv_sp + np.float32(0.5), 0.0, 1.0)
    depth_bone = depth - np.float32(a["scalp_mm"])
    w_outer = np.clip(depth_bone * inv_sp + np.float32(0.5), 0.0, 1.0)
    w_inner = np.clip(depth_inner * inv_sp + np.float32(0.5), 0.0, 1.0)
    frac = np.clip(depth_bone / geom.skull_t[hb], 0.0, 1.0)
    table = np.abs(np.float32(2.0) * frac - np.float32(1.0)) ** np.float32(1.5)
    diploe = np.float32(a["diploe_hu"])
    bone = diploe + (np.float32(a["table_hu"]) - diploe) * table
    shell = np.float32(a["scalp_hu"]) * (w_head - w_outer) + bone * (w_outer - w_inner)
    shell += np.float32(-1000.0) * (np.float32(1.0) - w_head)

    ic = ic_box.astype(np.float32, copy=False)
    canvas = _Canvas(
        geom=geom,
        anatomy=a,
        z=z,
        scale=scale,
        hb=hb,
        u=u_box,
        v=v_box,
        phi=geom.phi[hb],
        y=geom.y[hb[0]],
        depth_inner=depth_inner,
        depth_brain=depth_brain,
        sulcus=sulcus,
        sulcus_margin=cos_arg - threshold,
        sulcus_index=index,
        texture=texture,
        ic=ic,
        vent_box=(slice(0, 0), slice(0, 0)),
        vent_masks=(np.zeros((0, 0), bool), np.zeros((0, 0), bool)),
        owner=np.zeros(ic.shape, dtype=np.int8),
        boxes={},
    )
    vu, vv = _ventricle_extent(a, z)
    vent_box = _canvas_box(canvas, vu, vv)
    left, right = _ventricle_masks(a, z, u_box[vent_box], v_box[vent_box])
    ic[vent_box] = np.where(left | right, csf[vent_box], ic[vent_box])
    canvas.vent_box = vent_box
    canvas.vent_masks = (left, right)
    return canvas, hb, shell, w_inner


_DRAW_ORDER = ("subarachnoid", "intraparenchymal", "intraventricular", "subdural", "epidural")


@dataclass(frozen=True)
class _BleedLayout:
    """Where the bleeds of a slice (or of a volumetric series) go, and their shapes' seeds."""

    edh_phi: float
    sdh_phi: float
    sah_phi: float
    seeds: tuple[int, ...]

    def rngs(self) -> dict[str, np.random.Generator]:
        return {name: np.random.default_rng(s) for name, s in zip(SUBTYPES, self.seeds)}


def _bleed_layout(rng: np.random.Generator) -> _BleedLayout:
    side_angle = 0.0 if rng.random() < 0.5 else math.pi
    edh_phi = side_angle + rng.uniform(-0.6, 0.6)
    sdh_phi = side_angle + math.pi + rng.uniform(-0.5, 0.5)
    sah_side = 1.0 if rng.random() < 0.5 else -1.0
    sah_phi = side_angle + sah_side * math.pi / 2 + rng.uniform(-0.3, 0.3)
    seeds = rng.integers(0, 2**63, size=len(SUBTYPES))
    return _BleedLayout(edh_phi, sdh_phi, sah_phi, tuple(int(s) for s in seeds))


@dataclass(frozen=True)
class _Cut:
    """A volumetric slice's share of its series: the series' bleed layout and smooth fields,
    the slice's height and each bleed's cross-section factors (size, contrast) on it."""

    layout: _BleedLayout
    fields: VolumeFields
    z_mm: float
    factors: Mapping[str, tuple[float, float]]
    centres: Mapping[str, float]  # bleed centre heights, 0..1 (where a blob is placed)


def _styled_anatomy(anatomy: Mapping[str, Any], style: SynthStyle) -> Mapping[str, Any]:
    """The anatomy as ``style`` shows it: only the field of view (head size in it) changes."""
    if style.head_scale == 1.0:
        return anatomy
    return {**anatomy, "fov_mm": float(anatomy["fov_mm"]) / style.head_scale}


#: Sigma (mm) of the Gaussian whose difference :attr:`SynthStyle.sharpen` adds back.
_SHARPEN_SIGMA_MM = 1.0


def _gaussian_blur(image: FloatImage, sigma_px: float) -> FloatImage:
    """Separable Gaussian blur (edges extended), numpy only."""
    if sigma_px <= 0.0:
        return image
    radius = max(1, int(math.ceil(3.0 * sigma_px)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
    taps /= taps.sum()
    out = image
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for k, weight in enumerate(taps):
            index = [slice(None), slice(None)]
            index[axis] = slice(k, k + n)
            acc += np.float32(weight) * padded[tuple(index)]
        out = acc
    return out


def _kernel(image: FloatImage, style: SynthStyle, spacing: float) -> FloatImage:
    """The style's reconstruction kernel: Gaussian blur, then unsharp masking. Linear."""
    if style.blur_mm > 0.0:
        image = _gaussian_blur(image, style.blur_mm / spacing)
    if style.sharpen > 0.0:
        image = image + np.float32(style.sharpen) * (image - _gaussian_blur(image, _SHARPEN_SIGMA_MM / spacing))
    return image.astype(np.float32, copy=False)


def _render(
    rng: np.random.Generator,
    size: int,
    bleeds: Iterable[str],
    z: float,
    anatomy: Mapping[str, Any] | None,
    style: SynthStyle | None = None,
    cut: _Cut | None = None,
) -> tuple[FloatImage, Box, dict[str, tuple[Box, BoolImage]]]:
    """Render one slice.

    Returns the HU image, the head box and, per drawn bleed, its visible pixels as a box
    relative to the head box and a mask within that box. ``cut`` makes it one slice of a
    volumetric series (bleeds placed per series, cross-sections per slice).
    """
    wanted = set(bleeds)
    unknown = wanted - set(SUBTYPES)
    if unknown:
        raise ValueError(f"unknown bleed type(s) {sorted(unknown)}; choose from {SUBTYPES}")
    if not 64 <= size <= 4096:
        raise ValueError(f"size {size} outside 64..4096")
    style = style or STYLES["default"]
    if cut is not None and not wanted <= set(cut.factors):
        raise ValueError(f"bleeds {sorted(wanted - set(cut.factors))} do not cross this slice")
    if anatomy is None:
        anatomy = make_anatomy(rng)
    anatomy = _styled_anatomy(anatomy, style)
    # Every random draw below happens whatever the bleeds are, so the same seed renders the
    # same head with and without a given bleed, and one bleed's shape never depends on another.
    layout = _bleed_layout(rng) if cut is None else cut.layout
    sub_rngs = layout.rngs()

    geom = _geometry(anatomy, size)
    grids = None if cut is None else (lambda index, n: cut.fields.grid(index, n, cut.z_mm))
    canvas, hb, shell, w_inner = _background(rng, geom, anatomy, z, grids)
    image = rng.standard_normal((size, size), dtype=np.float32)

    base = canvas.ic.copy() if wanted else canvas.ic
    canvas.base = base
    sizes = {name: style.bleed_scale * (cut.factors[name][0] if cut else 1.0) for name in wanted}
    canvas.contrasts = {name: style.bleed_contrast * (cut.factors[name][1] if cut else 1.0) for name in wanted}
    place = None
    if cut is not None and "intraparenchymal" in wanted:
        place = (cut.centres["intraparenchymal"], style.bleed_scale)
    draw: dict[str, Callable[[], None]] = {
        "subarachnoid": lambda: _draw_subarachnoid(canvas, sub_rngs["subarachnoid"], layout.sah_phi, sizes["subarachnoid"]),
        "intraparenchymal": lambda: _draw_intraparenchymal(canvas, sub_rngs["intraparenchymal"], sizes["intraparenchymal"], place),
        "intraventricular": lambda: _draw_intraventricular(canvas, sub_rngs["intraventricular"], sizes["intraventricular"]),
        "subdural": lambda: _draw_subdural(canvas, sub_rngs["subdural"], layout.sdh_phi, sizes["subdural"]),
        "epidural": lambda: _draw_epidural(canvas, sub_rngs["epidural"], layout.edh_phi, sizes["epidural"]),
    }
    for name in _DRAW_ORDER:
        if name in wanted:
            draw[name]()
    if style.edge_mm > 0.0 and canvas.boxes:
        _soften_bleeds(canvas, style.edge_mm / geom.spacing)

    # What a bleed adds to the final picture, noise-free: after the kernel where there is one
    # (it is linear, so that is the kernel applied to the difference).
    kernel = style.blur_mm > 0.0 or style.sharpen > 0.0
    rise = None
    if kernel and canvas.boxes:
        rise = _kernel((canvas.ic - base) * w_inner, style, geom.spacing)
    visible: dict[str, tuple[Box, BoolImage]] = {}
    for name, box in canvas.boxes.items():
        code = SUBTYPES.index(name) + 1
        # Judged on the final picture: what a later bleed covered, or a rise too faint to
        # see, does not count; partial-volume pixels at the inner table do not either.
        rise_box = canvas.ic[box] - base[box] if rise is None else rise[box]
        mask = ((canvas.owner[box] == code)
                & (rise_box >= VISIBLE_RISE_HU)
                & (canvas.depth_inner[box] >= geom.spacing))
        visible[name] = (box, mask)

    image *= np.float32(anatomy["noise_sigma"] * style.noise_scale)
    image -= np.float32(1000.0)
    image[hb] += shell + np.float32(1000.0) + canvas.ic * w_inner
    if kernel:
        image = _kernel(image, style, geom.spacing)
    return image, hb, visible


def _soften_bleeds(canvas: _Canvas, sigma_px: float) -> None:
    """Partial volume at bleed edges: blur what the bleeds changed (``ic - base``)."""
    assert canvas.base is not None
    grow = int(math.ceil(3.0 * sigma_px)) + 1
    boxes = list(canvas.boxes.values())
    union = boxes[0]
    for box in boxes[1:]:
        union = _union_box(union, box)
    rows, cols = canvas.ic.shape
    region = (slice(max(union[0].start - grow, 0), min(union[0].stop + grow, rows)),
              slice(max(union[1].start - grow, 0), min(union[1].stop + grow, cols)))
    base = canvas.base[region]
    canvas.ic[region] = base + _gaussian_blur(canvas.ic[region] - base, sigma_px)


def render_slice(
    rng: np.random.Generator,
    size: int,
    bleeds: Iterable[str],
    z: float = 0.5,
    anatomy: dict[str, Any] | None = None,
    style: SynthStyle | str | None = None,
) -> FloatImage:
    """Render one axial head-CT slice in Hounsfield units.

    Parameters
    ----------
    rng
        Source of all randomness. The same generator state gives the same head, texture and
        noise whatever ``bleeds`` holds, so renders with and without a bleed can be compared.
    size
        Rows and columns of the square image.
    bleeds
        Subtypes to draw (any of :data:`ichscan.labels.SUBTYPES`; several allowed).
    z
        Slice position in the head, 0 (bottom) to 1 (top); scales the outline and ventricles.
    anatomy
        Per-study parameters from :func:`make_anatomy`; drawn from ``rng`` when ``None``.
    style
        A :class:`SynthStyle` or preset name; default: the original look.

    Returns
    -------
    numpy.ndarray
        float32 HU image of shape (size, size): air -1000, scalp, skull (tables ~1500 HU),
        grey/white matter 24-45 HU, CSF 0-15 HU, bleeds 55-85 HU, Gaussian noise.

    Notes
    -----
    A requested bleed is almost always visible; use :func:`render_slice_with_masks` to know
    for sure (its masks decide the labels written by :func:`generate`).
    """
    image, _, _ = _render(rng, size, bleeds, z, anatomy, resolve_style(style))
    return image


def render_slice_with_masks(
    rng: np.random.Generator,
    size: int,
    bleeds: Iterable[str],
    z: float = 0.5,
    anatomy: dict[str, Any] | None = None,
    style: SynthStyle | str | None = None,
) -> tuple[FloatImage, dict[str, BoolImage]]:
    """Like :func:`render_slice`, also returning where each bleed is visible.

    Returns
    -------
    image : numpy.ndarray
        The same image :func:`render_slice` returns for the same arguments.
    masks : dict of str to numpy.ndarray
        For every requested subtype, a boolean (size, size) mask of the pixels where that
        bleed is on top and raises the noise-free density by at least
        :data:`VISIBLE_RISE_HU` (after the style's kernel, if any). A bleed counts as present
        when :func:`is_visible` says so for its mask.
    """
    return _with_masks(size, *_render(rng, size, bleeds, z, anatomy, resolve_style(style)))


def _with_masks(
    size: int, image: FloatImage, hb: Box, visible: dict[str, tuple[Box, BoolImage]]
) -> tuple[FloatImage, dict[str, BoolImage]]:
    """Full-size visible-bleed masks from :func:`_render`'s boxes."""
    masks: dict[str, BoolImage] = {}
    for name in SUBTYPES:
        if name in visible:
            full = np.zeros((size, size), dtype=bool)
            box, mask = visible[name]
            full[hb][box] = mask
            masks[name] = full
    return image, masks


def _min_visible_px(spacing: float) -> int:
    return max(_MIN_VISIBLE_PX, math.ceil(MIN_VISIBLE_MM2 / (spacing * spacing)))


def is_visible(mask: NDArray[np.bool_], spacing: float) -> bool:
    """Whether a visible-pixel mask is big enough to label its bleed present.

    It must cover :data:`MIN_VISIBLE_MM2` at ``spacing`` mm per pixel, and at least 20
    pixels, so that coarse test images do not label a speck.
    """
    return int(np.count_nonzero(mask)) >= _min_visible_px(spacing)


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def _ds(value: float, decimals: int = 6) -> str:
    """Format a DS value within DICOM's 16 characters, without float noise."""
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def make_dataset(
    hu: NDArray[np.floating[Any]],
    *,
    convention: ScannerConvention,
    transfer_syntax: str,
    pixel_spacing: float,
    sop_instance_uid: str,
    study_instance_uid: str,
    series_instance_uid: str,
    frame_of_reference_uid: str,
    patient_id: str,
    patient_name: str,
    study_date: str,
    study_time: str = "120000",
    instance_number: int = 1,
    slice_location: float = 0.0,
    study_id: str = "1",
    accession_number: str = "",
    slice_thickness: float = SLICE_THICKNESS_MM,
    spacing_between_slices: float | None = None,
    window: tuple[float, float] = (40.0, 80.0),
) -> Dataset:
    """Build a CT Image Storage dataset holding ``hu`` stored per ``convention``.

    Parameters
    ----------
    hu
        2-D HU image (rounded and clipped to ``convention.hu_range`` when stored).
    convention
        Pixel storage convention (see :data:`SCANNER_CONVENTIONS`).
    transfer_syntax
        One of :data:`TRANSFER_SYNTAXES` (UID or keyword). Compressed syntaxes are encoded
        here; if no encoder is installed, or encoding fails, the dataset falls back to
        Explicit VR Little Endian (check ``ds.file_meta.TransferSyntaxUID``).
    pixel_spacing
        Row and column spacing, mm.
    sop_instance_uid, study_instance_uid, series_instance_uid, frame_of_reference_uid
        UIDs to write.
    patient_id, patient_name, study_date, study_time
        Patient and study identification (dates as ``YYYYMMDD``, times ``HHMMSS``).
    instance_number
        InstanceNumber (1-based).
    slice_location
        Patient z of the slice, mm (ImagePositionPatient[2] and SliceLocation).
    study_id, accession_number
        StudyID and AccessionNumber.
    slice_thickness, spacing_between_slices
        SliceThickness, mm, and SpacingBetweenSlices (written only when given).
    window
        WindowCenter and WindowWidth.

    Returns
    -------
    pydicom.dataset.Dataset
        A dataset with file meta, ready for :func:`save_dataset`.
    """
    if hu.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {hu.shape}")
    rows, cols = hu.shape
    ts = resolve_transfer_syntax(transfer_syntax)
    stored = convention.hu_to_stored(hu)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ICHSCAN_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = study_time
    ds.SeriesTime = study_time
    ds.ContentTime = study_time
    ds.AccessionNumber = accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "ichscan synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD WO CONTRAST (SYNTHETIC)"
    ds.SeriesDescription = f"AXIAL {_ds(slice_thickness, 3)}MM BRAIN (SYNTHETIC)"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = _ds(slice_thickness)
    if spacing_between_slices is not None:
        ds.SpacingBetweenSlices = _ds(spacing_between_slices)
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = study_id
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    # The image's top-left pixel centre, with the field of view centred on the isocentre.
    ds.ImagePositionPatient = [
        _ds(-(cols - 1) / 2.0 * pixel_spacing, 3),
        _ds(-(rows - 1) / 2.0 * pixel_spacing, 3),
        _ds(slice_location, 3),
    ]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(slice_location, 3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(pixel_spacing), _ds(pixel_spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = convention.bits_stored
    ds.HighBit = convention.high_bit
    ds.PixelRepresentation = convention.pixel_representation
    ds.WindowCenter = _ds(window[0], 3)
    ds.WindowWidth = _ds(window[1], 3)
    ds.RescaleIntercept = _ds(convention.rescale_intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = stored.tobytes()

    if ts in _COMPRESSED:
        plugin = _encoder_plugin(ts)
        if plugin is None:
            log.warning("no encoder for %s installed; writing Explicit VR Little Endian", ts.name)
        else:
            try:
                ds.compress(ts, stored, encoding_plugin=plugin, generate_instance_uid=False)
            except Exception as exc:  # an encoder bug must not stop a demo-data run
                log.warning("%s encoding failed (%s); writing Explicit VR Little Endian",
                            ts.name, exc)
                ds.PixelData = stored.tobytes()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ts
    return ds


def save_dataset(ds: Dataset, path: str | Path) -> None:
    """Write ``ds`` as a DICOM file (preamble, file meta, then the data set).

    Deflated Explicit VR Little Endian is written here with zlib level 1: pydicom deflates
    at the default level, far slower on noisy CT pixels for a file barely smaller.
    Everything else goes through :meth:`pydicom.dataset.Dataset.save_as`.
    """
    if ds.file_meta.TransferSyntaxUID != DeflatedExplicitVRLittleEndian:
        ds.save_as(path, enforce_file_format=True)
        return
    head = DicomBytesIO()
    head.write(ds.preamble or b"\x00" * 128)
    head.write(b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate, PS3.5 A.5
    deflated = compressor.compress(body.getvalue()) + compressor.flush()
    if len(deflated) % 2:
        deflated += b"\x00"
    Path(path).write_bytes(head.getvalue() + deflated)


# --------------------------------------------------------------------------------------------
# Generation of whole data sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthRecord:
    """One generated file and its ground truth.

    Attributes
    ----------
    path
        Where the file was written.
    image_id
        ``ID_`` plus 12 lowercase hex digits (RSNA style); the file stem in the ``rsna``
        layout. It, the UIDs and the pixels do not depend on the layout.
    sop_instance_uid, study_instance_uid, series_instance_uid, patient_id
        As written to the file.
    labels
        All six labels in :data:`ichscan.labels.LABELS` order, 0 or 1; ``any`` is the OR of
        the subtypes.
    transfer_syntax_uid
        The syntax actually written (Explicit VR Little Endian where an encoder was missing).
    convention
        Key of the pixel convention in :data:`SCANNER_CONVENTIONS`.
    size
        Rows (= columns).
    seed, study_index, slice_index, z, drawn
        What :func:`render_record` needs to redraw the slice: ``drawn`` lists the subtypes
        painted (a drawn bleed that ended up invisible would be labelled 0). ``z`` is the
        height in the head, 0 (bottom) to 1 (top).
    style
        The :class:`SynthStyle` it was drawn in.
    volumetric, z_mm, slice_mm, volume_bleeds
        For the volumetric mode: the slice's height in the head (mm, ``z *``
        :data:`~ichscan.synth_volume.HEAD_HEIGHT_MM`), the spacing of the series' slices and
        all 3-D bleeds of the series (those crossing this slice are in ``drawn``).
    """

    path: Path
    image_id: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    labels: dict[str, int]
    transfer_syntax_uid: str = ""
    convention: str = ""
    size: int = 0
    seed: int = 0
    study_index: int = 0
    slice_index: int = 0
    z: float = 0.5
    drawn: tuple[str, ...] = ()
    style: SynthStyle = field(default_factory=SynthStyle)
    volumetric: bool = False
    z_mm: float = 0.0
    slice_mm: float = SLICE_THICKNESS_MM
    volume_bleeds: tuple[VolumeBleed, ...] = ()

    def cross_sections(self) -> dict[str, tuple[float, float]]:
        """Volumetric mode: (size, contrast) factors of each bleed crossing this slice."""
        out = {}
        for bleed in self.volume_bleeds:
            factors = bleed.factors(self.z_mm, self.slice_mm)
            if factors is not None:
                out[bleed.name] = factors
        return out


def _study_rng(seed: int, study: int) -> np.random.Generator:
    return np.random.default_rng([seed, study, 0])


def _slice_rng(seed: int, study: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, study, 1 + index])


# Volumetric streams: four words ending in a non-zero one (numpy seeds [a, b, c] and
# [a, b, c, 0] alike), so none equals a study's or a slice's stream.
def _volume_plan_rng(seed: int, study: int) -> np.random.Generator:
    return np.random.default_rng([seed, study, 0, 7])


def _volume_fields(seed: int, study: int) -> VolumeFields:
    return VolumeFields(np.random.default_rng([seed, study, 0, 8]))


def _volume_layout(seed: int, study: int) -> _BleedLayout:
    return _bleed_layout(np.random.default_rng([seed, study, 0, 9]))


def _cut(record: SynthRecord, fields: VolumeFields | None = None, layout: _BleedLayout | None = None) -> _Cut:
    """A volumetric record's share of its series (fields and layout redrawn unless given)."""
    return _Cut(
        layout=layout or _volume_layout(record.seed, record.study_index),
        fields=fields or _volume_fields(record.seed, record.study_index),
        z_mm=record.z_mm,
        factors=record.cross_sections(),
        centres={b.name: b.z_mm / HEAD_HEIGHT_MM for b in record.volume_bleeds},
    )


def render_record(record: SynthRecord) -> tuple[FloatImage, dict[str, BoolImage]]:
    """Redraw a generated slice: its HU image (before storage) and visible-bleed masks.

    Useful as pixel-level ground truth (overlays, segmentation demos) and for tests.

    Returns
    -------
    image, masks
        As :func:`render_slice_with_masks` returns them; ``image`` equals the stored file's
        HU to within rounding and the convention's clipping.
    """
    anatomy = make_anatomy(_study_rng(record.seed, record.study_index))
    rng = _slice_rng(record.seed, record.study_index, record.slice_index)
    cut = _cut(record) if record.volumetric else None
    return _with_masks(record.size, *_render(rng, record.size, record.drawn, record.z, anatomy, record.style, cut))


def _uid(seed: int, *parts: object) -> str:
    # One source with separators: generate_uid concatenates its sources, so ("1", "23")
    # and ("12", "3") would otherwise give the same UID.
    return generate_uid(entropy_srcs=["/".join(["ichscan.synth", str(seed), *map(str, parts)])])


def _image_id(seed: int, study: int, index: int) -> str:
    digest = hashlib.blake2b(f"ichscan.synth/{seed}/{study}/{index}".encode(), digest_size=16)
    return "ID_" + digest.hexdigest()[:12]


def _choose_bleeds(rng: np.random.Generator, deck: list[str]) -> list[str]:
    """1-3 subtypes: the next card of a shuffled deck first, then random others.

    Dealing the first subtype from a deck spreads all five evenly even over a few slices.
    """
    if not deck:
        deck.extend(rng.permutation(list(SUBTYPES)).tolist())
    first = deck.pop()
    extra = int(rng.choice([0, 1, 2], p=[0.5, 0.3, 0.2]))
    others = [s for s in SUBTYPES if s != first]
    chosen = [first, *rng.choice(others, size=extra, replace=False).tolist()]
    return [s for s in SUBTYPES if s in chosen]


def _normalise_options(
    options: Iterable[str] | str | None, everything: Sequence[Any], resolve: Callable[[str], Any]
) -> list[Any]:
    if options is None:
        return list(everything)
    if isinstance(options, str):
        options = [options]
    chosen = [resolve(o) for o in options]
    if not chosen:
        raise ValueError("empty selection")
    return list(dict.fromkeys(chosen))


def _resolve_convention(name: str) -> ScannerConvention:
    try:
        return SCANNER_CONVENTIONS[str(name)]
    except KeyError:
        raise ValueError(
            f"unknown scanner convention {name!r}; choose from: {', '.join(SCANNER_CONVENTIONS)}"
        ) from None


@dataclass(frozen=True)
class _Series:
    """A volumetric series' plan: slice heights (mm), spacing, 3-D bleeds, shared parts."""

    positions: list[float]
    spacing: float
    bleeds: list[VolumeBleed]
    layout: _BleedLayout
    fields: VolumeFields
    centres: dict[str, float]


def _plan_series(seed: int, study: int, slices: int, style: SynthStyle, positive_fraction: float) -> _Series:
    rng = _volume_plan_rng(seed, study)
    positions, spacing = stack_positions(rng, slices, style.slice_mm)
    positive = rng.random() < positive_fraction
    # The first bleed of each run of five studies is dealt from one shuffled deck, so the
    # subtypes stay balanced over a few studies (as the slice deck does in the other mode).
    deck = np.random.default_rng([seed, study // 5, 0, 10]).permutation(len(SUBTYPES))
    names = _choose_bleeds(rng, [SUBTYPES[int(deck[study % 5])]]) if positive else []
    bleeds = plan_bleeds(rng, names, positions, style.bleed_scale)
    return _Series(
        positions=positions,
        spacing=spacing,
        bleeds=bleeds,
        layout=_volume_layout(seed, study),
        fields=_volume_fields(seed, study),
        centres={b.name: b.z_mm / HEAD_HEIGHT_MM for b in bleeds},
    )


def generate(
    out_dir: str | Path,
    studies: int,
    slices: int,
    seed: int,
    layout: str = "pacs",
    transfer_syntaxes: Iterable[str] | str | None = None,
    size: int | None = None,
    positive_fraction: float = 0.5,
    conventions: Iterable[str] | str | None = None,
    style: SynthStyle | str | None = None,
    volumetric: bool = False,
) -> list[SynthRecord]:
    """Write a synthetic head-CT data set and return its ground truth.

    Parameters
    ----------
    out_dir
        Output folder (created if missing). Existing files with the same names are replaced.
    studies
        Number of studies (one patient, one series each).
    slices
        Slices per study, ``style.slice_mm`` (5 mm) apart.
    seed
        Non-negative integer; the same seed (and options) writes byte-identical files with
        the same library versions on the same platform (float rounding may differ elsewhere).
    layout
        ``"pacs"``: ``out_dir/<PatientID>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``.
        ``"rsna"``: ``out_dir/stage_2_train/ID_<hex>.dcm`` plus ``out_dir/stage_2_train.csv``
        (``ID,Label`` then six rows per image, ``ID_<hex>_<label>,<0|1>``, RSNA 2019 format).
    transfer_syntaxes
        Restrict the per-study choice (UIDs or keywords such as ``"ExplicitVRLittleEndian"``);
        default: all of :data:`TRANSFER_SYNTAXES`. A syntax whose encoder is missing is written
        as Explicit VR Little Endian instead.
    size
        Force every image to ``size`` x ``size``; default: a per-study size in 400-640.
    positive_fraction
        Fraction of slices with at least one bleed (per study, rounded at random). Positive
        slices form one contiguous run per study, as a real bleed spans neighbouring slices.
        In the volumetric mode: the chance that a study has bleeds (1-3 of them, each
        reaching over part of the series).
    conventions
        Restrict the per-study pixel conventions (names in :data:`SCANNER_CONVENTIONS`);
        default: the style's, else all.
    style
        A :class:`SynthStyle` or the name of a preset in :data:`STYLES`; default: the
        original look (the same bytes as before styles existed).
    volumetric
        Each series is one 3-D head: slices at increasing heights a constant distance apart
        (SpacingBetweenSlices written), smooth anatomy from slice to slice, and 3-D bleeds
        that span neighbouring slices and fade at their ends (see :mod:`ichscan.synth_volume`
        for the exact rule that labels a slice).

    Returns
    -------
    list of SynthRecord
        One per file, in writing order (study by study, slice by slice).

    Notes
    -----
    Each study and slice has its own random stream derived from ``(seed, study, slice)``,
    so asking for more studies adds studies without changing the first ones. Labels are
    exact: a subtype is 1 iff it was drawn and enough of it (:func:`is_visible`) stands out
    by :data:`VISIBLE_RISE_HU` or more in the noise-free image (after the style's kernel).
    With about 60 mm2 for the smallest bleeds at 512 pixels, drawn bleeds are in practice
    always visible in the default style; faint or small styles and the ends of volumetric
    bleeds do leave some drawn bleeds below the rule, labelled 0.
    """
    if layout not in ("pacs", "rsna"):
        raise ValueError(f"layout must be 'pacs' or 'rsna', not {layout!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    if studies < 0 or slices < 1:
        raise ValueError("need studies >= 0 and slices >= 1")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction {positive_fraction} is outside [0, 1]")
    if size is not None and not 64 <= size <= 4096:
        raise ValueError(f"size {size} outside 64..4096")
    seed = int(seed)
    style = resolve_style(style)
    syntaxes = _normalise_options(transfer_syntaxes, TRANSFER_SYNTAXES, resolve_transfer_syntax)
    if conventions is None and style.conventions:
        conventions = style.conventions
    convs = _normalise_options(conventions, list(SCANNER_CONVENTIONS.values()), _resolve_convention)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "rsna":
        (out / "stage_2_train").mkdir(exist_ok=True)

    records: list[SynthRecord] = []
    seen_ids: set[str] = set()
    for study in range(studies):
        srng = _study_rng(seed, study)
        anatomy = make_anatomy(srng)
        drawn_size = int(srng.integers(400, 641))
        study_size = size if size is not None else drawn_size
        convention = convs[int(srng.integers(len(convs)))]
        syntax = syntaxes[int(srng.integers(len(syntaxes)))]
        n_pos = int(math.floor(positive_fraction * slices + srng.random()))
        n_pos = min(n_pos, slices)
        first_pos = int(srng.integers(0, slices - n_pos + 1))
        study_day = date(2015, 1, 1) + timedelta(days=int(srng.integers(0, 3650)))
        study_date = study_day.strftime("%Y%m%d")
        study_time = "".join(f"{int(srng.integers(0, n)):02d}" for n in (24, 60, 60))
        z_offset = float(srng.integers(-200, 0))
        if volumetric:
            series = _plan_series(seed, study, slices, style, positive_fraction)
        else:
            # Bleeds come from the study's stream, so each slice's stream only draws pixels.
            deck: list[str] = []
            plan = [
                _choose_bleeds(srng, deck) if first_pos <= index < first_pos + n_pos else []
                for index in range(slices)
            ]

        study_uid = _uid(seed, "study", study)
        series_uid = _uid(seed, "series", study)
        frame_uid = _uid(seed, "frame", study)
        patient_id = f"PHANTOM-{seed}-{study}"
        spacing = pixel_spacing_mm(anatomy, study_size, style)
        for index in range(slices):
            rng = _slice_rng(seed, study, index)
            if volumetric:
                z_mm = series.positions[index]
                z = z_mm / HEAD_HEIGHT_MM
                factors = {
                    b.name: f for b in series.bleeds if (f := b.factors(z_mm, series.spacing)) is not None
                }
                cut = _Cut(series.layout, series.fields, z_mm, factors, series.centres)
                bleeds = [name for name in SUBTYPES if name in factors]
                slice_location = z_offset + series.spacing * index
            else:
                bleeds = plan[index]
                z = 0.5 if slices == 1 else 0.2 + 0.65 * index / (slices - 1)
                z_mm, cut = 0.0, None
                slice_location = z_offset + style.slice_mm * index
            image, _, visible = _render(rng, study_size, bleeds, z, anatomy, style, cut)
            present = {name for name, (_, mask) in visible.items() if is_visible(mask, spacing)}
            labels = {name: int(name in present) for name in SUBTYPES}
            labels["any"] = int(any(labels[name] for name in SUBTYPES))
            labels = {name: labels[name] for name in LABELS}

            sop_uid = _uid(seed, "instance", study, index)
            image_id = _image_id(seed, study, index)
            if image_id in seen_ids:  # pragma: no cover - 48-bit hash collision
                raise RuntimeError(f"image id collision for {image_id}; use another seed")
            seen_ids.add(image_id)
            ds = make_dataset(
                image,
                convention=convention,
                transfer_syntax=syntax,
                pixel_spacing=spacing,
                sop_instance_uid=sop_uid,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                frame_of_reference_uid=frame_uid,
                patient_id=patient_id,
                patient_name=f"Phantom^{study}",
                study_date=study_date,
                study_time=study_time,
                instance_number=index + 1,
                slice_location=slice_location,
                study_id=str(study + 1),
                accession_number=f"SYN{seed % 100000:05d}{study:05d}",
                slice_thickness=series.spacing if volumetric else style.slice_mm,
                spacing_between_slices=series.spacing if volumetric else None,
                window=style.window,
            )
            if layout == "pacs":
                folder = out / patient_id / study_uid / series_uid
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{sop_uid}.dcm"
            else:
                path = out / "stage_2_train" / f"{image_id}.dcm"
            save_dataset(ds, path)
            records.append(
                SynthRecord(
                    path=path,
                    image_id=image_id,
                    sop_instance_uid=sop_uid,
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    patient_id=patient_id,
                    labels=labels,
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    convention=convention.name,
                    size=study_size,
                    seed=seed,
                    study_index=study,
                    slice_index=index,
                    z=z,
                    drawn=tuple(bleeds),
                    style=style,
                    volumetric=volumetric,
                    z_mm=z_mm,
                    slice_mm=series.spacing if volumetric else style.slice_mm,
                    volume_bleeds=tuple(series.bleeds) if volumetric else (),
                )
            )

    if layout == "rsna":
        lines = ["ID,Label"]
        for rec in records:
            lines.extend(f"{rec.image_id}_{label},{rec.labels[label]}" for label in LABELS)
        (out / "stage_2_train.csv").write_text("\n".join(lines) + "\n", encoding="ascii")
    return records
