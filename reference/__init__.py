"""The MHPO loss in plain PyTorch: the specification (SPEC.md) written as code.

Written for clarity, not speed: log_softmax over the whole logits tensor, gather, and autograd for
the gradient. Everything is computed in the dtype it is given (promoted as eager PyTorch promotes),
so ``reference.mhpo_loss(logits.double(), ...)`` is the float64 ground truth and
``reference.mhpo_loss(logits_bf16, ...)`` is what an eager trainer computes in bf16.

Tests and benchmarks import this module; nothing else re-implements it. It is not installed with
the package.
"""

import math

import torch
import torch.nn.functional as F

AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")


def _as_batch(logits, *per_token):
    """2-D logits (N, V) are one sequence of N tokens: view everything as (1, N, ...)."""
    if logits.dim() == 3:
        return (logits, *per_token)
    return (logits.unsqueeze(0), *(None if x is None else x.reshape(1, -1) for x in per_token))


def _valid_tokens(input_ids, mask, ignore_index):
    valid = input_ids != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    return valid


def _selected_logprobs(logits, input_ids, valid, temperature, filters=None, kept=None, left_out=None):
    """log softmax(x/τ)[y] and log softmax(x/τ) over the vocabulary, for valid tokens only, and
    the (B, T) bool of the targets outside the kept set (all False without ``filters``).

    Invalid rows are replaced by zeros first, so whatever they hold (NaN, garbage ids) reaches
    neither the result nor the gradient. ``temperature`` is a number or a tensor of one τ_t per
    token (shaped like input_ids, or flat): each row is divided by its own τ_t (1 at invalid
    tokens, whose τ may be anything). ``filters``: {top_k, top_p, min_p} (SPEC.md, section 9):
    the softmax is then the truncated one, and a target outside its kept set gets −inf and no
    gradient; a row holding a NaN or +inf logit keeps every token (its results are NaN). ``kept``:
    a replayed kept set instead, (a bool shaped like ``logits``, the truncated rows) as
    ``replayed_set`` gives it: the logits outside it are never read, so whatever they hold
    reaches nothing, and a target of a truncated row whose logit is −inf is outside, as −inf
    logits are outside every kept set. ``left_out``: (B, T) bool, rows that pass no gradient at
    all (section 9): what they hold reaches no derivative, not even as 0 · NaN.
    """
    if kept is not None:
        kept, truncated_rows = kept
        logits = torch.where(kept, logits, torch.zeros_like(logits))
    logits = torch.where(valid.unsqueeze(-1), logits, torch.zeros_like(logits))
    ids = torch.where(valid, input_ids, torch.zeros_like(input_ids))
    if isinstance(temperature, torch.Tensor):  # one τ_t per token; a 0-d tensor is one τ for all
        temperature = torch.where(valid, temperature.expand(valid.numel()).reshape(valid.shape)
                                  if temperature.dim() == 0 else temperature.reshape(valid.shape), 1.0).unsqueeze(-1)
    z = logits / temperature
    outside = torch.zeros_like(valid)
    if filters:
        per_token = {name: torch.where(valid, v.reshape(valid.shape), 0) if isinstance(v, torch.Tensor) and v.dim()
                     else v for name, v in filters.items()}
        # A row whose softmax is NaN (a NaN or +inf logit, section 5) stays NaN: nothing is cut.
        nan_row = (z.detach().isnan() | (z.detach() == math.inf)).any(-1, keepdim=True)
        keep = kept_set(z.detach(), **per_token) | nan_row
        z = truncated(z, keep)
        outside = valid & ~keep.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if kept is not None:
        z = truncated(z, kept)
        outside = valid & ~kept.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if left_out is not None:
        z = torch.where(left_out.unsqueeze(-1), z.detach(), z)
    logprobs = F.log_softmax(z, dim=-1)
    logp = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if kept is not None:
        outside = outside | (valid & truncated_rows & (logp == -math.inf))
    logp = torch.where(outside, torch.full_like(logp, -math.inf), logp)
    return logp, logprobs, outside


