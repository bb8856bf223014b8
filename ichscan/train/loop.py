"""``ichscan train``: split by patient, balanced sampling, checkpoint at the best validation loss."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pluggy
import torch
from torch import nn
from torch.utils.data import DataLoader

from ichscan.default_plugins.ichnet import has_series_head
from ichscan.durable import replacing
from ichscan.pipeline.progress import Progress
from ichscan.pipeline.screener import slice_context
from ichscan.pipeline.sizing import autocast_dtype, cpu_count, resolve_device
from ichscan.labels import LABELS
from ichscan.models import DEFAULT_MODEL, create_model, save_checkpoint, train_defaults
from ichscan.plugins import get_plugin_manager
from ichscan.preprocess import PreprocessSettings
from ichscan.train.dataset import RSNADataset, SafeView, collate_skipping, match_items, read_rsna_labels
from ichscan.train.distributed import RankBatches, Ranks, barrier, gather, init_distributed, shard, shutdown, step_totals
from ichscan.train.metrics import aucs, plot_history, weighted_log_loss, youden_thresholds
from ichscan.train.sampler import BalancedSampler
from ichscan.train.split import images_in, patient_key, read_split, split_by_patient, write_split

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_weighted_log_loss", *(f"val_auc_{label}" for label in LABELS), "lr", "seconds")


class TrainingError(Exception):
    """Training could not start; the message says why."""


class Interrupted(Exception):
    """Ctrl-C: a resumable checkpoint was saved."""


@dataclass
class TrainOptions:
    data_dir: Path
    labels: Path
    out_dir: Path
    #: epochs, batch_size, lr: None takes the model's own default (:func:`ichscan.models.train_defaults`).
    epochs: int | None = None
    model_name: str = DEFAULT_MODEL
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    device: str = "auto"
    cache_dir: Path | None = None  # default: <out_dir>/cache
    cache: bool = True
    resume: bool = False
    augment: bool = True
    workers: int | None = None  # DataLoader workers; default: one per core
    warmup_fraction: float = 0.05
    progress: bool = True
    #: Framing on the head (``crop``) is on for new training runs; checkpoints record it.
    settings: PreprocessSettings = field(default_factory=lambda: PreprocessSettings(crop=True))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 10 % to 100 % over ``warmup`` steps, then cosine down to 0."""
    if warmup > 0 and step < warmup:
        return 0.1 + 0.9 * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def resolve_train_defaults(opts: TrainOptions, pm: pluggy.PluginManager) -> str:
    """Fill ``epochs``, ``lr`` and ``batch_size`` left at None from the model's defaults;
    return a line saying what was taken from where (``ichscan train`` prints it)."""
    defaults = train_defaults(pm, opts.model_name)
    said = []
    for key, flag, what in (("epochs", "--epochs", "epochs"), ("lr", "--lr", "learning rate"), ("batch_size", "--batch-size", "batch size")):
        given = getattr(opts, key) is not None
        if not given:
            setattr(opts, key, defaults[key])
        said.append(f"{what} {getattr(opts, key):g} ({flag if given else 'model default'})")
    return f"training {opts.model_name}: {', '.join(said)}"


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on a GPU (as in screening), a no-op on the CPU."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _cache_key(split: str, ids: list[str], settings: PreprocessSettings) -> str:
    digest = hashlib.sha1(json.dumps([ids, settings.to_dict()]).encode()).hexdigest()[:12]
    return f"{split}-{digest}"


def _loader(dataset: RSNADataset, batch_size: int, workers: int, sampler=None, batch_sampler=None) -> DataLoader:
    if batch_sampler is not None:  # batches chosen by the sampler (training: this rank's share of each step)
        return DataLoader(SafeView(dataset), batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_skipping)
    return DataLoader(
        SafeView(dataset),
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_skipping,
        persistent_workers=False,
    )


class _StopFlag:
    """SIGINT sets a flag; the loop stops after the current batch and saves."""

    def __init__(self) -> None:
        self.set = False
        self._previous: Callable | int | None = None

    def __enter__(self) -> _StopFlag:
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handler(self, signum, frame) -> None:
        if self.set:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.set = True
        log.warning("interrupted: finishing this batch, then saving a resumable checkpoint (Ctrl-C again to abort)")


def predict_loader(model: nn.Module, loader: DataLoader, device: torch.device, unreadable: set[str]) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """Probabilities, targets, ids and mean BCE loss over a loader (no gradients)."""
    probs, targets, ids, total_loss, count = _predict(model, loader, device, unreadable)
    if not ids:
        raise TrainingError("no readable images to evaluate")
    return probs, targets, ids, total_loss / max(1, count)


