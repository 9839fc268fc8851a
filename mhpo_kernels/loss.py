"""The public ``mhpo_loss``, ``policy_loss`` and ``token_logprobs``: check the call (``_inputs``),
run the sweeps (``ops.row_stats``, or ``vocab_parallel.row_stats`` over a split vocabulary)."""

from typing import NamedTuple

import torch

from . import _dispatch, ops, vocab_parallel
from ._inputs import (
    check_flag, check_grad_in_forward, check_inplace, check_kept_ids, check_logits, check_nonnegative, check_positive,
    check_sampling, check_temperature, check_tp_group, prepare_mhpo, prepare_tokens,
)
from ._sweep_types import (
    AGG_MODES, CLIP_METRICS, METRICS, MHPO_METRICS, OTHER_METRICS, LogitMap, TokenParams, clip_bounds, mhpo_token_params,
)
from .objectives import MHPO, MHPO_KIND, check_objective
from .ops import LOSS_AND_METRICS, LOSS_TOTAL
from .vocab_parallel import VocabSlice, agreed_settings, dtype_name, normalizer_setting


def mhpo_params(c, k_pos, lam_pos, k_neg, lam_neg, beta):
    """Checked MHPO hyperparameters: c, k, λ finite and > 0, β finite and ≥ 0."""
    shapes = dict(c=c, k_pos=k_pos, lam_pos=lam_pos, k_neg=k_neg, lam_neg=lam_neg)
    return mhpo_token_params(**{name: check_positive(name, v) for name, v in shapes.items()},
                             beta=check_nonnegative("beta", beta))


class RefusedObjective(NamedTuple):
    """``mhpo_loss``'s hyperparameters that failed their checks, with a tp_group: raised inside
    ``prepare()``, so that every rank hears of it before the first collective."""

    error: Exception


def mhpo_objective(c, k_pos, lam_pos, k_neg, lam_neg, beta, tp_group):
    """``MHPO`` with ``mhpo_loss``'s hyperparameters, errors naming its arguments."""
    try:
        return MHPO(*mhpo_params(c, k_pos, lam_pos, k_neg, lam_neg, beta).values)
    except (TypeError, ValueError) as error:
        if tp_group is None:
            raise
        return RefusedObjective(error)


def resolve_objective(objective):
    """The checked objective of a call (MHPO by default), or a RefusedObjective's error."""
    if isinstance(objective, RefusedObjective):
        raise objective.error
    return MHPO() if objective is None else check_objective(objective)


def check_policy_options(chosen, beta, entropy_coef, min_p, top_k, top_p, kept_ids, seq_valid_tokens,
                         grad_in_forward=False, tp_group=None):
    """(TokenParams, Sampling, kept_ids) of a policy loss's options, checked, with the objective
    ``chosen`` (``resolve_objective``'s)."""
    check_nonnegative("entropy_coef", entropy_coef)
    check_grad_in_forward(grad_in_forward, chosen, tp_group, entropy_coef)
    sampling = check_sampling(min_p, top_k, top_p)
    kept = check_kept_ids(kept_ids, sampling)
    if sampling.on or kept is not None:  # the weights are formed after the sweep, from every kept set
        if seq_valid_tokens is not None:
            raise NotImplementedError("min_p, top_k, top_p and kept_ids with seq_valid_tokens are not supported: "
                                      "the other ranks' counts cannot leave out this rank's targets outside the "
                                      "kept set")
        if grad_in_forward:
            raise ValueError("grad_in_forward=True is not supported with min_p, top_k or top_p, nor kept_ids: "
                             "the loss's weights need the kept set of every token, known only after the sweep")
    return TokenParams.of(chosen, check_nonnegative("beta", beta)), sampling, kept


class Prepared(NamedTuple):
    hp: TokenParams
    lmap: LogitMap
    logits3: torch.Tensor
    shifted: bool
    batch: object
    inplace: bool


