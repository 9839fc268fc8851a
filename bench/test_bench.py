"""pytest-benchmark view of the same comparison: ``pytest bench`` (add --benchmark-json=FILE to
keep the numbers). One test per suite × provider × mode × case; compilation happens in the warm-up rounds
and CUDA is synchronized inside the timed function. On CUDA the headline cases run; without CUDA
one small case, which only checks the harness."""

import pytest
import torch

from bench import harness
from bench.providers import PROVIDERS
from bench.workloads import PRESETS, SUITE_MODES, Case, bytes_moved, gemm_flops, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = PRESETS["headline"] if DEVICE.type == "cuda" else [Case(2, 128, 32000, "fp32"), Case(2, 128, 32000, "fp32", 256)]
PARAMS = [(case, mode, name) for case in CASES for mode in SUITE_MODES[case.suite]
          for name in PROVIDERS[case.suite]]

_inputs = {}


def inputs_for(case):
    """Inputs of one case at a time: the headline cases together would not fit beside their
    gradients."""
    if case not in _inputs:
        _inputs.clear()
        harness.sync(DEVICE)
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        _inputs[case] = make_inputs(case, DEVICE)
    return _inputs[case]


@pytest.mark.parametrize("case, mode, provider", PARAMS,
                         ids=[f"{c.suite}-{p}-{m}-{c.id}" for c, m, p in PARAMS])
def test_bench(benchmark, case, mode, provider):
    provider = PROVIDERS[case.suite][provider]
    reason = provider.unavailable(DEVICE, mode)
    if reason:
        pytest.skip(f"{provider.name}: {reason}")
    step = provider.step(inputs_for(case), mode)

    def timed():
        step()
        harness.sync(DEVICE)

    benchmark.group = f"{case.suite} {mode} {case.id}"
    benchmark.pedantic(timed, warmup_rounds=2, rounds=10 if DEVICE.type == "cuda" else 3, iterations=1)
    median_s = benchmark.stats.stats.median
    nbytes, flops = bytes_moved(case, mode), gemm_flops(case, mode)
    benchmark.extra_info.update(
        device=harness.device_name(DEVICE), suite=case.suite, computes=provider.computes,
        dtype=case.dtype, shape=[case.B, case.T, case.V, case.H], tokens=case.tokens,
        bytes_model=nbytes, gbps=nbytes and nbytes / median_s / 1e9,
        flops_model=flops, tflops=flops and flops / median_s / 1e12,
    )
