"""The kept set of a truncated row (SPEC.md, section 9) as one threshold on its exponents
d = k·u − b (forward.py), found inside the forward sweep.

min_p has a closed form (``_cut``). top-k and top-p keep a token when the weight strictly above
it is below a goal: the count of tokens (goal k), or their probability mass (goal top_p times the
mass of what the earlier filters kept). The threshold is the smallest kept d, found by counting
the row's candidates in NB bins, one read of the row per pass (``_count_pass``, ``tl.histogram``),
each pass narrowing the candidates to the bins it could not decide.

- The bins of a pass. top-p's first pass bins d uniformly over [max(floor, −UNIFORM_RANGE), hi]
  (hi just above 0, above every d: bins of equal probability ratio, a peaked row's mass falls in a
  few hundred of them). Every
  other pass bins a run of keys [klo, khi] (``_key`` orders fp32 values as uint32 keys) in bins
  of 2^shift consecutive keys, a radix select: 11 + 11 + 10 bits reach single keys in 3 passes.
- Deciding a bin. From the counts a bin's weight is exact (top-k) or bounded by the mass of its
  lowest and highest d (top-p; each pass but the last also sums exactly the mass above its range
  and within it). Every bin is surely kept (even its upper bound leaves the weight above below
  the goal), surely dropped (its lower bound reaches the goal), or ambiguous; the ambiguous bins
  are a contiguous run, the next pass's candidates. With none left, the threshold is the lowest
  d of the lowest kept bin. A bin of one key holds equal values, kept or dropped together, with
  an exact weight: it is never ambiguous, so top-k ends within its MAX_PASSES = 3 passes with
  single keys at the latest. top-p ends as soon as the bounds separate the bins, and at the
  latest in its third pass (the uniform one and two of keys), which decides each bin still
  ambiguous by the middle of the bounds on the mass above it: a bin of several keys is kept
  whole where its highest token would be. The kept set is then the sort's, ties together, but
  for the other tokens of that one bin, which lie within its width below a kept token (at most
  1.2e-7 in d on the rows bench/NOTES.md counts, where it never changed the set).
- The kept tokens' sums. The pass that decides a row sums the kept tokens' Σ 2^d and Σ 2^d·d
  when it is top-k's or top-p's last, or has single keys: the mass above its range, and the
  kept bins' (exact for single keys; for several, each bin's mass at the middle of its bounds,
  at its lowest d). Otherwise the forward's finish reads the row once more. Either way the
  forward reads a top-k or top-p row at most 4 times: the statistics and three passes, or the
  statistics, two passes and the finish. Each filter runs alone, top-k's then top-p's, but for a
  row with both on: 16-bit rows share a first pass (below), fp32 rows gather top-k's candidates.
- fp32 rows with top-k and top-p (``_top_k_top_p_gathered``). top-k's passes count keys of d
  until at most GATHER tokens lie from its k-th value's bin up (one pass, or two: bins of up to
  2^21 keys, then 2^10); one pass more stores their d in a scratch row of GATHER words (8 KiB;
  ``slots``: fewer where a block holds fewer logits), each lane's slots after the lanes below it,
  no atomics (``_gather_pass``); and the program decides both filters on them in registers
  (``_gathered_cut``: top-k's cut, then top-p's among what it keeps, each a binary search over
  the keys, of a count or a mass over the candidates) and sums the kept tokens exactly: the
  statistics and three passes at most, no finish. A top_k above SLOTS runs both selections side
  by side (``_top_k_top_p_joint``), each pass one read of both (``_joint_pass``): top-p's uniform
  first pass with top-k's first over keys, then two passes of top-k's run of keys and top-p's,
  top-p deciding between the goals that top-k's bounds on the mass it keeps allow (a bin of one
  key can be ambiguous there) until its last pass, where top-k's bins are single keys, which
  makes that mass exact: the statistics and three passes. Where top-p's cut falls among those
  keys (the mass above top-k's run is below its goal) it is decided there key by key, exactly
  (``_exact_in_run``): top-p's own bins may still be wide then, its run held open between
  ambiguous bins far apart (a large tie group above, top-k's k-th value below). Where two
  passes leave more than SLOTS from the k-th value's bin up with a top_k of at most SLOTS (that
  many tokens tied with its k-th value or within 2^10 keys of it), fewer than k lie above the
  bin: the third pass gathers those and counts the bin one bin a key, and both filters are
  decided from the two (``_kept_cut``). A top_k of the whole row is off.
- bf16 and fp16 logits (KEYS16). The keys are the logits' own, 2^16 values (``_key16``: bf16's
  the upper half of its fp32 value's key, fp16's formed from its bits): d is monotone in them,
  so a threshold on them is one on d. The first pass bins the candidates' keys, from the first
  whose d reaches the floor up to the largest logit's, by at most 32 (11 + 5 bits), so
  a second reaches single keys: top-k alone takes two passes. With top-p on too, that first pass
  (with the candidates' mass) serves both: top-k's k-th bin is counted again by single keys
  (with the mass above it), which makes top-k's cut and the mass it keeps, top-p's goal, exact;
  top-p then decides among those keys, or the first pass's bins above them, and a run of bins it
  cannot decide is counted by single keys in one more pass where it holds at most NB keys. Where
  the run that the first pass's bounds on top-k's mass leave top-p may be wider (loose bounds over
  keys near 0), the second pass counts it beside top-k's bin (``_joint_pass``) and a third is
  top-p's last: the statistics and three passes at most either way. top-p alone keeps its uniform
  first pass, then counts keys.
  Distinct 16-bit values near 0 may round to one d: the kept set d ≥ threshold takes such a tie
  group whole where it holds a kept token, and ``_settle`` counts it where the passes' bins split
  it (a read more, on such ties only).
- fp32 logits of bf16 values (``logits.float()`` of a bf16 head; BF16_ROWS). The statistics
  launch keeps the OR of each row's low 16 bits (forward.py's LOW16); a row where they are all 0
  holds bf16 values only, and is counted over bf16 keys as a bf16 row is (``_select_row``), the
  others over keys of d.

Every pass forms d exactly as the sums and the backward do, so "d ≥ threshold" is the same set
in all of them. Over a vocabulary split each pass is a launch of ``_slice_count_kernel`` and the
decisions are ``slice_select.py``'s.
"""

import torch
import triton
import triton.language as tl

from .._config import FP_FUSION, on_device, sweep_config
from .._sweep_types import SELECT_BINS
from .logit_map import _logit_u
from .rows import (BATCH_INTS, PER_TOKEN_POINTERS, _block_base, _block_offsets, _fold_parts, _lane_reduce_sum, _lanes,
                   _row_lead, _row_offset, _row_target, rows_aligned)

NB_BITS = tl.constexpr(11)
NB = tl.constexpr(SELECT_BINS)     # bins per pass
MAX_PASSES = tl.constexpr(3)
# fp32 rows with top-k and top-p: top-k's passes narrow its candidates until at most GATHER are at
# or above its k-th value's bin, whose d one more pass gathers for both filters to decide in
# registers (``_top_k_top_p_gathered``).
GATHER = tl.constexpr(SELECT_BINS)

# top-p's first pass bins d ≥ −64 (a token below carries < 2^−64 of the largest's mass, all of
# them together < 2^−33 of the row's for V < 2^31: below the fp32 rounding of any goal top_p < 1,
# so they are dropped, as the oracle drops them).
UNIFORM_RANGE = tl.constexpr(64.0)
KEY_INF = tl.constexpr(0xFF800000)  # _key(+inf): every finite or infinite d is at or below it
FLT_MAX = tl.constexpr(3.4028234663852886e38)
# A search over keys tests PROBE of them per step (``_probes``): 6 steps reach one of 2^32, 3 one of 2^16.
PROBE = tl.constexpr(64)
PROBES_32 = tl.constexpr(6)
PROBES_16 = tl.constexpr(3)
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
def _d_max(base):
    """Above any d of a row whose exponents are at base b: the largest logit's d is within half
    an ulp of b of 0."""
    return tl.abs(base) * 1.1920928955078125e-07 + 7.888609052210118e-31


@triton.jit
def _key(d):
    """fp32 → uint32 in the same order (−0 just below +0): the sign bit set for d ≥ +0, every bit
    flipped for d ≤ −0 (one xor, with a mask of the sign)."""
    b = d.to(tl.int32, bitcast=True)
    return ((b >> 31).to(tl.uint32, bitcast=True) | 0x80000000) ^ b.to(tl.uint32, bitcast=True)


@triton.jit
def _value(key):
    """The fp32 value of a key (``_key``'s inverse)."""
    b = tl.where((key >> 31) != 0, key & 0x7FFFFFFF, ~key)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _uniform_bin(d, lo, scale):
    """The bin of d ≥ lo among NB of width 1 / scale from lo (the last one open above):
    non-decreasing in d, so each bin is a run of keys (``_bin_start``)."""
    return tl.minimum(tl.maximum((d - lo) * scale, 0.0), NB - 1).to(tl.int32)


@triton.jit
def _key16(x, x32, KEYS16: tl.constexpr):
    """A logit x of the 16-bit type KEYS16 (x32: its fp32 value) → a uint32 whose bits from
    ``_key16_at`` on are its 16-bit key, in the same order (``_key``'s rule on 16 bits): bf16's is
    its fp32 value's key, whose upper half it is (the lower half 0 or 0xFFFF); fp16's is formed
    from its own bits."""
    if KEYS16 == tl.bfloat16:
        return _key(x32)
    else:
        b = x.to(tl.int16, bitcast=True).to(tl.int32)   # sign-extended: ~b flips the upper half to 0
        return (b ^ ((b >> 15) | 0x8000)).to(tl.uint32, bitcast=True)


@triton.jit
def _key16_at(KEYS16: tl.constexpr):
    """Where ``_key16``'s 16-bit key starts in its uint32: bit 16 for bf16, bit 0 for fp16."""
    return 16 if KEYS16 == tl.bfloat16 else 0


@triton.jit
def _key16_top(KEYS16: tl.constexpr):
    """The 16-bit key of +inf in the type KEYS16: every logit's key but NaN's is at or below it."""
    inf = tl.full([], float("inf"), KEYS16)
    return _key16(inf, inf.to(tl.float32), KEYS16) >> _key16_at(KEYS16)


@triton.jit
def _key_d(key, k, base, tanh_scale, SOFTCAP: tl.constexpr, KEYS16: tl.constexpr):
    """The d of a key: the key's own value (keys of d), or with KEYS16 the d of the 16-bit logit
    whose key it is, formed as the passes form it."""
    if KEYS16 is not None:
        b = tl.where((key >> 15) != 0, key & 0x7FFF, ~key & 0xFFFF)   # _value's, on 16 bits
        x = b.to(tl.uint16).to(KEYS16, bitcast=True).to(tl.float32)
        return tl.fma(_logit_u(x, tanh_scale, SOFTCAP), k, -base)
    else:
        return _value(key)


@triton.jit
def _probes(a, z):
    """One step of a search for the first key in [a, z) that passes a test monotone in the key (z
    where none does): the PROBE keys it tests at once, ``step`` apart from a (step =
    ⌈(z − a) / PROBE⌉, none past z), and the step: a binary search's 6 steps in one, each test in a
    thread of its own (PROBES_32 steps over keys of fp32 values, PROBES_16 over 16-bit ones)."""
    step = (z - a + (PROBE - 1)) // PROBE
    return a + tl.minimum(tl.arange(0, PROBE).to(tl.uint32) * step, z - a), step


@triton.jit
def _probed(c, up, a, z, step):
    """[a, z] narrowed by a step (``_probes``), ``up`` the test at its keys c (z passes): to the
    keys between the last that failed and the first that passed, fewer than ``step``."""
    j = tl.min(tl.where(up | (c == z), tl.arange(0, PROBE), PROBE), 0).to(tl.uint32)
    return tl.where(j == 0, a, a + (j - 1) * step + 1), tl.minimum(a + j * step, z)


@triton.jit
def _bin_start(b, start, key_top, lo, scale, k, base, tanh_scale, SOFTCAP: tl.constexpr, KEYS16: tl.constexpr):
    """The smallest key whose d falls in uniform bin b or above (``key_top`` + 1 for b ≥ NB): a
    search over the keys from ``start`` (bin 0's or below), once per row (``_probes``)."""
    a = start
    z = key_top + 1
    for _ in range(PROBES_32):
        c, step = _probes(a, z)
        a, z = _probed(c, _uniform_bin(_key_d(c, k, base, tanh_scale, SOFTCAP, KEYS16), lo, scale) >= b, a, z, step)
    return a


