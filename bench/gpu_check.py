"""python -m bench.gpu_check STEP [--out DIR] [--dry-run]: the Python steps of bench/gpu_check.sh.

Each step measures one open question and merges its result into DIR/gpu_check.json (one file:
the device call brings back at most 8), so a step cut short by its time limit leaves what the
others measured. ``summary`` prints the table of every step. ``--dry-run`` runs the same code on
the CPU at tiny shapes (the PyTorch path, or the Triton interpreter when TRITON_INTERPRET=1): it
checks that the script works before a GPU is lent, and measures nothing.

Steps: env, smoke (each CUDA-only branch once), warm (every timed call once, in parallel
shares, so that nothing is compiled while timed), headline (the training step of the fused op
against eager, torch.compile and Liger at the acceptance shapes), sweeps (GB/s against N), grid (BLOCK_V × num_warps), align (aligned against
unaligned V), inplace (in place against out of place, bitwise, 100 repeats), compile (a compiled
training step under sync debug mode "error", in a CUDA graph, and its generated code),
verl-mem (the peak memory of each micro-batch of verl's own update step, its logits and
hidden-states paths against ``impl_backend: mhpo``), sanitize-target and ncu-target (the kernels
alone, for compute-sanitizer and ncu). Recording a shell step, ncu's CSV and the summary are
``bench.check_report`` (no torch import).
"""

import argparse
import contextlib
import functools
import gc
import importlib.util
import inspect
import json
import os
import pathlib
import re
import sys
import tempfile
import time
import warnings

import torch

import mhpo_kernels
from mhpo_kernels import _config, _dispatch
from mhpo_kernels._sweep_types import LogitMap, mhpo_token_params

from . import harness, report
from .check_report import HEADLINE, merge
from .providers import PROVIDERS, ModelOutput
from .workloads import DTYPES, Case, make_inputs
SWEEP_ROWS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# BLOCK_V × num_warps, each lane at least 8 elements; the default and its neighbours first, so a
# step cut short keeps the informative ones.
GRID = [(4096, 8), (8192, 8), (2048, 8), (4096, 4), (8192, 16), (16384, 16), (2048, 4), (4096, 16),
        (8192, 4), (16384, 8), (1024, 4), (16384, 4)]
