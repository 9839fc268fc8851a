"""Rows split over programs (``_config.launch_splits``, small N on a GPU): the forward's splits and
their combine, and the split backward, give the float64 reference's values and gradient on every
layout, in place and out of place, for the log-probs, the entropy and the loss; non-finite input
follows the contract (SPEC.md, section 5) as with one program per row; and the launch arithmetic
picks splits only where the rows are too few to fill the GPU.

Under the interpreter nothing is split unless forced: ``_config.overridden(block_v=16,
min_split_blocks=2, row_splits=k)`` makes a row of V = 100 three segments of 3 blocks (the last
shorter; 7 blocks with a lead), so that k splits of whole segments each hold a first, middle or
last part of the row and the target in one of them. A split row has the bits of the same row
read whole (its segments folded in the same order, ``_config.row_segments``).
"""

import math
from types import SimpleNamespace

import pytest
import torch

import mhpo_kernels
import reference
from _cases import FP32_RTOL, max_rel_err, store_error
from conftest import TRITON_DEVICE
from mhpo_kernels import _config, _dispatch
from mhpo_kernels._sweep_types import LogitMap, mhpo_token_params
from mhpo_kernels.objectives import MHPO, PPOClip

V = 100
BLOCK = 16
SEGMENT_BLOCKS = 2  # a segment at least 2 blocks long (MIN_SPLIT_BLOCKS, 8 on a GPU): 3 per row


def _launch(splits=None):
    """The launch configuration of the tests: blocks of 16, segments of at least 2 blocks, and
    ``splits`` programs per row where given."""
    return _config.overridden(block_v=BLOCK, min_split_blocks=SEGMENT_BLOCKS, row_splits=splits)
B, T = 2, 4
INVALID = (1, 2)


def _grad_tol(dtype):
    """fp32 accuracy, plus one rounding of each stored element for a 16-bit gradient."""
    return FP32_RTOL + (store_error(dtype, TRITON_DEVICE) if dtype != torch.float32 else 0.0)


