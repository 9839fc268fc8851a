"""The logit map x ↦ z, per element, in the form the sweeps' inner loops use.

Both sweeps work in base 2: for each logit they form u = u(x) and the exponent d = k·u − b, where b
is a per-row fp32 reference, then 2^d with one MUFU.EX2. With z the logit the softmax sees,

    no softcap:  u = x,              k = log2(e) · s/τ          (z = s·x/τ)
    softcap:     u = tanh(s·x/cap),  k = log2(e) · cap/τ        (z = cap·tanh(s·x/cap)/τ, Gemma)

so k·u = z·log2(e), and u is increasing in x either way: the row max of z is z of the row max of u.
``d = fma(u, k, −b)`` rounds once: the product is exact inside the FMA, so a logit of magnitude 1e3
near the row max keeps its digits (forming z and then subtracting a rounded lse would not).

``tl.exp2`` compiles to ``ex2.approx.ftz``: 2^d below 2^−126 is flushed to 0, so probabilities
below 1.2e−38 count as 0 in the sums and their gradient elements are written as 0 (together at
most V · 1.2e−38 of a row's mass). Triton's interpreter does not flush.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tanh_fast(v2):
    """tanh(v) from v2 = 2·log2(e)·v: 1 − 2/(1 + 2^v2), exact in the limits (±1, no NaN for |v| →
    ∞) and to absolute fp32 accuracy (~1e-7) in between, which is what a capped logit needs: z is
    cap·tanh, so its absolute error is cap · 1e-7 whatever the size of z."""
    return 1.0 - 2.0 / (1.0 + tl.exp2(v2))


@triton.jit
def _logit_u(b_x, tanh_scale, SOFTCAP: tl.constexpr):
    """u(x): x itself, or tanh(s·x/cap) with tanh_scale = 2·log2(e)·s/cap."""
    if SOFTCAP:
        return _tanh_fast(b_x * tanh_scale)
    else:
        return b_x


@triton.jit
def _logit_slope(b_u, slope, SOFTCAP: tl.constexpr):
    """dz/dx: the constant s/τ (``slope``), or (s/τ)·(1 − u²) with u = tanh(s·x/cap), the form
    eager PyTorch's tanh backward takes from its result."""
    if SOFTCAP:
        return slope * (1.0 - b_u * b_u)
    else:
        return slope
