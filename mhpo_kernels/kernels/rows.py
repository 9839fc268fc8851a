"""Row addressing and block shape shared by the two sweeps: one program per (b, t) row of a
(B, T, V) tensor, walking the vocabulary in blocks of R × LANES × VEC elements.

A row may start anywhere: V and the strides need not be multiples of VEC (GPT-2's 50,257, a
(B, T + 1, V) view, an odd vocabulary slice). The sweeps therefore walk blocks anchored at the
16-byte boundary at or before the row's start, ``lead`` elements before it: the first block is
masked at both ends ([lead, lead + V) is the row), the steps after it start at multiples of
BLOCK_V from that boundary, so the compiler can prove their loads 16-byte aligned, and the last
partial block is masked once. Triton specializes data pointers that are 16-byte aligned, which
makes the row's misalignment its element offset mod VEC; an unaligned data pointer gets no
vectors anywhere, as before.

A new batch shape never means a new compile. Triton keys its kernel cache on whether each integer
argument is 1 or divisible by 16 (and on its type: i32 below 2³¹, i64 above) unless told not to.
The integers that move with the batch (``BATCH_INTS``: N, T, the row strides T·V or (T + 1)·V,
the split count and length) are therefore ``do_not_specialize``d, and the strides are int64 at
any size. The one fact the strides' divisibility gave the compiler, that every row starts on a
vector (V a multiple of 16: T·V, (T + 1)·V and V all are, whatever the batch), the launcher
passes as the constexpr ROWS_ALIGNED (``rows_aligned``), a function of V and the layout alone;
the compiled code is the same. What chooses a variant, then: the constexprs, V's divisibility,
the dtype, and the alignment of the logits' and gradient's data pointers, which the vector
loads rest on. The per-token pointers (``PER_TOKEN_POINTERS``) are read one scalar per row, so
their alignment is left out too: a chunk of the fused linear path may start them at any token.
tests/test_specialization.py counts the keys over batch shapes.
"""

import triton
import triton.language as tl

from .._config import MAX_ROW_SPLITS

# Arguments of the sweeps' kernels left out of Triton's specialization key (see above); each
# kernel names a subset of them.
BATCH_INTS = ("N", "T", "stride_xb", "stride_xt", "stride_db", "stride_dt", "n_segs", "seg_len", "split_segs",
              "split_len")
PER_TOKEN_POINTERS = ("p_y", "p_old", "p_adv", "p_g", "p_ref", "p_tau", "p_min_p", "p_top_k", "p_top_p", "p_cut",
                      "p_sums", "p_lse2_base", "p_lse2_rest", "p_logp", "p_ent", "p_psi", "p_zeta", "p_loss", "p_coef",
                      "p_dlogp", "p_dent", "p_upstream", "p_base", "p_mode", "p_klo", "p_khi", "p_shift", "p_lo",
                      "p_scale", "p_delta", "p_hist", "p_from", "p_first", "p_slots", "p_klo_k", "p_khi_k", "p_shift_k",
                      "p_counts")