def _any_on(filters):
    """Whether a loss truncates: a filter given as a tensor, or a number that is on (section 9)."""
    off = dict(top_k=lambda v: v <= 0, top_p=lambda v: v >= 1, min_p=lambda v: v <= 0)
    return any(torch.is_tensor(v) or not off[name](v) for name, v in (filters or {}).items())


def _per_row(value, shape, dtype):
    """A filter's value per row of ``shape`` (..., V) rows: a number, or one value per token."""
    if not isinstance(value, torch.Tensor):
        return torch.full(shape[:-1], float(value), dtype=dtype)
    return value.to(dtype).reshape(shape[:-1]) if value.dim() else value.to(dtype).expand(shape[:-1])


def kept_set(z, top_k=None, top_p=None, min_p=None):
    """The sampler's kept set (SPEC.md, section 9) of each row of ``z`` (..., V), the logits
    after the temperature, as a bool (..., V): min_p, then top_k, then top_p, each by sorting.
    A value that is None, or off (top_k ≤ 0, top_p ≥ 1, min_p ≤ 0), keeps every token."""
    keep = torch.ones_like(z, dtype=torch.bool)
    if min_p is not None:
        mp = _per_row(min_p, z.shape, z.dtype).unsqueeze(-1)
        cut = z.amax(-1, keepdim=True) + mp.clamp(min=1e-300).log()
        keep &= (mp <= 0) | (z >= cut)
    if top_k is not None:
        k = _per_row(top_k, z.shape, torch.float64).round().long().unsqueeze(-1)
        ranked = torch.where(keep, z, -math.inf).sort(-1, descending=True).values
        kth = ranked.gather(-1, (k - 1).clamp(0, z.shape[-1] - 1))
        # −inf logits are outside every kept set, but a row of −inf only is not truncated (NaN)
        some_finite = (z > -math.inf).any(-1, keepdim=True)
        keep &= (k <= 0) | ((z >= kth) & ((z > -math.inf) | ~some_finite))
    if top_p is not None:
        p = _per_row(top_p, z.shape, z.dtype).unsqueeze(-1)
        masked = torch.where(keep, z, -math.inf)
        probs = F.log_softmax(masked, -1).exp()
        ascending, order = masked.sort(-1)
        cumulative = probs.gather(-1, order).cumsum(-1)
        # Ties share their group's cumulative probability: the last one of the group, counted
        # from the smallest, so that equal values are kept or dropped together.
        last_of_group = torch.searchsorted(ascending.contiguous(), masked.contiguous(), right=True) - 1
        at_or_below = cumulative.gather(-1, last_of_group)
        top = z == torch.where(keep, z, -math.inf).amax(-1, keepdim=True)
        keep &= (p >= 1) | (at_or_below > 1 - p) | top
    return keep


def replayed_set(kept_ids, shape):
    """A replayed kept set (offsets, ids), CSR over the tokens in flat order (SPEC.md, section 9),
    as (a bool of ``shape`` (..., V), a bool of shape[:-1]: the truncated rows): row r keeps
    ids[offsets[r]:offsets[r + 1]], an empty row every token (it is not truncated)."""
    offsets, ids = (x.tolist() for x in kept_ids)
    rows = len(offsets) - 1
    kept = torch.zeros(rows, shape[-1], dtype=torch.bool)
    truncated_rows = torch.tensor([offsets[r + 1] > offsets[r] for r in range(rows)], dtype=torch.bool)
    for r in range(rows):
        kept[r, ids[offsets[r]:offsets[r + 1]]] = True
    kept[~truncated_rows] = True
    return kept.reshape(shape), truncated_rows.reshape(shape[:-1])


def truncated(z, keep):
    """The logits of the truncated distribution: −inf outside the kept set, where the gradient is
    0 times the row's (``_Truncated``)."""
    return _Truncated.apply(z, keep)


