"""Sweep 2: per row, one more read of the logits and one write of their gradient."""

import torch
import triton
import triton.language as tl

from .._config import FP_FUSION, launch_splits, on_device, split_length, sweep_config
from ..torch_sweeps import _zero_tail
from .logit_map import LN2, _logit_slope, _logit_u
from .rows import (BATCH_INTS, PER_TOKEN_POINTERS, _block_base, _block_offsets, _row_lead, _row_offset,
                   _tail_offset, _row_target, rows_aligned)

# Derivation. With z the logit the softmax sees, p = softmax(z) and ln p_v = z_v − lse:
#
#   logp = z_y − lse                     ∂logp/∂z_v = [v = y] − p_v
#   H    = −Σ_u p_u ln p_u               ∂H/∂z_v    = −p_v (ln p_v + H)
#
# The forward saved per row the base b and log2 s, so q_v = log2 p_v = fma(u_v, k, −b) − log2 s
# is formed from the logit's own exponent (see logit_map.py), and H. The loss, or the caller of
# token_logprobs, hands back dlogp = ∂L/∂logp (for MHPO: G · g_t · coef_t) and dH = ∂L/∂H:
#
#   ∂L/∂x_v = dz_v/dx_v · ( dlogp · ([v = y] − p_v)  −  dH · p_v (ln 2 · q_v + H) )
#           = p_v · (a0 + a1 · q_v) · σ_v  +  [v = y] · dlogp · dz_y/dx_y
#
# with a0 = −(dlogp + dH · H) · s/τ, a1 = −dH · ln 2 · s/τ, and σ_v = dz_v/dx_v / (s/τ): 1, or
# 1 − u_v² with softcap. The loop writes the first term for every v; the one-hot term is added at
# v = y once, after the loop, so the loop compares no indices. A zero-probability entry (q = −inf)
# adds nothing to the entropy term (p log p → 0): q is clamped to a finite floor first.
#
# A softmax truncated to a kept set K (d_v = k·u_v − b ≥ cut, the threshold the forward found and
# stored per row) is the same softmax over K: p_v is 0 outside K, where the loop writes 0, and a
# target outside K has no log-prob gradient (its dlogp is taken as 0; its entropy's gradient is
# still the row's).

Q_FLOOR = tl.constexpr(-256.0)  # 2^q is already 0 in fp32 below −150


