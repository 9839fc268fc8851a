"""top-k and top-p over a vocabulary split (SPEC.md, sections 6 and 9): ``kernels/select.py``'s
selection with every counting pass a launch over this rank's slice (``slice_count``: the Triton
kernel or ``torch_sweeps``' version, as the call's backend), its counts and sums added over the
group, and the decisions between passes taken here on (N, NB) tensors, the same on every rank.

Every rank forms d = k·u − b at the group's common base b (the largest slice base), as its sums
and its backward then do, so that "d ≥ threshold" is the same set in all of them and on every
rank. A row takes the same passes as in one launch: a filter's counting passes (three at most,
each one all-reduce of N × NB int32 counts and N × 4 fp32 sums). The last of them also sums the
kept tokens of the slice, from its own counts, at the slice's own base; a row decided before it
takes one pass of those sums more. Every slice is thus read at most 4 times for one filter (the
statistics and three passes). With both filters, top-k's passes stop once at most NB tokens lie
from its k-th value's bin up over every slice; in the next pass each slice stores its d of them
(``slice_gather``) in the row's place in the counts, after the slices before it (one all-reduce of
N × world counts places them), summed with the counts (each slot is one slice's, 0 in the
others'), and every rank decides both filters and its own kept tokens' sums from the same values
(``_decide_gathered``): read 3 or 4 times, as one launch reads an fp32 row, with the counting
passes' all-reduces. Rows are decided together, without a host sync: a pass runs for every row,
a decided row skips its reading."""

import math

import torch
import torch.distributed as dist

from . import _dispatch
from ._sweep_types import COUNT_KEYS, COUNT_SKIP, COUNT_SUMS, COUNT_UNIFORM, SELECT_BINS as NB
from .torch_sweeps import order_keys

NB_BITS, MAX_PASSES = 11, 3
UNIFORM_RANGE = 64.0               # select.UNIFORM_RANGE: top-p's first pass bins d ≥ −64
KEY_INF = 0xFF800000               # order_keys(+inf)
FLT_MAX = 3.4028234663852886e38
LN2 = math.log(2.0)


def key_value(key):
    """The fp32 value of int64 keys (``order_keys``' inverse)."""
    bits = torch.where(key >= 0x80000000, key & 0x7FFFFFFF, key ^ 0xFFFFFFFF)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _d_max(base):
    """select._d_max: above any d of a row at base b."""
    return base.abs() * 1.1920928955078125e-07 + 7.888609052210118e-31


def _uniform_bin(d, lo, scale):
    """select._uniform_bin, in fp32 as the kernels compute it."""
    return ((d - lo) * scale).nan_to_num(0.0).clamp(0, NB - 1).to(torch.int64)


def _bin_start(b, lo, scale):
    """select._bin_start for each row: the smallest key whose value falls in uniform bin b or
    above (KEY_INF + 1 for b ≥ NB)."""
    a = order_keys(lo)
    z = torch.full_like(a, KEY_INF + 1)
    for _ in range(32):
        m = a + (z - a) // 2
        up = _uniform_bin(key_value(m), lo, scale) >= b
        z, a = torch.where(up & (a < z), m, z), torch.where(~up & (a < z), m + 1, a)
    return a


def _bits(span):
    """select._bits: the bits a key span needs, or one more."""
    return ((span.to(torch.float32).view(torch.int32) >> 23) - 126).clamp(min=0).to(torch.int64)