ALIGN_V = ((151936, 151935), (50272, 50257))   # a multiple of 16, and one that is not
ONE_SWEEP_PROGRAMS_PER_SM = (1.0, 1.5, 2.0)
# The headline benchmark: a training step (forward + backward) of each provider, in this order so
# that a step cut short keeps the acceptance case. Each (V, dtype) goes from its middle N to its
# smallest and then its largest, so a baseline's memory at the largest is predicted from a
# measurement (a baseline that cannot fit is recorded as such, not run).
HEADLINE_CASES = [Case(n // 1024, 1024, V, "bf16") for V in (151936, 151935) for n in (8192, 1024, 32768)] + [
    Case(8, 1024, 151936, "fp32")]
HEADLINE_PROVIDERS = ("fused", "fused-grpo", "liger", "eager", "compile")
# What a baseline may take of the device's free memory before it is predicted not to fit.
FIT_SHARE = 0.9
DRY = dict(headline=[Case(1, 8, 300, "fp32"), Case(2, 8, 301, "fp32")], rows=(2, 3), V=300, grid=[(128, 1), (256, 2)], align=((304, 301),), repeats=2, inplace_repeats=3,
           compile_shape=(1, 5, 96, 16))
# verl's update step: a one-layer Llama (H 64, so the logits are all but the whole of a micro-batch's
# memory) with Qwen's vocabulary, 4 sequences of about 4,096 tokens in 2 micro-batches of about
# 8,190 tokens: one fp32 logits tensor is 4.98 GB, verl's counted 7 of them 35 GB. The dry run: V 96,
# micro-batches of about 1,275 tokens, longer than verl's fused torch backend's 512-row tiles, so
# that on the hidden-states path too the count is the prediction's.
VERL_MEM = dict(vocab=151936, hidden=64, batch=4, prompt=1024, response=3072)
DRY_VERL_MEM = dict(vocab=96, hidden=16, batch=4, prompt=256, response=384)
# (name, use_fused_kernels, use_remove_padding, impl_backend), in the order a step cut short keeps
VERL_MEM_CASES = [("logits-rmpad-verl", False, True, "torch"), ("logits-rmpad-mhpo", False, True, "mhpo"),
                  ("hidden-verl-torch", True, True, "torch"), ("hidden-mhpo", True, True, "mhpo"),
                  ("logits-padded-verl", False, False, "torch"), ("logits-padded-mhpo", False, False, "mhpo")]


class Skipped(Exception):
    """A step that cannot run here: recorded as skipped, with the reason, never as a pass."""


# ---- inputs and timing --------------------------------------------------------------------------

def _device(dry):
    return torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")


def _sweep_inputs(n, V, dtype, device, seed=0):
    """Logits (1, n, V) and the per-token inputs of the loss, as the launchers take them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(1, n, V, generator=torch.Generator(device=device).manual_seed(seed), device=device)
              * 2).to(dtype)
    target = torch.randint(0, V, (n,), generator=g, dtype=torch.int32).to(device)
    old = (torch.randn(n, generator=g) - 9).to(device)
    adv = torch.randn(n, generator=g).to(device)
    weight = torch.full((n,), 1.0 / n, device=device)
    return logits, target, old, adv, weight


def _timed(fn, device, repeats, kernels=True):
    """Median ms of ``fn``, the L2 evicted before each repetition. ``kernels``: launches alone,
    replayed from a CUDA graph (no host time between the events); else a whole call (its
    validation's sync included), launched from Python as a trainer does."""
    ms, _, _ = harness.time_ms(fn, device, warmup=2, repeats=repeats, flush_l2=True, graph=kernels)
    return ms


def _two_sweeps(logits, target, old, adv, weight):
    """(forward, backward) closures: sweep 1 with the loss, sweep 2 out of place."""
    fwd, bwd = _dispatch.sweeps(logits.device)
    hp, lmap = mhpo_token_params(), LogitMap.make(1.0)
    stats = fwd(logits, target, old, adv, weight, None, hp, lmap, with_entropy=False, with_loss=True)
    grad = torch.empty_like(logits)

    def forward():
        return fwd(logits, target, old, adv, weight, None, hp, lmap, with_entropy=False, with_loss=True)

    def backward():
        return bwd(logits, grad, target, stats.lse2_base, stats.lse2_rest, stats.coef, None, None, lmap)

    return forward, backward


def _gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def _one_sweep_option():
    """Whether mhpo_loss has a one-sweep (gradient in the forward) option, and the reason if not."""
    if "grad_in_forward" in inspect.signature(mhpo_kernels.mhpo_loss).parameters:
        return None
    return "mhpo_loss has no grad_in_forward option in this version"


def _one_sweep_programs_knob():
    """Whether this version lets the one-sweep kernel's grid (programs per SM) be set for a block
    of launches (``_config.overridden``)."""
    return "programs_per_sm" in inspect.signature(_config.overridden).parameters


def _whole_op(logits, target, old, adv, one_sweep=True, inplace=False):
    """One training call of ``mhpo_loss``, forward and backward, as a trainer makes it: validation,
    the prepare and finalize launches and the sweeps (two, or the one with ``one_sweep``), into a
    gradient buffer or, ``inplace``, into the logits (``providers.ModelOutput``: their storage as a
    model's output; each call then reads the previous call's gradient as its logits, which costs
    the same)."""
    x = logits.detach().requires_grad_()
    shape = logits.shape[:2]
    ids, old, adv = target.long().reshape(shape), old.reshape(shape), adv.reshape(shape)

    def step():
        x.grad = None
        inputs = ModelOutput.apply(x) if inplace else x
        loss = mhpo_kernels.mhpo_loss(inputs, ids, old, adv, grad_in_forward=one_sweep, inplace_backward=inplace)
        loss.backward()
        return loss
    return step


def _one_sweep_step(logits, target, old, adv):
    return _whole_op(logits, target, old, adv, one_sweep=True)


# ---- steps ----------------------------------------------------------------------------------------

def step_env(args):
    device = _device(args.dry_run)
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, triton=harness.module_version("triton"),
               python=sys.version.split()[0], device=harness.device_name(device),
               backend=_dispatch.backend_for(device), one_sweep=_one_sweep_option() or "available")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(sms=props.multi_processor_count, l2_bytes=getattr(props, "L2_cache_size", None),
                   regs_per_sm=getattr(props, "regs_per_multiprocessor", None),
                   threads_per_sm=getattr(props, "max_threads_per_multi_processor", None),
                   total_memory=props.total_memory, copy_gbps=harness.copy_bandwidth_gbps(device))
        for dtype, itemsize in (("bf16", 2), ("fp32", 4)):
            env[f"predicted_rows_to_fill_{dtype}"] = _config.rows_to_fill(props.multi_processor_count,
                                                                          HEADLINE[1], itemsize)
    return env


def step_sweeps(args):
    """GB/s of each sweep against N at V 151,936 bf16 (bytes: forward reads the logits, backward
    reads them and writes the gradient), beside _config's prediction of where it levels off; where
    the launchers split rows (small N), also at one program per row; the one-sweep kernel at 1, 1.5
    and 2 programs per SM."""
    device = _device(args.dry_run)
    rows, V = (DRY["rows"], DRY["V"]) if args.dry_run else (SWEEP_ROWS, HEADLINE[1])
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    repeats = DRY["repeats"] if args.dry_run else 10
    result = {"V": V, "dtype": str(dtype), "rows": []}
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        result["predicted"] = {"rows_to_fill": _config.rows_to_fill(sms, V, dtype.itemsize)}
    one_sweep = _one_sweep_option()
    knob = _one_sweep_programs_knob()
    result["one_sweep"] = one_sweep or "measured"
    for n in rows:
        logits, target, old, adv, weight = _sweep_inputs(n, V, dtype, device)
        forward, backward = _two_sweeps(logits, target, old, adv, weight)
        nbytes = logits.numel() * logits.element_size()
        row = {"N": n, "fwd_ms": _timed(forward, device, repeats), "bwd_ms": _timed(backward, device, repeats)}
        row["fwd_gbps"], row["bwd_gbps"] = _gbps(nbytes, row["fwd_ms"]), _gbps(2 * nbytes, row["bwd_ms"])
        # Rows split over programs below rows_to_fill: the same sweeps at one program per row
        # say what the split bought (the dry run takes this branch too, so it has run before).
        row["row_splits"] = _config.launch_splits(n, V, dtype.itemsize, device)
        if row["row_splits"] > 1 or args.dry_run:
            with _config.overridden(row_splits=1):
                row["fwd_unsplit_ms"] = _timed(forward, device, repeats)
                row["bwd_unsplit_ms"] = _timed(backward, device, repeats)
            row["fwd_unsplit_gbps"] = _gbps(nbytes, row["fwd_unsplit_ms"])
            row["bwd_unsplit_gbps"] = _gbps(2 * nbytes, row["bwd_unsplit_ms"])
        if "predicted" in result:
            row["predicted_row_splits"] = _config.row_splits(n, V, result["predicted"]["rows_to_fill"])
        # One sweep against two like for like: each a whole call, forward and backward, out of
        # place and in place (the kernels-alone times above leave out the call's other launches).
        for sweeps_, one in (("two", False), ("one", True)):
            for place, inplace in (("out", False), ("inplace", True)):
                # In place on a copy: the calls overwrite it with gradients, which every later
                # timing would otherwise read as its logits.
                call = _whole_op(logits.clone() if inplace else logits, target, old, adv, one, inplace)
                ms = _timed(call, device, repeats, kernels=False)
                del call
                row[f"call_{sweeps_}_sweep_{place}_ms"] = ms
                row[f"call_{sweeps_}_sweep_{place}_gbps"] = _gbps((2 if one else 3) * nbytes, ms)
        if one_sweep is None:
            for per_sm in ONE_SWEEP_PROGRAMS_PER_SM if knob else (None,):
                with _config.overridden(programs_per_sm=per_sm) if knob else contextlib.nullcontext():
                    ms = _timed(_one_sweep_step(logits, target, old, adv), device, repeats, kernels=False)
                row[f"one_sweep_{per_sm or 'default'}_ms"] = ms
                row[f"one_sweep_{per_sm or 'default'}_gbps_2pass"] = _gbps(2 * nbytes, ms)
        result["rows"].append(row)
        print(f"N {n}: fwd {row['fwd_gbps']:.0f} GB/s, bwd {row['bwd_gbps']:.0f} GB/s", flush=True)
        del logits, forward, backward
        merge(args.out, "sweeps", result)
    if one_sweep is None and not knob:
        result["one_sweep_programs_per_sm"] = "skipped: _config has no programs-per-SM setting; default grid timed"
    return result


def _predicted_extra(per_token, provider, case):
    """A provider's extra bytes at ``case`` from its largest measured case of the same V parity and
    dtype (its memory grows with the tokens), or None before any."""
    key = (provider, case.V % 16 == 0, case.dtype)
    return per_token[key][1] * case.tokens if key in per_token else None


def step_headline(args):
    """The headline benchmark: a training step (forward + backward) of the fused op, Liger's GRPO
    kernel beside the fused op's GRPO, and the eager and compiled PyTorch reference, at bf16
    N 1,024 / 8,192 / 32,768 × V 151,936 / 151,935 and fp32 8,192 × 151,936, in this process on the
    same inputs. Each whole call is timed from Python as a trainer runs it, with the L2 evicted
    before each repetition; GB/s under the bytes model, % of the copy rate measured here, peak and
    extra memory. A baseline predicted not to fit (its extra memory per token at a smaller N) is
    recorded as such and not run. Writes headline.png beside the JSON."""
    from .providers import compile_dynamic

    device = _device(args.dry_run)
    cases = DRY["headline"] if args.dry_run else HEADLINE_CASES
    repeats = DRY["repeats"] if args.dry_run else 5
    providers = [compile_dynamic() if n == "compile" else PROVIDERS["logits"][n] for n in HEADLINE_PROVIDERS]
    ceilings = {"copy_gbps": harness.copy_bandwidth_gbps(device), "gemm_tflops": None}
    result = {"copy_gbps": ceilings["copy_gbps"], "rows": []}
    per_token = {}
    for case in cases:
        inputs = make_inputs(case, device, extras=False)   # the headline providers read the padded batch alone
        fused_values = {}
        for provider in providers:
            predicted = _predicted_extra(per_token, provider.name, case)
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
            if predicted is not None and free is not None and predicted > FIT_SHARE * free:
                row = dict(provider=provider.name, case=case.id, tokens=case.tokens, V=case.V, dtype=case.dtype,
                           status=f"does not fit: predicted {predicted / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            else:
                row, value = harness.measure(provider, case, "fwd_bwd", inputs, device, repeats,
                                             fused_values.get(provider.computes), ceilings, flush_l2=True)
                if provider.name in ("fused", "fused-grpo"):
                    fused_values[provider.computes] = value
                key = (provider.name, case.V % 16 == 0, case.dtype)
                if row["extra_bytes"] is not None and case.tokens >= per_token.get(key, (0,))[0]:
                    per_token[key] = (case.tokens, row["extra_bytes"] / case.tokens)   # the largest case's
            result["rows"].append(row)
            print(f"{case.id} {provider.name}: {row['status']} {row.get('median_ms') or ''}", flush=True)
        inputs = fused_values = value = None
        gc.collect()
        report.add_speedups([r for r in result["rows"] if "suite" in r])
        merge(args.out, "headline", result)
    result["figure"] = report.headline_plot(os.path.join(args.out, "headline.png"), result)
    return result


def step_grid(args):
    """Both sweeps at the headline case over BLOCK_V × num_warps."""
    device = _device(args.dry_run)
    (n, V), grid = (HEADLINE, GRID) if not args.dry_run else ((DRY["rows"][-1], DRY["V"]), DRY["grid"])
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    repeats = DRY["repeats"] if args.dry_run else 5
    logits, target, old, adv, weight = _sweep_inputs(n, V, dtype, device)
    nbytes = logits.numel() * logits.element_size()
    result = {"N": n, "V": V, "default": [_config.BLOCK_V, _config.NUM_WARPS], "grid": []}
    for block_v, num_warps in grid:
        entry = {"block_v": block_v, "num_warps": num_warps}
        try:
            with _config.overridden(block_v, num_warps):
                forward, backward = _two_sweeps(logits, target, old, adv, weight)
                entry["fwd_gbps"] = _gbps(nbytes, _timed(forward, device, repeats))
                entry["bwd_gbps"] = _gbps(2 * nbytes, _timed(backward, device, repeats))
        except Exception as e:  # a configuration that does not compile is a result
            entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        result["grid"].append(entry)
        merge(args.out, "grid", result)
    return result


def step_align(args):
    """Aligned against unaligned V (a multiple of 16 and one off it), both sweeps."""
    device = _device(args.dry_run)
    n = DRY["rows"][-1] if args.dry_run else 4096
    pairs = DRY["align"] if args.dry_run else ALIGN_V
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    repeats = DRY["repeats"] if args.dry_run else 10
    result = {"N": n, "pairs": []}
    for aligned, unaligned in pairs:
        entry = {}
        for key, V in (("aligned", aligned), ("unaligned", unaligned)):
            logits, target, old, adv, weight = _sweep_inputs(n, V, dtype, device)
            forward, backward = _two_sweeps(logits, target, old, adv, weight)
            nbytes = logits.numel() * logits.element_size()
            entry[key] = {"V": V, "fwd_gbps": _gbps(nbytes, _timed(forward, device, repeats)),
                          "bwd_gbps": _gbps(2 * nbytes, _timed(backward, device, repeats))}
        entry["fwd_ratio"] = entry["unaligned"]["fwd_gbps"] / entry["aligned"]["fwd_gbps"]
        entry["bwd_ratio"] = entry["unaligned"]["bwd_gbps"] / entry["aligned"]["bwd_gbps"]
        result["pairs"].append(entry)
        merge(args.out, "align", result)
    return result


def _logits_case(shape, dtype, device, seed=1):
    B, T, V = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    full = (torch.randn(B, T + 1, V, generator=g) * 2).to(device, dtype)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(device)
    old = (torch.randn(B, T, generator=g) - 9).to(device)
    adv = torch.randn(B, generator=g).to(device)
    return full, ids, mask, old, adv


def step_inplace(args):
    """mhpo_loss forward+backward in place and out of place, 100 times each: every gradient the
    same bits as the first out-of-place one (determinism and in place = out of place)."""
    device = _device(args.dry_run)
    shape = (1, 4, DRY["V"]) if args.dry_run else (2, 1024, HEADLINE[1])
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    repeats = DRY["inplace_repeats"] if args.dry_run else 100
    full, ids, mask, old, adv = _logits_case(shape, dtype, device)
    reference_grad, mismatches, loss_mismatches, first_loss = None, {"out_of_place": 0, "inplace": 0}, 0, None
    for _ in range(repeats):
        for key in ("out_of_place", "inplace"):
            # In place: ``ModelOutput`` stands for the model's output (the op refuses to overwrite
            # a leaf or a view of one); its private copy of the logits becomes their gradient.
            leaf = full.clone().requires_grad_()
            inplace = key == "inplace"
            loss = mhpo_kernels.mhpo_loss(ModelOutput.apply(leaf) if inplace else leaf, ids, old, adv, mask,
                                          inplace_backward=inplace)
            loss.backward()
            grad = leaf.grad
            if reference_grad is None:
                reference_grad, first_loss = grad.clone(), loss.detach().clone()
            mismatches[key] += int(not torch.equal(grad, reference_grad))
            loss_mismatches += int(not torch.equal(loss.detach(), first_loss))
    result = {"shape": list(shape), "repeats": repeats, "grad_mismatches": mismatches,
              "loss_mismatches": loss_mismatches, "bitwise_equal": not any(mismatches.values()) and not loss_mismatches}
    merge(args.out, "inplace", result)   # kept if the fused linear part below runs out of time
    return {**result, "linear_batch_invariant": _linear_batch_invariance(device, args.dry_run)}


def _linear_batch_invariance(device, dry):
    """fused_linear_token_logprobs with batch_invariant=True on this device's GEMMs: a row's
    log-prob, entropy and dhidden row alone, among 700 rows and shifted by 37, compared bitwise
    (and without the flag, for the record)."""
    H, V = (16, DRY["V"]) if dry else (1024, HEADLINE[1])
    dtype = torch.float32 if dry else torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(3)
    hidden = torch.randn(737, H, generator=g).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device, dtype)
    ids = torch.randint(0, V, (737,), generator=g).to(device)

    def run(rows, flag):
        h = hidden[rows].clone().requires_grad_()
        logp, entropy = mhpo_kernels.fused_linear_token_logprobs(h, weight, ids[rows], return_entropy=True,
                                                               batch_invariant=flag)
        (logp.sum() + 0.3 * entropy.sum()).backward()
        return logp.detach(), entropy.detach(), h.grad

    out = {}
    for flag in (True, False):
        among, shifted = run(slice(37, None), flag), run(slice(None), flag)
        equal = all(torch.equal(s[37:], a) for s, a in zip(shifted, among))
        for r in (0, 350, 699):
            alone = run(slice(37 + r, 38 + r), flag)
            equal = equal and all(torch.equal(x[0], a[r]) for x, a in zip(alone, among))
        out["batch_invariant" if flag else "default"] = equal
    return out


def _logits_allocations(code, shape):
    """Lines of inductor's generated code that allocate a buffer of the logits' shape (B, T, V),
    or of its flattened GEMM output (B·T, V), and those that clone or copy one: a compiled step
    that does not copy the logits has exactly the one allocation that makes them (the head's
    GEMM) and no clone."""
    B, T, V = shape
    forms = (f"({B}, {T}, {V})", f"({B * T}, {V})")
    lines = [line.strip() for line in code.splitlines() if any(form in line for form in forms)]
    alloc = [line for line in lines if "empty_strided" in line]
    clones = [line for line in lines if re.search(r"\bclone\b|aten\.copy|\.copy_\(", line)]
    return alloc, clones


def no_logits_copy(alloc, clones):
    """True or False from ``_logits_allocations``'s lines; where none allocates the logits the
    code was not read right, and that is said, not counted as a pass."""
    if not alloc:
        return "undetermined: no allocation of the logits' shape in inductor's code"
    return len(alloc) == 1 and not clones


def _head_step(hidden, weight, ids, old, adv, mask):
    """A trainer's step: the LM head's full logits, the loss with its gradient written in place."""
    logits = hidden @ weight.t()
    return mhpo_kernels.mhpo_loss(logits, ids, old, adv, mask, inplace_backward=True)


def _linear_step(hidden, weight, ids, old, adv, mask):
    return mhpo_kernels.fused_linear_mhpo_loss(hidden[:, :-1], weight, ids, old, adv, mask)


def _head_inputs(shape, dtype, device):
    B, T, V, H = shape
    g = torch.Generator(device="cpu").manual_seed(2)
    hidden = torch.randn(B, T + 1, H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device, dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(device)
    old = (torch.randn(B, T, generator=g) - 9).to(device)
    adv = torch.randn(B, generator=g).to(device)
    return [hidden, weight, ids, old, adv, mask]


def _fwd_bwd(fn, inputs):
    for x in inputs[:2]:
        x.grad = None
    loss = fn(*inputs)
    loss.backward()
    return loss


def _count_syncs(fn):
    """Syncs of one eager call on CUDA, counted by sync debug mode "warn" (one warning each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def step_compile(args):
    """A compiled training step (the head's logits through mhpo_loss in place, and the fused
    linear path): no sync under sync debug mode "error", replayed from a CUDA graph with the
    eager result, and inductor's code allocating the logits once, never cloning them. Eager:
    the syncs of one call (validation's one)."""
    device = _device(args.dry_run)
    cuda = device.type == "cuda"
    shape = DRY["compile_shape"] if args.dry_run else (2, 1024, HEADLINE[1], 1024)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    backend = "eager" if args.dry_run else "inductor"  # dry run: dynamo traces the same graph, fast
    result = {"shape": list(shape), "backend": backend}
    for name, step in (("head_inplace", _head_step), ("fused_linear", _linear_step)):
        entry = result.setdefault(name, {})
        try:
            inputs = _head_inputs(shape, dtype, device)
            eager_loss = _fwd_bwd(step, inputs).detach()
            eager_grads = [x.grad.clone() for x in inputs[:2]]
            if cuda:
                entry["eager_syncs_per_call"] = _count_syncs(lambda: _fwd_bwd(step, inputs))
            torch._dynamo.reset()
            compiled = torch.compile(step, backend=backend, fullgraph=True)
            if cuda:
                from torch._inductor.utils import run_and_get_code
                _, codes = run_and_get_code(lambda: _fwd_bwd(compiled, inputs))
                logits_shape = (shape[0], shape[1] + 1, shape[2]) if name == "head_inplace" else None
                if logits_shape:
                    alloc, clones = _logits_allocations("\n".join(codes), logits_shape)
                    entry.update(logits_allocations=alloc, logits_clones=clones,
                                 no_logits_copy=no_logits_copy(alloc, clones))
            else:
                _fwd_bwd(compiled, inputs)
            compiled_loss = _fwd_bwd(compiled, inputs).detach()
            entry["compiled_equals_eager"] = bool(torch.allclose(compiled_loss, eager_loss, rtol=1e-2, atol=1e-4))
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    _fwd_bwd(compiled, inputs)
                    entry["sync_debug_error_mode"] = "no sync"
                except RuntimeError as e:
                    entry["sync_debug_error_mode"] = f"synced: {str(e).splitlines()[0][:200]}"
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                entry["cuda_graph"] = _graph_replay(compiled, inputs, eager_loss, eager_grads)
            else:
                entry["sync_debug_error_mode"] = entry["cuda_graph"] = "skipped: needs CUDA"
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        merge(args.out, "compile", result)
    torch._dynamo.reset()
    return result


def _graph_replay(compiled, inputs, eager_loss, eager_grads):
    """Capture forward+backward of the compiled step in a CUDA graph, replay it, compare."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            _fwd_bwd(compiled, inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for x in inputs[:2]:
        x.grad = None
    with torch.cuda.graph(graph):
        loss = compiled(*inputs)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    ok = torch.allclose(loss, eager_loss, rtol=1e-2, atol=1e-4) and all(
        torch.allclose(x.grad.float(), g.float(), rtol=5e-2, atol=1e-3) for x, g in zip(inputs[:2], eager_grads))
    return "replayed, equals eager" if ok else "replayed, differs from eager"


class _MicroBatchMemory:
    """``run_actor``'s probe: per micro-batch of verl's update step, from the start of its forward
    to the end of its backward. On CUDA: the allocator's bytes allocated at the start, and its peak
    (``max_memory_allocated`` after a reset). Elsewhere: a ``LogitsCounter`` over the window (the
    logits-sized buffers alive at its peak, and the ops touching one). And the bytes of the LM head's
    output, the logits, where the head's forward runs (the logits path)."""

    def __init__(self, ve, vocab, cuda):
        self.ve, self.vocab, self.cuda = ve, vocab, cuda
        self.windows = []
        self._counter = None
        self._hooked = None

    def _close(self):
        if not self.windows:
            return
        window = self.windows[-1]
        if self.cuda:
            torch.cuda.synchronize()
            window["peak_bytes"] = torch.cuda.max_memory_allocated()
            window["extra_bytes"] = window["peak_bytes"] - window["before_bytes"]
        else:
            self._counter.__exit__(None, None, None)
            window["counted_buffers"] = self._counter.peak
            window["counted_passes"] = sum(self._counter.passes.values())
            self._counter = None

    def micro_batch(self, engine, micro_batch):
        self._close()
        head = engine.module.get_output_embeddings()
        if self._hooked is not head:
            head.register_forward_hook(self._logits)
            self._hooked = head
        tokens = int(micro_batch["input_ids"].offsets()[-1])
        self.windows.append({"tokens": tokens})
        if self.cuda:
            torch.cuda.synchronize()
            self.windows[-1]["before_bytes"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._counter = self.ve.LogitsCounter(self.vocab, tokens)
            self._counter.__enter__()

    def done(self, engine):
        self._close()

    def _logits(self, module, args, output):
        if self.windows:
            self.windows[-1]["logits_shape"] = list(output.shape)
            self.windows[-1]["logits_bytes"] = output.numel() * output.element_size()


def _verl_engine_helpers():
    """tests/_verl_engine.py, which builds verl's actor in this process (its set-up stays out of the
    package), or Skipped with the reason verl cannot be imported here."""
    if importlib.util.find_spec("verl") is None:
        raise Skipped("verl is not installed (its wheels travel in .whl/verl: bench/README.md)")
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)      # where pytest puts it: one module, whoever imports it first
    try:
        import _verl_engine
        from mhpo_kernels.integrations import verl_engine  # noqa: F401  (the switch's hook)
    except ImportError as e:
        raise Skipped(f"verl does not import: {type(e).__name__}: {str(e)[:200]}") from e
    return _verl_engine


def _predicted_buffers(ve, fused, rmpad, backend):
    """Logits-sized buffers alive at the peak of a micro-batch, from the CPU dispatch count: verl's
    logits path and the switch's (ve.VERL_COUNTS, ve.MHPO_COUNTS); none on the hidden-states path,
    whose tiles (chunk × V) are smaller than the logits."""
    if fused:
        return 0
    return ve.MHPO_COUNTS[0] if backend == "mhpo" else ve.VERL_COUNTS[rmpad][0]


def step_verl_mem(args):
    """Per micro-batch of one update step of verl's own actor (ActorRolloutRefWorker, a plain module,
    fp32, the entropy on, τ 0.7): the peak memory of verl's logits path (padding removal on and
    off) and of its hidden-states path with its torch backend, against ``impl_backend: mhpo``,
    beside the peak predicted from the CPU count (logits-sized buffers × bytes of one logits tensor).
    fp32: the count was made there, every logits-sized buffer the size of the logits."""
    device = _device(args.dry_run)
    if device.type != "cuda" and not args.dry_run:
        raise Skipped("needs CUDA (--dry-run: the CPU, tiny shapes, counted instead of measured)")
    ve = _verl_engine_helpers()
    shape = DRY_VERL_MEM if args.dry_run else VERL_MEM
    V = shape["vocab"]
    result = {"shape": dict(shape), "device": harness.device_name(device),
              "measure": "cuda max_memory_allocated" if device.type == "cuda" else "LogitsCounter (CPU dispatch count)",
              "cases": {}}
    with tempfile.TemporaryDirectory() as tmp, ve.verl_in_process(pathlib.Path(tmp), device.type):
        ve.tiny_llama(pathlib.Path(tmp) / "model", vocab=V, hidden=shape["hidden"],
                      max_positions=shape["prompt"] + shape["response"])
        data = ve.rollout_batch(V, batch_size=shape["batch"], prompt_len=shape["prompt"],
                                response_len=shape["response"], temperature=0.7)
        logits_bytes = {}
        for name, fused, rmpad, backend in VERL_MEM_CASES:
            entry = {"use_fused_kernels": fused, "use_remove_padding": rmpad, "impl_backend": backend}
            t0 = time.perf_counter()
            try:
                config = ve.actor_config(pathlib.Path(tmp) / "model", impl_backend=backend, use_remove_padding=rmpad,
                                         use_fused_kernels=fused, entropy_coeff=0.01, batch_size=shape["batch"])
                probe = _MicroBatchMemory(ve, V, device.type == "cuda")
                ve.run_actor(config, data, plain=True, log_prob=False, probe=probe)
                entry.update(_verl_mem_entry(probe.windows, _predicted_buffers(ve, fused, rmpad, backend),
                                             logits_bytes, rmpad, V))
            except Exception as e:  # one case that fails is a result; the others still run
                entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            result["cases"][name] = entry
            if device.type == "cuda":  # the last case's worker, model and optimizer gone before the next
                gc.collect()
                torch.cuda.empty_cache()
            merge(args.out, "verl-mem", result)
            print(f"{name}: {_verl_mem_line(entry)}", flush=True)
    return result


def _verl_mem_entry(windows, predicted, logits_bytes, rmpad, V):
    """The micro-batches' figures, each against one logits tensor of that micro-batch (the head's
    output where it runs; on the hidden-states path, tokens × V fp32, the logits it never makes)."""
    for i, window in enumerate(windows):
        if "logits_bytes" in window:
            logits_bytes.setdefault((rmpad, i), window["logits_bytes"])
        window.setdefault("logits_bytes", logits_bytes.get((rmpad, i), window["tokens"] * V * 4))
        window["predicted_buffers"] = predicted
        window["predicted_extra_bytes"] = predicted * window["logits_bytes"]
        measured = window.get("extra_bytes")
        if measured is None:
            measured = window["counted_buffers"] * window["logits_bytes"]   # the count stands in for bytes
        window["extra_over_logits"] = measured / window["logits_bytes"]
    return {"micro_batches": windows, "predicted_buffers": predicted,
            "extra_over_logits": max(w["extra_over_logits"] for w in windows)}


def _verl_mem_line(entry):
    if "error" in entry:
        return entry["error"]
    return (f"peak extra {entry['extra_over_logits']:.2f} logits tensors per micro-batch "
            f"(predicted {entry['predicted_buffers']})")


def _kernel_cases(dry):
    """(name, dtype, rows, V) for every kernel variant the target scripts launch."""
    V, Vu = (DRY["V"], DRY["V"] + 3) if dry else (5003 * 16, 5003 * 16 + 7)
    return [("bf16", torch.bfloat16, 6, V), ("bf16-unaligned", torch.bfloat16, 6, Vu),
            ("fp32", torch.float32, 5, Vu)]


def _launch_variants(fwd, bwd, n, V, dtype, device, headline):
    """Each variant of the sweeps once on n rows of V ``dtype`` logits; the number of launches."""
    hp = mhpo_token_params(beta=0.1)
    logits, target, old, adv, weight = _sweep_inputs(n, V, dtype, device)
    target[1] = -1                                     # an invalid row
    ref = old + 0.1
    variants = [(LogitMap.make(0.8), True, True)] if headline else [
        (LogitMap.make(0.8), False, False), (LogitMap.make(1.0), True, False),
        (LogitMap.make(0.9), True, True), (LogitMap.make(1.0, 1.0, 30.0), True, True)]
    launches = 0
    for lmap, with_entropy, with_loss in variants:
        stats = fwd(logits, target, old if with_loss else None, adv if with_loss else None,
                    weight if with_loss else None, ref if with_loss else None, hp, lmap,
                    with_entropy=with_entropy, with_loss=with_loss)
        dlogp = stats.coef if with_loss else torch.ones_like(stats.lse2_base)
        dent = torch.full_like(stats.lse2_base, 0.5) if with_entropy and not headline else None
        grad = torch.empty_like(logits)
        bwd(logits, grad, target, stats.lse2_base, stats.lse2_rest, dlogp, stats.entropy if dent is not None else None,
            dent, lmap)
        launches += 2
        if not headline:
            bwd(logits, logits.clone(), target, stats.lse2_base, stats.lse2_rest, dlogp, None, None, lmap)
            inplace = logits.clone()
            bwd(inplace, inplace, target, stats.lse2_base, stats.lse2_rest, dlogp, None, None, lmap)
            launches += 2
    return launches


def step_kernels_once(args, headline=False):
    """Each kernel variant launched once (forward with log-probs, entropy, loss with old and
    reference log-probs, softcap; backward with and without the entropy gradient, in place):
    what compute-sanitizer checks (small shapes) and ncu reads (``headline``: the acceptance
    case, one forward and one backward). The small cases' few rows are split over programs on a
    GPU (``_config.launch_splits``): each runs split and again at one program per row, so that
    both launch shapes are checked."""
    device = _device(args.dry_run)
    fwd, bwd = _dispatch.sweeps(device)
    cases = [("bf16", torch.bfloat16, *HEADLINE)] if headline and not args.dry_run else _kernel_cases(args.dry_run)
    launches = 0
    for _, dtype, n, V in cases:
        for split in (None,) if headline else (None, 1):
            with _config.overridden(row_splits=split):
                launches += _launch_variants(fwd, bwd, n, V, dtype, device, headline)
    harness.sync(device)
    return {"launches": launches}


def step_smoke(args):
    """Each branch that only CUDA takes, once at a tiny shape, against its PyTorch meaning: the
    fused linear path's fp32-output GEMM from bf16 operands, its ``nonzero_static`` compaction,
    and the device-side rescale of a gradient computed in the forward (untouched when the
    upstream gradient is the one expected, scaled at valid rows otherwise)."""
    from mhpo_kernels import linear_sweeps

    device = _device(args.dry_run)
    g = torch.Generator().manual_seed(0)
    result = {"device": device.type}
    a, b = torch.randn(64, 32, generator=g).to(device, torch.bfloat16), torch.randn(32, 48, generator=g).to(device, torch.bfloat16)
    acc = torch.zeros(64, 48, device=device)
    linear_sweeps._addmm_fp32(acc, a, b)
    expected = a.double() @ b.double()
    result["addmm_fp32_out"] = dict(taken=linear_sweeps._has_fp32_out_addmm(device.type, torch.bfloat16),
                                    max_rel_err=float(((acc.double() - expected).abs().max() / expected.abs().max())))
    target = torch.tensor([3, -1, 0, -1, 7, 2], device=device)
    kept = linear_sweeps._valid_rows(target, 4)
    result["nonzero_static"] = dict(equal=bool(torch.equal(kept.cpu(), torch.tensor([0, 2, 4, 5]))))
    grad = torch.randn(1, 6, 40, generator=g).to(device)
    scale_rows = _dispatch.kernel("scale_rows", device)
    ids = target.to(torch.int32)
    kept_grad = grad.clone()
    scale_rows(kept_grad, ids, torch.tensor(0.5, device=device), 0.5)
    scaled = grad.clone()
    scale_rows(scaled, ids, torch.tensor(0.25, device=device), 0.5)
    rows = (ids >= 0).cpu()
    result["rescale"] = dict(untouched_when_expected=bool(torch.equal(kept_grad, grad)),
                             scaled_at_valid_rows=bool(torch.equal(scaled[0, rows].cpu(), (grad[0, rows] * 0.5).cpu())),
                             invalid_rows_untouched=bool(torch.equal(scaled[0, ~rows].cpu(), grad[0, ~rows].cpu())))
    harness.sync(device)
    return result


def _warm_calls(device, dry):
    """Every whole call the timed steps make, on few rows (the kernels' compiled variant depends
    on V, the dtype and the flags, not on N, strides or batch shape), as zero-argument callables:
    two sweeps and one, in place and out of place, at the headline V and its unaligned neighbour
    in bf16 and at the headline V in fp32, on rows that are split (8) and rows that are not."""
    V = DRY["V"] if dry else HEADLINE[1]
    cases = [(torch.bfloat16, V), (torch.bfloat16, V - 1), (torch.float32, V)]
    calls = _warm_baselines(device, dry)
    for dtype, v in cases:
        for n in ((2,) if dry else (8, 1024)):
            for one, inplace in ((False, False), (False, True), (True, False), (True, True)):
                def call(dtype=dtype, v=v, n=n, one=one, inplace=inplace):
                    logits, target, old, adv, _ = _sweep_inputs(n, v, dtype, device)
                    _whole_op(logits, target, old, adv, one, inplace)()
                calls.append(call)
    return calls + _warm_sweeps(device, dry)


def _warm_sweeps(device, dry):
    """The sweeps the grid, align, sanitizer and ncu steps launch, on few rows split as the steps'
    rows will be: each BLOCK_V × num_warps of the grid and both V of each align pair (bf16, the
    two sweeps), every variant of the kernel cases, split and at one program per row, and the ncu
    case's."""
    V, dtype = (DRY["V"], torch.float32) if dry else (HEADLINE[1], torch.bfloat16)
    calls = []

    def sweeps(v, rows, config=()):  # 8 rows, launched as the step's rows are
        with _config.overridden(*config), _split_as(rows, v, dtype, device):
            forward, backward = _two_sweeps(*_sweep_inputs(8, v, dtype, device))
            forward(), backward()

    n_grid, n_align = (DRY["rows"][-1], DRY["rows"][-1]) if dry else (HEADLINE[0], 4096)
    for config in (DRY["grid"] if dry else GRID):
        calls.append(functools.partial(sweeps, V, n_grid, config))
    for v in [v for pair in (DRY["align"] if dry else ALIGN_V) for v in pair]:
        calls.append(functools.partial(sweeps, v, n_align))

    def variants(case_dtype, n, v, split, headline=False):
        with _config.overridden(row_splits=split):
            _launch_variants(*_dispatch.sweeps(device), n, v, case_dtype, device, headline)

    for _, case_dtype, n, v in _kernel_cases(dry):
        for split in (None, 1):
            calls.append(functools.partial(variants, case_dtype, n, v, split))
    calls.append(functools.partial(variants, torch.bfloat16, 8, V,
                                   _config.launch_splits(HEADLINE[0], V, 2, device), headline=True))
    return calls


def _split_as(rows, V, dtype, device):
    """Launches split as ``rows`` rows of V would be on ``device``: warm's few rows compile the
    variant the step's rows take (SPLIT is a constexpr; few rows split on a GPU, thousands not)."""
    return _config.overridden(row_splits=_config.launch_splits(rows, V, dtype.itemsize, device))


def _warm_baselines(device, dry):
    """The headline step's baselines once each, first in the list so that the shares compile
    them in parallel: at a small shape the compiled reference (``dynamic=True``: batch 1 and 2 are
    its two graphs, since a size of 1 is specialized, for each dtype; inductor keeps them in its
    on-disk cache) and the fused GRPO Liger is compared with; Liger's kernel at one sequence of
    each of the headline's own lengths, vocabularies and dtypes."""
    from .providers import compile_dynamic

    V = DRY["V"] if dry else HEADLINE[1]
    small = [Case(1, 8, V, "bf16"), Case(2, 8, V, "bf16"), Case(2, 8, V, "fp32"), Case(1, 8, V - 1, "bf16"),
             Case(2, 8, V - 1, "bf16")]
    liger = PROVIDERS["logits"]["liger"]
    # Liger's kernels take the sequence length and the vocabulary as compile-time constants (not
    # the batch): warmed at T = 8, the headline's first call of each case would compile them
    # again. One sequence of each headline (T, V, dtype) keeps the warm step's memory small.
    headline = list(dict.fromkeys(Case(1, c.T, c.V, c.dtype) for c in HEADLINE_CASES))
    calls = []
    for provider in (compile_dynamic(), liger, PROVIDERS["logits"]["fused-grpo"], PROVIDERS["logits"]["fused"]):
        if provider.unavailable(device, "fwd_bwd"):
            continue
        for case in headline if provider is liger and not dry else small:
            def call(provider=provider, case=case):
                with _split_as(HEADLINE[0], case.V, DTYPES[case.dtype], device):
                    provider.step(make_inputs(case, device, extras=False), "fwd_bwd")()
            calls.append(call)
    return calls


def step_warm(args):
    """This process's share (``--part`` of ``--of``) of the calls every timed step makes, each
    once, so that Triton compiles their kernels before any step is timed: the shell runs the
    shares in parallel, one process per core, into the shared Triton cache."""
    device = _device(args.dry_run)
    calls = _warm_calls(device, args.dry_run)[args.part::args.of]
    t0 = time.perf_counter()
    errors = []
    for call in calls:   # one that fails (a grid configuration that does not compile) is its step's result
        try:
            call()
        except Exception as e:
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    harness.sync(device)
    if errors and args.dry_run:   # on the CPU every call must run
        raise RuntimeError(errors[0])
    return {"calls": len(calls), "errors": errors, "seconds": round(time.perf_counter() - t0, 2)}


STEPS = {"smoke": step_smoke, "env": step_env, "headline": step_headline, "sweeps": step_sweeps, "grid": step_grid, "align": step_align,
         "inplace": step_inplace, "compile": step_compile, "verl-mem": step_verl_mem,
         "sanitize-target": step_kernels_once, "warm": step_warm,
         "ncu-target": lambda a: step_kernels_once(a, headline=True)}
# Run under a tool (its log is the result), or in parallel shares (the shell records the step).
UNSTORED = ("sanitize-target", "ncu-target", "warm")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=sorted(STEPS) + ["dry-run"])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script, measures nothing")
    parser.add_argument("--part", type=int, default=0, help="warm: this process's share, 0 … of − 1")
    parser.add_argument("--of", type=int, default=1, help="warm: the number of shares")
    parser.add_argument("--skip", action="append", default=[], choices=sorted(STEPS),
                        help="dry-run: leave this step out (repeatable)")
    args = parser.parse_args(argv)
    if args.step == "dry-run":  # every step once, in this process
        args.dry_run = True
        for step in STEPS:
            if step not in args.skip:
                _run(step, args)
    else:
        result = _run(args.step, args)
        if args.step in UNSTORED and result["status"] == "error":
            sys.exit(2)   # run under a tool or in shares: the shell records the exit status alone


def _run(step, args):
    t0 = time.perf_counter()
    try:
        result = {**STEPS[step](args), "status": "ok"}
    except Skipped as e:
        result = {"status": f"skipped: {e}"}
    except Exception as e:  # recorded, and the shell goes on to the next step
        result = {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if step in UNSTORED:
        print(json.dumps(result))
    else:
        merge(args.out, step, result)
        print(f"{step}: {result['status']}", flush=True)
    return result


if __name__ == "__main__":
    main()
