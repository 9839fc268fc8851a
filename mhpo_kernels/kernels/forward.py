"""Sweep 1: per row, one read of the logits for log-sum-exp, the target logit and the entropy, then
the per-token MHPO epilogue. Writes O(N) fp32 scalars, never a V-sized buffer."""

import torch
import triton
import triton.language as tl

from .._config import (FP_FUSION, launch_splits, on_device, persistent_programs, row_segments, segment_length,
                       sweep_config)
from .._sweep_types import RowStats
from ..torch_sweeps import _zero_tail
from .backward import _grad_row, _in_phase, _zero_row
from .logit_map import LN2, _logit_u
from .replay import replay_fwd, unreplayed
from .select import _cut, select_cuts
from .rows import (BATCH_INTS, FLOOR, PER_TOKEN_POINTERS, _block_base, _block_offsets, _combine, _fold, _fold_parts,
                   _lane_reduce_max, _lane_reduce_or, _lane_reduce_sum, _lanes, _max_nan, _or, _rebased, _row_lead,
                   _row_offset, _row_target, rows_aligned)
from .token_math import _loss_terms

# Exponents below −150 give 2^d = 0 in fp32 (even with denormals); clamping d there before the
# entropy product turns 0 · (−inf) into 0 · (−256) = 0 for −inf logits. NaN still propagates.
D_FLOOR = tl.constexpr(-256.0)
# Registers per thread of the one-sweep kernel at most (bench/NOTES.md): its loop over a row's
# segments inside the loop over rows keeps more alive, and left alone the compiler took 76 at an
# odd V; held to 64 it spills nothing, and a persistent grid of at most 2 programs per SM loses no
# occupancy to it. The two sweeps' forward stays within 64 unasked.
MAX_REGISTERS = 64


