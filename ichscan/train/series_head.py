"""Stage 2 of ``ichscan train`` for a model with a series head (``ichnet-series``), and the
series-by-series prediction ``ichscan evaluate`` uses for such a model.

Stage 1 trains the backbone slice by slice, exactly as for ``ichnet`` (:func:`ichscan.train.loop.run_training`),
and keeps it as ``best.pt``. Stage 2 (:func:`train_series_head`) then loads those weights,
computes every training and validation slice's embedding once (``model.embed``, eval mode,
no augmentation), groups the slices into series in position order (:func:`series_groups`)
and trains only the head (``model.sequence``, backbone frozen) on whole series: BCE of the
refined slice logits against the slice labels plus BCE of the series logits against the
series labels (a series is positive for a label when any of its slices is). The head of the
epoch with the lowest validation loss (slice-level BCE of the refined logits) is saved to
``best.pt`` again, with thresholds from the refined validation probabilities.

Stage 2 always starts from ``best.pt``'s backbone and a freshly initialised head, so it can
be rerun (``--resume`` after stage 1 finished) with the same result.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ichscan.default_plugins.ichnet import has_series_head
from ichscan.labels import LABELS
from ichscan.models import read_checkpoint, save_checkpoint
from ichscan.pipeline.series import SeriesAssembler
from ichscan.records import DecodedSlice, Instance, Status
from ichscan.train.dataset import RSNADataset
from ichscan.train.loop import TrainingError, _autocast, _loader, readable_batches
from ichscan.train.metrics import aucs, youden_thresholds

log = logging.getLogger(__name__)

#: Head epochs of stage 2 (each a pass over every training series; seconds on the CPU).
HEAD_EPOCHS = 30
HEAD_LR = 1e-3
#: Series per step in stage 2, and per forward pass when refining.
SERIES_PER_BATCH = 16


def series_groups(instances: Sequence[Instance]) -> list[list[int]]:
    """The slices (indexes into ``instances``) grouped into series, each in position order.

    The pipeline's own assembler (:class:`ichscan.pipeline.series.SeriesAssembler`) decides,
    so a series is ordered exactly as ``batch`` and the training dataset see it: by
    SeriesInstanceUID, along the slice normal. A slice without a series or a position is a
    series of its own; a missing slice simply is not there (the series is shorter).
    """
    stand_ins = [DecodedSlice(instance, Status.OK) for instance in instances]
    where = {id(s): i for i, s in enumerate(stand_ins)}
    assembler = SeriesAssembler(context=1)  # context 0 would pass every slice through alone
    assembler.add(stand_ins, now=0.0)
    series: dict[str, list[int]] = {}
    alone: list[list[int]] = []
    for ready in assembler.take(0.0, flush=True):  # a series' members come out in position order
        index = where[id(ready.slice)]
        if ready.neighbours:
            series.setdefault(ready.slice.instance.series_instance_uid, []).append(index)
        else:
            alone.append([index])
    return list(series.values()) + alone


def refine_by_series(
    model: nn.Module, embeddings: torch.Tensor, groups: Sequence[Sequence[int]], series_per_batch: int = SERIES_PER_BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head over whole series: ``embeddings (N, D)`` of slices and ``groups`` (from
    :func:`series_groups`, indexes into the rows) -> refined slice logits ``(N, labels)``
    (rows in no group stay 0) and series logits ``(len(groups), labels)``.

    Series go through ``model.refine`` padded, ``series_per_batch`` at a time. Gradients
    flow when the caller allows them (stage 2 trains through this); wrap it in
    ``torch.inference_mode()`` to predict.
    """
    device = embeddings.device
    slice_parts, series_parts, order = [], [], []
    for start in range(0, len(groups), series_per_batch):
        chunk = [list(g) for g in groups[start : start + series_per_batch]]
        lengths = torch.tensor([len(g) for g in chunk], dtype=torch.long)
        padded = nn.utils.rnn.pad_sequence([embeddings[torch.tensor(g, device=device)] for g in chunk], batch_first=True)
        refined, series = model.refine(padded, lengths)
        real = torch.arange(padded.shape[1], device=device)[None, :] < lengths.to(device)[:, None]
        slice_parts.append(refined[real].float())  # row-major: the chunk's series one after another
        series_parts.append(series.float())
        order.extend(i for g in chunk for i in g)
    slice_logits = torch.zeros(embeddings.shape[0], len(LABELS), device=device)
    if not order:
        return slice_logits, torch.zeros(0, len(LABELS), device=device)
    slice_logits = slice_logits.index_copy(0, torch.tensor(order, device=device), torch.cat(slice_parts))
    return slice_logits, torch.cat(series_parts)