def _decide(cnt, w_lo, w_hi, above, s_hi, s_in, goal, shift, last, by_mass):
    """select._decide for every row: (kept bins, the highest and the lowest ambiguous bin, −1 and
    NB where none), in float64."""
    bins = torch.arange(NB, device=cnt.device)
    multi = (shift > 0).unsqueeze(-1)
    above_lo = above.unsqueeze(-1) + (w_lo.flip(-1).cumsum(-1).flip(-1) - w_lo)
    above_hi = above.unsqueeze(-1) + (w_hi.flip(-1).cumsum(-1).flip(-1) - w_hi)
    goal = goal.unsqueeze(-1)
    if by_mass and not last:  # and from below: the range's exact mass less what the bins up to each hold
        total = (s_hi + s_in).unsqueeze(-1)
        above_lo = torch.where(multi, torch.maximum(above_lo, total - w_hi.cumsum(-1)), above_lo)
        above_hi = torch.where(multi, torch.minimum(above_hi, total - w_lo.cumsum(-1)), above_hi)
    full = cnt > 0
    if last:  # a bin of several keys is kept whole where its highest token would be
        kept = full & (0.5 * (above_lo + above_hi) < goal)
        ambiguous = torch.zeros_like(kept)
    else:
        others = torch.where(multi, w_hi - w_hi / cnt.clamp(min=1.0), 0.0)
        kept = full & (above_hi + others < goal)
        ambiguous = full & ~kept & (above_lo < goal) & multi
    return (kept, torch.where(ambiguous, bins, -1).amax(-1), torch.where(ambiguous, bins, NB).amin(-1))


def _threshold(count, base, delta, floor, goal, on, by_mass, beside=None):
    """select._threshold for the rows ``on``: (the smallest kept d of top-k (goal k, counts) or
    top-p (BY_MASS, goal top_p of the candidates' mass) over the candidates d ≥ ``floor``; this
    slice's kept tokens' Σ 2^d and Σ 2^d·d at its own base, d + ``delta``, float64, where the
    last pass decided the row; whether it did), each pass ``count(mode, klo, khi, shift, lo,
    scale)`` over every slice. ``beside``: top-k beside top-p, (the rows with both, their top_p,
    ``place``): a row's counting stops once at most NB tokens lie from its k-th value's bin up
    over every slice (``_keys_pass``); the next pass's launch gathers them in its place, each
    slice's after the slices before it (``place``: every slice's first slot), into the same
    buffer and all-reduce, and both filters are decided from them with the kept tokens' sums
    (``_decide_gathered``); then a fifth value, those rows. The decisions take blocks of
    DECIDE_ROWS rows, so that their (rows, NB) float64 temporaries stay bounded at any N."""
    klo = order_keys(floor)
    khi = torch.full_like(klo, KEY_INF)
    state = dict(klo=klo, khi=khi, cut_key=klo.clone(), done=~on, goal=goal.double(), base=base, delta=delta,
                 lo=torch.zeros_like(base), scale=torch.zeros_like(base), summed=torch.zeros_like(on))
    for name in ("above", "s", "a"):   # each its own: the blocks are written back in place
        state[name] = torch.zeros_like(base, dtype=torch.float64)
    if beside is not None:
        may_gather, top_p, place = beside
        state.update(may_gather=may_gather, pending=torch.zeros_like(on), gathered=torch.zeros_like(on),
                     from_key=klo.clone(), own_from=torch.zeros_like(base, dtype=torch.float64),
                     own_above=torch.zeros_like(base, dtype=torch.float64))
    if by_mass:  # the first pass's bins, for each row, filled by blocks
        state.update(lowest=torch.zeros_like(klo), b_lo=torch.zeros_like(klo), b_hi=torch.zeros_like(klo),
                     decided=torch.zeros_like(on), ambiguous=torch.zeros_like(on))
    first = 0
    if by_mass:  # pass 1, uniform in d over [lo, hi]
        state["lo"] = floor.clamp(min=-UNIFORM_RANGE)
        state["scale"] = NB / (_d_max(base) - state["lo"])
        hist, sums, _ = count(torch.where(state["done"], COUNT_SKIP, COUNT_UNIFORM), klo, khi, torch.zeros_like(klo),
                              state["lo"], state["scale"])
        _by_blocks(_uniform_pass, state, hist, sums)
        # The decided rows' threshold and the others' range of keys, from their bins (32 steps each).
        lo, scale, decided, ambiguous = state["lo"], state["scale"], state.pop("decided"), state.pop("ambiguous")
        state["cut_key"] = torch.where(decided, _bin_start(state.pop("lowest"), lo, scale).clamp(max=KEY_INF),
                                       state["cut_key"])
        b_lo, b_hi = state.pop("b_lo"), state.pop("b_hi")
        state["klo"] = torch.where(ambiguous, _bin_start(b_lo, lo, scale), state["klo"])
        state["khi"] = torch.where(ambiguous, _bin_start(b_hi + 1, lo, scale) - 1, state["khi"])
        first = 1
    for i in range(first, MAX_PASSES):
        last = i == MAX_PASSES - 1
        state["shift"] = (_bits(state["khi"] - state["klo"]) - NB_BITS).clamp(min=0)
        # The last pass counts as the others and sums the mass above its range at the slice's own
        # base (COUNT_SUMS): with its own counts, the kept tokens' sums (``_keys_pass``).
        gather = None
        if beside is not None and i > 0:   # the rows the last pass left pending gather in this one
            slot0, n = place(state["pending"], state["own_from"])
            gather = (state["from_key"], slot0)
        hist, sums, own = count(torch.where(state["done"], COUNT_SKIP, COUNT_SUMS if last else COUNT_KEYS),
                                state["klo"], state["khi"], state["shift"], state["lo"], state["scale"],
                                keep_own=last or beside is not None, gather=gather)
        if gather is not None:
            _decide_gathered(state, hist.view(torch.float32), slot0, n, top_p)
        _by_blocks(_keys_pass, state, hist, sums, own, last=last, by_mass=by_mass)
    found = key_value(state["cut_key"]), state["s"], state["a"], state["summed"]
    return found if beside is None else found + (state["gathered"],)


