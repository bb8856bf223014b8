"""`ichscan` end to end on generated phantoms, through the real console script."""

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import ROOT, read_csv_header, run_ichscan
from ichscan import __version__
from ichscan.cli import cli
from ichscan.default_plugins.csv_report import RESULT_COLUMNS, STUDY_COLUMNS
from ichscan.labels import LABELS, SUBTYPES



@pytest.fixture(scope="module")
def phantoms(make_phantoms):
    folder, records = make_phantoms("phantoms", studies=3, slices=5, seed=11)
    (folder / "README.txt").write_text("a stray text file in the archive")
    (folder / ".DS_Store").write_bytes(b"\0hidden")
    return folder, records


@pytest.fixture(scope="module")
def batch_run(phantoms, tmp_path_factory):
    """One real `ichscan batch` run as a subprocess, with worker processes."""
    folder, records = phantoms
    out_dir = tmp_path_factory.mktemp("out")
    proc = run_ichscan("batch", str(folder), "--out", str(out_dir / "results.csv"), "--overlays-for", "all", "--workers", "2")
    return proc, out_dir, records


@pytest.mark.slow
def test_batch_end_to_end(batch_run, phantoms):
    proc, out_dir, records = batch_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "bundled demo weights" in proc.stderr and "NOT for clinical use" in proc.stderr  # the user is told
    header, rows = read_csv_header(out_dir / "results.csv")
    assert tuple(header) == RESULT_COLUMNS
    assert len(rows) == len(records) + 1  # every phantom + README.txt; the hidden file is skipped
    by_sop = {r["sop_instance_uid"]: r for r in rows if r["status"] == "ok"}
    assert set(by_sop) == {rec.sop_instance_uid for rec in records}
    stray = [r for r in rows if r["path"].endswith("README.txt")]
    assert stray[0]["status"] == "error" and "not a DICOM file" in stray[0]["error"]
    from ichscan.models import load_model
    from ichscan.plugins import get_plugin_manager

    thresholds = load_model(get_plugin_manager()).thresholds  # the bundled checkpoint's
    for row in by_sop.values():
        probs = {label: float(row[f"p_{label}"]) for label in LABELS}
        assert all(0.0 <= p <= 1.0 for p in probs.values())
        for label in LABELS:
            if abs(probs[label] - thresholds[label]) > 1e-6:  # the CSV rounds to 6 decimals
                assert row[label] == str(int(probs[label] >= thresholds[label]))
        if row["any"] == "1":
            assert row["top_label"] == max(SUBTYPES, key=probs.get)
        else:
            assert row["top_label"] == "none"
        assert Path(row["overlay"]).is_file()  # --overlays-for all
        assert Path(row["overlay"]).parent == out_dir / "overlays"
    study_header, studies = read_csv_header(out_dir / "results_studies.csv")
    assert tuple(study_header) == STUDY_COLUMNS
    assert {s["study_instance_uid"] for s in studies} == {rec.study_instance_uid for rec in records}
    for study in studies:
        mine = [r for r in by_sop.values() if r["study_instance_uid"] == study["study_instance_uid"]]
        assert int(study["slices"]) == len(mine) == 5
        assert int(study["positive_slices"]) == sum(r["any"] == "1" for r in mine)
        for label in LABELS:
            assert float(study[f"p_{label}"]) == pytest.approx(max(float(r[f"p_{label}"]) for r in mine), abs=1e-6)


@pytest.mark.slow
def test_predict_image_agrees_with_batch(batch_run):
    from ichscan import predict_image

    _, out_dir, records = batch_run
    _, rows = read_csv_header(out_dir / "results.csv")
    row = next(r for r in rows if r["status"] == "ok")
    predictions, probabilities, image = predict_image(row["path"])
    for label in LABELS:
        assert probabilities[label] == pytest.approx(float(row[f"p_{label}"]), abs=1e-5)
    assert predictions == [label for label in LABELS if row[label] == "1"]
    assert image.dtype.name == "uint8" and image.ndim == 2 and image.shape[0] >= 400



def test_threshold_option_sets_positive_flags(phantoms, tmp_path):
    folder, records = phantoms
    result = CliRunner().invoke(
        cli,
        ["batch", str(folder), "--out", str(tmp_path / "r.csv"), "--threshold", "any=0.0,subdural=1.0", "--workers", "0", "--overlays-for", "none", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    _, rows = read_csv_header(tmp_path / "r.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["any"] == "1" and r["subdural"] == "0" for r in ok)
    assert not (tmp_path / "overlays").exists()  # --overlays-for none


def test_checkpoint_thresholds_apply_and_cli_overrides(phantoms, tmp_path):
    from ichscan.models import load_model, save_checkpoint
    from ichscan.plugins import get_plugin_manager

    folder, _ = phantoms
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, load_model(get_plugin_manager()).model, "simplecnn", thresholds={"any": 1.0})
    base = ["batch", str(folder), "--weights", str(ckpt), "--workers", "0", "--overlays-for", "none", "--no-progress"]
    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "a.csv")])
    assert result.exit_code == 0, result.output
    assert "UNTRAINED" not in result.output
    _, rows = read_csv_header(tmp_path / "a.csv")
    assert all(r["any"] == "0" and r["top_label"] == "none" for r in rows if r["status"] == "ok")
    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "b.csv"), "--threshold", "0"])
    _, rows = read_csv_header(tmp_path / "b.csv")
    assert all(r["any"] == "1" for r in rows if r["status"] == "ok")


