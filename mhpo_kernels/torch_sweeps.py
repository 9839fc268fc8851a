"""The two sweeps in plain PyTorch, chunked over rows: the path for CPU tensors without Triton's
interpreter (and for any device Triton does not serve).

Same inputs and outputs as ``kernels.forward.mhpo_fwd`` / ``kernels.backward.mhpo_bwd``. Memory is
bounded by one chunk of rows × V in float64 (``CHUNK_BYTES``), never N × V. The per-token epilogue
runs on (N,) vectors in float64, where the textbook formulas are accurate, then rounds to fp32.
"""

import math

import torch
import torch.nn.functional as F

from ._sweep_types import RowStats

CHUNK_BYTES = 64 << 20  # float64 working set of one chunk of rows
LN2 = math.log(2.0)


def _chunks(logits):
    """(b, t0, t1, r0): row blocks of at most CHUNK_BYTES as views of logits (B, T, V)."""
    B, T, V = logits.shape
    rows = max(1, CHUNK_BYTES // (8 * max(V, 1)))
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            yield b, t0, t1, b * T + t0


def _sech2(u):
    """sech²(u) = 4e/(1 + e)², e = exp(−2|u|): never 1 − tanh² (see SPEC.md, section 2)."""
    e = torch.exp(-2.0 * u.abs())
    return 4.0 * e / (1.0 + e) ** 2


def _exponents(logits, target, b, t0, t1, r0, base, lmap):
    """The base-2 exponents d = k·u(x) − b of rows [r0, r0 + t1 − t0) as a fresh fp32 chunk, as the
    kernels form them (``kernels/logit_map.py``): b = fp32(k · max u) when ``base`` is None (sweep
    1), else the saved one (sweep 2); the product k·u is exact in float64, then d rounds once to
    fp32, as the kernels' FMA does. Invalid rows are zeroed first (they may hold NaN). Returns
    (d, valid, b, u) with u the softcapped logits (None without softcap)."""
    valid = target[r0:r0 + t1 - t0] >= 0
    x = logits[b, t0:t1].to(torch.float32, copy=True)
    x.masked_fill_(~valid.unsqueeze(-1), 0.0)
    u = torch.tanh(x.mul_(lmap.in_scale)) if lmap.softcap else x
    k = torch.tensor(lmap.log2_scale, dtype=torch.float32).item()  # the fp32 the kernels get
    if base is None:
        base = u.amax(-1) * k
    else:
        base = base[r0:r0 + t1 - t0]
    d = (u.double() * k).sub_(base.double().unsqueeze(-1)).float()
    return d, valid, base, (u if lmap.softcap else None)


def _token_terms(logp, valid, old, adv, g, ref, hp):
    """The per-token epilogue (ψ, ζ, g·loss_t, g·d loss_t/d logp), in float64 on (N,) vectors."""
    f64 = torch.float64
    logp = logp.to(f64)
    log_ratio = logp - old.to(f64) if old is not None else torch.zeros_like(logp)
    u = log_ratio / hp.c
    psi = hp.c * torch.tanh(u)
    zeta = (F.softplus(psi) / hp.lam_pos) ** hp.k_pos + (F.softplus(-psi) / hp.lam_neg) ** hp.k_neg
    w = torch.exp(psi - zeta)
    adv = adv.to(f64)
    loss = -w * adv
    coef = -adv * w * _sech2(u)
    if ref is not None:
        d = ref.to(f64) - logp
        loss = loss + hp.beta * (torch.expm1(d) - d)
        coef = coef - hp.beta * torch.expm1(d)
    g = g.to(f64)

    def out(x):
        return torch.where(valid, x, torch.zeros_like(x)).float()

    return out(psi), out(zeta), out(g * loss), out(g * coef)


def mhpo_fwd(logits, target, old, adv, g, ref, hp, lmap, *, with_entropy, with_loss):
    """Sweep 1 in PyTorch; see ``kernels.forward.mhpo_fwd``."""
    N = logits.shape[0] * logits.shape[1]
    out = RowStats.empty(N, logits.device, with_entropy=with_entropy, with_loss=with_loss)
    for b, t0, t1, r0 in _chunks(logits):
        r1 = r0 + t1 - t0
        d, valid, base, _ = _exponents(logits, target, b, t0, t1, r0, None, lmap)
        e = d.exp2()                                    # max(d) ≈ 0, so Σ e ≥ 1: no overflow
        sum_e = e.sum(-1)
        log2_sum = sum_e.log2()
        y = target[r0:r1].long()
        has_y = valid & (y < d.shape[-1])              # y ≥ V: the target is on another rank's slice
        d_y = d.gather(-1, y.clamp(0, d.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        out.base[r0:r1] = torch.where(valid, base, 0.0)
        out.log2_sum[r0:r1] = torch.where(valid, log2_sum, 0.0)
        out.logp[r0:r1] = torch.where(has_y, (d_y - log2_sum) * LN2, 0.0)
        if with_entropy:
            # H = ln 2 · (log2 s − Σ e·d / s); e·d is 0, not NaN, where d = −inf.
            e_d = torch.where(e > 0, e.mul_(d), 0.0).sum(-1)
            out.entropy[r0:r1] = torch.where(valid, (log2_sum - e_d / sum_e) * LN2, 0.0)
    if with_loss and N > 0:
        valid = target >= 0
        out.psi[:], out.zeta[:], out.loss[:], out.coef[:] = _token_terms(
            out.logp, valid, old, adv, g, ref, hp
        )
    return out


def mhpo_bwd(logits, grad, target, base, log2_sum, dlogp, entropy, dentropy, lmap):
    """Sweep 2 in PyTorch; see ``kernels.backward`` for the derivation."""
    for b, t0, t1, r0 in _chunks(logits):
        r1 = r0 + t1 - t0
        q, valid, _, u = _exponents(logits, target, b, t0, t1, r0, base, lmap)
        q.sub_(log2_sum[r0:r1].unsqueeze(-1))           # log2 p
        dlogp_c = torch.where(valid, dlogp[r0:r1], 0.0).unsqueeze(-1)
        dz = q.exp2()                                   # p, then overwritten with ∂L/∂z
        if dentropy is not None:
            dent = torch.where(valid, dentropy[r0:r1], 0.0).unsqueeze(-1)
            h = entropy[r0:r1].unsqueeze(-1)
            ent_term = torch.where(dz > 0, dz * (q * LN2 + h), 0.0).mul_(dent)
        y = target[r0:r1].long()
        has_y = (valid & (y < dz.shape[-1])).unsqueeze(-1)
        dz.mul_(-dlogp_c).scatter_add_(-1, y.clamp(0, dz.shape[-1] - 1).unsqueeze(-1),
                                       torch.where(has_y, dlogp_c, 0.0))
        if dentropy is not None:
            dz.sub_(ent_term)
        dz.mul_(lmap.slope)
        if lmap.softcap:
            dz.mul_(1.0 - u * u)                        # dz/dx from tanh's result, as eager does
        dz.masked_fill_(~valid.unsqueeze(-1), 0.0)
        grad[b, t0:t1] = dz
    return grad
