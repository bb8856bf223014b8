"""ichnet-series: slices grouped into series in position order, the head's padding, stage 2 of
``ichscan train`` and ``ichscan evaluate`` with the series head."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ichscan.cli import cli
from ichscan.default_plugins.ichnet import ICHNetSeries
from ichscan.labels import LABELS
from ichscan.models import load_model
from ichscan.plugins import get_plugin_manager
from ichscan.records import Instance
from ichscan.train.dataset import RSNADataset
from ichscan.train.metrics import STUDY_FROM_SERIES_HEAD
from ichscan.train.series_head import refine_by_series, series_groups, series_targets


def trained_looking_head(model: ICHNetSeries, seed: int = 0) -> ICHNetSeries:
    """An untrained head changes nothing (zero output layers); give it weights that do."""
    torch.manual_seed(seed)
    for layer in (model.sequence.slice_out, model.sequence.series_out):
        nn.init.normal_(layer.weight, std=0.5)
        nn.init.normal_(layer.bias, std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def volume(make_phantoms):
    """Three series of six 64 x 64 slices (volumetric phantoms); series 0 lost its slice 2."""
    root, records = make_phantoms("series-head", studies=3, slices=6, seed=51, layout="rsna", size=64, volumetric=True)
    by_key = {(r.study_index, r.slice_index): r for r in records}
    by_key.pop((0, 2)).path.unlink()
    return root, by_key


def test_series_are_grouped_in_position_order_whatever_the_file_order(volume):
    root, by_key = volume
    dataset = RSNADataset(root, root / "stage_2_train.csv")
    assert len(dataset) == 17  # 18 labelled, one file gone
    record_of = {r.image_id: r for r in by_key.values()}
    instances = dataset.instances
    for seed in range(3):
        order = list(range(len(instances)))
        random.Random(seed).shuffle(order)
        shuffled = [instances[i] for i in order]
        groups = series_groups(shuffled)
        assert sorted(i for g in groups for i in g) == list(range(len(shuffled)))  # each slice once
        assert len(groups) == 3
        for group in groups:
            records = [record_of[dataset.items[order[i]].image_id] for i in group]
            assert len({r.series_instance_uid for r in records}) == 1
            positions = [shuffled[i].position for i in group]
            assert positions == sorted(positions) and len(set(positions)) == len(positions)
            indexes = [r.slice_index for r in records]
            assert indexes in (sorted(indexes), sorted(indexes, reverse=True))  # along the normal, one way or the other
            expected = [i for i in range(6) if (records[0].study_index, i) != (0, 2)]
            assert sorted(indexes) == expected  # the series with the gap is one slice shorter


def test_a_slice_without_series_or_position_is_a_series_of_its_own():
    instances = [
        Instance("a", series_instance_uid="1.2", position=10.0),
        Instance("b"),  # nothing known
        Instance("c", series_instance_uid="1.2", position=5.0),
        Instance("d", series_instance_uid="1.3"),  # no position
        Instance("e", series_instance_uid="1.2", position=0.0),
    ]
    assert sorted(series_groups(instances)) == sorted([[4, 2, 0], [1], [3]])


def test_every_slice_is_refined_also_around_a_gap(volume):
    root, _ = volume
    dataset = RSNADataset(root, root / "stage_2_train.csv")
    model = trained_looking_head(ICHNetSeries())
    torch.manual_seed(1)
    embeddings = torch.rand(len(dataset), 256)
    groups = series_groups(dataset.instances)
    with torch.inference_mode():
        refined, series = refine_by_series(model, embeddings, groups)
        plain = model.head(embeddings)
    assert refined.shape == (17, len(LABELS)) and series.shape == (3, len(LABELS))
    assert sorted(len(g) for g in groups) == [5, 6, 6]
    # Every slice went through the head (which now changes every logit), none was left at 0.
    assert ((refined - plain).abs().amin(dim=1) > 0).all()


def test_refining_series_padded_together_equals_one_by_one():
    model = trained_looking_head(ICHNetSeries(), seed=3)
    torch.manual_seed(4)
    embeddings = torch.randn(20, 256).abs()
    groups = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9], [10], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    with torch.inference_mode():
        together, series_together = refine_by_series(model, embeddings, groups)
        alone = [refine_by_series(model, embeddings, [g]) for g in groups]
    for group, (slices, series) in zip(groups, alone, strict=True):
        assert torch.allclose(together[group], slices[group], atol=1e-5)
    assert torch.allclose(series_together, torch.cat([s for _, s in alone]), atol=1e-5)
    # The same through the model's own API, one series unpadded.
    with torch.inference_mode():
        refined, series = model.refine(embeddings[groups[1]][None])
    assert torch.allclose(refined[0], together[groups[1]], atol=1e-5)
    assert torch.allclose(series[0], series_together[1], atol=1e-5)


def test_a_series_is_positive_where_any_of_its_slices_is():
    targets = torch.tensor([[0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.float32).numpy()
    assert series_targets(targets, [[0, 1, 2], [3]]).tolist() == [[1, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]]


# -- ichnet-series trained from the command line, then evaluated ------------------------------------


@pytest.fixture(scope="module")
def series_run(make_phantoms, tmp_path_factory):
    root, _ = make_phantoms("series-run", studies=10, slices=5, seed=53, layout="rsna", size=64, volumetric=True)
    run = tmp_path_factory.mktemp("series-run-out")
    args = ["train", str(root), "--labels", str(root / "stage_2_train.csv"), "--out", str(run), "--model", "ichnet-series",
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return root, run, args, result.output


@pytest.mark.slow
def test_ichnet_series_trains_its_head_after_the_backbone(series_run):
    _, run, _, output = series_run
    assert "stage 1 (backbone, slice by slice)" in output and "stage 2 (series head)" in output
    loaded = load_model(get_plugin_manager(), run / "best.pt")
    assert loaded.name == "ichnet-series" and loaded.trained
    head = loaded.extra["series_head"]
    assert head["epochs"] == 30 and 0 <= head["best_epoch"] <= 30
    assert {"val_loss_before", "val_loss_after", "val_auc_after"} <= set(head)
    assert head["val_loss_before"] == pytest.approx(loaded.extra["val_loss"], abs=1e-4)  # stage 1's, the head still at zero
    # A head is kept only when it lowers the validation loss; otherwise it stays at zero.
    assert head["val_loss_after"] <= head["val_loss_before"] + 1e-6
    trained = [row["val_loss"] for row in head["history"]]
    if head["best_epoch"]:
        assert head["val_loss_after"] == pytest.approx(min(trained), abs=1e-5)
        assert loaded.model.sequence.slice_out.weight.abs().sum() > 0
        assert loaded.model.sequence.series_out.weight.abs().sum() > 0
    else:
        assert min(trained) >= head["val_loss_before"] - 1e-6
        assert loaded.model.sequence.slice_out.weight.abs().sum() == 0
    # The backbone is stage 1's: last.pt holds the model as stage 1 left it.
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]
    for name, value in loaded.model.state_dict().items():
        if not name.startswith("sequence."):
            assert torch.equal(value, last[name]), name


@pytest.mark.slow
def test_resume_after_stage_1_reruns_the_head_from_best_pt(series_run):
    root, run, args, _ = series_run
    before = load_model(get_plugin_manager(), run / "best.pt")
    result = CliRunner().invoke(cli, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert "stage 2 (series head)" in result.output
    after = load_model(get_plugin_manager(), run / "best.pt")
    assert after.extra["epoch"] == before.extra["epoch"] and "series_head" in after.extra
    for name, value in after.model.state_dict().items():
        if not name.startswith("sequence."):
            assert torch.equal(value, before.model.state_dict()[name]), name
    assert after.extra["series_head"]["val_loss_before"] == pytest.approx(before.extra["series_head"]["val_loss_before"], abs=1e-6)


@pytest.mark.slow
def test_evaluate_takes_the_study_probability_from_the_series_head(series_run, tmp_path):
    root, run, _, _ = series_run
    result = CliRunner().invoke(
        cli,
        ["evaluate", str(root), "--labels", str(root / "stage_2_train.csv"), "--weights", str(run / "best.pt"), "--out", str(tmp_path), "--workers", "0"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == "ichnet-series" and metrics["images"] == 50
    assert metrics["study"]["probability"] == STUDY_FROM_SERIES_HEAD and metrics["study"]["n_studies"] == 10
    assert f"study probability: {STUDY_FROM_SERIES_HEAD}" in result.output