class _Truncated(torch.autograd.Function):
    """−inf outside the kept set. The loss reads no logit there: its derivative is 0 · the row's,
    0 unless the row's is NaN or infinite (a NaN token term: rule 6 of SPEC.md, section 5, whose
    row is then NaN in every element, as the kernels' 0 · p's coefficients give it)."""

    @staticmethod
    def forward(ctx, z, keep):
        ctx.save_for_backward(keep)
        return torch.where(keep, z, torch.full_like(z, -math.inf))

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, grad * 0.0), None


def _entropy(logprobs):
    """H = −Σ_v p_v log p_v; a token of zero probability adds 0 (the limit of p log p), and its
    log p = −inf is kept out of the product so that the gradient is 0 there too, not NaN."""
    probs = logprobs.exp()
    finite_logprobs = torch.where(probs > 0, logprobs, torch.zeros_like(logprobs))
    return -(probs * finite_logprobs).sum(-1)


def _next_token_positions(logits, input_ids):
    """(B, T + 1, V) logits with (B, T) ids: the T positions that predict the ids."""
    if logits.dim() == 3 and input_ids.dim() == 2 and logits.shape[1] == input_ids.shape[1] + 1:
        return logits[:, :-1]
    return logits


def _unpack(cu_seqlens, *flat):
    """A packed stream → the padded batch it stands for: (S, L) per-token tensors with L the
    longest sequence, and the (S, L) bool of the positions that hold a token. Sequence i is
    tokens cu[i]:cu[i + 1]; indexing keeps the gradient flowing back to the stream."""
    cu = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    L = max(lengths, default=0)
    device = cu_seqlens.device
    held = torch.tensor([[j < n for j in range(L)] for n in lengths], dtype=torch.bool,
                        device=device).reshape(len(lengths), L)
    index = torch.tensor([[min(a + j, max(cu[-1] - 1, 0)) for j in range(L)] for a in cu[:-1]],
                         dtype=torch.int64, device=device).reshape(len(lengths), L)
    return held, tuple(None if x is None else x[index] for x in flat)


def token_logprobs(logits, input_ids, temperature=1.0, ignore_index=-100, return_entropy=False, mask=None,
                   top_k=None, top_p=None, min_p=None, kept_ids=None):
    """log softmax(logits/τ)[input_ids] (and the entropy of softmax(logits/τ)); 0 where ignored
    or where ``mask`` is false. With ``top_k``/``top_p``/``min_p`` the softmax is the sampler's
    truncated one (SPEC.md, section 9): −inf for a target outside its kept set; with
    ``kept_ids`` (offsets, ids) the kept set is the one given (``replayed_set``)."""
    logits = _next_token_positions(logits, input_ids)
    logits3, ids, mask3 = _as_batch(logits, input_ids, mask)
    valid = _valid_tokens(ids, mask3, ignore_index)
    filters = {k: v for k, v in dict(top_k=top_k, top_p=top_p, min_p=min_p).items() if v is not None}
    kept = None if kept_ids is None else [x.to(logits.device) for x in replayed_set(kept_ids, logits3.shape)]
    logp, logprobs, outside = _selected_logprobs(logits3, ids, valid, temperature, filters, kept)
    if filters or kept is not None:  # a target outside its kept set: no log-prob gradient, not even 0 · NaN
        logp = _selected_logprobs(logits3, ids, valid, temperature, filters, kept, left_out=outside)[0]
    logp = torch.where(valid, logp, torch.zeros_like(logp)).reshape(input_ids.shape)
    if not return_entropy:
        return logp
    entropy = torch.where(valid, _entropy(logprobs), torch.zeros_like(logp.reshape(valid.shape)))
    return logp, entropy.reshape(input_ids.shape)


def hazard(psi, k_pos, lam_pos, k_neg, lam_neg):
    """The Decoupled Hazard Penalty ζ(ψ): Weibull cumulative hazards of the two shifts."""
    return (F.softplus(psi) / lam_pos) ** k_pos + (F.softplus(-psi) / lam_neg) ** k_neg


