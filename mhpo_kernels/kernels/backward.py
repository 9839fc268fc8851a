"""Sweep 2: per row, one more read of the logits and one write of their gradient."""

import triton
import triton.language as tl

from .._config import sweep_config
from .rows import _row_ptr, _row_target
from .token_math import _logit_delta, _logit_map_slope

# Derivation. With z the logit the softmax sees (z = x/τ without softcap), p = softmax(z) and
# log p_v = z_v − lse:
#
#   logp = z_y − lse                     ∂logp/∂z_v = [v = y] − p_v
#   H    = −Σ_u p_u log p_u              ∂H/∂z_v    = −p_v (log p_v + H)
#
# The forward saved per row the raw max m and log_sum = lse − z(m), so log p_v = (z_v − z(m)) −
# log_sum is formed from a difference of nearby logits, and H. The loss, or the caller of
# token_logprobs, hands back dlogp = ∂L/∂logp (for MHPO: G · g_t · coef_t) and dH = ∂L/∂H:
#
#   ∂L/∂x_v = dz_v/dx_v · ( dlogp · ([v = y] − p_v)  −  dH · p_v (log p_v + H) )
#
# with dz/dx = 1/τ without softcap. A zero-probability entry (log p_v = −inf) adds nothing to the
# entropy term (p log p → 0).


@triton.jit
def _mhpo_bwd_kernel(
    p_x, stride_xb, stride_xt,                   # logits (B, T, V), unit stride along V
    p_dx, stride_db, stride_dt,                  # gradient (B, T, V), unit stride along V
    p_y, p_max, p_logs,                          # (N,) int64 ids (< 0 invalid), fp32 m, log_sum
    p_dlogp, p_ent, p_dent,                      # (N,) fp32 ∂L/∂logp, H, ∂L/∂H
    T, V,
    in_scale, out_scale,
    SOFTCAP: tl.constexpr,
    HAS_DENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    p_row = _row_ptr(p_x, row, T, stride_xb, stride_xt)
    p_drow = _row_ptr(p_dx, row, T, stride_db, stride_dt)
    y, valid, n_read = _row_target(p_y, row, V)  # invalid rows read nothing, write a zero row
    m = tl.load(p_max + row)
    log_s = tl.load(p_logs + row)
    dlogp = tl.where(valid, tl.load(p_dlogp + row), 0.0)
    if HAS_DENT:
        ent = tl.load(p_ent + row)
        dent = tl.where(valid, tl.load(p_dent + row), 0.0)

    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_x = tl.load(p_row + o_v, mask=o_v < n_read, other=0.0).to(tl.float32)
        b_logp = _logit_delta(b_x, m, in_scale, out_scale, SOFTCAP) - log_s
        b_p = tl.exp(b_logp)
        b_dz = tl.where(o_v == y, dlogp, 0.0) - dlogp * b_p
        if HAS_DENT:
            b_dz -= tl.where(b_p > 0.0, dent * b_p * (b_logp + ent), 0.0)
        b_dx = b_dz * _logit_map_slope(b_x, in_scale, out_scale, SOFTCAP)
        tl.store(p_drow + o_v, tl.where(valid, b_dx, 0.0).to(p_dx.dtype.element_ty), mask=m_v)


def mhpo_bwd(logits, grad, target, row_max, log_sum, dlogp, entropy, dentropy, lmap):
    """Launch sweep 2: write ∂L/∂logits into ``grad`` (B, T, V, unit stride along V)."""
    B, T, V = logits.shape
    N = B * T
    if N == 0:
        return grad
    per_token = (target, row_max, log_sum, dlogp, entropy, dentropy)
    assert all(x is None or x.is_contiguous() for x in per_token), "per-token inputs must be flat"
    assert grad.stride(-1) == 1 and grad.dtype == logits.dtype
    block_v, num_warps = sweep_config(V)
    has_dent = dentropy is not None
    _mhpo_bwd_kernel[(N,)](
        logits, logits.stride(0), logits.stride(1),
        grad, grad.stride(0), grad.stride(1),
        target, row_max, log_sum, dlogp,
        entropy if has_dent else dlogp, dentropy if has_dent else dlogp,
        T, V,
        lmap.in_scale, lmap.out_scale,
        SOFTCAP=lmap.softcap,
        HAS_DENT=has_dent,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return grad
