"""The study's report as a TID 1500 Imaging Measurement Report (``--sr-template tid1500``,
the default), and reading it back.

Viewers built on dcmjs (OHIF) interpret TID 1500 measurement reports and leave SRs of other
templates undisplayed, so this is the report ichscan writes unless told otherwise. In the
spirit of IHE AI Results: ichscan is the observing device, one measurement group (TID 1501)
per label carries that label's study-level probability, its threshold and the decision at
it, and a Qualitative Evaluations container the study-level conclusion. The document is a
Comprehensive SR (as the other template's: no 3-D coordinates), built with highdicom's
``MeasurementReport``::

    CONTAINER  (DCM 126000 "Imaging Measurement Report")        TemplateIdentifier 1500
      HAS CONCEPT MOD  CODE  Language of Content Item and Descendants = English (US)
      HAS OBS CONTEXT  CODE  Observer Type = Device
      HAS OBS CONTEXT  UIDREF Device Observer UID        (one per model and weights)
      HAS OBS CONTEXT  TEXT  Device Observer Name = "ichscan"
      HAS OBS CONTEXT  TEXT  Device Observer Manufacturer = "ichscan"
      HAS OBS CONTEXT  TEXT  Device Observer Model Name = model name
      HAS OBS CONTEXT  TEXT  Device Observer Serial Number = weights (file name and sha256)
      HAS CONCEPT MOD  CODE  Procedure reported = (SCT 303653007 "Computed tomography of head")
      CONTAINS  CONTAINER  (DCM 126010 "Imaging Measurements")
        CONTAINS  CONTAINER  (DCM 125007 "Measurement Group")       x 6, one per label
          HAS OBS CONTEXT  TEXT    Tracking Identifier = "ichscan <label>"
          HAS OBS CONTEXT  UIDREF  Tracking Unique Identifier (the same for a study's revisions)
          CONTAINS  CODE           Finding = <label's finding>
          HAS CONCEPT MOD  CODE    Finding Site = <label's site>    [SAH, IVH, IPH only]
          HAS CONCEPT MOD  TEXT    Algorithm Name = model name; TEXT Algorithm Version = weights
          CONTAINS  IMAGE  (DCM 121112 "Source of Measurement") -> each slice positive for the label
          CONTAINS  NUM    (DCM 122157 "Probability")       value, unit UCUM "1"
          CONTAINS  NUM    (DCM 122411 "Threshold Value")   value, unit UCUM "1"
          CONTAINS  CODE   <label's finding> = (DCM 121053 "Present" | DCM 121054 "Absent")
      CONTAINS  CONTAINER  (UMLS C0034375 "Qualitative Evaluations")
        CONTAINS  CODE  (SCT 1386000 "Intracranial hemorrhage") = Present | Absent   study conclusion
        CONTAINS  TEXT  (DCM 121077 "Conclusion") = the same in words, with probability and threshold
        CONTAINS  TEXT  (DCM 121106 "Comment") = "not for diagnostic use: ..."       [demo weights]

Each group's finding and finding site are :data:`GROUP_CODES`: SNOMED CT wherever pydicom's
code dictionary can express the label, as the finding "Intracranial hemorrhage" (``any``) or
as "Hemorrhage" with the SNOMED CT site (subarachnoid space of brain, brain ventricle, brain:
``subarachnoid``, ``intraventricular``, ``intraparenchymal``), the standard TID 1501 way
of making a finding specific. The dictionary has no concept for the epidural or the subdural
space (only the dura mater, which is not the site), so ``epidural`` and ``subdural`` keep
their private codes (:data:`~ichscan.dicom_results.findings.LABEL_CODES`, scheme
:data:`~ichscan.dicom_results.findings.PRIVATE_SCHEME`, declared in the Coding Scheme
Identification Sequence). The (finding, site) pairs are distinct, so reading a report back
maps each group to its label. Every screened instance, series by series, is in the Current
Requested Procedure Evidence Sequence; a revision names its predecessor as the other
template's does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from ichscan.dicom import ICHSCAN_MANUFACTURER
from ichscan.dicom_results.findings import (
    LABEL_CODES,
    NOT_FOR_DIAGNOSTIC_USE,
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
)
from ichscan.dicom_results.sr import sr_document
from ichscan.labels import LABELS

#: TID 1500 row 14: the report's qualitative evaluations (a UMLS concept the template names).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: The procedure reported (CID 100 is extensible; pydicom's dictionary has this SNOMED CT concept).
PROCEDURE = codes.SCT.ComputedTomographyOfHead
_UNIT = codes.UCUM.NoUnits  # UCUM "1": a probability is a dimensionless number


class GroupCoding(NamedTuple):
    """How a label's measurement group is coded: its finding and, if any, its finding site."""

    finding: Code
    site: Code | None


