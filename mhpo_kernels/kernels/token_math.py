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


@triton.jit
def _clamp_nan(x, lo, hi):
    """clamp(x, lo, hi) that keeps a NaN x NaN, as torch.clamp does (``tl.maximum`` and
    ``tl.minimum`` drop NaN by default; SPEC.md, section 5)."""
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _ppo_clip(ratio, adv, eps_low, eps_high, dual_clip):
    """PPO's clipped surrogate max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high)) and its derivative by
    log r: −A·r where the unclipped term is the larger, 0 where the clip holds it. ``dual_clip``
    C > 0 also caps a negative-advantage token at −A·C (derivative 0 there)."""
    unclipped = -adv * ratio
    clipped = -adv * _clamp_nan(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = tl.maximum(unclipped, clipped, propagate_nan=tl.PropagateNan.ALL)
    coef = tl.where(unclipped >= clipped, unclipped, 0.0)
    capped = (dual_clip > 0.0) & (adv < 0.0) & (loss > -adv * dual_clip)
    return tl.where(capped, -adv * dual_clip, loss), tl.where(capped, 0.0, coef)


@triton.jit
def _token_loss(logp, log_ratio, adv, v0, v1, v2, v3, v4,
                OBJECTIVE: tl.constexpr, LFM: tl.constexpr, DHP: tl.constexpr):
    """(loss_t, d loss_t / d logp_t, ψ, ζ) of a token-level objective (``objectives.py``; ψ and ζ
    are MHPO's, log r and 0 for the others). v0..v4: the objective's runtime values, in the order
    of its ``values()``, named in each branch."""
    zero = tl.zeros_like(log_ratio)
    if OBJECTIVE == 0:  # MHPO
        c, k_pos, lam_pos, k_neg, lam_neg = v0, v1, v2, v3, v4
        if LFM:
            psi, dpsi = _lfm(log_ratio, c)
        else:
            psi, dpsi = log_ratio, zero + 1.0
        zeta = zero
        if DHP:
            zeta = _dhp(psi, k_pos, lam_pos, k_neg, lam_neg)
        w = tl.exp(psi - zeta)
        return -w * adv, -adv * w * dpsi, psi, zeta
    elif OBJECTIVE == 1:  # PPO-clip; a dual clip C of 0 is none
        eps_low, eps_high, dual_clip = v0, v1, v2
        loss, coef = _ppo_clip(tl.exp(log_ratio), adv, eps_low, eps_high, dual_clip)
        return loss, coef, log_ratio, zero
    elif OBJECTIVE == 2:  # CISPO: the clipped ratio carries no gradient
        max_ratio, min_ratio = v0, v1
        w = _clamp_nan(tl.exp(log_ratio), min_ratio, max_ratio)
        return -w * adv * logp, -w * adv, log_ratio, zero
    elif OBJECTIVE == 3:  # SAPO: d/dlogp σ(τ(r − 1))·4/τ = 4σ(1 − σ)·r
        tau_pos, tau_neg = v0, v1
        ratio = tl.exp(log_ratio)
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        x = tau * (ratio - 1.0)
        gate = tl.sigmoid(x)
        # σ(x)·σ(−x), not σ(1 − σ): 1 − σ cancels in fp32 (off by 6% at x = 16, 0 from x = 17); it
        # is 0 where the gate saturates beyond fp32, so never 0 · inf for a huge ratio
        slope = gate * tl.sigmoid(-x)
        return (-gate * (4.0 / tau) * adv, tl.where(slope > 0.0, -adv * 4.0 * slope * ratio, 0.0),
                log_ratio, zero)
    else:
        # GPG (kind 4), the plain policy gradient; GSPO (5) is sequence-level and never reaches a
        # token epilogue, and any other kind is refused at compile time
        tl.static_assert(OBJECTIVE == 4, "no token-level epilogue for this objective kind")
        return -adv * logp, -adv + zero, log_ratio, zero


@triton.jit
def _loss_terms(logp, o, valid, p_old, p_adv, p_g, p_ref, v0, v1, v2, v3, v4, beta,
                HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                OBJECTIVE: tl.constexpr, LFM: tl.constexpr, DHP: tl.constexpr):
    """(ψ, ζ, g·loss_t, g·d loss_t / d logp_t) of tokens ``o`` (a row, or a block of tokens) from
    their log-probs, 0 where not ``valid``: the objective's terms (``_token_loss``), plus β · k3
    with reference log-probs. A NaN term gets a NaN derivative, so its whole gradient row is NaN
    (SPEC.md, section 5), also where the objective's derivative is a constant or a select."""
    adv = tl.load(p_adv + o, mask=valid, other=0.0)
    g = tl.load(p_g + o, mask=valid, other=0.0)
    if HAS_OLD:
        log_ratio = logp - tl.load(p_old + o, mask=valid, other=0.0)
    else:
        log_ratio = tl.zeros_like(logp)  # on-policy: old = sg[logp]
    loss, coef, psi, zeta = _token_loss(logp, log_ratio, adv, v0, v1, v2, v3, v4, OBJECTIVE, LFM, DHP)
    if HAS_REF:
        d = tl.load(p_ref + o, mask=valid, other=0.0) - logp
        loss += beta * _k3(d)
        coef -= beta * _expm1(d)                    # β · (1 − e^d)
    coef = tl.where(loss != loss, loss, coef)
    return (tl.where(valid, psi, 0.0), tl.where(valid, zeta, 0.0), tl.where(valid, g * loss, 0.0),
            tl.where(valid, g * coef, 0.0))
