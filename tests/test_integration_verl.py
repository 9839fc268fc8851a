"""The verl plugin: after ``import verl`` the policy loss ``mhpo`` is registered (through the
``verl.plugins`` entry point), selectable from YAML, and verl's own ``ppo_loss`` with it gives the
reference loss and gradients in every aggregation mode both share."""

import math

import pytest
import torch

verl = pytest.importorskip("verl", reason="the verl extra is not installed (pip install mhpo-kernels[verl])")

import reference  # noqa: E402
from _cases import FP32_RTOL, max_rel_err  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

HP = dict(c=1.2, k_pos=1.3, lam_pos=0.9, k_neg=2.2, lam_neg=0.7)


def test_entry_point_registers_on_import_verl():
    import mhpo_kernels.integrations.verl as plugin

    assert get_policy_loss_fn("mhpo") is plugin.compute_policy_loss_mhpo


def test_config_selectable_from_yaml():
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    from mhpo_kernels.integrations.verl import MHPOPolicyLossConfig

    yaml = """
    _target_: mhpo_kernels.integrations.verl.MHPOPolicyLossConfig
    loss_mode: mhpo
    c: 2.0
    lam_neg: 0.5
    """
    config = omega_conf_to_dataclass(OmegaConf.create(yaml))
    assert isinstance(config, MHPOPolicyLossConfig)
    assert (config.loss_mode, config.c, config.lam_neg, config.k_pos) == ("mhpo", 2.0, 0.5, 1.5)


def _batch(seed=0):
    """A padded verl batch: 3 sequences of prompt 4 and response 6 with ragged response lengths,
    and the flat (no-padding) log-probs a model would return for it."""
    g = torch.Generator().manual_seed(seed)
    B, P, R = 3, 4, 6
    attention = torch.ones(B, P + R, dtype=torch.long)
    attention[1, P + 4:] = 0
    attention[2, P + 2:] = 0
    response_mask = attention[:, P:].clone()
    seq_logp = torch.randn(B, P + R, generator=g) - 3.0          # per position of each sequence
    old = torch.where(response_mask.bool(), torch.randn(B, R, generator=g) * 0.8, 0.0)
    # The model output for position t scores the token at t + 1: the response's log-probs sit at
    # flat positions [offset + P - 1, offset + P - 1 + response_len) of each sequence.
    flat = torch.cat([seq_logp[b, : int(attention[b].sum())] for b in range(B)]).requires_grad_()
    data = TensorDict({
        "prompts": torch.randint(0, 50, (B, P), generator=g), "responses": torch.randint(0, 50, (B, R), generator=g),
        "attention_mask": attention, "response_mask": response_mask,
        "old_log_probs": seq_logp[:, P - 1:P - 1 + R] + old, "advantages": torch.randn(B, R, generator=g),
    }, batch_size=[B])
    return flat, data, response_mask


def _padded(flat, attention, P, R):
    rows, offset = [], 0
    for b in range(attention.shape[0]):
        n = int(attention[b].sum())
        seq = flat[offset: offset + n]
        resp = seq[P - 1: n - 1]
        rows.append(torch.cat([resp, resp.new_zeros(R - resp.numel())]))
        offset += n
    return torch.stack(rows)


@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global-batch-info"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_ppo_loss_equals_reference(mode, global_info):
    from mhpo_kernels.integrations.verl import MHPOPolicyLossConfig

    flat, data, mask = _batch()
    B, R = mask.shape
    P = data["prompts"].shape[1]
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()) if global_info else None,
                         global_batch_size=B if global_info else None)
    config = ActorConfig(strategy="fsdp", ppo_mini_batch_size=B, ppo_micro_batch_size_per_gpu=B, rollout_n=1,
                         loss_agg_mode=mode, use_kl_loss=False, entropy_coeff=0.0,
                         policy_loss=MHPOPolicyLossConfig(**HP))
    loss, metrics = ppo_loss(config, {"log_probs": flat}, data)
    (grad,) = torch.autograd.grad(loss * 1.7, flat)

    flat64 = flat.detach().double().requires_grad_()
    logp64 = _padded(flat64, data["attention_mask"], P, R)
    loss64 = reference.mhpo_loss_from_logprobs(
        logp64, data["old_log_probs"].double(), data["advantages"].double(), mask, loss_agg_mode=mode, **HP)
    (grad64,) = torch.autograd.grad(loss64 * 1.7, flat64)
    assert loss.item() == pytest.approx(loss64.item(), rel=FP32_RTOL)
    assert max_rel_err(grad, grad64) <= FP32_RTOL
    assert "actor/mhpo_psi" in metrics