def _logits(dtype, shifted, seed=0):
    """(leaf, view): (B, T, V), or the first T positions of (B, T + 1, V), whose rows start at
    every residue mod the vector width (V = 100 is 4 mod 8)."""
    g = torch.Generator().manual_seed(seed)
    leaf = (torch.randn(B, T + shifted, V, generator=g) * 3).to(dtype)
    return leaf, (lambda x: x[:, :T]) if shifted else (lambda x: x)


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, :3] = torch.tensor([0, V // 2, V - 1])   # the first, a middle and the last split
    ids[INVALID] = -100
    return ids


def _logprobs(leaf, view, ids, tau, up, inplace, splits=None):
    """(logp, entropy, ∂(Σ up₀·logp + Σ up₁·H)/∂leaf) from the Triton kernels, ``splits`` forced."""
    x = leaf.detach().clone().to(TRITON_DEVICE).requires_grad_()
    storage = x.clone() if inplace else x
    with mhpo_kernels.use_backend("triton"), _launch(splits):
        logp, ent = mhpo_kernels.token_logprobs(view(storage), ids.to(TRITON_DEVICE), temperature=tau.to(TRITON_DEVICE),
                                                return_entropy=True, inplace_backward=inplace)
        (grad,) = torch.autograd.grad((logp * up[0].to(logp)).sum() + (ent * up[1].to(ent)).sum(), x)
    return logp.detach().cpu(), ent.detach().cpu(), grad.cpu()


# Splits of 2 and 1 segments, and of one each (the last one shorter).
SPLIT_CASES = [("fp32-2", torch.float32, False, False, 2), ("bf16-shifted-inplace-3", torch.bfloat16, True, True, 3)]


@pytest.mark.parametrize("dtype, shifted, inplace, splits", [c[1:] for c in SPLIT_CASES],
                         ids=[c[0] for c in SPLIT_CASES])
def test_token_logprobs_split(dtype, shifted, inplace, splits):
    leaf, view = _logits(dtype, shifted)
    ids = _ids()
    g = torch.Generator().manual_seed(2)
    tau = torch.rand(B, T, generator=g) + 0.5
    up = torch.randn(2, B, T, generator=g)
    logp, ent, grad = _logprobs(leaf, view, ids, tau, up, inplace, splits)

    x64 = leaf.detach().double().requires_grad_()
    logp64, ent64 = reference.token_logprobs(view(x64), ids, temperature=tau.double(), return_entropy=True)
    (grad64,) = torch.autograd.grad((logp64 * up[0].double()).sum() + (ent64 * up[1].double()).sum(), x64)
    assert max_rel_err(logp, logp64) <= FP32_RTOL
    assert max_rel_err(ent, ent64) <= FP32_RTOL
    assert max_rel_err(grad, grad64) <= _grad_tol(dtype)
    assert logp[INVALID] == 0 and ent[INVALID] == 0 and not view(grad)[INVALID].any()
    if shifted:
        assert not grad[:, T:].any()
    # One program per row, the same segments folded in the same order: the same bits.
    logp1, ent1, grad1 = _logprobs(leaf, view, ids, tau, up, inplace)
    assert torch.equal(logp, logp1) and torch.equal(ent, ent1) and torch.equal(grad, grad1)


@pytest.mark.parametrize("objective", [MHPO(), PPOClip(eps_low=0.2, eps_high=0.28)], ids=["mhpo", "ppo-clip"])
def test_policy_loss_split(objective):
    """The loss epilogue after the combine: old and reference log-probs, the entropy bonus, a
    per-token temperature; loss and gradient against float64."""
    leaf, view = _logits(torch.float32, False, seed=3)
    ids = _ids(3)
    g = torch.Generator().manual_seed(4)
    logp = reference.token_logprobs(leaf.double(), ids.clamp(min=0)).float()
    kw = dict(old_logprobs=logp + 0.3 * torch.randn(B, T, generator=g), advantages=torch.randn(B, T, generator=g),
              ref_logprobs=logp + 0.2 * torch.randn(B, T, generator=g), beta=0.1, entropy_coef=0.05,
              temperature=torch.rand(B, T, generator=g) + 0.5, objective=objective)

    def run(splits):
        x = leaf.detach().clone().to(TRITON_DEVICE).requires_grad_()
        with mhpo_kernels.use_backend("triton"), _launch(splits):
            loss = mhpo_kernels.policy_loss(x, ids.to(TRITON_DEVICE),
                                            **{k: v.to(TRITON_DEVICE) if torch.is_tensor(v) else v for k, v in kw.items()})
            (grad,) = torch.autograd.grad(loss, x)
        return loss.detach().cpu(), grad.cpu()

    loss, grad = run(3)
    x64 = leaf.detach().double().requires_grad_()
    loss64 = reference.policy_loss(x64, ids, **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()})
    (grad64,) = torch.autograd.grad(loss64, x64)
    assert abs(loss.item() - loss64.item()) <= FP32_RTOL * max(1.0, abs(loss64.item()))
    assert max_rel_err(grad, grad64) <= FP32_RTOL
    assert not grad[INVALID].any()


def _sweep_stats(x, ids, splits):
    fwd, _ = _dispatch.sweeps(x.device)
    with _launch(splits):
        return fwd(x, ids, None, None, None, None, mhpo_token_params(), LogitMap.make(1.0), with_entropy=True,
                   with_loss=False)


def test_vocabulary_slice_targets_elsewhere():
    """A rank's slice of the vocabulary (tp_group): ids ≥ V are on another rank's slice, whose
    rows are still read for the log-sum-exp and give log-prob 0 here."""
    x = torch.randn(1, 6, V, generator=torch.Generator().manual_seed(5)).to(TRITON_DEVICE)
    ids = torch.tensor([3, V + 2, 57, 2 * V, 99, -1], dtype=torch.int32, device=TRITON_DEVICE)
    with mhpo_kernels.use_backend("triton"):
        split, whole = _sweep_stats(x, ids, 4), _sweep_stats(x, ids, None)
    lse = torch.logsumexp(x.double().cpu()[0], -1)
    for stats in (split, whole):
        got = (stats.lse2_base.double() + stats.lse2_rest.double()).cpu() * math.log(2)
        assert torch.allclose(got[:5], lse[:5], rtol=FP32_RTOL, atol=0)
        assert stats.logp[1] == 0 and stats.logp[3] == 0 and stats.logp[5] == 0
    assert torch.allclose(split.logp, whole.logp, rtol=FP32_RTOL, atol=FP32_RTOL)
    assert torch.allclose(split.entropy, whole.entropy, rtol=FP32_RTOL, atol=0)


# (where, value): a logit in the target's split or in another, the whole row, by value.
POISONS = [("other-split", math.nan), ("other-split", math.inf), ("other-split", -math.inf),
           ("target-split", math.nan), ("whole-row", -math.inf)]


@pytest.mark.parametrize("where, value", POISONS, ids=[f"{w}-{v}" for w, v in POISONS])
def test_non_finite_split(where, value):
    """As SPEC.md section 5 says for one program per row: a NaN or +inf logit in a valid row makes
    its log-prob, entropy and gradient row NaN wherever in the row it is (a split that read it
    carries it through the fold); −inf agrees with the reference; other rows are untouched (the
    float64 reference's values)."""
    leaf, view = _logits(torch.float32, False, seed=6)
    ids = _ids(6)
    ids[0, 0] = 5                     # the target in the first split, the poison in the last
    b, t = 0, 0
    if where == "whole-row":
        leaf[b, t] = value
    else:
        leaf[b, t, 7 if where == "target-split" else V - 3] = value
    g = torch.Generator().manual_seed(7)
    tau, up = torch.ones(B, T), torch.randn(2, B, T, generator=g)
    logp, ent, grad = _logprobs(leaf, view, ids, tau, up, False, 3)
    x64 = leaf.double().requires_grad_()
    logp64, ent64 = reference.token_logprobs(x64, ids, return_entropy=True)
    (grad64,) = torch.autograd.grad((torch.nan_to_num(logp64) * up[0].double()).sum()
                                    + (torch.nan_to_num(ent64) * up[1].double()).sum(), x64)
    others = torch.ones(B, T, dtype=torch.bool)
    others[b, t] = False
    for got, want in ((logp, logp64), (ent, ent64)):
        assert max_rel_err(got[others], want[others]) <= FP32_RTOL
    assert max_rel_err(grad[others], grad64[others]) <= FP32_RTOL and not grad[INVALID].any()
    poisons = value != value or value == math.inf
    if poisons:
        assert logp[b, t].isnan() and ent[b, t].isnan() and grad[b, t].isnan().all()
    else:
        for got, want in ((logp[b, t], logp64[b, t]), (ent[b, t], ent64[b, t])):
            assert torch.isfinite(want) == torch.isfinite(got)
            if torch.isfinite(want):
                assert abs(got.item() - want.item()) <= FP32_RTOL * max(1.0, abs(want.item()))


def _props(name="NVIDIA H200", sms=132):
    return SimpleNamespace(name=name, multi_processor_count=sms, max_threads_per_multi_processor=2048,
                           regs_per_multiprocessor=65536)


def test_launch_splits(monkeypatch):
    """On an H200 (made-up properties) 151,936 bf16 logits per row fill the GPU at 586 rows:
    4 splits up to 195 rows (a split at least 8 blocks), 3 up to 292, 2 up to 585, none from 586 on
    (⌈586 / N⌉, at most 4); nothing split
    off CUDA; a forced count is cut to the row's segments (``row_segments``: runs of at least 8
    blocks, at most MAX_ROW_SPLITS)."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _props())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    Vq = 151936
    rows = (1, 128, 195, 196, 292, 293, 512, 585, 586, 8192)
    assert [_config.launch_splits(n, Vq, 2, cuda) for n in rows] == [4, 4, 4, 3, 3, 2, 2, 2, 1, 1]
    assert _config.launch_splits(128, Vq, 2, cpu) == 1
    assert _config.launch_splits(128, 50257, 2, cuda) == 1        # 50,257 / 32,768: one split long enough
    with _config.overridden(row_splits=64):
        assert _config.launch_splits(8192, Vq, 2, cpu) == _config.row_segments(Vq, 4096) == 4
        assert _config.launch_splits(8192, 5000, 2, cpu) == 1      # two blocks of 4096: one segment
        assert _config.launch_splits(8192, 2**20, 2, cpu) == _config.MAX_ROW_SPLITS
    cfg = _config.sweep_config(Vq, 2)
    length = _config.split_length(Vq, cfg, 4)
    assert length % cfg.block_v == 0 and 3 * length < Vq + cfg.vec - 1 <= 4 * length
    assert _config.segment_length(Vq, cfg) == length
