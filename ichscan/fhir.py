"""A study's result as a FHIR R4B document: one transaction Bundle per study (``--fhir-out``).

:func:`study_bundle` is a pure function of a :class:`~ichscan.events.StudyResult`: every
identifier and every ``urn:uuid`` in it is derived from the study's UID (and the model), so
building it twice gives the same resources, and POSTing it twice to a FHIR server updates
them instead of adding copies. The Bundle is a ``transaction`` whose entries are
conditional updates (``PUT DiagnosticReport?identifier=...``) keyed on those identifiers::

    Bundle (type transaction)
      DiagnosticReport   PUT ?identifier=urn:dicom:uid|urn:oid:<report UID>
        status final | amended, category RAD (v2-0074), code LOINC 24725-4 "CT Head"
        subject          Patient by identifier (PatientID; no Patient resource, no name)
        basedOn          ServiceRequest by identifier (AccessionNumber, type ACSN)
        imagingStudy     ImagingStudy by identifier (urn:dicom:uid, urn:oid:<StudyInstanceUID>)
        result           the six Observations
        conclusion       the SR's conclusion, the top finding, slices screened, "not for diagnostic use"
        conclusionCode   SNOMED CT "Intracranial hemorrhage" (+ the positive subtypes) when positive
      Observation x 6    PUT ?identifier=urn:dicom:uid|urn:oid:<the SR's Tracking UID of the label>
        code (+ bodySite) the TID 1500 report's finding (and finding site) of the label
        valueQuantity    the study's probability, UCUM "1"
        interpretation   POS | NEG (v3-ObservationInterpretation) at the threshold
        component        DCM 122411 "Threshold Value", UCUM "1"
        derivedFrom      the ImagingStudy by identifier; device: the Device
      Device             PUT ?identifier=urn:dicom:uid|urn:oid:<the SR's Device Observer UID>
        manufacturer "ichscan", model name, version = weights (file name and sha256),
        note "not for diagnostic use" with demonstration weights

R4B's ``DiagnosticReport.performer`` may only be a Practitioner, PractitionerRole,
Organization or CareTeam, so the Device is named by each Observation's ``device``. No
patient name is ever written: :class:`~ichscan.events.StudyResult` carries none.

:func:`write_study_bundle` writes ``DIR/<StudyInstanceUID>.json`` durably, replacing the
study's earlier file; a result that differs from the one already there is ``amended``.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from ichscan.dicom import ICHSCAN_MANUFACTURER, is_valid_uid
from ichscan.dicom_results.findings import LABEL_CODES, PRIVATE_SCHEME, probability_value
from ichscan.dicom_results.tid1500 import DEMO_COMMENT, GROUP_CODES, conclusion_text, device_observer_uid, tracking_uid
from ichscan.durable import write_durably
from ichscan.labels import LABELS

if TYPE_CHECKING:
    from ichscan.events import StudyResult

#: The FHIR system of each DICOM coding scheme ichscan's findings use. ichscan owns no
#: domain, so its private scheme (``99ICHSCAN``) is a fixed UUID: ``uuid5(NAMESPACE_URL, "ichscan:99ICHSCAN")``.
CODE_SYSTEMS: Mapping[str, str] = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    PRIVATE_SCHEME: "urn:uuid:bf2349b1-c843-5782-aa59-a65f92231b75",
}
#: Identifiers that are DICOM UIDs, as FHIR's ImagingStudy names them.
DICOM_UID_SYSTEM = "urn:dicom:uid"
LOINC = "http://loinc.org"
#: The report's code: LOINC 24725-4 "CT Head" (a radiology study code, class RAD).
REPORT_CODE = {"system": LOINC, "code": "24725-4", "display": "CT Head"}
RADIOLOGY = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
IMAGING = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging", "display": "Imaging"}
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
POSITIVE = {"system": _INTERPRETATION, "code": "POS", "display": "Positive"}
NEGATIVE = {"system": _INTERPRETATION, "code": "NEG", "display": "Negative"}
_IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
MEDICAL_RECORD_NUMBER = {"system": _IDENTIFIER_TYPE, "code": "MR", "display": "Medical record number"}
ACCESSION = {"system": _IDENTIFIER_TYPE, "code": "ACSN", "display": "Accession ID"}


def study_bundle(result: StudyResult, *, amended: bool = False) -> dict[str, Any]:
    """The FHIR R4B transaction Bundle of one study's result, as JSON-ready values.

    A pure function of ``result`` (and ``amended``); checked against the R4B models of
    ``fhir.resources`` before it is returned.

    Parameters
    ----------
    result
        The completed study's result.
    amended
        The study's result was published before with other values: status ``amended``
        instead of ``final`` (see :func:`amends`).

    Returns
    -------
    dict
        ``{"resourceType": "Bundle", "type": "transaction", "entry": [...]}``: the
        DiagnosticReport, its six Observations (in label order) and the Device.

    Raises
    ------
    ValueError
        For a study UID that is not a valid UID, a probability outside [0, 1], a label
        without a value, or a resource the R4B models refuse.
    """
    uid = result.study_instance_uid
    if not is_valid_uid(uid):
        raise ValueError(f"study UID {uid!r} is not a valid UID")
    status = "amended" if amended else "final"
    common: dict[str, Any] = {}
    if result.patient_id:
        common["subject"] = {"type": "Patient", "identifier": {"type": {"coding": [MEDICAL_RECORD_NUMBER]}, "value": result.patient_id}}
    effective = _fhir_date(result.study_date)
    if effective:
        common["effectiveDateTime"] = effective
    common["issued"] = datetime.datetime.fromtimestamp(result.completed_at, datetime.timezone.utc).isoformat(timespec="milliseconds")
    study = {"type": "ImagingStudy", "identifier": _dicom_uid(uid)}

    device = _entry("Device", device_observer_uid(result.model_name, result.model_version), _device(result))
    observations = [
        _entry("Observation", tracking_uid(uid, label), _observation(result, label, status, common, study, device["fullUrl"]))
        for label in LABELS
    ]
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [_dicom_uid(report_uid(uid))],
    }
    if result.accession_number:
        report["basedOn"] = [
            {"type": "ServiceRequest", "identifier": {"type": {"coding": [ACCESSION]}, "value": result.accession_number}}
        ]
    report.update(
        status=status,
        category=[{"coding": [RADIOLOGY]}],
        code={"coding": [REPORT_CODE], "text": "CT head: intracranial hemorrhage screening (ichscan)"},
        **common,
        result=[{"reference": entry["fullUrl"], "type": "Observation"} for entry in observations],
        imagingStudy=[study],
        conclusion=_conclusion(result),
    )
    if result.is_positive:
        positive = [LABEL_CODES["any"], *(LABEL_CODES[label] for label in LABELS if label != "any" and result.positive[label])]
        report["conclusionCode"] = [{"coding": [_coding(code)]} for code in positive]
    report_entry = _entry("DiagnosticReport", report_uid(uid), report)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [report_entry, *observations, device]}
    validate_bundle(bundle)
    return bundle


def report_uid(study_instance_uid: str) -> str:
    """The UID identifying the study's DiagnosticReport, the same for every revision."""
    return generate_uid(entropy_srcs=["ichscan fhir report", study_instance_uid])


