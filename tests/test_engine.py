"""The engine: decode workers, batching, checkpoints, thresholds."""

import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CT_SMALL, copy_ct_small
from ichscan.dicom import decode_instance
from ichscan.pipeline.decode import DecodePool
from ichscan.pipeline.screener import Screener
from ichscan.models import ModelError, load_model, read_checkpoint, save_checkpoint
from ichscan.plugins import get_plugin_manager
from ichscan.sources.folder import FolderEntry, iter_folder



@pytest.fixture
def many_ct(tmp_path):
    return copy_ct_small(tmp_path / "many", 60)


def test_pool_yields_each_entry_once_including_refusals(many_ct):
    entries = [FolderEntry(p) for p in many_ct] + [FolderEntry("/nowhere/link", "symbolic link leaves the input folder; not followed")]
    with DecodePool(workers=2, chunk_size=4) as pool:
        out = list(pool.decode(entries))
    assert sorted(d.path for d in out) == sorted(e.path for e in entries)
    assert sum(d.status == "ok" for d in out) == 60
    refused = [d for d in out if d.path == "/nowhere/link"][0]
    assert refused.status == "error" and "leaves the input folder" in refused.error


def test_pool_survives_a_killed_worker(many_ct):
    """A worker killed mid-run (as a decoder crash would) loses no file."""
    seen = []
    with DecodePool(workers=1, chunk_size=4, max_in_flight=4) as pool:
        for i, decoded in enumerate(pool.decode(many_ct)):
            seen.append(decoded)
            if i == 5:
                pids = list(pool._executor._processes)  # the live worker processes
                assert pids
                os.kill(pids[0], signal.SIGKILL)
    assert sorted(d.path for d in seen) == many_ct
    assert all(d.status == "ok" for d in seen), [d.error for d in seen if d.status != "ok"]


def test_in_process_pool_matches_workers(many_ct):
    with DecodePool(workers=0) as pool:
        inline = {d.path: d for d in pool.decode(many_ct[:5])}
    with DecodePool(workers=1) as pool:
        remote = {d.path: d for d in pool.decode(many_ct[:5])}
    for path, d in inline.items():
        assert np.array_equal(d.pixels, remote[path].pixels)
        assert d.intercept == remote[path].intercept


def test_checkpoint_round_trip_and_thresholds(tmp_path):
    pm = get_plugin_manager()
    loaded = load_model(pm)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, loaded.model, "simplecnn", thresholds={"any": 0.9, "epidural": 0.2})
    again = load_model(pm, ckpt)
    assert again.trained and again.name == "simplecnn"
    assert again.thresholds["any"] == 0.9 and again.thresholds["epidural"] == 0.2 and again.thresholds["subdural"] == 0.5
    override = load_model(pm, ckpt, thresholds={"any": 0.1})
    assert override.thresholds["any"] == 0.1 and override.thresholds["epidural"] == 0.2
    decoded = decode_instance(CT_SMALL)
    a = Screener(pm, loaded, "cpu").predict([decoded.pixels], [decoded.slope], [decoded.intercept])
    b = Screener(pm, again, "cpu").predict([decoded.pixels], [decoded.slope], [decoded.intercept])
    assert np.allclose(a, b, atol=1e-6)


