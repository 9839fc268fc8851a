"""The fused linear path's chunk loop: per chunk of valid tokens, one GEMM makes the logits tile,
sweep 1 gives the per-token loss and dL/dlogp, sweep 2 turns the tile into its gradient in place,
and two GEMMs fold it into dhidden and dweight (3 GEMMs per chunk; recomputing the tile in the
backward would take 4). Tokens without a valid target are gathered out first and never multiplied
(eagerly; inside torch.compile see ``_valid_rows``).

Differentiable log-probs and entropy (``token_logprobs_sweeps`` / ``token_logprobs_grads``) cannot
fold the gradient in the forward: the upstream gradients of both outputs arrive only in the
backward. Their forward makes 1 GEMM per chunk and keeps O(N) row statistics; their backward
recomputes each tile (1 GEMM) and folds its gradient (2 GEMMs): 4 per chunk in all."""

import dataclasses
import functools
import math
import re

import torch
import torch.distributed

from . import _dispatch
from ._sweep_types import mhpo_token_params, RowStats
from .slice_select import selected_cuts


def _valid_rows(target, n_valid):
    """Indices of the valid tokens, or None to run every row. The rows without a token (padding,
    masked prompt positions) then take no part in any GEMM: the three GEMMs of a step scale with
    the valid tokens, not with the padded batch.

    ``n_valid`` is the count validation read in its one host sync (``Batch.n_valid``), so the
    compaction needs no second one: ``nonzero_static`` with that size fills its output on the
    device. None means the count is not known on the host (inside torch.compile, where validation
    only asserts asynchronously): the op is then one opaque node called with n_valid None, and
    any count taken inside it would be an eager sync at run time, on every step. So it compacts
    nothing there: the rows without a token go through the GEMMs, and the sweeps give them a zero
    loss and a zero gradient row; the cost is GEMM time on the padding, never a sync."""
    if n_valid is None or n_valid == target.numel():
        return None
    return torch.nonzero_static(target >= 0, size=n_valid).squeeze(-1)


def _without_padding(hidden, target, n_valid):
    """hidden with the rows that go through the GEMMs without a token (n_valid None) set to 0:
    whatever a padded position holds (NaN, say) must add nothing to dweight, and its zero
    gradient row times a NaN would not be zero."""
    return hidden if n_valid is not None else hidden.masked_fill(target.unsqueeze(-1) < 0, 0)


def _pad_rows(x, total, value=0):
    """x with rows of ``value`` appended up to ``total`` rows (None stays None)."""
    if x is None or x.shape[0] == total:
        return x
    return torch.cat([x, x.new_full((total - x.shape[0],) + tuple(x.shape[1:]), value)])


def _whole_chunks(chunk_rows, rows, lmap):
    """``batch_invariant``: (the rows padded to a multiple of ``chunk_rows``, the map padded alike),
    so that every GEMM and every sweep has the same shape (chunk_rows rows) wherever a token falls
    and however many there are: a row's bits depend on no other row. ``rows``: name → (tensor or
    None, the value of a padding row); targets pad with −1 (no token: a zero loss and a zero
    gradient row), the map's per-row values with the filters off, no kept set replayed, τ = 1."""
    n = next(x for x, _ in rows.values() if x is not None).shape[0]
    total = max(1, math.ceil(n / chunk_rows)) * chunk_rows
    padded = {name: _pad_rows(x, total, value) for name, (x, value) in rows.items()}
    per_row = dict(tau=1.0, min_p=0.0, top_k=0, top_p=1.0, cut=-math.inf, kept_start=0, kept_end=0)
    lmap = dataclasses.replace(lmap, **{k: _pad_rows(getattr(lmap, k), total, v) for k, v in per_row.items()})
    return padded, lmap


def _logits_tiles(hidden, weight, bias, chunk_rows):
    """(r0, r1, hidden rows, logits tile (1, rows, V)) per chunk of tokens: one GEMM each."""
    for r0 in range(0, hidden.shape[0], chunk_rows):
        r1 = min(r0 + chunk_rows, hidden.shape[0])
        h_c = hidden[r0:r1]
        tile = torch.mm(h_c, weight.t()) if bias is None else torch.addmm(bias, h_c, weight.t())
        yield r0, r1, h_c, tile.unsqueeze(0)


@functools.lru_cache(maxsize=None)   # a pure function of the string: nothing probed, nothing to go stale
def _torch_version(version):
    """(major, minor) of a torch version string such as '2.8.0+cu128' or '2.11.0a0'."""
    major, minor = re.match(r"(\d+)\.(\d+)", str(version)).groups()
    return int(major), int(minor)