def validate_bundle(bundle: Mapping[str, Any]) -> None:
    """Check ``bundle`` and each entry's resource against the ``fhir.resources`` R4B models.

    Raises
    ------
    ValueError
        The first model's complaint (pydantic's ``ValidationError`` is a ``ValueError``).
    """
    import importlib

    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(bundle)
    for entry in bundle.get("entry", []):
        kind = entry["resource"]["resourceType"]
        model = getattr(importlib.import_module(f"fhir.resources.R4B.{kind.lower()}"), kind)
        model.model_validate(entry["resource"])


def amends(previous: Mapping[str, Any] | None, bundle: Mapping[str, Any]) -> bool:
    """Whether ``bundle`` (built as ``final``) amends the study's ``previous`` bundle: it
    says something else (the status and the ``issued`` time aside), or ``previous`` was
    itself an amendment. ``None`` (nothing published yet) is never amended."""
    if previous is None:
        return False
    was_amended = any(entry.get("resource", {}).get("status") == "amended" for entry in previous.get("entry", []))
    return was_amended or _substance(previous) != _substance(bundle)


def bundle_path(folder: Path, study_instance_uid: str) -> Path:
    """``folder/<StudyInstanceUID>.json``; refuses a UID that is not one (it goes into a path).

    Raises
    ------
    ValueError
        For an invalid UID.
    """
    if not is_valid_uid(study_instance_uid):
        raise ValueError(f"study UID {study_instance_uid!r} is not a valid UID; no FHIR file written")
    return Path(folder) / f"{study_instance_uid}.json"


