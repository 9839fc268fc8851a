"""The kernels in plain PyTorch: the path for CPU tensors without Triton's interpreter (and for
any device Triton does not serve), and inside torch.compile the prepare step.

Same inputs and outputs as ``kernels.prepare.prepare``, ``kernels.forward.mhpo_fwd``,
``kernels.backward.mhpo_bwd``, ``scale_rows_``, ``kernels.finalize.finalize`` and
``token_terms``. The sweeps take blocks of rows (``_chunks``): working memory is a few blocks'
worth whatever N, never N × V, and a row's bits do not depend on the batch (``_rowwise``). The
per-token epilogue is ``epilogue``'s.
"""

import math

import torch

from ._sweep_types import (
    ADV_PER_SEQ, ADV_SCALAR, AGG_MODES, METRICS, STATUS_BAD_IDS, STATUS_CU, STATUS_FIRST_BAD, STATUS_MASK,
    STATUS_N_VALID, STATUS_NORM, STATUS_NOT_ONE_EACH, STATUS_SEQ_COUNTS, STATUS_SLOTS, STATUS_TAU,
    STATUS_ADV_VARIES, STATUS_KEPT_IDS, STATUS_KEPT_OFFSETS, STATUS_KEPT_TWICE, STATUS_OLD_POSITIVE, STATUS_REF_POSITIVE, STATUS_MIN_P, STATUS_TOP_P, STATUS_TOKEN_W, LOGP_ABOVE_ZERO, RowStats,
    clip_bounds, truncated_rows,
)
from .objectives import MHPO_KIND
from ._sweep_types import (COUNT_JOINT, COUNT_JOINT_SUMS, COUNT_JOINT_UNIFORM, COUNT_KEYS, COUNT_SUMS, COUNT_UNIFORM,
                           SELECT_BINS as NB)
from . import epilogue
from .epilogue import LN2, per_sequence_sum, segment_ids

# The base of a row with no finite logit (the kernels' rows.FLOOR).
FLOOR_BASE = -3.0e38
# A block of rows holds at most this many elements (one row at least): ATen splits an elementwise
# op over threads from this many on (at::internal::GRAIN_SIZE), anywhere in a row.
BLOCK_ELEMENTS = 32768
# Block-sized fp32 temporaries a sweep holds at once, at most (a block: max(BLOCK_ELEMENTS, V + 1)
# elements, one row at least): its working memory beyond its inputs and outputs (measured by
# tests/test_torch_path_memory.py, at any N; the exponents' float64 quarter rows, ``_exponents``,
# take half a block of it).
BLOCK_COPIES = 8


def boundaries(cu, n_seqs, T, device):
    """The (S + 1,) boundaries of every layout: ``cu`` of a packed stream, else S rows of T."""
    return cu if cu is not None else torch.arange(n_seqs + 1, device=device, dtype=torch.int64) * T


