"""Every malformed call raises TypeError/ValueError naming the argument, before any kernel runs."""

import math

import pytest
import torch

import mhpo_kernels

B, T, V = 2, 3, 64


def good_args():
    return dict(
        logits=torch.randn(B, T, V), input_ids=torch.randint(0, V, (B, T)),
        old_logprobs=torch.randn(B, T), advantages=torch.randn(B),
        mask=torch.ones(B, T, dtype=torch.bool),
    )


BAD_CALLS = [
    # (id, change to the arguments, exception, argument named in the message)
    ("logits-not-tensor", dict(logits=[[0.0]]), TypeError, "logits"),
    ("logits-int", dict(logits=torch.zeros(B, T, V, dtype=torch.int32)), TypeError, "logits"),
    ("logits-float64", dict(logits=torch.zeros(B, T, V, dtype=torch.float64)), TypeError, "logits"),
    ("logits-1d", dict(logits=torch.zeros(V)), ValueError, "logits"),
    ("logits-4d", dict(logits=torch.zeros(1, B, T, V)), ValueError, "logits"),
    ("logits-V0", dict(logits=torch.zeros(B, T, 0)), ValueError, "logits"),
    ("ids-float", dict(input_ids=torch.zeros(B, T)), TypeError, "input_ids"),
    ("ids-shape", dict(input_ids=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "input_ids"),
    ("ids-too-large", dict(input_ids=torch.full((B, T), V)), ValueError, "input_ids"),
    ("ids-negative", dict(input_ids=torch.full((B, T), -1)), ValueError, "input_ids"),
    ("old-shape", dict(old_logprobs=torch.zeros(B)), ValueError, "old_logprobs"),
    ("old-int", dict(old_logprobs=torch.zeros(B, T, dtype=torch.long)), TypeError, "old_logprobs"),
    ("adv-shape", dict(advantages=torch.zeros(B + 1)), ValueError, "advantages"),
    ("adv-int", dict(advantages=torch.zeros(B, dtype=torch.long)), TypeError, "advantages"),
    ("adv-not-tensor", dict(advantages=1.0), TypeError, "advantages"),
    ("mask-shape", dict(mask=torch.ones(B, T + 1, dtype=torch.bool)), ValueError, "mask"),
    ("mask-not-binary", dict(mask=torch.full((B, T), 2.0)), ValueError, "mask"),
    ("ref-shape", dict(ref_logprobs=torch.zeros(T), beta=0.1), ValueError, "ref_logprobs"),
    ("beta-without-ref", dict(beta=0.1), ValueError, "ref_logprobs"),
    ("beta-negative", dict(beta=-0.1, ref_logprobs=torch.zeros(B, T)), ValueError, "beta"),
    ("beta-nan", dict(beta=math.nan, ref_logprobs=torch.zeros(B, T)), ValueError, "beta"),
    ("temperature-zero", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature-negative", dict(temperature=-1.0), ValueError, "temperature"),
    ("temperature-0d-tensor", dict(temperature=torch.tensor(1.0)), ValueError, "temperature"),
    ("temperature-int-tensor", dict(temperature=torch.ones(B, T, dtype=torch.long)), TypeError, "temperature"),
    ("temperature-shape", dict(temperature=torch.ones(B, T + 1)), ValueError, "temperature"),
    ("temperature-per-sequence", dict(temperature=torch.ones(B)), ValueError, "temperature"),
    ("temperature-device", dict(temperature=torch.ones(B, T, device="meta")), ValueError, "temperature"),
    ("temperature-tensor-zero", dict(temperature=torch.ones(B, T).index_fill_(1, torch.tensor([1]), 0.0)),
     ValueError, "temperature"),
    ("temperature-tensor-nan", dict(temperature=torch.full((B, T), math.nan)), ValueError, "temperature"),
    ("temperature-tensor-inf", dict(temperature=torch.full((B, T), math.inf)), ValueError, "temperature"),
    ("temperature-tensor-negative", dict(temperature=-torch.ones(B, T)), ValueError, "temperature"),
    ("temperature-not-number", dict(temperature="hot"), TypeError, "temperature"),
    ("agg-unknown", dict(loss_agg_mode="seq-sum"), ValueError, "loss_agg_mode"),
    ("ignore-index-float", dict(ignore_index=-100.0), TypeError, "ignore_index"),
    ("device-mismatch", dict(advantages=torch.zeros(B, device="meta")), ValueError, "advantages"),
] + [
    (f"{name}-{what}", {name: value}, ValueError, name)
    for name in ("c", "k_pos", "lam_pos", "k_neg", "lam_neg")
    for what, value in (("zero", 0.0), ("negative", -1.0), ("nan", math.nan), ("inf", math.inf))
] + [(f"{name}-bool", {name: True}, TypeError, name) for name in ("c", "k_pos")]


@pytest.mark.parametrize("change, error, name", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_naming_argument(change, error, name, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a sweep ran before validation finished")

    monkeypatch.setattr(mhpo_kernels._dispatch, "sweeps", no_kernel)
    with pytest.raises(error, match=name):
        mhpo_kernels.mhpo_loss(**{**good_args(), **change})


@pytest.mark.parametrize("change, error, name", [
    (dict(c=0.0), ValueError, "c"), (dict(temperature=-2.0), ValueError, "temperature"),
    (dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode"), (dict(beta=-1.0), ValueError, "beta"),
], ids=["c", "temperature", "agg", "beta"])
def test_module_checks_at_construction(change, error, name):
    with pytest.raises(error, match=name):
        mhpo_kernels.MHPOLoss(**change)


def test_token_logprobs_checks():
    logits, ids = torch.randn(2, 5, 10), torch.randint(0, 10, (2, 5))
    with pytest.raises(ValueError, match="input_ids"):
        mhpo_kernels.token_logprobs(logits, ids + 10)
    with pytest.raises(ValueError, match="temperature"):
        mhpo_kernels.token_logprobs(logits, ids, temperature=0)
    with pytest.raises(TypeError, match="logits"):
        mhpo_kernels.token_logprobs(logits.double(), ids)


def test_masked_and_ignored_positions_may_hold_anything():
    """Out-of-range ids, NaN logits/old/advantages where invalid: same result as clean inputs."""
    args = good_args()
    args["mask"][1, 2] = False
    args["input_ids"][0, 1] = -100
    args["advantages"] = torch.randn(B, T)
    loss_clean = mhpo_kernels.mhpo_loss(**args)
    dirty = {k: v.clone() for k, v in args.items()}
    for b, t in ((1, 2), (0, 1)):
        dirty["logits"][b, t] = math.nan
        dirty["old_logprobs"][b, t] = math.nan
        dirty["advantages"][b, t] = math.inf
    dirty["input_ids"][1, 2] = 10**9
    assert torch.equal(mhpo_kernels.mhpo_loss(**dirty), loss_clean)
    # A per-token temperature: its values at invalid tokens are never read (NaN, 0, −1 are fine).
    tau = torch.rand(B, T) + 0.5
    loss_tau = mhpo_kernels.mhpo_loss(**args, temperature=tau)
    dirty_tau = tau.clone()
    dirty_tau[1, 2], dirty_tau[0, 1] = math.nan, -1.0
    assert torch.equal(mhpo_kernels.mhpo_loss(**dirty, temperature=dirty_tau), loss_tau)
    assert not torch.equal(loss_tau, loss_clean)


def test_temperature_errors_on_every_op():
    """The per-token temperature is checked (kind, shape, values at valid tokens) by every public
    function that takes one, before any kernel runs."""
    hidden, weight = torch.randn(B, T, 8), torch.randn(V, 8)
    ids = torch.randint(0, V, (B, T))
    bad = torch.ones(B, T)
    bad[0, 0] = 0.0
    calls = [
        lambda tau: mhpo_kernels.token_logprobs(torch.randn(B, T, V), ids, temperature=tau),
        lambda tau: mhpo_kernels.policy_loss(torch.randn(B, T, V), ids, None, torch.randn(B), temperature=tau),
        lambda tau: mhpo_kernels.MHPOLoss()(torch.randn(B, T, V), ids, None, torch.randn(B), temperature=tau),
        lambda tau: mhpo_kernels.fused_linear_mhpo_loss(hidden, weight, ids, None, torch.randn(B), temperature=tau),
        lambda tau: mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, temperature=tau),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="temperature must be finite and > 0 at valid tokens"):
            call(bad)
        with pytest.raises(ValueError, match="temperature must be a number or a tensor of shape"):
            call(torch.ones(B * T + 1))
        with pytest.raises(TypeError, match="temperature"):
            call(torch.ones(B, T, dtype=torch.int64))
    ids[0, 0] = -100  # the bad τ is now at an ignored token: accepted
    for call in calls:
        call(bad)