def _predict(model: nn.Module, loader: DataLoader, device: torch.device, unreadable: set[str]) -> tuple[np.ndarray, np.ndarray, list[str], float, int]:
    """Probabilities, targets, ids, summed BCE loss and its count (empty arrays for no images)."""
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    model.eval()
    probs, targets, ids = [], [], []
    total_loss, count = 0.0, 0
    with torch.inference_mode():
        for inputs, target, batch_ids in readable_batches(loader, device, unreadable):
            target = target.to(device)
            with _autocast(device):
                logits = model(inputs)
            logits = logits.float()
            total_loss += float(loss_fn(logits, target))
            count += target.numel()
            probs.append(torch.sigmoid(logits).cpu().numpy())
            targets.append(target.cpu().numpy())
            ids.extend(batch_ids)
    if not probs:
        return np.zeros((0, len(LABELS)), np.float32), np.zeros((0, len(LABELS)), np.float32), [], 0.0, 0
    return np.concatenate(probs), np.concatenate(targets), ids, total_loss, count


def _validate(model: nn.Module, val_set: RSNADataset, batch_size: int, workers: int, device: torch.device, unreadable: set[str], ranks: Ranks):
    """:func:`predict_loader` on the validation set, split across the ranks and gathered on
    every rank (each then takes the same decisions from the same numbers)."""
    if not ranks.enabled:
        return predict_loader(model, _loader(val_set, batch_size, workers), device, unreadable)
    parts = gather(ranks, _predict(model, _loader(val_set, batch_size, workers, sampler=shard(range(len(val_set)), ranks)), device, unreadable))
    ids = [i for part in parts for i in part[2]]
    if not ids:
        raise TrainingError("no readable images to evaluate")
    probs = np.concatenate([part[0] for part in parts])
    targets = np.concatenate([part[1] for part in parts])
    return probs, targets, ids, sum(part[3] for part in parts) / max(1, sum(part[4] for part in parts))


