"""The per-token and per-sequence epilogue in PyTorch: what follows the sweeps' log-probs on (N,)
vectors, in float64 where the textbook formulas are accurate, rounded to fp32 at the end. The
PyTorch path (``torch_sweeps``), the GSPO step between the sweeps (``ops``), vocabulary
parallelism (``vocab_parallel``) and ``mhpo_token_loss`` all use it; the Triton kernels hold
the same math in ``kernels/token_math.py``, and ``reference/`` defines it independently."""

import math

import torch
import torch.nn.functional as F

from .objectives import CISPO_KIND, GPG_KIND, MHPO_KIND, PPO_CLIP_KIND, SAPO_KIND

LN2 = math.log(2.0)


def segment_ids(cu, n):
    """The sequence index of each of n tokens from the boundaries cu (an empty sequence holds none)."""
    positions = torch.arange(n, device=cu.device, dtype=torch.int64)
    # The clamp keeps malformed boundaries (refused by the value checks) from indexing out of range.
    return (torch.bucketize(positions, cu, right=True) - 1).clamp_(min=0).clamp_(max=cu.numel() - 2)


def left_out(logp, truncated, old=None):
    """(N,) bool: the tokens a truncated loss leaves out (SPEC.md, section 9): a log-prob of −inf
    in a ``truncated`` row (a target outside its kept set), or an ``old`` log-prob of −inf (an
    objective that reads none passes None). ``kernels/prepare.py`` holds the same rule."""
    out = truncated & (logp == -math.inf)
    return out if old is None else out | (old == -math.inf)


def per_sequence_sum(x, seq_id, n_seqs):
    """Σ of x (N,) over each sequence's tokens: (S,), in x's dtype, 0 for an empty sequence.
    ``seq_id`` (N,) is non-decreasing: tokens in sequence order, as ``segment_ids`` gives them.

    Bitwise reproducible on every device, with no atomics and no host sync: a segmented reduction
    over the boundaries, each sequence summed in an order fixed by the boundaries alone (on CUDA a
    ``cub::DeviceSegmentedReduce``, run-to-run deterministic; on CPU left to right). Not
    ``index_add_``, whose CUDA kernel adds with atomics in whatever order the threads arrive, nor
    a difference of a running sum (``cumsum`` of a floating CUDA tensor is nondeterministic)."""
    starts = torch.arange(n_seqs + 1, device=seq_id.device, dtype=seq_id.dtype)
    # Where each sequence starts: cu itself for well-formed boundaries; the cummax keeps malformed
    # ones (refused, maybe after this runs) non-decreasing within [0, N]. ``unsafe``: no host read.
    bounds = torch.searchsorted(seq_id, starts).cummax(0).values
    return torch.segment_reduce(x, "sum", offsets=bounds, unsafe=True)


def sech2(u):
    """sech²(u) = 4e/(1 + e)², e = exp(−2|u|): never 1 − tanh² (see SPEC.md, section 2)."""
    e = torch.exp(-2.0 * u.abs())
    return 4.0 * e / (1.0 + e) ** 2


