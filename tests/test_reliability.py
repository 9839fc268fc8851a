"""Huge tensors, long sequences, determinism, and what non-finite input does."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mhpo_kernels
import reference
from _cases import FP32_RTOL, SMALL, Regime, loss_and_grad, make_inputs, max_rel_err, store_error
from conftest import DEVICES
from mhpo_kernels._inputs import prepare_mhpo
from mhpo_kernels._sweep_types import LogitMap, mhpo_token_params

INT32_MAX = 2**31 - 1


def _far_apart_rows(V, gap, dtype=torch.bfloat16, seed=0, device="cpu"):
    """A (3, 1, V) view with rows ``gap`` elements apart in one storage. With gap just over 2³⁰
    the stride still fits an int32, so only an int64 product b · stride reaches the third row,
    past element 2³¹. The storage is allocated, not written: only the rows' pages are touched."""
    storage = torch.empty(2 * gap + V, dtype=dtype, device=device)
    view = storage.as_strided((3, 1, V), (gap, V, 1))
    g = torch.Generator().manual_seed(seed)
    view.copy_((torch.randn(3, 1, V, generator=g) * 2).to(device, dtype))
    return storage, view


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_row_offsets_beyond_int32_are_exact(device):
    """Both sweeps address a row at element offset 2³¹ + 16 of the logits and of the gradient:
    results equal those of the same rows stored compactly, bit for bit. The gap keeps each row at
    the compact row's residue mod 16 bytes: a row's blocks are anchored at the 16-byte boundary
    before it (kernels/rows.py), so at another residue its sums run in another order."""
    V, gap = 1000, 2**30 + 8
    _, logits = _far_apart_rows(V, gap, device=device)
    grad_storage, _ = _far_apart_rows(V, gap, seed=1, device=device)
    grad = grad_storage.as_strided((3, 1, V), (gap, V, 1))
    compact = logits.contiguous()
    assert logits.stride(0) <= INT32_MAX < 2 * logits.stride(0)

    ids = torch.tensor([[7], [V - 1], [3]], device=device)
    old = torch.tensor([[-7.0], [-6.0], [-8.0]], device=device)
    adv = torch.tensor([1.3, -0.4, 0.8], device=device)
    results = []
    for x, out in ((logits, grad), (compact, torch.empty_like(compact))):
        batch = prepare_mhpo(ids, ids.shape, V, x.device, old, adv, None, None, 0.0, "token-mean", -100)
        fwd, bwd = mhpo_kernels._dispatch.sweeps(x.device)
        stats = fwd(x, batch.target, batch.old, batch.adv, batch.weight, batch.ref, mhpo_token_params(), LogitMap.make(1.0),
                    with_entropy=True, with_loss=True)
        bwd(x, out, batch.target, stats.lse2_base, stats.lse2_rest, stats.coef, None, None, LogitMap.make(1.0))
        results.append((stats, out.clone()))
    (far, far_grad), (near, near_grad) = results
    for a, b in zip(far, near):
        assert a is None or torch.equal(a, b)
    assert torch.equal(far_grad, near_grad)

    # And through the public op, forward and backward, against the float64 reference.
    loss, dx = loss_and_grad(mhpo_kernels.mhpo_loss, logits, dict(input_ids=ids, old_logprobs=old, advantages=adv))
    loss64, dx64 = loss_and_grad(reference.mhpo_loss, compact.cpu().double(),
                                 dict(input_ids=ids.cpu(), old_logprobs=old.cpu().double(), advantages=adv.cpu().double()))
    assert loss.item() == pytest.approx(loss64.item(), rel=FP32_RTOL)
    assert max_rel_err(dx.cpu(), dx64) <= store_error(torch.bfloat16, device) + FP32_RTOL


def test_long_sequence_launches_one_program_per_row(monkeypatch):
    """65,536+ rows of one sequence go to a 1-D grid (a T axis on grid dimension 1 would stop at
    65,535). Under the interpreter the 70,000 programs would take minutes, so the launches are
    recorded here and the CUDA test below runs them; the PyTorch path runs for real."""
    from mhpo_kernels.kernels import backward, forward

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids.append(grid)
            return launch

    monkeypatch.setattr(forward, "_mhpo_fwd_kernel", Recorder())
    monkeypatch.setattr(backward, "_mhpo_bwd_kernel", Recorder())
    N, V = 70_000, 16
    x = torch.randn(1, N, V, requires_grad=True)
    ids = torch.randint(0, V, (1, N))
    with mhpo_kernels.use_backend("triton"):
        mhpo_kernels.mhpo_loss(x, ids, None, torch.ones(1)).backward()
    assert grids == [(N,), (N,)]


