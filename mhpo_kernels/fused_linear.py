"""Hidden states and the LM head straight to the MHPO loss: the (N, V) logits never exist whole.

Since the loss is the only consumer of the logits, each chunk's logits tile is turned into its
gradient during the forward (``linear_sweeps``), and the backward only scales the stored gradients
by the upstream gradient.
"""

import numbers
from typing import NamedTuple

import torch

from . import _dispatch, linear_ops, ops
from ._config import fused_linear_chunk_rows
from ._inputs import (
    LOGIT_DTYPES, check_flag, check_float_tensor, check_kept_ids, check_positive, check_sampling,
    check_temperature, prepare_mhpo, prepare_tokens,
)
from ._op_support import once_differentiable
from ._sweep_types import AGG_MODES, LogitMap, mhpo_token_params, TokenParams
from .loss import (
    check_policy_options, metrics_from_vector, mhpo_objective, normalizer_tensor, prepared, resolve_objective,
)
from .objectives import GPG_KIND
from .vocab_parallel import agreed_settings, dtype_name, normalizer_setting


# batch_invariant's chunk when none is given: every call computes whole chunks, so the default
# tile (up to 1 GiB of logits, 268k rows at V 1000) would be mostly padding for a short batch;
# 256 rows keep each GEMM large (256 × V × H) and the padding below 256 rows.
BATCH_INVARIANT_CHUNK = 256


def _check_linear(hidden, weight, bias, logit_scale, final_logit_softcap, chunk_size, batch_invariant=False):
    """Validate the projection's arguments; returns hidden as (N, H) and the chunk rows."""
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if x is not None or name != "bias":
            check_float_tensor(name, x)
    if hidden.dim() not in (2, 3) or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must be (B, T, H) or (N, H) with H >= 1, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be (V, H) with H = {hidden.shape[-1]} and V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device}, but hidden is on {hidden.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device}, but hidden is on {hidden.device}")
    check_positive("logit_scale", logit_scale)
    if final_logit_softcap is not None:
        check_positive("final_logit_softcap", final_logit_softcap)
    if chunk_size is None:
        chunk_size = fused_linear_chunk_rows(weight.shape[0], hidden.element_size())
        if batch_invariant:
            chunk_size = min(chunk_size, BATCH_INVARIANT_CHUNK)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be None or an int (tokens per chunk), got {type(chunk_size).__name__}")
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (tokens per chunk), got {chunk_size}")
    return hidden.reshape(-1, hidden.shape[-1]), int(chunk_size)


def _autocast_inputs(hidden, weight, bias):
    """Under autocast, the LM head's GEMMs run in the autocast dtype, as ``F.linear`` would: cast
    the inputs autocast casts (float32, float16, bfloat16) differentiably once here, the others
    are left to the checks; the op itself then runs with autocast off."""
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype in LOGIT_DTYPES else x
                 for x in (hidden, weight, bias))


class _Prepared(NamedTuple):
    hp: object
    lmap: LogitMap
    hidden2d: torch.Tensor
    chunk_rows: int
    batch: object


def _needs_grad(x):
    """Whether the call computes ``x``'s gradient: with a vocabulary split, its all-reduce."""
    return torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad


def _prepared(prepare, tp_group, hidden, weight, chunk_size=None, settings=None):
    """``loss.prepared`` over the LM head's rows, with the chunk size (``settings`` hold it) that
    every rank of a tp_group makes alike: every chunk is one collective."""
    p = prepared(prepare, tp_group, hidden, settings, local_size=lambda _: weight.shape[0])
    if tp_group is not None and chunk_size is None:  # the largest slice's
        p = p._replace(chunk_rows=fused_linear_chunk_rows(max(p.batch.tp.sizes), hidden.element_size()))
    return p


