"""Faults on the way back to PACS: the durable outbox of SR and key images under crashes and
an absent PACS.

Two scenarios, each with ``ichscan serve-scp --dicom-out DIR --forward ORTHANC@127.0.0.1:P``
forwarding to a real Orthanc, and dcmtk ``storescu`` senders (common.Sender) sending phantom
head CT studies to it:

* ``outbox-sigkill``: two senders send a study at a time, ``--pace`` s apart; while studies
  are screened and their results flow to Orthanc, serve-scp (with its decode workers) is
  SIGKILLed ``--kills`` times and restarted each time on the same port, store, CSV and state
  file. Each kill comes after a random wait (``--low``..``--high`` s, common.random_moments),
  then at the next moment the state file shows a delivery pending (at most ``--aim`` s
  more), plus 0-0.2 s: SR and key images made, some sent, some not. When every instance is
  in and screened it is stopped with SIGTERM (``--forward-wait`` lets the outbox drain).
* ``orthanc-down``: Orthanc is stopped for ``--down`` seconds while the studies are sent to
  serve-scp and screened (their results wait in the outbox), then started again on the same
  HTTP and DICOM ports. During the outage a C-ECHO and one more study are sent to serve-scp.

Both write the instance accounting of common.account() (sent/stored/screened/rows/duplicates/
lost) and the outbox's: the studies summarised, the objects ichscan made (the state file's
``result_objects``) and their deliveries (``deliveries``), the objects Orthanc holds (REST),
``objects_lost`` (made but not in Orthanc), ``objects_unknown`` (in Orthanc but not made),
``duplicates`` in Orthanc (more than one object of a kind for a study at the same revision,
the revision read from Orthanc's copy: InstanceNumber), and the re-sends: a Lua hook in Orthanc
(``ReceivedInstanceFilter``) logs every C-STORE it receives, stored or not, so an object
received twice (ichscan was killed after Orthanc's Success and before it marked the delivery
sent) shows as a re-send; Orthanc keeps one copy of a SOP Instance UID, so a re-send is not a
duplicate.

Run: ``python benchmarks/faults/outbox.py [--only outbox-sigkill|orthanc-down] [options]``
with ``PYTHONPATH`` set to the checkout; the defaults are issue 17's sizes (40 studies of 10
slices, 256 px, 20 kills; a 300 s outage with 20 studies). Figures go to
``.bench/faults/results/outbox-sigkill.json`` and ``orthanc-down.json``.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    WORK,
    Orthanc,
    Sender,
    ServerProcess,
    account,
    free_port,
    kill_tree,
    phantoms,
    random_moments,
    read_csv,
    save_result,
    split_by_study,
    wait_for,
)

ECHOSCU = Path("/usr/bin/echoscu")
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}

#: Orthanc calls this for every instance it receives, before it decides whether it is new.
RECEIVED_HOOK = """
function ReceivedInstanceFilter(dicom, origin, info)
  print('ICHSCAN-RECEIVED ' .. dicom.SOPInstanceUID)
  return true
