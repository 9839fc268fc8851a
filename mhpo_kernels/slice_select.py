"""The sampler's filters over a vocabulary split (SPEC.md, sections 6 and 9). min_p needs only
every slice's largest logit (``_min_p_cut``); top-k and top-p run ``kernels/select.py``'s
selection with every counting pass a launch over this rank's slice (``slice_count``: the Triton
kernel or ``torch_sweeps``' version, as the call's backend), its counts and sums added over the
group, and the decisions between passes taken here on (N, NB) tensors, the same on every rank.

Every rank forms d = k·u − b at the group's common base b (the largest slice base), as its sums
and its backward then do, so that "d ≥ threshold" is the same set in all of them and on every
rank. A row takes the passes it takes in one launch, each one all-reduce of its counts and sums:

- one filter (``_threshold``): its counting passes, three at most; the last also sums the kept
  tokens of the slice, from its own counts, at the slice's own base;
- both filters (``_joint``): top-p's uniform pass with top-k's first over keys, then two passes
  that count top-p's run of keys and top-k's side by side (``_joint_pass``), as
  ``select._top_k_top_p_joint`` does, the last summing the kept tokens; where the first pass
  leaves at most NB tokens from top-k's k-th value's bin up over every slice, the second gathers
  them instead: each slice stores its d of them (``slice_gather``) in the row's place in the
  counts, after the slices before it (one all-reduce of N × world counts places them), summed
  with the counts (each slot is one slice's, 0 in the others'), and every rank decides both
  filters and its own kept tokens' sums from the same values (``_decide_gathered``).

Every slice is thus read at most 4 times (the statistics and three passes); a row decided before
its last pass takes one pass of sums more, which a filter's three passes leave no room for.
The rows of each kind run side by side, one launch a pass for all of them (``_lockstep``), and
without a host sync: a pass runs for every row, a decided row skips its reading."""

import math

import torch
import torch.distributed as dist

from . import _dispatch
from ._sweep_types import (COUNT_JOINT, COUNT_JOINT_SUMS, COUNT_JOINT_UNIFORM, COUNT_KEYS, COUNT_SKIP, COUNT_SUMS,
                           COUNT_UNIFORM, SELECT_BINS as NB)
from .torch_sweeps import FLOOR_BASE, order_keys

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
    """select._decide for every row: (the kept bins, the ambiguous ones), in float64."""
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
    kept = full & (kept.cumsum(-1) > 0)   # every bin above a kept one is kept
    return kept, ambiguous & ~kept


def _ends(bins_on):
    """The highest and the lowest bin of each row's ``bins_on``, −1 and NB where none."""
    bins = torch.arange(NB, device=bins_on.device)
    return torch.where(bins_on, bins, -1).amax(-1), torch.where(bins_on, bins, NB).amin(-1)


def _uniform_bounds(cnt, lo, base):
    """select._uniform_bounds: bounds on each uniform bin's mass from lo to ``_d_max(base)``,
    float64."""
    width = (_d_max(base) - lo).double()
    margin = (width * 2.0**-20).unsqueeze(-1)
    edges = lo.double().unsqueeze(-1) + torch.arange(NB + 1, device=cnt.device) * (width / NB).unsqueeze(-1)
    return (torch.where(cnt > 0, cnt * torch.exp2(edges[:, :-1] - margin), 0.0),
            torch.where(cnt > 0, cnt * torch.exp2(edges[:, 1:] + margin), 0.0))


def _threshold(base, delta, floor, goal, on, by_mass):
    """select._threshold for the rows ``on``, as a flow of passes (``_lockstep``: it yields each
    pass's request and receives its counts): (the smallest kept d of top-k (goal k, counts) or
    top-p (by_mass, goal top_p of the candidates' mass) over the candidates d ≥ ``floor``; this
    slice's kept tokens' Σ 2^d and Σ 2^d·d at its own base, d + ``delta``, float64, where the
    last pass decided the row; whether it did)."""
    klo = order_keys(floor)
    khi = torch.full_like(klo, KEY_INF)
    state = dict(klo=klo, khi=khi, cut_key=klo.clone(), done=~on, goal=goal.double(), base=base, delta=delta,
                 lo=torch.zeros_like(base), scale=torch.zeros_like(base), summed=torch.zeros_like(on),
                 above=_zeros64(base), s=_zeros64(base), a=_zeros64(base))
    first = 0
    if by_mass:  # pass 1, uniform in d over [lo, hi]
        state.update(lowest=torch.zeros_like(klo), b_lo=torch.zeros_like(klo), b_hi=torch.zeros_like(klo),
                     decided=torch.zeros_like(on), ambiguous=torch.zeros_like(on))
        state["lo"] = floor.clamp(min=-UNIFORM_RANGE)
        state["scale"] = NB / (_d_max(base) - state["lo"])
        hist, sums, _ = yield dict(mode=_mode(state["done"], COUNT_UNIFORM), klo=klo, khi=khi,
                                   shift=torch.zeros_like(klo), lo=state["lo"], scale=state["scale"])
        _by_blocks(_uniform_pass, state, hist, sums)
        # The decided rows' threshold and the others' range of keys, from their bins.
        lo, scale, decided, ambiguous = state["lo"], state["scale"], state.pop("decided"), state.pop("ambiguous")
        state["cut_key"] = torch.where(decided, _bin_start(state.pop("lowest"), lo, scale).clamp(max=KEY_INF),
                                       state["cut_key"])
        b_lo, b_hi = state.pop("b_lo"), state.pop("b_hi")
        state["klo"] = torch.where(ambiguous, _bin_start(b_lo, lo, scale), state["klo"])
        state["khi"] = torch.where(ambiguous, _bin_start(b_hi + 1, lo, scale) - 1, state["khi"])
        first = 1
    for i in range(first, MAX_PASSES):
        last = i == MAX_PASSES - 1
        state["shift"] = _shift(state["klo"], state["khi"])
        # The last pass counts as the others and sums the mass above its range at the slice's own
        # base (COUNT_SUMS): with its own counts, the kept tokens' sums (``_keys_pass``).
        hist, sums, own = yield dict(mode=_mode(state["done"], COUNT_SUMS if last else COUNT_KEYS), klo=state["klo"],
                                     khi=state["khi"], shift=state["shift"], lo=state["lo"], scale=state["scale"],
                                     keep_own=last)
        _by_blocks(_keys_pass, state, hist, sums, own, last=last, by_mass=by_mass)
    return key_value(state["cut_key"]), state["s"], state["a"], state["summed"]


