#!/usr/bin/env bash
# End-to-end throughput of ichscan on a GPU machine without network access.
#
#   benchmarks/gpu.sh [WHEELS_DIR]          (default: benchmarks/wheels)
#
# Fill WHEELS_DIR first, on a machine with PyPI access: benchmarks/fetch_wheels.sh.
# What it does, in at most BUDGET_S seconds (default 180):
#   1. makes a fresh venv (BENCH_VENV, default .bench/gpu-venv) with --system-site-packages
#      on PYTHON (default python3), which must already have torch and torchvision;
#   2. installs the other dependencies from WHEELS_DIR only (pip --no-index, no pip config,
#      no index; all of them, or those the benchmark needs when the folder was filled with
#      SET=bench) and the project itself, editable (--no-deps --no-build-isolation,
#      setuptools from the wheels when the system has none >= 68);
#   3. prints the GPU; without one it says so and falls back to the CPU with few files;
#   4. writes FILES uncompressed 512x512 phantoms (default 20000 on a GPU, at most 20000;
#      CPU_FILES, default 300, without one) with benchmarks/make_phantoms.py: 320 rendered
#      slices copied with fresh UIDs (rendering alone runs ~30 slices/s per core);
#   5. runs benchmarks/bench_suite.py --quick on them (or, if it is missing or fails,
#      times `ichscan batch` directly) and prints the figures, then the issue's targets:
#      5,000 slices/s end to end with SimpleCNN, and >= 70 % of the decode bound
#      (all cores decoding: cores / per-image decode time).
# Results: OUT (default .bench/gpu): suite.json, suite.log.
set -euo pipefail

start=$SECONDS
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
budget=${BUDGET_S:-180}
python=${PYTHON:-python3}
venv=${BENCH_VENV:-$root/.bench/gpu-venv}
out=${OUT:-$root/.bench/gpu}

say() { printf 'gpu.sh [%3ds] %s\n' "$((SECONDS - start))" "$*"; }
die() { say "ERROR: $*" >&2; exit 1; }
left() { echo $((budget - (SECONDS - start))); }

