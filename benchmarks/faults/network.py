"""Network abuse against ``ichscan serve-scp`` while a well-behaved sender sends (issue 17).

    python benchmarks/faults/network.py [SCENARIO ...] [--instances 200] [--size 256]

Scenarios (all by default, in this order):

``associations-50``
    50 dcmtk ``storescu`` processes started at once (4 instances each) against
    ``--max-associations 10``: how many were accepted, how many rejected and with which
    A-ASSOCIATE-RJ result/source/reason, that every accepted one got all its Successes and
    nothing that got one is lost; a C-ECHO (dcmtk ``echoscu``) after the storm.
``slow-loris``
    20 raw TCP clients trickling one byte a second (10 a valid A-ASSOCIATE-RQ, 10 a PDU
    header announcing 1 GiB then random bytes) against ``--idle-timeout 5``: when the server
    drops each one; then 10 trickling valid A-ASSOCIATE-RQs (= ``--max-associations``)
    against the defaults, with a C-ECHO probe every 5 s: do they hold every slot, how long.
``pdu-4gb``
    A raw client negotiates an association, then sends a P-DATA-TF header announcing
    0xFFFFFFFF bytes and streams up to ``--pdu-stream-mb`` MiB as fast as the server reads:
    how long until the server drops it, how much it read, the server's peak RSS (sampled
    every 20 ms, decode workers included, from the header until 3 s after the drop; the
    abuse starts once 40 rows are written, so the model is warm).
``disconnect-mid-dataset``
    ``--disconnects`` raw clients (two rounds) each send a C-STORE-RQ and half of a data set
    in P-DATA fragments, never the last one, then close the socket: half with FIN, half with
    RST (SO_LINGER 0). Nothing of those instances may be stored (no file, no temporary file,
    no row) or acknowledged; open fds, threads and RSS of the server before and after each
    round show whether anything leaks.

In each, a dcmtk sender (common.Sender) sends ``--instances`` phantoms (20 a study) while the
abuse goes on; its figures (sent/stored/screened/rows/duplicates/lost) come from
common.account(). Every scenario also counts the tracebacks in the server's log (a one-line
warning is what a misbehaving peer should get). Results: .bench/faults/results/<scenario>.json.
The raw PDUs are built by hand from PS3.8 9.3.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    STORESCU,
    WORK,
    Sender,
    ServerProcess,
    account,
    free_port,
    phantoms,
    read_csv,
    rss_mb,
    save_result,
)
from helpers import associate_rq, p_data_tf, raw_associate  # noqa: E402 - raw PDUs, shared with tests/test_scp.py

ECHOSCU = Path("/usr/bin/echoscu")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Keep the scenarios light on the shared cores: one decode worker, one model thread.
LIGHT = ("--device", "cpu", "--workers", "1", "--threads", "1")

# --- raw PDUs (PS3.8 9.3; the A-ASSOCIATE-RQ and P-DATA-TF come from tests/helpers.py) ---


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0, tag, len(value)) + value


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian, PS3.7 9.3.1.1), a data set follows."""
    rest = (
        _element(0x0002, sop_class.encode())
        + _element(0x0100, struct.pack("<H", 0x0001))
        + _element(0x0110, struct.pack("<H", message_id))
        + _element(0x0700, struct.pack("<H", 0))
        + _element(0x0800, struct.pack("<H", 0x0000))
        + _element(0x1000, sop_instance.encode())
    )
    return _element(0x0000, struct.pack("<I", len(rest))) + rest


