"""Command line: thin Click commands that parse options and call one library function."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from ichscan import __version__
from ichscan.cli_serve import serve_command
from ichscan.cli_options import DEVICES, model_options, output_options, parse_threshold_option, results_options
from ichscan.cli_watch import watch_command
from ichscan.labels import LABELS

log = logging.getLogger("ichscan")

SYNTH_SYNTAXES = {
    "explicit": "ExplicitVRLittleEndian",
    "implicit": "ImplicitVRLittleEndian",
    "deflated": "DeflatedExplicitVRLittleEndian",
    "rle": "RLELossless",
    "jpeg2000": "JPEG2000Lossless",
}


def _setup_logging(verbose: int, quiet: bool) -> None:
    """ichscan logs at INFO by default (what it did, where the results went); ``-v`` adds
    its debug messages, ``-vv`` also the libraries' (pydicom, pynetdicom...), which log
    chatter at INFO; ``-q`` keeps warnings and errors only."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.WARNING,
        format="ichscan %(levelname)s %(name)s: %(message)s" if verbose > 1 else "ichscan %(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    log.setLevel(level)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="ichscan")
@click.option(
    "--plugins-dir",
    "plugins_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Load every .py file in this folder as a plugin (repeatable).",
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="-v: ichscan's debug messages too; -vv: also those of the libraries (pydicom, pynetdicom).",
)
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
@output_options("Per-slice results CSV.")
@results_options()
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="SQLite file recording DICOM results and their deliveries (with --dicom-out/--forward).  "
    "[default: ichscan-state.sqlite beside --out]",
)
@model_options
@click.option("--progress/--no-progress", default=True, help="Progress bar (on a terminal) or periodic log lines.")
@click.pass_context
def batch(
    ctx, folder, out, studies_out, overlays_dir, overlays_for, results, state, weights, model_name, thresholds, device, batch_size, workers,
    threads, progress
):
    """Screen every DICOM file under FOLDER (recursively) into a results CSV.

    Every file gets exactly one row with status ok (screened), skipped (readable DICOM
    that is not a single-frame greyscale CT image) or error (unreadable, refused,
    failed), with a one-line reason. Hidden files are skipped; symbolic links that
    leave FOLDER are not followed. Exit status 0 when the run completed, error rows
    included.
    """
    from ichscan.pipeline import BatchOptions, RunError, run_batch
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
        results=results,
        state=state,
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
    if summary.interrupted:
        click.echo(f"ichscan: interrupted after {summary.files} files; their rows are in {out}", err=True)
        ctx.exit(130)
    if "csv" in summary.reporter_errors:  # the results file itself is incomplete: a script must notice
        raise click.ClickException(f"some rows could not be written to {out} (see the errors above)")


@cli.command()
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
def synth(out_dir, studies, slices, seed, layout, size, transfer_syntaxes):
    """Generate synthetic head-CT phantom slices with exact hemorrhage labels.

    Demo and test data: skull, brain with texture, ventricles and sulci, noise, and the
    five bleed types in their typical shapes and places; scanner conventions vary per
    study. Not real patients.
    """
    from ichscan.synth import generate

    ts = [SYNTH_SYNTAXES[name] for name in transfer_syntaxes] or None
    try:
        records = generate(out_dir, studies=studies, slices=slices, seed=seed, layout=layout, transfer_syntaxes=ts, size=size)
    except OSError as exc:
        raise click.ClickException(f"cannot write phantoms to {out_dir}: {exc.strerror or exc}") from None
    positives = sum(r.labels["any"] for r in records)
    counts = ", ".join(f"{label} {sum(r.labels[label] for r in records)}" for label in LABELS[:-1])
    click.echo(f"wrote {len(records)} slices ({positives} positive: {counts}) to {out_dir}")


