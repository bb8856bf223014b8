"""The key image: a Secondary Capture of the rendered overlay of a study's most suspicious
slice, placed in the screened study in a series of its own (see :mod:`ichscan.dicom_results`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from ichscan import __version__
from ichscan.dicom import ICHSCAN_MANUFACTURER
from ichscan.dicom_results.findings import (
    DEMO_SUFFIX,
    KEY_IMAGE_SERIES_NUMBER,
    NOT_FOR_DIAGNOSTIC_USE,
    with_study_attributes,
)

_SC_DESCRIPTION = "ichscan ICH key image"


def build_key_image(
    source: pydicom.Dataset,
    overlay_rgb: np.ndarray,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    demo: bool,
    series_number: int = KEY_IMAGE_SERIES_NUMBER,
    heatmap: bool = False,
) -> pydicom.Dataset:
    """Build the Secondary Capture key image: the rendered overlay of one source slice.

    Parameters
    ----------
    source
        Header of the slice the overlay shows (pixel data not needed).
    overlay_rgb
        The rendered overlay, ``H x W x 3`` uint8 RGB (a Pillow RGB image is accepted too).
    series_instance_uid
        The key-image series.
    sop_instance_uid
        A new UID for this image.
    instance_number
        Its Instance Number.
    demo
        True when demonstration weights were used ("not for diagnostic use" in the series
        description and image comments).
    series_number
        Series Number of the key-image series.
    heatmap
        True when the overlay shows a saliency heat map (``--saliency``): the Derivation
        Description says so.

    Returns
    -------
    pydicom.Dataset
        A highdicom ``SCImage`` with file meta, ready for ``save_as(path, enforce_file_format=True)``.

    Raises
    ------
    ValueError
        If ``overlay_rgb`` is not an ``H x W x 3`` uint8 array.
    """
    rgb = np.ascontiguousarray(np.asarray(overlay_rgb))
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"overlay must be an H x W x 3 uint8 array, not {rgb.dtype} {rgb.shape}")
    source = with_study_attributes(source)
    orientation = _patient_orientation(source)
    description = _SC_DESCRIPTION + (DEMO_SUFFIX if demo else "")
    sc = highdicom.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=ICHSCAN_MANUFACTURER,
        pixel_spacing=_scaled_pixel_spacing(source, rgb.shape[0], rgb.shape[1]),
        # highdicom insists on an orientation; an unknown one is written empty below.
        patient_orientation=orientation or ("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=description,
        software_versions=__version__,
        manufacturer_model_name=ICHSCAN_MANUFACTURER,
    )
    if orientation is None:
        sc.PatientOrientation = None  # Type 2: empty means unknown, rather than a guess
    # from_ref_dataset copies only a few study attributes; take the whole Patient and Study
    # modules (Study Description, Patient Age...) as the SR does, so both sit alike in the study.
    sc.copy_patient_and_study_information(source)
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    if source.get("Laterality"):
        sc.Laterality = source.Laterality
    elif "BodyPartExamined" not in sc:
        # Type 2C, required for paired body parts: with the body part unknown, say "unknown".
        sc.Laterality = None
    # Rendered on a workstation, not captured from a video interface (highdicom's default).
    sc.ConversionType = "WSD"
    # The probabilities and the disclaimer are drawn into the pixels.
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = "ichscan screening overlay of the slice with the highest 'any' probability" + (
        ", with a Grad-CAM heat map of its top finding" if heatmap else ""
    )
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    if demo:
        sc.ImageComments = f"{NOT_FOR_DIAGNOSTIC_USE}: produced with demonstration weights"
    return sc


_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x; +y, -y; +z, -z (LPS)


def _patient_orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    """Row and column directions as Patient Orientation letters, from Image Orientation.

    The overlay keeps the slice's orientation (it is only scaled), so the source's
    direction cosines describe it. Each direction gets its main axis letter first, then
    any other axis it leans along by more than ~3 degrees, as PS3.3 C.7.6.1.1.1 describes.
    """
    try:
        cosines = [float(v) for v in source.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(cosines) != 6 or not all(math.isfinite(v) for v in cosines):
        return None

    def letters(vector: Sequence[float]) -> str:
        order = sorted(range(3), key=lambda axis: -abs(vector[axis]))
        picked = [_AXIS_LETTERS[axis][0 if vector[axis] > 0 else 1] for axis in order if abs(vector[axis]) > 0.05]
        return "".join(picked)

    row, column = letters(cosines[:3]), letters(cosines[3:])
    if not row or not column:
        return None
    return (row, column)


def _scaled_pixel_spacing(source: pydicom.Dataset, rows: int, columns: int) -> tuple[float, float] | None:
    """The source's Pixel Spacing scaled to the overlay's size (it may be enlarged)."""
    try:
        row_spacing, column_spacing = (float(v) for v in source.PixelSpacing)
        source_rows, source_columns = int(source.Rows), int(source.Columns)
    except (AttributeError, TypeError, ValueError):
        return None
    if min(row_spacing, column_spacing, source_rows, source_columns) <= 0:
        return None
    # Rounded: DS holds 16 characters, and sub-nanometre digits carry no information.
    return (round(row_spacing * source_rows / rows, 6), round(column_spacing * source_columns / columns, 6))