@pytest.mark.parametrize("device", DEVICES)
def test_long_sequence_correct(device):
    """T = 70,000 rows in one call against the float64 reference: the compiled kernels on CUDA,
    the PyTorch path on CPU (see the launch test above for the interpreter)."""
    N, V = 70_000, 64
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, N, V, generator=g)
    ids = torch.randint(0, V, (1, N), generator=g)
    kwargs = dict(input_ids=ids, old_logprobs=(torch.randn(1, N, generator=g) - 4).clamp(max=0.0),
                  advantages=torch.randn(1, N, generator=g))
    backend = "triton" if device == "cuda" else "torch"
    with mhpo_kernels.use_backend(backend):
        loss, grad = loss_and_grad(mhpo_kernels.mhpo_loss, x.to(device), {k: v.to(device) for k, v in kwargs.items()})
    loss64, grad64 = loss_and_grad(reference.mhpo_loss, x.double(),
                                   {k: v.double() if v.is_floating_point() else v for k, v in kwargs.items()})
    assert loss.item() == pytest.approx(loss64.item(), rel=FP32_RTOL)
    assert max_rel_err(grad.cpu(), grad64) <= FP32_RTOL


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_calls_are_bitwise_identical(device):
    logits, kwargs = make_inputs(SMALL, Regime("det", kl=True, temperature=0.8, dtype=torch.bfloat16), device=device)
    runs = [loss_and_grad(mhpo_kernels.mhpo_loss, logits, kwargs, upstream=0.7) for _ in range(3)]
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(2, 5, 32, generator=g).to(device), (torch.randn(300, 32, generator=g) * 0.3).to(device)
    ids = torch.randint(0, 300, (2, 5), generator=g).to(device)
    adv = torch.randn(2, generator=g).to(device)

    def linear():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = mhpo_kernels.fused_linear_mhpo_loss(hh, ww, ids, None, adv, chunk_size=3)
        return (loss, *torch.autograd.grad(loss, (hh, ww)))

    first = linear()
    for again in (linear(), linear()):
        assert all(torch.equal(a, b) for a, b in zip(first, again))


