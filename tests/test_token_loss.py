"""mhpo_token_loss, the per-token MHPO term from log-probs (what the verl plugin uses)."""

import pytest
import torch

import mhpo_kernels
import reference
from _cases import FP32_RTOL, max_rel_err


def test_matches_reference_with_exact_gradient():
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 6, generator=g) - 4).requires_grad_()
    old = logp.detach() + torch.randn(3, 6, generator=g) * 4       # ratios far into saturation
    adv = torch.randn(3, 1, generator=g)
    hp = dict(c=1.2, k_pos=1.3, lam_pos=0.9, k_neg=2.2, lam_neg=0.7)
    loss, psi, zeta = mhpo_kernels.mhpo_token_loss(logp, old, adv, **hp)
    (grad,) = torch.autograd.grad((loss * 1.7).sum(), logp)
    logp64 = logp.detach().double().requires_grad_()
    _, psi64, zeta64, w64 = reference.mhpo_terms(logp64, old.double(), **hp)
    loss64 = -w64 * adv.double()
    (grad64,) = torch.autograd.grad((loss64 * 1.7).sum(), logp64)
    assert loss.dtype == torch.float32 and loss.shape == logp.shape
    assert max_rel_err(loss, loss64) <= FP32_RTOL and max_rel_err(grad, grad64) <= FP32_RTOL
    assert max_rel_err(psi, psi64) <= FP32_RTOL and max_rel_err(zeta, zeta64) <= FP32_RTOL
    assert not psi.requires_grad and not zeta.requires_grad


def test_on_policy_and_checks():
    logp = torch.randn(2, 3, requires_grad=True)
    loss, psi, _ = mhpo_kernels.mhpo_token_loss(logp, None, torch.ones(2, 3))
    assert not psi.any()
    with pytest.raises(ValueError, match="old_logprobs"):
        mhpo_kernels.mhpo_token_loss(logp, torch.zeros(3, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="c"):
        mhpo_kernels.mhpo_token_loss(logp, None, torch.ones(2, 3), c=0.0)


def test_advantages_are_laid_out_as_mhpo_loss_takes_them():
    """(B,) is one advantage per sequence, as in mhpo_loss, also where B = T (NumPy's broadcasting
    would give one per position); a layout mhpo_loss does not take is refused."""
    logp = torch.randn(3, 3) - 2.0
    old = logp + 0.3 * torch.randn(3, 3)
    adv = torch.tensor([0.5, -1.0, 2.0])
    per_token = adv[:, None].expand(3, 3)
    expected = mhpo_kernels.mhpo_token_loss(logp, old, per_token)
    for layout in (adv, adv[:, None]):
        assert all(torch.equal(a, b) for a, b in zip(mhpo_kernels.mhpo_token_loss(logp, old, layout), expected))
    for one in (torch.tensor(2.0), torch.tensor([2.0])):
        got = mhpo_kernels.mhpo_token_loss(logp, old, one)[0]
        assert torch.equal(got, mhpo_kernels.mhpo_token_loss(logp, old, torch.full((3, 3), 2.0))[0])
    for bad in (adv[None, :], torch.ones(3, 3, 1), torch.ones(2)):
        with pytest.raises(ValueError, match=r"advantages must have shape \(B,\) = \(3,\), \(B, 1\)"):
            mhpo_kernels.mhpo_token_loss(logp, old, bad)
    with pytest.raises(TypeError, match="old_logprobs must be a torch.Tensor"):
        mhpo_kernels.mhpo_token_loss(logp, old.tolist(), adv)
