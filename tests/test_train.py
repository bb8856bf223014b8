"""Training and evaluation on RSNA-layout phantoms."""

import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import ICHSCAN, ROOT
from ichscan.cli import cli
from ichscan.dicom import decode_many
from ichscan.labels import LABELS
from ichscan.plugins import get_plugin_manager
from ichscan.preprocess import PreprocessSettings
from ichscan.synth import generate
from ichscan.train.dataset import LabelsError, RSNADataset, read_rsna_labels
from ichscan.train.loop import lr_factor
from ichscan.train.metrics import weighted_log_loss
from ichscan.train.sampler import BalancedSampler
from ichscan.train.split import split_by_patient



def write(path, text):
    path.write_text(text)
    return path


def rows_for(image, values):
    return "".join(f"{image}_{label},{v}\n" for label, v in zip(LABELS, values))


# --- labels CSV ---------------------------------------------------------------------------


def test_labels_parse_and_collapse_duplicates(tmp_path):
    text = "ID,Label\n" + rows_for("ID_a1", [0, 1, 0, 0, 0, 1]) + rows_for("ID_b2", [0] * 6) + "ID_a1_any,1\n"
    labels = read_rsna_labels(write(tmp_path / "l.csv", text))
    assert set(labels) == {"ID_a1", "ID_b2"}
    assert labels["ID_a1"].tolist() == [0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize(
    "text, message",
    [
        ("Image,Value\nID_a_any,1\n", "expected the header"),
        ("ID,Label\nID_a_any,1,2\n", ":2: expected 2 columns"),
        ("ID,Label\nID_a_bleed,1\n", "known label"),
        ("ID,Label\nnoprefix_any,1\n", "known label"),
        ("ID,Label\nID_a_any,2\n", "is not 0 or 1"),
        ("ID,Label\n" + rows_for("ID_a", [0] * 6) + "ID_a_any,1\n", "given as both 0 and 1"),
        ("ID,Label\nID_a_any,1\n", "has no row for epidural"),
        ("ID,Label\n", "no labels"),
        ("ID,Label\n\"ID_a_" + "x" * 200_000 + "\",1\n", ":2: not a CSV file: field larger than field limit"),
        ("ID,Label\n\"ID_a\nb_any\",2\n", ":3: label value '2'"),  # the line a quoted cell ends on
    ],
)
def test_labels_errors_name_the_problem(tmp_path, text, message):
    with pytest.raises(LabelsError, match=message):
        read_rsna_labels(write(tmp_path / "l.csv", text))


# --- split, sampler, schedule, metric -----------------------------------------------------


def test_split_by_patient_no_leakage_and_reproducible():
    rng = np.random.default_rng(0)
    images = {f"ID_{i:05d}": f"patient:{rng.integers(0, 300)}" for i in range(5000)}
    a = split_by_patient(images, seed=3)
    assert a == split_by_patient(images, seed=3)
    assert a != split_by_patient(images, seed=4)
    splits_of_patient = {}
    for image, split in a.items():
        splits_of_patient.setdefault(images[image], set()).add(split)
    assert all(len(s) == 1 for s in splits_of_patient.values())
    counts = {s: sum(v == s for v in a.values()) / len(a) for s in ("train", "validation", "test")}
    assert counts["train"] == pytest.approx(0.8, abs=0.02)
    assert counts["validation"] == pytest.approx(0.1, abs=0.02)
    assert counts["test"] == pytest.approx(0.1, abs=0.02)


def test_balanced_sampler_draws_each_group_equally():
    targets = np.zeros((1000, 6), np.float32)
    targets[0, [0, 5]] = 1  # one epidural
    targets[1:50, [1, 5]] = 1
    targets[50:60, [2, 5]] = 1
    targets[60:300, [3, 5]] = 1
    targets[300:400, [4, 5]] = 1
    sampler = BalancedSampler(targets, num_samples=60000, seed=1)
    drawn = targets[np.array(list(iter(sampler)))]
    negatives = (drawn[:, 5] == 0).mean()
    for j in range(5):
        assert drawn[:, j].mean() == pytest.approx(1 / 6, abs=0.01)
    assert negatives == pytest.approx(1 / 6, abs=0.01)
    sampler.set_epoch(1)
    assert list(iter(sampler))[:50] != list(iter(BalancedSampler(targets, num_samples=60000, seed=1)))[:50]
    full = list(iter(sampler))
    sampler.set_epoch(1, skip=100)
    assert list(iter(sampler)) == full[100:] and len(sampler) == 59900


def test_lr_schedule_warms_up_then_decays():
    total, warmup = 100, 10
    factors = [lr_factor(s, total, warmup) for s in range(total + 1)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[warmup] == pytest.approx(1.0)
    assert factors[total] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :]))