class _OpNames(TorchDispatchMode):
    """The names of the aten ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_per_sequence_sum_is_deterministic(device):
    """The per-sequence sums (GSPO's mean log-ratio and its backward's Σ_t g_t · ∂L/∂loss_t, the
    seq-mean counts) are a segmented reduction, not atomic adds: within fp32 (float64) summation
    error of the float64 sum, bitwise the same over repeated calls, and bitwise what each sequence
    summed alone gives (an atomic sum's order depends on what the other sequences' threads do; a
    segment's order on its own boundaries only), empty sequences (0) first, between and last. Then
    GSPO on a packed stream with empty sequences: loss and gradient bitwise the same over calls."""
    from mhpo_kernels.epilogue import per_sequence_sum, segment_ids
    from mhpo_kernels.objectives import GSPO

    g = torch.Generator().manual_seed(5)
    lengths = [0, 1, 7, 0, 0, 1000, 2, 4099, 0, 33, 0]
    cu = torch.tensor([0] + lengths).cumsum(0)
    S, N = len(lengths), int(cu[-1])
    seq_id = segment_ids(cu.to(device), N)
    # magnitudes over 2⁴⁰ and both signs: a different order of addition gives different bits
    x64 = torch.randn(N, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-20, 21, (N,), generator=g)
    for dtype, unit in ((torch.float32, 2.0 ** -24), (torch.float64, 2.0 ** -53)):
        x = x64.to(dtype).to(device)
        sums = per_sequence_sum(x, seq_id, S)
        assert sums.dtype == dtype and sums.shape == (S,)
        xs = x.cpu().double()
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            exact = xs[a:b].sum().item()
            assert abs(sums[i].item() - exact) <= max(b - a - 1, 0) * unit * xs[a:b].abs().sum().item(), (i, dtype)
            # a view, not a copy: the same addresses, so the same alignment of the segment's loads
            alone = per_sequence_sum(x[a:b], seq_id.new_zeros(b - a), 1)
            assert torch.equal(alone[0], sums[i]), (i, dtype)
        assert sums[torch.tensor(lengths) == 0].eq(0).all()
        with _OpNames() as ops:
            for _ in range(3):
                assert torch.equal(per_sequence_sum(x, seq_id, S), sums)
        # what a CPU run can see of the CUDA kernels' order: no op that accumulates by atomics or scans floats
        assert not ops.names & {"index_add", "index_add_", "scatter_add", "scatter_add_", "scatter_reduce",
                                "scatter_reduce_", "index_put", "index_put_", "_index_put_impl_", "put", "put_",
                                "cumsum", "cumsum_"}, ops.names

    cu = torch.tensor([0, 0, 3, 3, 8, 9, 9], device=device)
    N, V = 9, 50
    logits = (torch.randn(N, V, generator=g) * 2).to(device)
    ids = torch.randint(0, V, (N,), generator=g).to(device)
    old = (torch.randn(N, generator=g) * 0.2 - 4).to(device)
    adv = torch.randn(cu.numel() - 1, 1, generator=g).to(device)

    def gspo():
        x = logits.clone().requires_grad_()
        loss = mhpo_kernels.policy_loss(x, ids, old, adv, cu_seqlens=cu, objective=GSPO())
        return loss, torch.autograd.grad(loss * 0.7, x)[0]

    first = gspo()
    for again in (gspo(), gspo()):
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("what", ["logits-nan", "logits-inf", "old-nan", "adv-nan"])
def test_non_finite_at_a_valid_token_propagates(what, device):
    """Documented behaviour: a NaN or inf at a valid token is not checked for (that would cost a
    pass over the logits); like eager PyTorch it makes the loss non-finite and that token's
    gradient row NaN, while every other row's gradient is what it would have been."""
    logits, kwargs = make_inputs(SMALL, Regime("nan", mask=False, ignore=False, garbage=False), device=device)
    kwargs["advantages"] = kwargs["advantages"][:, None].expand(-1, SMALL.T).clone()
    bad = (0, 1)
    dirty_logits, dirty = logits.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    if what == "logits-nan":
        dirty_logits[bad] = math.nan
    elif what == "logits-inf":
        dirty_logits[bad][3] = math.inf
    elif what == "old-nan":
        dirty["old_logprobs"][bad] = math.nan
    else:
        dirty["advantages"][bad] = math.nan
    _, clean_grad = loss_and_grad(mhpo_kernels.mhpo_loss, logits, kwargs)
    loss, grad = loss_and_grad(mhpo_kernels.mhpo_loss, dirty_logits, dirty)
    assert not torch.isfinite(loss)
    assert grad[bad].isnan().all()
    others = torch.ones(grad.shape[:2], dtype=torch.bool)
    others[bad] = False
    assert torch.equal(grad[others.to(device)], clean_grad[others.to(device)])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("fill", [-1e9, -1e10, -1e30, torch.finfo(torch.float32).min, -math.inf],
                         ids=["-1e9", "-1e10", "-1e30", "fp32-min", "-inf"])
def test_vocabulary_masked_with_large_negatives(backend, fill):
    """Masking part of the vocabulary with a large finite negative (as samplers and trainers do)
    leaves zero-probability entries: log-probs, entropy and gradient equal the float64 reference.
    In base 2 such a logit's exponent rounds with residuals far beyond 2^128, so a lane that has
    seen only masked entries must be dropped, not multiplied by 0."""
    g = torch.Generator().manual_seed(7)
    B, T, V = 2, 3, 8192 + 50
    x = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    masked = torch.rand(B, T, V, generator=g) < 0.7
    masked[:, :, :4096] = True                      # whole first block: lanes that see only masks
    masked.scatter_(-1, ids.unsqueeze(-1), False)    # the sampled token is allowed
    x[masked] = fill
    old = torch.randn(B, T, generator=g) - 4.0
    adv = torch.randn(B, generator=g)
    with mhpo_kernels.use_backend(backend):
        logp, ent = mhpo_kernels.token_logprobs(x, ids, return_entropy=True)
        loss, dx = loss_and_grad(mhpo_kernels.mhpo_loss, x, dict(input_ids=ids, old_logprobs=old, advantages=adv))
    x64 = x.double()
    logp64, ent64 = reference.token_logprobs(x64, ids, return_entropy=True)
    loss64, dx64 = loss_and_grad(reference.mhpo_loss, x64, dict(input_ids=ids, old_logprobs=old.double(),
                                                                 advantages=adv.double()))
    assert max_rel_err(logp, logp64) <= FP32_RTOL and max_rel_err(ent, ent64) <= FP32_RTOL
    assert abs(loss.item() - loss64.item()) <= FP32_RTOL * abs(loss64.item())
    assert max_rel_err(dx, dx64) <= FP32_RTOL and not dx[masked].any()
