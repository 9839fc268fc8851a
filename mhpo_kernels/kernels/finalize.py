"""After sweep 1: the loss and every metric, reduced over the N tokens by one program in a fixed
order (no atomics: the same bits on every run), into one small fp32 vector; and, for a loss over
a truncated softmax, whose weights are known only after the sweep, the per-token epilogue on
(N,) vectors (``token_terms``)."""

import torch
import triton
import triton.language as tl

from .._config import on_device
from .._sweep_types import METRICS, clip_bounds
from ..objectives import MHPO_KIND

from .token_math import _k3, _loss_terms

# Slots of the metrics vector, as ``_sweep_types.METRICS`` names them.
PSI, ZETA, SURVIVAL, ABS_LOG_RATIO, SATURATED, ENTROPY, LOGP, KL, OUTSIDE_SUPPORT, CLIP_LOW, CLIP_HIGH = (
    tl.constexpr(METRICS.index(name)) for name in METRICS)
BLOCK = 1024


@triton.jit(do_not_specialize=["N"])
def _finalize_kernel(
    p_target, p_loss, p_g, p_ent, p_logp, p_psi, p_zeta, p_old, p_adv, p_ref,  # (N,) from sweep 1 and prepare
    p_target0,                                                                   # (N,) int32 before truncation
    p_loss_out, p_out,                                                           # 0-d and (len(METRICS),) fp32
    N, entropy_coef, c, clip_lo, clip_hi,
    WITH_LOSS: tl.constexpr, ENTROPY_BONUS: tl.constexpr, METRICS: tl.constexpr, MHPO: tl.constexpr,
    CLIP: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, TRUNCATED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """loss = Σ_t g_t·loss_t − entropy_coef · Σ_t g_t·H_t (the sweep wrote g_t·loss_t), and the
    metrics: means over valid tokens (0 when there are none). With TRUNCATED, ``p_target0`` marks
    the tokens valid before the ones outside their kept set left (SPEC.md, section 9), and
    ``outside_support`` is their share of those (else 0). With CLIP, the shares of tokens whose
    ratio r is clipped where the clip bounds their update: r < ``clip_lo`` with A < 0, r >
    ``clip_hi`` with A > 0 (SPEC.md, section 7). Each sum runs per lane over the blocks in order,
    then once across the lanes."""
    o_b = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], tl.float32)
    loss, bonus, n = zero, zero, zero
    psi, zeta, survival, abs_lr, saturated, ent, logp, kl = zero, zero, zero, zero, zero, zero, zero, zero
    clip_low, clip_high = zero, zero
    n0 = zero
    for t0 in range(0, N, BLOCK):
        o = t0 + o_b
        m = o < N
        if WITH_LOSS:
            loss += tl.load(p_loss + o, mask=m, other=0.0)
            if ENTROPY_BONUS:   # at valid tokens only: a left-out one's g_t = 0 may meet H_t = NaN
                kept = tl.load(p_target + o, mask=m, other=-1) >= 0
                bonus += tl.load(p_g + o, mask=kept, other=0.0) * tl.load(p_ent + o, mask=kept, other=0.0)
        if METRICS:
            valid = tl.load(p_target + o, mask=m, other=-1) >= 0
            n += valid.to(tl.float32)
            b_logp = tl.load(p_logp + o, mask=valid, other=0.0)
            if HAS_OLD:
                log_ratio = b_logp - tl.load(p_old + o, mask=valid, other=0.0)
            else:
                log_ratio = zero
            if MHPO:
                b_zeta = tl.load(p_zeta + o, mask=valid, other=0.0)
                psi += tl.load(p_psi + o, mask=valid, other=0.0)
                zeta += b_zeta
                survival += tl.where(valid, tl.exp(-b_zeta), 0.0)
                saturated += tl.where(valid & (tl.abs(log_ratio) > c), 1.0, 0.0)
            if CLIP:
                ratio = tl.exp(log_ratio)
                b_adv = tl.load(p_adv + o, mask=valid, other=0.0)
                clip_low += tl.where(valid & (ratio < clip_lo) & (b_adv < 0), 1.0, 0.0)
                clip_high += tl.where(valid & (ratio > clip_hi) & (b_adv > 0), 1.0, 0.0)
            abs_lr += tl.where(valid, tl.abs(log_ratio), 0.0)
            ent += tl.load(p_ent + o, mask=valid, other=0.0)
            logp += b_logp
            if HAS_REF:
                kl += tl.where(valid, _k3(tl.load(p_ref + o, mask=valid, other=0.0) - b_logp), 0.0)
            if TRUNCATED:
                n0 += (tl.load(p_target0 + o, mask=m, other=-1) >= 0).to(tl.float32)
    total = tl.sum(loss, 0)
    if ENTROPY_BONUS:
        total -= entropy_coef * tl.sum(bonus, 0)
    tl.store(p_loss_out, total)
    if METRICS:
        count = tl.maximum(tl.sum(n, 0), 1.0)
        tl.store(p_out + PSI, tl.sum(psi, 0) / count)
        tl.store(p_out + ZETA, tl.sum(zeta, 0) / count)
        tl.store(p_out + SURVIVAL, tl.sum(survival, 0) / count)
        tl.store(p_out + ABS_LOG_RATIO, tl.sum(abs_lr, 0) / count)
        tl.store(p_out + SATURATED, tl.sum(saturated, 0) / count)
        tl.store(p_out + ENTROPY, tl.sum(ent, 0) / count)
        tl.store(p_out + LOGP, tl.sum(logp, 0) / count)
        tl.store(p_out + KL, tl.sum(kl, 0) / count)
        outside = 0.0
        if TRUNCATED:
            n0 = tl.sum(n0, 0)
            outside = (n0 - tl.sum(n, 0)) / tl.maximum(n0, 1.0)
        tl.store(p_out + OUTSIDE_SUPPORT, outside)
        tl.store(p_out + CLIP_LOW, tl.sum(clip_low, 0) / count)
        tl.store(p_out + CLIP_HIGH, tl.sum(clip_high, 0) / count)



