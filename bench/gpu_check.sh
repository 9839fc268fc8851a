#!/usr/bin/env bash
# One call on a lent GPU (bench/README.md gives the exact device call). Ends in under 8 minutes on
# an H100: each step has its own time limit, and the benchmark writes its JSON after every case,
# so a step cut short still leaves what it measured. Writes at most 8 files under $OUT.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Optional wheels carried in .whl (Liger and TRL, for their baselines): nothing can be fetched there.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - t0))s; tail:"; tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
}

{
  nvidia-smi
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"
  python3 -c "import liger_kernel; print('liger_kernel', getattr(liger_kernel, '__version__', 'present'))" 2>&1
  compute-sanitizer --version 2>&1 | tail -1
} >"$OUT/env.txt" 2>&1
head -n 20 "$OUT/env.txt"

# 1. The test suite, with every device-parametrized test also on CUDA: the property-based search
#    and its replayed regressions, 70,000-row sequences, determinism, torch.compile.
step tests 120 python3 -m pytest -q -p no:cacheprovider tests
# 2. The benchmark on the headline cases, both suites (fwd+bwd first); JSON and PNG land in $OUT.
step bench 240 python3 -m bench --preset headline --out "$OUT"
# 3. Memory errors and shared-memory races in every kernel variant, at a small shape.
python3 bench/sanitize.py >/dev/null 2>&1  # compile outside the sanitizer (Triton's cache)
step memcheck 35 compute-sanitizer --tool memcheck --error-exitcode 3 python3 bench/sanitize.py
step racecheck 35 compute-sanitizer --tool racecheck --error-exitcode 3 python3 bench/sanitize.py

echo "== results table"
sed -n '/^provider/,$p' "$OUT/bench.log"
ls -l "$OUT"
