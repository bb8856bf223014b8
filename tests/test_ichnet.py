"""ichnet and ichnet-2d: registration, per-model training defaults, the same context input in
training and screening, and a short training run from the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ichscan import hookimpl
from ichscan.cli import cli
from ichscan.dicom import decode_many
from ichscan.labels import LABELS
from ichscan.models import ModelError, load_model, train_defaults
from ichscan.pipeline.screener import Screener
from ichscan.plugins import get_plugin_manager
from ichscan.train.dataset import RSNADataset, UnreadableImage
from ichscan.train.loop import TrainOptions, resolve_train_defaults


def test_ichnet_and_ichnet_2d_are_registered_with_their_context():
    pm = get_plugin_manager()
    for name, context, channels in (("ichnet", 1, 9), ("ichnet-2d", 0, 3)):
        model = load_model(pm, model_name=name).model
        assert getattr(model, "slice_context") == context
        assert model(torch.rand(2, channels, 64, 64)).shape == (2, len(LABELS))
        assert sum(p.numel() for p in model.parameters()) < 2_000_000


# -- per-model training defaults ------------------------------------------------------------------


class _OwnDefaults(nn.Module):
    train_defaults = {"epochs": 3, "lr": 0.01}


class _BadDefaults(nn.Module):
    train_defaults = {"epochs": 3, "warmup": 2}


class _DefaultsPlugin:
    @hookimpl
    def ichscan_register_models(self, register):
        register("own-defaults", _OwnDefaults)
        register("bad-defaults", _BadDefaults)


def test_train_defaults_come_from_the_model_and_options_override_them():
    from ichscan.default_plugins.ichnet import ICHNet

    pm = get_plugin_manager()
    pm.register(_DefaultsPlugin())
    assert train_defaults(pm, "ichnet") == ICHNet.train_defaults
    assert train_defaults(pm, "simplecnn") == {"epochs": 5, "lr": 1e-3, "batch_size": 32}  # as before
    assert train_defaults(pm, "own-defaults") == {"epochs": 3, "lr": 0.01, "batch_size": 32}  # the rest generic
    opts = TrainOptions(Path("d"), Path("l.csv"), Path("o"), model_name="own-defaults", batch_size=8)
    said = resolve_train_defaults(opts, pm)
    assert (opts.epochs, opts.lr, opts.batch_size) == (3, 0.01, 8)
    assert said == "training own-defaults: epochs 3 (model default), learning rate 0.01 (model default), batch size 8 (--batch-size)"
    opts = TrainOptions(Path("d"), Path("l.csv"), Path("o"), model_name="own-defaults", epochs=1, lr=0.5, batch_size=4)
    resolve_train_defaults(opts, pm)
    assert (opts.epochs, opts.lr, opts.batch_size) == (1, 0.5, 4)


def test_train_defaults_with_an_unknown_key_are_an_error():
    pm = get_plugin_manager()
    pm.register(_DefaultsPlugin())
    with pytest.raises(ModelError, match="unknown keys.*warmup"):
        train_defaults(pm, "bad-defaults")


# -- the same context input in training and in screening -----------------------------------------


@pytest.fixture(scope="module")
def context_set(make_phantoms):
    """Three series of five 64 x 64 slices: in series 0 the middle slice was never sent (file
    gone, label kept); in series 1 slice 3's header is fine but its pixels do not decode."""
    root, records = make_phantoms("context", studies=3, slices=5, seed=31, layout="rsna", size=64)
    by_key = {(r.study_index, r.slice_index): r for r in records}
    by_key[(0, 2)].path.unlink()
    broken = by_key[(1, 3)].path
    ds = pydicom.dcmread(broken)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(broken)
    return root, by_key


def expected_paths(by_key, study: int, index: int) -> list[str]:
    """Below, itself, above: a neighbour that is not there repeats the slice itself (k = 1)."""
    present = {i for (s, i), r in by_key.items() if s == study and r.path.exists() and (s, i) != (1, 3)}
    return [str(by_key[(study, j if j in present else index)].path) for j in (index - 1, index, index + 1)]


