"""The data model of one screened instance: what was read, what was decoded, what was predicted.

A :class:`SliceResult` (what reporters see) is composed of an :class:`Instance` (identity
and geometry, read from the header), a :class:`StoredImage` (pixels and rescale, dropped
once the result is reported) and a :class:`Prediction` (the model's output). Each part is
filled by one step of the pipeline; nothing is copied field by field from one to another.
Convenience attributes (``result.path``, ``result.probabilities``...) read through to the
parts (:class:`ReadThrough`).

This module runs in the decode workers too: it must not import torch.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

import numpy as np

from ichscan.labels import LABELS, SUBTYPES

#: The study key of an instance without a StudyInstanceUID (one pseudo-study for all of them).
NO_STUDY_UID = "(no study uid)"
#: ``top_label`` of a negative slice or study.
NO_FINDING = "none"


_T = TypeVar("_T")


class ReadThrough(Generic[_T]):
    """A read-only attribute of a part, as if it were the owner's own: ``owner.name`` is
    ``owner.<part>.name``, or ``default`` while the part is ``None``."""

    def __init__(self, part: str, default: Any = None) -> None:
        self.part = part
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> ReadThrough[_T]: ...

    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> _T: ...

    def __get__(self, obj: object | None, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        part = getattr(obj, self.part)
        return self.default if part is None else getattr(part, self.name)

    def __set__(self, obj: object, value: object) -> None:
        # Like a property without a setter: the value belongs to the part.
        raise AttributeError(f"{self.name!r} reads through to {self.part!r}; set {self.part}.{self.name}")


class Status(str, enum.Enum):
    """Every input gets exactly one result row with one of these."""

    #: Screened by the model.
    OK = "ok"
    #: Readable DICOM that is not a single-frame greyscale CT image.
    SKIPPED = "skipped"
    #: Unreadable, refused or failed; ``error`` says why.
    ERROR = "error"

    def __str__(self) -> str:  # CSV cells, log lines and f-strings show the plain value
        return self.value


@dataclass
class Instance:
    """What was read from the header: identity and geometry.

    ``position`` is the slice's place along its series' slice normal (ImagePositionPatient
    projected on the cross product of the ImageOrientationPatient cosines, in mm), or the
    InstanceNumber when the geometry is missing; ``spacing`` is the expected distance
    between neighbouring slices in the same unit (SpacingBetweenSlices, else
    SliceThickness; 1 for InstanceNumber positions), ``None`` when unknown.
    """

    path: str
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    instance_number: int | None = None
    sop_class_uid: str = ""
    position: float | None = None
    spacing: float | None = None

    @property
    def study_key(self) -> str:
        return self.study_instance_uid or NO_STUDY_UID

    @property
    def series_key(self) -> str:
        """The series a model with a series head refines this slice with: its
        SeriesInstanceUID when it has one and a position in it, else the slice alone (as
        series context treats it)."""
        if self.series_instance_uid and self.position is not None:
            return self.series_instance_uid
        return "\0" + self.path


@dataclass
class StoredImage:
    """What was decoded: stored values (2-D, after the RSNA 12-bit fix) and their rescale.

    ``HU = pixels * slope + intercept``. ``display`` is the full-resolution brain-window
    image (uint8) when overlays were asked for.
    """

    pixels: np.ndarray | None = field(repr=False)  # None only while in transit (shared memory)
    slope: float = 1.0
    intercept: float = 0.0
    display: np.ndarray | None = field(default=None, repr=False)
    rsna_fixed: bool = False
    #: Framed on the head before resizing (:func:`ichscan.imaging.frame_stored`): the
    #: square ``(top, left, side)`` taken, and the decoded image's ``(rows, cols)``.
    frame: tuple[int, int, int, int, int] | None = None

    def hu(self) -> np.ndarray:
        """Hounsfield units as float32."""
        return self.pixels.astype(np.float32) * np.float32(self.slope) + np.float32(self.intercept)


@dataclass(frozen=True)
class Prediction:
    """What the model said about one slice, with the run's thresholds applied."""

    probabilities: dict[str, float]
    positive: dict[str, bool]
    top_label: str
    top_probability: float
    #: A model with a series head: the probability that the slice's series as a whole shows
    #: a bleed (its ``any`` output); the study's probability is the highest of its series'.
    series_any: float | None = None

    @classmethod
    def from_probabilities(
        cls, row: Mapping[str, float] | np.ndarray, thresholds: Mapping[str, float], series_any: float | None = None
    ) -> Prediction:
        """Thresholds applied to one row of probabilities (a mapping, or values in label order)."""
        values = row if isinstance(row, Mapping) else dict(zip(LABELS, row, strict=True))
        probabilities = {label: float(values[label]) for label in LABELS}
        positive = {label: probabilities[label] >= thresholds[label] for label in LABELS}
        top_label, top_probability = top_finding(probabilities, positive["any"])
        return cls(probabilities, positive, top_label, top_probability, None if series_any is None else float(series_any))


