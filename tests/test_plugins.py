"""The plugin surface: loading from entry points and --plugins-dir, isolation, docs."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import CT_SMALL, ROOT, read_csv
from ichscan import hookspecs
from ichscan.pipeline import BatchOptions, run_batch
from ichscan.cli import cli
from ichscan.plugins import PluginError, describe_plugins, get_plugin_manager
from ichscan.reporting import ResultsOutput

HOOK_NAMES = sorted(name for name in dir(hookspecs) if name.startswith("ichscan_"))


@pytest.fixture
def ct_folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(CT_SMALL, folder / "a.dcm")
    (folder / "notes.txt").write_text("not dicom")
    return folder


CONSTANT_MODEL = """
import torch
from torch import nn
import ichscan

class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0]))
    def forward(self, x):
        return self.bias.expand(x.shape[0], 6)

@ichscan.hookimpl
def ichscan_register_models(register):
    register("constant", Constant)
"""


def make_entry_point_dist(site: Path, name: str, source: str) -> None:
    (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[ichscan]\n{name} = {name}\n")


def test_entry_point_plugin_model_is_used(tmp_path, monkeypatch, ct_folder):
    site = tmp_path / "site"
    site.mkdir()
    make_entry_point_dist(site, "ichscan_constant_model", CONSTANT_MODEL)
    monkeypatch.syspath_prepend(str(site))
    pm = get_plugin_manager()
    names = {info.name: info for info in describe_plugins(pm)}
    assert "ichscan_constant_model" in names
    from ichscan.models import load_model

    assert "UNTRAINED" in load_model(pm, model_name="constant").notice()  # no checkpoint for it
    assert names["ichscan_constant_model"].source.startswith("entry point")
    out = tmp_path / "r.csv"
    run_batch(BatchOptions(input_dir=ct_folder, out=out, model_name="constant", workers=0, progress=False, overlays_for="none"), pm)
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    ok = rows["a.dcm"]
    assert ok["status"] == "ok"
    # sigmoid(-3)=0.047426, sigmoid(2)=0.880797: the plugin's model produced these.
    assert float(ok["p_epidural"]) == pytest.approx(0.047426, abs=1e-6)
    assert float(ok["p_any"]) == pytest.approx(0.880797, abs=1e-6)
    assert ok["top_label"] == "subdural"
    assert rows["notes.txt"]["status"] == "error"


def test_allow_list_env_blocks_entry_point(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    make_entry_point_dist(site, "ichscan_blocked_model", CONSTANT_MODEL)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("ICHSCAN_LOAD_PLUGINS", "something_else")
    names = [info.name for info in describe_plugins(get_plugin_manager())]
    assert "ichscan_blocked_model" not in names
    assert "ichscan.default_plugins.simple_cnn" in names  # built-ins always load


def test_example_plugin_through_plugins_dir_cli(tmp_path, ct_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli, ["--plugins-dir", str(ROOT / "plugins"), "batch", str(ct_folder), "--out", "out/r.csv", "--workers", "0", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out" / "r.csv")
    lines = [json.loads(line) for line in (tmp_path / "out" / "r.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(x["path"] for x in lines)
    by_path = {x["path"]: x for x in lines}
    for row in rows:
        if row["status"] == "ok":
            assert by_path[row["path"]]["probabilities"]["any"] == pytest.approx(float(row["p_any"]), abs=1e-6)


def test_plugins_command_lists_dir_plugin_and_hooks():
    result = CliRunner().invoke(cli, ["--plugins-dir", str(ROOT / "plugins"), "plugins"])
    assert result.exit_code == 0, result.output
    assert "jsonl_report  [" in result.output
    assert "ichscan_register_reporters" in result.output
    assert "models: ichnet, ichnet-2d, ichnet-series, simplecnn" in result.output


def test_hook_name_typo_is_an_error_at_start_up(tmp_path):
    (tmp_path / "typo.py").write_text("import ichscan\n@ichscan.hookimpl\ndef ichscan_register_modles(register):\n    pass\n")
    with pytest.raises(PluginError, match="ichscan_register_modles"):
        get_plugin_manager([tmp_path])


def test_broken_plugin_file_gives_one_line_error(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    result = CliRunner().invoke(cli, ["--plugins-dir", str(tmp_path), "plugins"])
    assert result.exit_code == 1
    assert "broken.py failed to load: RuntimeError: boom" in result.output
    assert "Traceback" not in result.output


FAILING_REPORTER = """
import ichscan
from ichscan.reporting import Reporter

class Exploding(Reporter):
    name = "exploding"
    def on_results(self, results, studies):
        raise RuntimeError("reporter bug")
    def on_finish(self, summary, studies):
        raise RuntimeError("reporter bug at the end")

@ichscan.hookimpl
def ichscan_register_reporters(register, config):
    register(Exploding())