# Rows decided at once: (rows, NB) float64 temporaries, about 160 MB at 1,024 rows (16 MB each;
# the last pass, which also sums the slice's kept tokens, a few more), in a few dozen ops a pass.
DECIDE_ROWS = 1024


def _by_blocks(decide, state, hist, sums, own=None, **kwargs):
    """``decide`` on the rows of ``state`` (each value (N,)), DECIDE_ROWS at a time, in place
    (``own``: this slice's own counts and sums, or None)."""
    for r0 in range(0, hist.shape[0], DECIDE_ROWS):
        rows = slice(r0, r0 + DECIDE_ROWS)
        block = {name: x[rows] for name, x in state.items()}
        decide(block, hist[rows].double(), sums[rows].double(),
               None if own is None else tuple(x[rows].double() for x in own), **kwargs)
        for name, x in block.items():
            state[name][rows] = x


def _uniform_pass(st, cnt, sums, own):
    """top-p's first pass for a block of rows: its goal becomes top_p of the mass from lo, and a
    row is decided (at its lowest kept bin) or left to its ambiguous bins (``_threshold`` turns
    those bins into keys). ``own`` is None: the pass sums no kept tokens."""
    bins = torch.arange(NB, device=cnt.device)
    s_in = sums[:, 1]
    st["goal"] = st["goal"] * s_in
    lo = st["lo"]
    width = (_d_max(st["base"]) - lo).double()
    margin = (width * 2.0**-20).unsqueeze(-1)
    edges = lo.double().unsqueeze(-1) + torch.arange(NB + 1, device=cnt.device) * (width / NB).unsqueeze(-1)
    w_lo = torch.where(cnt > 0, cnt * torch.exp2(edges[:, :-1] - margin), 0.0)
    w_hi = torch.where(cnt > 0, cnt * torch.exp2(edges[:, 1:] + margin), 0.0)
    kept, b_hi, b_lo = _decide(cnt, w_lo, w_hi, st["above"], st["above"], s_in, st["goal"],
                               torch.ones_like(st["klo"]), False, True)
    done = st["done"]
    st["decided"], st["ambiguous"] = ~done & (b_hi < 0), ~done & (b_hi >= 0)
    st["lowest"], st["b_lo"], st["b_hi"] = torch.where(kept, bins, NB).amin(-1), b_lo, b_hi
    st["done"] = done | st["decided"]


