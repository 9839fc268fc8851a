"""The two sweeps in plain PyTorch, chunked over rows: the path for CPU tensors without Triton's
interpreter (and for any device Triton does not serve).

Same inputs and outputs as ``kernels.forward.mhpo_fwd`` / ``kernels.backward.mhpo_bwd``. Memory is
bounded by one chunk of rows × V in fp32 (``CHUNK_BYTES``), never N × V. The per-token epilogue
runs on (N,) vectors in float64, where the textbook formulas are accurate, then rounds to fp32.
"""

import torch
import torch.nn.functional as F

from ._sweep_types import RowStats

CHUNK_BYTES = 64 << 20  # fp32 working set of one chunk of rows


def _chunks(logits):
    """(b, t0, t1, r0): row blocks of at most CHUNK_BYTES as views of logits (B, T, V)."""
    B, T, V = logits.shape
    rows = max(1, CHUNK_BYTES // (4 * max(V, 1)))
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            yield b, t0, t1, b * T + t0


def _sech2(u):
    """sech²(u) = 4e/(1 + e)², e = exp(−2|u|): never 1 − tanh² (see SPEC.md, "Gradient")."""
    e = torch.exp(-2.0 * u.abs())
    return 4.0 * e / (1.0 + e) ** 2


def _shifted_logits(logits, target, b, t0, t1, r0, row_max, lmap):
    """A fresh fp32 chunk d = z(x) − z(m) for rows [r0, r0 + t1 − t0), and its validity.

    Invalid rows are zeroed first (they may hold NaN). ``row_max`` None: m is the chunk's own row
    max (sweep 1), else the saved one (sweep 2). Also returns the raw m used and, with softcap, the
    raw chunk (its slope needs it); without softcap the work is done in place on one buffer.
    """
    valid = target[r0:r0 + t1 - t0] >= 0
    x = logits[b, t0:t1].to(torch.float32, copy=True)
    x.masked_fill_(~valid.unsqueeze(-1), 0.0)
    m = x.amax(-1, keepdim=True) if row_max is None else row_max[r0:r0 + t1 - t0].unsqueeze(-1)
    if lmap.softcap:
        d = torch.tanh(lmap.in_scale * x).sub_(torch.tanh(lmap.in_scale * m)).mul_(lmap.out_scale)
        return d, valid, m, x
    return x.sub_(m).mul_(lmap.in_scale), valid, m, None


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
        d, valid, m, _ = _shifted_logits(logits, target, b, t0, t1, r0, None, lmap)
        e = d.exp()                                     # max(d) = 0, so Σ e ≥ 1: no overflow
        sum_e = e.sum(-1)
        log_sum = sum_e.log()
        d_y = d.gather(-1, target[r0:r1].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.row_max[r0:r1] = torch.where(valid, m.squeeze(-1), 0.0)
        out.log_sum[r0:r1] = torch.where(valid, log_sum, 0.0)
        out.logp[r0:r1] = torch.where(valid, d_y - log_sum, 0.0)
        if with_entropy:
            # H = log s − Σ e·d / s; e·d is 0, not NaN, where d = −inf.
            e_d = torch.where(e > 0, e.mul_(d), 0.0).sum(-1)
            out.entropy[r0:r1] = torch.where(valid, log_sum - e_d / sum_e, 0.0)
    if with_loss and N > 0:
        valid = target >= 0
        out.psi[:], out.zeta[:], out.loss[:], out.coef[:] = _token_terms(
            out.logp, valid, old, adv, g, ref, hp
        )
    return out


def mhpo_bwd(logits, grad, target, row_max, log_sum, dlogp, entropy, dentropy, lmap):
    """Sweep 2 in PyTorch; see ``kernels.backward`` for the derivation."""
    for b, t0, t1, r0 in _chunks(logits):
        r1 = r0 + t1 - t0
        logprobs, valid, _, x = _shifted_logits(logits, target, b, t0, t1, r0, row_max, lmap)
        logprobs.sub_(log_sum[r0:r1].unsqueeze(-1))
        dlogp_c = torch.where(valid, dlogp[r0:r1], 0.0).unsqueeze(-1)
        dz = logprobs.exp()                             # p, then overwritten with ∂L/∂z
        if dentropy is not None:
            dent = torch.where(valid, dentropy[r0:r1], 0.0).unsqueeze(-1)
            h = entropy[r0:r1].unsqueeze(-1)
            ent_term = torch.where(dz > 0, dz * (logprobs + h), 0.0).mul_(dent)
        dz.mul_(-dlogp_c).scatter_add_(-1, target[r0:r1].clamp(min=0).unsqueeze(-1), dlogp_c)
        if dentropy is not None:
            dz.sub_(ent_term)
        if lmap.softcap:
            dz.mul_(_sech2(lmap.in_scale * x).mul_(lmap.out_scale * lmap.in_scale))
        else:
            dz.mul_(lmap.in_scale)
        dz.masked_fill_(~valid.unsqueeze(-1), 0.0)
        grad[b, t0:t1] = dz
    return grad
