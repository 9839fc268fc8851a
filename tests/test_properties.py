"""Known values and properties of the op that hold whatever the inputs: the paper's on-policy weight,
Theorem 1's gradient bound, the true gradient of saturated tokens, the two paths agreeing, every
gradient element written, and hyperparameters that do not recompile."""

import inspect
import math

import pytest
import torch
import triton.language as tl

import mhpo_kernels
import reference
from _cases import FP32_RTOL, SMALL, Regime, loss_and_grad, make_inputs, max_rel_err
from conftest import DEVICES, TRITON_DEVICE
from mhpo_kernels._inputs import prepare_mhpo, prepare_tokens
from mhpo_kernels._sweep_types import LogitMap, mhpo_token_params
from mhpo_kernels.ops import row_stats


def _zeta0(k_pos=1.5, lam_pos=1.0, k_neg=2.0, lam_neg=0.8):
    sp0 = math.log(2.0)  # softplus(0)
    return (sp0 / lam_pos) ** k_pos + (sp0 / lam_neg) ** k_neg


def test_on_policy_weight_is_paper_value():
    """On-policy ψ = 0, so w = exp(−ζ(0)) ≈ 0.2651 with the paper's defaults; loss = −w·A."""
    w = math.exp(-_zeta0())
    assert w == pytest.approx(0.2651, abs=5e-5)
    logits = torch.randn(3, 7, 257)
    ids = torch.randint(0, 257, (3, 7))
    loss, metrics = mhpo_kernels.mhpo_loss(logits, ids, None, torch.ones(3), return_metrics=True)
    assert loss.item() == pytest.approx(-w, rel=FP32_RTOL)
    assert metrics["survival"].item() == pytest.approx(w, rel=FP32_RTOL)
    assert metrics["psi"].item() == 0.0 and metrics["saturated_frac"].item() == 0.0