@triton.jit
def _lse_step(p_blk, v0, o_blk, lo, hi, c, s, a, low, k, tanh_scale, cut,
              MASKED: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, EVICT: tl.constexpr,
              CUT: tl.constexpr, LOW16: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """One block of the online log-sum-exp, with per-lane state (c, s, a), each [LANES]:

        c = fp32(k · max u) over what the lane has read,  s = Σ 2^d,  a = Σ 2^d · d,  d = fma(u, k, −c)

    Offsets are from the row's block base (rows.py), where the row is [lo, hi). Only full blocks
    run unmasked; the first block and the tail of the row take the masked path. ``EVICT``: the
    loads' eviction policy ("evict_last" where pass 2 re-reads the row from L2, else default).
    ``CUT``: pass 2 of a truncated row. c is the row's base already (no max, no rescale) and only
    the tokens with d ≥ ``cut`` count: the others, −inf logits among them, take d = D_FLOOR, whose
    2^d is 0 and whose d·2^d is 0; a NaN stays NaN. ``LOW16`` (fp32 logits, the statistics of a
    selection): ``low``, per lane, the bits of the logits read OR-ed together, whose low 16 are 0
    where each is a bf16 value (select.py counts such a row over bf16 keys).
    """
    o_v = v0 + o_blk
    if MASKED:
        m_v = (o_v >= lo) & (o_v < hi)
        b_x = tl.load(p_blk + o_v, mask=m_v, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    else:
        b_x = tl.load(p_blk + o_v, eviction_policy=EVICT).to(tl.float32)
    b_u = _logit_u(b_x, tanh_scale, SOFTCAP)
    if MASKED and SOFTCAP:
        b_u = tl.where(m_v, b_u, float("-inf"))  # the cap maps −inf to −1: drop the lanes off the row
    b_u = _lanes(b_u, R, LANES, VEC)
    if CUT:
        b_d = tl.fma(b_u, k, -c[None, :, None])
        b_d = tl.where(b_d < cut, D_FLOOR, b_d)
        b_e = tl.exp2(b_d)
        if WITH_ENTROPY:
            a += _lane_reduce_sum(b_e * b_d)
        return c, s + _lane_reduce_sum(b_e), a, low
    if LOW16:
        low = low | _lane_reduce_or(_lanes(b_x.to(tl.int32, bitcast=True), R, LANES, VEC))
    # A NaN logit reaches the lane's sum s through its 2^d; the compiled max may drop it (the
    # interpreter's keeps it), so s, not c, carries it: no rescale below (alpha = 0, or the
    # combine's lane_kept) may drop a NaN sum (SPEC.md, section 5).
    c_new = _max_nan(c, _lane_reduce_max(b_u) * k)
    # The lane's sums rebased to c_new. What the lane summed may be below 2^−149 of what comes
    # now, and inf (logits masked with −1e10 round to a base whose residuals exceed 2^128): then
    # dropped, never inf · 0 (``_rebased``).
    s_b, a_b = _rebased(c, s, a, c_new, WITH_ENTROPY)
    b_d = tl.fma(b_u, k, -c_new[None, :, None])           # one rounding, see logit_map.py
    b_e = tl.exp2(b_d)
    if WITH_ENTROPY:
        b_d = tl.maximum(b_d, D_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        a = a_b + _lane_reduce_sum(b_e * b_d)
    s = s_b + _lane_reduce_sum(b_e)
    return c_new, s, a, low


@triton.jit
def _lse_blocks(p_blk, o_blk, lead, n_end, b0, b1, k, tanh_scale, base, cut,
                SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, EVICT: tl.constexpr, CUT: tl.constexpr,
                LOW16: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """Per-lane (c, s, a) of the online log-sum-exp over the blocks [b0, b1) of a row that is
    [lead, n_end) from its block base (b0 < b1, b0 a multiple of BLOCK_V): the first block masked, full
    blocks after it (16-byte vectors at any V and stride), a masked tail. The whole row is
    [0, n_end); a segment of it (``_config.row_segments``) is a run of whole blocks. ``CUT``: the
    second pass of a truncated row, every lane at the row's ``base``, counting d ≥ ``cut`` only.
    ``LOW16``: and per lane the OR of the fp32 logits' bits read (``_lse_step``)."""
    BLOCK_V: tl.constexpr = R * LANES * VEC
    n_full = b1 // BLOCK_V * BLOCK_V
    if CUT:
        lane_c = tl.zeros([LANES], tl.float32) + base
    else:
        lane_c = tl.full([LANES], FLOOR, tl.float32)
    lane_s = tl.zeros([LANES], tl.float32)
    lane_a = tl.zeros([LANES], tl.float32)
    lane_low = tl.zeros([LANES], tl.int32)
    # Unconditional (b0 < b1): its load's L2 policy then dominates the loop's, which share it.
    lane_c, lane_s, lane_a, lane_low = _lse_step(p_blk, b0, o_blk, lead, n_end, lane_c, lane_s, lane_a, lane_low,
                                                 k, tanh_scale, cut, True, SOFTCAP, WITH_ENTROPY, EVICT, CUT, LOW16,
                                                 R, LANES, VEC)
    for v0 in range(b0 + BLOCK_V, n_full, BLOCK_V):
        lane_c, lane_s, lane_a, lane_low = _lse_step(p_blk, v0, o_blk, lead, n_end, lane_c, lane_s, lane_a,
                                                     lane_low, k, tanh_scale, cut, False, SOFTCAP, WITH_ENTROPY,
                                                     EVICT, CUT, LOW16, R, LANES, VEC)
    if (n_full > b0) & (n_full < b1):
        lane_c, lane_s, lane_a, lane_low = _lse_step(p_blk, n_full, o_blk, lead, n_end, lane_c, lane_s, lane_a,
                                                     lane_low, k, tanh_scale, cut, True, SOFTCAP, WITH_ENTROPY,
                                                     EVICT, CUT, LOW16, R, LANES, VEC)
    return lane_c, lane_s, lane_a, lane_low


@triton.jit
def _fwd_row(
    row, p_x, stride_xb, stride_xt, p_y, p_old, p_adv, p_g, p_ref, p_tau, p_min_p,
    p_lse2_base, p_lse2_rest, p_logp, p_ent, p_psi, p_zeta, p_loss, p_coef, p_cut, p_sums,
    p_dx, stride_db, stride_dt, p_part, n_segs, seg_len, split_segs,
    N, T, V, k, tanh_scale, slope, v0, v1, v2, v3, v4, beta, grad_scale,
    SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_LOSS: tl.constexpr,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_TAU: tl.constexpr,
    MIN_P: tl.constexpr, SELECTED: tl.constexpr, LOW16: tl.constexpr,
    OBJECTIVE: tl.constexpr, LFM: tl.constexpr, DHP: tl.constexpr,
    GRAD_IN_FORWARD: tl.constexpr, DX_IN_PHASE: tl.constexpr, SPLIT: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
    R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
):
    """One row of sweep 1; with GRAD_IN_FORWARD, then its gradient for an upstream gradient of 1
    (``backward._grad_row``, the backward sweep's own row), re-read while the row is likely still
    in L2. The row is read in its segments (``_config.row_segments``), each summed across lanes
    and folded into the row's sums in order; with SPLIT (see the kernel) a run of them is read and
    stored, or the stored ones folded. A truncated row (never split) sums the kept tokens only,
    in one more pass (SPEC.md, section 9), unless the selection summed them (``p_sums``):
    with MIN_P above min_p's threshold, with SELECTED above the one the selection launch stored
    (select.py: top-k's and top-p's, min_p's included)."""
    TRUNC: tl.constexpr = MIN_P or SELECTED
    off = _row_offset(row, T, stride_xb, stride_xt, ROWS_ALIGNED, VEC)
    p_row = p_x + off
    y, valid, has_y, n_read = _row_target(p_y, row, N, V)  # invalid rows read nothing, write zeros
    if HAS_TAU:  # τ_t divides k once per row: the loop sees a row constant, as for a scalar τ
        tau = tl.load(p_tau + row, mask=valid, other=1.0)
        k = k / tau
        slope = slope / tau
    o_blk = _block_offsets(R, LANES, VEC)
    # The row is [lead, n_end) from its block base (rows.py).
    lead = _row_lead(off, VEC)
    p_blk = _block_base(p_x, off, lead, True, VEC)
    n_end = tl.where(n_read > 0, lead + n_read, 0)

    # Per-lane online softmax in base 2 (see _lse_step) over each segment, one cross-lane combine
    # after it, the segments folded in order: the same bits however many programs read the row.
    if SPLIT == 2:
        base, s, a = _fold_parts(p_part, row, n_segs, tl.cdiv(n_end, seg_len), WITH_ENTROPY)
    else:
        g0 = 0
        g1 = tl.cdiv(n_end, seg_len)
        if SPLIT == 1:  # a run of split_segs segments, each stored (c, s, a) for the combine launch
            g0 = tl.program_id(1) * split_segs
            g1 = tl.minimum(g0 + split_segs, g1)
        base = tl.full([], FLOOR, tl.float32)
        s = tl.zeros([], tl.float32)
        a = tl.zeros([], tl.float32)
        low = tl.zeros([], tl.int32)
        for g in range(g0, g1):
            b0 = tl.multiple_of(g * seg_len, R * LANES * VEC)
            # Pass 2 re-reads the row (the one sweep, a truncated row): keep it in L2 until then.
            lane_c, lane_s, lane_a, lane_low = _lse_blocks(p_blk, o_blk, lead, n_end, b0,
                                                           tl.minimum(b0 + seg_len, n_end), k, tanh_scale, 0.0, 0.0,
                                                           SOFTCAP, WITH_ENTROPY,
                                                           "evict_last" if GRAD_IN_FORWARD or TRUNC else "", False,
                                                           LOW16, R, LANES, VEC)
            c_g, s_g, a_g = _combine(lane_c, lane_s, lane_a, WITH_ENTROPY)
            if SPLIT == 1:
                p_j = p_part + row.to(tl.int64) * (3 * n_segs) + g
                tl.store(p_j, c_g)
                tl.store(p_j + n_segs, s_g)
                tl.store(p_j + 2 * n_segs, a_g)
            else:
                base, s, a = _fold(base, s, a, c_g, s_g, a_g, WITH_ENTROPY)
            if LOW16:
                low = low | tl.reduce(lane_low, 0, _or)
        if LOW16:  # the statistics of a selection, one program a row: p_cut holds the row's test
            tl.store(p_cut + row, (low & 0xFFFF).to(tl.float32))
    cut = float("-inf")
    if TRUNC:
        # The kept set is d_v = k·u_v − b ≥ cut, in the exponents of the statistics pass: min_p's
        # closed form (p_v ≥ min_p · max p ⇔ d_v ≥ log2 min_p), or the selection's, which may
        # have summed the kept tokens already (s ≥ 0; select.py).
        s_kept = -1.0
        a_kept = 0.0
        if SELECTED:
            cut = tl.load(p_cut + row, mask=valid, other=float("-inf"))
            s_kept = tl.load(p_sums + 2 * row, mask=valid, other=-1.0)
            a_kept = tl.load(p_sums + 2 * row + 1, mask=valid, other=0.0)
        else:
            cut = _cut(tl.load(p_min_p + row, mask=valid, other=0.0), base)
        if s_kept >= 0.0:
            s = s_kept
            a = a_kept
        elif cut > float("-inf"):
            lane_c, lane_s, lane_a, _ = _lse_blocks(p_blk, o_blk, lead, n_end, 0, n_end, k, tanh_scale, base, cut,
                                                    SOFTCAP, WITH_ENTROPY, "", True, False, R, LANES, VEC)
            base, s, a = _combine(lane_c, lane_s, lane_a, WITH_ENTROPY)

    if SPLIT != 1:
        _fwd_epilogue(row, p_row, p_blk, o_blk, lead, y, valid, has_y, base, s, a, cut,
                      p_old, p_adv, p_g, p_ref, p_lse2_base, p_lse2_rest, p_logp, p_ent, p_psi, p_zeta, p_loss, p_coef,
                      p_cut,
                      p_dx, stride_db, stride_dt, T, V, k, tanh_scale, slope, v0, v1, v2, v3, v4, beta,
                      grad_scale,
                      SOFTCAP, WITH_ENTROPY, WITH_LOSS, HAS_OLD, HAS_REF, OBJECTIVE, LFM, DHP,
                      GRAD_IN_FORWARD, DX_IN_PHASE, ROWS_ALIGNED, TRUNC, R, LANES, VEC)


@triton.jit
def _fwd_epilogue(
    row, p_row, p_blk, o_blk, lead, y, valid, has_y, base, s, a, cut,
    p_old, p_adv, p_g, p_ref, p_lse2_base, p_lse2_rest, p_logp, p_ent, p_psi, p_zeta, p_loss, p_coef, p_cut,
    p_dx, stride_db, stride_dt, T, V, k, tanh_scale, slope, v0, v1, v2, v3, v4, beta, grad_scale,
    SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_LOSS: tl.constexpr,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    OBJECTIVE: tl.constexpr, LFM: tl.constexpr, DHP: tl.constexpr,
    GRAD_IN_FORWARD: tl.constexpr, DX_IN_PHASE: tl.constexpr, ROWS_ALIGNED: tl.constexpr, CUT: tl.constexpr,
    R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
):
    """A row's outputs from its statistics (b, s = Σ 2^d, a = Σ 2^d·d at b): log-prob, entropy,
    the per-token epilogue, and with GRAD_IN_FORWARD pass 2. With CUT the sums are over the
    kept tokens (d ≥ ``cut``), a target outside them has log-prob −inf, and the threshold is
    stored for the backward (−inf where the row is not truncated)."""
    # Rows with nothing read (invalid) have s = 0: write zeros, not NaN.
    base = tl.where(valid, base, 0.0)
    log2_s = tl.log2(tl.where(valid, s, 1.0))
    x_y = tl.load(p_row + y, mask=has_y, other=0.0).to(tl.float32)
    d_y = tl.fma(_logit_u(x_y, tanh_scale, SOFTCAP), k, -base)
    logp = (d_y - log2_s) * LN2
    if CUT:  # outside the kept set; a NaN row (a NaN, +inf or only −inf logits) stays NaN (SPEC.md, 9)
        # A row is truncated where it kept a token, or kept none of its finite logits: a
        # vocabulary slice below another slice's threshold (vocab_parallel.py).
        truncated = valid & ((log2_s > float("-inf")) | ((s == 0.0) & (base > FLOOR)))
        logp = tl.where((d_y < cut) & truncated, float("-inf"), logp)
        tl.store(p_cut + row, tl.where(truncated, cut, float("-inf")))
    tl.store(p_lse2_base + row, base)
    tl.store(p_lse2_rest + row, log2_s)
    tl.store(p_logp + row, tl.where(has_y, logp, 0.0))  # log-prob within this slice
    if WITH_ENTROPY:
        # H = −Σ p ln p with ln p = ln2 · (d − log2 s):  H = ln2 · (log2 s − Σ 2^d d / s)
        tl.store(p_ent + row, tl.where(valid, (log2_s - a / tl.where(valid, s, 1.0)) * LN2, 0.0))

    if WITH_LOSS:
        psi, zeta, g_loss, g_coef = _loss_terms(logp, row, valid, p_old, p_adv, p_g, p_ref, v0, v1, v2, v3, v4, beta,
                                                HAS_OLD, HAS_REF, OBJECTIVE, LFM, DHP)
        tl.store(p_psi + row, psi)
        tl.store(p_zeta + row, zeta)
        tl.store(p_loss + row, g_loss)
        tl.store(p_coef + row, g_coef)
        if GRAD_IN_FORWARD:
            # Pass 2 of the row, for the upstream gradient the caller said the loss will get:
            # dlogp = g·coef · grad_scale, the fp32 product the backward's caller forms
            # (ops._sweeps_backward), so that the bits agree with the two sweeps.
            d_off = _row_offset(row, T, stride_db, stride_dt, ROWS_ALIGNED and DX_IN_PHASE, VEC)
            p_dblk = _block_base(p_dx, d_off, lead, DX_IN_PHASE, VEC)
            if valid:
                _grad_row(p_row, p_blk, p_dx + d_off, p_dblk, o_blk, lead, lead + V, 0, lead + V, x_y, y, has_y,
                          k, slope, base, log2_s, g_coef * grad_scale, 0.0, 0.0, tanh_scale, cut, SOFTCAP, False,
                          "evict_first", False, R, LANES, VEC)
            else:
                _zero_row(p_dblk, o_blk, lead, lead + V, 0, lead + V, R, LANES, VEC)


@triton.jit(do_not_specialize=BATCH_INTS, do_not_specialize_on_alignment=PER_TOKEN_POINTERS)
def _mhpo_fwd_kernel(
    p_x, stride_xb: tl.int64, stride_xt: tl.int64,  # logits (B, T, V), unit stride along V
    p_y,                                         # (N,) int32 target ids, < 0 invalid, ≥ V elsewhere
    p_old, p_adv, p_g, p_ref,                    # (N,) fp32 old logp, advantage, agg weight, ref logp
    p_tau,                                       # (N,) fp32 per-token temperature τ_t (HAS_TAU)
    p_min_p,                                     # (N,) fp32 per-token min_p, ≤ 0 off (MIN_P)
    p_lse2_base, p_lse2_rest, p_logp, p_ent,               # (N,) fp32 outputs: base b, log2 s, logp, H
    p_psi, p_zeta, p_loss, p_coef,               # (N,) fp32 outputs of the per-token epilogue
    p_cut,                                       # (N,) fp32 the kept set's threshold on d: written (truncated),
                                                 # first read (SELECTED); with LOW16 each row's test of bf16
                                                 # values, for the selection launch
    p_sums,                                      # (N, 2) fp32 the selection's kept sums, s < 0: none (SELECTED)
    p_dx, stride_db: tl.int64, stride_dt: tl.int64,  # gradient (B, T, V) (GRAD_IN_FORWARD; may be p_x)
    p_part, n_segs, seg_len, split_segs,         # (N, 3, n_segs) fp32 (c, s, a) of each segment (SPLIT);
                                                 # segments per row and their length; segments per split
    N, T, V,
    k, tanh_scale, slope,                        # logit map, see logit_map.py (k of τ = 1 with HAS_TAU)
    v0, v1, v2, v3, v4, beta,                    # the objective's values (token_math._token_loss), β
    grad_scale,                                  # the upstream gradient pass 2 is for (GRAD_IN_FORWARD)
    SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_LOSS: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_TAU: tl.constexpr,
    MIN_P: tl.constexpr,                         # the softmax truncated by min_p (its closed form), or
    SELECTED: tl.constexpr,                      # by the selection launch's thresholds: one more pass
    LOW16: tl.constexpr,                         # fp32 logits, the statistics of a selection (SPLIT 1, one
                                                 # split): each row's low 16 bits OR-ed into p_cut, 0
                                                 # where every logit is a bf16 value
    OBJECTIVE: tl.constexpr, LFM: tl.constexpr, DHP: tl.constexpr,
    GRAD_IN_FORWARD: tl.constexpr,               # persistent: programs take rows in turn, pass 2 per row
    DX_IN_PHASE: tl.constexpr,                   # as in the backward sweep (GRAD_IN_FORWARD only)
    SPLIT: tl.constexpr,                         # 0 a row per program; 1 grid (N, splits): each
                                                 # split's segments' (c, s, a); 2 grid (N,): their fold
    ROWS_ALIGNED: tl.constexpr,                  # both logits strides multiples of VEC (rows.rows_aligned)
    R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
):
    if GRAD_IN_FORWARD:
        # A grid of a few programs per SM, each taking rows in turn: at most that many rows are in
        # flight, so a row's second read finds it in L2 (bench/NOTES.md has the arithmetic).
        for row in range(tl.program_id(0), N, tl.num_programs(0)):
            _fwd_row(row, p_x, stride_xb, stride_xt, p_y, p_old, p_adv, p_g, p_ref, p_tau, p_min_p,
                     p_lse2_base, p_lse2_rest, p_logp, p_ent, p_psi, p_zeta, p_loss, p_coef, p_cut, p_sums, p_dx,
                     stride_db, stride_dt,
                     p_part, n_segs, seg_len, split_segs, N, T, V, k, tanh_scale, slope, v0, v1, v2, v3, v4, beta,
                     grad_scale,
                     SOFTCAP, WITH_ENTROPY, WITH_LOSS, HAS_OLD, HAS_REF, HAS_TAU, MIN_P, SELECTED, LOW16, OBJECTIVE,
                     LFM, DHP, True, DX_IN_PHASE, 0, ROWS_ALIGNED, R, LANES, VEC)
    else:
        _fwd_row(tl.program_id(0), p_x, stride_xb, stride_xt, p_y, p_old, p_adv, p_g, p_ref, p_tau, p_min_p,
                 p_lse2_base, p_lse2_rest, p_logp, p_ent, p_psi, p_zeta, p_loss, p_coef, p_cut, p_sums, p_dx,
                 stride_db, stride_dt,
                 p_part, n_segs, seg_len, split_segs, N, T, V, k, tanh_scale, slope, v0, v1, v2, v3, v4, beta,
                 grad_scale,
                 SOFTCAP, WITH_ENTROPY, WITH_LOSS, HAS_OLD, HAS_REF, HAS_TAU, MIN_P, SELECTED, LOW16, OBJECTIVE, LFM,
                 DHP, False, DX_IN_PHASE, SPLIT, ROWS_ALIGNED, R, LANES, VEC)


def mhpo_fwd(logits, target, old, adv, g, ref, hp, lmap, *, with_entropy, with_loss, grad=None, zero_tail=False,
             grad_scale=1.0):
    """Launch sweep 1 over the rows of ``logits`` (B, T, V). Returns ``RowStats`` of (N,) fp32.

    ``grad``: also write ∂L/∂logits for an upstream gradient of ``grad_scale`` into it (B, T, V, unit stride
    along V; may be ``logits`` itself), in the same persistent launch (needs ``with_loss``).
    Without it, rows too few to fill the GPU are split over several programs each
    (``_config.launch_splits``): one launch for the splits, one for their combine and the
    epilogue. ``zero_tail`` (with ``grad``): ``logits`` and ``grad`` are the first T positions of
    (B, T + 1, V) tensors, and position T of each sequence gets a zero gradient row."""
    B, T, V = logits.shape
    N = B * T
    # A threshold given per row (vocab_parallel's min_p, from the global largest logit): its sums
    # as the selection's, without the selection launch.
    given = lmap.cut is not None and not lmap.filtered
    out = RowStats.empty(N, logits.device, with_entropy=with_entropy, with_loss=with_loss,
                         truncated=lmap.filtered or given)
    tail = B if zero_tail and grad is not None else 0
    if N == 0:
        if tail:
            _zero_tail(grad)
        return out
    if not with_loss:  # read by the loss's epilogue only: a sweep without it is the log-probs' variant
        old = adv = g = ref = None
    per_token = (target, old, adv, g, ref, lmap.tau, lmap.min_p, lmap.top_k, lmap.top_p)
    assert all(x is None or x.is_contiguous() for x in per_token), "per-token inputs must be flat"
    assert target.dtype == torch.int32 and (lmap.top_k is None or lmap.top_k.dtype == torch.int32)
    cfg = sweep_config(V, logits.element_size())
    one_sweep = grad is not None
    if one_sweep:
        assert with_loss and grad.stride(-1) == 1 and grad.dtype == logits.dtype
    assert not (lmap.truncated and (with_loss or one_sweep)), "a truncated softmax gives log-probs and entropy only"
    replayed_target = target
    if lmap.replayed:  # the rows with a kept set are replay.py's; the launches below skip them
        target = unreplayed(target, lmap)
    # top-k, top-p and a given threshold: the statistics launch (SPLIT 1, one split), the selection
    # launch (not for a given threshold), the finish
    # (SPLIT 2: the kept tokens' sums, unless the selection found them, and the epilogue).
    selected = lmap.top_k is not None or lmap.top_p is not None or given
    n_segs, seg_len = row_segments(V, cfg.block_v), segment_length(V, cfg)
    splits = 1 if one_sweep or lmap.filtered or given else launch_splits(N, V, logits.element_size(),
                                                                          logits.device)
    split_segs = -(-n_segs // splits)
    splits = -(-n_segs // split_segs)  # none of them without a segment
    part = torch.empty(N * 3 * n_segs, device=logits.device, dtype=torch.float32) if splits > 1 or selected else None
    sums = torch.empty(N * 2, device=logits.device, dtype=torch.float32) if selected else None

    def launch(grid, split, num_warps, min_p=lmap.min_p is not None, finish=False, low16=False):
        assert not low16 or grid == (N, 1), "the test of bf16 values takes one program a row"
        _mhpo_fwd_kernel[grid](
            logits, logits.stride(0), logits.stride(1),
            target, old, adv, g, ref, lmap.tau, lmap.min_p if min_p else None,
            *out[:8],  # RowStats' fields, in the kernel's order
            out.cut if min_p or finish or low16 else None, sums if finish else None,
            grad, *((0, 0) if grad is None else grad.stride()[:2]),
            part if split else None, n_segs, seg_len, split_segs,
            N, T, V,
            lmap.log2_scale, lmap.tanh_scale, lmap.slope,
            *hp.values, hp.beta, grad_scale,
            SOFTCAP=lmap.softcap,
            WITH_ENTROPY=with_entropy,
            WITH_LOSS=with_loss,
            HAS_OLD=old is not None,
            HAS_REF=ref is not None,
            HAS_TAU=lmap.tau is not None,
            MIN_P=min_p,
            SELECTED=finish,
            LOW16=low16,
            OBJECTIVE=hp.kind, LFM=hp.lfm, DHP=hp.dhp,
            GRAD_IN_FORWARD=one_sweep,
            DX_IN_PHASE=one_sweep and _in_phase(logits, grad, cfg.vec),
            SPLIT=split,
            ROWS_ALIGNED=rows_aligned(logits, cfg.vec),
            R=cfg.r, LANES=cfg.lanes, VEC=cfg.vec,
            num_warps=num_warps,
            enable_fp_fusion=FP_FUSION,
            maxnreg=MAX_REGISTERS if one_sweep else None,
        )

    with on_device(logits.device):
        if one_sweep:
            if tail:  # the shift's zero rows: one fill, not a branch in the persistent loop (it cost
                # the fp32 kernels 30 to 60 registers)
                _zero_tail(grad)
            launch((persistent_programs(N, logits.device, V * logits.element_size()),), 0, cfg.num_warps)
        elif selected:
            # fp32 logits: the statistics launch tests each row for bf16 values, which the
            # selection then counts over bf16 keys (select.py)
            launch((N, 1), 1, cfg.num_warps, min_p=False, low16=not given and logits.dtype == torch.float32)
            if given:
                out.cut.copy_(lmap.cut)
                sums.fill_(-1.0)   # the finish sums the kept tokens
            else:
                select_cuts(logits, target, part, n_segs, seg_len, lmap, out.cut, sums, with_entropy, cfg)
            launch((N,), 2, cfg.num_warps, min_p=False, finish=True)
        elif splits == 1:
            launch((N,), 0, cfg.num_warps)
        else:
            launch((N, splits), 1, cfg.num_warps)
            launch((N,), 2, 1)   # per row: a few scalars, no logits but the target's
    if lmap.replayed:
        replay_fwd(logits, replayed_target, lmap, out, with_entropy)
    return out