def test_training_input_equals_the_screener_input_for_the_same_neighbours(context_set, tmp_path):
    root, by_key = context_set
    pm = get_plugin_manager()
    screener = Screener(pm, load_model(pm, model_name="ichnet"), device="cpu")
    dataset = RSNADataset(root, root / "stage_2_train.csv", context=1)
    cached = RSNADataset(root, root / "stage_2_train.csv", context=1, cache_dir=tmp_path / "cache")
    position = {item.image_id: i for i, item in enumerate(dataset.items)}
    assert len(dataset) == 14  # 15 labelled, one file gone
    checked = 0
    for (study, index), record in sorted(by_key.items()):
        if (study, index) == (0, 2):
            continue
        i = position[record.image_id]
        if (study, index) == (1, 3):
            with pytest.raises(UnreadableImage):
                dataset.model_input(i)
            continue
        decoded = decode_many(expected_paths(by_key, study, index), resize_to=screener.settings.size)
        assert all(d.status == "ok" for d in decoded)
        expected = screener.model_input([d.pixels for d in decoded], [d.slope for d in decoded], [d.intercept for d in decoded])
        assert expected.shape == (1, 9, 224, 224)
        got = dataset.model_input(i)
        assert torch.equal(got, expected[0]), (study, index)
        assert (cached.model_input(i) - got).abs().max() <= 0.5 / 255 + 1e-6  # the uint8 cache
        checked += 1
    assert checked == 13
    # The cases that matter, by name: series edges, the gap, the neighbour that fails to decode.
    assert expected_paths(by_key, 0, 0)[0] == expected_paths(by_key, 0, 0)[1]
    assert expected_paths(by_key, 0, 4)[2] == expected_paths(by_key, 0, 4)[1]
    assert expected_paths(by_key, 0, 1)[2] == expected_paths(by_key, 0, 1)[1]
    assert expected_paths(by_key, 0, 3)[0] == expected_paths(by_key, 0, 3)[1]
    assert expected_paths(by_key, 1, 2)[2] == expected_paths(by_key, 1, 2)[1]


def test_single_slice_models_see_the_slice_alone(context_set):
    root, _ = context_set
    flat = RSNADataset(root, root / "stage_2_train.csv")
    assert flat.model_input(0).shape == (3, 224, 224)
    assert flat.neighbours[0] == (0,)


# -- ichnet trained from the command line, then screening with it ---------------------------------


