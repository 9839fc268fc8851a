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
        # a 0-d tensor is one value for every token, as a number is
        one = mhpo_kernels.token_logprobs(x, ids, return_entropy=True, min_p=0.2)
        got = mhpo_kernels.token_logprobs(x, ids, return_entropy=True, min_p=torch.tensor(0.2))
        assert all(torch.equal(a, b) for a, b in zip(one, got))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows(backend):
    x = _grid_logits(1, 5, 300, seed=8)
    ids = x.argmax(-1)          # inside the kept set of every finite row
    x[0, 1, 7] = float("nan")
    x[0, 2, 9] = float("inf")
    x[0, 3] = float("nan")      # an invalid token's row: never read
    ids[0, 3] = -100
    x[0, 4] = float("-inf")     # only −inf: NaN, as without truncation
    with mhpo_kernels.use_backend(backend):
        xx = x.clone().requires_grad_()
        logp, ent = mhpo_kernels.token_logprobs(xx, ids, min_p=MIN_P, return_entropy=True)
        (logp + ent).sum().backward()
    assert logp[0, 3] == 0 and ent[0, 3] == 0 and torch.equal(xx.grad[0, 3], torch.zeros(300))
    assert torch.isfinite(xx.grad[0, 0]).all()
    want_logp, want_ent = reference.token_logprobs(x.double(), ids, min_p=MIN_P, return_entropy=True)
    assert torch.equal(logp.isnan(), want_logp.isnan()) and logp[0, [1, 2, 4]].isnan().all()
    assert torch.equal(ent.isnan(), want_ent.isnan()) and ent[0, [1, 2, 4]].isnan().all()
    assert xx.grad[0, 4].isnan().all()
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


def _loss_inputs(seed, B=3, T=5, V=200):
    """Grid logits; targets among each row's three largest logits (inside the kept set), and on a
    few rows the smallest (outside); NaN logits and old log-probs at the masked tokens."""
    g = torch.Generator().manual_seed(seed)
    x = _grid_logits(B, T, V, seed)
    top3 = x.topk(3, -1).indices
    ids = top3.gather(-1, torch.randint(0, 3, (B, T, 1), generator=g)).squeeze(-1)
    ids[0, ::2] = x[0, ::2].argmin(-1)
    ids[2, 3] = x[2, 3].argmin(-1)
    mask = torch.rand(B, T, generator=g) > 0.15
    old = -torch.rand(B, T, generator=g) * 3 - 0.05
    x[~mask], old[~mask] = float("nan"), float("nan")     # garbage at invalid tokens: never read
    return dict(x=x, ids=ids, old=old, adv=torch.randn(B, generator=g), mask=mask,
                ref=-torch.rand(B, T, generator=g) * 3 - 0.05)


def _loss_and_grad(fn, x, *args, **kw):
    x = x.clone().requires_grad_()
    loss, metrics = fn(x, *args, return_metrics=True, **kw)
    loss.backward()
    return loss.detach(), metrics, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["mhpo", "ppo-clip", "gspo"])
