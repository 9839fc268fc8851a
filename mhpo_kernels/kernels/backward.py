"""Sweep 2: per row, one more read of the logits and one write of their gradient."""

import triton
import triton.language as tl

from .._config import sweep_config
from .token_math import _logit_map, _logit_map_slope

# Derivation. With z = map(x), p = softmax(z), lse = log Σ_v e^{z_v}:
#
#   logp = z_y − lse                     ∂logp/∂z_v = [v = y] − p_v
#   H    = lse − Σ_u p_u z_u             ∂H/∂z_v    = −p_v (z_v − lse + H)
#
# The forward saved lse and H per row; the loss and any caller of token_logprobs hand back
# dlogp = ∂L/∂logp (for MHPO: G · g_t · coef_t) and dH = ∂L/∂H. So
#
#   ∂L/∂x_v = dz_v/dx_v · ( dlogp · ([v = y] − p_v)  −  dH · p_v (z_v − lse + H) )
#
# with p_v = exp(z_v − lse) recomputed from the row, and dz/dx = 1/τ without softcap.
# A zero-probability entry (z_v = −inf) contributes nothing to the entropy term (p log p → 0).


@triton.jit
def _mhpo_bwd_kernel(
    p_x, stride_xb, stride_xt,                   # logits (B, T, V), unit stride along V
    p_dx, stride_db, stride_dt,                  # gradient (B, T, V), unit stride along V
    p_y, p_lse, p_dlogp, p_ent, p_dent,          # (N,) int64 ids (< 0 invalid) and fp32 scalars
    T, V,
    in_scale, out_scale,
    SOFTCAP: tl.constexpr,
    HAS_DENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    i_b = row // T
    i_t = row - i_b * T
    # int64: b · stride passes 2³¹ elements as soon as the logits pass 4 GiB in bf16.
    p_row = p_x + i_b.to(tl.int64) * stride_xb + i_t.to(tl.int64) * stride_xt
    p_drow = p_dx + i_b.to(tl.int64) * stride_db + i_t.to(tl.int64) * stride_dt

    y = tl.load(p_y + row)
    valid = (y >= 0) & (y < V)
    n_read = tl.where(valid, V, 0)  # invalid rows read nothing and write a zero row
    lse = tl.load(p_lse + row)
    dlogp = tl.where(valid, tl.load(p_dlogp + row), 0.0)
    if HAS_DENT:
        ent = tl.load(p_ent + row)
        dent = tl.where(valid, tl.load(p_dent + row), 0.0)

    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_x = tl.load(p_row + o_v, mask=o_v < n_read, other=0.0).to(tl.float32)
        b_z = _logit_map(b_x, in_scale, out_scale, SOFTCAP)
        b_p = tl.exp(b_z - lse)
        b_dz = tl.where(o_v == y, dlogp, 0.0) - dlogp * b_p
        if HAS_DENT:
            b_dz -= tl.where(b_p > 0.0, dent * b_p * (b_z - lse + ent), 0.0)
        b_dx = b_dz * _logit_map_slope(b_x, in_scale, out_scale, SOFTCAP)
        tl.store(p_drow + o_v, tl.where(valid, b_dx, 0.0).to(p_dx.dtype.element_ty), mask=m_v)


def mhpo_bwd(logits, grad, target, lse, dlogp, entropy, dentropy, lmap):
    """Launch sweep 2: write ∂L/∂logits into ``grad`` (B, T, V, unit stride along V)."""
    B, T, V = logits.shape
    N = B * T
    if N == 0:
        return grad
    block_v, num_warps = sweep_config(V)
    has_dent = dentropy is not None
    _mhpo_bwd_kernel[(N,)](
        logits, logits.stride(0), logits.stride(1),
        grad, grad.stride(0), grad.stride(1),
        target, lse, dlogp,
        entropy if has_dent else lse, dentropy if has_dent else lse,
        T, V,
        lmap.in_scale, lmap.out_scale,
        SOFTCAP=lmap.softcap,
        HAS_DENT=has_dent,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return grad