def fused_linear_mhpo_loss(
    hidden, weight, input_ids, old_logprobs, advantages, mask=None, *, bias=None,
    logit_scale=1.0, final_logit_softcap=None, chunk_size=None, c=1.5, k_pos=1.5, lam_pos=1.0,
    k_neg=2.0, lam_neg=0.8, temperature=1.0, loss_agg_mode="seq-mean-token-mean",
    ref_logprobs=None, beta=0.0, ignore_index=-100, return_metrics=False, normalizer=None,
    tp_group=None, reduce_dhidden=True, cu_seqlens=None, seq_valid_tokens=None, entropy_coef=0.0, min_p=None,
    top_k=None, top_p=None, token_weights=None, batch_invariant=False, kept_ids=None,
):
    """``mhpo_loss`` on the logits of an LM head, without ever allocating N × V.

    Equals ``mhpo_loss(z, input_ids, ...)`` with every keyword of ``mhpo_loss`` (``normalizer``,
    ``cu_seqlens`` with hidden (N, H), ``seq_valid_tokens``, ``entropy_coef``, ``token_weights``,
    the sampler's filters and ``kept_ids`` included; ``inplace_backward`` has no meaning here: the
    logits tile is always its own gradient), where

        z = s · (hidden @ weight.T + bias)                      s = logit_scale
        z = cap · tanh(z / cap)                                 if final_logit_softcap (Gemma)

    and the gradient flows to ``hidden``, ``weight`` and ``bias``.

    Args:
        hidden: (B, T, H) or (N, H), float32/bfloat16/float16; input_ids etc. as in ``mhpo_loss``
            with shapes (B, T) or (N,).
        weight: (V, H) in hidden's dtype; bias: optional (V,).
        chunk_size: tokens per chunk; default: the most rows whose (rows, V) logits tile fits
            1 GiB (``_config.FUSED_LINEAR_TILE_BYTES``), a multiple of 256.
        tp_group: the vocabulary split over a ``torch.distributed`` group, as in ``mhpo_loss``:
            each rank passes its contiguous rows of the head, weight (V_r, H) and bias (V_r,), in
            rank order, and the same hidden states and global ids. Every rank returns the whole
            vocabulary's loss and metrics; its weight and bias gradients are its rows of the full
            ones. Collectives: the agreement (a few int64 per rank), one all-gather of 4 fp32 per
            token and rank per chunk of tokens (16 · chunk · world bytes received), and one
            all-reduce of dhidden (N_valid × H in hidden's dtype), in the forward; in the backward
            with a filter, a replayed kept set or fp16 hidden states (the log-probs' route), with
            the filters' counting passes in the forward (docs/parallelism.md). Whether hidden
            needs a gradient must agree across ranks: the all-reduce of dhidden runs on all or none.
        reduce_dhidden: with tp_group, sum dhidden over the group inside the op (default); False
            leaves each rank its partial dhidden, for callers whose sequence-parallel gather
            already reduces it in its backward (Megatron's).

    Memory beyond the inputs: one logits tile (chunk_size × V in hidden's dtype), the weight
    gradient accumulated in fp32 (V × H × 4 bytes: 2.5 GB at V 151,936, H 4096) and dhidden
    (N × H in hidden's dtype), all held from the forward to the backward; per-token scalars.
    The tile GEMM runs in hidden's dtype with fp32 accumulation (the logits are rounded to that
    dtype as ``hidden @ weight.T`` would be); the sweeps compute in fp32.
    """
    return fused_linear_policy_loss(
        hidden, weight, input_ids, old_logprobs, advantages, mask,
        objective=mhpo_objective(c, k_pos, lam_pos, k_neg, lam_neg, beta, tp_group), bias=bias,
        logit_scale=logit_scale, final_logit_softcap=final_logit_softcap, chunk_size=chunk_size,
        temperature=temperature, loss_agg_mode=loss_agg_mode, ref_logprobs=ref_logprobs, beta=beta,
        ignore_index=ignore_index, return_metrics=return_metrics, normalizer=normalizer, tp_group=tp_group,
        reduce_dhidden=reduce_dhidden, cu_seqlens=cu_seqlens, seq_valid_tokens=seq_valid_tokens,
        entropy_coef=entropy_coef, min_p=min_p, top_k=top_k, top_p=top_p, token_weights=token_weights,
        batch_invariant=batch_invariant, kept_ids=kept_ids)