def _zeros64(like):
    return torch.zeros_like(like, dtype=torch.float64)


def _mode(done, mode):
    """A pass's mode for each row: ``mode``, COUNT_SKIP where the row is done."""
    return torch.where(done, COUNT_SKIP, mode)


def _shift(klo, khi):
    """The shift of a pass's bins over [klo, khi]: NB bins reach every key."""
    return (_bits(khi - klo) - NB_BITS).clamp(min=0)


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
    w_lo, w_hi = _uniform_bounds(cnt, st["lo"], st["base"])
    kept, ambiguous = _decide(cnt, w_lo, w_hi, st["above"], st["above"], s_in, st["goal"], torch.ones_like(st["klo"]),
                              False, True)
    b_hi, b_lo = _ends(ambiguous)
    done = st["done"]
    st["decided"], st["ambiguous"] = ~done & (b_hi < 0), ~done & (b_hi >= 0)
    st["lowest"], st["b_lo"], st["b_hi"] = torch.where(kept, bins, NB).amin(-1), b_lo, b_hi
    st["done"] = done | st["decided"]


def _key_bins(klo, khi, shift, base):
    """The bins of 2^shift keys from klo over [klo, khi] (bins past khi empty): (each bin's lowest
    key, its highest key, its lowest d, its highest d (at most ``_d_max(base)``))."""
    bins = torch.arange(NB, device=klo.device)
    lo_key = (klo.unsqueeze(-1) + (bins << shift.unsqueeze(-1))).clamp(max=KEY_INF)
    width = ((1 << shift) - 1).unsqueeze(-1)
    hi_key = lo_key + torch.minimum(width, (khi.unsqueeze(-1) - lo_key).clamp(min=0))
    return lo_key, hi_key, key_value(lo_key), torch.minimum(key_value(hi_key), _d_max(base).unsqueeze(-1))


def _own_mass(own_cnt, d_lo, d_hi, delta, kept):
    """This slice's (Σ 2^d, Σ 2^d·d) of its ``kept`` bins at its own base, d + ``delta`` in fp32
    as the kernel forms it: each bin's mass at the middle of its bounds (a bin of one key: its
    tokens'), at its lowest d (``select._narrow``)."""
    own_lo = (d_lo + delta.unsqueeze(-1)).double()
    e = own_cnt * 0.5 * (torch.exp2(own_lo) + torch.exp2((d_hi + delta.unsqueeze(-1)).double()))
    e = torch.where(kept & (own_cnt > 0), e, 0.0)
    return e.sum(-1), (e * own_lo).sum(-1)


def _keys_pass(st, cnt, sums, own, last, by_mass):
    """A pass over bins of 2^shift keys for a block of rows: a row is decided, or its range
    narrows to its ambiguous bins (top-k carries the count above them). In the last pass, which
    decides every row, ``own`` (this slice's own counts and sums at its base) give the slice's
    kept tokens' sums, as ``select._narrow`` finds them."""
    bins = torch.arange(NB, device=cnt.device)
    klo, khi, shift, done = st["klo"], st["khi"], st["shift"], st["done"]
    s_hi, s_in = sums[:, 0], sums[:, 1]
    _, _, d_lo, d_hi = _key_bins(klo, khi, shift, st["base"])
    above = st["above"]
    if by_mass:
        above = s_hi
        w_lo = torch.where(cnt > 0, cnt * torch.exp2(d_lo.double()), 0.0)
        w_hi = torch.where(cnt > 0, cnt * torch.exp2(d_hi.double()), 0.0)
    else:
        w_lo = w_hi = cnt
    kept, ambiguous = _decide(cnt, w_lo, w_hi, above, s_hi, s_in, st["goal"], shift, last, by_mass)
    b_hi, b_lo = _ends(ambiguous)
    decided, ambiguous = ~done & (b_hi < 0), ~done & (b_hi >= 0)
    b_kept = torch.where(kept, bins, NB).amin(-1)
    kept_key = torch.where(b_kept < NB, klo + (b_kept.clamp(max=NB - 1) << shift), (khi + 1).clamp(max=KEY_INF))
    st["cut_key"] = torch.where(decided, kept_key, st["cut_key"])
    if not by_mass:
        st["above"] = torch.where(ambiguous, above + torch.where(bins > b_hi.unsqueeze(-1), cnt, 0.0).sum(-1), above)
    width = (1 << shift) - 1
    top = klo + (b_hi.clamp(min=0) << shift)
    st["khi"] = torch.where(ambiguous, top + torch.minimum(width, khi - top), khi)
    st["klo"] = torch.where(ambiguous, klo + (b_lo.clamp(max=NB - 1) << shift), klo)
    st["done"] = done | decided
    if last:
        own_cnt, own_sums = own
        s, a = _own_mass(own_cnt, d_lo, d_hi, st["delta"], kept)
        st["s"] = torch.where(decided, own_sums[:, 0] + s, st["s"])
        st["a"] = torch.where(decided, own_sums[:, 2] + a, st["a"])
        st["summed"] = st["summed"] | decided


