"""The kept set of a truncated row (SPEC.md, section 9) as one threshold on its exponents
d = k·u − b (forward.py), found inside the forward sweep.

min_p has a closed form (``_cut``). top-k and top-p keep a token when the weight strictly above
it is below a goal: the count of tokens (goal k), or their probability mass (goal top_p times the
mass of what the earlier filters kept). The threshold is the smallest kept d, found by a radix
select over the bits of d: ``_key`` orders fp32 values as uint32 keys.

One pass (``_count_pass``) reads the row once and counts the candidate keys [klo, khi] in NB
bins of 2^shift consecutive keys (``tl.histogram``), and sums exactly the mass above khi and the
mass within [klo, khi]. From the counts a bin's weight is exact (top-k) or bounded by the mass
of its lowest and highest key (top-p), so every bin is surely kept (even its upper bound leaves
the weight above below the goal), surely dropped (its lower bound reaches the goal), or
ambiguous. The ambiguous bins are a contiguous run, and the next pass's candidates; with none
left, the threshold is the lowest key of the lowest kept bin. A bin of one key (shift 0) holds
equal values, kept or dropped together, with an exact weight: it is never ambiguous. So top-k
ends within 3 passes (11 + 11 + 10 bits), top-p as soon as the bounds separate the bins: one
pass on a peaked row, up to 4 where many tokens share the mass near the cutoff. After
MAX_PASSES the ambiguous bins are decided by the middle of their bounds (never reached by top-k;
bench/NOTES.md counts the passes).

Every pass forms d exactly as the sums and the backward do, so "d ≥ threshold" is the same set
in all of them.
"""

import triton
import triton.language as tl

from .._config import FP_FUSION, on_device
from .logit_map import _logit_u
from .rows import (BATCH_INTS, PER_TOKEN_POINTERS, _block_base, _block_offsets, _fold_parts, _lane_reduce_sum, _lanes,
                   _row_lead, _row_offset, _row_target, rows_aligned)

NB_BITS = tl.constexpr(11)
NB = tl.constexpr(2048)            # bins per pass
MAX_PASSES = tl.constexpr(4)
KEY_INF = tl.constexpr(0xFF800000)  # _key(+inf): every finite or infinite d is at or below it
FLT_MAX = tl.constexpr(3.4028234663852886e38)
# Two programs of 8 warps per SM: the counting loop is bound by its instructions, and the bins'
# bounds need registers (more would leave one program per SM).
MAX_REGISTERS = 128


@triton.jit
def _cut(min_p, base):
    """min_p's threshold on d: log2(min_p), −inf for min_p ≤ 0, and never above what the largest
    logit's own d can be (b is k·max u rounded to fp32: that d is within half an ulp of b of 0),
    so that the largest token is kept even at min_p = 1."""
    cut = tl.where(min_p > 0.0, tl.log2(min_p), float("-inf"))
    return tl.minimum(cut, -(tl.abs(base) * 1.1920928955078125e-07 + 1.1754943508222875e-38))


@triton.jit
def _key(d):
    """fp32 → uint32 in the same order (−0 just below +0): the sign bit set for d ≥ +0, every bit
    flipped for d ≤ −0."""
    b = d.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) != 0, ~b, b | 0x80000000)


