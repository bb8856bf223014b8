"""The fault campaign's accounting (benchmarks/faults/common.py) finds what it claims to count.

The campaign's table says "0 lost, 0 duplicates"; that is only worth something if the
counting would have seen a lost instance, a duplicate row and a half-stored one.
"""

import csv
import sys
from pathlib import Path

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks" / "faults"))

from common import Phantom, account, split_by_study  # noqa: E402

from ichscan.rows import RESULT_COLUMNS  # noqa: E402


def write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def test_account_counts_lost_duplicated_unstored_and_failed_instances(tmp_path):
    items = [Phantom(tmp_path / "in" / f"{i}.dcm", f"1.2.3.{i}", "1.2.3") for i in range(6)]
    acked = {str(items[i].path): 0.0 for i in range(5)}  # item 5 never got Success
    store = tmp_path / "store" / "1.2.3" / "1.2.3.9"
    store.mkdir(parents=True)
    for i in (0, 1, 2, 3):  # item 4 is not in the store
        (store / f"1.2.3.{i}.dcm").write_bytes(b"x")
    (store / ".1.2.3.4.dcm.tmp").write_bytes(b"x")  # a temporary file does not count
    out = tmp_path / "results.csv"
    write_rows(
        out,
        [
            {"sop_instance_uid": "1.2.3.0", "status": "ok"},
            {"sop_instance_uid": "1.2.3.1", "status": "ok"},
            {"sop_instance_uid": "1.2.3.1", "status": "ok"},  # a duplicate
            {"sop_instance_uid": "1.2.3.2", "status": "error"},  # a row, but not screened
            {"sop_instance_uid": "1.2.3.5", "status": "ok"},  # not sent: another row
            # 1.2.3.3 and 1.2.3.4 have no row: lost
        ],
    )
    figures = account("unit", acked, items, out, tmp_path / "store", extra_figure=7)
    assert {k: figures[k] for k in ("sent", "stored", "screened", "rows", "duplicates", "lost", "other_rows", "temporary_files_left")} == {
        "sent": 5,
        "stored": 4,
        "screened": 2,
        "rows": 4,
        "duplicates": 1,
        "lost": 2,
        "other_rows": 1,
        "temporary_files_left": 1,
    }
    assert figures["statuses"] == {"ok": 4, "error": 1}
    assert figures["extra_figure"] == 7


def test_split_by_study_keeps_a_study_with_one_sender():
    items = [Phantom(Path(f"{s}-{i}"), f"{s}.{i}", f"9.{s}") for s in range(5) for i in range(3)]
    shares = split_by_study(items, 2)
    assert sorted(p.sop_instance_uid for share in shares for p in share) == sorted(p.sop_instance_uid for p in items)
    for share in shares:
        studies = {p.study_instance_uid for p in share}
        assert all(p.study_instance_uid in studies for p in items if p in share)
        other = [p for s in shares if s is not share for p in s]
        assert not studies & {p.study_instance_uid for p in other}
    assert [len(s) for s in shares] == [9, 6]