def prepare(ids, mask, cu, adv, adv_mode, tau, normalizer, seq_counts, n_seqs, T, V, ignore_index, agg, with_weight,
            same_adv=False, one_token_each=False, old=None, ref=None, min_p=None, top_p=None, tw=None, tw_mode=0,
            logp=None, cut=None, kept=None, kept_set=None):
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
    if logp is not None:  # a truncated loss's: the tokens it leaves out
        valid = valid & ~epilogue.left_out(logp, truncated_rows(cut, *(kept or (None, None))), old)
    bad = valid & ((ids < 0) | (ids >= V))
    positions = torch.arange(N, device=device, dtype=torch.int64)
    status[STATUS_N_VALID], status[STATUS_BAD_IDS] = valid.sum(), bad.sum()
    status[STATUS_FIRST_BAD] = torch.where(bad, positions, N).amin() if N else zero
    if kept_set is not None:  # offsets 0 ... K non-decreasing, ids in [0, V), no (row, id) key twice
        offsets, kept_ids, keys = kept_set
        status[STATUS_KEPT_OFFSETS] = ((offsets[0] != 0) | (offsets[-1] != kept_ids.numel())
                                       | (offsets[1:] < offsets[:-1]).any()).to(torch.int64)
        status[STATUS_KEPT_IDS] = ((kept_ids < 0) | (kept_ids >= V)).sum()
        status[STATUS_KEPT_TWICE] = (keys[1:] == keys[:-1]).sum()
    if tau is not None:  # τ_t is data like a logit (NaN propagates); ≤ 0 or +inf is a misuse
        status[STATUS_TAU] = (valid & ((tau <= 0) | tau.isinf())).sum()
    if min_p is not None:  # a share of the largest probability: NaN or above 1 is a misuse (≤ 0 is off)
        status[STATUS_MIN_P] = (valid & (min_p.isnan() | (min_p > 1))).sum()
    if top_p is not None:  # a share of the mass: NaN or ≤ 0 is a misuse (≥ 1 is off)
        status[STATUS_TOP_P] = (valid & ~(top_p > 0)).sum()
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
    if adv is None:  # the weights alone (``ADV_NONE``)
        return target, weight, None, torch.stack(status)
    adv = adv.to(torch.float32)
    adv_t = adv.reshape(1).expand(N) if adv_mode == ADV_SCALAR else adv[seq_id] if adv_mode == ADV_PER_SEQ else adv
    if same_adv and N > 0:  # each valid token against the valid token before it, in the same sequence
        before = torch.cat([positions.new_full((1,), -1), torch.where(valid, positions, -1).cummax(0).values[:-1]])
        prev = before.clamp(min=0)
        # "<" or ">", not "!=": a NaN advantage is no shape error (it makes the loss NaN)
        differs = (adv_t < adv_t[prev]) | (adv_t > adv_t[prev])
        status[STATUS_ADV_VARIES] = (valid & (before >= 0) & (seq_id[prev] == seq_id) & differs).sum()
    if tw is not None:  # data like the advantage (NaN propagates); below 0 is a misuse
        tw = tw.to(torch.float32)
        tw_t = tw.reshape(1).expand(N) if tw_mode == ADV_SCALAR else tw[seq_id] if tw_mode == ADV_PER_SEQ else tw
        status[STATUS_TOKEN_W] = (valid & (tw_t < 0)).sum()
        adv_t = adv_t * tw_t  # see kernels/prepare.py: the policy term is linear in A for w ≥ 0
    return target, weight, adv_t.contiguous(), torch.stack(status)