"""


def test_failing_reporter_does_not_lose_csv(tmp_path, ct_folder, caplog):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "exploding.py").write_text(FAILING_REPORTER)
    pm = get_plugin_manager([plugins])
    out = tmp_path / "r.csv"
    summary = run_batch(BatchOptions(input_dir=ct_folder, out=out, workers=0, progress=False, overlays_for="none"), pm)
    assert len(read_csv(out)) == 2
    assert len(read_csv(tmp_path / "r_studies.csv")) == 1
    assert summary.reporter_errors["exploding"] == 2
    assert "reporter exploding failed" in caplog.text


PREPROCESS_PLUGIN = """
import torch
import ichscan

@ichscan.hookimpl
def ichscan_preprocess(pixels, slopes, intercepts, settings, device, channels_last):
    return torch.zeros((len(pixels), 3, settings.size, settings.size), device=device)
"""


def test_hook_ichscan_preprocess_replaces_builtin(tmp_path):
    import numpy as np
    import torch

    from ichscan.pipeline.screener import Screener
    from ichscan.models import load_model

    (tmp_path / "zeros.py").write_text(PREPROCESS_PLUGIN)
    pm = get_plugin_manager([tmp_path])
    screener = Screener(pm, load_model(pm), "cpu")
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 3000, (64, 64)).astype(np.int16)]
    with torch.inference_mode():
        expected = torch.sigmoid(screener.model(torch.zeros((1, 3, 224, 224)))).numpy()
    assert np.allclose(screener.predict(pixels, [1.0], [-1024.0]), expected, atol=1e-6)


def test_hook_ichscan_register_models_duplicate_name_is_an_error(tmp_path):
    from ichscan.models import ModelError, model_factories

    (tmp_path / "dup.py").write_text(
        "import ichscan\n@ichscan.hookimpl\ndef ichscan_register_models(register):\n    register('simplecnn', object)\n"
    )
    with pytest.raises(ModelError, match="simplecnn"):
        model_factories(get_plugin_manager([tmp_path]))


def test_hook_ichscan_register_reporters_sees_config(tmp_path, ct_folder):
    seen = {}
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "spy.py").write_text(
        "import ichscan\nSEEN = {}\n@ichscan.hookimpl\ndef ichscan_register_reporters(register, config):\n"
        "    SEEN['thresholds'] = dict(config.thresholds)\n    SEEN['out'] = config.out\n"
    )
    pm = get_plugin_manager([plugins])
    run_batch(
        BatchOptions(input_dir=ct_folder, out=tmp_path / "r.csv", thresholds={"any": 0.25}, workers=0, progress=False, overlays_for="none"),
        pm,
    )
    from ichscan.models import load_model

    seen = pm.get_plugin("spy").SEEN
    # --threshold any=0.25 wins; the other labels keep the checkpoint's thresholds.
    assert seen["thresholds"]["any"] == 0.25
    assert seen["thresholds"]["subdural"] == load_model(pm).thresholds["subdural"]
    assert seen["out"] == tmp_path / "r.csv"


STUDY_SPY = """
import ichscan
RESULTS = []

@ichscan.hookimpl
def ichscan_study_result(result, config):
    RESULTS.append(result)
"""

STUDY_BROKEN = """
import ichscan

@ichscan.hookimpl
def ichscan_study_result(result, config):
    raise RuntimeError("pager down")
"""


def test_hook_ichscan_study_result(tmp_path, make_phantoms):
    """Every completed study reaches every implementation once, with the values of the
    studies CSV, its accession number and its SR; one failing implementation is logged and
    counted, and does not stop the other."""
    folder, records = make_phantoms("study-events", studies=2, slices=3, seed=5, size=64, transfer_syntaxes="ExplicitVRLittleEndian")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "a_broken.py").write_text(STUDY_BROKEN)
    (plugins / "spy.py").write_text(STUDY_SPY)
    pm = get_plugin_manager([plugins])
    summary = run_batch(
        BatchOptions(
            input_dir=folder, out=tmp_path / "r.csv", workers=0, progress=False, overlays_for="all",
            results=ResultsOutput(dicom_out=tmp_path / "dicom"),
        ),
        pm,
    )
    results = pm.get_plugin("spy").RESULTS
    studies = {row["study_instance_uid"]: row for row in read_csv(tmp_path / "r_studies.csv")}
    assert sorted(r.study_instance_uid for r in results) == sorted(studies) and len(studies) == 2
    import pydicom

    accessions = {r.study_instance_uid: str(pydicom.dcmread(r.path, stop_before_pixels=True).AccessionNumber) for r in records}
    for result in results:
        row = studies[result.study_instance_uid]
        assert result.slices == int(row["slices"]) == 3
        assert abs(result.probabilities["any"] - float(row["p_any"])) < 1e-5
        assert result.top_label == row["top_label"]
        assert result.accession_number == accessions[result.study_instance_uid] != ""
        assert result.source == "batch" and result.model_name == "simplecnn"
        assert [obj.kind for obj in result.dicom_results][:1] == ["sr"]
        assert Path(result.dicom_results[0].file).is_file()
        assert result.overlay is not None and Path(result.overlay).is_file()
        assert json.dumps(result.to_dict())  # plain values, ready for a webhook body
    assert summary.reporter_errors == {"study-events": 1}


COMMAND_PLUGIN = """
import click
import ichscan