def _keys_pass(st, cnt, sums, own, last, by_mass):
    """A pass over bins of 2^shift keys for a block of rows: a row is decided, or its range
    narrows to its ambiguous bins (top-k carries the count above them). In the last pass, which
    decides every row, ``own`` (this slice's own counts and sums at its base) give the slice's
    kept tokens' sums, as ``select._narrow`` finds them: a kept bin of one key its exact mass, of
    several the middle of its bounds, at its lowest d. Top-k beside top-p (``may_gather``) stops
    before its last pass where at most NB tokens lie from its k-th value's bin (or its lowest kept
    one) up, over every slice: the row is left pending, to be gathered by the next pass, ``own``
    giving this slice's count of its candidates."""
    bins = torch.arange(NB, device=cnt.device)
    klo, khi, shift, done = st["klo"], st["khi"], st["shift"], st["done"]
    s_hi, s_in = sums[:, 0], sums[:, 1]
    width = (1 << shift) - 1
    lo_key = (klo.unsqueeze(-1) + (bins << shift.unsqueeze(-1))).clamp(max=KEY_INF)   # bins past khi: empty
    hi_key = lo_key + torch.minimum(width.unsqueeze(-1), (khi.unsqueeze(-1) - lo_key).clamp(min=0))
    d_lo = key_value(lo_key)
    d_hi = torch.minimum(key_value(hi_key), _d_max(st["base"]).unsqueeze(-1))
    above = st["above"]
    if by_mass:
        above = s_hi
        w_lo = torch.where(cnt > 0, cnt * torch.exp2(d_lo.double()), 0.0)
        w_hi = torch.where(cnt > 0, cnt * torch.exp2(d_hi.double()), 0.0)
    else:
        w_lo = w_hi = cnt
    kept, b_hi, b_lo = _decide(cnt, w_lo, w_hi, above, s_hi, s_in, st["goal"], shift, last, by_mass)
    decided, ambiguous = ~done & (b_hi < 0), ~done & (b_hi >= 0)
    b_kept = torch.where(kept, bins, NB).amin(-1)
    kept_key = torch.where(b_kept < NB, klo + (b_kept.clamp(max=NB - 1) << shift), (khi + 1).clamp(max=KEY_INF))
    gather = torch.zeros_like(done)
    if "may_gather" in st and not last:   # top-k beside top-p: its candidates gathered once at most NB remain
        b_from = torch.where(decided, b_kept, b_lo).unsqueeze(-1)   # its k-th value's bin, or its lowest kept
        n_from = above + torch.where(bins >= b_from, cnt, 0.0).sum(-1)
        gather = st["may_gather"] & (decided | ambiguous) & (n_from <= NB)
        own_cnt = own[0]
        from_key = torch.where(decided, kept_key, klo + (b_lo.clamp(max=NB - 1) << shift))
        st["from_key"] = torch.where(gather, from_key, st["from_key"])
        st["own_from"] = torch.where(gather, st["own_above"] + torch.where(bins >= b_from, own_cnt, 0.0).sum(-1),
                                     st["own_from"])
        st["pending"] = gather
        decided, ambiguous = decided & ~gather, ambiguous & ~gather
        st["own_above"] = torch.where(ambiguous, st["own_above"] + torch.where(bins > b_hi.unsqueeze(-1), own_cnt,
                                                                               0.0).sum(-1), st["own_above"])
    st["cut_key"] = torch.where(decided, kept_key, st["cut_key"])
    if not by_mass:
        st["above"] = torch.where(ambiguous, above + torch.where(bins > b_hi.unsqueeze(-1), cnt, 0.0).sum(-1), above)
    top = klo + (b_hi.clamp(min=0) << shift)
    st["khi"] = torch.where(ambiguous, top + torch.minimum(width, khi - top), khi)
    st["klo"] = torch.where(ambiguous, klo + (b_lo.clamp(max=NB - 1) << shift), klo)
    st["done"] = done | decided | gather
    if last:
        own_cnt, own_sums = own
        delta = st["delta"].unsqueeze(-1)
        own_lo = (d_lo + delta).double()      # d + delta in fp32, as the kernel forms it
        e = own_cnt * 0.5 * (torch.exp2(own_lo) + torch.exp2((d_hi + delta).double()))
        kept = (own_cnt > 0) & (bins >= b_kept.unsqueeze(-1))   # the bins from the lowest kept one up
        st["s"] = torch.where(decided, own_sums[:, 0] + torch.where(kept, e, 0.0).sum(-1), st["s"])
        st["a"] = torch.where(decided, own_sums[:, 2] + torch.where(kept, e * own_lo, 0.0).sum(-1), st["a"])
        st["summed"] = st["summed"] | decided