@pytest.fixture(scope="module")
def ichnet_run(make_phantoms, tmp_path_factory):
    root, _ = make_phantoms("ichnet", studies=8, slices=4, seed=41, layout="rsna", size=64)
    run = tmp_path_factory.mktemp("ichnet-run")
    result = CliRunner().invoke(
        cli,
        ["train", str(root), "--labels", str(root / "stage_2_train.csv"), "--out", str(run), "--model", "ichnet",
         "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    return root, run


@pytest.mark.slow
def test_ichnet_one_epoch_from_the_cli(ichnet_run):
    root, run = ichnet_run
    for name in ("split.csv", "best.pt", "last.pt", "history.csv"):
        assert (run / name).is_file(), name
    with open(run / "history.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1"]
    loaded = load_model(get_plugin_manager(), run / "best.pt")
    assert loaded.name == "ichnet" and loaded.trained and loaded.model.slice_context == 1
    assert loaded.extra["train"] == {"epochs": 1, "lr": train_defaults(get_plugin_manager(), "ichnet")["lr"], "batch_size": 8}


@pytest.mark.slow
def test_train_prints_the_settings_it_took(make_phantoms, tmp_path):
    root, _ = make_phantoms("defaults", studies=4, slices=2, seed=43, layout="rsna", size=64)
    result = CliRunner().invoke(
        cli,
        ["train", str(root), "--labels", str(root / "stage_2_train.csv"), "--out", str(tmp_path), "--model", "ichnet-2d",
         "--epochs", "1", "--lr", "0.005", "--workers", "0", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    batch = train_defaults(get_plugin_manager(), "ichnet-2d")["batch_size"]
    assert f"training ichnet-2d: epochs 1 (--epochs), learning rate 0.005 (--lr), batch size {batch} (model default)" in result.output


@pytest.mark.slow
def test_batch_screens_with_trained_ichnet_as_evaluate_does(ichnet_run, tmp_path):
    """batch (the pipeline's series context) and evaluate (the training dataset) give the same
    probabilities for every slice: both hand the model the same neighbours."""
    root, run = ichnet_run
    result = CliRunner().invoke(
        cli,
        ["evaluate", str(root), "--labels", str(root / "stage_2_train.csv"), "--weights", str(run / "best.pt"), "--out", str(tmp_path / "eval"), "--workers", "0"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["model"] == "ichnet"
    with open(tmp_path / "eval" / "predictions.csv") as fh:
        predictions = {r["image_id"]: r for r in csv.DictReader(fh)}
    result = CliRunner().invoke(
        cli,
        ["batch", str(root / "stage_2_train"), "--weights", str(run / "best.pt"), "--out", str(tmp_path / "b.csv"), "--workers", "0", "--overlays-for", "none", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert "UNTRAINED" not in result.output
    with open(tmp_path / "b.csv") as fh:
        rows = {Path(r["path"]).stem: r for r in csv.DictReader(fh)}
    assert set(rows) == set(predictions) and len(rows) == 32
    assert all(r["status"] == "ok" for r in rows.values())
    for image_id, row in predictions.items():
        got = [float(rows[image_id][f"p_{label}"]) for label in LABELS]
        want = [float(row[f"p_{label}"]) for label in LABELS]
        assert np.allclose(got, want, atol=1e-5), image_id


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ichnet_trains_under_autocast_on_a_gpu(ichnet_run, tmp_path):
    root, _ = ichnet_run
    result = CliRunner().invoke(
        cli,
        ["train", str(root), "--labels", str(root / "stage_2_train.csv"), "--out", str(tmp_path), "--model", "ichnet",
         "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cuda", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert load_model(get_plugin_manager(), tmp_path / "best.pt").trained


def test_ichnet_without_weights_takes_its_bundled_demo_weights(tmp_path):
    """`--model ichnet` alone screens with the shipped ichnet weights and says they are a demo;
    simplecnn stays the default of batch."""
    from ichscan.models import BUNDLED, BUNDLED_WEIGHTS, is_bundled

    pm = get_plugin_manager()
    weights = BUNDLED["ichnet"]
    assert weights.is_file() and weights.stat().st_size <= 25 * 1024 * 1024
    loaded = load_model(pm, model_name="ichnet")
    assert loaded.name == "ichnet" and loaded.trained and loaded.bundled and is_bundled(loaded.source)
    assert "demo weights" in loaded.notice() and "NOT for clinical use" in loaded.notice()
    assert loaded.preprocessing.crop  # trained with framing, as ichscan train does
    assert load_model(pm).source == str(BUNDLED_WEIGHTS)
    untrained = load_model(pm, model_name="ichnet-2d")  # no weights ship for it
    assert not untrained.trained and "UNTRAINED" in untrained.notice()


@pytest.mark.slow
def test_bundled_ichnet_weights_reach_auc_on_unseen_phantoms_of_every_style(tmp_path):
    """The shipped ichnet weights on volumetric phantoms of seeds never used in training, one
    set per style: AUC(any) >= 0.85 on each (measured when they were made: docs/benchmarks.md)."""
    from ichscan.models import BUNDLED
    from ichscan.synth import generate
    from ichscan.train.evaluate import EvaluateOptions, run_evaluation

    found = {}
    for i, style in enumerate(("default", "small-faint", "sharp-large")):
        data = tmp_path / style
        records = generate(data, studies=6, slices=16, seed=9100 + i, layout="rsna", style=style, volumetric=True, positive_fraction=0.7)
        assert 0 < sum(r.labels["any"] for r in records) < len(records)  # both classes, or no AUC
        metrics = run_evaluation(EvaluateOptions(data, data / "stage_2_train.csv", tmp_path / f"eval-{style}", weights=BUNDLED["ichnet"], workers=0))
        found[style] = metrics["per_label"]["any"]["auc"]
    assert min(found.values()) >= 0.85, found