@triton.jit
def _row_offset(row, T, stride_b, stride_t, ROWS_ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """Element offset of flat row ``row`` = b·T + t of a (B, T, V) tensor. ``ROWS_ALIGNED``: the
    launcher found both strides multiples of VEC (``rows_aligned``), which the compiler is told
    of the offset, as it knew from strides specialized as divisible by 16: the same code.

    int64 offsets: b · stride_b passes 2³¹ elements as soon as the tensor passes 4 GiB in bf16.
    """
    i_b = row // T
    i_t = row - i_b * T
    if ROWS_ALIGNED:
        return tl.multiple_of(i_b.to(tl.int64) * stride_b + i_t.to(tl.int64) * stride_t, VEC)
    return i_b.to(tl.int64) * stride_b + i_t.to(tl.int64) * stride_t


@triton.jit
def _row_lead(off, VEC: tl.constexpr):
    """How many elements of its 16-byte vector precede a row at element offset ``off`` (≥ 0) from a
    16-byte aligned pointer: off mod VEC, in [0, VEC)."""
    return (off % VEC).to(tl.int32)


@triton.jit
def _block_base(p, off, lead, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """p + off − lead: where the row's blocks are anchored. ``ALIGNED`` tells the compiler that
    off − lead is a multiple of VEC, which holds when lead = off mod VEC (``_row_lead`` of this
    very offset, or of one known to agree with it mod VEC); with the data pointer's own alignment
    that makes every unmasked step's loads and stores 16-byte vectors."""
    off = off - lead
    if ALIGNED:
        off = tl.multiple_of(off, VEC)
    return p + off


@triton.jit
def _tail_offset(row, N, T, stride_b, stride_t):
    """Element offset of position T of sequence row − N (row ≥ N) in a (B, T + 1, V) tensor read
    as its first T positions: with the next-token shift, the programs past the N = B·T tokens
    write these zero gradient rows, in the same launch (no copy, no padding)."""
    i_b = row - N
    return i_b.to(tl.int64) * stride_b + (i_b * 0 + T).to(tl.int64) * stride_t


@triton.jit
def _row_target(p_y, row, N, V):
    """(y, valid, has_y, n_read) of a row (rows ≥ N are none): its int32 target id; whether the row is a valid token
    (y ≥ 0; the launcher writes −1 for invalid ones); whether the target lies in this row's
    logits (y < V: with the vocabulary split over ranks, y ≥ V means it is on another rank's
    slice, and the row is still read for the log-sum-exp); how many logits to read (0 for
    invalid rows)."""
    y = tl.load(p_y + row, mask=row < N, other=-1)  # a tail row (``_row_or_tail``) is no token
    valid = y >= 0
    return y, valid, valid & (y < V), tl.where(valid, V, 0)


@triton.jit
def _block_offsets(R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """Offsets of one block as an [R · LANES, VEC] tensor of 16-byte vectors: row i is the i-th
    vector of the block, so a warp's lanes cover 32 adjacent vectors (coalesced). Loaded, it is
    viewed as [R, LANES, VEC] (``_lanes``)."""
    return tl.arange(0, R * LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def _lanes(b, R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """A loaded [R · LANES, VEC] block as [R, LANES, VEC]. The load's layout gives each thread
    whole rows, and the rows of thread i are i, i + LANES, ...: lane i owns R vectors, and reducing
    over axes 0 and 2 stays inside the thread (no shuffle, no barrier in the loop). The 2-D load
    fixes that layout; a 3-D one would leave the compiler a tie between axes 0 and 1 that Triton
    3.6 and 3.9 break in opposite ways."""
    return tl.reshape(b, [R, LANES, VEC])


@triton.jit
def _max_nan(a, b):
    """max that returns NaN when either side is NaN (``tl.maximum``'s default drops it)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _lane_reduce_max(b):
    """Per-lane max of an [R, LANES, VEC] block: [LANES]. A NaN may or may not survive it (the
    compiled max drops NaN, the interpreter's keeps it): the sums carry NaN (forward.py)."""
    return tl.max(tl.max(b, 2), 0)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _lane_reduce_or(b):
    """Per-lane bitwise OR of an integer [R, LANES, VEC] block: [LANES]."""
    return tl.reduce(tl.reduce(b, 2, _or), 0, _or)


@triton.jit
def _lane_reduce_sum(b):
    """Per-lane sum of an [R, LANES, VEC] block: [LANES]."""
    return tl.sum(tl.sum(b, 2), 0)


# The reference of a lane that has seen no finite logit yet: finite, so that fma(u, k, −c) stays
# −inf (not NaN) for u = −inf, and so far below any real k·u that 2^(c − c_new) is 0.
FLOOR = tl.constexpr(-3.0e38)
MAX_SEGS = tl.constexpr(MAX_ROW_SPLITS)  # segments per row at most (_config.row_segments)


@triton.jit
def _rebased(c, s, a, base, WITH_ENTROPY: tl.constexpr):
    """Base-2 sums (s = Σ 2^d, a = Σ 2^d·d, d at reference c) at the reference ``base`` ≥ c:
    (s·2^(c − base), 2^(c − base)·(a + s·(c − base))). Nothing overflows, and a part that read no
    finite logit (c = FLOOR, s = 0) gives exactly 0. A negligible part gives 0, never inf · 0, but
    a NaN sum is never negligible (SPEC.md, section 5)."""
    shift = c - base
    scale = tl.exp2(shift)
    kept = (scale > 0.0) | (s != s)
    s_b = tl.where(kept, s * scale, 0.0)
    if WITH_ENTROPY:
        a_b = tl.where(kept, scale * (a + s * shift), 0.0)
    else:
        a_b = s_b
    return s_b, a_b


@triton.jit
def _combine(c, s, a, WITH_ENTROPY: tl.constexpr):
    """(b, s, a) of a segment from the (c, s, a) of its lanes ([LANES] each), rebased to the
    largest reference b (``_rebased``) and summed."""
    base = tl.max(c, 0)
    s_b, a_b = _rebased(c, s, a, base, WITH_ENTROPY)
    s_row = tl.sum(s_b, 0)
    if WITH_ENTROPY:
        a_row = tl.sum(a_b, 0)
    else:
        a_row = s_row
    return base, s_row, a_row


@triton.jit
def _fold(c, s, a, c_j, s_j, a_j, WITH_ENTROPY: tl.constexpr):
    """The base-2 sums (c, s, a) of a row read so far, with the next segment's (c_j, s_j, a_j)
    added, both rebased to the larger reference (``_rebased``): a segment that read no finite
    logit adds exactly 0, and the first segment folded into (FLOOR, 0, 0) keeps its bits."""
    c_new = _max_nan(c, c_j)
    s_old, a_old = _rebased(c, s, a, c_new, WITH_ENTROPY)
    s_new, a_new = _rebased(c_j, s_j, a_j, c_new, WITH_ENTROPY)
    return c_new, s_old + s_new, a_old + a_new


@triton.jit
def _fold_parts(p_part, row, n_segs, n_row_segs, WITH_ENTROPY: tl.constexpr):
    """A row's (b, s, a) from the (c, s, a) of its first ``n_row_segs`` segments, stored by the
    programs that read them in the row's (3, n_segs) fp32 slot of ``p_part``, folded in segment
    order (``_fold``), as one program folds them while it reads the row: the same bits."""
    p_j = p_part + row.to(tl.int64) * (3 * n_segs)
    c = tl.full([], FLOOR, tl.float32)
    s = tl.zeros([], tl.float32)
    a = tl.zeros([], tl.float32)
    # Unrolled, a branch per segment: no loop that bench.sass could take for a sweep's.
    for j in tl.static_range(MAX_SEGS):
        if j < n_row_segs:
            c, s, a = _fold(c, s, a, tl.load(p_j + j), tl.load(p_j + n_segs + j), tl.load(p_j + 2 * n_segs + j),
                            WITH_ENTROPY)
    return c, s, a


def rows_aligned(x, vec):
    """Whether every row of ``x`` (B, T, V) starts a whole number of ``vec``-element vectors from
    its data pointer: both row strides multiples of vec (host metadata only; the kernels'
    ROWS_ALIGNED). Both strides count even for a dimension of size 1, so that the answer is a
    function of V and the layout, never of the batch: T·V, (T + 1)·V and V are all multiples of
    vec, or (V odd) none of them."""
    return x.stride(0) % vec == 0 and x.stride(1) % vec == 0
