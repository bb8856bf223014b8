#!/usr/bin/env bash
# Every fault scenario of docs/robustness.md, small and short (about 5 minutes; .ci/run runs it):
# the scripts keep working, and report.py exits 1 if any scenario lost or duplicated an
# instance. Needs root (disk.py mounts tmpfs), dcmtk and Orthanc. The full campaign's sizes
# are each script's defaults. PYTHON: the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
export ICHSCAN_FAULTS_RESULTS=${ICHSCAN_FAULTS_RESULTS:-$PWD/.bench/faults/smoke-results}
rm -rf "$ICHSCAN_FAULTS_RESULTS"
run() { echo "== $*"; "$PY" "$@" >"$ICHSCAN_FAULTS_RESULTS.log" 2>&1 || { tail -40 "$ICHSCAN_FAULTS_RESULTS.log"; exit 1; }; }
mkdir -p "$(dirname "$ICHSCAN_FAULTS_RESULTS")"
run benchmarks/faults/kill.py all --instances 200 --size 128 --kills 3 --send-pace 0.5
run benchmarks/faults/outbox.py --only outbox-sigkill --studies 4 --size 128 --kills 2 --pace 3 --low 1 --high 3 --aim 3
run benchmarks/faults/outbox.py --only orthanc-down --size 128 --down 15 --down-studies 3
run benchmarks/faults/disk.py --instances 100
run benchmarks/faults/network.py --instances 60 --size 128 --associations 15 --max-associations 5 --loris 4 --loris-window 12 --defaults-window 35 --pdu-stream-mb 16 --disconnects 10
run benchmarks/faults/load.py --senders 2 --minutes 0.5 --size 128 --rate 20
# kill.py and outbox.py SIGKILL whole process trees, multiprocessing's resource tracker too, so
# the killed runs' shared-memory slabs stay in /dev/shm (docs/robustness.md, "Found, not fixed
# yet"): remove those whose process is gone, so that repeated CI runs do not pile them up.
"$PY" -c '
import os, re
gone = 0
for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []:
    match = re.match(r"ichscan-(\d+)-", name)
    if match and not os.path.exists(f"/proc/{match.group(1)}"):
        os.unlink(os.path.join("/dev/shm", name))
        gone += 1
print(f"removed {gone} shared-memory slabs of killed runs from /dev/shm")
'
"$PY" benchmarks/faults/report.py "$ICHSCAN_FAULTS_RESULTS"