#: Per label, the group's finding (also the name of its Present/Absent evaluation) and finding
#: site. SNOMED CT from pydicom's dictionary where it can express the label; epidural and
#: subdural have no space concept there, so they keep the private codes of ``LABEL_CODES``.
GROUP_CODES: Mapping[str, GroupCoding] = {
    "epidural": GroupCoding(LABEL_CODES["epidural"], None),
    "intraparenchymal": GroupCoding(codes.SCT.Hemorrhage, codes.SCT.Brain),
    "intraventricular": GroupCoding(codes.SCT.Hemorrhage, codes.SCT.BrainVentricle),
    "subarachnoid": GroupCoding(codes.SCT.Hemorrhage, codes.SCT.CranialSubarachnoidSpace),
    "subdural": GroupCoding(LABEL_CODES["subdural"], None),
    "any": GroupCoding(LABEL_CODES["any"], None),
}


#: The comment of a report made with demonstration weights.
DEMO_COMMENT = f"{NOT_FOR_DIAGNOSTIC_USE}: produced with demonstration weights"


def tracking_uid(study_instance_uid: str, label: str) -> str:
    """The UID of a label's finding in a study: the SR's Tracking Unique Identifier, the same
    for every revision (and the identifier of the FHIR Observation of the same finding)."""
    return generate_uid(entropy_srcs=["ichscan finding", study_instance_uid, label])


def device_observer_uid(model_name: str, model_version: str) -> str:
    """The Device Observer UID of ichscan with one model and weights (the FHIR Device's identifier)."""
    return generate_uid(entropy_srcs=["ichscan device", model_name, model_version])


def conclusion_text(probabilities: Mapping[str, float], positive: Mapping[str, bool], thresholds: Mapping[str, float]) -> str:
    """The study's conclusion in words: the decision for ``any`` with its probability and
    threshold, and the subtypes at their thresholds (the SR's Conclusion, the FHIR report's).

    Raises
    ------
    ValueError
        Without a decision, probability or threshold for ``any``.
    """
    present = positive.get("any")
    if present is None:
        raise ValueError("no decision for label 'any'")
    any_p = probability_value(probabilities, "any")
    any_t = probability_value(thresholds, "any")
    if not present:
        return f"No intracranial hemorrhage at the threshold (probability {any_p:.3f}, threshold {any_t:.3f})"
    words = f"Intracranial hemorrhage suspected (probability {any_p:.3f}, threshold {any_t:.3f})"
    subtypes = [label for label in LABELS if label != "any" and positive.get(label)]
    if subtypes:
        words += "; subtypes at their thresholds: " + ", ".join(subtypes)
    return words


def build_measurement_report(
    findings: StudyFindings,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    previous: pydicom.Dataset | None = None,
    series_number: int = SR_SERIES_NUMBER,
) -> pydicom.Dataset:
    """Build the TID 1500 Imaging Measurement Report of one screened study.

    Parameters and checks are those of :func:`ichscan.dicom_results.sr.build_sr`.

    Returns
    -------
    pydicom.Dataset
        A highdicom ``ComprehensiveSR`` whose content follows TID 1500, with file meta.

    Raises
    ------
    ValueError
        As :func:`~ichscan.dicom_results.sr.build_sr`.
    """
    instances = report_instances(findings, previous, series_instance_uid, instance_number)
    study_uid = str(instances[0].dataset.StudyInstanceUID)
    algorithm = AlgorithmIdentification(name=findings.model_name, version=findings.model_version)
    groups = [_label_group(label, findings, instances, study_uid, algorithm) for label in LABELS]
    report = MeasurementReport(
        observation_context=_observation_context(findings),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_qualitative_evaluations(findings))
    return sr_document(
        findings,
        instances,
        report,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        previous=previous,
        series_number=series_number,
    )


