"""verl integration: the policy loss ``mhpo``, and verl's actor log-probs and entropy from the fused
kernels (``actor_rollout_ref.model.fused_kernel_options.impl_backend: mhpo``, see ``verl_engine``).

MHPO as a verl policy loss: ``actor.policy_loss.loss_mode: mhpo``.

verl calls a policy loss with per-token log-probs, not logits, so this surface runs the MHPO
per-token math on log-probs (``mhpo_kernels.mhpo_token_loss``: exact sech² gradient, O(N) work)
and aggregates with verl's own ``agg_loss`` and ``config.global_batch_info``, so data-parallel
and gradient-accumulation scaling are verl's. The KL penalty stays verl's (``use_kl_loss``).

Installed with ``pip install mhpo-kernels[verl]``, this module is a ``verl.plugins`` entry point:
``import verl`` registers the loss. In YAML:

    actor_rollout_ref:
      actor:
        policy_loss:
          _target_: mhpo_kernels.integrations.verl.MHPOPolicyLossConfig
          loss_mode: mhpo
          c: 1.5
          k_pos: 1.5
          lam_pos: 1.0
          k_neg: 2.0
          lam_neg: 0.8
"""

import functools
import inspect
from dataclasses import dataclass

import torch
import verl
from packaging.version import Version

VERL_RANGE = (Version("0.9"), Version("0.10"))  # [0.9, 0.10): the engine code verl_engine is written for


def check_verl_version(version):
    """Refuse a verl release outside the range this integration was built and tested against."""
    if not VERL_RANGE[0] <= Version(version) < VERL_RANGE[1]:
        raise ImportError(
            f"mhpo_kernels.integrations.verl supports verl >= 0.9, < 0.10 (it hooks the FSDP engine of "
            f"those releases); found verl {version}. Install a supported one: pip install 'mhpo-kernels[verl]'")


check_verl_version(verl.__version__)

from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, agg_loss, register_policy_loss  # noqa: E402
from verl.utils.torch_functional import masked_mean  # noqa: E402
from verl.workers.config import PolicyLossConfig  # noqa: E402

from ..token_loss import mhpo_token_loss  # noqa: E402
from . import verl_engine  # noqa: E402,F401  (installs the impl_backend switch)

LOSS_MODE = "mhpo"
_DEFAULTS = dict(c=1.5, k_pos=1.5, lam_pos=1.0, k_neg=2.0, lam_neg=0.8)


@dataclass
class MHPOPolicyLossConfig(PolicyLossConfig):
    """verl's PolicyLossConfig plus the MHPO hyperparameters (the paper's defaults)."""

    loss_mode: str = LOSS_MODE
    c: float = 1.5
    k_pos: float = 1.5
    lam_pos: float = 1.0
    k_neg: float = 2.0
    lam_neg: float = 0.8


def _hyperparameters(config):
    policy_loss = config.policy_loss if config is not None else None
    get = (lambda k, d: policy_loss.get(k, d)) if policy_loss is not None else (lambda k, d: d)
    return {k: float(get(k, d)) for k, d in _DEFAULTS.items()}


@register_policy_loss(LOSS_MODE)
def compute_policy_loss_mhpo(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None,
):
    """verl's policy-loss signature: (pg_loss, metrics) for (bs, response_length) inputs."""
    hp = _hyperparameters(config)
    loss_mat, psi, zeta = mhpo_token_loss(log_prob, old_log_prob, advantages, **hp)
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights
    batch_info = dict(config.global_batch_info) if config is not None else {}
    pg_loss = agg_loss(loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
    with torch.no_grad():   # verl's masked mean: what lies outside the mask, NaN included, adds nothing
        log_ratio = (log_prob - old_log_prob).float()
        metrics = {
            "actor/mhpo_psi": masked_mean(psi, response_mask),
            "actor/mhpo_zeta": masked_mean(zeta, response_mask),
            "actor/mhpo_survival": masked_mean(torch.exp(-zeta), response_mask),
            "actor/mhpo_abs_log_ratio": masked_mean(log_ratio.abs(), response_mask),
            "actor/mhpo_saturated_frac": masked_mean((log_ratio.abs() > hp["c"]).float(), response_mask),
            # as verl's vanilla-family losses log it: of the log-ratio clamped to ±20, as they form their ratio
            "actor/ppo_kl": masked_mean(-log_ratio.clamp(-20.0, 20.0), response_mask),
        }
    return pg_loss, {k: v.item() for k, v in metrics.items()}


BYPASS_MODE = "bypass_mode"
BYPASS_REFUSED = ("mhpo_kernels: algorithm.rollout_correction.bypass_mode=True replaces the policy loss with verl's "
                  "bypass loss (PPO-clip or REINFORCE; apply_bypass_mode sets policy_loss.loss_mode='bypass_mode'), "
                  "so MHPO would not be trained; turn bypass_mode off to train MHPO with rollout correction")


def _refusing_mhpo(fn, is_mhpo):
    """verl's ``fn``, raising ``BYPASS_REFUSED`` where ``is_mhpo`` holds of its bound arguments.
    verl's rollout-correction bypass mode sets ``policy_loss.loss_mode`` to its own loss, PPO-clip
    or REINFORCE: a run configured for MHPO would train that instead."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def refusing(*args, **kwargs):
        if is_mhpo(signature.bind(*args, **kwargs).arguments):
            raise ValueError(BYPASS_REFUSED)
        return fn(*args, **kwargs)

    refusing.refuses_mhpo = True
    return refusing


def _mhpo_loss_config(arguments):   # the bypass loss: the config still carries MHPO's hyperparameters
    policy_loss = getattr(arguments.get("config"), "policy_loss", None)
    return policy_loss is not None and any(policy_loss.get(k, None) is not None for k in _DEFAULTS)


def _mhpo_loss_mode(arguments):     # apply_bypass_mode, before it overwrites the loss mode
    policy_loss = arguments.get("policy_loss_config")
    return policy_loss is not None and policy_loss.get("loss_mode", None) == LOSS_MODE


if BYPASS_MODE in POLICY_LOSS_REGISTRY and not getattr(POLICY_LOSS_REGISTRY[BYPASS_MODE], "refuses_mhpo", False):
    POLICY_LOSS_REGISTRY[BYPASS_MODE] = _refusing_mhpo(POLICY_LOSS_REGISTRY[BYPASS_MODE], _mhpo_loss_config)
try:  # verl's trainers import it when they call it: the refusing one
    from verl.trainer.ppo import rollout_corr_helper  # noqa: E402
except ImportError:
    rollout_corr_helper = None
if rollout_corr_helper is not None and not getattr(rollout_corr_helper.apply_bypass_mode, "refuses_mhpo", False):
    rollout_corr_helper.apply_bypass_mode = _refusing_mhpo(rollout_corr_helper.apply_bypass_mode, _mhpo_loss_mode)