def test_losses_leave_out_targets_outside_the_kept_set(backend, objective):
    """Every aggregation mode, a reference KL term and an entropy bonus: the loss, its gradient and
    the metrics (outside_support among them) equal the float64 reference, in which a target
    outside the kept set is an invalid token."""
    from mhpo_kernels.objectives import GSPO, MHPO, PPOClip

    chosen = {"mhpo": MHPO(), "ppo-clip": PPOClip(0.2, 0.28), "gspo": GSPO()}[objective]
    c = _loss_inputs(seed=11)
    for mode in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum"):
        kw = dict(objective=chosen, loss_agg_mode=mode, ref_logprobs=c["ref"], beta=0.05, entropy_coef=0.01,
                  min_p=MIN_P, normalizer=4.0 if mode == "seq-mean-token-sum" else None)
        with mhpo_kernels.use_backend(backend):
            loss, metrics, grad = _loss_and_grad(mhpo_kernels.policy_loss, c["x"], c["ids"], c["old"], c["adv"],
                                                 c["mask"], **kw)
        kw["ref_logprobs"] = c["ref"].double()
        want, want_metrics, want_grad = _loss_and_grad(reference.policy_loss, c["x"].double(), c["ids"],
                                                       c["old"].double(), c["adv"].double(), c["mask"], **kw)
        assert 0 < want_metrics["outside_support"] < 0.5
        assert loss.item() == pytest.approx(want.item(), rel=FP32_RTOL, abs=FP32_RTOL)
        _close(grad, want_grad)
        assert "outside_support" in metrics and set(metrics) <= set(want_metrics), mode  # ψ, ζ: MHPO's only
        for name, value in metrics.items():
            assert value.item() == pytest.approx(want_metrics[name].item(), rel=FP32_RTOL, abs=FP32_RTOL), (mode, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_per_token_min_p_and_the_module(backend):
    """A packed stream with one min_p per token, through MHPOLoss.forward, equals the reference
    of the same stream."""
    c = _loss_inputs(seed=12)
    keep = c["mask"].reshape(-1)
    x, ids = c["x"].reshape(-1, c["x"].shape[-1])[keep], c["ids"].reshape(-1)[keep]
    old = c["old"].reshape(-1)[keep]
    lengths = c["mask"].sum(-1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    min_p = torch.where(torch.arange(ids.numel()) % 4 == 0, 0.0, MIN_P)   # a quarter of the tokens untruncated
    module = mhpo_kernels.MHPOLoss(loss_agg_mode="token-mean")
    with mhpo_kernels.use_backend(backend):
        loss, metrics, grad = _loss_and_grad(module, x, ids, old, c["adv"], cu_seqlens=cu, min_p=min_p)
    want, want_metrics, want_grad = _loss_and_grad(reference.mhpo_loss, x.double(), ids, old.double(),
                                                   c["adv"].double(), cu_seqlens=cu, min_p=min_p,
                                                   loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx(want.item(), rel=FP32_RTOL, abs=FP32_RTOL)
    _close(grad, want_grad)
    assert metrics["outside_support"].item() == pytest.approx(want_metrics["outside_support"].item(), abs=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outside_support_is_reported_when_min_p_is_off(backend):
    c = _loss_inputs(seed=15)
    with mhpo_kernels.use_backend(backend):
        _, metrics = mhpo_kernels.mhpo_loss(c["x"], c["ids"], c["old"], c["adv"], c["mask"], min_p=0.0,
                                            return_metrics=True)
    _, want = reference.mhpo_loss(c["x"].double(), c["ids"], c["old"].double(), c["adv"].double(), c["mask"],
                                  min_p=0.0, return_metrics=True)
    assert metrics["outside_support"].item() == want["outside_support"].item() == 0.0


def test_truncated_loss_refusals():
    c = _loss_inputs(seed=13)
    args = (c["x"], c["ids"], c["old"], c["adv"], c["mask"])
    with pytest.raises(NotImplementedError, match="seq_valid_tokens"):
        mhpo_kernels.mhpo_loss(*args, min_p=MIN_P, seq_valid_tokens=torch.full((3,), 5))
    with pytest.raises(ValueError, match="grad_in_forward=True is not supported with min_p"):
        mhpo_kernels.mhpo_loss(c["x"].clone().requires_grad_(), *args[1:], min_p=MIN_P, grad_in_forward=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 8.0])
def test_fused_linear_token_logprobs(backend, softcap):
    """From hidden states and the head, chunked: the log-probs, entropy and the gradients of
    hidden, weight and bias equal the float64 reference of the logits they make (no logit within
    1e-4 of its row's cut, checked)."""
    g = torch.Generator().manual_seed(14)
    N, H, V = 7, 8, 120
    hidden = torch.eye(H)[torch.randint(0, H, (N,), generator=g)] * 2.0
    weight = torch.randint(-24, 24, (V, H), generator=g) / 16.0
    bias = torch.randint(-8, 8, (V,), generator=g) / 16.0
    ids = (hidden @ weight.T + bias).topk(2, -1).indices[:, 1]
    ids[::3] = (hidden @ weight.T + bias)[::3].argmin(-1)
    upstream = torch.linspace(-1.0, 1.0, N)
    min_p = math.exp(-1.03125)
    z = (hidden @ weight.T + bias).double()
    z = z if softcap is None else softcap * torch.tanh(z / softcap)
    assert (z - (z.amax(-1, keepdim=True) + math.log(min_p))).abs().min() > 1e-4

    def run(fn, h, w, b):
        h, w, b = (t.clone().requires_grad_() for t in (h, w, b))
        logp, ent = fn(h, w, b)
        (torch.where(logp.isinf(), 0.0, logp * upstream.to(logp.dtype)).sum() + ent.sum()).backward()
        return logp.detach(), ent.detach(), h.grad, w.grad, b.grad

    def fused(h, w, b):
        return mhpo_kernels.fused_linear_token_logprobs(h, w, ids, bias=b, final_logit_softcap=softcap,
                                                        return_entropy=True, chunk_size=3, min_p=min_p)

    def eager(h, w, b):
        z = h @ w.T + b
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return reference.token_logprobs(z, ids, return_entropy=True, min_p=min_p)

    with mhpo_kernels.use_backend(backend):
        got = run(fused, hidden, weight, bias)
    want = run(eager, hidden.double(), weight.double(), bias.double())
    assert got[0].isinf().any() and not got[0].isinf().all()
    for a, b in zip(got, want):
        _close(a, b)
