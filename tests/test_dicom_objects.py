"""The SR and key image ichscan writes back into a study: built from real phantom files,
saved, checked with dicom3tools' dciodvfy and read back."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom import UID
from pydicom.sr import _concepts_dict

from helpers import DCIODVFY, needs_dciodvfy, save
import ichscan
from ichscan.dicom import ICHSCAN_MANUFACTURER, SKIPPED, decode_instance
from ichscan.dicom_results import (
    LABEL_CODES,
    NOT_FOR_DIAGNOSTIC_USE,
    PRIVATE_SCHEME,
    SC_SOP_CLASS_UID,
    SR_SOP_CLASS_UID,
    InstanceFinding,
    StudyFindings,
    build_key_image,
    build_sr,
    read_sr_findings,
    select_key_instance,
)
from ichscan.imaging import brain_window_image
from ichscan.labels import LABELS
from ichscan.overlay import render_overlay
from ichscan.records import Instance, Prediction, SliceResult, Status, top_finding


#: Patient and study attributes the source has and our objects must repeat unchanged.
STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
THRESHOLDS = {**{label: 0.5 for label in LABELS}, "any": 0.4}


@dataclass
class Phantom:
    paths: list[Path]
    headers: list[pydicom.Dataset]
    findings: StudyFindings

    def path_of(self, sop_instance_uid: str) -> Path:
        return next(p for p, h in zip(self.paths, self.headers) if h.SOPInstanceUID == sop_instance_uid)


def make_findings(headers: list[pydicom.Dataset], labels: list[dict[str, int]], demo: bool) -> StudyFindings:
    """Plausible probabilities: high where the phantom has a bleed, low elsewhere, all distinct."""
    rng = np.random.default_rng(3)
    instances = []
    for header, truth in zip(headers, labels):
        probs = {
            label: float(rng.uniform(0.6, 0.99) if truth[label] else rng.uniform(0.001, 0.3)) for label in LABELS
        }
        instances.append(InstanceFinding(header, probs, {label: probs[label] >= THRESHOLDS[label] for label in LABELS}))
    study = {label: max(inst.probabilities[label] for inst in instances) for label in LABELS}
    return StudyFindings(
        instances=instances,
        probabilities=study,
        positive={label: study[label] >= THRESHOLDS[label] for label in LABELS},
        thresholds=dict(THRESHOLDS),
        model_name="simple_cnn",
        model_version="demo_simple_cnn.pt sha256:0123abcd",
        demo=demo,
    )


@pytest.fixture(scope="module")
def phantom_files(make_phantoms) -> tuple[list[Path], list[dict[str, int]]]:
    _, records = make_phantoms(
        "phantom", studies=1, slices=8, seed=11, size=64, positive_fraction=0.5, transfer_syntaxes="ExplicitVRLittleEndian"
    )
    return [record.path for record in records], [record.labels for record in records]


@pytest.fixture(params=[True, False], ids=["demo", "clinical"])
def phantom(request: pytest.FixtureRequest, phantom_files: tuple[list[Path], list[dict[str, int]]]) -> Phantom:
    paths, labels = phantom_files
    # Reversed: the builders must not depend on the order the engine finishes slices in.
    paths, labels = paths[::-1], labels[::-1]
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    findings = make_findings(headers, labels, demo=request.param)
    assert findings.positive["any"] and not all(inst.positive["any"] for inst in findings.instances), (
        "the phantom study should mix positive and negative slices"
    )
    return Phantom(paths, headers, findings)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dciodvfy; return (error lines, warning lines)."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if "Error" in line], [line for line in lines if "Warning" in line]


def new_sr(findings: StudyFindings, **kwargs: object) -> pydicom.Dataset:
    args = {"series_instance_uid": UID(), "sop_instance_uid": UID(), "instance_number": 1, **kwargs}
    return build_sr(findings, **args)


def overlay_for(path: Path, finding: InstanceFinding) -> np.ndarray:
    """The overlay the reporters draw for this slice, as an RGB uint8 array."""
    decoded = decode_instance(path)
    assert decoded.status == "ok", decoded.error
    image = brain_window_image(decoded.pixels, decoded.slope, decoded.intercept)
    top_label, top_probability = top_finding(finding.probabilities, finding.positive["any"])
    result = SliceResult(
        Instance(str(path)),
        Status.OK,
        prediction=Prediction(finding.probabilities, finding.positive, top_label, top_probability),
    )
    return np.asarray(render_overlay(image, result))


# --------------------------------------------------------------------------------------------
# Structured report
# --------------------------------------------------------------------------------------------


def test_label_codes_are_dictionary_snomed_or_private() -> None:
    # Never a SNOMED code typed from memory: each must be in pydicom's code dictionary.
    snomed = {value for entry in _concepts_dict.concepts["SCT"].values() for value in entry}
    for label in LABELS:
        code = LABEL_CODES[label]
        if code.scheme_designator == "SCT":
            assert code.value in snomed, label
        else:
            assert code.scheme_designator == PRIVATE_SCHEME, label
    assert LABEL_CODES["any"].value == "1386000"  # Intracranial hemorrhage (disorder)
    assert len({(c.scheme_designator, c.value) for c in LABEL_CODES.values()}) == len(LABELS)


@needs_dciodvfy
def test_sr_passes_dciodvfy(phantom: Phantom, tmp_path: Path) -> None:
    path = save(new_sr(phantom.findings), tmp_path / "sr.dcm")
    errors, warnings = dciodvfy(path)
    assert errors == []
    # The private scheme is declared in the Coding Scheme Identification Sequence, but
    # dciodvfy only knows the standard designators; nothing else should draw a warning.
    assert [w for w in warnings if f"<{PRIVATE_SCHEME}>" not in w] == []


def test_sr_round_trip(phantom: Phantom, tmp_path: Path) -> None:
    findings = phantom.findings
    series_uid, sop_uid = UID(), UID()
    path = save(
        build_sr(findings, series_instance_uid=series_uid, sop_instance_uid=sop_uid, instance_number=1),
        tmp_path / "sr.dcm",
    )
    ds = pydicom.dcmread(path)
    source = phantom.headers[0]

    assert ds.SOPClassUID == SR_SOP_CLASS_UID
    assert ds.file_meta.MediaStorageSOPClassUID == SR_SOP_CLASS_UID
    assert ds.SOPInstanceUID == sop_uid and ds.SeriesInstanceUID == series_uid
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.Modality == "SR"
    for keyword in STUDY_KEYWORDS:
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.Manufacturer == ICHSCAN_MANUFACTURER
    assert ds.SoftwareVersions == ichscan.__version__
    assert (NOT_FOR_DIAGNOSTIC_USE in ds.SeriesDescription) == findings.demo

    read = read_sr_findings(ds)
    for label in LABELS:
        assert read["probabilities"][label] == pytest.approx(findings.probabilities[label], rel=1e-12)
        assert read["thresholds"][label] == pytest.approx(THRESHOLDS[label], rel=1e-12)
        assert read["positive"][label] == findings.positive[label]
    assert read["model"] == {"name": findings.model_name, "version": findings.model_version}
    assert read["not_for_diagnostic_use"] == findings.demo
    assert read["predecessors"] == []
    assert sorted(read["referenced_instances"]) == sorted(h.SOPInstanceUID for h in phantom.headers)

    positives = sorted(
        (inst for inst in findings.instances if inst.positive["any"]), key=lambda inst: int(inst.dataset.InstanceNumber)
    )
    assert read["positive_instances"] == [inst.dataset.SOPInstanceUID for inst in positives]
    for inst in positives:
        got = read["instance_probabilities"][inst.dataset.SOPInstanceUID]
        assert got == pytest.approx(inst.probabilities, rel=1e-12)


def test_sr_codes_study_level_any_as_snomed(phantom: Phantom) -> None:
    ds = new_sr(phantom.findings)
    study = next(item for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121070")
    concepts = [
        (item.ConceptNameCodeSequence[0].CodingSchemeDesignator, item.ConceptNameCodeSequence[0].CodeValue)
        for item in study.ContentSequence
    ]
    assert concepts == [(LABEL_CODES[label].scheme_designator, LABEL_CODES[label].value) for label in LABELS]
    assert ("SCT", "1386000") in concepts
    schemes = [item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence]
    assert PRIVATE_SCHEME in schemes


def test_revised_sr_references_previous(phantom: Phantom, tmp_path: Path) -> None:
    series_uid = UID()
    first = new_sr(phantom.findings, series_instance_uid=series_uid, instance_number=1)
    first_path = save(first, tmp_path / "first.dcm")
    previous = pydicom.dcmread(first_path, stop_before_pixels=True)

    revised_path = save(
        new_sr(phantom.findings, series_instance_uid=series_uid, instance_number=2, previous=previous),
        tmp_path / "revised.dcm",
    )
    revised = pydicom.dcmread(revised_path)
    assert revised.SeriesInstanceUID == first.SeriesInstanceUID
    assert revised.SOPInstanceUID != first.SOPInstanceUID
    assert revised.InstanceNumber > first.InstanceNumber
    assert revised.StudyInstanceUID == first.StudyInstanceUID
    predecessor = revised.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == first.StudyInstanceUID
    assert predecessor.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert read_sr_findings(revised)["predecessors"] == [first.SOPInstanceUID]
    assert "PredecessorDocumentsSequence" not in first

    if os.access(DCIODVFY, os.X_OK):
        assert dciodvfy(revised_path)[0] == []


def test_revised_sr_is_checked(phantom: Phantom) -> None:
    series_uid = UID()
    first = new_sr(phantom.findings, series_instance_uid=series_uid, instance_number=3)
    with pytest.raises(ValueError, match="instance number"):
        new_sr(phantom.findings, series_instance_uid=series_uid, instance_number=3, previous=first)
    with pytest.raises(ValueError, match="series"):
        new_sr(phantom.findings, instance_number=4, previous=first)


def test_sr_refuses_bad_findings(phantom: Phantom) -> None:
    findings = phantom.findings
    other = pydicom.Dataset()
    other.update(findings.instances[0].dataset)
    other.StudyInstanceUID = UID()
    other.SOPInstanceUID = UID()
    stray = InstanceFinding(other, findings.instances[0].probabilities, findings.instances[0].positive)
    with pytest.raises(ValueError, match="2 studies"):
        new_sr(StudyFindings(**{**vars(findings), "instances": [*findings.instances, stray]}))
    with pytest.raises(ValueError, match="outside"):
        new_sr(StudyFindings(**{**vars(findings), "probabilities": {**findings.probabilities, "any": 1.5}}))
    with pytest.raises(ValueError, match="epidural"):
        new_sr(StudyFindings(**{**vars(findings), "thresholds": {"any": 0.5}}))
    with pytest.raises(ValueError, match="no screened instances"):
        new_sr(StudyFindings(**{**vars(findings), "instances": []}))


def test_read_sr_findings_refuses_other_objects(phantom: Phantom) -> None:
    with pytest.raises(ValueError):
        read_sr_findings(phantom.headers[0])


# --------------------------------------------------------------------------------------------
# Key image
# --------------------------------------------------------------------------------------------


def test_key_image(phantom: Phantom, tmp_path: Path) -> None:
    findings = phantom.findings
    key = select_key_instance(findings)
    assert key.probabilities["any"] == max(inst.probabilities["any"] for inst in findings.instances)
    overlay = overlay_for(phantom.path_of(key.dataset.SOPInstanceUID), key)
    assert "PixelData" not in key.dataset  # header only, as the engine will pass it

    series_uid, sop_uid = UID(), UID()
    path = save(
        build_key_image(
            key.dataset,
            overlay,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            instance_number=1,
            demo=findings.demo,
        ),
        tmp_path / "key.dcm",
    )
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SC_SOP_CLASS_UID and ds.SOPInstanceUID == sop_uid
    assert ds.SeriesInstanceUID == series_uid != key.dataset.SeriesInstanceUID
    for keyword in STUDY_KEYWORDS:
        assert ds.get(keyword) == key.dataset.get(keyword), keyword
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == overlay.shape
    assert ds.PhotometricInterpretation == "RGB"
    np.testing.assert_array_equal(ds.pixel_array, overlay)
    assert ds.Manufacturer == ICHSCAN_MANUFACTURER
    assert ds.SoftwareVersions == ichscan.__version__
    assert ds.BurnedInAnnotation == "YES"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == key.dataset.SOPInstanceUID
    assert list(ds.PatientOrientation) == ["L", "P"]  # the phantom is axial, rows left, columns posterior
    # 64 px enlarged to the 512 px overlay: spacing shrinks by the same factor.
    expected_spacing = float(key.dataset.PixelSpacing[0]) * 64 / overlay.shape[0]
    assert float(ds.PixelSpacing[0]) == pytest.approx(expected_spacing, rel=1e-5)
    assert (NOT_FOR_DIAGNOSTIC_USE in ds.SeriesDescription) == findings.demo
    assert (NOT_FOR_DIAGNOSTIC_USE in ds.get("ImageComments", "")) == findings.demo

    if os.access(DCIODVFY, os.X_OK):
        errors, warnings = dciodvfy(path)
        assert errors == []
        assert warnings == []


def test_key_image_without_orientation_or_body_part(phantom: Phantom, tmp_path: Path) -> None:
    source = pydicom.Dataset()
    source.update(phantom.headers[0])
    del source.ImageOrientationPatient, source.BodyPartExamined, source.PixelSpacing
    rgb = np.zeros((40, 30, 3), np.uint8)
    path = save(
        build_key_image(source, rgb, series_instance_uid=UID(), sop_instance_uid=UID(), instance_number=2, demo=False),
        tmp_path / "key.dcm",
    )
    ds = pydicom.dcmread(path)
    assert ds.PatientOrientation in (None, "", [])  # unknown, not guessed
    assert "PixelSpacing" not in ds
    assert "ImageComments" not in ds
    if os.access(DCIODVFY, os.X_OK):
        assert dciodvfy(path)[0] == []


def test_objects_from_headers_without_type2_attributes(phantom: Phantom, tmp_path: Path) -> None:
    # Anonymisers often drop Type 2 patient/study attributes; the objects must still build
    # (with them empty) and must not change the caller's headers.
    stripped = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID", "AccessionNumber")
    instances = []
    for inst in phantom.findings.instances:
        header = pydicom.Dataset()
        header.update(inst.dataset)
        for keyword in stripped:
            delattr(header, keyword)
        instances.append(InstanceFinding(header, inst.probabilities, inst.positive))
    findings = StudyFindings(**{**vars(phantom.findings), "instances": instances})
    sr_path = save(new_sr(findings), tmp_path / "sr.dcm")
    sc = build_key_image(
        instances[0].dataset,
        np.zeros((16, 16, 3), np.uint8),
        series_instance_uid=UID(),
        sop_instance_uid=UID(),
        instance_number=1,
        demo=False,
    )
    sc_path = save(sc, tmp_path / "sc.dcm")
    assert all(keyword not in inst.dataset for inst in instances for keyword in stripped)
    for path in (sr_path, sc_path):
        ds = pydicom.dcmread(path)
        assert ds.PatientID == phantom.headers[0].PatientID
        assert "PatientName" in ds and not ds.PatientName
        if os.access(DCIODVFY, os.X_OK):
            assert dciodvfy(path)[0] == []


def test_key_image_refuses_non_rgb(phantom: Phantom) -> None:
    uids = {"series_instance_uid": UID(), "sop_instance_uid": UID(), "instance_number": 1, "demo": True}
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8)):
        with pytest.raises(ValueError, match="H x W x 3"):
            build_key_image(phantom.headers[0], bad, **uids)


# --------------------------------------------------------------------------------------------
# Our objects are never screened again
# --------------------------------------------------------------------------------------------


def test_decoder_skips_our_objects(phantom: Phantom, tmp_path: Path) -> None:
    sr_path = save(new_sr(phantom.findings), tmp_path / "sr.dcm")
    overlay = np.full((64, 64, 3), 128, np.uint8)
    sc_path = save(
        build_key_image(
            phantom.headers[0], overlay, series_instance_uid=UID(), sop_instance_uid=UID(), instance_number=1, demo=True
        ),
        tmp_path / "sc.dcm",
    )
    for path in (sr_path, sc_path):
        result = decode_instance(path)
        assert result.status == SKIPPED, (path.name, result.error)
        # Skipped as ours, before any other reason (no pixels, colour) could apply.
        assert "written by ichscan" in result.error, (path.name, result.error)