# tanh and σ written so that autograd's derivative is exact where they saturate, as SPEC.md,
# section 2 asks: torch.tanh's 1 − tanh² and torch.sigmoid's σ(1 − σ) cancel even in float64, to 0
# from |u| ≈ 19 (MHPO's modulator) and from x ≈ 37 (SAPO's gate). With e = e^{−2|u|} (tanh) or
# e^{−|x|} (σ), never above 1: tanh = (1 − e)/(1 + e), whose derivative autograd forms as
# 4e/(1 + e)² (torch.tanh itself for |u| < 1/2, where 1 − e would cancel in the value), and σ =
# 1/(1 + e) or e/(1 + e). |·| as sign · u, so that it is differentiable at 0.
def _tanh(u):
    sign = torch.where(u < 0, -1.0, 1.0)
    a = sign * u
    e = torch.exp(-2 * a)
    return sign * torch.where(a < 0.5, torch.tanh(a), (1 - e) / (1 + e))


def _sigmoid(x):
    e = torch.exp(torch.where(x < 0, 1.0, -1.0) * x)
    return torch.where(x < 0, e / (1 + e), 1 / (1 + e))


def mhpo_terms(logp, old_logp, c, k_pos, lam_pos, k_neg, lam_neg, lfm=True, dhp=True):
    """ψ (with gradient), ζ (without) and the weight w = exp(ψ − ζ) of SPEC.md, per token; without
    ``lfm`` ψ = log r (no modulator), without ``dhp`` ζ = 0 (no hazard penalty), as the ablations."""
    log_ratio = logp - old_logp
    psi = c * _tanh(log_ratio / c) if lfm else log_ratio  # Log-Fidelity Modulator
    zeta = hazard(psi.detach(), k_pos, lam_pos, k_neg, lam_neg) if dhp else torch.zeros_like(psi)  # no gradient
    weight = torch.exp(psi - zeta)
    return log_ratio, psi, zeta, weight


def _mhpo_of(objective):
    """An MHPO objective's hyperparameters and switches, as ``mhpo_terms`` takes them."""
    o = objective
    return dict(c=o.c, k_pos=o.k_pos, lam_pos=o.lam_pos, k_neg=o.k_neg, lam_neg=o.lam_neg, lfm=o.lfm, dhp=o.dhp)


def objective_loss(logp, old, adv, valid, objective):
    """Each objective's per-token loss (B, T), differentiable in ``logp``: SPEC.md, section 7,
    written directly (autograd gives the gradient). ``old`` is logp detached when on-policy."""
    from mhpo_kernels import objectives as O

    log_ratio = logp - old
    if isinstance(objective, O.MHPO):
        return -mhpo_terms(logp, old, **_mhpo_of(objective))[3] * adv
    if isinstance(objective, O.PPOClip):
        return _ppo_clip(_Ratio.apply(log_ratio), adv, objective.eps_low, objective.eps_high, objective.dual_clip)
    if isinstance(objective, O.CISPO):
        weight = torch.exp(log_ratio).clamp(objective.min_ratio, objective.max_ratio).detach()
        return -weight * adv * logp
    if isinstance(objective, O.SAPO):
        tau = torch.where(adv > 0, objective.tau_pos, objective.tau_neg)
        return -_sigmoid(tau * (_Ratio.apply(log_ratio) - 1)) * (4 / tau) * adv
    if isinstance(objective, O.GPG):
        return -adv * logp
    if isinstance(objective, O.GSPO):  # the sequence's ratio, from the mean of its tokens' log r
        v = valid.to(logp.dtype)
        n = v.sum(-1, keepdim=True).clamp(min=1)
        log_s = (torch.where(valid, log_ratio, torch.zeros_like(log_ratio)) * v).sum(-1, keepdim=True) / n
        adv_seq = (torch.where(valid, adv, torch.zeros_like(adv)) * v).sum(-1, keepdim=True) / n
        loss = _ppo_clip(_Ratio.apply(log_s), adv_seq, objective.eps_low, objective.eps_high, None)
        return loss.expand_as(logp)
    raise TypeError(f"unknown objective {objective!r}")