def prepared(prepare, tp_group, x, settings, local_size=lambda p: p.logits3.shape[-1]):
    """``prepare()``'s checked arguments (``x``: the logits, or the hidden states). With a
    tp_group, any error of ``prepare()`` or ``settings(prepared)`` (name → value of what must
    agree across ranks) is caught and told to the other ranks in the agreement
    (``VocabSlice.agree``), which raises the same verdict on every rank, the ids' upper bound
    against the global vocabulary included; then ``batch.tp`` is this rank's slice of the
    vocabulary, ``local_size(prepared)`` long."""
    if check_tp_group(tp_group) is None:
        return prepare()
    p = batch = agreed = error = None
    try:
        p = prepare()
        batch = p.batch
        agreed = settings(p)
    except Exception as e:  # whatever it is, the other ranks must hear of it before they wait
        error = e
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    size = local_size(p) if batch is not None else 0
    batch.tp = VocabSlice.agree(tp_group, size, device, batch=batch, local_error=error, settings=agreed)
    return p


def metrics_from_vector(vector, hp, has_ref, truncated=False):
    """The metrics dict of the finalize reduction's vector, detached 0-d views: those SPEC.md
    sections 4 and 7 list for the objective ``hp`` (ψ, ζ, survival, saturated share for MHPO only; the
    clipped shares for PPO-clip and CISPO), kl with reference log-probs, and ``outside_support``
    where the call names a truncation."""
    own = MHPO_METRICS if hp.kind == MHPO_KIND else CLIP_METRICS if clip_bounds(hp) else OTHER_METRICS
    names = own + (("kl",) if has_ref else ()) + (("outside_support",) if truncated else ())
    return {name: vector.detach()[METRICS.index(name)] for name in names}


def normalizer_tensor(normalizer, device, lmap):
    """The normalizer as a truncated loss's second prepare launch reads it: None, or 0-d fp32 on
    ``device`` (a number by arithmetic, so a new value is no recompile). None untruncated."""
    if normalizer is None or not lmap.truncated:
        return None
    if isinstance(normalizer, torch.Tensor):
        return normalizer.detach().to(device=device, dtype=torch.float32)
    return torch.zeros((), dtype=torch.float32, device=device) + normalizer


