"""Before the sweeps: the per-token inputs in one small launch. Validity, each token's target id,
the per-sequence valid counts, the aggregation weights g_t, each token's advantage, and every value
check the host reads in validation's one sync, all in one program (O(N) work, no atomics, a fixed
order, so the same bits on every run).

One program walks the N tokens three times, in blocks of BLOCK:

1. per token: valid = mask ∧ id ≠ ignore_index, the int32 target (−1 at invalid tokens), the
   checks (id in [0, V), a 0/1 mask, τ_t finite and > 0), and the running count of valid tokens
   up to each token (an exclusive prefix sum, so a sequence's count is two loads);
2. per sequence: its count n_i = prefix[end] − prefix[start], the sequences that have one, and the
   boundaries' own checks (cu[0] = 0, non-decreasing, cu[S] = N);
3. per token: its sequence (t // T for a padded batch, a binary search of cu for a packed one),
   the weight g_t and the advantage.

A thread reads in pass 2 what other threads wrote in pass 1, hence the barriers.
"""

import torch
import triton
import triton.language as tl

from .._config import on_device
from .. import _inputs

STATUS_SLOTS = _inputs.STATUS_SLOTS
# The host's names (``_inputs``) as the kernel's compile-time constants.
STATUS_N_VALID, STATUS_BAD_IDS, STATUS_FIRST_BAD, STATUS_MASK, STATUS_CU, STATUS_TAU, STATUS_NORM = (
    tl.constexpr(getattr(_inputs, name)) for name in (
        "STATUS_N_VALID", "STATUS_BAD_IDS", "STATUS_FIRST_BAD", "STATUS_MASK", "STATUS_CU", "STATUS_TAU", "STATUS_NORM"))
ADV_NONE, ADV_SCALAR, ADV_PER_SEQ = (tl.constexpr(getattr(_inputs, n)) for n in ("ADV_NONE", "ADV_SCALAR", "ADV_PER_SEQ"))

BLOCK = 1024
# The aggregation modes (the kernel's AGG) in the order of ``_inputs.AGG_MODES``.
SEQ_MEAN_TOKEN_MEAN, TOKEN_MEAN = tl.constexpr(0), tl.constexpr(1)


@triton.jit
def _seq_bounds(p_cu, s, m_s, N, T, PACKED: tl.constexpr):
    """[start, end) of sequences ``s`` (masked by ``m_s``): cu[s], cu[s + 1] when packed, else
    rows of T; clamped to [0, N] so that a malformed cu (refused) never reads out of range."""
    if PACKED:
        start = tl.load(p_cu + s, mask=m_s, other=0)
        end = tl.load(p_cu + s + 1, mask=m_s, other=0)
    else:
        start = s.to(tl.int64) * T
        end = start + T
    return tl.minimum(tl.maximum(start, 0), N), tl.minimum(tl.maximum(end, 0), N)


@triton.jit
def _seq_of(p_cu, o, S, T, n_steps, PACKED: tl.constexpr):
    """The sequence of tokens ``o``: o // T, or the last s < S with cu[s] ≤ o (empty sequences
    own no token), by ``n_steps`` = ceil(log2(S)) halvings."""
    if PACKED:
        lo = tl.zeros_like(o)
        hi = tl.zeros_like(o) + (S - 1)
        for _ in range(n_steps):
            mid = (lo + hi + 1) // 2
            right = tl.load(p_cu + mid) <= o
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid - 1)
        return lo
    else:
        return o // T


