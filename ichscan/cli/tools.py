"""Utility commands: ``synth``, ``predict`` and ``plugins``."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ichscan.cli.options import CONTEXT_SETTINGS, device_option, plugin_manager, saliency_option, threshold_option, with_options
from ichscan.labels import LABELS
from ichscan.synth_style import STYLES, describe_styles, resolve_style

log = logging.getLogger("ichscan")

SYNTH_SYNTAXES = {
    "explicit": "ExplicitVRLittleEndian",
    "implicit": "ImplicitVRLittleEndian",
    "deflated": "DeflatedExplicitVRLittleEndian",
    "rle": "RLELossless",
    "jpeg2000": "JPEG2000Lossless",
}


def _parse_window(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        center, width = (float(part) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not CENTER/WIDTH, e.g. 40/80") from None
    return center, width


_STYLE_EPILOG = "\b\nStyles (--style NAME; the options above override single fields):\n" + "\n".join(
    f"  {line}" for line in describe_styles().splitlines()
)


@click.command(context_settings=CONTEXT_SETTINGS, epilog=_STYLE_EPILOG)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--studies", type=click.IntRange(1, 100000), default=4, help="Number of studies (patients).")
@click.option("--slices", type=click.IntRange(1, 1000), default=10, help="Slices per study.")
@click.option("--seed", type=int, default=0, help="Random seed; the same seed gives the same files.")
@click.option("--layout", type=click.Choice(["pacs", "rsna"]), default="pacs", help="pacs: Patient/Study/Series/*.dcm; rsna: stage_2_train/ID_*.dcm + stage_2_train.csv.")
@click.option("--size", type=click.IntRange(64, 2048), default=None, help="Image size in pixels (square).  [default: varies per study, 400-640]")
@click.option(
    "--transfer-syntax",
    "transfer_syntaxes",
    multiple=True,
    type=click.Choice(list(SYNTH_SYNTAXES)),
    help="Restrict transfer syntaxes (repeatable).  [default: all, varied per study]",
)
@click.option("--positive-fraction", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True, help="Fraction of slices with a bleed; with --volumetric, of studies with bleeds.")
@click.option("--volumetric", is_flag=True, help="Each series is one 3-D head: slices at increasing z, constant spacing, bleeds spanning neighbouring slices and fading at their ends. A slice is positive for a subtype iff the bleed's cross-section on it passes the visibility rule (>= 20 HU brighter than without it, noise-free, over >= 10 mm2).")
@click.option("--style", "style_name", type=click.Choice(list(STYLES)), default="default", show_default=True, help="Named look (listed below); 'default' is the original look, byte for byte.")
@click.option("--head-scale", type=float, default=None, help="Head size in the field of view relative to the default (0.3-1.15; 0.7: about half the area).")
@click.option("--bleed-scale", type=float, default=None, help="Bleed size (lengths, arcs, thicknesses) relative to the default (0.2-2).")
@click.option("--bleed-contrast", type=float, default=None, help="Multiplies each bleed's density difference from the tissue it covers (0.1-3; 1: bleeds at 55-85 HU).")
@click.option("--edge-mm", type=float, default=None, help="Soft bleed edges (partial volume): Gaussian sigma in mm of the bleed's density step (0: hard).")
@click.option("--noise-scale", type=float, default=None, help="Multiplies the per-study noise (sigma 3-8 HU), before the kernel (0-10).")
@click.option("--blur-mm", type=float, default=None, help="Soft reconstruction kernel: Gaussian blur of the image, sigma in mm (0: none).")
@click.option("--sharpen", type=float, default=None, help="Sharp reconstruction kernel: unsharp-mask amount with a 1 mm Gaussian (0: none; 1: about a bone kernel).")
@click.option("--convention", "conventions", multiple=True, help="Pixel storage a study picks from (repeatable): signed16 (signed, RescaleIntercept 0), signed16_offset (signed, -1024), unsigned16 and unsigned12 (unsigned, -1024), rsna12_quirk (HU mod 4096 in 12 unsigned bits, the RSNA 2019 wrap).  [default: the style's, else all]")
@click.option("--window", callback=_parse_window, default=None, metavar="CENTER/WIDTH", help="WindowCenter/WindowWidth written to the files.  [default: the style's, 40/80]")
@click.option("--slice-mm", type=float, default=None, help="Slice spacing and SliceThickness in mm.  [default: the style's, 5]")
def synth(
    out_dir: Path,
    studies: int,
    slices: int,
    seed: int,
    layout: str,
    size: int | None,
    transfer_syntaxes: tuple[str, ...],
    positive_fraction: float,
    volumetric: bool,
    style_name: str,
    head_scale: float | None,
    bleed_scale: float | None,
    bleed_contrast: float | None,
    edge_mm: float | None,
    noise_scale: float | None,
    blur_mm: float | None,
    sharpen: float | None,
    conventions: tuple[str, ...],
    window: tuple[float, float] | None,
    slice_mm: float | None,
) -> None:
    """Generate synthetic head-CT phantom slices with exact hemorrhage labels.

    Demo and test data: skull, brain with texture, ventricles and sulci, noise, and the
    five bleed types in their typical shapes and places; scanner conventions vary per
    study. Not real patients. A style changes the look (train on one, evaluate on another).
    """
    from ichscan.synth import generate

    ts = [SYNTH_SYNTAXES[name] for name in transfer_syntaxes] or None
    try:
        style = resolve_style(
            style_name, head_scale=head_scale, bleed_scale=bleed_scale, bleed_contrast=bleed_contrast,
            edge_mm=edge_mm, noise_scale=noise_scale, blur_mm=blur_mm, sharpen=sharpen,
            conventions=conventions or None, window=window, slice_mm=slice_mm,
        )
        records = generate(
            out_dir, studies=studies, slices=slices, seed=seed, layout=layout, transfer_syntaxes=ts, size=size,
            positive_fraction=positive_fraction, style=style, volumetric=volumetric,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write phantoms to {out_dir}: {exc.strerror or exc}") from None
    positives = sum(r.labels["any"] for r in records)
    counts = ", ".join(f"{label} {sum(r.labels[label] for r in records)}" for label in LABELS[:-1])
    mode = "volumetric series, " if volumetric else ""
    click.echo(f"wrote {len(records)} slices ({positives} positive: {counts}) to {out_dir} ({mode}style: {style_name}, {style.describe()})")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Checkpoint.  [default: the bundled weights]")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Save the image with the prediction drawn on it (PNG).")
@with_options(threshold_option("Decision thresholds, as for 'batch': '0.4' or 'any=0.3,subdural=0.4'."))
@with_options(
    device_option(),
    saliency_option("For a positive slice: print where the heat map (Grad-CAM) of the top finding peaks and draw it on the --save image."),
)
@click.pass_context
def predict(
    ctx: click.Context, file: Path, weights: Path | None, save: Path | None, thresholds: dict[str, float] | None, device: str, saliency: bool
) -> None:
    """Screen one DICOM file and print what was found.

    With --saliency, a positive slice's heat map is drawn on the --save image and its
    peak is printed.
    """
    from ichscan.api import screen_file
    from ichscan.models import ModelError
    from ichscan.overlay import render_overlay

    try:
        result, image, loaded = screen_file(
            file, weights=weights, thresholds=thresholds, pm=plugin_manager(ctx), device=device, saliency=saliency
        )
    except (ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if loaded.notice():
        log.warning("%s", loaded.notice())
    probs = result.probabilities
    verdict = f"POSITIVE: {result.top_label} {result.top_probability:.3f}" if result.is_positive else "negative"
    click.echo(f"{file}: {verdict} (any {probs['any']:.3f})")
    for label in LABELS:
        mark = "*" if result.positive[label] else " "
        click.echo(f"  {mark} {label:17s} {probs[label]:.3f}")
    if result.heatmap is not None:
        row, column = heatmap_peak(result.heatmap, image.shape)
        click.echo(f"  saliency: the heat map of {result.top_label} peaks at row {row}, column {column} of {image.shape[0]}x{image.shape[1]}")
    if save is not None:
        try:
            render_overlay(image, result).save(save)
        except (OSError, ValueError) as exc:  # a missing folder; an extension Pillow does not know
            raise click.ClickException(f"cannot save {save}: {getattr(exc, 'strerror', None) or exc}") from None
        click.echo(f"-> {save}")


def heatmap_peak(heatmap, shape: tuple[int, ...]) -> tuple[int, int]:
    """Row and column, in an image of ``shape``, of the centre of a heat map's hottest cell."""
    import numpy as np

    h, w = heatmap.shape
    r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int((r + 0.5) * shape[0] / h), int((c + 0.5) * shape[1] / w)


@click.command("plugins", context_settings=CONTEXT_SETTINGS)
@click.pass_context
def plugins_command(ctx: click.Context) -> None:
    """List loaded plugins, where each comes from, and the hooks it implements."""
    from ichscan.models import model_factories
    from ichscan.plugins import describe_plugins

    pm = plugin_manager(ctx)
    for info in describe_plugins(pm):
        click.echo(f"{info.name}  [{info.source}]")
        for hook in info.hooks:
            click.echo(f"    {hook}")
    click.echo("models: " + ", ".join(sorted(model_factories(pm))))
