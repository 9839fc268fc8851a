"""Fused Triton kernels for the MHPO policy loss (Modulated Hazard-aware Policy Optimization).

    loss = mhpo_kernels.mhpo_loss(logits, input_ids, old_logprobs, advantages, mask)

See ``mhpo_loss`` for the formula and shapes, and docs/where-it-runs.md for where each path runs.
"""

from . import objectives, rollout_correction
from ._dispatch import use_backend
from .fused_linear import fused_linear_mhpo_loss, fused_linear_policy_loss, fused_linear_token_logprobs
from .loss import mhpo_loss, policy_loss, token_logprobs
from .modules import MHPOLoss, PolicyLoss
from .token_loss import mhpo_token_loss

__version__ = "0.1.0"
__all__ = [
    "MHPOLoss",
    "PolicyLoss",
    "fused_linear_mhpo_loss",
    "fused_linear_policy_loss",
    "fused_linear_token_logprobs",
    "mhpo_loss",
    "mhpo_token_loss",
    "objectives",
    "policy_loss",
    "rollout_correction",
    "token_logprobs",
    "use_backend",
]