@pytest.mark.parametrize(
    "args, message",
    [
        (["batch", "/no/such/folder"], "does not exist"),
        (["batch", "{file}"], "is not a folder"),
        (["batch", "{dir}", "--out", "/proc/forbidden/r.csv"], "cannot create folder"),
        (["batch", "{dir}", "--weights", "{file}"], "not an ichscan checkpoint"),
        (["batch", "{dir}", "--model", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    ],
)
def test_run_that_cannot_happen_exits_1_with_one_line(tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    some_file = tmp_path / "f.pt"
    some_file.write_bytes(b"x")
    args = [a.format(file=some_file, dir=tmp_path) for a in args]
    result = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "overlays").exists()  # a run that could not happen leaves no folders


def test_verbosity_levels(phantoms, tmp_path):
    """Default: ichscan's INFO lines; -v adds its DEBUG lines; -vv also the libraries'
    (named); -q keeps warnings only."""
    folder, _ = phantoms

    def stderr(*flags: str) -> str:
        proc = run_ichscan(*flags, "batch", str(folder), "--out", str(tmp_path / f"r{''.join(flags)}.csv"),
                           "--overlays-for", "none", "--workers", "1", "--no-progress")
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    default, verbose, very, quiet = stderr(), stderr("-v"), stderr("-vv"), stderr("-q")
    assert "ichscan INFO: screened" in default and "DEBUG" not in default
    assert "ichscan DEBUG: decoding: 1 workers" in verbose and "ichscan INFO: screened" in verbose
    assert "ichscan DEBUG ichscan.pipeline.run: decoding:" in very
    assert any(line.startswith("ichscan DEBUG ") and " ichscan." not in line for line in very.splitlines())
    assert "INFO" not in quiet and "NOT for clinical use" in quiet  # the demo-weights warning stays


def test_unwritable_save_and_synth_targets_are_one_line_errors(phantoms, tmp_path):
    folder, records = phantoms
    dcm = next(folder.rglob("*.dcm"))
    (tmp_path / "afile").write_text("x")
    for args in (
        ["predict", str(dcm), "--save", str(tmp_path / "nodir" / "x.png")],
        ["predict", str(dcm), "--save", str(tmp_path / "x.jpgg")],
        ["synth", str(tmp_path / "afile" / "sub"), "--studies", "1", "--slices", "1"],
    ):
        proc = run_ichscan("-q", *args)
        assert proc.returncode == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and ("cannot save" in errors[0] or "cannot write phantoms" in errors[0]), proc.stderr


def test_rows_that_could_not_be_written_make_batch_exit_1(phantoms, tmp_path, monkeypatch):
    """A disk that fills up mid-run: the CSV reporter fails, the run goes on, and the exit
    status says the results file is incomplete."""
    from ichscan.default_plugins.csv_report import CsvReporter

    folder, _ = phantoms
    written = CsvReporter.on_results
    calls = []

    def on_results(self, results, studies):
        calls.append(len(results))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        written(self, results, studies)

    monkeypatch.setattr(CsvReporter, "on_results", on_results)
    result = CliRunner().invoke(
        cli, ["batch", str(folder), "--out", str(tmp_path / "r.csv"), "--workers", "0", "--batch-size", "4",
              "--overlays-for", "none", "--no-progress"],
    )
    assert result.exit_code == 1, result.output
    assert "some rows could not be written to" in result.output
    assert len(calls) > 2  # the run went on after the failure


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--ae-title", ""], "1 to 16 characters"), (["--allow-calling", ",,"], "names no AE title")],
)
def test_serve_scp_ae_title_errors_say_what_is_wrong(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["serve-scp", "--port", "0", "--store", str(tmp_path / "s"), *args])
    assert result.exit_code == 2 and message in result.output


def test_bad_threshold_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["batch", str(tmp_path), "--threshold", "bleed=0.3"])
    assert result.exit_code == 2
    assert "unknown label 'bleed'" in result.output


