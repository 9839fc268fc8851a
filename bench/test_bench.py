"""pytest-benchmark view of the same comparison: ``pytest bench`` (add --benchmark-json=FILE to
keep the numbers). One test per provider × mode × case; compilation happens in the warm-up rounds
and CUDA is synchronized inside the timed function. On CUDA the headline cases run; without CUDA
one small case, which only checks the harness."""

import pytest
import torch

from bench import harness
from bench.providers import PROVIDERS
from bench.workloads import MODES, PRESETS, Case, bytes_moved, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = PRESETS["headline"] if DEVICE.type == "cuda" else [Case(2, 128, 32000, "fp32")]

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


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_bench(benchmark, provider, mode, case):
    provider = PROVIDERS[provider]
    reason = provider.unavailable(DEVICE)
    if reason:
        pytest.skip(f"{provider.name}: {reason}")
    step = provider.step(inputs_for(case), mode)

    def timed():
        step()
        harness.sync(DEVICE)

    benchmark.group = f"{mode} {case.id}"
    benchmark.pedantic(timed, warmup_rounds=2, rounds=10 if DEVICE.type == "cuda" else 3, iterations=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=harness.device_name(DEVICE), computes=provider.computes, dtype=case.dtype,
        shape=[case.B, case.T, case.V], tokens=case.tokens, bytes_model=bytes_moved(case, mode),
        gbps=bytes_moved(case, mode) / median_s / 1e9,
    )
