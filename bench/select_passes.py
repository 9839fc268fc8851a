"""python -m bench.select_passes: how many times top-k's and top-p's forward reads a row.

The selection launch (mhpo_kernels/kernels/select.py) reads a row once per counting pass until
its bins decide the threshold; the forward reads it once before (the statistics) and once after
(the kept tokens' sums), unless the deciding pass had single-key bins and summed them itself.
How many reads that takes depends on the row, not on the hardware, so it is counted here by the
same algorithm in NumPy (2048 bins, top-p's first pass uniform in d, keys, bounds and goal as the
kernel has them; float64 sums where the kernel's are fp32), on rows of V = 151,936 Gaussian
logits of several spreads (peaked rows are the sampled LLM rows' kind; flat ones are the worst
case), and checked against the sorted kept set. A model of the kernel's passes, not a
measurement of it.

With ``--both``, top_k and top_p together, counted by the kernel itself instead: the selection
launch runs under Triton's interpreter on the same kinds of rows and each of its passes over the
row (counting, gathering top_k's candidates, or counting top_k's and top_p's runs side by side)
is counted as it starts (the passes are the row's, not the hardware's, so the interpreter's
count is the GPU's), with every row's log-probs checked against the float64 oracle's. ``--pairs``
counts other top_k:top_p pairs on the same rows (a top_k above 2048 with fp32 rows: both
selections side by side).

With ``--bf16`` (``--fp16``) as well, the rows are rounded to bf16 (fp16), whose selection runs
over the logits' own keys, and each filter alone is counted beside the pairs. With
``--bf16-in-fp32`` they are rounded to bf16 and passed as fp32 (``logits.float()`` of a bf16
head), whose selection runs over bf16 keys too, as the statistics pass finds every logit a bf16
value.

With ``--split RANKS`` as well, fp32 rows split into RANKS vocabulary slices (``tp_group``) over
gloo ranks on this machine, each slice's reads counted at the launches ``slice_select`` makes.

    python -m bench.select_passes [--rows N] [--both [--bf16 | --fp16 | --bf16-in-fp32 | --split RANKS]
                                  [--pairs K:P ...]]
"""

import argparse
import collections

import numpy as np

NB_BITS, NB, MAX_PASSES = 11, 2048, 3
UNIFORM_RANGE = 64.0
KEY_INF = 0xFF800000
V = 151936
F32 = np.float32


