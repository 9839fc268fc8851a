"""The sampler's truncated distribution (SPEC.md, section 9): the float64 oracle against a
brute-force one, and the log-probs, entropy, gradients and losses with ``min_p``, ``top_k`` and
``top_p`` on the Triton kernels and the PyTorch path against the oracle.

Inputs keep every value away from the kept set's cutoff, so the kept set is the same in fp32 and
float64: logits on a grid of 1/8, a min_p whose log sits an odd multiple of 1/16 below the
maximum (never within 1/16 of a logit), top_k's ties kept together by definition, and a top_p
whose kept set does not change when it moves by 1e-4 (``_assert_unambiguous``: an fp32 sum of
n terms is good to n · 2⁻²⁴ of its size, 2e-5 at the 300 tokens of most rows here)."""

import math

import numpy as np
import pytest
import torch

import mhpo_kernels
import reference
from _cases import FP32_RTOL

BACKENDS = ["triton", "torch"]
MIN_P = math.exp(-2.5625)   # ln min_p = −41/16: an odd multiple of 1/16
FILTERS = {"min_p": dict(min_p=MIN_P), "top_k": dict(top_k=7), "top_p": dict(top_p=0.8),
           "all": dict(min_p=MIN_P, top_k=40, top_p=0.9)}


def _brute_force(z, top_k=None, top_p=None, min_p=None):
    """The kept set of one row, by the sampler's steps written out token by token (distinct values)."""
    z = z.tolist()
    kept = set(range(len(z)))
    if min_p is not None and min_p > 0:
        top = max(z)
        kept = {v for v in kept if math.exp(z[v] - top) >= min_p}
    if top_k is not None and top_k > 0:
        kth = sorted((z[v] for v in kept), reverse=True)[min(top_k, len(kept)) - 1]
        kept = {v for v in kept if z[v] >= kth}
    if top_p is not None and top_p < 1:
        norm = sum(math.exp(z[v]) for v in kept)
        cumulative = 0.0
        for v in sorted(kept, key=lambda v: z[v])[:-1]:     # the largest is always kept
            cumulative += math.exp(z[v]) / norm
            if cumulative <= 1 - top_p:
                kept.discard(v)
    return kept


@pytest.mark.parametrize("filters", [dict(top_k=3), dict(top_p=0.7), dict(min_p=0.05), dict(top_k=1),
                                     dict(min_p=0.02, top_k=6, top_p=0.9), dict(top_k=-1, top_p=1.0, min_p=0.0)])
def test_kept_set_is_the_samplers(filters):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 40, generator=g, dtype=torch.float64) * 2
    keep = reference.kept_set(z, **filters)
    for row in range(z.shape[0]):
        assert set(keep[row].nonzero().flatten().tolist()) == _brute_force(z[row], **filters), row


def test_ties_are_kept_or_dropped_together():
    z = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    assert reference.kept_set(z, top_k=2).tolist() == [[True, True, True, True, False]]   # ties with the 2nd
    # ascending: 0 (p ≈ .07), then the three 1's together (cumulative ≈ .46), then 3
    p = torch.softmax(z, -1)[0]
    below = float(p[4] + 3 * p[1])
    assert reference.kept_set(z, top_p=1 - below + 1e-9).tolist() == [[True, True, True, True, False]]
    assert reference.kept_set(z, top_p=1 - below - 1e-9).tolist() == [[True, False, False, False, False]]


def _grid_logits(B, T, V, seed, dtype=torch.float32):
    """Logits on a grid of 1/8; as fp32 all moved by 2⁻¹², which makes them no bf16 values (but
    0's), so that the selection counts them over keys of d (a row of bf16 values takes bf16's)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-48, 48, (B, T, V), generator=g) / 8.0
    return (x + 2.0 ** -12 if dtype == torch.float32 else x).to(dtype)


def _assert_unambiguous(z, top_p=None, **filters):
    """top_p's kept set of every row of ``z`` (float64 logits after τ) stays put when top_p moves
    by 1e-4 either way: no cumulative mass lies within fp32's reach of the cutoff."""
    if top_p is None or not isinstance(top_p, float):
        return
    keep = reference.kept_set(z, top_p=top_p, **filters)
    for moved in (top_p * (1 - 1e-4), min(top_p * (1 + 1e-4), 1.0)):
        assert torch.equal(reference.kept_set(z, top_p=moved, **filters), keep), moved


def _ids_with_some_outside(x, seed):
    """Targets: random, and on every third row the row's smallest logit (outside any cut)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, x.shape[-1], x.shape[:-1], generator=g)
    low = x.float().argmin(-1)
    ids.view(-1)[::3] = low.reshape(-1)[::3]
    return ids


def _run(fn, x, ids, upstream, **kw):
    """(logp, entropy, ∂(Σ u·logp where finite + Σ H)/∂x) of ``fn``."""
    x = x.clone().requires_grad_()
    logp, ent = fn(x, ids, return_entropy=True, **kw)
    (torch.where(logp.isinf(), 0.0, logp * upstream).sum() + (0.5 * ent).sum()).backward()
    return logp.detach(), ent.detach(), x.grad


def head_grads(fn, upstream, h, w, b):
    """(logp, entropy, ∂/∂hidden, ∂/∂weight, ∂/∂bias) of Σ u·logp where finite + Σ H, for
    ``fn(hidden, weight, bias)`` → (logp, entropy)."""
    h, w, b = (t.clone().requires_grad_() for t in (h, w, b))
    logp, ent = fn(h, w, b)
    (torch.where(logp.isinf(), 0.0, logp * upstream.to(logp.dtype)).sum() + ent.sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad, b.grad


def _close(got, want, rtol=FP32_RTOL):
    both_inf = got.isinf() & want.isinf() & (got.sign() == want.sign())
    assert torch.equal(got.isinf(), want.isinf())
    err = torch.where(both_inf, 0.0, (got.double() - want).abs())
    assert err.max().item() <= rtol * max([1.0] + want[~both_inf].abs().tolist())


# Per-token values of each filter: on, off, and extremes (min_p 1 and top_k 1: the largest only;
# top_k beyond V: every token; top_p 0.05: the largest only).
PER_TOKEN = dict(min_p=[[MIN_P, 0.0, 1.0], [-1.0, MIN_P, MIN_P / 4]], top_k=[[7, 0, 1], [-1, 7, 1000]],
                 top_p=[[0.8, 1.0, 0.05], [1.0, 0.8, 0.3]])


# Every layout with the three filters together; each filter alone on the padded layout.
LAYOUTS = ([("all", layout) for layout in ("padded", "shifted", "flat", "per-token", "temperature")]
           + [(name, "padded") for name in ("min_p", "top_k", "top_p")])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters, layout", LAYOUTS)
def test_logprobs_entropy_and_gradient(backend, filters, layout):
    B, T, V = 2, 3, 300
    x = _grid_logits(B, T + (layout == "shifted"), V, seed=1)
    ids = _ids_with_some_outside(x[:, :T], seed=2)
    kw = dict(FILTERS[filters])
    z = x[:, :T].double()
    if layout == "flat":
        x, ids = x.reshape(B * T, V), ids.reshape(-1)
    if layout == "per-token":
        kw = {name: torch.tensor(PER_TOKEN[name]) for name in kw}
    if layout == "temperature":  # τ = 2 keeps z on a grid of 1/16, min_p's cut at an odd multiple of 1/32 below
        kw.update(temperature=torch.full((B, T), 2.0), min_p=math.exp(-2.53125)) if "min_p" in kw else \
            kw.update(temperature=torch.full((B, T), 2.0))
        z = z / 2
    _assert_unambiguous(z, **{k: v for k, v in kw.items() if k != "temperature"})
    upstream = torch.linspace(-1.0, 2.0, ids.numel()).reshape(ids.shape)
    with mhpo_kernels.use_backend(backend):
        logp, ent, grad = _run(mhpo_kernels.token_logprobs, x, ids, upstream, **kw)
    want_logp, want_ent, want_grad = _run(reference.token_logprobs, x.double(), ids, upstream.double(), **kw)
    assert logp.isinf().any(), "the inputs must put some target outside the kept set"
    _close(logp, want_logp)
    _close(ent, want_ent)
    _close(grad, want_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
def test_top_p_over_many_near_equal_tokens(backend, top_p):
    """A flat row (logits ~ N(0, 1/4), on a grid of 1/256) puts many tokens' mass near the cutoff:
    the selection takes several passes (select.py) and still finds the sorted oracle's set."""
    x = torch.round(torch.randn(2, 2, 3000, generator=torch.Generator().manual_seed(18)) * 128) / 256
    ids = _ids_with_some_outside(x, seed=17)
    _assert_unambiguous(x.double(), top_p=top_p, top_k=2500)
    upstream = torch.ones(ids.shape)
    with mhpo_kernels.use_backend(backend):
        logp, ent, grad = _run(mhpo_kernels.token_logprobs, x, ids, upstream, top_p=top_p, top_k=2500)
    want = _run(reference.token_logprobs, x.double(), ids, upstream.double(), top_p=top_p, top_k=2500)
    for a, b in zip((logp, ent, grad), want):
        _close(a, b)


@pytest.mark.parametrize("filters", ["top_k", "top_p", "all"])
def test_the_selection_sums_the_kept_tokens_after_a_pass_of_single_keys(monkeypatch, filters):
    """A selection pass over bins of one key each decides its row and writes the kept tokens'
    sums (select.py), which the forward's finish takes instead of its own pass; a pass over wider
    bins leaves the sums to the finish (−1 written). Tied logits (a grid of 1/8) take the first
    way on some rows, distinct ones (fp32 normal) the second on some; both give the float64
    oracle's log-probs, entropy and gradient. With both top_k and top_p ("all"), fp32 rows gather
    top_k's candidates and sum the kept ones from them: every row summed."""
    from mhpo_kernels.kernels import forward

    select_cuts, summed = forward.select_cuts, []

    def spy(logits, target, part, n_segs, seg_len, lmap, cut, sums, with_entropy, cfg):
        out = select_cuts(logits, target, part, n_segs, seg_len, lmap, cut, sums, with_entropy, cfg)
        summed.append(sums.view(-1, 2)[:, 0] >= 0)
        return out

    monkeypatch.setattr(forward, "select_cuts", spy)
    grid = _grid_logits(2, 3, 300, seed=21)
    distinct = torch.randn(2, 3, 300, generator=torch.Generator().manual_seed(22)) * 2
    for x in (grid, distinct):
        ids = _ids_with_some_outside(x, seed=23)
        _assert_unambiguous(x.double(), **FILTERS[filters])
        upstream = torch.linspace(-1.0, 2.0, ids.numel()).reshape(ids.shape)
        with mhpo_kernels.use_backend("triton"):
            got = _run(mhpo_kernels.token_logprobs, x, ids, upstream, **FILTERS[filters])
        want = _run(reference.token_logprobs, x.double(), ids, upstream.double(), **FILTERS[filters])
        for a, b in zip(got, want):
            _close(a, b)
    assert len(summed) == 2 and summed[0].any() and summed[1].all() == (filters == "all"), summed


def _spy_on_the_selection(monkeypatch, passes, summed, count=lambda args: "count", rows=None):
    """Each pass of the selection over a row appended to ``passes`` as it starts (a counting pass
    as ``count`` of its arguments, the gather as "gather", a pass of top_k's and top_p's runs side
    by side as "joint"), and for each selection launch whether its first row's kept tokens were
    summed (else the finish reads the row) to ``summed``. ``rows``: a dict that takes each row's
    passes (a Counter by the row's address, ascending with the row) and whether each row's kept
    tokens were summed (the last launch's)."""
    import collections

    from mhpo_kernels.kernels import forward, select

    count_pass, gather_pass, joint_pass = select._count_pass, select._gather_pass, select._joint_pass
    select_cuts = forward.select_cuts
    if rows is not None:
        rows["passes"] = collections.Counter()

    def note(label, args):
        passes.append(label)
        if rows is not None:   # the row's block base, the interpreter's pointer value
            rows["passes"][int(args[0].handle.data.ravel()[0])] += 1

    def count_spy(*args):
        note(count(args), args)
        return count_pass(*args)

    def gather_spy(*args):
        note("gather", args)
        return gather_pass(*args)

    def joint_spy(*args):
        note("joint", args)
        return joint_pass(*args)

    def select_spy(*args):
        out = select_cuts(*args)
        summed.append(args[7][0].item() >= 0)
        if rows is not None:
            rows["summed"] = args[7].view(-1, 2)[:, 0] >= 0
        return out

    monkeypatch.setattr(select, "_count_pass", count_spy)
    monkeypatch.setattr(select, "_gather_pass", gather_spy)
    monkeypatch.setattr(select, "_joint_pass", joint_spy)
    monkeypatch.setattr(forward, "select_cuts", select_spy)