@triton.jit
def _block_d(p_blk, v0, o_blk, lo, hi, k, base, tanh_scale, MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """One block of a pass, at offsets from the row's block base where the row is [lo, hi)
    (rows.py): its logits as loaded, their fp32 values, their d, and (MASKED) which lanes lie on
    the row (off it: −inf)."""
    o_v = v0 + o_blk
    m_v = o_v == o_v
    if MASKED:
        m_v = (o_v >= lo) & (o_v < hi)
        b_raw = tl.load(p_blk + o_v, mask=m_v, other=float("-inf"))
    else:
        b_raw = tl.load(p_blk + o_v)
    b_x = b_raw.to(tl.float32)
    b_u = _logit_u(b_x, tanh_scale, SOFTCAP)
    if MASKED and SOFTCAP:
        b_u = tl.where(m_v, b_u, float("-inf"))  # the cap maps −inf to −1: drop the lanes off the row
    return b_raw, b_x, tl.fma(b_u, k, -base), m_v


@triton.jit
def _tally(b_raw, b_x, b_d, m_v, klo, khi, shift, lo_d, scale, hist, s_hi, s_in, a_hi, MASKED: tl.constexpr,
           UNIFORM: tl.constexpr, HI: tl.constexpr, IN: tl.constexpr, ENTROPY: tl.constexpr, R: tl.constexpr,
           LANES: tl.constexpr, VEC: tl.constexpr, delta=0.0, REBASED: tl.constexpr = False,
           KEYS16: tl.constexpr = None):
    """A block's candidates (``_block_d``) added to the bins of a pass; with HI the mass above the
    range (ENTROPY: and its Σ 2^d·d), with IN the mass within it; REBASED: those sums of
    d + ``delta`` (another base's d), the bins still of d; KEYS16: the keys (and bins) of the
    16-bit logits, not of d."""
    if UNIFORM:
        b_in = b_d >= lo_d
        b_bin = _uniform_bin(b_d, lo_d, scale)
    else:
        if KEYS16 is not None:
            b_key = _key16(b_raw, b_x, KEYS16)   # the bins' bounds as such keys (``_count_pass``)
        else:
            # + 0: −0 as +0 (d ≥ cut keeps both, so they need one key; an fma whose product
            # underflows below a base of +0 rounds to −0)
            b_key = _key(b_d + 0.0)
        b_in = (b_key >= klo) & (b_key <= khi)
        if MASKED and KEYS16 is not None:
            b_in = b_in & m_v                # the lanes off the row load −inf: a candidate key with a softcap
        b_bin = ((b_key - klo) >> shift).to(tl.int32)
        b_above = b_key > khi
    hist += tl.histogram(tl.reshape(b_bin, [R * LANES * VEC]), NB, mask=tl.reshape(b_in, [R * LANES * VEC]))
    if HI or IN:
        if REBASED:
            b_d = b_d + delta
        b_e = tl.exp2(b_d)
        if HI:
            b_e_hi = tl.where(b_above, b_e, 0.0)
            s_hi += _lane_reduce_sum(_lanes(b_e_hi, R, LANES, VEC))
            if ENTROPY:
                a_hi += _lane_reduce_sum(_lanes(b_e_hi * tl.where(b_above, b_d, 0.0), R, LANES, VEC))
        if IN:
            s_in += _lane_reduce_sum(_lanes(tl.where(b_in, b_e, 0.0), R, LANES, VEC))
    return hist, s_hi, s_in, a_hi


@triton.jit
def _count_step(p_blk, v0, o_blk, lo, hi, k, base, tanh_scale, klo, khi, shift, lo_d, scale, hist, s_hi, s_in, a_hi,
                MASKED: tl.constexpr, UNIFORM: tl.constexpr, HI: tl.constexpr, IN: tl.constexpr,
                ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr,
                VEC: tl.constexpr, delta=0.0, REBASED: tl.constexpr = False, KEYS16: tl.constexpr = None):
    """One block of a pass (``_block_d``) tallied (``_tally``)."""
    b_raw, b_x, b_d, m_v = _block_d(p_blk, v0, o_blk, lo, hi, k, base, tanh_scale, MASKED, SOFTCAP)
    return _tally(b_raw, b_x, b_d, m_v, klo, khi, shift, lo_d, scale, hist, s_hi, s_in, a_hi, MASKED, UNIFORM, HI, IN,
                  ENTROPY, R, LANES, VEC, delta, REBASED, KEYS16)


@triton.jit
def _placed(klo, khi, shift, KEYS16: tl.constexpr):
    """A run of keys [klo, khi] in bins of 2^shift as a pass compares them: with KEYS16, the 16-bit
    keys placed as ``_key16``'s."""
    if KEYS16 is not None:
        at = _key16_at(KEYS16)
        klo = klo << at
        khi = (khi << at) | ((1 << at) - 1)
        shift = shift + at
    return klo, khi, shift


@triton.jit
def _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift, lo_d, scale,
                UNIFORM: tl.constexpr, HI: tl.constexpr, IN: tl.constexpr, ENTROPY: tl.constexpr,
                SOFTCAP: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr, delta=0.0,
                REBASED: tl.constexpr = False, KEYS16: tl.constexpr = None):
    """One read of a valid row [lead, n_end) (blocks as in forward._lse_blocks): the (NB,) counts
    of its candidates by bin, uniform in d from ``lo_d`` (UNIFORM) or of 2^shift keys from klo
    over [klo, khi]; the mass above the range and its Σ 2^d·d, the mass within (``_count_step``;
    REBASED: the sums of d + ``delta``; KEYS16: keys of the 16-bit logits)."""
    BLOCK: tl.constexpr = R * LANES * VEC
    n_full = n_end // BLOCK * BLOCK
    klo, khi, shift = _placed(klo, khi, shift, KEYS16)
    hist = tl.zeros([NB], tl.int32)
    s_hi = tl.zeros([LANES], tl.float32)
    s_in = tl.zeros([LANES], tl.float32)
    a_hi = tl.zeros([LANES], tl.float32)
    hist, s_hi, s_in, a_hi = _count_step(p_blk, 0, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift, lo_d,
                                         scale, hist, s_hi, s_in, a_hi, True, UNIFORM, HI, IN, ENTROPY, SOFTCAP, R,
                                         LANES, VEC, delta, REBASED, KEYS16)
    for v0 in range(BLOCK, n_full, BLOCK):
        hist, s_hi, s_in, a_hi = _count_step(p_blk, v0, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift,
                                             lo_d, scale, hist, s_hi, s_in, a_hi, False, UNIFORM, HI, IN, ENTROPY,
                                             SOFTCAP, R, LANES, VEC, delta, REBASED, KEYS16)
    if (n_full > 0) & (n_full < n_end):
        hist, s_hi, s_in, a_hi = _count_step(p_blk, n_full, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift,
                                             lo_d, scale, hist, s_hi, s_in, a_hi, True, UNIFORM, HI, IN, ENTROPY,
                                             SOFTCAP, R, LANES, VEC, delta, REBASED, KEYS16)
    return hist, tl.sum(s_hi, 0), tl.sum(s_in, 0), tl.sum(a_hi, 0)


@triton.jit
def _joint_step(p_blk, v0, o_blk, lo, hi, k, base, tanh_scale, klo, khi, shift, lo_d, scale, klo_k, khi_k, shift_k,
                hist, s_hi, s_in, a_hi, hist_k, s_k, a_k, MASKED: tl.constexpr, UNIFORM: tl.constexpr,
                ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr,
                VEC: tl.constexpr, KEYS16: tl.constexpr = None, delta=0.0, REBASED: tl.constexpr = False,
                IN: tl.constexpr = True):
    """One block of ``_joint_pass``: its d tallied twice, for top-p's run and for top-k's."""
    b_raw, b_x, b_d, m_v = _block_d(p_blk, v0, o_blk, lo, hi, k, base, tanh_scale, MASKED, SOFTCAP)
    if UNIFORM:   # top-p's first pass, top-k's first over the keys: no mass above either
        hist, s_hi, s_in, a_hi = _tally(b_raw, b_x, b_d, m_v, klo, khi, shift, lo_d, scale, hist, s_hi, s_in, a_hi,
                                        MASKED, True, False, True, False, R, LANES, VEC)
        hist_k, s_k, unused, a_k = _tally(b_raw, b_x, b_d, m_v, klo_k, khi_k, shift_k, lo_d, scale, hist_k, s_k, s_k,
                                          a_k, MASKED, False, False, False, False, R, LANES, VEC, 0.0, False, KEYS16)
    else:
        hist, s_hi, s_in, a_hi = _tally(b_raw, b_x, b_d, m_v, klo, khi, shift, lo_d, scale, hist, s_hi, s_in, a_hi,
                                        MASKED, False, True, IN, ENTROPY, R, LANES, VEC, delta, REBASED, KEYS16)
        hist_k, s_k, unused, a_k = _tally(b_raw, b_x, b_d, m_v, klo_k, khi_k, shift_k, lo_d, scale, hist_k, s_k, s_k,
                                          a_k, MASKED, False, True, False, ENTROPY, R, LANES, VEC, delta, REBASED,
                                          KEYS16)
    return hist, s_hi, s_in, a_hi, hist_k, s_k, a_k


@triton.jit
def _joint_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift, lo_d, scale, klo_k, khi_k, shift_k,
                UNIFORM: tl.constexpr, ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, R: tl.constexpr,
                LANES: tl.constexpr, VEC: tl.constexpr, KEYS16: tl.constexpr = None, delta=0.0,
                REBASED: tl.constexpr = False, IN: tl.constexpr = True):
    """One read of a valid row [lead, n_end) (``_count_pass``'s blocks) for top-p's run and top-k's
    at once: top-p's [klo, khi] by bins of 2^shift keys, with the mass above it (ENTROPY: and its
    Σ 2^d·d) and within it, and top-k's [klo_k, khi_k] by bins of 2^shift_k keys, with the mass
    above it (and its Σ 2^d·d). UNIFORM: top-p's bins uniform in d from ``lo_d`` (``_count_pass``),
    with the mass within them only, top-k's with no mass. KEYS16: keys of the 16-bit logits.
    REBASED: the sums (not UNIFORM's) of d + ``delta``, as ``_count_pass``'s; IN False: not the
    mass within top-p's run (a last pass)."""
    BLOCK: tl.constexpr = R * LANES * VEC
    n_full = n_end // BLOCK * BLOCK
    klo, khi, shift = _placed(klo, khi, shift, KEYS16)
    klo_k, khi_k, shift_k = _placed(klo_k, khi_k, shift_k, KEYS16)
    hist = tl.zeros([NB], tl.int32)
    hist_k = tl.zeros([NB], tl.int32)
    s_hi = tl.zeros([LANES], tl.float32)
    s_in = tl.zeros([LANES], tl.float32)
    a_hi = tl.zeros([LANES], tl.float32)
    s_k = tl.zeros([LANES], tl.float32)
    a_k = tl.zeros([LANES], tl.float32)
    hist, s_hi, s_in, a_hi, hist_k, s_k, a_k = _joint_step(
        p_blk, 0, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift, lo_d, scale, klo_k, khi_k, shift_k, hist,
        s_hi, s_in, a_hi, hist_k, s_k, a_k, True, UNIFORM, ENTROPY, SOFTCAP, R, LANES, VEC, KEYS16, delta, REBASED,
        IN)
    for v0 in range(BLOCK, n_full, BLOCK):
        hist, s_hi, s_in, a_hi, hist_k, s_k, a_k = _joint_step(
            p_blk, v0, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift, lo_d, scale, klo_k, khi_k, shift_k,
            hist, s_hi, s_in, a_hi, hist_k, s_k, a_k, False, UNIFORM, ENTROPY, SOFTCAP, R, LANES, VEC, KEYS16, delta,
            REBASED, IN)
    if (n_full > 0) & (n_full < n_end):
        hist, s_hi, s_in, a_hi, hist_k, s_k, a_k = _joint_step(
            p_blk, n_full, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift, lo_d, scale, klo_k, khi_k,
            shift_k, hist, s_hi, s_in, a_hi, hist_k, s_k, a_k, True, UNIFORM, ENTROPY, SOFTCAP, R, LANES, VEC, KEYS16,
            delta, REBASED, IN)
    return (hist, tl.sum(s_hi, 0), tl.sum(s_in, 0), tl.sum(a_hi, 0), hist_k, tl.sum(s_k, 0),
            tl.sum(a_k, 0))


