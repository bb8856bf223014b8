"""The model side of the pipeline: preprocessing hook + model + thresholds on one device."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import pluggy
import torch

from ichscan.labels import LABELS
from ichscan.models import LoadedModel, has_series_head
from ichscan.pipeline.sizing import autocast_dtype, fit_batch_size, resolve_device
from ichscan.records import DecodedSlice, Prediction, SliceResult, Status

log = logging.getLogger(__name__)


def slice_context(model: torch.nn.Module) -> int:
    """Neighbouring slices per side a model wants (its ``slice_context`` attribute; 0 when absent)."""
    value = getattr(model, "slice_context", 0) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"model attribute slice_context must be a whole number >= 0, not {value!r}")
    return value


class Screener:
    """Preprocessing hook + model + thresholds on one device.

    A model with ``slice_context = k`` gets, for each slice, the ``2k + 1`` slices around
    it (see :meth:`screen`), ``k`` below it and ``k`` above it in position order.

    With ``saliency``, :meth:`screen` also gives each positive slice a Grad-CAM heat map
    of its top finding (``SliceResult.heatmap``, see :mod:`ichscan.saliency`); a model
    without a convolution then raises :class:`ichscan.saliency.SaliencyError` here.
    """

    def __init__(
        self, pm: pluggy.PluginManager, loaded: LoadedModel, device: torch.device | str = "auto", *, saliency: bool = False
    ):
        self.pm = pm
        self.loaded = loaded
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.thresholds = loaded.thresholds
        self.settings = loaded.preprocessing
        self.context = slice_context(loaded.model)
        #: A model with a series head: :meth:`screen` gives embeddings, :meth:`refine` the
        #: predictions, a whole series at a time.
        self.series_head = has_series_head(loaded.model)
        # channels-last is the faster convolution layout on both CPU and GPU.
        self.channels_last = True
        self.model = loaded.model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.amp_dtype = autocast_dtype(self.device)
        self.grad_cam = None
        if saliency:
            from ichscan.saliency import GradCam  # only with --saliency

            self.grad_cam = GradCam(self.model, self.context)

    def model_input(self, pixels: Sequence[np.ndarray], slopes: Sequence[float], intercepts: Sequence[float]) -> torch.Tensor:
        """The model's input for stored pixel arrays: ``(N, (2k+1)·C, S, S)``.

        With ``slice_context = k`` the arrays come slice by slice, each slice's ``2k + 1``
        neighbours in position order (``len(pixels) == N * (2k + 1)``), and channel
        ``j * C + c`` of the result is window ``c`` of neighbour ``j``. A preprocess hook
        may return one image per array, ``(N * (2k+1), C, S, S)``: the neighbours are
        then stacked into channels here.
        """
        batch = self.pm.hook.ichscan_preprocess(
            pixels=pixels,
            slopes=slopes,
            intercepts=intercepts,
            settings=self.settings,
            device=self.device,
            channels_last=self.channels_last,
            context=self.context,
        )
        group = 2 * self.context + 1
        if group > 1 and batch.shape[0] == len(pixels):
            n, c, h, w = batch.shape
            batch = batch.reshape(n // group, group * c, h, w)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def predict(self, pixels: Sequence[np.ndarray], slopes: Sequence[float], intercepts: Sequence[float]) -> np.ndarray:
        """Probabilities ``(N, 6)`` for stored pixel arrays (laid out as :meth:`model_input` says)."""
        with torch.inference_mode():
            return self._probabilities(self.model_input(pixels, slopes, intercepts))

    def _probabilities(self, batch: torch.Tensor) -> np.ndarray:
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        with autocast:
            logits = self.model(batch)
        # One copy back per batch.
        return torch.sigmoid(logits.float()).cpu().numpy()

    def _predict_keeping_input(
        self, pixels: Sequence[np.ndarray], slopes: Sequence[float], intercepts: Sequence[float]
    ) -> tuple[np.ndarray, torch.Tensor]:
        """:meth:`predict`, and the model input, for the saliency of the positive slices:
        under ``no_grad`` rather than ``inference_mode``, whose tensors autograd refuses."""
        with torch.no_grad():
            batch = self.model_input(pixels, slopes, intercepts)
            return self._probabilities(batch), batch

    def saliency(self, batch: torch.Tensor, labels: Sequence[str]) -> list[np.ndarray]:
        """Grad-CAM heat maps for model inputs (rows of :meth:`model_input`), one label each.

        Runs in float32, without autocast: gradients in half precision are coarse, and
        only positive slices get here.
        """
        if self.grad_cam is None:
            raise RuntimeError("this screener was built without saliency")
        return self.grad_cam(batch, [LABELS.index(label) for label in labels])

    def fit_batch_size(self, preferred: int, probe: int = 8, side: int = 512) -> int:
        """On a GPU: the batch size that fits its free memory, at most ``preferred``.

        Runs ``probe`` blank ``side`` x ``side`` slices through preprocessing and the
        model (which also warms both up), takes the peak memory per image and fits a
        batch into half of what is free. On the CPU: ``preferred``.
        """
        if self.device.type != "cuda":
            return preferred
        device = self.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        images = probe * (2 * self.context + 1)
        self.predict([np.zeros((side, side), np.int16)] * images, [1.0] * images, [-1024.0] * images)
        torch.cuda.synchronize(device)
        per_image = -(-(torch.cuda.max_memory_allocated(device) - base) // probe)
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks torch's caching allocator holds but does not use are free for us too.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        size = fit_batch_size(free, per_image, preferred)
        log.info(
            "GPU batch %d (%.1f MiB per image, %.0f MiB free on %s)",
            size,
            per_image / 2**20,
            free / 2**20,
            torch.cuda.get_device_name(device),
        )
        return size

    def screen(
        self, decoded: Sequence[DecodedSlice], neighbours: Sequence[Sequence[DecodedSlice]] | None = None
    ) -> list[SliceResult]:
        """Results for decoded slices; only ``ok`` ones go through the model.

        ``neighbours[i]`` are the ``2k + 1`` slices around ``decoded[i]`` in position
        order (the slice itself in the middle); without them (or for a model with no
        slice context) each slice stands for all of its neighbours.
        """
        results = [SliceResult.of(d) for d in decoded]
        ok = [i for i, r in enumerate(results) if r.status == Status.OK]
        if not ok:
            return results
        group = 2 * self.context + 1
        stack: list[DecodedSlice] = []
        for i in ok:
            around = neighbours[i] if neighbours is not None and neighbours[i] else None
            if around is not None and len(around) != group:
                raise ValueError(f"{len(around)} neighbours given for a model with slice_context {self.context}")
            stack.extend(around if around is not None else [decoded[i]] * group)
        arrays = ([s.pixels for s in stack], [s.slope for s in stack], [s.intercept for s in stack])
        batch = None
        try:
            if self.series_head:
                return self._embed(results, ok, arrays)
            if self.grad_cam is None:
                probs = self.predict(*arrays)
            else:
                probs, batch = self._predict_keeping_input(*arrays)
        except Exception as exc:  # noqa: BLE001 - a failed batch becomes error rows, the run goes on
            log.error("model failed on a batch of %d: %s: %s", len(ok), type(exc).__name__, exc)
            for i in ok:
                results[i].fail(f"model failed: {type(exc).__name__}: {exc}")
            return results
        for i, row in zip(ok, probs, strict=True):
            results[i].prediction = Prediction.from_probabilities(row, self.thresholds)
        if batch is not None:
            self._add_heatmaps([results[i] for i in ok], batch)
        return results

    def _embed(self, results: list[SliceResult], ok: list[int], arrays) -> list[SliceResult]:
        """A series-head model's half of :meth:`screen`: each ``ok`` slice gets its embedding
        (no prediction yet); with saliency, the slices the backbone alone finds positive
        get the heat map of its top finding (kept if the refined slice is positive too)."""
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        with torch.no_grad() if self.grad_cam is not None else torch.inference_mode():
            batch = self.model_input(*arrays)
            with autocast:
                embeddings = self.model.embed(batch)
            embeddings = embeddings.float()
            backbone = torch.sigmoid(self.model.head(embeddings)).cpu().numpy() if self.grad_cam is not None else None
        for i, row in zip(ok, embeddings.cpu().numpy(), strict=True):
            results[i].embedding = row
        if backbone is not None:
            screened = [results[i] for i in ok]
            for result, row in zip(screened, backbone, strict=True):
                result.prediction = Prediction.from_probabilities(row, self.thresholds)
            self._add_heatmaps(screened, batch)
            for result in screened:
                result.prediction = None
        return results

    def refine(self, series: Sequence[SliceResult]) -> None:
        """A series-head model: predictions for the ``ok`` slices of one whole series (in
        position order, each with its embedding from :meth:`screen`), refined by the
        series, each with the series' own probability (``Prediction.series_any``).

        A failure turns the series' slices into error rows, as a failed batch does.
        """
        members = [r for r in series if r.status == Status.OK and r.embedding is not None]
        if not members:
            return
        try:
            with torch.inference_mode():
                embeddings = torch.from_numpy(np.stack([r.embedding for r in members])).to(self.device)[None]
                refined, whole = self.model.refine(embeddings)
                probs = torch.sigmoid(refined[0].float()).cpu().numpy()
                series_any = float(torch.sigmoid(whole[0, LABELS.index("any")].float()))
        except Exception as exc:  # noqa: BLE001 - the series becomes error rows, the run goes on
            log.error("series head failed on a series of %d: %s: %s", len(members), type(exc).__name__, exc)
            for result in members:
                result.fail(f"model failed: {type(exc).__name__}: {exc}")
                result.embedding = None
            return
        for result, row in zip(members, probs, strict=True):
            result.prediction = Prediction.from_probabilities(row, self.thresholds, series_any=series_any)
            result.embedding = None
            if result.heatmap is not None and not result.is_positive:
                result.heatmap = None

    def _add_heatmaps(self, screened: list[SliceResult], batch: torch.Tensor) -> None:
        """Heat maps for the positive ones of ``screened`` (row j of ``batch`` is result j)."""
        rows = [j for j, result in enumerate(screened) if result.is_positive]
        if not rows:
            return
        try:
            index = torch.as_tensor(rows, device=batch.device)
            maps = self.saliency(batch.index_select(0, index), [screened[j].top_label for j in rows])
        except Exception as exc:  # noqa: BLE001 - the rows stand without their heat maps
            log.error("saliency failed on %d positive slices: %s: %s", len(rows), type(exc).__name__, exc)
            return
        for j, heatmap in zip(rows, maps, strict=True):
            frame = screened[j].image.frame if screened[j].image is not None else None
            if frame is not None:  # a framed input: the map goes back over the whole image
                from ichscan.imaging import unframe_heatmap

                top, left, side, image_rows, image_cols = frame
                heatmap = unframe_heatmap(heatmap, (top, left, side), (image_rows, image_cols))
            screened[j].heatmap = heatmap