def _rows_for_the_last_pass():
    """(logits (V,), top_p) whose cutoff lies among the densest fp32 keys, near the largest: its
    largest few within 10⁻³ of each other (top_p 0.5), tied (top_p 0.3), or a pair tied just
    below it (top_p 0.4)."""
    import numpy as np

    for seed in (2, 5, 63, 75):
        rng = np.random.default_rng(seed)
        z = rng.standard_normal(256).astype(np.float32) * 2
        top = rng.integers(2, 8)
        z[:top] = z.max() + 1 + rng.uniform(0, 1e-3, top)
        yield z, 0.5
    for seed, n in ((0, 4), (1, 2)):
        z = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
        z[:n] = 8.0
        yield z, 0.3
    z = np.random.default_rng(3).standard_normal(512).astype(np.float32)
    z[0], z[1:3] = 8.0, 8.0 - 0.003
    yield z, 0.4


def test_top_p_reads_a_row_at_most_four_times(monkeypatch):
    """top_p's selection ends within three counting passes (select.MAX_PASSES), so the forward
    reads a row at most four times: a last pass whose bins still hold several keys decides them
    by the middle of the bounds on the mass above them and sums the kept ones from the bins
    instead of counting once more. Rows whose cutoff lies among the densest fp32 keys, near the
    largest (``_rows_for_the_last_pass``), take that way (a fourth pass, before); they keep the
    sort's set, ties together, with the float64 oracle's log-probs, entropy and gradient."""
    passes, summed = [], []
    # each counting pass as its bins' width in keys (log2), 0 for the uniform pass
    _spy_on_the_selection(monkeypatch, passes, summed, lambda args: int(args[9]))
    by_the_middle = 0
    for z, top_p in _rows_for_the_last_pass():
        x = torch.from_numpy(z).reshape(1, 1, -1)
        _assert_unambiguous(x.double(), top_p=top_p)
        keep = reference.kept_set(x.double().reshape(1, -1), top_p=top_p)[0]
        ids = torch.where(keep, x.flatten(), math.inf).argmin().reshape(1, 1)   # the smallest kept
        passes.clear()
        with mhpo_kernels.use_backend("triton"):
            got = _run(mhpo_kernels.token_logprobs, x, ids, torch.ones(1, 1), top_p=top_p)
        want = _run(reference.token_logprobs, x.double(), ids, torch.ones(1, 1, dtype=torch.float64), top_p=top_p)
        for a, b in zip(got, want):
            _close(a, b)
        assert 1 <= len(passes) <= 3 and summed[-1], (top_p, passes)
        by_the_middle += len(passes) == 3 and passes[-1] > 0
    assert by_the_middle >= 4, "too few rows' last pass held bins of several keys"