def test_version_and_help_show_defaults():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = CliRunner().invoke(cli, ["batch", "--help"])
    assert result.exit_code == 0
    text_out = " ".join(result.output.split())  # help wraps lines
    for text in ("--out", "default: results.csv", "--overlays-for", "default: positive", "--device", "default: auto", "--threshold"):
        assert text in text_out


SHARED_OPTIONS = (
    "--out", "--studies-out", "--overlays", "--overlays-for", "--html", "--dicom-out", "--sr-template", "--forward", "--forward-wait", "--fhir-out", "--state",
    "--weights", "--model", "--threshold", "--device", "--batch-size", "--workers", "--threads",
)
LIVE_OPTIONS = ("--max-latency", "--study-timeout", "--series-timeout")


def help_options(command: str) -> set[str]:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    return {word.rstrip(",") for word in result.output.split() if word.startswith("--")}


def test_screening_commands_share_their_options():
    """batch, watch and serve-scp take the same output, result, state and model options;
    the live two also the latency and timeout ones (serve-scp once lacked --model and --threads)."""
    batch, watch, serve = help_options("batch"), help_options("watch"), help_options("serve-scp")
    for options in (batch, watch, serve):
        assert set(SHARED_OPTIONS) <= options
    assert set(LIVE_OPTIONS) <= watch and set(LIVE_OPTIONS) <= serve
    assert "--calling-ae" in batch and "--calling-ae" in watch and "--calling-ae" not in serve  # it sends as --ae-title
    assert "--resume" in batch and "--series-timeout" not in batch
    text_out = " ".join(CliRunner().invoke(cli, ["serve-scp", "--help"]).output.split())
    assert "seconds a series must be quiet before slices whose neighbours never came are screened anyway. [default: 10.0;" in text_out


def test_screening_options_reach_the_options_objects(tmp_path, monkeypatch):
    """What the shared options parse arrives in BatchOptions/WatchOptions (not only in --help)."""
    import ichscan.pipeline

    seen = {}

    def fake_serve(opts, pm):
        seen["serve"] = opts
        raise ichscan.pipeline.RunError("stop here")

    def fake_batch(opts, pm):
        seen["batch"] = opts
        raise ichscan.pipeline.RunError("stop here")

    monkeypatch.setattr(ichscan.pipeline, "run_serve", fake_serve)
    monkeypatch.setattr(ichscan.pipeline, "run_batch", fake_batch)
    model = ["--model", "simplecnn", "--threads", "3", "--workers", "0", "--threshold", "any=0.3"]
    result = CliRunner().invoke(
        cli, ["serve-scp", "--port", "0", "--ae-title", "ME", "--store", str(tmp_path / "s"), "--series-timeout", "2.5", *model]
    )
    assert result.exit_code == 1 and "stop here" in result.output, result.output
    watch = seen["serve"].watch
    assert (watch.model_name, watch.threads, watch.workers, watch.series_timeout) == ("simplecnn", 3, 0, 2.5)
    assert watch.thresholds == {"any": 0.3} and watch.input_dir == tmp_path / "s" and watch.results.calling_ae == "ME"
    result = CliRunner().invoke(cli, ["batch", str(tmp_path), "--resume", "--calling-ae", "US", *model])
    assert result.exit_code == 1, result.output
    batch = seen["batch"]
    assert batch.resume is True and (batch.model_name, batch.threads) == ("simplecnn", 3) and batch.results.calling_ae == "US"
    CliRunner().invoke(cli, ["batch", str(tmp_path)])
    assert seen["batch"].resume is False  # off unless asked for


def test_synth_command_and_reproducibility(tmp_path):
    for name in ("a", "b"):
        result = CliRunner().invoke(cli, ["synth", str(tmp_path / name), "--studies", "1", "--slices", "2", "--seed", "4", "--size", "128", "--layout", "rsna"])
        assert result.exit_code == 0, result.output
        assert "wrote 2 slices" in result.output
    a = sorted((tmp_path / "a").rglob("*.dcm"))
    b = sorted((tmp_path / "b").rglob("*.dcm"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 2
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert (tmp_path / "a" / "stage_2_train.csv").read_text() == (tmp_path / "b" / "stage_2_train.csv").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["predict_phantom.py", "custom_plugin.py"])
def test_examples_run(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if script == "predict_phantom.py":
        assert "probabilities: epidural" in proc.stdout and "true labels:" in proc.stdout
    else:
        assert "screened 8 files" in proc.stdout
        _, rows = read_csv_header(tmp_path / "results.csv")
        assert len(rows) == 8


def test_readme_quick_start_commands_exist():
    """The README's first commands must name options that exist."""
    readme = (ROOT / "README.md").read_text()
    first = readme[: readme.index("## What it does")]
    assert "pip install -e ." in first and "ichscan synth" in first and "ichscan batch" in first
    assert "pytest" in first
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pytest" in ci