@triton.jit
def _gather_step(p_blk, v0, o_blk, lo, hi, k, base, tanh_scale, lo_d, p_gather, n, hist, klo, khi,
                 SLOTS: tl.constexpr, MASKED: tl.constexpr, COUNT: tl.constexpr, SOFTCAP: tl.constexpr,
                 R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """One block of ``_gather_pass``: its d ≥ lo_d stored from slot n on, lane by lane (each
    lane's slots after the lanes below it, in the order of its own elements: one scan across the
    lanes, the rest inside each thread); with COUNT its keys in [klo, khi] counted one bin a key;
    (the slots filled after it, the counts)."""
    b_raw, b_x, b_d, m_v = _block_d(p_blk, v0, o_blk, lo, hi, k, base, tanh_scale, MASKED, SOFTCAP)
    if COUNT:
        hist, s_hi, s_in, a_hi = _tally(b_raw, b_x, b_d, m_v, klo, khi, 0, 0.0, 0.0, hist, 0.0, 0.0, 0.0, MASKED,
                                        False, False, False, False, R, LANES, VEC)
    b_d = _lanes(b_d, R, LANES, VEC)
    b_in = (b_d >= lo_d).to(tl.int32)
    per_vec = tl.sum(b_in, 2)
    per_lane = tl.sum(per_vec, 0)
    before = (tl.cumsum(per_lane, 0) - per_lane)[None, :, None] + (tl.cumsum(per_vec, 0) - per_vec)[:, :, None]
    slot = n + before + tl.cumsum(b_in, 2) - 1
    tl.store(p_gather + slot, b_d, mask=(b_in > 0) & (slot < SLOTS))
    return n + tl.sum(per_lane, 0), hist


@triton.jit
def _gather_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, lo_d, p_gather, SLOTS: tl.constexpr,
                 SOFTCAP: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr, n=0, klo=0,
                 khi=0, COUNT: tl.constexpr = False):
    """One read of a valid row [lead, n_end) (``_count_pass``'s blocks): its d ≥ ``lo_d`` stored
    at ``p_gather`` from slot n on, below slot SLOTS, block by block; with COUNT the keys of d in
    [klo, khi] (at most NB) counted one bin a key. (the slots filled after them, the (NB,) counts)."""
    BLOCK: tl.constexpr = R * LANES * VEC
    n_full = n_end // BLOCK * BLOCK
    hist = tl.zeros([NB], tl.int32)
    n, hist = _gather_step(p_blk, 0, o_blk, lead, n_end, k, base, tanh_scale, lo_d, p_gather, n, hist, klo, khi,
                           SLOTS, True, COUNT, SOFTCAP, R, LANES, VEC)
    for v0 in range(BLOCK, n_full, BLOCK):
        n, hist = _gather_step(p_blk, v0, o_blk, lead, n_end, k, base, tanh_scale, lo_d, p_gather, n, hist, klo, khi,
                               SLOTS, False, COUNT, SOFTCAP, R, LANES, VEC)
    if (n_full > 0) & (n_full < n_end):
        n, hist = _gather_step(p_blk, n_full, o_blk, lead, n_end, k, base, tanh_scale, lo_d, p_gather, n, hist, klo,
                               khi, SLOTS, True, COUNT, SOFTCAP, R, LANES, VEC)
    return n, hist


@triton.jit
def _bits(span):
    """How many bits a uint32 span needs, or one more (its float's exponent, rounded up)."""
    exponent = (span.to(tl.float32).to(tl.uint32, bitcast=True) >> 23).to(tl.int32) - 127
    return tl.maximum(exponent + 1, 0)


@triton.jit
def _decide(cnt, w_lo, w_hi, above, s_hi, s_in, goal, shift, i, BY_MASS: tl.constexpr):
    """(kept, ambiguous, the highest and the lowest ambiguous bin) of a pass from the bins' weight
    bounds [w_lo, w_hi] (top-k: the counts), the weight ``above`` the range, and for top-p the
    exact masses above the range (``s_hi``) and, but in the last pass, within it (``s_in``),
    which bound each bin's weight above from below as well, for pass ``i`` with bins of
    2^``shift`` keys (a uniform pass: shift 1, bins of several values). In the last pass the
    ambiguous ones are decided by the middle of the bounds on the weight above them: a bin is
    kept whole where its highest token would be, a tie group with it as the sort keeps one."""
    o_bin = tl.arange(0, NB)
    multi = shift > 0
    more = i < MAX_PASSES - 1
    above_lo = above + (tl.cumsum(w_lo, 0, reverse=True) - w_lo)   # the bins above each bin
    above_hi = above + (tl.cumsum(w_hi, 0, reverse=True) - w_hi)
    if BY_MASS:  # and from below: the range's exact mass less what the bins up to each hold
        above_lo = tl.where(multi & more, tl.maximum(above_lo, s_hi + s_in - tl.cumsum(w_hi, 0)), above_lo)
        above_hi = tl.where(multi & more, tl.minimum(above_hi, s_hi + s_in - tl.cumsum(w_lo, 0)), above_hi)
    # A bin of several values: its other tokens may lie above a token of it.
    others = tl.where(multi, w_hi - w_hi / tl.maximum(cnt, 1.0), 0.0)
    full = cnt > 0
    kept = full & (tl.where(more, above_hi + others, 0.5 * (above_lo + above_hi)) < goal)
    # Every token above a kept one is kept: a bin above a kept bin is, whatever its own bounds say.
    kept = full & (tl.cumsum(kept.to(tl.int32), 0) > 0)
    ambiguous = full & ~kept & (above_lo < goal) & more & multi
    return kept, ambiguous, tl.max(tl.where(ambiguous, o_bin, -1), 0), tl.min(tl.where(ambiguous, o_bin, NB), 0)


@triton.jit
def _kept_sums(kept, e, d, s_above, a_above):
    """(Σ 2^d, Σ 2^d·d) of the ``kept`` bins of one key each (their masses e and d), and the sums
    above them."""
    e = tl.where(kept, e, 0.0)
    return s_above + tl.sum(e, 0), a_above + tl.sum(tl.where(kept, e * d, 0.0), 0)


@triton.jit
def _tied_sums(cnt, d, cut, s_above, a_above):
    """``_kept_sums`` of the bins of one 16-bit key each with d ≥ ``cut``: distinct keys may share a
    d, and the kept set takes such a tie group whole (``_settle`` adds its part below the bins)."""
    kept = (cnt > 0) & (d >= cut)
    return _kept_sums(kept, tl.where(kept, cnt * tl.exp2(d), 0.0), d, s_above, a_above)


@triton.jit
def _narrow(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, cut_key, done, above, goal, s_kept, a_kept,
            i0, BY_MASS: tl.constexpr, WITH_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, KEYS16: tl.constexpr,
            R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """Passes i0 … MAX_PASSES − 1 of a selection over bins of keys (of d, or of the 16-bit logits):
    each counts the candidates in [klo, khi] by bins of 2^shift keys and narrows [klo, khi] to the
    bins it could not decide, until one decides the row (``done``). ``above``: top-k's count above
    the range (top-p's mass above it is summed by each pass). (the lowest kept key, s, a:
    the kept tokens' sums where the deciding pass had single keys or was the last, else as
    given; whether that pass's bins held several keys, and the lowest key its sums cover: for
    ``_settle``)."""
    o_bin = tl.arange(0, NB)
    if KEYS16 is not None:
        key_top = klo * 0 + _key16_top(KEYS16)
    else:
        key_top = klo * 0 + KEY_INF
    boundary = done != done                  # False, as a runtime flag
    counted = klo
    for i in range(i0, MAX_PASSES):
        if not done:
            shift = tl.maximum(_bits(khi - klo) - NB_BITS, 0)
            multi = shift > 0
            count = multi & (i < MAX_PASSES - 1)
            if not BY_MASS:
                count = multi   # top-k's last pass has single keys (11 + 11 + 10 bits, or 11 + 5)
            if count:
                hist, s_hi, s_in, a_hi = _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift,
                                                     0.0, 0.0, False, BY_MASS, BY_MASS, False, SOFTCAP, R, LANES, VEC,
                                                     0.0, False, KEYS16)
            elif multi:  # top-p's last pass: it decides, and sums the kept tokens
                hist, s_hi, s_in, a_hi = _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift,
                                                     0.0, 0.0, False, True, False, WITH_ENTROPY, SOFTCAP, R, LANES,
                                                     VEC, 0.0, False, KEYS16)
            else:  # single keys (a loop of its own, without the shift): the same
                hist, s_hi, s_in, a_hi = _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, 0,
                                                     0.0, 0.0, False, True, False, WITH_ENTROPY, SOFTCAP, R, LANES,
                                                     VEC, 0.0, False, KEYS16)
            cnt = hist.to(tl.float32)
            width = ((1 << shift) - 1).to(tl.uint32)
            lo_key = klo + (o_bin.to(tl.uint32) << shift)
            d_lo = _key_d(lo_key, k, base, tanh_scale, SOFTCAP, KEYS16)
            e_lo = tl.where(cnt > 0, tl.exp2(d_lo), 0.0)   # empty bins past khi: never read
            if BY_MASS:
                above = s_hi
                w_lo = cnt * e_lo
                d_hi = tl.minimum(_key_d(lo_key + tl.minimum(width, khi - lo_key), k, base, tanh_scale, SOFTCAP,
                                         KEYS16), _d_max(base))
                w_hi = tl.where(cnt > 0, cnt * tl.exp2(d_hi), 0.0)
            else:
                w_lo = cnt
                w_hi = cnt
            kept, ambiguous, b_hi, b_lo = _decide(cnt, w_lo, w_hi, above, s_hi, s_in, goal, shift, i, BY_MASS)
            if b_hi < 0:
                b_kept = tl.min(tl.where(kept, o_bin, NB), 0)
                cut_key = tl.where(b_kept < NB, klo + (b_kept.to(tl.uint32) << shift),
                                   tl.minimum(khi + 1, key_top))
                done = b_hi < 0
                boundary = multi | (b_kept >= NB)   # a bin's edge, or the key above the range
                counted = tl.where(boundary, cut_key, klo)
                if not multi:
                    if KEYS16 is not None:
                        # (none kept here: the cut is the key above, its ties are ``_settle``'s)
                        s_kept, a_kept = _tied_sums(tl.where(b_kept < NB, cnt, 0.0), d_lo,
                                                    _key_d(cut_key, k, base, tanh_scale, SOFTCAP, KEYS16), s_hi, a_hi)
                    else:
                        s_kept, a_kept = _kept_sums(kept, cnt * e_lo, d_lo, s_hi, a_hi)
                elif BY_MASS:
                    if i == MAX_PASSES - 1:
                        # Each kept bin's mass at the middle of its bounds, at its lowest d.
                        e_kept = tl.where(kept, 0.5 * (w_lo + w_hi), 0.0)
                        s_kept = s_hi + tl.sum(e_kept, 0)
                        if WITH_ENTROPY:
                            a_kept = a_hi + tl.sum(tl.where(kept, e_kept * d_lo, 0.0), 0)
            else:
                if not BY_MASS:
                    above += tl.sum(tl.where(o_bin > b_hi, cnt, 0.0), 0)
                top = klo + (b_hi.to(tl.uint32) << shift)
                khi = top + tl.minimum(width, khi - top)
                klo = klo + (b_lo.to(tl.uint32) << shift)
    return cut_key, s_kept, a_kept, boundary, counted


@triton.jit
def _first_key(floor, k, base, tanh_scale, SOFTCAP: tl.constexpr, KEYS16: tl.constexpr, ABOVE: tl.constexpr):
    """The smallest key of a KEYS16 logit whose d is ≥ ``floor`` (ABOVE: > floor), +inf's key + 1
    where none is: a search over the 2^16 keys up to +inf's (``_probes``), whose d is finite under
    a softcap (cap / τ, as the largest logit's)."""
    a = _key(floor) * 0
    z = a + _key16_top(KEYS16) + 1
    for _ in range(PROBES_16):
        c, step = _probes(a, z)
        d = _key_d(c, k, base, tanh_scale, SOFTCAP, KEYS16)
        if ABOVE:
            up = d > floor
        else:
            up = d >= floor
        a, z = _probed(c, up, a, z, step)
    return a


@triton.jit
def _count_keys(p_blk, o_blk, lead, n_end, k, base, tanh_scale, lo, hi, SOFTCAP: tl.constexpr, KEYS16: tl.constexpr,
                R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """How many of the row's logits have a 16-bit key in [lo, hi] (one read)."""
    hist, s_hi, s_in, a_hi = _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, lo, hi,
                                         tl.maximum(_bits(hi - lo) - NB_BITS, 0), 0.0, 0.0, False, False, False, False,
                                         SOFTCAP, R, LANES, VEC, 0.0, False, KEYS16)
    return tl.sum(hist, 0)