def _joint(base, delta, floor, top_k, top_p, on):
    """select._top_k_top_p_joint for the rows ``on`` (top-k above NB, then top-p, over the
    candidates d ≥ ``floor``), as a flow of passes (``_lockstep``): top-p's uniform pass with
    top-k's first over the keys from its lo up (``_joint_first``), then two passes of top-p's run
    and top-k's side by side (``_joint_next``), top-p deciding between the goals that top-k's
    bounds on the mass it keeps allow until the last, where top-k's bins are single keys. The
    last sums the kept tokens of the slice at its own base (a threshold found before: the tokens
    from it up, an empty run), top-p's and top-k's. Returns ``_threshold``'s four values."""
    lo = floor.clamp(min=-UNIFORM_RANGE)
    start, key_hi = order_keys(lo), order_keys(_d_max(base))
    st = dict(on=on, kf=top_k.double(), top_p=top_p.double(), base=base, delta=delta, lo=lo,
              scale=NB / (_d_max(base) - lo), start=start, key_hi=key_hi, shift_k=_shift(start, key_hi))
    for name in ("klo_k", "khi_k", "cut_k", "klo_p", "khi_p", "cut_p", "f", "b_kept", "b_lo", "b_hi"):
        st[name] = start.clone()   # keys, and the first pass's bins
    for name in ("above_k", "above_u", "m_lo", "m_hi", "own_m", "own_a", "s", "a"):
        st[name] = _zeros64(base)
    for name in ("done_k", "done_p", "summed", "f_found"):
        st[name] = torch.zeros_like(on)
    hist, sums, _ = yield dict(mode=_mode(~on, COUNT_JOINT_UNIFORM), klo=start, khi=key_hi,
                               shift=torch.zeros_like(start), lo=lo, scale=st["scale"], klo_k=start, khi_k=key_hi,
                               shift_k=st["shift_k"])
    _by_blocks(_joint_first, st, hist, sums)
    # Top-k's run where its k-th value's uniform bin f was found, top-p's threshold or run, as keys.
    lo, scale, found, f = st["lo"], st["scale"], st.pop("f_found"), st.pop("f")
    bin_hi = _bin_start(f + 1, lo, scale) - 1
    st["klo_k"] = torch.where(found, torch.maximum(_bin_start(f, lo, scale), st["klo_k"]), start)
    st["above_k"] = torch.where(found & (st["khi_k"] > bin_hi), st.pop("above_u"), st["above_k"])
    st["khi_k"] = torch.where(found, torch.minimum(bin_hi, st["khi_k"]), start - 1)
    st["done_k"] = ~found
    st["cut_p"] = _bin_start(st.pop("b_kept"), lo, scale).clamp(max=KEY_INF)
    b_lo, b_hi = st.pop("b_lo"), st.pop("b_hi")
    st["klo_p"] = torch.where(st["done_p"], st["cut_p"], _bin_start(b_lo, lo, scale))
    st["khi_p"] = torch.where(st["done_p"], st["cut_p"] - 1, _bin_start(b_hi + 1, lo, scale) - 1)
    st["has_run"] = found   # top-k's run: single keys by the last pass, counted again there if done before
    for i in range(1, MAX_PASSES):
        last = i == MAX_PASSES - 1
        st["shift"], st["shift_k"] = _shift(st["klo_p"], st["khi_p"]), _shift(st["klo_k"], st["khi_k"])
        hist, sums, own = yield dict(mode=_mode(~on, COUNT_JOINT_SUMS if last else COUNT_JOINT), klo=st["klo_p"],
                                     khi=st["khi_p"], shift=st["shift"], lo=lo, scale=scale, klo_k=st["klo_k"],
                                     khi_k=st["khi_k"], shift_k=st["shift_k"], keep_own=last)
        _by_blocks(_joint_next, st, hist, sums, own, last=last)
    # top-p keeps every token top-k keeps: top-k's threshold and sums
    below = on & (st["cut_p"] < st["cut_k"])
    cut = torch.where(below, st["cut_k"], st["cut_p"])
    s, a = torch.where(below, st["own_m"], st["s"]), torch.where(below, st["own_a"], st["a"])
    return key_value(cut), s, a, on & (st["summed"] | below)