def readable_batches(loader: DataLoader, device: torch.device, unreadable: set[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """``(inputs on device, channels-last; targets; ids)`` per batch with readable images;
    the unreadable ones are noted (and logged once)."""
    for inputs, target, batch_ids, bad in loader:
        _note_unreadable(bad, unreadable)
        if batch_ids:
            yield inputs.to(device).contiguous(memory_format=torch.channels_last), target, batch_ids


def _note_unreadable(bad: list[str], unreadable: set[str]) -> None:
    for message in bad:
        if message not in unreadable:
            unreadable.add(message)
            log.warning("left out: %s", message)


def prepare_split(opts: TrainOptions, labels: dict[str, np.ndarray], write: bool = True) -> dict[str, str]:
    """The 80/10/10 split by patient (``split.csv`` on --resume); every rank of a
    distributed run computes the same one, rank 0 writes it (``write``)."""
    split_path = opts.out_dir / "split.csv"
    if opts.resume and split_path.exists():
        return read_split(split_path)
    items = match_items(opts.data_dir, labels)
    if not items:
        raise TrainingError(f"no labelled images found under {opts.data_dir}")
    patients = {item.image_id: patient_key(item.path) for item in items}
    assignment = split_by_patient(patients, opts.seed)
    if write:
        write_split(split_path, assignment, patients)
    return assignment


def run_training(opts: TrainOptions, pm: pluggy.PluginManager | None = None) -> dict:
    """Train; returns a summary (best epoch, its validation loss and AUCs, paths).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this, as one distributed
    data-parallel run (see :mod:`ichscan.train.distributed`); rank 0 writes the run folder.

    Raises
    ------
    TrainingError
        When training cannot start (no data, bad labels, nothing to resume).
    Interrupted
        After Ctrl-C, once ``last.pt`` (resumable) is saved.
    """
    pm = pm or get_plugin_manager()
    ranks, device = init_distributed(resolve_device(opts.device))
    try:
        return _train(opts, pm, ranks, device)
    finally:
        shutdown(ranks)


def _train(opts: TrainOptions, pm: pluggy.PluginManager, ranks: Ranks, device: torch.device) -> dict:
    log.info("%s", resolve_train_defaults(opts, pm))
    assert opts.epochs is not None and opts.batch_size is not None and opts.lr is not None
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed % (2**32))
    # The ranks on one node share its cores: threads and loader workers divided among them.
    cores = max(1, cpu_count() // ranks.local_world)
    if ranks.enabled and device.type == "cpu":
        torch.set_num_threads(cores)
    workers = (cores if ranks.enabled else cpu_count()) if opts.workers is None else opts.workers
    labels = read_rsna_labels(opts.labels)
    assignment = prepare_split(opts, labels, write=ranks.main)
    train_ids, val_ids = images_in(assignment, "train"), images_in(assignment, "validation")
    if not train_ids or not val_ids:
        raise TrainingError(f"too few patients to split: {len(train_ids)} training and {len(val_ids)} validation images")
    cache_dir = (opts.cache_dir or opts.out_dir / "cache") if opts.cache else None
    settings = opts.settings
    model = create_model(pm, opts.model_name).to(device).to(memory_format=torch.channels_last)
    context = slice_context(model)
    if not ranks.main:
        barrier(ranks)  # rank 0 creates the cache files first (their sizing truncates them)
    # The cache holds single slices, whatever the context: its key needs no k.
    train_set = RSNADataset(
        opts.data_dir, labels, train_ids, settings, cache_dir, augment=opts.augment, cache_key=_cache_key("train", train_ids, settings), context=context
    )
    val_set = RSNADataset(opts.data_dir, labels, val_ids, settings, cache_dir, cache_key=_cache_key("validation", val_ids, settings), context=context)
    if ranks.main:
        barrier(ranks)
    log.info(
        "training on %d images, validating on %d (split by patient: %s)%s",
        len(train_set),
        len(val_set),
        opts.out_dir / "split.csv",
        f"; each with {context} neighbouring slice(s) per side" if context else "",
    )

    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    sampler = BalancedSampler(train_set.targets, seed=opts.seed)
    steps_per_epoch = math.ceil(len(sampler) / opts.batch_size)
    total_steps = steps_per_epoch * opts.epochs
    warmup = int(opts.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup))
    # Summed, then divided by the step's image count over all ranks: the mean over the
    # global batch, however the images fall between the ranks.
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    # fp16 autocast needs loss scaling against underflowing gradients; bf16 and float32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(device) == torch.float16)

    history: list[dict] = []
    best_loss, best_epoch, start_epoch, skip_steps = math.inf, 0, 1, 0
    last_path, best_path = opts.out_dir / "last.pt", opts.out_dir / "best.pt"
    if opts.resume:
        if not last_path.exists():
            raise TrainingError(f"nothing to resume: {last_path} does not exist")
        try:  # weights_only: a tampered last.pt runs no code, it is refused
            state = torch.load(last_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch's unpickling errors run to paragraphs
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise TrainingError(f"cannot resume from {last_path}: not a checkpoint ichscan saved ({type(exc).__name__}: {first})") from None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        history, best_loss, best_epoch = state["history"], state["best_loss"], state["best_epoch"]
        start_epoch, skip_steps = state["epoch"], state["step"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resuming at epoch %d, step %d", start_epoch, skip_steps)

    def save_last(epoch: int, step: int) -> None:
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "history": history,
            "best_loss": best_loss,
            "best_epoch": best_epoch,
            "epoch": epoch,
            "step": step,
            "torch_rng": torch.get_rng_state(),
            "options": {"model": opts.model_name, "epochs": opts.epochs, "lr": opts.lr, "batch_size": opts.batch_size, "seed": opts.seed},
        }
        if ranks.main:
            with replacing(last_path) as tmp:
                torch.save(payload, tmp)

    net: nn.Module = model
    if ranks.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    batches = RankBatches(sampler, opts.batch_size, ranks)
    idle_input: torch.Tensor | None = None  # a rank with no images in a step still takes part

    unreadable: set[str] = set()
    with _StopFlag() as stop:
        for epoch in range(start_epoch, opts.epochs + 1):
            started = time.monotonic()
            sampler.set_epoch(epoch, skip=skip_steps * opts.batch_size)
            model.train()
            progress = Progress(total=len(sampler), enabled=opts.progress and ranks.main, label=f"epoch {epoch}/{opts.epochs}", unit="images")
            running, seen, step, stopping = 0.0, 0, skip_steps, False
            try:
                for inputs, targets, ids, bad in _loader(train_set, opts.batch_size, workers, batch_sampler=batches):
                    _note_unreadable(bad, unreadable)
                    total, stopping = step_totals(ranks, len(ids), stop.set, device)
                    if total:
                        if ids:
                            inputs = inputs.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                            targets = targets.to(device, non_blocking=True)
                            idle_input = torch.zeros_like(inputs[:1])
                        else:  # nothing readable here this step: a zero loss, so the gradients still meet
                            inputs = idle_input if idle_input is not None else _first_input(train_set, device)
                            targets = torch.zeros((inputs.shape[0], len(LABELS)), device=device)
                        optimizer.zero_grad(set_to_none=True)
                        with _autocast(device):
                            logits = net(inputs)
                        summed = loss_fn(logits.float(), targets) * (1.0 if ids else 0.0)
                        # DDP averages the ranks' gradients: times world, the global batch's mean.
                        loss = summed * (ranks.world / (total * len(LABELS)))
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                        running += summed.item() / len(LABELS)
                        seen += len(ids)
                    scheduler.step()
                    step += 1
                    progress.update(len(ids) + len(bad))
                    if stopping:
                        break
            except RuntimeError:
                if not stop.set:  # a DataLoader worker killed by the same Ctrl-C
                    raise
            progress.close()
            if stopping or stop.set:
                save_last(epoch, step)
                raise Interrupted(f"interrupted in epoch {epoch}; resume with --resume (saved {last_path})")
            skip_steps = 0
            probs, targets_np, _, val_loss = _validate(model, val_set, opts.batch_size, workers, device, unreadable, ranks)
            val_aucs = aucs(targets_np, probs)
            trained = gather(ranks, (running, seen))
            row = {
                "epoch": epoch,
                "train_loss": sum(t[0] for t in trained) / max(1, sum(t[1] for t in trained)),
                "val_loss": val_loss,
                "val_weighted_log_loss": weighted_log_loss(targets_np, probs),
                **{f"val_auc_{label}": val_aucs[label] for label in LABELS},
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.monotonic() - started,
            }
            history.append(row)
            improved = val_loss < best_loss
            if improved:
                best_loss, best_epoch = val_loss, epoch
            if improved and ranks.main:
                save_checkpoint(
                    best_path,
                    model,
                    opts.model_name,
                    thresholds=youden_thresholds(targets_np, probs),
                    preprocessing=settings,
                    extra={
                        "epoch": epoch,
                        "val_loss": val_loss,
                        "val_auc": val_aucs,
                        "trained_on": str(opts.data_dir),
                        "train": {"epochs": opts.epochs, "lr": opts.lr, "batch_size": opts.batch_size},
                    },
                )
            save_last(epoch + 1, 0)
            if ranks.main:
                _write_history(opts.out_dir / "history.csv", history)
                plot_history(opts.out_dir / "loss_curve.png", history)
            auc_text = ", ".join(f"{k} {v:.3f}" for k, v in val_aucs.items() if v is not None)
            log.info(
                "epoch %d/%d: train loss %.4f, validation loss %.4f%s, AUC %s (%.0f s)",
                epoch,
                opts.epochs,
                row["train_loss"],
                val_loss,
                " (best, saved)" if improved else "",
                auc_text,
                row["seconds"],
            )
    summary = {"best_epoch": best_epoch, "best_val_loss": best_loss, "best": str(best_path), "history": history, "unreadable": len(unreadable)}
    if ranks.enabled:
        barrier(ranks)  # best.pt is written
    if has_series_head(model) and ranks.main:
        # Stage 2: the head on the frozen backbone of best.pt. Rerun in full on --resume (it
        # starts from best.pt's backbone and a fresh head, and takes seconds beyond the
        # embedding pass). Imported here: series_head builds on this module's helpers.
        from ichscan.train.series_head import train_series_head

        if not best_path.exists():
            raise TrainingError(f"no {best_path} to train the series head on (no epoch improved the validation loss)")
        summary["series_head"] = train_series_head(
            best_path, model, train_set, val_set, batch_size=opts.batch_size, workers=workers, device=device, seed=opts.seed
        )
    return summary


def _write_history(path: Path, history: list[dict]) -> None:
    with replacing(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if v is None else (f"{v:.6f}" if isinstance(v, float) else v)) for k, v in row.items()})


def _first_input(dataset: RSNADataset, device: torch.device) -> torch.Tensor:
    """A zero input of the model's shape (for a step where this process has no image)."""
    shape = (1, len(dataset.settings.windows) * (2 * dataset.context + 1), dataset.settings.size, dataset.settings.size)
    return torch.zeros(shape, device=device).contiguous(memory_format=torch.channels_last)
