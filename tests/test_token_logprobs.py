"""token_logprobs (and its entropy) against the float64 reference, forward and gradient."""

import pytest
import torch

import mhpo_kernels
import reference
from _cases import FP32_RTOL, SHAPES, max_rel_err
from conftest import DEVICES


def _inputs(shape, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(shape.B, shape.T + shape.sliced, shape.V, generator=g) * 3.0
    logits = (full[:, :-1] if shape.sliced else full).to(dtype)
    ids = torch.randint(0, shape.V, (shape.B, shape.T), generator=g)
    ids[0, 0] = -100
    if shape.flat:
        logits, ids = logits.reshape(-1, shape.V), ids.reshape(-1)
    return logits.to(device), ids.to(device)


def _run(fn, logits, ids, temperature, up_logp, up_ent):
    x = logits.detach().clone().requires_grad_()
    logp, ent = fn(x, ids, temperature=temperature, return_entropy=True)
    (grad,) = torch.autograd.grad((logp * up_logp).sum() + (ent * up_ent).sum(), x)
    return logp.detach(), ent.detach(), grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[5], SHAPES[6]], ids=lambda s: s.id)
def test_logprobs_and_entropy_fp32(shape, device):
    logits, ids = _inputs(shape, torch.float32, device)
    g = torch.Generator().manual_seed(2)
    up_logp = torch.randn(ids.shape, generator=g).to(device)
    up_ent = torch.randn(ids.shape, generator=g).to(device)
    logp, ent, grad = _run(mhpo_kernels.token_logprobs, logits, ids, 0.8, up_logp, up_ent)
    logp64, ent64, grad64 = _run(reference.token_logprobs, logits.cpu().double(), ids.cpu(), 0.8,
                                 up_logp.cpu().double(), up_ent.cpu().double())
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ids.shape
    assert max_rel_err(logp.cpu(), logp64) <= FP32_RTOL
    assert max_rel_err(ent.cpu(), ent64) <= FP32_RTOL
    assert max_rel_err(grad.cpu(), grad64) <= FP32_RTOL
    ignored = ids == -100
    assert not logp[ignored].any() and not ent[ignored].any() and not grad[ignored].any()


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_bf16_reads_exactly(device):
    """bf16 logits are read exactly and reduced in fp32: the result is the float64 value of the
    same bf16 inputs to fp32 accuracy, not to bf16 accuracy."""
    logits, ids = _inputs(SHAPES[0], torch.bfloat16, device)
    logp = mhpo_kernels.token_logprobs(logits, ids)
    logp64 = reference.token_logprobs(logits.cpu().double(), ids.cpu())
    assert max_rel_err(logp.cpu(), logp64) <= FP32_RTOL


def test_without_entropy_returns_tensor():
    logits, ids = _inputs(SHAPES[2], torch.float32, "cpu")
    logp = mhpo_kernels.token_logprobs(logits, ids)
    assert isinstance(logp, torch.Tensor) and logp.shape == ids.shape