class _Ratio(torch.autograd.Function):
    """r = exp(log r), whose derivative passes nothing where the term's derivative in r is 0: a
    clip that binds, a gate that saturates (SPEC.md, section 7), also at r = inf, where
    autograd's 0 · inf would be NaN. A NaN upstream gradient stays NaN."""

    @staticmethod
    def forward(ctx, log_ratio):
        ratio = torch.exp(log_ratio)
        ctx.save_for_backward(ratio)
        return ratio

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return torch.where(grad == 0, torch.zeros_like(grad), grad * ratio)


def _ppo_clip(ratio, adv, eps_low, eps_high, dual_clip):
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


def aggregate(loss_tok, valid, loss_agg_mode, normalizer=None, seq_valid_tokens=None):
    """Σ_t g_t · loss_t with the aggregation of SPEC.md; an all-invalid batch gives 0.
    ``normalizer`` replaces the count (tokens, or sequences with a token) as the divisor;
    ``seq_valid_tokens`` (B,) replaces each sequence's count of valid tokens."""
    loss_tok = torch.where(valid, loss_tok, torch.zeros_like(loss_tok))
    valid = valid.to(loss_tok.dtype)
    tokens_per_seq = valid.sum(-1) if seq_valid_tokens is None else seq_valid_tokens.to(loss_tok.dtype)
    if loss_agg_mode == "token-mean":
        return loss_tok.sum() / (tokens_per_seq.sum().clamp(min=1) if normalizer is None else normalizer)
    if loss_agg_mode == "seq-mean-token-mean":
        per_seq = loss_tok.sum(-1) / tokens_per_seq.clamp(min=1)
    elif loss_agg_mode == "seq-mean-token-sum":
        per_seq = loss_tok.sum(-1)
    else:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    return per_seq.sum() / ((tokens_per_seq > 0).sum().clamp(min=1) if normalizer is None else normalizer)


def _as_rows(x, B):
    """Advantages, or values laid out as they are, as (B, 1) or (B, T): () or (1,) one for every
    token, (B,) or (B, 1) one per sequence, (B, T) one per token; B = 0 included."""
    if x.numel() == 1:
        return x.reshape(1, 1).expand(B, 1)
    return x.reshape(B, -1) if B > 0 else x.reshape(0, 1)


