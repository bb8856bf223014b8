"""RSNA-layout labels and the training/evaluation dataset.

Layout: a labels CSV with header ``ID,Label`` and rows ``ID_<image>_<label>,<0|1>`` (six per
image, labels as in :data:`ichscan.LABELS`), and images ``ID_<image>.dcm`` anywhere under a
data folder (``stage_2_train/`` in the RSNA download).

The dataset decodes through :func:`ichscan.dicom.decode_many` and preprocesses with
:func:`ichscan.preprocess.preprocess` (the built-in ``ichscan_preprocess``), exactly as
``ichscan batch`` does on the CPU, so training and inference see the same numbers for the
same file. For a model with ``slice_context = k`` each input is the slice with its ``2k``
neighbours, found by the pipeline's own series logic (:func:`ichscan.pipeline.series.neighbour_indexes`).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ichscan.dicom import OK, decode_many, read_header_instance
from ichscan.labels import LABELS
from ichscan.pipeline.series import neighbour_indexes, repeat_nearest
from ichscan.records import Instance
from ichscan.preprocess import PreprocessSettings, preprocess

log = logging.getLogger(__name__)


class LabelsError(ValueError):
    """The labels CSV is malformed; the message names the line."""


def read_rsna_labels(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Parse an RSNA labels CSV into ``image id -> float32 array of 6 labels``.

    Identical duplicate rows are collapsed; a duplicate with another value, a malformed
    row, an unknown label or an image without all six labels is an error.

    Raises
    ------
    LabelsError
        With the file, line number and what is wrong.
    """
    path = Path(path)
    values: dict[str, dict[str, int]] = {}
    duplicates = 0
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise LabelsError(f"cannot read labels {path}: {exc.strerror or exc}") from None
    with fh:
        rows = _csv_rows(csv.reader(fh), path)
        _, header = next(rows, (1, None))
        if header is None or [h.strip() for h in header[:2]] != ["ID", "Label"]:
            raise LabelsError(f"{path}:1: expected the header 'ID,Label', got {','.join(header or [])[:200]!r}")
        for line, row in rows:
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise LabelsError(f"{path}:{line}: expected 2 columns, got {len(row)}")
            key, value = row[0].strip(), row[1].strip()
            image, sep, label = key.rpartition("_")
            if not sep or not image.startswith("ID_") or label not in LABELS:
                raise LabelsError(f"{path}:{line}: {key[:200]!r} is not ID_<image>_<label> with a known label")
            if value not in ("0", "1"):
                raise LabelsError(f"{path}:{line}: label value {value[:200]!r} is not 0 or 1")
            seen = values.setdefault(image, {})
            if label in seen:
                if seen[label] != int(value):
                    raise LabelsError(f"{path}:{line}: {key!r} is given as both {seen[label]} and {value}")
                duplicates += 1
                continue
            seen[label] = int(value)
    if duplicates:
        log.info("%s: collapsed %d duplicate rows", path, duplicates)
    result: dict[str, np.ndarray] = {}
    for image, labels in values.items():
        missing = [label for label in LABELS if label not in labels]
        if missing:
            raise LabelsError(f"{path}: {image!r} has no row for {', '.join(missing)}")
        result[image] = np.array([labels[label] for label in LABELS], dtype=np.float32)
    if not result:
        raise LabelsError(f"{path}: no labels")
    return result


def _csv_rows(reader, path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line, row)`` of a labels CSV, the line where the row ends (a quoted cell may span
    lines); LabelsError for text that is not UTF-8 or not CSV (csv.Error is no ValueError)."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError:
            raise LabelsError(f"{path}: not UTF-8 text (after line {reader.line_num})") from None
        except csv.Error as exc:
            raise LabelsError(f"{path}:{reader.line_num}: not a CSV file: {exc}") from None
        yield reader.line_num, row