@triton.jit
def _settle(p_blk, o_blk, lead, n_end, k, base, tanh_scale, cut_key, s, a, counted, boundary,
            SOFTCAP: tl.constexpr, KEYS16: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """(the threshold on d, s, a) of a selection over 16-bit keys whose kept keys are those from
    ``cut_key`` up. Distinct keys may share a d, and the kept set d ≥ threshold takes such a tie
    group whole where it holds a kept token, as the sort of the d would. Where ``cut_key`` ties
    with the key below it: if it is the lowest key of a bin of several (``boundary``), possibly
    without a token, the group is counted, and without a token from ``cut_key`` up the threshold
    moves above it; where it stays, the group's tokens below ``counted`` (the lowest key the sums
    s ≥ 0 cover) are counted into s and a. A read each, on such ties only."""
    d_cut = _key_d(cut_key, k, base, tanh_scale, SOFTCAP, KEYS16)
    if _key_d(cut_key - 1, k, base, tanh_scale, SOFTCAP, KEYS16) == d_cut:
        if boundary:
            top = _first_key(d_cut, k, base, tanh_scale, SOFTCAP, KEYS16, True) - 1
            if _count_keys(p_blk, o_blk, lead, n_end, k, base, tanh_scale, cut_key, top, SOFTCAP, KEYS16, R, LANES,
                           VEC) == 0:
                counted = top + 1            # nothing kept in the group: the threshold above it
                d_cut = _key_d(counted, k, base, tanh_scale, SOFTCAP, KEYS16)
        if (s >= 0) & (_key_d(counted - 1, k, base, tanh_scale, SOFTCAP, KEYS16) == d_cut):
            n = _count_keys(p_blk, o_blk, lead, n_end, k, base, tanh_scale,
                            _first_key(d_cut, k, base, tanh_scale, SOFTCAP, KEYS16, False), counted - 1, SOFTCAP,
                            KEYS16, R, LANES, VEC)
            e = n.to(tl.float32) * tl.exp2(d_cut)
            s += e
            a += e * d_cut
    return d_cut, s, a


@triton.jit
def _uniform_bounds(cnt, lo_d, hi_d):
    """Bounds on the mass of each bin of a uniform pass over [lo_d, hi_d] holding ``cnt`` tokens:
    its d bounds, widened by far more than the rounding of (d − lo_d) · scale."""
    o_bin = tl.arange(0, NB)
    bin_d = (hi_d - lo_d) / NB
    margin = (hi_d - lo_d) * 9.5367431640625e-07
    w_lo = tl.where(cnt > 0, cnt * tl.exp2(lo_d + o_bin.to(tl.float32) * bin_d - margin), 0.0)
    w_hi = tl.where(cnt > 0, cnt * tl.exp2(lo_d + (o_bin + 1).to(tl.float32) * bin_d + margin), 0.0)
    return w_lo, w_hi


@triton.jit
def _select_keys(p_blk, o_blk, lead, n_end, k, base, tanh_scale, floor, goal,
                 BY_MASS: tl.constexpr, WITH_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, KEYS16: tl.constexpr,
                 R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """One filter over the candidates d ≥ ``floor`` (> −inf): top-k (goal k, counts), or with
    BY_MASS top-p (goal top_p, a share of the candidates' mass), over keys of d or (KEYS16) of
    the 16-bit logits, from the candidates' first key up to the largest logit's. (``_narrow``'s: the
    lowest kept key, s, a, whether it is a bin's edge, the lowest key s covers)."""
    o_bin = tl.arange(0, NB)
    if KEYS16 is not None:
        klo = _first_key(floor, k, base, tanh_scale, SOFTCAP, KEYS16, False)
        key_top = klo * 0 + _key16_top(KEYS16)
        khi = key_top                        # top-p: its uniform pass sets the keys' range
        if not BY_MASS:
            khi = _first_key(_d_max(base), k, base, tanh_scale, SOFTCAP, KEYS16, True) - 1
    else:
        klo = _key(floor)
        khi = klo * 0 + KEY_INF
        key_top = khi
    cut_key = klo
    done = floor != floor                    # False, as a runtime flag
    if BY_MASS:
        # Pass 1, uniform in d over [lo_d, hi_d]. Its goal: top_p of the mass from lo_d (see
        # UNIFORM_RANGE).
        lo_d = tl.maximum(floor, -UNIFORM_RANGE)
        hi_d = _d_max(base)
        scale = NB / (hi_d - lo_d)
        hist, s_none, s_in, a_none = _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, 0, lo_d,
                                                 scale, True, False, True, False, SOFTCAP, R, LANES, VEC)
        goal = goal * s_in
        cnt = hist.to(tl.float32)
        w_lo, w_hi = _uniform_bounds(cnt, lo_d, hi_d)
        kept, ambiguous, b_hi, b_lo = _decide(cnt, w_lo, w_hi, s_none, s_none, s_in, goal, 1, 0, True)
        start = klo                          # 16-bit keys: the candidates' first (no NaN below)
        if KEYS16 is None:
            start = _key(lo_d)
        if b_hi < 0:
            cut_key = tl.minimum(_bin_start(tl.min(tl.where(kept, o_bin, NB), 0), start, key_top, lo_d, scale, k,
                                            base, tanh_scale, SOFTCAP, KEYS16), key_top)
            done = b_hi < 0
        else:
            klo = _bin_start(b_lo, start, key_top, lo_d, scale, k, base, tanh_scale, SOFTCAP, KEYS16)
            khi = _bin_start(b_hi + 1, start, key_top, lo_d, scale, k, base, tanh_scale, SOFTCAP, KEYS16) - 1
    return _narrow(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, cut_key, done, floor * 0.0, goal,
                   floor * 0.0 - 1.0, floor * 0.0, 1 if BY_MASS else 0, BY_MASS, WITH_ENTROPY, SOFTCAP, KEYS16, R,
                   LANES, VEC)


@triton.jit
def _threshold(p_blk, o_blk, lead, n_end, k, base, tanh_scale, floor, goal,
               BY_MASS: tl.constexpr, WITH_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, KEYS16: tl.constexpr,
               R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """(the smallest kept d, s, a) of one filter (``_select_keys``). s and a: the kept tokens'
    Σ 2^d and Σ 2^d·d when the deciding pass had single-key bins or was the last, else s = −1
    (the forward's finish sums them)."""
    cut_key, s, a, boundary, counted = _select_keys(p_blk, o_blk, lead, n_end, k, base, tanh_scale, floor, goal,
                                                    BY_MASS, WITH_ENTROPY, SOFTCAP, KEYS16, R, LANES, VEC)
    if KEYS16 is not None:
        cut, s, a = _settle(p_blk, o_blk, lead, n_end, k, base, tanh_scale, cut_key, s, a, counted, boundary,
                            SOFTCAP, KEYS16, R, LANES, VEC)
    else:
        cut = _value(cut_key)
    return cut, s, a


@triton.jit
def _top_k_top_p_keys16(p_blk, o_blk, lead, n_end, k, base, tanh_scale, floor, top_k, top_p,
                        WITH_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, KEYS16: tl.constexpr, R: tl.constexpr,
                        LANES: tl.constexpr, VEC: tl.constexpr):
    """(the smallest kept d, s, a) of top-k then top-p over the candidates d ≥ ``floor`` of a row
    of 16-bit logits, on their own keys (d is monotone in them), the candidates' first key up to the
    largest logit's. One first pass (bins of ≤ 32 keys) serves both filters. The bin that holds
    top-k's k-th value is counted again by single keys, which makes top-k's cut and the mass it
    keeps exact. Then top-p decides among those single keys, or the first pass's bins above them,
    or counts the run of bins it could not decide by single keys where the run has at most NB
    keys. Where the run that the first pass's bounds on top-k's mass leave top-p may be wider, the
    second pass counts it beside top-k's bin and a third decides it (``_joint_passes``): the
    statistics and three passes at most. The cut then made a threshold on d (``_settle``)."""
    o_bin = tl.arange(0, NB)
    klo = _first_key(floor, k, base, tanh_scale, SOFTCAP, KEYS16, False)
    khi = _first_key(_d_max(base), k, base, tanh_scale, SOFTCAP, KEYS16, True) - 1
    shift = tl.maximum(_bits(khi - klo) - NB_BITS, 0)
    width = ((1 << shift) - 1).to(tl.uint32)
    # (zero: the mass above the keys counted, none; s_all: the candidates' mass)
    hist, zero, s_all, unused = _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift, 0.0,
                                            0.0, False, False, True, False, SOFTCAP, R, LANES, VEC, 0.0, False, KEYS16)
    cnt = hist.to(tl.float32)
    lo_key = klo + (o_bin.to(tl.uint32) << shift)
    d_lo = _key_d(lo_key, k, base, tanh_scale, SOFTCAP, KEYS16)
    # top-k: f, the bin of its k-th value (or its lowest kept bin, where the bins decide it), counted
    # again by single keys: its cut and the kept tokens' sums, exact. −1 where it keeps every candidate.
    kept, ambiguous, b_amb, b_lo = _decide(cnt, cnt, cnt, zero, zero, zero, top_k.to(tl.float32), shift, 0, False)
    b_kept = tl.min(tl.where(kept, o_bin, NB), 0)
    f = tl.where(b_amb >= 0, b_amb, tl.where(b_kept > tl.min(tl.where(cnt > 0, o_bin, NB), 0), b_kept, -1))
    kf = top_k.to(tl.float32)
    d_hi = tl.minimum(_key_d(lo_key + tl.minimum(width, khi - lo_key), k, base, tanh_scale, SOFTCAP, KEYS16),
                      _d_max(base))
    # top-p's run among the first pass's bins from f up, for every goal the bounds [m_lo, m_hi] on
    # the mass top-k keeps allow (a bin kept for the lower goal is kept, one dropped for the upper
    # is dropped): where it is wider than NB keys, both go on side by side
    wide = f < -1                            # False, as a runtime flag
    f_lo = klo
    above_f = zero
    m_lo = s_all
    m_hi = s_all
    r_lo = klo
    r_hi = klo
    cut_p = klo
    if f >= 0:
        f_lo = klo + (f.to(tl.uint32) << shift)
        w_lo = tl.where(cnt > 0, cnt * tl.exp2(d_lo), 0.0)
        w_hi = tl.where(cnt > 0, cnt * tl.exp2(d_hi), 0.0)
        above_f = tl.sum(tl.where(o_bin > f, cnt, 0.0), 0)
        m_lo = tl.sum(tl.where(o_bin > f, w_lo, 0.0), 0) + (kf - above_f) * tl.exp2(
            _key_d(f_lo, k, base, tanh_scale, SOFTCAP, KEYS16))
        m_hi = tl.minimum(s_all, tl.sum(tl.where(o_bin >= f, w_hi, 0.0), 0))
        if _key_d(f_lo - 1, k, base, tanh_scale, SOFTCAP, KEYS16) == _key_d(f_lo, k, base, tanh_scale, SOFTCAP, KEYS16):
            m_hi = s_all                     # a tie group in d reaches below f: top-k may keep some of it
        sure, sure_run, b_hi, b_lo = _decide(cnt, w_lo, w_hi, zero, zero, s_all, top_p * m_lo, shift, 0, True)
        maybe, run, b_hi, b_lo = _decide(cnt, w_lo, w_hi, zero, zero, s_all, top_p * m_hi, shift, 0, True)
        run = (maybe | run) & ~sure & (o_bin >= f)
        b_hi = tl.max(tl.where(run, o_bin, -1), 0)
        b_lo = tl.min(tl.where(run, o_bin, NB), 0)
        r_lo = klo + (b_lo.to(tl.uint32) << shift)
        top = klo + (b_hi.to(tl.uint32) << shift)
        r_hi = top + tl.minimum(width, khi - top)
        wide = (b_hi >= 0) & (r_hi - r_lo >= NB)
        b_sure = tl.min(tl.where(sure, o_bin, NB), 0)
        cut_p = tl.where(b_sure < NB, klo + (b_sure.to(tl.uint32) << shift), tl.minimum(khi + 1, _key16_top(KEYS16)))
    if wide:
        cut_key, s_kept, a_kept, boundary, counted = _joint_passes(
            p_blk, o_blk, lead, n_end, k, base, tanh_scale, kf, top_p, f_lo, f_lo + tl.minimum(width, khi - f_lo),
            above_f, f < 0, f_lo, m_lo, m_hi, zero, r_lo, r_hi, cut_p, f < 0, klo * 0 + _key16_top(KEYS16),
            WITH_ENTROPY, SOFTCAP, KEYS16, R, LANES, VEC)
    else:
        cut_key = klo
        s_kept = zero - 1.0
        a_kept = zero
        boundary = f > NB                        # False: the cut is a single key, or a bin's edge (``_settle``)
        counted = klo                            # the lowest key the sums cover
        s_top = s_all                            # the mass top-k keeps
        m_range = s_all                          # the mass of the bins above f
        f_lo = klo
        cnt_f = cnt * 0.0
        d_f = d_lo
        a_hi = zero
        if f >= 0:
            f_lo = klo + (f.to(tl.uint32) << shift)
            hist_f, m_range, unused, a_hi = _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, f_lo,
                                                        f_lo + tl.minimum(width, khi - f_lo), 0, 0.0, 0.0, False, True,
                                                        False, WITH_ENTROPY, SOFTCAP, R, LANES, VEC, 0.0, False, KEYS16)
            cnt_f = hist_f.to(tl.float32)
            d_f = _key_d(f_lo + o_bin.to(tl.uint32), k, base, tanh_scale, SOFTCAP, KEYS16)
            # (single keys decide by the counts: pass 1 of 3, ``_decide``'s "more to come")
            kept_f, ambiguous, b_amb, b_lo = _decide(cnt_f, cnt_f, cnt_f, tl.sum(tl.where(o_bin > f, cnt, 0.0), 0),
                                                     zero, zero, kf, 0, 1, False)
            cut_key = f_lo + tl.min(tl.where(kept_f, o_bin, NB), 0).to(tl.uint32)
            cut_d = _key_d(cut_key, k, base, tanh_scale, SOFTCAP, KEYS16)
            s_top, a_kept = _tied_sums(cnt_f, d_f, cut_d, m_range, a_hi)
            if _key_d(f_lo - 1, k, base, tanh_scale, SOFTCAP, KEYS16) == cut_d:   # its tie group reaches below f
                s_top += _count_keys(p_blk, o_blk, lead, n_end, k, base, tanh_scale,
                                     _first_key(cut_d, k, base, tanh_scale, SOFTCAP, KEYS16, False), f_lo - 1, SOFTCAP,
                                     KEYS16, R, LANES, VEC).to(tl.float32) * tl.exp2(cut_d)
        goal = top_p * s_top
        if (f >= 0) & (m_range < goal):  # top-p keeps every token above f: its cut among f's single keys
            e_f = tl.where(cnt_f > 0, cnt_f * tl.exp2(d_f), 0.0)
            kept_f, ambiguous, b_amb, b_lo = _decide(cnt_f, e_f, e_f, m_range, zero, zero, goal, 0, 1, True)
            cut_key = f_lo + tl.min(tl.where(kept_f, o_bin, NB), 0).to(tl.uint32)
            s_kept, a_kept = _tied_sums(cnt_f, d_f, _key_d(cut_key, k, base, tanh_scale, SOFTCAP, KEYS16), m_range,
                                        a_hi)
            counted = f_lo
        else:  # among the first pass's bins above f
            in_range = (cnt > 0) & (o_bin > f)
            w_lo = tl.where(in_range, cnt * tl.exp2(d_lo), 0.0)
            w_hi = tl.where(in_range, cnt * tl.exp2(d_hi), 0.0)
            kept, ambiguous, b_hi, b_lo = _decide(tl.where(in_range, cnt, 0.0), w_lo, w_hi, zero, zero, m_range,
                                                  goal, shift, 0, True)
            r_lo = klo + (b_lo.to(tl.uint32) << shift)
            top = klo + (b_hi.to(tl.uint32) << shift)
            r_hi = top + tl.minimum(width, khi - top)
            if b_hi < 0:  # decided: the lowest kept bin's lowest key; the sums where the bins are single keys
                cut_key = klo + (tl.min(tl.where(kept, o_bin, NB), 0).to(tl.uint32) << shift)
                s_kept = zero - 1.0
                boundary = shift > 0
                counted = cut_key
                if shift == 0:
                    s_kept, a_kept = _tied_sums(tl.where(in_range, cnt, 0.0), d_lo,
                                                _key_d(cut_key, k, base, tanh_scale, SOFTCAP, KEYS16), zero, zero)
                    counted = klo + (f + 1).to(tl.uint32)
            elif r_hi - r_lo < NB:  # a run of at most NB keys: one pass of single keys decides it
                cut_key, s_kept, a_kept, boundary, counted = _narrow(
                    p_blk, o_blk, lead, n_end, k, base, tanh_scale, r_lo, r_hi, cut_key, b_hi < 0, zero, goal,
                    zero - 1.0, a_kept, MAX_PASSES - 1, True, WITH_ENTROPY, SOFTCAP, KEYS16, R, LANES, VEC)
            else:  # a wider run, where top-k keeps every candidate (f < 0): top-p's passes 2 and 3 over its keys
                cut_key, s_kept, a_kept, boundary, counted = _narrow(
                    p_blk, o_blk, lead, n_end, k, base, tanh_scale, r_lo, r_hi, cut_key, b_hi < 0, zero, goal,
                    zero - 1.0, a_kept, 1, True, WITH_ENTROPY, SOFTCAP, KEYS16, R, LANES, VEC)
    return _settle(p_blk, o_blk, lead, n_end, k, base, tanh_scale, cut_key, s_kept, a_kept, counted, boundary,
                   SOFTCAP, KEYS16, R, LANES, VEC)