def mhpo_loss(
    logits, input_ids, old_logprobs, advantages, mask=None, *, c=1.5, k_pos=1.5, lam_pos=1.0, k_neg=2.0,
    lam_neg=0.8, temperature=1.0, loss_agg_mode="seq-mean-token-mean", ref_logprobs=None, beta=0.0, ignore_index=-100,
    return_metrics=False, normalizer=None, inplace_backward=False, tp_group=None, cu_seqlens=None,
    seq_valid_tokens=None, entropy_coef=0.0, grad_in_forward=False, grad_scale=1.0, min_p=None, top_k=None,
    top_p=None, token_weights=None, kept_ids=None,
):
    """The MHPO policy loss, fused: a scalar fp32 tensor whose gradient flows to ``logits``.
    (``policy_loss`` with ``objective=MHPO(c, k_pos, lam_pos, k_neg, lam_neg)``.)

    Equals, in plain PyTorch (``reference.mhpo_loss`` is exactly this, evaluated in float64):

        logp  = log_softmax(logits / τ, -1).gather(-1, input_ids)        per token
        log_r = logp − old_logprobs                                      (0 when old is None)
        ψ     = c · tanh(log_r / c)
        ζ     = (softplus(sg[ψ]) / λ₊)^k₊ + (softplus(−sg[ψ]) / λ₋)^k₋    (no gradient)
        loss_t = −exp(ψ − ζ) · A  +  β · (e^d − d − 1),  d = ref_logprobs − logp
        loss  = Σ_t g_t · loss_t over valid tokens (mask true, id ≠ ignore_index)

    with g_t from ``loss_agg_mode``: "seq-mean-token-mean" (mean over each sequence's valid
    tokens, then over sequences that have any), "token-mean", or "seq-mean-token-sum". An
    all-invalid batch gives 0 and a zero gradient. ``SPEC.md`` has the full definition.

    A framework that packs its sequences into one flat stream (verl's remove-padding, slime,
    AReaL, prime-rl, NeMo-RL, ROLL) passes the stream and its boundaries:

        logits = model(packed_ids, cu_seqlens=cu).logits[0]   # (N, V), N tokens of S sequences
        loss = mhpo_loss(logits, target_ids, old_logprobs, advantages, mask, cu_seqlens=cu)

    A trainer with a padded batch passes the model's logits whole, one position longer than the
    completion (the next-token shift), with no slice:

        logits = model(input_ids).logits                      # (B, T + 1, V)
        loss = mhpo_loss(logits, input_ids[:, 1:], old_logprobs, advantages, mask)

    Arguments (every one in docs/api.md):
        logits: (B, T, V), (B, T + 1, V) (the next-token shift) or (N, V); float32, bfloat16 or
            float16 (float64 on the PyTorch path).
        input_ids: (B, T) or (N,) ids; each in [0, V) at valid tokens.
        old_logprobs, ref_logprobs: log-probs (≤ 0) shaped like input_ids; old None: on-policy.
        advantages: per token (input_ids' shape), per sequence ((B,), (B, 1); with cu_seqlens
            (S,), (S, 1)), or one for all (() or (1,)).
        mask: optional bool or 0/1, shaped like input_ids; ignore_index marks invalid ids too.
        c, k_pos, lam_pos, k_neg, lam_neg: finite > 0; beta ≥ 0 (β > 0 needs ref_logprobs).
        temperature: τ > 0, a number or one per token (a tensor shaped like input_ids).
        loss_agg_mode, normalizer: the g_t above; normalizer replaces the local count.
        return_metrics: also return a dict of detached 0-d means over valid tokens.
        inplace_backward: the backward writes ∂L/∂logits into the logits' storage.
        tp_group, cu_seqlens, seq_valid_tokens: a split vocabulary, packed sequences, sequences
            split over context-parallel ranks (docs/parallelism.md, docs/training-loops.md).
        entropy_coef: ≥ 0, subtracts entropy_coef · Σ_t g_t H_t.
        grad_in_forward, grad_scale: the logits' gradient computed in the forward
            (docs/one-sweep.md).
        min_p, top_k, top_p: the sampler's truncated softmax (SPEC.md, section 9; as in
            ``token_logprobs``): a target outside its kept set leaves the aggregation like an
            invalid token (metric ``outside_support``).
        kept_ids: the sampler's kept set replayed, (offsets, ids) as in ``token_logprobs``.
        token_weights: w_t ≥ 0 (no gradient), laid out as the advantages may be: multiplies each
            token's policy term, not its KL or entropy term (a rollout correction's weights:
            verl's ``rollout_is_weights``, TRL's vLLM importance-sampling ratio).

    old_logprobs, advantages and ref_logprobs are data: no gradient reaches them. CUDA tensors
    run the Triton kernels; CPU tensors run them under Triton's interpreter with
    ``TRITON_INTERPRET=1``, and otherwise a PyTorch version of the same sweeps
    (docs/where-it-runs.md).
    """
    objective = mhpo_objective(c, k_pos, lam_pos, k_neg, lam_neg, beta, tp_group)
    return policy_loss(logits, input_ids, old_logprobs, advantages, mask, objective=objective, temperature=temperature,
                       loss_agg_mode=loss_agg_mode, ref_logprobs=ref_logprobs, beta=beta, ignore_index=ignore_index,
                       return_metrics=return_metrics, normalizer=normalizer, inplace_backward=inplace_backward,
                       tp_group=tp_group, cu_seqlens=cu_seqlens, seq_valid_tokens=seq_valid_tokens,
                       entropy_coef=entropy_coef, grad_in_forward=grad_in_forward, grad_scale=grad_scale,
                       min_p=min_p, top_k=top_k, top_p=top_p, token_weights=token_weights, kept_ids=kept_ids)