wheels=${1:-$here/wheels}
[[ -d $wheels ]] || die "no wheels folder $wheels: fill it with benchmarks/fetch_wheels.sh on a machine with PyPI access"
wheels=$(cd "$wheels" && pwd)
ls "$wheels"/*.whl >/dev/null 2>&1 || die "$wheels holds no wheels"
command -v "$python" >/dev/null || die "no $python (set PYTHON)"
"$python" -c 'import torch, torchvision' 2>/dev/null \
    || die "$python has no torch/torchvision: this script reuses the machine's own (set PYTHON)"
mkdir -p "$out"

# pip sees the wheels folder and nothing else: no config files, no index, no find-links
# or constraints from the environment.
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT PIP_REQUIREMENT PIP_REQUIRE_VIRTUALENV PIP_USER
export PYTHONNOUSERSITE=1

# -- 1. venv -----------------------------------------------------------------------------
say "venv $venv on $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if ! "$python" -m venv --clear --system-site-packages "$venv" 2>/dev/null; then
    # Debian's python without ensurepip: no pip in the venv, bootstrapped below.
    "$python" -m venv --clear --system-site-packages --without-pip "$venv" || die "cannot create a venv with $python"
fi
vpy=$venv/bin/python
# When PYTHON is itself a venv, --system-site-packages reaches the interpreter it was made
# from, not the venv's packages (torch among them): chain those in with a .pth file
# (addsitedir, so the .pth files there are honoured too).
"$python" - "$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" <<'EOF'
import sys, sysconfig
from pathlib import Path
if sys.prefix != sys.base_prefix:
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in paths)
    Path(sys.argv[1], "_gpu_bench_base.pth").write_text(lines)
EOF
"$vpy" -c 'import torch' || die "torch is not importable in $venv"
if ! "$vpy" -m pip --version >/dev/null 2>&1; then
    pipwheel=$(ls "$wheels"/pip-*.whl 2>/dev/null | head -n1) || true
    [[ -n ${pipwheel:-} ]] || die "no pip in $venv and no pip wheel in $wheels"
    "$vpy" "$pipwheel/pip" install -q --no-index --find-links "$wheels" pip || die "cannot bootstrap pip"
fi

# -- 2. install, offline -----------------------------------------------------------------
pip_install() { "$vpy" -m pip install -q --no-index --find-links "$wheels" "$@"; }
mapfile -t everything < <("$vpy" "$here/offline_requirements.py" --set all "$root/pyproject.toml")
mapfile -t bench < <("$vpy" "$here/offline_requirements.py" --set bench "$root/pyproject.toml")
say "installing from $wheels (no index)"
pip_install "setuptools>=68" wheel || die "setuptools>=68 is neither installed nor in $wheels"
if pip_install "${everything[@]}" >"$out/pip.log" 2>&1; then
    say "installed all ${#everything[@]} requirements"
else
    # A wheels folder from SET=bench: what training and evaluation need is left out.
    pip_install "${bench[@]}" || die "a requirement is missing from $wheels (run fetch_wheels.sh for this Python)"
    say "installed the ${#bench[@]} requirements the benchmark needs (not those of training/evaluation)"
fi
# Editable: the working tree is what runs (no copy, no build/ folder).
pip_install --no-deps --no-build-isolation -e "$root" >"$out/pip-project.log" 2>&1 \
    || die "cannot build and install the project offline (see $out/pip-project.log)"
say "installed $("$vpy" -c 'import ichscan, torch; print("ichscan", ichscan.__version__, "with torch", torch.__version__)')"

# -- 3. the GPU ----------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu.sh        nvidia-smi: /' || true
fi
device=$("$vpy" - <<'EOF'
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("cuda")
    import sys
    print(f"gpu.sh        GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}, "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}), bf16 {torch.cuda.is_bf16_supported()}", file=sys.stderr)
else:
    print("cpu")
EOF
)
cores=$("$vpy" -c 'import os; print(len(os.sched_getaffinity(0)))')
if [[ $device == cuda ]]; then
    files=${FILES:-20000}
    memory_files=${MEMORY_FILES:-1000,4000}
else
    files=${CPU_FILES:-300}
    memory_files=${MEMORY_FILES:-100,200}
    say "NO GPU: torch sees no CUDA device. Falling back to the CPU with $files files;"
    say "        these are CPU figures, the GPU figures are still UNMEASURED."
fi
((files >= 1 && files <= 20000)) || die "FILES must be 1..20000, not $files"
say "device $device, $cores cores, $files files"

# -- 4. phantoms -----------------------------------------------------------------------------
# The main set, and the suite's memory sets (.bench/explicit512_<n>, the cache that
# benchmarks/_common.phantoms reads) as hard links into it, or made apart when larger.
data=$root/.bench/explicit512_$files
links=()
IFS=, read -ra sizes <<<"$memory_files"
for n in "${sizes[@]}"; do
    if ((n <= files)); then
        links+=(--link "$root/.bench/explicit512_$n:$n")
    fi
done
"$vpy" "$here/make_phantoms.py" "$data" --files "$files" --jobs "$cores" --reuse "${links[@]}" | sed 's/^/gpu.sh        /'
for n in "${sizes[@]}"; do
    if ((n > files)); then
        "$vpy" "$here/make_phantoms.py" "$root/.bench/explicit512_$n" --files "$n" --jobs "$cores" --reuse | sed 's/^/gpu.sh        /'
    fi
done

# -- 5. the benchmark ----------------------------------------------------------------------
remaining=$(($(left) - 5))
((remaining > 20)) || die "no time left for the benchmark ($(left) s of $budget)"
json=$out/suite.json
log=$out/suite.log
rm -f "$json"
suite_ok=0
if [[ -f $here/bench_suite.py ]]; then
    say "bench_suite.py --quick (time limit ${remaining} s) -> $json"
    set +e
    timeout --kill-after=10 "$remaining" "$vpy" "$here/bench_suite.py" --data "$data" --files "$files" \
        --device "$device" --json "$json" --quick --memory-files "$memory_files" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    if [[ $status -eq 0 && -f $json ]]; then
        suite_ok=1
    elif [[ $status -eq 124 || $status -eq 137 ]]; then
        say "bench_suite.py ran out of time: the figures above are what it measured"
    else
        say "bench_suite.py failed (exit $status; see $log)"
    fi
else
    say "benchmarks/bench_suite.py is missing"
fi

if [[ $suite_ok -eq 0 ]] && (($(left) > 15)); then
    say "fallback: timing 'ichscan batch' directly (start-up included)"
    set +e
    t0=$("$vpy" -c 'import time; print(time.time())')
    timeout --kill-after=10 "$(($(left) - 5))" "$vpy" -m ichscan batch "$data" --out "$out/fallback.csv" \
        --overlays-for none --device "$device" --no-progress >"$out/fallback.log" 2>&1
    status=$?
    set -e
    "$vpy" - "$t0" "$out/fallback.csv" "$status" <<'EOF'
import csv, sys, time
t0, path, status = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
seconds = time.time() - t0
try:
    rows = sum(1 for _ in csv.DictReader(open(path, newline="")))
except OSError:
    rows = 0
print(f"gpu.sh        ichscan batch: {rows} files in {seconds:.1f} s = {rows / seconds:.0f} files/s (exit {status})")
EOF
fi

# -- summary -----------------------------------------------------------------------------------
if [[ $suite_ok -eq 1 ]]; then
    "$vpy" - "$json" "$device" <<'EOF'
import json, sys
f = json.load(open(sys.argv[1]))
device = sys.argv[2]
cores = f["machine"]["cores"]
decode_ms = f["per_image_ms"]["decode"]
decode_bound = cores / (decode_ms / 1000.0)
rate = f["batch_csv_images_per_s"]
print()
print(f"gpu.sh summary ({f['machine'].get('device_name') or device}, {cores} cores, {f['settings']['files']} files, "
      f"batch {f['settings']['batch_size']}, {f['settings']['workers']} workers, transfer {f['settings'].get('transfer')})")
print(f"  end to end, CSV only          {rate:10.0f} slices/s")
print(f"  end to end, overlays for all  {f['batch_overlays_all_images_per_s']:10.0f} slices/s")
print(f"  decode, one core              {decode_ms:10.3f} ms/slice")
print(f"  model, per slice              {f['per_image_ms']['model']:10.3f} ms/slice")
print(f"  decode bound, all {cores:3d} cores   {decode_bound:10.0f} slices/s")
if f.get("naive_images_per_s"):
    print(f"  naive per-file loop           {f['naive_images_per_s']:10.0f} slices/s")
for n, mb in (f.get("peak_memory_mb") or {}).items():
    print(f"  peak memory, {n:>6} files      {mb:10.0f} MB")
if device == "cuda":
    print(f"  target: >= 5000 slices/s      {'MET' if rate >= 5000 else 'NOT MET'} ({rate:.0f})")
    print(f"  target: >= 70% of decode bound {'MET' if rate >= 0.7 * decode_bound else 'NOT MET'} ({100 * rate / decode_bound:.0f} %)")
else:
    print(f"  share of the decode bound     {100 * rate / decode_bound:10.0f} %   (CPU run: the model shares the cores)")
    print("  GPU figures: UNMEASURED (no CUDA device on this machine)")
EOF
fi
say "done in $((SECONDS - start)) s (budget $budget s)"