@triton.jit
def _lowest_kept_key(w, d, goal, lo, hi):
    """The smallest key c in [lo, hi] whose value v leaves Σ w over the d > v below ``goal`` (w:
    1 for top-k's count, each token's mass for top-p's): a binary search over the keys, the
    answer ≤ hi where the weight above hi is 0."""
    for _ in range(32):
        m = lo + (hi - lo) // 2
        below = tl.sum(tl.where(d > _value(m), w, 0.0), 0) < goal
        hi = tl.where(below & (lo < hi), m, hi)
        lo = tl.where(~below & (lo < hi), m + 1, lo)
    return lo


@triton.jit
def _kept_cut(d, w, top_k, top_p, WITH_ENTROPY: tl.constexpr):
    """(the smallest kept d, s, a) of top-k then top-p among candidates held in registers: values
    d (−inf: none), w tokens each, every token top-k may keep. top-k keeps the d with fewer than k
    above them, top-p of those the d with below top_p of their mass above them (each
    ``_lowest_kept_key``), ties together. s and a: the kept tokens' sums, exact."""
    top = _key(tl.max(d, 0))
    c = _lowest_kept_key(w, d, top_k.to(tl.float32), _key(tl.min(tl.where(d > float("-inf"), d, float("inf")), 0)),
                         top)
    e = tl.where(d >= _value(c), w * tl.exp2(d), 0.0)
    c = _lowest_kept_key(e, d, top_p * tl.sum(e, 0), c, top)
    kept = d >= _value(c)
    e = tl.where(kept, e, 0.0)
    a = tl.sum(e, 0) * 0.0
    if WITH_ENTROPY:
        a = tl.sum(tl.where(kept, e * d, 0.0), 0)
    return tl.min(tl.where(kept, d, float("inf")), 0), tl.sum(e, 0), a


@triton.jit
def _gathered_cut(p_gather, n, top_k, top_p, SLOTS: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """``_kept_cut`` of the n candidates' d gathered at ``p_gather``."""
    o = tl.arange(0, SLOTS)
    return _kept_cut(tl.load(p_gather + o, mask=o < n, other=float("-inf")), 1.0, top_k, top_p, WITH_ENTROPY)


@triton.jit
def _top_k_top_p_gathered(p_blk, o_blk, lead, n_end, k, base, tanh_scale, floor, top_k, top_p, p_gather,
                          SLOTS: tl.constexpr, WITH_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, R: tl.constexpr,
                          LANES: tl.constexpr, VEC: tl.constexpr):
    """(the smallest kept d, s, a) of top-k (k ≤ SLOTS) then top-p over the candidates d ≥ ``floor``
    of a row of fp32 logits. top-k's passes over keys of d (``_narrow``'s bins) find the bin of
    its k-th value; once at most SLOTS tokens lie from that bin's lowest key up, one pass more
    gathers their d (``_gather_pass``, to ``p_gather``), and ``_gathered_cut`` decides both filters
    from them and sums the kept tokens: the statistics and three passes at most, two where the
    first pass's bins leave at most SLOTS. Where two passes leave more (or one leaves a bin of one
    key: a tie group), fewer than k lie above the bin: the pass gathers those and counts the bin,
    at most NB keys, one bin a key, and both filters are decided from the two (``_kept_cut``)."""
    o_bin = tl.arange(0, NB)
    klo = _key(floor)
    khi = _key(_d_max(base))                 # above every d of the row
    above = floor * 0.0                      # top-k's count above [klo, khi]
    counting = floor == floor                # True, as a runtime flag: top-k's candidates still to narrow
    gather = ~counting
    for i in range(MAX_PASSES - 1):
        if counting:
            shift = tl.maximum(_bits(khi - klo) - NB_BITS, 0)
            hist, s_hi, s_in, a_hi = _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift,
                                                 0.0, 0.0, False, False, False, False, SOFTCAP, R, LANES, VEC)
            cnt = hist.to(tl.float32)
            from_bin = above + tl.cumsum(cnt, 0, reverse=True)   # the tokens from each bin's lowest key up
            f = tl.max(tl.where(from_bin >= top_k.to(tl.float32), o_bin, 0), 0)   # the k-th value's bin, or 0
            n_f = tl.sum(tl.where(o_bin == f, from_bin, 0.0), 0)
            lo_f = klo + (f.to(tl.uint32) << shift)
            gather = n_f <= SLOTS
            counting = ~gather & (shift > 0)   # (n_f > SLOTS ≥ k: the bin holds the k-th value)
            if not gather:
                khi = lo_f + tl.minimum(((1 << shift) - 1).to(tl.uint32), khi - lo_f)
                above = n_f - tl.sum(tl.where(o_bin == f, cnt, 0.0), 0)
            klo = lo_f
    if gather:
        n, unused = _gather_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, _value(klo), p_gather, SLOTS,
                                 SOFTCAP, R, LANES, VEC)
        tl.debug_barrier()                   # every thread's slots stored before any reads them
        cut, s, a = _gathered_cut(p_gather, tl.minimum(n, SLOTS), top_k, top_p, SLOTS, WITH_ENTROPY)
    else:   # the tokens above [klo, khi] (fewer than k) gathered, the bin's keys counted
        n, hist = _gather_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, _value(khi + 1), p_gather, SLOTS,
                               SOFTCAP, R, LANES, VEC, 0, klo, khi, True)
        tl.debug_barrier()
        cnt = hist.to(tl.float32)
        d = tl.load(p_gather + o_bin, mask=o_bin < tl.minimum(n, SLOTS), other=float("-inf"))
        first = tl.arange(0, 2)[:, None] == 0     # row 0 the gathered tokens, row 1 the bin's keys
        d = tl.where(first, d[None, :], tl.where(cnt > 0, _value(klo + o_bin.to(tl.uint32)), float("-inf"))[None, :])
        w = tl.where(first, tl.where(o_bin < n, 1.0, 0.0)[None, :], cnt[None, :])
        cut, s, a = _kept_cut(tl.reshape(d, [2 * NB]), tl.reshape(w, [2 * NB]), top_k, top_p, WITH_ENTROPY)
    return cut, s, a


@triton.jit
def _exact_in_run(hist_k, klo_k, cut_k, s_k, a_k, goal, cut_p, s_p, a_p):
    """top-p's cut, s and a where they lie in top-k's run counted by single keys of d (the last
    joint pass; ``s_k``, ``a_k``: the sums above the run): where the mass above the run is below
    top-p's ``goal``, top-p's cut is among top-k's kept keys (from ``cut_k`` up) and each key's
    weight above it is exact, so it is decided there key by key; else top-p's own (``cut_p``, s_p,
    a_p). Its own bins may be wide there (ambiguous bins far apart, between which its run stays
    open), and their middle rule is no bound on a cut that lies below them."""
    o_bin = tl.arange(0, NB)
    if s_k < goal:
        key = klo_k + o_bin.to(tl.uint32)
        d = _value(key)
        w = tl.where((hist_k > 0) & (key >= cut_k), hist_k.to(tl.float32) * tl.exp2(d), 0.0)
        kept = (w > 0) & (s_k + tl.cumsum(w, 0, reverse=True) - w < goal)
        cut_p = klo_k + tl.min(tl.where(kept, o_bin, NB), 0).to(tl.uint32)
        s_p, a_p = _kept_sums(kept, w, d, s_k, a_k)
    return cut_p, s_p, a_p