def _rows_with_both_filters():
    """(logits (V,), top_k, top_p) rows with top_k and top_p together, in one batch: random rows of
    ties, near-ties and spreads with both filters (``_random_rows``); rows whose k-th and
    (k+1)-th largest logits lie a few fp32 steps apart, top_p keeping the largest alone or all
    that top_k keeps; rows of 2 or 3 logits far above the rest, top_p 0.9 keeping all of them;
    rows where top_k's k-th value lies inside a tie group while top_p's cutoff falls between
    distinct tokens 3e-5 apart above it; and a row whose top_p cutoff falls between two tokens
    200 fp32 steps apart, a token a hair below the largest (the last two kinds: rows that a
    selection of both filters at once, with top_p's goal bounded until top_k's count is exact,
    got wrong: bench/NOTES.md)."""
    import numpy as np

    x, _, top_k, top_p = _random_rows(24, 512, seed=11, kinds=("kp", "mkp"))
    rows, ks, ps = [x], [top_k], [top_p]
    rng = np.random.default_rng(12)
    for r in range(12):
        z = rng.standard_normal(512) * rng.choice([1.0, 2.0, 4.0])
        order = np.argsort(-z)
        if r % 3 < 2:
            k = int(rng.integers(2, 60))
            z = z.astype(np.float32)
            z[order[k]] = z[order[k - 1]]
            for _ in range(4):
                z[order[k]] = np.nextafter(z[order[k]], -np.inf, dtype=np.float32)
            kept = np.sort(z[order[:k]].astype(np.float64))[::-1]
            share = np.cumsum(np.exp(kept - kept[0])) / np.exp(kept - kept[0]).sum()
            p = (share[0] + share[1]) / 2 if r % 3 else 1 - (1 - share[-2]) / 2   # the largest alone, or all k
        else:
            k = int(rng.integers(2, 4))
            z[order[:k]] = z.max() + 3 + rng.uniform(0, 0.3, k)
            z, p = z.astype(np.float32), 0.9
        rows.append(torch.from_numpy(z).reshape(1, -1))
        ks.append(torch.tensor([k]))
        ps.append(torch.tensor([p], dtype=torch.float32))
    pairs = np.linspace(-0.45, -0.05, 40)
    z = np.concatenate([[0.0], pairs, pairs - 3e-5, np.full(20, -0.5), rng.uniform(-3.0, -0.6, 411)])
    kept = np.sort(z[z >= -0.5])
    share = np.exp(kept) / np.exp(kept).sum()
    for j in (6, 8, 10):   # top_k 91 inside the tie group; top_p halfway across the upper token of pair j
        below = share[:20 + 2 * j + 1].sum()
        rows.append(torch.from_numpy(rng.permutation(z).astype(np.float32)).reshape(1, -1))
        ks.append(torch.tensor([91]))
        ps.append(torch.tensor([1 - below - share[20 + 2 * j + 1] / 2], dtype=torch.float32))
    # A token a hair below the largest, a comb of 300 below −0.7, and top_p's cutoff between two
    # tokens 200 fp32 steps apart among them, with top_k's k-th value further down the comb.
    z = np.full(512, -3.0, np.float32)
    z[0], z[1] = 0.0, -1e-30
    z[4:304] = np.float32(-0.7) - np.arange(300, dtype=np.float32) * np.float32(3.7e-4)
    z[2] = z[3] = z[34] - np.float32(1e-4)
    for _ in range(200):
        z[3] = np.nextafter(z[3], -np.inf, dtype=np.float32)
    kept = np.sort(z.astype(np.float64))[::-1][:204]
    share = np.exp(kept) / np.exp(kept).sum()
    upper = int(np.nonzero(kept == np.float64(z[2]))[0][0])
    rows.append(torch.from_numpy(z).reshape(1, -1))
    ks.append(torch.tensor([204]))
    ps.append(torch.tensor([share[:upper].sum() + share[upper] / 2], dtype=torch.float32))
    return torch.cat(rows), torch.cat(ks), torch.cat(ps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_and_top_p_together(backend):
    """top_k and top_p together (``_rows_with_both_filters``) keep the float64 sort's set, ties
    together (each kept token but the target has a non-zero gradient, every other token a zero
    one), with the oracle's log-probs and entropy."""
    x, top_k, top_p = _rows_with_both_filters()
    R, V = x.shape
    want = reference.kept_set(x.double(), top_k=top_k, top_p=top_p)
    assert (want.sum(-1) < V).all() and (want.sum(-1) > 1).sum() > R // 2
    for f in (1 - 1e-4, 1 + 1e-4):   # top_p's kept sets stay put when it moves by 1e-4
        assert torch.equal(reference.kept_set(x.double(), top_k=top_k, top_p=(top_p.double() * f).clamp(max=1)), want)
    ids = x.argmax(-1).reshape(1, R)
    leaf = x.reshape(1, R, V).clone().requires_grad_()
    with mhpo_kernels.use_backend(backend):
        logp, ent = mhpo_kernels.token_logprobs(leaf, ids, return_entropy=True, top_k=top_k.reshape(1, R),
                                                top_p=top_p.reshape(1, R))
    logp.sum().backward()
    got = leaf.grad.reshape(R, V) != 0
    got.view(-1)[ids.flatten() + V * torch.arange(R)] = True
    for r in range(R):
        assert torch.equal(got[r], want[r]), (r, int(got[r].sum()), int(want[r].sum()))
    want_logp, want_ent = reference.token_logprobs(x.double().reshape(1, R, V), ids, return_entropy=True,
                                                   top_k=top_k.reshape(1, R), top_p=top_p.reshape(1, R))
    _close(logp.detach(), want_logp)
    _close(ent.detach(), want_ent)


def _fp32_rows_for_the_gather():
    """(logits (V,) fp32, top_k, top_p, how) rows of V 4000 with both filters, top_p halfway
    between two of the float64 kept set's cumulative shares: Gaussian with top_k 50, its k-th
    value's bin of the first pass holding few tokens (gathered after one counting pass); 3000
    tokens in one bin of that pass around the k-th value (gathered after two); top_k 3000, above
    what the gather holds (both selections side by side); 2500 tokens tied at the k-th value of
    top_k 20, which two passes leave in one bin (the 10 above it gathered, the bin counted key by
    key); top_k 4000, the whole row (off: top_p alone); 2500 tokens tied at the k-th value of
    top_k 2200 (side by side, the bounds on the mass top_k keeps far apart until its last pass);
    and top_k 2601 whose k-th value, 2 tied tokens, lies 1 below 2500 tied ones, top_p keeping
    every token top_k keeps (its own bins between the two stay wide into its last pass: the cut is
    decided among top_k's single keys, ``select._exact_in_run``)."""
    import numpy as np

    rng = np.random.default_rng(31)
    gaussian = rng.standard_normal(4000) * 2
    band = np.concatenate([[0.0], rng.uniform(-0.1, -0.02, 10), -0.132 - rng.uniform(0, 0.0066, 3000),
                           rng.uniform(-8, -4, 989)])   # d of the 3000 in [-0.2, -0.1904]: one bin
    ties = np.concatenate([rng.uniform(-0.9, 0.0, 10), np.full(2500, -1.0), rng.uniform(-8, -2, 1490)])
    wide_ties = np.concatenate([rng.uniform(-0.9, 0.0, 100), np.full(2500, -1.0), rng.uniform(-8, -2, 1400)])
    far_below = np.concatenate([rng.uniform(-0.9, 0.0, 100), np.full(2500, -1.0), np.full(2, -2.0),
                                rng.uniform(-8, -2.5, 1398)])
    for z, k, how in ((gaussian, 50, "gathered"), (band, 100, "gathered"), (gaussian, 3000, "joint"),
                      (ties, 20, "tied"), (gaussian, 4000, "off"), (wide_ties, 2200, "joint"),
                      (far_below, 2601, "joint, all")):
        z = torch.from_numpy(rng.permutation(z).astype(np.float32)).double()
        keep = reference.kept_set(z.reshape(1, -1), top_k=torch.tensor([k]))[0]
        values, counts = z[keep].unique(return_counts=True)      # ascending
        share = counts * (values - values.max()).exp()
        cumulative = (share / share.sum()).cumsum(0)
        if how.endswith("all"):   # top_p keeps every token top_k keeps: half the smallest group's share short of 1
            yield z.float(), k, float(1 - cumulative[0] / 2), "joint"
            continue
        m = int(torch.searchsorted(cumulative, torch.tensor(0.3, dtype=torch.float64)))
        yield z.float(), k, float(1 - (cumulative[m - 1] + cumulative[m]) / 2), how


@pytest.mark.parametrize("block_v", [None, 1024], ids=["one-block", "blocks-of-1024"])
def test_fp32_rows_with_both_filters_read_at_most_four_times(monkeypatch, block_v):
    """fp32 rows with top_k and top_p gather top_k's candidates once at most 2048 (a row of blocks
    of 1024: 1024) lie from its k-th value's bin up, and decide both filters and the kept tokens'
    sums from them: the row is read by the statistics, at most two counting passes and the gather,
    no finish (select.py, ``_top_k_top_p_gathered``); where two passes leave more tokens tied with
    the k-th value than the gather holds, the gather takes those above its bin while counting the
    bin key by key. A top_k above what the gather holds counts both filters' runs side by side
    after top_p's uniform pass (``_top_k_top_p_joint``). Each row is read at most 4 times; a top_k
    of the whole row is off. Every row keeps the sort's set with the float64 oracle's log-probs,
    entropy and gradient (``_fp32_rows_for_the_gather``), read whole as one block or in blocks of
    1024 and a tail."""
    from mhpo_kernels import _config

    passes, summed, reads = [], [], []
    _spy_on_the_selection(monkeypatch, passes, summed)
    for z, k, p, how in _fp32_rows_for_the_gather():
        x = z.reshape(1, 1, -1)
        filters = dict(top_k=torch.tensor([[k]]), top_p=torch.tensor([[p]]))
        _assert_unambiguous(x.double().reshape(1, -1), top_k=torch.tensor([k]), top_p=p)
        keep = reference.kept_set(x.double().reshape(1, -1), top_k=torch.tensor([k]), top_p=p)[0]
        ids = torch.where(keep, z, math.inf).argmin().reshape(1, 1)   # the smallest kept
        passes.clear()
        with mhpo_kernels.use_backend("triton"), _config.overridden(block_v=block_v):
            got = _run(mhpo_kernels.token_logprobs, x, ids, torch.ones(1, 1), **filters)
        want = _run(reference.token_logprobs, x.double(), ids, torch.ones(1, 1, dtype=torch.float64), **filters)
        for a, b in zip(got, want):
            _close(a, b)
        assert (passes[-1] == "gather") == (how in ("gathered", "tied")) and passes.count("gather") <= 1, passes
        assert passes == (["joint"] * len(passes) if how == "joint" else [p for p in passes if p != "joint"]), passes
        reads.append(1 + len(passes) + (not summed[-1]))
    assert reads[:4] == [3, 4, 4, 4] and reads[4] <= 4 and reads[5:] == [4, 4], reads


def _key(d):
    """select._key of fp32 values: uint32 keys (as int) in the values' order."""
    bits = int(np.float32(d).view(np.uint32))
    return (bits | 0x80000000) if bits < 0x80000000 else (~bits & 0xFFFFFFFF)


def _value(key):
    """select._value: the fp32 value of a key."""
    return float(np.uint32(key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF).view(np.float32))


def _top_key_of_top_k_bin(x, k, slots):
    """The highest key of the bin of keys of d that ``select._top_k_top_p_gathered``'s two counting
    passes leave holding top_k's k-th value, for fp32 logits x whose largest is 0 (d = fp32(x ·
    log2 e), base 0; τ 1, min_p off), asserting that more than ``slots`` lie from that bin up (the
    third pass gathers the tokens above it and counts it key by key)."""
    keys = np.array([_key(v + 0.0) for v in np.float32(x) * np.float32(1.4426950408889634)], dtype=np.int64)
    klo, khi, above = _key(-3.4028234663852886e38), _key(7.888609052210118e-31), 0
    for _ in range(2):
        shift = max(int(np.float32(khi - klo).view(np.uint32) >> 23) - 127 + 1 - 11, 0)
        inside = (keys >= klo) & (keys <= khi)
        cnt = np.bincount((keys[inside] - klo) >> shift, minlength=2048)[:2048]
        from_bin = above + np.cumsum(cnt[::-1])[::-1]
        f = int(np.nonzero(from_bin >= k)[0].max())
        assert from_bin[f] > slots, "the gather would hold the candidates"
        lo_f = klo + (f << shift)
        khi, above, klo = lo_f + min((1 << shift) - 1, khi - lo_f), from_bin[f] - cnt[f], lo_f
    return khi


def _on_the_top_key(x, k, slots):
    """``x`` with x[450] a logit whose d lies on the highest key of top_k's bin
    (``_top_key_of_top_k_bin``), the tied x[50:450] moved down a step at a time until such a
    logit exists (x · log2 e rounds past some keys)."""
    log2e = np.float32(1.4426950408889634)
    for _ in range(64):
        top = _value(_top_key_of_top_k_bin(x, k, slots))
        near = (np.float32(top / log2e).view(np.int32) + np.arange(-3, 4, dtype=np.int32)).view(np.float32)
        hit = [v for v in near if np.float32(v) * log2e == np.float32(top)]
        if hit:
            x[450] = hit[0]
            return x
        x[50:450] = np.nextafter(x[50:450], np.float32(-np.inf))
        x[450] = x[50]
    raise AssertionError("no logit on the bin's highest key")


def _rows_the_gather_cannot_hold(slots):
    """(logits (R, V) fp32, min_p, top_k, top_p, how) with top_p and a top_k whose candidates
    outnumber ``slots``: random rows of every kind with top_k above ``slots``, some with min_p
    (``_random_rows``; where min_p keeps at most ``slots``, top_k is below), both filters' runs
    counted side by side ("joint"); a Gaussian row whose 20 smallest lie 50–60 below the largest
    (d < −64), top_k keeping all but 5 of them (its k-th value below top_p's uniform first pass:
    top_p alone from there); a row of 300 tied largest, top_k 290, whose k-th value lies in the
    uniform pass's highest bin, which spans most keys of d ("joint, tied top"); a flat Gaussian row
    with top_k 400 whose top_p keeps all that top_k keeps (top_k's sums are the row's); and top_k 100
    and 150, below ``slots``, whose k-th value lies among 400 tokens tied, or within 2.5e-5 of each
    other, which two counting passes leave in one bin ("tied", "band": the 50 tokens above
    gathered, the bin counted key by key), and the tied row with one more token on that bin's
    highest key, top_k 52 keeping the 400 with it (counted once, in the bin, not gathered too).
    top_p lies halfway between two of the float64 kept set's cumulative shares, at 0.3 of its
    mass (a cutoff among the band), or 0.9 (among the 50 above it)."""
    import numpy as np

    V = 600
    x, min_p, top_k, top_p = _random_rows(16, V, seed=41, kinds=("kp", "mkp"), k_above=slots)
    how = ["joint" if k > slots else "gathered" for k in top_k.tolist()]
    rng = np.random.default_rng(42)
    far = rng.standard_normal(V) * 2
    far[:20] = far.max() - 50 - rng.uniform(0, 10, 20)
    tied_top = rng.standard_normal(V)
    tied_top[:300] = tied_top.max() + 1
    flat = rng.standard_normal(V) * 0.5
    tied = np.concatenate([rng.uniform(-2, 0, 50), np.full(400, -2.1), rng.uniform(-14, -4, V - 450)])
    band = np.concatenate([rng.uniform(-2, 0, 50), -2.1 + rng.uniform(0, 2.5e-5, 400), rng.uniform(-14, -4, V - 450)])
    on_top = _on_the_top_key(np.concatenate([[0.0], rng.uniform(-2, -0.01, 49), np.full(401, -2.1),
                                             rng.uniform(-14, -4, V - 451)]).astype(np.float32), 52, slots)
    assert -2.101 < on_top[50] < on_top[450] < -2.0995   # the bin's highest key: within 2^10 keys above
    rows, ks, ps = [], [], []
    for z, k, share, kind in ((far, V - 5, 0.3, "joint"), (tied_top, 290, 0.3, "joint, tied top"),
                              (flat, 400, 0.0, "joint, all top_k keeps"), (tied, 100, 0.3, "tied"),
                              (band, 150, 0.3, "band"), (band, 150, 0.9, "band"),
                              (on_top, 52, 0.0, "tied, one on the bin's top key")):
        z = torch.from_numpy(rng.permutation(z).astype(np.float32)).double()
        keep = reference.kept_set(z.reshape(1, -1), top_k=torch.tensor([k]))[0]
        values, counts = z[keep].unique(return_counts=True)      # ascending
        weight = counts * (values - values.max()).exp()
        cumulative = (weight / weight.sum()).cumsum(0)
        m = int(torch.searchsorted(cumulative, torch.tensor(share, dtype=torch.float64)))
        rows.append(z.float().reshape(1, -1))
        ks.append(k)
        ps.append(1 - ((cumulative[m - 1] if m else 0.0) + cumulative[m]) / 2)   # share 0: above 1 − the lowest's
        how.append(kind)
    return (torch.cat([x] + rows), torch.cat([min_p, torch.zeros(len(rows))]),
            torch.cat([top_k, torch.tensor(ks)]), torch.cat([top_p, torch.tensor(ps, dtype=torch.float32)]), how)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_rows_the_gather_cannot_hold(monkeypatch, backend):
    """fp32 rows with top_p and a top_k whose candidates outnumber what the gather holds (blocks of
    256: 256) keep the float64 sort's set, ties together, with the oracle's log-probs, entropy and
    gradient (``_rows_the_gather_cannot_hold``). On the Triton path (select.py) a top_k above 256
    counts both filters' runs side by side, each pass one read of both (``_top_k_top_p_joint``),
    and a smaller one whose k-th value's bin two passes leave too full gathers the tokens above
    it while counting it key by key: each fp32 row not of bf16 values is read at most 4 times
    (the statistics and three passes, no finish)."""
    from mhpo_kernels import _config

    x, min_p, top_k, top_p, how = _rows_the_gather_cannot_hold(256)
    R, V = x.shape
    for r in range(R):
        _assert_unambiguous(x[r:r + 1].double(), min_p=min_p[r:r + 1], top_k=top_k[r:r + 1], top_p=float(top_p[r]))
    keep = reference.kept_set(x.double(), min_p=min_p, top_k=top_k, top_p=top_p)
    filters = dict(min_p=min_p.reshape(1, R), top_k=top_k.reshape(1, R), top_p=top_p.reshape(1, R))
    z, ids = x.reshape(1, R, V), x.argmax(-1).reshape(1, R)
    passes, summed, rows = [], [], {}
    _spy_on_the_selection(monkeypatch, passes, summed, rows=rows)
    with mhpo_kernels.use_backend(backend), _config.overridden(block_v=256):
        got = _run(mhpo_kernels.token_logprobs, z, ids, torch.ones(1, R), **filters)
    want = _run(reference.token_logprobs, z.double(), ids, torch.ones(1, R, dtype=torch.float64), **filters)
    for a, b in zip(got, want):
        _close(a, b)
    nonzero = got[2].reshape(R, V) != 0
    nonzero.view(-1)[ids.flatten() + V * torch.arange(R)] = True
    for r in range(R):
        assert torch.equal(nonzero[r], keep[r]), (r, how[r], int(nonzero[r].sum()), int(keep[r].sum()))
    if backend == "triton":   # rows of bf16 values take bf16 keys (select.py, BF16_ROWS)
        reads = 1 + torch.tensor([rows["passes"][a] for a in sorted(rows["passes"])]) + ~rows["summed"]
        fp32 = torch.tensor([not (x[r].view(torch.int32) & 0xFFFF == 0).all() for r in range(R)])
        assert sum(fp32[r] and h.startswith("joint") for r, h in enumerate(how)) >= 8, how
        assert passes.count("joint") >= 24 and passes.count("gather") >= 4, passes
        assert len(reads) == R and reads[fp32].max() <= 4, (reads, how)


def _16_bit_rows_with_both_filters(dtype):
    """(logits (R, V) of values of the 16-bit ``dtype``, min_p, top_k, top_p) for the selection over 16-bit keys
    (kernels/select.py): random rows of every kind with top_k and top_p, some with min_p
    (``_random_rows``); Gaussian rows whose top_p cutoff keeps all that top_k keeps, or drops only
    its lowest tie group (a cutoff among top_k's last bin, counted by single keys); rows whose
    top_p cutoff lies far above top_k's, at half the mass; rows whose min_p floor lies above zero,
    so that the candidates' keys fit in one pass of single keys; and flat rows with top_k keeping
    most of the row, top_p's cutoff among the many tokens near 0 (keys of all sizes around it,
    where the bins' bounds are loose)."""
    import numpy as np

    x, min_p, top_k, top_p = _random_rows(30, 512, seed=13, kinds=("kp", "mkp"), rounded=dtype)
    rows, mps, ks, ps = [x], [min_p], [top_k], [top_p]
    rng = np.random.default_rng(14)
    for r in range(24):
        z = rng.standard_normal(512) * (1.0 if r >= 18 else rng.choice([1.0, 2.0, 4.0]))
        if r >= 18:   # 200 of them within 0.05 of 0 (fp16, whose keys are finer: within 2), on both sides
            near = 0.05 if dtype == torch.bfloat16 else 2.0
            z[:200] = rng.uniform(-near, near, 200)
        z = torch.from_numpy(z).to(dtype).double()
        mp = torch.zeros(1, dtype=torch.float64)
        if r % 3 == 2:   # the floor halfway between two positive values below the largest
            values = z.unique().flip(0)
            i = int(rng.integers(8, int((values > 0.5).sum())))
            mp[0] = math.exp((values[i] + values[i + 1]) / 2 - values[0])
        n = int(reference.kept_set(z.reshape(1, -1), min_p=mp)[0].sum())
        while True:   # a top_k whose groups around top_p's cutoff hold ≥ 2e-3 (5e-4) of the mass each
            k = torch.tensor([int(rng.integers(300, 500)) if r >= 18 else 200 if r % 3 == 1 else
                              int(rng.integers(5, min(n, 200)))])
            keep = reference.kept_set(z.reshape(1, -1), min_p=mp, top_k=k)[0]
            values, counts = z[keep].unique(return_counts=True)           # ascending
            share = counts * (values - values.max()).exp()
            share = share / share.sum()
            cumulative = share.cumsum(0)
            gap = 5e-4 if r >= 18 else 2e-3
            wide = (share > gap).nonzero().flatten()
            m = {0: 0 if r % 6 == 0 else 1, 1: int(wide[(cumulative[wide] - 0.5).abs().argmin()]),
                 2: int(wide[rng.integers(0, len(wide))])}[r % 3]
            if r >= 18:   # top_p's cutoff among the many tokens near 0, top_k's far below
                m = int(wide[(values[wide]).abs().argmin()])
            if share[m] > gap:
                break
        rows.append(z.float().reshape(1, -1))
        mps.append(mp.float())
        ks.append(k)
        ps.append(torch.tensor([1 - ((cumulative[m - 1] if m else 0.0) + cumulative[m]) / 2], dtype=torch.float32))
    return torch.cat(rows), torch.cat(mps), torch.cat(ks), torch.cat(ps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, values", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                           (torch.float32, torch.bfloat16)], ids=["bf16", "fp16", "bf16-in-fp32"])
def test_16_bit_logits_with_both_filters(backend, dtype, values, monkeypatch):
    """bf16 and fp16 logits, and fp32 logits of bf16 values (``logits.float()``), with top_k and
    top_p, some with min_p (``_16_bit_rows_with_both_filters``), keep the float64 sort's set, ties
    together, with the oracle's log-probs and entropy. On the Triton path the selection over
    16-bit keys reads each row at most three times (at most four with the statistics): a first
    pass for both filters, one of single keys over top_k's last bin, and one over top_p's open
    bins, or the finish's sums; every way is taken by some row. Where top_p's open bins may be too
    wide for that, the second pass counts them beside top_k's bin and the third decides them
    (``_joint_passes``): three still. Where distinct values near the cut share its d, one or two
    counts of that tie group more (``_settle``). The fp32 rows take bf16's passes, as the
    statistics pass finds every logit a bf16 value."""
    from mhpo_kernels.kernels import forward, select

    count_pass, joint_pass, select_cuts, shifts, summed = select._count_pass, select._joint_pass, \
        forward.select_cuts, {}, []

    def count_spy(*args):   # by the row's address: (the bins' width in keys (log2), side by side with
        # top_k's bin, a count of a tie group in d: ``_settle``'s, the one pass here without sums)
        shifts.setdefault(int(args[0].handle.data.ravel()[0]), []).append(
            (int(args[9]), False, not (args[13] or args[14])))
        return count_pass(*args)

    def joint_spy(*args):
        shifts.setdefault(int(args[0].handle.data.ravel()[0]), []).append((int(args[9]), True, False))
        return joint_pass(*args)

    def select_spy(*args):
        out = select_cuts(*args)
        summed.append(args[7].view(-1, 2)[:, 0] >= 0)
        return out

    monkeypatch.setattr(select, "_count_pass", count_spy)
    monkeypatch.setattr(select, "_joint_pass", joint_spy)
    monkeypatch.setattr(forward, "select_cuts", select_spy)
    x, min_p, top_k, top_p = _16_bit_rows_with_both_filters(values)
    R, V = x.shape
    want = reference.kept_set(x.double(), min_p=min_p, top_k=top_k, top_p=top_p)
    assert (want.sum(-1) < V).all() and (want.sum(-1) > 1).sum() > R // 2
    for f in (1 - 1e-4, 1 + 1e-4):   # top_p's kept sets stay put when it moves by 1e-4
        moved = (top_p.double() * f).clamp(max=1)
        assert torch.equal(reference.kept_set(x.double(), min_p=min_p, top_k=top_k, top_p=moved), want)
    filters = dict(min_p=min_p.reshape(1, R), top_k=top_k.reshape(1, R), top_p=top_p.reshape(1, R))
    ids = x.argmax(-1).reshape(1, R)
    leaf = x.reshape(1, R, V).to(dtype).requires_grad_()
    with mhpo_kernels.use_backend(backend):
        logp, ent = mhpo_kernels.token_logprobs(leaf, ids, return_entropy=True, **filters)
    logp.sum().backward()
    got = leaf.grad.reshape(R, V) != 0
    got.view(-1)[ids.flatten() + V * torch.arange(R)] = True
    for r in range(R):
        assert torch.equal(got[r], want[r]), (r, int(got[r].sum()), int(want[r].sum()))
    want_logp, want_ent = reference.token_logprobs(x.double().reshape(1, R, V), ids, return_entropy=True, **filters)
    _close(logp.detach(), want_logp)
    _close(ent.detach(), want_ent)
    if backend == "triton":
        passes = [shifts[a] for a in sorted(shifts)]
        assert len(passes) == R and len(summed) == 1
        reads = [len(p) + (not s) for p, s in zip(passes, summed[0].tolist())]
        ties = [sum(tie for _, _, tie in p) for p in passes]
        wide = [any(joint for _, joint, _ in p) for p in passes]   # top_p's run counted beside top_k's bin
        assert not all(wide), "no row took the selection of both from one first pass"
        assert max(ties) <= 2 and max(n - t for n, t in zip(reads, ties)) <= 3, (reads, ties)
        assert any(len(p) == 2 and s for p, s in zip(passes, summed[0].tolist())), "no row summed at its 2nd pass"
        assert any(len(p) == 3 and not w for p, w in zip(passes, wide)), "no row counted top_p's open bins"
        assert any(p[0][0] == 0 for p in passes), "no row's candidates fit one pass of single keys"
        assert any(not s for s in summed[0].tolist()), "no row left its sums to the finish"
        assert any(wide), "no row's top_p run was too wide for one pass of single keys"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_cut_where_neighbouring_values_share_an_exponent(backend):
    """bf16 values near 0, a step apart, can round to one fp32 exponent d (the selection counts
    bf16 keys: kernels/select.py). A cut at a bin's lowest key, with no value there, must not keep
    the values below it that share its d: top_k 2 keeps the largest and 1.65e-4, not the 300 at
    1.34e-4 (23 fp32 steps lower in d); with top_p over what top_k 64 keeps, the first pass's bins
    decide it at such an edge. The oracle's log-probs, entropy and gradient (one rounding to the
    logits' dtype); the same values as fp16 and fp32 logits too (fp32 logits of bf16 values are
    counted over bf16 keys as well)."""
    rows = []
    x = torch.full((512,), -20.0)
    x[0], x[1], x[2:302] = 12.0, 1.6498565673828125e-4, 1.3446807861328125e-4
    rows.append((x, dict(top_k=2)))
    x = torch.full((64,), -20.0)
    x[0], x[1], x[2:42] = 5.0, 4.124641418457031e-05, 3.361701965332031e-05
    rows.append((x, dict(top_k=64, top_p=0.786176)))   # between cumulative shares 0.7835 and 0.789
    for x, filters in rows:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):   # the bf16 values, exact in fp16 too
            xb = x.to(torch.bfloat16).to(dtype).reshape(1, 1, -1)
            assert torch.equal(xb.float(), x.to(torch.bfloat16).float().reshape(1, 1, -1))
            ids = xb.float().argmax(-1)
            one = torch.ones(1, 1)
            _assert_unambiguous(xb.double(), **filters)
            with mhpo_kernels.use_backend(backend):
                logp, ent, grad = _run(mhpo_kernels.token_logprobs, xb, ids, one, **filters)
            want_logp, want_ent, want_grad = _run(reference.token_logprobs, xb.double(), ids, one.double(), **filters)
            _close(logp, want_logp)
            _close(ent, want_ent)
            assert torch.equal(grad != 0, want_grad != 0)   # the kept set
            # the gradient is stored in the logits' dtype: within an ulp of 1 in bf16 (2⁻⁸ held) and fp16
            _close(grad, want_grad, rtol={torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}.get(dtype, FP32_RTOL))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_with_a_row_shorter_than_a_block(backend):
    """With a softcap a −inf logit has a finite exponent, so the lanes past a row's end (loaded as
    −inf) must not be counted as logits: top_k beyond V keeps all 100, and top_p 0.99 among them
    (the fused linear path, bf16, softcap 2)."""
    g = torch.Generator().manual_seed(1)
    V, cap = 100, 2.0
    logits = (torch.randn(V, generator=g) * 2).to(torch.bfloat16)
    h = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    h[..., 0] = 1
    w = torch.zeros(V, 8, dtype=torch.bfloat16)
    w[:, 0] = logits
    ids = logits.float().argmax().reshape(1, 1)
    z = cap * torch.tanh(logits.double() / cap).reshape(1, 1, V)
    for filters in (dict(top_k=V + 5), dict(top_k=V + 5, top_p=0.99)):
        _fused_softcap_as_the_oracle(backend, h, w, ids, cap, z, filters)


def _fused_softcap_as_the_oracle(backend, h, w, ids, cap, z, filters):
    """The fused linear path's log-probs and entropy under a softcap ``cap`` and ``filters`` are
    the oracle's on the capped logits z (B, T, V) in float64, whose kept set is unambiguous."""
    _assert_unambiguous(z.reshape(-1, z.shape[-1]), **filters)
    with mhpo_kernels.use_backend(backend):
        logp, ent = mhpo_kernels.fused_linear_token_logprobs(h, w, ids, final_logit_softcap=cap,
                                                             return_entropy=True, **filters)
    want_logp, want_ent = reference.token_logprobs(z, ids, return_entropy=True, **filters)
    _close(logp, want_logp)
    _close(ent, want_ent)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_softcap_counts_an_overflowed_logit(backend, dtype):
    """Under a softcap a +inf logit (hidden @ weight past the logits' dtype's largest) is the finite
    logit cap/τ (SPEC.md, section 5, rule 3), a candidate like any other: top_k 1 keeps it alone,
    top_k 2 and 3 the next ones too, with top_p among them. Over 16-bit keys its key lies above
    every finite one (kernels/select.py, ``_first_key``): once left out of top_k's count, it made
    top_k keep one token more."""
    cap, values = 30.0, [math.inf, 20.0, 10.0, 5.0, 0.0, -3.0, 1.0, 2.0]
    V = len(values)
    h = torch.ones(1, 1, 2, dtype=dtype)
    w = torch.zeros(V, 2, dtype=dtype)
    w[:, 0] = torch.tensor(values, dtype=dtype).nan_to_num(posinf=0.0)
    w[0] = torch.finfo(dtype).max                     # max + max: +inf in the dtype
    logits = (h.reshape(1, 2) @ w.T).reshape(1, 1, V)
    assert logits[0, 0, 0] == math.inf
    z = cap * torch.tanh(logits.double() / cap)
    for filters in (dict(top_k=1), dict(top_k=2), dict(top_k=3), dict(top_k=2, top_p=0.9)):
        for target in (0, 1):
            _fused_softcap_as_the_oracle(backend, h, w, torch.tensor([[target]]), cap, z, filters)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plus_and_minus_zero_are_one_value(backend, dtype):
    """Rows whose largest logits are +0 and −0 (a base of +0): the two are one value to every
    filter, kept together (SPEC.md, section 9), as d ≥ threshold keeps them. The selection's
    exponents are never −0, whose key would lie below +0's, outside the count of the kept tokens'
    mass: with top_k 1 the log-prob of each of 4 zeros (2 of each sign) was −ln 2, not −ln 4. The
    other logits are no bf16 values in fp32 (counted over keys of d)."""
    g = torch.Generator().manual_seed(23)
    x = (torch.rand(4, 64, generator=g) * -4 - 1).to(dtype)
    x[:, :2], x[:, 2:4] = 0.0, -0.0
    x[1:3, 4], x[1:3, 5] = 0.0, -0.0                 # 6 zeros
    if dtype == torch.float32:
        assert (x[:, 6:].view(torch.int32) & 0xFFFF != 0).any(-1).all()
    ids = torch.tensor([[3, 0, 5, 2]])
    filters = dict(top_k=torch.tensor([[1, 2, 1, 1]]), top_p=torch.tensor([[1.0, 1.0, 0.2, 0.5]]))
    with mhpo_kernels.use_backend(backend):
        logp, ent = mhpo_kernels.token_logprobs(x.reshape(1, 4, 64), ids, return_entropy=True, **filters)
    want_logp, want_ent = reference.token_logprobs(x.double().reshape(1, 4, 64), ids, return_entropy=True,
                                                   **filters)
    assert torch.allclose(want_logp, -torch.tensor([[4.0, 6.0, 6.0, 4.0]]).log().double())
    _close(logp, want_logp)
    _close(ent, want_ent)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_exponent_that_underflows_to_minus_zero(backend):
    """A row whose largest logit is 0 (a base of +0) and two of −1.4e-45 (fp32's smallest) at
    temperature 4: their exponents k·u − b underflow to −0, one value with the largest's +0 (SPEC.md,
    section 9: values whose exponents round to one fp32 value are one value), so top_k 1 keeps all
    three. Their keys are +0's: as −0's, just below, the selection's sums left them out while
    d ≥ threshold kept them (a log-prob of 0 for each of the three)."""
    x = torch.full((1, 1, 40), -3.0)
    x[0, 0, 0], x[0, 0, 1:3] = 0.0, -1.4e-45
    x[0, 0, 3] = -3.0 - 2.0 ** -20                   # no bf16 value: the row is counted over keys of d
    k = torch.tensor(1 / (4.0 * math.log(2)), dtype=torch.float32)
    assert (x[0, 0, 1] * k).item() == 0.0 and math.copysign(1.0, (x[0, 0, 1] * k).item()) == -1.0
    for target in (0, 2):
        with mhpo_kernels.use_backend(backend):
            logp, ent = mhpo_kernels.token_logprobs(x, torch.tensor([[target]]), return_entropy=True,
                                                    temperature=4.0, top_k=1, min_p=1e-3)
        assert abs(logp.item() + math.log(3)) <= FP32_RTOL and abs(ent.item() - math.log(3)) <= FP32_RTOL, \
            (target, logp, ent)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_rows_of_bf16_values_and_one_that_is_not(backend, monkeypatch):
    """fp32 logits whose values are all bf16 values are counted over bf16 keys (the statistics
    pass tests each row); one logit that is not sends its row to keys of d. Two rows of bf16
    values with top_k 5, the 5th largest tied with the 6th: both kept. The same row with the 5th
    moved up by 8 fp32 ulps, no longer a bf16 value and above its partner: over bf16 keys the two
    would share a key and stay tied, over keys of d the partner is dropped, as the sort drops it.
    On the Triton path the first two rows take bf16's two passes, the third the three over keys
    of d."""
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(1, 512, generator=g) * 2).to(torch.bfloat16).float().repeat(3, 1)
    ranked = x[0].argsort(descending=True)
    fifth, sixth = ranked[4], ranked[5]
    x[:, sixth] = x[:, fifth]
    x[2, fifth] = x[2, fifth] * (1 + 2.0 ** -20)                      # 8 ulps up: no bf16 value
    assert (x[:2].view(torch.int32) & 0xFFFF == 0).all() and (x[2, fifth].view(torch.int32) & 0xFFFF) != 0
    ids = torch.stack([sixth, fifth, sixth]).reshape(1, 3)
    top_k = torch.full((1, 3), 5)
    want = reference.kept_set(x.double(), top_k=top_k.reshape(3))
    assert want.sum(-1).tolist() == [6, 6, 5]
    from mhpo_kernels.kernels import select

    count_pass, passes = select._count_pass, {}

    def count_spy(*args):   # by the row's address: the bins' width in keys (log2)
        passes.setdefault(int(args[0].handle.data.ravel()[0]), []).append(int(args[9]))
        return count_pass(*args)

    monkeypatch.setattr(select, "_count_pass", count_spy)
    with mhpo_kernels.use_backend(backend):
        logp, ent = mhpo_kernels.token_logprobs(x.reshape(1, 3, 512), ids, return_entropy=True, top_k=top_k)
    want_logp, want_ent = reference.token_logprobs(x.double().reshape(1, 3, 512), ids, return_entropy=True,
                                                   top_k=top_k)
    assert logp[0, 2].item() == -math.inf
    _close(logp, want_logp)
    _close(ent, want_ent)
    if backend == "triton":   # bf16 keys: bins of at most 32, then single keys; keys of d: 11 + 11 + 10 bits
        rows = [passes[a] for a in sorted(passes)]
        assert [len(p) for p in rows] == [2, 2, 3] and max(rows[0] + rows[1]) <= 5 < rows[2][0], rows


