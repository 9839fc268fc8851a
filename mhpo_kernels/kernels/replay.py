"""Replay: the softmax truncated to a kept set that the sampler hands over (SPEC.md, section 9),
as CSR over the N token rows: row r keeps ``ids[start[r]:end[r]]`` (``LogitMap.kept_start``,
``kept_end``: the offsets' two views, or a subset of the rows); an empty row is not truncated. The kept set is given, so nothing is selected: sweep 1 gathers the row's kept
logits alone, and sweep 2 writes their gradient elements alone.

Around the two sweeps of the other rows (forward.py, backward.py), which see the replayed rows as
invalid tokens (target −1: nothing read, a zero gradient row written):

    forward    the sweep, then ``_replay_fwd_kernel``: the replayed rows' statistics, over their
               kept logits, in the same (b, log2 s) form (forward.py), so everything after the
               sweep (the epilogue, the finalize launch) is the same;
    backward   ``_replay_bwd_kernel`` with GATHER: each kept element's gradient into a (K,) fp32
               buffer, read before anything is written (the gradient may be the logits), then the
               sweep (the zero rows), then with SCATTER the buffer into the rows at the kept ids.

The per-element math is sweep 1's and sweep 2's (logit_map.py, backward.py), over the kept ids
instead of the vocabulary blocks. A logit outside the kept set is never read: a NaN there does
not reach the row (it does in a row a filter truncates, whose threshold reads every logit).
"""

import torch
import triton
import triton.language as tl

from .._config import FP_FUSION, on_device
from .backward import _grad_block
from .logit_map import LN2, _logit_slope, _logit_u
from .rows import FLOOR, _combine, _max_nan, _rebased, _row_offset

BLOCK_K = 128   # kept ids per step: a top-k set in one or two, a top-p set of thousands in a loop
NUM_WARPS = 4


@triton.jit
def _kept_ids(p_ids, j, end, V, BLOCK: tl.constexpr):
    """A step of kept ids [j, j + BLOCK) ∩ [j, end): (the ids, which are in range and this
    slice's: an id < 0 is another slice's (vocab_parallel.py), and one ≥ V, which validation
    refuses, is never an address)."""
    o_j = j + tl.arange(0, BLOCK)
    b_v = tl.load(p_ids + o_j, mask=o_j < end, other=-1)
    return b_v, (b_v >= 0) & (b_v < V)


@triton.jit
def _kept_step(p_row, p_ids, j, end, V, BLOCK: tl.constexpr):
    """``_kept_ids`` and their logits."""
    b_v, m_j = _kept_ids(p_ids, j, end, V, BLOCK)
    return b_v, m_j, tl.load(p_row + b_v, mask=m_j, other=0.0).to(tl.float32)


@triton.jit
def _replayed_row(p_y, p_start, p_end, row):
    """(y, start, end) of a row; ``replayed``: a valid token whose kept set is not empty."""
    y = tl.load(p_y + row)
    start = tl.load(p_start + row).to(tl.int64)
    end = tl.load(p_end + row).to(tl.int64)
    return y, start, end, (y >= 0) & (end > start)


@triton.jit
def _has_target(p_ids, y, start, end, BLOCK: tl.constexpr):
    """Whether id y is in the kept ids [start, end): per lane in the loop, across lanes once."""
    seen = tl.zeros([BLOCK], tl.int32)
    for j in range(start, end, BLOCK):
        o_j = j + tl.arange(0, BLOCK)
        seen |= (tl.load(p_ids + o_j, mask=o_j < end, other=-1) == y).to(tl.int32)
    return tl.max(seen, 0) > 0


# As the sweeps (rows.py): nothing that moves with the batch, nor the alignment of a per-token
# tensor, is in the specialization key.
REPLAY_INTS = ("T", "V", "stride_xb", "stride_xt", "stride_db", "stride_dt")
REPLAY_POINTERS = ("p_y", "p_start", "p_end", "p_ids", "p_tau", "p_g", "p_lse2_base", "p_lse2_rest", "p_logp", "p_ent",
                   "p_dlogp", "p_dent")


