"""The MHPO per-token loss from log-probs, for frameworks that hand the loss log-probs rather than
logits (verl's policy-loss registry): O(N) work, so plain PyTorch, with the exact gradient."""

import torch

from .loss import mhpo_params
from .epilogue import token_terms


class _MHPOTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, adv, hp):
        flat = logp.detach().reshape(-1)
        valid = torch.ones_like(flat, dtype=torch.bool)
        ones = torch.ones_like(flat, dtype=torch.float32)
        old_flat = None if old is None else old.detach().reshape(-1)
        psi, zeta, loss, coef = token_terms(flat, valid, old_flat, adv.detach().reshape(-1), ones, None, hp)
        ctx.save_for_backward(coef)
        loss, psi, zeta = (x.reshape(logp.shape) for x in (loss, psi, zeta))
        ctx.mark_non_differentiable(psi, zeta)
        return loss, psi, zeta

    @staticmethod
    def backward(ctx, d_loss, _psi, _zeta):
        (coef,) = ctx.saved_tensors
        return (d_loss * coef.reshape(d_loss.shape)).to(d_loss.dtype), None, None, None


def mhpo_token_loss(logp, old_logprobs, advantages, *, c=1.5, k_pos=1.5, lam_pos=1.0, k_neg=2.0, lam_neg=0.8):
    """Per-token MHPO loss −exp(ψ − ζ)·A and its ψ, ζ, from log-probs: (loss, psi, zeta), fp32,
    each shaped like ``logp``.

    ``logp`` carries the gradient (dψ/dlog_r = sech²(log_r/c), evaluated directly, never as
    1 − tanh²); ``old_logprobs`` (None: on-policy) and ``advantages`` (broadcastable to logp) are
    data. No masking, KL or aggregation: the caller's framework does those.
    """
    hp = mhpo_params(c, k_pos, lam_pos, k_neg, lam_neg, 0.0)
    if not isinstance(logp, torch.Tensor) or not logp.is_floating_point():
        raise TypeError("logp must be a floating tensor")
    if old_logprobs is not None and old_logprobs.shape != logp.shape:
        raise ValueError(f"old_logprobs must have logp's shape {tuple(logp.shape)}, got {tuple(old_logprobs.shape)}")
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise TypeError("advantages must be a floating tensor")
    try:
        adv = torch.broadcast_to(advantages, logp.shape)
    except RuntimeError:
        raise ValueError(f"advantages must broadcast to logp's shape {tuple(logp.shape)} (one per token, or per "
                         f"sequence as (B, 1)), got shape {tuple(advantages.shape)}") from None
    return _MHPOTokenLoss.apply(logp, old_logprobs, adv.float(), hp)
