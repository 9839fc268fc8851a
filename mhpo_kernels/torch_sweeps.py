"""The kernels in plain PyTorch: the path for CPU tensors without Triton's interpreter (and for
any device Triton does not serve), and inside torch.compile the prepare step.

Same inputs and outputs as ``kernels.prepare.prepare``, ``kernels.forward.mhpo_fwd``,
``kernels.backward.mhpo_bwd``, ``scale_rows_`` and ``kernels.finalize.finalize``. The sweeps are
chunked over rows: working memory is bounded by ``CHUNK_BYTES`` whatever N (see ``_chunks``),
never N × V. The per-token epilogue runs on (N,) vectors in float64, where the textbook formulas
are accurate, then rounds to fp32; vocabulary parallelism and ``mhpo_token_loss`` share it.
"""

import math

import torch
import torch.nn.functional as F

from ._sweep_types import (
    ADV_PER_SEQ, ADV_SCALAR, AGG_MODES, METRICS, STATUS_BAD_IDS, STATUS_CU, STATUS_FIRST_BAD, STATUS_MASK,
    STATUS_N_VALID, STATUS_NORM, STATUS_NOT_ONE_EACH, STATUS_SEQ_COUNTS, STATUS_SLOTS, STATUS_TAU,
    STATUS_ADV_VARIES, STATUS_OLD_POSITIVE, STATUS_REF_POSITIVE, LOGP_ABOVE_ZERO, RowStats,
)
from .objectives import CISPO_KIND, GPG_KIND, MHPO_KIND, PPO_CLIP_KIND, SAPO_KIND

CHUNK_BYTES = 64 << 20  # the sweeps' working memory beyond their inputs and outputs
# Chunk-sized fp32 temporaries a sweep holds at once, at most: measured 3 in either sweep without
# the entropy, 3.3 in sweep 1 and 5.3 in sweep 2 with it, 6.7 with the entropy and a softcap, the
# same at every N (tests/test_torch_path_memory.py).
CHUNK_COPIES = 7
LN2 = math.log(2.0)


def segment_ids(cu, n):
    """The sequence index of each of n tokens from the boundaries cu (an empty sequence holds none)."""
    positions = torch.arange(n, device=cu.device, dtype=torch.int64)
    # The clamp keeps malformed boundaries (refused by the value checks) from indexing out of range.
    return (torch.bucketize(positions, cu, right=True) - 1).clamp_(min=0).clamp_(max=cu.numel() - 2)


def per_sequence_sum(x, seq_id, n_seqs):
    """Σ of x (N,) over each sequence's tokens: (S,), in x's dtype, 0 for an empty sequence.
    ``seq_id`` (N,) is non-decreasing: tokens in sequence order, as ``segment_ids`` gives them.

    Bitwise reproducible on every device, with no atomics and no host sync: a segmented reduction
    over the boundaries, each sequence summed in an order fixed by the boundaries alone (on CUDA a
    ``cub::DeviceSegmentedReduce``, run-to-run deterministic; on CPU left to right). Not
    ``index_add_``, whose CUDA kernel adds with atomics in whatever order the threads arrive, nor
    a difference of a running sum (``cumsum`` of a floating CUDA tensor is nondeterministic)."""
    starts = torch.arange(n_seqs + 1, device=seq_id.device, dtype=seq_id.dtype)
    # Where each sequence starts: cu itself for well-formed boundaries; the cummax keeps malformed
    # ones (refused, maybe after this runs) non-decreasing within [0, N]. ``unsafe``: no host read.
    bounds = torch.searchsorted(seq_id, starts).cummax(0).values
    return torch.segment_reduce(x, "sum", offsets=bounds, unsafe=True)


def boundaries(cu, n_seqs, T, device):
    """The (S + 1,) boundaries of every layout: ``cu`` of a packed stream, else S rows of T."""
    return cu if cu is not None else torch.arange(n_seqs + 1, device=device, dtype=torch.int64) * T


