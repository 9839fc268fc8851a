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
"""

import triton
import triton.language as tl


@triton.jit
def _row_offset(row, T, stride_b, stride_t):
    """Element offset of flat row ``row`` = b·T + t of a (B, T, V) tensor.

    int64 offsets: b · stride_b passes 2³¹ elements as soon as the tensor passes 4 GiB in bf16.
    """
    i_b = row // T
    i_t = row - i_b * T
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
def _row_or_tail(row, N, T, stride_b, stride_t):
    """``_row_offset`` of a token row (row < N), or of the position after the last token of
    sequence row − N (row ≥ N): with the next-token shift, the logits (B, T + 1, V) are read as
    their first T positions, and the programs past the N = B·T tokens write the zero gradient
    rows of position T, in the same launch (no copy, no padding)."""
    i_tail = row - N
    tail = _row_offset(i_tail * T + (T - 1), T, stride_b, stride_t) + stride_t  # (b, T − 1), one on
    return tl.where(i_tail >= 0, tail, _row_offset(row, T, stride_b, stride_t))


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
def _lane_reduce_sum(b):
    """Per-lane sum of an [R, LANES, VEC] block: [LANES]."""
    return tl.sum(tl.sum(b, 2), 0)
