"""The volumetric mode of the phantom generator: one 3-D head per series.

In this mode (``generate(..., volumetric=True)``) the slices of a series are cuts through
one head at increasing z, a constant distance apart, and every bleed is a 3-D blob with a
centre and a half-length along z. What this module decides:

- **Stack**: where the series' slices lie in the head (:func:`stack_positions`); the head is
  :data:`HEAD_HEIGHT_MM` tall and the stack stays within its middle 90%.
- **Bleeds in z** (:class:`VolumeBleed`): a bleed with half-length ``h`` centred at ``zc`` is
  cut by a slice at ``z`` when ``|z - zc| < h``. Its cross-section there is the 2-D bleed
  shrunk in-plane by ``sqrt(1 - ((z - zc) / h)^2)`` (an ellipsoid's profile), and its density
  difference from the tissue it covers fades linearly to nothing over the last slice
  thickness before each end (partial volume of the slab): contrast factor
  ``clip((h - |z - zc|) / thickness, 0, 1)``.
- **Labels**: a slice is positive for a subtype iff that subtype's cross-section is drawn on
  it and passes the one visibility rule of the generator (:func:`ichscan.synth.is_visible`
  on the pixels that are on top and at least ``VISIBLE_RISE_HU`` brighter than without any
  bleed, noise-free). So the faint ends of a bleed may be drawn on a slice labelled 0, and a
  slice labelled 1 may show only a faint, small cross-section: its neighbours show more.
- **Smooth fields in z** (:class:`VolumeFields`): brain texture and the meander of the sulci
  vary smoothly from slice to slice instead of being drawn afresh, so neighbouring slices
  show the same anatomy, shifted; pixel noise stays independent per slice, as in CT.

Only numpy; nothing here renders pixels (that is :mod:`ichscan.synth`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "BLEED_HALF_LENGTH_MM",
    "HEAD_HEIGHT_MM",
    "VolumeBleed",
    "VolumeFields",
    "plan_bleeds",
    "stack_positions",
]

#: Height (mm) of the phantom head: the renderer's z = 0 ... 1 spans this many mm.
HEAD_HEIGHT_MM = 180.0
#: Ranges (mm) of each subtype's half-length along z, before the style's ``bleed_scale``.
#: The smallest, 10 mm, spans at least three 5 mm slices at full size.
BLEED_HALF_LENGTH_MM = {
    "epidural": (12.0, 25.0),
    "intraparenchymal": (10.0, 20.0),
    "intraventricular": (10.0, 25.0),
    "subarachnoid": (10.0, 25.0),
    "subdural": (20.0, 45.0),
}
#: The stack of slices stays within this fraction of the head's height, centred.
_STACK_COVER = 0.9


def stack_positions(rng: np.random.Generator, slices: int, slice_mm: float) -> tuple[list[float], float]:
    """Positions (mm from the bottom of the head) of a series' slices, and their spacing.

    The spacing is ``slice_mm`` unless that many slices would not fit in the middle 90% of
    the head; then it shrinks so that they do (to whole micrometres; the files carry the
    spacing actually used).
    One draw from ``rng``: where the stack starts.
    """
    room = _STACK_COVER * HEAD_HEIGHT_MM
    spacing = slice_mm
    if slices > 1 and slice_mm * (slices - 1) > room:
        # Whole micrometres, so positions written with 3 decimals stay exactly evenly spaced.
        spacing = math.floor(room / (slices - 1) * 1000.0) / 1000.0
    span = spacing * (slices - 1)
    low = 0.5 * (1.0 - _STACK_COVER) * HEAD_HEIGHT_MM
    start = low + float(rng.uniform(0.0, 1.0)) * (room - span)
    return [start + spacing * i for i in range(slices)], spacing


@dataclass(frozen=True)
class VolumeBleed:
    """One 3-D bleed of a series: its subtype, centre and half-length along z (mm)."""

    name: str
    z_mm: float
    half_mm: float

    def factors(self, z_mm: float, thickness_mm: float) -> tuple[float, float] | None:
        """(in-plane size factor, contrast factor) of the cross-section at ``z_mm``.

        ``None`` where the slice misses the bleed (``|z - zc| >= half``).
        """
        dz = abs(z_mm - self.z_mm)
        if dz >= self.half_mm:
            return None
        t = dz / self.half_mm
        size = math.sqrt(1.0 - t * t)
        contrast = min(1.0, (self.half_mm - dz) / thickness_mm)
        return size, contrast


def plan_bleeds(
    rng: np.random.Generator, names: list[str], positions: list[float], bleed_scale: float
) -> list[VolumeBleed]:
    """Centre and half-length of each bleed: centres in the middle 70% of the stack."""
    lo, hi = positions[0], positions[-1]
    out = []
    for name in names:
        short, long = BLEED_HALF_LENGTH_MM[name]
        half = float(rng.uniform(short, long)) * bleed_scale
        centre = lo + float(rng.uniform(0.15, 0.85)) * (hi - lo)
        out.append(VolumeBleed(name, centre, half))
    return out


#: In-plane grid sizes of the renderer's smooth random fields (texture, fine texture, sulcal
#: meander), in the order the renderer asks for them.
_FIELD_GRIDS = (9, 40, 28)
#: Nominal field of view (mm) used to make the fields' z correlation match their in-plane one.
_NOMINAL_FOV_MM = 220.0


class VolumeFields:
    """Smooth random fields of one head, continuous in z.

    The renderer draws each smooth field as an ``n x n`` grid of normal values upsampled
    to the image; here each such grid is a stack of planes ``220 / (n - 1)`` mm apart in z
    (the in-plane grid step of a typical field of view), interpolated linearly and rescaled
    to unit variance, so the field at any z looks like a fresh draw, yet neighbours agree.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self._steps: list[float] = []
        self._planes: list[NDArray[np.float32]] = []
        for n in _FIELD_GRIDS:
            step = _NOMINAL_FOV_MM / (n - 1)
            count = int(math.ceil(HEAD_HEIGHT_MM / step)) + 2
            self._steps.append(step)
            self._planes.append(rng.standard_normal((count, n, n)).astype(np.float32))

    def grid(self, index: int, n: int, z_mm: float) -> NDArray[np.float32]:
        """The ``index``-th field's ``n x n`` grid at height ``z_mm``."""
        planes = self._planes[index]
        if planes.shape[1] != n:
            raise ValueError(f"field {index} has {planes.shape[1]}-point grids, not {n}")
        pos = min(max(z_mm / self._steps[index], 0.0), planes.shape[0] - 1.000001)
        i = int(math.floor(pos))
        a = pos - i
        norm = math.sqrt((1.0 - a) ** 2 + a * a)
        return ((np.float32((1.0 - a) / norm) * planes[i]) + np.float32(a / norm) * planes[i + 1]).astype(np.float32)
