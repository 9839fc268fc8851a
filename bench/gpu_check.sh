#!/usr/bin/env bash
# One call on a lent GPU (bench/README.md gives the exact device call): settles the open questions
# of the sweeps' speed in at most 6 minutes on an H100 or H200, after a preamble (carried wheels,
# env.txt: each part time-boxed, about 10 s; beyond 60 s it is taken from the steps). Each step
# has its own time limit, cut to what is left of GPU_CHECK_SECONDS (360 s by default, counted from
# the first step); the limits below add
# up to 360 s (tests/test_bench_harness.py holds that), so the last step can never be starved by
# the first. A step that fails or runs out of time is recorded as such, one that cannot start in
# time as "not run: no time left", and the script goes on; a tool that is missing or refuses to
# run (ncu without counter permission) is recorded as "skipped: why". Every
# result lands in $OUT/gpu_check.json (summary table in $OUT/summary.txt); 8 files in all:
# env.txt gpu_check.json summary.txt headline.png steps.log tests.log sanitizers.log ncu.csv
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TOTAL=${GPU_CHECK_SECONDS:-360}
PY=python3
CHECK="$PY -m bench.gpu_check"
REPORT="$PY -m bench.check_report"   # no torch import: cheap to call after every step
# The sweeps' kernels (and any later one named so), nothing of torch's: ncu's name filter and
# compute-sanitizer's kernel-name-substring filter.
NCU_KERNELS="regex:_mhpo_"
# The tests step's files: the op against float64 on each path, most telling first.
CUDA_TESTS="tests/test_mhpo_loss.py tests/test_token_logprobs.py tests/test_objectives.py tests/test_alignment.py
  tests/test_fused_linear.py tests/test_truncation.py tests/test_replay.py tests/test_nonfinite.py"
SANITIZER_KERNELS="kns=_mhpo_"
# The option that takes it: --kernel-name (CUDA 13.0's compute-sanitizer 2025.3 has no --filter),
# or --filter where an older one lacks --kernel-name.
SANITIZER_FILTER=--kernel-name
if command -v compute-sanitizer >/dev/null 2>&1 && ! compute-sanitizer --help 2>&1 | grep -q -- --kernel-name; then
  SANITIZER_FILTER=--filter
fi

