"""The TID 1500 report (the default SR): built from real phantom files, checked with
dciodvfy, read back by highdicom, and read from a real screened study by dcmjs, the DICOM
library OHIF uses (tests/js/read_sr.js; ``.ci/run`` installs it with ``npm ci``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom
import pydicom
import pytest
from highdicom import UID
from highdicom.sr.utils import find_content_items
from pydicom.sr import _concepts_dict
from pydicom.sr.codedict import codes

from helpers import ROOT, dicom_files, needs_dciodvfy, read_csv, run_ichscan, save
from ichscan.dicom_results import (
    GROUP_CODES,
    LABEL_CODES,
    NOT_FOR_DIAGNOSTIC_USE,
    PRIVATE_SCHEME,
    SR_SOP_CLASS_UID,
    build_report,
    read_sr_findings,
)
from ichscan.labels import LABELS
from test_dicom_objects import STUDY_KEYWORDS, THRESHOLDS, Phantom, dciodvfy, phantom, phantom_files  # noqa: F401 - fixtures

JS = ROOT / "tests" / "js"
NODE = shutil.which("node")
needs_dcmjs = pytest.mark.skipif(
    NODE is None or not (JS / "node_modules" / "dcmjs").is_dir(),
    reason="node or dcmjs is missing (.ci/run installs dcmjs: npm ci --prefix tests/js)",
)


def new_report(findings, template: str = "tid1500", **kwargs) -> pydicom.Dataset:
    args = {"series_instance_uid": UID(), "sop_instance_uid": UID(), "instance_number": 1, **kwargs}
    return build_report(findings, template=template, **args)


def positive_by_label(phantom: Phantom) -> dict[str, list[str]]:
    """Per label, the SOP Instance UIDs of the slices positive for it, by Instance Number."""
    ordered = sorted(phantom.findings.instances, key=lambda inst: int(inst.dataset.InstanceNumber))
    return {label: [str(i.dataset.SOPInstanceUID) for i in ordered if i.positive[label]] for label in LABELS}


#: Per label, the (finding, finding site) of its group, written out: SNOMED CT wherever
#: pydicom's dictionary can say it, the private codes for the epidural and subdural labels.
EXPECTED_GROUP_CODES = {
    "epidural": (("99ICHSCAN", "EDH"), None),
    "intraparenchymal": (("SCT", "50960005"), ("SCT", "12738006")),
    "intraventricular": (("SCT", "50960005"), ("SCT", "35764002")),
    "subarachnoid": (("SCT", "50960005"), ("SCT", "33930006")),
    "subdural": (("99ICHSCAN", "SDH"), None),
    "any": (("SCT", "1386000"), None),
}


def scheme_value(code) -> tuple[str, str] | None:
    return None if code is None else (code.scheme_designator, code.value)


def only_private_scheme_warnings(warnings: list[str]) -> list[str]:
    # dciodvfy knows only the standard coding scheme designators; the private one is declared.
    return [w for w in warnings if f"<{PRIVATE_SCHEME}>" not in w]


# --------------------------------------------------------------------------------------------
# Built from phantom headers
# --------------------------------------------------------------------------------------------


def test_group_codes_are_dictionary_snomed_where_it_has_them() -> None:
    # The standard codes come from pydicom's dictionary, never typed from memory; the pairs
    # tell the labels apart; only the labels without a SNOMED site keep private codes.
    snomed = {value for entry in _concepts_dict.concepts["SCT"].values() for value in entry}
    coded = {label: (scheme_value(c.finding), scheme_value(c.site)) for label, c in GROUP_CODES.items()}
    assert coded == EXPECTED_GROUP_CODES
    for coding in GROUP_CODES.values():
        for code in (coding.finding, coding.site):
            if code is not None and code.scheme_designator == "SCT":
                assert code.value in snomed
    assert GROUP_CODES["epidural"].finding == LABEL_CODES["epidural"]
    assert GROUP_CODES["subdural"].finding == LABEL_CODES["subdural"]
    assert len(set(EXPECTED_GROUP_CODES.values())) == len(LABELS)


def test_tid1500_round_trip(phantom: Phantom, tmp_path: Path) -> None:
    findings = phantom.findings
    path = save(new_report(findings), tmp_path / "sr.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SR_SOP_CLASS_UID  # Comprehensive SR, as the other template
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.ContentTemplateSequence[0].MappingResource == "DCMR"
    assert (ds.ConceptNameCodeSequence[0].CodeValue, ds.ConceptNameCodeSequence[0].CodingSchemeDesignator) == ("126000", "DCM")
    for keyword in STUDY_KEYWORDS:
        assert ds.get(keyword) == phantom.headers[0].get(keyword), keyword
    assert (NOT_FOR_DIAGNOSTIC_USE in ds.SeriesDescription) == findings.demo
    assert PRIVATE_SCHEME in [item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence]

    read = read_sr_findings(ds)
    assert read["template"] == "tid1500"
    for label in LABELS:
        assert read["probabilities"][label] == pytest.approx(findings.probabilities[label], rel=1e-12)
        assert read["thresholds"][label] == pytest.approx(THRESHOLDS[label], rel=1e-12)
        assert read["positive"][label] == findings.positive[label]
    assert read["positive_instances_by_label"] == positive_by_label(phantom)
    assert read["positive_instances"] == positive_by_label(phantom)["any"]
    assert read["model"] == {"name": findings.model_name, "version": findings.model_version}
    assert read["not_for_diagnostic_use"] == findings.demo
    assert sorted(read["referenced_instances"]) == sorted(h.SOPInstanceUID for h in phantom.headers)
    assert read["predecessors"] == []
    assert read["conclusion"].startswith("Intracranial hemorrhage suspected")


def test_a_hemorrhage_group_without_its_site_is_no_label(phantom: Phantom) -> None:
    # Three groups share the finding "Hemorrhage": only the site tells them apart, so a group
    # that lost its site is not read as any of them.
    ds = new_report(phantom.findings)
    (measurements,) = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    group = measurements.ContentSequence[LABELS.index("subarachnoid")]
    group.ContentSequence = [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue != "363698007"]
    with pytest.raises(ValueError, match="lacks complete measurement groups for: subarachnoid$"):
        read_sr_findings(ds)


@needs_dciodvfy
def test_tid1500_passes_dciodvfy(phantom: Phantom, tmp_path: Path) -> None:
    errors, warnings = dciodvfy(save(new_report(phantom.findings), tmp_path / "sr.dcm"))
    assert errors == []
    assert only_private_scheme_warnings(warnings) == []


def test_highdicom_reads_the_measurement_groups(phantom: Phantom, tmp_path: Path) -> None:
    findings = phantom.findings
    sr = highdicom.sr.srread(save(new_report(findings), tmp_path / "sr.dcm"))
    report = sr.content
    assert isinstance(report, highdicom.sr.MeasurementReport)
    (observer,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    device = observer.observer_identifying_attributes
    assert (device.name, device.model_name, device.serial_number) == ("ichscan", findings.model_name, findings.model_version)

    groups = report.get_image_measurement_groups()
    assert [group.finding_type for group in groups] == [GROUP_CODES[label].finding for label in LABELS]
    for label, group in zip(LABELS, groups, strict=True):
        (finding, site) = EXPECTED_GROUP_CODES[label]
        assert scheme_value(group.finding_type) == finding, label
        sites = [scheme_value(s.value) for s in group.finding_sites]
        assert sites == ([site] if site is not None else []), label
        assert all(s.name == codes.SCT.FindingSite for s in group.finding_sites)
    expected_sources = positive_by_label(phantom)
    for label, group in zip(LABELS, groups, strict=True):
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        (threshold,) = group.get_measurements(name=codes.DCM.ThresholdValue)
        assert probability.value == pytest.approx(findings.probabilities[label], rel=1e-12)
        assert threshold.value == pytest.approx(THRESHOLDS[label], rel=1e-12)
        assert probability.unit.value == "1" and probability.unit.scheme_designator == "UCUM"
        (evaluation,) = group.get_qualitative_evaluations(name=GROUP_CODES[label].finding)
        assert evaluation.value == (codes.DCM.Present if findings.positive[label] else codes.DCM.Absent)
        assert [s.referenced_sop_instance_uid for s in group.source_images] == expected_sources[label]
        algorithm = {
            name: [item.value for item in find_content_items(group[0], name=name)]
            for name in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion)
        }
        assert algorithm == {codes.DCM.AlgorithmName: [findings.model_name], codes.DCM.AlgorithmVersion: [findings.model_version]}
    # Revisions of a study's report keep each finding's tracking UID.
    again = highdicom.sr.srread(save(new_report(findings), tmp_path / "again.dcm")).content.get_image_measurement_groups()
    assert [g.tracking_uid for g in again] == [g.tracking_uid for g in groups]
    assert len({g.tracking_uid for g in groups}) == len(LABELS)


def test_tid1500_revises_a_comprehensive_report(phantom: Phantom, tmp_path: Path) -> None:
    series_uid = UID()
    first = new_report(phantom.findings, "comprehensive", series_instance_uid=series_uid)
    previous = pydicom.dcmread(save(first, tmp_path / "first.dcm"), stop_before_pixels=True)
    revised_path = save(
        new_report(phantom.findings, series_instance_uid=series_uid, instance_number=2, previous=previous),
        tmp_path / "revised.dcm",
    )
    read = read_sr_findings(pydicom.dcmread(revised_path))
    assert read["template"] == "tid1500" and read["predecessors"] == [first.SOPInstanceUID]
    assert read_sr_findings(first)["template"] == "comprehensive"
    with pytest.raises(ValueError, match="instance number"):
        new_report(phantom.findings, series_instance_uid=series_uid, instance_number=1, previous=previous)
    with pytest.raises(ValueError, match="unknown SR template"):
        new_report(phantom.findings, "tid9999")


# --------------------------------------------------------------------------------------------
# A real screened study: ichscan synth, ichscan batch --dicom-out, then dcmjs
# --------------------------------------------------------------------------------------------


@dataclass
class Screened:
    data: Path
    work: Path
    #: The ``any`` threshold the study was screened with.
    threshold: str

    def batch(self, *args: str) -> None:
        done = run_ichscan(
            "batch", str(self.data), "--out", str(self.work / "results.csv"), "--dicom-out", str(self.work / "dicom"),
            "--threshold", f"any={self.threshold}", "--overlays-for", "none", "--workers", "0", "--device", "cpu", *args,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    def reports(self) -> list[Path]:
        """The study's SR files, by Instance Number (the first: the default template's)."""
        found = [(pydicom.dcmread(p, stop_before_pixels=True), p) for p in dicom_files(self.work / "dicom")]
        return [p for ds, p in sorted(found, key=lambda x: int(x[0].InstanceNumber)) if ds.SOPClassUID == SR_SOP_CLASS_UID]


@pytest.fixture(scope="module")
def screened(tmp_path_factory: pytest.TempPathFactory) -> Screened:
    """A synthetic study screened by ``ichscan batch --dicom-out`` (default template), with
    the ``any`` threshold between its slices' probabilities, so the report holds positive
    and negative slices."""
    root = tmp_path_factory.mktemp("screened")
    data = root / "data"
    done = run_ichscan("synth", str(data), "--studies", "1", "--slices", "6", "--size", "128", "--seed", "5", "--transfer-syntax", "explicit")
    assert done.returncode == 0, done.stderr
    probe = root / "probe" / "results.csv"
    done = run_ichscan("batch", str(data), "--out", str(probe), "--overlays-for", "none", "--workers", "0", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    p_any = sorted({float(row["p_any"]) for row in read_csv(probe)})
    assert len(p_any) >= 2, "the phantom slices should differ in p_any"
    middle = len(p_any) // 2
    screened = Screened(data, root / "work", f"{(p_any[middle - 1] + p_any[middle]) / 2:.7f}")
    screened.batch()
    return screened


@needs_dcmjs
def test_dcmjs_reads_the_screened_report(screened: Screened) -> None:
    sr_path = screened.reports()[0]
    proc = subprocess.run([NODE, str(JS / "read_sr.js"), str(sr_path)], capture_output=True, text=True, timeout=120, cwd=JS)
    assert proc.returncode == 0, proc.stderr
    read = json.loads(proc.stdout)
    assert read["dcmjsVersion"] == json.loads((JS / "package.json").read_text())["dependencies"]["dcmjs"]
    assert read["templateIdentifier"] == "1500" and read["mappingResource"] == "DCMR"
    assert read["title"] == {"value": "126000", "scheme": "DCM", "meaning": "Imaging Measurement Report"}
    assert read["imagingMeasurements"] is True
    assert PRIVATE_SCHEME in read["codingSchemes"]

    rows = [row for row in read_csv(screened.work / "results.csv") if row["status"] == "ok"]
    (study,) = read_csv(screened.work / "results_studies.csv")
    assert len(read["measurementGroups"]) == len(LABELS)
    for label, items in zip(LABELS, read["measurementGroups"], strict=True):
        (expected_finding, expected_site) = EXPECTED_GROUP_CODES[label]
        (finding,) = [i for i in items if i["name"] == {"value": "121071", "scheme": "DCM", "meaning": "Finding"}]
        assert (finding["value"]["scheme"], finding["value"]["value"]) == expected_finding, label
        sites = [i for i in items if (i["name"]["scheme"], i["name"]["value"]) == ("SCT", "363698007")]
        assert [(i["valueType"], i["relationship"]) for i in sites] == [("CODE", "HAS CONCEPT MOD")] * len(sites)
        site_codes = [(i["value"]["scheme"], i["value"]["value"]) for i in sites]
        assert site_codes == ([expected_site] if expected_site else []), label
        code = GROUP_CODES[label].finding
        nums = {i["name"]["value"]: i for i in items if i["valueType"] == "NUM"}
        # The CSVs round to 6 decimals; the report keeps the full value.
        probability = nums["122157"]["value"]
        assert round(probability, 6) == pytest.approx(float(study[f"p_{label}"]), abs=1e-9)
        assert round(probability, 6) == pytest.approx(max(float(r[f"p_{label}"]) for r in rows), abs=1e-9)
        assert nums["122157"]["unit"] == {"value": "1", "scheme": "UCUM", "meaning": "no units"}
        threshold = nums["122411"]["value"]
        named = (code.scheme_designator, code.value)
        (evaluation,) = [i for i in items if i["valueType"] == "CODE" and (i["name"]["scheme"], i["name"]["value"]) == named]
        assert evaluation["value"]["value"] == ("121053" if probability >= threshold else "121054")
        sources = [i["value"]["sopInstanceUID"] for i in items if i["valueType"] == "IMAGE"]
        assert set(sources) == {r["sop_instance_uid"] for r in rows if r[label] == "1"}, label
    assert float(nums["122411"]["value"]) == pytest.approx(float(screened.threshold), abs=1e-7)
    any_sources = [i for i in read["measurementGroups"][-1] if i["valueType"] == "IMAGE"]
    assert 0 < len(any_sources) < len(rows), "the threshold should split the study's slices"

    (qualitative,) = [c for c in read["rootContainers"] if c["name"]["value"] == "C0034375"]
    conclusion = {i["name"]["value"]: i["value"] for i in qualitative["items"]}
    assert conclusion["1386000"]["value"] == "121053"  # the study is positive
    assert NOT_FOR_DIAGNOSTIC_USE in conclusion["121106"]  # the bundled demo weights


@needs_dciodvfy
def test_screened_report_passes_dciodvfy_and_highdicom_reads_it(screened: Screened) -> None:
    sr_path = screened.reports()[0]
    errors, warnings = dciodvfy(sr_path)
    assert errors == []
    assert only_private_scheme_warnings(warnings) == []
    groups = highdicom.sr.srread(sr_path).content.get_image_measurement_groups()
    (study,) = read_csv(screened.work / "results_studies.csv")
    for label, group in zip(LABELS, groups, strict=True):
        (finding, site) = EXPECTED_GROUP_CODES[label]
        assert scheme_value(group.finding_type) == finding, label
        assert [scheme_value(s.value) for s in group.finding_sites] == ([site] if site else []), label
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert round(probability.value, 6) == pytest.approx(float(study[f"p_{label}"]), abs=1e-9)


def test_sr_template_comprehensive_revises_the_report(screened: Screened) -> None:
    # The same study and state file in the other template: a revised report that names the
    # TID 1500 one; the same run again changes nothing.
    for _ in range(2):
        screened.batch("--sr-template", "comprehensive")
        first, revised = screened.reports()
        previous, new = pydicom.dcmread(first), pydicom.dcmread(revised)
        assert read_sr_findings(previous)["template"] == "tid1500"
        assert read_sr_findings(new)["template"] == "comprehensive"
        assert read_sr_findings(new)["predecessors"] == [previous.SOPInstanceUID]
        assert new.SeriesInstanceUID == previous.SeriesInstanceUID and new.InstanceNumber == 2
