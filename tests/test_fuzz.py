"""Property-based tests against the float64 reference: random shapes (V = 1, 2, primes), layouts,
dtypes, hyperparameters over their valid ranges, masks (all valid, none valid, one token),
extreme logits (±1e4, −inf entries, a row of equal logits) and extreme ratios.

A fixed example budget per test keeps the suite inside its time (each example runs the Triton
kernels under the interpreter): 40 + 30 + 25 examples. On failure Hypothesis prints the falsifying example and the seed
to rerun it with (``pytest --hypothesis-seed=N``).

Tolerances: the sweeps compute in fp32 from inputs that every dtype represents exactly, so the
loss and log-probs carry fp32 error (1e-5, relative to the sum of the magnitudes of the terms,
since a sum of mixed-sign terms can cancel to near 0); the stored gradient adds one rounding to
the logits' dtype (``_cases.store_error``). The float64 reference's own autograd of tanh gives exactly 0 for |log_r/c| > 19
where the true sech² is < 1e-16: an absolute floor of 1e-15 of the gradient bound covers that.
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mhpo_kernels
import reference
from _cases import FP32_RTOL, STORE_FLOOR, store_error

# Absolute error of an fp32 probability near 1 (the sampled token of a peaked row): its base-2
# exponent is formed against an fp32 reference, so 2^d and the log2 of the sum each round once
# around 1; four units of 2⁻²⁴ cover both with MUFU's approximate ex2/lg2.
P_ABS_ERR = 2.0**-22
from conftest import DEVICES

SETTINGS = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
# The CI budget; MHPO_FUZZ_SCALE=10 runs ten times as many examples (a longer local search).
SCALE = float(os.environ.get("MHPO_FUZZ_SCALE", "1"))


def budget(n):
    return max(1, int(n * SCALE))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
AGG = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"]
VOCABS = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 13, 31, 97, 257, 4099]), st.integers(1, 300))


@st.composite
def problems(draw):
    """(logits, kwargs) for mhpo_loss, and the float64 kwargs for the reference."""
    B, T, V = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(VOCABS)
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))
    x = torch.randn(B, T + 1, V, generator=g) * scale
    ids = torch.randint(0, V, (B, T), generator=g)
    extreme = draw(st.sampled_from(["none", "spikes", "neg-inf", "equal-row"]))
    if extreme == "spikes":            # ±1e4 at random places, targets included
        spots = torch.rand(B, T + 1, V, generator=g) < 0.05
        x[spots] = torch.where(torch.rand(int(spots.sum()), generator=g) < 0.5, -1e4, 1e4)
    elif extreme == "neg-inf":         # −inf entries anywhere but at the targets
        x[:, :T][torch.rand(B, T, V, generator=g) < 0.3] = -math.inf
        x[:, :T].scatter_(-1, ids.unsqueeze(-1), torch.randn(B, T, 1, generator=g))
    elif extreme == "equal-row":
        x[0, 0] = 3.0
    layout = draw(st.sampled_from(["contiguous", "sliced", "strided-V"]))
    if layout == "strided-V":          # last dim not unit-stride: the op copies once
        logits = x[:, :T].transpose(1, 2).contiguous().transpose(1, 2)
    else:
        logits = x[:, :T] if layout == "sliced" else x[:, :T].contiguous()
    logits = logits.to(dtype)

    mask_kind = draw(st.sampled_from(["none", "all", "empty", "one", "random"]))
    mask = {"none": None, "all": torch.ones(B, T, dtype=torch.bool), "empty": torch.zeros(B, T, dtype=torch.bool),
            "one": torch.zeros(B, T, dtype=torch.bool).index_put_((torch.tensor(B - 1), torch.tensor(T - 1)), torch.tensor(True)),
            "random": torch.rand(B, T, generator=g) < 0.6}[mask_kind]
    if draw(st.booleans()):
        ids[0, 0] = -100
    temperature = draw(st.floats(0.3, 2.0))
    true_logp = reference.token_logprobs(logits.double(), ids.clamp(min=0), temperature).float()
    ratio = draw(st.sampled_from(["on-policy", "near", "far", "extreme"]))
    spread = {"near": 0.05, "far": 8.0, "extreme": 1e3}.get(ratio)
    old = None if spread is None else (true_logp + spread * torch.randn(B, T, generator=g)).clamp(max=0.0)
    adv = torch.randn(B, T, generator=g) * 3 if draw(st.booleans()) else torch.randn(B, generator=g) * 3
    beta = draw(st.sampled_from([0.0, 0.0, 0.3]))
    ref = (true_logp + draw(st.sampled_from([0.01, 1.0])) * torch.randn(B, T, generator=g)).clamp(max=0.0) if beta else None
    hp = dict(
        c=draw(st.floats(0.1, 5.0)), k_pos=draw(st.floats(0.5, 3.0)), lam_pos=draw(st.floats(0.3, 2.0)),
        k_neg=draw(st.floats(0.5, 3.0)), lam_neg=draw(st.floats(0.3, 2.0)),
        temperature=temperature, loss_agg_mode=draw(st.sampled_from(AGG)),
    )
    kwargs = dict(input_ids=ids, old_logprobs=old, advantages=adv, mask=mask, ref_logprobs=ref, beta=beta, **hp)
    return logits, kwargs, draw(st.floats(-3.0, 3.0).filter(lambda u: abs(u) > 1e-3))


def _to(kwargs, device, double=False):
    def conv(v):
        if not isinstance(v, torch.Tensor):
            return v
        v = v.to(device)
        return v.double() if double and v.is_floating_point() else v
    return {k: conv(v) for k, v in kwargs.items()}


EPS32 = 2.0**-24


def _error_model(logits64, kw64):
    """(bound on the loss error, bound on any token's dL/dlogp error), from a first-order model of
    fp32 rounding evaluated in float64 at the reference's values:

    - every term and coefficient rounds at the 1e-5 level relative to its own magnitude (terms of
      mixed sign can cancel to near 0, so errors are not relative to their sum);
    - w = exp(ψ − ζ) is exp of an fp32 argument, which carries ~8 roundings of |ψ| + ζ;
    - logp is a difference of O(|logp|)-sized fp32 numbers, so log_r = logp − old and
      d = ref − logp carry an absolute error Δ of ~4 roundings of |logp| + |old| (or |ref|); it
      reaches w through d(log w)/d(log_r) (ζ's value follows ψ), sech²(log_r/c) through
      d(log sech²)/d(log_r) = −2·tanh(log_r/c)/c, and the KL term through e^d.

    Only tokens with a large hazard ζ, or whose KL term sits near d = 0 on a large |logp|, get a
    budget above 1e-5."""
    ids, mask = kw64["input_ids"], kw64["mask"]
    valid = (ids != -100) & (mask if mask is not None else torch.ones_like(ids, dtype=torch.bool))
    logp = reference.token_logprobs(torch.where(valid.unsqueeze(-1), logits64, 0.0), ids.clamp(min=0),
                                    kw64["temperature"])
    old = logp if kw64["old_logprobs"] is None else kw64["old_logprobs"]
    c = kw64["c"]
    log_ratio = (logp - old).requires_grad_()
    psi = c * torch.tanh(log_ratio / c)
    zeta = reference.hazard(psi, kw64["k_pos"], kw64["lam_pos"], kw64["k_neg"], kw64["lam_neg"])
    (dlogw,) = torch.autograd.grad((psi - zeta).sum(), log_ratio)
    psi, zeta, u = psi.detach(), zeta.detach(), log_ratio.detach() / c
    w, sech2 = torch.exp(psi - zeta), 1 / torch.cosh(u) ** 2
    delta = 4 * EPS32 * (1 + logp.abs() + old.abs())
    rel_w = 1e-5 + 8 * EPS32 * (psi.abs() + zeta) + dlogw.abs() * delta
    adv = kw64["advantages"].reshape(ids.shape[0], -1).expand(ids.shape).abs()
    loss_err = adv * w * rel_w
    coef_err = adv * w * sech2 * (rel_w + 2 * torch.tanh(u).abs() / c * delta)
    if kw64["ref_logprobs"] is not None:
        ref = kw64["ref_logprobs"]
        d = ref - logp
        delta_d = 4 * EPS32 * (1 + logp.abs() + ref.abs())
        loss_err = loss_err + kw64["beta"] * (1e-5 * (torch.expm1(d) - d) + torch.expm1(d).abs() * delta_d)
        coef_err = coef_err + kw64["beta"] * (1e-5 * torch.expm1(d).abs() + torch.exp(d) * delta_d)
    def weighted(x):
        return torch.nan_to_num(torch.where(valid, x, 0.0), posinf=0.0)

    loss_tol = reference.aggregate(weighted(loss_err), valid, kw64["loss_agg_mode"]).item()
    # Every mode's weight g_t is at most 1, so the unweighted max bounds g_t · error_t.
    return loss_tol, weighted(coef_err).max().item()


def check_mhpo_loss(problem, device):
    logits, kwargs, upstream = problem
    x = logits.to(device).requires_grad_()
    loss = mhpo_kernels.mhpo_loss(x, **_to(kwargs, device))
    (grad,) = torch.autograd.grad(loss * upstream, x)

    x64 = logits.double().requires_grad_()
    kw64 = _to(kwargs, "cpu", double=True)
    loss64 = reference.mhpo_loss(x64, **kw64)
    (grad64,) = torch.autograd.grad(loss64 * upstream, x64)

    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss_tol, coef_tol = _error_model(logits.double(), kw64)
    assert abs(loss.item() - loss64.item()) <= loss_tol + 1e-30
    bound = math.exp(kwargs["c"]) * kwargs["advantages"].abs().max().item() / kwargs["temperature"] * abs(upstream)
    scale = abs(upstream) / kwargs["temperature"]
    err = (grad.cpu().double() - grad64).abs().max().item()
    allowed = (FP32_RTOL + store_error(logits.dtype, device)) * grad64.abs().max().item() + STORE_FLOOR[logits.dtype]
    assert err <= allowed + scale * coef_tol + 1e-15 * bound


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=budget(40), **SETTINGS)
@given(problem=problems())
def test_mhpo_loss_matches_reference(problem, device):
    check_mhpo_loss(problem, device)


def check_token_logprobs(problem, device):
    logits, kwargs, upstream = problem
    ids, temperature = kwargs["input_ids"], kwargs["temperature"]
    x = logits.to(device).requires_grad_()
    logp, ent = mhpo_kernels.token_logprobs(x, ids.to(device), temperature, return_entropy=True)
    (grad,) = torch.autograd.grad(upstream * logp.sum() - ent.sum(), x)
    x64 = logits.double().requires_grad_()
    logp64, ent64 = reference.token_logprobs(x64, ids, temperature, return_entropy=True)
    (grad64,) = torch.autograd.grad(upstream * logp64.sum() - ent64.sum(), x64)
    assert logp.dtype == ent.dtype == torch.float32
    # log-probs and entropy are fp32 sums over V: error relative to their largest magnitude.
    for got, want in ((logp, logp64), (ent, ent64)):
        assert (got.cpu().double() - want).abs().max() <= FP32_RTOL * max(1.0, want.abs().max().item())
    err = (grad.cpu().double() - grad64).abs().max().item()
    # ∂(G·logp − H)/∂x = ((one-hot − p)·G − ∂H/∂z)/τ: p is an fp32 probability, within a few units
    # of 2⁻²⁴ of its true value in absolute terms however small the gradient (V = 1: exactly 0).
    floor = P_ABS_ERR * (abs(upstream) + 1.0 + ent64.abs().max().item()) / temperature
    assert err <= (FP32_RTOL + store_error(logits.dtype, device)) * grad64.abs().max().item() + floor + \
        STORE_FLOOR[logits.dtype]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=budget(30), **SETTINGS)
@given(problem=problems())
def test_token_logprobs_match_reference(problem, device):
    check_token_logprobs(problem, device)


def _case(logits, upstream=1.0, **kwargs):
    base = dict(old_logprobs=None, mask=None, ref_logprobs=None, beta=0.0, c=1.0, k_pos=1.0, lam_pos=1.0,
                k_neg=1.0, lam_neg=1.0, temperature=1.0, loss_agg_mode="seq-mean-token-mean")
    return logits, {**base, **kwargs}, upstream


# Examples the search once found, replayed on every device (on a lent GPU, on CUDA too). Each
# exposed a tolerance that did not yet model an effect of fp32, or a flaw of the reference.
REGRESSIONS = {
    # V = 1, ζ ≈ 32: w ≈ 1e-13, whose fp32 exp carries ~8 roundings of its argument.
    "huge-hazard": _case(torch.tensor([[[0.1541]]]), input_ids=torch.tensor([[0]]),
                         old_logprobs=torch.tensor([[-8.6762]]), advantages=torch.tensor([-4.1958]), c=1.75,
                         k_pos=2.125, lam_pos=0.375),
    # The KL coefficient 1 − e^d near d = 0 with logp's rounding, beside a saturated ratio.
    "kl-beside-saturation": _case(torch.tensor([[[0.1541, -0.0293]]]), input_ids=torch.tensor([[1]]),
                                  old_logprobs=torch.tensor([[-4.0393]]), advantages=torch.tensor([2.4329]),
                                  ref_logprobs=torch.tensor([[-0.7895]]), beta=0.3),
    # fp16 gradient in the subnormal range (|grad| ~ 1e-6 < 6.1e-5).
    "fp16-subnormal-gradient": _case(torch.tensor([[[0.1541, -0.0293]]], dtype=torch.float16),
                                     input_ids=torch.tensor([[1]]), advantages=torch.tensor([0.4811]),
                                     k_neg=3.0, lam_neg=0.3125),
    # V = 1: p = 1 and the gradient is exactly 0, the kernels' p within P_ABS_ERR of it.
    "one-token-vocabulary": _case(torch.tensor([[[1.5410]]]), input_ids=torch.tensor([[0]]),
                                  advantages=torch.tensor([3.7934]), temperature=0.375),
    # −inf logits: the entropy's gradient is 0 there (the reference once gave NaN).
    "neg-inf-entropy": _case(torch.tensor([[[-0.7193, -math.inf, -0.2179]]]), input_ids=torch.tensor([[0]]),
                             advantages=torch.tensor([-1.2100])),
    # A bf16 gradient stored one unit in the last place off under the interpreter (truncation).
    "bf16-store": _case(torch.tensor([[[0.1543, -0.0293]]], dtype=torch.bfloat16), input_ids=torch.tensor([[1]]),
                        advantages=torch.tensor([0.4811]), lam_neg=0.375, temperature=1.875, upstream=1.75),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regressions(name, device):
    check_mhpo_loss(REGRESSIONS[name], device)
    check_token_logprobs(REGRESSIONS[name], device)


@st.composite
def linear_problems(draw):
    N, H, V = draw(st.integers(1, 12)), draw(st.integers(1, 96)), draw(VOCABS)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * draw(st.sampled_from([0.1, 0.5])) * 3 / math.sqrt(H)
    bias = torch.randn(V, generator=g) if draw(st.booleans()) else None
    ids = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) < 0.7 if draw(st.booleans()) else None
    old = (torch.randn(N, generator=g) * draw(st.sampled_from([0.1, 5.0])) - 4).clamp(max=0.0)
    kwargs = dict(
        input_ids=ids, old_logprobs=old, advantages=torch.randn(N, generator=g), mask=mask,
        logit_scale=draw(st.floats(0.5, 2.0)), final_logit_softcap=draw(st.sampled_from([None, 2.0, 30.0])),
        temperature=draw(st.floats(0.5, 1.5)), chunk_size=draw(st.sampled_from([None, 1, 3, 5])),
        c=draw(st.floats(0.5, 3.0)), loss_agg_mode=draw(st.sampled_from(AGG)),
    )
    return hidden, weight, bias, kwargs


@settings(max_examples=budget(25), **SETTINGS)
@given(problem=linear_problems())
def test_fused_linear_matches_reference(problem):
    hidden, weight, bias, kwargs = problem
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = mhpo_kernels.fused_linear_mhpo_loss(leaves[0], leaves[1], bias=leaves[2] if bias is not None else None, **kwargs)
    grads = torch.autograd.grad(loss, leaves)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    z = leaves64[0] @ leaves64[1].T + (leaves64[2] if bias is not None else 0)
    z = z * kwargs["logit_scale"]
    cap = kwargs["final_logit_softcap"]
    z = z if cap is None else cap * torch.tanh(z / cap)
    ref_kw = {k: v for k, v in kwargs.items() if k not in ("logit_scale", "final_logit_softcap", "chunk_size")}
    ref_kw = _to(ref_kw, "cpu", double=True)
    loss64 = reference.mhpo_loss(z, **ref_kw)
    grads64 = torch.autograd.grad(loss64, leaves64)
    as_batch = {k: v.reshape(1, -1) if isinstance(v, torch.Tensor) else v for k, v in ref_kw.items()}
    defaults = dict(k_pos=1.5, lam_pos=1.0, k_neg=2.0, lam_neg=0.8, ref_logprobs=None)
    loss_tol, coef_tol = _error_model(z.detach().unsqueeze(0), {**defaults, **as_batch})
    assert abs(loss.item() - loss64.item()) <= loss_tol + 1e-30
    # dL/dlogits errors (≤ coef_tol / τ per element) reach dhidden and dweight through the GEMMs.
    logit_err = coef_tol / kwargs["temperature"]
    for g, g64, other in zip(grads, grads64, (leaves64[1], leaves64[0], None)):
        reach = 1.0 if other is None else other.detach().abs().sum(0).max().item()
        assert (g.double() - g64).abs().max() <= FP32_RTOL * g64.abs().max() + logit_err * reach * 2 + 1e-12
