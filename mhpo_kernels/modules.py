"""The losses as ``torch.nn.Module``s: their objective and settings held by the module, checked once
at construction, the per-batch tensors passed to ``forward``."""

import torch

from ._inputs import (
    check_agg_mode, check_flag, check_grad_in_forward, check_ignore_index, check_nonnegative, check_positive,
    check_tp_group,
)
from .loss import mhpo_params, policy_loss, resolve_objective
from .objectives import MHPO


class PolicyLoss(torch.nn.Module):
    """``policy_loss`` with its objective and settings held by the module, by keyword only, every
    one checked at construction: ``PolicyLoss(objective=PPOClip(0.2, 0.28), loss_agg_mode=
    "token-mean")``. ``objective`` is a record of ``mhpo_kernels.objectives`` (default MHPO()).

    ``forward`` takes the per-batch arguments of ``policy_loss``; its ``temperature`` replaces
    the module's for one call, with a number or a per-token tensor.
    """

    def __init__(
        self, *, objective=None, temperature=1.0, loss_agg_mode="seq-mean-token-mean", beta=0.0,
        ignore_index=-100, inplace_backward=False, tp_group=None, entropy_coef=0.0, grad_in_forward=False,
        grad_scale=1.0,
    ):
        super().__init__()
        self.objective = resolve_objective(objective)
        self.temperature = check_positive("temperature", temperature)
        self.loss_agg_mode = check_agg_mode(loss_agg_mode)
        self.beta = check_nonnegative("beta", beta)
        self.ignore_index = check_ignore_index(ignore_index)
        self.inplace_backward = check_flag("inplace_backward", inplace_backward)
        self.tp_group = check_tp_group(tp_group)
        self.entropy_coef = check_nonnegative("entropy_coef", entropy_coef)
        self.grad_in_forward = check_grad_in_forward(grad_in_forward, self.objective, self.tp_group,
                                                     self.entropy_coef)
        self.grad_scale = check_positive("grad_scale", grad_scale)

    def forward(self, logits, input_ids, old_logprobs, advantages, mask=None, *,
                ref_logprobs=None, return_metrics=False, normalizer=None, cu_seqlens=None,
                seq_valid_tokens=None, temperature=None, min_p=None, top_k=None, top_p=None, token_weights=None,
                kept_ids=None):
        return policy_loss(
            logits, input_ids, old_logprobs, advantages, mask, objective=self.objective,
            temperature=self.temperature if temperature is None else temperature,
            loss_agg_mode=self.loss_agg_mode, ref_logprobs=ref_logprobs, beta=self.beta,
            ignore_index=self.ignore_index, return_metrics=return_metrics, normalizer=normalizer,
            inplace_backward=self.inplace_backward, tp_group=self.tp_group, cu_seqlens=cu_seqlens,
            seq_valid_tokens=seq_valid_tokens, entropy_coef=self.entropy_coef,
            grad_in_forward=self.grad_in_forward, grad_scale=self.grad_scale, min_p=min_p, top_k=top_k,
            top_p=top_p, token_weights=token_weights, kept_ids=kept_ids,
        )

    def extra_repr(self):
        return (f"objective={self.objective!r}, temperature={self.temperature}, "
                f"loss_agg_mode={self.loss_agg_mode!r}, beta={self.beta}, entropy_coef={self.entropy_coef}")


def _objective_value(name):
    """A value of the module's MHPO objective, read-only: set afterwards it would not reach the loss."""
    def refuse(self, value):
        raise AttributeError(f"MHPOLoss.{name} is its objective's, fixed at construction: build a new "
                             f"MHPOLoss({name}={value!r}, ...)")

    return property(lambda self: getattr(self.objective, name), refuse)


class MHPOLoss(PolicyLoss):
    """``mhpo_loss`` with its hyperparameters held by the module, by keyword only, every one
    checked at construction: ``PolicyLoss`` with ``MHPO(c, k_pos, lam_pos, k_neg, lam_neg)``.

    ``temperature`` is the module's number; ``forward(..., temperature=tau)`` replaces it for one
    call, with a number or a per-token tensor (as ``mhpo_loss`` takes).
    """

    def __init__(self, *, c=1.5, k_pos=1.5, lam_pos=1.0, k_neg=2.0, lam_neg=0.8, beta=0.0, **settings):
        values = mhpo_params(c, k_pos, lam_pos, k_neg, lam_neg, beta).values
        super().__init__(objective=MHPO(*values), beta=beta, **settings)

    c, k_pos, lam_pos, k_neg, lam_neg = map(_objective_value, ("c", "k_pos", "lam_pos", "k_neg", "lam_neg"))

    def extra_repr(self):
        return (
            f"c={self.c}, k_pos={self.k_pos}, lam_pos={self.lam_pos}, k_neg={self.k_neg}, "
            f"lam_neg={self.lam_neg}, temperature={self.temperature}, "
            f"loss_agg_mode={self.loss_agg_mode!r}, beta={self.beta}, entropy_coef={self.entropy_coef}"
        )