def _joint_first(st, cnt, sums, own):
    """The joint's first pass for a block of rows: top-k's k-th value's uniform bin (``f``, −1 where
    fewer than k tokens lie from lo up: top-k keeps every candidate top-p may keep), the bounds
    [m_lo, m_hi] on the mass it keeps, its run of keys within its key bin; top-p's kept bins for
    the lower goal, and its run of the bins ambiguous for either."""
    bins = torch.arange(NB, device=cnt.device)
    cnt, cnt_k = cnt[:, 0], cnt[:, 1]
    s_in, kf = sums[:, 1], st["kf"]
    w_lo, w_hi = _uniform_bounds(cnt, st["lo"], st["base"])
    f = torch.where(cnt.flip(-1).cumsum(-1).flip(-1) >= kf.unsqueeze(-1), bins, -1).amax(-1)
    found = f >= 0
    above = bins > f.unsqueeze(-1)
    st["above_u"] = torch.where(above, cnt, 0.0).sum(-1)
    e_f = torch.where(bins == f.unsqueeze(-1), w_lo / cnt.clamp(min=1.0), 0.0).sum(-1)
    st["m_lo"] = torch.where(found, torch.where(above, w_lo, 0.0).sum(-1) + (kf - st["above_u"]) * e_f, s_in)
    st["m_hi"] = torch.where(found, torch.minimum(s_in, torch.where(above | (bins == f.unsqueeze(-1)), w_hi, 0.0)
                                                  .sum(-1)), s_in)
    st["f"], st["f_found"] = f.clamp(min=0), found
    # top-k's key bin of its k-th value (bin 0 where fewer than k): its keys, the count above it
    from_k = cnt_k.flip(-1).cumsum(-1).flip(-1)
    f_k = torch.where(from_k >= kf.unsqueeze(-1), bins, 0).amax(-1)
    shift_k = st["shift_k"]
    lo_key = st["start"] + (f_k << shift_k)
    st["klo_k"] = lo_key
    st["khi_k"] = lo_key + torch.minimum((1 << shift_k) - 1, st["key_hi"] - lo_key)
    st["above_k"] = torch.where(bins > f_k.unsqueeze(-1), cnt_k, 0.0).sum(-1)
    # top-p: kept for the lower goal, possibly kept for the upper one, at or above top-k's bin
    zero = torch.zeros_like(s_in)
    ones = torch.ones_like(f)
    kept, _ = _decide(cnt, w_lo, w_hi, zero, zero, s_in, st["top_p"] * st["m_lo"], ones, False, True)
    maybe, ambiguous = _decide(cnt, w_lo, w_hi, zero, zero, s_in, st["top_p"] * st["m_hi"], ones, False, True)
    ambiguous = (maybe | ambiguous) & ~kept & (bins >= f.unsqueeze(-1))
    st["b_hi"], st["b_lo"] = _ends(ambiguous)
    st["done_p"] = st["b_hi"] < 0
    st["b_kept"] = torch.where(kept, bins, NB).amin(-1)