def top_finding(probabilities: Mapping[str, float], positive: bool) -> tuple[str, float]:
    """``(top subtype, its probability)``; the label is ``none`` for a negative slice.

    The probability is the highest subtype probability either way, so a near-miss
    stays visible in the output.
    """
    label = max(SUBTYPES, key=lambda name: probabilities[name])
    return (label if positive else NO_FINDING), float(probabilities[label])


@dataclass
class DecodedSlice:
    """One input after decoding: ``ok`` with an image, or ``skipped``/``error`` with a reason."""

    instance: Instance
    status: Status = Status.ERROR
    error: str = ""
    image: StoredImage | None = None

    @classmethod
    def failed(cls, path: str, error: str, status: Status = Status.ERROR) -> DecodedSlice:
        """A file that produced no image (refused before reading, or failed)."""
        return cls(Instance(path), status, error)

    # -- read-through attributes ---------------------------------------------------

    path = ReadThrough[str]("instance")
    sop_instance_uid = ReadThrough[str]("instance")
    study_instance_uid = ReadThrough[str]("instance")
    series_instance_uid = ReadThrough[str]("instance")
    instance_number = ReadThrough[int | None]("instance")
    sop_class_uid = ReadThrough[str]("instance")
    pixels = ReadThrough[np.ndarray | None]("image")
    display = ReadThrough[np.ndarray | None]("image")
    slope = ReadThrough[float]("image", 1.0)
    intercept = ReadThrough[float]("image", 0.0)
    rsna_fixed = ReadThrough[bool]("image", False)

    def hu(self) -> np.ndarray:
        """Hounsfield units as float32 (only for ``ok`` slices)."""
        if self.image is None:
            raise ValueError(f"{self.path}: no pixels ({self.status}: {self.error})")
        return self.image.hu()

    def fail(self, error: str, status: Status = Status.ERROR) -> None:
        """Turn this slice into a failure row: the image is dropped."""
        self.status, self.error, self.image = status, error, None


@dataclass
class SliceResult(DecodedSlice):
    """One input file's outcome, as reporters see it: the decoded slice plus the prediction
    (``ok`` only) and the overlay written for it (path, or empty).

    ``heatmap`` (``--saliency``, positive slices only): where the model saw its top
    finding, a float32 ``h x w`` Grad-CAM map in [0, 1] over the whole image (on the
    model's feature-map grid: stretch it to the image); dropped with the pixels.
    """

    prediction: Prediction | None = None
    overlay: str = ""
    heatmap: np.ndarray | None = field(default=None, repr=False)
    #: A model with a series head: the slice's embedding, from screening until its series is
    #: refined (:meth:`ichscan.pipeline.screener.Screener.refine`), which sets ``prediction``.
    embedding: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def of(cls, decoded: DecodedSlice, prediction: Prediction | None = None) -> SliceResult:
        """The result of a decoded slice (its parts are shared, not copied)."""
        return cls(decoded.instance, decoded.status, decoded.error, decoded.image, prediction)

    probabilities = ReadThrough[dict[str, float] | None]("prediction")
    positive = ReadThrough[dict[str, bool] | None]("prediction")
    top_label = ReadThrough[str]("prediction", "")
    top_probability = ReadThrough[float | None]("prediction")

    @property
    def is_positive(self) -> bool:
        return self.prediction is not None and self.prediction.positive["any"]

    def drop_image(self) -> None:
        """Free the pixels (and the heat map) once every reporter has seen the result."""
        self.image = None
        self.heatmap = None
        self.embedding = None
