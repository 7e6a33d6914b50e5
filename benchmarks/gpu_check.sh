#!/usr/bin/env bash
# GPU inference benchmark: benchmarks/bench_infer.py on CUDA with autocast (bundle knob amp=true), lungmask skipped,
# for a machine where only PyTorch (a CUDA build) is installed and nothing can be downloaded.
#
# The other packages come from wheel files in benchmarks/wheels/, made beforehand on a machine with PyPI access by a
# companion command run in the repository root. For a machine with nothing but torch (same Python minor version and
# platform as the machine running the command; else add --python-version/--platform as below):
#
#   python -m pip download --no-deps --only-binary=:all: -d benchmarks/wheels \
#       -r benchmarks/requirements-gpu.txt setuptools==84.2.1 wheel==0.48.0
#
# For this workplace's GPU image (Python 3.12; torch, numpy, scipy, tqdm, pyyaml, packaging, setuptools and wheel
# already there) the three missing packages are enough, about 5 MB of pure-Python wheels:
#
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d benchmarks/wheels monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2
#
# (setuptools and wheel are the build backend of `pip install -e .`; where both are installed it builds without
# their wheels.) The wheels are not committed: .gitignore needs the line `benchmarks/wheels/`.
#
# What it does: (1) checks that torch sees a GPU; (2) makes a venv in the work folder that sees the machine's
# packages (--system-site-packages; falls back to the given Python if venv is unavailable); (3) installs each package
# of benchmarks/requirements-gpu.txt that is missing, from the wheels, with --no-deps --no-index (torch is never
# replaced; a package already there is used at its own version, which the result JSON records); (4) installs the
# project with `pip install --no-deps -e .`; (5) runs bench_infer.py --device cuda --amp --skip-peer. The result is
# $OUT/bench_infer_gpu.json when OUT is set, else benchmarks/results/bench_infer_gpu.json, with nvidia-smi.txt and
# gpu_check.log beside it.
#
# Usage:  bash benchmarks/gpu_check.sh [bench_infer.py options, e.g. --repeats 3]
# Environment:
#   PYTHON            the interpreter that has torch (default python3)
#   OUT               results folder (default benchmarks/results)
#   GPU_CHECK_WORK    scratch folder: venv, phantom, outputs (default ${TMPDIR:-/tmp}/covid_monai_gpu_check)
#   GPU_CHECK_DEVICE  device for covid-monai (default cuda; `cpu` tests every other step on a machine without GPU)
#   GPU_CHECK_VENV    1 (default): install into a venv in the work folder; 0: into PYTHON's own environment
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"

PYTHON="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
WORK="${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/covid_monai_gpu_check}"
RESULTS="${OUT:-$repo/benchmarks/results}"
WHEELS="$repo/benchmarks/wheels"
mkdir -p "$WORK" "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"

log() { printf '[gpu_check] %s\n' "$*"; }

# 1. torch and the GPU
log "python: $(command -v "$PYTHON" || echo "$PYTHON")"
"$PYTHON" - "$DEVICE" <<'PYEOF'
import sys
import torch
device = sys.argv[1]
print(f"[gpu_check] torch {torch.__version__}, CUDA build {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("[gpu_check] no CUDA device visible to torch; set GPU_CHECK_DEVICE=cpu to test the other steps")
    p = torch.cuda.get_device_properties(0)
    print(f"[gpu_check] GPU 0: {p.name}, {p.total_memory / 1024**3:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
PYEOF
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
fi

# 2. an environment that sees the machine's torch: a venv with system site-packages, or the given Python itself
PY="$PYTHON"
if [ "${GPU_CHECK_VENV:-1}" = "1" ]; then
    if [ -x "$WORK/venv/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$WORK/venv" >/dev/null 2>&1; then
        # --system-site-packages shows the base interpreter's packages only; when PYTHON is itself a venv (as on
        # this workplace's GPU image) its site-packages are added by a .pth file, after the new venv's own
        venv_site="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' \
            > "$venv_site/_gpu_check_parent.pth"
        if "$WORK/venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
            PY="$WORK/venv/bin/python"
            log "venv: $WORK/venv (sees $PYTHON's packages)"
        else
            log "the venv does not see $PYTHON's torch; installing into $PYTHON's environment"
        fi
    else
        log "venv unavailable; installing into $PYTHON's environment"
    fi
fi
torch_before="$("$PY" -c 'import torch; print(torch.__version__)')"

# 3. the missing runtime packages, from the wheels
missing="$("$PY" - "$repo/benchmarks/requirements-gpu.txt" <<'PYEOF'
import importlib.metadata
import sys

from pip._vendor.packaging.requirements import Requirement

missing = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        have = importlib.metadata.version(req.name)
        print(f"[gpu_check] present: {req.name} {have} (pinned {req.specifier})", file=sys.stderr)
    except importlib.metadata.PackageNotFoundError:
        missing.append(f"{req.name}{req.specifier}")
print(" ".join(missing))
PYEOF
)"
pip_offline=("$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" --no-deps)
if [ -n "$missing" ]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if [ "${#wheels[@]}" -eq 0 ]; then
        echo "[gpu_check] missing $missing and no wheel files in $WHEELS: run the companion command" \
            "at the top of this script" >&2
        exit 2
    fi
    log "installing from $WHEELS (no deps, offline): $missing"
    # shellcheck disable=SC2086  # one argument per requirement
    "${pip_offline[@]}" $missing
fi

# 4. the project
build_opts=()
if "$PY" -c 'import setuptools, wheel' >/dev/null 2>&1; then
    build_opts=(--no-build-isolation)  # the installed build backend: no setuptools/wheel wheels needed
fi
log "installing the project: pip install --no-deps -e . ${build_opts[*]:-}"
"${pip_offline[@]}" "${build_opts[@]}" -e "$repo"

torch_after="$("$PY" -c 'import torch; print(torch.__version__)')"
if [ "$torch_before" != "$torch_after" ]; then
    echo "[gpu_check] torch changed from $torch_before to $torch_after: refusing to benchmark" >&2
    exit 3
fi
"$PY" -c 'import covid_monai.cli, monai, nibabel, ignite; print("[gpu_check] imports ok: monai", monai.__version__)'

# 5. the benchmark
log "bench_infer.py --device $DEVICE --amp --skip-peer $*"
set +e
"$PY" "$repo/benchmarks/bench_infer.py" --device "$DEVICE" --amp --skip-peer --work "$WORK/bench" \
    --out "$RESULTS/bench_infer_gpu.json" "$@" 2>&1 | tee "$RESULTS/gpu_check.log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    echo "[gpu_check] bench_infer.py failed (exit $status); logs of the runs in $WORK/bench/logs" >&2
    exit "$status"
fi
log "results: $RESULTS/bench_infer_gpu.json"