def _joint_next(st, cnt, sums, own, last):
    """The joint's second or third pass for a block of rows (select._joint_passes): top-k's bin of
    its k-th value, whose single keys make its cut and the mass it keeps exact; top-p decided
    between the goals those bounds allow (the last pass by the middle rule), or its run narrowed.
    The last pass counts top-k's run by single keys (again, where they made it exact before):
    where top-p's cut falls among them (the mass above the run below its goal) it is decided
    there exactly, key by key (``select._exact_in_run``). That pass (``own``: this slice's counts
    and sums at its own base) gives this slice's kept tokens' sums: top-p's kept bins and the mass
    above them, or where top-p was decided before, the mass from its threshold up (an empty run),
    or top-k's run's kept keys and the mass above them."""
    bins = torch.arange(NB, device=cnt.device)
    on, delta, kf = st["on"], st["delta"], st["kf"]
    # top-k
    klo, khi, shift = st["klo_k"], st["khi_k"], st["shift_k"]
    counting = on & ~st["done_k"]
    cnt_k, s_k = cnt[:, 1], sums[:, 4]
    lo_key_k, _, d_lo_k, d_hi_k = _key_bins(klo, khi, shift, st["base"])
    f = torch.where(st["above_k"].unsqueeze(-1) + cnt_k.flip(-1).cumsum(-1).flip(-1) >= kf.unsqueeze(-1), bins,
                    0).amax(-1)
    at_f, above = bins == f.unsqueeze(-1), bins > f.unsqueeze(-1)
    w_k = torch.where(cnt_k > 0, cnt_k * torch.exp2(d_lo_k.double()), 0.0)
    lo_f = klo + (f << shift)
    single = counting & (shift == 0)
    kept_k = (above | at_f) & (cnt_k > 0)
    exact = s_k + torch.where(kept_k, w_k, 0.0).sum(-1)
    above_f = st["above_k"] + torch.where(above, cnt_k, 0.0).sum(-1)
    e_f = torch.where(at_f, torch.exp2(d_lo_k.double()), 0.0).sum(-1)
    m_lo = s_k + torch.where(above, w_k, 0.0).sum(-1) + (kf - above_f) * e_f
    m_hi = s_k + torch.where(kept_k, cnt_k * torch.exp2(d_hi_k.double()), 0.0).sum(-1)
    narrow = counting & ~single
    st["m_lo"] = torch.where(single, exact, torch.where(narrow, m_lo, st["m_lo"]))
    st["m_hi"] = torch.where(single, exact, torch.where(narrow, m_hi, st["m_hi"]))
    st["cut_k"] = torch.where(single, lo_f, st["cut_k"])
    st["done_k"] = st["done_k"] | single
    if not last:
        st["above_k"] = torch.where(narrow, above_f, st["above_k"])
        st["khi_k"] = torch.where(narrow, lo_f + torch.minimum((1 << shift) - 1, khi - lo_f), khi)
        st["klo_k"] = torch.where(narrow, lo_f, klo)
    # top-p
    klo, khi, shift = st["klo_p"], st["khi_p"], st["shift"]
    cnt, s_hi, s_in = cnt[:, 0], sums[:, 0], sums[:, 1]
    deciding = on & ~st["done_p"]
    _, hi_key, d_lo, d_hi = _key_bins(klo, khi, shift, st["base"])
    w_lo = torch.where(cnt > 0, cnt * torch.exp2(d_lo.double()), 0.0)
    w_hi = torch.where(cnt > 0, cnt * torch.exp2(d_hi.double()), 0.0)
    kept, _ = _decide(cnt, w_lo, w_hi, s_hi, s_hi, s_in, st["top_p"] * st["m_lo"], shift, last, True)
    maybe, ambiguous = _decide(cnt, w_lo, w_hi, s_hi, s_hi, s_in, st["top_p"] * st["m_hi"], shift, last, True)
    possible = hi_key >= torch.where(st["done_k"], st["cut_k"], st["klo_k"]).unsqueeze(-1)
    kept = kept & possible
    b_hi, b_lo = _ends((maybe | ambiguous) & ~kept & possible)
    decided = deciding & (b_hi < 0)
    narrowing = deciding & (b_hi >= 0)
    b_kept = torch.where(kept, bins, NB).amin(-1)
    cut = torch.where(b_kept < NB, klo + (b_kept.clamp(max=NB - 1) << shift), (khi + 1).clamp(max=KEY_INF))
    st["cut_p"] = torch.where(decided, cut, st["cut_p"])
    if last:   # every row is decided: this slice's sums
        own_cnt, own_sums = own
        s, a = _own_mass(own_cnt[:, 0], d_lo, d_hi, delta, kept & decided.unsqueeze(-1))
        st["s"], st["a"] = own_sums[:, 0] + s, own_sums[:, 2] + a
        # top-k's run, single keys: its kept keys, and top-p's among them where its cut lies there
        mine = (cnt_k > 0) & (lo_key_k >= st["cut_k"].unsqueeze(-1))
        own_m, own_a = _own_mass(own_cnt[:, 1], d_lo_k, d_hi_k, delta, mine)
        st["own_m"], st["own_a"] = own_sums[:, 4] + own_m, own_sums[:, 5] + own_a
        goal = st["top_p"] * st["m_lo"]
        in_run = on & st["has_run"] & (s_k < goal)
        above_key = s_k.unsqueeze(-1) + torch.where(mine, w_k, 0.0).flip(-1).cumsum(-1).flip(-1) - \
            torch.where(mine, w_k, 0.0)
        kept_run = mine & (above_key < goal.unsqueeze(-1))
        s_run, a_run = _own_mass(own_cnt[:, 1], d_lo_k, d_hi_k, delta, kept_run)
        b_run = torch.where(kept_run, bins, NB).amin(-1).clamp(max=NB - 1)
        st["cut_p"] = torch.where(in_run, st["klo_k"] + b_run, st["cut_p"])
        st["s"] = torch.where(in_run, own_sums[:, 4] + s_run, st["s"])
        st["a"] = torch.where(in_run, own_sums[:, 5] + a_run, st["a"])
        st["summed"] = on
    st["done_p"] = st["done_p"] | decided
    top = klo + (b_hi.clamp(min=0) << shift)
    khi = torch.where(narrowing, top + torch.minimum((1 << shift) - 1, khi - top), khi)
    klo = torch.where(narrowing, klo + (b_lo.clamp(max=NB - 1) << shift), klo)
    to_sum = st["done_p"] & ~narrowing          # the last pass sums the tokens from the threshold up
    st["klo_p"] = torch.where(to_sum, st["cut_p"], klo)
    st["khi_p"] = torch.where(to_sum, st["cut_p"] - 1, khi)


