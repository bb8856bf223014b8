"""``ichscan evaluate``: metrics, report, confusion matrices and ROC curves for a checkpoint,
per slice and per study."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from collections.abc import Iterable
from pathlib import Path

import pluggy
import torch

from ichscan.pipeline.screener import slice_context
from ichscan.pipeline.sizing import cpu_count, resolve_device
from ichscan.default_plugins.ichnet import has_series_head
from ichscan.dicom import read_header_instance
from ichscan.labels import LABELS
from ichscan.models import load_model
from ichscan.plugins import get_plugin_manager
from ichscan.records import NO_STUDY_UID
from ichscan.train.dataset import RSNADataset, read_rsna_labels
from ichscan.train.loop import TrainingError, _loader, predict_loader
from ichscan.train.series_head import predict_by_series
from ichscan.train.metrics import (
    STUDY_FROM_SERIES_HEAD,
    classification_report_text,
    per_label_metrics,
    plot_confusion_matrices,
    plot_roc_curves,
    study_metrics,
    study_outcomes,
    weighted_log_loss,
)
from ichscan.train.split import images_in, read_split

log = logging.getLogger(__name__)


@dataclass
class EvaluateOptions:
    data_dir: Path
    labels: Path
    out_dir: Path
    weights: Path | None = None
    split_file: Path | None = None
    split: str = "test"
    batch_size: int = 32
    device: str = "auto"
    workers: int | None = None
    thresholds: dict[str, float] | None = None


def study_keys(paths: Iterable[str | Path]) -> list[str]:
    """Each file's study, read from its header (StudyInstanceUID; the key ``batch`` uses,
    so a file without one joins the same pseudo-study as there)."""
    keys = []
    for path in paths:
        instance = read_header_instance(path)
        keys.append(instance.study_key if instance is not None else NO_STUDY_UID)
    return keys


def describe_study_metrics(study: dict) -> str:
    """One line: studies, positives and the study-level AUC (or why there is none)."""
    auc = f"AUC {study['auc']:.3f}" if study["auc"] is not None else f"AUC n/a ({study['reason']})"
    return f"studies: {study['n_studies']} ({study['n_positive']} positive), {auc}, study probability: {study['probability']}"


def run_evaluation(opts: EvaluateOptions, pm: pluggy.PluginManager | None = None) -> dict:
    """Evaluate; write metrics.json, report.txt, the two PNGs, predictions.csv and studies.csv."""
    pm = pm or get_plugin_manager()
    loaded = load_model(pm, opts.weights, thresholds=opts.thresholds)
    if loaded.notice():
        log.warning("%s", loaded.notice())
    device = resolve_device(opts.device)
    labels = read_rsna_labels(opts.labels)
    ids = None
    if opts.split_file is not None:
        ids = images_in(read_split(opts.split_file), opts.split)
        if not ids:
            raise TrainingError(f"{opts.split_file} has no images in split {opts.split!r}")
    dataset = RSNADataset(opts.data_dir, labels, ids, loaded.preprocessing, context=slice_context(loaded.model))
    if not len(dataset):
        raise TrainingError(f"no labelled images found under {opts.data_dir}")
    model = loaded.model.to(device).to(memory_format=torch.channels_last)
    workers = cpu_count() if opts.workers is None else opts.workers
    unreadable: set[str] = set()
    any_column = LABELS.index("any")
    study_probabilities: dict[str, float] | None = None
    if has_series_head(model):
        # Slices refined by their series; a study's probability is its most likely series'.
        by_series = predict_by_series(model, dataset, opts.batch_size, workers, device, unreadable)
        probs, targets, image_ids = by_series.probabilities, by_series.targets, by_series.ids
        instance_of = {item.image_id: instance for item, instance in zip(dataset.items, dataset.instances, strict=True)}
        study_probabilities = {}
        for rows, series_probs in zip(by_series.groups, by_series.series_probabilities, strict=True):
            key = instance_of[image_ids[rows[0]]].study_key
            study_probabilities[key] = max(study_probabilities.get(key, 0.0), float(series_probs[any_column]))
    else:
        probs, targets, image_ids, _ = predict_loader(model, _loader(dataset, opts.batch_size, workers), device, unreadable)
    thresholds = loaded.thresholds
    path_of = {item.image_id: item.path for item in dataset.items}
    # A study is positive when any of its slices is. Its probability is the maximum slice
    # p_any, as in batch's studies CSV, or, for a model with a series head, the maximum
    # over its series of the head's series p_any.
    studies = study_outcomes(
        study_keys(path_of[i] for i in image_ids),
        targets[:, any_column],
        probs[:, any_column],
        study_probabilities,
        source=STUDY_FROM_SERIES_HEAD,
    )
    metrics = {
        "weights": loaded.source,
        "model": loaded.name,
        "trained": loaded.trained,
        "images": len(image_ids),
        "unreadable": len(unreadable),
        "weighted_log_loss": weighted_log_loss(targets, probs),
        "per_label": per_label_metrics(targets, probs, thresholds),
        "study": study_metrics(studies),
    }
    out = opts.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.txt").write_text(
        f"weights: {loaded.source}\nimages: {len(image_ids)}\nweighted log loss: {metrics['weighted_log_loss']:.4f}\n"
        f"{describe_study_metrics(metrics['study'])}\n\n"
        + classification_report_text(targets, probs, thresholds)
    )
    plot_confusion_matrices(out / "confusion_matrices.png", targets, probs, thresholds)
    plot_roc_curves(out / "roc_curves.png", targets, probs)
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", *(f"p_{label}" for label in LABELS), *(f"true_{label}" for label in LABELS)])
        for image_id, p, t in zip(image_ids, probs, targets, strict=True):
            writer.writerow([image_id, *(f"{v:.6f}" for v in p), *(int(v) for v in t)])
    with open(out / "studies.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_instance_uid", "slices", "p_any", "true_any", "probability"])
        for study in studies:
            writer.writerow([study.study_instance_uid, study.slices, f"{study.probability:.6f}", int(study.positive), study.source])
    return metrics