def fused_linear_policy_loss(
    hidden, weight, input_ids, old_logprobs, advantages, mask=None, *, objective=None, bias=None,
    logit_scale=1.0, final_logit_softcap=None, chunk_size=None, temperature=1.0,
    loss_agg_mode="seq-mean-token-mean", ref_logprobs=None, beta=0.0, ignore_index=-100,
    return_metrics=False, normalizer=None, tp_group=None, reduce_dhidden=True, cu_seqlens=None,
    seq_valid_tokens=None, entropy_coef=0.0, min_p=None, top_k=None, top_p=None, token_weights=None,
    batch_invariant=False, kept_ids=None,
):
    """``policy_loss`` on the logits of an LM head: ``fused_linear_mhpo_loss`` with any token-level
    objective of ``mhpo_kernels.objectives`` (MHPO by default). GSPO is not available here: its
    sequence ratios need every chunk's log-probs before any chunk's gradient. With
    ``entropy_coef`` > 0 each chunk's gradient tile takes the entropy's part in the same backward
    sweep (∂L/∂H_t = −entropy_coef · g_t): no extra pass and no extra GEMM.

    The sampler's filters (``min_p``, ``top_k``, ``top_p``, SPEC.md, section 9), or its kept set
    replayed (``kept_ids``): a target outside its kept set leaves the aggregation, which changes
    its sequence's weights, known only once every chunk's forward ran. The loss is then the
    differentiable ``fused_linear_token_logprobs`` (1 GEMM per chunk forward, 3 backward: one GEMM
    per chunk more than untruncated) and the per-token epilogue on (N,) vectors, as the logits
    path's truncated loss."""
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)

    def prepare():  # with a tp_group, every rank hears of any error raised in here
        chosen = resolve_objective(objective)
        if chosen.sequence_level:
            raise NotImplementedError("GSPO on the fused linear path is not supported: use policy_loss on logits")
        hp, sampling, kept = check_policy_options(chosen, beta, entropy_coef, min_p, top_k, top_p, kept_ids,
                                                  seq_valid_tokens)
        _check_batch_invariant(batch_invariant, tp_group)
        check_flag("return_metrics", return_metrics)
        check_flag("reduce_dhidden", reduce_dhidden)
        hidden2d, chunk_rows = _check_linear(hidden, weight, bias, logit_scale, final_logit_softcap, chunk_size,
                                             batch_invariant)
        tau_value, tau = check_temperature(temperature)
        batch = prepare_mhpo(
            input_ids, hidden.shape[:-1], weight.shape[0] if tp_group is None else None, hidden.device,
            old_logprobs, advantages, mask, ref_logprobs, beta, loss_agg_mode, ignore_index,
            source="hidden without H", normalizer=normalizer, cu_seqlens=cu_seqlens,
            seq_valid_tokens=seq_valid_tokens, temperature=tau, token_weights=token_weights, sampling=sampling,
            kept_ids=kept,
        )
        lmap = LogitMap.make(tau_value, logit_scale, final_logit_softcap, batch.tau, **batch.truncation(),
                             backend=_dispatch.call_backend(hidden.device))
        return _Prepared(hp, lmap, hidden2d, chunk_rows, batch)

    def settings(p):
        return agreed_settings(
            "fused_linear_policy_loss", p.hp, p.lmap, chunk_size=chunk_size, loss_agg_mode=loss_agg_mode,
            normalizer=normalizer_setting(normalizer), old_logprobs_given=old_logprobs is not None,
            ref_logprobs_given=ref_logprobs is not None, bias_given=bias is not None,
            seq_valid_tokens_given=seq_valid_tokens is not None, entropy_coef=float(entropy_coef),
            return_metrics=bool(return_metrics), reduce_dhidden=bool(reduce_dhidden),
            kept_ids_given=kept_ids is not None, dhidden_needed=_needs_grad(hidden),
            dtypes=tuple(map(dtype_name, (hidden, weight, old_logprobs, advantages, mask, ref_logprobs,
                                          token_weights))))

    hp, lmap, hidden2d, chunk_rows, batch = _prepared(prepare, tp_group, hidden, weight, chunk_size, settings)
    entropy_coef = float(entropy_coef)  # checked in prepare()
    named = any(v is not None for v in (min_p, top_k, top_p, kept_ids))
    # In fp16 the tiles' gradient formed in the forward, for an upstream gradient of 1, would leave
    # fp16's range before a loss scaler's factor reached it (g_t ~ 1/N: most of it below the
    # normal range): the loss then takes the log-probs' backward, which knows that factor.
    if lmap.truncated or hidden2d.dtype == torch.float16:
        loss, metrics = _logprobs_loss(hidden2d, weight, bias, batch, hp, lmap, chunk_rows,
                                       bool(return_metrics), entropy_coef, AGG_MODES.index(loss_agg_mode),
                                       normalizer, batch_invariant, bool(reduce_dhidden))
        if not return_metrics:
            return loss
        return loss, metrics_from_vector(metrics, hp, batch.ref is not None, truncated=named)
    if tp_group is not None:
        loss, logp, entropy, psi, zeta = linear_ops.vocab_parallel_linear(
            hidden2d, weight, bias, batch, hp, lmap, chunk_rows, bool(return_metrics), bool(reduce_dhidden),
            entropy_coef)
        if not return_metrics:
            return loss
        return loss, _metrics(logp, entropy, psi, zeta, batch, hp, named)
    grad_on = torch.is_grad_enabled()
    loss, logp, entropy, psi, zeta, *_ = linear_ops.fused_linear_forward(
        hidden2d, weight, bias, batch.target, batch.old, batch.adv, batch.weight,
        batch.ref if hp.beta > 0 else None,  # β = 0: the KL term is never evaluated
        lmap.tau, ops.pack_params(hp, lmap, entropy_coef), lmap.softcap, chunk_rows, bool(return_metrics),
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, batch.n_valid, batch_invariant,
    )
    if not return_metrics:
        return loss
    return loss, _metrics(logp, entropy, psi, zeta, batch, hp, named)