def _gathered(base, delta, floor, top_k, top_p, on, place):
    """select._top_k_top_p_gathered for the rows ``on`` (top-k of at most NB, then top-p, over the
    candidates d ≥ ``floor``), as a flow of passes (``_lockstep``): top-k's passes over keys of d
    until at most NB tokens lie from its k-th value's bin up over every slice (``_narrow_to_gather``);
    the next pass gathers their d, each slice's after the slices before it (``place``: each
    slice's first slot), in the row's place in the first counts, and both filters are decided
    from them (``_decide_gathered``). Where two passes (or one that left single keys) leave more,
    fewer than k lie above the bin: the gather takes those and counts the bin one bin a key into
    the second counts. Returns ``_threshold``'s four values."""
    klo = order_keys(floor)
    st = dict(klo=klo, khi=order_keys(_d_max(base)), shift=torch.zeros_like(klo), kf=top_k.double(),
              counting=on.clone(), gather=torch.zeros_like(on), fallback=torch.zeros_like(on), above=_zeros64(base),
              own_above=_zeros64(base), own_from=_zeros64(base))
    found = (klo.clone(), _zeros64(base), _zeros64(base), torch.zeros_like(on))   # cut key, s, a, summed
    zeros = torch.zeros_like(base)
    for i in range(MAX_PASSES):
        st["shift"] = _shift(st["klo"], st["khi"])
        gather = None
        if i > 0:   # the rows the last pass left pending gather in this one, in each slice's place
            pending = st["gather"] | st["fallback"]
            slot0, n = place(pending, st["own_from"])
            counted = st["fallback"]
            gather = (torch.where(counted, st["khi"] + 1, st["klo"]), slot0, torch.where(counted, st["klo"], 1),
                      torch.where(counted, st["khi"], 0))
        hist, sums, own = yield dict(mode=_mode(~st["counting"], COUNT_KEYS), klo=st["klo"], khi=st["khi"],
                                     shift=st["shift"], lo=zeros, scale=zeros, keep_own=True, gather=gather)
        if gather is not None:
            cut, s, a = _decide_gathered(hist, own[0][:, 1], slot0, n, st, top_p, delta)
            found = tuple(torch.where(pending, new, old) for new, old in zip((order_keys(cut), s, a, pending), found))
            st["gather"], st["fallback"] = torch.zeros_like(on), torch.zeros_like(on)
        if i < MAX_PASSES - 1:
            _by_blocks(_narrow_to_gather, st, hist[:, 0], sums, (own[0][:, 0], own[1]), last=i == MAX_PASSES - 2)
    return key_value(found[0]), found[1], found[2], found[3]


def _narrow_to_gather(st, cnt, sums, own, last):
    """A pass of top-k's counting beside top-p for a block of rows: the bin f of its k-th value
    (bin 0 where fewer than k lie in the range); a row gathers in the next pass where at most NB
    tokens lie from f up, else narrows to f, and where this was its last counting pass (or f is
    one key) gathers the tokens above f and counts f key by key then. ``own``: this slice's counts,
    whose tokens from f up (or above f) set its share of the slots."""
    bins = torch.arange(NB, device=cnt.device)
    klo, khi, shift, counting = st["klo"], st["khi"], st["shift"], st["counting"]
    own_cnt = own[0]
    from_bin = st["above"].unsqueeze(-1) + cnt.flip(-1).cumsum(-1).flip(-1)
    f = torch.where(from_bin >= st["kf"].unsqueeze(-1), bins, 0).amax(-1)
    at_f, above = bins == f.unsqueeze(-1), bins > f.unsqueeze(-1)
    n_f = from_bin.gather(-1, f.unsqueeze(-1)).squeeze(-1)
    lo_f = klo + (f << shift)
    gather = counting & (n_f <= NB)
    narrow = counting & ~gather
    own_above = st["own_above"] + torch.where(above, own_cnt, 0.0).sum(-1)
    st["own_from"] = torch.where(gather, own_above + torch.where(at_f, own_cnt, 0.0).sum(-1), own_above)
    st["own_above"] = torch.where(narrow, own_above, st["own_above"])
    st["above"] = torch.where(narrow, n_f - torch.where(at_f, cnt, 0.0).sum(-1), st["above"])
    st["khi"] = torch.where(narrow, lo_f + torch.minimum((1 << shift) - 1, khi - lo_f), khi)
    st["klo"] = torch.where(counting, lo_f, klo)
    st["counting"] = narrow & (shift > 0) & (not last)
    st["gather"], st["fallback"] = gather, narrow & ~st["counting"]


def _decide_gathered(hist, own_counts, slot0, n, st, top_p, delta):
    """Both filters for the rows that gathered, from their n candidates' d in the first counts
    (as fp32) over every slice, this slice's from ``slot0`` on, and the keys of [klo, khi]
    counted in the second (``_gathered_cut``): (the smallest kept d, this slice's kept tokens'
    sums at its own base)."""
    out = [torch.empty_like(delta), _zeros64(delta), _zeros64(delta)]
    slots, counts = hist[:, 0].view(torch.float32), hist[:, 1]
    slot = torch.arange(NB, device=hist.device)
    for r0 in range(0, slots.shape[0], DECIDE_ROWS):
        rows = slice(r0, r0 + DECIDE_ROWS)
        first = slot0[rows].unsqueeze(-1)
        own = (slot >= first) & (slot < first + st["own_from"][rows].to(torch.int64).unsqueeze(-1))
        keys = (st["klo"][rows].unsqueeze(-1) + slot).clamp(max=KEY_INF)
        d = torch.cat([torch.where(slot < n[rows].unsqueeze(-1), slots[rows], -math.inf),
                       torch.where(counts[rows] > 0, key_value(keys), -math.inf)], -1)
        w = torch.cat([(slot < n[rows].unsqueeze(-1)).double(), counts[rows].double()], -1)
        own_w = torch.cat([own.double(), own_counts[rows].double()], -1)
        found = _gathered_cut(d, w, own_w, st["kf"][rows], top_p[rows], delta[rows])
        for x, value in zip(out, found):
            x[rows] = value
    return out


