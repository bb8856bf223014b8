"""C-STORE receive rate of `ichscan serve-scp` against dcmtk's own `storescp`, same files, same script.

    python benchmarks/bench_scp.py [--files 300]

Sends the same uncompressed 512x512 phantoms with dcmtk `storescu` over loopback to
(1) dcmtk `storescp` writing to a folder and (2) `ichscan serve-scp` (fsync per instance;
screening runs alongside in the same two cores), and reports instances per second as the
sender sees them (the storescu run's wall time). Then sends one more study and measures
the time from its last instance's Success to its row in the study CSV (with
--study-timeout 5). Not a test: run it by hand; needs dcmtk.
"""

from __future__ import annotations

import argparse
import csv
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ichscan.synth import generate

ROOT = Path(__file__).resolve().parents[1]
DCMTK = Path("/usr/bin")
ICHSCAN = Path(sys.executable).with_name("ichscan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def send(port: int, folder: Path, ae_title: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(DCMTK / "storescu"), "-aec", ae_title, "+sd", "+r", "127.0.0.1", str(port), str(folder)], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    folder = ROOT / ".bench" / f"scp512_{args.files}"
    if not (folder / ".complete").exists():
        generate(folder / "dicom", studies=max(1, args.files // 20), slices=20, seed=555, size=512, transfer_syntaxes=["ExplicitVRLittleEndian"])
        (folder / ".complete").write_text("ok")
    files = len(list((folder / "dicom").rglob("*.dcm")))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        port = free_port()
        (tmp / "dcmtk").mkdir()
        dcmtk = subprocess.Popen([str(DCMTK / "storescp"), "-aet", "STORESCP", "-od", str(tmp / "dcmtk"), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port)
            send(port, folder / "dicom", "STORESCP")  # warm-up: files into the page cache for both runs
            dcmtk_s = send(port, folder / "dicom", "STORESCP")
        finally:
            dcmtk.terminate()
            dcmtk.wait()
        port = free_port()
        ich = subprocess.Popen(
            [str(ICHSCAN), "-q", "serve-scp", "--port", str(port), "--store", str(tmp / "store"), "--out", str(tmp / "r.csv"), "--overlays-for", "none", "--study-timeout", "5"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(port)
            time.sleep(8)  # let the model load, so it is not counted against the receiver
            ichscan_s = send(port, folder / "dicom", "ICHSCAN")
            # One more study: time from its last Success to its summary row.
            extra = generate(tmp / "extra", studies=1, slices=10, seed=556, size=512, transfer_syntaxes=["ExplicitVRLittleEndian"])
            uid = extra[0].study_instance_uid
            send(port, tmp / "extra", "ICHSCAN")
            sent = time.perf_counter()
            studies = tmp / "r_studies.csv"
            while True:
                if studies.exists():
                    with open(studies, newline="") as fh:
                        if any(row["study_instance_uid"] == uid for row in csv.DictReader(fh)):
                            break
                if time.perf_counter() - sent > 300:
                    raise RuntimeError("no study row")
                time.sleep(0.05)
            summary_s = time.perf_counter() - sent
        finally:
            ich.terminate()
            ich.wait(timeout=120)
    figures = {
        "files": files,
        "dcmtk_storescp_instances_per_s": round(files / dcmtk_s, 1),
        "ichscan_serve_scp_instances_per_s": round(files / ichscan_s, 1),
        "ratio_ichscan_vs_storescp": round(dcmtk_s / ichscan_s, 2),
        "study_summary_after_last_instance_s": round(summary_s, 2),
        "study_timeout_s": 5,
    }
    for key, value in figures.items():
        print(f"{key:40s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
