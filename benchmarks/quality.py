"""Cross-style detection quality (a benchmark, not a test).

Trains each model on phantoms of some looks and evaluates it on phantoms of others, so the
table says how well a model holds up on data it was not tuned to:

1. ``ichscan synth --layout rsna`` writes a training set split evenly over
   ``--train-styles`` and one test set per style of ``--test-styles`` (other seeds, so other
   heads and bleeds), all volumetric by default (one 3-D head per series, bleeds spanning
   neighbouring slices and fading at their ends);
2. ``ichscan train`` trains every model of ``--models`` with its own defaults (epochs,
   learning rate, batch size; ``--epochs`` overrides), 80/10/10 patient split;
3. ``ichscan evaluate`` measures each best checkpoint on each whole test set: AUC per
   label, study-level AUC (a study is positive when any slice is; its probability is the
   series head's where the model has one, else the highest slice p_any) and the RSNA
   weighted log loss.

It prints a markdown table (and writes it, with every metrics.json, under ``--out``).
The defaults take about 45 minutes on a 2-core machine (docs/benchmarks.md).

    python benchmarks/quality.py                                     # the documented defaults
    python benchmarks/quality.py --train-slices 400 --test-slices 200 --size 96 --epochs 1  # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from ichscan.labels import LABELS

DEFAULT_MODELS = ("simplecnn", "ichnet-2d", "ichnet", "ichnet-series")


def make_set(folder: Path, slices: int, per_study: int, size: int | None, seed: int, styles: list[str], volumetric: bool) -> Path:
    """An RSNA-layout set of about ``slices`` slices split evenly over ``styles`` (one
    sub-folder each, their labels concatenated into ``labels.csv``); kept for a rerun with
    the same settings (the folder name says which)."""
    from ichscan.synth import generate

    labels = folder / "labels.csv"
    if labels.exists():
        return labels
    studies = max(len(styles), -(-slices // per_study))
    start = time.monotonic()
    rows: list[list[str]] = []
    positive = total = 0
    for i, style in enumerate(styles):
        share = studies // len(styles) + (1 if i < studies % len(styles) else 0)
        part = folder / style
        records = generate(
            part, studies=share, slices=per_study, seed=seed * 100 + i, layout="rsna", size=size,
            positive_fraction=0.5, style=style, volumetric=volumetric,
        )
        positive += sum(bool(r.labels["any"]) for r in records)
        total += len(records)
        with open(part / "stage_2_train.csv", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            rows.extend(reader)
    with open(labels, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    print(f"# {folder.name}: {total} slices ({positive} positive) in {time.monotonic() - start:.0f} s", flush=True)
    return labels


def train(model: str, train_dir: Path, out: Path, epochs: int | None, device: str) -> tuple[Path, dict]:
    from ichscan.train.loop import TrainOptions, run_training

    run = out / f"run-{model}"
    start = time.monotonic()
    options = dict(data_dir=train_dir, labels=train_dir / "labels.csv", out_dir=run, model_name=model, device=device, progress=False)
    if epochs is not None:
        options["epochs"] = epochs
    summary = run_training(TrainOptions(**options))
    seconds = [row["seconds"] for row in summary["history"]]
    timing = {
        "train_seconds": time.monotonic() - start,
        "epochs": len(seconds),
        # Epoch 1 also decodes and caches every slice; the later ones are the steady state.
        "epoch_seconds": (sum(seconds[1:]) / len(seconds[1:])) if len(seconds) > 1 else seconds[0],
    }
    return run / "best.pt", timing


def evaluate(model: str, weights: Path, test_dir: Path, out: Path, device: str) -> dict:
    from ichscan.train.evaluate import EvaluateOptions, run_evaluation

    return run_evaluation(
        EvaluateOptions(data_dir=test_dir, labels=test_dir / "labels.csv", out_dir=out / f"eval-{model}-{test_dir.name}", weights=weights, device=device)
    )


def table(results: dict[tuple[str, str], dict], timings: dict[str, dict], train_styles: str, mode: str) -> str:
    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    head = ["model", "test style", *(f"AUC {label}" for label in LABELS), "study AUC", "weighted log loss", "train time (s per epoch)"]
    lines = [
        f"trained on {train_styles} ({mode}); test sets of other seeds, one per style",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for (model, test_style), m in results.items():
        per_label = m.get("per_label", {})
        study = (m.get("study") or {}).get("auc")
        timing = timings[model]
        lines.append(
            "| "
            + " | ".join(
                [
                    model,
                    test_style,
                    *(cell(per_label.get(label, {}).get("auc")) for label in LABELS),
                    cell(study),
                    cell(m.get("weighted_log_loss")),
                    f"{timing['train_seconds'] / 60:.1f} min ({timing['epoch_seconds']:.0f})",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated registered models")
    parser.add_argument("--train-styles", default="default,sharp-large", help="ichscan synth styles of the training set (comma-separated; split evenly)")
    parser.add_argument("--test-styles", default="small-faint,default", help="one test set per style (comma-separated)")
    parser.add_argument("--train-slices", type=int, default=1000)
    parser.add_argument("--test-slices", type=int, default=300, help="slices per test set")
    parser.add_argument("--slices-per-study", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="phantom side in pixels (default: the generator's, 400-640 per study)")
    parser.add_argument("--slices-mode", action="store_true", help="independent slices instead of volumetric series")
    parser.add_argument("--epochs", type=int, default=None, help="override every model's default epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path(".bench/quality"))
    args = parser.parse_args(argv)
    volumetric = not args.slices_mode
    mode = "slices" if args.slices_mode else "volumetric"
    train_styles = [s.strip() for s in args.train_styles.split(",") if s.strip()]
    test_styles = [s.strip() for s in args.test_styles.split(",") if s.strip()]
    data = args.out / "data"
    size = args.size or "natural"
    train_dir = data / f"train-{'+'.join(train_styles)}-{mode}-{args.train_slices}-{size}"
    make_set(train_dir, args.train_slices, args.slices_per_study, args.size, 1, train_styles, volumetric)
    test_dirs = {}
    for i, style in enumerate(test_styles):
        test_dirs[style] = data / f"test-{style}-{mode}-{args.test_slices}-{size}"
        make_set(test_dirs[style], args.test_slices, args.slices_per_study, args.size, 2 + i, [style], volumetric)
    results: dict[tuple[str, str], dict] = {}
    timings: dict[str, dict] = {}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        print(f"# {model}: training on {train_dir.name}", flush=True)
        weights, timings[model] = train(model, train_dir, args.out, args.epochs, args.device)
        for style, test_dir in test_dirs.items():
            label = style if style not in train_styles else f"{style} (trained on)"
            results[(model, label)] = evaluate(model, weights, test_dir, args.out, args.device)
            auc = results[(model, label)]["per_label"]["any"]["auc"]
            print(f"# {model} on {test_dir.name}: AUC any {auc}", flush=True)
    text = table(results, timings, "+".join(train_styles), mode)
    print(text)
    (args.out / "quality.md").write_text(text + "\n")
    serialisable = {f"{model} | {style}": {**m, **timings[model]} for (model, style), m in results.items()}
    (args.out / "quality.json").write_text(json.dumps(serialisable, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