def test_shared_metric_equals_verls_own():
    """``actor/ppo_kl`` is the metric MHPO's loss shares with verl's own losses: it equals what
    verl's vanilla loss logs on the same inputs, with a log-ratio beyond verl's clamp of ±20 and
    NaN where the response mask is off (verl's masked mean leaves it out); the MHPO metrics stay
    finite there too."""
    from mhpo_kernels.integrations.verl import MHPOPolicyLossConfig

    old = torch.tensor([[-1.0, -30.0, -2.0], [-0.5, -1.0, float("nan")]])
    logp = torch.tensor([[-1.2, -3.0, -2.1], [-0.4, -1.0, -1.0]])   # log r = +27 at (0, 1)
    adv = torch.tensor([[1.0, 1.0, -1.0], [0.5, -0.5, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    logged = {}
    for mode, policy_loss in (("vanilla", None), ("mhpo", MHPOPolicyLossConfig(**HP))):
        config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                             **({} if policy_loss is None else {"policy_loss": policy_loss}))
        _, logged[mode] = get_policy_loss_fn(mode)(old, logp, adv, mask, "token-mean", config)
    assert logged["mhpo"]["actor/ppo_kl"] == pytest.approx(logged["vanilla"]["actor/ppo_kl"], rel=FP32_RTOL)
    assert all(math.isfinite(v) for v in logged["mhpo"].values()), logged["mhpo"]


def test_bypass_mode_refuses_an_mhpo_config():
    """verl's rollout-correction bypass mode sets the policy loss to its own PPO-clip or REINFORCE
    (``apply_bypass_mode``): it refuses a loss mode of mhpo before overwriting it (with MHPO's
    config class or verl's), and the bypass loss refuses a config that carries MHPO's
    hyperparameters (however it was called); with verl's own config both are verl's, unchanged."""
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.trainer.ppo import rollout_corr_helper
    from verl.workers.config import PolicyLossConfig

    from mhpo_kernels.integrations.verl import MHPOPolicyLossConfig

    flat, data, mask = _batch(1)
    B = mask.shape[0]
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)

    def bypass(policy_loss):  # verl's trainer step in bypass mode
        batch = DataProto.from_dict({"rollout_log_probs": data["old_log_probs"], "response_mask": mask})
        rollout_corr_helper.apply_bypass_mode(batch, RolloutCorrectionConfig.bypass_ppo_clip(), policy_loss)

    def actor(policy_loss):
        return ActorConfig(strategy="fsdp", ppo_mini_batch_size=B, ppo_micro_batch_size_per_gpu=B, rollout_n=1,
                           loss_agg_mode="token-mean", use_kl_loss=False, entropy_coeff=0.0, policy_loss=policy_loss)

    for policy_loss in (MHPOPolicyLossConfig(**HP), PolicyLossConfig(loss_mode="mhpo")):
        with pytest.raises(ValueError, match="bypass_mode=True replaces the policy loss"):
            bypass(OmegaConf.structured(policy_loss))
    logp = _padded(flat, data["attention_mask"], data["prompts"].shape[1], mask.shape[1])
    args = (data["old_log_probs"], logp, data["advantages"], mask, "token-mean")
    mhpo = OmegaConf.structured(MHPOPolicyLossConfig(**HP))
    mhpo.loss_mode = "bypass_mode"
    for call in (lambda loss, config: loss(*args, config), lambda loss, config: loss(*args, config=config)):
        with pytest.raises(ValueError, match="bypass_mode=True replaces the policy loss"):
            call(get_policy_loss_fn("bypass_mode"), actor(mhpo))
    verl_own = OmegaConf.structured(PolicyLossConfig())
    bypass(verl_own)
    assert verl_own.loss_mode == "bypass_mode"
    got, _ = ppo_loss(actor(verl_own), {"log_probs": flat}, data)
    want, _ = get_policy_loss_fn("bypass_mode").__wrapped__(*args, config=actor(verl_own))
    assert got.item() == pytest.approx(want.item(), rel=FP32_RTOL)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_token_logprobs_replaces_verl_remove_padding_hook(backend):
    """verl's remove-padding forward computes, on the packed (total_nnz, V) logits divided by τ,
    ``logprobs_from_logits(logits_rmpad, input_ids_rmpad_rolled)`` and
    ``entropy_from_logits(logits_rmpad)``; ``token_logprobs(logits_rmpad, input_ids_rmpad_rolled,
    temperature=τ, return_entropy=True)`` gives both, and their gradients, from the raw logits."""
    import mhpo_kernels
    from conftest import TRITON_DEVICE
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    g = torch.Generator().manual_seed(21)
    nnz, V, tau = 11, 53, 0.8
    logits_rmpad = torch.randn(nnz, V, generator=g, dtype=torch.float64) * 2
    input_ids_rmpad_rolled = torch.randint(0, V, (nnz,), generator=g)
    up = torch.randn(2, nnz, generator=g, dtype=torch.float64)
    x64 = logits_rmpad.clone().requires_grad_()
    scaled = x64 / tau
    theirs = (logprobs_from_logits(scaled, input_ids_rmpad_rolled), entropy_from_logits(scaled))
    (g64,) = torch.autograd.grad((theirs[0] * up[0]).sum() + (theirs[1] * up[1]).sum(), x64)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = logits_rmpad.float().to(device).requires_grad_()
    up32 = up.float().to(device)
    with mhpo_kernels.use_backend(backend):
        ours = mhpo_kernels.token_logprobs(x, input_ids_rmpad_rolled.to(device), temperature=tau, return_entropy=True)
        (g32,) = torch.autograd.grad((ours[0] * up32[0]).sum() + (ours[1] * up32[1]).sum(), x)
    for a, b in zip(ours, theirs):
        assert max_rel_err(a.cpu(), b.detach()) <= FP32_RTOL
    assert max_rel_err(g32.cpu(), g64) <= FP32_RTOL
