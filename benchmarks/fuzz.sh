#!/usr/bin/env bash
# Coverage-guided fuzzing (atheris, libFuzzer): run each harness in benchmarks/fuzz/ for SECONDS.
#
#   benchmarks/fuzz.sh SECONDS [HARNESS...]      # default: decode cstore stow rules labels
#
# PYTHON: the interpreter with ichscan and atheris (default .venv/bin/python, else python3).
# FUZZ_WORK: the work folder (default .fuzz/, git-ignored): seeds/ (built by
# benchmarks/fuzz/seeds.py when missing), corpus/<harness>/ (kept between runs, so each run
# starts where the last one stopped), crashes/<harness>/ (crash-*, timeout-*, oom-* inputs),
# logs/<harness>.log. Prints one line per harness; exits 1 if any harness found something,
# 2 if atheris is missing or a harness could not start.
set -uo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${1:-}
if ! [[ "$SECONDS_EACH" =~ ^[0-9]+$ ]] || [ "$SECONDS_EACH" -lt 1 ]; then
    echo "usage: benchmarks/fuzz.sh SECONDS [HARNESS...]" >&2
    exit 2
fi
shift
HARNESSES=("$@")
[ ${#HARNESSES[@]} -gt 0 ] || HARNESSES=(decode cstore stow rules labels)

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import atheris' 2>/dev/null; then
    echo "fuzz.sh: atheris is not installed for $PYTHON (pip install atheris==3.0.0; CI installs it)" >&2
    exit 2
fi

WORK=${FUZZ_WORK:-.fuzz}
mkdir -p "$WORK/logs"
if ! [ -f "$WORK/seeds/.complete" ]; then
    rm -rf "$WORK/seeds"
    "$PYTHON" benchmarks/fuzz/seeds.py "$WORK/seeds" >/dev/null || { echo "fuzz.sh: cannot build the seed corpora" >&2; exit 2; }
    touch "$WORK/seeds/.complete"
fi

status=0
for harness in "${HARNESSES[@]}"; do
    corpus="$WORK/corpus/$harness" crashes="$WORK/crashes/$harness" log="$WORK/logs/$harness.log"
    mkdir -p "$corpus" "$crashes"
    before=$(ls "$crashes" | wc -l) started=$(date +%s)
    # -max_len: the largest seed is 64 KiB; -timeout=5 s per input, -rss_limit_mb=1024: a hang
    # or a memory blow-up is a finding like a crash.
    "$PYTHON" "benchmarks/fuzz/$harness.py" "$corpus" "$WORK/seeds/$harness" \
        -max_total_time="$SECONDS_EACH" -timeout=5 -rss_limit_mb=1024 -max_len=65536 \
        -print_final_stats=1 -artifact_prefix="$crashes/" >"$log" 2>&1
    rc=$?
    elapsed=$(( $(date +%s) - started ))
    found=$(( $(ls "$crashes" | wc -l) - before ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    final=$(grep -E '^#[0-9]+.*(DONE|cov:)' "$log" | tail -1)
    cov=$(sed -n 's/.* cov: \([0-9]*\) .*/\1/p' <<<"$final")
    ft=$(sed -n 's/.* ft: \([0-9]*\) .*/\1/p' <<<"$final")
    corp=$(ls "$corpus" | wc -l)
    printf '%-7s %ss: %s executions, cov %s, ft %s, corpus %s, findings %s%s\n' \
        "$harness" "$elapsed" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$corp" "$found" \
        "$( [ "$found" -gt 0 ] && echo " (in $crashes, log $log)" )"
    if [ "$found" -gt 0 ] || [ "$rc" -ne 0 ]; then
        [ "$found" -gt 0 ] || echo "fuzz.sh: $harness exited $rc without an artifact; see $log" >&2
        status=1
    fi
done
exit $status