def _decide_gathered(st, slots, slot0, n, top_p):
    """Both filters for the pending rows of ``st``, from their n candidates' d in ``slots`` (N, NB)
    over every slice, this slice's from ``slot0`` on (``_gathered_cut``): the smallest kept d, this
    slice's kept tokens' sums at its own base, summed; the rows are then gathered, no more pending."""
    for r0 in range(0, slots.shape[0], DECIDE_ROWS):
        rows = slice(r0, r0 + DECIDE_ROWS)
        pending = st["pending"][rows]
        own = (slot0[rows], slot0[rows] + st["own_from"][rows].to(torch.int64))
        cut, s, a = _gathered_cut(slots[rows], n[rows], st["goal"][rows], top_p[rows], own, st["delta"][rows])
        st["cut_key"][rows] = torch.where(pending, order_keys(cut), st["cut_key"][rows])
        st["s"][rows] = torch.where(pending, s, st["s"][rows])
        st["a"][rows] = torch.where(pending, a, st["a"][rows])
    st["summed"] = st["summed"] | st["pending"]
    st["gathered"] = st["gathered"] | st["pending"]
    st["pending"] = torch.zeros_like(st["pending"])


def _gathered_cut(d, n, top_k, top_p, own, delta):
    """select._gathered_cut for a block of rows, on the n candidates' d of each (``d`` (rows, NB)
    fp32): top-k keeps the d with fewer than k above them, top-p of those the d with below top_p of
    their mass above them, ties together, as the kernel's searches decide (here by one sort of the
    candidates). Returns (the smallest kept d; Σ 2^d and Σ 2^d·d at the slice's own base, d +
    ``delta``, over the kept candidates in this slice's slots, ``own`` = [first, end))."""
    slot = torch.arange(NB, device=d.device)
    d = torch.where(slot < n.unsqueeze(-1), d, -math.inf)
    desc = d.sort(-1, descending=True).values
    above = torch.searchsorted(-desc, -desc)            # the candidates above each: its tie group's first slot
    by_k = (above < top_k.unsqueeze(-1)) & (desc > -math.inf)
    mass = torch.where(by_k, torch.exp2(desc.double()), 0.0).cumsum(-1)
    mass_above = torch.where(above > 0, mass.gather(-1, (above - 1).clamp(min=0)), 0.0)
    kept = by_k & (mass_above < top_p.double().unsqueeze(-1) * mass[:, -1:])
    cut = torch.where(kept, desc, math.inf).amin(-1)
    first, end = (x.unsqueeze(-1) for x in own)
    mine = (slot >= first) & (slot < end) & (d >= cut.unsqueeze(-1))
    x = (d + delta.unsqueeze(-1)).double()              # d + delta in fp32, as the kernel forms it
    e = torch.where(mine, torch.exp2(x), 0.0)
    return cut, e.sum(-1), torch.where(e > 0, e * x, 0.0).sum(-1)


