"""Click options shared by the commands that screen (batch, watch, serve-scp)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import click

from ichscan.labels import parse_thresholds

OVERLAYS_FOR = ("positive", "all", "none")
DEVICES = ("auto", "cpu", "cuda")


def parse_threshold_option(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, float] | None:
    if value is None:
        return None
    try:
        return parse_thresholds(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _apply(options: list[Callable]) -> Callable:
    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def output_options(out_help: str) -> Callable:
    """--out, --studies-out, --overlays, --overlays-for."""
    return _apply(
        [
            click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("results.csv"), help=out_help),
            click.option(
                "--studies-out",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="Per-study summary CSV.  [default: <out stem>_studies.csv beside --out]",
            ),
            click.option(
                "--overlays",
                "overlays_dir",
                type=click.Path(file_okay=False, path_type=Path),
                default=None,
                help="Folder for overlay PNGs.  [default: overlays/ beside --out]",
            ),
            click.option("--overlays-for", type=click.Choice(OVERLAYS_FOR), default="positive", help="Which slices get an overlay PNG."),
        ]
    )


model_options = _apply(
    [
        click.option(
            "--weights",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="Checkpoint from 'ichscan train'.  [default: the bundled weights]",
        ),
        click.option("--model", "model_name", default=None, help="Registered model name; with --weights it must be the checkpoint's model.  [default: simplecnn]"),
        click.option(
            "--threshold",
            "thresholds",
            metavar="THRESHOLDS",
            callback=parse_threshold_option,
            default=None,
            help="Decision threshold: '0.4' for all labels or 'any=0.3,subdural=0.4'. Overrides the checkpoint's.  "
            "[default: the checkpoint's, else 0.5]",
        ),
        click.option("--device", type=click.Choice(DEVICES), default="auto", help="Where the model runs; auto takes CUDA when present."),
        click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help="Images per model batch.  [default: 32 on CPU; on a GPU 256, fewer if its free memory is short]"),
        click.option(
            "--workers",
            type=click.IntRange(0, 256),
            default=None,
            help="Decode worker processes; 0 decodes in the main process.  [default: one per core on CPU, all cores but one with a GPU]",
        ),
        click.option("--threads", type=click.IntRange(1, 256), default=None, help="Model threads on the CPU.  [default: one per core]"),
    ]
)
"""--weights, --model, --threshold, --device, --batch-size, --workers, --threads."""


def _destinations(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple:
    from ichscan.state.forwarder import Destination

    try:
        return tuple(dict.fromkeys(Destination.parse(text) for text in value))  # a repeat is one destination
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _ae_title(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.strip() or len(value) > 16 or "\\" in value:
        raise click.BadParameter("1-16 characters, no backslash", ctx, param)
    return value.strip()


def results_options(calling_ae: bool = True) -> Callable:
    """--html, --dicom-out, --forward, --forward-wait (and --calling-ae), passed to the
    command as one ``results`` argument (:class:`ichscan.reporting.ResultsOutput`).

    ``serve-scp`` leaves out --calling-ae: it sends as its own --ae-title.
    """
    options = [
        click.option(
            "--html",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Write a static HTML report (studies by 'any' probability, overlay thumbnails; opens from disk, no patient names).",
        ),
        click.option(
            "--dicom-out",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Write a DICOM SR per study and a Secondary Capture key image per positive study here: DIR/<StudyInstanceUID>/<SOPInstanceUID>.dcm.",
        ),
        click.option(
            "--forward",
            metavar="AE@HOST:PORT",
            multiple=True,
            callback=_destinations,
            help="Send the SR and key images by C-STORE (repeatable). Retried with back-off; deliveries are kept in the "
            "state file, so a restart neither loses nor duplicates one.",
        ),
        click.option(
            "--forward-wait",
            type=click.FloatRange(0, 86400),
            default=30.0,
            help="At the end of a run, seconds to wait for pending deliveries (the rest go with the next run).",
        ),
    ]
    if calling_ae:
        options.append(click.option("--calling-ae", default="ICHSCAN", callback=_ae_title, help="Our AE title when forwarding."))

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args, html, dicom_out, forward, forward_wait, calling_ae="ICHSCAN", **kwargs):
            from ichscan.reporting import ResultsOutput

            results = ResultsOutput(html=html, dicom_out=dicom_out, forward=forward, calling_ae=calling_ae, forward_wait=forward_wait)
            return f(*args, results=results, **kwargs)

        return _apply(options)(wrapper)

    return decorate
