"""The RSNA 2019 metric, per-label metrics and their plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ichscan.labels import LABELS, METRIC_WEIGHTS

CLIP = 1e-7


def weighted_log_loss(targets: np.ndarray, probabilities: np.ndarray) -> float:
    """The RSNA 2019 challenge metric.

    Per image, the weighted mean of the six binary log losses (weight 2 for ``any``, 1
    for each subtype, predictions clipped to [1e-7, 1 - 1e-7]); then the mean over images.
    """
    y = np.asarray(targets, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), CLIP, 1 - CLIP)
    w = np.asarray(METRIC_WEIGHTS, dtype=np.float64)
    per_label = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(((per_label * w).sum(axis=1) / w.sum()).mean())


def per_label_metrics(targets: np.ndarray, probabilities: np.ndarray, thresholds: dict[str, float]) -> dict[str, dict]:
    """AUC, accuracy, precision, recall, F1 and support for each label."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    result: dict[str, dict] = {}
    for j, label in enumerate(LABELS):
        y = targets[:, j].astype(int)
        p = probabilities[:, j]
        pred = (p >= thresholds[label]).astype(int)
        precision, recall, f1, _ = precision_recall_fscore_support(y, pred, average="binary", zero_division=0)
        auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None
        result[label] = {
            "auc": auc,
            "accuracy": float(accuracy_score(y, pred)),
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(y.sum()),
            "threshold": float(thresholds[label]),
        }
    return result


def aucs(targets: np.ndarray, probabilities: np.ndarray) -> dict[str, float | None]:
    from sklearn.metrics import roc_auc_score

    out: dict[str, float | None] = {}
    for j, label in enumerate(LABELS):
        y = targets[:, j]
        out[label] = float(roc_auc_score(y, probabilities[:, j])) if 0 < y.sum() < len(y) else None
    return out


#: ``"probability"`` of study-level metrics: where each study's probability came from.
STUDY_FROM_MAX_SLICE = "max slice p_any"
STUDY_FROM_MODEL = "model"
#: A series-head model's (``ichnet-series``): the highest series ``p_any`` of the study.
STUDY_FROM_SERIES_HEAD = "series head (max series p_any)"


@dataclass(frozen=True)
class StudyOutcome:
    """One study in an evaluation: its slices, truth and probability.

    ``positive`` is true when any of its slices is (label ``any``); ``probability`` is the
    model's study-level output where it gives one (``source`` :data:`STUDY_FROM_MODEL`),
    else the maximum ``p_any`` of its slices (:data:`STUDY_FROM_MAX_SLICE`), the value
    ``batch`` writes in the studies CSV's ``p_any`` column.
    """

    study_instance_uid: str
    slices: int
    positive: bool
    probability: float
    source: str = STUDY_FROM_MAX_SLICE


def study_outcomes(
    study_keys: Sequence[str],
    targets_any: Sequence[float] | np.ndarray,
    probabilities_any: Sequence[float] | np.ndarray,
    study_probabilities: Mapping[str, float] | None = None,
    source: str = STUDY_FROM_MODEL,
) -> list[StudyOutcome]:
    """Slices grouped into studies (by UID), sorted by UID.

    Parameters
    ----------
    study_keys
        Per slice, its study (StudyInstanceUID, or one shared key for slices without one).
    targets_any, probabilities_any
        Per slice, the true ``any`` label (0/1) and the predicted ``any`` probability.
    study_probabilities
        A model's own study-level probability (e.g. a series head's) by study; a study it
        names takes that value instead of its maximum slice probability.
    source
        What ``study_probabilities`` are, for :attr:`StudyOutcome.source` (e.g.
        :data:`STUDY_FROM_SERIES_HEAD`).
    """
    if not len(study_keys) == len(targets_any) == len(probabilities_any):
        raise ValueError("study keys, targets and probabilities differ in length")
    slices: dict[str, int] = {}
    positive: dict[str, bool] = {}
    highest: dict[str, float] = {}
    for key, target, probability in zip(study_keys, targets_any, probabilities_any, strict=True):
        slices[key] = slices.get(key, 0) + 1
        positive[key] = positive.get(key, False) or bool(target >= 0.5)
        highest[key] = max(highest.get(key, 0.0), float(probability))
    given = study_probabilities or {}
    return [
        StudyOutcome(key, slices[key], positive[key], float(given[key]), source)
        if key in given
        else StudyOutcome(key, slices[key], positive[key], highest[key])
        for key in sorted(slices)
    ]


