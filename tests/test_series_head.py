"""A model with a series head gets whole series (position order, a missing slice simply
absent) in all three commands, and the study's p_any is its series output."""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import read_csv, wait_for
from ichscan.default_plugins.ichnet import ICHNetSeries
from ichscan.pipeline import BatchOptions, WatchOptions, run_batch, run_watch
from ichscan.pipeline.series import WholeSeries
from ichscan.plugins import get_plugin_manager
from ichscan.records import Instance, SliceResult, Status
from test_series import PLUGIN_DIR, make_series
from test_series import common as series_common

LABELS3 = ("epidural", "intraparenchymal", "intraventricular")


def common(tmp_path: Path, name: str) -> dict:
    # A batch smaller than a series: a series spans several batches.
    return {**series_common(tmp_path, name), "model_name": "series-probe", "batch_size": 3}


def expected(where: dict) -> tuple[dict, dict]:
    """Per (series, index): (index, series length - 1, rank); per study: its p_any."""
    present: dict[str, list[int]] = {}
    for series, index in where.values():
        present.setdefault(series, []).append(index)
    rows = {}
    for series, indexes in present.items():
        for rank, i in enumerate(sorted(indexes)):
            rows[(series, i)] = (i, len(indexes) - 1, rank)
    study_any = max((sum(indexes) + 1) / 100 for indexes in present.values())
    return rows, {"p_any": study_any}


def refined_by_model(csv_path: Path, where: dict) -> dict:
    rows = read_csv(csv_path)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    by_name = {Path(p).name: key for p, key in where.items()}
    out = {}
    for row in rows:
        key = by_name[Path(row["path"]).name]
        assert key not in out, f"two rows for {key}"
        out[key] = tuple(round(float(row[f"p_{label}"]) * 100) - 1 for label in LABELS3)
    return out


def study_any(csv_path: Path) -> float:
    (study,) = read_csv(csv_path.with_name("results_studies.csv"))
    return float(study["p_any"])


@pytest.fixture
def series_files(tmp_path):
    where = make_series(tmp_path / "src")  # two series, one with a missing slice
    return tmp_path / "src", where


def test_batch_refines_whole_series_in_position_order(tmp_path, series_files):
    root, where = series_files
    run_batch(BatchOptions(input_dir=root, **common(tmp_path, "batch")), get_plugin_manager([PLUGIN_DIR]))
    rows, study = expected(where)
    out = tmp_path / "batch" / "results.csv"
    assert refined_by_model(out, where) == rows
    assert study_any(out) == pytest.approx(study["p_any"], abs=1e-6)


def test_watch_refines_a_series_once_quiet_with_the_same_rows_as_batch(tmp_path, series_files):
    root, where = series_files
    pm = get_plugin_manager([PLUGIN_DIR])
    run_batch(BatchOptions(input_dir=root, **common(tmp_path, "batch")), pm)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    opts = WatchOptions(
        input_dir=incoming, settle=0.2, max_latency=0.2, series_timeout=2.0, study_timeout=2.0, rescan_interval=3600,
        **common(tmp_path, "watch"),
    )
    stop = threading.Event()
    thread = threading.Thread(target=run_watch, args=(opts, pm, stop), daemon=True)
    thread.start()
    paths = list(where)
    random.Random(3).shuffle(paths)
    moved = {}
    for i, path in enumerate(paths):  # one by one, shuffled, quicker than the series timeout
        dest = incoming / f"{i:03d}-{Path(path).name}"
        shutil.copy(path, dest.with_suffix(".part"))
        dest.with_suffix(".part").rename(dest)
        moved[str(dest)] = where[path]
        time.sleep(0.05)
    out = tmp_path / "watch" / "results.csv"
    wait_for(lambda: len(read_csv(out, missing_ok=True)) >= len(where), 60, "a row for every slice")
    wait_for(lambda: len(read_csv(out.with_name("results_studies.csv"), missing_ok=True)) == 1, 60, "the study row")
    stop.set()
    thread.join(60)
    rows, study = expected(where)
    assert refined_by_model(out, moved) == rows
    assert study_any(out) == pytest.approx(study["p_any"], abs=1e-6)
    batch = {Path(r["path"]).name: r for r in read_csv(tmp_path / "batch" / "results.csv")}
    for row in read_csv(out):
        same = batch[Path(row["path"]).name.split("-", 1)[1]]
        for column in row:
            if column.startswith("p_") or column in ("status", "top_label", "sop_instance_uid"):
                assert row[column] == same[column], column


