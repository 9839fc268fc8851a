"""The sampler's truncated distribution (SPEC.md, section 9): the float64 oracle against a
brute-force one, and ``token_logprobs(min_p=...)`` on the Triton kernels and the PyTorch path
against the oracle.

Inputs keep every value away from the kept set's cutoff: logits on a grid of 1/8 and a min_p
whose log sits an odd multiple of 1/16 below the maximum (never within 1/16 of a logit, far
beyond fp32 rounding), so the kept set is the same in fp32 and float64."""

import math

import pytest
import torch

import mhpo_kernels
import reference
from _cases import FP32_RTOL

BACKENDS = ["triton", "torch"]
MIN_P = math.exp(-2.5625)   # ln min_p = −41/16: an odd multiple of 1/16


def _brute_force(z, top_k=None, top_p=None, min_p=None):
    """The kept set of one row, by the sampler's steps written out token by token (distinct values)."""
    z = z.tolist()
    kept = set(range(len(z)))
    if min_p is not None and min_p > 0:
        top = max(z)
        kept = {v for v in kept if math.exp(z[v] - top) >= min_p}
    if top_k is not None and top_k > 0:
        kth = sorted((z[v] for v in kept), reverse=True)[min(top_k, len(kept)) - 1]
        kept = {v for v in kept if z[v] >= kth}
    if top_p is not None and top_p < 1:
        norm = sum(math.exp(z[v]) for v in kept)
        cumulative = 0.0
        for v in sorted(kept, key=lambda v: z[v])[:-1]:     # the largest is always kept
            cumulative += math.exp(z[v]) / norm
            if cumulative <= 1 - top_p:
                kept.discard(v)
    return kept


@pytest.mark.parametrize("filters", [dict(top_k=3), dict(top_p=0.7), dict(min_p=0.05), dict(top_k=1),
                                     dict(min_p=0.02, top_k=6, top_p=0.9), dict(top_k=-1, top_p=1.0, min_p=0.0)])
def test_kept_set_is_the_samplers(filters):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 40, generator=g, dtype=torch.float64) * 2
    keep = reference.kept_set(z, **filters)
    for row in range(z.shape[0]):
        assert set(keep[row].nonzero().flatten().tolist()) == _brute_force(z[row], **filters), row


def test_ties_are_kept_or_dropped_together():
    z = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    assert reference.kept_set(z, top_k=2).tolist() == [[True, True, True, True, False]]   # ties with the 2nd
    # ascending: 0 (p ≈ .07), then the three 1's together (cumulative ≈ .46), then 3
    p = torch.softmax(z, -1)[0]
    below = float(p[4] + 3 * p[1])
    assert reference.kept_set(z, top_p=1 - below + 1e-9).tolist() == [[True, True, True, True, False]]
    assert reference.kept_set(z, top_p=1 - below - 1e-9).tolist() == [[True, False, False, False, False]]


def _grid_logits(B, T, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-48, 48, (B, T, V), generator=g) / 8.0).to(dtype)