end
"""
_RECEIVED = re.compile(r"Lua says: ICHSCAN-RECEIVED (\S+)")


def start_orthanc(work: Path, http_port: int | None = None, dicom_port: int | None = None) -> Orthanc:
    hook = work / "received.lua"
    work.mkdir(parents=True, exist_ok=True)
    hook.write_text(RECEIVED_HOOK)
    return Orthanc(work, http_port=http_port, dicom_port=dicom_port, extra={"LuaScripts": [str(hook)]})


def start_server(work: Path, port: int, orthanc: Orthanc, forward_wait: float) -> ServerProcess:
    return ServerProcess(
        work, port, "--dicom-out", str(work / "dicom-out"), "--forward", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        "--forward-wait", str(forward_wait),
    )


def query(state: Path, sql: str, params=()) -> list[tuple]:
    """Rows from the state file, read-only (serve-scp may be running: SQLite's WAL lets us read)."""
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def outbox_now(state: Path) -> dict:
    """Objects made and deliveries by state, at this moment."""
    if not state.exists():
        return {"objects": 0, "pending": 0, "sent": 0, "failed": 0}
    states = dict(query(state, "SELECT state, COUNT(*) FROM deliveries GROUP BY state"))
    objects = query(state, "SELECT COUNT(*) FROM result_objects")[0][0]
    return {"objects": objects, "pending": states.get("pending", 0), "sent": states.get("sent", 0), "failed": states.get("failed", 0)}


def outbox_figures(work: Path, orthanc: Orthanc, sent_studies: set[str]) -> dict:
    """What ichscan made and recorded, what Orthanc holds and received (see the module docstring)."""
    state = work / "ichscan-state.sqlite"
    study_rows = read_csv(work / "results_studies.csv", missing_ok=True)
    made = {uid: (study, kind, rev) for uid, study, kind, rev in query(state, "SELECT sop_instance_uid, study_instance_uid, kind, revision FROM result_objects")}
    deliveries = query(state, "SELECT sop_instance_uid, state, attempts, last_error FROM deliveries")
    # Orthanc's own copies: SOP class, study and InstanceNumber (the revision) as it stored them.
    held = {}
    for oid in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{oid}/simplified-tags")
        kind = "sr" if tags.get("SOPClassUID") in SR_CLASSES else "sc"
        held[tags["SOPInstanceUID"]] = (tags["StudyInstanceUID"], kind, int(tags.get("InstanceNumber") or 0))
    per_revision = Counter(held.values())
    received = Counter(_RECEIVED.findall(orthanc.log.read_text(errors="replace")))
    sr_studies = {study for study, kind, _ in made.values() if kind == "sr"}
    revisions = Counter(study for study, kind, _ in made.values() if kind == "sr")
    return {
        "studies_sent": len(sent_studies),
        "study_rows": len(study_rows),
        "studies_summarised": len({r["study_instance_uid"] for r in study_rows} & sent_studies),
        "studies_with_sr": len(sr_studies & sent_studies),
        "studies_without_sr": len(sent_studies - sr_studies),
        "studies_revised": sum(1 for n in revisions.values() if n > 1),
        "objects_made": len(made),
        "objects_made_by_kind": dict(Counter(kind for _, kind, _ in made.values())),
        "deliveries": dict(Counter(s for _, s, _, _ in deliveries)),
        "deliveries_refused": sum(1 for _, _, attempts, _ in deliveries if attempts),
        "objects_in_orthanc": len(held),
        "objects_delivered": len(set(made) & set(held)),
        "objects_lost": len(set(made) - set(held)),
        "objects_unknown": len(set(held) - set(made)),
        "duplicates": sum(n - 1 for n in per_revision.values() if n > 1),
        "orthanc_receptions": sum(received.values()),
        "objects_resent": sum(1 for n in received.values() if n > 1),
        "resends": sum(n - 1 for n in received.values() if n > 1),
    }


def server_logs(work: Path) -> dict:
    text = "\n".join(p.read_text(errors="replace") for p in sorted(work.glob("serve-*.log")))
    waits = [float(w) for w in re.findall(r"retrying in (\d+) s", text)]
    # ichscan's and pynetdicom's lines alike: "ichscan LEVEL: message"; the UIDs cut off.
    errors = Counter(re.sub(r"[0-9.]{20,}", "<uid>", line[len("ichscan ERROR: "):])[:100] for line in text.splitlines() if line.startswith("ichscan ERROR:"))
    return {
        "tracebacks": text.count("Traceback"),
        "forward_retries": len(waits),
        "backoff_s": sorted(set(waits)),
        "given_up": text.count("giving up"),
        "error_lines": dict(errors),
    }


def wait_for_pending(state: Path, timeout: float) -> bool:
    """Until the outbox has a delivery pending; False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if outbox_now(state)["pending"]:
            return True
        time.sleep(0.01)
    return False


def wait_screened(srv: ServerProcess, senders: list[Sender], items, timeout: float) -> None:
    """Until every acknowledged instance has a row in the results CSV."""
    by_path = {str(i.path): i.sop_instance_uid for i in items}

    def screened():
        acked = {by_path[p] for s in senders for p in s.acked}
        have = {r["sop_instance_uid"] for r in read_csv(srv.out, missing_ok=True)}
        return acked <= have

    wait_for(screened, timeout, "every acknowledged instance to be screened", srv.proc, srv.log)


class StudySender(threading.Thread):
    """Sends ``items`` a study at a time, ``pace`` s apart: each study by its own
    common.Sender, which sends again what has no Success after a failure, so a study is
    split across associations only where the server was killed while receiving it."""

    def __init__(self, port: int, items, pace: float):
        super().__init__(daemon=True)
        self.port, self.pace = port, pace
        self.studies = split_by_study(items, len({i.study_instance_uid for i in items}))
        self.senders: list[Sender] = []
        self._halt = threading.Event()

    def run(self) -> None:
        for study in self.studies:
            if self._halt.is_set():
                return
            sender = Sender(self.port, study, batch=len(study))
            self.senders.append(sender)
            sender.start()
            while not sender.done:
                if self._halt.wait(0.2):
                    sender.stop()
                    return
            self._halt.wait(self.pace)

    def stop(self) -> None:
        self._halt.set()


def fresh(name: str) -> Path:
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def sigkill(args) -> dict:
    items = phantoms(args.studies * args.slices, args.size, args.slices, args.seed)
    work = fresh("outbox-sigkill")
    orthanc = start_orthanc(work / "orthanc")
    port = free_port()
    srv = start_server(work, port, orthanc, args.forward_wait)
    feeders = [StudySender(port, share, args.pace) for share in split_by_study(items, args.senders)]
    for feeder in feeders:
        feeder.start()
    started = time.monotonic()
    at_kills = []
    restart_s = []
    try:
        aim = random.Random(args.seed + 1)
        for wait in random_moments(args.kills, args.low, args.high, args.seed):
            time.sleep(wait)
            # Then at the next moment results wait to be sent (or after --aim s anyway), a
            # random fraction of a second into it: SR and key images made, some sent, some not.
            wait_for_pending(work / "ichscan-state.sqlite", args.aim)
            time.sleep(aim.uniform(0, 0.2))
            kill_tree(srv.proc)
            at_kills.append({"t": round(time.monotonic() - started, 1), **outbox_now(work / "ichscan-state.sqlite")})
            t = time.monotonic()
            srv = start_server(work, port, orthanc, args.forward_wait)
            restart_s.append(time.monotonic() - t)
        for feeder in feeders:
            feeder.join(timeout=600)
        senders = [sender for feeder in feeders for sender in feeder.senders]
        wait_screened(srv, senders, items, 900)
        code = srv.stop(signal.SIGTERM)
        acked = {p: t for s in senders for p, t in s.acked.items()}
        sent_studies = {i.study_instance_uid for i in items if str(i.path) in acked}
        figures = account(
            "outbox-sigkill",
            acked,
            items,
            srv.out,
            srv.store,
            kills=len(at_kills),
            kills_with_deliveries_pending=sum(1 for k in at_kills if k["pending"]),
            kills_before_first_object=sum(1 for k in at_kills if not k["objects"]),
            restart_s_median=round(sorted(restart_s)[len(restart_s) // 2], 1) if restart_s else None,
            exit_code_at_sigterm=code,
            sender_failed_runs=sum(s.failed_runs for s in senders),
            **outbox_figures(work, orthanc, sent_studies),
            **server_logs(work),
            seconds=round(time.monotonic() - started),
            size=f"{args.studies} studies x {args.slices} slices, {args.size} px, {args.senders} senders",
            at_kills=at_kills,
        )
    finally:
        for feeder in feeders:
            feeder.stop()
        if srv.proc.poll() is None:
            kill_tree(srv.proc)
        orthanc.close()
    save_result(figures)
    return figures


def echo(port: int) -> bool:
    return subprocess.run([str(ECHOSCU), "-aec", "ICHSCAN", "-to", "10", "127.0.0.1", str(port)], capture_output=True).returncode == 0


def orthanc_down(args) -> dict:
    items = phantoms((args.down_studies + 1) * args.slices, args.size, args.slices, args.seed)
    studies = split_by_study(items, args.down_studies + 1)
    early, late = [i for share in studies[:-1] for i in share], studies[-1]
    work = fresh("orthanc-down")
    state = work / "ichscan-state.sqlite"
    orthanc = start_orthanc(work / "orthanc")
    port = free_port()
    srv = start_server(work, port, orthanc, args.forward_wait)
    senders = []
    try:
        orthanc.close()
        down_at = time.monotonic()
        senders = [Sender(port, share, batch=args.slices).start() for share in split_by_study(early, args.senders)]
        samples = []
        echoed = late_ok = None
        while time.monotonic() - down_at < args.down:
            if echoed is None and time.monotonic() - down_at >= args.down * 2 / 3:
                echoed = echo(port)
                late_sender = Sender(port, late, batch=args.slices).start()
                late_sender.join(timeout=60)
                late_ok = late_sender.done
                senders.append(late_sender)
            samples.append({"t": round(time.monotonic() - down_at), **outbox_now(state)})
            time.sleep(min(10.0, max(0.0, args.down - (time.monotonic() - down_at))))
        waiting = outbox_now(state)
        orthanc = start_orthanc(work / "orthanc", orthanc.http_port, orthanc.dicom_port)
        back = time.time()
        wait_for(lambda: outbox_now(state)["pending"] == 0, 600, "the outbox to drain", srv.proc, srv.log)
        drained_s = time.time() - back
        last_sent = query(state, "SELECT MAX(sent_at) FROM deliveries")[0][0]
        wait_screened(srv, senders, items, 600)
        code = srv.stop(signal.SIGTERM)
        acked = {p: t for s in senders for p, t in s.acked.items()}
        sent_studies = {i.study_instance_uid for i in items if str(i.path) in acked}
        figures = account(
            "orthanc-down",
            acked,
            items,
            srv.out,
            srv.store,
            down_s=args.down,
            echo_during_outage=echoed,
            study_during_outage_acked=late_ok,
            waiting_at_return=waiting,
            max_pending_during_outage=max(s["pending"] for s in samples),
            return_to_last_delivery_s=round(last_sent - back, 1),
            return_to_empty_outbox_s=round(drained_s, 1),
            exit_code_at_sigterm=code,
            **outbox_figures(work, orthanc, sent_studies),
            **server_logs(work),
            size=f"{args.down_studies} + 1 studies x {args.slices} slices, {args.size} px, {args.senders} senders",
            samples=samples,
        )
    finally:
        for s in senders:
            s.stop()
        if srv.proc.poll() is None:
            kill_tree(srv.proc)
        if orthanc.proc.poll() is None:
            orthanc.close()
    save_result(figures)
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["outbox-sigkill", "orthanc-down"])
    parser.add_argument("--studies", type=int, default=40, help="outbox-sigkill: studies sent")
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--pace", type=float, default=15.0, help="outbox-sigkill: seconds between a sender's studies")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--low", type=float, default=3.0, help="shortest wait before a kill (after the restart), s")
    parser.add_argument("--high", type=float, default=12.0, help="longest wait before a kill, s")
    parser.add_argument("--aim", type=float, default=10.0, help="outbox-sigkill: after the random wait, up to this many s more for a moment with results waiting to be sent")
    parser.add_argument("--seed", type=int, default=1717)
    parser.add_argument("--forward-wait", type=float, default=120.0)
    parser.add_argument("--down", type=float, default=300.0, help="orthanc-down: seconds Orthanc is stopped")
    parser.add_argument("--down-studies", type=int, default=20, help="orthanc-down: studies sent as the outage begins")
    args = parser.parse_args(argv)
    if args.only in (None, "outbox-sigkill"):
        sigkill(args)
    if args.only in (None, "orthanc-down"):
        orthanc_down(args)


if __name__ == "__main__":
    main()