@ichscan.hookimpl
def ichscan_register_commands(cli):
    @cli.command()
    @click.argument("name")
    @click.option("--times", type=int, default=1, help="How often.")
    def hello(name, times):
        \"\"\"Greet NAME.\"\"\"
        click.echo(" ".join([f"hello {name}"] * times))

    @cli.command("batch")
    def not_the_batch():
        click.echo("a plugin's batch")
"""


def test_hook_ichscan_register_commands(tmp_path):
    """A plugin file in --plugins-dir adds a command to the real console script; it shows in
    --help, runs with its own options, and cannot take over a built-in command."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "greeter.py").write_text(COMMAND_PLUGIN)
    ichscan = Path(sys.executable).with_name("ichscan")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ichscan), "--plugins-dir", str(plugins), *args], capture_output=True, text=True, timeout=120)

    proc = run("hello", "world", "--times", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello world hello world\n"
    proc = run("--help")
    assert proc.returncode == 0 and "hello" in proc.stdout and "Greet NAME." in proc.stdout
    proc = run("batch", "--help")
    assert proc.returncode == 0 and "Screen every DICOM file" in proc.stdout and "a plugin's batch" not in proc.stdout
    # In-process too; and without the folder there is no such command: nothing stayed behind.
    result = CliRunner().invoke(cli, ["--plugins-dir", str(plugins), "hello", "again"])
    assert result.exit_code == 0 and result.output == "hello again\n", result.output
    result = CliRunner().invoke(cli, ["hello", "world"])
    assert result.exit_code == 2 and "No such command 'hello'" in result.output


def test_entry_point_plugin_adds_a_command_unless_the_allow_list_leaves_it_out(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    make_entry_point_dist(site, "ichscan_greeter", COMMAND_PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    result = CliRunner().invoke(cli, ["hello", "entry point"])
    assert result.exit_code == 0 and result.output == "hello entry point\n", result.output
    monkeypatch.setenv("ICHSCAN_LOAD_PLUGINS", "something_else")
    result = CliRunner().invoke(cli, ["hello", "entry point"])
    assert result.exit_code == 2 and "No such command 'hello'" in result.output


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hook_is_documented_and_tested(hook):
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert hook in docs, f"{hook} is not documented in docs/plugins.md"
    assert f"def test_hook_{hook}" in Path(__file__).read_text(), f"no test_hook_{hook}"


LIST_SOURCE = '''
import os
import ichscan
from ichscan.sources.base import Entry


class ListSource:
    """A finite source: the paths listed in a text file, one a line."""

    live = False

    def __init__(self, location):
        with open(location) as fh:
            self.paths = [line.strip() for line in fh if line.strip()]
        self.done = False
        self.seen = []

    def open(self, pipeline):
        pass

    def poll(self, now, limit):
        chunk, self.paths = self.paths[:limit], self.paths[limit:]
        self.done = not self.paths
        return [Entry(p) if os.path.exists(p) else Entry(p, "listed but missing") for p in chunk]

    def wait(self, timeout):
        pass

    def stop(self):
        self.done = True

    @property
    def finished(self):
        return self.done

    def on_results(self, results):
        self.seen.extend(r.path for r in results)

    def close(self):
        pass


@ichscan.hookimpl
def ichscan_register_sources(register):
    register("listfile", ListSource)
'''


def test_hook_ichscan_register_sources(tmp_path, ct_folder):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "list_source.py").write_text(LIST_SOURCE)
    listing = tmp_path / "paths.txt"
    listing.write_text(f"{ct_folder / 'a.dcm'}\n{tmp_path / 'gone.dcm'}\n")
    out = tmp_path / "out" / "results.csv"
    ichscan = Path(sys.executable).with_name("ichscan")
    proc = subprocess.run(
        [str(ichscan), "--plugins-dir", str(plugins), "screen", "listfile", str(listing), "--out", str(out),
         "--overlays-for", "none", "--workers", "0", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    assert set(rows) == {"a.dcm", "gone.dcm"}  # the listed files only: notes.txt is not listed
    assert rows["a.dcm"]["status"] == "ok"
    assert (rows["gone.dcm"]["status"], rows["gone.dcm"]["error"]) == ("error", "listed but missing")
    unknown = subprocess.run([str(ichscan), "screen", "nosuch", str(listing)], capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 1 and "unknown source 'nosuch'; registered: dicomweb, folder, watch" in unknown.stderr