# Optional wheels carried in .whl (Liger and TRL, for the integration tests): nothing can be fetched there.
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# verl and what it imports that the image lacks, in .whl/verl: on the verl-mem step's path alone
# (its transformers, the range verl 0.9 declares, must not replace the image's for the other steps).
VERL_PATH=$PYTHONPATH
if ls .whl/verl/*.whl >/dev/null 2>&1; then
  timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site-verl .whl/verl/*.whl && VERL_PATH="$PWD:/tmp/site-verl:$PYTHONPATH"
fi

# A tool's own refusal (no counter permission, an unsupported device or API, a sandbox without the
# profiler's library), not a finding: read only in the tool steps' logs, on the tools' own lines.
REFUSED='^==.*(ERR_NVGPUCTRPERM|permission to access|not supported|is not available|LibraryNotLoaded)'

step() {  # step NAME SECONDS LOG COMMAND...: run within its limit and what is left of TOTAL
  local name=$1 limit=$2 log=$3; shift 3
  local left=$((TOTAL - SECONDS))
  if [ "$left" -lt 10 ]; then
    echo "== $name: not run, ${left}s left of ${TOTAL}s"
    $REPORT record --out "$OUT" --name "$name" --rc 124 --seconds 0 --skipped >/dev/null 2>&1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/steps.log"
  echo "== $name" >>"$log"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/steps.log"
  $REPORT record --out "$OUT" --name "$name" --rc "$rc" --seconds "$((SECONDS - t0))" --file "$log" \
    --refused "${STEP_REFUSED:-}" >/dev/null 2>&1
}

tool_step() {  # tool_step TOOL NAME SECONDS LOG COMMAND...: "skipped" where TOOL is not installed or refuses
  local tool=$1; shift
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "== $1: skipped, $tool not installed" | tee -a "$OUT/steps.log"
    $REPORT record --out "$OUT" --name "$1" --rc 0 --seconds 0 --skipped-because "$tool not installed" >/dev/null 2>&1
    return
  fi
  STEP_REFUSED=$REFUSED step "$@"
}

{  # each time-boxed too: a hung tool must not eat the steps' time
  timeout 15 nvidia-smi
  timeout 30 $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"
  timeout 15 compute-sanitizer --version 2>&1 | tail -1
  timeout 15 ncu --version 2>&1 | tail -1
} >"$OUT/env.txt" 2>&1
head -n 12 "$OUT/env.txt"
# The steps' time starts here; a preamble longer than 50 s comes out of it, so that the whole,
# the last step's kill grace and the summary included, stays within GPU_CHECK_SECONDS + 60 s
# (the device call's timeout_s).
TOTAL=$((TOTAL - (SECONDS > 50 ? SECONDS - 50 : 0)))
SECONDS=0

# The limits add up to 360 s (GPU_CHECK_SECONDS); tests/test_bench_harness.py reads them here.
# Device, versions, measured copy rate, and _config's prediction of the rows that fill the GPU;
# then each CUDA-only branch once (fp32-output addmm, nonzero_static, the device-side rescale).
step env 10 "$OUT/steps.log" $CHECK env --out "$OUT"
step smoke 10 "$OUT/steps.log" $CHECK smoke --out "$OUT"
# Every call the timed steps make, once, in one process per core: Triton compiles each kernel
# variant here, in parallel, into the shared cache (the step's time is the compile time), and the
# headline's baselines their graphs and kernels (inductor's cache is on disk too).
CORES=$(nproc 2>/dev/null || echo 4)
step warm 40 "$OUT/steps.log" env TORCHINDUCTOR_COMPILE_THREADS=1 \
  bash -c "seq 0 $((CORES - 1)) | xargs -P $CORES -I{} $CHECK warm --part {} --of $CORES"
# The headline benchmark: a training step of the fused op against eager, torch.compile and Liger at
# bf16 N 1,024 / 8,192 / 32,768 x V 151,936 / 151,935 and fp32 8,192 x 151,936; headline.png.
step headline 60 "$OUT/steps.log" $CHECK headline --out "$OUT"
# GB/s of each sweep against N (kernels alone: CUDA graph, L2 evicted before each repetition), and
# each N's whole call forward + backward, two sweeps against one, out of place and in place.
step sweeps 35 "$OUT/steps.log" $CHECK sweeps --out "$OUT"
# BLOCK_V x num_warps at the headline case (8192 x 151,936 bf16).
step grid 15 "$OUT/steps.log" $CHECK grid --out "$OUT"
# Aligned against unaligned V: 151,936 / 151,935 and 50,272 / 50,257.
step align 10 "$OUT/steps.log" $CHECK align --out "$OUT"
# In place against out of place, bitwise.
step inplace 10 "$OUT/steps.log" $CHECK inplace --out "$OUT"
# A compiled training step: sync debug mode "error", a CUDA graph, inductor's code (no logits copy).
step compile 30 "$OUT/steps.log" $CHECK compile --out "$OUT"
# Per micro-batch of verl's own update step: peak memory of verl's logits path against
# impl_backend: mhpo; "skipped" with the reason without verl.
step verl-mem 20 "$OUT/steps.log" env PYTHONPATH="$VERL_PATH" $CHECK verl-mem --out "$OUT"
# The core tests on CUDA, most telling first (those that need Triton's interpreter are skipped
# there, with the reason), stopping at the fifth failure; cut short, tests.log keeps what ran.
step tests 40 "$OUT/tests.log" $PY -m pytest -q -rfE --maxfail=5 -p no:cacheprovider $CUDA_TESTS
# Every kernel variant once, under each of compute-sanitizer's tools, without PyTorch's caching
# allocator (inside a cached block an overrun is no error to memcheck); compiled first, outside.
step sanitize-compile 10 "$OUT/steps.log" $CHECK sanitize-target
for tool in memcheck:15 racecheck:10 initcheck:10 synccheck:10; do
  tool_step compute-sanitizer "${tool%%:*}" "${tool##*:}" "$OUT/sanitizers.log" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "${tool%%:*}" $SANITIZER_FILTER "$SANITIZER_KERNELS" \
    --error-exitcode 3 $CHECK sanitize-target
done
# DRAM bytes of each kernel at the headline case (one forward, one backward), clocks left alone.
tool_step ncu ncu 25 "$OUT/ncu.csv" ncu --clock-control none --kernel-name "$NCU_KERNELS" --csv \
  --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum $CHECK ncu-target
$REPORT ncu-parse --out "$OUT" --file "$OUT/ncu.csv" >>"$OUT/steps.log" 2>&1

echo "== summary (${SECONDS}s)"
$REPORT summary --out "$OUT"
ls -l "$OUT"
