#!/usr/bin/env bash
# The GPU checks of issue 11 in one run on a CUDA node (docs/gpu.md, "Measuring on a GPU"):
#   1. install the wheels carried in .whl/ (the node's image lacks zstandard; xxhash and
#      msgpack are carried too, so the versions are ours) into /tmp/site;
#   2. the CUDA tests and the CPU tests of the same paths:
#      pytest tests/test_cuda.py tests/test_staging.py tests/test_load_paths.py;
#   3. the CUDA comparisons: python -m ckptstore.bench gpu --gb $GB --repeat $REPEAT,
#      JSON to $OUT/gpu-bench.json (figures for docs/benchmarks.md and docs/results/).
#
# Prepare once, here, in the repository root (the wheels are ignored, not committed):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0 xxhash==3.6.0 msgpack==1.1.2
# (--python-version: the node's python3; 3.12 on the H200 image of 2026-11.)
# Then run through the device tool: command "bash docs/gpu_run.sh", carry [".whl"],
# timeout_s 600. Everything it writes is under $OUT: env.txt, pytest.log, bench.log and
# gpu-bench.json. Exit status: non-zero when the tests or the bench failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ckptstore-gpu-out}
GB=${GB:-2}
REPEAT=${REPEAT:-3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/site:$PWD"
else
  echo "no .whl/ folder: using the node's own packages" >&2
  export PYTHONPATH="$PWD"
fi
{
  nvidia-smi
  python3 -c 'import sys, torch, zstandard, xxhash, msgpack
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("zstandard", zstandard.__version__, "xxhash", xxhash.VERSION, "msgpack", msgpack.version)'
  nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 200 python3 -m pytest -q -p no:cacheprovider \
  tests/test_cuda.py tests/test_staging.py tests/test_load_paths.py 2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}

timeout 330 python3 -m ckptstore.bench gpu --gb "$GB" --repeat "$REPEAT" \
  --json "$OUT/gpu-bench.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
