"""Sweep 1: per row, one read of the logits for log-sum-exp, the target logit and the entropy, then
the per-token MHPO epilogue. Writes O(N) fp32 scalars, never a V-sized buffer."""

import torch
import triton
import triton.language as tl

from .._config import sweep_config
from .._sweep_types import RowStats
from .rows import _row_ptr, _row_target
from .token_math import _dhp, _expm1, _k3, _lfm, _logit_delta


@triton.jit
def _mhpo_fwd_kernel(
    p_x, stride_xb, stride_xt,                   # logits (B, T, V), unit stride along V
    p_y,                                         # (N,) int64 target ids, < 0 where invalid
    p_old, p_adv, p_g, p_ref,                    # (N,) fp32 old logp, advantage, agg weight, ref logp
    p_max, p_logs, p_logp, p_ent,                # (N,) fp32 outputs: row max, log s, logp, H
    p_psi, p_zeta, p_loss, p_coef,               # (N,) fp32 outputs of the MHPO epilogue
    T, V,
    in_scale, out_scale,                         # logit map, see _logit_map
    c, k_pos, lam_pos, k_neg, lam_neg, beta,     # MHPO hyperparameters
    SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_LOSS: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    p_row = _row_ptr(p_x, row, T, stride_xb, stride_xt)
    y, valid, n_read = _row_target(p_y, row, V)  # invalid rows read nothing and write zeros

    # Online softmax statistics. m is the running max of the raw logits x (z is increasing in x),
    # and with d = z(x) − z(m) ≤ 0:
    #   s = Σ e^d,   a = Σ e^d · d,   so that   logp = z(x_y) − z(m) − log s,   H = log s − a/s.
    m = float("-inf")
    s = 0.0
    a = 0.0
    for v0 in range(0, n_read, BLOCK_V):  # no steps at all for an invalid row
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < n_read
        b_x = tl.load(p_row + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(b_x, 0))
        if SOFTCAP:
            m_ref = m_new  # the cap maps −inf to −cap/τ: z(m) stays finite
        else:
            # While every logit so far is −inf keep the reference at 0: s stays 0, not inf − inf.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_d = tl.where(m_v, _logit_delta(b_x, m_ref, in_scale, out_scale, SOFTCAP), float("-inf"))
        b_e = tl.exp(b_d)
        shift = _logit_delta(m, m_ref, in_scale, out_scale, SOFTCAP)  # rebase old sums to m_new
        alpha = tl.exp(shift)
        if WITH_ENTROPY:
            # Σ e^(d_old + shift)·(d_old + shift) = alpha · (a + s · shift); nothing to rebase at s = 0.
            a = alpha * (a + tl.where(s > 0.0, s * shift, 0.0)) + tl.sum(
                tl.where(b_e > 0.0, b_e * b_d, 0.0), 0
            )
        s = s * alpha + tl.sum(b_e, 0)
        m = m_new

    # Rows with nothing read (invalid) keep m = −inf, s = 0: write zeros, not NaN.
    m = tl.where(valid, m, 0.0)
    log_s = tl.log(tl.where(valid, s, 1.0))
    x_y = tl.load(p_row + y, mask=valid, other=0.0).to(tl.float32)
    logp = _logit_delta(x_y, m, in_scale, out_scale, SOFTCAP) - log_s
    tl.store(p_max + row, m)
    tl.store(p_logs + row, log_s)
    tl.store(p_logp + row, tl.where(valid, logp, 0.0))
    if WITH_ENTROPY:
        tl.store(p_ent + row, tl.where(valid, log_s - a / tl.where(valid, s, 1.0), 0.0))

    if WITH_LOSS:
        adv = tl.load(p_adv + row, mask=valid, other=0.0)
        g = tl.load(p_g + row, mask=valid, other=0.0)
        if HAS_OLD:
            log_ratio = logp - tl.load(p_old + row, mask=valid, other=0.0)
        else:
            log_ratio = tl.zeros_like(logp)  # on-policy: old = sg[logp]
        psi, dpsi = _lfm(log_ratio, c)
        zeta = _dhp(psi, k_pos, lam_pos, k_neg, lam_neg)
        w = tl.exp(psi - zeta)
        loss = -w * adv
        coef = -adv * w * dpsi                          # d loss_t / d logp_t
        if HAS_REF:
            d = tl.load(p_ref + row, mask=valid, other=0.0) - logp
            loss += beta * _k3(d)
            coef -= beta * _expm1(d)                    # β · (1 − e^d)
        tl.store(p_psi + row, tl.where(valid, psi, 0.0))
        tl.store(p_zeta + row, tl.where(valid, zeta, 0.0))
        tl.store(p_loss + row, tl.where(valid, g * loss, 0.0))
        tl.store(p_coef + row, tl.where(valid, g * coef, 0.0))


def mhpo_fwd(logits, target, old, adv, g, ref, hp, lmap, *, with_entropy, with_loss):
    """Launch sweep 1 over the rows of ``logits`` (B, T, V). Returns ``RowStats`` of (N,) fp32."""
    B, T, V = logits.shape
    N = B * T
    out = RowStats.empty(N, logits.device, with_entropy=with_entropy, with_loss=with_loss)
    if N == 0:
        return out
    per_token = (target, old, adv, g, ref)
    assert all(x is None or x.is_contiguous() for x in per_token), "per-token inputs must be flat"
    block_v, num_warps = sweep_config(V)
    dummy = out.row_max  # stands in for absent optional inputs/outputs; never dereferenced
    _mhpo_fwd_kernel[(N,)](
        logits, logits.stride(0), logits.stride(1),
        target,
        dummy if old is None else old, dummy if adv is None else adv,
        dummy if g is None else g, dummy if ref is None else ref,
        out.row_max, out.log_sum, out.logp,
        dummy if out.entropy is None else out.entropy,
        dummy if out.psi is None else out.psi,
        dummy if out.zeta is None else out.zeta,
        dummy if out.loss is None else out.loss,
        dummy if out.coef is None else out.coef,
        T, V,
        lmap.in_scale, lmap.out_scale,
        hp.c, hp.k_pos, hp.lam_pos, hp.k_neg, hp.lam_neg, hp.beta,
        SOFTCAP=lmap.softcap,
        WITH_ENTROPY=with_entropy,
        WITH_LOSS=with_loss,
        HAS_OLD=old is not None,
        HAS_REF=ref is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return out