def test_half_precision_checkpoint_is_smaller_and_close(tmp_path):
    pm = get_plugin_manager()
    loaded = load_model(pm)
    full, half = tmp_path / "f.pt", tmp_path / "h.pt"
    save_checkpoint(full, loaded.model, "simplecnn")
    save_checkpoint(half, loaded.model, "simplecnn", half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(loaded.model(x), load_model(pm, half).model(x), atol=1e-2)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    pm = get_plugin_manager()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights"):
        load_model(pm, junk)
    other = tmp_path / "other.pt"
    torch.save({"format": "something"}, other)
    with pytest.raises(ModelError, match="not an ichscan checkpoint"):
        read_checkpoint(other)
    with pytest.raises(ModelError, match="not found"):
        load_model(pm, tmp_path / "missing.pt")


def test_screener_marks_positive_by_any_threshold():
    pm = get_plugin_manager()
    screener = Screener(pm, load_model(pm, thresholds={"any": 0.0}), "cpu")
    decoded = decode_instance(CT_SMALL)
    [result] = screener.screen([decoded])
    assert result.status == "ok" and result.is_positive
    assert result.top_label in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
    screener = Screener(pm, load_model(pm, thresholds={"any": 1.0}), "cpu")
    [result] = screener.screen([decode_instance(CT_SMALL)])
    assert not result.is_positive and result.top_label == "none"


def test_folder_walk_skips_hidden_and_outside_links(tmp_path):
    root = tmp_path / "root"
    (root / "P" / "S" / ".hidden").mkdir(parents=True)
    (root / "P" / "S" / "a.dcm").write_bytes(b"x")
    (root / "P" / "S" / "b").write_bytes(b"x")
    (root / "P" / "S" / ".c.dcm").write_bytes(b"x")
    (root / "P" / "S" / ".hidden" / "d.dcm").write_bytes(b"x")
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(b"x")
    (root / "P" / "out-link.dcm").symlink_to(outside)
    (root / "P" / "in-link.dcm").symlink_to(root / "P" / "S" / "a.dcm")
    (root / "P" / "loop").symlink_to(root)
    entries = {os.path.relpath(e.path, root): e.refusal for e in iter_folder(root)}
    assert entries == {
        "P/S/a.dcm": "",
        "P/S/b": "",
        "P/in-link.dcm": "",
        "P/out-link.dcm": "symbolic link leaves the input folder; not followed",
    }


def test_simplecnn_matches_the_original_layer_order():
    """The forward pass reorders ReLU and max-pool for speed; results must not change."""
    from ichscan.default_plugins.simple_cnn import SimpleCNN

    torch.manual_seed(0)
    model = SimpleCNN().eval()
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(3, 16, (3, 3)), (16, 32, (3, 3))]
    assert [m.out_features for m in model.classifier if isinstance(m, torch.nn.Linear)] == [128, 6]
    x = torch.randn(9, 3, 224, 224)  # more than one CPU chunk, and a partial one
    with torch.inference_mode():
        assert torch.allclose(model(x), model.classifier(model.features(x)), atol=1e-6)


def test_predict_image_show_draws_the_prediction(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ichscan import predict_image

    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(plt.gcf()))
    predictions, probabilities, image = predict_image(CT_SMALL, show=True)
    assert set(probabilities) == {"epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"}
    assert image.shape == (128, 128) and image.dtype == np.uint8
    assert len(shown) == 1
    title = shown[0].axes[0].get_title()
    assert f"any {probabilities['any']:.2f}" in title
    assert all(probabilities[p] >= 0 for p in predictions)
    plt.close("all")


# -- fuzz findings: a decoder panic, a chunk that fails, workers that cannot start ------------


@pytest.fixture
def with_bad_rle(tmp_path):
    """Four good CT slices and one whose RLE data makes pylibjpeg-rle panic."""
    pytest.importorskip("rle")  # pylibjpeg-rle
    from test_dicom import bad_rle_file

    folder = tmp_path / "rle"
    folder.mkdir()
    for i in range(4):
        shutil.copy(CT_SMALL, folder / f"{i:02d}.dcm")
    bad = str(bad_rle_file(folder / "zz_bad_rle.dcm"))
    return sorted(str(p) for p in folder.iterdir()), bad


def check_one_row_each(out, paths, bad, reason):
    assert sorted(d.path for d in out) == sorted(paths)  # exactly one row per file
    by_path = {d.path: d for d in out}
    assert by_path[bad].status == "error" and reason in by_path[bad].error, by_path[bad].error
    assert "\n" not in by_path[bad].error
    assert all(d.status == "ok" for p, d in by_path.items() if p != bad), [d.error for d in out]


@pytest.mark.parametrize("workers", [2, 0])
def test_decoder_panic_gets_an_error_row_through_the_pool(with_bad_rle, workers):
    paths, bad = with_bad_rle
    check_one_row_each(decode_all(paths, workers=workers, chunk_size=2), paths, bad, "PanicException")


@pytest.mark.parametrize("workers", [2, 0])
def test_decoder_panic_gets_an_error_row_in_the_streaming_pool(with_bad_rle, workers):
    paths, bad = with_bad_rle
    check_one_row_each(stream_all(paths, workers=workers, chunk_size=2), paths, bad, "PanicException")


def decode_all(paths, **pool_args):
    """Every slice a DecodePool's ``decode`` gives for ``paths``."""
    with DecodePool(**pool_args) as pool:
        return list(pool.decode(paths))