def mhpo_loss_from_logprobs(
    logp,
    old_logprobs,
    advantages,
    mask=None,
    *,
    c=1.5,
    k_pos=1.5,
    lam_pos=1.0,
    k_neg=2.0,
    lam_neg=0.8,
    loss_agg_mode="seq-mean-token-mean",
    ref_logprobs=None,
    beta=0.0,
    return_metrics=False,
    entropy=None,
    normalizer=None,
    objective=None,
    entropy_coef=0.0,
    seq_valid_tokens=None,
    token_weights=None,
):
    """The MHPO loss of SPEC.md from the current policy's per-token log-probs ``logp`` (B, T),
    which carry the gradient; ``mask`` (B, T) marks valid tokens (None: all). ``entropy`` (B, T),
    if given, is averaged into the metrics, and with ``entropy_coef`` > 0 (then it must carry its
    gradient) each token's loss is loss_t − entropy_coef · H_t. ``token_weights`` (laid out as
    ``advantages``) multiply each token's policy term, not its KL or entropy term."""
    valid = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
    for name, given in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        # A log-prob is ≤ 0; a finite one above 0 beyond rounding is a negative log-likelihood
        # passed by mistake (SPEC.md, section 4); non-finite values are data (section 5).
        if given is not None and not torch.compiler.is_compiling() and bool(
                (valid & (given > 1e-2) & (given < math.inf)).any()):
            raise ValueError(f"{name} holds finite values above 0 at valid tokens: log-probs are ≤ 0")
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    old = logp.detach() if old_logprobs is None else old_logprobs   # on-policy: ratio 1
    adv = _as_rows(advantages, logp.shape[0]).expand(valid.shape)
    if token_weights is not None:   # w_t multiplies the advantage (SPEC.md, section 3); 0 at invalid tokens
        w = _as_rows(token_weights, logp.shape[0]).expand(valid.shape)
        adv = adv * torch.where(valid, w, torch.zeros_like(w))
    from mhpo_kernels import objectives as O

    # MHPO's terms, of the objective's hyperparameters when it is an MHPO record; for another
    # objective only what its metrics read (no psi, zeta, survival or saturated_frac)
    mhpo = objective is None or isinstance(objective, O.MHPO)
    terms = dict(c=c, k_pos=k_pos, lam_pos=lam_pos, k_neg=k_neg, lam_neg=lam_neg)
    if objective is not None and mhpo:
        terms = _mhpo_of(objective)
    log_ratio, psi, zeta, weight = mhpo_terms(logp, old, **terms)
    loss_tok = -weight * adv if objective is None else objective_loss(logp, old, adv, valid, objective)
    if ref_logprobs is not None:
        delta = ref_logprobs - logp
        kl = torch.exp(delta) - delta - 1                      # Schulman's k3 estimator
        if beta > 0:                                           # β = 0: the term is not evaluated
            loss_tok = loss_tok + beta * kl
    # A valid token whose term is NaN has a gradient row of NaN, whatever its derivative (a select,
    # a constant, a weight's zero upstream): SPEC.md, section 5, rule 6.
    # (Added, not replaced: under GSPO the token's copy of its sequence term still reaches the others.)
    poisoned = valid & loss_tok.detach().isnan()
    loss_tok = loss_tok + torch.where(poisoned, logp * torch.where(poisoned, math.nan, 0.0), 0.0)
    if entropy_coef > 0:
        loss_tok = loss_tok - entropy_coef * entropy
    loss = aggregate(loss_tok, valid, loss_agg_mode, normalizer, seq_valid_tokens)
    if not return_metrics:
        return loss

    n_valid = valid.sum().clamp(min=1)

    def mean(x):
        return (torch.where(valid, x, torch.zeros_like(x)).sum() / n_valid).detach()

    metrics = {"abs_log_ratio": mean(log_ratio.abs())}
    if mhpo:
        metrics.update(psi=mean(psi), zeta=mean(zeta), survival=mean(torch.exp(-zeta)),
                       saturated_frac=mean((log_ratio.abs() > terms["c"]).to(logp.dtype)))
    # The shares of tokens whose ratio the clip bounds in the direction of their update (SPEC.md,
    # section 7): below the lower bound with A < 0, above the upper bound with A > 0
    bounds = {O.PPOClip: lambda o: (1 - o.eps_low, 1 + o.eps_high), O.CISPO: lambda o: (o.min_ratio, o.max_ratio)}
    if type(objective) in bounds:
        lo, hi = bounds[type(objective)](objective)
        ratio = torch.exp(log_ratio)
        metrics.update(clip_low_frac=mean(((ratio < lo) & (adv < 0)).to(logp.dtype)),
                       clip_high_frac=mean(((ratio > hi) & (adv > 0)).to(logp.dtype)))
    if entropy is not None:
        metrics["entropy"] = mean(entropy)
    metrics["logp"] = mean(logp)
    if ref_logprobs is not None:
        metrics["kl"] = mean(kl)
    return loss, metrics