@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_the_statistics_launch_tests_every_logit_for_bf16_values(layout, monkeypatch):
    """The statistics launch of a selection over fp32 logits (LOW16) stores, for each row, the OR
    of its logits' low 16 bits, which the selection reads as its test of bf16 values: rows of
    4 segments (V 301, blocks of 64), each with one logit that is not a bf16 value placed at the
    row's first or last element (the masked lanes), inside a middle segment, with bit 15 set in a
    negative value, in a NaN's payload, in a denormal; a row of bf16 values with ±inf, NaN and
    ±0 (0), one of −inf only (0), an invalid row (0, not read); rows read in place from a longer
    buffer too."""
    import numpy as np

    from mhpo_kernels import _config
    from mhpo_kernels.kernels import forward

    V = 301
    g = torch.Generator().manual_seed(3)

    def bf16_row(*bits_at):
        row = (torch.randn(V, generator=g) * 3).to(torch.bfloat16).float()
        for i, bits in bits_at:
            row.view(torch.int32)[i] = int(np.uint32(bits).view(np.int32))
        return row

    special = bf16_row()
    special[3], special[50], special[100], special[7], special[8] = -math.inf, math.inf, math.nan, -0.0, 0.0
    rows = [special, bf16_row((V - 1, 0x3F800001)), bf16_row((0, 0x3F800001)), bf16_row((150, 0xBF808000)),
            bf16_row((200, 0x7FC00001)), bf16_row((270, 0x80000001)), bf16_row((64, 0x0000FFFF)),
            bf16_row((10, 0xC0000100), (290, 0x40000003)), bf16_row(), torch.full((V,), -math.inf),
            bf16_row((5, 0x3F800001))]
    x = torch.stack(rows)
    ids = torch.randint(0, V, (1, len(rows)), generator=g)
    ids[0, -1] = -100
    want = [float(np.bitwise_or.reduce(r.view(torch.int32).numpy() & 0xFFFF)) for r in rows[:-1]] + [0.0]
    assert want[:2] == [0.0, 1.0] and want[3] == 32768.0 and want[6] == 65535.0 and want[8:] == [0.0, 0.0, 0.0]
    if layout == "sliced":   # (1, n + 1, V)[:, :-1]
        logits = torch.cat([x, torch.full((1, V), 1.2345)]).unsqueeze(0)[:, :-1]
    else:
        logits = x.unsqueeze(0)
    select_cuts, seen = forward.select_cuts, {}

    def spy(logits, target, part, n_segs, seg_len, lmap, cut, *args):
        seen["test"], seen["n_segs"] = cut.clone(), n_segs
        return select_cuts(logits, target, part, n_segs, seg_len, lmap, cut, *args)

    monkeypatch.setattr(forward, "select_cuts", spy)
    with mhpo_kernels.use_backend("triton"), _config.overridden(block_v=64, min_split_blocks=1):
        mhpo_kernels.token_logprobs(logits, ids, top_k=5)
    assert seen["n_segs"] == 4 and seen["test"].tolist() == want


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_values_sharing_an_exponent_are_kept_together(dtype, backend):
    """Two logits whose exponents d round to one fp32 value are one value to the threshold (SPEC.md,
    section 9): with top_k 2, the second largest tied twice, the 300 logits 40 bf16 steps below it,
    near 0, share its d and are kept with it. Over bf16 keys they lie below the bin the selection
    counts by single keys (at most 32), and are counted in one more pass (kernels/select.py,
    ``_settle``); over keys of d (fp32 logits, one of them no bf16 value) they are its key. As
    fp16 logits, 7 fp16 steps below, across +0 (an edge of the first pass's bins of 32 keys).
    Log-probs and entropy against that set's in float64, from the exponents formed as the kernels
    form them (d = u·k − b, one rounding), on both paths."""
    import numpy as np

    def below(v, steps):   # the bf16 value `steps` representable values below v > 0
        bits = torch.tensor([v], dtype=torch.bfloat16).view(torch.int16) - steps
        return float(bits.view(torch.bfloat16))

    top = float(torch.tensor(1e-6).to(torch.bfloat16))
    group = below(top, 40)
    if dtype == "float16":   # fp16's smallest steps, 2 above +0 and 5 below
        top, group = 2 * 2.0 ** -24, -5 * 2.0 ** -24
    x = torch.full((512,), -20.0)
    x[0], x[1:3], x[3:303] = 12.0, top, group
    if dtype == "float32":   # a logit that is no bf16 value: the row is counted over keys of d
        x[-1] = -20.0 - 2.0 ** -18
    k = np.float32(1 / math.log(2))
    b = np.float32(np.float64(k) * 12.0)
    d = (x.double().numpy() * np.float64(k) - np.float64(b)).astype(np.float32).astype(np.float64)
    assert d[1] == d[3] and reference.kept_set(x.double().reshape(1, -1), top_k=2).sum() == 3   # distinct values
    kept = d >= d[1]
    p = np.exp2(d[kept] - d[kept].max())
    p /= p.sum()
    want_logp = (d[0] - np.log2(np.exp2(d[kept]).sum())) * math.log(2)
    want_ent = -(p * np.log(p)).sum()
    xb = x.to(getattr(torch, dtype)).reshape(1, 1, -1)
    with mhpo_kernels.use_backend(backend):
        logp, ent = mhpo_kernels.token_logprobs(xb, torch.zeros(1, 1, dtype=torch.long), return_entropy=True,
                                                top_k=2)
    assert kept.sum() == 303
    assert abs(logp.item() - want_logp) <= FP32_RTOL and abs(ent.item() - want_ent) <= FP32_RTOL, \
        (logp.item(), want_logp, ent.item(), want_ent)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("seed", [1003, 1050])
