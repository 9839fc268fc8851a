"""python -m bench: the fused MHPO ops against eager PyTorch, torch.compile, TRL and Liger.

Two suites. ``logits``: the op on materialized logits, reported as GB/s under the bytes-moved
model and as a share of the device's measured copy bandwidth. ``linear``: hidden states and the
LM head, reported as TFLOP/s against the 3-GEMM floor and as a share of a GEMM's measured rate.
Both: median time, peak and extra memory, speed-up against eager and torch.compile. Writes
<device>-<date>.json and .png into bench/out/ (ignored by git), or the folder named by --out or
MHPO_BENCH_OUT (bench/results for a run to commit). Without CUDA it runs the PyTorch path of the
ops against the eager and compiled reference on small shapes, memory read from the CPU allocator
through torch.profiler, which says nothing about GPU speed or memory.
"""

import argparse
import datetime
import gc
import os
import platform
import re
import sys

import torch

import mhpo_kernels
import reference

from . import harness, report
from .harness import measure
from .providers import PROVIDERS
from .workloads import PRESETS, SUITE_MODES, SUITES, make_inputs

# A local run writes here, ignored by git: `make bench` leaves the tree clean. A run to commit
# names bench/results.
OUT_DIR = os.environ.get("MHPO_BENCH_OUT") or os.path.join(os.path.dirname(__file__), "out")
# What the peak and extra bytes of a run are (harness.peak_memory), written into its JSON.
MEMORY_CUDA = ("CUDA caching allocator: max_memory_allocated during one call after a reset (peak), "
               "minus memory_allocated before it (extra)")
MEMORY_CPU = ("CPU allocator bytes of the PyTorch path, as the most held at once during one untimed call under "
              "torch.profiler beyond what was held before it (extra), plus the CPU tensors alive before it (peak)")
# A row's CPU seconds, roughly: a fixed part (compilation, the memory reading) and a part per
# million logits (tokens x V), fitted to CPU runs of the `tiny` and `cpu` presets on 2 cores (the
# latter: 87 rows planned, 5 min 47 s). Only for the order of magnitude announced before a run.
CPU_SECONDS_PER_ROW, CPU_SECONDS_PER_MLOGIT = 1.2, 0.25
# Most important first; a run cut short by a time limit keeps what it measured.
ORDER = [("logits", "fwd_bwd"), ("linear", "fwd_bwd"), ("logits", "fwd"), ("logits", "logprobs"),
         ("linear", "logprobs"), ("linear", "logprobs_grad")]


