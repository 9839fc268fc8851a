"""python -m bench.select_passes: how many counting passes top-k's and top-p's selection takes.

The selection launch (mhpo_kernels/kernels/select.py) reads a row once per pass until its bins
decide the threshold. How many passes that takes depends on the row, not on the hardware, so it
is counted here by the same algorithm in NumPy (2048 bins, keys, bounds and goal as the kernel
has them; float64 sums where the kernel's are fp32), on rows of V = 151,936 Gaussian logits of
several spreads (peaked rows are the sampled LLM rows' kind; flat ones are the worst case), and
checked against the sorted kept set. A model of the kernel's passes, not a measurement of it.

    python -m bench.select_passes [--rows N]
"""

import argparse

import numpy as np

NB_BITS, NB, MAX_PASSES = 11, 2048, 4
KEY_INF = 0xFF800000
V = 151936


def key(d):
    """select._key: fp32 → uint32 in the same order."""
    b = np.asarray(d, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return np.where(b >> 31, b ^ 0xFFFFFFFF, b | 0x80000000)


def value(k):
    """select._value."""
    k = np.asarray(k, dtype=np.uint64)
    return np.where(k >> 31, k & 0x7FFFFFFF, k ^ 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def threshold(d, goal, by_mass, floor=np.float32(-3.4028234663852886e38)):
    """(the smallest kept d, passes) of select._threshold on one row of exponents d (fp32)."""
    keys, klo, khi, above = key(d), int(key(floor)), KEY_INF, 0.0
    mass = np.exp2(d.astype(np.float64))
    bins = np.arange(NB, dtype=np.uint64)
    for i in range(MAX_PASSES):
        shift = max(int(khi - klo).bit_length() - NB_BITS, 0)
        inside = (keys >= klo) & (keys <= khi)
        cnt = np.bincount(((keys[inside] - klo) >> shift).astype(np.int64), minlength=NB)[:NB].astype(np.float64)
        if by_mass:
            if i == 0:
                goal = goal * (mass[inside].sum() + mass[keys > khi].sum())
            above = mass[keys > khi].sum()
            lo = klo + (bins << np.uint64(shift))
            hi = np.minimum(lo + np.uint64((1 << shift) - 1), np.uint64(khi))
            with np.errstate(all="ignore"):
                w_lo = np.where(cnt > 0, cnt * np.exp2(value(lo).astype(np.float64)), 0.0)
                w_hi = np.where(cnt > 0, cnt * np.exp2(value(hi).astype(np.float64)), 0.0)
        else:
            w_lo = w_hi = cnt
        above_lo = above + np.cumsum(w_lo[::-1])[::-1] - w_lo
        above_hi = above + np.cumsum(w_hi[::-1])[::-1] - w_hi
        if by_mass:  # and from below: the range's exact mass less what the bins up to each hold
            s_in = mass[inside].sum()
            above_lo = np.maximum(above_lo, above + s_in - np.cumsum(w_hi))
            above_hi = np.minimum(above_hi, above + s_in - np.cumsum(w_lo))
        others = w_hi - w_hi / np.maximum(cnt, 1.0) if shift > 0 else 0.0
        last = i == MAX_PASSES - 1
        kept = (cnt > 0) & ((0.5 * (above_lo + above_hi + others) if last else above_hi + others) < goal)
        ambiguous = (cnt > 0) & ~kept & (above_lo < goal) & (not last)
        if not ambiguous.any():
            b = np.nonzero(kept)[0]
            cut = klo + (int(b.min()) << shift) if b.size else min(khi + 1, KEY_INF)
            return value(cut), i + 1
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"passes per row (of {args.rows}), V = {V}; a logit spread σ: z ~ N(0, σ²)")
    print(f"{'σ':>4} " + " ".join(f"{name:>13}" for name in
                                   ("top_k 20", "top_k 1000", "top_p 0.5", "top_p 0.9", "top_p 0.95", "top_p 0.999")))
    for sigma in (1.0, 3.0, 6.0, 12.0):
        counts = []
        for filters in (("k", 20), ("k", 1000), ("p", 0.5), ("p", 0.9), ("p", 0.95), ("p", 0.999)):
            passes = []
            for _ in range(args.rows):
                z = rng.standard_normal(V).astype(np.float32) * np.float32(sigma)
                d = (z * np.float32(1.4426950408889634) - np.float32(z.max() * 1.4426950408889634)).astype(np.float32)
                by_mass = filters[0] == "p"
                cut, n = threshold(d, float(filters[1]), by_mass)
                want = sorted_cut(d, **({"top_p": filters[1]} if by_mass else {"top_k": filters[1]}))
                assert (d >= cut).sum() == (d >= want).sum(), (sigma, filters)
                passes.append(n)
            counts.append(f"{min(passes)}–{max(passes)}" if min(passes) != max(passes) else str(passes[0]))
        print(f"{sigma:>4} " + " ".join(f"{c:>13}" for c in counts))


if __name__ == "__main__":
    main()
