"""``rollout_correction.verl_rollout_correction`` against verl's own
``compute_rollout_correction_and_rejection_mask`` on the same log-probs: the weights, the
rejection mask and every metric it returns, in float64 (the two differ by where a mean adds
verl's 1e-8 to its count: relative 1e-8 / count). TRL's helper is tested against TRL's trainer
in ``test_integration_trl.py``."""

import pytest
import torch

pytest.importorskip("verl", reason="the verl extra is not installed (pip install mhpo-kernels[verl])")

from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask  # noqa: E402

import mhpo_kernels  # noqa: E402,F401
from mhpo_kernels.rollout_correction import verl_rollout_correction  # noqa: E402


def _inputs(seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = rollout + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    mask = (torch.rand(B, T, generator=g) > 0.2).to(torch.int64)
    mask[2] = 0                                      # a sequence with no valid token
    mask[0, :2] = 1
    old[1, 3] = rollout[1, 3] + 30.0                 # a ratio beyond verl's exp(20) bound
    return old, rollout, mask


@pytest.mark.parametrize("config", [
    dict(rollout_is="token", rollout_is_threshold=2.0),
    dict(rollout_is="token", rollout_is_threshold="0.5_2.0", rollout_is_batch_normalize=True),
    dict(rollout_is="sequence", rollout_is_threshold="3.0"),
    dict(rollout_is="sequence", rollout_is_threshold="0.1_5.0", rollout_is_batch_normalize=True),
    dict(rollout_rs="token_k1", rollout_rs_threshold="0.6_1.5"),
    dict(rollout_rs="token_k2,token_k3,seq_max_k3", rollout_rs_threshold="0.3"),
    dict(rollout_rs="seq_sum_k1,seq_mean_k2,seq_max_k2", rollout_rs_threshold="2.0,0.1,0.5"),
    dict(rollout_is="token", rollout_is_threshold=1.5, rollout_rs="seq_mean_k3,seq_sum_k3,seq_mean_k1",
         rollout_rs_threshold="0.05,0.8,1.3"),
    dict(rollout_is="token", rollout_is_threshold=None, rollout_rs="token_k3", rollout_rs_threshold=0.2),
], ids=["tis", "icepop-normalized", "seq-tis", "seq-icepop-normalized", "rs-token-k1", "rs-k2-k3-max",
        "rs-seq", "tis-and-rs", "is-off"])
def test_equals_verl(config):
    old, rollout, mask = _inputs()
    weights, kept, metrics = verl_rollout_correction(old, rollout, mask, **config)
    want_proto, want_kept, want_metrics = compute_rollout_correction_and_rejection_mask(old, rollout, mask, **config)
    if want_proto is not None:
        want = want_proto.batch["rollout_is_weights"]
        assert torch.allclose(weights, want, rtol=1e-9, atol=0), (weights, want)
    else:
        assert weights is None
    if "_" in str(config.get("rollout_is_threshold")):
        assert "rollout_corr/rollout_is_oob_ratio" in metrics
    assert torch.equal(kept, want_kept) and kept.dtype == mask.dtype
    if "rollout_rs" in config:
        assert not torch.equal(kept, mask), "the thresholds must reject something"
    assert set(metrics) <= set(want_metrics) and len(metrics) >= 15, set(metrics) - set(want_metrics)
    for name, value in metrics.items():
        assert value.item() == pytest.approx(want_metrics[name], rel=1e-6, abs=1e-12), name


def test_refusals():
    old, rollout, mask = _inputs()
    with pytest.raises(ValueError, match="rollout_is must be"):
        verl_rollout_correction(old, rollout, mask, rollout_is="geometric")
    with pytest.raises(ValueError, match="rollout_rs options"):
        verl_rollout_correction(old, rollout, mask, rollout_rs="token_k4", rollout_rs_threshold=1.0)
    with pytest.raises(ValueError, match="rollout_rs_threshold is required"):
        verl_rollout_correction(old, rollout, mask, rollout_rs="token_k2")
    with pytest.raises(ValueError, match="one upper bound"):
        verl_rollout_correction(old, rollout, mask, rollout_rs="token_k2", rollout_rs_threshold="0.1_0.2")
    for option in ("token_k1", "seq_sum_k1", "seq_mean_k1"):   # [1/u, u] empty for u < 1: verl refuses it too
        with pytest.raises(ValueError, match="must be >= 1 when given alone"):
            verl_rollout_correction(old, rollout, mask, rollout_rs=option, rollout_rs_threshold="0.8")
        with pytest.raises(ValueError, match="lower <= upper"):
            compute_rollout_correction_and_rejection_mask(old, rollout, mask, rollout_rs=option,
                                                          rollout_rs_threshold="0.8")
    with pytest.raises(ValueError, match="at least one valid token"):
        verl_rollout_correction(old, rollout, torch.zeros_like(mask), rollout_is="token")
    with pytest.raises(ValueError, match="must have one shape \\(B, T\\)"):
        verl_rollout_correction(old, rollout[:, :-1], mask, rollout_is="token")


def test_the_kept_mask_is_a_new_tensor():
    """verl returns a new mask; so does this, so that writing into it leaves the caller's alone."""
    old, rollout, mask = _inputs()
    _, kept, _ = verl_rollout_correction(old, rollout, mask, rollout_is="token")
    assert torch.equal(kept, mask) and kept.data_ptr() != mask.data_ptr()


def test_trl_importance_weights_refusals_and_an_empty_batch():
    """What TRL's GRPOConfig refuses (clip_min ≥ clip_max, a truncation with no bound) is refused,
    so is a mask or engine log-probs of another shape (broadcast, they would weight other
    tokens); an empty batch reports 0 for every extreme, as TRL does."""
    from mhpo_kernels.rollout_correction import trl_importance_weights

    old, rollout, mask = _inputs()
    with pytest.raises(ValueError, match="clip_min \\(3.0\\) must be less than clip_max \\(0.5\\)"):
        trl_importance_weights(old, rollout, mask, "token_mask", clip_min=3.0, clip_max=0.5)
    with pytest.raises(ValueError, match="needs clip_min or clip_max"):
        trl_importance_weights(old, rollout, mask, "sequence_truncate", clip_min=None, clip_max=None)
    for bad in (dict(rollout_logprobs=rollout[0]), dict(mask=mask[:1])):
        args = {**dict(old_logprobs=old, rollout_logprobs=rollout, mask=mask), **bad}
        with pytest.raises(ValueError, match="must have one shape \\(B, T\\)"):
            trl_importance_weights(**args)
    for mode, empty in (("token_truncate", (slice(None), slice(0))), ("sequence_mask", slice(0))):
        weights, metrics = trl_importance_weights(old[empty], rollout[empty], mask[empty], mode, clip_max=2.0)
        assert weights.numel() == 0
        assert all(v.item() == 0 for v in metrics.values()), metrics