def test_weighted_log_loss_matches_hand_computation():
    y = np.array([[1, 0, 0, 0, 0, 1]], np.float32)
    p = np.array([[0.9, 0.1, 0.2, 0.3, 0.4, 0.8]])
    by_hand = (
        -math.log(0.9) - math.log(0.9) - math.log(0.8) - math.log(0.7) - math.log(0.6) - 2 * math.log(0.8)
    ) / 7
    assert weighted_log_loss(y, p) == pytest.approx(by_hand, rel=1e-9)
    # Clipping at 1e-7: a confident miss costs -ln(1e-7), not infinity.
    y2 = np.array([[0, 0, 0, 0, 0, 1]], np.float32)
    p2 = np.array([[0, 0, 0, 0, 0, 0.0]])
    assert weighted_log_loss(y2, p2) == pytest.approx((2 * -math.log(1e-7) + 5 * -math.log(1 - 1e-7)) / 7)
    # Mean over images.
    assert weighted_log_loss(np.vstack([y, y2]), np.vstack([p, p2])) == pytest.approx((by_hand + weighted_log_loss(y2, p2)) / 2)


# --- dataset, cache, consistency with inference -------------------------------------------


@pytest.fixture(scope="module")
def rsna(make_phantoms):
    return make_phantoms("rsna", studies=10, slices=6, seed=21, layout="rsna", size=128)[0]


def test_dataset_equals_inference_path(rsna):
    """The training dataset and `ichscan batch` on the CPU give equal tensors for a file."""
    pm = get_plugin_manager()
    dataset = RSNADataset(rsna, rsna / "stage_2_train.csv")
    settings = PreprocessSettings()
    for index in (0, 7):
        item = dataset.items[index]
        [decoded] = decode_many([str(item.path)], resize_to=settings.size)
        batch_input = pm.hook.ichscan_preprocess(
            pixels=[decoded.pixels], slopes=[decoded.slope], intercepts=[decoded.intercept], settings=settings, device=torch.device("cpu"), channels_last=True, context=0
        )[0]
        x, target, image_id = dataset[index]
        assert image_id == item.image_id
        assert torch.equal(x, batch_input)
        assert target.tolist() == read_rsna_labels(rsna / "stage_2_train.csv")[image_id].tolist()


def test_cache_second_epoch_decodes_no_dicom(rsna, tmp_path):
    dataset = RSNADataset(rsna, rsna / "stage_2_train.csv", cache_dir=tmp_path / "cache")
    plain = RSNADataset(rsna, rsna / "stage_2_train.csv")
    first = [dataset[i][0] for i in range(len(dataset))]
    assert dataset.decodes == len(dataset) == 60
    second = [dataset[i][0] for i in range(len(dataset))]
    assert dataset.decodes == 60  # nothing decoded again
    for a, b, i in zip(first, second, range(len(dataset))):
        assert torch.equal(a, b)
        assert (a - plain[i][0]).abs().max() <= 0.5 / 255 + 1e-6  # uint8 cache
    # A new dataset over the same cache files decodes nothing either.
    again = RSNADataset(rsna, rsna / "stage_2_train.csv", cache_dir=tmp_path / "cache")
    _ = [again[i] for i in range(len(again))]
    assert again.decodes == 0


