"""The data model of one screened instance: what was read, what was decoded, what was predicted.

A :class:`SliceResult` (what reporters see) is composed of an :class:`Instance` (identity
and geometry, read from the header), a :class:`StoredImage` (pixels and rescale, dropped
once the result is reported) and a :class:`Prediction` (the model's output). Each part is
filled by one step of the pipeline; nothing is copied field by field from one to another.
Convenience properties (``result.path``, ``result.probabilities``...) read through to the
parts.

This module runs in the decode workers too: it must not import torch.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ichscan.labels import LABELS, SUBTYPES

#: The study key of an instance without a StudyInstanceUID (one pseudo-study for all of them).
NO_STUDY_UID = "(no study uid)"
#: ``top_label`` of a negative slice or study.
NO_FINDING = "none"


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

    @classmethod
    def from_probabilities(cls, row: Mapping[str, float] | np.ndarray, thresholds: Mapping[str, float]) -> Prediction:
        """Thresholds applied to one row of probabilities (a mapping, or values in label order)."""
        values = row if isinstance(row, Mapping) else dict(zip(LABELS, row, strict=True))
        probabilities = {label: float(values[label]) for label in LABELS}
        positive = {label: probabilities[label] >= thresholds[label] for label in LABELS}
        top_label, top_probability = top_finding(probabilities, positive["any"])
        return cls(probabilities, positive, top_label, top_probability)


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

    # -- read-through properties ---------------------------------------------------

    @property
    def path(self) -> str:
        return self.instance.path

    @property
    def sop_instance_uid(self) -> str:
        return self.instance.sop_instance_uid

    @property
    def study_instance_uid(self) -> str:
        return self.instance.study_instance_uid

    @property
    def series_instance_uid(self) -> str:
        return self.instance.series_instance_uid

    @property
    def instance_number(self) -> int | None:
        return self.instance.instance_number

    @property
    def sop_class_uid(self) -> str:
        return self.instance.sop_class_uid

    @property
    def pixels(self) -> np.ndarray | None:
        return self.image.pixels if self.image is not None else None

    @property
    def display(self) -> np.ndarray | None:
        return self.image.display if self.image is not None else None

    @property
    def slope(self) -> float:
        return self.image.slope if self.image is not None else 1.0

    @property
    def intercept(self) -> float:
        return self.image.intercept if self.image is not None else 0.0

    @property
    def rsna_fixed(self) -> bool:
        return self.image is not None and self.image.rsna_fixed

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
    (``ok`` only) and the overlay written for it (path, or empty)."""

    prediction: Prediction | None = None
    overlay: str = ""

    @classmethod
    def of(cls, decoded: DecodedSlice, prediction: Prediction | None = None) -> SliceResult:
        """The result of a decoded slice (its parts are shared, not copied)."""
        return cls(decoded.instance, decoded.status, decoded.error, decoded.image, prediction)

    @property
    def probabilities(self) -> dict[str, float] | None:
        return self.prediction.probabilities if self.prediction is not None else None

    @property
    def positive(self) -> dict[str, bool] | None:
        return self.prediction.positive if self.prediction is not None else None

    @property
    def top_label(self) -> str:
        return self.prediction.top_label if self.prediction is not None else ""

    @property
    def top_probability(self) -> float | None:
        return self.prediction.top_probability if self.prediction is not None else None

    @property
    def is_positive(self) -> bool:
        return self.prediction is not None and self.prediction.positive["any"]

    def drop_image(self) -> None:
        """Free the pixels once every reporter has seen the result."""
        self.image = None