@triton.jit(do_not_specialize=REPLAY_INTS, do_not_specialize_on_alignment=REPLAY_POINTERS)
def _replay_fwd_kernel(
    p_x, stride_xb: tl.int64, stride_xt: tl.int64,   # logits (B, T, V), unit stride along V
    p_y, p_start, p_end, p_ids,                       # (N,) int32 targets; row r keeps ids[start[r]:end[r]]
    p_tau,                                            # (N,) fp32 τ_t (HAS_TAU)
    p_lse2_base, p_lse2_rest, p_logp, p_ent,          # (N,) fp32 outputs, written at replayed rows only
    T, V, k, tanh_scale,
    SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, HAS_TAU: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    y, start, end, replayed = _replayed_row(p_y, p_start, p_end, row)
    if replayed:
        if HAS_TAU:
            k = k / tl.load(p_tau + row)
        p_row = p_x + _row_offset(row, T, stride_xb, stride_xt, False, 1)
        # Per lane, one kept id per step: forward.py's online log-sum-exp, c = fp32(k · max u) of
        # what the lane read, s = Σ 2^d, a = Σ 2^d · d, d = fma(u, k, −c); the lanes combined
        # once, after the loop (rows._combine). A NaN reaches s (SPEC.md, section 5).
        c = tl.full([BLOCK], FLOOR, tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        a = tl.zeros([BLOCK], tl.float32)
        seen = tl.zeros([BLOCK], tl.int32)
        for j in range(start, end, BLOCK):
            b_v, m_j, b_x = _kept_step(p_row, p_ids, j, end, V, BLOCK)
            b_u = tl.where(m_j, _logit_u(b_x, tanh_scale, SOFTCAP), float("-inf"))
            c_new = _max_nan(c, b_u * k)
            s, a = _rebased(c, s, a, c_new, WITH_ENTROPY)
            b_d = tl.fma(b_u, k, -c_new)
            b_e = tl.exp2(b_d)
            if WITH_ENTROPY:  # 2^d · d is 0, not NaN, at d = −inf
                a += tl.where(b_e > 0.0, b_e * b_d, b_e * 0.0)
            s += b_e
            c = c_new
            seen |= (m_j & (b_v == y)).to(tl.int32)
        c, s, a = _combine(c, s, a, WITH_ENTROPY)
        log2_s = tl.log2(s)
        # y ≥ V: the target is another slice's (vocab_parallel.py): its rank's log-prob is the one
        # merged, this rank's is not read
        u_y = _logit_u(tl.load(p_row + y, mask=y < V, other=0.0).to(tl.float32), tanh_scale, SOFTCAP)
        logp = (tl.fma(u_y, k, -c) - log2_s) * LN2
        logp = tl.where(tl.max(seen, 0) > 0, logp, float("-inf"))
        tl.store(p_lse2_base + row, c)
        tl.store(p_lse2_rest + row, log2_s)
        tl.store(p_logp + row, logp)
        if WITH_ENTROPY:  # H = ln 2 · (log2 s − a / s)
            tl.store(p_ent + row, (log2_s - a / s) * LN2)


@triton.jit(do_not_specialize=REPLAY_INTS, do_not_specialize_on_alignment=REPLAY_POINTERS)
def _replay_bwd_kernel(
    p_x, stride_xb: tl.int64, stride_xt: tl.int64,   # logits (B, T, V) (GATHER)
    p_dx, stride_db: tl.int64, stride_dt: tl.int64,  # gradient (B, T, V) (SCATTER)
    p_y, p_start, p_end, p_ids,                       # as in the forward
    p_g,                                              # (K,) fp32: each kept element's gradient
    p_lse2_base, p_lse2_rest, p_dlogp, p_ent, p_dent, p_tau,
    T, V, k, tanh_scale, slope,
    GATHER: tl.constexpr, SOFTCAP: tl.constexpr, HAS_DENT: tl.constexpr, HAS_TAU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    y, start, end, replayed = _replayed_row(p_y, p_start, p_end, row)
    if replayed:
        if GATHER:  # backward.py's derivation, over the kept elements; the one-hot term at v = y
            if HAS_TAU:
                tau = tl.load(p_tau + row)
                k = k / tau
                slope = slope / tau
            p_row = p_x + _row_offset(row, T, stride_xb, stride_xt, False, 1)
            base = tl.load(p_lse2_base + row)
            log2_s = tl.load(p_lse2_rest + row)
            u_y = _logit_u(tl.load(p_row + y, mask=y < V, other=0.0).to(tl.float32), tanh_scale, SOFTCAP)
            # A target outside the kept set (not in it, or at d = −inf, which no kept set holds):
            # no log-prob gradient (SPEC.md, section 9); where the entropy gets none either, none
            # at all: the row's kept elements take 0 unread (a NaN there would give 0 · NaN).
            # Another slice's target (y ≥ V): its rank decides, and the caller passed −1 or
            # zeroed dlogp if outside.
            d_y = tl.fma(u_y, k, -base)
            inside = (y >= V) | (_has_target(p_ids, y, start, end, BLOCK) & (d_y != float("-inf")))
            read = inside
            if HAS_DENT:  # the entropy's gradient needs the row whatever the log-prob's: read every one
                read = replayed
            dlogp = tl.where(inside, tl.load(p_dlogp + row), 0.0)
            g_y = _logit_slope(u_y, dlogp * slope, SOFTCAP)  # the one-hot term
            if HAS_DENT:
                dent = tl.load(p_dent + row)
                a0 = -(dlogp + dent * tl.load(p_ent + row)) * slope
                a1 = -dent * LN2 * slope
            else:
                a0 = -dlogp * slope
                a1 = 0.0
            for j in range(start, end, BLOCK):
                b_v, m_j = _kept_ids(p_ids, j, end, V, BLOCK)
                b_x = tl.load(p_row + b_v, mask=tl.where(read, m_j, False), other=0.0).to(tl.float32)
                b_g = _grad_block(b_x, k, base, log2_s, a0, a1, tanh_scale, 0.0, SOFTCAP, HAS_DENT, False)
                b_g += tl.where(b_v == y, g_y, 0.0)
                tl.store(p_g + j + tl.arange(0, BLOCK), tl.where(read, b_g, 0.0), mask=m_j)
        else:
            p_drow = p_dx + _row_offset(row, T, stride_db, stride_dt, False, 1)
            for j in range(start, end, BLOCK):
                b_v, m_j = _kept_ids(p_ids, j, end, V, BLOCK)
                b_g = tl.load(p_g + j + tl.arange(0, BLOCK), mask=m_j, other=0.0)
                tl.store(p_drow + b_v, b_g.to(p_drow.dtype.element_ty), mask=m_j)


def unreplayed(target, lmap):
    """The targets the sweeps over whole rows get: −1 (no token) at the replayed rows."""
    return torch.where(lmap.kept_end > lmap.kept_start, -1, target)


def replay_fwd(logits, target, lmap, out, with_entropy):
    """The replayed rows' ``RowStats`` fields (``out``, written in place) from their kept logits."""
    N = target.numel()
    if N == 0:
        return
    with on_device(logits.device):
        _replay_fwd_kernel[(N,)](
            logits, logits.stride(0), logits.stride(1),
            target, lmap.kept_start, lmap.kept_end, lmap.kept_ids,
            lmap.tau, out.lse2_base, out.lse2_rest, out.logp, out.entropy if with_entropy else None,
            logits.shape[1], logits.shape[2], lmap.log2_scale, lmap.tanh_scale,
            SOFTCAP=lmap.softcap, WITH_ENTROPY=with_entropy, HAS_TAU=lmap.tau is not None, BLOCK=BLOCK_K,
            num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
        )


def replay_bwd(logits, grad, target, base, lse2_rest, dlogp, entropy, dentropy, lmap, gather, kept_grad):
    """With ``gather``: each kept element's gradient into ``kept_grad`` (K,) fp32; without: those
    values into ``grad`` at the kept ids (after the sweep wrote the replayed rows' zeros)."""
    N = target.numel()
    if N == 0:
        return
    has_dent = dentropy is not None
    with on_device(logits.device):
        _replay_bwd_kernel[(N,)](
            logits, logits.stride(0), logits.stride(1),
            grad, grad.stride(0), grad.stride(1),
            target, lmap.kept_start, lmap.kept_end, lmap.kept_ids, kept_grad,
            base, lse2_rest, dlogp, entropy if has_dent else None, dentropy, lmap.tau,
            logits.shape[1], logits.shape[2], lmap.log2_scale, lmap.tanh_scale, lmap.slope,
            GATHER=gather, SOFTCAP=lmap.softcap, HAS_DENT=has_dent, HAS_TAU=lmap.tau is not None, BLOCK=BLOCK_K,
            num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
        )