def _has_fp32_out_addmm(device_type, dtype):
    """Whether ``addmm(..., out_dtype=torch.float32)`` exists for ``dtype`` operands: torch ≥ 2.8
    on CUDA (not ROCm) with bf16 or fp16, decided from the version and the device alone. No probe
    and no cache: a probe can fail for reasons that say nothing about the overload (inside a CUDA
    graph capture, out of memory), and a cached failure would send every later dW through the
    widened fp32 GEMMs without a word. Where the overload should exist and the real GEMM fails,
    its error reaches the caller."""
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or torch.version.hip:
        return False
    return _torch_version(torch.__version__) >= (2, 8)


WIDEN_COLUMNS = 4096  # fp32 operands for a CPU half-precision GEMM: one slice of V at a time


def _addmm_fp32(acc, a, b):
    """acc += a @ b into an fp32 accumulator without first rounding a @ b to a's dtype.

    fp32 operands: one addmm. bf16/fp16 on CUDA: one GEMM with an fp32 output. Where torch has no
    such GEMM (CPU), the operands are widened WIDEN_COLUMNS rows of ``a`` (columns of the tile) at a time, so the working
    copy is bounded by a slice of the vocabulary, never a copy of the whole tile.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _has_fp32_out_addmm(acc.device.type, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        b32 = b.float()
        for v0 in range(0, a.shape[0], WIDEN_COLUMNS):
            acc[v0:v0 + WIDEN_COLUMNS].addmm_(a[v0:v0 + WIDEN_COLUMNS].float(), b32)


def _scatter_rows(x, kept, n):
    """x (len(kept), ...) back to n rows, zeros elsewhere; x itself when kept is None."""
    if kept is None or x is None:
        return x
    out = x.new_zeros((n,) + tuple(x.shape[1:]))
    out[kept] = x
    return out


def _gather_rows(kept, *xs):
    return tuple(x if kept is None or x is None else x[kept] for x in xs)


def _chunk_stats(forward_sweep, tile, target, old, adv, g, ref, hp, lmap, with_entropy, with_loss, tp):
    """Sweep 1 on one tile: the rows' RowStats. With ``tp`` (the vocabulary split over ranks) the
    tile holds this rank's columns: the sweep gives the slice's statistics and ``tp.finish_rows``
    makes them global (one all-gather per chunk) and runs the per-token epilogue. The filters'
    thresholds with ``tp`` are found over every slice on d at the common base
    (``slice_select.selected_cuts``, as on the logits' path); the stats hold them there."""
    if tp is None:
        return forward_sweep(tile, target, old, adv, g, ref, hp, lmap, with_entropy=with_entropy,
                             with_loss=with_loss)
    local_target, cut = tp.local_target(target), None
    local = forward_sweep(tile, local_target, None, None, None, None, hp,
                          dataclasses.replace(lmap, min_p=None, top_k=None, top_p=None), with_entropy=with_entropy,
                          with_loss=False)
    if lmap.filtered:
        cut, local = selected_cuts(tp, tile, local, local_target, lmap, target >= 0)
    return tp.finish_rows(local, target, old, adv, g, ref, hp, with_entropy, with_loss)[0]._replace(cut=cut)


def fused_linear_sweeps(hidden, weight, bias, target, old, adv, g, ref, hp, lmap, chunk_rows,
                        with_entropy, need_dh, need_dw, need_db, tp=None, reduce_dhidden=True, n_valid=None,
                        entropy_coef=0.0, batch_invariant=False):
    """(loss, logp, entropy, psi, zeta, dhidden, dweight, dbias) from hidden (N, H), weight (V, H):
    the loss a 0-d fp32 sum of g_t · loss_t, the per-token fields (N,) fp32 (entropy None unless
    asked), the gradients for an upstream gradient of 1 (None unless asked; dweight and dbias in
    fp32, dhidden in hidden's dtype).

    ``tp``: a ``vocab_parallel.VocabSlice``; weight and bias are this rank's rows of the head, and
    ``target`` holds global ids. dhidden is then this rank's partial sum, all-reduced over the
    group unless ``reduce_dhidden`` is False (a caller whose sequence-parallel gather already
    reduces it, as Megatron's does).

    ``entropy_coef``: the loss is Σ g_t · (loss_t − entropy_coef · H_t); each tile's backward
    sweep takes ∂L/∂H_t = −entropy_coef · g_t with ∂L/∂logp_t (HAS_DENT), in the same pass.

    Without ``tp`` and the entropy bonus each tile takes one launch, the forward sweep that also
    writes the tile's gradient (``grad_in_forward``'s kernel); otherwise the two sweeps.
    ``batch_invariant``: every chunk is ``chunk_rows`` rows (``_whole_chunks``)."""
    forward_sweep, backward_sweep = _dispatch.sweeps(hidden.device, lmap.backend)
    bonus = entropy_coef > 0
    # One sweep per tile where the forward knows the whole gradient: with tp the slice's statistics
    # need the group's first, and the entropy bonus's term is the backward sweep's (HAS_DENT).
    one_sweep = tp is None and not bonus
    sweep_entropy = bool(with_entropy) or bonus
    n = hidden.shape[0]
    kept = _valid_rows(target, n_valid)
    hidden = _without_padding(hidden, target, n_valid)
    hidden, target, old, adv, g, ref = _gather_rows(kept, hidden, target, old, adv, g, ref)
    lmap = lmap if kept is None else lmap.rows(kept)
    m = hidden.shape[0]
    if batch_invariant:
        rows, lmap = _whole_chunks(chunk_rows, dict(hidden=(hidden, 0), target=(target, -1), old=(old, 0),
                                                    adv=(adv, 0), g=(g, 0), ref=(ref, 0)), lmap)
        hidden, target, old, adv, g, ref = rows.values()
    dh, dw, db = _grad_buffers(hidden, weight, need_dh, need_dw, need_db)
    parts = []
    for r0, r1, h_c, tile in _logits_tiles(hidden, weight, bias, chunk_rows):
        def rows(x):
            return None if x is None else x[r0:r1]

        lmap_c = lmap.rows(slice(r0, r1))
        need_grad = need_dh or need_dw or need_db
        if one_sweep and need_grad:
            # The upstream gradient is 1 by construction: the forward's launch turns the tile into
            # its gradient, each row re-read right after its statistics (no second sweep).
            stats = forward_sweep(tile, rows(target), rows(old), rows(adv), rows(g), rows(ref), hp, lmap_c,
                                  with_entropy=sweep_entropy, with_loss=True, grad=tile)
            parts.append(stats)
            _fold_tile_grad(tile[0], h_c, weight, rows(dh), dw, db)
            continue
        stats = _chunk_stats(forward_sweep, tile, rows(target), rows(old), rows(adv), rows(g), rows(ref), hp,
                             lmap_c, sweep_entropy, True, tp)
        if bonus:
            dentropy = rows(g) * -entropy_coef
            stats = stats._replace(loss=stats.loss + dentropy * stats.entropy)
        parts.append(stats)
        if not need_grad:
            continue
        # The tile becomes ∂L/∂logits for an upstream gradient of 1 (this rank's columns with tp).
        tile_target = rows(target) if tp is None else tp.local_target(rows(target))
        backward_sweep(tile, tile, tile_target, stats.lse2_base, stats.lse2_rest, stats.coef,
                       stats.entropy if bonus else None, dentropy if bonus else None, lmap_c)
        _fold_tile_grad(tile[0], h_c, weight, rows(dh), dw, db)
    if parts:
        stats = RowStats(*(None if f[0] is None else torch.cat(f)[:m] for f in zip(*parts)))
    else:  # no tokens
        stats = RowStats.empty(0, hidden.device, with_entropy=sweep_entropy, with_loss=True)
    if not with_entropy:
        stats = stats._replace(entropy=None)
    if tp is not None and need_dh and reduce_dhidden:
        torch.distributed.all_reduce(dh, group=tp.group)
    dh = None if dh is None else dh[:m]
    logp, entropy, psi, zeta, dh = (_scatter_rows(x, kept, n) for x in
                                    (stats.logp, stats.entropy, stats.psi, stats.zeta, dh))
    return stats.loss.sum(), logp, entropy, psi, zeta, dh, dw, db


def _grad_buffers(hidden, weight, need_dh, need_dw, need_db):
    """dhidden (hidden's dtype, every row written), dweight and dbias (fp32 accumulators, zeroed)."""
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_db else None
    return dh, dw, db


def _fold_tile_grad(grad, h_c, weight, dh_rows, dw, db):
    """A chunk's ∂L/∂logits (rows, V) into its dhidden rows and the dweight, dbias sums: 2 GEMMs."""
    if dh_rows is not None:
        torch.mm(grad, weight, out=dh_rows)
    if dw is not None:
        _addmm_fp32(dw, grad.t(), h_c)
    if db is not None:
        db += grad.sum(0, dtype=torch.float32)


def token_logprobs_sweeps(hidden, weight, bias, target, lmap, chunk_rows, with_entropy, tp=None, n_valid=None,
                          batch_invariant=False):
    """(logp, entropy or None, base, lse2_rest, cut or None), each (N,) fp32, chunk by chunk (1 GEMM
    each): the last three are the rows' log-sum-exp statistics (global ones with ``tp``) and, for
    a truncated softmax, the kept set's thresholds, which is all that ``token_logprobs_grads``
    needs besides the inputs. ``n_valid`` and ``batch_invariant`` as in ``fused_linear_sweeps``."""
    forward_sweep, _ = _dispatch.sweeps(hidden.device, lmap.backend)
    n = hidden.shape[0]
    kept = _valid_rows(target, n_valid)
    hidden, target = _gather_rows(kept, _without_padding(hidden, target, n_valid), target)
    lmap = lmap if kept is None else lmap.rows(kept)
    m = hidden.shape[0]
    if batch_invariant:
        rows, lmap = _whole_chunks(chunk_rows, dict(hidden=(hidden, 0), target=(target, -1)), lmap)
        hidden, target = rows.values()
    logp, base, lse2_rest = (torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
                            for _ in range(3))
    entropy = torch.empty_like(logp) if with_entropy else None
    cut = torch.empty_like(logp) if lmap.filtered else None
    for r0, r1, _, tile in _logits_tiles(hidden, weight, bias, chunk_rows):
        stats = _chunk_stats(forward_sweep, tile, target[r0:r1], None, None, None, None, mhpo_token_params(),
                             lmap.rows(slice(r0, r1)), with_entropy, False, tp)
        logp[r0:r1], base[r0:r1], lse2_rest[r0:r1] = stats.logp, stats.lse2_base, stats.lse2_rest
        if with_entropy:
            entropy[r0:r1] = stats.entropy
        if cut is not None:
            cut[r0:r1] = stats.cut
    return tuple(_scatter_rows(None if x is None else x[:m], kept, n) for x in (logp, entropy, base, lse2_rest, cut))


def token_logprobs_grads(hidden, weight, bias, target, lmap, chunk_rows, base, lse2_rest, entropy, dlogp,
                         dentropy, need_dh, need_dw, need_db, tp=None, reduce_dhidden=True, n_valid=None,
                         batch_invariant=False, grad_target=None):
    """The backward of ``token_logprobs_sweeps``: (dhidden, dweight, dbias) (fp32 accumulators for
    the last two; None where not needed) for the upstream gradients ``dlogp`` and ``dentropy``
    ((N,) fp32; ``dentropy`` None when the entropy got none). Per chunk of valid tokens the tile
    is recomputed (1 GEMM), sweep 2 turns it into ∂L/∂logits in place and 2 GEMMs fold it. With
    ``tp`` the tile holds this rank's columns and ``base``/``lse2_rest``/``entropy`` are the global
    statistics, so the tile's gradient is this rank's slice of the full one: the only collective
    is dhidden's all-reduce (unless ``reduce_dhidden`` is False). ``grad_target``: ``target``
    with −1 at the tokens that pass no gradient at all (SPEC.md, section 9): their logits are not
    read and their hidden rows enter dweight's GEMM as zeros, so that nothing they hold (a NaN)
    reaches it as 0 · NaN."""
    _, backward_sweep = _dispatch.sweeps(hidden.device, lmap.backend)
    n = hidden.shape[0]
    kept = _valid_rows(target, n_valid)
    hidden, target, base, lse2_rest, entropy, dlogp, dentropy = _gather_rows(
        kept, _without_padding(hidden, target, n_valid), target if grad_target is None else grad_target, base,
        lse2_rest, entropy, dlogp, dentropy)
    lmap = lmap if kept is None else lmap.rows(kept)
    m = hidden.shape[0]
    if batch_invariant:
        padded, lmap = _whole_chunks(chunk_rows, dict(
            hidden=(hidden, 0), target=(target, -1), base=(base, 0), lse2_rest=(lse2_rest, 0), entropy=(entropy, 0),
            dlogp=(dlogp, 0), dentropy=(dentropy, 0)), lmap)
        hidden, target, base, lse2_rest, entropy, dlogp, dentropy = padded.values()
    dh, dw, db = _grad_buffers(hidden, weight, need_dh, need_dw, need_db)
    for r0, r1, h_c, tile in _logits_tiles(hidden, weight, bias, chunk_rows):
        def rows(x):
            return None if x is None else x[r0:r1]

        tile_target = rows(target) if tp is None else tp.local_target(rows(target))
        backward_sweep(tile, tile, tile_target, rows(base), rows(lse2_rest), rows(dlogp).contiguous(),
                       rows(entropy), rows(dentropy), lmap.rows(slice(r0, r1)))
        if grad_target is not None and dw is not None:   # the chunk's rows that pass no gradient
            h_c = h_c.masked_fill(rows(target).unsqueeze(-1) < 0, 0)
        _fold_tile_grad(tile[0], h_c, weight, rows(dh), dw, db)
    if tp is not None and need_dh and reduce_dhidden:
        torch.distributed.all_reduce(dh, group=tp.group)
    return _scatter_rows(None if dh is None else dh[:m], kept, n), dw, db
