#!/usr/bin/env bash
# The GPU checks of issue #14 in one run, sized for a short device lease (about 6 minutes on an
# H200, 9.5 at most: every step has its own time limit, so one hang cannot take the whole lease).
#
#   bash benchmarks/gpu.sh --fetch-wheels   # where the package index is reachable: the wheels the
#                                           # device image lacks (diffusers, Freepik's package) -> .whl/
#   bash benchmarks/gpu.sh                  # on the GPU machine, from the repository root
#
# Steps: install (the carried .whl/ wheels, or `pip install -e ".[all,bench]"` where an index is
# reachable), `pytest -m gpu`, the emulated-CUDA tests, `python -m benchmarks --device cuda --quick`.
# Everything lands in $OUT (default benchmarks/results): gpu.log (all output), env.txt, cuda.md and
# cuda.json (rewritten after each benchmark section, so a run cut short keeps what it measured).
# A dry run of every step on a CPU machine: BENCH_ARGS="--smoke --device cpu" bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ ${1:-} == --fetch-wheels ]]; then
    # the device's python: CPython 3.12 on x86-64 Linux; the versions this checkout runs with
    pin() { "$PY" -c "from importlib.metadata import version; print('$1==' + version('$1'))" 2>/dev/null || echo "$1"; }
    rm -rf .whl && mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        "$(pin nsfw-image-detector)" "$(pin diffusers)" "$(pin importlib_metadata)" || exit 1
    ls -l .whl
    echo "carry .whl with the run (the device tool's carry: [\".whl\"]); it is git-ignored"
    exit 0
fi

OUT=${OUT:-benchmarks/results}
BENCH_ARGS=${BENCH_ARGS:---device cuda --quick}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1  # nothing is downloaded: random weights, tiny fixtures
t_start=$SECONDS

step() {  # step NAME SECONDS COMMAND...: run with a time limit, report its status and duration
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s$([[ $rc == 124 ]] && echo ' (time limit)')"
    return $rc
}

echo "=== install"
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=${SITE:-/tmp/site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl || exit 1
    export PYTHONPATH=$PWD:$SITE
elif ! "$PY" -c "import diffusers, nsfw_image_detector" 2>/dev/null; then
    "$PY" -m pip install -q -e ".[all,bench]" || {
        echo "install failed: with no package index, run 'bash benchmarks/gpu.sh --fetch-wheels' first and carry .whl"
        exit 1
    }
else
    export PYTHONPATH=$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import torch, timm, transformers, diffusers, nsfw_image_detector, nsfw_safety
print('torch', torch.__version__, 'cuda', torch.version.cuda, '|',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')
print('timm', timm.__version__, '| transformers', transformers.__version__, '| diffusers', diffusers.__version__)
print('nsfw_safety from', nsfw_safety.__file__)"
} 2>&1 | tee "$OUT/env.txt"
if [[ $BENCH_ARGS == *cuda* ]]; then
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
fi

# --confcutdir: the repository root holds the ComfyUI entry point (__init__.py), which pytest would
# otherwise import as a package named after the checkout's folder
step "pytest -m gpu" 140 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors --confcutdir=tests tests
step "emulated CUDA tests" 70 "$PY" -m pytest -q -p no:cacheprovider --confcutdir=tests tests/test_emulated_cuda.py
# shellcheck disable=SC2086 # BENCH_ARGS is a list of options
step "benchmark" 320 "$PY" -m benchmarks $BENCH_ARGS --out "$OUT"  # ends with a summary

echo "=== done in $((SECONDS - t_start))s; files in $OUT"
