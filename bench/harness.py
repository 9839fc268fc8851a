"""Timing and memory measurement, the same for every provider."""

import gc
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_flusher(device):
    """A callable that evicts the device's L2 (writes a buffer twice its size), or None off CUDA:
    run before each timed call, outside its events, so that no repetition finds the previous
    one's data in L2 (which would flatter a kernel whose point is L2, the one sweep)."""
    if device.type != "cuda":
        return None
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    scratch = torch.empty(2 * l2, dtype=torch.uint8, device=device)
    return scratch.zero_


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
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak


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