@cli.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="RSNA-format labels CSV (ID,Label rows ID_<image>_<label>,<0|1>).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder: split.csv, best.pt, last.pt, history.csv, loss_curve.png.")
@click.option("--epochs", type=click.IntRange(1, 10000), default=5, help="Training epochs.")
@click.option("--model", "model_name", default="simplecnn", help="Registered model to train.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, help="Images per training step.")
@click.option("--lr", type=click.FloatRange(0, 1, min_open=True), default=1e-3, help="Adam learning rate (peak of the cosine schedule with warm-up).")
@click.option("--seed", type=int, default=0, help="Seed for the split, sampling, augmentation and initial weights.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", help="auto takes CUDA when present.")
@click.option("--workers", type=click.IntRange(0, 256), default=None, help="Data loading processes.  [default: one per core]")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where decoded, windowed images are cached (uint8, about 150 KB per image).  [default: RUN_DIR/cache]")
@click.option("--no-cache", is_flag=True, help="Decode the DICOM files again every epoch.")
@click.option("--no-augment", is_flag=True, help="Turn off flips, rotations and shifts.")
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR/last.pt (saved every epoch and on Ctrl-C).")
@click.option("--progress/--no-progress", default=True, help="Progress bar per epoch.")
@click.pass_context
def train(ctx, data_dir, labels_csv, out_dir, epochs, model_name, batch_size, lr, seed, device, workers, cache_dir, no_cache, no_augment, resume, progress):
    """Train a model on RSNA-layout data (ID_<image>.dcm files under DATA_DIR).

    Splits 80/10/10 by patient (PatientID, else StudyInstanceUID) into RUN_DIR/split.csv,
    draws each epoch equally from every hemorrhage subtype and from negatives, trains with
    BCEWithLogitsLoss and Adam under a cosine schedule with warm-up, and keeps the
    checkpoint with the lowest validation loss as RUN_DIR/best.pt, ready for
    'ichscan batch --weights'. Ctrl-C saves RUN_DIR/last.pt; --resume continues.
    """
    from ichscan.train.dataset import LabelsError
    from ichscan.train.loop import Interrupted, TrainingError, TrainOptions, run_training
    from ichscan.models import ModelError

    opts = TrainOptions(
        data_dir=data_dir,
        labels=labels_csv,
        out_dir=out_dir,
        epochs=epochs,
        model_name=model_name,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        cache_dir=cache_dir,
        cache=not no_cache,
        resume=resume,
        augment=not no_augment,
        workers=workers,
        progress=progress,
    )
    try:
        summary = run_training(opts, _plugin_manager(ctx))
    except Interrupted as exc:
        click.echo(f"ichscan: {exc}", err=True)
        ctx.exit(130)
    except (TrainingError, LabelsError, ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    log.info("best epoch %d, validation loss %.4f -> %s", summary["best_epoch"], summary["best_val_loss"], summary["best"])


@cli.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="RSNA-format labels CSV.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for metrics.json, report.txt, confusion_matrices.png, roc_curves.png, predictions.csv.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Checkpoint to evaluate.  [default: the bundled weights]")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="RUN_DIR/split.csv from 'ichscan train': evaluate one split only.")
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", help="Which split of --split-file.")
@click.option("--threshold", "thresholds", metavar="THRESHOLDS", callback=parse_threshold_option, default=None, help="Decision thresholds, as for 'batch': '0.4' or 'any=0.3,subdural=0.4'.  [default: the checkpoint's, else 0.5]")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, help="Images per batch.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", help="auto takes CUDA when present.")
@click.option("--workers", type=click.IntRange(0, 256), default=None, help="Data loading processes.  [default: one per core]")
@click.pass_context
def evaluate(ctx, data_dir, labels_csv, out_dir, weights, split_file, split, thresholds, batch_size, device, workers):
    """Evaluate a checkpoint on RSNA-layout data: the RSNA weighted log loss, per-label
    AUC, accuracy, precision, recall, F1 and support, confusion matrices and ROC curves."""
    from ichscan.models import ModelError
    from ichscan.train.dataset import LabelsError
    from ichscan.train.evaluate import EvaluateOptions, run_evaluation
    from ichscan.train.loop import TrainingError

    opts = EvaluateOptions(data_dir, labels_csv, out_dir, weights, split_file, split, batch_size, device, workers, thresholds)
    try:
        metrics = run_evaluation(opts, _plugin_manager(ctx))
    except (TrainingError, LabelsError, ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{metrics['images']} images, weighted log loss {metrics['weighted_log_loss']:.4f}")
    for label, m in metrics["per_label"].items():
        auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
        click.echo(f"  {label:17s} AUC {auc}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  F1 {m['f1']:.3f}  support {m['support']}")
    click.echo(f"-> {out_dir}")


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Checkpoint.  [default: the bundled weights]")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Save the image with the prediction drawn on it (PNG).")
@click.option("--threshold", "thresholds", metavar="THRESHOLDS", callback=parse_threshold_option, default=None, help="Decision thresholds, as for 'batch': '0.4' or 'any=0.3,subdural=0.4'.  [default: the checkpoint's, else 0.5]")
@click.option("--device", type=click.Choice(DEVICES), default="auto", help="Where the model runs; auto takes CUDA when present.")
@click.pass_context
def predict(ctx, file, weights, save, thresholds, device):
    """Screen one DICOM file and print what was found."""
    from ichscan.api import screen_file
    from ichscan.models import ModelError
    from ichscan.overlay import render_overlay

    try:
        result, image, loaded = screen_file(file, weights=weights, thresholds=thresholds, pm=_plugin_manager(ctx), device=device)
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
    if save is not None:
        try:
            render_overlay(image, result).save(save)
        except (OSError, ValueError) as exc:  # a missing folder; an extension Pillow does not know
            raise click.ClickException(f"cannot save {save}: {getattr(exc, 'strerror', None) or exc}") from None
        click.echo(f"-> {save}")


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


cli.add_command(watch_command)
cli.add_command(serve_command)


def main(args: list[str] | None = None) -> None:
    # Model threads sleep between operations instead of spinning: the decode workers
    # share the cores with them (measured faster in benchmarks/bench_batch.py). Must be
    # set before torch loads its OpenMP runtime, i.e. before any command imports torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cli.main(args=args, prog_name="ichscan")


if __name__ == "__main__":  # pragma: no cover
    main()
