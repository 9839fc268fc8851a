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


def _logit_delta(x, m, lmap):
    """z(x) − z(m) for the raw row max m; see ``kernels.token_math._logit_delta``."""
    if lmap.softcap:
        return lmap.out_scale * (torch.tanh(lmap.in_scale * x) - torch.tanh(lmap.in_scale * m))
    return (x - m) * lmap.in_scale


def _sech2(u):
    """sech²(u) = 4e/(1 + e)², e = exp(−2|u|): never 1 − tanh² (see SPEC.md, "Gradient")."""
    e = torch.exp(-2.0 * u.abs())
    return 4.0 * e / (1.0 + e) ** 2


def _logit_map_slope(x, lmap):
    if lmap.softcap:
        return lmap.out_scale * lmap.in_scale * _sech2(lmap.in_scale * x)
    return torch.full_like(x, lmap.in_scale)


def _row_chunk(logits, target, b, t0, t1, r0):
    """fp32 rows [r0, r0 + t1 − t0) of the logits, invalid rows zeroed (they may hold NaN)."""
    valid = target[r0:r0 + t1 - t0] >= 0
    x = logits[b, t0:t1].float()
    return torch.where(valid.unsqueeze(-1), x, torch.zeros_like(x)), valid


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
        x, valid = _row_chunk(logits, target, b, t0, t1, r0)
        m = x.max(-1, keepdim=True).values
        d = _logit_delta(x, m, lmap)                       # z − z(m) ≤ 0
        log_sum = torch.logsumexp(d, dim=-1, keepdim=True)
        logprobs = d - log_sum
        out.row_max[r0:r1] = torch.where(valid, m.squeeze(-1), 0.0)
        out.log_sum[r0:r1] = torch.where(valid, log_sum.squeeze(-1), 0.0)
        logp = logprobs.gather(-1, target[r0:r1].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.logp[r0:r1] = torch.where(valid, logp, 0.0)
        if with_entropy:
            p = logprobs.exp()
            plogp = torch.where(p > 0, p * logprobs, torch.zeros_like(p))
            out.entropy[r0:r1] = torch.where(valid, -plogp.sum(-1), 0.0)
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
        x, valid = _row_chunk(logits, target, b, t0, t1, r0)
        logprobs = _logit_delta(x, row_max[r0:r1].unsqueeze(-1), lmap) - log_sum[r0:r1].unsqueeze(-1)
        p = logprobs.exp()
        dlogp_c = torch.where(valid, dlogp[r0:r1], 0.0).unsqueeze(-1)
        dz = -dlogp_c * p
        dz.scatter_add_(-1, target[r0:r1].clamp(min=0).unsqueeze(-1), dlogp_c)
        if dentropy is not None:
            dent = torch.where(valid, dentropy[r0:r1], 0.0).unsqueeze(-1)
            h = entropy[r0:r1].unsqueeze(-1)
            dz -= torch.where(p > 0, dent * p * (logprobs + h), torch.zeros_like(p))
        dx = dz * _logit_map_slope(x, lmap)
        grad[b, t0:t1] = torch.where(valid.unsqueeze(-1), dx, torch.zeros_like(dx))
    return grad