def _ids_with_some_outside(x, min_p, seed):
    """Targets: random, and on every third row the row's smallest logit (outside any cut)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, x.shape[-1], x.shape[:-1], generator=g)
    low = x.float().argmin(-1)
    ids.view(-1)[::3] = low.reshape(-1)[::3]
    return ids


def _run(fn, x, ids, upstream, **kw):
    """(logp, entropy, ∂(Σ u·logp where finite + Σ H)/∂x) of ``fn``."""
    x = x.clone().requires_grad_()
    logp, ent = fn(x, ids, return_entropy=True, **kw)
    (torch.where(logp.isinf(), 0.0, logp * upstream).sum() + (0.5 * ent).sum()).backward()
    return logp.detach(), ent.detach(), x.grad


def _close(got, want, rtol=FP32_RTOL):
    both_inf = got.isinf() & want.isinf() & (got.sign() == want.sign())
    assert torch.equal(got.isinf(), want.isinf())
    err = torch.where(both_inf, 0.0, (got.double() - want).abs())
    assert err.max().item() <= rtol * max([1.0] + want[~both_inf].abs().tolist())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "shifted", "flat", "per-token", "temperature"])
def test_min_p_logprobs_entropy_and_gradient(backend, layout):
    B, T, V = 2, 3, 300
    x = _grid_logits(B, T + (layout == "shifted"), V, seed=1)
    ids = _ids_with_some_outside(x[:, :T], MIN_P, seed=2)
    kw = dict(min_p=MIN_P)
    if layout == "flat":
        x, ids = x.reshape(B * T, V), ids.reshape(-1)
    if layout == "per-token":  # per-token values: on, off (0 and below) and 1 (the largest only)
        kw["min_p"] = torch.tensor([[MIN_P, 0.0, 1.0], [-1.0, MIN_P, MIN_P / 4]])
    if layout == "temperature":  # τ = 2 keeps z on a grid of 1/16, the cut at an odd multiple of 1/32 below
        kw = dict(min_p=math.exp(-2.53125), temperature=torch.full((B, T), 2.0))
    upstream = torch.linspace(-1.0, 2.0, ids.numel()).reshape(ids.shape)
    with mhpo_kernels.use_backend(backend):
        logp, ent, grad = _run(mhpo_kernels.token_logprobs, x, ids, upstream, **kw)
    want_logp, want_ent, want_grad = _run(reference.token_logprobs, x.double(), ids, upstream.double(), **kw)
    assert logp.isinf().any(), "the inputs must put some target outside the kept set"
    _close(logp, want_logp)
    _close(ent, want_ent)
    _close(grad, want_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_outside_has_no_logprob_gradient(backend):
    x = _grid_logits(1, 4, 200, seed=3)
    ids = x[0].argmin(-1).unsqueeze(0)              # every target outside the kept set
    with mhpo_kernels.use_backend(backend):
        xx = x.clone().requires_grad_()
        logp = mhpo_kernels.token_logprobs(xx, ids, min_p=MIN_P)
        assert torch.all(logp == -math.inf)
        logp.sum().backward()                          # −inf, differentiated anyway
    assert torch.equal(xx.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logits(backend):
    x = _grid_logits(2, 2, 1000, seed=4, dtype=torch.bfloat16)   # the grid is exact in bf16
    ids = _ids_with_some_outside(x, MIN_P, seed=5)
    upstream = torch.ones(ids.shape)
    with mhpo_kernels.use_backend(backend):
        logp, ent, grad = _run(mhpo_kernels.token_logprobs, x, ids, upstream, min_p=MIN_P)
    want_logp, want_ent, want_grad = _run(reference.token_logprobs, x.double(), ids, upstream.double(), min_p=MIN_P)
    _close(logp, want_logp)
    _close(ent, want_ent)
    # the gradient is stored in bf16: one rounding of each element (2⁻⁷ under the interpreter's truncation)
    assert torch.allclose(grad.double(), want_grad, rtol=2.0**-7, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_is_the_untruncated_call(backend):
    x = torch.randn(2, 3, 500, generator=torch.Generator().manual_seed(6))
    ids = torch.randint(0, 500, (2, 3), generator=torch.Generator().manual_seed(7))
    with mhpo_kernels.use_backend(backend):
        base = mhpo_kernels.token_logprobs(x, ids, return_entropy=True)
        for off in (None, 0.0, -1.0):
            got = mhpo_kernels.token_logprobs(x, ids, return_entropy=True, min_p=off)
            assert all(torch.equal(a, b) for a, b in zip(base, got)), off
        # a tensor whose every value is off: a second pass on no row, the same values
        got = mhpo_kernels.token_logprobs(x, ids, return_entropy=True, min_p=torch.zeros(2, 3))
        assert all(torch.allclose(a, b, rtol=FP32_RTOL, atol=0) for a, b in zip(base, got))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows(backend):
    x = _grid_logits(1, 4, 300, seed=8)
    ids = x.argmax(-1)          # inside the kept set of every finite row
    x[0, 1, 7] = float("nan")
    x[0, 2, 9] = float("inf")
    with mhpo_kernels.use_backend(backend):
        logp, ent = mhpo_kernels.token_logprobs(x, ids, min_p=MIN_P, return_entropy=True)
    want_logp, want_ent = reference.token_logprobs(x.double(), ids, min_p=MIN_P, return_entropy=True)
    assert torch.equal(logp.isnan(), want_logp.isnan()) and logp[0, 1:3].isnan().all()
    assert torch.equal(ent.isnan(), want_ent.isnan()) and ent[0, 1:3].isnan().all()
    finite = ~want_logp.isnan()
    assert finite.sum() == 2
    _close(logp[finite], want_logp[finite])
    _close(ent[finite], want_ent[finite])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward(backend):
    x = _grid_logits(2, 3, 300, seed=9)
    ids = _ids_with_some_outside(x, MIN_P, seed=10)
    with mhpo_kernels.use_backend(backend):
        grads = []
        for inplace in (False, True):
            leaf = x.clone().requires_grad_()
            logits = leaf * 1.0
            logits.retain_grad()
            logp, ent = mhpo_kernels.token_logprobs(logits, ids, min_p=MIN_P, return_entropy=True,
                                                    inplace_backward=inplace)
            (torch.where(logp.isinf(), 0.0, logp).sum() + ent.sum()).backward()
            grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_p_values_are_checked(backend):
    x = torch.randn(1, 3, 50)
    ids = torch.tensor([[1, 2, -100]])
    with mhpo_kernels.use_backend(backend):
        for bad, error in ((1.5, ValueError), (float("nan"), ValueError), (True, TypeError), ("0.1", TypeError),
                           (torch.tensor([[0.1, 2.0, 0.1]]), ValueError),
                           (torch.tensor([[float("nan"), 0.1, 0.1]]), ValueError),
                           (torch.tensor([[1, 0, 0]]), TypeError), (torch.full((1, 2), 0.1), ValueError)):
            with pytest.raises(error, match="min_p"):
                mhpo_kernels.token_logprobs(x, ids, min_p=bad)
        # an invalid token's value is never read
        mhpo_kernels.token_logprobs(x, ids, min_p=torch.tensor([[0.1, 0.1, float("nan")]]))
