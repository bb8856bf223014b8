"""The campaign's table (docs/robustness.md) from the scenarios' figures.

    python benchmarks/faults/report.py [RESULTS_DIR]

Reads every .bench/faults/results/*.json that a scenario script wrote and prints one
Markdown row per scenario: instances sent (Success seen by the sender, or copied in whole),
stored, screened, result rows, duplicate rows, lost, temporary files left in the store.
Exits 1 when any scenario lost or duplicated an instance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / ".bench" / "faults" / "results"
COLUMNS = ("sent", "stored", "screened", "rows", "duplicates", "lost", "temporary_files_left")


def cell(value) -> str:
    return "–" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    print("| scenario | date | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    bad = 0
    for r in results:
        print(f"| {r['scenario']} | {r.get('date', '')} | " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |")
        bad += bool(r.get("lost") or r.get("duplicates"))
    if bad:
        print(f"{bad} scenario(s) lost or duplicated instances", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
