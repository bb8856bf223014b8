"""The campaign's table (docs/robustness.md) from the scenarios' figures.

    python benchmarks/faults/report.py [RESULTS_DIR]

Reads every .bench/faults/results/*.json that a scenario script wrote and prints one
Markdown row per scenario: instances sent (Success seen by the sender, or copied in whole),
stored, screened, result rows, duplicate rows, lost, temporary files left in the store.
Exits 1 when any scenario lost or duplicated an instance.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

RESULTS = Path(os.environ.get("ICHSCAN_FAULTS_RESULTS", Path(__file__).resolve().parents[2] / ".bench" / "faults" / "results"))
COLUMNS = ("sent", "stored", "screened", "rows", "duplicates", "lost", "temporary_files_left")
#: The table's order (the campaign's, as docs/robustness.md describes it); others follow by name.
ORDER = (
    "kill-scp", "kill-watch", "outbox-sigkill", "orthanc-down",
    "disk-full-store", "disk-full-csv", "disk-full-outputs", "eio-fsync", "eio-fsync-state",
    "associations-50", "slow-loris", "pdu-4gb", "disconnect-mid-dataset",
)  # fmt: skip


def cell(value) -> str:
    if isinstance(value, list):  # some scenarios list the temporary files they found
        value = len(value)
    return "–" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def figure(result: dict, column: str):
    if column == "temporary_files_left" and result.get(column) is None:
        return result.get("temporary_files")  # disk.py's own count of the same thing
    return result.get(column)


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    results = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    results.sort(key=lambda r: (ORDER.index(r["scenario"]) if r["scenario"] in ORDER else len(ORDER), r["scenario"]))
    print("| scenario | date | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    bad = 0
    for r in results:
        print(f"| {r['scenario']} | {r.get('date', '')} | " + " | ".join(cell(figure(r, c)) for c in COLUMNS) + " |")
        bad += bool(r.get("lost") or r.get("duplicates"))
    if bad:
        print(f"{bad} scenario(s) lost or duplicated instances", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
