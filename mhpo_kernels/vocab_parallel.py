"""The vocabulary split over a ``torch.distributed`` group (tensor parallelism, Megatron layout).

Each rank holds a contiguous slice of the vocabulary, in rank order: logits (…, V_r), or LM-head
rows (V_r, H). The sweeps run on the slice unchanged; what crosses ranks is O(N):

1. ``VocabSlice.agree``: one all-gather of a small int64 row per rank, read on the host once:
   the slice size, the token count, fingerprints of the ids and per-token settings, whether the
   rank's local checks passed, its largest id, a hash of every setting the ranks must share, and
   the status of its prepare launch (validation's flags, so that the call reads the host once).
   Every rank judges the same table alike, so a bad call raises on every rank.
2. ``VocabSlice.combine``: one all-gather of four fp32 per token and rank (the slice's log-sum-exp
   in two parts, its entropy, the target's log-prob within it), combined in float64 into the
   global statistics; the per-token epilogue then runs on O(N) vectors, alike on every rank.

The backward needs no collective: with the global log-sum-exp, each rank's gradient is its slice
of the full gradient. A replayed kept set (``kept_ids``) goes to every rank whole; each rank reads
the kept ids of its slice (``VocabSlice.local_kept_ids``), whose statistics combine as above.
The filters find each row's threshold on the exponents d at the largest slice base, alike on
every rank (``slice_select.selected_cuts``): ``min_p`` from that base, ``top_k`` and ``top_p``
by counting every slice's tokens, each pass's counts all-reduced.
"""

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import ops
from ._op_support import once_differentiable
from ._inputs import status_failed
from ._sweep_types import STATUS_N_VALID, STATUS_SLOTS, RowStats
from .epilogue import left_out, merge_slices, token_terms
from .slice_select import selected_cuts

SETTING_SLOTS = 20  # hashed settings per call; every call fills them in the same order
STATUS_AT = 8 + SETTING_SLOTS   # the prepare launch's status in a rank's row of the agreement


FINGERPRINT_PRIME = 2**31 - 1
FINGERPRINT_MAPS = ((48271, 69621, 12345), (16807, 39373, 67890))   # (a, b, c) of h = a·x + b·i + c mod p


def _fingerprint(x):
    """Two int64 sums, 0-d tensors on x's device (never read on the host): Σ_i h(x_i, i)² mod p
    for two affine maps h modulo the prime p (``FINGERPRINT_MAPS``; a floating tensor by its
    bits, every value taken mod p). Values that differ mod p give sums that agree only by a
    chance of about 2⁻⁶⁰ (ids are below p; -1, an invalid token, is p − 1); the squares keep a
    simple difference (+1, −2, +1 at three positions) from cancelling as it does in a linear
    sum. Every product stays below 2⁶²: no overflow."""
    if x.is_floating_point():
        x = x.to(torch.float32).view(torch.int32)
    p = FINGERPRINT_PRIME
    flat = x.reshape(-1).to(torch.int64) % p
    position = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % p
    return [(((flat * a + position * b + c) % p) ** 2 % p).sum() for a, b, c in FINGERPRINT_MAPS]


def _setting_hashes(settings):
    """(``SETTING_SLOTS`` int64 hashes of the settings' ``repr``s, in order, 0 for unused slots;
    {slot: the bits of a 0-d tensor setting's fp32 value, as a 0-d int64 tensor where it is}):
    ``agree`` writes those bits into the row on the device, so a normalizer on the GPU needs no
    host sync of its own, and a number and a tensor of the same value agree."""
    if settings is None:
        return [0] * SETTING_SLOTS, {}
    values = list(settings.values())
    if len(values) > SETTING_SLOTS:
        raise AssertionError(f"at most {SETTING_SLOTS} agreed settings per call, got {len(values)}")
    out, bits = [], {}
    for slot, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            bits[slot] = v.detach().reshape(()).to(torch.float32).view(torch.int32).to(torch.int64)
            out.append(0)  # written by agree
        else:
            out.append(int.from_bytes(hashlib.blake2b(repr(v).encode(), digest_size=8).digest(), "little",
                                      signed=True) or 1)
    return out + [0] * (SETTING_SLOTS - len(out)), bits


def _shown(value):
    """A setting's value for an error message (a tensor's read only then)."""
    return float(value) if isinstance(value, torch.Tensor) else value