def prepare(ids, mask, cu, adv, adv_mode, tau, normalizer, seq_counts, n_seqs, T, V, ignore_index, agg, with_weight,
            same_adv=False, one_token_each=False, old=None, ref=None):
    """``kernels.prepare.prepare`` in PyTorch ops: the same outputs and status slots."""
    N, device = ids.numel(), ids.device
    zero = torch.zeros((), dtype=torch.int64, device=device)
    status = [zero] * STATUS_SLOTS
    ids = ids.to(torch.int64)
    valid = ids != ignore_index
    if mask is not None:
        if mask.dtype != torch.bool:
            status[STATUS_MASK] = ((mask != 0) & (mask != 1)).sum()
        valid = valid & (mask != 0)
    bad = valid & ((ids < 0) | (ids >= V))
    positions = torch.arange(N, device=device, dtype=torch.int64)
    status[STATUS_N_VALID], status[STATUS_BAD_IDS] = valid.sum(), bad.sum()
    status[STATUS_FIRST_BAD] = torch.where(bad, positions, N).amin() if N else zero
    if tau is not None:  # τ_t is data like a logit (NaN propagates); ≤ 0 or +inf is a misuse
        status[STATUS_TAU] = (valid & ((tau <= 0) | tau.isinf())).sum()
    for slot, logp in ((STATUS_OLD_POSITIVE, old), (STATUS_REF_POSITIVE, ref)):
        if logp is not None:  # finite and above 0 beyond rounding: no log-prob (non-finite ones are data)
            status[slot] = (valid & (logp > LOGP_ABOVE_ZERO) & (logp < math.inf)).sum()
    bounds = boundaries(cu, n_seqs, T, device)
    if cu is not None:
        status[STATUS_CU] = ((cu[0] != 0) | (cu[-1] != N) | (cu[1:] < cu[:-1]).any()).to(torch.int64)
    if normalizer is not None:
        if not isinstance(normalizer, torch.Tensor):  # arithmetic, not torch.tensor: no copy, no specialization
            normalizer = torch.zeros((), dtype=torch.float32, device=device) + normalizer
        normalizer = normalizer.to(torch.float32)
        status[STATUS_NORM] = (~(torch.isfinite(normalizer) & (normalizer > 0))).to(torch.int64)
    target = torch.where(valid, ids, -1).to(torch.int32)
    if not with_weight:
        return target, None, None, torch.stack(status)
    seq_id = segment_ids(bounds, N)
    valid_f = valid.to(torch.float32)
    n_i = per_sequence_sum(valid_f, seq_id, n_seqs)
    if seq_counts is not None:
        status[STATUS_SEQ_COUNTS] = (seq_counts < n_i).sum()
        n_i = seq_counts
    if one_token_each:
        status[STATUS_NOT_ONE_EACH] = (bounds[1:] - bounds[:-1] != 1).sum()
    # g_t: the divisor of the aggregated sum is the valid tokens (token-mean) or the sequences
    # that have one (seq-mean modes), at least 1, or the normalizer in their place.
    mode = AGG_MODES[agg]
    if normalizer is None:
        normalizer = n_i.sum().clamp(min=1) if mode == "token-mean" else (n_i > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        weight = valid_f / (n_i.clamp(min=1)[seq_id] * normalizer)
    else:
        weight = valid_f / normalizer
    adv = adv.to(torch.float32)
    adv_t = adv.reshape(1).expand(N) if adv_mode == ADV_SCALAR else adv[seq_id] if adv_mode == ADV_PER_SEQ else adv
    if same_adv:  # each valid token against the valid token before it, in the same sequence
        before = torch.cat([positions.new_full((1,), -1), torch.where(valid, positions, -1).cummax(0).values[:-1]])
        prev = before.clamp(min=0)
        # "<" or ">", not "!=": a NaN advantage is no shape error (it makes the loss NaN)
        differs = (adv_t < adv_t[prev]) | (adv_t > adv_t[prev])
        status[STATUS_ADV_VARIES] = (valid & (before >= 0) & (seq_id[prev] == seq_id) & differs).sum()
    return target, weight, adv_t.contiguous(), torch.stack(status)


def _chunks(logits):
    """(b, t0, t1, r0): row blocks as views of logits (B, T, V), of CHUNK_BYTES / CHUNK_COPIES in
    fp32 each, so that the temporaries a sweep makes of a block stay within CHUNK_BYTES (one row
    at least: beyond V = CHUNK_BYTES / (4 · CHUNK_COPIES), 2.8 million, one row's)."""
    B, T, V = logits.shape
    rows = max(1, CHUNK_BYTES // (CHUNK_COPIES * 4 * max(V, 1)))
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            yield b, t0, t1, b * T + t0


def compute_dtype(logits):
    """What the PyTorch path computes in: float64 for float64 logits (its own path only, for
    ``gradcheck`` and debugging), fp32 for the kernels' dtypes."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _sech2(u):
    """sech²(u) = 4e/(1 + e)², e = exp(−2|u|): never 1 − tanh² (see SPEC.md, section 2)."""
    e = torch.exp(-2.0 * u.abs())
    return 4.0 * e / (1.0 + e) ** 2


def _row_scale(value, lmap, valid, r0, dtype=torch.float32):
    """A scale of the logit map (``log2_scale`` or ``slope``) for the chunk's rows, as the kernels
    form it: the fp32 scalar, divided by each row's τ_t in fp32 with a per-token temperature
    ((rows,) tensor; 1 at invalid rows, which may hold anything)."""
    scale = torch.tensor(value, dtype=dtype)
    if lmap.tau is None:
        return scale.item()
    return scale / torch.where(valid, lmap.tau[r0:r0 + valid.numel()], 1.0)


def _exponents(logits, target, b, t0, t1, r0, base, lmap):
    """The base-2 exponents d = k·u(x) − b of rows [r0, r0 + t1 − t0) as a fresh fp32 chunk, as the
    kernels form them (``kernels/logit_map.py``): b = fp32(k · max u) when ``base`` is None (sweep
    1), else the saved one (sweep 2). d = (u − m)·k + (m·k − b) with m the chunk row's max: u − m
    is exact near the max and the row's offset m·k − b is formed in float64, so d carries one or
    two fp32 roundings relative to itself, as the kernels' FMA does, in one fp32 buffer. Invalid
    rows are zeroed first (they may hold NaN). Returns (d, valid, b, u) with u the softcapped
    logits (None without softcap)."""
    valid = target[r0:r0 + t1 - t0] >= 0
    x = logits[b, t0:t1].to(compute_dtype(logits), copy=True)
    x.masked_fill_(~valid.unsqueeze(-1), 0.0)
    u = torch.tanh(x.mul_(lmap.in_scale)) if lmap.softcap else x
    k = _row_scale(lmap.log2_scale, lmap, valid, r0, x.dtype)  # the fp32 the kernels get
    m = u.amax(-1)
    finite = torch.isfinite(m)
    # A row (or slice) of −inf: a finite base far below any logit, as the kernels' lanes use, so
    # that d = −inf, never −inf − (−inf). A +inf or NaN max stays the base, as in the kernels:
    # every d of the row is then NaN (SPEC.md, section 5).
    base = torch.where(m == -math.inf, -3.0e38, m * k) if base is None else base[r0:r0 + t1 - t0]
    m = torch.where(finite, m, 0.0)
    k64 = k.double() if isinstance(k, torch.Tensor) else k
    offset = (m.double() * k64 - base.double()).to(x.dtype).unsqueeze(-1)
    d = (u - m.unsqueeze(-1)) if lmap.softcap else u.sub_(m.unsqueeze(-1))
    k = k.unsqueeze(-1) if isinstance(k, torch.Tensor) else k
    return d.mul_(k).add_(offset), valid, base, (u if lmap.softcap else None)


def _ppo_clip(ratio, adv, eps_low, eps_high, dual_clip):
    """See ``kernels.token_math._ppo_clip``: (loss, d loss / d log r)."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    coef = torch.where(unclipped >= clipped, unclipped, 0.0)
    if dual_clip > 0:
        capped = (adv < 0) & (loss > -adv * dual_clip)
        loss, coef = torch.where(capped, -adv * dual_clip, loss), torch.where(capped, 0.0, coef)
    return loss, coef


def _objective_terms(logp, log_ratio, adv, hp):
    """(loss_t, d loss_t / d logp_t, ψ, ζ) of a token-level objective; ``token_math._token_loss``
    line for line, in float64."""
    zero = torch.zeros_like(log_ratio)
    if hp.kind == MHPO_KIND:
        c, k_pos, lam_pos, k_neg, lam_neg = hp.values
        if hp.lfm:
            psi, dpsi = c * torch.tanh(log_ratio / c), _sech2(log_ratio / c)
        else:
            psi, dpsi = log_ratio, zero + 1.0
        zeta = (F.softplus(psi) / lam_pos) ** k_pos + (F.softplus(-psi) / lam_neg) ** k_neg if hp.dhp else zero
        w = torch.exp(psi - zeta)
        return -w * adv, -adv * w * dpsi, psi, zeta
    if hp.kind == PPO_CLIP_KIND:
        eps_low, eps_high, dual_clip = hp.values[:3]
        return (*_ppo_clip(log_ratio.exp(), adv, eps_low, eps_high, dual_clip), log_ratio, zero)
    if hp.kind == CISPO_KIND:
        max_ratio, min_ratio = hp.values[:2]
        w = log_ratio.exp().clamp(min_ratio, max_ratio)
        return -w * adv * logp, -w * adv, log_ratio, zero
    if hp.kind == SAPO_KIND:
        tau_pos, tau_neg = hp.values[:2]
        ratio = log_ratio.exp()
        tau = torch.where(adv > 0, tau_pos, tau_neg)
        gate = torch.sigmoid(tau * (ratio - 1.0))
        slope = gate * (1.0 - gate)
        return -gate * (4.0 / tau) * adv, torch.where(slope > 0, -adv * 4.0 * slope * ratio, 0.0), log_ratio, zero
    if hp.kind == GPG_KIND:
        return -adv * logp, -adv + zero, log_ratio, zero
    raise ValueError(f"no token-level epilogue for objective kind {hp.kind}")


def _token_terms(logp, valid, old, adv, g, ref, hp):
    """The per-token epilogue (ψ, ζ, g·loss_t, g·d loss_t/d logp), in float64 on (N,) vectors,
    returned in fp32 (float64 for float64 log-probs)."""
    f64, out_dtype = torch.float64, logp.dtype if logp.dtype == torch.float64 else torch.float32
    logp = logp.to(f64)
    log_ratio = logp - old.to(f64) if old is not None else torch.zeros_like(logp)
    adv = adv.to(f64)
    loss, coef, psi, zeta = _objective_terms(logp, log_ratio, adv, hp)
    if ref is not None:
        d = ref.to(f64) - logp
        loss = loss + hp.beta * (torch.expm1(d) - d)
        coef = coef - hp.beta * torch.expm1(d)
    coef = torch.where(loss.isnan(), loss, coef)   # as the kernels: a NaN term, a NaN row
    g = g.to(f64)

    def out(x):
        return torch.where(valid, x, torch.zeros_like(x)).to(out_dtype)

    return out(psi), out(zeta), out(g * loss), out(g * coef)


def _sequence_terms(logp, valid, old, adv, g, ref, hp, seq_id, n_seqs):
    """GSPO's sequence-level epilogue on (N,) vectors of tokens in ``n_seqs`` sequences (``seq_id``
    the sequence of each token), in float64: (log s_i per token, the sequence term's derivative
    share, g·loss_t, g·d(KL term)/d logp).

    s_i = exp(mean over the valid tokens of sequence i of log r), loss_i = PPO-clip of s_i with
    the sequence's advantage. Every valid token carries loss_i; since loss_i depends on each of
    the sequence's log-probs through the mean, d loss_i / d logp_u = (d loss_i / d log s_i) / n_i,
    the "share" returned for each valid token u: the backward multiplies it by Σ_t g_t · ∂L/∂loss_t
    over the sequence."""
    f64, out_dtype = torch.float64, logp.dtype if logp.dtype == torch.float64 else torch.float32
    v = valid.to(f64)
    logp = logp.to(f64)
    log_ratio = logp - old.to(f64) if old is not None else torch.zeros_like(logp)
    log_ratio = torch.where(valid, log_ratio, 0.0)

    def per_seq(x):
        return per_sequence_sum(x, seq_id, n_seqs)

    n = per_seq(v).clamp(min=1.0)
    log_s = per_seq(log_ratio) / n
    adv_seq = per_seq(torch.where(valid, adv.to(f64), 0.0)) / n
    eps_low, eps_high = hp.values[:2]
    loss_seq, dlog_s = _ppo_clip(log_s.exp(), adv_seq, eps_low, eps_high, 0.0)
    dlog_s = torch.where(loss_seq.isnan(), loss_seq, dlog_s)  # a NaN sequence term: NaN rows, all of them
    loss = loss_seq[seq_id]
    share = (dlog_s / n)[seq_id]
    kl_coef = torch.zeros_like(logp)
    if ref is not None:
        d = ref.to(f64) - logp
        loss = loss + hp.beta * (torch.expm1(d) - d)
        kl_coef = -hp.beta * torch.expm1(d)
    g = g.to(f64)

    def out(x):
        return torch.where(valid, x, torch.zeros_like(x)).to(out_dtype)

    return out(log_s[seq_id]), out(share), out(g * loss), out(g * kl_coef)


def _zero_tail(grad):
    """Position T of each sequence of the (B, T + 1, V) tensor whose first T positions ``grad`` is:
    zeros (the next-token shift's last position predicts nothing)."""
    B, T, V = grad.shape
    grad.as_strided((B, 1, V), grad.stride(), grad.storage_offset() + T * grad.stride(1)).zero_()


def mhpo_fwd(logits, target, old, adv, g, ref, hp, lmap, *, with_entropy, with_loss, grad=None, zero_tail=False,
             grad_scale=1.0):
    """Sweep 1 in PyTorch; see ``kernels.forward.mhpo_fwd``. With ``grad``, then sweep 2 for an
    upstream gradient of ``grad_scale`` into it: the same two sweeps, so the same bits as running them apart."""
    N = logits.shape[0] * logits.shape[1]
    out = RowStats.empty(N, logits.device, with_entropy=with_entropy, with_loss=with_loss, dtype=compute_dtype(logits))
    for b, t0, t1, r0 in _chunks(logits):
        r1 = r0 + t1 - t0
        d, valid, base, _ = _exponents(logits, target, b, t0, t1, r0, None, lmap)
        e = d.exp2()                                    # max(d) ≈ 0, so Σ e ≥ 1: no overflow
        sum_e = e.sum(-1)
        lse2_rest = sum_e.log2()
        y = target[r0:r1].long()
        has_y = valid & (y < d.shape[-1])              # y ≥ V: the target is on another rank's slice
        d_y = d.gather(-1, y.clamp(0, d.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        out.lse2_base[r0:r1] = torch.where(valid, base, 0.0)
        out.lse2_rest[r0:r1] = torch.where(valid, lse2_rest, 0.0)
        out.logp[r0:r1] = torch.where(has_y, (d_y - lse2_rest) * LN2, 0.0)
        if with_entropy:
            # H = ln 2 · (log2 s − Σ e·d / s); e·d is 0, not NaN, where d = −inf.
            e_d = torch.where(e > 0, e.mul_(d), 0.0).sum(-1)
            out.entropy[r0:r1] = torch.where(valid, (lse2_rest - e_d / sum_e) * LN2, 0.0)
    if with_loss and N > 0:
        valid = target >= 0
        out.psi[:], out.zeta[:], out.loss[:], out.coef[:] = _token_terms(
            out.logp, valid, old, adv, g, ref, hp
        )
    if grad is not None:
        mhpo_bwd(logits, grad, target, out.lse2_base, out.lse2_rest, out.coef * grad_scale, None, None, lmap, zero_tail)
    return out


def mhpo_bwd(logits, grad, target, base, lse2_rest, dlogp, entropy, dentropy, lmap, zero_tail=False):
    """Sweep 2 in PyTorch; see ``kernels.backward`` for the derivation (and ``zero_tail``)."""
    if zero_tail:
        _zero_tail(grad)
    for b, t0, t1, r0 in _chunks(logits):
        r1 = r0 + t1 - t0
        q, valid, _, u = _exponents(logits, target, b, t0, t1, r0, base, lmap)
        q.sub_(lse2_rest[r0:r1].unsqueeze(-1))           # log2 p
        dlogp_c = torch.where(valid, dlogp[r0:r1], 0.0).unsqueeze(-1)
        dz = q.exp2()                                   # p, then overwritten with ∂L/∂z
        if dentropy is not None:
            dent = torch.where(valid, dentropy[r0:r1], 0.0).unsqueeze(-1)
            h = entropy[r0:r1].unsqueeze(-1)
            ent_term = torch.where(dz > 0, dz * (q * LN2 + h), 0.0).mul_(dent)
        y = target[r0:r1].long()
        has_y = (valid & (y < dz.shape[-1])).unsqueeze(-1)
        dz.mul_(-dlogp_c).scatter_add_(-1, y.clamp(0, dz.shape[-1] - 1).unsqueeze(-1),
                                       torch.where(has_y, dlogp_c, 0.0))
        if dentropy is not None:
            dz.sub_(ent_term)
        slope = _row_scale(lmap.slope, lmap, valid, r0, q.dtype)
        dz.mul_(slope.unsqueeze(-1) if isinstance(slope, torch.Tensor) else slope)
        if lmap.softcap:
            dz.mul_(1.0 - u * u)                        # dz/dx from tanh's result, as eager does
        dz.masked_fill_(~valid.unsqueeze(-1), 0.0)
        grad[b, t0:t1] = dz
    return grad


def scale_rows_(grad, target, upstream, expected=1.0):
    """grad (B, T, V) times the 0-d ``upstream`` / ``expected`` at the rows of valid tokens, in
    place (``kernels.backward.scale_rows_``)."""
    B, T, _ = grad.shape
    upstream = upstream.float()
    return grad.mul_(torch.where(target.reshape(B, T, 1) >= 0, upstream / expected, 1.0))


def finalize(target, loss, g, entropy, logp, psi, zeta, old, ref, entropy_coef, c, *, mhpo, metrics):
    """(the 0-d fp32 loss Σ_t g_t·loss_t − entropy_coef · Σ_t g_t·H_t, 0 without ``loss``; the
    (len(METRICS),) fp32 metrics when ``metrics``, means over valid tokens, 0 when there are none,
    slots a call does not have 0; else empty), as ``kernels.finalize``."""
    total = torch.zeros((), dtype=logp.dtype, device=target.device)
    if loss is not None:
        total = loss.sum()
        if entropy_coef != 0:
            total = total - entropy_coef * (g * entropy).sum()
    out = torch.zeros(len(METRICS) if metrics else 0, dtype=torch.float32, device=target.device)
    if not metrics:
        return total, out
    valid = target >= 0
    n_valid = valid.sum().clamp(min=1)

    def mean(x):
        return torch.where(valid, x, 0.0).sum().div(n_valid)

    log_ratio = logp - old if old is not None else torch.zeros_like(logp)
    values = dict(abs_log_ratio=mean(log_ratio.abs()), entropy=mean(entropy), logp=mean(logp))
    if mhpo:
        values.update(psi=mean(psi), zeta=mean(zeta), survival=mean(torch.exp(-zeta)),
                      saturated_frac=mean((log_ratio.abs() > c).float()))
    if ref is not None:
        delta = ref - logp
        values["kl"] = mean(torch.expm1(delta) - delta)
    for name, value in values.items():
        out[METRICS.index(name)] = value
    return total, out