@triton.jit
def _grad_block(b_x, k, base, log2_s, a0, a1, tanh_scale, cut,
                SOFTCAP: tl.constexpr, HAS_DENT: tl.constexpr, CUT: tl.constexpr):
    """The loop's term p · (a0 + a1 · q) · σ for a block (or one element) of raw logits; with
    ``CUT``, 0 where d < ``cut`` (outside the kept set; NaN stays)."""
    b_u = _logit_u(b_x, tanh_scale, SOFTCAP)
    b_d = tl.fma(b_u, k, -base)
    b_q = b_d - log2_s
    b_p = tl.exp2(b_q)
    if CUT:
        b_p = tl.where(b_d < cut, 0.0, b_p)
    if HAS_DENT:
        b_q = tl.maximum(b_q, Q_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        b_g = b_p * (a0 + a1 * b_q)
    else:
        b_g = b_p * a0
    return b_g * _logit_slope(b_u, 1.0, SOFTCAP)


@triton.jit
def _grad_step(p_blk, p_dblk, v0, o_blk, lo, hi, k, base, log2_s, a0, a1, tanh_scale, cut,
               MASKED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_DENT: tl.constexpr, EVICT: tl.constexpr,
               CUT: tl.constexpr):
    """One block of the loop's term, read from the logits and written to the gradient at the same
    offsets from their block bases (rows.py), where the row is [lo, hi): each element is read and
    then written by the same lane, so the gradient may be the logits themselves. ``EVICT``: the
    loads' eviction policy ("evict_first" where the row is read for the last time while the
    forward's read of it may still be in L2)."""
    o_v = v0 + o_blk
    if MASKED:
        m_v = (o_v >= lo) & (o_v < hi)
        b_x = tl.load(p_blk + o_v, mask=m_v, other=0.0, eviction_policy=EVICT).to(tl.float32)
    else:
        b_x = tl.load(p_blk + o_v, eviction_policy=EVICT).to(tl.float32)
    b_g = _grad_block(b_x, k, base, log2_s, a0, a1, tanh_scale, cut, SOFTCAP, HAS_DENT, CUT)
    if MASKED:
        tl.store(p_dblk + o_v, b_g.to(p_dblk.dtype.element_ty), mask=m_v)
    else:
        tl.store(p_dblk + o_v, b_g.to(p_dblk.dtype.element_ty))


@triton.jit
def _grad_row(p_row, p_blk, p_drow, p_dblk, o_blk, lead, n_end, b0, b1, x_y, y, has_y, k, slope, base, log2_s,
              dlogp, ent, dent, tanh_scale, cut,
              SOFTCAP: tl.constexpr, HAS_DENT: tl.constexpr, EVICT: tl.constexpr, CUT: tl.constexpr,
              R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """The gradient of a valid token's row, [lead, n_end) from the block bases, over its blocks
    [b0, b1) (the whole row, or one split: b0 a multiple of BLOCK_V), from the row's statistics
    (the row constants k and slope are the row's own, τ_t applied): the loop's term, then the
    one-hot term at y where ``has_y`` (y in these blocks). ``x_y``: the target logit, read before
    any of the row was written. ``CUT``: the softmax truncated to d ≥ ``cut``."""
    BLOCK_V: tl.constexpr = R * LANES * VEC
    n_full = b1 // BLOCK_V * BLOCK_V
    if CUT:  # a target outside the kept set: no log-prob gradient (SPEC.md, section 9); one on another
        # vocabulary slice (not has_y) is that slice's to judge (vocab_parallel.py)
        dlogp = tl.where(has_y & (tl.fma(_logit_u(x_y, tanh_scale, SOFTCAP), k, -base) < cut), 0.0, dlogp)
    if HAS_DENT:
        a0 = -(dlogp + dent * ent) * slope
        a1 = -dent * LN2 * slope
    else:
        a0 = -dlogp * slope
        a1 = 0.0
    # With p_dx = p_x (gradient in place) the loop overwrites the row, and the lane that writes y
    # may be in another warp: every lane waits until every lane has read x_y.
    tl.debug_barrier()
    _grad_step(p_blk, p_dblk, b0, o_blk, lead, n_end, k, base, log2_s, a0, a1, tanh_scale, cut,
               True, SOFTCAP, HAS_DENT, EVICT, CUT)
    for v0 in range(b0 + BLOCK_V, n_full, BLOCK_V):
        _grad_step(p_blk, p_dblk, v0, o_blk, lead, n_end, k, base, log2_s, a0, a1, tanh_scale, cut,
                   False, SOFTCAP, HAS_DENT, EVICT, CUT)
    if (n_full > b0) & (n_full < b1):
        _grad_step(p_blk, p_dblk, n_full, o_blk, lead, n_end, k, base, log2_s, a0, a1, tanh_scale, cut,
                   True, SOFTCAP, HAS_DENT, EVICT, CUT)
    # The one-hot term at v = y, over the value the loop wrote there: every lane's store
    # must land first.
    g_y = _grad_block(x_y, k, base, log2_s, a0, a1, tanh_scale, cut, SOFTCAP, HAS_DENT, CUT)
    g_y += _logit_slope(_logit_u(x_y, tanh_scale, SOFTCAP), dlogp * slope, SOFTCAP)
    tl.debug_barrier()
    tl.store(p_drow + y, g_y.to(p_drow.dtype.element_ty), mask=has_y)


@triton.jit
def _zero_row(p_dblk, o_blk, lead, n_end, b0, b1, R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """A row without a valid token, over its blocks [b0, b1) as in ``_grad_row``: zeros, and
    nothing read or computed per element."""
    BLOCK_V: tl.constexpr = R * LANES * VEC
    n_full = b1 // BLOCK_V * BLOCK_V
    zero = tl.zeros([R * LANES, VEC], dtype=p_dblk.dtype.element_ty)
    o_v = b0 + o_blk
    tl.store(p_dblk + o_v, zero, mask=(o_v >= lead) & (o_v < n_end))
    for v0 in range(b0 + BLOCK_V, n_full, BLOCK_V):
        tl.store(p_dblk + v0 + o_blk, zero)
    if (n_full > b0) & (n_full < b1):
        o_v = n_full + o_blk
        tl.store(p_dblk + o_v, zero, mask=o_v < n_end)


@triton.jit(do_not_specialize=BATCH_INTS, do_not_specialize_on_alignment=PER_TOKEN_POINTERS)
def _mhpo_bwd_kernel(
    p_x, stride_xb: tl.int64, stride_xt: tl.int64,  # logits (B, T, V), unit stride along V
    p_dx, stride_db: tl.int64, stride_dt: tl.int64,  # gradient (B, T, V), unit stride along V
    p_y, p_lse2_base, p_lse2_rest,                         # (N,) int32 ids (< 0 invalid, ≥ V elsewhere), b, log2 s
    p_dlogp, p_ent, p_dent,                      # (N,) fp32 ∂L/∂logp, H, ∂L/∂H
    p_tau,                                       # (N,) fp32 per-token temperature τ_t (HAS_TAU)
    p_cut,                                       # (N,) fp32 the forward's kept-set threshold, −inf none (CUT)
    split_len,                                   # elements (whole blocks) per program of a row (SPLIT)
    N, T, V,                                     # rows ≥ N: the zero rows after each sequence (rows._tail_offset)
    k, tanh_scale, slope,                        # logit map, see logit_map.py (τ = 1 with HAS_TAU)
    SOFTCAP: tl.constexpr,
    HAS_DENT: tl.constexpr,
    HAS_TAU: tl.constexpr,
    CUT: tl.constexpr,                           # the softmax truncated to d ≥ cut (forward.py)
    DX_IN_PHASE: tl.constexpr,                   # every gradient row starts where its logits row does, mod VEC
    SPLIT: tl.constexpr,                         # grid (N, splits): program (r, j) writes split j of row r
    ROWS_ALIGNED: tl.constexpr,                  # both logits strides multiples of VEC (rows.rows_aligned)
    R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0)
    y, valid, has_y, _ = _row_target(p_y, row, N, V)
    o_blk = _block_offsets(R, LANES, VEC)
    off = _row_offset(row, T, stride_xb, stride_xt, ROWS_ALIGNED, VEC)
    d_off = _row_offset(row, T, stride_db, stride_dt, ROWS_ALIGNED and DX_IN_PHASE, VEC)
    p_row = p_x + off
    p_drow = p_dx + d_off
    # Both rows are walked in the logits' blocks (see forward.py): [lead, n_end) from each block
    # base. The gradient's stores are vectors too when its rows share the logits' lead (always in
    # place, and for any two tensors of the same strides); otherwise only the loads are.
    lead = _row_lead(off, VEC)
    p_blk = _block_base(p_x, off, lead, True, VEC)
    p_dblk = _block_base(p_dx, d_off, lead, DX_IN_PHASE, VEC)
    n_end = lead + V
    if SPLIT:
        b0 = tl.multiple_of(tl.program_id(1) * split_len, R * LANES * VEC)
        b1 = tl.minimum(b0 + split_len, n_end)
        has_y = has_y & (lead + y >= b0) & (lead + y < b1)   # the one-hot term is this split's
    else:
        b0 = 0
        b1 = n_end

    if valid:
        if HAS_TAU:  # per row, as in the forward: k and the slope s/τ_t are row constants
            tau = tl.load(p_tau + row)
            k = k / tau
            slope = slope / tau
        base = tl.load(p_lse2_base + row)
        log2_s = tl.load(p_lse2_rest + row)
        dlogp = tl.load(p_dlogp + row)
        if HAS_DENT:
            dent = tl.load(p_dent + row)
            ent = tl.load(p_ent + row)
        else:
            dent = 0.0
            ent = 0.0
        x_y = tl.load(p_row + y, mask=has_y, other=0.0).to(tl.float32)
        cut = tl.load(p_cut + row) if CUT else float("-inf")
        _grad_row(p_row, p_blk, p_drow, p_dblk, o_blk, lead, n_end, b0, b1, x_y, y, has_y, k, slope, base,
                  log2_s, dlogp, ent, dent, tanh_scale, cut, SOFTCAP, HAS_DENT, "", CUT, R, LANES, VEC)
    else:
        if row >= N:  # past the N tokens: the shift's zero rows, at their own offsets (rows._tail_offset)
            lead = _row_lead(_tail_offset(row, N, T, stride_xb, stride_xt), VEC)
            p_dblk = _block_base(p_dx, _tail_offset(row, N, T, stride_db, stride_dt), lead, DX_IN_PHASE, VEC)
            n_end = lead + V
            b1 = tl.minimum(b0 + split_len, n_end) if SPLIT else n_end
        _zero_row(p_dblk, o_blk, lead, n_end, b0, b1, R, LANES, VEC)


@triton.jit
def _scale_step(p_blk, v0, o_blk, lo, hi, scale, MASKED: tl.constexpr):
    """One block of a row times ``scale``, in place, at offsets from the row's block base where
    the row is [lo, hi) (as ``_grad_step``)."""
    o_v = v0 + o_blk
    if MASKED:
        m_v = (o_v >= lo) & (o_v < hi)
        b_x = tl.load(p_blk + o_v, mask=m_v, other=0.0).to(tl.float32)
        tl.store(p_blk + o_v, (b_x * scale).to(p_blk.dtype.element_ty), mask=m_v)
    else:
        b_x = tl.load(p_blk + o_v).to(tl.float32)
        tl.store(p_blk + o_v, (b_x * scale).to(p_blk.dtype.element_ty))


@triton.jit(do_not_specialize=BATCH_INTS, do_not_specialize_on_alignment=PER_TOKEN_POINTERS)
def _scale_rows_kernel(p_dx, stride_db: tl.int64, stride_dt: tl.int64, p_y, p_upstream, expected, T, V,
                       ROWS_ALIGNED: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """The gradient rows of the valid tokens, computed for an upstream gradient ``expected``,
    times upstream / expected, the 0-d upstream read on the device: when it is the one expected,
    nothing is touched at all, so handing the gradient back costs nothing logits-sized (invalid
    tokens' rows are zero and stay so, whatever the scale). Rows are walked as the sweeps walk
    them (rows.py): 16-byte vectors at any V and stride."""
    BLOCK_V: tl.constexpr = R * LANES * VEC
    row = tl.program_id(0)
    upstream = tl.load(p_upstream).to(tl.float32)
    scale = upstream / expected
    if (upstream != expected) & (tl.load(p_y + row) >= 0):
        off = _row_offset(row, T, stride_db, stride_dt, ROWS_ALIGNED, VEC)
        lead = _row_lead(off, VEC)
        p_blk = _block_base(p_dx, off, lead, True, VEC)
        o_blk = _block_offsets(R, LANES, VEC)
        n_end = lead + V
        n_full = n_end // BLOCK_V * BLOCK_V
        _scale_step(p_blk, 0, o_blk, lead, n_end, scale, True)
        for v0 in range(BLOCK_V, n_full, BLOCK_V):
            _scale_step(p_blk, v0, o_blk, lead, n_end, scale, False)
        if (n_full > 0) & (n_full < n_end):
            _scale_step(p_blk, n_full, o_blk, lead, n_end, scale, True)


def scale_rows_(grad, target, upstream, expected=1.0):
    """grad (B, T, V), computed for an upstream gradient ``expected``, times the 0-d ``upstream``
    / ``expected`` in place, at the rows of valid tokens (``target`` (B·T,) int32 ≥ 0); nothing
    at all when the upstream is the one expected."""
    B, T, V = grad.shape
    if B * T == 0:
        return grad
    assert grad.stride(-1) == 1 and target.is_contiguous() and upstream.dim() == 0
    cfg = sweep_config(V, grad.element_size())
    with on_device(grad.device):
        _scale_rows_kernel[(B * T,)](grad, grad.stride(0), grad.stride(1), target, upstream, float(expected), T, V,
                                     ROWS_ALIGNED=rows_aligned(grad, cfg.vec), R=cfg.r, LANES=cfg.lanes,
                                     VEC=cfg.vec, num_warps=cfg.num_warps)
    return grad


def _in_phase(logits, grad, vec, zero_tail=False):
    """Whether every gradient row starts at the same element offset mod ``vec`` as its logits row
    (host metadata only: the kernel's claim that lets it store 16-byte vectors). ``zero_tail``:
    the rows at position T count too (at T·stride_t, so that stride counts even when T = 1)."""
    B, T, _ = logits.shape
    return all((sx - sd) % vec == 0 for sx, sd, n in zip(logits.stride()[:2], grad.stride()[:2], (B, T + zero_tail))
               if n > 1)


def mhpo_bwd(logits, grad, target, base, lse2_rest, dlogp, entropy, dentropy, lmap, zero_tail=False):
    """Launch sweep 2: write ∂L/∂logits into ``grad`` (B, T, V, unit stride along V); ``grad``
    may be ``logits`` itself (each element is read before it is written, by the same lane). Rows
    too few to fill the GPU are split over several programs each (``_config.launch_splits``).
    ``zero_tail``: ``logits`` and ``grad`` are the first T positions of (B, T + 1, V) tensors (the
    next-token shift), and position T of each sequence gets a zero row too."""
    B, T, V = logits.shape
    N = B * T
    if N == 0:  # no token rows (their empty view may have no address): the shift's zero rows alone
        if zero_tail:
            _zero_tail(grad)
        return grad
    tail = B if zero_tail else 0
    per_token = (target, base, lse2_rest, dlogp, entropy, dentropy, lmap.tau, lmap.cut)
    assert all(x is None or x.is_contiguous() for x in per_token), "per-token inputs must be flat"
    assert grad.stride(-1) == 1 and grad.dtype == logits.dtype and target.dtype == torch.int32
    cfg = sweep_config(V, logits.element_size())
    has_dent = dentropy is not None
    replayed = {}
    if lmap.replayed:  # replay.py: the kept elements' gradients first (in place, the sweep zeroes the rows)
        from .replay import replay_bwd, unreplayed  # it builds on this module's _grad_block

        replayed = dict(target=target, base=base, lse2_rest=lse2_rest, dlogp=dlogp, entropy=entropy,
                        dentropy=dentropy, lmap=lmap, kept_grad=torch.empty(lmap.kept_ids.numel(),
                                                                            dtype=torch.float32, device=grad.device))
        replay_bwd(logits, grad, gather=True, **replayed)
        target = unreplayed(target, lmap)
    # A truncated row is never split: each program decides from the target logit, read before any
    # write, whether the target is kept (another split may overwrite it when in place).
    splits = 1 if lmap.cut is not None else launch_splits(N, V, logits.element_size(), logits.device)
    grid = (N + tail,) if splits == 1 else (N + tail, splits)
    with on_device(logits.device):
        _mhpo_bwd_kernel[grid](
            logits, logits.stride(0), logits.stride(1),
            grad, grad.stride(0), grad.stride(1),
            target, base, lse2_rest, dlogp,
            entropy if has_dent else None, dentropy, lmap.tau, lmap.cut,
            split_length(V, cfg, splits),
            N, T, V,
            lmap.log2_scale, lmap.tanh_scale, lmap.slope,
            SOFTCAP=lmap.softcap,
            HAS_DENT=has_dent,
            HAS_TAU=lmap.tau is not None,
            CUT=lmap.cut is not None,
            DX_IN_PHASE=_in_phase(logits, grad, cfg.vec, zero_tail),
            SPLIT=splits > 1,
            ROWS_ALIGNED=rows_aligned(logits, cfg.vec),
            R=cfg.r, LANES=cfg.lanes, VEC=cfg.vec,
            num_warps=cfg.num_warps,
            enable_fp_fusion=FP_FUSION,
        )
    if replayed:
        replay_bwd(logits, grad, gather=False, **replayed)
    return grad