def collective_device(group, device):
    """(the device of the agreement's all-gather, why ``device`` is wrong for ``group`` or None):
    an NCCL group's error for CPU inputs still travels on a CUDA tensor, so every rank hears it."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and device.type != "cuda" and not any(
            b in backend for b in ("gloo", "mpi", "ucc")):
        problem = (f"tp_group uses the NCCL backend, which communicates CUDA tensors only, but the "
                   f"inputs are on {device}; move them to CUDA or use a gloo group")
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device()), problem
        return None, problem
    return device, None


@dataclass
class VocabSlice:
    """This rank's place in a vocabulary split over ``group``: slice sizes of every rank, in order."""

    group: object
    rank: int
    sizes: tuple

    def __post_init__(self):  # the ranks, this slice's first id and size, the whole vocabulary
        self.world, self.start, self.size, self.total = (len(self.sizes), sum(self.sizes[:self.rank]),
                                                         self.sizes[self.rank], sum(self.sizes))

    @staticmethod
    def agree(group, local_size, device, batch=None, local_error=None, settings=None):
        """The agreement (module docstring): one all-gather of 8 + ``SETTING_SLOTS`` +
        ``STATUS_SLOTS`` int64 per rank, written on the device, read on the host once (the call's
        one host sync: validation's flags, ``batch.unread_status``, ride in it); the same verdict
        raised on every rank."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("tp_group needs an initialized torch.distributed process group")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        comm_device, wrong_device = collective_device(group, device)
        if wrong_device is not None:
            local_error = local_error or ValueError(wrong_device)
            if comm_device is None:  # no device this group can talk on: nothing to tell the others with
                raise local_error
        try:
            hashes, bits = _setting_hashes(settings)
        except Exception as e:  # a setting that cannot be hashed: refused like any local error
            local_error, hashes, bits = local_error or e, [0] * SETTING_SLOTS, {}
        n = -1 if batch is None else batch.target.numel()
        host = [int(local_size), n, -2, -2, -2, -2, 0 if local_error is None else 1, -1, *hashes] + [0] * STATUS_SLOTS
        # From pageable host memory without a stream sync (the list is not touched again).
        mine = torch.tensor(host, dtype=torch.int64, device="cpu").to(comm_device, non_blocking=True)
        if batch is not None and local_error is None:
            prints = _fingerprint(batch.target) + _fingerprint(_per_token_settings(batch))
            top = batch.target.amax() if n > 0 else batch.target.new_full((), -1)
            if batch.kept_ids is not None and batch.kept_ids.numel() > 0:
                top = torch.maximum(top, batch.kept_ids.amax().to(top.dtype))
            mine[2:6] = torch.stack(prints).to(comm_device)
            mine[7] = top.to(device=comm_device, dtype=torch.int64)
            if batch.unread_status is not None:
                mine[STATUS_AT:] = batch.unread_status[0].to(comm_device)
        for slot, value in bits.items():
            mine[8 + slot] = value.to(comm_device)
        table = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(table, mine, group=group)
        table = torch.stack(table).tolist()
        if local_error is None and batch is not None and batch.unread_status is not None:
            flags = table[rank][STATUS_AT:]
            local_error = batch.unread_status[1](flags)
            batch.n_valid, batch.unread_status = flags[STATUS_N_VALID], None
        if local_error is not None:
            raise local_error
        failed = [r for r in range(world) if table[r][6] or status_failed(table[r][STATUS_AT:])]
        if failed:
            raise ValueError(f"tp_group: the inputs of rank(s) {failed} failed validation (their error is "
                             f"raised there); no rank computed anything")
        differ = [i for i in range(SETTING_SLOTS) if len({t[8 + i] for t in table}) > 1]
        if differ:
            names = list(settings or {})
            if 0 in differ:  # different calls: the other slots mean different things
                raise ValueError(f"tp_group: ranks make different calls; this rank's is "
                                 f"{(settings or {}).get('call')}: every rank must make the same call")
            mine_values = ", ".join(f"{names[i]}={_shown(settings[names[i]])!r}" for i in differ if i < len(names))
            raise ValueError(f"tp_group: ranks disagree on {', '.join(names[i] for i in differ if i < len(names))} "
                             f"(this rank: {mine_values}); every rank must pass the same hyperparameters, "
                             f"objective, normalizer, flags and dtypes")
        sizes = tuple(t[0] for t in table)
        if min(sizes) < 1:
            raise ValueError(f"tp_group: every rank needs a vocabulary slice of at least 1, got sizes {list(sizes)}")
        if len({t[1] for t in table}) > 1:
            raise ValueError(f"tp_group: ranks disagree on the number of tokens: {[t[1] for t in table]}")
        per_token = ("cu_seqlens, the per-token temperature, min_p, top_k or top_p, kept_ids, or the data "
                     "(old_logprobs, ref_logprobs, advantages, token_weights, seq_valid_tokens)")
        for prints, what in ((slice(2, 4), "input_ids or mask"), (slice(4, 6), per_token)):
            if len({tuple(t[prints]) for t in table}) > 1:
                raise ValueError(f"tp_group: {what} differ across ranks; every rank must pass the same global ids, "
                                 f"mask, sequence boundaries, per-token temperature and filters, kept set and data")
        tp = VocabSlice(group, rank, sizes)
        beyond = [r for r in range(world) if table[r][7] >= tp.total]   # ids' upper bounds, now that V is known
        if beyond and rank not in beyond:   # the same verdict on every rank, whatever the fingerprints said
            raise ValueError(f"tp_group: rank(s) {beyond} hold ids outside [0, {tp.total}) (the vocabulary of all "
                             f"ranks; their error is raised there); no rank computed anything")
        if beyond:  # this rank's own (reads only to raise)
            bad = batch.target >= tp.total
            if not bad.any():
                raise ValueError(f"kept_ids holds ids outside [0, {tp.total}) (the vocabulary of all ranks)")
            where = bad.nonzero()[0, 0].item()
            raise ValueError(f"input_ids holds {int(bad.sum())} id(s) outside [0, {tp.total}) (the vocabulary "
                             f"of all ranks) at valid positions, e.g. {int(batch.target[where])} at flat position "
                             f"{where} (use ignore_index or mask to skip)")
        return tp

    def local_target(self, target):
        """Global ids (−1 invalid) → ids in this slice; V_r where the target is another rank's."""
        local = target.to(torch.int64) - self.start
        elsewhere = (local < 0) | (local >= self.size)
        return torch.where(target < 0, -1, torch.where(elsewhere, self.size, local)).to(torch.int32)

    def local_kept_ids(self, kept_ids):
        """A replayed kept set's global ids → ids in this slice, −1 where another rank's (the
        replay kernels skip them), or None."""
        if kept_ids is None:
            return None
        local = kept_ids.to(torch.int64) - self.start
        return torch.where((local >= 0) & (local < self.size), local, -1).to(torch.int32)

    def owner_of(self, target):
        """The rank whose slice holds each global target id (−1 for invalid tokens)."""
        ends = torch.tensor(self.sizes, dtype=torch.int64, device="cpu").cumsum(0).to(target.device, non_blocking=True)
        rank = torch.bucketize(target.to(torch.int64), ends, right=True)
        return torch.where(target >= 0, rank, -1)

    def combine(self, local, target, with_entropy):
        """Collective 2: every slice's (base, log2 sum, entropy, logp within the slice) per token,
        gathered and merged (``epilogue.merge_slices``) into the global ones, fp32."""
        mine = torch.stack([local.lse2_base, local.lse2_rest,
                            local.entropy if with_entropy else torch.zeros_like(local.lse2_base), local.logp], 1)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine.contiguous(), group=self.group)
        return merge_slices(torch.stack(gathered), self.owner_of(target), target >= 0, with_entropy)

    def finish_rows(self, local, target, old, adv, g, ref, hp, with_entropy, with_loss, kept=None, outside=None):
        """The global RowStats of a block of rows (``target`` global, −1 invalid) from the slice's:
        ``combine``, then the per-token epilogue, the same on every rank; and the (target, g) it
        used. ``kept``: a loss over a truncated softmax, (its LogitMap, the rows' thresholds or None,
        ``Batch.layout()``, agg, normalizer) as ``ops.kept_tokens`` takes them: the targets outside
        their kept set leave the aggregation. ``outside``: the targets outside their replayed kept
        set, whose log-prob is −inf whatever the set's logits hold (a NaN there would merge to NaN)."""
        base, lse2_rest, logp, entropy = self.combine(local, target, with_entropy)
        if outside is not None:
            logp = torch.where(outside, -math.inf, logp)
        psi = zeta = loss = coef = None
        if with_loss:
            if kept is not None:
                lmap, cut, layout, agg, normalizer = kept
                target, g = ops.kept_tokens(logp, lmap, cut, target, old, hp.kind, layout, agg, normalizer)
            psi, zeta, loss, coef = token_terms(logp, target >= 0, old, adv, g, ref, hp)
        return RowStats(base, lse2_rest, logp, entropy, psi, zeta, loss, coef), target, g