def finalize(target, loss, g, entropy, logp, psi, zeta, old, adv, ref, entropy_coef, hp, *, metrics, target0=None):
    """Launch the reduction: (the 0-d fp32 loss, 0 without ``loss``; the (len(METRICS),) fp32
    metrics of the objective ``hp`` when ``metrics``, else empty; slots a call does not have hold
    0). ``target0``: a truncated loss's targets before ``prepare`` left out those outside the kept
    set."""
    N = target.numel()
    clip = clip_bounds(hp) if metrics and adv is not None else None
    total = torch.empty((), dtype=torch.float32, device=target.device)
    out = torch.empty(len(METRICS) if metrics else 0, dtype=torch.float32, device=target.device)
    with on_device(target.device):
        _finalize_kernel[(1,)](
            target, loss, g, entropy, logp, psi, zeta, old, adv, ref, target0, total, out, N, float(entropy_coef),
            float(hp.values[0]), *(clip or (0.0, 0.0)),
            WITH_LOSS=loss is not None, ENTROPY_BONUS=loss is not None and entropy_coef != 0, METRICS=metrics,
            MHPO=hp.kind == MHPO_KIND, CLIP=clip is not None, HAS_OLD=old is not None, HAS_REF=ref is not None,
            TRUNCATED=target0 is not None, BLOCK=BLOCK, num_warps=4,
        )
    return total, out


@triton.jit(do_not_specialize=["N"])
def _token_terms_kernel(
    p_target, p_logp, p_old, p_adv, p_g, p_ref,  # (N,) int32 targets (< 0 invalid), fp32 the rest
    p_psi, p_zeta, p_loss, p_coef,               # (N,) fp32 outputs, as the sweep's epilogue writes them
    N, v0, v1, v2, v3, v4, beta,                 # the objective's values (token_math._token_loss), β
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    OBJECTIVE: tl.constexpr, LFM: tl.constexpr, DHP: tl.constexpr, BLOCK: tl.constexpr,
):
    """The sweep's per-token epilogue (``token_math._loss_terms``) on a block of tokens."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    valid = tl.load(p_target + o, mask=m, other=-1) >= 0
    logp = tl.load(p_logp + o, mask=valid, other=0.0)
    psi, zeta, loss, coef = _loss_terms(logp, o, valid, p_old, p_adv, p_g, p_ref, v0, v1, v2, v3, v4, beta,
                                        HAS_OLD, HAS_REF, OBJECTIVE, LFM, DHP)
    tl.store(p_psi + o, psi, mask=m)
    tl.store(p_zeta + o, zeta, mask=m)
    tl.store(p_loss + o, loss, mask=m)
    tl.store(p_coef + o, coef, mask=m)


def token_terms(logp, target, old, adv, g, ref, hp):
    """Launch the per-token epilogue over the tokens ``target`` marks valid: (ψ, ζ, g·loss_t,
    g·d loss_t / d logp_t), each (N,) fp32, 0 at the others. For a loss whose weights ``g`` are
    formed after the sweep: a truncated softmax's (SPEC.md, section 9)."""
    N = target.numel()
    psi, zeta, loss, coef = (torch.empty(N, dtype=torch.float32, device=target.device) for _ in range(4))
    with on_device(target.device):
        _token_terms_kernel[(max(1, -(-N // BLOCK)),)](
            target, logp, old, adv, g, ref,
            psi, zeta, loss, coef, N, *hp.values, hp.beta,
            HAS_OLD=old is not None, HAS_REF=ref is not None, OBJECTIVE=hp.kind, LFM=hp.lfm, DHP=hp.dhp,
            BLOCK=BLOCK, num_warps=4,
        )
    return psi, zeta, loss, coef