def _metrics(logp, entropy, psi, zeta, batch, hp, named):
    """The metrics dict of an untruncated loss's per-token values; ``named``: the call names a
    filter or a kept set (off), so ``outside_support`` (0) is reported as on the logits."""
    vector = ops.metrics_vector(logp, entropy, psi, zeta, batch.target, batch.weight, batch.old, batch.adv,
                                batch.ref, hp)
    return metrics_from_vector(vector, hp, batch.ref is not None, truncated=named)


def _logprobs_loss(hidden2d, weight, bias, batch, hp, lmap, chunk_rows, return_metrics, entropy_coef, agg,
                   normalizer, batch_invariant, reduce_dhidden=True):
    """A policy loss from the differentiable fused log-probs (a truncated softmax, or fp16 hidden
    states): (the 0-d loss, the metrics vector (empty without ``return_metrics``)).

    The differentiable fused log-probs first; then, on (N,) vectors as ``ops`` does for logits,
    under truncation a target outside its kept set (or with an old log-prob of −inf) leaves the
    aggregation and the weights are formed again; the per-token epilogue gives each term and its
    derivative, and the finalize reduction the loss. Its gradient reaches the log-probs
    (∂L/∂logp_t = g_t · d loss_t / d logp_t) and the entropy (−entropy_coef · g_t) through
    ``_TermsGradient``, and from them the fused log-probs' backward, which knows the upstream
    gradient, takes it to hidden, weight and bias. With a vocabulary split
    (``batch.tp``) the log-probs are the global ones on every rank."""
    with_entropy = return_metrics or entropy_coef > 0
    # The tokens the loss leaves out pass no gradient at all: the log-probs' backward knows them.
    loss = dict(loss=lmap.truncated, old=None if hp.kind == GPG_KIND else batch.old)
    if batch.tp is not None:
        logp, entropy, cut = linear_ops.vocab_parallel_logprobs(hidden2d, weight, bias, batch, lmap, chunk_rows,
                                                                with_entropy, reduce_dhidden, **loss)
        cut = cut if lmap.filtered else None
    else:
        logp, entropy, _, _, cut = linear_ops.fused_linear_logprobs(
            hidden2d, weight, bias, batch.target, lmap.tau, ops.pack_params(TokenParams(), lmap), lmap.softcap,
            chunk_rows, with_entropy, batch.n_valid, **batch.truncation(), batch_invariant=batch_invariant, **loss)
    target, g = batch.target, batch.weight
    if lmap.truncated:
        target, g = ops.kept_tokens(logp.detach(), lmap, cut, batch.target, batch.old, hp.kind, batch.layout(), agg,
                                    normalizer_tensor(normalizer, logp.device, lmap))
    valid = target >= 0
    entropy = entropy if with_entropy else None
    ref = batch.ref if hp.beta > 0 else None
    psi, zeta, terms, coef = _dispatch.kernel("token_terms", logp.device)(logp.detach(), target, batch.old, batch.adv,
                                                                          g, ref, hp)
    total, metrics = _dispatch.kernel("finalize", logp.device)(
        target, terms, g, None if entropy is None else entropy.detach(), logp.detach(), psi, zeta, batch.old,
        batch.adv, batch.ref, entropy_coef, hp, metrics=return_metrics, target0=batch.target)
    dentropy = -entropy_coef * g if entropy_coef > 0 else None
    return _TermsGradient.apply(total, valid, logp, coef, entropy, dentropy), metrics


