#!/usr/bin/env bash
# One call on a lent GPU (bench/README.md gives the exact device call): settles the open questions
# of the sweeps' speed in under 8 minutes on an H100 or H200. Each step has its own time limit,
# shortened so that the whole stays within GPU_CHECK_SECONDS (470 s by default); a step that
# fails or runs out of time is recorded as such and the script goes on. The step limits add up to
# 455 s (grid's configurations run most informative first, each kept as it ends, so 40 s keep the
# leading ones). With the environment probes (at most 75 s, seconds in practice) and the
# sanitizers' compile run (at most 40 s) that is more than the total: each step's limit is cut to
# what is left of it, so the last steps are the ones that lose time. Every result lands in
# $OUT/gpu_check.json (summary table in $OUT/summary.txt); 8 files in all, the most a call brings back:
# env.txt gpu_check.json summary.txt steps.log tests.log memcheck.log racecheck.log ncu.csv
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TOTAL=${GPU_CHECK_SECONDS:-470}
PY=python3
CHECK="$PY -m bench.gpu_check"
REPORT="$PY -m bench.check_report"   # no torch import: cheap to call after every step
# The sweeps' kernels (and any later one named so), nothing of torch's: ncu's name filter and
# compute-sanitizer's kernel-name-substring filter.
NCU_KERNELS="regex:_mhpo_"
SANITIZER_KERNELS="kns=_mhpo_"

# Optional wheels carried in .whl (Liger and TRL, for the integration tests): nothing can be fetched there.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# verl and what it imports that the image lacks, in .whl/verl: on the verl-mem step's path alone
# (its transformers, the range verl 0.9 declares, must not replace the image's for the other steps).
VERL_PATH=$PYTHONPATH
if ls .whl/verl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site-verl .whl/verl/*.whl && VERL_PATH="$PWD:/tmp/site-verl:$PYTHONPATH"
fi

step() {  # step NAME SECONDS LOG COMMAND...: run within its limit and what is left of TOTAL
  local name=$1 limit=$2 log=$3; shift 3
  local left=$((TOTAL - SECONDS))
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped, ${left}s left of ${TOTAL}s"
    $REPORT record --out "$OUT" --name "$name" --rc 124 --seconds 0 --skipped >/dev/null 2>&1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/steps.log"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/steps.log"
  $REPORT record --out "$OUT" --name "$name" --rc "$rc" --seconds "$((SECONDS - t0))" --file "$log" >/dev/null 2>&1
}

{  # each time-boxed too: a hung tool must not eat the steps' time
  timeout 15 nvidia-smi
  timeout 30 $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"
  timeout 15 compute-sanitizer --version 2>&1 | tail -1
  timeout 15 ncu --version 2>&1 | tail -1
} >"$OUT/env.txt" 2>&1
head -n 12 "$OUT/env.txt"

# Device, versions, measured copy rate, and _config's prediction of the rows that fill the GPU.
step env 20 "$OUT/steps.log" $CHECK env --out "$OUT"
# GB/s of each sweep against N (128 to 16,384 rows of 151,936 bf16), one-sweep where it exists.
step sweeps 45 "$OUT/steps.log" $CHECK sweeps --out "$OUT"
# BLOCK_V x num_warps at the headline case (8192 x 151,936 bf16).
step grid 40 "$OUT/steps.log" $CHECK grid --out "$OUT"
# Aligned against unaligned V: 151,936 / 151,935 and 50,272 / 50,257.
step align 25 "$OUT/steps.log" $CHECK align --out "$OUT"
# In place against out of place, bitwise, 100 repeats each.
step inplace 30 "$OUT/steps.log" $CHECK inplace --out "$OUT"
# A compiled training step: sync debug mode "error", a CUDA graph, inductor's code (no logits copy).
step compile 70 "$OUT/steps.log" $CHECK compile --out "$OUT"
# Per micro-batch of verl's own update step (a one-layer Llama, V 151,936, fp32, ~8,190 tokens):
# peak memory of verl's logits path (padding removal on, off) and fused torch backend against
# impl_backend: mhpo, beside the CPU count's prediction; "skipped" with the reason without verl.
step verl-mem 40 "$OUT/steps.log" env PYTHONPATH="$VERL_PATH" $CHECK verl-mem --out "$OUT"
# The test suite, with every device-parametrized test also on CUDA.
step tests 70 "$OUT/tests.log" $PY -m pytest -q -p no:cacheprovider tests
# Memory errors and shared-memory races in every kernel variant, the kernels alone.
timeout 40 $CHECK sanitize-target >/dev/null 2>&1  # compile outside the sanitizer (Triton's cache)
step memcheck 35 "$OUT/memcheck.log" compute-sanitizer --tool memcheck --filter "$SANITIZER_KERNELS" --error-exitcode 3 $CHECK sanitize-target
step racecheck 35 "$OUT/racecheck.log" compute-sanitizer --tool racecheck --filter "$SANITIZER_KERNELS" --error-exitcode 3 $CHECK sanitize-target
# DRAM bytes of each kernel at the headline case (one forward, one backward), clocks left alone.
step ncu 45 "$OUT/ncu.csv" ncu --clock-control none --kernel-name "$NCU_KERNELS" --csv \
  --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum $CHECK ncu-target
$REPORT ncu-parse --out "$OUT" --file "$OUT/ncu.csv" >>"$OUT/steps.log" 2>&1

echo "== summary (${SECONDS}s)"
$REPORT summary --out "$OUT"
ls -l "$OUT"