# -- the holder on its own --------------------------------------------------------------------------


def _screened(series: str, position: float | None, name: str) -> SliceResult:
    result = SliceResult(Instance(name, series_instance_uid=series, position=position), Status.OK)
    result.embedding = np.zeros(2, np.float32)
    return result


def test_whole_series_waits_for_busy_series_and_quiet_live_ones():
    held = WholeSeries(timeout=5.0)
    held.add([_screened("s1", 0.0, "a"), _screened("s1", 1.0, "b"), _screened("s2", 0.0, "c")], now=0.0)
    # Live: nothing before the series are quiet; s1 still busy upstream stays after that.
    assert held.take(1.0, busy=set(), indexed=set()) == []
    assert held.due_in(1.0) == pytest.approx(4.0)
    ready = held.take(6.0, busy={"s1"}, indexed=set())
    assert [[r.path for r in group] for group in ready] == [["c"]]
    # Indexed (batch): whole as soon as nothing of it is busy, without a wait.
    held.add([_screened("s3", 2.0, "e"), _screened("s3", 1.0, "d")], now=6.0)
    ready = held.take(6.0, busy={"s1"}, indexed={"s3"})
    assert [[r.path for r in group] for group in ready] == [["d", "e"]]
    ready = held.take(6.0, busy={"s1"}, indexed=set(), flush=True)
    assert [[r.path for r in group] for group in ready] == [["a", "b"]]
    assert len(held) == 0


def test_slices_without_series_or_position_and_failures_are_not_held():
    held = WholeSeries(timeout=5.0)
    failed = SliceResult(Instance("bad"), Status.ERROR, "unreadable")
    held.add([_screened("", 0.0, "no-series"), _screened("s", None, "no-position"), failed], now=0.0)
    assert held.take(0.0, busy=set(), indexed=set()) == [[failed]]
    ready = held.take(5.0, busy=set(), indexed=set())
    assert sorted(r.path for group in ready for r in group) == ["no-position", "no-series"]
    assert all(len(group) == 1 for group in ready)


# -- ichnet-series ------------------------------------------------------------------------------------


def test_ichnet_series_head_on_a_series_with_a_missing_slice():
    """The head refines a series with a gap like any other (the gap is simply not in the
    sequence); untrained it changes nothing, and padding never changes a series' result."""
    torch.manual_seed(0)
    model = ICHNetSeries().eval()
    x = torch.randn(6, 9, 64, 64)
    with torch.no_grad():
        embeddings = model.embed(x)
        whole, _ = model.refine(embeddings[None])
        assert torch.allclose(whole[0], model(x), atol=1e-6)  # zero-initialised corrections
        torch.nn.init.normal_(model.sequence.slice_out.weight, std=0.5)
        torch.nn.init.normal_(model.sequence.series_out.weight, std=0.5)
        gap = embeddings[[0, 1, 2, 4, 5]]  # slice 3 missing
        refined, series = model.refine(gap[None])
        assert refined.shape == (1, 5, 6) and series.shape == (1, 6)
        assert torch.isfinite(refined).all() and torch.isfinite(series).all()
        assert not torch.allclose(refined[0], model(x[[0, 1, 2, 4, 5]]))  # the head now acts
        padded = torch.zeros(2, 6, embeddings.shape[1])
        padded[0], padded[1, :5] = embeddings, gap
        both, both_series = model.refine(padded, torch.tensor([6, 5]))
        assert torch.allclose(both[1, :5], refined[0], atol=1e-5)
        assert torch.allclose(both_series[1], series[0], atol=1e-5)