def study_metrics(outcomes: Sequence[StudyOutcome]) -> dict:
    """``auc``, ``n_studies``, ``n_positive``, where the probabilities came from and, when
    the AUC is undefined (no studies, or all of one class), ``auc`` None and the reason."""
    from sklearn.metrics import roc_auc_score

    n_positive = sum(o.positive for o in outcomes)
    sources = sorted({o.source for o in outcomes})
    result: dict = {
        "auc": None,
        "n_studies": len(outcomes),
        "n_positive": n_positive,
        "probability": " and ".join(sources) if sources else STUDY_FROM_MAX_SLICE,
        "reason": None,
    }
    if not outcomes:
        result["reason"] = "no studies"
    elif n_positive in (0, len(outcomes)):
        kind = "positive" if n_positive else "negative"
        result["reason"] = f"all {len(outcomes)} studies are {kind}: the AUC needs both classes"
    else:
        result["auc"] = float(roc_auc_score([int(o.positive) for o in outcomes], [o.probability for o in outcomes]))
    return result


def youden_thresholds(targets: np.ndarray, probabilities: np.ndarray, default: float = 0.5) -> dict[str, float]:
    """Per label, the threshold maximising Youden's J (sensitivity + specificity - 1).

    Balanced sampling shows the model far more positives than real data has, so its
    probabilities run high; thresholds chosen on the (natural) validation split correct
    for that. A label without both classes keeps ``default``.
    """
    from sklearn.metrics import roc_curve

    out: dict[str, float] = {}
    for j, label in enumerate(LABELS):
        y = targets[:, j]
        if not 0 < y.sum() < len(y):
            out[label] = default
            continue
        fpr, tpr, thresholds = roc_curve(y, probabilities[:, j])
        best = int(np.argmax(tpr - fpr))
        out[label] = float(min(1.0, max(0.0, thresholds[best])))
    return out


def classification_report_text(targets: np.ndarray, probabilities: np.ndarray, thresholds: dict[str, float]) -> str:
    from sklearn.metrics import classification_report

    pred = np.stack([(probabilities[:, j] >= thresholds[label]) for j, label in enumerate(LABELS)], axis=1).astype(int)
    return classification_report(targets.astype(int), pred, target_names=list(LABELS), zero_division=0)


def plot_confusion_matrices(path: Path, targets: np.ndarray, probabilities: np.ndarray, thresholds: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    for ax, (j, label) in zip(axes.flat, enumerate(LABELS), strict=True):
        pred = (probabilities[:, j] >= thresholds[label]).astype(int)
        cm = confusion_matrix(targets[:, j].astype(int), pred, labels=[0, 1])
        ax.imshow(cm, cmap="Blues")
        for (r, c), value in np.ndenumerate(cm):
            ax.text(c, r, str(value), ha="center", va="center", color="black", fontsize=12)
        ax.set_xticks([0, 1], ["neg", "pos"])
        ax.set_yticks([0, 1], ["neg", "pos"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{label} (threshold {thresholds[label]:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc_curves(path: Path, targets: np.ndarray, probabilities: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(7, 6))
    for j, label in enumerate(LABELS):
        y = targets[:, j]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, probabilities[:, j])
            ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y, probabilities[:, j]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curves")
    if ax.get_legend_handles_labels()[0]:  # no curve when no label has both classes
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_history(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("BCE loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
