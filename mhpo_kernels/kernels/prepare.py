"""Before the sweeps: the per-token inputs in one small launch. Validity, each token's target id,
the per-sequence valid counts, the aggregation weights g_t, each token's advantage, and every value
check the host reads in validation's one sync, all in one program (O(N) work, no atomics, a fixed
order, so the same bits on every run). ``torch_sweeps.prepare`` is the same contract in PyTorch.

One program walks the N tokens three times, in blocks of BLOCK:

1. per token: valid = mask ∧ id ≠ ignore_index (with ``SUPPORT``, a loss over a truncated
   softmax after its sweep: ∧ the target inside its row's kept set, SPEC.md, section 9), the
   int32 target (−1 at invalid tokens), the
   checks (id in [0, V), a 0/1 mask, τ_t finite and > 0, old and reference log-probs not finite
   and above 0), and the running count of valid tokens
   up to each token (an exclusive prefix sum, so a sequence's count is two loads);
2. per sequence: its count n_i = prefix[end] − prefix[start] (or the caller's count over every
   rank, ``SEQ_COUNTS``, checked ≥ the local one), the sequences that have one, and the
   boundaries' own checks (cu[0] = 0, non-decreasing, cu[S] = N; with ``ONE_TOKEN_EACH``, one
   token per sequence); with ``KEPT_SET``, a replayed kept set's: its offsets (0 … K,
   non-decreasing, read with the tokens), its ids in [0, V) and no id twice in a row (its
   (row, id) keys, sorted by the caller, each unlike the one before);
3. per token: its sequence (t // T for a padded batch, a binary search of cu for a packed one),
   the weight g_t and the advantage, times the token weight w_t with ``TW`` (checked ≥ 0: every
   objective's policy term is linear in A for w ≥ 0; under GSPO, whose g_t is the sequence's,
   Σ_t g_t · w_t · loss_i(A) = Σ_t g_t · loss_i(mean_i(w · A))); with ``SAME_ADV`` (a
   sequence-level objective), the advantage and sequence of each valid token stored at its rank among the valid tokens, and a
   fourth walk compares each with the valid token before it.

A thread reads in a pass what other threads wrote in the one before, hence the barriers.
"""

import torch
import triton
import triton.language as tl

from .._config import on_device
from .. import _sweep_types as _types

STATUS_SLOTS = _types.STATUS_SLOTS
# The host's names (``_sweep_types``) as the kernel's compile-time constants.
(STATUS_N_VALID, STATUS_BAD_IDS, STATUS_FIRST_BAD, STATUS_MASK, STATUS_CU, STATUS_TAU, STATUS_NORM,
 STATUS_SEQ_COUNTS, STATUS_ADV_VARIES, STATUS_NOT_ONE_EACH, STATUS_OLD_POSITIVE, STATUS_REF_POSITIVE,
 STATUS_MIN_P, STATUS_TOP_P, STATUS_TOKEN_W, STATUS_KEPT_OFFSETS, STATUS_KEPT_IDS, STATUS_KEPT_TWICE) = (
    tl.constexpr(getattr(_types, name)) for name in (
        "STATUS_N_VALID", "STATUS_BAD_IDS", "STATUS_FIRST_BAD", "STATUS_MASK", "STATUS_CU", "STATUS_TAU", "STATUS_NORM",
        "STATUS_SEQ_COUNTS", "STATUS_ADV_VARIES", "STATUS_NOT_ONE_EACH", "STATUS_OLD_POSITIVE", "STATUS_REF_POSITIVE",
        "STATUS_MIN_P", "STATUS_TOP_P", "STATUS_TOKEN_W", "STATUS_KEPT_OFFSETS", "STATUS_KEPT_IDS",
        "STATUS_KEPT_TWICE"))
LOGP_ABOVE_ZERO = tl.constexpr(_types.LOGP_ABOVE_ZERO)
ADV_NONE, ADV_SCALAR, ADV_PER_SEQ = (tl.constexpr(getattr(_types, n)) for n in ("ADV_NONE", "ADV_SCALAR", "ADV_PER_SEQ"))