def test_rows_of_values_near_zero_keep_the_set_of_their_exponents(seed, dtype, backend):
    """Rows of bf16 (fp16) logits, many of them within 10⁻²·⁵ of 0 (so that neighbouring values share an
    exponent d), a few spread, one largest, at random temperatures, with random top_k, top_p and
    min_p per row: the kept set and log-prob are those of the set of d (ties in d kept together,
    as the kernels form d), on every row whose set stays put when top_p or min_p moves by 1e-4.
    The seeds hold rows that went wrong three ways (kernels/select.py): a last pass that kept no key
    of its range, the cut on the key above, which shares its d with the one below (``_settle``);
    sums that took such a tie group before the cut moved above it; and top_k's tie group below
    the bin it counts by single keys, left out of top_p's goal. On both paths: the PyTorch path
    formed d as (u − m)·k + offset, whose u − m rounds far below the max, and kept other sets."""
    import numpy as np

    rng = np.random.default_rng(seed)
    R, V = 12, 512
    x = np.full((R, V), -20.0)
    for r in range(R):
        top = rng.uniform(1, 12)
        n0 = rng.integers(10, 400)
        small = 10 ** rng.uniform(-9, -2.5, n0) * rng.choice([-1, 1], n0)
        small[rng.random(n0) < 0.1] = 0.0
        _fill_row(rng, x[r], small, top, 100, (0.5, 3))
        rng.shuffle(x[r])
    tau = np.where(rng.random(R) < 0.5, 1.0, rng.uniform(0.3, 12, R))
    top_k = np.where(rng.random(R) < 0.2, V + 5, rng.integers(1, V, R))
    top_p = rng.uniform(0.05, 0.999, R)
    top_p[rng.random(R) < 0.15] = float(np.float32(1 - 2 ** -24))
    min_p = np.where(rng.random(R) < 0.3, 10 ** rng.uniform(-6, -1, R), 0.0)
    _keep_the_set_of_exponents(x, dtype, tau, top_k, top_p, min_p, backend=backend)


def test_fp16_rows_of_ties_keep_the_set_of_their_exponents():
    """fp16 rows whose values near 0 share exponents d with their neighbours, drawn four ways
    (uniform within a small share of the largest, magnitudes spread over five decades, fp16's
    subnormals and zeros, positive ones only), with ±0, some −inf, random temperatures, filters
    and targets (``_keep_the_set_of_exponents``). Row 9 cuts at the lowest key of a first-pass bin,
    which holds no value and ties in d with the keys below it (``_settle``'s bin-edge count):
    without that count it kept 60 tokens where the set of d has 59."""
    import numpy as np

    rng = np.random.default_rng(0)
    R, V = 16, 512
    x = np.full((R, V), -30.0)
    for r in range(R):
        top = rng.uniform(0.5, 16)
        n0 = rng.integers(50, V - 40)
        lim = top * 2.0 ** rng.uniform(-20, -8)
        way = rng.integers(4)
        if way == 0:
            small = rng.uniform(-lim, lim, n0)
        elif way == 1:
            small = 10 ** rng.uniform(np.log10(lim) - 5, np.log10(lim), n0) * rng.choice([-1, 1], n0)
        elif way == 2:
            small = rng.integers(-40, 41, n0) * 2.0 ** -24
        else:
            small = rng.uniform(0, lim, n0)
        small[rng.random(n0) < 0.05] = 0.0
        small[rng.random(n0) < 0.05] = -0.0
        _fill_row(rng, x[r], small, top, 30, (0.1, 2))
        if rng.random() < 0.2:
            x[r, rng.integers(V, size=rng.integers(1, 20))] = -np.inf
        rng.shuffle(x[r])
    tau = np.where(rng.random(R) < 0.3, 1.0, 10 ** rng.uniform(-0.5, 1.5, R))
    top_k = np.where(rng.random(R) < 0.3, 0, rng.integers(1, V, R))
    top_p = np.where(rng.random(R) < 0.2, 1.0, rng.uniform(0.05, 0.9999, R))
    min_p = np.where(rng.random(R) < 0.6, 0.0, 10 ** rng.uniform(-6, -0.3, R))
    ids = None
    if rng.random() < 0.5:
        ids = rng.integers(0, V, R)
    _keep_the_set_of_exponents(x, torch.float16, tau, top_k, top_p, min_p, ids)


def _fill_row(rng, row, small, top, mid, spread):
    """``row`` from its start: the values ``small``, fewer than ``mid`` Gaussian ones of a spread
    drawn from ``spread``, the largest ``top``, and up to 3 within 1 below it."""
    n0 = len(small)
    row[:n0] = small
    nm = rng.integers(0, mid)
    row[n0:n0 + nm] = rng.standard_normal(nm) * rng.uniform(*spread)
    row[n0 + nm] = top
    nt = rng.integers(0, 4)
    row[n0 + nm + 1:n0 + nm + 1 + nt] = top - rng.uniform(0, 1, nt)