def test_missing_and_unreadable_images_are_left_out(rsna, tmp_path):
    labels = read_rsna_labels(rsna / "stage_2_train.csv")
    labels["ID_000000000000"] = np.zeros(6, np.float32)  # no file
    dataset = RSNADataset(rsna, labels)
    assert len(dataset) == 60
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ID_ffffffffffff.dcm").write_bytes(b"not dicom")
    only = RSNADataset(broken, {"ID_ffffffffffff": np.zeros(6, np.float32)})
    assert "not a DICOM file" in only.safe_item(0)


# --- the commands end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(rsna, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(
        cli,
        ["train", str(rsna), "--labels", str(rsna / "stage_2_train.csv"), "--out", str(run), "--epochs", "2", "--workers", "0", "--batch-size", "16", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    return run


@pytest.mark.slow
def test_train_writes_run_folder(trained):
    for name in ("split.csv", "best.pt", "last.pt", "history.csv", "loss_curve.png"):
        assert (trained / name).is_file(), name
    with open(trained / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    assert [h["epoch"] for h in history] == ["1", "2"]
    assert all(float(h["train_loss"]) > 0 and float(h["val_loss"]) > 0 for h in history)
    with open(trained / "split.csv") as fh:
        split = list(csv.DictReader(fh))
    assert len(split) == 60 and {r["split"] for r in split} == {"train", "validation", "test"}


@pytest.mark.slow
def test_evaluate_and_batch_agree_on_the_trained_checkpoint(trained, rsna, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["evaluate", str(rsna), "--labels", str(rsna / "stage_2_train.csv"), "--weights", str(trained / "best.pt"), "--out", str(tmp_path / "eval"),
         "--split-file", str(trained / "split.csv"), "--split", "test", "--workers", "0"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["trained"] is True and metrics["weighted_log_loss"] > 0
    assert set(metrics["per_label"]) == set(LABELS)
    assert {"auc", "accuracy", "precision", "recall", "f1", "support"} <= set(metrics["per_label"]["any"])
    for name in ("report.txt", "confusion_matrices.png", "roc_curves.png", "predictions.csv"):
        assert (tmp_path / "eval" / name).is_file()
    with open(tmp_path / "eval" / "predictions.csv") as fh:
        predictions = {r["image_id"]: r for r in csv.DictReader(fh)}
    with open(trained / "split.csv") as fh:
        test_ids = {r["image_id"] for r in csv.DictReader(fh) if r["split"] == "test"}
    assert set(predictions) == test_ids and metrics["images"] == len(test_ids)
    # The checkpoint goes straight into batch, and batch gives evaluate's numbers.
    result = CliRunner().invoke(
        cli, ["batch", str(rsna / "stage_2_train"), "--weights", str(trained / "best.pt"), "--out", str(tmp_path / "b.csv"), "--workers", "0", "--overlays-for", "none", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "UNTRAINED" not in result.output
    with open(tmp_path / "b.csv") as fh:
        batch_rows = {Path(r["path"]).stem: r for r in csv.DictReader(fh)}
    for image_id, row in predictions.items():
        for label in LABELS:
            assert float(batch_rows[image_id][f"p_{label}"]) == pytest.approx(float(row[f"p_{label}"]), abs=1e-5)


@pytest.mark.slow
def test_predict_command(trained, rsna, tmp_path):
    dcm = sorted((rsna / "stage_2_train").glob("*.dcm"))[0]
    result = CliRunner().invoke(cli, ["predict", str(dcm), "--weights", str(trained / "best.pt"), "--save", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "any" in result.output and (tmp_path / "p.png").stat().st_size > 1000
    result = CliRunner().invoke(cli, ["predict", str(trained / "split.csv")])
    assert result.exit_code == 1 and "not a DICOM file" in result.output
    # --device: the CPU on request; CUDA where there is none is a one-line error.
    on_cpu = CliRunner().invoke(cli, ["predict", str(dcm), "--weights", str(trained / "best.pt"), "--device", "cpu"])
    assert on_cpu.exit_code == 0 and f"{dcm}: " in on_cpu.output and "any" in on_cpu.output
    if not torch.cuda.is_available():
        no_gpu = CliRunner().invoke(cli, ["predict", str(dcm), "--device", "cuda"])
        assert no_gpu.exit_code == 1 and "no CUDA device" in no_gpu.output and "Traceback" not in no_gpu.output


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_finishes(rsna, tmp_path):
    run = tmp_path / "run"
    args = [str(ICHSCAN), "train", str(rsna), "--labels", str(rsna / "stage_2_train.csv"), "--out", str(run), "--epochs", "3", "--workers", "0", "--batch-size", "8", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run / "history.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "resume with --resume" in err and "Traceback" not in err
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] in (2, 3)
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(run / "history.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2", "3"]


def test_resume_without_checkpoint_is_a_clear_error(rsna, tmp_path):
    result = CliRunner().invoke(cli, ["train", str(rsna), "--labels", str(rsna / "stage_2_train.csv"), "--out", str(tmp_path), "--resume", "--workers", "0"])
    assert result.exit_code == 1 and "nothing to resume" in result.output


def test_youden_thresholds_separate_the_classes():
    from ichscan.train.metrics import youden_thresholds

    rng = np.random.default_rng(0)
    y = np.zeros((400, 6), np.float32)
    y[:100] = 1
    p = np.where(y > 0, 0.85, 0.65) + rng.normal(0, 0.02, y.shape)  # everything "positive" at 0.5
    thresholds = youden_thresholds(y, p)
    assert all(0.7 < t <= 0.85 for t in thresholds.values())
    y[:, 0] = 0  # a label without positives keeps the default
    assert youden_thresholds(y, p)["epidural"] == 0.5


@pytest.mark.slow
def test_bundled_demo_weights_reach_auc_on_unseen_phantoms(tmp_path):
    """The shipped weights: AUC >= 0.90 for `any` on phantoms of a seed never used in training."""
    from ichscan.models import BUNDLED_WEIGHTS
    from ichscan.train.evaluate import EvaluateOptions, run_evaluation

    assert BUNDLED_WEIGHTS.is_file()
    assert BUNDLED_WEIGHTS.stat().st_size <= 30 * 1024 * 1024
    data = tmp_path / "unseen"
    generate(data, studies=12, slices=20, seed=4242, layout="rsna")
    metrics = run_evaluation(EvaluateOptions(data, data / "stage_2_train.csv", tmp_path / "eval", workers=0))
    assert metrics["weights"] == str(BUNDLED_WEIGHTS)
    assert metrics["per_label"]["any"]["auc"] >= 0.90, metrics["per_label"]["any"]


@pytest.mark.slow
def test_demo_weights_script_runs_small(tmp_path):
    """examples/train_demo_weights.sh, shrunk: the documented steps produce a loadable half-precision checkpoint."""
    from ichscan.models import load_model

    root = ROOT
    env = {
        **__import__("os").environ,
        "STUDIES": "6",
        "SLICES": "5",
        "EVAL_STUDIES": "2",
        "EPOCHS": "1",
        "ICHSCAN": str(ICHSCAN),
        "PYTHON": sys.executable,
    }
    out = tmp_path / "w.pt"
    proc = subprocess.run(["bash", str(root / "examples" / "train_demo_weights.sh"), str(tmp_path / "work"), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "work" / "eval" / "metrics.json").is_file()
    payload = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())
    assert load_model(get_plugin_manager(), out).trained