def check_correctness(device):
    """Before timing anything: the fused op against the float64 reference on a small case."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 33, 5003, generator=g) * 2).to(device)
    ids = torch.randint(0, 5003, (2, 32), generator=g).to(device)
    old = torch.randn(2, 32, generator=g).to(device) - 9
    adv = torch.randn(2, generator=g).to(device)
    kwargs = dict(temperature=0.9, ref_logprobs=old + 0.1, beta=0.04)
    x = logits.detach().requires_grad_()          # whole: the op's next-token shift
    loss = mhpo_kernels.mhpo_loss(x, ids, old, adv, **kwargs)
    loss.backward()
    x64 = logits.detach().cpu().double().requires_grad_()
    kw64 = {**kwargs, "ref_logprobs": kwargs["ref_logprobs"].cpu().double()}
    loss64 = reference.mhpo_loss(x64, ids.cpu(), old.cpu().double(), adv.cpu().double(), **kw64)
    loss64.backward()
    err = ((x.grad.cpu().double() - x64.grad).abs().max() / x64.grad.abs().max()).item()
    loss_err = abs(loss.item() - loss64.item()) / abs(loss64.item())
    if not (err <= 1e-5 and loss_err <= 1e-5):
        sys.exit(f"fused op disagrees with the float64 reference: loss {loss_err:.1e}, grad {err:.1e}")
    return max(err, loss_err)


def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full" if cuda else "cpu")
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--providers", nargs="+", help="provider names (default: all of each suite)")
    parser.add_argument("--modes", nargs="+", choices=sorted({m for ms in SUITE_MODES.values() for m in ms}))
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--out", "--results", default=OUT_DIR,
                        help="folder for the JSON and the plot (default: $MHPO_BENCH_OUT or bench/out, ignored by git)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    name = harness.device_name(device)
    date = datetime.date.today().isoformat()
    print(f"device: {name}; torch {torch.__version__}; preset {args.preset}", flush=True)
    if not cuda:
        print("No CUDA: timing the PyTorch path of the ops on the CPU.\n"
              "CPU numbers say nothing about GPU speed or memory; they check that the harness runs.", flush=True)
    fused_err = check_correctness(device)
    print(f"fused vs float64 reference on a small case: max rel err {fused_err:.1e}", flush=True)
    ceilings = {"copy_gbps": harness.copy_bandwidth_gbps(device), "gemm_tflops": harness.gemm_tflops(device)}
    if cuda:
        print(f"device-to-device copy {ceilings['copy_gbps']:.0f} GB/s (read + write); "
              f"bf16 GEMM {ceilings['gemm_tflops']:.0f} TFLOP/s", flush=True)

    meta = dict(device=name, date=date, preset=args.preset, torch=torch.__version__,
                triton=harness.module_version("triton"), liger_kernel=harness.module_version("liger_kernel"),
                trl=harness.module_version("trl"),
                python=platform.python_version(), cpu_threads=None if cuda else torch.get_num_threads(),
                copy_bandwidth_gbps=ceilings["copy_gbps"],
                gemm_tflops=ceilings["gemm_tflops"], fused_vs_float64_max_rel_err=fused_err,
                work_models="bench/workloads.py: bytes_moved (logits suite), gemm_flops (linear suite)",
                memory=MEMORY_CUDA if cuda else MEMORY_CPU,
                note=None if cuda else "CPU run of the PyTorch path: no statement about GPU speed or memory")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{date}")

    plan = [(suite, mode, case) for suite, mode in ORDER
            if suite in args.suites and (args.modes is None or mode in args.modes)
            for case in PRESETS[args.preset] if case.suite == suite]
    providers = {s: [p for n, p in PROVIDERS[s].items()
                     if n.startswith("fused") or not args.providers or n in args.providers]
                 for s in SUITES}
    print(announce(plan, providers, device), flush=True)
    results, elapsed = run(plan, providers, device, args.repeats, ceilings, stem, meta)
    wrote_plot = report.plot(stem + ".png", meta, results)
    measured = sum(not r["status"].startswith("skipped") for r in results)
    print(f"measured {measured} rows in {report.clock(elapsed)}")
    print(report.table(results, args.repeats, harness.WARMUP))
    note = report.left_out(left_out(plan, providers, device))
    if note:
        print(note)
    print(f"wrote {stem}.json")
    if wrote_plot:
        print(f"wrote {stem}.png")


def runnable(plan, providers, device):
    """The (suite, mode, case, provider) of the plan that will be measured: the rest are skipped
    rows (a provider that cannot run here, or has no entry point for the mode)."""
    return [(suite, mode, case, p) for suite, mode, case in plan for p in providers[suite]
            if not p.unavailable(device, mode)]


def announce(plan, providers, device):
    """What the run will do, said before it starts: the rows to measure and, on the CPU, a rough
    duration (CPU_SECONDS_PER_ROW and _PER_MLOGIT), worded without a figure that would claim
    precision."""
    rows = runnable(plan, providers, device)
    planned = sum(len(providers[suite]) for suite, _, _ in plan)
    said = f"{len(rows)} rows to measure ({planned} planned, the others skipped)"
    if device.type == "cuda":
        return said
    seconds = sum(CPU_SECONDS_PER_ROW + CPU_SECONDS_PER_MLOGIT * case.tokens * case.V / 1e6
                  for _, _, case, _ in rows)
    return f"{said}: {rough(seconds)} on a CPU"


def rough(seconds):
    """A duration as an order of magnitude: 'under a minute' ... 'ten minutes or more'."""
    for limit, words in ((60, "under a minute"), (150, "a minute or two"), (600, "a few minutes")):
        if seconds < limit:
            return words
    return "ten minutes or more"


def left_out(plan, providers, device):
    """``{name: reason}`` for each provider of the plan that cannot run on ``device`` at all (a
    package not importable, CUDA only), asked of its training step, a mode every provider has."""
    reasons = {}
    for suite in dict.fromkeys(suite for suite, _, _ in plan):
        for p in providers[suite]:
            reason = p.unavailable(device, "fwd_bwd")
            if reason:
                reasons.setdefault(p.name, reason)
    return reasons


def run(plan, providers, device, repeats, ceilings, stem, meta):
    """Every row of the plan, the JSON rewritten after each case (a run cut short keeps what it
    measured), the progress on stderr. Returns the rows and the seconds they took."""
    progress = report.Progress(len(runnable(plan, providers, device)))
    results = []
    for suite, mode, case in plan:
        inputs = make_inputs(case, device)
        fused_values = {}  # per objective: what the fused op gave, for the baselines' agreement
        for provider in providers[suite]:
            if not provider.unavailable(device, mode):
                progress.step(f"{suite} {mode} {case.id} {provider.name}")
            row, value = measure(provider, case, mode, inputs, device, repeats,
                                 fused_values.get(provider.computes), ceilings)
            if provider.name in ("fused", "fused-grpo"):
                fused_values[provider.computes] = value
            results.append(row)
        inputs = fused_values = value = None
        gc.collect()
        report.add_speedups(results)
        report.write_json(stem + ".json", meta, results)
    progress.close()
    return results, progress.elapsed()


if __name__ == "__main__":
    main()
