"""``ichscan batch --engine ray``: the same rows as the local engine, resumable, and safe when a
Ray worker dies. One local Ray (2 CPUs, no dashboard, no usage stats) serves the module."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import dicom_files, free_port, read_csv
from ichscan.pipeline import BatchOptions, RunError, run_batch
from ichscan.state.ledger import Ledger

ray = pytest.importorskip("ray")

#: A plugin whose preprocess wrapper runs where the model runs: it notes its process and
#: slows each batch down, so that a run lasts long enough to kill its model actor.
SLOW_PLUGIN = '''
import os, time
from pathlib import Path
import ichscan

@ichscan.hookimpl(wrapper=True)
def ichscan_preprocess(pixels):
    with open(Path(__file__).with_suffix(".pids"), "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    time.sleep(0.4)
    return (yield)
'''


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(make_phantoms) -> Path:
    """Two series of 6 phantom slices, a file that is not DICOM and a truncated DICOM."""
    root, _ = make_phantoms("ray_phantoms", studies=2, slices=6, seed=11)
    (root / "notes.txt").write_text("not DICOM\n")
    first = sorted(root.rglob("*.dcm"))[0]
    data = first.read_bytes()
    (root / "cut.dcm").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture
def slow_plugin(tmp_path) -> tuple[Path, Path]:
    """``(plugins folder, file of the model processes' PIDs)`` for SLOW_PLUGIN."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slow.py").write_text(SLOW_PLUGIN)
    return plugins, plugins / "slow.pids"


def rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows sorted by their first column (path, or study UID)."""
    return sorted(read_csv(csv_path), key=lambda r: next(iter(r.values())))


def assert_same_rows(local: list[dict], other: list[dict]) -> None:
    """Row for row; probabilities to 1e-5; overlays by file name (each run has its folder)."""
    assert [next(iter(r.values())) for r in other] == [next(iter(r.values())) for r in local]
    for a, b in zip(local, other, strict=True):
        for column, value in a.items():
            if column.startswith("p_") or column == "top_probability":
                assert (value == "") == (b[column] == ""), (column, a)
                if value:
                    assert abs(float(value) - float(b[column])) <= 1e-5, (column, a, b[column])
            elif column == "overlay":
                assert Path(value).name == Path(b[column]).name
            else:
                assert value == b[column], (column, a, b)


def screen(tmp_path: Path, name: str, source: Path, engine: str, **kwargs) -> Path:
    out = tmp_path / name / "results.csv"
    options = {"input_dir": source, "out": out, "engine": engine, "progress": False, "workers": 1, **kwargs}
    summary = run_batch(BatchOptions(**options))
    assert not summary.interrupted
    return out


@pytest.mark.parametrize("model", ["simplecnn", "ichnet"])
def test_ray_rows_equal_local_rows(tmp_path, folder, model):
    """Same files, same weights: the same results and study rows; ichnet looks at one
    neighbour per side (series context), the bad files get their error rows."""
    local = screen(tmp_path, "local", folder, "local", model_name=model, overlays_for="all")
    remote = screen(tmp_path, "ray", folder, "ray", model_name=model, overlays_for="all", batch_size=5)
    expected = rows(local)
    assert_same_rows(expected, rows(remote))
    errors = {Path(r["path"]).name: r["error"] for r in expected if r["status"] == "error"}
    assert set(errors) == {"notes.txt", "cut.dcm"}
    assert_same_rows(rows(local.with_name("results_studies.csv")), rows(remote.with_name("results_studies.csv")))
    # Overlays drawn on the driver from the image the actors sent: the same PNGs.
    for row in expected:
        if row["overlay"]:
            png = Path(row["overlay"]).name
            assert (local.parent / "overlays" / png).read_bytes() == (remote.parent / "overlays" / png).read_bytes()


def test_resume_skips_what_an_earlier_run_screened(tmp_path, make_phantoms):
    first, _ = make_phantoms("ray_resume_a", studies=1, slices=5, seed=21)
    later, _ = make_phantoms("ray_resume_b", studies=1, slices=4, seed=22)
    root = tmp_path / "archive"
    shutil.copytree(first, root / "a")
    out = screen(tmp_path, "run", root, "local")
    shutil.copytree(later, root / "b")
    summary = run_batch(BatchOptions(input_dir=root, out=out, engine="ray", resume=True, progress=False))
    assert summary.files == 4  # only the new series
    got = rows(out)
    assert len(got) == 9 and len({r["path"] for r in got}) == 9
    full = screen(tmp_path, "full", root, "local")
    assert_same_rows(rows(full), got)
    again = run_batch(BatchOptions(input_dir=root, out=out, engine="ray", resume=True, progress=False))
    assert again.files == 0 and rows(out) == got


def test_a_killed_model_actor_costs_no_row_and_duplicates_none(tmp_path, make_phantoms, slow_plugin):
    root, _ = make_phantoms("ray_kill", studies=2, slices=12, seed=31)
    plugins, pids_file = slow_plugin
    killed: list[int] = []

    def kill_the_actor() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = pids_file.read_text().split() if pids_file.exists() else []
            if len(pids) >= 2:  # two batches screened: the run is under way
                os.kill(int(pids[0]), signal.SIGKILL)
                killed.append(int(pids[0]))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_actor, daemon=True)
    killer.start()
    out = screen(tmp_path, "killed", root, "ray", batch_size=2, plugins_dirs=(plugins,))
    killer.join()
    assert killed, "the actor was never seen screening"
    assert set(map(int, pids_file.read_text().split())) - set(killed), "no actor screened after the kill"
    got = rows(out)
    assert len(got) == 24 and len({r["path"] for r in got}) == 24
    assert all(r["status"] == "ok" for r in got)
    assert_same_rows(rows(screen(tmp_path, "local", root, "local")), got)
    with Ledger(out.with_name("ichscan-state.sqlite")) as ledger:
        assert not ledger.queued()


def test_sigterm_stops_the_run_and_resume_finishes_it(tmp_path, make_phantoms, slow_plugin):
    """SIGTERM (as Ctrl-C) mid-run: the rows recorded are kept; --resume screens the rest once."""
    root, _ = make_phantoms("ray_stop", studies=1, slices=16, seed=41)
    plugins, pids_file = slow_plugin

    def terminate() -> None:
        while not (pids_file.exists() and len(pids_file.read_text().split()) >= 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate, daemon=True).start()
    out = tmp_path / "run" / "results.csv"
    options = {"input_dir": root, "out": out, "engine": "ray", "progress": False, "batch_size": 2, "plugins_dirs": (plugins,)}
    stopped = run_batch(BatchOptions(**options))
    assert stopped.interrupted and 0 < stopped.files < 16
    finished = run_batch(BatchOptions(**options, resume=True))
    assert not finished.interrupted and finished.files == 16 - stopped.files
    assert_same_rows(rows(screen(tmp_path, "local", root, "local")), rows(out))


def test_files_a_failed_task_lost_go_round_again_then_get_error_rows(tmp_path, folder, monkeypatch):
    """A block whose task failed for good (its retries spent) is left out by Ray Data: its
    files go round once more, one a task; what is still lost gets an error row."""
    from ichscan.pipeline import ray_engine

    once, always = (str(p) for p in dicom_files(folder)[:2])
    passes = []

    class Losing(ray_engine.RayEngine):
        def dataset(self, pipeline, entries, actors, chunk=ray_engine.DECODE_CHUNK):
            passes.append(chunk)
            lost = {always} | ({once} if len(passes) == 1 else set())
            return super().dataset(pipeline, [e for e in entries if e.path not in lost], actors, chunk)

    monkeypatch.setattr(ray_engine, "RayEngine", Losing)
    got = {r["path"]: r for r in rows(screen(tmp_path, "lost", folder, "ray"))}
    assert passes == [ray_engine.DECODE_CHUNK, 1]
    assert got[once]["status"] == "ok"
    assert got[always]["status"] == "error" and got[always]["error"] == ray_engine.LOST
    local = [r for r in rows(screen(tmp_path, "local", folder, "local")) if r["path"] != always]
    assert_same_rows(local, [r for r in got.values() if r["path"] != always])


def test_manifest_with_both_engines(tmp_path, folder):
    files = [str(p) for p in dicom_files(folder)]
    manifest = tmp_path / "list.txt"
    lines = ["# the archive", files[0], Path(files[1]).as_uri(), files[0], "", *files[2:], "s3://bucket/x.dcm"]
    manifest.write_text("\n".join(lines) + "\n")
    results = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine / "results.csv"
        run_batch(BatchOptions(manifest=manifest, out=out, engine=engine, progress=False, workers=1))
        results[engine] = rows(out)
    assert_same_rows(results["local"], results["ray"])
    assert len(results["ray"]) == len(files) + 1
    s3 = [r for r in results["ray"] if r["path"].startswith("s3:")]
    assert s3[0]["status"] == "error" and "unsupported URI scheme" in s3[0]["error"]


def test_a_series_head_model_is_refused_in_one_line(tmp_path, folder):
    with pytest.raises(RunError, match="series head"):
        run_batch(BatchOptions(input_dir=folder, out=tmp_path / "r.csv", engine="ray", model_name="ichnet-series", progress=False))


def test_without_ray_the_error_is_one_line(tmp_path, folder, monkeypatch):
    from ichscan.cli import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray: ImportError
    result = CliRunner().invoke(cli, ["batch", str(folder), "--out", str(tmp_path / "r.csv"), "--engine", "ray"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --engine ray needs Ray: pip install 'ichscan[ray]'"
    assert not (tmp_path / "r.csv").exists()


def test_an_address_where_nothing_answers_is_one_line(tmp_path, folder):
    from ichscan.pipeline.ray_engine import RayEngine

    port = free_port()
    for address, message in ((f"127.0.0.1:{port}", "cannot reach Ray"), (f"ray://127.0.0.1:{port}", "cannot reach Ray"), ("nowhere", "expected auto")):
        with pytest.raises(RunError, match=message):
            RayEngine(BatchOptions(input_dir=folder, engine="ray", address=address))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--address", "auto"], "--address needs --engine ray"),
        (["--manifest", "list.txt"], "either a FOLDER or --manifest"),
    ],
)
def test_bad_options_are_one_line(tmp_path, folder, args, message):
    from ichscan.cli import cli

    result = CliRunner().invoke(cli, ["batch", str(folder), "--out", str(tmp_path / "r.csv"), *args])
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
