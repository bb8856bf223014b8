"""--saliency: Grad-CAM heat maps of positive slices, on overlays and key images; free when off."""

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from ichscan.cli import cli
from ichscan.dicom import decode_many
from ichscan.models import BUNDLED_WEIGHTS, load_model
from ichscan.pipeline import BatchOptions, run_batch
from ichscan.pipeline.screener import Screener
from ichscan.plugins import get_plugin_manager
from ichscan.reporting import ResultsOutput
from ichscan.saliency import GradCam, SaliencyError, saliency_layer
from ichscan.synth import generate, render_record


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Three studies of eight 256-pixel slices: bleeds the bundled weights find, and none."""
    folder = tmp_path_factory.mktemp("saliency")
    return folder, generate(folder, studies=3, slices=8, seed=3, size=256)


@pytest.fixture(scope="module")
def screener():
    pm = get_plugin_manager()
    return Screener(pm, load_model(pm, BUNDLED_WEIGHTS), "cpu", saliency=True)


def screen(screener, records):
    decoded = decode_many([str(r.path) for r in records], resize_to=screener.settings.size, display=True)
    return screener.screen(decoded)


def test_heat_maps_of_positive_slices_peak_inside_the_bleed(phantoms, screener):
    _, records = phantoms
    results = screen(screener, records)
    hits, chance, found = 0, 0.0, 0
    for record, result in zip(records, results, strict=True):
        if not result.is_positive:
            assert result.heatmap is None  # negative slices get none
            continue
        assert result.heatmap.dtype == np.float32 and result.heatmap.ndim == 2
        assert result.heatmap.max() == pytest.approx(1.0) and result.heatmap.min() >= 0.0
        if not record.labels["any"]:
            continue  # a false positive: no bleed to look for
        found += 1
        _, masks = render_record(record)
        bleed = np.logical_or.reduce(list(masks.values()))
        rows, columns = result.heatmap.shape
        r, c = np.unravel_index(int(np.argmax(result.heatmap)), result.heatmap.shape)
        # The centre of the hottest cell, in the image's pixels (the map covers the image).
        hits += bool(bleed[int((r + 0.5) * record.size / rows), int((c + 0.5) * record.size / columns)])
        chance += bleed.mean()
    assert found >= 5, "the phantoms should hold bleeds the bundled weights find"
    # A bleed covers about 1 % of the image: a peak landing there by chance would be rare.
    assert hits >= found / 2 and hits > 10 * chance, (hits, found, chance)


def test_saliency_off_installs_no_hook_and_computes_no_gradients(phantoms, monkeypatch):
    _, records = phantoms
    pm = get_plugin_manager()
    plain = Screener(pm, load_model(pm, BUNDLED_WEIGHTS), "cpu")
    assert plain.grad_cam is None
    layer = saliency_layer(plain.model)
    seen = []

    def probe(module, inputs, output):
        # The only hook on the layer is this probe, and the model runs without autograd.
        seen.append((len(module._forward_hooks), torch.is_inference_mode_enabled(), output.requires_grad))

    def refuse(*args, **kwargs):
        raise AssertionError("a gradient was computed with --saliency off")

    handle = layer.register_forward_hook(probe)
    monkeypatch.setattr(torch.autograd, "grad", refuse)
    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    try:
        results = screen(plain, records)
    finally:
        handle.remove()
    assert any(r.is_positive for r in results)
    assert all(r.heatmap is None for r in results)
    assert seen and all(s == (1, True, False) for s in seen)


def test_the_hook_lives_only_while_heat_maps_are_made(phantoms, screener):
    _, records = phantoms
    layer = saliency_layer(screener.model)
    results = screen(screener, records[:8])
    assert any(r.heatmap is not None for r in results)
    assert not layer._forward_hooks
    assert all(p.grad is None for p in screener.model.parameters())  # no parameter gradients


def test_batch_overlays_and_key_images_with_and_without_saliency(phantoms, tmp_path):
    folder, _ = phantoms
    runs = {}
    for name, saliency in (("plain", False), ("saliency", True)):
        out = tmp_path / name / "results.csv"
        run_batch(
            BatchOptions(
                input_dir=folder,
                out=out,
                workers=0,
                progress=False,
                overlays_for="all",
                saliency=saliency,
                results=ResultsOutput(dicom_out=tmp_path / name / "dicom"),
            )
        )
        with open(out) as fh:
            runs[name] = {row["sop_instance_uid"]: row for row in csv.DictReader(fh)}
    plain, heat = runs["plain"], runs["saliency"]
    assert plain.keys() == heat.keys()
    positives = [uid for uid, row in plain.items() if row["top_label"] != "none"]
    negatives = [uid for uid, row in plain.items() if row["top_label"] == "none"]
    assert positives and negatives
    for uid in negatives:  # byte for byte the same overlay
        assert Path(heat[uid]["overlay"]).read_bytes() == Path(plain[uid]["overlay"]).read_bytes()
    for uid in positives:
        with Image.open(plain[uid]["overlay"]) as a, Image.open(heat[uid]["overlay"]) as b:
            assert a.mode == "P" and b.mode == "RGB" and a.size == b.size
            changed = (np.asarray(a.convert("RGB")) != np.asarray(b)).any(axis=2)
        assert 0.001 < changed.mean() < 0.5  # a colour map over part of the image
    # The key image of each positive study carries the heat map too.
    keys = {}
    for name in runs:
        for path in sorted((tmp_path / name / "dicom").rglob("*.dcm")):
            ds = pydicom.dcmread(path)
            if ds.Modality != "SR":
                keys.setdefault(name, {})[ds.StudyInstanceUID] = ds
    assert keys["saliency"].keys() == keys["plain"].keys() and keys["plain"]
    for study, ds in keys["saliency"].items():
        assert "Grad-CAM" in ds.DerivationDescription
        assert "Grad-CAM" not in keys["plain"][study].DerivationDescription
        assert (ds.pixel_array != keys["plain"][study].pixel_array).any()


def test_predict_saliency_prints_the_peak_and_draws_it(phantoms, tmp_path):
    _, records = phantoms
    positive = next(r for r in records if r.labels["any"] and "epidural" in r.drawn)
    negative = next(r for r in records if not r.labels["any"])
    result = CliRunner().invoke(cli, ["predict", str(positive.path), "--saliency", "--device", "cpu", "--save", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "POSITIVE" in result.output and "saliency: the heat map of" in result.output
    with Image.open(tmp_path / "p.png") as image:
        assert image.mode == "RGB"
    result = CliRunner().invoke(cli, ["predict", str(negative.path), "--saliency", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "negative" in result.output and "saliency: the heat map" not in result.output


def test_a_model_without_a_convolution_is_refused(tmp_path):
    with pytest.raises(SaliencyError, match="needs a convolutional model"):
        GradCam(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)))
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "flat.py").write_text(
        "import ichscan\nfrom torch import nn\n\n"
        "class Flat(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(3, 6)\n"
        "    def forward(self, x):\n        return self.fc(x.mean(dim=(2, 3)))\n\n"
        "@ichscan.hookimpl\ndef ichscan_register_models(register):\n    register('flat', Flat)\n"
    )
    folder = tmp_path / "in"
    generate(folder, studies=1, slices=1, seed=1, size=64)
    result = CliRunner().invoke(
        cli, ["--plugins-dir", str(plugins), "batch", str(folder), "--model", "flat", "--saliency", "--out", str(tmp_path / "r.csv"), "--workers", "0"]
    )
    assert result.exit_code == 1 and "needs a convolutional model" in result.output and "Traceback" not in result.output


class PerNeighbour(nn.Module):
    """slice_context 1, one 1x1 convolution run on each neighbour separately."""

    slice_context = 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, kernel_size=1, bias=False)
        nn.init.ones_(self.conv.weight)
        self.head = nn.Linear(3, 6, bias=False)
        nn.init.ones_(self.head.weight)

    def forward(self, x):
        n, group, s = x.shape[0], x.shape[1], x.shape[-1]
        features = self.conv(x.reshape(n * group, 1, s, s)).reshape(n, group, s, s)
        return self.head(features.amax(dim=(2, 3)))


def test_a_context_model_gets_the_centre_slice_heat_map():
    x = torch.zeros(2, 3, 8, 8)
    x[:, 0, 1, 1] = 1.0  # the neighbour below
    x[:, 1, 5, 6] = 2.0  # the slice itself
    x[:, 2, 7, 0] = 1.0  # the neighbour above
    maps = GradCam(PerNeighbour(), context=1)(x, [0, 4])
    assert len(maps) == 2
    for heat in maps:
        assert heat.shape == (8, 8)
        assert np.unravel_index(int(np.argmax(heat)), heat.shape) == (5, 6)
        assert heat[1, 1] == 0 and heat[7, 0] == 0
