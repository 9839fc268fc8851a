"""Rows that start anywhere: both sweeps walk blocks anchored at the 16-byte boundary before each
row (kernels/rows.py), so every row start mod VEC (the elements of one 16-byte vector) takes a
different split into a first masked block, full blocks and a masked tail. Each case here puts
rows at every residue its row stride allows, and the forward values and the gradient, in place
and out of place, must match the float64 reference on every one; rows without a valid token read
as 0 and write an exact zero row, and an in-place gradient touches nothing outside the rows.
Shapes are as small as the residues allow: VEC rows (8 in bf16, 4 in fp32)."""

import math
from dataclasses import dataclass

import pytest
import torch

import mhpo_kernels
import reference
from _cases import FP32_RTOL, max_rel_err, store_error
from conftest import TRITON_DEVICE
from mhpo_kernels import _dispatch
from mhpo_kernels._config import sweep_config
from mhpo_kernels._sweep_types import LogitMap, mhpo_token_params
from mhpo_kernels.kernels.backward import _in_phase

@dataclass(frozen=True)
class Layout:
    id: str
    kind: str            # contiguous, shifted ((B, T + 1, V)), sliced (full[:, :-1]), padded
    dtype: torch.dtype
    V: int
    B: int
    T: int


# Contiguous rows start at r·V: VEC rows of an odd V reach every residue. V < VEC (3); the row
# inside the first block (37) or spilling into a masked tail (63: BLOCK_V 64); V > 2·BLOCK_V −
# VEC (8191, BLOCK_V 4096): full blocks, with or without a tail, by residue.
CONTIGUOUS = [Layout(f"{dt}-V{V}", "contiguous", dtype, V, *bt)
              for dt, dtype, bt in (("fp32", torch.float32, (1, 4)), ("bf16", torch.bfloat16, (2, 4)))
              for V in (3, 37, 63, 8191)]
VIEWS = [
    Layout("shifted-bf16-V37", "shifted", torch.bfloat16, 37, 2, 4),   # rows r·V, r < B·(T + 1)
    # Rows at V·(b·(T + 1) + t); out of place the gradient takes the same strides
    # (test_gradient_buffer_in_phase); T + 1 = 9 keeps every residue.
    Layout("sliced-bf16-V37", "sliced", torch.bfloat16, 37, 2, 8),
    # as_strided rows at 3 + r·(V + 1): an even V whose padded stride is odd.
    Layout("padded-fp32-V50", "padded", torch.float32, 50, 1, 4),
    Layout("padded-bf16-V50", "padded", torch.bfloat16, 50, 2, 4),
]


def _logits(case, g):
    """(leaf, view): ``view(leaf)`` is the (B, T, V) or (B, T + 1, V) tensor handed to the op and
    ``leaf`` the tensor whose gradient is checked."""
    B, T, V = case.B, case.T, case.V
    if case.kind == "padded":
        storage = torch.randn(3 + B * T * (V + 1), generator=g) * 3.0
        leaf = storage.to(case.dtype).requires_grad_()
        return leaf, lambda x: x.as_strided((B, T, V), (T * (V + 1), V + 1, 1), 3)
    full = torch.randn(B, T + (case.kind != "contiguous"), V, generator=g) * 3.0
    leaf = full.to(case.dtype).requires_grad_()
    return leaf, (lambda x: x[:, :-1]) if case.kind == "sliced" else (lambda x: x)


def _row_offsets(x):
    return {b * x.stride(0) + t * x.stride(1) for b in range(x.shape[0]) for t in range(x.shape[1])}


def _run(fn, leaf, view, ids, up_logp, up_ent, inplace, **kw):
    """(logp, entropy, ∂/∂leaf of Σ up·logp + Σ up·H, the storage the op read). In place, the op
    overwrites a copy of the leaf with the gradient, which autograd hands back through the view."""
    storage = leaf.clone() if inplace else leaf
    logp, ent = fn(view(storage), ids, temperature=0.9, return_entropy=True, **kw)
    (grad,) = torch.autograd.grad((logp * up_logp).sum() + (ent * up_ent).sum(), leaf)
    return logp.detach(), ent.detach(), grad, storage.detach()


