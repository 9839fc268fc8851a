"""The PyTorch path's working memory: what the two sweeps allocate beyond their inputs and outputs
stays within ``torch_sweeps.BLOCK_COPIES`` blocks of ``BLOCK_ELEMENTS`` fp32 whatever the number of
rows (the sweeps take blocks of rows). Measured by the benchmark's CPU reading
(``bench.harness.cpu_allocated_peak``: the peak of the running sum of every allocation and free
the profiler records)."""

import pytest
import torch

from bench.harness import cpu_allocated_peak
from mhpo_kernels import torch_sweeps
from mhpo_kernels._sweep_types import LogitMap, mhpo_token_params


@pytest.mark.parametrize("with_entropy, softcap", [(False, None), (True, 30.0)], ids=["plain", "entropy-softcap"])
@pytest.mark.parametrize("rows, V", [(160, 1000), (480, 1000), (16, 40000)])
def test_sweeps_stay_within_a_few_blocks(with_entropy, softcap, rows, V):
    """The variant with the most temporaries (entropy and softcap) and the one with the fewest, at
    two row counts (5 and 15 blocks of 32 rows a sequence), and at a V past a block's elements
    (a block is then one row)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, rows // 2, V, generator=g) * 3
    target = torch.randint(0, V, (rows,), generator=g, dtype=torch.int32)
    old, adv, weight = torch.randn(rows, generator=g) - 7, torch.randn(rows, generator=g), torch.full((rows,), 0.01)
    hp, lmap = mhpo_token_params(), LogitMap.make(0.9, 1.0, softcap)

    def forward():
        return torch_sweeps.mhpo_fwd(x, target, old, adv, weight, None, hp, lmap, with_entropy=with_entropy,
                                     with_loss=True)

    stats = forward()
    grad = torch.empty_like(x)
    dent = torch.randn(rows, generator=g) if with_entropy else None

    def backward():
        torch_sweeps.mhpo_bwd(x, grad, target, stats.lse2_base, stats.lse2_rest, stats.coef, stats.entropy, dent, lmap)

    outputs = (8 * 4 + 12 * 8) * rows  # the 8 fp32 vectors sweep 1 returns, the epilogue's float64 ones
    for sweep in (forward, backward):
        peak = cpu_allocated_peak(sweep)
        block = max(torch_sweeps.BLOCK_ELEMENTS, V + 1) * 4
        assert V * 4 <= peak <= torch_sweeps.BLOCK_COPIES * block + outputs, (sweep.__name__, peak / block)
