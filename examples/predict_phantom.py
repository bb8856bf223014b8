"""Screen one generated phantom slice with the Python API.

    python examples/predict_phantom.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ichscan import predict_image
from ichscan.synth import generate


def main(out_dir: str | None = None) -> None:
    folder = Path(out_dir or tempfile.mkdtemp(prefix="ichscan-example-"))
    records = generate(folder, studies=1, slices=4, seed=3)
    record = next((r for r in records if r.labels["any"]), records[0])
    predictions, probabilities, image = predict_image(record.path)
    truth = [label for label, value in record.labels.items() if value]
    print(f"file:          {record.path}")
    print(f"true labels:   {', '.join(truth) or 'none'}")
    print(f"predicted:     {', '.join(predictions) or 'none'}")
    print("probabilities: " + ", ".join(f"{k} {v:.3f}" for k, v in probabilities.items()))
    print(f"image:         {image.shape[1]}x{image.shape[0]} {image.dtype} (brain window)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
