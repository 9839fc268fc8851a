"""Timing and memory measurement, the same for every provider."""

import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup=3, repeats=10):
    """Median, 20th and 80th percentile wall time of ``fn`` in ms, after ``warmup`` calls (which
    absorb compilation and autotuning). On CUDA each call is bracketed by device events."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
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
    """(peak bytes allocated during one call of ``fn``, of which beyond what was allocated
    before it: the inputs). None on devices without an allocator to ask."""
    if device.type != "cuda":
        return None, None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak, peak - before


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


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