@triton.jit
def _joint_passes(p_blk, o_blk, lead, n_end, k, base, tanh_scale, kf, top_p, klo_k, khi_k, above_k, done_k, cut_k,
                  m_lo, m_hi, a_k_kept, klo_p, khi_p, cut_p, done_p, key_top, WITH_ENTROPY: tl.constexpr,
                  SOFTCAP: tl.constexpr, KEYS16: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr,
                  VEC: tl.constexpr):
    """Passes 2 and 3 of top-k and top-p side by side (``_joint_pass``), from a first pass that left
    top-k's run of keys [klo_k, khi_k] with ``above_k`` tokens above it (or its cut, ``done_k``), the
    bounds [m_lo, m_hi] on the mass it keeps (with ``a_k_kept``, exact once done), and top-p's run
    [klo_p, khi_p] below its surely kept keys from ``cut_p`` up (or its cut, ``done_p``). Each pass
    counts both runs; top-k's single keys make the mass it keeps exact by the last pass, and top-p
    decides between the goals its bounds allow until then (a bin kept for the lower goal is kept,
    one dropped for the upper is dropped, bins below top-k's run are dropped), the last by the
    middle rule, with the sums. (top-p's cut key, s, a; with KEYS16, whether the cut is a bin's
    edge and the lowest key the sums cover, for ``_settle``)."""
    o_bin = tl.arange(0, NB)
    s_p = m_lo * 0.0 - 1.0                   # top-p's kept tokens' sums, −1 until a pass sums them
    a_p = m_lo * 0.0
    boundary = done_p != done_p              # False: top-p's cut is one key, or a bin's edge (``_settle``)
    counted = cut_p                          # the lowest key top-p's sums cover
    for i in range(1, MAX_PASSES):
        if ~done_k | ~done_p | (s_p < 0):
            shift = tl.maximum(_bits(khi_p - klo_p) - NB_BITS, 0)
            shift_k = tl.maximum(_bits(khi_k - klo_k) - NB_BITS, 0)
            hist, s_hi, s_in, a_hi, hist_k, s_k, a_k = _joint_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale,
                                                                   klo_p, khi_p, shift, 0.0, 0.0, klo_k, khi_k,
                                                                   shift_k, False, WITH_ENTROPY, SOFTCAP, R, LANES,
                                                                   VEC, KEYS16)
            if not done_k:
                cnt = hist_k.to(tl.float32)
                f = tl.max(tl.where(above_k + tl.cumsum(cnt, 0, reverse=True) >= kf, o_bin, 0), 0)
                width = ((1 << shift_k) - 1).to(tl.uint32)
                lo_key = klo_k + (o_bin.to(tl.uint32) << shift_k)
                d_lo = _key_d(lo_key, k, base, tanh_scale, SOFTCAP, KEYS16)
                w_lo = tl.where(cnt > 0, cnt * tl.exp2(d_lo), 0.0)
                lo_f = klo_k + (f.to(tl.uint32) << shift_k)
                if shift_k == 0:             # single keys: top-k's cut, and the mass it keeps exact
                    if KEYS16 is not None:   # the cut's tie group in d kept whole, below the run too
                        d_f = _key_d(lo_f, k, base, tanh_scale, SOFTCAP, KEYS16)
                        m_lo, a_k_kept = _tied_sums(cnt, d_lo, d_f, s_k, a_k)
                        if _key_d(klo_k - 1, k, base, tanh_scale, SOFTCAP, KEYS16) == d_f:
                            e = _count_keys(p_blk, o_blk, lead, n_end, k, base, tanh_scale,
                                            _first_key(d_f, k, base, tanh_scale, SOFTCAP, KEYS16, False), klo_k - 1,
                                            SOFTCAP, KEYS16, R, LANES, VEC).to(tl.float32) * tl.exp2(d_f)
                            m_lo += e
                            a_k_kept += e * d_f
                    else:
                        m_lo, a_k_kept = _kept_sums((o_bin >= f) & (cnt > 0), w_lo, d_lo, s_k, a_k)
                    m_hi = m_lo
                    cut_k = lo_f
                    done_k = shift_k == 0
                else:
                    d_hi = tl.minimum(_key_d(lo_key + tl.minimum(width, khi_k - lo_key), k, base, tanh_scale, SOFTCAP,
                                             KEYS16), _d_max(base))
                    above_f = above_k + tl.sum(tl.where(o_bin > f, cnt, 0.0), 0)
                    e_f = tl.sum(tl.where(o_bin == f, tl.exp2(d_lo), 0.0), 0)
                    m_lo = s_k + tl.sum(tl.where(o_bin > f, w_lo, 0.0), 0) + (kf - above_f) * e_f
                    m_hi = s_k + tl.sum(tl.where((o_bin >= f) & (cnt > 0), cnt * tl.exp2(d_hi), 0.0), 0)
                    above_k = above_f
                    khi_k = lo_f + tl.minimum(width, khi_k - lo_f)
                    klo_k = lo_f
            if done_p:                       # decided before on bins of several keys: summed from its cut up
                if s_p < 0:
                    s_p = s_hi
                    a_p = a_hi
            else:
                cnt = hist.to(tl.float32)
                width = ((1 << shift) - 1).to(tl.uint32)
                lo_key = klo_p + (o_bin.to(tl.uint32) << shift)
                hi_key = lo_key + tl.minimum(width, khi_p - lo_key)
                d_lo = _key_d(lo_key, k, base, tanh_scale, SOFTCAP, KEYS16)
                e_lo = tl.where(cnt > 0, tl.exp2(d_lo), 0.0)
                w_lo = cnt * e_lo
                w_hi = tl.where(cnt > 0, cnt * tl.exp2(tl.minimum(_key_d(hi_key, k, base, tanh_scale, SOFTCAP, KEYS16),
                                                                  _d_max(base))), 0.0)
                # (top-k's bins are single keys by the last pass: its goal is then exact)
                kept, unused, b_hi, b_lo = _decide(cnt, w_lo, w_hi, s_hi, s_hi, s_in, top_p * m_lo, shift, i, True)
                maybe, ambiguous, b_hi, b_lo = _decide(cnt, w_lo, w_hi, s_hi, s_hi, s_in, top_p * m_hi, shift, i,
                                                       True)
                possible = hi_key >= tl.where(done_k, cut_k, klo_k)   # not below every token top-k may keep
                kept = kept & possible
                ambiguous = (maybe | ambiguous) & ~kept & possible
                b_hi = tl.max(tl.where(ambiguous, o_bin, -1), 0)
                b_lo = tl.min(tl.where(ambiguous, o_bin, NB), 0)
                if b_hi < 0:
                    b_kept = tl.min(tl.where(kept, o_bin, NB), 0)
                    cut_p = tl.where(b_kept < NB, klo_p + (b_kept.to(tl.uint32) << shift),
                                     tl.minimum(khi_p + 1, key_top))
                    done_p = b_hi < 0
                    boundary = (shift > 0) | (b_kept >= NB)   # a bin's edge, or the key above the run
                    counted = tl.where(boundary, cut_p, klo_p)
                    if shift == 0:
                        if KEYS16 is not None:
                            s_p, a_p = _tied_sums(tl.where(b_kept < NB, cnt, 0.0), d_lo,
                                                  _key_d(cut_p, k, base, tanh_scale, SOFTCAP, KEYS16), s_hi, a_hi)
                        else:
                            s_p, a_p = _kept_sums(kept, w_lo, d_lo, s_hi, a_hi)
                    elif i >= MAX_PASSES - 1:   # each kept bin's mass at the middle of its bounds, at its lowest d
                        s_p, a_p = _kept_sums(kept, 0.5 * (w_lo + w_hi), d_lo, s_hi, a_hi)
                else:
                    top = klo_p + (b_hi.to(tl.uint32) << shift)
                    khi_p = top + tl.minimum(width, khi_p - top)
                    klo_p = klo_p + (b_lo.to(tl.uint32) << shift)
                if done_p & (s_p < 0):       # the next pass sums the tokens from cut_p up
                    klo_p = cut_p
                    khi_p = cut_p - 1
            if KEYS16 is None:
                if (i == MAX_PASSES - 1) & (khi_k >= klo_k):
                    cut_p, s_p, a_p = _exact_in_run(hist_k, klo_k, cut_k, s_k, a_k, top_p * m_lo, cut_p, s_p, a_p)
    if cut_p < cut_k:                        # top-p keeps every token top-k keeps
        cut_p = cut_k
        s_p = m_lo
        a_p = a_k_kept
        boundary = cut_p != cut_p            # its tie group summed whole
        counted = cut_k
        if KEYS16 is not None:
            counted = _first_key(_key_d(cut_k, k, base, tanh_scale, SOFTCAP, KEYS16), k, base, tanh_scale, SOFTCAP,
                                 KEYS16, False)
    if not WITH_ENTROPY:
        a_p = a_p * 0.0
    return cut_p, s_p, a_p, boundary, counted


@triton.jit
def _top_k_top_p_joint(p_blk, o_blk, lead, n_end, k, base, tanh_scale, floor, top_k, top_p,
                       WITH_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr,
                       VEC: tl.constexpr):
    """(the smallest kept d, s, a) of top-k then top-p over the candidates d ≥ ``floor`` of a row of
    fp32 logits, for a top-k above what the gather holds: both selections side by side, each pass
    one read of both (``_joint_pass``). The first is top-p's uniform pass and top-k's first over
    the keys from lo_d up: the uniform bins bound the mass top-k keeps (none holds its k-th value:
    top-k keeps every token from lo_d up, where top-p's goal is taken, as top-p alone takes it),
    and top-k's run is the keys both its bins share, at most 2^21. Then two passes count top-k's
    run and top-p's: top-k's are single keys in the second, which makes the mass it keeps exact,
    and top-p decides between the goals its bounds allow (a bin kept for the lower goal is kept,
    one dropped for the upper is dropped, bins below top-k's run are dropped) until that second
    pass, its last (the middle rule, the sums): the statistics and three passes."""
    o_bin = tl.arange(0, NB)
    kf = top_k.to(tl.float32)
    key_top = _key(floor) * 0 + KEY_INF
    lo_d = tl.maximum(floor, -UNIFORM_RANGE)
    hi_d = _d_max(base)
    scale = NB / (hi_d - lo_d)
    start = _key(lo_d)
    khi = _key(hi_d)                         # above every d of the row
    shift_k = tl.maximum(_bits(khi - start) - NB_BITS, 0)
    hist, s_none, s_in, a_none, hist_k, s_k, a_k = _joint_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale,
                                                               _key(floor), key_top, 0, lo_d, scale, start, khi,
                                                               shift_k, True, False, SOFTCAP, R, LANES, VEC)
    cnt = hist.to(tl.float32)
    w_lo, w_hi = _uniform_bounds(cnt, lo_d, hi_d)
    # top-k: its k-th value's uniform bin f, the bounds [m_lo, m_hi] on the mass it keeps, and its
    # run of keys [klo_k, khi_k], that bin's keys and its key bin's, with the count above them
    f = tl.max(tl.where(tl.cumsum(cnt, 0, reverse=True) >= kf, o_bin, -1), 0)
    done_k = f < 0
    m_lo = s_in
    m_hi = s_in
    a_k_kept = s_in * 0.0
    cut_k = start
    klo_k = start
    khi_k = start - 1                        # an empty run
    above_k = s_in * 0.0
    if f >= 0:
        above_u = tl.sum(tl.where(o_bin > f, cnt, 0.0), 0)
        e_f = tl.sum(tl.where(o_bin == f, w_lo / tl.maximum(cnt, 1.0), 0.0), 0)
        m_lo = tl.sum(tl.where(o_bin > f, w_lo, 0.0), 0) + (kf - above_u) * e_f
        m_hi = tl.minimum(s_in, tl.sum(tl.where(o_bin >= f, w_hi, 0.0), 0))
        cnt_k = hist_k.to(tl.float32)
        f_k = tl.max(tl.where(tl.cumsum(cnt_k, 0, reverse=True) >= kf, o_bin, 0), 0)
        lo_key = start + (f_k.to(tl.uint32) << shift_k)
        hi_key = lo_key + tl.minimum(((1 << shift_k) - 1).to(tl.uint32), khi - lo_key)
        hi_u = _bin_start(f + 1, start, key_top, lo_d, scale, k, base, tanh_scale, SOFTCAP, None) - 1
        klo_k = tl.maximum(_bin_start(f, start, key_top, lo_d, scale, k, base, tanh_scale, SOFTCAP, None), lo_key)
        khi_k = tl.minimum(hi_u, hi_key)
        above_k = tl.where(hi_key <= hi_u, tl.sum(tl.where(o_bin > f_k, cnt_k, 0.0), 0), above_u)
    # top-p: kept for the lower goal, possibly kept for the upper one, at or above top-k's bin
    kept, unused, b_hi, b_lo = _decide(cnt, w_lo, w_hi, s_none, s_none, s_in, top_p * m_lo, 1, 0, True)
    maybe, ambiguous, b_hi, b_lo = _decide(cnt, w_lo, w_hi, s_none, s_none, s_in, top_p * m_hi, 1, 0, True)
    ambiguous = (maybe | ambiguous) & ~kept & (o_bin >= f)
    b_hi = tl.max(tl.where(ambiguous, o_bin, -1), 0)
    b_lo = tl.min(tl.where(ambiguous, o_bin, NB), 0)
    done_p = b_hi < 0
    cut_p = tl.minimum(_bin_start(tl.min(tl.where(kept, o_bin, NB), 0), start, key_top, lo_d, scale, k, base,
                                  tanh_scale, SOFTCAP, None), key_top)
    klo_p = cut_p
    khi_p = cut_p - 1                        # decided: the next pass sums the tokens from cut_p up
    if b_hi >= 0:
        klo_p = _bin_start(b_lo, start, key_top, lo_d, scale, k, base, tanh_scale, SOFTCAP, None)
        khi_p = _bin_start(b_hi + 1, start, key_top, lo_d, scale, k, base, tanh_scale, SOFTCAP, None) - 1
    cut_p, s_p, a_p, unused, unused_too = _joint_passes(p_blk, o_blk, lead, n_end, k, base, tanh_scale, kf, top_p,
                                                        klo_k, khi_k, above_k, done_k, cut_k, m_lo, m_hi, a_k_kept,
                                                        klo_p, khi_p, cut_p, done_p, key_top, WITH_ENTROPY, SOFTCAP,
                                                        None, R, LANES, VEC)
    return _value(cut_p), s_p, a_p