def _gathered_cut(d, w, own_w, top_k, top_p, delta):
    """select._kept_cut for a block of rows, on candidates d (rows, M) fp32 of w tokens each (−inf:
    none): top-k keeps the d with fewer than k tokens above them, top-p of those the d with below
    top_p of their mass above them, ties together, as the kernel's searches decide (here by one
    sort of the candidates). Returns (the smallest kept d; Σ 2^d and Σ 2^d·d over this slice's
    kept tokens, ``own_w`` of each candidate, at the slice's own base, d + ``delta``)."""
    desc, order = d.sort(-1, descending=True)
    w_desc = w.gather(-1, order)
    above = torch.searchsorted(-desc, -desc)            # each candidate's tie group's first place
    before = torch.where(above > 0, w_desc.cumsum(-1).gather(-1, (above - 1).clamp(min=0)), 0.0)
    by_k = (before < top_k.unsqueeze(-1)) & (w_desc > 0)
    mass = torch.where(by_k, w_desc * torch.exp2(desc.double()), 0.0).cumsum(-1)
    mass_above = torch.where(above > 0, mass.gather(-1, (above - 1).clamp(min=0)), 0.0)
    kept = by_k & (mass_above < top_p.double().unsqueeze(-1) * mass[:, -1:])
    cut = torch.where(kept, desc, math.inf).amin(-1)
    x = (d + delta.unsqueeze(-1)).double()              # d + delta in fp32, as the kernel forms it
    e = torch.where((own_w > 0) & (d >= cut.unsqueeze(-1)), own_w * torch.exp2(x), 0.0)
    return cut, e.sum(-1), torch.where(e > 0, e * x, 0.0).sum(-1)


def _lockstep(flows, count):
    """Run the flows of passes (``_threshold``, ``_gathered``, ``_joint``: generators over
    disjoint rows, each with whether it reads both counts) side by side: each pass one ``count``
    launch for the rows of all of them, each row as its flow's request says (the others skip it);
    returns each flow's result."""
    pending = {i: next(flow) for i, (flow, _) in enumerate(flows)}
    found = [None] * len(flows)
    while pending:
        requests = list(pending.values())
        args = dict(requests[0])
        for request in requests[1:]:
            mine = request["mode"] != COUNT_SKIP
            for name, value in request.items():
                if name in ("keep_own", "gather"):
                    args[name] = args.get(name) or value
                else:
                    args[name] = torch.where(mine, value, args[name] if name in args else torch.zeros_like(value))
        hist, sums, own = count(**args)
        for i in list(pending):
            flow, both_counts = flows[i]
            counts = (hist, sums, own)
            if not both_counts and hist.dim() == 3:
                counts = (hist[:, 0], sums, None if own is None else (own[0][:, 0], own[1]))
            try:
                pending[i] = flow.send(counts)
            except StopIteration as stop:
                found[i] = stop.value
                del pending[i]
    return found


