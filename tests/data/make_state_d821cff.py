"""Write ``state_d821cff.sqlite``: a state file as the release at commit d821cff left it.

Run with that release's state code beside this script (it is gone from the tree since)::

    git show d821cff:ichscan/ledger.py > ledger_d821cff.py
    git show d821cff:ichscan/outbox.py | sed 's/from ichscan.ledger import/from ledger_d821cff import/' > outbox_d821cff.py
    python make_state_d821cff.py state_d821cff.sqlite

What it holds (``tests/test_state_store.py`` checks each after the migration): a watch run
with DICOM results on one study 1.2.3 (files /legacy/a.dcm ok positive, /legacy/b.dcm ok,
/legacy/c.txt error, /legacy/d.dcm still queued), the study summarised, one SR recorded with
a pending delivery to PACS@127.0.0.1:104, the unfinished study 7.7, and instance 1.2.3.3
(/legacy/e.dcm) that only the outbox knew (a batch run on the same state file).
"""

import sqlite3
import sys
import tempfile
from pathlib import Path

from ledger_d821cff import FileIdentity, Ledger
from outbox_d821cff import Destination, ModelInfo, Outbox, _NewObject, _tmp_name

from ichscan.default_plugins.csv_report import result_row
from ichscan.labels import LABELS
from ichscan.reporting import SliceResult


def result(path: str, sop: str, p_any: float) -> SliceResult:
    probs = {label: 0.1 for label in LABELS}
    probs["subdural"] = probs["any"] = p_any
    positive = {label: probs[label] >= 0.5 for label in LABELS}
    return SliceResult(
        path=path, status="ok", sop_instance_uid=sop, study_instance_uid="1.2.3", series_instance_uid="1.2.3.4",
        instance_number=1, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", probabilities=probs, positive=positive,
        top_label="subdural" if positive["any"] else "none", top_probability=p_any,
    )  # fmt: skip


def main(target: Path) -> None:
    target.unlink(missing_ok=True)
    screened = [result("/legacy/a.dcm", "1.2.3.1", 0.9), result("/legacy/b.dcm", "1.2.3.2", 0.2)]
    error = SliceResult("/legacy/c.txt", "error", "not a DICOM file")
    ledger = Ledger(target)
    ids = ledger.queue([FileIdentity(r.path, 100, 1000) for r in [*screened, error]])
    ledger.record((ids[r.path], r, result_row(r)) for r in [*screened, error])
    ledger.queue([FileIdentity("/legacy/d.dcm", 5, 6)])
    ledger.mark_summarised(["1.2.3"])
    with tempfile.TemporaryDirectory() as folder:
        model = ModelInfo("simplecnn", "demo", True, {label: 0.5 for label in LABELS})
        outbox = Outbox(target, Path(folder), [Destination.parse("PACS@127.0.0.1:104")], model)
        outbox.record_results([*screened, result("/legacy/e.dcm", "1.2.3.3", 0.4)])
        sr = Path(folder) / "1.2.3" / "1.2.3.99.dcm"
        sr.parent.mkdir()
        _tmp_name(sr).write_bytes(b"stand-in for the SR file")
        outbox._commit([_NewObject("1.2.3.99", "1.2.3", "sr", 1, "1.2.3.98", "1.2.840.10008.5.1.4.1.1.88.33", "key", sr)])
        outbox.close()
    ledger.close()
    db = sqlite3.connect(target)
    # A study whose objects failed (complete_studies keeps it until they succeed).
    db.execute("INSERT INTO studies_to_complete VALUES ('7.7', 41.0)")
    db.commit()
    db.execute("VACUUM")
    db.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