def read_measurement_report(ds: pydicom.Dataset) -> dict[str, Any]:
    """Read back a report made by :func:`build_measurement_report`.

    Returns
    -------
    dict
        The keys of :func:`~ichscan.dicom_results.sr.read_comprehensive_sr`, where
        ``positive_instances`` are the slices the ``any`` group references and
        ``instance_probabilities`` is empty (TID 1500 carries study-level values only),
        plus ``positive_instances_by_label`` and ``conclusion`` (the Conclusion text).

    Raises
    ------
    ValueError
        If ``ds`` is not a TID 1500 report, or a label's group is missing or incomplete.
    """
    if ds.get("SOPClassUID") != SR_SOP_CLASS_UID or not ds.get("ConceptNameCodeSequence"):
        raise ValueError("not a Comprehensive SR")
    templates = ds.get("ContentTemplateSequence") or [pydicom.Dataset()]
    if str(templates[0].get("TemplateIdentifier", "")) != "1500":
        raise ValueError("not a TID 1500 measurement report")
    result: dict[str, Any] = {
        "probabilities": {},
        "positive": {},
        "thresholds": {},
        "positive_instances": [],
        "positive_instances_by_label": {},
        "instance_probabilities": {},
        "referenced_instances": referenced_uids(ds.get("CurrentRequestedProcedureEvidenceSequence", [])),
        "predecessors": referenced_uids(ds.get("PredecessorDocumentsSequence", [])),
        "model": {"name": None, "version": None},
        "not_for_diagnostic_use": False,
        "conclusion": None,
    }
    for item in ds.get("ContentSequence", []):
        name = concept_of(item)
        if name is not None and is_code(name, codes.DCM.ImagingMeasurements):
            for group in item.get("ContentSequence", []):
                group_name = concept_of(group)
                if group_name is not None and is_code(group_name, codes.DCM.MeasurementGroup):
                    _read_group(group, result)
        elif name is not None and is_code(name, QUALITATIVE_EVALUATIONS):
            for child in item.get("ContentSequence", []):
                child_name = concept_of(child)
                if child_name is None or child.ValueType != "TEXT":
                    continue
                if is_code(child_name, codes.DCM.Comment):
                    result["not_for_diagnostic_use"] |= NOT_FOR_DIAGNOSTIC_USE in str(child.TextValue).lower()
                elif is_code(child_name, codes.DCM.Conclusion):
                    result["conclusion"] = str(child.TextValue)
    missing = [label for label in LABELS if any(label not in result[key] for key in ("probabilities", "thresholds", "positive"))]
    if missing:
        raise ValueError(f"report lacks complete measurement groups for: {', '.join(missing)}")
    result["positive_instances"] = result["positive_instances_by_label"].get("any", [])
    return result


# --------------------------------------------------------------------------------------------
# Building helpers
# --------------------------------------------------------------------------------------------


