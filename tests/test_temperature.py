"""A per-token temperature (one τ_t per token, varying in [0.3, 2]) against the float64 reference on
the Triton kernels (interpreted here), the PyTorch path and the fused linear path: values,
gradients and the entropy metric, padded, shifted and flat inputs, fp32 and bf16, softcap on and
off. Invalid tokens' τ is NaN throughout: it must change nothing."""

import pytest
import torch

import mhpo_kernels
import reference
from _cases import FP32_RTOL, SMALL, UNIT_ROUNDOFF, Regime, as_float64, make_inputs, max_rel_err
from mhpo_kernels.objectives import PPOClip

BACKENDS = ["triton", "torch"]


def _tau(shape, valid, seed=7):
    g = torch.Generator().manual_seed(seed)
    tau = torch.rand(shape, generator=g) * 1.7 + 0.3
    return tau.masked_fill(~valid.reshape(shape), float("nan"))


def _valid(kwargs):
    ids, mask = kwargs["input_ids"], kwargs["mask"]
    valid = ids != -100
    return valid if mask is None else valid & mask.bool()


def _loss_grad(fn, logits, kwargs, upstream=-1.75):
    x = logits.detach().clone().requires_grad_()
    loss, metrics = fn(x, **kwargs, return_metrics=True)
    (grad,) = torch.autograd.grad(loss * upstream, x)
    return loss.detach(), metrics, grad


def _shifted(logits, kwargs, seed=3):
    """(B, T + 1, V) logits whose first T positions are ``logits``: the trainer's unsliced call."""
    extra = torch.randn(logits.shape[0], 1, logits.shape[-1], generator=torch.Generator().manual_seed(seed))
    return torch.cat([logits, extra.to(logits.dtype)], 1), kwargs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "shifted", "flat"])
def test_loss_per_token_temperature_fp32(backend, layout):
    regime = Regime("tau", kl=True, adv="per-token")
    logits, kwargs = make_inputs(SMALL, regime)
    kwargs["temperature"] = _tau(kwargs["input_ids"].shape, _valid(kwargs))
    if layout == "flat":
        B, T, V = logits.shape
        logits = logits.reshape(B * T, V)
        kwargs = {k: v.reshape(-1) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        kwargs["loss_agg_mode"] = "token-mean"
    if layout == "shifted":
        logits, kwargs = _shifted(logits, kwargs)
    with mhpo_kernels.use_backend(backend):
        loss, metrics, grad = _loss_grad(mhpo_kernels.mhpo_loss, logits, kwargs)
    loss64, metrics64, grad64 = _loss_grad(reference.mhpo_loss, logits.double(), as_float64(kwargs))
    assert abs(loss.item() - loss64.item()) <= FP32_RTOL * abs(loss64.item())
    assert max_rel_err(grad, grad64) <= FP32_RTOL
    if layout == "shifted":
        assert not grad[:, -1].any()
    for name in ("entropy", "logp", "kl", "psi"):  # the metrics follow τ_t
        assert metrics[name].item() == pytest.approx(metrics64[name].item(), rel=FP32_RTOL, abs=1e-6), name
    # τ_t matters: the scalar mean of the τs gives another loss
    scalar = {**kwargs, "temperature": float(kwargs["temperature"].nan_to_num(1.0).mean())}
    with mhpo_kernels.use_backend(backend):
        assert abs(mhpo_kernels.mhpo_loss(logits, **scalar).item() - loss.item()) > 1e-4 * abs(loss.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_and_module_take_a_tensor(backend):
    """policy_loss (another objective) and MHPOLoss.forward(..., temperature=tensor)."""
    logits, kwargs = make_inputs(SMALL, Regime("tau-ppo", garbage=False))
    kwargs["temperature"] = _tau(kwargs["input_ids"].shape, _valid(kwargs), seed=8)
    with mhpo_kernels.use_backend(backend):
        loss, _, grad = _loss_grad(lambda x, **kw: mhpo_kernels.policy_loss(x, objective=PPOClip(), **kw),
                                   logits, kwargs)
        module = mhpo_kernels.MHPOLoss(temperature=0.5)
        by_module = module(logits, kwargs["input_ids"], kwargs["old_logprobs"], kwargs["advantages"],
                           kwargs["mask"], temperature=kwargs["temperature"])
        by_function = mhpo_kernels.mhpo_loss(logits, **kwargs)
    loss64, _, grad64 = _loss_grad(lambda x, **kw: reference.policy_loss(x, objective=PPOClip(), **kw),
                                   logits.double(), as_float64(kwargs))
    assert abs(loss.item() - loss64.item()) <= FP32_RTOL * abs(loss64.item())
    assert max_rel_err(grad, grad64) <= FP32_RTOL
    assert torch.equal(by_module, by_function)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_per_token_temperature(backend, dtype):
    """log-probs and entropy, both differentiated with random upstream gradients, from shifted
    logits. The sweeps read bf16 logits exactly and compute in fp32, so their values match the
    float64 result of the same bf16 inputs to fp32 accuracy; the gradient is stored in bf16 (one
    rounding: 2 units of bf16 roundoff covers the interpreter's truncating store)."""
    g = torch.Generator().manual_seed(11)
    B, T, V = 2, 5, 300
    logits = (torch.randn(B, T + 1, V, generator=g) * 3.0).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 2] = ids[1, 4] = -100
    tau = _tau((B, T), ids != -100)
    up_logp, up_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)

    def run(fn, x, up1, up2, t):
        x = x.detach().clone().requires_grad_()
        logp, ent = fn(x, ids, temperature=t, return_entropy=True)
        (grad,) = torch.autograd.grad((logp * up1).sum() + (ent * up2).sum(), x)
        return logp.detach(), ent.detach(), grad

    with mhpo_kernels.use_backend(backend):
        logp, ent, grad = run(mhpo_kernels.token_logprobs, logits, up_logp, up_ent, tau)
    logp64, ent64, grad64 = run(reference.token_logprobs, logits.double(), up_logp.double(), up_ent.double(),
                                tau.double())
    assert max_rel_err(logp, logp64) <= FP32_RTOL and max_rel_err(ent, ent64) <= FP32_RTOL
    grad_tol = FP32_RTOL if dtype == torch.float32 else 2 * UNIT_ROUNDOFF[dtype]
    assert max_rel_err(grad, grad64) <= grad_tol
    assert not grad[:, -1].any() and not logp[ids == -100].any() and not ent[ids == -100].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
