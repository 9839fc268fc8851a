"""The MHPO per-token loss from log-probs, for frameworks that hand the loss log-probs rather than
logits (verl's policy-loss registry): O(N) work, so plain PyTorch, with the exact gradient."""

import torch

from ._inputs import _check_tensor, _laid_out
from ._sweep_types import ADV_PER_SEQ, ADV_PER_TOKEN
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
    """Per-token MHPO loss −exp(ψ − ζ)·A and its ψ, ζ, from log-probs: (loss, psi, zeta), fp32
    (float64 for float64 log-probs), each shaped like ``logp``.

    ``logp`` carries the gradient (dψ/dlog_r = sech²(log_r/c), evaluated directly, never as
    1 − tanh²); ``old_logprobs`` (None: on-policy) and ``advantages`` are data, the advantages laid
    out as ``mhpo_loss`` takes them: logp's shape, one per sequence ((B,) or (B, 1) for (B, T)
    log-probs) or one for all (() or (1,)). No masking, KL or aggregation: the caller's framework
    does those.
    """
    hp = mhpo_params(c, k_pos, lam_pos, k_neg, lam_neg, 0.0)
    _check_tensor("logp", logp, getattr(logp, "device", None), "float")
    if old_logprobs is not None:
        _check_tensor("old_logprobs", old_logprobs, logp.device, "float")
    if old_logprobs is not None and old_logprobs.shape != logp.shape:
        raise ValueError(f"old_logprobs must have logp's shape {tuple(logp.shape)}, got {tuple(old_logprobs.shape)}")
    layout, adv, _ = _laid_out("advantages", advantages, logp.shape, logp.device, None, None)  # as mhpo_loss's
    adv = adv.reshape(-1, 1) if layout == ADV_PER_SEQ else adv.reshape(logp.shape if layout == ADV_PER_TOKEN else ())
    adv = adv.expand(logp.shape)
    return _MHPOTokenLoss.apply(logp, old_logprobs, adv.float(), hp)