def dataset_bytes(path: Path) -> bytes:
    """The data set of a DICOM file (after the preamble and file meta), as sent in P-DATA."""
    raw = path.read_bytes()
    (meta_length,) = struct.unpack("<I", raw[140:144])  # (0002,0000) UL right after 'DICM'
    return raw[144 + meta_length :]


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the peer closed (or reset) the connection; never blocks."""
    try:
        sock.setblocking(False)
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


# --- the server, the good sender and the probes -----------------------------------------


def fresh(name: str) -> Path:
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    return work


def echo(port: int) -> bool:
    """A dcmtk C-ECHO; True when it was answered."""
    return subprocess.run([str(ECHOSCU), "-aec", "ICHSCAN", "-to", "10", "-ta", "10", "-td", "10", "127.0.0.1", str(port)], capture_output=True).returncode == 0


def wait_rows(srv: ServerProcess, items, acked, timeout: float = 180.0) -> None:
    uids = {i.sop_instance_uid for i in items if str(i.path) in acked}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if uids <= {r["sop_instance_uid"] for r in read_csv(srv.out, missing_ok=True)}:
            return
        time.sleep(0.5)


def log_problems(srv: ServerProcess) -> dict:
    text = srv.log.read_text(errors="replace")
    lines = text.splitlines()
    return {
        "log_tracebacks": text.count("Traceback (most recent call last)"),
        "log_warnings": sum(" WARNING" in line for line in lines),
        "log_errors": sum(" ERROR" in line for line in lines),
    }


def finish(name: str, srv: ServerProcess, sender: Sender, items, acked: dict | None = None, timeout: float = 300.0, **extra) -> dict:
    """Wait for the good sender, then for the rows, C-ECHO, stop the server, account;
    ``acked``: what else got Success (besides the good sender's)."""
    sender.join(timeout)
    sender.stop()
    acked = {**(acked or {}), **sender.acked}
    wait_rows(srv, items, acked)
    echo_after = echo(srv.port)
    problems = log_problems(srv)
    rc = srv.stop()
    figures = account(
        name,
        acked,
        items,
        srv.out,
        srv.store,
        good_sender={"instances": len(sender.items), "acked": len(sender.acked), "runs": sender.attempts, "failed_runs": sender.failed_runs},
        echo_after=echo_after,
        server_exit=rc,
        temporary_files_left=sorted(str(p.relative_to(srv.store)) for p in srv.store.rglob(".*") if p.is_file()),
        **problems,
        **extra,
    )
    return figures


# --- 1. associations-50 ----------------------------------------------------------------

_SENDING = re.compile(r"^I: Sending file: (.*)$")
_REJECT = re.compile(r"^[EFI]: ((?:Result|Reason): .*)$")  # "F: Result: Rejected Transient, Source: ..."


def storescu_once(port: int, paths: list[str]) -> dict:
    """One dcmtk storescu run (one association), no retry: what got Success, how it ended."""
    cmd = [str(STORESCU), "-v", "-aec", "ICHSCAN", "-to", "30", "-ta", "30", "-td", "60", "127.0.0.1", str(port), *paths]
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    acked, current, rejected, reject = [], None, False, []
    for line in (out.stdout + out.stderr).splitlines():
        match = _SENDING.match(line)
        if match:
            current = match.group(1)
        elif line.startswith("I: Received Store Response (Success)") and current:
            acked.append(current)
            current = None
        elif "Association Rejected" in line:
            rejected = True
        elif rejected and (m := _REJECT.match(line)):
            reject.append(m.group(1).strip())
    ended = "rejected" if rejected else ("accepted" if "Association Accepted" in out.stdout + out.stderr else "failed")
    return {"rc": out.returncode, "acked": acked, "ended": ended, "reject": reject, "tail": (out.stdout + out.stderr).strip().splitlines()[-2:]}


def associations_50(args) -> dict:
    name = "associations-50"
    per_client = 4
    items = phantoms(args.instances + args.associations * per_client, size=args.size)
    good, storm_items = items[: args.instances], items[args.instances :]
    srv = ServerProcess(fresh(name), free_port(), "--max-associations", str(args.max_associations), *LIGHT)
    sender = Sender(srv.port, good, batch=20)
    results: list[dict] = [{} for _ in range(args.associations)]
    go = threading.Barrier(args.associations + 1)

    def client(i: int) -> None:
        paths = [str(p.path) for p in storm_items[i * per_client : (i + 1) * per_client]]
        go.wait()
        results[i] = storescu_once(srv.port, paths)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.associations)]
    for t in threads:
        t.start()
    started = time.monotonic()
    sender.start()
    go.wait()
    for t in threads:
        t.join()
    storm_s = time.monotonic() - started
    acked = dict(sender.acked)
    sender.join(300)
    acked = dict(sender.acked)
    for r in results:
        acked.update({p: 0.0 for p in r["acked"]})
    accepted = [r for r in results if r["ended"] == "accepted"]
    figures = finish(
        name,
        srv,
        sender,
        items,
        acked,
        storm={
            "clients": args.associations,
            "instances_each": per_client,
            "max_associations": args.max_associations,
            "accepted": len(accepted),
            "accepted_complete": sum(len(r["acked"]) == per_client and r["rc"] == 0 for r in accepted),
            "rejected": sum(r["ended"] == "rejected" for r in results),
            "reject_reasons": dict(Counter("; ".join(r["reject"]) for r in results if r["ended"] == "rejected")),
            "failed_otherwise": [r["tail"] for r in results if r["ended"] == "failed"],
            "storm_s": round(storm_s, 1),
        },
    )
    return figures


