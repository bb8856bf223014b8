"""FHIR results (--fhir-out): one R4B transaction Bundle per study, valid, true to the CSVs,
free of patient names, stable across runs, amended when a study is revised."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom
import pytest
from click.testing import CliRunner
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.reference import Reference

from helpers import read_csv, wait_for
from ichscan.cli import cli
from ichscan.dicom_results.tid1500 import GROUP_CODES, device_observer_uid, tracking_uid
from ichscan.events import StudyResult
from ichscan.fhir import CODE_SYSTEMS, amends, study_bundle, write_study_bundle
from ichscan.labels import LABELS

RUN = ["--workers", "0", "--overlays-for", "none", "--no-progress", "--device", "cpu"]


def batch(folder: Path, out: Path, fhir: Path, *extra: str) -> None:
    result = CliRunner().invoke(cli, ["batch", str(folder), "--out", str(out), "--fhir-out", str(fhir), *RUN, *extra])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def screened(make_phantoms, tmp_path_factory):
    """Two studies screened with ``any`` positive at threshold 0 (the subtypes at the
    checkpoint's thresholds), FHIR results in ``fhir/``; and the headers of the inputs."""
    folder, records = make_phantoms("fhir", studies=2, slices=3, seed=11, size=64, transfer_syntaxes="ExplicitVRLittleEndian")
    for record in records:  # names that cannot occur by chance in a bundle
        ds = pydicom.dcmread(record.path)
        ds.PatientName = f"Quixotewhistle^Marigoldina^{ds.StudyInstanceUID[-4:]}x"
        ds.save_as(record.path)
    work = tmp_path_factory.mktemp("fhir-run")
    batch(folder, work / "r.csv", work / "fhir", "--threshold", "any=0.0")
    headers = [pydicom.dcmread(r.path, stop_before_pixels=True) for r in records]
    return folder, work, headers


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def references(value: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """Every Reference in a resource (a dict with ``reference`` or a typed ``identifier``), with its path."""
    found = []
    if isinstance(value, dict):
        if "reference" in value or ("type" in value and "identifier" in value and isinstance(value["type"], str)):
            found.append((path, value))
        for key, item in value.items():
            found += references(item, (*path, key))
    elif isinstance(value, list):
        for item in value:
            found += references(item, path)
    return found


def model_of(kind: str):
    return getattr(importlib.import_module(f"fhir.resources.R4B.{kind.lower()}"), kind)


def assert_valid_r4b(bundle: dict[str, Any]) -> None:
    """The Bundle and each resource pass the R4B models; each reference names a target type
    its element allows (the models carry the allowed types but do not check them) and each
    internal reference resolves to an entry of that type; each conditional update is keyed on
    the resource's identifier."""
    Bundle.model_validate(bundle)
    assert bundle["type"] == "transaction"
    by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    assert len(by_url) == len(bundle["entry"])
    targets = set()
    for entry in bundle["entry"]:
        resource = entry["resource"]
        kind = resource["resourceType"]
        model_of(kind).model_validate(resource)
        identifier = resource["identifier"][0]
        assert entry["request"]["method"] == "PUT"
        assert entry["request"]["url"].startswith(f"{kind}?identifier=")
        assert parse_qs(urlsplit(entry["request"]["url"]).query)["identifier"] == [f"{identifier['system']}|{identifier['value']}"]
        for path, ref in references(resource):
            Reference.model_validate(ref)
            allowed = model_of(kind).model_fields[path[0]].json_schema_extra["enum_reference_types"]
            assert ref["type"] in allowed, (kind, path, ref["type"], allowed)
            targets.add(ref["type"])
            if "reference" in ref:
                assert by_url[ref["reference"]]["resourceType"] == ref["type"]
    assert {"Observation", "Device", "ImagingStudy"} <= targets


def test_a_valid_bundle_per_study_naming_the_study(screened):
    folder, work, headers = screened
    studies = {row["study_instance_uid"] for row in read_csv(work / "r_studies.csv")}
    assert len(studies) == 2
    assert {p.name for p in (work / "fhir").iterdir()} == {f"{uid}.json" for uid in studies}
    for uid in studies:
        bundle = load(work / "fhir" / f"{uid}.json")
        assert_valid_r4b(bundle)
        assert [r["resourceType"] for r in (e["resource"] for e in bundle["entry"])] == ["DiagnosticReport", *["Observation"] * 6, "Device"]
        (report,) = resources(bundle, "DiagnosticReport")
        header = next(h for h in headers if h.StudyInstanceUID == uid)
        assert report["status"] == "final"
        assert report["imagingStudy"] == [{"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}}]
        assert report["subject"]["identifier"]["value"] == str(header.PatientID)
        assert report["basedOn"][0]["identifier"]["value"] == str(header.AccessionNumber)
        assert report["effectiveDateTime"] == f"{header.StudyDate[:4]}-{header.StudyDate[4:6]}-{header.StudyDate[6:]}"
        assert report["category"][0]["coding"][0]["code"] == "RAD"
        assert report["code"]["coding"][0] == {"system": "http://loinc.org", "code": "24725-4", "display": "CT Head"}
        observation_urls = [e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
        assert [r["reference"] for r in report["result"]] == observation_urls


def test_observations_carry_the_studies_csv_values_and_decisions(screened):
    folder, work, headers = screened
    from ichscan.models import load_model
    from ichscan.plugins import get_plugin_manager

    thresholds = {**load_model(get_plugin_manager()).thresholds, "any": 0.0}
    for row in read_csv(work / "r_studies.csv"):
        uid = row["study_instance_uid"]
        bundle = load(work / "fhir" / f"{uid}.json")
        (report,) = resources(bundle, "DiagnosticReport")
        observations = resources(bundle, "Observation")
        assert len(observations) == 6
        for label, obs in zip(LABELS, observations):
            assert obs["identifier"][0]["value"] == f"urn:oid:{tracking_uid(uid, label)}"  # the SR's tracking UID
            assert obs["valueQuantity"]["value"] == pytest.approx(float(row[f"p_{label}"]), abs=5e-7)  # the CSV's six decimals
            assert obs["valueQuantity"]["system"] == CODE_SYSTEMS["UCUM"] and obs["valueQuantity"]["code"] == "1"
            threshold = obs["component"][0]["valueQuantity"]["value"]
            assert threshold == pytest.approx(thresholds[label])
            positive = obs["valueQuantity"]["value"] >= thresholds[label]
            assert obs["interpretation"][0]["coding"][0]["code"] == ("POS" if positive else "NEG")
            finding, site = GROUP_CODES[label]
            assert obs["code"]["coding"][0]["code"] == finding.value
            assert obs["code"]["coding"][0]["system"] == CODE_SYSTEMS[finding.scheme_designator]
            assert (obs.get("bodySite", {}).get("coding", [{}])[0].get("code")) == (site.value if site else None)
            assert obs["derivedFrom"] == report["imagingStudy"]
        # any is positive at threshold 0: SNOMED CT "Intracranial hemorrhage" concludes it
        assert observations[-1]["interpretation"][0]["coding"][0]["code"] == "POS"
        assert report["conclusionCode"][0]["coding"][0] == {
            "system": "http://snomed.info/sct", "code": "1386000", "display": "Intracranial hemorrhage (disorder)",
        }
        assert "Intracranial hemorrhage suspected" in report["conclusion"]
        assert f"{row['slices']} slices screened" in report["conclusion"]
        assert "Not for diagnostic use" in report["conclusion"]  # the bundled demo weights


def test_device_is_the_model_and_every_observation_names_it(screened):
    folder, work, headers = screened
    for path in (work / "fhir").iterdir():
        bundle = load(path)
        (device,) = resources(bundle, "Device")
        device_url = next(e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device")
        assert device["manufacturer"] == "ichscan"
        model = next(n["name"] for n in device["deviceName"] if n["type"] == "model-name")
        version = device["version"][0]["value"]
        assert re.fullmatch(r".+\.pt sha256:[0-9a-f]{12}", version)  # the bundled checkpoint, by file name and hash
        assert device["identifier"][0]["value"] == f"urn:oid:{device_observer_uid(model, version)}"  # the SR's device UID
        assert "not for diagnostic use" in device["note"][0]["text"]
        assert all(obs["device"] == {"reference": device_url, "type": "Device"} for obs in resources(bundle, "Observation"))
        (report,) = resources(bundle, "DiagnosticReport")
        assert "performer" not in report  # R4B allows no Device there


def test_no_patient_name_anywhere(screened):
    folder, work, headers = screened
    names = {str(h.PatientName) for h in headers}
    parts = {part for name in names for part in name.split("^") if part}
    assert "Quixotewhistle" in parts and len(names) == 2
    for path in (work / "fhir").iterdir():
        text = path.read_text(encoding="utf-8")
        for value in names | parts:
            assert value not in text, f"{path.name} holds patient name part {value!r}"


def test_a_rerun_updates_the_same_resources(screened, tmp_path):
    """The same study screened again gives the same identifiers, full URLs and conditional
    URLs (a server updates instead of duplicating) and, saying the same, stays final."""
    folder, work, headers = screened
    fhir = tmp_path / "fhir"
    shutil.copytree(work / "fhir", fhir)
    before = {p.name: load(p) for p in fhir.iterdir()}
    batch(folder, tmp_path / "again.csv", fhir, "--threshold", "any=0.0")
    for name, old in before.items():
        new = load(fhir / name)
        keys = lambda b: [(e["fullUrl"], e["request"]["url"], e["resource"]["identifier"]) for e in b["entry"]]  # noqa: E731
        assert keys(new) == keys(old)
        assert resources(new, "DiagnosticReport")[0]["status"] == "final"


def study_result(**changes: Any) -> StudyResult:
    probabilities = {label: 0.1 for label in LABELS}
    values = dict(
        study_instance_uid="1.2.3.4", accession_number="A1", patient_id="P1", study_date="20260102",
        probabilities=probabilities, positive={label: False for label in LABELS}, thresholds={label: 0.5 for label in LABELS},
        top_label="none", top_probability=0.1, slices=3, positive_slices=0, best_slice="/x.dcm",
        best_sop_instance_uid="1.2.3.4.1", best_series_instance_uid="1.2.3.4.2", overlay=None,
        model_name="simplecnn", model_version="w.pt sha256:0123456789ab", demo=False, source="watch", completed_at=1.0,
    )
    values.update(changes)
    return StudyResult(**values)


def test_a_different_result_is_amended_and_a_repeat_is_not(tmp_path):
    first = study_result()
    path = write_study_bundle(tmp_path, first)
    assert resources(load(path), "DiagnosticReport")[0]["status"] == "final"
    write_study_bundle(tmp_path, dataclasses.replace(first, completed_at=2.0))  # a repeat after a restart
    assert resources(load(path), "DiagnosticReport")[0]["status"] == "final"
    late = dataclasses.replace(first, probabilities={**first.probabilities, "any": 0.7}, positive={**first.positive, "any": True},
                               top_label="any", top_probability=0.7, slices=4, completed_at=3.0)
    write_study_bundle(tmp_path, late)
    bundle = load(path)
    assert {r["status"] for r in resources(bundle, "DiagnosticReport") + resources(bundle, "Observation")} == {"amended"}
    assert_valid_r4b(bundle)
    assert [e["fullUrl"] for e in bundle["entry"]] == [e["fullUrl"] for e in study_bundle(first)["entry"]]
    write_study_bundle(tmp_path, dataclasses.replace(late, completed_at=4.0))  # once amended, stays amended
    assert resources(load(path), "DiagnosticReport")[0]["status"] == "amended"
    assert amends(None, study_bundle(first)) is False
    # No study date, patient ID or accession number: the elements are left out, the bundle still valid.
    bare = study_bundle(study_result(study_date="", patient_id="", accession_number=""))
    assert_valid_r4b(bare)
    assert not {"subject", "basedOn", "effectiveDateTime"} & set(resources(bare, "DiagnosticReport")[0])


@pytest.mark.parametrize("uid", ["../../etc/x", "1.2.3/4", "1.2.abc", ""])
def test_a_uid_that_is_not_one_writes_nothing(tmp_path, uid):
    with pytest.raises(ValueError, match="not a valid UID"):
        write_study_bundle(tmp_path / "fhir", study_result(study_instance_uid=uid))
    assert not (tmp_path / "fhir").exists()


def test_bad_fhir_out_is_a_one_line_error(tmp_path, make_phantoms):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for target, code, message in ((a_file, 2, "is a file"), (a_file / "sub", 1, "cannot create --fhir-out folder")):
        result = CliRunner().invoke(cli, ["batch", str(tmp_path), "--out", str(tmp_path / "r.csv"), "--fhir-out", str(target), *RUN])
        assert result.exit_code == code, result.output
        assert message in result.output and "Traceback" not in result.output
        assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


def test_watch_writes_the_bundle_when_the_study_completes_and_amends_it_when_revised(tmp_path, make_phantoms):
    """In watch, the study's bundle appears after --study-timeout; a late instance revises
    the study and the same resources become ``amended``. The FHIR folder lies inside the
    watched folder and is never screened."""
    import threading

    from ichscan.pipeline import WatchOptions, run_watch
    from ichscan.reporting import ResultsOutput

    staging, records = make_phantoms("fhir-watch", studies=1, slices=3, seed=12, size=64, transfer_syntaxes="ExplicitVRLittleEndian")
    root = tmp_path / "incoming"
    root.mkdir()
    for record in records[:2]:
        shutil.copy(record.path, root / Path(record.path).name)
    uid = records[0].study_instance_uid
    bundle_file = root / "fhir" / f"{uid}.json"
    opts = WatchOptions(
        input_dir=root, out=tmp_path / "out" / "r.csv", settle=0.2, max_latency=0.2, study_timeout=0.3, rescan_interval=0.3,
        overlays_for="none", workers=0, batch_size=8, device="cpu", threads=1, results=ResultsOutput(fhir_out=root / "fhir"),
    )
    stop = threading.Event()
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=run_watch(opts, stop=stop)), daemon=True)
    thread.start()
    try:
        wait_for(bundle_file.is_file, 60, "the study's bundle")
        first = load(bundle_file)
        assert resources(first, "DiagnosticReport")[0]["status"] == "final"
        shutil.copy(records[2].path, root / Path(records[2].path).name)  # a late instance: 3 slices, not 2
        wait_for(lambda: resources(load(bundle_file), "DiagnosticReport")[0]["status"] == "amended", 60, "the amended bundle")
    finally:
        stop.set()
        thread.join(120)
    revised = load(bundle_file)
    assert_valid_r4b(revised)
    assert [e["fullUrl"] for e in revised["entry"]] == [e["fullUrl"] for e in first["entry"]]
    rows = read_csv(tmp_path / "out" / "r.csv")
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}  # the JSON files were never screened
    assert outcome["summary"].reporter_errors == {}


def test_fhir_forward_posts_each_bundle_through_the_outbox(make_phantoms, tmp_path):
    """--fhir-forward: each study's transaction Bundle is POSTed to the server's base URL as
    application/fhir+json, through the durable outbox (a 503 is retried with the same bytes
    and event id); a re-run with the same results sends nothing; a changed result is sent
    again as an amendment."""
    from helpers import Receiver

    folder, _ = make_phantoms("fhir-forward", studies=2, slices=2, seed=12, size=64, transfer_syntaxes="ExplicitVRLittleEndian")
    server = Receiver(plan=[503])
    try:
        base = server.url.rsplit("/", 1)[0] + "/fhir"
        token = tmp_path / "token"
        token.write_text("fhir-token\n")
        run = [*RUN, "--fhir-forward", base, "--fhir-token-file", str(token), "--out", str(tmp_path / "r.csv")]
        result = CliRunner().invoke(cli, ["batch", str(folder), *run])
        assert result.exit_code == 0, result.output
        requests = list(server.requests)
        assert len(requests) == 3  # a 503, then both studies
        # The retry comes first (what is recorded for a failing server waits behind it), same bytes and id.
        assert requests[0]["body"] == requests[1]["body"]
        assert requests[0]["headers"]["X-Ichscan-Event-Id"] == requests[1]["headers"]["X-Ichscan-Event-Id"]
        bundles = [json.loads(r["body"]) for r in requests[1:]]
        for request, bundle in zip(requests[1:], bundles):
            assert request["path"] == "/fhir" and request["headers"]["Content-Type"] == "application/fhir+json"
            assert request["headers"]["Authorization"] == "Bearer fhir-token"
            assert_valid_r4b(bundle)
            assert bundle["type"] == "transaction" and resources(bundle, "DiagnosticReport")[0]["status"] == "final"
        studies = {row["study_instance_uid"] for row in read_csv(tmp_path / "r_studies.csv")}
        reported = {resources(b, "DiagnosticReport")[0]["imagingStudy"][0]["identifier"]["value"].removeprefix("urn:oid:") for b in bundles}
        assert reported == studies
        again = CliRunner().invoke(cli, ["batch", str(folder), *run])
        assert again.exit_code == 0 and len(server.requests) == 3  # the same results: nothing new
        changed = CliRunner().invoke(cli, ["batch", str(folder), *run, "--threshold", "any=0.0"])
        assert changed.exit_code == 0 and len(server.requests) == 5
        amended = [json.loads(r["body"]) for r in server.requests[3:]]
        assert {resources(b, "DiagnosticReport")[0]["status"] for b in amended} == {"amended"}
    finally:
        server.close()