BLOCK = 1024
# The aggregation modes (the kernel's AGG) in the order of ``_sweep_types.AGG_MODES``.
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


@triton.jit(do_not_specialize=["N", "S", "T", "n_steps", "K"])
def _prepare_kernel(
    p_ids, p_mask, p_cu, p_adv, p_tau, p_norm,   # inputs: (N,) ids, mask, (S + 1,) cu, adv, (N,) τ, 0-d normalizer
    p_seq_counts,                                # (S,) fp32 valid tokens of each sequence over every rank
    p_old, p_ref,                                # (N,) fp32 old and reference log-probs
    p_min_p, p_top_p,                            # (N,) fp32 min_p, top_p per token (HAS_MIN_P, HAS_TOP_P)
    p_tw,                                        # token weights, laid out as TW says (as advantages are)
    p_logp, p_start, p_end,                      # (N,) fp32 log-probs; the truncated rows: fp32 thresholds, −inf
                                                 # where not (SUPPORT 1), or a kept set's int64 start and end (2)
    p_koff, p_kids, p_kkeys, K,                  # a replayed kept set: (N + 1,) offsets, (K,) ids, (K,) sorted keys
    p_target, p_weight, p_adv_t,                 # (N,) int32 target, fp32 g_t, fp32 advantage (times w_t)
    p_prefix, p_seq_n, p_status,                 # scratch (N + 1,) int32 and (S,) fp32 (WITH_WEIGHT); (STATUS_SLOTS,) int64
    p_vadv, p_vseq,                              # scratch (N,) fp32 and int32: the valid tokens' advantage, sequence
    N, S, T, V, ignore_index, normalizer, n_steps,
    HAS_MASK: tl.constexpr, PACKED: tl.constexpr, HAS_TAU: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_MIN_P: tl.constexpr, HAS_TOP_P: tl.constexpr,
    WITH_WEIGHT: tl.constexpr, AGG: tl.constexpr, ADV: tl.constexpr, TW: tl.constexpr,
    NORM: tl.constexpr,                          # 0 the count, 1 the value ``normalizer``, 2 the tensor
    SEQ_COUNTS: tl.constexpr, SAME_ADV: tl.constexpr, ONE_TOKEN_EACH: tl.constexpr, SUPPORT: tl.constexpr,
    KEPT_SET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    o_b = tl.arange(0, BLOCK)
    n_valid = tl.zeros([BLOCK], tl.int32)
    n_bad = tl.zeros([BLOCK], tl.int32)
    first_bad = tl.zeros([BLOCK], tl.int64) + N
    bad_mask = tl.zeros([BLOCK], tl.int32)
    bad_tau = tl.zeros([BLOCK], tl.int32)
    bad_min_p = tl.zeros([BLOCK], tl.int32)
    bad_top_p = tl.zeros([BLOCK], tl.int32)
    old_positive = tl.zeros([BLOCK], tl.int32)
    ref_positive = tl.zeros([BLOCK], tl.int32)
    bad_koff = tl.zeros([BLOCK], tl.int32)
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
        if SUPPORT != 0:  # outside the kept set: a log-prob of −inf in a truncated row, or an old one of −inf
            if SUPPORT == 1:
                truncated = tl.load(p_start + o, mask=m, other=float("-inf")) > float("-inf")
            else:
                truncated = tl.load(p_end + o, mask=m, other=0) > tl.load(p_start + o, mask=m, other=0)
            outside = truncated & (tl.load(p_logp + o, mask=m, other=0.0) == float("-inf"))
            if HAS_OLD:
                outside = outside | (tl.load(p_old + o, mask=m, other=0.0) == float("-inf"))
            valid = valid & ~outside
        bad = valid & ((ids < 0) | (ids >= V))
        n_bad += bad.to(tl.int32)
        first_bad = tl.minimum(first_bad, tl.where(bad, o.to(tl.int64), N))
        tl.store(p_target + o, tl.where(valid, ids, -1).to(tl.int32), mask=m)
        if HAS_TAU:  # τ_t is data like a logit (NaN propagates); ≤ 0 or +inf is a misuse
            tau = tl.load(p_tau + o, mask=m, other=1.0)
            bad_tau += (valid & ((tau <= 0.0) | (tau == float("inf")))).to(tl.int32)
        if HAS_MIN_P:  # a share of the largest probability: NaN or above 1 is a misuse (≤ 0 is off)
            min_p = tl.load(p_min_p + o, mask=m, other=0.0)
            bad_min_p += (valid & ((min_p != min_p) | (min_p > 1.0))).to(tl.int32)
        if HAS_TOP_P:  # a share of the mass: NaN or ≤ 0 is a misuse (≥ 1 is off)
            top_p = tl.load(p_top_p + o, mask=m, other=1.0)
            bad_top_p += (valid & ~(top_p > 0.0)).to(tl.int32)
        if HAS_OLD:  # finite and above 0 beyond rounding: no log-prob (non-finite ones are data)
            old = tl.load(p_old + o, mask=m, other=0.0)
            old_positive += (valid & (old > LOGP_ABOVE_ZERO) & (old < float("inf"))).to(tl.int32)
        if HAS_REF:
            ref = tl.load(p_ref + o, mask=m, other=0.0)
            ref_positive += (valid & (ref > LOGP_ABOVE_ZERO) & (ref < float("inf"))).to(tl.int32)
        if KEPT_SET:
            lo = tl.load(p_koff + o, mask=m, other=0)
            bad_koff += (m & (tl.load(p_koff + o + 1, mask=m, other=0) < lo)).to(tl.int32)
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
    tl.store(p_status + STATUS_MIN_P, tl.sum(bad_min_p, 0).to(tl.int64))
    tl.store(p_status + STATUS_TOP_P, tl.sum(bad_top_p, 0).to(tl.int64))
    tl.store(p_status + STATUS_OLD_POSITIVE, tl.sum(old_positive, 0).to(tl.int64))
    tl.store(p_status + STATUS_REF_POSITIVE, tl.sum(ref_positive, 0).to(tl.int64))
    bad_kids = tl.zeros([BLOCK], tl.int32)
    twice = tl.zeros([BLOCK], tl.int32)
    if KEPT_SET:
        bad_koff += ((o_b == 0) & ((tl.load(p_koff) != 0) | (tl.load(p_koff + N) != K))).to(tl.int32)
        for k0 in range(0, K, BLOCK):
            k = k0 + o_b
            m_k = k < K
            kid = tl.load(p_kids + k, mask=m_k, other=0)
            bad_kids += (m_k & ((kid < 0) | (kid >= V))).to(tl.int32)
            key = tl.load(p_kkeys + k, mask=m_k, other=0)
            twice += (m_k & (k > 0) & (key == tl.load(p_kkeys + k - 1, mask=m_k & (k > 0), other=-1))).to(tl.int32)
    tl.store(p_status + STATUS_KEPT_OFFSETS, tl.sum(bad_koff, 0).to(tl.int64))
    tl.store(p_status + STATUS_KEPT_IDS, tl.sum(bad_kids, 0).to(tl.int64))
    tl.store(p_status + STATUS_KEPT_TWICE, tl.sum(twice, 0).to(tl.int64))

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
    bad_counts = tl.zeros([BLOCK], tl.int32)
    not_one = tl.zeros([BLOCK], tl.int32)
    varies = tl.zeros([BLOCK], tl.int32)
    bad_tw = tl.zeros([BLOCK], tl.int32)
    if WITH_WEIGHT:
        tl.debug_barrier()
        n_seqs = tl.zeros([BLOCK], tl.int32)
        n_tokens = tl.zeros([BLOCK], tl.float32)
        for s0 in range(0, S, BLOCK):  # 2. sequences
            s = s0 + o_b
            m_s = s < S
            start, end = _seq_bounds(p_cu, s, m_s, N, T, PACKED)
            if PACKED:
                bad_cu += (m_s & (tl.load(p_cu + s + 1, mask=m_s, other=0) < tl.load(p_cu + s, mask=m_s, other=0))
                           ).to(tl.int32)
            if ONE_TOKEN_EACH:
                not_one += (m_s & (end - start != 1)).to(tl.int32)
            n_i = (tl.load(p_prefix + end, mask=m_s, other=0) - tl.load(p_prefix + start, mask=m_s, other=0)).to(
                tl.float32)
            if SEQ_COUNTS:
                given = tl.load(p_seq_counts + s, mask=m_s, other=0.0)
                bad_counts += (m_s & (given < n_i)).to(tl.int32)
                n_i = given
            tl.store(p_seq_n + s, n_i, mask=m_s)
            n_seqs += (m_s & (n_i > 0)).to(tl.int32)
            n_tokens += tl.where(m_s, n_i, 0.0)
        tl.debug_barrier()
        # The divisor of the aggregated sum: the valid tokens (token-mean) or the sequences that
        # have one (seq-mean modes), at least 1; or the normalizer in their place.
        if NORM == 0:
            if AGG == TOKEN_MEAN:
                norm = tl.maximum(tl.sum(n_tokens, 0), 1.0)
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
            elif ADV == ADV_NONE:  # the weights alone
                adv = tl.zeros([BLOCK], tl.float32)
            else:
                adv = tl.load(p_adv + o, mask=m, other=0.0)
            adv = adv.to(tl.float32)
            if TW != ADV_NONE:  # data like the advantage (NaN propagates); below 0 is a misuse
                if TW == ADV_SCALAR:
                    w = tl.load(p_tw + o * 0, mask=m, other=1.0).to(tl.float32)
                elif TW == ADV_PER_SEQ:
                    w = tl.load(p_tw + seq, mask=m, other=1.0).to(tl.float32)
                else:
                    w = tl.load(p_tw + o, mask=m, other=1.0).to(tl.float32)
                bad_tw += (valid & (w < 0.0)).to(tl.int32)
                tl.store(p_adv_t + o, adv * w, mask=m)
            elif ADV != ADV_NONE:
                tl.store(p_adv_t + o, adv, mask=m)
            if SAME_ADV:  # each valid token's advantage (before w_t) and sequence, at its rank among the valid
                rank = tl.load(p_prefix + o, mask=m, other=0)
                tl.store(p_vadv + rank, adv, mask=m & valid)
                tl.store(p_vseq + rank, seq.to(tl.int32), mask=m & valid)
        if SAME_ADV:
            tl.debug_barrier()
            n_v = tl.sum(n_valid, 0)
            for k0 in range(1, N, BLOCK):  # 4. each valid token against the one before it
                k = k0 + o_b
                m_k = k < n_v
                a, a_prev = tl.load(p_vadv + k, mask=m_k, other=0.0), tl.load(p_vadv + k - 1, mask=m_k, other=0.0)
                same_seq = tl.load(p_vseq + k, mask=m_k, other=0) == tl.load(p_vseq + k - 1, mask=m_k, other=-1)
                # "<" or ">", not "!=": a NaN advantage is no shape error (it makes the loss NaN)
                varies += (m_k & same_seq & ((a < a_prev) | (a > a_prev))).to(tl.int32)
    elif PACKED:
        for s0 in range(0, S, BLOCK):
            s = s0 + o_b
            m_s = s < S
            bad_cu += (m_s & (tl.load(p_cu + s + 1, mask=m_s, other=0) < tl.load(p_cu + s, mask=m_s, other=0))
                       ).to(tl.int32)
    tl.store(p_status + STATUS_CU, tl.sum(bad_cu, 0).to(tl.int64))
    tl.store(p_status + STATUS_SEQ_COUNTS, tl.sum(bad_counts, 0).to(tl.int64))
    tl.store(p_status + STATUS_NOT_ONE_EACH, tl.sum(not_one, 0).to(tl.int64))
    tl.store(p_status + STATUS_ADV_VARIES, tl.sum(varies, 0).to(tl.int64))
    tl.store(p_status + STATUS_TOKEN_W, tl.sum(bad_tw, 0).to(tl.int64))


def prepare(ids, mask, cu, adv, adv_mode, tau, normalizer, seq_counts, n_seqs, T, V, ignore_index, agg, with_weight,
            same_adv=False, one_token_each=False, old=None, ref=None, min_p=None, top_p=None, tw=None, tw_mode=0,
            logp=None, cut=None, kept=None, kept_set=None):
    """Launch the prepare program. ``ids`` (N,) integer; ``mask`` (N,) or None; ``cu`` (S + 1,)
    int64 for a packed stream, else None (S = n_seqs rows of T tokens); ``adv`` the advantages as
    ``adv_mode`` reads them; ``tau`` (N,) fp32 or None; ``normalizer`` None, a float, or a 0-d
    tensor; ``seq_counts`` (S,) fp32 or None; ``same_adv``, ``one_token_each``: the checks named
    in the module's docstring; ``old``, ``ref`` (N,) fp32 or None, checked ≤ 0 at valid tokens;
    ``min_p`` (N,) fp32 or None, checked ≤ 1 and not NaN; ``top_p`` (N,) fp32 or None, checked
    > 0 and not NaN; ``tw`` the token weights as ``tw_mode`` reads them (an advantage layout),
    checked ≥ 0, multiplied into the advantage. With ``logp`` (N,), after a truncated sweep, a
    token outside its row's kept set is invalid too: log-prob −inf in a row ``cut`` (the
    thresholds, −inf where not truncated) or ``kept`` (a replayed set's (start, end) per row:
    non-empty) marks truncated, or ``old`` −inf (pass old only where the objective reads it).
    ``kept_set``: a replayed kept set to check, (int64 offsets (N + 1,), ids (K,), their int64
    keys row · V + id, sorted). Returns (target int32, weight fp32 or None, adv fp32 or None,
    status int64: ``_sweep_types.STATUS_*``)."""
    N = ids.numel()
    device = ids.device
    status = torch.empty(STATUS_SLOTS, dtype=torch.int64, device=device)
    target = torch.empty(N, dtype=torch.int32, device=device)
    weight = torch.empty(N, dtype=torch.float32, device=device) if with_weight else None
    adv_t = torch.empty(N, dtype=torch.float32, device=device) if with_weight and adv_mode != ADV_NONE else None
    prefix = torch.empty(N + 1, dtype=torch.int32, device=device) if with_weight else None
    seq_n = torch.empty(max(n_seqs, 1), dtype=torch.float32, device=device) if with_weight else None
    same_adv = same_adv and with_weight
    tw_mode = tw_mode if tw is not None and with_weight else _types.ADV_NONE
    vadv = torch.empty(max(N, 1), dtype=torch.float32, device=device) if same_adv else None
    vseq = torch.empty(max(N, 1), dtype=torch.int32, device=device) if same_adv else None
    norm_mode = 0 if normalizer is None else 2 if isinstance(normalizer, torch.Tensor) else 1
    with on_device(device):
        _prepare_kernel[(1,)](
            ids, mask, cu, adv, tau, normalizer if norm_mode == 2 else None, seq_counts, old, ref, min_p, top_p, tw,
            logp, *((cut, cut) if cut is not None else kept if kept is not None else (None, None)),
            *(kept_set if kept_set is not None else (None,) * 3), 0 if kept_set is None else kept_set[1].numel(),
            target, weight, adv_t, prefix, seq_n, status, vadv, vseq,
            N, n_seqs, T, V, ignore_index, float(normalizer) if norm_mode == 1 else 1.0,
            max(1, (n_seqs - 1).bit_length()),
            HAS_MASK=mask is not None, PACKED=cu is not None, HAS_TAU=tau is not None,
            HAS_OLD=old is not None, HAS_REF=ref is not None, HAS_MIN_P=min_p is not None,
            HAS_TOP_P=top_p is not None,
            WITH_WEIGHT=with_weight, AGG=agg, ADV=adv_mode if adv is not None else _types.ADV_NONE, NORM=norm_mode,
            TW=tw_mode,
            SEQ_COUNTS=seq_counts is not None and with_weight, SAME_ADV=same_adv,
            ONE_TOKEN_EACH=one_token_each and with_weight,
            SUPPORT=0 if logp is None else 1 if cut is not None else 2, KEPT_SET=kept_set is not None,
            BLOCK=BLOCK, num_warps=4,
        )
    return target, weight, adv_t, status