class _TermsGradient(torch.autograd.Function):
    """``total``, a loss formed on detached per-token values, with its gradient: ∂L/∂logp_t =
    coef_t and ∂L/∂H_t = dentropy_t at the valid tokens, times the upstream gradient. (Adding a
    zero-valued Σ coef · logp − its detached copy would make an infinite loss term NaN: inf − inf.)"""

    @staticmethod
    def forward(ctx, total, valid, logp, coef, entropy, dentropy):
        ctx.save_for_backward(valid, coef, dentropy)
        return total.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_total):
        valid, coef, dentropy = ctx.saved_tensors
        d_logp = torch.where(valid, d_total * coef, 0.0) if ctx.needs_input_grad[2] else None
        d_entropy = torch.where(valid, d_total * dentropy, 0.0) if dentropy is not None and ctx.needs_input_grad[4] \
            else None
        return None, None, d_logp, None, d_entropy, None


def _check_batch_invariant(batch_invariant, tp_group):
    """``batch_invariant``, a bool; not with ``tp_group`` yet."""
    if check_flag("batch_invariant", batch_invariant) and tp_group is not None:
        raise NotImplementedError("batch_invariant=True with tp_group is not supported yet: pass tp_group=None, "
                                  "or batch_invariant=False")
    return batch_invariant