@triton.jit(do_not_specialize=["N", "S", "T", "n_steps"])
def _prepare_kernel(
    p_ids, p_mask, p_cu, p_adv, p_tau, p_norm,   # inputs: (N,) ids, mask, (S + 1,) cu, adv, (N,) τ, 0-d normalizer
    p_target, p_weight, p_adv_t,                 # (N,) int32 target, fp32 g_t, fp32 advantage
    p_prefix, p_seq_n, p_status,                 # scratch (N + 1,) int32 and (S,) fp32; (STATUS_SLOTS,) int64
    N, S, T, V, ignore_index, normalizer, n_steps,
    HAS_MASK: tl.constexpr, PACKED: tl.constexpr, HAS_TAU: tl.constexpr,
    WITH_WEIGHT: tl.constexpr, AGG: tl.constexpr, ADV: tl.constexpr,
    NORM: tl.constexpr,                          # 0 the count, 1 the value ``normalizer``, 2 the tensor
    BLOCK: tl.constexpr,
):
    o_b = tl.arange(0, BLOCK)
    n_valid = tl.zeros([BLOCK], tl.int32)
    n_bad = tl.zeros([BLOCK], tl.int32)
    first_bad = tl.zeros([BLOCK], tl.int64) + N
    bad_mask = tl.zeros([BLOCK], tl.int32)
    bad_tau = tl.zeros([BLOCK], tl.int32)
    carry = tl.full([], 0, tl.int32)
    if WITH_WEIGHT:
        tl.store(p_prefix, 0)
    for t0 in range(0, N, BLOCK):  # 1. tokens
        o = t0 + o_b
        m = o < N
        ids = tl.load(p_ids + o, mask=m, other=ignore_index)
        valid = m & (ids != ignore_index)
        if HAS_MASK:
            b_mask = tl.load(p_mask + o, mask=m, other=0)
            bad_mask += (m & (b_mask != 0) & (b_mask != 1)).to(tl.int32)
            valid = valid & (b_mask != 0)
        bad = valid & ((ids < 0) | (ids >= V))
        n_bad += bad.to(tl.int32)
        first_bad = tl.minimum(first_bad, tl.where(bad, o.to(tl.int64), N))
        tl.store(p_target + o, tl.where(valid, ids, -1).to(tl.int32), mask=m)
        if HAS_TAU:  # τ_t is data like a logit (NaN propagates); ≤ 0 or +inf is a misuse
            tau = tl.load(p_tau + o, mask=m, other=1.0)
            bad_tau += (valid & ((tau <= 0.0) | (tau == float("inf")))).to(tl.int32)
        v = valid.to(tl.int32)
        n_valid += v
        if WITH_WEIGHT:
            counts = tl.cumsum(v, 0)
            tl.store(p_prefix + 1 + o, carry + counts, mask=m)
            carry += tl.sum(v, 0)
    tl.store(p_status + STATUS_N_VALID, tl.sum(n_valid, 0).to(tl.int64))
    tl.store(p_status + STATUS_BAD_IDS, tl.sum(n_bad, 0).to(tl.int64))
    tl.store(p_status + STATUS_FIRST_BAD, tl.min(first_bad, 0))
    tl.store(p_status + STATUS_MASK, tl.sum(bad_mask, 0).to(tl.int64))
    tl.store(p_status + STATUS_TAU, tl.sum(bad_tau, 0).to(tl.int64))

    bad_cu = tl.zeros([BLOCK], tl.int32)
    if PACKED:
        bad_cu += ((o_b == 0) & (tl.load(p_cu) != 0)).to(tl.int32)
        bad_cu += ((o_b == 0) & (tl.load(p_cu + S) != N)).to(tl.int32)
    bad_norm = 0
    if NORM == 1:
        norm = normalizer
    elif NORM == 2:
        norm = tl.load(p_norm).to(tl.float32)
    if NORM != 0:
        bad_norm = ((norm != norm) | (norm <= 0.0) | (norm == float("inf"))).to(tl.int32)
    tl.store(p_status + STATUS_NORM, bad_norm.to(tl.int64))
    if WITH_WEIGHT:
        tl.debug_barrier()
        n_seqs = tl.zeros([BLOCK], tl.int32)
        for s0 in range(0, S, BLOCK):  # 2. sequences
            s = s0 + o_b
            m_s = s < S
            start, end = _seq_bounds(p_cu, s, m_s, N, T, PACKED)
            if PACKED:
                bad_cu += (m_s & (tl.load(p_cu + s + 1, mask=m_s, other=0) < tl.load(p_cu + s, mask=m_s, other=0))
                           ).to(tl.int32)
            n_i = tl.load(p_prefix + end, mask=m_s, other=0) - tl.load(p_prefix + start, mask=m_s, other=0)
            tl.store(p_seq_n + s, n_i.to(tl.float32), mask=m_s)
            n_seqs += (m_s & (n_i > 0)).to(tl.int32)
        tl.debug_barrier()
        # The divisor of the aggregated sum: the valid tokens (token-mean) or the sequences that
        # have one (seq-mean modes), at least 1; or the normalizer in their place.
        if NORM == 0:
            if AGG == TOKEN_MEAN:
                norm = tl.maximum(tl.sum(n_valid, 0), 1).to(tl.float32)
            else:
                norm = tl.maximum(tl.sum(n_seqs, 0), 1).to(tl.float32)
        for t0 in range(0, N, BLOCK):  # 3. tokens again
            o = t0 + o_b
            m = o < N
            valid = tl.load(p_target + o, mask=m, other=-1) >= 0
            seq = _seq_of(p_cu, o, S, T, n_steps, PACKED)
            if AGG == SEQ_MEAN_TOKEN_MEAN:
                n_i = tl.maximum(tl.load(p_seq_n + seq, mask=m, other=1.0), 1.0)
                g = tl.where(valid, 1.0 / (n_i * norm), 0.0)
            else:
                g = tl.where(valid, 1.0 / norm, 0.0)
            tl.store(p_weight + o, g, mask=m)
            if ADV == ADV_SCALAR:
                adv = tl.load(p_adv + o * 0, mask=m, other=0.0)
            elif ADV == ADV_PER_SEQ:
                adv = tl.load(p_adv + seq, mask=m, other=0.0)
            else:
                adv = tl.load(p_adv + o, mask=m, other=0.0)
            if ADV != ADV_NONE:
                tl.store(p_adv_t + o, adv.to(tl.float32), mask=m)
    elif PACKED:
        for s0 in range(0, S, BLOCK):
            s = s0 + o_b
            m_s = s < S
            bad_cu += (m_s & (tl.load(p_cu + s + 1, mask=m_s, other=0) < tl.load(p_cu + s, mask=m_s, other=0))
                       ).to(tl.int32)
    tl.store(p_status + STATUS_CU, tl.sum(bad_cu, 0).to(tl.int64))


