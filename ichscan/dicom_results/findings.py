"""What the DICOM result objects report: the findings of a study and its instances,
the codes and UIDs both objects use, the checks of the source headers they copy from, and
the checks and content-item readers both SR templates (TID 1500, comprehensive) share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: Comprehensive SR Storage.
SR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.33"
#: Secondary Capture Image Storage (single frame; highdicom's ``SCImage``).
SC_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.7"
#: Series numbers of our own series: high, so viewers list them after the acquired series.
SR_SERIES_NUMBER = 9901
KEY_IMAGE_SERIES_NUMBER = 9902

#: The phrase every object made with demonstration weights carries.
NOT_FOR_DIAGNOSTIC_USE = "not for diagnostic use"

#: Coding scheme designator of ichscan's private codes ("99" prefix: private, per PS3.16 8.2).
PRIVATE_SCHEME = "99ICHSCAN"

#: Concept per label. ``any`` is SNOMED CT "Intracranial hemorrhage" (checked against
#: pydicom's code dictionary); pydicom has no SNOMED concept for the five subtypes, so they
#: use the private scheme rather than codes typed in from memory. The comprehensive tree
#: uses these as they are; the TID 1500 report codes subarachnoid, intraventricular and
#: intraparenchymal the standard way, as SNOMED "Hemorrhage" with a SNOMED finding site
#: (:data:`ichscan.dicom_results.tid1500.GROUP_CODES`), and keeps the private codes only for
#: epidural and subdural, whose spaces the dictionary lacks.
LABEL_CODES: Mapping[str, Code] = {
    "epidural": Code("EDH", PRIVATE_SCHEME, "Epidural hemorrhage"),
    "intraparenchymal": Code("IPH", PRIVATE_SCHEME, "Intraparenchymal hemorrhage"),
    "intraventricular": Code("IVH", PRIVATE_SCHEME, "Intraventricular hemorrhage"),
    "subarachnoid": Code("SAH", PRIVATE_SCHEME, "Subarachnoid hemorrhage"),
    "subdural": Code("SDH", PRIVATE_SCHEME, "Subdural hemorrhage"),
    "any": codes.SCT.IntracranialHemorrhage,
}
#: Appended to a series description when demonstration weights were used.
DEMO_SUFFIX = f" ({NOT_FOR_DIAGNOSTIC_USE})"


@dataclass
class InstanceFinding:
    """The screening result of one source instance.

    Parameters
    ----------
    dataset
        The instance's header (``dcmread(..., stop_before_pixels=True)`` is enough); it needs
        the patient and study attributes, ``SOPClassUID``, ``SOPInstanceUID`` and
        ``SeriesInstanceUID``.
    probabilities
        Probability per label (all six of :data:`ichscan.labels.LABELS`).
    positive
        Per label, whether the probability reached its threshold.
    """

    dataset: pydicom.Dataset
    probabilities: dict[str, float]
    positive: dict[str, bool]


@dataclass
class StudyFindings:
    """The screening result of one study: what :func:`build_sr` writes.

    Parameters
    ----------
    instances
        The screened (status ``ok``) instances of one study, in any order.
    probabilities
        Study-level probability per label (the maximum over the instances).
    positive
        Study-level decision per label, with ``thresholds``.
    thresholds
        Decision threshold per label.
    model_name
        Name of the model that produced the probabilities.
    model_version
        Its version, e.g. the weights file name and a short sha256.
    demo
        True when demonstration weights were used: the report says "not for diagnostic use".
    """

    instances: list[InstanceFinding]
    probabilities: dict[str, float]
    positive: dict[str, bool]
    thresholds: dict[str, float]
    model_name: str
    model_version: str
    demo: bool


def select_key_instance(findings: StudyFindings) -> InstanceFinding:
    """Return the instance with the highest ``any`` probability (the key image's source).

    Ties go to the lowest Instance Number, so the choice does not depend on input order.

    Raises
    ------
    ValueError
        If ``findings`` has no instances.
    """
    if not findings.instances:
        raise ValueError("no screened instances in the study")
    return min(findings.instances, key=lambda inst: (-probability_value(inst.probabilities, "any"), instance_sort_key(inst)))


def probability_value(values: Mapping[str, float], label: str) -> float:
    if label not in values:
        raise ValueError(f"no value for label {label!r}")
    value = float(values[label])
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"value {value} for label {label!r} is outside [0, 1]")
    return value


def instance_sort_key(inst: InstanceFinding) -> tuple[int, str]:
    number = inst.dataset.get("InstanceNumber")
    return (int(number) if number not in (None, "") else 2**31, str(inst.dataset.SOPInstanceUID))


#: Type 2 attributes of the Patient and General Study modules. highdicom reads them from the
#: source without a default, and anonymised or sloppy CT headers often lack some of them.
_TYPE2_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def check_identity(header: pydicom.Dataset) -> None:
    """Refuse a source header that lacks a UID the objects must reference."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not header.get(keyword):
            raise ValueError(f"source instance has no {keyword}")


def with_study_attributes(header: pydicom.Dataset) -> pydicom.Dataset:
    """``header`` with absent Type 2 patient/study attributes present and empty (a copy if any were absent)."""
    check_identity(header)
    missing = [keyword for keyword in _TYPE2_STUDY_KEYWORDS if keyword not in header]
    if not missing:
        return header
    patched = pydicom.Dataset()
    patched.update(header)  # new container, shared elements: the caller's header is not changed
    for keyword in missing:
        setattr(patched, keyword, None)
    return patched


# --------------------------------------------------------------------------------------------
# Checks both report templates make
# --------------------------------------------------------------------------------------------


def report_instances(
    findings: StudyFindings, previous: pydicom.Dataset | None, series_uid: str, instance_number: int
) -> list[InstanceFinding]:
    """The instances a report lists (one per SOP Instance UID, by Instance Number), after the
    checks every report makes: UIDs present, one study, a predecessor it may revise."""
    for inst in findings.instances:
        check_identity(inst.dataset)
    instances = sorted(unique_instances(findings.instances), key=instance_sort_key)
    check_previous(previous, study_uid_of(instances), series_uid, instance_number)
    return instances


def unique_instances(instances: Sequence[InstanceFinding]) -> list[InstanceFinding]:
    """One finding per SOP Instance UID (a file sent twice keeps its higher ``any``)."""
    if not instances:
        raise ValueError("no screened instances in the study")
    best: dict[str, InstanceFinding] = {}
    for inst in instances:
        uid = str(inst.dataset.SOPInstanceUID)
        kept = best.get(uid)
        if kept is None or probability_value(inst.probabilities, "any") > probability_value(kept.probabilities, "any"):
            best[uid] = inst
    return list(best.values())


def study_uid_of(instances: Sequence[InstanceFinding]) -> str:
    uids = {str(inst.dataset.StudyInstanceUID) for inst in instances}
    if len(uids) != 1:
        raise ValueError(f"instances belong to {len(uids)} studies; a report covers one")
    return uids.pop()


def check_previous(previous: pydicom.Dataset | None, study_uid: str, series_uid: str, instance_number: int) -> None:
    if previous is None:
        return
    if str(previous.StudyInstanceUID) != study_uid:
        raise ValueError("the previous report belongs to another study")
    if str(previous.SeriesInstanceUID) != str(series_uid):
        raise ValueError("a revised report goes into the series of the report it revises")
    if int(previous.InstanceNumber) >= instance_number:
        raise ValueError(
            f"instance number {instance_number} must exceed the previous report's {previous.InstanceNumber}"
        )


# --------------------------------------------------------------------------------------------
# Reading either report back
# --------------------------------------------------------------------------------------------


def concept_of(item: pydicom.Dataset) -> pydicom.Dataset | None:
    sequence = item.get("ConceptNameCodeSequence")
    return sequence[0] if sequence else None


def is_code(coded: pydicom.Dataset, code: Code) -> bool:
    return coded.get("CodeValue") == code.value and coded.get("CodingSchemeDesignator") == code.scheme_designator


def label_for(coded: pydicom.Dataset) -> str | None:
    for label, code in LABEL_CODES.items():
        if is_code(coded, code):
            return label
    return None


def num_value(measured: pydicom.Dataset) -> float:
    # FloatingPointValue (FD) is exact; NumericValue (DS) is limited to 16 characters.
    if "FloatingPointValue" in measured:
        return float(measured.FloatingPointValue)
    return float(measured.NumericValue)


def referenced_uids(sequence: Sequence[pydicom.Dataset]) -> list[str]:
    """SOP Instance UIDs in a Hierarchical SOP Instance Reference sequence (study/series/instance)."""
    return [
        str(instance.ReferencedSOPInstanceUID)
        for study in sequence
        for series in study.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedSOPSequence", [])
    ]
