"""A row's bits do not depend on the batch it is computed in (SPEC.md, section 4). Bitwise: equality,
no tolerance.

The logits path, by default, where V × itemsize is a multiple of 16: every row is reduced in the
same segments folded in the same order (``_config.row_segments``), whether one program reads it or a
launcher splits it over several (small N on a GPU, forced here under the interpreter with blocks of
16 and segments of at least 2: V = 112 is 7 blocks, 3 segments). A row alone at 3 splits equals the
same row in batches read at 1 and 2 splits (2 segments and 1), at other positions; padded equals
packed; ``grad_in_forward`` (never split) equals the split two sweeps. The PyTorch path and
``reference/`` reduce each row alone: the same holds there.

The fused linear path with ``batch_invariant=True``: a row's log-prob, entropy and dhidden row, and
under a loss whose weights are its own (token-mean with a fixed normalizer) its dhidden row, have
the same bits alone, among 700 rows and shifted by 37 rows, on the PyTorch path (chunks of 64); the
Triton kernels (under the interpreter, which costs milliseconds per row) among 24, shifted by 5, in
chunks of 8."""

import functools
import math

import pytest
import torch

import mhpo_kernels
import reference
from conftest import TRITON_DEVICE
from mhpo_kernels import _config

H, V, SHIFT = 16, 96, 37


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n + SHIFT, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    ids = torch.randint(0, V, (n + SHIFT,), generator=g)
    old = -torch.rand(n + SHIFT, generator=g) * 3 - 0.1
    adv = torch.randn(n + SHIFT, generator=g)
    return hidden, weight, ids, old, adv


def _logprobs(hidden, weight, ids, batch_invariant=True, chunk=64):
    h = hidden.clone().requires_grad_()
    logp, entropy = mhpo_kernels.fused_linear_token_logprobs(h, weight, ids, chunk_size=chunk, return_entropy=True,
                                                           batch_invariant=batch_invariant)
    (logp.sum() + 0.3 * entropy.sum()).backward()
    return logp.detach(), entropy.detach(), h.grad


def _loss_grad(hidden, weight, ids, old, adv, chunk=64):
    h = hidden.clone().requires_grad_()
    loss = mhpo_kernels.fused_linear_mhpo_loss(h, weight, ids, old, adv, chunk_size=chunk, loss_agg_mode="token-mean",
                                               normalizer=1.0, batch_invariant=True)
    loss.backward()
    return (h.grad,)


@pytest.mark.parametrize("backend, n, chunk, shift", [("triton", 24, 8, 5), ("torch", 700, 64, SHIFT)])
def test_a_row_has_the_same_bits_in_any_batch(backend, n, chunk, shift):
    hidden, weight, ids, old, adv = _inputs(n)
    hidden, ids, old, adv = (x[SHIFT - shift:] for x in (hidden, ids, old, adv))
    with mhpo_kernels.use_backend(backend):
        for base, extra in ((_logprobs, ()), (_loss_grad, (old, adv))):
            fn = functools.partial(base, chunk=chunk)
            among = fn(hidden[shift:], weight, ids[shift:], *(x[shift:] for x in extra))
            shifted = fn(hidden, weight, ids, *extra)
            for a, s in zip(among, shifted):
                assert torch.equal(s[shift:], a), base.__name__
            for r in (0, n // 2 + 1, n - 1):
                alone = fn(hidden[shift + r:shift + r + 1], weight, ids[shift + r:shift + r + 1],
                           *(x[shift + r:shift + r + 1] for x in extra))
                for a, x in zip(alone, among):
                    assert torch.equal(a[0], x[r]), (base.__name__, r)


def test_the_flag_is_checked():
    """Without the flag a row alone is computed by a GEMM of another shape (equal to rounding; its
    bits may differ); a flag that is not a bool is refused."""
    hidden, weight, ids, _, _ = _inputs(200)
    with mhpo_kernels.use_backend("torch"):
        alone = _logprobs(hidden[:1], weight, ids[:1], batch_invariant=False)
        among = _logprobs(hidden, weight, ids, batch_invariant=False)
    assert all(torch.allclose(a[0], x[0], rtol=1e-5, atol=1e-6) for a, x in zip(alone, among))
    with pytest.raises(TypeError, match="batch_invariant must be a bool"):
        mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, batch_invariant=1)


# ---- the logits path ----------------------------------------------------------------------------

LOGITS_V, BLOCK, SEGMENT_BLOCKS, ROWS = 112, 16, 2, 6


def _launch(splits=None):
    """The launch configuration of the tests: blocks of 16, segments of at least 2 blocks, and
    ``splits`` programs per row where given."""
    return _config.overridden(block_v=BLOCK, min_split_blocks=SEGMENT_BLOCKS, row_splits=splits)


