"""The structured report of a screened study, and reading it back.

Why Comprehensive SR with an ichscan content tree (and not TID 1500)
--------------------------------------------------------------------
TID 1500 (*Imaging Measurement Report*, highdicom ``MeasurementReport``) is made for
measurements of regions and images, grouped under tracking identifiers. A slice classifier's
output fits it only loosely: TID 1500 has no place for the decision thresholds or for a free
text usage restriction ("not for diagnostic use"), and each probability would still need a
private concept name. Comprehensive SR (not Comprehensive 3D SR: there are no 3-D coordinates)
takes any tree of CONTAINER, TEXT, CODE, NUM and IMAGE items, so the whole result is coded
items, and it is the SR storage class that PACS and viewers support most widely. The tree
uses DICOM (DCM), LOINC (LN) and SNOMED CT (SCT) concepts wherever pydicom's code dictionary
has one, and the private scheme :data:`PRIVATE_SCHEME` (declared in the Coding Scheme
Identification Sequence) for the rest. It declares no template identifier because it follows
no DICOM template; its structure is::

    CONTAINER  (LN 18748-4 "Diagnostic Imaging Report")
      HAS CONCEPT MOD  CODE  Language of Content Item and Descendants = English
      HAS OBS CONTEXT  CODE  Observer Type = Device; UIDREF/TEXT device name, manufacturer, model
      CONTAINS  TEXT  (99ICHSCAN USAGE "Usage restriction") = "not for diagnostic use ..."  [demo]
      CONTAINS  TEXT  (DCM 111001 "Algorithm Name") = model name
      CONTAINS  TEXT  (DCM 111003 "Algorithm Version") = model version
      CONTAINS  CONTAINER  (DCM 121070 "Findings")                        study level
        CONTAINS  CODE  <label concept> = (DCM 121053 "Present" | DCM 121054 "Absent")  x 6
          HAS PROPERTIES  NUM  (DCM 122157 "Probability")  value, unit UCUM "1"
          HAS PROPERTIES  NUM  (DCM 122411 "Threshold Value")  value, unit UCUM "1"
      CONTAINS  CONTAINER  (99ICHSCAN POSIMG "Positive image")            one per positive slice
        CONTAINS  IMAGE  (DCM 121324 "Source image") -> the slice
        CONTAINS  CODE  <label concept> = Present | Absent                x 6
          HAS PROPERTIES  NUM  (DCM 122157 "Probability")

Every screened instance is listed in the Current Requested Procedure Evidence Sequence. A
revised report (the study screened again) is a new instance in the same SR series with a
higher Instance Number that names the earlier one in the Predecessor Documents Sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    CodeContentItem,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    ImageContentItem,
    LanguageOfContentItemAndDescendants,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    RelationshipTypeValues,
    TextContentItem,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ichscan import __version__
from ichscan.dicom import ICHSCAN_MANUFACTURER
from ichscan.dicom_results.findings import (
    DEMO_SUFFIX,
    LABEL_CODES,
    NOT_FOR_DIAGNOSTIC_USE,
    PRIVATE_SCHEME,
    SR_SERIES_NUMBER,
    SR_SOP_CLASS_UID,
    InstanceFinding,
    StudyFindings,
    check_identity,
    instance_sort_key,
    probability_value,
    with_study_attributes,
)
from ichscan.labels import LABELS

_USAGE = Code("USAGE", PRIVATE_SCHEME, "Usage restriction")
_POSITIVE_IMAGE = Code("POSIMG", PRIVATE_SCHEME, "Positive image")
_TITLE = codes.LN.DiagnosticImagingReport
_UNIT = codes.UCUM.NoUnits  # UCUM "1": a probability is a dimensionless number
_SR_DESCRIPTION = "ichscan ICH screening"


def build_sr(
    findings: StudyFindings,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    previous: pydicom.Dataset | None = None,
    series_number: int = SR_SERIES_NUMBER,
) -> pydicom.Dataset:
    """Build the Comprehensive SR that reports one screened study.

    Parameters
    ----------
    findings
        The study's result; its instances all belong to one study.
    series_instance_uid
        The SR series (new for a first report; the previous report's series for a revision).
    sop_instance_uid
        A new UID for this report.
    instance_number
        Its Instance Number (higher than the previous report's).
    previous
        The report this one revises (its header is enough), or None for a first report.
    series_number
        Series Number of the SR series.

    Returns
    -------
    pydicom.Dataset
        A highdicom ``ComprehensiveSR`` with file meta, ready for
        ``save_as(path, enforce_file_format=True)``.

    Raises
    ------
    ValueError
        If there are no instances, they span several studies, a label's probability or
        threshold is missing or outside [0, 1], or ``previous`` belongs to another study or
        series or has an Instance Number not below ``instance_number``.
    """
    for inst in findings.instances:
        check_identity(inst.dataset)
    instances = sorted(_unique_instances(findings.instances), key=instance_sort_key)
    study_uid = _study_uid(instances)
    _check_previous(previous, study_uid, series_instance_uid, instance_number)

    root = ContainerContentItem(name=_TITLE)
    root.ContentSequence = ContentSequence()
    root.ContentSequence.extend(
        # highdicom's en-US (RFC 5646), the language its own templates declare.
        LanguageOfContentItemAndDescendants(language=DEFAULT_LANGUAGE)
    )
    root.ContentSequence.extend(_observation_context(findings))
    if findings.demo:
        root.ContentSequence.append(
            TextContentItem(
                name=_USAGE,
                value=f"{NOT_FOR_DIAGNOSTIC_USE}: produced with demonstration weights",
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
    for name, value in (
        (codes.DCM.AlgorithmName, findings.model_name),
        (codes.DCM.AlgorithmVersion, findings.model_version),
    ):
        root.ContentSequence.append(
            TextContentItem(name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS)
        )

    study = ContainerContentItem(name=codes.DCM.Findings, relationship_type=RelationshipTypeValues.CONTAINS)
    study.ContentSequence = ContentSequence(
        [_label_item(label, findings.probabilities, findings.positive, findings.thresholds) for label in LABELS]
    )
    root.ContentSequence.append(study)

    for inst in instances:
        if not inst.positive.get("any", False):
            continue
        # "Positive" follows SliceResult.is_positive (the ``any`` decision), as in the CSV.
        group = ContainerContentItem(name=_POSITIVE_IMAGE, relationship_type=RelationshipTypeValues.CONTAINS)
        group.ContentSequence = ContentSequence(
            [
                ImageContentItem(
                    name=codes.DCM.SourceImage,
                    referenced_sop_class_uid=inst.dataset.SOPClassUID,
                    referenced_sop_instance_uid=inst.dataset.SOPInstanceUID,
                    relationship_type=RelationshipTypeValues.CONTAINS,
                )
            ]
            + [_label_item(label, inst.probabilities, inst.positive) for label in LABELS]
        )
        root.ContentSequence.append(group)

    description = _SR_DESCRIPTION + (DEMO_SUFFIX if findings.demo else "")
    # highdicom takes the patient and study attributes from the first piece of evidence.
    evidence = [with_study_attributes(instances[0].dataset)] + [inst.dataset for inst in instances[1:]]
    sr = ComprehensiveSR(
        evidence=evidence,
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=ICHSCAN_MANUFACTURER,
        # Complete, but a machine's unverified screening result: preliminary, never final.
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[previous] if previous is not None else None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=description,
        software_versions=__version__,
        manufacturer_model_name=ICHSCAN_MANUFACTURER,
        # Declares the private scheme, so a receiver can tell whose codes these are.
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="ichscan private codes",
                version="1",
                responsible_organization="ichscan project",
            )
        ],
    )
    return sr


def read_sr_findings(ds: pydicom.Dataset) -> dict[str, Any]:
    """Read back a report made by :func:`build_sr`.

    Parameters
    ----------
    ds
        The SR data set (as read by ``pydicom.dcmread``).

    Returns
    -------
    dict
        ``probabilities``, ``positive`` and ``thresholds`` (study level, per label);
        ``positive_instances`` (SOP Instance UIDs of the positive slices, in report order);
        ``instance_probabilities`` (SOP Instance UID -> label -> probability, for those
        slices); ``referenced_instances`` (SOP Instance UIDs of the evidence);
        ``predecessors`` (SOP Instance UIDs of the reports this one revises);
        ``model`` (``{"name": ..., "version": ...}``) and ``not_for_diagnostic_use`` (bool).

    Raises
    ------
    ValueError
        If ``ds`` is not a Comprehensive SR with ichscan's document title, or a study-level
        label is missing.
    """
    if ds.get("SOPClassUID") != SR_SOP_CLASS_UID or not ds.get("ConceptNameCodeSequence"):
        raise ValueError("not a Comprehensive SR")
    if not _is_code(ds.ConceptNameCodeSequence[0], _TITLE):
        raise ValueError("not an ichscan screening report (unexpected document title)")
    result: dict[str, Any] = {
        "probabilities": {},
        "positive": {},
        "thresholds": {},
        "positive_instances": [],
        "instance_probabilities": {},
        "referenced_instances": _referenced_uids(ds.get("CurrentRequestedProcedureEvidenceSequence", [])),
        "predecessors": _referenced_uids(ds.get("PredecessorDocumentsSequence", [])),
        "model": {"name": None, "version": None},
        "not_for_diagnostic_use": False,
    }
    for item in ds.get("ContentSequence", []):
        name = _concept(item)
        if name is None:
            continue
        if _is_code(name, _USAGE):
            result["not_for_diagnostic_use"] |= NOT_FOR_DIAGNOSTIC_USE in str(item.get("TextValue", "")).lower()
        elif _is_code(name, codes.DCM.AlgorithmName):
            result["model"]["name"] = str(item.TextValue)
        elif _is_code(name, codes.DCM.AlgorithmVersion):
            result["model"]["version"] = str(item.TextValue)
        elif _is_code(name, codes.DCM.Findings):
            for label, present, properties in _read_label_items(item):
                result["positive"][label] = present
                result["probabilities"][label] = properties[codes.DCM.Probability.value]
                result["thresholds"][label] = properties[codes.DCM.ThresholdValue.value]
        elif _is_code(name, _POSITIVE_IMAGE):
            images = [child for child in item.get("ContentSequence", []) if child.get("ValueType") == "IMAGE"]
            if len(images) != 1:
                raise ValueError(f"a positive-image group holds {len(images)} image references, not 1")
            uid = str(images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            result["positive_instances"].append(uid)
            result["instance_probabilities"][uid] = {
                label: properties[codes.DCM.Probability.value] for label, _, properties in _read_label_items(item)
            }
    missing = [label for label in LABELS if label not in result["probabilities"]]
    if missing:
        raise ValueError(f"report lacks study-level results for: {', '.join(missing)}")
    return result


# --------------------------------------------------------------------------------------------
# Building helpers
# --------------------------------------------------------------------------------------------


def _label_item(
    label: str,
    probabilities: Mapping[str, float],
    positive: Mapping[str, bool],
    thresholds: Mapping[str, float] | None = None,
) -> CodeContentItem:
    """CODE <label> = Present/Absent, with its probability (and threshold) as properties."""
    present = positive.get(label)
    if present is None:
        raise ValueError(f"no decision for label {label!r}")
    item = CodeContentItem(
        name=LABEL_CODES[label],
        value=codes.DCM.Present if present else codes.DCM.Absent,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    properties = [(codes.DCM.Probability, probability_value(probabilities, label))]
    if thresholds is not None:
        properties.append((codes.DCM.ThresholdValue, probability_value(thresholds, label)))
    item.ContentSequence = ContentSequence(
        [
            NumContentItem(name=name, value=value, unit=_UNIT, relationship_type=RelationshipTypeValues.HAS_PROPERTIES)
            for name, value in properties
        ]
    )
    return item


def _observation_context(findings: StudyFindings) -> ObservationContext:
    """ichscan as the observing device (TID 1004)."""
    # Same model, same device UID: a receiver can group reports by the model that made them.
    device_uid = generate_uid(entropy_srcs=["ichscan device", findings.model_name, findings.model_version])
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=device_uid,
                name="ichscan",
                manufacturer_name=ICHSCAN_MANUFACTURER,
                model_name=findings.model_name,
            ),
        )
    )


def _unique_instances(instances: Sequence[InstanceFinding]) -> list[InstanceFinding]:
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


def _study_uid(instances: Sequence[InstanceFinding]) -> str:
    uids = {str(inst.dataset.StudyInstanceUID) for inst in instances}
    if len(uids) != 1:
        raise ValueError(f"instances belong to {len(uids)} studies; a report covers one")
    return uids.pop()


def _check_previous(previous: pydicom.Dataset | None, study_uid: str, series_uid: str, instance_number: int) -> None:
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
# Reading helpers
# --------------------------------------------------------------------------------------------


def _concept(item: pydicom.Dataset) -> pydicom.Dataset | None:
    sequence = item.get("ConceptNameCodeSequence")
    return sequence[0] if sequence else None


def _is_code(coded: pydicom.Dataset, code: Code) -> bool:
    return coded.get("CodeValue") == code.value and coded.get("CodingSchemeDesignator") == code.scheme_designator


def _label_for(coded: pydicom.Dataset) -> str | None:
    for label, code in LABEL_CODES.items():
        if _is_code(coded, code):
            return label
    return None


def _read_label_items(container: pydicom.Dataset) -> list[tuple[str, bool, dict[str, float]]]:
    """``(label, present, {concept code value: number})`` for each label item in a container."""
    found = []
    for item in container.get("ContentSequence", []):
        name = _concept(item)
        label = _label_for(name) if name is not None and item.ValueType == "CODE" else None
        if label is None:
            continue
        present = _is_code(item.ConceptCodeSequence[0], codes.DCM.Present)
        properties: dict[str, float] = {}
        for child in item.get("ContentSequence", []):
            child_name = _concept(child)
            if child.ValueType == "NUM" and child_name is not None and child.get("MeasuredValueSequence"):
                properties[str(child_name.CodeValue)] = _num_value(child.MeasuredValueSequence[0])
        found.append((label, present, properties))
    return found


def _num_value(measured: pydicom.Dataset) -> float:
    # FloatingPointValue (FD) is exact; NumericValue (DS) is limited to 16 characters.
    if "FloatingPointValue" in measured:
        return float(measured.FloatingPointValue)
    return float(measured.NumericValue)


def _referenced_uids(sequence: Sequence[pydicom.Dataset]) -> list[str]:
    """SOP Instance UIDs in a Hierarchical SOP Instance Reference sequence (study/series/instance)."""
    return [
        str(instance.ReferencedSOPInstanceUID)
        for study in sequence
        for series in study.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedSOPSequence", [])
    ]