def find_images(data_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """``image id -> path`` for every ``ID_*.dcm`` under ``data_dir`` (first one wins)."""
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("ID_") and name.endswith(".dcm"):
                found.setdefault(name[:-4], Path(root) / name)
    return found


@dataclass(frozen=True)
class Item:
    image_id: str
    path: Path
    target: np.ndarray


def match_items(data_dir: str | os.PathLike[str], labels: dict[str, np.ndarray], ids: Iterable[str] | None = None) -> list[Item]:
    """Items for labelled images that exist under ``data_dir``; missing ones are logged once."""
    files = find_images(data_dir)
    wanted = list(labels) if ids is None else list(ids)
    items, missing = [], []
    for image_id in wanted:
        path = files.get(image_id)
        if path is None:
            missing.append(image_id)
        else:
            items.append(Item(image_id, path, labels[image_id]))
    if missing:
        log.warning("%d labelled images have no file under %s (e.g. %s); left out", len(missing), data_dir, ", ".join(missing[:3]))
    return items


class DecodeCache:
    """Model inputs cached as uint8 (``round(x * 255)``) in a memory-mapped file.

    One fixed-size slot per dataset index plus a ``filled`` flag file, so decode
    workers of a DataLoader can fill slots independently. Epochs after the first read
    from here and decode no DICOM. Roughly 150 KB per image for 3 x 224 x 224.
    """

    def __init__(self, directory: str | os.PathLike[str], key: str, count: int, shape: tuple[int, ...]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.count, self.shape = count, shape
        self.data_path = self.directory / f"{key}.u8"
        self.flags_path = self.directory / f"{key}.filled"
        size = count * int(np.prod(shape))
        for path, nbytes in ((self.data_path, size), (self.flags_path, count)):
            if not path.exists() or path.stat().st_size != nbytes:
                with open(path, "wb") as fh:
                    fh.truncate(nbytes)
        self._data: np.memmap | None = None
        self._flags: np.memmap | None = None

    def _open(self) -> None:
        # Opened lazily, so each DataLoader worker maps the files itself.
        if self._data is None:
            self._data = np.memmap(self.data_path, dtype=np.uint8, mode="r+", shape=(self.count, *self.shape))
            self._flags = np.memmap(self.flags_path, dtype=np.uint8, mode="r+", shape=(self.count,))

    def get(self, index: int) -> torch.Tensor | None:
        self._open()
        assert self._flags is not None and self._data is not None
        if not self._flags[index]:
            return None
        return torch.from_numpy(np.array(self._data[index], dtype=np.float32)).div_(255.0)

    def put(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """Store ``tensor``; return what :meth:`get` will give back (quantised)."""
        self._open()
        assert self._flags is not None and self._data is not None
        quantised = (tensor.clamp(0, 1) * 255.0).round_().to(torch.uint8)
        self._data[index] = quantised.numpy()
        self._flags[index] = 1
        return quantised.to(torch.float32).div_(255.0)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_data"] = state["_flags"] = None
        return state


class UnreadableImage(Exception):
    """An image that cannot be decoded (status error or skipped)."""


class RSNADataset(Dataset):
    """RSNA-layout images as ``(model input, 6-label target, image id)``.

    Parameters
    ----------
    data_dir
        Folder holding ``ID_<image>.dcm`` files (searched recursively).
    labels
        Path of the labels CSV, or an already parsed ``id -> labels`` mapping.
    image_ids
        Restrict to these images (a split); default: every labelled image found.
    settings
        Preprocessing (windows, size), normally the checkpoint's.
    cache_dir
        Cache decoded, windowed inputs here (uint8, memory-mapped); None: no cache.
    augment
        Random flips, small rotations and shifts (training only).
    context
        The model's ``slice_context`` ``k``: each input is ``(2k+1)·C`` channels, the slice
        and its neighbours along the slice normal, lowest first, as the pipeline gives them
        to the model (:meth:`model_input`).

    Notes
    -----
    Unreadable images are found at first access and left out by :func:`collate_skipping`.

    Neighbours come from the dataset's own images: the headers of all of them are read
    once, here, and :func:`ichscan.pipeline.series.neighbour_indexes` (the pipeline's
    assembler) finds each slice's neighbours among them. A patient-level split keeps every
    series whole, so a split's slices never see another split's pixels. The cache holds one
    slot per slice, so a neighbour costs a cache read, not a decode.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        labels: str | os.PathLike[str] | dict[str, np.ndarray],
        image_ids: Sequence[str] | None = None,
        settings: PreprocessSettings = PreprocessSettings(),
        cache_dir: str | os.PathLike[str] | None = None,
        augment: bool = False,
        cache_key: str = "inputs",
        context: int = 0,
    ):
        label_map = labels if isinstance(labels, dict) else read_rsna_labels(labels)
        self.items = match_items(data_dir, label_map, image_ids)
        self.settings = settings
        self.augment = augment
        self.context = max(0, int(context))
        shape = (len(settings.windows), settings.size, settings.size)
        self.cache = DecodeCache(cache_dir, cache_key, len(self.items), shape) if cache_dir else None
        self.decodes = 0  # DICOM decodes done by this process (tests count them)
        self._unreadable: set[int] = set()
        #: ``neighbours[i]``: the ``2k + 1`` item indexes around item ``i`` (itself in the middle).
        self.neighbours: list[tuple[int, ...]] = [(i,) for i in range(len(self.items))]
        self._instances: list[Instance] | None = None
        if self.context:
            self.neighbours = neighbour_indexes(self.instances, self.context)

    @property
    def instances(self) -> list[Instance]:
        """Each item's header (series, position), read once on first use; a file whose
        header cannot be read is an :class:`~ichscan.records.Instance` with its path only."""
        if self._instances is None:
            self._instances = [read_header_instance(item.path) or Instance(str(item.path)) for item in self.items]
        return self._instances

    def __len__(self) -> int:
        return len(self.items)

    @property
    def targets(self) -> np.ndarray:
        return np.stack([item.target for item in self.items]) if self.items else np.zeros((0, len(LABELS)), np.float32)

    def model_input(self, index: int) -> torch.Tensor:
        """The model's input for item ``index``: ``((2k+1)·C, S, S)``, channel ``j·C + c``
        window ``c`` of neighbour ``j``, as :meth:`ichscan.pipeline.screener.Screener.model_input`
        builds it. A neighbour that cannot be decoded is missing, as in the pipeline (the
        nearest slice towards the centre stands in); an unreadable slice itself raises
        :class:`UnreadableImage`.
        """
        if not self.context:
            return self.slice_input(index)
        inputs: dict[int, torch.Tensor | None] = {index: self.slice_input(index)}
        for j in self.neighbours[index]:
            if j not in inputs:
                try:
                    inputs[j] = None if j in self._unreadable else self.slice_input(j)
                except UnreadableImage:
                    self._unreadable.add(j)
                    inputs[j] = None
        return torch.cat(repeat_nearest([inputs[j] for j in self.neighbours[index]]))

    def slice_input(self, index: int) -> torch.Tensor:
        """The preprocessed slice ``index`` alone, ``(C, S, S)`` (from the cache when filled)."""
        if self.cache is not None:
            cached = self.cache.get(index)
            if cached is not None:
                return cached
        item = self.items[index]
        [decoded] = decode_many([str(item.path)], resize_to=self.settings.size, crop=self.settings.crop)
        self.decodes += 1
        if decoded.status != OK or decoded.pixels is None:
            raise UnreadableImage(f"{item.path}: {decoded.status}: {decoded.error}")
        tensor = preprocess([decoded.pixels], [decoded.slope], [decoded.intercept], self.settings)[0]
        if self.cache is not None:
            # Every epoch sees the cached (uint8) version, the first one included.
            return self.cache.put(index, tensor)
        return tensor

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        tensor = self.model_input(index)
        if self.augment:
            tensor = augment(tensor)
        return tensor, torch.from_numpy(self.items[index].target), self.items[index].image_id

    def safe_item(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str] | str:
        """Like ``dataset[index]``, but an unreadable image returns its error text."""
        try:
            return self[index]
        except UnreadableImage as exc:
            return str(exc)


class SafeView(Dataset):
    """Wraps an :class:`RSNADataset` so unreadable images reach :func:`collate_skipping` as text."""

    def __init__(self, dataset: RSNADataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset.safe_item(index)


def collate_skipping(samples: list) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Stack readable samples; return the error texts of unreadable ones beside them."""
    good = [s for s in samples if not isinstance(s, str)]
    bad = [s for s in samples if isinstance(s, str)]
    if not good:
        return torch.empty(0), torch.empty(0), [], bad
    inputs = torch.stack([s[0] for s in good])
    targets = torch.stack([s[1] for s in good])
    return inputs, targets, [s[2] for s in good], bad


def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flip, rotation within +-10 degrees and shift within +-8 %."""
    import torchvision.transforms.v2.functional as TF

    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(-1)
    angle = float(torch.empty(()).uniform_(-10.0, 10.0, generator=generator))
    size = x.shape[-1]
    dx, dy = (int(round(float(torch.empty(()).uniform_(-0.08, 0.08, generator=generator)) * size)) for _ in range(2))
    return TF.affine(x, angle=angle, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0], interpolation=TF.InterpolationMode.BILINEAR)
