"""``token_weights`` (SPEC.md, section 3): w_t ≥ 0 multiplies each token's policy term, not its
KL or entropy term, on every loss. Against the float64 reference, and against the same call with
the weights folded into the advantages, which is the same loss: every token-level objective's
policy term is linear in A for w ≥ 0, and nothing else reads A. fp32 against float64: FP32_RTOL
(``_cases``); the folded call differs from the weighted one by where one product is rounded
(A·w before the epilogue, against the term times w), a few fp32 ulps of the loss."""

import math

import pytest
import torch

import mhpo_kernels
import reference
from _cases import FP32_RTOL, max_rel_err
from mhpo_kernels.objectives import CISPO, GPG, GSPO, MHPO, SAPO, PPOClip

BACKENDS = ["triton", "torch"]
OBJECTIVES = {"mhpo": MHPO(), "ppo-dual-clip": PPOClip(0.2, 0.28, dual_clip=3.0), "cispo": CISPO(1.3, 0.0),
              "sapo": SAPO(), "gpg": GPG(), "gspo": GSPO(3e-4, 4e-4)}


def _inputs(seed=0, B=3, T=5, V=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    old = torch.log_softmax(x + 0.3 * torch.randn(B, T, V, generator=g), -1).gather(-1, ids[..., None])[..., 0]
    w = torch.rand(B, T, generator=g) * 2
    w[0, 0] = 0.0                                   # a token the correction drops
    w[~mask] = float("nan")                         # never read at invalid tokens
    return dict(x=x, ids=ids, mask=mask, old=old, adv=torch.randn(B, generator=g), w=w,
                ref=-torch.rand(B, T, generator=g) * 4 - 0.1)


def _run(fn, x, *args, **kw):
    x = x.clone().requires_grad_()
    loss, metrics = fn(x, *args, return_metrics=True, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), metrics, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_weights_scale_the_policy_term_only(backend, objective):
    """With a KL term and an entropy bonus: the loss, its gradient and the metrics equal the float64
    reference's; for a token-level objective also the call with A·w as the advantages (the KL and
    entropy terms read no advantage: equal only if they are left unweighted)."""
    c = _inputs(seed=1)
    chosen = OBJECTIVES[objective]
    kw = dict(objective=chosen, ref_logprobs=c["ref"], beta=0.05, entropy_coef=0.01, loss_agg_mode="token-mean")
    if objective == "gspo":  # per token, one value per sequence: checked before the weights multiply it
        c["adv"] = c["adv"][:, None].expand(c["ids"].shape).contiguous()
    with mhpo_kernels.use_backend(backend):
        loss, metrics, grad = _run(mhpo_kernels.policy_loss, c["x"], c["ids"], c["old"], c["adv"], c["mask"],
                                   token_weights=c["w"], **kw)
        if objective != "gspo":  # GSPO's advantage is one per sequence: A·w is no GSPO input
            assert c["adv"].dim() == 1
            folded = c["adv"][:, None] * torch.where(c["mask"], c["w"], 0.0)
            f_loss, _, f_grad = _run(mhpo_kernels.policy_loss, c["x"], c["ids"], c["old"], folded, c["mask"], **kw)
            assert f_loss.item() == pytest.approx(loss.item(), rel=FP32_RTOL, abs=FP32_RTOL)
            assert max_rel_err(f_grad, grad) <= FP32_RTOL
    kw["ref_logprobs"] = c["ref"].double()
    want, want_metrics, want_grad = _run(reference.policy_loss, c["x"].double(), c["ids"], c["old"].double(),
                                         c["adv"].double(), c["mask"], token_weights=c["w"].double(), **kw)
    assert loss.item() == pytest.approx(want.item(), rel=FP32_RTOL, abs=FP32_RTOL)
    assert max_rel_err(grad, want_grad) <= FP32_RTOL
    for name, value in metrics.items():  # the metrics read no weight
        assert value.item() == pytest.approx(want_metrics[name].item(), rel=FP32_RTOL, abs=FP32_RTOL), name
    unweighted = reference.policy_loss(c["x"].double(), c["ids"], c["old"].double(), c["adv"].double(), c["mask"],
                                       **kw)
    assert abs(unweighted.item() - want.item()) > 1e-3, "the weights must change the loss"


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_packed_and_the_module(backend):
    """Per sequence ((B,), (B, 1)) and one for all (()), each the per-token weights it broadcasts
    to; a packed stream with per-token and per-sequence weights through MHPOLoss, against the
    reference of the same stream."""
    c = _inputs(seed=2)
    B, T = c["ids"].shape
    per_seq = torch.tensor([0.5, 2.0, 1.25])
    with mhpo_kernels.use_backend(backend):
        for given, tokens in ((per_seq, per_seq[:, None].expand(B, T)), (per_seq[:, None], per_seq[:, None].expand(B, T)),
                              (torch.tensor(0.75), torch.full((B, T), 0.75))):
            loss, _, grad = _run(mhpo_kernels.mhpo_loss, c["x"], c["ids"], c["old"], c["adv"], c["mask"],
                                 token_weights=given)
            want, _, want_grad = _run(mhpo_kernels.mhpo_loss, c["x"], c["ids"], c["old"], c["adv"], c["mask"],
                                      token_weights=tokens.contiguous())
            assert torch.equal(loss, want) and torch.equal(grad, want_grad), tuple(given.shape)
    keep = c["mask"].reshape(-1)
    x, ids, old = c["x"].reshape(-1, c["x"].shape[-1])[keep], c["ids"].reshape(-1)[keep], c["old"].reshape(-1)[keep]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), c["mask"].sum(-1).cumsum(0)])
    module = mhpo_kernels.MHPOLoss(loss_agg_mode="seq-mean-token-mean")
    for w in (c["w"].reshape(-1)[keep], per_seq):
        with mhpo_kernels.use_backend(backend):
            loss, _, grad = _run(module, x, ids, old, c["adv"], cu_seqlens=cu, token_weights=w)
        want, _, want_grad = _run(reference.mhpo_loss, x.double(), ids, old.double(), c["adv"].double(),
                                  cu_seqlens=cu, token_weights=w.double())
        assert loss.item() == pytest.approx(want.item(), rel=FP32_RTOL, abs=FP32_RTOL)
        assert max_rel_err(grad, want_grad) <= FP32_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_are_checked_and_nan_is_data(backend):
    """Below 0 at a valid token is refused (in the call's one host sync); at an invalid token it
    is never read; a wrong shape or dtype is refused; NaN at a valid token makes the loss NaN, on
    every path (SPEC.md, section 5)."""
    c = _inputs(seed=3)
    args = (c["x"], c["ids"], c["old"], c["adv"], c["mask"])
    w = torch.where(c["mask"], 1.0, -1.0)           # negative at invalid tokens only
    with mhpo_kernels.use_backend(backend):
        assert torch.isfinite(mhpo_kernels.mhpo_loss(*args, token_weights=w))
        with pytest.raises(ValueError, match="token_weights must be ≥ 0"):
            mhpo_kernels.mhpo_loss(*args, token_weights=torch.where(c["mask"], -0.5, 1.0))
        with pytest.raises(ValueError, match="token_weights must have shape"):
            mhpo_kernels.mhpo_loss(*args, token_weights=torch.ones(4))
        with pytest.raises(TypeError, match="token_weights must be a floating tensor"):
            mhpo_kernels.mhpo_loss(*args, token_weights=torch.ones(c["ids"].shape, dtype=torch.int64))
        x3, ids3, cu = c["x"][0, :3], c["ids"][0, :3], torch.tensor([0, 0, 2, 3])  # S = N = 3, not one each
        with pytest.raises(ValueError, match="token_weights of shape \\(3,\\) are ambiguous"):
            mhpo_kernels.mhpo_loss(x3, ids3, c["old"][0, :3], torch.ones(1), cu_seqlens=cu, token_weights=torch.ones(3))
        nan = torch.where(c["mask"], 1.0, 0.0)
        nan[0, 0] = math.nan
        for objective in (MHPO(), GSPO()):
            assert torch.isnan(mhpo_kernels.policy_loss(*args, objective=objective, token_weights=nan))
        inf = torch.where(c["mask"], 1.0, math.nan)      # +inf at a valid token: an infinite term
        inf[0, 0] = math.inf
        got = mhpo_kernels.mhpo_loss(*args, token_weights=inf)
    assert torch.isnan(reference.mhpo_loss(c["x"].double(), c["ids"], c["old"].double(), c["adv"].double(),
                                           c["mask"], token_weights=nan.double()))
    want = reference.mhpo_loss(c["x"].double(), c["ids"], c["old"].double(), c["adv"].double(), c["mask"],
                               token_weights=inf.double())
    assert torch.isinf(want) and got.item() == want.item()   # the same infinity, NaN weights elsewhere unread


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_path(backend):
    """The fused linear loss with token weights equals the logits loss on its logits."""
    c = _inputs(seed=4, V=48)
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(3, 5, 16, generator=g), torch.randn(48, 16, generator=g) * 0.5
    kw = dict(objective=PPOClip(0.2, 0.28), token_weights=c["w"], return_metrics=False)
    with mhpo_kernels.use_backend(backend):
        h = hidden.clone().requires_grad_()
        loss = mhpo_kernels.fused_linear_policy_loss(h, weight, c["ids"], c["old"], c["adv"], c["mask"], **kw)
        (dh,) = torch.autograd.grad(loss, h)
        h2 = hidden.clone().requires_grad_()
        want = mhpo_kernels.policy_loss(h2 @ weight.T, c["ids"], c["old"], c["adv"], c["mask"], **kw)
        (want_dh,) = torch.autograd.grad(want, h2)
    assert loss.item() == pytest.approx(want.item(), rel=FP32_RTOL, abs=FP32_RTOL)
    assert max_rel_err(dh, want_dh) <= FP32_RTOL