@triton.jit
def _value(key):
    """The fp32 value of a key (``_key``'s inverse)."""
    b = tl.where((key >> 31) != 0, key & 0x7FFFFFFF, ~key)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _count_step(p_blk, v0, o_blk, lo, hi, k, base, tanh_scale, klo, khi, shift, hist, s_hi, s_in,
                MASKED: tl.constexpr, SOFTCAP: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr,
                VEC: tl.constexpr):
    """One block of a pass, at offsets from the row's block base where the row is [lo, hi)
    (rows.py): the bins of its candidates, the mass above khi and within [klo, khi]."""
    o_v = v0 + o_blk
    if MASKED:
        m_v = (o_v >= lo) & (o_v < hi)
        b_x = tl.load(p_blk + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
    else:
        b_x = tl.load(p_blk + o_v).to(tl.float32)
    b_u = _logit_u(b_x, tanh_scale, SOFTCAP)
    if MASKED and SOFTCAP:
        b_u = tl.where(m_v, b_u, float("-inf"))  # the cap maps −inf to −1: drop the lanes off the row
    b_d = tl.fma(b_u, k, -base)
    b_key = _key(b_d)
    b_in = (b_key >= klo) & (b_key <= khi)
    b_bin = ((b_key - klo) >> shift).to(tl.int32)
    hist += tl.histogram(tl.reshape(b_bin, [R * LANES * VEC]), NB, mask=tl.reshape(b_in, [R * LANES * VEC]))
    b_e = tl.exp2(b_d)
    s_hi += _lane_reduce_sum(_lanes(tl.where(b_key > khi, b_e, 0.0), R, LANES, VEC))
    s_in += _lane_reduce_sum(_lanes(tl.where(b_in, b_e, 0.0), R, LANES, VEC))
    return hist, s_hi, s_in


@triton.jit
def _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift,
                SOFTCAP: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """One read of a valid row [lead, n_end) (blocks as in forward._lse_blocks): the (NB,) counts
    of the keys [klo, khi] by bin of 2^shift keys, the mass above khi, the mass within."""
    BLOCK: tl.constexpr = R * LANES * VEC
    n_full = n_end // BLOCK * BLOCK
    hist = tl.zeros([NB], tl.int32)
    s_hi = tl.zeros([LANES], tl.float32)
    s_in = tl.zeros([LANES], tl.float32)
    hist, s_hi, s_in = _count_step(p_blk, 0, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift, hist,
                                   s_hi, s_in, True, SOFTCAP, R, LANES, VEC)
    for v0 in range(BLOCK, n_full, BLOCK):
        hist, s_hi, s_in = _count_step(p_blk, v0, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift, hist,
                                       s_hi, s_in, False, SOFTCAP, R, LANES, VEC)
    if (n_full > 0) & (n_full < n_end):
        hist, s_hi, s_in = _count_step(p_blk, n_full, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift,
                                       hist, s_hi, s_in, True, SOFTCAP, R, LANES, VEC)
    return hist, tl.sum(s_hi, 0), tl.sum(s_in, 0)


@triton.jit
def _bits(span):
    """How many bits a uint32 span needs, or one more (its float's exponent, rounded up)."""
    exponent = (span.to(tl.float32).to(tl.uint32, bitcast=True) >> 23).to(tl.int32) - 127
    return tl.maximum(exponent + 1, 0)


@triton.jit
def _threshold(p_blk, o_blk, lead, n_end, k, base, tanh_scale, floor, goal,
               BY_MASS: tl.constexpr, SOFTCAP: tl.constexpr,
               R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """The smallest kept d of one filter over the candidates d ≥ ``floor`` (> −inf): top-k (goal
    k, counts), or with BY_MASS top-p (goal top_p, a share of the candidates' mass)."""
    o_bin = tl.arange(0, NB)
    klo = _key(floor)
    khi = klo * 0 + KEY_INF
    cut_key = klo
    above = floor * 0.0                      # the weight above khi (top-k: carried; top-p: summed)
    done = floor != floor                    # False, as a runtime flag
    for i in range(MAX_PASSES):
        if not done:
            shift = tl.maximum(_bits(khi - klo) - NB_BITS, 0)
            hist, s_hi, s_in = _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift,
                                           SOFTCAP, R, LANES, VEC)
            cnt = hist.to(tl.float32)
            width = ((1 << shift) - 1).to(tl.uint32)
            lo_key = klo + (o_bin.to(tl.uint32) << shift)
            if BY_MASS:
                goal = tl.where(i == 0, goal * (s_in + s_hi), goal)
                above = s_hi
                hi_key = lo_key + tl.minimum(width, khi - lo_key)   # empty bins past khi: never read
                w_lo = tl.where(cnt > 0, cnt * tl.exp2(_value(lo_key)), 0.0)
                w_hi = tl.where(cnt > 0, cnt * tl.exp2(_value(hi_key)), 0.0)
            else:
                w_lo = cnt
                w_hi = cnt
            above_lo = above + (tl.cumsum(w_lo, 0, reverse=True) - w_lo)   # the bins above each bin
            above_hi = above + (tl.cumsum(w_hi, 0, reverse=True) - w_hi)
            if BY_MASS:  # and from below: the range's exact mass less what the bins up to each hold
                above_lo = tl.maximum(above_lo, s_hi + s_in - tl.cumsum(w_hi, 0))
                above_hi = tl.minimum(above_hi, s_hi + s_in - tl.cumsum(w_lo, 0))
            # With shift > 0 a bin's other tokens may lie above a token of it.
            others = tl.where(shift > 0, w_hi - w_hi / tl.maximum(cnt, 1.0), 0.0)
            full = cnt > 0
            last = i == MAX_PASSES - 1   # then decided by the middle of the bounds (see above)
            kept = full & (tl.where(last, 0.5 * (above_lo + above_hi + others), above_hi + others) < goal)
            ambiguous = full & ~kept & (above_lo < goal) & ~last
            b_hi = tl.max(tl.where(ambiguous, o_bin, -1), 0)
            if b_hi < 0:
                b_kept = tl.min(tl.where(kept, o_bin, NB), 0)
                cut_key = tl.where(b_kept < NB, klo + (b_kept.to(tl.uint32) << shift),
                                   tl.minimum(khi + 1, KEY_INF))
                done = b_hi < 0
            else:
                b_lo = tl.min(tl.where(ambiguous, o_bin, NB), 0)
                if not BY_MASS:
                    above += tl.sum(tl.where(o_bin > b_hi, cnt, 0.0), 0)
                top = klo + (b_hi.to(tl.uint32) << shift)
                khi = top + tl.minimum(width, khi - top)
                klo = klo + (b_lo.to(tl.uint32) << shift)
    return _value(cut_key)


@triton.jit(do_not_specialize=BATCH_INTS, do_not_specialize_on_alignment=PER_TOKEN_POINTERS)
def _select_kernel(
    p_x, stride_xb: tl.int64, stride_xt: tl.int64,  # logits (B, T, V), unit stride along V
    p_y,                                         # (N,) int32 target ids, < 0 invalid
    p_tau, p_min_p, p_top_k, p_top_p,            # (N,) per token: τ_t, min_p, top_k (int32), top_p
    p_part, n_segs, seg_len,                     # (N, 3, n_segs) fp32 each row's segments' (c, s, a), their
                                                 # count and length: the statistics launch's
    p_cut,                                       # (N,) fp32 output: the kept set's threshold on d
    N, T, V,
    k, tanh_scale,                               # logit map, see logit_map.py (k of τ = 1 with HAS_TAU)
    SOFTCAP: tl.constexpr, HAS_TAU: tl.constexpr,
    MIN_P: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
    ROWS_ALIGNED: tl.constexpr,
    R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
):
    """One row's threshold, between the forward's statistics launch and its finish (forward.py):
    min_p's, then top-k's and top-p's selection among what is left. −inf: not truncated (an
    invalid row, a filter off, a row whose softmax is NaN or has no finite logit)."""
    row = tl.program_id(0)
    y, valid, _, n_read = _row_target(p_y, row, N, V)
    if HAS_TAU:
        k = k / tl.load(p_tau + row, mask=valid, other=1.0)
    off = _row_offset(row, T, stride_xb, stride_xt, ROWS_ALIGNED, VEC)
    lead = _row_lead(off, VEC)
    p_blk = _block_base(p_x, off, lead, True, VEC)
    o_blk = _block_offsets(R, LANES, VEC)
    n_end = lead + n_read
    base, s, _ = _fold_parts(p_part, row, n_segs, tl.cdiv(tl.where(valid, n_end, 0), seg_len), False)
    cut = float("-inf")
    if MIN_P:
        cut = _cut(tl.load(p_min_p + row, mask=valid, other=0.0), base)
    finite = valid & (s > 0.0) & (s < float("inf"))
    if TOP_K:
        top_k = tl.load(p_top_k + row, mask=valid, other=0)
        if finite & (top_k > 0):
            cut = _threshold(p_blk, o_blk, lead, n_end, k, base, tanh_scale, tl.maximum(cut, -FLT_MAX),
                             top_k.to(tl.float32), False, SOFTCAP, R, LANES, VEC)
    if TOP_P:
        top_p = tl.load(p_top_p + row, mask=valid, other=1.0)
        if finite & (top_p < 1.0):
            cut = _threshold(p_blk, o_blk, lead, n_end, k, base, tanh_scale, tl.maximum(cut, -FLT_MAX),
                             top_p, True, SOFTCAP, R, LANES, VEC)
    tl.store(p_cut + row, cut)


def select_cuts(logits, target, part, n_segs, seg_len, lmap, cut, cfg):
    """Launch the selection over the rows of ``logits`` (B, T, V): each valid row's threshold into
    ``cut`` (N,), from its segments' statistics ``part`` (N, 3, n_segs) and ``lmap``'s filters (top_k or top_p
    given; min_p's folded in)."""
    B, T, V = logits.shape
    dummy = cut
    with on_device(logits.device):
        _select_kernel[(B * T,)](
            logits, logits.stride(0), logits.stride(1), target,
            dummy if lmap.tau is None else lmap.tau, dummy if lmap.min_p is None else lmap.min_p,
            target if lmap.top_k is None else lmap.top_k, dummy if lmap.top_p is None else lmap.top_p,
            part, n_segs, seg_len, cut, B * T, T, V, lmap.log2_scale, lmap.tanh_scale,
            SOFTCAP=lmap.softcap, HAS_TAU=lmap.tau is not None, MIN_P=lmap.min_p is not None,
            TOP_K=lmap.top_k is not None, TOP_P=lmap.top_p is not None, ROWS_ALIGNED=rows_aligned(logits, cfg.vec),
            R=cfg.r, LANES=cfg.lanes, VEC=cfg.vec, num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION,
            maxnreg=MAX_REGISTERS,
        )
    return cut