def mhpo_loss(
    logits,
    input_ids,
    old_logprobs,
    advantages,
    mask=None,
    *,
    c=1.5,
    k_pos=1.5,
    lam_pos=1.0,
    k_neg=2.0,
    lam_neg=0.8,
    temperature=1.0,
    loss_agg_mode="seq-mean-token-mean",
    ref_logprobs=None,
    beta=0.0,
    ignore_index=-100,
    return_metrics=False,
    normalizer=None,
    objective=None,
    cu_seqlens=None,
    seq_valid_tokens=None,
    entropy_coef=0.0,
    top_k=None,
    top_p=None,
    min_p=None,
    token_weights=None,
    kept_ids=None,
):
    """The MHPO policy loss of SPEC.md, with the same signature as ``mhpo_kernels.mhpo_loss``
    (and ``objective``, as in ``mhpo_kernels.policy_loss``: None is MHPO with c, k, λ above)
    (less ``inplace_backward``). Logits with one more position than input_ids are sliced:
    position t predicts input_ids[:, t]. A packed stream (``cu_seqlens``) is the padded batch of
    its sequences: it is unpacked and computed as that batch. With ``top_k``/``top_p``/``min_p``
    the log-probs are the sampler's truncated ones (section 9): a target outside the kept set is
    left out like an invalid token, and so is one whose old log-prob is −inf (every objective but
    GPG, which reads none); ``outside_support`` (their share of the valid tokens) joins the
    metrics. ``kept_ids`` (offsets, ids): the kept set replayed instead, the same way."""
    filters = {k: v for k, v in dict(top_k=top_k, top_p=top_p, min_p=min_p).items() if v is not None}
    n_tokens = input_ids.numel()
    kept, truncated_rows = (None, None) if kept_ids is None else (
        x.to(logits.device) for x in replayed_set(kept_ids, (n_tokens, logits.shape[-1])))
    if cu_seqlens is not None:
        per_token = advantages.shape == input_ids.shape    # else (S,), one per sequence
        tau_tokens = torch.is_tensor(temperature) and temperature.shape == input_ids.shape
        w_tokens = token_weights is not None and token_weights.shape == input_ids.shape
        names = [k for k, v in filters.items() if torch.is_tensor(v) and v.shape == input_ids.shape]
        held, (logits, input_ids, old_logprobs, mask, ref_logprobs, adv_tokens, tau, w, kept, truncated_rows,
               *filter_values) = \
            _unpack(cu_seqlens, logits, input_ids, old_logprobs, mask, ref_logprobs, advantages if per_token else None,
                    temperature if tau_tokens else None, token_weights if w_tokens else None, kept, truncated_rows,
                    *(filters[k] for k in names))
        filters.update(zip(names, filter_values))
        advantages = adv_tokens if per_token else advantages
        token_weights = w if w_tokens else token_weights
        temperature = tau if tau_tokens else temperature
        mask = held if mask is None else held & mask.bool()
    logits = _next_token_positions(logits, input_ids)
    logits3, ids, old, mask, ref = _as_batch(logits, input_ids, old_logprobs, mask, ref_logprobs)
    kept = None if kept is None else (kept.reshape(logits3.shape), truncated_rows.reshape(logits3.shape[:-1]))
    valid = _valid_tokens(ids, mask, ignore_index)
    logp, logprobs, outside = _selected_logprobs(logits3, ids, valid, temperature, filters, kept)
    if (_any_on(filters) or kept is not None) and old is not None and type(objective).__name__ != "GPG":
        outside = outside | (valid & (old == -math.inf))   # no ratio: the old policy's kept set left it out
    if filters or kept is not None:  # a token left out passes no gradient at all (section 9)
        logp, logprobs, _ = _selected_logprobs(logits3, ids, valid, temperature, filters, kept, left_out=outside)
    share = (outside.sum() / valid.sum().clamp(min=1)).to(logp.dtype)
    valid = valid & ~outside
    if token_weights is not None:                         # laid out as the advantages
        token_weights = _as_rows(token_weights, logits3.shape[0])
    out = mhpo_loss_from_logprobs(
        logp, old, _as_rows(advantages, logits3.shape[0]), valid, c=c, k_pos=k_pos,
        lam_pos=lam_pos, k_neg=k_neg, lam_neg=lam_neg, loss_agg_mode=loss_agg_mode,
        ref_logprobs=ref, beta=beta, return_metrics=return_metrics,
        entropy=_entropy(logprobs) if return_metrics or entropy_coef > 0 else None, normalizer=normalizer,
        objective=objective, entropy_coef=entropy_coef, seq_valid_tokens=seq_valid_tokens,
        token_weights=token_weights,
    )
    if return_metrics and (filters or kept is not None):
        out[1]["outside_support"] = share.detach()
    return out


def policy_loss(logits, input_ids, old_logprobs, advantages, mask=None, *, objective, **kwargs):
    """``mhpo_kernels.policy_loss`` in plain PyTorch: any objective of ``mhpo_kernels.objectives``,
    every other keyword as ``mhpo_loss``."""
    return mhpo_loss(logits, input_ids, old_logprobs, advantages, mask, objective=objective, **kwargs)