def dtype_name(x):
    return None if not isinstance(x, torch.Tensor) else str(x.dtype)


def agreed_settings(call, hp, lmap, **flags):
    """What every rank of a tp_group must pass alike, by name (``vocab_parallel.agree``): the
    call, the objective with its values and switches, β, whether the temperature is a tensor (one
    per token), the logit map (1/τ times the scale, the scale after a softcap, the softcap), which
    filters truncate it, then the call's own flags and dtypes."""
    return dict(call=call, objective=(hp.kind, hp.values, hp.lfm, hp.dhp), beta=hp.beta,
                temperature_is_a_tensor=lmap.tau is not None,
                temperature_and_logit_map=(lmap.in_scale, lmap.out_scale, lmap.softcap),
                truncation=tuple(x is not None for x in (lmap.min_p, lmap.top_k, lmap.top_p)), **flags)


def normalizer_setting(normalizer):
    """``normalizer`` as the ranks of a tp_group must agree on it: None, or the value the loss
    divides by as a 0-d fp32 tensor (a number's on the CPU, a tensor's where it is), whose bits
    the agreement gathers without reading it on the host (``vocab_parallel.agree``)."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        return normalizer.detach().to(torch.float32)
    return torch.tensor(float(normalizer), dtype=torch.float32, device="cpu")


def _per_token_settings(batch):
    """The sequence boundaries, the bits at valid tokens of the per-token temperature, filters and
    data (old and reference log-probs, advantages times token weights, the aggregation's weights),
    and a replayed kept set, as one int64 tensor to fingerprint: ranks must pass them alike (ranks
    that passed other data would each compute another loss)."""
    parts = [batch.boundaries()]
    for per_token, off in ((batch.tau, 1.0), (batch.min_p, 0.0), (batch.top_k, 0), (batch.top_p, 1.0),
                           (batch.old, 0.0), (batch.adv, 0.0), (batch.ref, 0.0), (batch.weight, 0.0)):
        if per_token is not None:
            parts.append(torch.where(batch.valid, per_token, off).view(torch.int32).to(torch.int64))
    if batch.kept_offsets is not None:
        parts += [batch.kept_offsets, batch.kept_ids.to(torch.int64)]
    return torch.cat(parts)


class _VocabParallelSweeps(torch.autograd.Function):
    """The two sweeps on this rank's slice, with the statistics combined across the group: the
    forward returns the global (logp, entropy, g·loss) per token; the backward writes this rank's
    slice of ∂L/∂logits with no collective."""

    @staticmethod
    def forward(ctx, logits, tp, batch, hp, lmap, with_entropy, with_loss, shifted, inplace, agg, normalizer):
        target = tp.local_target(batch.target)
        kept_ids = tp.local_kept_ids(batch.kept_ids)
        params = ops.pack_params(hp, lmap)
        local, cut = RowStats(*ops.sweeps_forward(
            logits, target, old=None, adv=None, weight=None, ref=None, tau=lmap.tau, params=params,
            softcap=lmap.softcap, with_entropy=bool(with_entropy), with_loss=False, shifted=bool(shifted),
            inplace_backward=False, kept_offsets=batch.kept_offsets, kept_ids=kept_ids)[:8]), None
        if lmap.filtered:  # thresholds found over every slice, on d at the largest slice base
            cut, local = selected_cuts(tp, logits[:, :-1] if shifted else logits, local, target, lmap, batch.valid)
        ref = batch.ref if hp.beta > 0 else None
        kept = (lmap, cut, batch.layout(), agg, normalizer) if lmap.truncated else None
        outside = outside_kept_set(lmap, batch.target) if lmap.replayed else None
        stats, kept_target, g = tp.finish_rows(local, batch.target, batch.old, batch.adv, batch.weight, ref, hp,
                                               with_entropy, with_loss, kept, outside)
        truncated = lmap.truncated_rows(cut)
        if truncated is not None:  # outside its kept set (or at −inf, in none): log-prob −inf on every rank
            outside = left_out(stats.logp, truncated)
        if with_loss and lmap.truncated:  # a token the loss left out: no gradient, its row not read (ops.py)
            target = torch.where(kept_target < 0, -1, target)
        # The backward forms d at the common base, the combine's, against the thresholds there.
        ctx.save_for_backward(logits, target, stats.lse2_base, stats.lse2_rest, stats.coef, stats.entropy, lmap.tau,
                              batch.kept_offsets, kept_ids, outside, cut)
        ctx.params, ctx.softcap, ctx.shifted, ctx.inplace = params, lmap.softcap, shifted, inplace
        ctx.with_entropy, ctx.with_loss = with_entropy, with_loss
        ctx.set_materialize_grads(False)  # an output that got no gradient adds no term
        empty = logits.new_empty(0, dtype=torch.float32)
        outputs = (stats.logp, stats.entropy if with_entropy else empty, stats.loss if with_loss else empty,
                   stats.psi if with_loss else empty, stats.zeta if with_loss else empty)
        kept_outputs = (kept_target, empty if g is None else g)
        ctx.mark_non_differentiable(*kept_outputs)
        return outputs + kept_outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, d_logp, d_entropy, d_loss, _psi, _zeta, _target, _g):
        logits, target, base, lse2_rest, coef, entropy, tau, kept_offsets, kept_ids, outside, cut = ctx.saved_tensors
        dlogp = torch.zeros_like(lse2_rest) if d_logp is None else d_logp.float()
        if outside is not None:
            dlogp = torch.where(outside, 0.0, dlogp)
        if ctx.with_loss and d_loss is not None:
            dlogp = dlogp + coef * d_loss
        dent = d_entropy.float().contiguous() if ctx.with_entropy and d_entropy is not None else None
        if outside is not None and dent is None:  # no gradient at all: the row is not read
            target = torch.where(outside, -1, target)
        return (ops.backward_sweep(logits, ctx.inplace, target=target, base=base, lse2_rest=lse2_rest,
                                   dlogp=dlogp.contiguous(), entropy=entropy if dent is not None else None,
                                   dentropy=dent, tau=tau, params=ctx.params, softcap=ctx.softcap,
                                   shifted=ctx.shifted, cut=cut, kept_offsets=kept_offsets, kept_ids=kept_ids),) + \
            (None,) * 10


def outside_kept_set(lmap, target):
    """(N,) bool: the valid targets outside their row's replayed kept set, which get no log-prob
    gradient on any rank (each rank's replay kernel sees only its slice's part of the set)."""
    row_of = lmap.kept_row_of()
    hit = (row_of >= 0) & (lmap.kept_ids.long() == target.long()[row_of.clamp(min=0)])
    inside = torch.zeros_like(target, dtype=torch.int32).index_add_(0, row_of.clamp(min=0), hit.int())
    return lmap.truncated_rows(None) & (target >= 0) & (inside == 0)


def row_stats(logits, batch, hp, lmap, with_entropy, shifted=False, inplace_backward=False, grad_in_forward=False,
              totals=ops.NO_TOTALS, entropy_coef=0.0, grad_scale=1.0, agg=-1, normalizer=None):
    """``ops.row_stats`` on this rank's slice (``batch.tp``), with its arguments and outputs: the
    global per-token values, whose logp, entropy and loss carry gradient to this rank's logits.
    The loss is summed here, the metrics reduced from detached values (``ops.metrics_vector``)."""
    assert batch.unread_status is None, "a split vocabulary's inputs are used once the ranks agreed on them"
    assert not grad_in_forward, "refused with tp_group by check_grad_in_forward"
    with_loss = batch.adv is not None
    logp, entropy, loss, psi, zeta, target, g = _VocabParallelSweeps.apply(
        logits, batch.tp, batch, hp, lmap, bool(with_entropy), with_loss, bool(shifted), bool(inplace_backward), agg,
        normalizer)
    stats = RowStats(None, None, logp, entropy if with_entropy else None, *(
        x if with_loss else None for x in (psi, zeta, loss)), None)
    if totals == ops.NO_TOTALS:
        return stats, None, None
    total = loss.sum()
    if entropy_coef != 0:  # Σ_t g_t · (loss_t − entropy_coef · H_t) over the valid tokens (finalize's)
        total = total - entropy_coef * torch.where(target >= 0, g * entropy, 0.0).sum()
    if totals != ops.LOSS_AND_METRICS:
        return stats, total, None
    return stats, total, ops.metrics_vector(logp, stats.entropy, psi, zeta, target, g, batch.old, batch.adv, batch.ref,
                                            hp, batch.target if lmap.truncated else None)