def _keep_the_set_of_exponents(x, dtype, tau, top_k, top_p, min_p, ids=None, backend="triton"):
    """Rows x (R, V) rounded to ``dtype`` with per row τ and filters (NumPy): on every row whose set
    stays put when top_p or min_p moves by 1e-4, the ``backend`` path keeps the set of d ≥ its
    threshold, ties in d together, with d formed as the kernels form it (d = u·k − b, one
    rounding, k and b in fp32), and gives its log-prob at the target (the largest, or ``ids``)."""
    import numpy as np

    R, V = x.shape
    x = torch.from_numpy(x).float().to(dtype).float()
    tau, top_k = torch.from_numpy(tau).float(), torch.from_numpy(top_k).int()
    top_p, min_p = torch.from_numpy(top_p).float(), torch.from_numpy(min_p).float()
    d = np.empty((R, V))
    for r in range(R):
        k = np.float32(np.float32(1 / math.log(2)) / np.float32(tau[r]))
        b = np.float32(x[r].numpy().max() * k)
        d[r] = (x[r].double().numpy() * np.float64(k) - np.float64(b)).astype(np.float32)

    def kept_by_d(top_p, min_p):
        floor = torch.where(min_p > 0, min_p.double().clamp(min=1e-300).log2(), -math.inf).unsqueeze(-1)
        candidate = torch.from_numpy(d) >= floor
        z = torch.where(candidate, torch.from_numpy(d) * math.log(2), -math.inf)
        return reference.kept_set(z, top_k=top_k, top_p=top_p.double()) & candidate

    want = kept_by_d(top_p, min_p)
    clear = torch.ones(R, dtype=torch.bool)
    for m in (1 - 1e-4, 1 + 1e-4):
        clear &= (kept_by_d((top_p * m).clamp(max=1.0), min_p) == want).all(-1)
        clear &= (kept_by_d(top_p, min_p * m) == want).all(-1)
    assert clear.sum() >= R // 2
    ids = x.argmax(-1) if ids is None else torch.from_numpy(ids)
    leaf = x.reshape(1, R, V).to(dtype).requires_grad_()
    with mhpo_kernels.use_backend(backend):
        logp = mhpo_kernels.token_logprobs(leaf, ids.reshape(1, R), top_k=top_k.reshape(1, R),
                                           top_p=top_p.reshape(1, R), min_p=min_p.reshape(1, R),
                                           temperature=tau.reshape(1, R))
    logp[logp.isfinite()].sum().backward()
    got = leaf.grad.reshape(R, V) != 0
    for r in clear.nonzero().flatten().tolist():
        kept = want[r].numpy()
        scale = np.log2(np.exp2(d[r][kept]).sum())
        # a token's gradient is its share 2^(d − scale) in the logits' dtype, which may round to 0
        # below 2^-100 in bf16 and 2^-23 in fp16 (twice its smallest subnormal)
        seen = torch.from_numpy(d[r] - scale > (-23 if dtype == torch.float16 else -100))
        got[r, ids[r]] = bool(kept[ids[r]])
        want_logp = (d[r, ids[r]] - scale) * math.log(2) if kept[ids[r]] else -math.inf
        if kept[ids[r]]:
            assert torch.equal(got[r][seen], want[r][seen]), (r, int(got[r].sum()), int(want[r].sum()))
        assert logp[0, r].item() == want_logp or \
            abs(logp[0, r].item() - want_logp) <= FP32_RTOL * max(1.0, abs(want_logp)), (r, logp[0, r], want_logp)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_bin_above_a_kept_bin_is_kept(dtype):
    """A bin's bounds can leave it undecided while a bin below it is surely kept (its own other
    tokens counted above its lowest: loose for bins of several keys far apart in d); every token
    above a kept one is kept, so it is too, and the selection goes on below neither (top_p 0.9834
    keeps the six largest: the oracle's log-prob and entropy)."""
    x = torch.full((1, 1, 256), -30.0)
    x[0, 0, :6] = torch.tensor([8.0, 7.40625, 6.5, 6.46875, 6.4375, 6.40625])
    x[0, 0, 6:13] = 2.203125
    x[0, 0, -1] = -30.0 - 2.0 ** -18   # no bf16 value: as fp32 logits, counted over keys of d
    ids = torch.zeros(1, 1, dtype=torch.long)
    _assert_unambiguous(x.double().reshape(1, -1), top_p=0.9834029078483582)
    with mhpo_kernels.use_backend("triton"):
        logp, ent = mhpo_kernels.token_logprobs(x.to(getattr(torch, dtype)), ids, return_entropy=True,
                                                top_k=256, top_p=0.9834029078483582)
    want_logp, want_ent = reference.token_logprobs(x.double(), ids, return_entropy=True, top_k=256,
                                                   top_p=0.9834029078483582)
    assert reference.kept_set(x.double().reshape(1, -1), top_p=0.9834029078483582).sum() == 6
    _close(logp, want_logp)
    _close(ent, want_ent)