def _token_coefficients(logits, kwargs, hp):
    """(N,) dL/dlogp_t as the forward saves it, and the aggregation weights g_t."""
    batch = prepare_mhpo(kwargs["input_ids"], logits.shape[:-1], logits.shape[-1], logits.device,
                         kwargs["old_logprobs"], kwargs["advantages"], None, None, 0.0,
                         "seq-mean-token-mean", -100)
    stats, _, _ = row_stats(logits, batch, hp, LogitMap.make(1.0), with_entropy=False)
    return stats.coef, batch.weight, batch.adv, stats.logp


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_bound_theorem_1(device):
    """|dL/dlogp_t| ≤ e^c · |A_t| · g_t for any ratio, however extreme."""
    g = torch.Generator().manual_seed(3)
    B, T, V = 4, 16, 97
    logits = (torch.randn(B, T, V, generator=g) * 4).to(device)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    true_logp = mhpo_kernels.token_logprobs(logits, ids)
    # log r ≥ logp, since old ≤ 0 (a log-prob): as far below 0 as the current log-prob allows
    log_ratio = torch.maximum(torch.empty(B, T).uniform_(-60, 60, generator=g).to(device), true_logp)
    kwargs = dict(input_ids=ids, old_logprobs=true_logp - log_ratio,
                  advantages=(torch.randn(B, T, generator=g) * 5).to(device))
    for c in (0.3, 1.5, 4.0):
        coef, weight, adv, _ = _token_coefficients(logits, kwargs, mhpo_token_params(c=c))
        bound = math.exp(c) * adv.abs() * weight
        assert (coef.abs() <= bound * (1 + 1e-6)).all()
        # No token is clipped to a zero gradient while sech² is an fp32 number (|log_r/c| < 40).
        representable = (log_ratio.reshape(-1) / c).abs() < 40
        assert representable.any() and (coef.abs()[representable] > 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_saturated_tokens_keep_their_true_gradient(device):
    """At |log_r/c| = 9 … 40, dψ/dlog_r = sech² is tiny but not zero: 1 − tanh² in fp32 would give
    half the value at 9 and exactly 0 beyond; the kernel must match float64 sech² to fp32 accuracy."""
    c = 1.5
    u = torch.tensor([-40.0, -25.0, -9.0, -3.0, 0.0, 1e-4, 3.0, 9.0, 25.0, 40.0])
    V, T = 64, u.numel()
    logits = torch.randn(1, T, V)
    ids = torch.randint(0, V, (1, T))
    # log r = logp − old ≥ logp (old ≤ 0 is a log-prob): the targets of the negative ratios are
    # made unlikely enough (logp ≈ −100) for log r down to −60
    logits[0, u < 0, ids[0, u < 0]] = -100.0
    logits, ids = logits.to(device), ids.to(device)
    logp = mhpo_kernels.token_logprobs(logits, ids)
    old = logp - (u.to(device) * c).reshape(1, T)
    kwargs = dict(input_ids=ids, old_logprobs=old, advantages=torch.ones(1, T, device=device))
    coef, weight, adv, logp_out = _token_coefficients(logits, kwargs, mhpo_token_params(c=c))
    u64 = ((logp_out.double() - old.reshape(-1).double()) / c).cpu()   # the ratio the kernel saw
    sech2 = 1.0 / torch.cosh(u64) ** 2
    psi = c * torch.tanh(u64)
    sp = torch.nn.functional.softplus
    zeta = (sp(psi) / 1.0) ** 1.5 + (sp(-psi) / 0.8) ** 2.0
    expected = -torch.exp(psi - zeta) * sech2 * weight.double().cpu()
    assert (coef.cpu() != 0).all()
    assert torch.allclose(coef.cpu().double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("regime", [Regime("kl", kl=True, temperature=0.7), Regime("far", ratio="far")],
                         ids=lambda r: r.id)
def test_triton_and_torch_paths_agree(regime):
    """The Triton kernels (interpreted on CPU, compiled on CUDA) and the PyTorch sweeps, on the
    same tensors."""
    logits, kwargs = make_inputs(SMALL, regime, device=TRITON_DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        with mhpo_kernels.use_backend(backend):
            loss, grad = loss_and_grad(mhpo_kernels.mhpo_loss, logits, kwargs, upstream=0.37)
            _, metrics = mhpo_kernels.mhpo_loss(logits, **kwargs, return_metrics=True)
            logp, ent = mhpo_kernels.token_logprobs(logits, kwargs["input_ids"].clamp(0, SMALL.V - 1),
                                                    return_entropy=True)
        results[backend] = (loss, grad, metrics, logp, ent)
    (l1, g1, m1, p1, e1), (l2, g2, m2, p2, e2) = results["triton"], results["torch"]
    assert l1.item() == pytest.approx(l2.item(), rel=FP32_RTOL)
    assert max_rel_err(g1.cpu(), g2.cpu()) <= FP32_RTOL
    for name in m1:
        assert m1[name].item() == pytest.approx(m2[name].item(), rel=FP32_RTOL, abs=1e-6), name
    finite = torch.isfinite(p2)
    assert max_rel_err(p1[finite].cpu(), p2[finite].cpu()) <= FP32_RTOL
    assert max_rel_err(e1[finite].cpu(), e2[finite].cpu()) <= FP32_RTOL


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_the_backward_runs_where_the_forward_ran(backend):
    """A call's backward runs on the backend its forward ran on (``LogitMap.backend``), also outside
    the forward's ``use_backend`` block: the backends form the exponents apart, so a truncated
    row's threshold from one need not hold in the other (the backward of the other dropped the
    gradient of a token at the threshold), and their gradients differ in the last bits. With
    ``grad_in_forward`` the backward only rescales the gradient: on the PyTorch path's float64
    logits (its own), the Triton rescale would round it through fp32."""
    logits, kwargs = make_inputs(SMALL, Regime("kl", kl=True, temperature=0.7), device=TRITON_DEVICE)
    ids = kwargs["input_ids"].clamp(0, SMALL.V - 1)
    other = "torch" if backend == "triton" else "triton"
    grads = []
    for backward_backend in (backend, other):
        x = logits.detach().clone().requires_grad_()
        x64 = logits.detach().double().requires_grad_()
        with mhpo_kernels.use_backend(backend):
            loss = mhpo_kernels.mhpo_loss(x, **kwargs)
            logp, ent = mhpo_kernels.token_logprobs(x, ids, return_entropy=True, temperature=0.7, top_p=0.8)
            rescaled = 3.1 * mhpo_kernels.mhpo_loss(x64 if backend == "torch" else x, **kwargs, grad_in_forward=True)
        with mhpo_kernels.use_backend(backward_backend):
            (loss + torch.where(logp.isinf(), 0.0, logp).sum() + ent.sum() + rescaled).backward()
        grads.append((x.grad, x64.grad))
    for a, b in zip(*grads):   # NaN rows: NaN logits
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_gradient_element_written(backend, dtype):
    """The backward sweep writes each element of a NaN-filled buffer, zero rows for invalid tokens."""
    logits, kwargs = make_inputs(SMALL, Regime("w", kl=True, dtype=dtype), device=TRITON_DEVICE)
    batch = prepare_mhpo(kwargs["input_ids"], logits.shape[:-1], logits.shape[-1], logits.device,
                         kwargs["old_logprobs"], kwargs["advantages"], kwargs["mask"],
                         kwargs["ref_logprobs"], 0.2, "token-mean", -100)
    hp, lmap = mhpo_token_params(beta=0.2), LogitMap.make(1.0)
    with mhpo_kernels.use_backend(backend):
        fwd, bwd = mhpo_kernels._dispatch.sweeps(logits.device)
        stats = fwd(logits, batch.target, batch.old, batch.adv, batch.weight, batch.ref, hp, lmap,
                    with_entropy=True, with_loss=True)
        grad = torch.full(logits.shape, float("nan"), dtype=dtype, device=logits.device)
        dent = torch.randn(stats.logp.shape, device=logits.device)
        bwd(logits, grad, batch.target, stats.lse2_base, stats.lse2_rest, stats.coef * 1.7,
            stats.entropy, dent, lmap)
    assert not grad.isnan().any()
    invalid = ~batch.valid.reshape(grad.shape[:2]).to(grad.device)
    assert invalid.any() and not grad[invalid].any()
    assert grad[~invalid].abs().sum(-1).gt(0).all()


def test_hyperparameters_are_runtime_arguments():
    """Only what changes the generated code is constexpr: temperature, c, k, λ, β are not, so a
    new value reuses the compiled kernel."""
    from mhpo_kernels.kernels.backward import _mhpo_bwd_kernel
    from mhpo_kernels.kernels.forward import _mhpo_fwd_kernel
    from mhpo_kernels.kernels.select import _select_kernel

    def params(kernel, constexpr):
        signature = inspect.signature(kernel.fn)  # the Python function, compiled or interpreted
        return {n for n, p in signature.parameters.items() if (p.annotation is tl.constexpr) == constexpr}

    # the block shape and the rows' alignment: functions of V, the dtype and the layout, never of
    # the batch (test_specialization.py counts the compiled variants over batch shapes)
    block = {"R", "LANES", "VEC", "ROWS_ALIGNED"}
    assert params(_mhpo_fwd_kernel, True) == {"SOFTCAP", "WITH_ENTROPY", "WITH_LOSS", "HAS_OLD", "HAS_REF",
                                              "HAS_TAU", "MIN_P", "SELECTED", "LOW16", "OBJECTIVE", "LFM", "DHP",
                                              "GRAD_IN_FORWARD", "DX_IN_PHASE", "SPLIT"} | block
    assert params(_mhpo_bwd_kernel, True) == {"SOFTCAP", "HAS_DENT", "HAS_TAU", "CUT", "DX_IN_PHASE",
                                              "SPLIT"} | block
    # the sampler's filters: which are on is compiled in, their values are per-token data
    # (and KEYS16 and BF16_ROWS, functions of the logits' dtype: which keys the selection counts,
    # and whether it tests each row for bf16 values, as LOW16 has the statistics launch keep them;
    # SLOTS, the candidates a row may gather, a function of the block)
    assert params(_select_kernel, True) == {"SOFTCAP", "HAS_TAU", "WITH_ENTROPY", "MIN_P", "TOP_K", "TOP_P",
                                            "KEYS16", "BF16_ROWS", "SLOTS"} | block
    assert {"k", "tanh_scale", "N", "T", "V"} <= params(_select_kernel, False)
    runtime = params(_mhpo_fwd_kernel, False)
    assert {"k", "tanh_scale", "v0", "v1", "v2", "v3", "v4", "beta"} <= runtime  # every objective's values
    assert {"k", "tanh_scale", "slope"} <= params(_mhpo_bwd_kernel, False)
    assert {"N", "slope"} <= runtime  # the persistent grid's row count, the one-sweep pass's slope
    # a row's segments and its split over programs (small N) never recompile the splits' kernel
    assert {"n_segs", "seg_len", "split_segs"} <= runtime and "split_len" in params(_mhpo_bwd_kernel, False)


@pytest.mark.parametrize("device", DEVICES)
def test_kl_term_accurate_near_the_reference_policy(device):
    """With A = 0 (a group whose rewards are all equal) only the KL term acts. Near the reference
    policy, e^d − d − 1 and 1 − e^d cancel catastrophically in fp32 (k3 ≈ d²/2 lost to the
    rounding of e^d); the kernel must give them to fp32 accuracy.

    ref = logp + d is formed in fp32 from the kernel's own logp, so the kernel's d = ref − logp is
    exact (Sterbenz) and equals d64 below: the comparison isolates the KL arithmetic."""
    d = torch.tensor([-0.6, -3e-2, -1e-3, -2e-5, 2e-5, 1e-3, 3e-2, 0.6, 2.5])
    T, V, beta = d.numel(), 128, 0.3
    logits = torch.randn(1, T, V).to(device)
    ids = torch.randint(0, V, (1, T)).to(device)
    hp = mhpo_token_params(beta=beta)

    def run(ref):
        batch = prepare_mhpo(ids, ids.shape, V, logits.device, None, torch.zeros(1, device=device),
                             None, ref, beta, "token-mean", -100)
        return row_stats(logits, batch, hp, LogitMap.make(1.0), with_entropy=False)[0]

    logp = run(torch.zeros(1, T, device=device)).logp
    ref = (logp + d.to(device)).reshape(1, T)
    stats = run(ref)
    loss_tok, coef = stats.loss, stats.coef
    assert torch.equal(logp, stats.logp)
    d64 = ref.reshape(-1).double().cpu() - logp.double().cpu()
    expected_loss = beta * (torch.expm1(d64) - d64) / T
    expected_coef = -beta * torch.expm1(d64) / T
    assert torch.allclose(loss_tok.cpu().double(), expected_loss, rtol=FP32_RTOL, atol=0)
    assert torch.allclose(coef.cpu().double(), expected_coef, rtol=FP32_RTOL, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_row_whose_first_block_is_all_minus_inf(device):
    """The online max starts at −inf: a first block of −inf logits followed by very negative ones
    (−1000) must not leave the running reference at 0, where every e^z underflows."""
    from mhpo_kernels._config import BLOCK_V

    V = BLOCK_V + 300
    logits = torch.randn(1, 3, V) - 1000.0
    logits[:, :, :BLOCK_V] = float("-inf")
    ids = torch.randint(BLOCK_V, V, (1, 3))
    kwargs = dict(input_ids=ids.to(device), old_logprobs=torch.full((1, 3), -6.0, device=device),
                  advantages=torch.tensor([1.3], device=device))
    loss, grad = loss_and_grad(mhpo_kernels.mhpo_loss, logits.to(device), kwargs, upstream=0.8)
    loss64, grad64 = loss_and_grad(reference.mhpo_loss, logits.double(),
                                   {k: v.cpu().double() if v.is_floating_point() else v.cpu()
                                    for k, v in kwargs.items()}, upstream=0.8)
    assert loss.item() == pytest.approx(loss64.item(), rel=FP32_RTOL)
    assert max_rel_err(grad.cpu(), grad64) <= FP32_RTOL


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_softcap_row_of_minus_inf(backend):
    """With a softcap, −inf logits map to the finite −cap/τ: a row of them is a uniform softmax,
    not the 'nothing seen yet' state of the uncapped online max."""
    from mhpo_kernels._config import BLOCK_V

    V, cap, tau = BLOCK_V + 100, 5.0, 0.8
    x = torch.randn(1, 3, V, device=TRITON_DEVICE if backend == "triton" else "cpu")
    x[0, 0] = float("-inf")                     # the whole row
    x[0, 1, :BLOCK_V] = float("-inf")           # its first block only
    ids = torch.tensor([[5, BLOCK_V + 7, 0]], device=x.device)
    lmap = LogitMap.make(tau, 1.0, cap)
    batch = prepare_tokens(ids, ids.shape, V, x.device, -100)
    with mhpo_kernels.use_backend(backend):
        fwd, _ = mhpo_kernels._dispatch.sweeps(x.device)
        stats = fwd(x, batch.target, None, None, None, None, mhpo_token_params(), lmap, with_entropy=True, with_loss=False)
    z = cap * torch.tanh(x.cpu().double() / cap)
    logp64, ent64 = reference.token_logprobs(z, ids.cpu(), tau, return_entropy=True)
    assert max_rel_err(stats.logp.cpu().reshape(1, 3), logp64) <= FP32_RTOL
    assert max_rel_err(stats.entropy.cpu().reshape(1, 3), ent64) <= FP32_RTOL