def prepare(ids, mask, cu, adv, adv_mode, tau, normalizer, n_seqs, T, V, ignore_index, agg, with_weight):
    """Launch the prepare program. ``ids`` (N,) integer; ``mask`` (N,) or None; ``cu`` (S + 1,)
    int64 for a packed stream, else None (S = n_seqs rows of T tokens); ``adv`` the advantages as
    ``adv_mode`` reads them; ``tau`` (N,) fp32 or None; ``normalizer`` None, a float, or a 0-d
    tensor. Returns (target int32, weight fp32 or None, adv fp32 or None, status int64)."""
    N = ids.numel()
    device = ids.device
    status = torch.empty(STATUS_SLOTS, dtype=torch.int64, device=device)
    target = torch.empty(N, dtype=torch.int32, device=device)
    weight = torch.empty(N, dtype=torch.float32, device=device) if with_weight else None
    adv_t = torch.empty(N, dtype=torch.float32, device=device) if with_weight and adv_mode != ADV_NONE else None
    prefix = torch.empty(N + 1 if with_weight else 1, dtype=torch.int32, device=device)
    seq_n = torch.empty(max(n_seqs, 1) if with_weight else 1, dtype=torch.float32, device=device)
    norm_mode = 0 if normalizer is None else 2 if isinstance(normalizer, torch.Tensor) else 1
    dummy = status
    with on_device(device):
        _prepare_kernel[(1,)](
            ids, dummy if mask is None else mask, dummy if cu is None else cu,
            dummy if adv is None else adv, dummy if tau is None else tau,
            normalizer if norm_mode == 2 else dummy,
            target, dummy if weight is None else weight, dummy if adv_t is None else adv_t,
            prefix, seq_n, status,
            N, n_seqs, T, V, ignore_index, float(normalizer) if norm_mode == 1 else 1.0,
            max(1, (n_seqs - 1).bit_length()),
            HAS_MASK=mask is not None, PACKED=cu is not None, HAS_TAU=tau is not None,
            WITH_WEIGHT=with_weight, AGG=agg, ADV=adv_mode if adv is not None else _inputs.ADV_NONE, NORM=norm_mode,
            BLOCK=BLOCK, num_warps=4,
        )
    return target, weight, adv_t, status