def _row_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, LOGITS_V, generator=g) * 3
    ids = torch.randint(0, LOGITS_V, (ROWS,), generator=g)
    old = -torch.rand(ROWS, generator=g) * 3 - 0.1
    adv = torch.randn(ROWS, generator=g)
    return x, ids, old, adv


def _token_rows(backend, x, ids, dtype, splits=None):
    """(logp, entropy, ∂(Σ logp + 0.3 Σ H)/∂x) of the rows of ``x``, row splits forced."""
    x = x.to(dtype).to(TRITON_DEVICE, copy=True).requires_grad_()
    with mhpo_kernels.use_backend(backend), _launch(splits):
        logp, entropy = mhpo_kernels.token_logprobs(x, ids.to(TRITON_DEVICE), return_entropy=True)
        (logp.sum() + 0.3 * entropy.sum()).backward()
    return logp.detach().cpu(), entropy.detach().cpu(), x.grad.cpu()


def _loss_rows(backend, x, ids, old, adv, splits=None, grad_in_forward=False):
    """The gradient rows of a token-mean loss with a fixed normalizer: each row's weight is its own."""
    x = x.to(TRITON_DEVICE, copy=True).requires_grad_()
    with mhpo_kernels.use_backend(backend), _launch(splits):
        loss = mhpo_kernels.mhpo_loss(x, ids.to(TRITON_DEVICE), old.to(TRITON_DEVICE), adv.to(TRITON_DEVICE),
                                      loss_agg_mode="token-mean", normalizer=1.0, grad_in_forward=grad_in_forward)
        loss.backward()
    return (x.grad.cpu(),)


@pytest.mark.parametrize("backend, dtype, batch_splits", [("triton", torch.float32, (1, 2)),
                                                          ("triton", torch.bfloat16, (2,)),
                                                          ("torch", torch.float32, (1,))])
def test_a_logits_row_has_the_same_bits_in_any_batch(backend, dtype, batch_splits):
    """Log-prob, entropy and gradient rows, and (fp32) a loss's gradient rows; the batch read
    whole or in 2 splits (of 2 segments and 1), the row alone in 3."""
    with _config.overridden(min_split_blocks=SEGMENT_BLOCKS):
        assert _config.row_segments(LOGITS_V, BLOCK) == 3
    x, ids, old, adv = _row_inputs()
    shift = 2
    cases = [(functools.partial(_token_rows, dtype=dtype), (), batch_splits)]
    if dtype == torch.float32:
        cases.append((_loss_rows, (old, adv), batch_splits[:1]))
    for fn, extra, splits_of_batches in cases:
        batches = {splits: fn(backend, x, ids, *extra, splits=splits) for splits in splits_of_batches}
        later = fn(backend, x[shift:], ids[shift:], *(e[shift:] for e in extra), splits=1)
        for r in (0, ROWS - 1):
            alone = fn(backend, x[r:r + 1], ids[r:r + 1], *(e[r:r + 1] for e in extra), splits=3)
            for splits, batch in batches.items():
                for a, b in zip(alone, batch):
                    assert torch.equal(a[0], b[r]), (fn, r, splits)
            if r >= shift:
                for a, b in zip(alone, later):
                    assert torch.equal(a[0], b[r - shift]), (fn, r, "shifted")


def test_the_reference_gives_a_row_the_same_bits_in_any_batch():
    """``reference/`` (float64 eager) reduces each row alone too: log-prob, entropy and gradient
    rows, plain and truncated, and a loss's gradient rows given their weights."""
    x, ids, old, adv = _row_inputs(5)
    x = x.double()

    def rows(r):
        xs = x[r].clone().requires_grad_()
        out = []
        for filters in ({}, dict(min_p=0.01, top_k=40, top_p=0.9)):
            logp, ent = reference.token_logprobs(xs, ids[r], return_entropy=True, **filters)
            (grad,) = torch.autograd.grad(torch.where(logp > -math.inf, logp, 0.0).sum() + 0.3 * ent.sum(), xs)
            out += [logp.detach(), ent.detach(), grad]
        loss = reference.mhpo_loss(xs, ids[r], old[r].double(), adv[r].double(), loss_agg_mode="token-mean",
                                   normalizer=1.0)
        return out + list(torch.autograd.grad(loss, xs))

    batch = rows(slice(None))
    for r in (0, ROWS - 1):
        for a, b in zip(rows(slice(r, r + 1)), batch):
            assert torch.equal(a[0], b[r]), r


