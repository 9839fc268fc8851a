"""mhpo_loss against the float64 reference: named shapes × a full regime, regimes × one shape,
and the low-precision dtypes against eager PyTorch's own error at that dtype."""

import pytest
import torch

import mhpo_kernels
import reference
from _cases import (
    FP32_RTOL, SHAPES, SMALL, UNIT_ROUNDOFF, Regime, as_float64, loss_and_grad, make_inputs,
    max_rel_err,
)
from conftest import DEVICES

FULL = Regime("full", kl=True, temperature=0.7)  # every feature at once

REGIMES = [
    Regime("on-policy", ratio="on-policy"),
    Regime("near"),
    Regime("far-saturated", ratio="far"),
    Regime("adv-positive", adv="pos"),
    Regime("adv-negative", adv="neg"),
    Regime("adv-per-token", adv="per-token"),
    Regime("clean-no-mask", mask=False, ignore=False, garbage=False),
    Regime("kl", kl=True),
    Regime("kl-far", ratio="far", kl=True),
    Regime("token-mean", agg="token-mean"),
    Regime("seq-mean-token-sum", agg="seq-mean-token-sum"),
    Regime("temperature", temperature=0.6),
]


def check_fp32(shape, regime, device, upstream=1.0):
    logits, kwargs = make_inputs(shape, regime, device=device)
    loss, grad = loss_and_grad(mhpo_kernels.mhpo_loss, logits, kwargs, upstream)
    loss64, grad64 = loss_and_grad(reference.mhpo_loss, logits.cpu().double(),
                                   as_float64({k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                for k, v in kwargs.items()}), upstream)
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    assert torch.isfinite(grad).all(), "a gradient element is not finite"
    assert abs(loss.item() - loss64.item()) <= FP32_RTOL * abs(loss64.item()) + 1e-12
    assert max_rel_err(grad.cpu(), grad64) <= FP32_RTOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_shapes_fp32(shape, device):
    check_fp32(shape, FULL, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("regime", REGIMES, ids=lambda r: r.id)
def test_regimes_fp32(regime, device):
    check_fp32(SMALL, regime, device, upstream=-2.75)  # a random-looking upstream gradient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5]], ids=lambda s: s.id)
def test_low_precision_no_worse_than_eager(shape, dtype, device):
    """Error against float64 ≤ eager PyTorch's own error at this dtype, plus one rounding.

    The fused op reads bf16/fp16 logits and does everything else in fp32, rounding only the stored
    gradient; the eager reference rounds at every step (softmax, ψ, ζ) in the dtype it is given.
    The margin is one unit roundoff of the dtype on the gradient (the final store) and 1e-5 on the
    fp32 loss.
    """
    regime = Regime("lowp", kl=True, temperature=0.7, dtype=dtype)
    logits, kwargs = make_inputs(shape, regime, device=device)
    cpu_kwargs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    loss, grad = loss_and_grad(mhpo_kernels.mhpo_loss, logits, kwargs, upstream=1.5)
    loss64, grad64 = loss_and_grad(reference.mhpo_loss, logits.cpu().double(), as_float64(cpu_kwargs), 1.5)
    eager_loss, eager_grad = loss_and_grad(reference.mhpo_loss, logits.cpu(), cpu_kwargs, 1.5)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    loss_err, eager_loss_err = abs(loss.item() - loss64.item()), abs(eager_loss.item() - loss64.item())
    assert loss_err <= eager_loss_err + 1e-5 * abs(loss64.item())
    grad_err, eager_grad_err = max_rel_err(grad.cpu(), grad64), max_rel_err(eager_grad, grad64)
    assert grad_err <= eager_grad_err + UNIT_ROUNDOFF[dtype]
    # And in absolute terms: a single rounding of each element, not more.
    assert grad_err <= 2 * UNIT_ROUNDOFF[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_all_invalid_batch_is_zero(device):
    regime = Regime("none-valid", garbage=False)
    logits, kwargs = make_inputs(SMALL, regime, device=device)
    kwargs["mask"] = torch.zeros_like(kwargs["input_ids"], dtype=torch.bool)
    for mode in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum"):
        loss, grad = loss_and_grad(mhpo_kernels.mhpo_loss, logits, {**kwargs, "loss_agg_mode": mode})
        assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("adv_shape", [(0,), (0, 4), ()], ids=["per-sequence", "per-token", "one-for-all"])
def test_empty_batch_is_zero_on_every_path(backend, adv_shape):
    """B = 0 sequences: a 0 loss and an empty gradient, as the float64 reference gives."""
    from conftest import TRITON_DEVICE

    ids = torch.zeros(0, 4, dtype=torch.long, device=TRITON_DEVICE)
    old, adv = torch.zeros(0, 4, device=TRITON_DEVICE), torch.ones(adv_shape, device=TRITON_DEVICE)
    logits = torch.randn(0, 4, 33, device=TRITON_DEVICE, requires_grad=True)
    with mhpo_kernels.use_backend(backend):
        loss = mhpo_kernels.mhpo_loss(logits, ids, old, adv, token_weights=adv)
        loss.backward()
        logp = mhpo_kernels.token_logprobs(logits.detach(), ids)
    x64 = logits.detach().cpu().double().requires_grad_()
    loss64 = reference.mhpo_loss(x64, ids.cpu(), old.cpu().double(), adv.cpu().double(),
                                 token_weights=adv.cpu().double())
    loss64.backward()
    assert loss.item() == loss64.item() == 0.0
    assert logits.grad.shape == x64.grad.shape == (0, 4, 33) and logp.shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_on_policy_none_equals_detached_logp(device):
    """old_logprobs=None means old = sg[logp]: the same loss and gradient as passing it."""
    logits, kwargs = make_inputs(SMALL, Regime("on", ratio="on-policy", garbage=False), device=device)
    loss_none, grad_none = loss_and_grad(mhpo_kernels.mhpo_loss, logits, kwargs)
    logp = mhpo_kernels.token_logprobs(logits, kwargs["input_ids"]).detach()
    loss_old, grad_old = loss_and_grad(mhpo_kernels.mhpo_loss, logits, {**kwargs, "old_logprobs": logp})
    assert torch.equal(loss_none, loss_old) and torch.equal(grad_none, grad_old)


@pytest.mark.parametrize("device", DEVICES)
def test_metrics_match_reference(device):
    logits, kwargs = make_inputs(SMALL, Regime("metrics", ratio="far", kl=True), device=device)
    _, metrics = mhpo_kernels.mhpo_loss(logits, **kwargs, return_metrics=True)
    cpu_kwargs = as_float64({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    _, expected = reference.mhpo_loss(logits.cpu().double(), **cpu_kwargs, return_metrics=True)
    assert metrics.keys() == expected.keys()
    for name, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad, name
        assert value.item() == pytest.approx(expected[name].item(), rel=FP32_RTOL, abs=1e-6), name


def test_module_equals_function():
    logits, kwargs = make_inputs(SMALL, Regime("module", kl=True, temperature=0.8))
    module = mhpo_kernels.MHPOLoss(c=2.0, k_neg=1.5, temperature=0.8, beta=0.2, loss_agg_mode="token-mean")
    ids, old, adv, mask, ref = (kwargs[k] for k in ("input_ids", "old_logprobs", "advantages", "mask", "ref_logprobs"))
    by_module = module(logits, ids, old, adv, mask, ref_logprobs=ref)
    by_function = mhpo_kernels.mhpo_loss(logits, ids, old, adv, mask, c=2.0, k_neg=1.5, temperature=0.8,
                                         beta=0.2, ref_logprobs=ref, loss_agg_mode="token-mean")
    assert torch.equal(by_module, by_function)
    assert "c=2.0" in repr(module)