def test_fused_linear_per_token_temperature(backend, softcap):
    """fused_linear_mhpo_loss and fused_linear_token_logprobs with τ_t, against the float64
    reference on the materialized z = cap·tanh(s·(h Wᵀ + b)/cap), and against the fused path's
    own result on the materialized logits (mhpo_loss)."""
    g = torch.Generator().manual_seed(12)
    B, T, H, V = 2, 5, 16, 200
    hidden = torch.randn(B, T, H, generator=g)
    weight, bias = torch.randn(V, H, generator=g) * 0.4, torch.randn(V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    ids[1, 0] = -100
    valid = mask & (ids != -100)
    tau = _tau((B, T), valid)
    old, adv = torch.randn(B, T, generator=g) - 5.0, torch.randn(B, generator=g)
    ids_valid = torch.where(valid, ids, -100)
    kw = dict(temperature=tau, loss_agg_mode="token-mean")
    lin = dict(logit_scale=1.3, final_logit_softcap=softcap, chunk_size=3)

    def logits_of(h, w, b):
        z = 1.3 * (h @ w.t() + b)
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    leaves64 = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    with mhpo_kernels.use_backend(backend):
        loss = mhpo_kernels.fused_linear_mhpo_loss(*leaves[:2], ids, old, adv, mask, bias=leaves[2], **lin, **kw)
        materialized = mhpo_kernels.mhpo_loss(logits_of(hidden, weight, bias), ids, old, adv, mask, **kw)
        logp, ent = mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids_valid, bias=bias,
                                                             temperature=tau, return_entropy=True, **lin)
    loss.backward()
    loss64 = reference.mhpo_loss(logits_of(*leaves64), ids, old.double(), adv.double(), mask,
                                 temperature=tau.double(), loss_agg_mode="token-mean")
    loss64.backward()
    assert abs(loss.item() - loss64.item()) <= FP32_RTOL * abs(loss64.item())
    assert abs(materialized.item() - loss.item()) <= FP32_RTOL * abs(loss64.item())
    for got, want in zip(leaves, leaves64):
        assert max_rel_err(got.grad, want.grad) <= FP32_RTOL
    logp64, ent64 = reference.token_logprobs(logits_of(*(x.detach() for x in leaves64)), ids_valid,
                                             tau.double(), return_entropy=True)
    assert max_rel_err(logp, logp64) <= FP32_RTOL and max_rel_err(ent, ent64) <= FP32_RTOL
    assert not logp[~valid].any() and not ent[~valid].any()


def test_constant_tensor_equals_the_scalar():
    """A tensor of one value is that scalar τ (to fp32: k is formed as fp32(log2 e)/τ per row in
    place of fp32(log2 e/τ))."""
    logits, kwargs = make_inputs(SMALL, Regime("tau-const", temperature=0.7))
    loss_scalar, _, grad_scalar = _loss_grad(mhpo_kernels.mhpo_loss, logits, kwargs)
    tensor = {**kwargs, "temperature": torch.full(kwargs["input_ids"].shape, 0.7)}
    loss_tensor, _, grad_tensor = _loss_grad(mhpo_kernels.mhpo_loss, logits, tensor)
    assert abs(loss_tensor.item() - loss_scalar.item()) <= FP32_RTOL * abs(loss_scalar.item())
    assert max_rel_err(grad_tensor, grad_scalar) <= FP32_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dim_tensor_is_one_temperature_for_every_token(backend):
    """A 0-d τ (a trainer's config value kept as a tensor) is accepted as a 0-d normalizer is:
    the same τ at every token, equal to the full tensor's result bitwise, and to reference/ in
    float64 (fp32 tolerance)."""
    logits, kwargs = make_inputs(SMALL, Regime("tau-0d", temperature=0.7))
    with mhpo_kernels.use_backend(backend):
        loss_0d, _, grad_0d = _loss_grad(mhpo_kernels.mhpo_loss, logits, {**kwargs, "temperature": torch.tensor(0.7)})
        full = {**kwargs, "temperature": torch.full(kwargs["input_ids"].shape, 0.7)}
        loss_full, _, grad_full = _loss_grad(mhpo_kernels.mhpo_loss, logits, full)
    assert torch.equal(loss_0d, loss_full) and torch.equal(grad_0d, grad_full)
    expected = reference.mhpo_loss(logits.double(), **as_float64({**kwargs, "temperature": torch.tensor(0.7)}))
    assert abs(loss_0d.item() - expected.item()) <= FP32_RTOL * abs(expected.item())