@triton.jit
def _select_row(p_blk, o_blk, lead, n_end, k, base, tanh_scale, cut, finite, top_k, top_p, p_gather,
                SLOTS: tl.constexpr, WITH_ENTROPY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                SOFTCAP: tl.constexpr, KEYS16: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr,
                VEC: tl.constexpr):
    """(the threshold, s, a) of top-k's and top-p's selection among the candidates d ≥ ``cut``
    (min_p's, or −inf) of a ``finite`` row: with both on, both from one first pass over 16-bit
    keys, or from top-k's candidates gathered (fp32 logits, at ``p_gather``), or for a top_k
    above SLOTS side by side; else each alone (``_threshold``)."""
    s_kept = -1.0
    a_kept = 0.0
    alone = finite                           # a row with one filter on
    if TOP_K and TOP_P:
        both = finite & (top_k > 0) & (top_p < 1.0)
        if both:
            if KEYS16 is not None:
                cut, s_kept, a_kept = _top_k_top_p_keys16(p_blk, o_blk, lead, n_end, k, base, tanh_scale,
                                                          tl.maximum(cut, -FLT_MAX), top_k, top_p, WITH_ENTROPY,
                                                          SOFTCAP, KEYS16, R, LANES, VEC)
            elif top_k <= SLOTS:
                cut, s_kept, a_kept = _top_k_top_p_gathered(p_blk, o_blk, lead, n_end, k, base, tanh_scale,
                                                            tl.maximum(cut, -FLT_MAX), top_k, top_p, p_gather,
                                                            SLOTS, WITH_ENTROPY, SOFTCAP, R, LANES, VEC)
            else:
                cut, s_kept, a_kept = _top_k_top_p_joint(p_blk, o_blk, lead, n_end, k, base, tanh_scale,
                                                         tl.maximum(cut, -FLT_MAX), top_k, top_p, WITH_ENTROPY,
                                                         SOFTCAP, R, LANES, VEC)
        alone = finite & ~both
    if TOP_K:
        if alone & (top_k > 0):
            cut, s_kept, a_kept = _threshold(p_blk, o_blk, lead, n_end, k, base, tanh_scale, tl.maximum(cut, -FLT_MAX),
                                             top_k.to(tl.float32), False, WITH_ENTROPY, SOFTCAP, KEYS16, R, LANES,
                                             VEC)
    if TOP_P:
        if alone & (top_p < 1.0):
            cut, s_kept, a_kept = _threshold(p_blk, o_blk, lead, n_end, k, base, tanh_scale, tl.maximum(cut, -FLT_MAX),
                                             top_p, True, WITH_ENTROPY, SOFTCAP, KEYS16, R, LANES, VEC)
    return cut, s_kept, a_kept


@triton.jit(do_not_specialize=BATCH_INTS, do_not_specialize_on_alignment=PER_TOKEN_POINTERS)
def _select_kernel(
    p_x, stride_xb: tl.int64, stride_xt: tl.int64,  # logits (B, T, V), unit stride along V
    p_y,                                         # (N,) int32 target ids, < 0 invalid
    p_tau, p_min_p, p_top_k, p_top_p,            # (N,) per token: τ_t, min_p, top_k (int32), top_p
    p_part, n_segs, seg_len,                     # (N, 3, n_segs) fp32 each row's segments' (c, s, a), their
                                                 # count and length: the statistics launch's
    p_cut,                                       # (N,) fp32 output: the kept set's threshold on d; with
                                                 # BF16_ROWS first read: the statistics launch's test
    p_sums,                                      # (N, 2) fp32 output: the kept tokens' Σ 2^d, Σ 2^d·d, or −1
    p_gather,                                    # fp32 logits with top-k and top-p: (N, SLOTS) fp32 scratch
                                                 # (``_top_k_top_p_gathered``), else None
    N, T, V,
    k, tanh_scale,                               # logit map, see logit_map.py (k of τ = 1 with HAS_TAU)
    SOFTCAP: tl.constexpr, HAS_TAU: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    MIN_P: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, KEYS16: tl.constexpr,
    BF16_ROWS: tl.constexpr,                     # fp32 logits: a row of bf16 values (0 in p_cut, forward.py's
                                                 # LOW16) is counted over bf16 keys, the others over keys of d
    ROWS_ALIGNED: tl.constexpr,
    R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
    SLOTS: tl.constexpr,                         # the candidates a row may gather (``slots``)
):
    """One row's threshold, between the forward's statistics launch and its finish (forward.py):
    min_p's, then top-k's and top-p's selection among what is left. −inf: not truncated (an
    invalid row, a filter off, a row whose softmax is NaN or has no finite logit). With it the
    kept tokens' sums at the row's base where the last selection found them, else −1 (the finish
    reads the row once more)."""
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
    top_k = 0
    top_p = 1.0
    if TOP_K:
        top_k = tl.load(p_top_k + row, mask=valid, other=0)
        # A top-k of the whole row keeps every token whose logit is finite: no selection, the lowest
        # finite threshold (a −inf logit is outside every kept set, SPEC.md, section 9).
        cut = tl.where(finite & (top_k >= V), tl.maximum(cut, -FLT_MAX), cut)
        top_k = tl.where(top_k < V, top_k, 0)
    if TOP_P:
        top_p = tl.load(p_top_p + row, mask=valid, other=1.0)
    if p_gather is not None:
        p_gather += row.to(tl.int64) * SLOTS
    if BF16_ROWS:
        if tl.load(p_cut + row, mask=valid, other=1.0) == 0.0:   # bf16 values: d is monotone in their keys
            cut, s_kept, a_kept = _select_row(p_blk, o_blk, lead, n_end, k, base, tanh_scale, cut, finite, top_k,
                                              top_p, p_gather, SLOTS, WITH_ENTROPY, TOP_K, TOP_P, SOFTCAP, tl.bfloat16,
                                              R, LANES, VEC)
        else:
            cut, s_kept, a_kept = _select_row(p_blk, o_blk, lead, n_end, k, base, tanh_scale, cut, finite, top_k,
                                              top_p, p_gather, SLOTS, WITH_ENTROPY, TOP_K, TOP_P, SOFTCAP, None, R,
                                              LANES, VEC)
    else:
        cut, s_kept, a_kept = _select_row(p_blk, o_blk, lead, n_end, k, base, tanh_scale, cut, finite, top_k, top_p,
                                          p_gather, SLOTS, WITH_ENTROPY, TOP_K, TOP_P, SOFTCAP, KEYS16, R, LANES, VEC)
    tl.store(p_cut + row, cut)
    tl.store(p_sums + 2 * row, s_kept)
    tl.store(p_sums + 2 * row + 1, a_kept)


def slots(cfg):
    """The candidates a row of fp32 logits with top-k and top-p may gather: GATHER, or fewer where
    a block holds fewer logits (fewer registers where fewer warps share them, and no scratch larger
    than the logits of a short row)."""
    return min(GATHER.value, cfg.r * cfg.lanes * cfg.vec)


# The logits' types whose own values the selection counts as keys (``_key16``), for the kernels' KEYS16.
KEYS16 = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def select_cuts(logits, target, part, n_segs, seg_len, lmap, cut, sums, with_entropy, cfg):
    """Launch the selection over the rows of ``logits`` (B, T, V): each valid row's threshold into
    ``cut`` (N,) and, where its last pass found them, the kept tokens' sums into ``sums`` (N, 2)
    (else −1), from its segments' statistics ``part`` (N, 3, n_segs) and ``lmap``'s filters
    (top_k or top_p given; min_p's folded in). fp32 logits: ``cut`` holds on entry each row's
    low 16 bits OR-ed, as the statistics launch with LOW16 stores them (forward.py), 0 for a
    row of bf16 values; with top_k and top_p, a scratch row of ``slots`` words a token holds the
    candidates of the rows that gather them."""
    B, T, V = logits.shape
    gather = logits.dtype == torch.float32 and lmap.top_k is not None and lmap.top_p is not None
    n_slots = slots(cfg)
    with on_device(logits.device):
        _select_kernel[(B * T,)](
            logits, logits.stride(0), logits.stride(1), target, lmap.tau, lmap.min_p, lmap.top_k, lmap.top_p,
            part, n_segs, seg_len, cut, sums,
            torch.empty(B * T, n_slots, dtype=torch.float32, device=logits.device) if gather else None,
            B * T, T, V, lmap.log2_scale, lmap.tanh_scale,
            SOFTCAP=lmap.softcap, HAS_TAU=lmap.tau is not None, WITH_ENTROPY=with_entropy,
            MIN_P=lmap.min_p is not None, TOP_K=lmap.top_k is not None, TOP_P=lmap.top_p is not None,
            KEYS16=KEYS16.get(logits.dtype), BF16_ROWS=logits.dtype == torch.float32,
            ROWS_ALIGNED=rows_aligned(logits, cfg.vec), R=cfg.r,
            LANES=cfg.lanes, VEC=cfg.vec, SLOTS=n_slots,
            num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION, maxnreg=MAX_REGISTERS,
        )
    return cut


# ---- one counting pass over a vocabulary slice (vocab_parallel.py) -----------------------------
# With the vocabulary split over ranks, a row's selection counts every slice: each pass is a launch
# whose counts and sums the ranks add up, and ``slice_select.py`` decides between passes.
COUNT_SKIP, COUNT_UNIFORM, COUNT_KEYS, COUNT_SUMS, COUNT_JOINT_UNIFORM, COUNT_JOINT, COUNT_JOINT_SUMS = \
    (tl.constexpr(m) for m in range(7))  # _sweep_types' COUNT_*