def _grad_tol(dtype, device):
    """fp32 accuracy, plus one rounding of each stored element for a 16-bit gradient."""
    return FP32_RTOL + (store_error(dtype, device) if dtype != torch.float32 else 0.0)


def _check_rows(case, inplace, backend):
    g = torch.Generator().manual_seed(case.V)
    leaf, view = _logits(case, g)
    B, T = case.B, case.T
    ids = torch.randint(0, case.V, (B, T), generator=g)
    invalid = [(0, 2), (B - 1, T - 1)]                 # rows 2 and B·T − 1: different residues
    for b, t in invalid:
        ids[b, t] = -100
    up_logp, up_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)

    # The rows reach every residue mod VEC that the row stride's common factor with VEC allows.
    vec = sweep_config(case.V, leaf.element_size()).vec
    stride = case.V + (case.kind == "padded")
    assert {o % vec for o in _row_offsets(view(leaf.detach()))} == set(range(0, vec, math.gcd(stride, vec)))

    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    with mhpo_kernels.use_backend(backend):
        logp, ent, grad, storage = _run(
            mhpo_kernels.token_logprobs, leaf.detach().to(dev).requires_grad_(), view, ids.to(dev),
            up_logp.to(dev), up_ent.to(dev), inplace, inplace_backward=inplace)
    logp64, ent64, grad64, _ = _run(reference.token_logprobs, leaf.detach().double().requires_grad_(),
                                    view, ids, up_logp.double(), up_ent.double(), False)
    # bf16 logits are read exactly: log-probs and entropy to fp32 accuracy.
    assert max_rel_err(logp.cpu(), logp64) <= FP32_RTOL
    assert max_rel_err(ent.cpu(), ent64) <= FP32_RTOL
    assert max_rel_err(grad.cpu(), grad64) <= _grad_tol(case.dtype, dev)
    # Invalid rows: 0 for both values and an exact zero row (in place: over nonzero logits).
    g_rows = view(grad.cpu())
    for b, t in invalid:
        assert logp[b, t] == 0 and ent[b, t] == 0 and not g_rows[b, t].any()
    if case.kind == "shifted":  # the last position predicts nothing: a zero row too
        assert not g_rows[:, -1].any()
    if inplace:
        # The gradient went over exactly the rows: what lies between and after them (padding,
        # the dropped last position) still holds the logits.
        outside = storage.cpu().clone()
        view(outside).copy_(view(leaf.detach()))
        assert torch.equal(outside, leaf.detach())
        assert torch.equal(view(storage.cpu()), g_rows)


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("case", CONTIGUOUS, ids=lambda c: c.id)
def test_every_row_residue_matches_float64(case, inplace):
    _check_rows(case, inplace, "triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("case", VIEWS, ids=lambda c: c.id)
def test_strided_views_match_float64(case, inplace, backend):
    _check_rows(case, inplace, backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_softcap_sweeps_at_every_residue(dtype, inplace, backend):
    """The softcapped sweeps (the fused linear path's tiles, contiguous (rows, V)) at odd V: the
    cap maps the masked lanes' −inf to a finite value, which must count neither before nor after
    the row."""
    g = torch.Generator().manual_seed(11)
    N, V, cap, tau = 8, 37, 3.0, 0.9
    x = (torch.randn(1, N, V, generator=g) * 4.0).to(dtype)
    ids = torch.randint(0, V, (N,), generator=g)
    ids[[3, 6]] = -100
    target = torch.where(ids < 0, -1, ids).to(torch.int32)   # the launchers' −1 for invalid rows
    dlogp, dent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    lmap = LogitMap.make(tau, 1.0, cap)
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    with mhpo_kernels.use_backend(backend):
        fwd, bwd = _dispatch.sweeps(torch.device(dev))
        xd = x.to(dev)
        stats = fwd(xd, target.to(dev), None, None, None, None, mhpo_token_params(), lmap,
                    with_entropy=True, with_loss=False)
        grad = xd.clone() if inplace else torch.empty_like(xd)
        bwd(grad if inplace else xd, grad, target.to(dev), stats.lse2_base, stats.lse2_rest, dlogp.to(dev),
            stats.entropy, dent.to(dev), lmap)

    x64 = x.double().requires_grad_()
    logp64, ent64 = reference.token_logprobs(cap * torch.tanh(x64 / cap), ids.reshape(1, N),
                                             temperature=tau, return_entropy=True)
    (grad64,) = torch.autograd.grad((logp64 * dlogp.double()).sum() + (ent64 * dent.double()).sum(), x64)
    assert max_rel_err(stats.logp.cpu(), logp64.reshape(-1)) <= FP32_RTOL
    assert max_rel_err(stats.entropy.cpu(), ent64.reshape(-1)) <= FP32_RTOL
    assert max_rel_err(grad.cpu(), grad64) <= _grad_tol(dtype, dev)
    for r in (3, 6):
        assert stats.logp[r] == 0 and stats.entropy[r] == 0 and not grad[0, r].any()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("one_sweep", [False, True], ids=["two-sweeps", "grad-in-forward"])
def test_vocabulary_of_one_with_any_stride_in_place(one_sweep, backend):
    """V = 1 logits whose vocabulary stride is not 1 (a (B, 1, T) output transposed): taken as a
    view, in place too, with the reference's loss and its zero gradient (log-probs are 0)."""
    w = torch.randn(2, 1, 3, device=TRITON_DEVICE, requires_grad=True)
    ids, adv = torch.zeros(2, 3, dtype=torch.long, device=TRITON_DEVICE), torch.ones(2, device=TRITON_DEVICE)
    with mhpo_kernels.use_backend(backend):
        loss = mhpo_kernels.mhpo_loss((w * 1.0).transpose(1, 2), ids, None, adv, inplace_backward=True,
                                      grad_in_forward=one_sweep)
        loss.backward()
    w64 = w.detach().cpu().double().requires_grad_()
    loss64 = reference.mhpo_loss(w64.transpose(1, 2), ids.cpu(), None, adv.cpu().double())
    loss64.backward()
    assert abs(loss.item() - loss64.item()) <= FP32_RTOL * abs(loss64.item())
    assert w.grad.abs().max().item() <= 1e-7 and w64.grad.abs().max().item() == 0   # fp32 roundings of p − 1 = 0


@pytest.mark.parametrize("vec", [4, 8])
def test_in_phase_is_exact(vec):
    """The backward claims 16-byte gradient stores only when every gradient row starts at its
    logits row's residue: the host check against every row of small tensors, with the shift's
    zero rows at position T too (``zero_tail``; with T = 1 only they tell the stride along T)."""
    def brute(x, d, tail):
        return all((b * x.stride(0) + t * x.stride(1) - b * d.stride(0) - t * d.stride(1)) % vec == 0
                   for b in range(x.shape[0]) for t in range(x.shape[1] + tail))

    for V in (6, 7, 8, 16):
        for Bn, Tn in ((1, 1), (1, 3), (3, 1), (2, 3)):
            full = torch.empty(Bn, Tn + 1, V)
            views = [full[:, :-1], full[:, 1:], full.transpose(0, 1)[:Tn].transpose(0, 1),
                     torch.empty(Bn, Tn, V), torch.empty(Tn, Bn, V).transpose(0, 1),
                     torch.empty(Bn, 2 * Tn, V)[:, ::2]]   # every other position: stride 2V along T
            for x in views:
                for d in views:
                    for tail in (False, True) if x.shape == d.shape else ():
                        assert _in_phase(x, d, vec, tail) == brute(x, d, tail), (V, Bn, Tn, x.stride(), d.stride())


def test_gradient_buffer_in_phase(monkeypatch):
    """Out of place, the backward's gradient buffer has the logits' strides when they are a view
    with small gaps (a sliced (B, T + 1, V), a vocabulary cut from a padded one), so its rows are
    in phase with the logits' and the stores are 16-byte vectors at odd V; a view with large gaps
    (every other sequence) gets a contiguous buffer, and the gradient is right either way."""
    from mhpo_kernels.kernels import backward

    seen = []
    launch = backward.mhpo_bwd

    def recording(logits, grad, *args, **kwargs):
        seen.append((logits.stride(), grad.stride(), _in_phase(logits, grad, 8)))
        return launch(logits, grad, *args, **kwargs)

    monkeypatch.setattr(backward, "mhpo_bwd", recording)
    g = torch.Generator().manual_seed(12)
    B, T, V = 4, 16, 37      # sliced: 6 % more storage than elements; every other sequence: 112 %
    full = (torch.randn(B, T + 1, V + 1, generator=g) * 3).to(torch.bfloat16)
    ids = torch.randint(0, V, (B // 2, T), generator=g)
    views = {"sliced": lambda x: x[:, :-1, :V], "every-other": lambda x: x[::2, :-1, :V]}
    for name, view in views.items():
        b = B if name == "sliced" else B // 2
        seen.clear()
        x = full.detach().to(TRITON_DEVICE).requires_grad_()
        with mhpo_kernels.use_backend("triton"):
            logp = mhpo_kernels.token_logprobs(view(x), ids.repeat(b // ids.shape[0], 1).to(TRITON_DEVICE))
        (grad,) = torch.autograd.grad(logp.sum(), x)
        (x_stride, grad_stride, in_phase), = seen
        if name == "sliced":
            assert grad_stride == x_stride and in_phase, seen
        else:
            assert grad_stride == (T * V, V, 1) and not in_phase, seen
        x64 = full.double().requires_grad_()
        logp64 = reference.token_logprobs(view(x64), ids.repeat(b // ids.shape[0], 1))
        (grad64,) = torch.autograd.grad(logp64.sum(), x64)
        assert max_rel_err(grad.cpu(), grad64) <= _grad_tol(torch.bfloat16, TRITON_DEVICE), name


ALIGNED = [Layout("aligned-bf16-V64", "contiguous", torch.bfloat16, 64, 2, 3),
           Layout("aligned-shifted-fp32-V8200", "shifted", torch.float32, 8200, 1, 2)]


@pytest.mark.parametrize("case", CONTIGUOUS + VIEWS + ALIGNED, ids=lambda c: c.id)
def test_scale_rows_at_every_residue(case):
    """The rescale of grad_in_forward's gradient walks rows as the sweeps do (16-byte vectors at
    any residue; ROWS_ALIGNED where both strides are whole vectors): each row times its factor,
    stored once in the dtype (upstream / expected: 2.5 / 0.5); rows of invalid tokens, and
    everything outside the rows, untouched."""
    from mhpo_kernels.kernels.backward import scale_rows_

    g = torch.Generator().manual_seed(case.V + 1)
    leaf, view = _logits(case, g)
    storage = leaf.detach().to(TRITON_DEVICE)
    before = storage.clone()
    x = view(storage)
    B, T = x.shape[:2]
    target = torch.randint(0, 5, (B * T,), generator=g, dtype=torch.int32)
    target[::3] = -1
    scale = torch.where(target >= 0, 5.0, 1.0)
    scaled = x.float().cpu() * scale.reshape(B, T, 1)
    scale_rows_(x, target.to(x.device), torch.tensor(2.5, device=x.device), 0.5)
    assert max_rel_err(x.float().cpu(), scaled) <= store_error(case.dtype, x.device)
    assert torch.equal(x.cpu()[scale.reshape(B, T) == 1], view(before).cpu()[scale.reshape(B, T) == 1])
    view(before).copy_(x)
    assert torch.equal(storage, before)   # nothing outside the rows moved