def bundle_bytes(bundle: Mapping[str, Any]) -> bytes:
    """The file's content: indented UTF-8 JSON with a final newline."""
    return (json.dumps(bundle, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_study_bundle(folder: Path, result: StudyResult) -> Path:
    """Write the study's Bundle to ``folder/<StudyInstanceUID>.json`` durably (atomic
    replace, fsync), ``amended`` when the file already there says something else.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    ValueError
        As :func:`study_bundle` and :func:`bundle_path`.
    OSError
        When the file cannot be written.
    """
    path = bundle_path(folder, result.study_instance_uid)
    bundle = study_bundle(result)
    if amends(read_bundle(path), bundle):
        bundle = study_bundle(result, amended=True)
    write_durably(path, bundle_bytes(bundle))
    return path


def read_bundle(path: Path) -> dict[str, Any] | None:
    """A Bundle file written before, or ``None`` when there is none (or it is not JSON)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------------------------
# Building helpers
# --------------------------------------------------------------------------------------------


def _entry(kind: str, uid: str, resource: dict[str, Any]) -> dict[str, Any]:
    """A transaction entry: a conditional update keyed on the resource's identifier, with a
    ``urn:uuid`` full URL derived from that identifier (the Bundle's internal references)."""
    identifier = _dicom_uid(uid)
    token = f"{identifier['system']}|{identifier['value']}"
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{kind}?identifier={token}')}",
        "resource": resource,
        "request": {"method": "PUT", "url": f"{kind}?{urlencode({'identifier': token})}"},
    }


def _observation(
    result: StudyResult, label: str, status: str, common: dict[str, Any], study: dict[str, Any], device: str
) -> dict[str, Any]:
    """One label's Observation: the study's probability, its decision and threshold."""
    coding = GROUP_CODES[label]
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [_dicom_uid(tracking_uid(result.study_instance_uid, label))],
        "status": status,
        "category": [{"coding": [IMAGING]}],
        "code": {"coding": [_coding(coding.finding)], "text": "Intracranial hemorrhage" if label == "any" else f"{label.capitalize()} hemorrhage"},
        **common,
        "valueQuantity": _probability(result.probabilities, label),
        "interpretation": [{"coding": [POSITIVE if result.positive[label] else NEGATIVE]}],
    }
    if coding.site is not None:
        observation["bodySite"] = {"coding": [_coding(coding.site)]}
    observation.update(
        device={"reference": device, "type": "Device"},
        derivedFrom=[study],
        component=[{"code": {"coding": [_coding(codes.DCM.ThresholdValue)]}, "valueQuantity": _probability(result.thresholds, label)}],
    )
    return observation


def _device(result: StudyResult) -> dict[str, Any]:
    device: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [_dicom_uid(device_observer_uid(result.model_name, result.model_version))],
        "status": "active",
        "manufacturer": ICHSCAN_MANUFACTURER,
        "deviceName": [
            {"name": "ichscan", "type": "user-friendly-name"},
            {"name": result.model_name, "type": "model-name"},
        ],
        "modelNumber": result.model_name,
        "type": {"text": "Intracranial hemorrhage screening software"},
        "version": [{"value": result.model_version}],
    }
    if result.demo:
        device["note"] = [{"text": DEMO_COMMENT}]
    return device


def _conclusion(result: StudyResult) -> str:
    words = conclusion_text(result.probabilities, result.positive, result.thresholds)
    if result.is_positive and result.top_label != "any":
        words += f"; top finding: {result.top_label} (probability {result.top_probability:.3f})"
    words += f". {result.slices} slices screened, {result.positive_slices} positive."
    if result.demo:
        words += f" {DEMO_COMMENT[0].upper()}{DEMO_COMMENT[1:]}."
    return words


def _probability(values: Mapping[str, float], label: str) -> dict[str, Any]:
    """Probabilities and thresholds are dimensionless (UCUM "1", as in the SR), at full precision
    (the CSVs round to six decimals), so that the interpretation always agrees with them."""
    return {"value": probability_value(values, label), "unit": "probability", "system": CODE_SYSTEMS["UCUM"], "code": "1"}


def _coding(code: Code) -> dict[str, str]:
    return {"system": CODE_SYSTEMS[code.scheme_designator], "code": code.value, "display": code.meaning}


def _dicom_uid(uid: str) -> dict[str, str]:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def _fhir_date(dicom_date: str) -> str:
    """A DICOM DA (YYYYMMDD) as a FHIR date; empty when absent or not a real date."""
    try:
        return datetime.datetime.strptime(dicom_date.strip(), "%Y%m%d").date().isoformat()
    except ValueError:
        return ""


def _substance(bundle: Mapping[str, Any]) -> list[Any]:
    """What a bundle says: its resources without their status and ``issued`` time."""
    return [
        {key: value for key, value in entry.get("resource", {}).items() if key not in ("status", "issued")}
        for entry in bundle.get("entry", [])
    ]


__all__ = [
    "CODE_SYSTEMS",
    "amends",
    "bundle_bytes",
    "bundle_path",
    "read_bundle",
    "report_uid",
    "study_bundle",
    "validate_bundle",
    "write_study_bundle",
]