def _label_group(
    label: str,
    findings: StudyFindings,
    instances: list[InstanceFinding],
    study_uid: str,
    algorithm: AlgorithmIdentification,
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one label: its finding and site (:data:`GROUP_CODES`), probability and
    threshold as NUM, the decision as CODE, the slices positive for the label as source images."""
    coding = GROUP_CODES[label]
    present = findings.positive.get(label)
    if present is None:
        raise ValueError(f"no decision for label {label!r}")
    measurements = [
        Measurement(name=name, value=probability_value(values, label), unit=_UNIT)
        for name, values in ((codes.DCM.Probability, findings.probabilities), (codes.DCM.ThresholdValue, findings.thresholds))
    ]
    # "Positive" per slice is the slice's own decision for this label, as in the results CSV.
    sources = [
        SourceImageForMeasurementGroup(
            referenced_sop_class_uid=str(inst.dataset.SOPClassUID),
            referenced_sop_instance_uid=str(inst.dataset.SOPInstanceUID),
        )
        for inst in instances
        if inst.positive.get(label, False)
    ]
    return MeasurementsAndQualitativeEvaluations(
        # The same finding of the same study keeps its UID across revisions, so a viewer can
        # follow it from one report to the next.
        tracking_identifier=TrackingIdentifier(uid=tracking_uid(study_uid, label), identifier=f"ichscan {label}"),
        finding_type=coding.finding,
        algorithm_id=algorithm,
        finding_sites=[FindingSite(anatomic_location=coding.site)] if coding.site is not None else None,
        measurements=measurements,
        qualitative_evaluations=[
            QualitativeEvaluation(name=coding.finding, value=codes.DCM.Present if present else codes.DCM.Absent)
        ],
        source_images=sources or None,
    )


def _observation_context(findings: StudyFindings) -> ObservationContext:
    """ichscan as the observing device (TID 1004): the model as its model name, the weights'
    identity as its serial number, one device UID per model and weights."""
    device_uid = device_observer_uid(findings.model_name, findings.model_version)
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=device_uid,
                name="ichscan",
                manufacturer_name=ICHSCAN_MANUFACTURER,
                model_name=findings.model_name,
                serial_number=findings.model_version,
            ),
        )
    )


def _qualitative_evaluations(findings: StudyFindings) -> ContainerContentItem:
    """The study-level conclusion, in code and words, and the usage restriction."""
    present = findings.positive.get("any")
    if present is None:
        raise ValueError("no decision for label 'any'")
    words = conclusion_text(findings.probabilities, findings.positive, findings.thresholds)
    container = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS)
    items = [
        CodeContentItem(
            name=LABEL_CODES["any"],
            value=codes.DCM.Present if present else codes.DCM.Absent,
            relationship_type=RelationshipTypeValues.CONTAINS,
        ),
        TextContentItem(name=codes.DCM.Conclusion, value=words, relationship_type=RelationshipTypeValues.CONTAINS),
    ]
    if findings.demo:
        items.append(
            TextContentItem(
                name=codes.DCM.Comment,
                value=DEMO_COMMENT,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
    container.ContentSequence = ContentSequence(items)
    return container


# --------------------------------------------------------------------------------------------
# Reading helpers
# --------------------------------------------------------------------------------------------


def _read_group(group: pydicom.Dataset, result: dict[str, Any]) -> None:
    """One label's measurement group into ``result``."""
    items = list(group.get("ContentSequence", []))
    finding = site = None
    for item in items:
        name = concept_of(item)
        if item.ValueType != "CODE" or name is None:
            continue
        if is_code(name, codes.DCM.Finding):
            finding = item.ConceptCodeSequence[0]
        elif is_code(name, codes.SCT.FindingSite):
            site = item.ConceptCodeSequence[0]
    label = _label_of(finding, site)
    if label is None:
        return
    evaluation = GROUP_CODES[label].finding
    sources = []
    for item in items:
        name = concept_of(item)
        if item.ValueType == "NUM" and name is not None and item.get("MeasuredValueSequence"):
            value = num_value(item.MeasuredValueSequence[0])
            if is_code(name, codes.DCM.Probability):
                result["probabilities"][label] = value
            elif is_code(name, codes.DCM.ThresholdValue):
                result["thresholds"][label] = value
        elif item.ValueType == "CODE" and name is not None and (is_code(name, evaluation) or label_for(name) == label):
            result["positive"][label] = is_code(item.ConceptCodeSequence[0], codes.DCM.Present)
        elif item.ValueType == "IMAGE":
            sources.append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        elif item.ValueType == "TEXT" and name is not None and is_code(name, codes.DCM.AlgorithmName):
            result["model"]["name"] = str(item.TextValue)
        elif item.ValueType == "TEXT" and name is not None and is_code(name, codes.DCM.AlgorithmVersion):
            result["model"]["version"] = str(item.TextValue)
    result["positive_instances_by_label"][label] = sources


def _label_of(finding: pydicom.Dataset | None, site: pydicom.Dataset | None) -> str | None:
    """The label whose (finding, site) pair :data:`GROUP_CODES` holds; a group without a site
    whose finding is a label's own concept (reports written before the sites) is that label."""
    if finding is None:
        return None
    for label, coding in GROUP_CODES.items():
        if not is_code(finding, coding.finding):
            continue
        if site is None if coding.site is None else site is not None and is_code(site, coding.site):
            return label
    return label_for(finding) if site is None else None