def select_over_slices(logits, target, lmap, group, base, local_base, cut, finite, vocab):
    """(each row's threshold on d at the common ``base`` (−inf: not truncated), and this slice's
    (N, 4) sums over the kept tokens, at the slice's ``local_base``: Σ 2^d, −, Σ 2^d·d, and the
    target's d at ``base``) of top-k and top-p after ``cut`` (min_p's, or −inf) at the rows
    ``finite`` (valid, with a finite softmax over every slice), for this slice of ``logits``
    (B, T, V) and its targets; a top-k of at least ``vocab``, the whole vocabulary (all slices
    together), keeps every token whose logit is finite: no selection, the lowest finite threshold,
    as one launch takes it."""
    kernel = _dispatch.kernel("slice_count", logits.device, lmap.backend)
    zeros = torch.zeros_like(base)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    both = lmap.top_k is not None and lmap.top_p is not None   # the launches count top-k's runs beside top-p's
    delta = base - local_base             # d + delta: at the slice's own base
    to_common = torch.exp2(-delta.double()).unsqueeze(-1)

    def count(mode, klo, khi, shift, lo, scale, klo_k=None, khi_k=None, shift_k=None, reduce=True, keep_own=False,
              gather=None):
        """(the counts and sums over every slice, this slice's own or None): without ``reduce``,
        this slice's only. ``gather``: (from_key, slot0, klo, khi), the rows with slot0 ≥ 0 (their
        mode COUNT_SKIP) gathering their candidates into their rows of the first counts, as fp32,
        and counting [klo, khi] (where klo ≤ khi) into the second (``slice_gather``), summed with
        them. With ``keep_own`` this slice's counts and sums are kept (a copy); the masses at its
        own base (COUNT_SUMS, COUNT_JOINT_SUMS) move to the common one before the sum."""
        runs = None
        if both:
            runs = tuple((torch.zeros_like(klo) if x is None else x).contiguous() for x in (klo_k, khi_k, shift_k))
            runs = runs[:2] + (runs[2].to(torch.int32),)
        hist, sums = kernel(logits, target, lmap, base, mode.to(torch.int32).contiguous(), klo.contiguous(),
                            khi.contiguous(), shift.to(torch.int32).contiguous(), lo.contiguous(), scale.contiguous(),
                            delta.contiguous(), runs)
        if not reduce:
            return hist, sums, None
        if gather is not None:   # each slot is one slice's, 0 in the others': summed exactly
            from_key, slot0, run_lo, run_hi = (x.contiguous() for x in gather)
            _dispatch.kernel("slice_gather", logits.device, lmap.backend)(
                logits, target, lmap, base, from_key, slot0.to(torch.int32), run_lo, run_hi,
                hist[:, 0].view(torch.float32), hist[:, 1])
        own = (hist.clone(), sums.clone()) if keep_own else None
        rebased = ((mode == COUNT_SUMS) | (mode == COUNT_JOINT_SUMS)).unsqueeze(-1)
        moved = [0, 4] if both else [0]
        sums[:, moved] = torch.where(rebased, sums[:, moved].double() * to_common, sums[:, moved]).float()
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

    # Each row's threshold, and the kept tokens' sums where its last pass found them: the rows of
    # each filter alone and of both (a top-k the gather holds, or above it) side by side.
    on_k = None
    if lmap.top_k is not None:
        on_k = finite & (lmap.top_k > 0) & (lmap.top_k < vocab)
        cut = torch.where(finite & (lmap.top_k >= vocab), cut.clamp(min=-FLT_MAX), cut)
    on_p = None if lmap.top_p is None else finite & (lmap.top_p < 1)
    floor = cut.clamp(min=-FLT_MAX)
    flows, rows = [], []
    if on_k is not None:
        rows.append(on_k if on_p is None else on_k & ~on_p)
        flows.append((_threshold(base, delta, floor, lmap.top_k.double(), rows[-1], False), False))
    if on_p is not None:
        rows.append(on_p if on_k is None else on_p & ~on_k)
        flows.append((_threshold(base, delta, floor, lmap.top_p.double(), rows[-1], True), False))
    if both:
        rows.append(on_k & on_p & (lmap.top_k <= NB))
        flows.append((_gathered(base, delta, floor, lmap.top_k, lmap.top_p, rows[-1], place), True))
        rows.append(on_k & on_p & (lmap.top_k > NB))
        flows.append((_joint(base, delta, floor, lmap.top_k, lmap.top_p, rows[-1]), True))
    summed = torch.zeros_like(finite)
    s = a = torch.zeros_like(base, dtype=torch.float64)
    for on, found in zip(rows, _lockstep(flows, count)):
        cut, s, a, summed = (torch.where(on, new, old) for new, old in zip(found, (cut, s, a, summed)))
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


def selected_cuts(tp, logits, local, target, lmap, valid):
    """top_k and top_p (after min_p) over every slice of ``tp`` (``select_over_slices``): (each
    row's threshold relative to the common base b, the largest slice base; this slice's statistics
    for the combine: over its kept tokens at its own base, those of ``local`` where a row is not
    truncated). One all-gather of each slice's (b_r, log2 s_r) gives b and the rows whose softmax
    is finite, which the selection takes."""
    mine = torch.stack([local.lse2_base, local.lse2_rest], 1).contiguous()
    gathered = [torch.empty_like(mine) for _ in range(tp.world)]
    dist.all_gather(gathered, mine, group=tp.group)
    base_r, rest_r = torch.stack(gathered).double().unbind(-1)
    top = base_r.amax(0)
    total = torch.exp2((base_r - top) + rest_r).sum(0)
    finite = valid & (total > 0) & (total < math.inf)
    top = top.float()
    cut = _min_p_cut(top, lmap.min_p, valid) if lmap.min_p is not None else torch.full_like(top, -math.inf)
    cut, sums = select_over_slices(logits, target, lmap, tp.group, top, local.lse2_base, cut, finite, tp.total)
    s, a, d_y = sums[:, 0], sums[:, 2], sums[:, 3]   # the sums at the slice's base; d_y at the common one
    rest = torch.log2(s)
    truncated = cut > -math.inf

    def kept(x, old):
        return torch.where(truncated, x, old)

    logp = torch.where(d_y >= cut, (d_y + (top - local.lse2_base) - rest) * LN2, -math.inf)
    entropy = local.entropy   # None or empty where not asked for
    if entropy is not None and entropy.numel():
        entropy = kept((rest - a / s) * LN2, entropy)
    return cut, local._replace(lse2_rest=kept(rest, local.lse2_rest), logp=kept(logp, local.logp),
                               entropy=entropy)


def _min_p_cut(top, min_p, valid):
    """min_p's threshold on d at the largest slice base ``top`` (``select._cut``), −inf where off
    and where no slice has a finite logit (its softmax is not truncated, SPEC.md, section 9)."""
    cut = torch.where(valid & (min_p > 0) & (top > FLOOR_BASE), min_p.clamp(min=1e-45).log2(), -math.inf)
    return torch.minimum(cut, -(top.abs() * 2.0**-23 + 2.0**-126))   # the largest logit is always kept
