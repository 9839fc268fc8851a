"""Per-token MHPO math as small @triton.jit helpers, all in fp32.

Each helper mirrors a line of ``reference.mhpo_terms`` / ``reference.mhpo_loss``. Where the plain
formula loses accuracy in fp32 (1 − tanh², e^d − 1 − d near 0), the helper evaluates an equivalent
form that does not: those are the places where the gradient of a near-on-policy or saturated token
would otherwise be silently wrong.
"""

import triton
import triton.language as tl


@triton.jit
def _exp_series(x):
    """Σ_{n≥2} xⁿ⁻²/n!  =  (eˣ − 1 − x)/x², to fp32 rounding for |x| < 1 (truncation < 2e-9)."""
    p = 1.0 / 479001600.0
    p = p * x + 1.0 / 39916800.0
    p = p * x + 1.0 / 3628800.0
    p = p * x + 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    return p


@triton.jit
def _expm1(x):
    """eˣ − 1 without the cancellation of exp(x) − 1 near 0."""
    return tl.where(tl.abs(x) < 1.0, x + x * x * _exp_series(x), tl.exp(x) - 1.0)


@triton.jit
def _k3(d):
    """Schulman's KL estimator k3 = e^d − d − 1 (d = ref_logp − logp), accurate near d = 0."""
    return tl.where(tl.abs(d) < 1.0, d * d * _exp_series(d), tl.exp(d) - d - 1.0)


@triton.jit
def _tanh(x):
    """tanh(x) = −expm1(−2|x|) / (2 + expm1(−2|x|)) · sign(x): relative accuracy down to x → 0."""
    e = _expm1(-2.0 * tl.abs(x))
    t = -e / (2.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _sech2(x):
    """sech²(x) = 1 − tanh²(x) = 4e / (1 + e)², e = exp(−2|x|).

    Never 1 − tanh²: in fp32 that is off by 2× at |x| = 9 and exactly 0 beyond, which turns the
    LFM back into a hard clip.
    """
    e = tl.exp(-2.0 * tl.abs(x))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _softplus(x):
    """softplus(x) = log(1 + eˣ) = max(x, 0) + log(1 + e^−|x|), without overflow."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _weibull_hazard(u, k, lam):
    """Weibull cumulative hazard H(u) = (u/λ)^k for u ≥ 0 (H(0) = 0)."""
    return tl.exp(k * tl.log(u / lam))


@triton.jit
def _lfm(log_ratio, c):
    """Log-Fidelity Modulator ψ = c·tanh(log_r/c) and its slope dψ/dlog_r = sech²(log_r/c)."""
    u = log_ratio / c
    return c * _tanh(u), _sech2(u)


@triton.jit
def _dhp(psi, k_pos, lam_pos, k_neg, lam_neg):
    """Decoupled Hazard Penalty ζ = H₊(softplus(ψ)) + H₋(softplus(−ψ)); ψ is stop-gradient."""
    return _weibull_hazard(_softplus(psi), k_pos, lam_pos) + _weibull_hazard(
        _softplus(-psi), k_neg, lam_neg
    )


