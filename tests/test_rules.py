"""Selection rules (ichscan/rules.py): each rule, rules files, `ichscan rules`, and the same
rules in batch, watch and serve-scp (a mixed folder: only the head CT series is screened)."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from helpers import DCMTK, free_port, needs_dcmtk, read_csv, save, wait_for
from ichscan.cli import cli
from ichscan.dicom import OK, SKIPPED, decode_instance
from ichscan.pipeline import BatchOptions, ServeOptions, WatchOptions, run_batch, run_serve, run_watch
from ichscan.rules import DEFAULT_RULES, RulesError, choose_series, load_rules, parse_rules, to_toml
from ichscan.sources.scp import ScpOptions

AXIAL = [1, 0, 0, 0, 1, 0]


def header(**tags) -> Dataset:
    ds = Dataset()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


# -- each rule: passes, fails, a missing tag passes --------------------------------------------------


@pytest.mark.parametrize(
    "rule, tags, fails",
    [
        ("modality", {"Modality": "CT"}, None),
        ("modality", {"Modality": "SR"}, "Modality SR is not CT"),
        ("modality", {}, None),
        ("image-type", {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}, None),
        ("image-type", {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "ImageType value 3 LOCALIZER"),
        ("image-type", {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL", "TOPOGRAM"]}, "value 4 TOPOGRAM"),
        ("image-type", {"ImageType": "ORIGINAL\\PRIMARY\\SCOUT"}, "value 3 SCOUT"),
        ("image-type", {}, None),
        ("derived", {"ImageType": ["DERIVED", "SECONDARY", "MPR"]}, "derived, secondary"),
        ("derived", {"ImageType": ["DERIVED", "PRIMARY", "AXIAL"]}, None),  # a thick recon from thin slices
        ("derived", {}, None),
        ("body-part", {"SeriesDescription": "AXIAL 5MM BRAIN", "BodyPartExamined": "HEAD"}, None),
        ("body-part", {"SeriesDescription": "CHEST 5mm", "StudyDescription": "CT HEAD"}, "SeriesDescription 'CHEST 5mm' does not match head/brain"),
        ("body-part", {"SeriesDescription": "Thorax 1.0 B70f", "StudyDescription": "CT HEAD CHEST ABD"}, "it names THORA"),
        ("body-part", {"SeriesDescription": "H30s", "ProtocolName": "Head_Routine", "BodyPartExamined": "CHEST"}, None),
        ("body-part", {"SeriesDescription": "AXIAL 5mm", "BodyPartExamined": "ABDOMEN", "StudyDescription": "e+1"}, "BodyPartExamined 'ABDOMEN'"),
        ("body-part", {"SeriesDescription": "CTA HEAD NECK"}, None),  # both: the head wins
        ("body-part", {"SeriesDescription": "AXIAL 5mm", "StudyDescription": "e+1"}, None),  # names no body part
        ("body-part", {"SeriesDescription": "", "BodyPartExamined": ""}, None),
        ("body-part", {}, None),
        ("slice-thickness", {"SliceThickness": "5"}, None),
        ("slice-thickness", {"SliceThickness": "0.2"}, None),  # photon-counting CT reconstructs 0.2 mm
        ("slice-thickness", {"SliceThickness": "0"}, "SliceThickness 0 mm is outside 0.1-20 mm"),
        ("slice-thickness", {"SliceThickness": "30"}, "outside"),
        ("slice-thickness", {}, None),
        ("orientation", {"ImageOrientationPatient": AXIAL}, None),
        ("orientation", {"ImageOrientationPatient": [1, 0, 0, 0, 0.9397, 0.3420]}, None),  # gantry tilt 20 degrees
        ("orientation", {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, "sagittal: the slice normal is 90 degrees"),
        ("orientation", {"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}, "coronal"),
        ("orientation", {"ImageOrientationPatient": [1, 0, 0, 0, 0.5, 0.866]}, "oblique"),  # 60 degrees
        ("orientation", {}, None),
    ],
)
def test_each_rule_passes_fails_and_lets_a_missing_tag_pass(rule, tags, fails):
    why = DEFAULT_RULES.rule(rule).failure(header(**tags))
    if fails is None:
        assert why is None
    else:
        assert why is not None and fails in why


def test_the_first_failing_rule_is_named_and_a_rule_switched_off_passes():
    chest_localizer = header(Modality="CT", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesDescription="CHEST")
    assert DEFAULT_RULES.failure(chest_localizer).startswith("rule image-type: ")
    rules = parse_rules("[image-type]\nenabled = false\n")
    assert rules.failure(chest_localizer).startswith("rule body-part: ")
    assert DEFAULT_RULES.failure(header(Modality="CT", SliceThickness="5", ImageOrientationPatient=AXIAL)) is None


def test_require_head_fails_a_series_that_names_no_body_part():
    rules = parse_rules("[body-part]\nrequire_head = true\n")
    why = rules.failure(header(SeriesDescription="AXIAL 5mm", StudyDescription="e+1"))
    assert why == "rule body-part: no field matches head/brain (SeriesDescription 'AXIAL 5mm', StudyDescription 'e+1')"
    assert rules.failure(header()) is None  # every field missing: passes, as a missing tag does
    assert rules.failure(header(StudyDescription="NCCT stroke")) is None


def test_largest_series_ties_go_to_the_lower_uid_compared_as_numbers():
    assert choose_series({"1.2.3": 10, "1.2.4": 30}) == "1.2.4"
    assert choose_series({"1.2.10": 30, "1.2.9": 30}) == "1.2.9"


# -- rules files ---------------------------------------------------------------------------------------


def test_show_reads_back_to_the_default_and_a_file_changes_only_what_it_names(tmp_path):
    assert parse_rules(to_toml()).rules == DEFAULT_RULES.rules
    path = tmp_path / "rules.toml"
    path.write_text("[orientation]\nmax_degrees = 20\n\n[largest-series]\nenabled = true\n[body-part]\nhead = 'kopf'\n")
    rules = load_rules(path)
    assert rules.rule("orientation").max_degrees == 20.0 and rules.largest_series_only
    assert rules.rule("body-part").head == "kopf" and rules.rule("body-part").fields == DEFAULT_RULES.rule("body-part").fields
    assert rules.rule("slice-thickness") == DEFAULT_RULES.rule("slice-thickness")
    assert parse_rules(to_toml(rules)).rules == rules.rules
    assert pickle.loads(pickle.dumps(rules)) == rules  # it travels to the decode workers


@pytest.mark.parametrize(
    "text, message",
    [
        ("[bodypart]\n", "unknown rule [bodypart]; the rules are modality, image-type"),
        ("[body-part]\nhaed = 'x'\n", "[body-part] unknown setting 'haed'; its settings are enabled, fields, head"),
        ("[orientation]\nmax_degrees = 'a lot'\n", "[orientation] max_degrees must be a number, not 'a lot'"),
        ("[orientation]\nmax_degrees = true\n", "max_degrees must be a number"),
        ("[orientation]\nmax_degrees = 100\n", "max_degrees must be within 0-90"),
        ("[slice-thickness]\nmin_mm = 5\nmax_mm = 1\n", "needs 0 <= min_mm <= max_mm"),
        ("[modality]\nmodalities = 'CT'\n", "modalities must be a list of strings"),
        ("[modality]\nmodalities = []\n", "at least one modality"),
        ("[modality]\nenabled = 'no'\n", "enabled must be true or false"),
        ("[body-part]\nhead = '(head'\n", "head is not a valid regular expression"),
        ("[body-part]\nfields = ['SeriesDescripton']\n", "'SeriesDescripton' is not a DICOM keyword"),
        ("modality = 1\n", "modality must be a table"),
        ("[orientation\n", "not valid TOML"),
    ],
)
def test_a_bad_rules_file_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    assert message in str(caught.value) and str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_an_unreadable_rules_file_is_one_line(tmp_path):
    with pytest.raises(RulesError, match="cannot read rules file"):
        load_rules(tmp_path / "missing.toml")
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(RulesError, match="not UTF-8"):
        load_rules(tmp_path / "latin1.toml")


# -- a mixed folder, as a PACS routes it ---------------------------------------------------------------


def _variant(source: Path, target: Path, series: str, **tags) -> Path:
    ds = pydicom.dcmread(source)
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return save(ds, target)


def _dose_report(study: str, path: Path) -> Path:
    """An X-Ray Radiation Dose SR, as CT scanners send one per study."""
    dose_sr = "1.2.840.10008.5.1.4.1.1.88.67"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = dose_sr, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = dose_sr, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.Modality, ds.PatientID, ds.SeriesDescription = "SR", "RULES-TEST", "Dose Report"
    ds.ValueType = "CONTAINER"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "113701", "DCM", "X-Ray Radiation Dose Report"
    ds.ConceptNameCodeSequence = [concept]
    return save(ds, path)


@pytest.fixture(scope="module")
def mixed(make_phantoms, tmp_path_factory):
    """One study: a head CT series (3 phantoms, screened), and what else a PACS sends with it.
    Returns the folder and, per file name, the rule its row must name (``None``: screened)."""
    source, records = make_phantoms("rules-head", studies=1, slices=3, seed=3, size=64, transfer_syntaxes=["ExplicitVRLittleEndian"])
    folder = tmp_path_factory.mktemp("rules-mixed")
    expect: dict[str, str | None] = {}
    study = records[0].study_instance_uid
    chest, localizer, thin = generate_uid(), generate_uid(), generate_uid()
    for i, record in enumerate(records):
        shutil.copy(record.path, folder / f"head-{i}.dcm")
        expect[f"head-{i}.dcm"] = None
        _variant(record.path, folder / f"chest-{i}.dcm", chest, SeriesDescription="CHEST 5mm", BodyPartExamined="CHEST")
        expect[f"chest-{i}.dcm"] = "body-part"
    _variant(records[0].path, folder / "localizer.dcm", localizer, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesDescription="Topogram")
    expect["localizer.dcm"] = "image-type"
    # A dose screen: a CT secondary capture of the dose table.
    _variant(records[0].path, folder / "dose-screen.dcm", generate_uid(), ImageType=["DERIVED", "SECONDARY", "OTHER"], SeriesDescription="Dose Info")
    expect["dose-screen.dcm"] = "derived"
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "report-sr.dcm")
    expect["report-sr.dcm"] = "modality"
    _dose_report(study, folder / "dose-report.dcm")
    expect["dose-report.dcm"] = "modality"
    # For largest-series (off by default, so screened otherwise): a second, shorter head series.
    for i, record in enumerate(records[:2]):
        _variant(record.path, folder / f"thin-{i}.dcm", thin, SeriesDescription="BRAIN 1mm")
        expect[f"thin-{i}.dcm"] = None
    return folder, expect


def _settings(tmp_path: Path, name: str, workers: int = 0, **extra) -> dict:
    return dict(out=tmp_path / name / "results.csv", overlays_for="none", device="cpu", workers=workers, threads=1, batch_size=4, progress=False, **extra)


def _check_rows(out: Path, expect: dict[str, str | None], name_of=lambda path: Path(path).name) -> None:
    rows = read_csv(out)
    assert sorted(name_of(r["path"]) for r in rows) == sorted(expect)  # exactly one row each
    for row in rows:
        rule = expect[name_of(row["path"])]
        if rule is None:
            assert row["status"] == OK, row
        else:
            assert row["status"] == SKIPPED and row["error"].startswith(f"rule {rule}: "), row


def test_decoding_with_the_rules_skips_before_the_pixels_and_phantoms_pass(mixed):
    folder, expect = mixed
    for name, rule in expect.items():
        result = decode_instance(folder / name, rules=DEFAULT_RULES)
        assert (result.status, result.error.split(":")[0]) == ((OK, "") if rule is None else (SKIPPED, f"rule {rule}")), name
    # ichscan's own results keep their reason: a file that says it is ours, and is an SR too.
    ours = pydicom.dcmread(folder / "report-sr.dcm")
    ours.Manufacturer = "ichscan"
    result = decode_instance(save(ours, folder.parent / "ours.dcm"), rules=DEFAULT_RULES)
    assert result.status == SKIPPED and result.error.startswith("written by ichscan")


@pytest.mark.parametrize("style, layout, volumetric", [("small-faint", "pacs", True), ("sharp-large", "rsna", False)])
def test_every_phantom_style_passes_the_default_rules(make_phantoms, style, layout, volumetric):
    _, records = make_phantoms("rules-style", studies=1, slices=2, seed=5, size=64, style=style, layout=layout, volumetric=volumetric)
    for record in records:
        assert DEFAULT_RULES.failure(pydicom.dcmread(record.path, stop_before_pixels=True)) is None


def test_batch_screens_only_the_head_series(mixed, tmp_path):
    folder, expect = mixed
    # One decode worker: the rules travel to the worker process.
    summary = run_batch(BatchOptions(input_dir=folder, **_settings(tmp_path, "batch", workers=1)))
    assert summary.files == len(expect)
    _check_rows(tmp_path / "batch" / "results.csv", expect)


def test_cli_rules_file_and_no_rules_reach_batch(mixed, tmp_path):
    folder, expect = mixed
    rules = tmp_path / "rules.toml"
    rules.write_text("[body-part]\nenabled = false\n")
    common = ["--overlays-for", "none", "--device", "cpu", "--workers", "0", "--threads", "1", "--no-progress"]
    result = CliRunner().invoke(cli, ["batch", str(folder), "--out", str(tmp_path / "a.csv"), "--rules", str(rules), *common])
    assert result.exit_code == 0, result.output
    _check_rows(tmp_path / "a.csv", {n: None if r == "body-part" else r for n, r in expect.items()})
    result = CliRunner().invoke(cli, ["batch", str(folder), "--out", str(tmp_path / "b.csv"), "--no-rules", *common])
    assert result.exit_code == 0, result.output
    by_name = {Path(r["path"]).name: r for r in read_csv(tmp_path / "b.csv")}
    assert by_name["localizer.dcm"]["status"] == by_name["chest-0.dcm"]["status"] == OK  # every CT image
    assert by_name["report-sr.dcm"]["status"] == SKIPPED and not by_name["report-sr.dcm"]["error"].startswith("rule")
    rules.write_text("[body-part]\nenabeld = false\n")
    result = CliRunner().invoke(cli, ["batch", str(folder), "--out", str(tmp_path / "c.csv"), "--rules", str(rules), *common])
    assert result.exit_code == 2 and "unknown setting 'enabeld'" in result.output and "Traceback" not in result.output


def test_watch_screens_only_the_head_series(mixed, tmp_path):
    folder, expect = mixed
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    opts = WatchOptions(input_dir=incoming, settle=0.1, max_latency=0.1, rescan_interval=3600, study_timeout=1, **_settings(tmp_path, "watch"))
    stop = threading.Event()
    thread = threading.Thread(target=run_watch, args=(opts, None, stop), daemon=True)
    thread.start()
    for name in expect:
        shutil.copy(folder / name, incoming / name)
    out = tmp_path / "watch" / "results.csv"
    wait_for(lambda: len(read_csv(out, missing_ok=True)) >= len(expect), 60, "a row for every file")
    stop.set()
    thread.join(60)
    _check_rows(out, expect)


@needs_dcmtk
def test_serve_scp_accepting_all_storage_screens_only_the_head_series(mixed, tmp_path):
    folder, expect = mixed
    port, store = free_port(), tmp_path / "store"
    watch = WatchOptions(input_dir=store, max_latency=0.1, study_timeout=1, **_settings(tmp_path, "serve"))
    opts = ServeOptions(scp=ScpOptions(port=port, store=store, accept_all_storage=True), watch=watch, drain_timeout=5)
    stop = threading.Event()
    thread = threading.Thread(target=run_serve, args=(opts, None, stop), daemon=True)
    thread.start()
    files = [str(folder / name) for name in sorted(expect)]
    sent = wait_for(
        lambda: subprocess.run([str(DCMTK / "storescu"), "-aec", "ICHSCAN", "127.0.0.1", str(port), *files], capture_output=True, text=True, timeout=60).returncode == 0,
        60,
        "storescu to send every file",
    )
    assert sent
    out = tmp_path / "serve" / "results.csv"
    wait_for(lambda: len(read_csv(out, missing_ok=True)) >= len(expect), 60, "a row for every file")
    stop.set()
    thread.join(60)
    # The store names files by SOPInstanceUID: map them back to the names sent.
    name_of_sop = {pydicom.dcmread(folder / n, stop_before_pixels=True).SOPInstanceUID: n for n in expect}
    _check_rows(out, expect, lambda path: name_of_sop[Path(path).stem])


# -- largest series only -----------------------------------------------------------------------------------


LARGEST = "[largest-series]\nenabled = true\n"


def _largest_expect(expect: dict[str, str | None]) -> dict[str, str | None]:
    """The thin series (2 slices) loses to the head series (3); the chest series (3) does not count."""
    return {n: "largest-series" if n.startswith("thin-") else r for n, r in expect.items()}


def test_largest_series_in_batch_and_after_a_crash_while_held(mixed, tmp_path, monkeypatch):
    from ichscan.sources.largest_series import LargestSeriesSource

    folder, expect = mixed
    rules = tmp_path / "rules.toml"
    rules.write_text(LARGEST)
    opts = BatchOptions(input_dir=folder, rules=load_rules(rules), **_settings(tmp_path, "batch"))
    run_batch(opts)
    _check_rows(opts.out, _largest_expect(expect))
    rows = {Path(r["path"]).name: r for r in read_csv(opts.out)}
    assert "series" in rows["thin-0.dcm"]["error"] and rows["thin-0.dcm"]["study_instance_uid"]  # identity kept

    # A crash while the study is held: nothing of it is in the ledger, a --resume run screens it all once.
    def crash(self, uid):
        raise RuntimeError("simulated crash")

    crashed = BatchOptions(input_dir=folder, rules=opts.rules, **_settings(tmp_path, "crash"))
    with monkeypatch.context() as patch:
        patch.setattr(LargestSeriesSource, "_decide", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_batch(crashed)
    crashed.resume = True
    run_batch(crashed)
    _check_rows(crashed.out, _largest_expect(expect))


def test_largest_series_in_watch_waits_for_the_quiet_study_and_survives_a_stop(mixed, tmp_path):
    folder, expect = mixed
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    rules = parse_rules(LARGEST)
    common = dict(settle=0.1, max_latency=0.1, rescan_interval=3600, rules=rules, **_settings(tmp_path, "watch"))
    out = tmp_path / "watch" / "results.csv"

    # First run: the study never goes quiet before the stop; its files are held, not lost.
    stop = threading.Event()
    thread = threading.Thread(target=run_watch, args=(WatchOptions(input_dir=incoming, study_timeout=3600, **common), None, stop), daemon=True)
    thread.start()
    for name in expect:
        shutil.copy(folder / name, incoming / name)
    # Files that fail a per-file rule pass straight on; the study's head series wait.
    held = {n for n, r in expect.items() if r is None}
    wait_for(lambda: len(read_csv(out, missing_ok=True)) >= len(expect) - len(held), 60, "the rows of the files not held")
    time.sleep(0.5)
    assert not {Path(r["path"]).name for r in read_csv(out)} & held
    stop.set()
    thread.join(60)

    # Second run: the start-up scan finds the held files; the study goes quiet after 0.5 s.
    stop = threading.Event()
    thread = threading.Thread(target=run_watch, args=(WatchOptions(input_dir=incoming, study_timeout=0.5, **common), None, stop), daemon=True)
    thread.start()
    wait_for(lambda: len(read_csv(out, missing_ok=True)) >= len(expect), 60, "a row for every file")
    time.sleep(0.5)
    stop.set()
    thread.join(60)
    _check_rows(out, _largest_expect(expect))


class _Offered:
    """A live source that hands over what the test offers it."""

    live, finished = True, False

    def __init__(self) -> None:
        self.offered: list = []

    def poll(self, now: float, limit: int) -> list:
        out, self.offered = self.offered, []
        return out


def test_a_held_study_is_decided_once_quiet_and_a_rescan_offering_its_files_again_is_no_news(mixed):
    from ichscan.sources.base import stored_entry
    from ichscan.sources.largest_series import LargestSeriesSource

    folder, expect = mixed
    inner = _Offered()
    gate = LargestSeriesSource(inner, parse_rules(LARGEST), timeout=1.0)
    entries = [stored_entry(str(folder / n)) for n in sorted(expect)]
    inner.offered = list(entries)
    passed = {Path(e.path).name for e in gate.poll(0.0, 100)}
    assert passed == {n for n, r in expect.items() if r is not None}  # failing a per-file rule: straight on
    inner.offered = [e for e in entries if Path(e.path).name.startswith(("head-", "thin-"))]  # a rescan
    assert gate.poll(0.9, 100) == []
    decided = {Path(e.path).name: e.skip for e in gate.poll(1.05, 100)}
    assert sorted(decided) == sorted(n for n, r in expect.items() if r is None)
    assert all(not why for n, why in decided.items() if n.startswith("head-"))
    assert all(why.startswith("rule largest-series: ") for n, why in decided.items() if n.startswith("thin-"))
    # Late slices of a decided study are decided with the counts seen: head 3 + 1 beats thin 2 + 1.
    series = {name: pydicom.dcmread(folder / f"{name}-0.dcm").SeriesInstanceUID for name in ("head", "thin")}
    late = {name: _variant(folder / "head-0.dcm", folder.parent / f"late-{name}.dcm", uid) for name, uid in series.items()}
    inner.offered = [stored_entry(str(path)) for path in late.values()]
    assert gate.poll(2.0, 100) == []
    decided = {e.path: e.skip for e in gate.poll(3.1, 100)}
    assert decided[str(late["head"])] == ""
    assert decided[str(late["thin"])] == f"rule largest-series: series {series['thin']} has 3 slices; series {series['head']} of the study has 4"


# -- ichscan rules ---------------------------------------------------------------------------------------


def test_rules_show_check_and_explain(mixed, tmp_path):
    folder, expect = mixed
    runner = CliRunner()
    shown = runner.invoke(cli, ["rules", "show"])
    assert shown.exit_code == 0 and "[body-part]" in shown.output
    path = tmp_path / "rules.toml"
    path.write_text(shown.output)
    checked = runner.invoke(cli, ["rules", "check", str(path)])
    assert checked.exit_code == 0, checked.output
    assert checked.output == f"{path}: valid: 6 rules on (modality, image-type, derived, body-part, slice-thickness, orientation); off: largest-series\n"
    path.write_text("[orientation]\ntolerance = 25\n")
    bad = runner.invoke(cli, ["rules", "check", str(path)])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "unknown setting 'tolerance'" in bad.output

    explained = runner.invoke(cli, ["rules", "explain", str(folder)])
    assert explained.exit_code == 0, explained.output
    verdicts = dict(line.rsplit(".dcm: ", 1) for line in explained.output.splitlines())
    verdicts = {Path(p).name + ".dcm": v for p, v in verdicts.items()}
    assert sorted(verdicts) == sorted(expect)
    for name, rule in expect.items():
        assert verdicts[name] == "screened: passes all 6 rules" if rule is None else verdicts[name].startswith(f"skipped: rule {rule}: ")
    path.write_text(LARGEST)
    explained = runner.invoke(cli, ["rules", "explain", str(folder / "thin-0.dcm"), str(folder / "head-0.dcm"), str(folder / "head-1.dcm"), "--rules", str(path)])
    assert "thin-0.dcm: skipped: rule largest-series: series" in explained.output
    assert "head-0.dcm: screened" in explained.output
