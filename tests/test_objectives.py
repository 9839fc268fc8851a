"""policy_loss with every objective: against the float64 reference in every aggregation mode, with
masked garbage, in bf16, against verl's own policy-loss functions, and bad hyperparameters refused."""

import math

import pytest
import torch

import mhpo_kernels
import reference
from _cases import FP32_RTOL, SMALL, UNIT_ROUNDOFF, Regime, as_float64, loss_and_grad, make_inputs, max_rel_err
from conftest import TRITON_DEVICE
from mhpo_kernels.objectives import CISPO, GPG, GSPO, MHPO, SAPO, PPOClip

OBJECTIVES = {
    "mhpo": MHPO(),
    "mhpo-no-lfm": MHPO(lfm=False),
    "mhpo-no-dhp": MHPO(c=1.2, dhp=False),
    "grpo": PPOClip(),
    "dapo-dual-clip": PPOClip(eps_low=0.2, eps_high=0.28, dual_clip=3.0),
    "cispo": CISPO(max_ratio=1.3, min_ratio=0.7),
    "sapo": SAPO(tau_pos=1.0, tau_neg=1.05),
    "gpg": GPG(),
    "gspo": GSPO(eps_low=0.05, eps_high=0.08),
}
AGG_MODES = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"]


def _call(fn, objective, logits, kwargs):
    return fn(logits, kwargs["input_ids"], kwargs["old_logprobs"], kwargs["advantages"], kwargs["mask"],
              objective=objective, **{k: v for k, v in kwargs.items()
                                      if k not in ("input_ids", "old_logprobs", "advantages", "mask")})


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_against_float64(name, agg, backend):
    """On-policy, near (inside the clips) and far (outside them) ratios, mixed advantages, a KL
    term, masked and ignored positions holding NaN and out-of-range ids: loss and gradient equal
    the float64 reference to fp32 accuracy."""
    objective = OBJECTIVES[name]
    for ratio, seed in (("on-policy", 2), ("near", 0), ("far", 1)):
        logits, kwargs = make_inputs(SMALL, Regime("obj", ratio=ratio, kl=True, agg=agg), seed=seed,
                                     device=TRITON_DEVICE)
        with mhpo_kernels.use_backend(backend):
            loss, grad = loss_and_grad(lambda x, **kw: _call(mhpo_kernels.policy_loss, objective, x, kw),
                                       logits, kwargs, upstream=-1.7)
        kw64 = as_float64({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        loss64, grad64 = loss_and_grad(lambda x, **kw: _call(reference.policy_loss, objective, x, kw),
                                       logits.cpu().double(), kw64, upstream=-1.7)
        assert torch.isfinite(grad).all()
        assert abs(loss.item() - loss64.item()) <= FP32_RTOL * abs(loss64.item()) + 1e-12, ratio
        assert max_rel_err(grad.cpu(), grad64) <= FP32_RTOL, ratio


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_metrics_against_float64(name, backend):
    """The metrics of every objective: the same keys as the float64 reference's (psi, zeta,
    survival and saturated_frac for MHPO records only, the clipped shares for PPOClip and CISPO)
    and values, an MHPO record's of its own hyperparameters and switches (the reference took
    mhpo_loss's defaults). The ratios are far from 1, so each clipped share counts some tokens
    and not all: a share off by one token is off by more than the tolerance."""
    objective = OBJECTIVES[name]
    logits, kwargs = make_inputs(SMALL, Regime("obj", ratio="far", kl=True), seed=1, device=TRITON_DEVICE)
    with mhpo_kernels.use_backend(backend):
        _, metrics = _call(mhpo_kernels.policy_loss, objective, logits, {**kwargs, "return_metrics": True})
    kw64 = as_float64({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    _, metrics64 = _call(reference.policy_loss, objective, logits.cpu().double(), {**kw64, "return_metrics": True})
    assert set(metrics) == set(metrics64)
    assert ("psi" in metrics) == isinstance(objective, MHPO)
    assert ("clip_low_frac" in metrics) == ("clip_high_frac" in metrics) == isinstance(objective, (PPOClip, CISPO))
    for key in ("clip_low_frac", "clip_high_frac"):
        assert 0 < metrics64.get(key, 0.5) < 1, key
    for key, want in metrics64.items():   # means over valid tokens of O(1) values: fp32 accuracy
        assert abs(metrics[key].item() - want.item()) <= FP32_RTOL * max(1.0, abs(want.item())), key


SATURATING = {   # (objective, log r per token): where a slope in the gradient nears 0
    # SAPO's σ(1 − σ) at τ(r − 1) = 8 ... 36, τ = 2: 1 − σ cancels, in fp32 (6% off at 16, 0 from
    # 17) and in float64 (4% off at 36). logp's fp32 rounding (~1e-7) moves τ(r − 1) by τ·r·1e-7,
    # 4e-6 at 36 (r = 19), and the slope by as much relatively: within FP32_RTOL
    "sapo": (SAPO(tau_pos=2.0), torch.log1p(torch.tensor([8.0, 16.0, 17.0, 20.0, 30.0, 36.0],
                                                         dtype=torch.float64) / 2)),
    # MHPO's sech²(log r / c) at log r / c = 15 ... 30: 1 − tanh² cancels from 19 even in float64
    "mhpo": (MHPO(c=1.5), 1.5 * torch.tensor([15.0, 19.0, 20.0, 25.0, 30.0], dtype=torch.float64)),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(SATURATING))
def test_gradient_where_a_slope_saturates(name, backend):
    """Each token's gradient row equals the float64 reference's to fp32 accuracy, row by row (a
    check relative to the largest row would not see the small ones go wrong), and none is 0."""
    objective, log_r = SATURATING[name]
    logits = torch.zeros(len(log_r), 8, device=TRITON_DEVICE)
    ids = torch.zeros(len(log_r), dtype=torch.long, device=TRITON_DEVICE)
    old = (math.log(1 / 8) - log_r).float().to(TRITON_DEVICE)   # logp = log 1/8
    adv = torch.ones(len(log_r), device=TRITON_DEVICE)
    with mhpo_kernels.use_backend(backend):
        _, grad = loss_and_grad(lambda z, **kw: mhpo_kernels.policy_loss(z, objective=objective, **kw), logits,
                                dict(input_ids=ids, old_logprobs=old, advantages=adv))
    _, grad64 = loss_and_grad(lambda z, **kw: reference.policy_loss(z, objective=objective, **kw),
                              logits.cpu().double(), dict(input_ids=ids.cpu(), old_logprobs=old.cpu().double(),
                                                          advantages=adv.cpu().double()))
    for row, row64 in zip(grad.cpu(), grad64):
        assert row64.abs().max() > 0 and max_rel_err(row, row64) <= FP32_RTOL


@pytest.mark.parametrize("name", ["grpo", "cispo", "sapo", "gspo"])
def test_objective_bf16_no_worse_than_eager(name):
    """bf16 logits: the error against float64 is no worse than eager PyTorch's own at bf16, plus
    one bf16 rounding of the stored gradient (the fused op computes in fp32 and rounds once)."""
    objective = OBJECTIVES[name]
    logits, kwargs = make_inputs(SMALL, Regime("bf16", kl=True, dtype=torch.bfloat16), device=TRITON_DEVICE)
    kw_cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    loss, grad = loss_and_grad(lambda x, **kw: _call(mhpo_kernels.policy_loss, objective, x, kw), logits, kwargs)
    loss_e, grad_e = loss_and_grad(lambda x, **kw: _call(reference.policy_loss, objective, x, kw), logits.cpu(), kw_cpu)
    loss64, grad64 = loss_and_grad(lambda x, **kw: _call(reference.policy_loss, objective, x, kw),
                                   logits.cpu().double(), as_float64(kw_cpu))
    eager_err = max_rel_err(grad_e, grad64)
    assert max_rel_err(grad.cpu(), grad64) <= eager_err + 2 * UNIT_ROUNDOFF[torch.bfloat16]
    assert abs(loss.item() - loss64.item()) <= abs(loss_e.item() - loss64.item()) + FP32_RTOL * abs(loss64.item())


@pytest.mark.parametrize("name", ["grpo", "gspo", "cispo"])
def test_normalizer_applies_to_every_objective(name):
    logits, kwargs = make_inputs(SMALL, Regime("norm", agg="token-mean"), device=TRITON_DEVICE)
    local = _call(mhpo_kernels.policy_loss, OBJECTIVES[name], logits, kwargs)
    scaled = _call(mhpo_kernels.policy_loss, OBJECTIVES[name], logits, {**kwargs, "normalizer": 3.0})
    count = (kwargs["mask"] & (kwargs["input_ids"] != -100)).sum().item()
    assert scaled.item() == pytest.approx(local.item() * count / 3.0, rel=1e-6)


def test_mhpo_loss_is_policy_loss_with_mhpo():
    logits, kwargs = make_inputs(SMALL, Regime("same", kl=True), device=TRITON_DEVICE)
    a = mhpo_kernels.mhpo_loss(logits, **{**kwargs, "c": 1.3})
    b = _call(mhpo_kernels.policy_loss, MHPO(c=1.3), logits, kwargs)
    assert a.item() == b.item()


@pytest.mark.parametrize("make, field", [
    (lambda: MHPO(c=0.0), "MHPO.c"), (lambda: MHPO(lam_neg=float("nan")), "MHPO.lam_neg"),
    (lambda: MHPO(lfm=1), "MHPO.lfm"), (lambda: PPOClip(eps_low=1.0), "PPOClip.eps_low"),
    (lambda: PPOClip(eps_high=-0.1), "PPOClip.eps_high"), (lambda: PPOClip(dual_clip=1.0), "PPOClip.dual_clip"),
    (lambda: CISPO(max_ratio=0.5, min_ratio=0.9), "CISPO.min_ratio"), (lambda: SAPO(tau_neg=0.0), "SAPO.tau_neg"),
    (lambda: GSPO(eps_high="0.1"), "GSPO.eps_high"),
])
def test_bad_hyperparameters_are_refused(make, field):
    with pytest.raises((TypeError, ValueError), match=field.replace(".", "\\.")):
        make()


def test_bad_objective_and_gspo_advantages_are_refused():
    logits, kwargs = make_inputs(SMALL, Regime("bad", adv="per-token", garbage=False), device=TRITON_DEVICE)
    with pytest.raises(TypeError, match="objective must be one of"):
        _call(mhpo_kernels.policy_loss, "grpo", logits, kwargs)
    with pytest.raises(ValueError, match="one per sequence for GSPO"):
        _call(mhpo_kernels.policy_loss, GSPO(), logits, kwargs)


# ---- verl's own policy-loss functions ----------------------------------------------------------

VERL = {
    "vanilla": (PPOClip(eps_low=0.2, eps_high=0.28, dual_clip=3.0), dict(clip_ratio_low=0.2, clip_ratio_high=0.28,
                                                                      clip_ratio_c=3.0)),
    "gspo": (GSPO(eps_low=0.05, eps_high=0.08), dict(clip_ratio_low=0.05, clip_ratio_high=0.08)),
    "gpg": (GPG(), {}),
}


@pytest.mark.parametrize("mode", ["vanilla", "gspo", "gpg"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_against_verl_policy_losses(mode, agg):
    """verl's registered policy losses on the same log-probs: the same loss and gradient."""
    pytest.importorskip("verl", reason="the verl extra is not installed")
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.workers.config import ActorConfig

    objective, clip = VERL[mode]
    g = torch.Generator().manual_seed(5)
    B, T, V = 3, 6, 50
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    logp_now = reference.token_logprobs(logits, ids)
    old = logp_now + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64).unsqueeze(-1).expand(B, T)

    x = logits.float().requires_grad_()
    with mhpo_kernels.use_backend("torch"):
        loss = mhpo_kernels.policy_loss(x, ids, old.float(), adv.float(), mask, objective=objective, loss_agg_mode=agg)
    (grad,) = torch.autograd.grad(loss, x)

    x64 = logits.clone().requires_grad_()
    config = ActorConfig(strategy="fsdp", ppo_mini_batch_size=B, ppo_micro_batch_size_per_gpu=B, rollout_n=1,
                         loss_agg_mode=agg, use_kl_loss=False, entropy_coeff=0.0, **clip)
    verl_loss, _ = get_policy_loss_fn(mode)(old, reference.token_logprobs(x64, ids), adv, mask.double(),
                                            loss_agg_mode=agg, config=config)
    (grad64,) = torch.autograd.grad(verl_loss, x64)
    # fp32 rounds each term of the sum, so the loss's error scales with the terms' magnitudes, which
    # cancel in it (GSPO's token-mean loss is 0.016 of terms near 1): the same loss of |A|.
    scale, _ = get_policy_loss_fn(mode)(old, reference.token_logprobs(logits, ids), adv.abs(), mask.double(),
                                        loss_agg_mode=agg, config=config)
    assert abs(loss.item() - verl_loss.item()) <= FP32_RTOL * abs(scale.item())
    assert max_rel_err(grad, grad64) <= FP32_RTOL


@pytest.mark.parametrize("name", ["grpo", "cispo", "sapo", "mhpo-no-lfm"])
def test_fused_linear_path_takes_every_token_level_objective(name):
    """fused_linear_policy_loss equals policy_loss on the materialized logits, gradients included."""
    g = torch.Generator().manual_seed(8)
    B, T, H, V = 2, 5, 16, 400
    hidden = torch.randn(B, T, H, generator=g).to(TRITON_DEVICE).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(TRITON_DEVICE).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g).to(TRITON_DEVICE)
    old = (torch.randn(B, T, generator=g) * 0.5 - 6.0).to(TRITON_DEVICE)
    adv = torch.randn(B, generator=g).to(TRITON_DEVICE)
    kw = dict(objective=OBJECTIVES[name], temperature=0.8, loss_agg_mode="token-mean")
    loss = mhpo_kernels.fused_linear_policy_loss(hidden, weight, ids, old, adv, chunk_size=3, **kw)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    loss_m = mhpo_kernels.policy_loss(hidden @ weight.t(), ids, old, adv, **kw)
    dh_m, dw_m = torch.autograd.grad(loss_m, (hidden, weight))
    assert abs(loss.item() - loss_m.item()) <= FP32_RTOL * abs(loss_m.item())
    assert max_rel_err(dh, dh_m) <= FP32_RTOL and max_rel_err(dw, dw_m) <= FP32_RTOL
    with pytest.raises(NotImplementedError, match="GSPO"):
        mhpo_kernels.fused_linear_policy_loss(hidden, weight, ids, old, adv, objective=GSPO())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sapo_gradient_finite_at_an_overflowing_ratio(backend):
    """log r > 88: r overflows fp32 but the gate has saturated, so the gradient is 0, not 0 · inf."""
    logits, kwargs = make_inputs(SMALL, Regime("sapo", garbage=False, mask=False, ignore=False), device=TRITON_DEVICE)
    kwargs["old_logprobs"] = torch.full_like(kwargs["old_logprobs"], -120.0)
    with mhpo_kernels.use_backend(backend):
        loss, grad = loss_and_grad(lambda x, **kw: _call(mhpo_kernels.policy_loss, SAPO(), x, kw), logits, kwargs)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_policy_loss_module_is_policy_loss(name, backend):
    """``PolicyLoss(objective=...)`` holds the objective and settings and gives ``policy_loss``'s
    loss and gradient, the same bits, for every objective; against float64 as above."""
    objective = OBJECTIVES[name]
    logits, kwargs = make_inputs(SMALL, Regime("module", ratio="near", kl=True, agg="token-mean"), seed=3,
                                 device=TRITON_DEVICE)
    settings = dict(temperature=kwargs.pop("temperature", 1.0), loss_agg_mode=kwargs.pop("loss_agg_mode"),
                    beta=kwargs.pop("beta", 0.0))
    module = mhpo_kernels.PolicyLoss(objective=objective, **settings)
    with mhpo_kernels.use_backend(backend):
        loss, grad = loss_and_grad(lambda x, **kw: module(x, kw.pop("input_ids"), kw.pop("old_logprobs"),
                                                          kw.pop("advantages"), kw.pop("mask"), **kw),
                                   logits, kwargs, upstream=0.6)
        want, want_grad = loss_and_grad(lambda x, **kw: _call(mhpo_kernels.policy_loss, objective, x, {**kw, **settings}),
                                        logits, kwargs, upstream=0.6)
    assert torch.equal(loss, want) and torch.equal(grad, want_grad)
    kw64 = as_float64({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in {**kwargs, **settings}.items()})
    loss64, _ = loss_and_grad(lambda x, **kw: _call(reference.policy_loss, objective, x, kw),
                              logits.cpu().double(), kw64, upstream=0.6)
    assert abs(loss.item() - loss64.item()) <= FP32_RTOL * abs(loss64.item()) + 1e-12
    assert "objective=" in repr(module)


def test_policy_loss_module_checks_at_construction():
    with pytest.raises(TypeError, match="objective must be an instance"):
        mhpo_kernels.PolicyLoss(objective=PPOClip)
    with pytest.raises(ValueError, match="temperature"):
        mhpo_kernels.PolicyLoss(objective=PPOClip(), temperature=0.0)
    with pytest.raises(ValueError, match="grad_in_forward=True is not supported with a sequence-level"):
        mhpo_kernels.PolicyLoss(objective=GSPO(), grad_in_forward=True)
    with pytest.raises(TypeError):
        mhpo_kernels.PolicyLoss(PPOClip())   # keyword only
