"""What the fault-injection scenarios share: phantoms, dcmtk senders that keep what was
acknowledged, ichscan servers that can be killed and restarted, and the accounting.

Not a test and not part of the package: the scripts in this folder import it and are run by
hand (``benchmarks/faults/run.sh``), each writing one JSON file of figures per scenario under
``.bench/faults/results/``; ``report.py`` turns them into the table in docs/robustness.md.

The accounting is the product's promise, measured from outside: every instance a sender got
Success for (``sent``) is in the store (``stored``) and has exactly one row in the results CSV
(``rows``, ``duplicates`` = rows beyond one per instance); ``screened`` counts those rows with
status ``ok``; ``lost`` = sent instances without a row; ``temporary_files_left``: hidden
(half-written) files in the store. A sender that loses its association
sends again only what it has no Success for, so a lost instance cannot be hidden by a re-send.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import (  # noqa: E402 - the tests' server, Orthanc and polling helpers, one copy
    ICHSCAN,
    Orthanc,
    ServerProcess,
    free_port,
    port_open,
    read_csv,
    start_ichscan,
    wait_for,
)

from ichscan.synth import generate  # noqa: E402

__all__ = [
    "ICHSCAN",
    "Orthanc",
    "ServerProcess",
    "free_port",
    "port_open",
    "read_csv",
    "start_ichscan",
    "wait_for",
    "STORESCU",
    "WORK",
    "Phantom",
    "phantoms",
    "split_by_study",
    "Sender",
    "account",
    "save_result",
    "kill_tree",
    "rss_mb",
    "du_mb",
    "random_moments",
]

#: dcmtk's storescu by full path: pynetdicom puts a look-alike script in the venv's bin.
STORESCU = Path("/usr/bin/storescu")
WORK = ROOT / ".bench" / "faults"
#: Where save_result() writes (ICHSCAN_FAULTS_RESULTS: elsewhere, e.g. for CI's short run).
RESULTS = Path(os.environ.get("ICHSCAN_FAULTS_RESULTS", WORK / "results"))


@dataclass(frozen=True)
class Phantom:
    path: Path
    sop_instance_uid: str
    study_instance_uid: str


def phantoms(n: int, size: int = 256, slices: int = 20, seed: int = 1717) -> list[Phantom]:
    """``n`` uncompressed phantoms (``slices`` a study), made once and cached under .bench/faults/."""
    folder = WORK / f"phantoms_{n}_{size}_{slices}_{seed}"
    index = folder / "index.json"
    if not index.exists():
        records = generate(folder / "dicom", studies=(n + slices - 1) // slices, slices=slices, seed=seed, size=size, transfer_syntaxes=["ExplicitVRLittleEndian"])
        index.write_text(json.dumps([[str(r.path), r.sop_instance_uid, r.study_instance_uid] for r in records[:n]]))
    return [Phantom(Path(p), sop, study) for p, sop, study in json.loads(index.read_text())]


def split_by_study(items: list[Phantom], parts: int) -> list[list[Phantom]]:
    """``items`` dealt to ``parts`` senders study by study (a study comes from one sender)."""
    studies: dict[str, list[Phantom]] = {}
    for item in items:
        studies.setdefault(item.study_instance_uid, []).append(item)
    shares: list[list[Phantom]] = [[] for _ in range(parts)]
    for i, study in enumerate(studies.values()):
        shares[i % parts].extend(study)
    return shares


_SENDING = re.compile(r"^I: Sending file: (.*)$")
_SUCCESS = "I: Received Store Response (Success)"


@dataclass
class Sender:
    """A dcmtk ``storescu -v`` sending ``items`` to ``port``; it reads storescu's log as it goes
    and keeps, per file, the moment of its Success. When the association fails (the server was
    killed, or refused it), it waits ``retry_s`` and sends again what has no Success yet, until
    everything has one or :meth:`stop` is called. ``batch``: files per storescu run (one
    association each); ``pace_s``: pause between runs."""

    port: int
    items: list[Phantom]
    ae_title: str = "ICHSCAN"
    batch: int = 100
    retry_s: float = 0.5
    pace_s: float = 0.0
    acked: dict[str, float] = field(default_factory=dict)  # path -> time.time() of its Success
    attempts: int = 0
    failed_runs: int = 0  # storescu runs that failed: refused, or broken off
    broken_runs: int = 0  # of those, runs that had begun sending a file when they failed

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, daemon=True)

    def start(self) -> Sender:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def done(self) -> bool:
        return len(self.acked) == len(self.items)

    def run(self) -> None:
        """Send until every file has a Success (or :meth:`stop`), in this thread."""
        while not self._stop.is_set() and not self.done:
            pending = [str(i.path) for i in self.items if str(i.path) not in self.acked][: self.batch]
            self.attempts += 1
            ok, began = self._send(pending)
            if not ok:
                self.failed_runs += 1
                self.broken_runs += began
                self._stop.wait(self.retry_s)
            elif self.pace_s:
                self._stop.wait(self.pace_s)

    def _send(self, paths: list[str]) -> tuple[bool, bool]:
        """Run storescu once: (whether it exited 0, whether it had begun sending a file)."""
        cmd = [str(STORESCU), "-v", "-aec", self.ae_title, "-to", "20", "-ta", "20", "-td", "60", "127.0.0.1", str(self.port), *paths]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        current, began = None, False
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            match = _SENDING.match(line)
            if match:
                current, began = match.group(1), True
            elif line.startswith(_SUCCESS) and current is not None:
                self.acked.setdefault(current, time.time())
                current = None
        return proc.wait() == 0, began


def account(name: str, acked_paths: dict[str, float] | set[str], items: list[Phantom], out_csv: Path, store: Path | None = None, **extra) -> dict:
    """The scenario's figures (see the module's docstring). ``acked_paths``: the files a sender
    got Success for (or, for a watched folder, the files copied in whole)."""
    by_path = {str(i.path): i for i in items}
    sent = {by_path[p].sop_instance_uid for p in acked_paths}
    rows = read_csv(out_csv, missing_ok=True)
    per_uid = Counter(r["sop_instance_uid"] for r in rows if r["sop_instance_uid"])
    ok = {r["sop_instance_uid"] for r in rows if r["status"] == "ok"}
    stored = leftovers = None
    if store is not None:
        on_disk = {p.stem for p in store.rglob("*.dcm") if not p.name.startswith(".")}
        stored = len(sent & on_disk)
        leftovers = sum(1 for p in store.rglob("*") if p.is_file() and p.name.startswith("."))
    figures = {
        "scenario": name,
        "sent": len(sent),
        "stored": stored,
        "screened": len(sent & ok),
        "rows": sum(per_uid[u] for u in sent),
        "duplicates": sum(per_uid[u] - 1 for u in sent if per_uid[u] > 1),
        "lost": len([u for u in sent if per_uid[u] == 0]),
        "other_rows": len(rows) - sum(per_uid[u] for u in sent),
        "temporary_files_left": leftovers,
        "statuses": dict(Counter(r["status"] for r in rows)),
        **extra,
    }
    return figures


def save_result(figures: dict) -> Path:
    """Write the scenario's figures to .bench/faults/results/<scenario>.json and print them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    figures = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_at_end": round(os.getloadavg()[0], 1), **figures}
    path = RESULTS / f"{figures['scenario']}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return path


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``proc`` and, for SIGKILL, to its children (decode workers) as a crash
    of the whole service would; then reap it."""
    children = _children(proc.pid)
    proc.send_signal(sig)
    if sig == signal.SIGKILL:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait(timeout=120)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            out.append(int(kid))
            out.extend(_children(int(kid)))
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, MiB (0 if gone)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def du_mb(*paths: Path) -> float:
    """Bytes under ``paths`` (files and folders), MiB."""
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total / 2**20


def random_moments(count: int, low: float, high: float, seed: int) -> list[float]:
    """``count`` waits, uniform in [low, high) seconds, the same for a seed."""
    rng = random.Random(seed)
    return [rng.uniform(low, high) for _ in range(count)]