def _chunks(logits):
    """(b, t0, t1, r0): blocks of rows of logits (B, T, V) as views, of at most BLOCK_ELEMENTS
    elements with a padded row each (``_rowwise``), or one row: ATen then runs no op of a block
    over several threads, and a row alone splits alike wherever it is."""
    B, T, V = logits.shape
    rows = max(1, BLOCK_ELEMENTS // (V + 1))
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            yield b, t0, t1, b * T + t0


def _rowwise(fn, x):
    """``fn(x, out=...)`` for a block's rows (R, V), or its per-row values (R,), through the same
    ATen code for every row, whatever R and the row's place: the result goes into a buffer whose
    rows are one element longer, so that ATen's loops take the rows one by one (a contiguous
    block runs as one run, and which elements its vector loop leaves to its scalar remainder,
    whose transcendentals round differently in the last bit, would fall by the row's place),
    and a row's value one at a time. So a row's bits do not depend on the batch (SPEC.md,
    section 3)."""
    if x.dim() == 1:
        return _rowwise(fn, x.unsqueeze(-1)).squeeze(-1)
    out = torch.empty((x.shape[0], x.shape[1] + 1), dtype=x.dtype, device=x.device)[:, :x.shape[1]]
    return fn(x, out=out)


def compute_dtype(logits):
    """What the PyTorch path computes in: float64 for float64 logits (its own path only, for
    ``gradcheck`` and debugging), fp32 for the kernels' dtypes."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_scale(value, lmap, valid, r0, dtype=torch.float32):
    """A scale of the logit map (``log2_scale`` or ``slope``) for the chunk's rows, as the kernels
    form it: the fp32 scalar, divided by each row's τ_t in fp32 with a per-token temperature
    ((rows,) tensor; 1 at invalid rows, which may hold anything)."""
    scale = torch.tensor(value, dtype=dtype, device="cpu")
    if lmap.tau is None:
        return scale.item()
    return scale / torch.where(valid, lmap.tau[r0:r0 + valid.numel()], 1.0)


def _exponents(logits, target, b, t0, t1, r0, base, lmap):
    """The base-2 exponents d = k·u(x) − b of rows [r0, r0 + t1 − t0) as a fresh fp32 chunk, as the
    kernels form them (``kernels/logit_map.py``): b = fp32(k · max u) when ``base`` is None (sweep
    1), else the saved one (sweep 2). d = fp32(u·k − b) formed in float64, where the product of two
    fp32 values is exact: one rounding of the exact value, as the kernels' fma(u, k, −b) makes
    (but for a float64 rounding on the way when u·k and b lie far apart), so that two 16-bit logits
    are tied here exactly where the kernels tie them (SPEC.md, section 9). As the FMA's, d is a
    function of u, k and b alone: every sweep, and every slice of a vocabulary split at a common b
    (``slice_select.py``), forms the same d of the same logit. Invalid
    rows are zeroed first (they may hold NaN). Replayed rows (``_dropped``) take b from their kept
    logits, and d = −inf outside them. Returns (d, valid, b, u, dropped) with u the softcapped
    logits (None without softcap) and dropped the mask of ``_dropped`` (None without replay)."""
    valid = target[r0:r0 + t1 - t0] >= 0
    x = logits[b, t0:t1].to(compute_dtype(logits), copy=True)
    x.masked_fill_(~valid.unsqueeze(-1), 0.0)
    u = _rowwise(torch.tanh, x.mul_(lmap.in_scale)) if lmap.softcap else x
    k = _row_scale(lmap.log2_scale, lmap, valid, r0, x.dtype)  # the fp32 the kernels get
    dropped = _dropped(lmap, r0, t1 - t0, x.shape[-1], x.device)
    m = (u if dropped is None else u.masked_fill(dropped, -math.inf)).amax(-1)
    # A row (or slice) of −inf: a finite base far below any logit, as the kernels' lanes use, so
    # that d = −inf, never −inf − (−inf). A +inf or NaN max stays the base, as in the kernels:
    # every d of the row is then NaN (SPEC.md, section 5).
    base = torch.where(m == -math.inf, FLOOR_BASE, m * k) if base is None else base[r0:r0 + t1 - t0]
    k64, b64 = (k.double().unsqueeze(-1) if isinstance(k, torch.Tensor) else k), base.double().unsqueeze(-1)
    d = torch.empty_like(u) if lmap.softcap else u   # without softcap u is the fresh copy x: d takes its place
    step = -(-u.shape[-1] // 4)   # float64 a quarter row at a time: half a block's bytes
    for c0 in range(0, u.shape[-1], step):
        d[:, c0:c0 + step] = u[:, c0:c0 + step].to(torch.float64, copy=True).mul_(k64).sub_(b64)
    if dropped is not None:  # never read, as the kernels read only the kept logits: a NaN there stays out
        d.masked_fill_(dropped, -math.inf)
    return d, valid, base, (u if lmap.softcap else None), dropped


def _dropped(lmap, r0, rows, V, device):
    """(rows, V) bool: the elements outside the replayed kept sets of rows [r0, r0 + rows) (none
    in a row with an empty set), or None without replay. An id < 0 is another vocabulary slice's
    (vocab_parallel.py)."""
    if not lmap.replayed:
        return None
    chunk = lmap.rows(slice(r0, r0 + rows))
    start, end, ids, row_of = chunk.kept_start, chunk.kept_end, lmap.kept_ids.long(), chunk.kept_row_of()
    kept = torch.zeros(rows, V, dtype=torch.int32, device=device)
    kept.index_put_((row_of.clamp(min=0), ids.clamp(min=0)), ((row_of >= 0) & (ids >= 0)).int(), accumulate=True)
    return (kept == 0) & (end > start).unsqueeze(-1)


def _zero_tail(grad):
    """Position T of each sequence of the (B, T + 1, V) tensor whose first T positions ``grad`` is:
    zeros (the next-token shift's last position predicts nothing)."""
    B, T, V = grad.shape
    grad.as_strided((B, 1, V), grad.stride(), grad.storage_offset() + T * grad.stride(1)).zero_()


FLT_MAX = torch.finfo(torch.float32).max


def _cut(lmap, d, valid, r0, base):
    """The kept set's threshold on the exponents d (rows, V) of the chunk's rows, (rows, 1), or
    None without truncation (SPEC.md, section 9; the kernels' ``select.py``): min_p's closed form
    log2(min_p), never above the largest logit's own d (``select._cut``); then, at rows whose
    softmax is finite, the k-th largest d left, and the smallest d left whose mass strictly above
    is below top_p of what is left, each by a sort of the row. −inf: not truncated. A threshold
    given without a filter (``kernels.forward.mhpo_fwd``) is taken as it is."""
    r1 = r0 + valid.numel()
    if not lmap.filtered:
        return None if lmap.cut is None else torch.where(valid, lmap.cut[r0:r1], -math.inf).to(d.dtype).unsqueeze(-1)
    cut = torch.full_like(base, -math.inf, dtype=d.dtype)
    if lmap.min_p is not None:
        min_p = torch.where(valid, lmap.min_p[r0:r1], 0.0).to(d.dtype)
        cut = torch.where(min_p > 0, _rowwise(torch.log2, min_p.clamp(min=1e-45)), -math.inf)
        cut = torch.minimum(cut, -(base.abs().to(d.dtype) * 2.0**-23 + 2.0**-126))
    s = _rowwise(torch.exp2, d).sum(-1)
    finite = valid & (s > 0) & (s < math.inf)

    def left(cut):  # what the filters so far keep, in decreasing order; −inf past it
        return torch.where(d >= cut.clamp(min=-FLT_MAX).unsqueeze(-1), d, -math.inf).sort(-1, descending=True).values

    if lmap.top_k is not None:
        top_k = torch.where(finite, lmap.top_k[r0:r1], 0).long()
        ordered = left(cut)
        k = top_k.clamp(min=1).minimum((ordered > -math.inf).sum(-1).clamp(min=1))
        cut = torch.where(top_k > 0, ordered.gather(-1, (k - 1).unsqueeze(-1)).squeeze(-1), cut)
    if lmap.top_p is not None:
        top_p = torch.where(finite, lmap.top_p[r0:r1], 1.0).to(d.dtype)
        ordered = left(cut)
        mass = _rowwise(torch.exp2, ordered)
        above = mass.cumsum(-1) - mass                  # the mass strictly before each in the order
        n = (above < (top_p * mass.sum(-1)).unsqueeze(-1)).sum(-1).clamp(min=1)
        cut = torch.where(top_p < 1, ordered.gather(-1, (n - 1).unsqueeze(-1)).squeeze(-1), cut)
    return cut.unsqueeze(-1)


def mhpo_fwd(logits, target, old, adv, g, ref, hp, lmap, *, with_entropy, with_loss, grad=None, zero_tail=False,
             grad_scale=1.0):
    """Sweep 1 in PyTorch; see ``kernels.forward.mhpo_fwd``. With ``grad``, then sweep 2 for an
    upstream gradient of ``grad_scale`` into it: the same two sweeps, so the same bits as running them apart."""
    N = logits.shape[0] * logits.shape[1]
    assert not lmap.truncated or not (with_loss or grad is not None), "a truncated softmax gives log-probs only"
    out = RowStats.empty(N, logits.device, with_entropy=with_entropy, with_loss=with_loss, truncated=lmap.filtered or lmap.cut is not None,
                         dtype=compute_dtype(logits))
    for b, t0, t1, r0 in _chunks(logits):
        r1 = r0 + t1 - t0
        d, valid, base, _, dropped = _exponents(logits, target, b, t0, t1, r0, None, lmap)
        cut = _cut(lmap, d, valid, r0, base)
        e = _rowwise(torch.exp2, d)                     # max(d) ≈ 0, so Σ e ≥ 1: no overflow
        if cut is not None:                             # the kept set only; a NaN stays (SPEC.md, sections 5, 9)
            e.masked_fill_(d < cut, 0.0)
        sum_e = e.sum(-1)
        lse2_rest = _rowwise(torch.log2, sum_e)
        y = target[r0:r1].long()
        has_y = valid & (y < d.shape[-1])              # y ≥ V: the target is on another rank's slice
        d_y = d.gather(-1, y.clamp(0, d.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        out.lse2_base[r0:r1] = torch.where(valid, base, 0.0)
        out.lse2_rest[r0:r1] = torch.where(valid, lse2_rest, 0.0)
        logp = (d_y - lse2_rest) * LN2
        if dropped is not None:  # a target outside its kept set, also where this slice holds none of it
            logp = torch.where(dropped.gather(-1, y.clamp(0, d.shape[-1] - 1).unsqueeze(-1)).squeeze(-1), -math.inf,
                               logp)
        if cut is not None:
            # kept a token, or none of its finite logits (a vocabulary slice; kernels/forward.py)
            truncated = valid & ((lse2_rest > -math.inf) | ((sum_e == 0) & (base > FLOOR_BASE)))
            logp = torch.where((d_y < cut[:, 0]) & truncated, -math.inf, logp)
            out.cut[r0:r1] = torch.where(truncated, cut[:, 0], -math.inf)
        out.logp[r0:r1] = torch.where(has_y, logp, 0.0)
        if with_entropy:
            # H = ln 2 · (log2 s − Σ e·d / s); e·d is 0, not NaN, where d = −inf.
            e_d = torch.where(e > 0, e.mul_(d), 0.0).sum(-1)
            out.entropy[r0:r1] = torch.where(valid, (lse2_rest - e_d / sum_e) * LN2, 0.0)
    if with_loss and N > 0:
        valid = target >= 0
        out.psi[:], out.zeta[:], out.loss[:], out.coef[:] = epilogue.token_terms(
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
        q, valid, row_base, u, dropped = _exponents(logits, target, b, t0, t1, r0, base, lmap)
        y = target[r0:r1].long()
        if lmap.cut is not None:                        # outside the kept set, before q becomes log2 p
            dropped = q < torch.where(valid, lmap.cut[r0:r1], -math.inf).to(q.dtype).unsqueeze(-1)
        has_y = (valid & (y < q.shape[-1])).unsqueeze(-1)   # else another vocabulary slice's target
        outside = None
        if dropped is not None:  # a target outside the kept set: no log-prob gradient
            y_c = y.clamp(0, q.shape[-1] - 1).unsqueeze(-1)
            outside = has_y & dropped.gather(-1, y_c)
            if lmap.replayed:   # or at d = −inf, which no kept set holds (SPEC.md, section 9)
                truncated = lmap.truncated_rows(None)[r0:r1].unsqueeze(-1)
                outside |= has_y & truncated & (q.gather(-1, y_c) == -math.inf)
        q.sub_(lse2_rest[r0:r1].unsqueeze(-1))           # log2 p
        dlogp_c = torch.where(valid, dlogp[r0:r1], 0.0).unsqueeze(-1)
        if outside is not None:
            dlogp_c = torch.where(outside, 0.0, dlogp_c)
        dz = _rowwise(torch.exp2, q)                    # p, then overwritten with ∂L/∂z
        if lmap.cut is not None:  # p = 0 outside the kept set, times the row's coefficients (as the kernel)
            dz.masked_fill_(dropped, 0.0)
        if dentropy is not None:
            dent = torch.where(valid, dentropy[r0:r1], 0.0).unsqueeze(-1)
            h = entropy[r0:r1].unsqueeze(-1)
            ent_term = torch.where(dz > 0, dz * (q * LN2 + h), 0.0).mul_(dent)
        dz.mul_(-dlogp_c).scatter_add_(-1, y.clamp(0, dz.shape[-1] - 1).unsqueeze(-1),
                                       torch.where(has_y, dlogp_c, 0.0))
        if dentropy is not None:
            dz.sub_(ent_term)
        slope = _row_scale(lmap.slope, lmap, valid, r0, q.dtype)
        dz.mul_(slope.unsqueeze(-1) if isinstance(slope, torch.Tensor) else slope)
        if lmap.softcap:
            dz.mul_(1.0 - u * u)                        # dz/dx from tanh's result, as eager does
        if lmap.replayed and dropped is not None:  # written without reading, as the replay kernels do
            dz.masked_fill_(dropped, 0.0)
            if dentropy is None:  # and no gradient at all where the target is outside (0 · a NaN there)
                dz.masked_fill_(outside, 0.0)
        dz.masked_fill_(~valid.unsqueeze(-1), 0.0)
        grad[b, t0:t1] = dz
    return grad


def token_terms(logp, target, old, adv, g, ref, hp):
    """``kernels.finalize.token_terms``: the per-token epilogue of the tokens ``target`` marks valid."""
    return epilogue.token_terms(logp, target >= 0, old, adv, g, ref, hp)


def scale_rows_(grad, target, upstream, expected=1.0):
    """grad (B, T, V) times the 0-d ``upstream`` / ``expected`` at the rows of valid tokens, in
    place (``kernels.backward.scale_rows_``)."""
    B, T, _ = grad.shape
    upstream = upstream.float()
    return grad.mul_(torch.where(target.reshape(B, T, 1) >= 0, upstream / expected, 1.0))


def finalize(target, loss, g, entropy, logp, psi, zeta, old, adv, ref, entropy_coef, hp, *, metrics, target0=None):
    """(the 0-d fp32 loss Σ_t g_t·loss_t − entropy_coef · Σ_t g_t·H_t, 0 without ``loss``; the
    (len(METRICS),) fp32 metrics of the objective ``hp`` when ``metrics``, means over valid tokens,
    0 when there are none, slots a call does not have 0, and with ``target0`` (the targets before
    a truncated loss left some out) their share that left, ``outside_support``; else empty), as
    ``kernels.finalize``."""
    total = torch.zeros((), dtype=logp.dtype, device=target.device)
    if loss is not None:
        total = loss.sum()
        if entropy_coef != 0:   # at valid tokens only: a left-out one's g_t = 0 may meet H_t = NaN
            total = total - entropy_coef * torch.where(target >= 0, g * entropy, 0.0).sum()
    out = torch.zeros(len(METRICS) if metrics else 0, dtype=torch.float32, device=target.device)
    if not metrics:
        return total, out
    valid = target >= 0
    n_valid = valid.sum().clamp(min=1)

    def mean(x):
        return torch.where(valid, x, 0.0).sum().div(n_valid)

    log_ratio = logp - old if old is not None else torch.zeros_like(logp)
    values = dict(abs_log_ratio=mean(log_ratio.abs()), entropy=mean(entropy), logp=mean(logp))
    if hp.kind == MHPO_KIND:
        values.update(psi=mean(psi), zeta=mean(zeta), survival=mean(torch.exp(-zeta)),
                      saturated_frac=mean((log_ratio.abs() > hp.values[0]).float()))
    clip = clip_bounds(hp) if adv is not None else None
    if clip is not None:   # the ratio as the kernels form it: exp of the log-ratio, in its dtype
        ratio, (lo, hi) = log_ratio.exp(), clip
        values.update(clip_low_frac=mean(((ratio < lo) & (adv < 0)).float()),
                      clip_high_frac=mean(((ratio > hi) & (adv > 0)).float()))
    if ref is not None:
        delta = ref - logp
        values["kl"] = mean(torch.expm1(delta) - delta)
    if target0 is not None:
        n0 = (target0 >= 0).sum()
        values["outside_support"] = (n0 - valid.sum()) / n0.clamp(min=1)
    for name, value in values.items():
        out[METRICS.index(name)] = value
    return total, out


def order_keys(d):
    """fp32 → int64 keys in [0, 2^32) in the same order (−0 just below +0; ``kernels.select._key``)."""
    b = d.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(b >= 0x80000000, b ^ 0xFFFFFFFF, b | 0x80000000)


def slice_count(logits, target, lmap, base, mode, klo, khi, shift, lo, scale, delta, joint=None):
    """``kernels.select.slice_count`` in PyTorch: one counting pass of the rows' selection over
    this slice at the common ``base`` (the rows' d formed as ``_exponents`` forms them; the kept
    tokens' sums of d + ``delta``; ``joint``: top-k's runs beside top-p's)."""
    B, T, V = logits.shape
    n_hist = 2 if joint else 1
    hist = torch.zeros(B * T, n_hist, NB, dtype=torch.int32, device=logits.device)
    sums = torch.zeros(B * T, 6 if joint else 4, dtype=torch.float32, device=logits.device)

    def tally(d, e, key, m, keys, k_lo, k_hi, k_shift, r0, r1, i):
        """The counts of run ``i`` (0: top-p's or a single filter's, 1: top-k's beside it)."""
        lo_r = lo[r0:r1].unsqueeze(-1)
        uniform = (m == COUNT_UNIFORM) | (m == COUNT_JOINT_UNIFORM) if i == 0 else torch.zeros_like(keys)
        u_bin = ((d - lo_r) * scale[r0:r1].unsqueeze(-1)).nan_to_num(0.0).clamp(0, NB - 1).to(torch.int64)
        in_keys = keys & (key >= k_lo) & (key <= k_hi)
        bins = torch.where(uniform, u_bin, (key - k_lo).clamp(min=0) >> k_shift)
        inside = (uniform & (d >= lo_r)) | in_keys
        rows = torch.arange(r1 - r0, device=d.device).unsqueeze(-1) * NB
        counts = torch.zeros((r1 - r0) * NB, dtype=torch.int32, device=d.device)
        counts.index_add_(0, (rows + bins.clamp(max=NB - 1))[inside], torch.ones_like(bins, dtype=torch.int32)[inside])
        hist[r0:r1, i] = counts.view(r1 - r0, NB)
        return inside, keys & (key > k_hi)

    for b, t0, t1, r0 in _chunks(logits):
        r1 = r0 + t1 - t0
        d, valid, _, _, _ = _exponents(logits, target, b, t0, t1, r0, base, lmap)
        m = torch.where(valid, mode[r0:r1], 0).unsqueeze(-1)
        key = order_keys(d + 0.0)           # −0 as +0, as the kernel's keys
        d_y = d.gather(-1, target[r0:r1].long().clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
        rebased = (m == COUNT_SUMS) | (m == COUNT_JOINT_SUMS)   # the sums of d + delta, Σ 2^d·d above
        d = torch.where(rebased, d + delta[r0:r1].unsqueeze(-1), d)
        e = torch.exp2(d)
        beside = (m == COUNT_JOINT_UNIFORM) | (m == COUNT_JOINT) | (m == COUNT_JOINT_SUMS)
        keys = (m == COUNT_KEYS) | (m == COUNT_SUMS) | (m == COUNT_JOINT) | (m == COUNT_JOINT_SUMS)
        inside, above = tally(d, e, key, m, keys, klo[r0:r1].unsqueeze(-1), khi[r0:r1].unsqueeze(-1),
                              shift[r0:r1].long().unsqueeze(-1), r0, r1, 0)
        sums[r0:r1, 0] = torch.where(above, e, 0.0).sum(-1)
        sums[r0:r1, 1] = torch.where(inside & ~rebased, e, 0.0).sum(-1)
        sums[r0:r1, 2] = torch.where(above & rebased & (e > 0), e * d, 0.0).sum(-1)
        sums[r0:r1, 3] = torch.where(valid & (target[r0:r1] < V), d_y, 0.0)
        if joint:                           # top-k's run: counts, and the sums above it but in the first pass
            klo_k, khi_k, shift_k = (x[r0:r1].long().unsqueeze(-1) for x in joint)
            _, above = tally(d, e, key, m, beside, klo_k, khi_k, shift_k, r0, r1, 1)
            above = above & (m != COUNT_JOINT_UNIFORM)
            sums[r0:r1, 4] = torch.where(above, e, 0.0).sum(-1)
            sums[r0:r1, 5] = torch.where(above & rebased & (e > 0), e * d, 0.0).sum(-1)
    return (hist if joint else hist[:, 0]), sums


def slice_gather(logits, target, lmap, base, from_key, first, klo, khi, slots, counts):
    """``kernels.select.slice_gather`` in PyTorch: the rows' d from ``from_key``'s value up, in
    the slice's order from slot ``first`` on of their row of ``slots`` (rows with ``first`` < 0:
    none), and the keys of [klo, khi] counted one bin a key in their row of ``counts``."""
    for b, t0, t1, r0 in _chunks(logits):
        r1 = r0 + t1 - t0
        d, valid, _, _, _ = _exponents(logits, target, b, t0, t1, r0, base, lmap)
        start = first[r0:r1].long().unsqueeze(-1)
        key = order_keys(d + 0.0)
        mine = valid.unsqueeze(-1) & (start >= 0)
        gathered = mine & (key >= from_key[r0:r1].unsqueeze(-1))
        slot = start + gathered.cumsum(-1) - 1
        at = gathered & (slot < NB)
        slots[r0:r1][at.nonzero(as_tuple=True)[0], slot[at]] = d[at]
        k_lo, k_hi = klo[r0:r1].unsqueeze(-1), khi[r0:r1].unsqueeze(-1)
        counted = (k_lo <= k_hi) & (start >= 0)
        run = mine & counted & (key >= k_lo) & (key <= k_hi)
        rows = torch.arange(r1 - r0, device=d.device).unsqueeze(-1).expand_as(run)
        block = torch.zeros(r1 - r0, NB, dtype=counts.dtype, device=d.device)
        block.index_put_((rows[run], (key - k_lo)[run]), torch.ones_like(key[run], dtype=counts.dtype), accumulate=True)
        counts[r0:r1] = torch.where(counted, block, counts[r0:r1])
    return slots, counts
