"""Looks of the synthetic phantoms: :class:`SynthStyle` and its named presets.

A style changes how :func:`ichscan.synth.generate` draws and stores its phantoms, never what
the labels mean: a model can be trained on one style and judged on another, which is the
project's quality bar (a model must hold up on a look it was not tuned to).

The default style is the generator's original look, exactly: with it, the same seed writes
the same bytes as before styles existed. Every field is a plain number (or tuple), so a style
is hashable, printable and easy to record next to a data set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["STYLES", "SynthStyle", "describe_styles", "resolve_style"]


@dataclass(frozen=True)
class SynthStyle:
    """How the phantoms look. The defaults are the generator's original look.

    Attributes
    ----------
    head_scale
        Size of the head within the field of view, relative to the default (where the head's
        long axis spans 76-84% of it). 0.7 gives a head 70% as wide in pixels, about half the
        area. The head stays the same in mm: the field of view (pixel spacing) grows instead.
    bleed_scale
        In-plane size of every bleed relative to the default (epidural 8-20 mm thick, subdural
        2-12 mm, intraparenchymal radius 6-16 mm...): lengths, arcs and thicknesses scale.
    bleed_contrast
        Multiplies each bleed's density difference from the bleed-free tissue it covers
        (noise-free). 1.0: bleeds at 55-85 HU over 0-45 HU tissue; 0.6 makes a 60 HU bleed
        over 30 HU white matter 48 HU. A bleed too faint to pass the visibility rule of
        :func:`ichscan.synth.is_visible` is labelled absent: labels stay exact.
    edge_mm
        Partial volume at bleed edges: the bleed's density difference is blurred with a
        Gaussian of this sigma (mm), so edges ramp instead of stepping. 0: hard edges.
    noise_scale
        Multiplies the per-study Gaussian noise (sigma 3-8 HU by default), before the kernel.
    blur_mm
        Reconstruction kernel, soft part: Gaussian blur of the whole image (signal and noise),
        sigma in mm. 0: none (the default, a sharp-ish "standard" look).
    sharpen
        Reconstruction kernel, sharp part: unsharp-mask amount with a 1 mm Gaussian, applied
        after ``blur_mm``. 0: none; 1 roughly a bone kernel's edge overshoot and noise.
    conventions
        Names of the pixel-storage conventions (``ichscan.synth.SCANNER_CONVENTIONS``) a study
        picks from: signed/unsigned storage, intercept 0 or -1024, the RSNA 12-bit wrap.
        Empty: all of them.
    window
        WindowCenter and WindowWidth written to every file.
    slice_mm
        Distance between slice centres and SliceThickness, mm (5 mm as in RSNA 2019).
    """

    head_scale: float = 1.0
    bleed_scale: float = 1.0
    bleed_contrast: float = 1.0
    edge_mm: float = 0.0
    noise_scale: float = 1.0
    blur_mm: float = 0.0
    sharpen: float = 0.0
    conventions: tuple[str, ...] = ()
    window: tuple[float, float] = (40.0, 80.0)
    slice_mm: float = 5.0

    def __post_init__(self) -> None:
        # Normalise the sequences (a list from JSON or the CLI) so styles stay hashable.
        object.__setattr__(self, "conventions", tuple(str(c) for c in self.conventions))
        object.__setattr__(self, "window", tuple(float(w) for w in self.window))
        checks = {
            "head_scale": 0.3 <= self.head_scale <= 1.15,
            "bleed_scale": 0.2 <= self.bleed_scale <= 2.0,
            "bleed_contrast": 0.1 <= self.bleed_contrast <= 3.0,
            "edge_mm": 0.0 <= self.edge_mm <= 10.0,
            "noise_scale": 0.0 <= self.noise_scale <= 10.0,
            "blur_mm": 0.0 <= self.blur_mm <= 10.0,
            "sharpen": 0.0 <= self.sharpen <= 5.0,
            "slice_mm": 0.5 <= self.slice_mm <= 20.0,
        }
        limits = {
            "head_scale": "0.3..1.15 (a larger head leaves the field of view)",
            "bleed_scale": "0.2..2",
            "bleed_contrast": "0.1..3",
            "edge_mm": "0..10",
            "noise_scale": "0..10",
            "blur_mm": "0..10",
            "sharpen": "0..5",
            "slice_mm": "0.5..20",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"style {name} = {getattr(self, name)!r} is outside {limits[name]}")
        if len(self.window) != 2 or self.window[1] <= 0:
            raise ValueError(f"style window must be (center, width > 0), not {self.window!r}")

    def replace(self, **changes: Any) -> SynthStyle:
        """A copy with some fields changed (``None`` values are ignored, as from a CLI)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def describe(self) -> str:
        """The fields that differ from the default, as ``name=value`` (``"default look"``)."""
        default = SynthStyle()
        parts = [
            f"{f.name}={_fmt(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        ]
        return ", ".join(parts) or "default look"


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


#: Named styles. ``small-faint`` is the look of an independent phantom generator (heads that
#: fill less of the field, small faint soft-edged bleeds, more noise, a soft kernel, unsigned
#: and RSNA-wrapped storage); ``sharp-large`` goes the other way.
STYLES: Mapping[str, SynthStyle] = {
    "default": SynthStyle(),
    "small-faint": SynthStyle(
        head_scale=0.7,
        bleed_scale=0.65,
        bleed_contrast=0.7,
        edge_mm=1.0,
        noise_scale=1.8,
        blur_mm=0.7,
        conventions=("unsigned16", "unsigned12", "rsna12_quirk"),
        window=(50.0, 100.0),
    ),
    "sharp-large": SynthStyle(
        head_scale=1.08,
        bleed_scale=1.3,
        bleed_contrast=1.2,
        noise_scale=1.2,
        sharpen=0.8,
        conventions=("signed16", "signed16_offset"),
        window=(40.0, 120.0),
    ),
}


def resolve_style(style: SynthStyle | str | None = None, **overrides: Any) -> SynthStyle:
    """A style from a preset name (or a style, or ``None`` for the default) plus overrides.

    Raises
    ------
    ValueError
        For an unknown preset name or an out-of-range field.
    """
    if style is None:
        base = STYLES["default"]
    elif isinstance(style, SynthStyle):
        base = style
    else:
        try:
            base = STYLES[str(style)]
        except KeyError:
            raise ValueError(f"unknown style {style!r}; choose from: {', '.join(STYLES)}") from None
    return base.replace(**overrides)


def describe_styles() -> str:
    """One line per preset: its name and how it differs from the default."""
    return "\n".join(f"{name}: {style.describe()}" for name, style in STYLES.items())