def ppo_clip(ratio, adv, eps_low, eps_high, dual_clip):
    """See ``kernels.token_math._ppo_clip``: (loss, d loss / d log r)."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    coef = torch.where(unclipped >= clipped, unclipped, 0.0)
    if dual_clip > 0:
        capped = (adv < 0) & (loss > -adv * dual_clip)
        loss, coef = torch.where(capped, -adv * dual_clip, loss), torch.where(capped, 0.0, coef)
    return loss, coef


def objective_terms(logp, log_ratio, adv, hp):
    """(loss_t, d loss_t / d logp_t, ψ, ζ) of a token-level objective; ``token_math._token_loss``
    line for line, in float64."""
    zero = torch.zeros_like(log_ratio)
    if hp.kind == MHPO_KIND:
        c, k_pos, lam_pos, k_neg, lam_neg = hp.values
        if hp.lfm:
            psi, dpsi = c * torch.tanh(log_ratio / c), sech2(log_ratio / c)
        else:
            psi, dpsi = log_ratio, zero + 1.0
        zeta = (F.softplus(psi) / lam_pos) ** k_pos + (F.softplus(-psi) / lam_neg) ** k_neg if hp.dhp else zero
        w = torch.exp(psi - zeta)
        return -w * adv, -adv * w * dpsi, psi, zeta
    if hp.kind == PPO_CLIP_KIND:
        eps_low, eps_high, dual_clip = hp.values[:3]
        return (*ppo_clip(log_ratio.exp(), adv, eps_low, eps_high, dual_clip), log_ratio, zero)
    if hp.kind == CISPO_KIND:
        max_ratio, min_ratio = hp.values[:2]
        w = log_ratio.exp().clamp(min_ratio, max_ratio)
        return -w * adv * logp, -w * adv, log_ratio, zero
    if hp.kind == SAPO_KIND:
        tau_pos, tau_neg = hp.values[:2]
        ratio = log_ratio.exp()
        tau = torch.where(adv > 0, tau_pos, tau_neg)
        x = tau * (ratio - 1.0)
        gate = torch.sigmoid(x)
        slope = gate * torch.sigmoid(-x)   # σ(1 − σ) without 1 − σ's cancellation (kernels/token_math.py)
        return -gate * (4.0 / tau) * adv, torch.where(slope > 0, -adv * 4.0 * slope * ratio, 0.0), log_ratio, zero
    if hp.kind == GPG_KIND:
        return -adv * logp, -adv + zero, log_ratio, zero
    raise ValueError(f"no token-level epilogue for objective kind {hp.kind}")


def token_terms(logp, valid, old, adv, g, ref, hp):
    """The per-token epilogue (ψ, ζ, g·loss_t, g·d loss_t/d logp), in float64 on (N,) vectors,
    returned in fp32 (float64 for float64 log-probs)."""
    f64, out_dtype = torch.float64, logp.dtype if logp.dtype == torch.float64 else torch.float32
    logp = logp.to(f64)
    log_ratio = logp - old.to(f64) if old is not None else torch.zeros_like(logp)
    adv = adv.to(f64)
    loss, coef, psi, zeta = objective_terms(logp, log_ratio, adv, hp)
    if ref is not None:
        d = ref.to(f64) - logp
        loss = loss + hp.beta * (torch.expm1(d) - d)
        coef = coef - hp.beta * torch.expm1(d)
    coef = torch.where(loss.isnan(), loss, coef)   # as the kernels: a NaN term, a NaN row
    g = g.to(f64)

    def out(x):
        return torch.where(valid, x, torch.zeros_like(x)).to(out_dtype)

    return out(psi), out(zeta), out(g * loss), out(g * coef)


def sequence_terms(logp, valid, old, adv, g, ref, hp, seq_id, n_seqs):
    """GSPO's sequence-level epilogue on (N,) vectors of tokens in ``n_seqs`` sequences (``seq_id``
    the sequence of each token), in float64: (log s_i per token, the sequence term's derivative
    share, g·loss_t, g·d(KL term)/d logp).

    s_i = exp(mean over the valid tokens of sequence i of log r), loss_i = PPO-clip of s_i with
    the sequence's advantage. Every valid token carries loss_i; since loss_i depends on each of
    the sequence's log-probs through the mean, d loss_i / d logp_u = (d loss_i / d log s_i) / n_i,
    the "share" returned for each valid token u: the backward multiplies it by Σ_t g_t · ∂L/∂loss_t
    over the sequence."""
    f64, out_dtype = torch.float64, logp.dtype if logp.dtype == torch.float64 else torch.float32
    v = valid.to(f64)
    logp = logp.to(f64)
    log_ratio = logp - old.to(f64) if old is not None else torch.zeros_like(logp)
    log_ratio = torch.where(valid, log_ratio, 0.0)

    def per_seq(x):
        return per_sequence_sum(x, seq_id, n_seqs)

    n = per_seq(v).clamp(min=1.0)
    log_s = per_seq(log_ratio) / n
    adv_seq = per_seq(torch.where(valid, adv.to(f64), 0.0)) / n
    eps_low, eps_high = hp.values[:2]
    loss_seq, dlog_s = ppo_clip(log_s.exp(), adv_seq, eps_low, eps_high, 0.0)
    dlog_s = torch.where(loss_seq.isnan(), loss_seq, dlog_s)  # a NaN sequence term: NaN rows, all of them
    loss = loss_seq[seq_id]
    share = (dlog_s / n)[seq_id]
    kl_coef = torch.zeros_like(logp)
    if ref is not None:
        d = ref.to(f64) - logp
        loss = loss + hp.beta * (torch.expm1(d) - d)
        kl_coef = -hp.beta * torch.expm1(d)
    kl_coef = torch.where(loss.isnan(), loss, kl_coef)   # a NaN token term (its KL's too): a NaN row
    g = g.to(f64)

    def out(x):
        return torch.where(valid, x, torch.zeros_like(x)).to(out_dtype)

    return out(log_s[seq_id]), out(share), out(g * loss), out(g * kl_coef)


def merge_slices(stats, owner, valid, with_entropy):
    """The global (base, log2 sum, logp, entropy) per token, fp32 (0 at invalid tokens, entropy
    None without ``with_entropy``), from every vocabulary slice's (world, N, 4) statistics:
    base b_r and log2 sum s_r of its log-sum-exp, its entropy H_r, the target's log-prob within
    it (used from the ``owner`` slice of each target).

    With rel_r = (b_r − b) + log2 s_r (b the largest base), S = Σ_r 2^rel_r and the slice's
    probability P_r = 2^rel_r / S: log2 S is the global log-sum-exp relative to b, the target's
    log-prob is its log-prob within the owner's slice plus ln P_owner, and the entropy is the
    mixture's, Σ_r P_r (H_r − ln P_r)."""
    base_r, log2_r, ent_r, logp_r = stats.double().unbind(-1)   # each (world, N)
    base = base_r.max(0).values
    rel = (base_r - base) + log2_r
    lse2_rest = torch.log2(torch.exp2(rel).sum(0))
    log_share = LN2 * (rel - lse2_rest)                         # ln P_r, −inf for an empty slice
    cols = torch.arange(valid.numel(), device=valid.device)
    owner_share = log_share[owner.clamp(min=0), cols]
    # An owner slice of share 0 (only −inf logits, or none kept) gives its target probability 0,
    # where its own log-prob within the slice is −inf − (−inf).
    logp = torch.where((owner_share == -math.inf) & lse2_rest.isfinite(), -math.inf,
                       logp_r[owner.clamp(min=0), cols] + owner_share)
    entropy = None
    if with_entropy:
        share = torch.exp(log_share)
        terms = torch.where(share == 0, 0.0, share * (ent_r - log_share))   # a NaN share stays NaN
        entropy = torch.where(valid, terms.sum(0), 0.0).float()

    def out(x):
        return torch.where(valid, x, 0.0).float()

    return out(base), out(lse2_rest), out(logp), entropy