def fused_linear_token_logprobs(
    hidden, weight, input_ids, *, bias=None, logit_scale=1.0, final_logit_softcap=None,
    chunk_size=None, temperature=1.0, ignore_index=-100, return_entropy=False, tp_group=None,
    reduce_dhidden=True, mask=None, min_p=None, top_k=None, top_p=None, batch_invariant=False, kept_ids=None,
):
    """``token_logprobs`` of the LM head's logits (see ``fused_linear_mhpo_loss`` for z, and for
    ``tp_group`` and ``reduce_dhidden``), chunked, without ever allocating N × V. Returns fp32
    log-probs shaped like input_ids (and the entropy of softmax(z / τ)), 0 at ignored positions and
    where ``mask`` (optional, bool or 0/1, shaped like input_ids) is false; those pass no gradient.

    Both outputs are differentiable with respect to ``hidden``, ``weight`` and ``bias``: the
    drop-in for a framework's fused (log-prob, entropy) of hidden states and head. ``temperature``
    is a number or one τ per token (a tensor shaped like input_ids, or flat), as in ``mhpo_loss``;
    ``min_p``, ``top_k``, ``top_p`` and ``kept_ids`` as in ``token_logprobs`` (the sampler's
    truncated softmax, or its kept set replayed: each chunk's tile is computed whole, the sweeps
    read only its kept logits; with ``tp_group`` too).

    Cost: the forward makes one GEMM per chunk (the logits tile) and keeps four fp32 per token
    (log-prob, entropy, and the row's log-sum-exp as base and log2 sum). The backward recomputes
    each tile (one GEMM), turns it into ∂L/∂logits in place and folds it into dhidden and dweight
    (two GEMMs): 4 GEMMs per chunk in all, one more than ``fused_linear_mhpo_loss``, whose loss
    is known in the forward; the backward holds one tile and an fp32 dweight (V × H × 4 bytes).
    Under ``torch.no_grad()``, or when none of hidden, weight, bias requires grad, nothing is
    saved: the old- and reference-policy passes cost the forward alone. With ``tp_group`` the
    forward makes the loss path's collectives and the backward only dhidden's all-reduce.

    ``batch_invariant=True`` (here and on the fused linear losses): every chunk's GEMMs and sweeps
    run on exactly ``chunk_size`` rows (default 256), the last chunk padded with rows of no token, so a token's
    log-prob, entropy, loss term and dhidden row have the same bits alone, among any number of
    other rows and at any position (on one device, for one chunk size). The cost is the padding:
    up to chunk_size − 1 rows of GEMM and sweep per call, most of the work for a short batch
    (docs/fused-linear.md). Not with ``tp_group`` yet.
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)

    def prepare():
        _check_batch_invariant(batch_invariant, tp_group)
        check_flag("return_entropy", return_entropy)
        check_flag("reduce_dhidden", reduce_dhidden)
        hidden2d, chunk_rows = _check_linear(hidden, weight, bias, logit_scale, final_logit_softcap, chunk_size,
                                             batch_invariant)
        tau_value, tau = check_temperature(temperature)
        sampling = check_sampling(min_p, top_k, top_p)
        kept = check_kept_ids(kept_ids, sampling)
        batch = prepare_tokens(input_ids, hidden.shape[:-1], weight.shape[0] if tp_group is None else None,
                               hidden.device, ignore_index, mask, source="hidden without H", temperature=tau,
                               sampling=sampling, kept_ids=kept)
        lmap = LogitMap.make(tau_value, logit_scale, final_logit_softcap, batch.tau, **batch.truncation(),
                             backend=_dispatch.call_backend(hidden.device))
        return _Prepared(mhpo_token_params(), lmap, hidden2d, chunk_rows, batch)

    def settings(p):
        return agreed_settings("fused_linear_token_logprobs", p.hp, p.lmap, chunk_size=chunk_size,
                               bias_given=bias is not None, return_entropy=bool(return_entropy),
                               reduce_dhidden=bool(reduce_dhidden), kept_ids_given=kept_ids is not None,
                               dhidden_needed=_needs_grad(hidden), dtypes=(dtype_name(hidden), dtype_name(weight)))

    _, lmap, hidden2d, chunk_rows, batch = _prepared(prepare, tp_group, hidden, weight, chunk_size, settings)
    if tp_group is not None:
        logp, entropy, _ = linear_ops.vocab_parallel_logprobs(hidden2d, weight, bias, batch, lmap, chunk_rows,
                                                              bool(return_entropy), bool(reduce_dhidden))
    else:
        logp, entropy, _, _, _ = linear_ops.fused_linear_logprobs(
            hidden2d, weight, bias, batch.target, lmap.tau, ops.pack_params(TokenParams(), lmap), lmap.softcap,
            chunk_rows, bool(return_entropy), batch.n_valid, **batch.truncation(), batch_invariant=batch_invariant)
    logp = logp.reshape(batch.token_shape)
    return (logp, entropy.reshape(batch.token_shape)) if return_entropy else logp
