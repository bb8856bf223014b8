"""Study-level evaluation: slices grouped by StudyInstanceUID, the same probability as batch's studies CSV."""

import csv
import json

import pytest
from click.testing import CliRunner

from ichscan.cli import cli
from ichscan.models import BUNDLED_WEIGHTS
from ichscan.pipeline import BatchOptions, run_batch
from ichscan.synth import generate
from ichscan.train.evaluate import EvaluateOptions, run_evaluation
from ichscan.train.metrics import STUDY_FROM_MAX_SLICE, STUDY_FROM_MODEL, study_metrics, study_outcomes


def test_study_outcomes_take_the_highest_slice_and_any_positive_slice():
    keys = ["1.1", "1.1", "1.1", "1.2", "1.2", "1.3", "1.3"]
    targets = [0, 1, 0, 0, 0, 1, 1]
    probabilities = [0.2, 0.9, 0.4, 0.1, 0.3, 0.05, 0.2]
    outcomes = study_outcomes(keys, targets, probabilities)
    assert [(o.study_instance_uid, o.slices, o.positive, o.probability) for o in outcomes] == [
        ("1.1", 3, True, 0.9),
        ("1.2", 2, False, 0.3),
        ("1.3", 2, True, 0.2),
    ]
    metrics = study_metrics(outcomes)
    # Positives 0.9 and 0.2 against the negative 0.3: one pair of two ranked right.
    assert metrics == {"auc": 0.5, "n_studies": 3, "n_positive": 2, "probability": STUDY_FROM_MAX_SLICE, "reason": None}


def test_a_model_study_probability_replaces_the_maximum():
    outcomes = study_outcomes(["1.1", "1.2", "1.3"], [1, 0, 1], [0.9, 0.3, 0.2], study_probabilities={"1.3": 0.8})
    assert [o.probability for o in outcomes] == [0.9, 0.3, 0.8]
    assert outcomes[2].source == STUDY_FROM_MODEL and outcomes[0].source == STUDY_FROM_MAX_SLICE
    metrics = study_metrics(outcomes)
    assert metrics["auc"] == 1.0 and metrics["probability"] == f"{STUDY_FROM_MAX_SLICE} and {STUDY_FROM_MODEL}"


@pytest.mark.parametrize(
    "targets, reason",
    [([0, 0, 0], "all 2 studies are negative"), ([1, 0, 1], "all 2 studies are positive"), ([], "no studies")],
)
def test_undefined_study_auc_is_null_with_a_reason(targets, reason):
    keys = ["1.1", "1.1", "1.2"][: len(targets)]
    metrics = study_metrics(study_outcomes(keys, targets, [0.5] * len(targets)))
    assert metrics["auc"] is None and metrics["reason"].startswith(reason)
    assert metrics["n_studies"] == len(set(keys))
    json.dumps(metrics)  # writable as metrics.json


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two studies with bleeds and two without, RSNA layout, one labels CSV."""
    root = tmp_path_factory.mktemp("mixed")
    records = generate(root / "a", studies=2, slices=4, seed=11, layout="rsna", size=128)
    records += generate(root / "b", studies=2, slices=4, seed=12, layout="rsna", size=128, positive_fraction=0.0)
    labels = root / "labels.csv"
    rows = [(root / part / "stage_2_train.csv").read_text().splitlines() for part in ("a", "b")]
    labels.write_text("\n".join(rows[0] + rows[1][1:]) + "\n")
    return root, labels, records


def test_evaluate_reports_studies_and_batch_gives_the_same_study_probability(mixed, tmp_path):
    root, labels, records = mixed
    metrics = run_evaluation(EvaluateOptions(root, labels, tmp_path / "eval", workers=0))
    truth: dict[str, bool] = {}
    for record in records:
        truth[record.study_instance_uid] = truth.get(record.study_instance_uid, False) or bool(record.labels["any"])
    assert sum(truth.values()) == 2  # what the fixture promises
    study = metrics["study"]
    assert study["n_studies"] == 4 and study["n_positive"] == 2
    assert study["probability"] == STUDY_FROM_MAX_SLICE
    assert study["auc"] is not None and 0.0 <= study["auc"] <= 1.0 and study["reason"] is None

    with open(tmp_path / "eval" / "studies.csv") as fh:
        evaluated = {row["study_instance_uid"]: row for row in csv.DictReader(fh)}
    assert {uid: bool(int(row["true_any"])) for uid, row in evaluated.items()} == truth
    # Each study's probability is the highest p_any among its slices in predictions.csv.
    with open(tmp_path / "eval" / "predictions.csv") as fh:
        p_any = {row["image_id"]: float(row["p_any"]) for row in csv.DictReader(fh)}
    for uid, row in evaluated.items():
        slices = [p_any[r.image_id] for r in records if r.study_instance_uid == uid]
        assert int(row["slices"]) == len(slices)
        assert float(row["p_any"]) == pytest.approx(max(slices), abs=1e-6)

    # batch on the same files with the same (bundled) weights: the studies CSV's p_any.
    out = tmp_path / "batch" / "results.csv"
    run_batch(BatchOptions(input_dir=root, out=out, workers=0, progress=False, overlays_for="none", weights=BUNDLED_WEIGHTS))
    with open(out.with_name("results_studies.csv")) as fh:
        batched = {row["study_instance_uid"]: float(row["p_any"]) for row in csv.DictReader(fh)}
    assert set(batched) == set(evaluated)
    for uid, row in evaluated.items():
        assert batched[uid] == pytest.approx(float(row["p_any"]), abs=1e-5)


def test_evaluate_of_negative_studies_only_gives_a_null_auc(mixed, tmp_path):
    root, _, _ = mixed
    result = CliRunner().invoke(
        cli, ["evaluate", str(root / "b"), "--labels", str(root / "b" / "stage_2_train.csv"), "--out", str(tmp_path / "eval"), "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    study = json.loads((tmp_path / "eval" / "metrics.json").read_text())["study"]
    assert study["auc"] is None and study["n_studies"] == 2 and study["n_positive"] == 0
    assert "all 2 studies are negative" in study["reason"]
    assert "AUC n/a (all 2 studies are negative" in result.output
    assert "studies: 2 (0 positive)" in (tmp_path / "eval" / "report.txt").read_text()