def select_over_slices(logits, target, lmap, group, base, local_base, cut, finite, vocab):
    """(each row's threshold on d at the common ``base`` (−inf: not truncated), and this slice's
    (N, 4) sums over the kept tokens, at the slice's ``local_base``: Σ 2^d, −, Σ 2^d·d, and the
    target's d at ``base``) of top-k and top-p after ``cut`` (min_p's, or −inf) at the rows
    ``finite`` (valid, with a finite softmax over every slice), for this slice of ``logits``
    (B, T, V) and its targets; a top-k of at least ``vocab``, the whole vocabulary (all slices
    together), keeps every token: off, as one launch takes it."""
    kernel = _dispatch.kernel("slice_count", logits.device, lmap.backend)
    zeros = torch.zeros_like(base)
    world, rank = dist.get_world_size(group), dist.get_rank(group)

    delta = base - local_base             # d + delta: at the slice's own base

    def count(mode, klo, khi, shift, lo, scale, reduce=True, keep_own=False, gather=None):
        """(the counts and sums over every slice, this slice's own or None): without ``reduce``,
        this slice's only. With ``keep_own`` this slice's are kept (a copy of the (N, NB) counts),
        and the mass above the range that COUNT_SUMS summed at its own base is moved to the
        common one before the sum. ``gather``: (from_key, slot0), the rows with slot0 ≥ 0 (their
        mode COUNT_SKIP) gathering their candidates into their rows of the counts, as fp32
        (``slice_gather``), summed with them."""
        hist, sums = kernel(logits, target, lmap, base, mode.to(torch.int32).contiguous(), klo.contiguous(),
                            khi.contiguous(), shift.to(torch.int32).contiguous(), lo.contiguous(), scale.contiguous(),
                            delta.contiguous())
        if not reduce:
            return hist, sums, None
        own = None
        if keep_own:
            own = (hist.clone(), sums.clone())
            sums[:, 0] = torch.where(mode == COUNT_SUMS, sums[:, 0].double() * torch.exp2(-delta.double()), sums[:, 0])
        if gather is not None:   # each slot is one slice's, 0 in the others': summed exactly
            from_key, slot0 = gather
            _dispatch.kernel("slice_gather", logits.device, lmap.backend)(
                logits, target, lmap, base, from_key.contiguous(), slot0.to(torch.int32).contiguous(),
                hist.view(torch.float32))
        dist.all_reduce(hist, group=group)
        dist.all_reduce(sums, group=group)
        return hist, sums, own

    def place(rows, own):
        """Each slice's first slot for the candidates of ``rows`` (−1 elsewhere), after the slices
        before it, and their number over every slice: one all-reduce of N × world counts."""
        table = torch.zeros(rows.shape[0], world, dtype=torch.int64, device=rows.device)
        table[:, rank] = own.to(torch.int64)
        dist.all_reduce(table, group=group)
        return torch.where(rows, table[:, :rank].sum(-1), -1), table.sum(-1)

    # Each filter's threshold, and the kept tokens' sums where its last pass decided the row; with
    # both on, the rows that gather top-k's candidates decide both there, with the sums.
    on_k = None if lmap.top_k is None else finite & (lmap.top_k > 0) & (lmap.top_k < vocab)
    on_p = None if lmap.top_p is None else finite & (lmap.top_p < 1)
    summed = torch.zeros_like(finite)
    s = a = torch.zeros_like(base, dtype=torch.float64)

    def update(on, found):
        return (torch.where(on, new, old) for new, old in zip(found, (cut, s, a, summed)))

    if on_k is not None:
        beside = None if on_p is None else (on_k & on_p, lmap.top_p, place)
        found = _threshold(count, base, delta, cut.clamp(min=-FLT_MAX), lmap.top_k.double(), on_k, False, beside)
        cut, s, a, summed = update(on_k, found)
        if beside is not None:
            on_p = on_p & ~found[4]
    if on_p is not None:
        found = _threshold(count, base, delta, cut.clamp(min=-FLT_MAX), lmap.top_p.double(), on_p, True)
        cut, s, a, summed = update(on_p, found)
    cut = torch.where(finite, cut, -math.inf)   # min_p's too: a row without a finite softmax is not truncated
    # The other truncated rows' kept tokens' sums: the keys above the threshold's less one (−0's
    # with +0's, d ≥ cut as the backward compares; a guard: no key is −0's), at the slice's own
    # base. The pass reads the targets' d at the common base for every row.
    key = order_keys(torch.where(cut == 0, -0.0, cut))
    _, sums, _ = count(torch.where((cut > -math.inf) & ~summed, COUNT_SUMS, COUNT_SKIP), key, key - 1,
                       torch.zeros_like(key), zeros, zeros, reduce=False)
    sums[:, 0] = torch.where(summed, s, sums[:, 0])
    sums[:, 2] = torch.where(summed, a, sums[:, 2])
    return cut, sums
