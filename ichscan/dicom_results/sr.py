"""The Comprehensive SR tree of a screened study (``--sr-template comprehensive``), and
the SR document both templates share.

The default report is TID 1500 (:mod:`ichscan.dicom_results.tid1500`), the template viewers
such as OHIF interpret. This tree came first and stays as an option for receivers that
read it: ichscan's own content tree of CONTAINER, TEXT, CODE, NUM and IMAGE items, with the
thresholds and the usage restriction as items of their own and the probabilities of every
positive slice. It uses DICOM (DCM), LOINC (LN) and SNOMED CT (SCT) concepts wherever
pydicom's code dictionary has one, and the private scheme :data:`PRIVATE_SCHEME` (declared
in the Coding Scheme Identification Sequence) for the rest. It declares no template
identifier because it follows no DICOM template; its structure is::

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
    concept_of,
    is_code,
    label_for,
    num_value,
    probability_value,
    referenced_uids,
    report_instances,
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
    instances = report_instances(findings, previous, series_instance_uid, instance_number)

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

    return sr_document(
        findings,
        instances,
        root,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        previous=previous,
        series_number=series_number,
    )


def sr_document(
    findings: StudyFindings,
    instances: Sequence[InstanceFinding],
    content: ContainerContentItem | Sequence[pydicom.Dataset],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    previous: pydicom.Dataset | None,
    series_number: int,
) -> ComprehensiveSR:
    """The Comprehensive SR document around a content tree, the same for both templates:
    patient and study modules from the screened instances, every instance as evidence,
    ichscan as manufacturer, preliminary and unverified, the private scheme declared."""
    description = _SR_DESCRIPTION + (DEMO_SUFFIX if findings.demo else "")
    # highdicom takes the patient and study attributes from the first piece of evidence.
    evidence = [with_study_attributes(instances[0].dataset)] + [inst.dataset for inst in instances[1:]]
    return ComprehensiveSR(
        evidence=evidence,
        content=content,
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
        # Declares the private scheme, so a receiver can tell whose codes these are. It holds
        # only what pydicom's dictionary has no standard code for: in TID 1500 the epidural
        # and subdural findings (no SNOMED concept for their spaces; the other labels are
        # SNOMED findings and sites), in the comprehensive tree the five subtypes and its
        # own items (USAGE, POSIMG).
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="ichscan private codes",
                version="1",
                responsible_organization="ichscan project",
            )
        ],
    )


def read_comprehensive_sr(ds: pydicom.Dataset) -> dict[str, Any]:
    """Read back a report made by :func:`build_sr` (``--sr-template comprehensive``).

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
    if not is_code(ds.ConceptNameCodeSequence[0], _TITLE):
        raise ValueError("not an ichscan screening report (unexpected document title)")
    result: dict[str, Any] = {
        "probabilities": {},
        "positive": {},
        "thresholds": {},
        "positive_instances": [],
        "instance_probabilities": {},
        "referenced_instances": referenced_uids(ds.get("CurrentRequestedProcedureEvidenceSequence", [])),
        "predecessors": referenced_uids(ds.get("PredecessorDocumentsSequence", [])),
        "model": {"name": None, "version": None},
        "not_for_diagnostic_use": False,
    }
    for item in ds.get("ContentSequence", []):
        name = concept_of(item)
        if name is None:
            continue
        if is_code(name, _USAGE):
            result["not_for_diagnostic_use"] |= NOT_FOR_DIAGNOSTIC_USE in str(item.get("TextValue", "")).lower()
        elif is_code(name, codes.DCM.AlgorithmName):
            result["model"]["name"] = str(item.TextValue)
        elif is_code(name, codes.DCM.AlgorithmVersion):
            result["model"]["version"] = str(item.TextValue)
        elif is_code(name, codes.DCM.Findings):
            for label, present, properties in _read_label_items(item):
                result["positive"][label] = present
                result["probabilities"][label] = properties[codes.DCM.Probability.value]
                result["thresholds"][label] = properties[codes.DCM.ThresholdValue.value]
        elif is_code(name, _POSITIVE_IMAGE):
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


def _read_label_items(container: pydicom.Dataset) -> list[tuple[str, bool, dict[str, float]]]:
    """``(label, present, {concept code value: number})`` for each label item in a container."""
    found = []
    for item in container.get("ContentSequence", []):
        name = concept_of(item)
        label = label_for(name) if name is not None and item.ValueType == "CODE" else None
        if label is None:
            continue
        present = is_code(item.ConceptCodeSequence[0], codes.DCM.Present)
        properties: dict[str, float] = {}
        for child in item.get("ContentSequence", []):
            child_name = concept_of(child)
            if child.ValueType == "NUM" and child_name is not None and child.get("MeasuredValueSequence"):
                properties[str(child_name.CodeValue)] = num_value(child.MeasuredValueSequence[0])
        found.append((label, present, properties))
    return found