def policy_loss(
    logits, input_ids, old_logprobs, advantages, mask=None, *, objective=None, temperature=1.0,
    loss_agg_mode="seq-mean-token-mean", ref_logprobs=None, beta=0.0, ignore_index=-100, return_metrics=False,
    normalizer=None, inplace_backward=False, tp_group=None, cu_seqlens=None, seq_valid_tokens=None, entropy_coef=0.0,
    grad_in_forward=False, grad_scale=1.0, min_p=None, top_k=None, top_p=None, token_weights=None, kept_ids=None,
):
    """A policy loss of the GRPO family, fused: MHPO (the default), its ablations, PPO-clip (GRPO,
    DAPO, BNPO, Dr. GRPO), CISPO, SAPO, GPG or GSPO, chosen by ``objective`` (a record from
    ``mhpo_kernels.objectives``, e.g. ``PPOClip(eps_low=0.2, eps_high=0.28)``).

    Every other argument is ``mhpo_loss``'s, with the same meaning: the loss is Σ_t g_t · loss_t
    over valid tokens, with each objective's loss_t (SPEC.md, section 7), plus β · k3 when a
    reference is given, and the same aggregation modes and ``normalizer``. Token-level objectives
    run the same two sweeps with a different per-token epilogue; GSPO computes its sequence
    ratios between the sweeps (O(N), no third pass over the logits) and needs one advantage per
    sequence, (B,) or (B, T) constant over each sequence's valid tokens. ``return_metrics`` gives
    abs_log_ratio, entropy, logp, kl (when a reference is given), for MHPO also psi, zeta,
    survival and saturated_frac, and for PPOClip and CISPO clip_low_frac and clip_high_frac (the
    shares of tokens whose ratio the clip bounds: below the lower bound with A < 0, above the
    upper with A > 0). GSPO is not available with ``tp_group`` or ``seq_valid_tokens``,
    nor with ``grad_in_forward``. ``token_weights`` multiply each token's policy term, under GSPO
    each token's copy of its sequence's term (they may vary within a sequence, as TRL's per-token
    vLLM ratio does).
    """
    def prepare():  # with a tp_group, every rank hears of any error raised in here
        chosen = resolve_objective(objective)
        if chosen.sequence_level and tp_group is not None:
            raise NotImplementedError("GSPO with tp_group is not supported: its sequence ratios need the "
                                      "global log-probs before the epilogue")
        if chosen.sequence_level and seq_valid_tokens is not None:
            raise NotImplementedError("GSPO with seq_valid_tokens (a sequence split over ranks) is not "
                                      "supported: its sequence ratio needs the log-probs of every rank")
        hp, sampling, kept = check_policy_options(chosen, beta, entropy_coef, min_p, top_k, top_p, kept_ids,
                                                  seq_valid_tokens, grad_in_forward, tp_group)
        check_positive("grad_scale", grad_scale)
        check_flag("return_metrics", return_metrics)
        tau_value, tau = check_temperature(temperature)
        logits3, token_shape, shifted = check_logits(logits, input_ids, tp_group)
        inplace = check_inplace(logits, logits3, inplace_backward)   # a host check: before the launch
        batch = prepare_mhpo(
            input_ids, token_shape, logits.shape[-1] if tp_group is None else None, logits.device,
            old_logprobs, advantages, mask, ref_logprobs, beta, loss_agg_mode, ignore_index,
            normalizer=normalizer, cu_seqlens=cu_seqlens, seq_valid_tokens=seq_valid_tokens, temperature=tau,
            sequence_level=chosen.sequence_level, sampling=sampling, token_weights=token_weights, kept_ids=kept,
        )
        lmap = LogitMap.make(tau_value, tau=batch.tau, **batch.truncation(),
                             backend=_dispatch.call_backend(logits.device))
        return Prepared(hp, lmap, logits3, shifted, batch, inplace)

    def settings(p):
        return agreed_settings(
            "policy_loss", p.hp, p.lmap, loss_agg_mode=loss_agg_mode, normalizer=normalizer_setting(normalizer),
            old_logprobs_given=old_logprobs is not None, ref_logprobs_given=ref_logprobs is not None,
            seq_valid_tokens_given=seq_valid_tokens is not None, entropy_coef=float(entropy_coef),
            return_metrics=bool(return_metrics), shifted=p.shifted, inplace_backward=p.inplace,
            kept_ids_given=kept_ids is not None,
            dtypes=tuple(map(dtype_name, (logits, old_logprobs, advantages, mask, ref_logprobs, token_weights))))

    hp, lmap, logits3, shifted, batch, inplace = prepared(prepare, tp_group, logits, settings)
    entropy_coef = float(entropy_coef)  # checked in prepare()
    # The one sweep computes a gradient: only where a backward can ask for it (under no_grad, or
    # for logits that do not require grad, it would cost a logits-sized buffer, and in place
    # would overwrite logits that no backward hands a gradient for).
    one_sweep = bool(grad_in_forward) and torch.is_grad_enabled() and logits.requires_grad
    sweeps = ops.row_stats if tp_group is None else vocab_parallel.row_stats
    _, loss, metrics = sweeps(
        logits3, batch, hp, lmap, bool(return_metrics) or entropy_coef > 0, shifted=shifted, inplace_backward=inplace,
        grad_in_forward=one_sweep, totals=LOSS_AND_METRICS if return_metrics else LOSS_TOTAL,
        entropy_coef=entropy_coef, grad_scale=grad_scale, agg=AGG_MODES.index(loss_agg_mode),
        normalizer=normalizer_tensor(normalizer, logits.device, lmap))
    if not return_metrics:
        return loss
    return loss, metrics_from_vector(metrics, hp, batch.ref is not None,
                                     truncated=any(v is not None for v in (min_p, top_k, top_p, kept_ids)))


