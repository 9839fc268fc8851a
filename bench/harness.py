"""Timing and memory measurement, the same for every provider."""

import contextlib
import gc
import os
import statistics
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .workloads import bytes_moved, gemm_flops

# The agreement asked of an MHPO provider's result with the fused op's at each benchmarked case:
# the eager reference rounds every step in the logits' dtype, so bf16/fp16 get bf16-sized room.
AGREEMENT = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
# Untimed calls before a row's timed ones, after its first (compiling) call.
WARMUP = 2


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_flusher(device):
    """A callable that evicts the device's L2 (reads a buffer twice its size), or None off CUDA:
    run before each timed call, outside its events, so that no repetition finds the previous
    one's data in L2 (which would flatter a kernel whose point is L2, the one sweep). It reads
    rather than writes: a write would leave L2 full of dirty lines, whose write-back would then
    fall inside the timed call (up to one L2 of extra DRAM traffic, as much as a small call's own)."""
    if device.type != "cuda":
        return None
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    scratch = torch.zeros(2 * l2 // 4, dtype=torch.int32, device=device)
    return lambda: scratch.sum()


def time_ms(fn, device, warmup=3, repeats=10, flush_l2=False, graph=False):
    """Median, 20th and 80th percentile wall time of ``fn`` in ms, after ``warmup`` calls (which
    absorb compilation and autotuning). On CUDA each call is bracketed by device events; with
    ``flush_l2`` the L2 is evicted before each (outside the events); with ``graph`` the call is
    captured once in a CUDA graph and replayed, so that no host launch time falls between the
    events (for kernels alone: a call that syncs cannot be captured)."""
    for _ in range(warmup):
        fn()
    sync(device)
    flush = l2_flusher(device) if flush_l2 else None
    run = fn
    if graph and device.type == "cuda":
        captured = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()                                   # once more on the capture stream, then capture
            with torch.cuda.graph(captured, stream=stream):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        run = captured.replay
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if flush is not None:
                flush()
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[-1]


def peak_memory(fn, device):
    """(peak, extra) bytes of one call of ``fn``: extra is the most it held at once beyond what was
    allocated when it began, peak that plus what was allocated then (the inputs). On CUDA from
    the caching allocator's counters; on the CPU from ``cpu_allocated_peak`` (the profiler's record
    of each allocation and free) and ``cpu_tensor_bytes`` (the tensors alive before the call). The
    CPU reading runs ``fn`` under the profiler: never time the same call."""
    if device.type != "cuda":
        before = cpu_tensor_bytes()
        extra = cpu_allocated_peak(fn)
        return before + extra, extra
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak, peak - before


def cpu_allocated_peak(fn):
    """The largest number of bytes the CPU allocator held for ``fn()`` at any point of one call,
    beyond what it held when the call began: the peak of the running sum of every allocation
    (positive) and free (negative) that torch.profiler records with ``profile_memory``, in the
    order they happened. Memory that never passes through torch's allocator (a BLAS library's own
    scratch) is not seen, nor is the free of a block allocated before the call (the profiler does
    not know its size), so a call that frees its caller's tensors reads high, never low."""
    with _memory_profile() as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _memory_profile():
    """``with profile(activities=[ProfilerActivity.CPU], profile_memory=True)``, its start and
    stop quiet: Kineto writes a line for each (``profiler_start``, ``profiler_stop``) from C++ to
    file descriptor 2, which neither ``sys.stderr`` nor ``KINETO_LOG_LEVEL`` silences. Only those
    two calls run with descriptor 2 on the null device; what runs inside keeps its stderr."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_to_null():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _stderr_to_null():
            prof.__exit__(None, None, None)


@contextlib.contextmanager
def _stderr_to_null():
    """File descriptor 2 on the null device for the block, restored after it (even on an error)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def cpu_tensor_bytes():
    """Bytes of the distinct storages of every CPU tensor reachable from Python: on the CPU, the
    counterpart of ``torch.cuda.memory_allocated`` (tensors held only by C++ are missed)."""
    storages = {}
    for obj in gc.get_objects():
        # type(), not isinstance: no __class__ lookup on proxies, and subclasses such as fake
        # tensors own no memory
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu" and obj.layout == torch.strided:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def copy_bandwidth_gbps(device, nbytes=2 << 30):
    """Device-to-device copy rate, counting bytes read plus bytes written: the practical ceiling
    a memory-bound kernel is measured against. None off CUDA."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device, warmup=3, repeats=20)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def gemm_tflops(device, M=8192, K=4096, N=32768, dtype=torch.bfloat16):
    """Rate of one large GEMM through torch (cuBLAS): the ceiling the fused linear path's three
    GEMMs per chunk are measured against. None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = torch.randn(N, K, device=device, dtype=dtype)
    ms, _, _ = time_ms(lambda: a @ b.T, device, warmup=3, repeats=20)
    del a, b
    torch.cuda.empty_cache()
    return 2 * M * K * N / (ms * 1e-3) / 1e12


def module_version(module):
    """``module.__version__``, or None where it is not installed (or fails to import)."""
    try:
        return __import__(module).__version__
    except Exception:
        return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _agreement(value, fused_value):
    if value is None or fused_value is None:
        return None
    a, b = value.detach().double(), fused_value.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def measure(provider, case, mode, inputs, device, repeats, fused_value, ceilings, flush_l2=False):
    """One row: time, memory, rate and agreement of ``provider`` on ``case`` in ``mode`` (with
    ``flush_l2``, the L2 evicted before each timed call, outside its events)."""
    row = dict(suite=case.suite, provider=provider.name, computes=provider.computes, mode=mode,
               case=case.id, B=case.B, T=case.T, V=case.V, H=case.H, dtype=case.dtype,
               tokens=case.tokens, bytes_model=bytes_moved(case, mode), flops_model=gemm_flops(case, mode),
               status="ok", median_ms=None, p20_ms=None, p80_ms=None, gbps=None, frac_copy_bw=None,
               tflops=None, frac_gemm=None, peak_bytes=None, extra_bytes=None, agreement_with_fused=None)
    reason = provider.unavailable(device, mode)
    if reason:
        row["status"] = f"skipped: {reason}"
        return row, None
    fn = value = None
    try:
        fn = provider.step(inputs, mode)
        value = fn().detach()                          # first call: compilation happens here
        if fused_value is not None and not provider.name.startswith("fused"):
            row["agreement_with_fused"] = _agreement(value, fused_value)  # the fused op of the same objective
        getattr(fn, "release", lambda: None)()
        row["peak_bytes"], row["extra_bytes"] = peak_memory(fn, device)
        row["median_ms"], row["p20_ms"], row["p80_ms"] = time_ms(fn, device, warmup=WARMUP, repeats=repeats,
                                                                     flush_l2=flush_l2)
        seconds = row["median_ms"] * 1e-3
        if row["bytes_model"]:
            row["gbps"] = row["bytes_model"] / seconds / 1e9
            row["frac_copy_bw"] = ceilings["copy_gbps"] and row["gbps"] / ceilings["copy_gbps"]
        if row["flops_model"]:
            row["tflops"] = row["flops_model"] / seconds / 1e12
            row["frac_gemm"] = ceilings["gemm_tflops"] and row["tflops"] / ceilings["gemm_tflops"]
    except torch.cuda.OutOfMemoryError:
        row["status"] = "out of memory"
    except Exception as e:  # a baseline failing at a shape is a result, not a crash of the run
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        fn = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tol = AGREEMENT[case.dtype]
    if row["agreement_with_fused"] is not None and row["agreement_with_fused"] > tol:
        row["status"] = f"disagrees with fused ({row['agreement_with_fused']:.1e})"
    return row, value
