"""The one preprocessing function: stored pixels -> HU -> 224x224 -> three CT windows.

Used unchanged by inference on the CPU, inference on a GPU and training, so the model
always sees the same numbers for the same file. It works on batches, on any device:
decode workers hand over stored values plus rescale, and all arithmetic runs here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

#: (centre, width) in HU: brain, subdural, bone; the windows the top RSNA 2019 entries used.
DEFAULT_WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))
DEFAULT_SIZE = 224
#: Devices that receive stored values at their stored width and widen them there (a GPU:
#: half the bytes of float32 over PCIe); the CPU widens while it stacks. Tests add "cpu"
#: to run the GPU route's host side on the CPU.
STAGED_DEVICES = frozenset({"cuda"})


@dataclass(frozen=True)
class PreprocessSettings:
    """What the model expects; saved in every checkpoint.

    Each window maps ``[centre - width/2, centre + width/2]`` HU to ``[0, 1]``, clipped;
    that is the whole normalisation (no ImageNet statistics: no pretrained weights).
    """

    windows: tuple[tuple[float, float], ...] = field(default=DEFAULT_WINDOWS)
    size: int = DEFAULT_SIZE
    #: Frame the head before resizing (:func:`ichscan.imaging.frame_stored`): the head then
    #: fills the model's input whatever the field of view. ``ichscan train`` turns it on;
    #: off for checkpoints made before it existed (they say nothing about it).
    crop: bool = False

    def to_dict(self) -> dict:
        return {"windows": [list(w) for w in self.windows], "size": self.size, "crop": self.crop}

    @classmethod
    def from_dict(cls, data: dict | None) -> PreprocessSettings:
        if not data:
            return cls()
        windows = tuple((float(c), float(w)) for c, w in data.get("windows", DEFAULT_WINDOWS))
        return cls(windows=windows, size=int(data.get("size", DEFAULT_SIZE)), crop=bool(data.get("crop", False)))

    def __post_init__(self) -> None:
        if not self.windows or any(w <= 0 for _, w in self.windows):
            raise ValueError(f"invalid windows {self.windows}")
        if self.size < 8:
            raise ValueError(f"invalid input size {self.size}")



def window(hu: torch.Tensor, windows: Sequence[tuple[float, float]]) -> torch.Tensor:
    """Map an ``(N, 1, H, W)`` HU tensor to ``(N, len(windows), H, W)`` in ``[0, 1]``."""
    channels = [((hu - (c - w / 2.0)) / w).clamp_(0.0, 1.0) for c, w in windows]
    return torch.cat(channels, dim=1)


def preprocess(
    pixels: Sequence[np.ndarray | torch.Tensor],
    slopes: Sequence[float],
    intercepts: Sequence[float],
    settings: PreprocessSettings = PreprocessSettings(),
    device: torch.device | str = "cpu",
    *,
    channels_last: bool = False,
) -> torch.Tensor:
    """Turn stored pixel arrays into a model-ready ``(N, C, size, size)`` float32 batch.

    Parameters
    ----------
    pixels
        2-D arrays of stored values (any integer or float dtype; sizes may differ).
    slopes, intercepts
        Rescale per image: ``HU = pixels * slope + intercept``.
    settings
        Windows and output size.
    device
        Where the arithmetic runs (and where the result lives).
    channels_last
        Return the batch in channels-last memory format (faster convolutions on CPU).

    Notes
    -----
    HU is resized first (bilinear, antialiased) and windowed after: one channel to
    resize instead of three. Images of the same shape are processed together, with one
    resize call. On a GPU the stored values go over at their stored width
    (from the shared-memory views into one pinned buffer, then an asynchronous copy);
    widening, rescale, resize and windows all run there.
    """
    device = torch.device(device)
    n = len(pixels)
    size = settings.size
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, len(settings.windows), size, size), dtype=torch.float32, device=device, memory_format=layout)
    if n == 0:
        return out
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, arr in enumerate(pixels):
        if arr.ndim != 2:
            raise ValueError(f"image {i} has shape {tuple(arr.shape)}, expected 2-D")
        groups.setdefault(tuple(arr.shape), []).append(i)
    for shape, index in groups.items():
        # The small rescale tensors first: on a GPU their (pageable, blocking) copies would
        # otherwise wait for the large asynchronous copy of the pixels.
        scale = torch.tensor([float(slopes[i]) for i in index], dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        shift = torch.tensor([float(intercepts[i]) for i in index], dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        raw = _stack(pixels, index, device)
        stored = raw.view(len(index), 1, *shape)
        if shape != (size, size):
            # Resizing is linear with weights summing to 1, so resizing stored values and
            # rescaling after gives the same HU as the other way round, on 5x fewer pixels.
            stored = F.interpolate(stored, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        hu = stored.mul_(scale).add_(shift)  # ``raw`` is a fresh buffer: in place is safe
        if len(groups) == 1:  # the usual case: no scatter (on a GPU, no index upload)
            return out.copy_(window(hu, settings.windows))
        out[torch.as_tensor(index, device=device)] = window(hu, settings.windows)
    return out


def _stack(pixels: Sequence[np.ndarray | torch.Tensor], index: list[int], device: torch.device) -> torch.Tensor:
    """Stack same-shaped images into one float32 tensor on ``device`` (one conversion pass)."""
    first = pixels[index[0]]
    if device.type in STAGED_DEVICES:
        return _widen(*_stack_stored(pixels, index, pin=device.type == "cuda"), device)
    batch = torch.empty((len(index), *first.shape), dtype=torch.float32)
    for row, i in enumerate(index):
        batch[row].copy_(_as_tensor(pixels[i]))
    return batch if device.type == "cpu" else batch.to(device)


def _stack_stored(
    pixels: Sequence[np.ndarray | torch.Tensor], index: list[int], *, pin: bool
) -> tuple[torch.Tensor, bool]:
    """Same-shaped images at their stored width in one host tensor (pinned for a GPU).

    One copy per image, straight from the arrays the workers handed over (shared-memory
    views included). uint16 travels as its int16 bit pattern (torch's uint16 kernels are
    partial); the flag says so. The pinned block is recycled by torch's caching host
    allocator only after the copy that reads it has finished on the GPU.
    """
    tensors = [_as_tensor(pixels[i]) for i in index]
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:  # e.g. int16 and uint16 slices of one size: one wider buffer
        common = functools.reduce(torch.promote_types, (torch.int32 if d == torch.uint16 else d for d in dtypes))
        tensors = [t.to(common) for t in tensors]
    unsigned16 = tensors[0].dtype == torch.uint16
    if unsigned16:
        tensors = [t.view(torch.int16) for t in tensors]
    host = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=pin)
    torch.stack(tensors, out=host)
    return host, unsigned16


def _widen(host: torch.Tensor, unsigned16: bool, device: torch.device) -> torch.Tensor:
    """Copy stored values to ``device`` (asynchronously from pinned memory), then float32."""
    stored = host.to(device, non_blocking=True)
    if unsigned16:
        stored = stored.to(torch.int32).bitwise_and_(0xFFFF)
    return stored.float()


def _as_tensor(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(arr, torch.Tensor):
        return arr
    if arr.dtype == np.uint32:  # torch has no general uint32 support
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(arr))