def test_a_truncated_row_has_the_same_bits_in_any_batch():
    """min_p, top_k and top_p (SPEC.md, section 9): a truncated row is read by one program, its
    statistics in the same segments, its threshold from them; alone or among others, the same bits."""
    x, ids, _, _ = _row_inputs(4)
    x, ids = x[:4], ids[:4]
    filters = dict(min_p=0.01, top_k=40, top_p=0.9)

    def rows(xs, ys):
        leaf = xs.to(TRITON_DEVICE, copy=True).requires_grad_()
        with mhpo_kernels.use_backend("triton"), _launch():
            logp, ent = mhpo_kernels.token_logprobs(leaf, ys.to(TRITON_DEVICE), return_entropy=True, **filters)
            (torch.where(logp > -math.inf, logp, 0.0).sum() + 0.3 * ent.sum()).backward()
        return logp.detach().cpu(), ent.detach().cpu(), leaf.grad.cpu()

    batch = rows(x, ids)
    assert (batch[0] == -math.inf).any() and (batch[0] > -math.inf).any()  # targets inside and outside
    for r in (0, 3):
        for a, b in zip(rows(x[r:r + 1], ids[r:r + 1]), batch):
            assert torch.equal(a[0], b[r]), r


def test_padded_equals_packed_and_one_sweep_equals_split_sweeps():
    """(B, T + 1, V) logits with a mask, read in 3 splits, and the same rows packed (N, V) with
    cu_seqlens, read whole, give the same log-prob, entropy and gradient rows, and the loss (the
    default mode, whose weights are each sequence's) the same gradient rows, the packed one from
    ``grad_in_forward`` (one program per row, both passes) and the padded one from the two sweeps."""
    x, ids, old, adv = _row_inputs(2)
    B, T = 2, 3
    lengths = (3, 2)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    padded = torch.randn(B, T + 1, LOGITS_V, generator=torch.Generator().manual_seed(3))
    padded[:, :T][mask] = x[:sum(lengths)]
    ids_p = torch.zeros(B, T, dtype=torch.long)
    ids_p[mask] = ids[:sum(lengths)]
    old_p, adv_p = torch.zeros(B, T), torch.zeros(B, T)
    old_p[mask], adv_p[mask] = old[:sum(lengths)], adv[:sum(lengths)]
    cu = torch.tensor([0, lengths[0], sum(lengths)])
    packed = x[:sum(lengths)]

    def rows(logits, input_ids, splits, grad_in_forward=False, **kw):
        leaf = logits.clone().to(TRITON_DEVICE).requires_grad_()
        with mhpo_kernels.use_backend("triton"), _launch(splits):
            mask_kw = {"mask": kw.pop("mask").to(TRITON_DEVICE)} if "mask" in kw else {}
            logp, ent = mhpo_kernels.token_logprobs(leaf, input_ids.to(TRITON_DEVICE), return_entropy=True, **mask_kw)
            (logp.sum() + 0.3 * ent.sum()).backward()
            out = [logp.detach().cpu(), ent.detach().cpu(), leaf.grad.cpu()]
            leaf.grad = None
            kw_t = {k: v.to(TRITON_DEVICE) for k, v in kw.items()}
            mhpo_kernels.mhpo_loss(leaf, input_ids.to(TRITON_DEVICE), grad_in_forward=grad_in_forward, **mask_kw,
                                   **kw_t).backward()
        return out + [leaf.grad.cpu()]

    got_p = rows(padded, ids_p, 3, mask=mask, old_logprobs=old_p, advantages=adv_p)
    got_k = rows(packed, ids[:sum(lengths)], 1, grad_in_forward=True, old_logprobs=old[:sum(lengths)],
                 advantages=adv[:sum(lengths)], cu_seqlens=cu)
    for a, b in zip(got_p, got_k):
        a = a[:, :T] if a.dim() == 3 else a
        assert torch.equal(a[mask], b)
    assert not got_p[2][:, T:].any() and not got_p[3][:, T:].any()


def test_a_given_threshold_reads_each_row_in_one_program():
    """The forward given each row's threshold (a vocabulary slice's under min_p,
    vocab_parallel.py) never splits a row, even where the launcher would split every row in 3:
    the same bits as the same call unsplit (split, its finish would fold segments no program
    wrote)."""
    from mhpo_kernels._sweep_types import LogitMap, mhpo_token_params
    from mhpo_kernels.kernels.forward import mhpo_fwd

    x, ids, _, _ = _row_inputs(4)
    ids[::2] = x.argmax(-1)[::2]                                # inside the kept set on every other row
    cut = torch.full((ROWS,), -1.5)
    cut[0] = -math.inf                                          # a row left whole
    lmap = LogitMap.make(1.0, cut=cut.to(TRITON_DEVICE))
    rows = []
    for splits in (1, 3):
        with _launch(splits):
            out = mhpo_fwd(x.unsqueeze(0).to(TRITON_DEVICE), ids.to(TRITON_DEVICE, torch.int32), None, None, None,
                           None, mhpo_token_params(), lmap, with_entropy=True, with_loss=False)
        rows.append(tuple(t.cpu() for t in (out.lse2_rest, out.logp, out.entropy, out.cut)))
    assert rows[0][1][1:].isfinite().any() and (rows[0][1] == -math.inf).any()
    for a, b in zip(*rows):
        assert torch.equal(a, b)
