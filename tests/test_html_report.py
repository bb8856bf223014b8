"""The static HTML report (``--html``): real screening runs on phantoms, parsed and opened
in headless Chromium."""

from __future__ import annotations

import html
import os
import re
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pydicom
import pytest

from helpers import read_csv
from ichscan import synth
from ichscan.pipeline import collect_reporters
from ichscan.default_plugins.html_report import HtmlReporter, relative_href
from ichscan.pipeline.run import run_stream
from ichscan.pipeline.sizing import prepare_screening
from ichscan.labels import LABELS, SUBTYPES, default_thresholds
from ichscan.plugins import get_plugin_manager
from ichscan.records import Instance, Prediction, SliceResult, Status, StoredImage
from ichscan.reporting import ReporterSet, RunConfig, StudyTable
from ichscan.sources.folder import iter_folder

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--virtual-time-budget=5000",
)


# -- parsing helpers ----------------------------------------------------------------


@dataclass
class StudyRow:
    uid: str
    p_any_attr: float
    shown: dict[str, str]  # label -> text of its cell
    positive_cells: set[str]
    images: list[str]  # src of each thumbnail
    links: list[str]  # href of each overlay link


class ReportParser(HTMLParser):
    """Study rows (in page order), <body> attributes and every <img> src."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[StudyRow] = []
        self.body: dict[str, str] = {}
        self.all_images: list[str] = []
        self.banner = False
        self._label: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        elif tag == "div" and "banner" in a.get("class", "").split():
            self.banner = True
        elif tag == "tr" and "study" in a.get("class", "").split():
            self.rows.append(StudyRow(a["data-uid"], float(a["data-p-any"]), {}, set(), [], []))
        elif tag == "td" and "data-label" in a and self.rows:
            self._label = a["data-label"]
            if "pos" in a.get("class", "").split():
                self.rows[-1].positive_cells.add(self._label)
        elif tag == "img":
            self.all_images.append(a.get("src", ""))
            if self.rows:
                self.rows[-1].images.append(a.get("src", ""))
        elif tag == "a" and "data-overlay" in a and self.rows:
            self.rows[-1].links.append(a["href"])

    def handle_data(self, data: str) -> None:
        if self._label is not None:
            self.rows[-1].shown[self._label] = data.strip()

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._label = None


def parse_report(text: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(text)
    parser.close()
    return parser


# -- a real screening run -----------------------------------------------------------------


@dataclass
class ScreenedRun:
    input_dir: Path
    out_dir: Path
    html_path: Path
    text: str
    studies_csv: list[dict[str, str]]
    threshold_any: float


def screen(
    input_dir: Path, out_dir: Path, *, thresholds: dict[str, float] | None = None, html_path: Path | None = None
) -> tuple[RunConfig, StudyTable]:
    """What ``run_batch`` does, with ``RunConfig.html`` set (``BatchOptions`` has no such field yet)."""
    pm = get_plugin_manager()
    setup = prepare_screening(pm, thresholds=thresholds, workers=0, batch_size=8)
    overlays = out_dir / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    loaded = setup.loaded
    config = RunConfig(
        out=out_dir / "results.csv",
        studies_out=out_dir / "results_studies.csv",
        overlays_dir=overlays,
        **loaded.config_fields(),
        input_root=input_dir,
        html=html_path,
    )
    reporters = ReporterSet(collect_reporters(pm, config))
    _, studies = run_stream(
        iter_folder(input_dir), setup.screener, reporters, batch_size=setup.batch_size, workers=0, overlays_dir=overlays
    )
    assert reporters.errors == {}
    return config, studies


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> ScreenedRun:
    base = tmp_path_factory.mktemp("html_report")
    input_dir = base / "in"
    synth.generate(input_dir, studies=3, slices=6, seed=7, size=128)
    # A first pass finds the studies' p(any); the `any` threshold then goes between the
    # second and third, so the report has positive and negative studies whatever the
    # bundled weights make of these phantoms.
    _, dry = screen(input_dir, base / "dry")
    p_any = sorted((s.max_probabilities["any"] for s in dry.studies.values()), reverse=True)
    assert len(p_any) == 3 and p_any[1] > p_any[2]
    threshold = (p_any[1] + p_any[2]) / 2
    out_dir = base / "out"
    html_path = out_dir / "report" / "report.html"  # a sub-folder: links must climb out of it
    html_path.parent.mkdir(parents=True)
    screen(input_dir, out_dir, thresholds={"any": threshold}, html_path=html_path)
    rows = read_csv(out_dir / "results_studies.csv")
    return ScreenedRun(input_dir, out_dir, html_path, html_path.read_text(encoding="utf-8"), rows, threshold)


# -- tests on the file ------------------------------------------------------------------------


def test_reporter_registers_only_with_html(tmp_path: Path) -> None:
    pm = get_plugin_manager()
    names = lambda config: [r.name for r in collect_reporters(pm, config)]  # noqa: E731
    assert "html" not in names(RunConfig(thresholds=default_thresholds()))
    config = RunConfig(thresholds=default_thresholds(), html=tmp_path / "r.html", weights="w.pt")
    assert names(config) == ["html"]
    # Registered means a first report exists, so a bad path fails before the run.
    assert "No studies screened yet" in (tmp_path / "r.html").read_text(encoding="utf-8")
    with pytest.raises(OSError):
        collect_reporters(pm, RunConfig(thresholds=default_thresholds(), html=tmp_path / "missing" / "r.html"))


def test_studies_sorted_by_p_any_with_csv_values(run: ScreenedRun) -> None:
    report = parse_report(run.text)
    expected = sorted(run.studies_csv, key=lambda row: -float(row["p_any"]))
    assert [row.uid for row in report.rows] == [row["study_instance_uid"] for row in expected]
    for row, csv_row in zip(report.rows, expected, strict=True):
        for label in LABELS:
            shown = float(row.shown[label])
            assert abs(shown - float(csv_row[f"p_{label}"])) <= 0.0005 + 1e-9, (label, shown, csv_row)
        assert abs(row.p_any_attr - float(csv_row["p_any"])) <= 1e-6
        assert f"<td class=\"slices\">{csv_row['slices']}</td>" in run.text


def test_positive_labels_are_highlighted(run: ScreenedRun) -> None:
    report = parse_report(run.text)
    thresholds = {label: float(v) for label, v in re.findall(r"(\w+) (\d\.\d{3})", _meta(run.text, "Thresholds"))}
    assert thresholds["any"] == pytest.approx(run.threshold_any, abs=5e-4)
    for row in report.rows:
        flagged = {label for label in LABELS if float(row.shown[label]) >= thresholds[label] + 5e-4}
        clear = {label for label in LABELS if float(row.shown[label]) < thresholds[label] - 5e-4}
        assert flagged <= row.positive_cells
        assert not clear & row.positive_cells
    assert [("any" in row.positive_cells) for row in report.rows] == [True, True, False]


def test_no_patient_identifiers(run: ScreenedRun) -> None:
    files = sorted(run.input_dir.rglob("*.dcm"))
    assert len(files) == 18
    identifiers = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identifiers |= {str(ds.PatientName), str(ds.PatientID)}
    assert all(identifiers) and len(identifiers) == 6
    for value in identifiers:
        assert value not in run.text and html.escape(value) not in run.text
    # The "pacs" layout puts the patient ID in the folder names: no input path is shown.
    assert str(run.input_dir) not in run.text


def test_thumbnails_for_positive_studies_only(run: ScreenedRun) -> None:
    report = parse_report(run.text)
    by_uid = {row["study_instance_uid"]: row for row in run.studies_csv}
    for row in report.rows:
        csv_row = by_uid[row.uid]
        positive = float(csv_row["p_any"]) >= run.threshold_any
        if positive:
            assert 1 <= len(row.images) == min(int(csv_row["positive_slices"]), 6)
            assert all(src.startswith("data:image/jpeg;base64,") for src in row.images)
            # Each thumbnail links to its overlay PNG, relative to the report's folder.
            assert len(row.links) == len(row.images)
            for href in row.links:
                assert not href.startswith(("/", "file:")) and href.startswith("../overlays/")
                assert (run.html_path.parent / href).resolve().is_file()
        else:
            assert row.images == [] and row.links == []
            assert int(csv_row["positive_slices"]) == 0
    assert len(report.all_images) == sum(len(row.images) for row in report.rows) > 0


def test_header_shows_run_and_demo_banner(run: ScreenedRun) -> None:
    report = parse_report(run.text)
    assert report.body["data-state"] == "complete"
    assert report.banner and "Not for diagnostic use" in run.text
    assert _meta(run.text, "Model") == "simplecnn"
    assert _meta(run.text, "Files").startswith("18 files: 18 ok, 0 skipped, 0 error")
    assert _meta(run.text, "Studies") == "3 studies, 2 positive"
    assert 'http-equiv="refresh"' not in run.text  # only while a run is going


def test_banner_follows_weights(tmp_path: Path) -> None:
    from ichscan.models import BUNDLED_WEIGHTS

    def banner(**kwargs: object) -> bool:
        reporter = HtmlReporter(tmp_path / "r.html", RunConfig(thresholds=default_thresholds(), **kwargs))
        return parse_report(reporter.path.read_text(encoding="utf-8")).banner

    assert not banner(weights=str(tmp_path / "trained.pt"), trained=True)
    assert banner(weights="untrained (seed 1)", trained=False)
    assert banner(weights=str(BUNDLED_WEIGHTS), trained=True)


# -- reporter behaviour on hand-made results -----------------------------------------------------


def make_result(study: str, instance: int, p_any: float, *, path: str = "", thresholds: dict[str, float]) -> SliceResult:
    probabilities = {label: 0.1 for label in SUBTYPES}
    probabilities["subdural"] = 0.9
    probabilities["any"] = p_any
    result = SliceResult(
        Instance(
            path or f"/data/in/{study}/{instance}.dcm",
            sop_instance_uid=f"1.2.3.{instance}",
            study_instance_uid=study,
            series_instance_uid="1.2.4",
            instance_number=instance,
        ),
        Status.OK,
        image=StoredImage(None, display=np.full((64, 64), 90 + instance, dtype=np.uint8)),
        prediction=Prediction(
            probabilities, {label: probabilities[label] >= thresholds[label] for label in LABELS}, "subdural", 0.9
        ),
    )
    return result


def test_untrusted_text_is_escaped(tmp_path: Path) -> None:
    thresholds = default_thresholds()
    study_uid = '1.2"><img src=x onerror=alert(2)>'
    table = StudyTable(thresholds)
    reporter = HtmlReporter(tmp_path / "r.html", RunConfig(thresholds=thresholds, input_root=Path("/data/in")))
    bad = SliceResult.failed("/data/in/sub/<script>alert(1)</script>.dcm", "not DICOM <b>x</b>")
    results = [bad, make_result(study_uid, 1, 0.99, thresholds=thresholds)]
    results[1].instance.sop_instance_uid = "<i>sop</i>"
    table.add(results)
    reporter.on_results(results, table)
    reporter.on_finish(reporter.counts, table)
    text = reporter.path.read_text(encoding="utf-8")
    for raw in ("<script>alert(1)</script>", "<img src=x onerror", "<b>x</b>", "<i>sop</i>"):
        assert raw not in text
    assert "sub/&lt;script&gt;alert(1)&lt;/script&gt;.dcm" in text  # relative to the input folder
    assert "/data/in/" not in text
    assert "not DICOM &lt;b&gt;x&lt;/b&gt;" in text
    assert html.escape(study_uid) in text
    report = parse_report(text)
    assert [row.uid for row in report.rows] == [study_uid]
    assert len(report.rows[0].images) == 1


def test_thumbnails_are_bounded(tmp_path: Path) -> None:
    thresholds = default_thresholds()
    table = StudyTable(thresholds)
    reporter = HtmlReporter(
        tmp_path / "r.html", RunConfig(thresholds=thresholds), thumbnails_per_study=2, max_thumbnail_studies=1
    )
    first = [make_result("1.1", i, p, thresholds=thresholds) for i, p in enumerate([0.6, 0.95, 0.7, 0.9, 0.3], 1)]
    table.add(first)
    reporter.on_results(first, table)
    assert [t.instance_number for t in reporter.thumbnails["1.1"]] == [2, 4]  # top 2 by p(any), negative slice 5 never
    second = [make_result("1.2", 7, 0.99, thresholds=thresholds)]
    table.add(second)
    reporter.on_results(second, table)
    # Only the study with the higher p(any) keeps thumbnails.
    assert list(reporter.thumbnails) == ["1.2"]


def test_rewrites_at_most_every_interval(tmp_path: Path) -> None:
    thresholds = default_thresholds()
    table = StudyTable(thresholds)
    reporter = HtmlReporter(tmp_path / "r.html", RunConfig(thresholds=thresholds))
    reporter.write_interval_s = 3600.0
    batch = [make_result("1.1", 1, 0.9, thresholds=thresholds)]
    table.add(batch)
    reporter.on_results(batch, table)
    assert "No studies screened yet" in reporter.path.read_text(encoding="utf-8")
    reporter._last_write -= 3601.0  # as if an hour had passed
    reporter.on_study_complete(["1.1"], table)
    text = reporter.path.read_text(encoding="utf-8")
    assert 'data-uid="1.1"' in text and 'data-state="in progress"' in text and 'http-equiv="refresh"' in text
    reporter.on_finish(reporter.counts, table)
    assert 'data-state="complete"' in reporter.path.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary files left


def test_relative_href_quotes_odd_folder_names(tmp_path: Path) -> None:
    target = tmp_path / "over lays #1" / "a.png"
    assert relative_href(target, tmp_path / "report") == "../over%20lays%20%231/a.png"


# -- headless Chromium ------------------------------------------------------------------------


def dump_dom(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after load (scripts run), as headless Chromium serialises it."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian package 'chromium')")
    command = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=20, env={**os.environ, "HOME": str(profile)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "<body" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def test_chromium_loads_report_with_all_images(run: ScreenedRun, tmp_path: Path) -> None:
    dom = parse_report(dump_dom(run.html_path, tmp_path / "profile"))
    expected = sorted(run.studies_csv, key=lambda row: -float(row["p_any"]))
    assert [row.uid for row in dom.rows] == [row["study_instance_uid"] for row in expected]
    assert dom.body.get("data-check") == "done", "the page's check script did not run"
    assert int(dom.body["data-images"]) == len(parse_report(run.text).all_images) > 0
    assert dom.body["data-images-broken"] == "0"
    assert int(dom.body["data-overlays-checked"]) == int(dom.body["data-overlays"]) > 0
    assert dom.body["data-overlays-broken"] == "0"


def test_chromium_reports_broken_images(run: ScreenedRun, tmp_path: Path) -> None:
    # Negative control: a copy one folder deeper (its overlay links no longer resolve)
    # with one thumbnail's data replaced by bytes that are no image.
    moved = tmp_path / "a" / "b" / "report.html"
    moved.parent.mkdir(parents=True)
    text, n = re.subn(r'src="data:image/jpeg;base64,[^"]+"', 'src="data:image/jpeg;base64,bm90IGFuIGltYWdl"', run.text, count=1)
    assert n == 1
    moved.write_text(text, encoding="utf-8")
    dump = dump_dom(moved, tmp_path / "profile")
    dom = parse_report(dump)
    assert dom.body.get("data-check") == "done"
    assert dom.body["data-images-broken"] == "1"
    assert int(dom.body["data-overlays-broken"]) == int(dom.body["data-overlays"]) > 0
    assert re.search(r'<p id="image-warning"[^>]*>Warning: 1 thumbnail', dump)


def _meta(text: str, key: str) -> str:
    match = re.search(rf"<tr><th>{re.escape(key)}</th><td>(.*?)</td></tr>", text)
    assert match, key
    return html.unescape(match.group(1))