def embed_loader(model: nn.Module, loader, device: torch.device, unreadable: set[str]) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Per-slice embeddings (``model.embed``, float32, on ``device``), targets and ids over
    a loader, in eval mode and without gradients; unreadable slices are left out."""
    model.eval()
    parts, targets, ids = [], [], []
    with torch.inference_mode():
        for inputs, target, batch_ids in readable_batches(loader, device, unreadable):
            with _autocast(device):
                parts.append(model.embed(inputs).float())
            targets.append(target.numpy())
            ids.extend(batch_ids)
    if not parts:
        raise TrainingError("no readable images to embed")
    return torch.cat(parts), np.concatenate(targets), ids


@dataclass
class SeriesPrediction:
    """Slice probabilities refined by their series, and each series' own probabilities."""

    probabilities: np.ndarray  # (slices, labels), rows in the order of ``ids``
    targets: np.ndarray
    ids: list[str]
    loss: float  # mean BCE of the refined slice logits
    groups: list[list[int]]  # each series' rows
    series_probabilities: np.ndarray  # (series, labels)


@dataclass
class _Embedded:
    embeddings: torch.Tensor
    targets: np.ndarray
    ids: list[str]
    groups: list[list[int]]


def _embed_dataset(model: nn.Module, dataset: RSNADataset, batch_size: int, workers: int, device: torch.device, unreadable: set[str]) -> _Embedded:
    """Embeddings of a dataset's readable slices (no augmentation) and their series."""
    plain = copy.copy(dataset)  # shares items, headers and cache; only the augmentation differs
    plain.augment = False
    embeddings, targets, ids = embed_loader(model, _loader(plain, batch_size, workers), device, unreadable)
    instance_of = {item.image_id: instance for item, instance in zip(dataset.items, dataset.instances, strict=True)}
    return _Embedded(embeddings, targets, ids, series_groups([instance_of[i] for i in ids]))


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """One CPU thread for the head: its matrices are tiny, and more threads only wait on
    each other (on a busy 2-core machine, 100 times slower than one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _predict(model: nn.Module, data: _Embedded) -> SeriesPrediction:
    model.eval()
    with torch.inference_mode(), _single_thread():
        slice_logits, series_logits = refine_by_series(model, data.embeddings, data.groups)
        targets = torch.from_numpy(data.targets).to(slice_logits.device)
        loss = float(nn.functional.binary_cross_entropy_with_logits(slice_logits, targets))
    return SeriesPrediction(
        torch.sigmoid(slice_logits).cpu().numpy(), data.targets, data.ids, loss, data.groups, torch.sigmoid(series_logits).cpu().numpy()
    )


def predict_by_series(model: nn.Module, dataset: RSNADataset, batch_size: int, workers: int, device: torch.device, unreadable: set[str]) -> SeriesPrediction:
    """A series-head model over a dataset: each slice's probabilities refined by its series
    (``ichscan evaluate``; stage 2's validation uses the same steps)."""
    return _predict(model, _embed_dataset(model, dataset, batch_size, workers, device, unreadable))


def series_targets(targets: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """A series is positive for a label when any of its slices is."""
    return np.stack([targets[list(g)].max(axis=0) for g in groups]) if groups else np.zeros((0, len(LABELS)), np.float32)


def train_series_head(
    best_path: Path,
    model: nn.Module,
    train_set: RSNADataset,
    val_set: RSNADataset,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    seed: int = 0,
    epochs: int = HEAD_EPOCHS,
    lr: float = HEAD_LR,
) -> dict:
    """Stage 2 (see the module docstring): train ``model.sequence`` on ``best_path``'s
    backbone and save ``best_path`` again; returns what goes into its ``extra["series_head"]``."""
    if not has_series_head(model):
        raise TypeError("train_series_head needs a model with a series head")
    started = time.monotonic()
    payload = read_checkpoint(best_path)
    # The head as created: stage 1 never runs it, so it got no gradient there.
    initial_head = {k: v.clone() for k, v in model.sequence.state_dict().items()}
    backbone = {k: v for k, v in payload["state_dict"].items() if not k.startswith("sequence.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if unexpected or any(not k.startswith("sequence.") for k in missing):
        raise TrainingError(f"{best_path} does not fit the model: missing {missing}, unexpected {unexpected}")
    model.sequence.load_state_dict(initial_head)  # a fresh head, also when best.pt holds a trained one
    model.to(device)

    stage1 = payload.get("extra", {})
    log.info(
        "stage 1 (backbone, slice by slice): best epoch %s, validation loss %.4f, AUC(any) %s",
        stage1.get("epoch", "?"),
        float(stage1.get("val_loss", math.nan)),
        _auc_text((stage1.get("val_auc") or {}).get("any")),
    )
    unreadable: set[str] = set()
    train = _embed_dataset(model, train_set, batch_size, workers, device, unreadable)
    val = _embed_dataset(model, val_set, batch_size, workers, device, unreadable)
    before = _predict(model, val)
    before_auc = aucs(before.targets, before.probabilities)

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head_parameters = list(model.sequence.parameters())
    for parameter in head_parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(head_parameters, lr=lr)
    train_targets = torch.from_numpy(train.targets).to(device)
    train_series = torch.from_numpy(series_targets(train.targets, train.groups)).to(device)
    generator = torch.Generator().manual_seed(seed)
    # Epoch 0 is the untrained head (the backbone's answers unchanged): a head is kept only
    # if it lowers the validation loss below that.
    best_loss, best_epoch, best_state, history = before.loss, 0, dict(initial_head), []
    try:
        with _single_thread():
            for epoch in range(1, epochs + 1):
                model.eval()
                model.sequence.train()  # dropout in the head only; the backbone is not run here
                running = 0.0
                for batch in torch.randperm(len(train.groups), generator=generator).split(SERIES_PER_BATCH):
                    groups = [train.groups[i] for i in batch.tolist()]
                    rows = torch.tensor([i for g in groups for i in g], device=device)
                    slice_logits, series_logits = refine_by_series(model, train.embeddings, groups, series_per_batch=len(groups))
                    loss = nn.functional.binary_cross_entropy_with_logits(slice_logits[rows], train_targets[rows])
                    loss = loss + nn.functional.binary_cross_entropy_with_logits(series_logits, train_series[batch.to(device)])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    running += loss.item() * len(groups)
                val_loss = _predict(model, val).loss
                history.append({"epoch": epoch, "train_loss": running / max(1, len(train.groups)), "val_loss": val_loss})
                if val_loss < best_loss:
                    best_loss, best_epoch = val_loss, epoch
                    best_state = {k: v.detach().clone() for k, v in model.sequence.state_dict().items()}
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    if best_state is not None:
        model.sequence.load_state_dict(best_state)
    after = _predict(model, val)
    after_auc = aucs(after.targets, after.probabilities)
    summary = {
        "epochs": epochs,
        "best_epoch": best_epoch,
        "lr": lr,
        "train_series": len(train.groups),
        "val_series": len(val.groups),
        "val_loss_before": before.loss,
        "val_loss_after": after.loss,
        "val_auc_before": before_auc,
        "val_auc_after": after_auc,
        "history": history,
        "seconds": time.monotonic() - started,
    }
    extra = dict(payload.get("extra", {}))
    extra["series_head"] = summary
    save_checkpoint(
        best_path,
        model,
        payload["model"],
        model_kwargs=payload.get("model_kwargs"),
        thresholds=youden_thresholds(after.targets, after.probabilities),
        preprocessing=train_set.settings,
        extra=extra,
    )
    log.info(
        "stage 2 (series head): %d series, %d head epochs (best %d): validation loss %.4f -> %.4f, AUC(any) %s -> %s (%.0f s) -> %s",
        len(train.groups),
        epochs,
        best_epoch,
        before.loss,
        after.loss,
        _auc_text(before_auc["any"]),
        _auc_text(after_auc["any"]),
        summary["seconds"],
        best_path,
    )
    if best_epoch == 0:
        log.warning("no head epoch lowered the validation loss (%.4f): the head stays at zero, as ichnet", before.loss)
    return summary


def _auc_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
