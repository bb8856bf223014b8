"""Command line: thin Click commands that parse options and call one library function."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from ichscan import __version__
from ichscan.labels import LABELS, parse_thresholds

log = logging.getLogger("ichscan")

OVERLAYS_FOR = ("positive", "all", "none")
DEVICES = ("auto", "cpu", "cuda")
SYNTH_SYNTAXES = {
    "explicit": "ExplicitVRLittleEndian",
    "implicit": "ImplicitVRLittleEndian",
    "deflated": "DeflatedExplicitVRLittleEndian",
    "rle": "RLELossless",
    "jpeg2000": "JPEG2000Lossless",
}


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    # Libraries (pydicom, openjpeg...) log chatter at INFO: show theirs from -vv only.
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.WARNING,
        format="ichscan %(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    log.setLevel(level)


class ThresholdType(click.ParamType):
    name = "THRESHOLDS"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        try:
            return parse_thresholds(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="ichscan")
@click.option(
    "--plugins-dir",
    "plugins_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Load every .py file in this folder as a plugin (repeatable).",
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def cli(ctx: click.Context, plugins_dirs: tuple[Path, ...], verbose: int, quiet: bool) -> None:
    """Screen head CT DICOM images for intracranial hemorrhage.

    Labels: epidural, intraparenchymal, intraventricular, subarachnoid, subdural, any.
    Not for diagnostic use.
    """
    _setup_logging(verbose, quiet)
    ctx.obj = {"plugins_dirs": plugins_dirs}


def _plugin_manager(ctx: click.Context):
    from ichscan.plugins import PluginError, get_plugin_manager

    try:
        return get_plugin_manager(ctx.obj["plugins_dirs"])
    except PluginError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("results.csv"), help="Per-slice results CSV.")
@click.option(
    "--studies-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Per-study summary CSV.  [default: <out stem>_studies.csv beside --out]",
)
@click.option(
    "--overlays",
    "overlays_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for overlay PNGs.  [default: overlays/ beside --out]",
)
@click.option("--overlays-for", type=click.Choice(OVERLAYS_FOR), default="positive", help="Which slices get an overlay PNG.")
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint from 'ichscan train'.  [default: the bundled weights]",
)
@click.option("--model", "model_name", default=None, help="Model name, for a model without a checkpoint.  [default: simplecnn]")
@click.option(
    "--threshold",
    "thresholds",
    type=ThresholdType(),
    default=None,
    help="Decision threshold: '0.4' for all labels or 'any=0.3,subdural=0.4'. "
    "Overrides the checkpoint's.  [default: 0.5 each]",
)
@click.option("--device", type=click.Choice(DEVICES), default="auto", help="Where the model runs; auto takes CUDA when present.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help="Images per model batch.  [default: 32 on CPU, 256 on GPU]")
@click.option(
    "--workers",
    type=click.IntRange(0, 256),
    default=None,
    help="Decode worker processes; 0 decodes in the main process.  [default: one per core on CPU, all cores but one with a GPU]",
)
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Model threads on the CPU.  [default: one per core]")
@click.option("--progress/--no-progress", default=True, help="Progress bar (on a terminal) or periodic log lines.")
@click.pass_context
def batch(
    ctx, folder, out, studies_out, overlays_dir, overlays_for, weights, model_name, thresholds, device, batch_size, workers, threads, progress
):
    """Screen every DICOM file under FOLDER (recursively) into a results CSV.

    Every file gets exactly one row with status ok (screened), skipped (readable DICOM
    that is not a single-frame greyscale CT image) or error (unreadable, refused,
    failed), with a one-line reason. Hidden files are skipped; symbolic links that
    leave FOLDER are not followed. Exit status 0 when the run completed, error rows
    included.
    """
    from ichscan.batch import BatchOptions, RunError, run_batch
    from ichscan.models import ModelError

    pm = _plugin_manager(ctx)
    opts = BatchOptions(
        input_dir=folder,
        out=out,
        studies_out=studies_out,
        overlays_dir=overlays_dir,
        overlays_for=overlays_for,
        weights=weights,
        model_name=model_name,
        thresholds=thresholds,
        device=device,
        batch_size=batch_size,
        workers=workers,
        threads=threads,
        progress=progress,
    )
    try:
        summary = run_batch(opts, pm)
    except (RunError, ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    rate = summary.files / summary.seconds if summary.seconds > 0 else 0.0
    log.info(
        "screened %d files in %.1f s (%.1f files/s): %d ok (%d positive), %d skipped, %d error -> %s",
        summary.files,
        summary.seconds,
        rate,
        summary.ok,
        summary.positive,
        summary.skipped,
        summary.error,
        out,
    )
    for name, count in summary.reporter_errors.items():
        log.error("reporter %s failed %d times; its output may be incomplete", name, count)


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--studies", type=click.IntRange(1, 100000), default=4, help="Number of studies (patients).")
@click.option("--slices", type=click.IntRange(1, 1000), default=10, help="Slices per study.")
@click.option("--seed", type=int, default=0, help="Random seed; the same seed gives the same files.")
@click.option("--layout", type=click.Choice(["pacs", "rsna"]), default="pacs", help="pacs: Patient/Study/Series/*.dcm; rsna: stage_2_train/ID_*.dcm + stage_2_train.csv.")
@click.option("--size", type=click.IntRange(64, 2048), default=None, help="Force this image size.  [default: varies per study, 400-640]")
@click.option(
    "--transfer-syntax",
    "transfer_syntaxes",
    multiple=True,
    type=click.Choice(list(SYNTH_SYNTAXES)),
    help="Restrict transfer syntaxes (repeatable).  [default: all, varied per study]",
)
def synth(out_dir, studies, slices, seed, layout, size, transfer_syntaxes):
    """Generate synthetic head-CT phantom slices with exact hemorrhage labels.

    Demo and test data: skull, brain with texture, ventricles and sulci, noise, and the
    five bleed types in their typical shapes and places; scanner conventions vary per
    study. Not real patients.
    """
    from ichscan.synth import generate

    ts = [SYNTH_SYNTAXES[name] for name in transfer_syntaxes] or None
    records = generate(out_dir, studies=studies, slices=slices, seed=seed, layout=layout, transfer_syntaxes=ts, size=size)
    positives = sum(r.labels["any"] for r in records)
    counts = ", ".join(f"{label} {sum(r.labels[label] for r in records)}" for label in LABELS[:-1])
    click.echo(f"wrote {len(records)} slices ({positives} positive: {counts}) to {out_dir}")


@cli.command("plugins")
@click.pass_context
def plugins_command(ctx):
    """List loaded plugins, where each comes from, and the hooks it implements."""
    from ichscan.models import model_factories
    from ichscan.plugins import describe_plugins

    pm = _plugin_manager(ctx)
    for info in describe_plugins(pm):
        click.echo(f"{info.name}  [{info.source}]")
        for hook in info.hooks:
            click.echo(f"    {hook}")
    click.echo("models: " + ", ".join(sorted(model_factories(pm))))


def main(args: list[str] | None = None) -> None:
    cli.main(args=args, prog_name="ichscan")


if __name__ == "__main__":  # pragma: no cover
    main()
