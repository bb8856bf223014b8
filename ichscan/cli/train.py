"""Model commands: ``train`` and ``evaluate``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from ichscan.cli.options import CONTEXT_SETTINGS, device_option, plugin_manager, threshold_option, with_options

log = logging.getLogger("ichscan")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="RSNA-format labels CSV (ID,Label rows ID_<image>_<label>,<0|1>).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder: split.csv, best.pt, last.pt, history.csv, loss_curve.png.")
@click.option("--model", "model_name", default="simplecnn", help="Registered model to train ('ichnet' is the one recommended for real data).")
@click.option("--epochs", type=click.IntRange(1, 10000), default=None, help="Training epochs.  [default: the model's; 5 for the built-in ones]")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help="Images per training step.  [default: the model's; 16 for the ichnet family, 32 for simplecnn]")
@click.option("--lr", type=click.FloatRange(0, 1, min_open=True), default=None, help="Adam learning rate (peak of the cosine schedule with warm-up).  [default: the model's; 0.001 for the built-in ones]")
@click.option("--seed", type=int, default=0, help="Seed for the split, sampling, augmentation and initial weights.")
@with_options(device_option("auto takes CUDA when present."))
@click.option("--workers", type=click.IntRange(0, 256), default=None, help="Data loading processes.  [default: one per core]")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where decoded, windowed images are cached (uint8, about 150 KB per image).  [default: RUN_DIR/cache]")
@click.option("--no-cache", is_flag=True, help="Decode the DICOM files again every epoch.")
@click.option("--no-augment", is_flag=True, help="Turn off flips, rotations and shifts.")
@click.option("--frame-head/--no-frame-head", default=True, help="Crop each slice to a square around the head before resizing, so the head fills the input whatever the field of view (saved in the checkpoint; screening does the same).  [default: on]")
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR/last.pt (saved every epoch and on Ctrl-C).")
@click.option("--progress/--no-progress", default=True, help="Progress bar per epoch.")
@click.pass_context
def train(ctx: click.Context, labels_csv: Path, no_cache: bool, no_augment: bool, frame_head: bool, **training: Any) -> None:
    """Train a model on RSNA-layout data (ID_<image>.dcm files under DATA_DIR).

    Splits 80/10/10 by patient (PatientID, else StudyInstanceUID) into RUN_DIR/split.csv,
    draws each epoch equally from every hemorrhage subtype and from negatives, trains with
    BCEWithLogitsLoss and Adam under a cosine schedule with warm-up, and keeps the
    checkpoint with the lowest validation loss as RUN_DIR/best.pt, ready for
    'ichscan batch --weights'. Ctrl-C saves RUN_DIR/last.pt; --resume continues.
    Epochs, learning rate and batch size default to the model's own (printed at the start).
    """
    from ichscan.train.dataset import LabelsError
    from ichscan.train.loop import Interrupted, TrainingError, TrainOptions, run_training
    from ichscan.models import ModelError

    # The other options are named after the TrainOptions fields they set.
    from ichscan.preprocess import PreprocessSettings

    opts = TrainOptions(labels=labels_csv, cache=not no_cache, augment=not no_augment, settings=PreprocessSettings(crop=frame_head), **training)
    try:
        summary = run_training(opts, plugin_manager(ctx))
    except Interrupted as exc:
        click.echo(f"ichscan: {exc}", err=True)
        ctx.exit(130)
    except (TrainingError, LabelsError, ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    log.info("best epoch %d, validation loss %.4f -> %s", summary["best_epoch"], summary["best_val_loss"], summary["best"])


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="RSNA-format labels CSV.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for metrics.json, report.txt, confusion_matrices.png, roc_curves.png, predictions.csv, studies.csv.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Checkpoint to evaluate.  [default: the bundled weights]")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="RUN_DIR/split.csv from 'ichscan train': evaluate one split only.")
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", help="Which split of --split-file.")
@with_options(threshold_option("Decision thresholds, as for 'batch': '0.4' or 'any=0.3,subdural=0.4'."))
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, help="Images per batch.")
@with_options(device_option("auto takes CUDA when present."))
@click.option("--workers", type=click.IntRange(0, 256), default=None, help="Data loading processes.  [default: one per core]")
@click.pass_context
def evaluate(
    ctx: click.Context,
    data_dir: Path,
    labels_csv: Path,
    out_dir: Path,
    weights: Path | None,
    split_file: Path | None,
    split: str,
    thresholds: dict[str, float] | None,
    batch_size: int,
    device: str,
    workers: int | None,
) -> None:
    """Evaluate a checkpoint on RSNA-layout data: the RSNA weighted log loss, per-label
    AUC, accuracy, precision, recall, F1 and support, confusion matrices and ROC curves;
    and per study (StudyInstanceUID): the AUC of 'any', a study being positive when any
    of its slices is."""
    from ichscan.models import ModelError
    from ichscan.train.dataset import LabelsError
    from ichscan.train.evaluate import EvaluateOptions, describe_study_metrics, run_evaluation
    from ichscan.train.loop import TrainingError

    opts = EvaluateOptions(data_dir, labels_csv, out_dir, weights, split_file, split, batch_size, device, workers, thresholds)
    try:
        metrics = run_evaluation(opts, plugin_manager(ctx))
    except (TrainingError, LabelsError, ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{metrics['images']} images, weighted log loss {metrics['weighted_log_loss']:.4f}")
    for label, m in metrics["per_label"].items():
        auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
        click.echo(f"  {label:17s} AUC {auc}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  F1 {m['f1']:.3f}  support {m['support']}")
    click.echo(describe_study_metrics(metrics["study"]))
    click.echo(f"-> {out_dir}")
