"""Cross-style detection quality (a benchmark, not a test).

Trains each model on phantoms of one look and evaluates it on phantoms of another, so the
table says how well a model holds up on data it was not tuned to:

1. ``ichscan synth --layout rsna`` writes a training set in ``--train-style`` and a test
   set in ``--test-style`` (different seeds, so different heads and bleeds), both
   volumetric by default (one 3-D head per series, bleeds spanning neighbouring slices);
2. ``ichscan train`` trains every model of ``--models`` with its own defaults (epochs,
   learning rate, batch size; ``--epochs`` overrides), 80/10/10 patient split;
3. ``ichscan evaluate`` measures each best checkpoint on the whole test set: AUC per
   label, study-level AUC (a study is positive when any slice is) and the RSNA weighted
   log loss.

It prints a markdown table (and writes it, with every metrics.json, under ``--out``).

    python benchmarks/quality.py                                     # the documented defaults
    python benchmarks/quality.py --train-slices 400 --test-slices 200 --size 96 --epochs 1  # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ichscan.labels import LABELS

DEFAULT_MODELS = ("simplecnn", "ichnet-2d", "ichnet")


def make_set(folder: Path, slices: int, per_study: int, size: int, seed: int, style: str, volumetric: bool) -> Path:
    from ichscan.synth import generate

    labels = folder / "stage_2_train.csv"
    if labels.exists():
        return labels  # made by an earlier run with the same settings (the folder name says which)
    studies = max(1, -(-slices // per_study))
    start = time.monotonic()
    records = generate(
        folder, studies=studies, slices=per_study, seed=seed, layout="rsna", size=size,
        positive_fraction=0.8, style=style, volumetric=volumetric,
    )
    positive = sum(bool(r.labels["any"]) for r in records)
    print(f"# {folder.name}: {len(records)} slices ({positive} positive) in {time.monotonic() - start:.0f} s", flush=True)
    return labels


def train_and_evaluate(model: str, train_dir: Path, test_dir: Path, out: Path, epochs: int | None, device: str) -> dict:
    from ichscan.train.evaluate import EvaluateOptions, run_evaluation
    from ichscan.train.loop import TrainOptions, run_training

    run = out / f"run-{model}"
    start = time.monotonic()
    options = dict(data_dir=train_dir, labels=train_dir / "stage_2_train.csv", out_dir=run, model_name=model, device=device, progress=False)
    if epochs is not None:
        options["epochs"] = epochs
    run_training(TrainOptions(**options))
    trained = time.monotonic() - start
    metrics = run_evaluation(
        EvaluateOptions(data_dir=test_dir, labels=test_dir / "stage_2_train.csv", out_dir=out / f"eval-{model}", weights=run / "best.pt", device=device)
    )
    metrics["train_seconds"] = trained
    return metrics


def table(results: dict[str, dict], train_style: str, test_style: str) -> str:
    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    head = ["model", *(f"AUC {label}" for label in LABELS), "study AUC", "weighted log loss", "train time"]
    lines = [
        f"trained on {train_style}, evaluated on {test_style}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for model, m in results.items():
        per_label = m.get("per_label", {})
        study = (m.get("study") or {}).get("auc")
        lines.append(
            "| "
            + " | ".join(
                [model, *(cell(per_label.get(label, {}).get("auc")) for label in LABELS), cell(study), cell(m.get("weighted_log_loss")), f"{m['train_seconds'] / 60:.1f} min"]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated registered models")
    parser.add_argument("--train-style", default="default", help="ichscan synth style of the training set")
    parser.add_argument("--test-style", default="small-faint", help="ichscan synth style of the test set")
    parser.add_argument("--train-slices", type=int, default=1200)
    parser.add_argument("--test-slices", type=int, default=400)
    parser.add_argument("--slices-per-study", type=int, default=20)
    parser.add_argument("--size", type=int, default=128, help="phantom side in pixels")
    parser.add_argument("--slices-mode", action="store_true", help="independent slices instead of volumetric series")
    parser.add_argument("--epochs", type=int, default=None, help="override every model's default epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path(".bench/quality"))
    args = parser.parse_args(argv)
    volumetric = not args.slices_mode
    mode = "slices" if args.slices_mode else "volumetric"
    data = args.out / "data"
    train_dir = data / f"train-{args.train_style}-{mode}-{args.train_slices}-{args.size}"
    test_dir = data / f"test-{args.test_style}-{mode}-{args.test_slices}-{args.size}"
    make_set(train_dir, args.train_slices, args.slices_per_study, args.size, 1, args.train_style, volumetric)
    make_set(test_dir, args.test_slices, args.slices_per_study, args.size, 2, args.test_style, volumetric)
    results: dict[str, dict] = {}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        print(f"# {model}: training on {train_dir.name}, evaluating on {test_dir.name}", flush=True)
        results[model] = train_and_evaluate(model, train_dir, test_dir, args.out, args.epochs, args.device)
    text = table(results, f"{args.train_style} ({mode})", f"{args.test_style} ({mode})")
    print(text)
    (args.out / "quality.md").write_text(text + "\n")
    (args.out / "quality.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