@triton.jit(do_not_specialize=BATCH_INTS, do_not_specialize_on_alignment=PER_TOKEN_POINTERS)
def _slice_count_kernel(
    p_x, stride_xb: tl.int64, stride_xt: tl.int64,  # this slice's logits (B, T, V), unit stride along V
    p_y,                                         # (N,) int32 target ids in the slice, V: another slice's, < 0 invalid
    p_tau, p_base,                               # (N,) per token: τ_t, the group's common base b
    p_mode, p_klo, p_khi, p_shift, p_lo, p_scale,  # (N,) per token: the pass (COUNT_*) and its range
    p_delta,                                     # (N,) COUNT_SUMS, COUNT_JOINT_SUMS: the sums of d + delta
                                                 # (the slice's own base)
    p_klo_k, p_khi_k, p_shift_k,                 # JOINT: (N,) per token, top-k's run beside top-p's
    p_hist,                                      # (N, NB) int32 output: the counts by bin (JOINT: (N, 2, NB),
                                                 # top-k's run's second)
    p_sums,                                      # (N, 4) fp32 output: the mass above the range, within it,
                                                 # Σ 2^d·d above it, the target's d (0 off the slice); JOINT:
                                                 # (N, 6), then the mass above top-k's run and its Σ 2^d·d
    N, T, V,
    k, tanh_scale,                               # logit map, see logit_map.py (k of τ = 1 with HAS_TAU)
    SOFTCAP: tl.constexpr, HAS_TAU: tl.constexpr, JOINT: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
    R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
):
    """One pass of one row's selection over this slice, at the common base b: its candidates'
    counts uniform in d from lo (COUNT_UNIFORM, with the mass from lo), or by 2^shift keys over
    [klo, khi] (COUNT_KEYS, with the mass above and within); or those counts with the mass and
    Σ 2^d·d of the keys above khi (COUNT_SUMS: a filter's last pass, or with an empty range the
    kept tokens' sums), of d + delta: at the slice's own base, where they cannot underflow to 0
    for a slice far below the largest. JOINT (top-k and top-p side by side, ``_joint_pass``):
    COUNT_JOINT_UNIFORM counts top-p's uniform bins and top-k's run [klo_k, khi_k] by 2^shift_k
    keys; COUNT_JOINT both runs by keys, with the mass above and within top-p's and above
    top-k's; COUNT_JOINT_SUMS the same counts with the mass and Σ 2^d·d above each run, of
    d + delta (the last pass). Every d is formed as the sweeps form it."""
    row = tl.program_id(0)
    y, valid, has_y, n_read = _row_target(p_y, row, N, V)
    if HAS_TAU:
        k = k / tl.load(p_tau + row, mask=valid, other=1.0)
    mode = tl.load(p_mode + row, mask=valid, other=COUNT_SKIP)
    base = tl.load(p_base + row, mask=valid, other=0.0)
    klo = tl.load(p_klo + row, mask=valid, other=0).to(tl.uint32)
    khi = tl.load(p_khi + row, mask=valid, other=0).to(tl.uint32)
    shift = tl.load(p_shift + row, mask=valid, other=0)
    lo_d = tl.load(p_lo + row, mask=valid, other=0.0)
    scale = tl.load(p_scale + row, mask=valid, other=0.0)
    off = _row_offset(row, T, stride_xb, stride_xt, ROWS_ALIGNED, VEC)
    lead = _row_lead(off, VEC)
    p_blk = _block_base(p_x, off, lead, True, VEC)
    o_blk = _block_offsets(R, LANES, VEC)
    n_end = lead + n_read
    hist = tl.zeros([NB], tl.int32)
    hist_k = tl.zeros([NB], tl.int32)
    s_hi = 0.0
    s_in = 0.0
    a_hi = 0.0
    s_k = 0.0
    a_k = 0.0
    if mode == COUNT_UNIFORM:
        hist, s_hi, s_in, a_hi = _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift, lo_d,
                                             scale, True, False, True, False, SOFTCAP, R, LANES, VEC)
    elif mode == COUNT_KEYS:
        hist, s_hi, s_in, a_hi = _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift, lo_d,
                                             scale, False, True, True, False, SOFTCAP, R, LANES, VEC)
    elif mode == COUNT_SUMS:
        hist, s_hi, s_in, a_hi = _count_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo, khi, shift, lo_d,
                                             scale, False, True, False, True, SOFTCAP, R, LANES, VEC,
                                             tl.load(p_delta + row), True)
    elif JOINT:
        klo_k = tl.load(p_klo_k + row, mask=valid, other=0).to(tl.uint32)
        khi_k = tl.load(p_khi_k + row, mask=valid, other=0).to(tl.uint32)
        shift_k = tl.load(p_shift_k + row, mask=valid, other=0)
        if mode == COUNT_JOINT_UNIFORM:
            hist, s_hi, s_in, a_hi, hist_k, s_k, a_k = _joint_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo,
                                                                   khi, shift, lo_d, scale, klo_k, khi_k, shift_k,
                                                                   True, False, SOFTCAP, R, LANES, VEC)
        elif mode == COUNT_JOINT:
            hist, s_hi, s_in, a_hi, hist_k, s_k, a_k = _joint_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo,
                                                                   khi, shift, 0.0, 0.0, klo_k, khi_k, shift_k,
                                                                   False, False, SOFTCAP, R, LANES, VEC)
        elif mode == COUNT_JOINT_SUMS:
            hist, s_hi, s_in, a_hi, hist_k, s_k, a_k = _joint_pass(p_blk, o_blk, lead, n_end, k, base, tanh_scale, klo,
                                                                   khi, shift, 0.0, 0.0, klo_k, khi_k, shift_k,
                                                                   False, True, SOFTCAP, R, LANES, VEC, None,
                                                                   tl.load(p_delta + row), True, False)
    o_bin = tl.arange(0, NB)
    if JOINT:
        tl.store(p_hist + row.to(tl.int64) * (2 * NB) + o_bin, hist)
        tl.store(p_hist + row.to(tl.int64) * (2 * NB) + NB + o_bin, hist_k)
        tl.store(p_sums + 6 * row + 4, s_k)
        tl.store(p_sums + 6 * row + 5, a_k)
    else:
        tl.store(p_hist + row.to(tl.int64) * NB + o_bin, hist)
    x_y = tl.load(p_x + off + tl.where(has_y, y, 0), mask=has_y, other=0.0).to(tl.float32)
    d_y = tl.where(has_y, tl.fma(_logit_u(x_y, tanh_scale, SOFTCAP), k, -base), 0.0)
    n_sums: tl.constexpr = 6 if JOINT else 4
    tl.store(p_sums + n_sums * row, s_hi)
    tl.store(p_sums + n_sums * row + 1, s_in)
    tl.store(p_sums + n_sums * row + 2, a_hi)
    tl.store(p_sums + n_sums * row + 3, d_y)


def slice_count(logits, target, lmap, base, mode, klo, khi, shift, lo, scale, delta, joint=None):
    """One counting pass of the rows' selection over this slice of ``logits`` (B, T, V) at the
    common ``base``, each row as its ``mode`` (COUNT_*) says: ((N, NB) int32 counts, (N, 4) fp32
    sums: the mass above the range, within it, Σ 2^d·d above it (COUNT_SUMS: of d + ``delta``),
    the target's d). ``joint``: (klo_k, khi_k, shift_k), top-k's runs beside top-p's
    (COUNT_JOINT_*): then (N, 2, NB) counts, top-k's second, and (N, 6) sums, the mass above
    top-k's run and its Σ 2^d·d last."""
    B, T, V = logits.shape
    N = B * T
    hist = torch.empty((N, 2, NB.value) if joint else (N, NB.value), dtype=torch.int32, device=logits.device)
    sums = torch.empty(N, 6 if joint else 4, dtype=torch.float32, device=logits.device)
    cfg = sweep_config(V, logits.element_size())
    with on_device(logits.device):
        _slice_count_kernel[(N,)](
            logits, logits.stride(0), logits.stride(1), target, lmap.tau, base,
            mode, klo, khi, shift, lo, scale, delta, *(joint or (None, None, None)), hist, sums, N, T, V,
            lmap.log2_scale, lmap.tanh_scale,
            SOFTCAP=lmap.softcap, HAS_TAU=lmap.tau is not None, JOINT=joint is not None,
            ROWS_ALIGNED=rows_aligned(logits, cfg.vec), R=cfg.r, LANES=cfg.lanes, VEC=cfg.vec,
            num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION, maxnreg=MAX_REGISTERS,
        )
    return hist, sums


@triton.jit(do_not_specialize=BATCH_INTS, do_not_specialize_on_alignment=PER_TOKEN_POINTERS)
def _slice_gather_kernel(
    p_x, stride_xb: tl.int64, stride_xt: tl.int64,  # this slice's logits (B, T, V), unit stride along V
    p_y,                                         # (N,) int32 target ids in the slice, V: another slice's, < 0 invalid
    p_tau, p_base,                               # (N,) per token: τ_t, the group's common base b
    p_from,                                      # (N,) int64: the lowest key of the row's candidates
    p_first,                                     # (N,) int32: the row's first slot for this slice, < 0: none
    p_klo, p_khi,                                # (N,) int64: a run of keys counted one bin a key (klo > khi: none)
    p_slots, p_counts,                           # (N, NB) fp32 and int32 outputs, rows ROW_STRIDE apart: the
                                                 # candidates' d, from slot first on, and the run's counts
    N, T, V,
    k, tanh_scale,                               # logit map, see logit_map.py (k of τ = 1 with HAS_TAU)
    SOFTCAP: tl.constexpr, HAS_TAU: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
    R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
    ROW_STRIDE: tl.constexpr,                    # the outputs' row stride: 2 NB, the two halves of the
                                                 # split's counts (``slice_count`` with ``joint``)
):
    """One read of one row of this slice at the common base b: its d from ``p_from``'s value up
    (top-k's candidates beside top-p, ``slice_select._decide_gathered``), stored in its row of
    ``p_slots`` from slot ``first`` on, the slices before it having the slots below; where the
    row has a run [klo, khi] (top-k's bin of its k-th value, the tokens above it gathered), its
    keys counted one bin a key into ``p_counts`` (``_top_k_top_p_gathered``'s last pass). Every d
    is formed as the sweeps form it."""
    row = tl.program_id(0)
    _, valid, _, n_read = _row_target(p_y, row, N, V)
    first = tl.load(p_first + row, mask=valid, other=-1)
    if first >= 0:
        if HAS_TAU:
            k = k / tl.load(p_tau + row)
        off = _row_offset(row, T, stride_xb, stride_xt, ROWS_ALIGNED, VEC)
        lead = _row_lead(off, VEC)
        p_blk = _block_base(p_x, off, lead, True, VEC)
        o_blk = _block_offsets(R, LANES, VEC)
        base = tl.load(p_base + row)
        lo_d = _value(tl.load(p_from + row).to(tl.uint32))
        p_row = p_slots + row.to(tl.int64) * ROW_STRIDE
        klo = tl.load(p_klo + row).to(tl.uint32)
        khi = tl.load(p_khi + row).to(tl.uint32)
        if klo <= khi:
            n, hist = _gather_pass(p_blk, o_blk, lead, lead + n_read, k, base, tanh_scale, lo_d, p_row, NB, SOFTCAP, R,
                                   LANES, VEC, first, klo, khi, True)
            tl.store(p_counts + row.to(tl.int64) * ROW_STRIDE + tl.arange(0, NB), hist)
        else:
            _gather_pass(p_blk, o_blk, lead, lead + n_read, k, base, tanh_scale, lo_d, p_row, NB, SOFTCAP, R, LANES,
                         VEC, first)


def slice_gather(logits, target, lmap, base, from_key, first, klo, khi, slots, counts):
    """Top-k's candidates of the rows with ``first`` ≥ 0 in this slice of ``logits`` (B, T, V):
    their d at the common ``base`` from ``from_key``'s value up, stored in slots ``first`` on of
    their row of ``slots`` (N, NB) fp32, and where klo ≤ khi the keys of [klo, khi] counted one
    bin a key in their row of ``counts`` (N, NB) int32 (both with unit stride along NB and the
    same row stride); their other slots and counts are left as they are (0: summed over the
    group, each slot holds one slice's d)."""
    B, T, V = logits.shape
    N = B * T
    cfg = sweep_config(V, logits.element_size())
    assert slots.stride() == counts.stride() and slots.stride(1) == 1
    with on_device(logits.device):
        _slice_gather_kernel[(N,)](
            logits, logits.stride(0), logits.stride(1), target, lmap.tau, base, from_key, first, klo, khi, slots,
            counts, N, T, V, lmap.log2_scale, lmap.tanh_scale,
            SOFTCAP=lmap.softcap, HAS_TAU=lmap.tau is not None, ROWS_ALIGNED=rows_aligned(logits, cfg.vec),
            R=cfg.r, LANES=cfg.lanes, VEC=cfg.vec, ROW_STRIDE=slots.stride(0), num_warps=cfg.num_warps,
            enable_fp_fusion=FP_FUSION, maxnreg=MAX_REGISTERS,
        )
    return slots, counts