# --- 2. slow-loris ---------------------------------------------------------------------


class Loris:
    """A raw client that sends ``payload`` one byte a second and notes when the server
    drops it (or what it answers once the payload is through)."""

    def __init__(self, port: int, payload: bytes, kind: str):
        self.kind, self.payload = kind, payload
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.opened = time.monotonic()
        self.sent = 0
        self.dropped_after: float | None = None
        self.answer: str | None = None

    def tick(self) -> None:
        if self.dropped_after is not None or self.answer is not None:
            return
        if closed_by_peer(self.sock):
            self.dropped_after = time.monotonic() - self.opened
            return
        if self.sent < len(self.payload):
            try:
                self.sock.sendall(self.payload[self.sent : self.sent + 1])
                self.sent += 1
            except OSError:
                self.dropped_after = time.monotonic() - self.opened
        else:
            try:
                self.sock.setblocking(False)
                head = self.sock.recv(6)
                self.answer = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 7: "A-ABORT"}.get(head[0], f"0x{head[0]:02X}") if head else None
                if not head:
                    self.dropped_after = time.monotonic() - self.opened
            except BlockingIOError:
                pass
            except OSError:
                self.dropped_after = time.monotonic() - self.opened
            finally:
                self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


def loris_payloads(count: int, mixed: bool = True, seed: int = 17) -> list[tuple[str, bytes]]:
    """Valid A-ASSOCIATE-RQs; ``mixed``: every other one a header announcing 1 GiB and noise."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 2 == 0 or not mixed:
            out.append(("associate-rq", associate_rq(calling=f"LORIS{i}")))
        else:  # a PDU header announcing 1 GiB, then noise
            out.append(("random", struct.pack(">BBI", 0x01, 0, 2**30) + rng.randbytes(600)))
    return out


def run_loris(port: int, count: int, window: float, probe_every: float | None = None, mixed: bool = True) -> tuple[list[Loris], list[tuple[float, bool]]]:
    """``count`` lorises for up to ``window`` seconds (ends early once all are dropped);
    with ``probe_every``, a C-ECHO probe that often, timed from the start."""
    lorises = [Loris(port, payload, kind) for kind, payload in loris_payloads(count, mixed)]
    start = time.monotonic()
    probes: list[tuple[float, bool]] = []
    next_probe = start + (probe_every or 0)
    stop = threading.Event()

    def prober() -> None:
        nonlocal next_probe
        while probe_every and not stop.is_set():
            if time.monotonic() >= next_probe:
                at = time.monotonic() - start
                probes.append((round(at, 1), echo(port)))
                next_probe += probe_every
            stop.wait(0.2)

    probe_thread = threading.Thread(target=prober, daemon=True)
    probe_thread.start()
    while time.monotonic() - start < window:
        for loris in lorises:
            loris.tick()
        if all(l.dropped_after is not None or l.answer is not None for l in lorises) and not probe_every:
            break
        time.sleep(1.0)
    stop.set()
    probe_thread.join()
    for loris in lorises:
        loris.close()
    return lorises, probes


def loris_summary(lorises: list[Loris], window: float) -> dict:
    by_kind: dict[str, dict] = {}
    for kind in sorted({l.kind for l in lorises}):
        group = [l for l in lorises if l.kind == kind]
        dropped = [l.dropped_after for l in group if l.dropped_after is not None]
        by_kind[kind] = {
            "clients": len(group),
            "dropped": len(dropped),
            "dropped_after_s": [round(min(dropped), 1), round(max(dropped), 1)] if dropped else None,
            "bytes_sent_max": max(l.sent for l in group),
            "payload_bytes": len(group[0].payload),
            "answered": dict(Counter(l.answer for l in group if l.answer)),
            "still_open_at_window_end": sum(l.dropped_after is None and l.answer is None for l in group),
        }
    return {"window_s": window, **by_kind}


def slow_loris(args) -> dict:
    name = "slow-loris"
    items = phantoms(args.instances, size=args.size)
    # A: a short idle timeout, 20 lorises, the good sender alongside.
    work = fresh(name)
    srv = ServerProcess(work / "short", free_port(), "--idle-timeout", "5", "--max-associations", str(args.max_associations), *LIGHT)
    sender = Sender(srv.port, items, batch=20)
    done_at: list[float] = []
    started = time.monotonic()

    def watch_sender() -> None:
        sender.join()
        done_at.append(time.monotonic() - started)

    sender.start()
    threading.Thread(target=watch_sender, daemon=True).start()
    lorises, _ = run_loris(srv.port, args.loris, args.loris_window)
    short = loris_summary(lorises, args.loris_window)
    figures = finish(name, srv, sender, items, idle_timeout=5, lorises=short)
    figures["good_sender_done_s"] = round(done_at[0], 1) if done_at else None
    # B: the defaults (--idle-timeout 60), as many lorises as --max-associations, C-ECHO probes.
    srv = ServerProcess(work / "defaults", free_port(), *LIGHT)
    lorises, probes = run_loris(srv.port, 10, args.defaults_window, probe_every=5.0, mixed=False)
    figures["defaults"] = {
        "idle_timeout": 60,
        "max_associations": 10,
        "lorises": loris_summary(lorises, args.defaults_window),
        "echo_probes": probes,
        "echo_refused_s": [p[0] for p in probes if not p[1]],
        **log_problems(srv),
    }
    figures["defaults"]["server_exit"] = srv.stop()
    return figures


# --- 3. pdu-4gb ------------------------------------------------------------------------


def pdu_4gb(args) -> dict:
    name = "pdu-4gb"
    items = phantoms(args.instances, size=args.size)
    srv = ServerProcess(fresh(name), free_port(), *LIGHT)
    sender = Sender(srv.port, items, batch=20).start()
    # The sender under way and the model warm (its first batches allocate), so that the
    # RSS below moves with the abuse, not with the start of screening.
    deadline = time.monotonic() + 120
    while len(read_csv(srv.out, missing_ok=True)) < min(40, len(items)) and time.monotonic() < deadline:
        time.sleep(0.2)
    pid = srv.proc.pid
    baseline = rss_mb(pid)
    peak = [baseline]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    sock, context = raw_associate(srv.port, "BIGPDU")
    chunk = random.Random(4).randbytes(64 * 1024)
    limit = args.pdu_stream_mb * 2**20
    pushed = 0
    t0 = time.monotonic()
    ended, pushed_at = "still open", None
    try:
        sock.sendall(struct.pack(">BBI", 0x04, 0, 0xFFFFFFFF) + struct.pack(">I", 0xFFFFFFFB) + bytes([context, 0]))
        sock.settimeout(5)
        while pushed < limit:
            sock.sendall(chunk)
            pushed += len(chunk)
        pushed_at = time.monotonic() - t0
        # Everything pushed: wait (up to the default idle timeout and a bit) for the server to let go.
        sock.settimeout(75)
        ended = "closed" if sock.recv(65536) == b"" else "answered"
    except TimeoutError:
        ended = "stalled (the server stopped reading and kept the connection)"
    except OSError as exc:
        ended = f"closed ({type(exc).__name__})"
    dropped_after = time.monotonic() - t0
    sock.close()
    time.sleep(3.0)
    sampling.set()
    figures = finish(
        name,
        srv,
        sender,
        items,
        announced_bytes=0xFFFFFFFF,
        max_pdu=65536,
        bytes_pushed_mb=round(pushed / 2**20, 1),
        client_ended=ended,
        all_pushed_after_s=None if pushed_at is None else round(pushed_at, 2),
        dropped_after_s=round(dropped_after, 2),
        rss_before_mb=round(baseline, 1),
        rss_peak_mb=round(peak[0], 1),
    )
    return figures


# --- 4. disconnect-mid-dataset ---------------------------------------------------------


def fd_kinds(pid: int) -> dict:
    """The server's open fds by kind: socket, pipe, anon_inode, or file (the rest)."""
    kinds: Counter = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds[target.split(":")[0] if ":" in target and not target.startswith("/") else "file"] += 1
    return dict(sorted(kinds.items()))