def stream_all(paths, **pool_args):
    """Every slice a DecodePool gives for ``paths``."""
    with DecodePool(**pool_args) as pool:
        pool.submit(paths)
        out = []
        while pool.pending:
            out += pool.collect(timeout=30)
    return out


# Imported by the worker processes (from a folder put on sys.path): like a Rust panic,
# the exception cannot be pickled back, so the chunk's future fails with a PicklingError.
FLAKY_DECODER = '''
import os
import pickle

from ichscan.dicom import decode_many as real_decode_many


class Unpicklable(BaseException):
    def __reduce__(self):
        raise pickle.PicklingError("Can't pickle Unpicklable: import of module 'pyo3_runtime' failed")


def decode_many(paths, *args):
    if any(os.path.basename(p).startswith("bad") for p in paths):
        raise Unpicklable("panicked")
    return real_decode_many(paths, *args)
'''


@pytest.fixture
def flaky_decoder(tmp_path, monkeypatch, many_ct):
    """The pool's decoder fails, unpicklably, on chunks holding a file named bad*."""
    import importlib

    import ichscan.pipeline.decode as engine

    module_dir = tmp_path / "flaky_module"
    module_dir.mkdir()
    (module_dir / "ichscan_flaky_decoder.py").write_text(FLAKY_DECODER)
    monkeypatch.syspath_prepend(str(module_dir))  # worker processes get this sys.path too
    flaky = importlib.import_module("ichscan_flaky_decoder")
    monkeypatch.setattr(engine, "decode_many", flaky.decode_many)
    bad = str(Path(many_ct[0]).with_name("bad.dcm"))
    shutil.copy(CT_SMALL, bad)
    yield many_ct[:9] + [bad], bad
    os.unlink(bad)
    sys.modules.pop("ichscan_flaky_decoder", None)


@pytest.mark.parametrize("workers", [2, 0])
def test_a_failed_chunk_is_retried_file_by_file(flaky_decoder, workers):
    paths, bad = flaky_decoder
    out = decode_all(paths, workers=workers, chunk_size=4)
    check_one_row_each(out, paths, bad, "decoding failed: ")
    if workers:
        assert "PicklingError" in [d for d in out if d.path == bad][0].error


@pytest.mark.parametrize("workers", [2, 0])
def test_a_failed_chunk_is_retried_file_by_file_in_the_streaming_pool(flaky_decoder, workers):
    paths, bad = flaky_decoder
    check_one_row_each(stream_all(paths, workers=workers, chunk_size=4), paths, bad, "decoding failed: ")


class _PoolThatCannotStart:
    """A ProcessPoolExecutor whose first worker cannot start (the forkserver is gone)."""

    def __init__(self, *args, **kwargs):
        pass

    def submit(self, fn, *args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    def shutdown(self, wait=True, *, cancel_futures=False):
        pass


def _no_executor(*args, **kwargs):
    raise OSError(24, "Too many open files")


@pytest.mark.parametrize(
    ("executor", "reason"),
    [(_no_executor, "Too many open files"), (_PoolThatCannotStart, "ConnectionRefusedError")],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_workers_that_cannot_start_are_one_clear_error(monkeypatch, executor, reason, streaming):
    import concurrent.futures

    from ichscan.pipeline.decode import DecodeWorkerStartError

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", executor)
    with pytest.raises(DecodeWorkerStartError) as caught:
        if streaming:
            with DecodePool(workers=2) as pool:
                pool.submit([str(CT_SMALL)])
        else:
            with DecodePool(workers=2) as pool:
                list(pool.decode([str(CT_SMALL)]))
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)  # what the commands turn into a one-line error
    assert message.startswith("cannot start decode worker processes: ") and reason in message
    assert message.endswith("(try --workers 0)") and "\n" not in message


def test_batch_says_why_workers_cannot_start(monkeypatch, tmp_path):
    import concurrent.futures

    from click.testing import CliRunner

    from ichscan.cli import cli

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(CT_SMALL, folder / "a.dcm")
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _PoolThatCannotStart)
    args = ["batch", str(folder), "--out", str(tmp_path / "r.csv"), "--workers", "2", "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--overlays-for", "none", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a click error, not a traceback
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: cannot start decode worker processes: ConnectionRefusedError: [Errno 111] Connection refused "
        "(try --workers 0)"
    ], result.output