def token_logprobs(logits, input_ids, temperature=1.0, ignore_index=-100, return_entropy=False,
                   inplace_backward=False, tp_group=None, mask=None, *, min_p=None, top_k=None, top_p=None,
                   kept_ids=None):
    """log softmax(logits / τ)[input_ids] in fp32, fused and differentiable.

    Equals ``log_softmax(logits.float() / τ, -1).gather(-1, input_ids[..., None])[..., 0]``
    (and, with ``return_entropy=True``, also ``−Σ_v p_v log p_v`` of that softmax), without
    materializing either. Positions where ``input_ids == ignore_index`` or ``mask`` (optional, bool
    or 0/1, shaped like input_ids) is false give 0 for both and pass no gradient; both results are
    differentiable. Shapes: logits (B, T, V), (B, T + 1, V) (the next-token shift, as in
    ``mhpo_loss``) or (N, V) in float32/bfloat16/float16; input_ids (B, T) or (N,); results have
    input_ids' shape, dtype float32. ``temperature`` (a number or one τ per token),
    ``inplace_backward`` and ``tp_group`` as in ``mhpo_loss``. Runs where ``mhpo_loss`` runs.

    ``min_p``, ``top_k``, ``top_p`` (each a number or one per token, like ``temperature``):
    the log-probs and entropy of the sampler's truncated softmax, renormalized over the tokens
    it keeps: p ≥ min_p · max p, then the k largest (with ties), then the smallest set of the
    largest whose mass reaches top_p (SPEC.md, section 9). Off: None, min_p ≤ 0, top_k ≤ 0,
    top_p = 1. A target outside the kept set gets −inf and no log-prob gradient. With
    ``tp_group``, the filters see every slice (docs/parallelism.md).

    ``kept_ids``: the kept set replayed instead, as the sampler drew it: a pair (offsets, ids) of
    integer tensors, CSR over the N tokens in input_ids' flat order (row r keeps
    ``ids[offsets[r]:offsets[r + 1]]``, each id once, in [0, V); an empty row is not truncated).
    The forward reads only the kept logits of such a row (and the target's), the backward
    writes its gradient row without reading it. Not with the filters above. With ``tp_group``
    every rank passes the same global kept set and reads its own slice's ids.
    """
    def prepare():
        check_flag("return_entropy", return_entropy)
        tau_value, tau = check_temperature(temperature)
        sampling = check_sampling(min_p, top_k, top_p)
        kept = check_kept_ids(kept_ids, sampling)
        logits3, token_shape, shifted = check_logits(logits, input_ids, tp_group)
        inplace = check_inplace(logits, logits3, inplace_backward)
        batch = prepare_tokens(input_ids, token_shape, logits.shape[-1] if tp_group is None else None,
                               logits.device, ignore_index, mask, temperature=tau, sampling=sampling, kept_ids=kept)
        lmap = LogitMap.make(tau_value, tau=batch.tau, **batch.truncation(),
                             backend=_dispatch.call_backend(logits.device))
        return Prepared(mhpo_token_params(), lmap, logits3, shifted, batch, inplace)

    def settings(p):
        return agreed_settings("token_logprobs", p.hp, p.lmap, return_entropy=bool(return_entropy),
                               shifted=p.shifted, inplace_backward=p.inplace, kept_ids_given=kept_ids is not None,
                               dtypes=(dtype_name(logits),))

    hp, lmap, logits3, shifted, batch, inplace = prepared(prepare, tp_group, logits, settings)
    sweeps = ops.row_stats if tp_group is None else vocab_parallel.row_stats
    stats = sweeps(logits3, batch, hp, lmap, return_entropy, shifted=shifted, inplace_backward=inplace)[0]
    logp = stats.logp.reshape(batch.token_shape)
    if not return_entropy:
        return logp
    return logp, stats.entropy.reshape(batch.token_shape)