def _random_rows(R, V, seed, gap=2e-3, kinds=("p", "k", "mp", "mkp"), rounded=None, k_above=0):
    """R fp32 rows of V logits of five kinds by turn (Gaussian of a random spread; 2 to 8 largest
    tied; the largest few within 10⁻³; a grid of 1/8; bf16 values with a few large ones), each
    rounded to the 16-bit dtype ``rounded`` if given, and per row filters whose cutoffs lie far from fp32's reach,
    chosen on the float64 values by turn: top_p; top_k; min_p and top_p; all three (or
    ``kinds``). min_p's log sits halfway between two distinct values at least 10⁻³ apart, top_k is
    any count of what min_p kept, and top_p lies halfway between two tie groups' cumulative
    shares at least ``gap`` apart (a filter without such values is left off); top_k above
    ``k_above`` where min_p keeps more. (rows, min_p, top_k, top_p)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = np.empty((R, V), np.float32)
    for r in range(R):
        x = rng.standard_normal(V) * rng.choice([0.5, 1.0, 2.0, 4.0])
        if r % 5 == 1:
            x[:rng.integers(2, 9)] = x.max() + rng.uniform(0, 5)
        elif r % 5 == 2:
            top = rng.integers(2, 8)
            x[:top] = x.max() + 1 + rng.uniform(0, 1e-3, top)
        elif r % 5 == 3:
            x = np.round(x * 8) / 8
        elif r % 5 == 4:
            x[:rng.integers(0, 6)] += rng.uniform(3, 8)
            x = (x.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
        rows[r] = rng.permutation(x.astype(np.float32))
    if rounded is not None:
        rows = torch.from_numpy(rows).to(rounded).float().numpy()
    z = torch.from_numpy(rows).double()
    min_p, top_k, top_p = torch.zeros(R, dtype=torch.float64), torch.zeros(R, dtype=torch.int64), torch.ones(R)
    for r in range(R):
        on = kinds[r % len(kinds)]
        if "m" in on:
            values = z[r].unique().flip(0)
            between = ((values[:-1] - values[1:]) > 1e-3).nonzero().flatten()
            if len(between):
                i = between[rng.integers(0, len(between))]
                min_p[r] = math.exp((values[i] + values[i + 1]) / 2 - values[0])
        if "k" in on:
            n = int(reference.kept_set(z[r:r + 1], min_p=min_p[r:r + 1])[0].sum())
            top_k[r] = int(rng.integers(min(k_above, n - 1) + 1, n + 1))
        if "p" in on:
            keep = reference.kept_set(z[r:r + 1], min_p=min_p[r:r + 1], top_k=top_k[r:r + 1])[0]
            values, counts = z[r][keep].unique(return_counts=True)
            mass = (counts * (values - values.max()).exp()).flip(0)
            share = mass.cumsum(0) / mass.sum()
            wide = (mass / mass.sum() > gap).nonzero().flatten()
            if len(wide):
                i = wide[rng.integers(0, len(wide))]
                top_p[r] = ((share[i - 1] if i > 0 else 0.0) + share[i]) / 2
    return torch.from_numpy(rows), min_p.float(), top_k, top_p.float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V, dtype", [(256, "float32"), (512, "float32"), (256, "bfloat16"), (512, "bfloat16"),
                                      (512, "float16")])
def test_random_rows_keep_the_sorts_set(backend, V, dtype):
    """On 40 random rows of ties, near-ties and spreads (``_random_rows``: each of its 5 kinds of
    row with each of its 4 sets of filters twice), per-token filters keep the float64 sort's set,
    ties together: each kept token but the target (the largest) has a non-zero gradient, every
    other token a zero one, and the log-probs and entropy are the oracle's. bf16 and fp16 logits
    take the selection over their own keys (kernels/select.py)."""
    R = 40
    x, min_p, top_k, top_p = _random_rows(R, V, seed=V + 1, rounded=None if dtype == "float32" else getattr(torch, dtype))
    filters = dict(min_p=min_p.reshape(1, -1), top_k=top_k.reshape(1, -1), top_p=top_p.reshape(1, -1))
    x = x.reshape(1, R, V).to(getattr(torch, dtype))
    ids = x.argmax(-1)
    want = reference.kept_set(x.double().reshape(R, V), min_p=min_p, top_k=top_k, top_p=top_p)
    assert want.sum(-1).min() >= 1 and (want.sum(-1) < V).all()
    leaf = x.clone().requires_grad_()
    with mhpo_kernels.use_backend(backend):
        logp, ent = mhpo_kernels.token_logprobs(leaf, ids, return_entropy=True, **filters)
    logp.sum().backward()
    got = (leaf.grad.reshape(R, V) != 0)
    got.view(-1)[ids.flatten() + V * torch.arange(R)] = True
    for r in range(R):
        assert torch.equal(got[r], want[r]), (r, int(got[r].sum()), int(want[r].sum()))
    want_logp, want_ent = reference.token_logprobs(x.double(), ids, return_entropy=True, **filters)
    _close(logp.detach(), want_logp)
    _close(ent.detach(), want_ent)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters", [dict(top_p=0.995), dict(top_k=290, top_p=0.995), dict(top_k=299)])
def test_tokens_far_below_the_largest(backend, filters):
    """Rows whose smallest logits lie 50 and 60 nats below the largest (d < −64): top_p 0.995
    alone finds its threshold with them below its first, uniform pass (select.py) and drops them,
    as the oracle does (their mass is below 10⁻²¹ of the row's); after top_k 290 they are not
    candidates; top_k 299 alone (radix passes over every value) keeps all but the smallest."""
    x = _grid_logits(1, 4, 300, seed=24)
    x[..., :5] = x.amax(-1, keepdim=True) - 50.0
    x[..., 5] = x[..., 6:].amax(-1) - 60.0
    ids = torch.tensor([[0, 5, 10, 11]])
    _assert_unambiguous(x.double(), **filters)
    upstream = torch.ones(ids.shape)
    with mhpo_kernels.use_backend(backend):
        got = _run(mhpo_kernels.token_logprobs, x, ids, upstream, **filters)
    want = _run(reference.token_logprobs, x.double(), ids, upstream.double(), **filters)
    assert want[0][0, 0].isinf() == ("top_p" in filters) and want[0][0, 1].isinf()
    for a, b in zip(got, want):
        _close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters", FILTERS)
def test_target_outside_has_no_logprob_gradient(backend, filters):
    x = _grid_logits(1, 4, 200, seed=3)
    ids = x[0].argmin(-1).unsqueeze(0)              # every target outside the kept set
    with mhpo_kernels.use_backend(backend):
        xx = x.clone().requires_grad_()
        logp = mhpo_kernels.token_logprobs(xx, ids, **FILTERS[filters])
        assert torch.all(logp == -math.inf)
        logp.sum().backward()                          # −inf, differentiated anyway
    assert torch.equal(xx.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters", ["min_p", "all"])
def test_bf16_logits(backend, filters):
    x = _grid_logits(2, 2, 1000, seed=4, dtype=torch.bfloat16)   # the grid is exact in bf16
    ids = _ids_with_some_outside(x, seed=5)
    _assert_unambiguous(x.double(), **FILTERS[filters])
    upstream = torch.ones(ids.shape)
    with mhpo_kernels.use_backend(backend):
        logp, ent, grad = _run(mhpo_kernels.token_logprobs, x, ids, upstream, **FILTERS[filters])
    want_logp, want_ent, want_grad = _run(reference.token_logprobs, x.double(), ids, upstream.double(),
                                          **FILTERS[filters])
    _close(logp, want_logp)
    _close(ent, want_ent)
    # the gradient is stored in bf16: one rounding of each element (2⁻⁷ under the interpreter's truncation)
    assert torch.allclose(grad.double(), want_grad, rtol=2.0**-7, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_is_the_untruncated_call(backend):
    x = torch.randn(2, 3, 500, generator=torch.Generator().manual_seed(6))
    ids = torch.randint(0, 500, (2, 3), generator=torch.Generator().manual_seed(7))
    with mhpo_kernels.use_backend(backend):
        base = mhpo_kernels.token_logprobs(x, ids, return_entropy=True)
        for off in (dict(min_p=None), dict(min_p=0.0), dict(min_p=-1.0), dict(top_k=None), dict(top_k=0),
                    dict(top_k=-1), dict(top_p=None), dict(top_p=1.0), dict(top_p=1), dict(top_p=1.5)):
            got = mhpo_kernels.token_logprobs(x, ids, return_entropy=True, **off)
            assert all(torch.equal(a, b) for a, b in zip(base, got)), off
        # tensors whose every value is off: the selection runs on no row, the same values
        for off in (dict(min_p=torch.zeros(2, 3)), dict(top_k=torch.zeros(2, 3, dtype=torch.int64)),
                    dict(top_p=torch.ones(2, 3) * 1.5), dict(top_k=torch.full((2, 3), 500))):
            got = mhpo_kernels.token_logprobs(x, ids, return_entropy=True, **off)
            assert all(torch.allclose(a, b, rtol=FP32_RTOL, atol=0) for a, b in zip(base, got)), off
        # a 0-d tensor is one value for every token, as a number is
        for name, value in (("min_p", 0.2), ("top_k", 5), ("top_p", 0.5)):
            one = mhpo_kernels.token_logprobs(x, ids, return_entropy=True, **{name: value})
            got = mhpo_kernels.token_logprobs(x, ids, return_entropy=True, **{name: torch.tensor(value)})
            assert all(torch.equal(a, b) for a, b in zip(one, got)), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters", ["min_p", "all"])   # min_p's closed form; the selection launch
def test_non_finite_rows(backend, filters):
    x = _grid_logits(1, 5, 300, seed=8)
    ids = x.argmax(-1)          # inside the kept set of every finite row
    x[0, 1, 7] = float("nan")
    x[0, 2, 9] = float("inf")
    x[0, 3] = float("nan")      # an invalid token's row: never read
    ids[0, 3] = -100
    x[0, 4] = float("-inf")     # only −inf: NaN, as without truncation
    x[0, 0, :50] = float("-inf")  # −inf logits in a finite row: probability 0, outside every kept set
    kw = FILTERS[filters]
    with mhpo_kernels.use_backend(backend):
        xx = x.clone().requires_grad_()
        logp, ent = mhpo_kernels.token_logprobs(xx, ids, return_entropy=True, **kw)
        (logp + ent).sum().backward()
    assert logp[0, 3] == 0 and ent[0, 3] == 0 and torch.equal(xx.grad[0, 3], torch.zeros(300))
    assert torch.isfinite(xx.grad[0, 0]).all()
    want_logp, want_ent = reference.token_logprobs(x.double(), ids, return_entropy=True, **kw)
    assert torch.equal(logp.isnan(), want_logp.isnan()) and logp[0, [1, 2, 4]].isnan().all()
    assert torch.equal(ent.isnan(), want_ent.isnan()) and ent[0, [1, 2, 4]].isnan().all()
    assert xx.grad[0, 4].isnan().all()
    finite = ~want_logp.isnan()
    assert finite.sum() == 2
    _close(logp[finite], want_logp[finite])
    _close(ent[finite], want_ent[finite])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters", ["min_p", "all"])
def test_inplace_backward(backend, filters):
    x = _grid_logits(2, 3, 300, seed=9)
    ids = _ids_with_some_outside(x, seed=10)
    with mhpo_kernels.use_backend(backend):
        grads = []
        for inplace in (False, True):
            leaf = x.clone().requires_grad_()
            logits = leaf * 1.0
            logits.retain_grad()
            logp, ent = mhpo_kernels.token_logprobs(logits, ids, return_entropy=True, inplace_backward=inplace,
                                                    **FILTERS[filters])
            (torch.where(logp.isinf(), 0.0, logp).sum() + ent.sum()).backward()
            grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


BAD_VALUES = dict(
    min_p=((1.5, ValueError), (float("nan"), ValueError), (True, TypeError), ("0.1", TypeError),
           (torch.tensor([[0.1, 2.0, 0.1]]), ValueError), (torch.tensor([[float("nan"), 0.1, 0.1]]), ValueError),
           (torch.tensor([[1, 0, 0]]), TypeError), (torch.full((1, 2), 0.1), ValueError)),
    top_k=((2.0, TypeError), (True, TypeError), (torch.tensor([[1.0, 2.0, 3.0]]), TypeError),
           (torch.full((1, 2), 3), ValueError)),
    top_p=((0.0, ValueError), (-0.5, ValueError), (float("nan"), ValueError), (False, TypeError),
           (torch.tensor([[0.5, 0.0, 0.5]]), ValueError), (torch.tensor([[0.5, -1.0, 0.5]]), ValueError),
           (torch.tensor([[float("nan"), 0.5, 0.5]]), ValueError), (torch.tensor([[1, 1, 1]]), TypeError)),
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", BAD_VALUES)
def test_values_are_checked(backend, name):
    x = torch.randn(1, 3, 50)
    ids = torch.tensor([[1, 2, -100]])
    with mhpo_kernels.use_backend(backend):
        for bad, error in BAD_VALUES[name]:
            with pytest.raises(error, match=name):
                mhpo_kernels.token_logprobs(x, ids, **{name: bad})
        # an invalid token's value is never read
        garbage = torch.tensor([[3, 3, -(2**40)]]) if name == "top_k" else torch.tensor([[0.1, 0.1, float("nan")]])
        mhpo_kernels.token_logprobs(x, ids, **{name: garbage})


def _loss_inputs(seed, B=3, T=5, V=200):
    """Grid logits; targets among each row's three largest logits (inside the kept set), and on a
    few rows the smallest (outside); one old log-prob −inf at an inside target (the old policy's
    kept set left it out); NaN logits and old log-probs at the masked tokens."""
    g = torch.Generator().manual_seed(seed)
    x = _grid_logits(B, T, V, seed)
    top3 = x.topk(3, -1).indices
    ids = top3.gather(-1, torch.randint(0, 3, (B, T, 1), generator=g)).squeeze(-1)
    ids[0, ::2] = x[0, ::2].argmin(-1)
    ids[2, 3] = x[2, 3].argmin(-1)
    mask = torch.rand(B, T, generator=g) > 0.15
    old = -torch.rand(B, T, generator=g) * 3 - 0.05
    mask[1, 2], old[1, 2] = True, float("-inf")            # a target the old policy's kept set left out
    x[~mask], old[~mask] = float("nan"), float("nan")     # garbage at invalid tokens: never read
    return dict(x=x, ids=ids, old=old, adv=torch.randn(B, generator=g), mask=mask,
                ref=-torch.rand(B, T, generator=g) * 3 - 0.05)


def _loss_and_grad(fn, x, *args, **kw):
    x = x.clone().requires_grad_()
    loss, metrics = fn(x, *args, return_metrics=True, **kw)
    loss.backward()
    return loss.detach(), metrics, x.grad


def _same_loss(got, want):
    """``_loss_and_grad``'s (loss, metrics, gradient) against the reference's: the loss and the
    gradient to fp32, ``outside_support`` to its fp32 rounding."""
    (loss, metrics, grad), (want_loss, want_metrics, want_grad) = got, want
    assert loss.item() == pytest.approx(want_loss.item(), rel=FP32_RTOL, abs=FP32_RTOL)
    _close(grad, want_grad)
    assert metrics["outside_support"].item() == pytest.approx(want_metrics["outside_support"].item(), abs=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective, filters", [("mhpo", f) for f in FILTERS] + [("ppo-clip", "min_p"),
                                                                                  ("gspo", "top_p")])
def test_losses_leave_out_targets_outside_the_kept_set(backend, objective, filters):
    """Every aggregation mode (with all three filters; one mode for each alone), a reference KL
    term and an entropy bonus: the loss, its gradient and the metrics (outside_support among
    them) equal the float64 reference, in which a target outside the kept set, or one whose old
    log-prob is −inf, is an invalid token."""
    from mhpo_kernels.objectives import GSPO, MHPO, PPOClip

    chosen = {"mhpo": MHPO(), "ppo-clip": PPOClip(0.2, 0.28), "gspo": GSPO()}[objective]
    c = _loss_inputs(seed=11)
    _assert_unambiguous(torch.where(c["mask"].unsqueeze(-1), c["x"], 0.0).double(), **FILTERS[filters])
    modes = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
    for mode in modes if filters == "all" or objective != "mhpo" else modes[:1]:
        kw = dict(objective=chosen, loss_agg_mode=mode, ref_logprobs=c["ref"], beta=0.05, entropy_coef=0.01,
                  normalizer=4.0 if mode == "seq-mean-token-sum" else None, **FILTERS[filters])
        with mhpo_kernels.use_backend(backend):
            loss, metrics, grad = _loss_and_grad(mhpo_kernels.policy_loss, c["x"], c["ids"], c["old"], c["adv"],
                                                 c["mask"], **kw)
        kw["ref_logprobs"] = c["ref"].double()
        want, want_metrics, want_grad = _loss_and_grad(reference.policy_loss, c["x"].double(), c["ids"],
                                                       c["old"].double(), c["adv"].double(), c["mask"], **kw)
        assert 0 < want_metrics["outside_support"] < 0.5
        assert loss.item() == pytest.approx(want.item(), rel=FP32_RTOL, abs=FP32_RTOL)
        _close(grad, want_grad)
        assert "outside_support" in metrics and set(metrics) <= set(want_metrics), mode  # ψ, ζ: MHPO's only
        for name, value in metrics.items():
            assert value.item() == pytest.approx(want_metrics[name].item(), rel=FP32_RTOL, abs=FP32_RTOL), (mode, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_left_out_for_its_old_logprob_passes_no_gradient_whatever_its_row_holds(backend):
    """A token whose old log-prob is −inf leaves a truncated loss (SPEC.md, section 9), also where
    its row holds a NaN, which keeps the whole row (section 5): the loss is finite, and that
    row's gradient is 0 (written without reading the row), not 0 · NaN, as the reference's."""
    x = _grid_logits(1, 4, 300, seed=12)
    ids = x.argmax(-1)
    x[0, 1, 7] = float("nan")
    old = torch.tensor([[-1.0, -math.inf, -0.5, -2.0]])
    adv = torch.tensor([[1.0, -0.5, 0.7, 0.3]])
    kw = dict(min_p=0.1, entropy_coef=0.01, loss_agg_mode="token-mean")
    with mhpo_kernels.use_backend(backend):
        got = _loss_and_grad(mhpo_kernels.mhpo_loss, x, ids, old, adv, **kw)
    want = _loss_and_grad(reference.mhpo_loss, x.double(), ids, old.double(), adv.double(), **kw)
    assert math.isfinite(want[0].item()) and want[1]["outside_support"].item() == 0.25
    assert not got[2][0, 1].any() and not want[2][0, 1].any() and got[2][0, 0].any()
    _same_loss(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_per_token_filters_and_the_module(backend):
    """A packed stream with per-token values of each filter, through MHPOLoss.forward, equals the
    reference of the same stream. The first token's row is left whole and its target's logit is
    −inf: its log-prob −inf is data there (SPEC.md, section 5), the token stays in the loss."""
    c = _loss_inputs(seed=12)
    keep = c["mask"].reshape(-1)
    x, ids = c["x"].reshape(-1, c["x"].shape[-1])[keep], c["ids"].reshape(-1)[keep]
    old = c["old"].reshape(-1)[keep]
    lengths = c["mask"].sum(-1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    quarter = torch.arange(ids.numel()) % 4 == 0                        # a quarter of the tokens untruncated
    filters = dict(min_p=torch.where(quarter, 0.0, MIN_P), top_k=torch.where(quarter, 0, 9),
                   top_p=torch.where(quarter, 1.0, 0.8))
    _assert_unambiguous(x.double(), top_p=0.8, min_p=MIN_P, top_k=9)
    x = x.clone()
    x[0, ids[0]] = -math.inf
    module = mhpo_kernels.MHPOLoss(loss_agg_mode="token-mean")
    with mhpo_kernels.use_backend(backend):
        got = _loss_and_grad(module, x, ids, old, c["adv"], cu_seqlens=cu, **filters)
    _same_loss(got, _loss_and_grad(reference.mhpo_loss, x.double(), ids, old.double(), c["adv"].double(),
                                   cu_seqlens=cu, loss_agg_mode="token-mean", **filters))


@pytest.mark.parametrize("backend", BACKENDS)
def test_outside_support_is_reported_when_filters_are_off(backend):
    c = _loss_inputs(seed=15)
    for off in (dict(min_p=0.0), dict(top_k=-1), dict(top_p=1.0)):
        with mhpo_kernels.use_backend(backend):
            _, metrics = mhpo_kernels.mhpo_loss(c["x"], c["ids"], c["old"], c["adv"], c["mask"], return_metrics=True,
                                                **off)
        _, want = reference.mhpo_loss(c["x"].double(), c["ids"], c["old"].double(), c["adv"].double(), c["mask"],
                                      return_metrics=True, **off)
        assert metrics["outside_support"].item() == want["outside_support"].item() == 0.0, off


def test_truncated_loss_refusals():
    c = _loss_inputs(seed=13)
    args = (c["x"], c["ids"], c["old"], c["adv"], c["mask"])
    for filters in FILTERS.values():
        with pytest.raises(NotImplementedError, match="seq_valid_tokens"):
            mhpo_kernels.mhpo_loss(*args, seq_valid_tokens=torch.full((3,), 5), **filters)
        with pytest.raises(ValueError, match="grad_in_forward=True is not supported with min_p, top_k or top_p"):
            mhpo_kernels.mhpo_loss(c["x"].clone().requires_grad_(), *args[1:], grad_in_forward=True, **filters)
        with pytest.raises(NotImplementedError, match="seq_valid_tokens"):
            mhpo_kernels.fused_linear_mhpo_loss(torch.randn(3, 5, 8), torch.randn(200, 8), *args[1:],
                                                seq_valid_tokens=torch.full((3,), 5), **filters)
    with pytest.raises(ValueError, match="top_p must be > 0"):  # a bad value is named before the refusal
        mhpo_kernels.fused_linear_mhpo_loss(torch.randn(3, 5, 8), torch.randn(200, 8), *args[1:], top_p=0.0,
                                            seq_valid_tokens=torch.full((3,), 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_losses(backend):
    """From hidden states and the head (with a bias and a softcap), chunked: a truncated loss with
    a reference KL term and an entropy bonus, in every aggregation mode and with PPO-clip too
    (MHPO in one mode under the interpreter), NaN and inf at an invalid token: the loss, the
    metrics (outside_support among them) and the gradients of hidden, weight and bias equal the
    float64 reference of the logits they make; a NaN old log-prob at a valid token makes both
    NaN."""
    from mhpo_kernels.objectives import MHPO, PPOClip

    g = torch.Generator().manual_seed(16)
    B, T, H, V, softcap = 3, 4, 8, 120, 8.0
    hidden = torch.eye(H)[torch.randint(0, H, (B, T), generator=g)] * 2.0
    weight = torch.randint(-24, 24, (V, H), generator=g) / 16.0
    bias = torch.randint(-8, 8, (V,), generator=g) / 16.0
    z = softcap * torch.tanh((hidden @ weight.T + bias).double() / softcap)
    ids = z.topk(2, -1).indices[..., 1]
    ids[0, ::2] = z[0, ::2].argmin(-1)
    filters = dict(top_k=30, top_p=0.7)
    _assert_unambiguous(z, **filters)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 3] = False
    old = -torch.rand(B, T, generator=g) * 3 - 0.05
    old[1, 1] = float("-inf")                                   # the old policy's kept set left it out
    adv, ref = torch.randn(B, generator=g), -torch.rand(B, T, generator=g) * 3 - 0.05
    hidden[2, 3], old[2, 3], ref[2, 3] = float("nan"), float("nan"), float("inf")  # garbage, never read
    modes = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
    cases = [(MHPO(), m) for m in (modes if backend == "torch" else modes[:1])]
    cases += [(PPOClip(0.2, 0.28), modes[1])] if backend == "torch" else []

    def run(loss_fn, h, w, b, **kw):
        h, w, b = (t.clone().requires_grad_() for t in (h, w, b))
        loss, metrics = loss_fn(h, w, b, return_metrics=True, ref_logprobs=ref.to(h.dtype), beta=0.05,
                                entropy_coef=0.01, **filters, **kw)
        loss.backward()
        return loss.detach(), metrics, (h.grad, w.grad, b.grad)

    def fused(h, w, b, **kw):
        return mhpo_kernels.fused_linear_policy_loss(h, w, ids, old, adv, mask, bias=b, final_logit_softcap=softcap,
                                                     chunk_size=5, **kw)

    def eager(h, w, b, **kw):
        h = torch.where(mask.unsqueeze(-1), h, 0.0)  # an invalid token's state takes no part (SPEC.md, 4)
        logits = softcap * torch.tanh((h @ w.T + b) / softcap)
        return reference.policy_loss(logits, ids, old.double(), adv.double(), mask, **kw)

    for objective, mode in cases:
        with mhpo_kernels.use_backend(backend):
            loss, metrics, grads = run(fused, hidden, weight, bias, objective=objective, loss_agg_mode=mode)
        want, want_metrics, want_grads = run(eager, hidden.double(), weight.double(), bias.double(),
                                             objective=objective, loss_agg_mode=mode)
        assert 0 < want_metrics["outside_support"] < 0.5
        assert loss.item() == pytest.approx(want.item(), rel=FP32_RTOL, abs=FP32_RTOL), mode
        for a, b in zip(grads, want_grads):
            _close(a, b)
        assert "outside_support" in metrics and set(metrics) <= set(want_metrics)
        for name, value in metrics.items():
            assert value.item() == pytest.approx(want_metrics[name].item(), rel=FP32_RTOL, abs=FP32_RTOL), (mode, name)
    # A NaN old log-prob at a valid token is data: the loss and that token's gradient row are NaN
    # (SPEC.md, section 5), on both sides.
    old[0, 1] = float("nan")
    with mhpo_kernels.use_backend(backend):
        loss, _, (dh, _, _) = run(fused, hidden, weight, bias, objective=MHPO())
    want, _, (want_dh, _, _) = run(eager, hidden.double(), weight.double(), bias.double(), objective=MHPO())
    assert loss.isnan() and want.isnan() and dh[0, 1].isnan().all() and want_dh[0, 1].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 8.0])
@pytest.mark.parametrize("filters", ["min_p", "top_k-top_p"])
def test_fused_linear_token_logprobs(backend, softcap, filters):
    """From hidden states and the head, chunked: the log-probs, entropy and the gradients of
    hidden, weight and bias equal the float64 reference of the logits they make (no logit within
    1e-4 of its row's min_p cut, and top_p's set unambiguous, checked)."""
    g = torch.Generator().manual_seed(14)
    N, H, V = 7, 8, 120
    hidden = torch.eye(H)[torch.randint(0, H, (N,), generator=g)] * 2.0
    weight = torch.randint(-24, 24, (V, H), generator=g) / 16.0
    bias = torch.randint(-8, 8, (V,), generator=g) / 16.0
    ids = (hidden @ weight.T + bias).topk(2, -1).indices[:, 1]
    ids[::3] = (hidden @ weight.T + bias)[::3].argmin(-1)
    upstream = torch.linspace(-1.0, 1.0, N)
    kw = dict(min_p=math.exp(-1.03125)) if filters == "min_p" else dict(top_k=30, top_p=0.7)
    z = (hidden @ weight.T + bias).double()
    z = z if softcap is None else softcap * torch.tanh(z / softcap)
    if filters == "min_p":
        assert (z - (z.amax(-1, keepdim=True) + math.log(kw["min_p"]))).abs().min() > 1e-4
    _assert_unambiguous(z, **kw)

    def run(fn, h, w, b):
        return head_grads(fn, upstream, h, w, b)

    def fused(h, w, b):
        return mhpo_kernels.fused_linear_token_logprobs(h, w, ids, bias=b, final_logit_softcap=softcap,
                                                        return_entropy=True, chunk_size=3, **kw)

    def eager(h, w, b):
        z = h @ w.T + b
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return reference.token_logprobs(z, ids, return_entropy=True, **kw)

    with mhpo_kernels.use_backend(backend):
        got = run(fused, hidden, weight, bias)
    want = run(eager, hidden.double(), weight.double(), bias.double())
    assert got[0].isinf().any() and not got[0].isinf().all()
    for a, b in zip(got, want):
        _close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_smallest_kept_group_on_a_long_bf16_row(backend):
    """A bf16 row of V 151,936 (σ 3, a few large logits, τ 1.2, top_p 0.999): the selection once
    dropped the smallest kept tie group here, its bounds too loose from above alone (now also
    bounded from below by the range's exact mass). The smallest kept token has its log-prob, the
    largest dropped one −inf, as in the float64 oracle."""
    import numpy as np

    rng = np.random.default_rng(1)
    for _ in range(14):  # the 14th row of this generator is one such row
        sigma = rng.choice([0.5, 1, 2, 3, 4])
        z = rng.standard_normal(151936) * sigma
        head = rng.integers(0, 20)
        z[:head] += rng.uniform(3, 15, head)
        tau = rng.choice([0.6, 1.0, 1.2])
    assert (sigma, tau) == (3.0, 1.2)
    x = torch.from_numpy(z).to(torch.bfloat16).reshape(1, 1, -1)
    zz = x.double().flatten() / 1.2
    keep = reference.kept_set(zz.unsqueeze(0), top_p=0.999)[0]
    ids = torch.stack([torch.where(keep, zz, math.inf).argmin(), torch.where(keep, -math.inf, zz).argmax()])
    x2 = x.expand(1, 2, -1).contiguous()
    with mhpo_kernels.use_backend(backend):
        logp = mhpo_kernels.token_logprobs(x2, ids.reshape(1, 2), temperature=1.2, top_p=0.999)
    want = reference.token_logprobs(x2.double(), ids.reshape(1, 2), temperature=1.2, top_p=0.999)
    assert want[0, 0].isfinite() and want[0, 1] == -math.inf
    _close(logp, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", ["V", "V+5"])
def test_top_k_of_the_whole_row_leaves_minus_inf_logits_out(backend, top_k):
    """A top_k of V or more is on (SPEC.md, section 9: top_k > 0) and keeps every token whose logit
    is finite: a target at a −inf logit is outside the kept set, so it passes no log-prob
    gradient, leaves the loss's aggregation and counts in ``outside_support``, on the logits and
    the fused linear path alike, as in the float64 reference (the kernels took such a top_k as
    off: the loss was inf for GPG, the gradient a softmax row)."""
    from conftest import TRITON_DEVICE
    from mhpo_kernels.objectives import GPG

    V = 8
    k = V if top_k == "V" else V + 5
    x = torch.tensor([[[-math.inf, 1.0, 0.5, -0.5, 2.0, 0.0, -1.0, 0.25]] * 2])   # the first logit −inf
    ids, old, adv = torch.tensor([[0, 4]]), torch.tensor([[-1.0, -0.7]]), torch.tensor([1.0])
    want, metrics64 = reference.policy_loss(x.double(), ids, old.double(), adv.double(), objective=GPG(),
                                            return_metrics=True, top_k=k)
    x64 = x.double().requires_grad_()
    reference.token_logprobs(x64, ids, top_k=k)[0, 0].backward()
    assert metrics64["outside_support"] == 0.5 and not x64.grad.any()
    # The fused linear path: hidden one-hot, the LM head's bias holding the logits.
    h, w = torch.eye(1, 4).expand(2, 4).reshape(1, 2, 4), torch.zeros(V, 4)
    with mhpo_kernels.use_backend(backend):
        on = lambda t: t.to(TRITON_DEVICE)   # noqa: E731
        loss, metrics = mhpo_kernels.policy_loss(on(x), on(ids), on(old), on(adv), objective=GPG(),
                                                 return_metrics=True, top_k=k)
        fused, fused_metrics = mhpo_kernels.fused_linear_policy_loss(
            on(h), on(w), on(ids), on(old), on(adv), bias=on(x[0, 0]), objective=GPG(), return_metrics=True,
            top_k=k)
        logits = on(x).requires_grad_()
        mhpo_kernels.token_logprobs(logits, on(ids), top_k=k)[0, 0].backward()
    for got, got_metrics in ((loss, metrics), (fused, fused_metrics)):
        assert abs(got.item() - want.item()) <= FP32_RTOL * abs(want.item())
        assert got_metrics["outside_support"].item() == 0.5
    assert not logits.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("given", ["number", "float64-tensor", "compiled-number"])
def test_filter_values_fp32_would_round_stay_on(backend, given):
    """The kernels read the filters in fp32: a top_p or min_p of 1e-50 (0 in fp32) and a top_p of
    1 − 1e-9 (1 in fp32) are still on, as in the float64 reference: the target 200 below the
    largest logit is outside their kept set (top_p 1e-50 was refused as ≤ 0, the others off); so
    too under torch.compile, where a number is a graph input. A min_p above 1 by less than fp32
    holds is refused as a number is."""
    from conftest import TRITON_DEVICE

    x = torch.tensor([[[0.0, -1.0, -200.0, -2.0]]])
    ids = torch.tensor([[2]])
    as_tensor = given == "float64-tensor"

    def value(v):
        return torch.full((1, 1), v, dtype=torch.float64, device=TRITON_DEVICE) if as_tensor else v

    for filters in (dict(top_p=1e-50), dict(min_p=1e-50), dict(top_p=1 - 1e-9)):
        (name, v), = filters.items()
        want = reference.token_logprobs(x.double(), ids, **filters)

        def call(logits, ids, v):
            return mhpo_kernels.token_logprobs(logits, ids, **{name: v})

        if given == "compiled-number":
            torch._dynamo.reset()
            call = torch.compile(call, fullgraph=True, backend="aot_eager")
        with mhpo_kernels.use_backend(backend):
            got = call(x.to(TRITON_DEVICE), ids.to(TRITON_DEVICE), value(v))
        assert want.item() == got.item() == -math.inf, filters
    if given == "compiled-number":
        return   # the bound is an assert of the graph there (docs/compile.md)
    with mhpo_kernels.use_backend(backend), pytest.raises(ValueError, match="min_p must lie in \\[0, 1\\]"):
        mhpo_kernels.token_logprobs(x.to(TRITON_DEVICE), ids.to(TRITON_DEVICE), min_p=value(1 + 1e-12))