def key(d):
    """select._key: fp32 → uint32 in the same order."""
    b = np.asarray(d, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return np.where(b >> 31, b ^ 0xFFFFFFFF, b | 0x80000000)


def value(k):
    """select._value."""
    k = np.asarray(k, dtype=np.uint64)
    return np.where(k >> 31, k & 0x7FFFFFFF, k ^ 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def uniform_bin(d, lo, scale):
    """select._uniform_bin, in fp32."""
    with np.errstate(all="ignore"):
        t = (np.asarray(d, dtype=F32) - F32(lo)) * F32(scale)
    return np.minimum(np.maximum(t, F32(0)), F32(NB - 1)).astype(np.int64)


def bin_start(b, lo, scale):
    """select._bin_start: the smallest key whose value falls in uniform bin b or above."""
    a, z = int(key(lo)), KEY_INF + 1
    while a < z:
        m = (a + z) // 2
        if uniform_bin(value(m), lo, scale) >= b:
            z = m
        else:
            a = m + 1
    return a


def decide(cnt, w_lo, w_hi, above, s_hi, s_in, goal, shift, i, by_mass):
    """select._decide: (kept, ambiguous) bins."""
    multi, more = shift > 0, i < MAX_PASSES - 1
    above_lo = above + np.cumsum(w_lo[::-1])[::-1] - w_lo
    above_hi = above + np.cumsum(w_hi[::-1])[::-1] - w_hi
    if by_mass and multi and more:  # and from below: the range's exact mass less what the bins up to each hold
        above_lo = np.maximum(above_lo, s_hi + s_in - np.cumsum(w_hi))
        above_hi = np.minimum(above_hi, s_hi + s_in - np.cumsum(w_lo))
    others = w_hi - w_hi / np.maximum(cnt, 1.0) if multi else 0.0
    kept = (cnt > 0) & ((above_hi + others if more else 0.5 * (above_lo + above_hi)) < goal)
    return kept, (cnt > 0) & ~kept & (above_lo < goal) & more & multi


def threshold(d, base, goal, by_mass, floor=np.float32(-3.4028234663852886e38)):
    """(the smallest kept d, counting passes, the kept tokens' Σ 2^d if the last pass summed them
    (else None), the widest of its bins in d holding a token if it decided bins of several keys
    by the middle of their bounds, else None) of select._threshold on one row of exponents
    d = k·u − base (fp32)."""
    keys, mass = key(d), np.exp2(d.astype(np.float64))
    klo, khi, above, first = int(key(floor)), KEY_INF, 0.0, 0
    hi = F32(abs(float(base)) * 1.1920928955078125e-07 + 7.888609052210118e-31)
    if by_mass:  # pass 1, uniform in d
        lo = F32(max(float(floor), -UNIFORM_RANGE))
        scale = F32(NB / (float(hi) - float(lo)))
        inside = d >= lo
        cnt = np.bincount(uniform_bin(d[inside], lo, scale), minlength=NB).astype(np.float64)
        s_in = mass[inside].sum()
        goal = goal * s_in
        width, margin = (float(hi) - float(lo)) / NB, (float(hi) - float(lo)) * 2.0**-20
        edges = float(lo) + np.arange(NB + 1) * width
        w_lo = np.where(cnt > 0, cnt * np.exp2(edges[:-1] - margin), 0.0)
        w_hi = np.where(cnt > 0, cnt * np.exp2(edges[1:] + margin), 0.0)
        kept, ambiguous = decide(cnt, w_lo, w_hi, 0.0, 0.0, s_in, goal, 1, 0, True)
        if not ambiguous.any():
            return value(bin_start(int(np.nonzero(kept)[0].min()), lo, scale)), 1, None, None
        b = np.nonzero(ambiguous)[0]
        klo, khi, first = bin_start(int(b.min()), lo, scale), bin_start(int(b.max()) + 1, lo, scale) - 1, 1
    bins = np.arange(NB, dtype=np.uint64)
    for i in range(first, MAX_PASSES):
        shift = max(int(np.frexp(np.float32(khi - klo))[1]) - NB_BITS, 0)   # select._bits: the span's float
        inside = (keys >= klo) & (keys <= khi)
        cnt = np.bincount(((keys[inside] - klo) >> shift).astype(np.int64), minlength=NB)[:NB].astype(np.float64)
        last = i == MAX_PASSES - 1
        s_hi, s_in = mass[keys > khi].sum(), 0.0 if last else mass[inside].sum()
        lo_k = klo + (bins << np.uint64(shift))
        hi_k = np.minimum(lo_k + np.uint64((1 << shift) - 1), np.uint64(khi))
        with np.errstate(all="ignore"):
            m_lo = np.where(cnt > 0, cnt * np.exp2(value(lo_k).astype(np.float64)), 0.0)
            m_hi = np.where(cnt > 0, cnt * np.exp2(np.minimum(value(hi_k), hi).astype(np.float64)), 0.0)
        if by_mass:
            above, w_lo, w_hi = s_hi, m_lo, m_hi
        else:
            w_lo = w_hi = cnt
        kept, ambiguous = decide(cnt, w_lo, w_hi, above, s_hi, s_in, goal, shift, i, by_mass)
        if not ambiguous.any():
            b = np.nonzero(kept)[0]
            cut = klo + (int(b.min()) << shift) if b.size else min(khi + 1, KEY_INF)
            summed = s_hi + (0.5 * (m_lo + m_hi) if by_mass else m_lo)[kept].sum() if shift == 0 or last else None
            widest = None
            if shift > 0 and last:
                widest = float((value(hi_k).astype(np.float64) - value(lo_k).astype(np.float64))[cnt > 0].max())
            return value(cut), i + 1, summed, widest
        b = np.nonzero(ambiguous)[0]
        if not by_mass:
            above += cnt[b.max() + 1:].sum()
        top = klo + (int(b.max()) << shift)
        khi = top + min((1 << shift) - 1, khi - top)
        klo = klo + (int(b.min()) << shift)


def sorted_cut(d, top_k=None, top_p=None):
    """The threshold by a sort (the float64 oracle's rule)."""
    ordered = np.sort(d)[::-1]
    if top_k is not None:
        return ordered[top_k - 1]
    mass = np.exp2(ordered.astype(np.float64))
    above = np.cumsum(mass) - mass
    return ordered[(above < top_p * mass.sum()).sum() - 1]


def _reads(d, base, filters):
    """(reads of one row, the widest bin in d of its last pass if that pass decided bins of
    several keys by the middle of their bounds (else None), whether that kept set differs from
    the sort's, the relative error of the kept tokens' Σ 2^d summed by bins). Every other row is
    checked against the sort."""
    by_mass = filters[0] == "p"
    cut, passes, summed, widest = threshold(d, base, float(filters[1]), by_mass)
    middle = widest is not None
    want = sorted_cut(d, **({"top_p": filters[1]} if by_mass else {"top_k": filters[1]}))
    differs = (d >= cut).sum() != (d >= want).sum()
    assert middle or not differs, filters
    exact = np.exp2(d[d >= cut].astype(np.float64)).sum()
    error = 0.0 if summed is None else abs(summed / exact - 1)
    return 1 + passes + (0 if summed is not None else 1), widest, differs, error


def _row(z):
    """(d, base) of a row of logits z at τ = 1, as the kernels form them (fp32)."""
    base = np.float32(z.max() * np.float32(1.4426950408889634))
    return (z * np.float32(1.4426950408889634) - base).astype(np.float32), base


def _other_rows(kind, rng):
    """Rows of V logits unlike a Gaussian's: an LLM's kind (bf16, a few large logits), ties (a grid
    of 1/64), 2 to 8 largest tied, or the largest few within 10⁻³ of each other (and divided by a
    temperature)."""
    if kind == "bf16 + head":
        z = rng.standard_normal(V) * rng.choice([0.5, 1, 2, 3, 4])
        head = rng.integers(0, 20)
        z[:head] += rng.uniform(3, 15, head)
        return (z.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    if kind == "ties (grid)":
        return (np.round(rng.standard_normal(V) * 128) / 64).astype(np.float32)
    if kind == "tied largest":
        z = rng.standard_normal(V).astype(np.float32) * 2
        z[:rng.integers(2, 9)] = z.max() + 4
        return z
    z = rng.standard_normal(V) * 2
    top = rng.integers(2, 8)
    z[:top] = z.max() + 1 + rng.uniform(0, 1e-3, top)
    if kind == "near-tied top, τ":   # at a temperature of 0.6 to 1.2
        z = z / rng.choice([0.6, 0.8, 1.0, 1.2])
    return z.astype(np.float32)


FILTERS = (("k", 20), ("k", 1000), ("p", 0.5), ("p", 0.9), ("p", 0.95), ("p", 0.999))
BOTH = ((20, 0.9), (20, 0.95), (50, 0.99), (1000, 0.9))
SPLIT_BOTH = BOTH + ((3000, 0.9),)   # over a split: a top_k above what the gather holds as well
ALONE = ((20, None), (1000, None), (None, 0.9), (None, 0.999))
KINDS = [f"z ~ N(0, {s}²)" for s in (1, 3, 6, 12)] + ["bf16 + head", "ties (grid)", "tied largest", "near-tied top",
                                                   "near-tied top, τ"]


def _rows(kind, n, rng):
    """n rows of V logits of a kind (fp32)."""
    if kind.startswith("z ~"):
        scale = np.float32(kind.split(", ")[1].split("²")[0])
        return [rng.standard_normal(V).astype(np.float32) * scale for _ in range(n)]
    return [_other_rows(kind, rng) for _ in range(n)]


def both(rows, dtype="fp32", cells=None):
    """Reads of a row by the forward with top_k and top_p together, counted by the selection
    kernel under Triton's interpreter: the statistics, each pass of the selection, and the
    finish's sums where the selection left them; every row's log-probs checked against the
    float64 oracle's.
    With ``dtype`` bf16 or fp16 the rows are rounded to it (the selection over their own keys),
    with bf16-in-fp32 rounded to bf16 and passed as fp32, and each filter alone is counted too;
    ``cells``: (top_k, top_p) pairs in place of the table's (the same rows)."""
    import os

    os.environ["TRITON_INTERPRET"] = "1"   # before the kernels are imported
    import torch

    import mhpo_kernels
    import reference
    from mhpo_kernels.kernels import forward, select

    count_pass, gather_pass, joint_pass = select._count_pass, select._gather_pass, select._joint_pass
    select_cuts = forward.select_cuts
    passes, summed = collections.Counter(), []

    def spy(read):
        def counted(*args):
            passes[int(args[0].handle.data.ravel()[0])] += 1   # by the row's address
            return read(*args)

        return counted

    def select_spy(*args):
        out = select_cuts(*args)
        summed.append(args[7].view(-1, 2)[:, 0] >= 0)
        return out

    select._count_pass, select._gather_pass, select._joint_pass = spy(count_pass), spy(gather_pass), spy(joint_pass)
    forward.select_cuts = select_spy
    rng = np.random.default_rng(0)
    cells = cells or (BOTH if dtype == "fp32" else ALONE + BOTH)
    which = {"fp32": "together", "bf16-in-fp32": "(fp32 logits of bf16 values)"}.get(dtype, f"({dtype} logits)")
    print(f"reads of a row by the forward with top_k and top_p {which} (statistics + the selection's passes + the "
          f"finish's sums unless the selection summed them), over {rows} rows, V = {V}, counted by the kernel")
    print(f"{'rows':>18} " + " ".join(f"{', '.join(n for n in (k and f'k {k}', p and f'p {p}') if n):>13}"
                                      for k, p in cells))
    for kind in KINDS:
        x = torch.tensor(np.asarray(_rows(kind, rows, rng))).reshape(1, rows, V)   # names the image record has
        if dtype == "bf16-in-fp32":
            x = x.to(torch.bfloat16).float()
        elif dtype != "fp32":
            x = x.to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
        ids = x.argmax(-1)
        counts = []
        for top_k, top_p in cells:
            passes.clear()
            summed.clear()
            with mhpo_kernels.use_backend("triton"):
                logp = mhpo_kernels.token_logprobs(x, ids, top_k=top_k, top_p=top_p)
            want = reference.token_logprobs(x.double(), ids, top_k=top_k, top_p=top_p)
            assert torch.allclose(logp.double(), want, rtol=1e-5, atol=1e-5), (kind, top_k, top_p)
            reads = [1 + n + (0 if s else 1) for n, s in zip((passes[a] for a in sorted(passes)), summed[0])]
            counts.append(f"{min(reads)}–{max(reads)}" if min(reads) != max(reads) else str(reads[0]))
        print(f"{kind:>18} " + " ".join(f"{c:>13}" for c in counts))


def _split_rank(rank, world, folder, rows):
    """One rank of ``split``: its slice of every row, the reads of each counted by wrapping the
    launches ``slice_select`` makes (a counting pass whose mode is not COUNT_SKIP, a gather whose
    first slot is ≥ 0); rank 0 checks the log-probs against the float64 oracle and writes the table."""
    import json
    import types

    import torch
    import torch.distributed as dist

    import mhpo_kernels
    import reference
    from mhpo_kernels import _dispatch, slice_select
    from mhpo_kernels._sweep_types import COUNT_SKIP

    dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", world), rank=rank, world_size=world)
    reads = None

    def kernel(name, device, backend):
        launch = _dispatch.kernel(name, device, backend)

        def counted(*args):
            read = args[5] >= 0 if name == "slice_gather" else args[4] != COUNT_SKIP
            reads.add_(read.to(torch.int64))
            return launch(*args)

        return counted

    slice_select._dispatch = types.SimpleNamespace(kernel=kernel)
    size = -(-V // world)
    rng = np.random.default_rng(0)
    table = {}
    for kind in KINDS:
        x = torch.tensor(np.asarray(_rows(kind, rows, rng)))
        ids = x.argmax(-1)
        table[kind] = []
        for top_k, top_p in SPLIT_BOTH:
            reads = torch.ones(rows, dtype=torch.int64)   # the statistics
            with mhpo_kernels.use_backend("torch"):
                logp = mhpo_kernels.token_logprobs(x[:, rank * size:(rank + 1) * size], ids, top_k=top_k,
                                                   top_p=top_p, tp_group=dist.group.WORLD)
            if rank == 0:
                want = reference.token_logprobs(x.double(), ids, top_k=top_k, top_p=top_p)
                assert torch.allclose(logp.double(), want, rtol=1e-5, atol=1e-5), (kind, top_k, top_p)
            table[kind].append((int(reads.min()), int(reads.max())))
    if rank == 0:
        with open(f"{folder}/reads.json", "w") as f:
            json.dump(table, f)
    dist.destroy_process_group()


def split(rows, world):
    """Reads of each slice by the forward with top_k and top_p together over a vocabulary split
    into ``world`` slices (gloo ranks on this machine; the PyTorch path, whose launches read what
    the Triton path's do: tests/test_distributed.py holds them equal row by row), every row's
    log-probs checked against the float64 oracle's."""
    import json
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_split_rank, args=(world, folder, rows), nprocs=world, start_method="spawn")
        with open(f"{folder}/reads.json") as f:
            table = json.load(f)
    print(f"reads of each slice by the forward with top_k and top_p together over {world} slices (statistics + the "
          f"selection's launches), over {rows} rows, V = {V}, counted by slice_select's launches")
    print(f"{'rows':>18} " + " ".join(f"{f'k {k}, p {p}':>13}" for k, p in SPLIT_BOTH))
    for kind, counts in table.items():
        print(f"{kind:>18} " + " ".join(f"{f'{a}–{b}' if a != b else str(a):>13}" for a, b in counts))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--both", action="store_true", help="top_k and top_p together, counted by the kernel")
    dtype = parser.add_mutually_exclusive_group()
    dtype.add_argument("--bf16", action="store_true", help="with --both: bf16 rows, each filter alone too")
    dtype.add_argument("--fp16", action="store_true", help="with --both: fp16 rows, each filter alone too")
    dtype.add_argument("--bf16-in-fp32", action="store_true",
                       help="with --both: fp32 rows of bf16 values, each filter alone too")
    parser.add_argument("--split", type=int, metavar="RANKS",
                        help="with --both: over a vocabulary split into RANKS slices (fp32, the PyTorch path)")
    parser.add_argument("--pairs", nargs="+", metavar="K:P",
                        help="with --both: these top_k:top_p pairs in place of the table's columns (the same rows)")
    args = parser.parse_args(argv)
    if args.both and args.split:
        return split(args.rows, args.split)
    if args.both:
        cells = [(int(k), float(p)) for k, p in (pair.split(":") for pair in args.pairs)] if args.pairs else None
        return both(args.rows, "bf16" if args.bf16 else "fp16" if args.fp16 else
                    "bf16-in-fp32" if args.bf16_in_fp32 else "fp32", cells)
    rng = np.random.default_rng(0)
    print(f"reads of a row by the forward (statistics + counting passes + the finish's sums unless the last pass "
          f"summed them), over {args.rows} rows, V = {V}")
    print(f"{'rows':>18} " + " ".join(f"{f'top_{f[0]} {f[1]}':>11}" for f in FILTERS))
    middle, differs = [], 0
    error = widest = 0.0
    for kind in KINDS:
        counts = []
        for filters in FILTERS:
            reads = []
            for _ in range(args.rows):
                z, = _rows(kind, 1, rng)
                n, w, x, e = _reads(*_row(z), filters)
                reads.append(n)
                middle, differs, error = middle + [(kind, filters)] * (w is not None), differs + x, max(error, e)
                widest = max(widest, w or 0.0)
            counts.append(f"{min(reads)}–{max(reads)}" if min(reads) != max(reads) else str(reads[0]))
        print(f"{kind:>18} " + " ".join(f"{c:>11}" for c in counts))
    where = ", ".join(f"{n} {kind} top_{f[0]} {f[1]}" for (kind, f), n in collections.Counter(middle).items())
    print(f"rows whose last pass decided bins of several keys by their bounds: {len(middle)} ({where}; bins at most "
          f"{widest:.1e} wide in d), of which kept a set other than the sort's: {differs}; the kept tokens' "
          f"Σ 2^d summed by the selection: within {error:.1e} of the exact sum, relative")

if __name__ == "__main__":
    main()