def server_counts(pid: int) -> dict:
    return {
        "fds": fd_kinds(pid),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "rss_mb": round(rss_mb(pid), 1),
    }


def settled_counts(pid: int, base_threads: int | None = None, timeout: float = 20.0) -> dict:
    """The counts once the association threads of dropped clients have ended."""
    deadline = time.monotonic() + timeout
    counts = server_counts(pid)
    while base_threads is not None and counts["threads"] > base_threads and time.monotonic() < deadline:
        time.sleep(0.5)
        counts = server_counts(pid)
    return counts


def cut_short(port: int, item, rst: bool) -> bool:
    """C-STORE ``item`` but stop half-way through its data set and close; True if the
    server sent anything (a response) before the close."""
    sock, context = raw_associate(port, "CUTSHORT")
    data = dataset_bytes(item.path)
    sock.sendall(p_data_tf(context, c_store_rq(CT_IMAGE_STORAGE, item.sop_instance_uid), command=True, last=True))
    half = data[: len(data) // 2]
    for i in range(0, len(half), 16384):
        sock.sendall(p_data_tf(context, half[i : i + 16384], command=False, last=False))
    time.sleep(0.05)
    sock.setblocking(False)
    try:
        answered = bool(sock.recv(65536))
    except BlockingIOError:
        answered = False
    if rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return answered


def disconnect_mid_dataset(args) -> dict:
    name = "disconnect-mid-dataset"
    warmup = 20
    items = phantoms(args.instances + warmup + 2 * args.disconnects, size=args.size)
    good, victims = items[: args.instances + warmup], items[args.instances + warmup :]
    srv = ServerProcess(fresh(name), free_port(), *LIGHT)
    pid = srv.proc.pid
    # Warm-up: one study through, a few cut-short clients and a C-ECHO, so that the model,
    # the decode worker and the thread pools exist before the baseline.
    warm = Sender(srv.port, good[:warmup], batch=warmup).start()
    warm.join(120)
    for i in range(4):
        cut_short(srv.port, victims[0], rst=bool(i % 2))
    echo(srv.port)
    wait_rows(srv, good[:warmup], warm.acked)
    time.sleep(2.0)
    counts = [("baseline", settled_counts(pid))]
    base_threads = counts[0][1]["threads"]
    sender = Sender(srv.port, good[warmup:], batch=20)
    answered = 0
    for round_ in (1, 2):
        if round_ == 1:
            sender.start()  # the good sender alongside the first round
        share = victims[(round_ - 1) * args.disconnects : round_ * args.disconnects]
        for i, item in enumerate(share):
            answered += cut_short(srv.port, item, rst=bool(i % 2))
        if round_ == 1:
            sender.join(300)
            wait_rows(srv, good, {**warm.acked, **sender.acked})
        time.sleep(2.0)
        counts.append((f"after round {round_}", settled_counts(pid, base_threads)))
    victim_uids = {v.sop_instance_uid for v in victims}
    on_disk = [p for p in srv.store.rglob("*") if p.is_file() and p.stem in victim_uids]
    rows = [r for r in read_csv(srv.out, missing_ok=True) if r["sop_instance_uid"] in victim_uids]
    figures = finish(
        name,
        srv,
        sender,
        good,
        {**warm.acked, **sender.acked},
        cut_short={"clients": 4 + 2 * args.disconnects, "fin": 2 + args.disconnects, "rst": 2 + args.disconnects},
        cut_short_answered=answered,
        cut_short_files_stored=len(on_disk),
        cut_short_rows=len(rows),
        server=dict(counts),
    )
    return figures


SCENARIOS = {
    "associations-50": associations_50,
    "slow-loris": slow_loris,
    "pdu-4gb": pdu_4gb,
    "disconnect-mid-dataset": disconnect_mid_dataset,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=f"of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--instances", type=int, default=200, help="phantoms the good sender sends (default 200)")
    parser.add_argument("--size", type=int, default=256, help="phantom size in pixels (default 256)")
    parser.add_argument("--associations", type=int, default=50, help="associations-50: storescu processes at once (default 50)")
    parser.add_argument("--max-associations", type=int, default=10, help="--max-associations of the server (default 10)")
    parser.add_argument("--loris", type=int, default=20, help="slow-loris: clients against --idle-timeout 5 (default 20)")
    parser.add_argument("--loris-window", type=float, default=60.0, help="slow-loris: seconds the lorises trickle (default 60)")
    parser.add_argument("--defaults-window", type=float, default=75.0, help="slow-loris: seconds the 10 lorises trickle against the defaults (default 75)")
    parser.add_argument("--pdu-stream-mb", type=int, default=256, help="pdu-4gb: MiB streamed after the header at most (default 256)")
    parser.add_argument("--disconnects", type=int, default=50, help="disconnect-mid-dataset: cut-short clients per round (default 50)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; one of {', '.join(SCENARIOS)}")
    for scenario in args.scenarios or SCENARIOS:
        save_result(SCENARIOS[scenario](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
