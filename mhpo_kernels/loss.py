"""The public ``mhpo_loss``, ``MHPOLoss`` and ``token_logprobs``: validate, run the sweeps (the
``ops`` custom ops, which carry the autograd formula), reduce."""

from typing import NamedTuple

import torch

from . import _dispatch
from ._inputs import (
    check_agg_mode, check_flag, check_ignore_index, check_logits, check_nonnegative, check_positive,
    check_temperature, check_tp_group, has_internal_overlap, prepare_mhpo,
    prepare_tokens,
)
from ._sweep_types import METRICS, MHPO_METRICS, OTHER_METRICS, LogitMap, mhpo_token_params, TokenParams
from .objectives import MHPO, MHPO_KIND, check_objective
from .ops import LOSS_AND_METRICS, LOSS_TOTAL, row_stats


def mhpo_params(c, k_pos, lam_pos, k_neg, lam_neg, beta):
    """Checked MHPO hyperparameters: c, k, λ finite and > 0, β finite and ≥ 0."""
    return mhpo_token_params(
        c=check_positive("c", c),
        k_pos=check_positive("k_pos", k_pos),
        lam_pos=check_positive("lam_pos", lam_pos),
        k_neg=check_positive("k_neg", k_neg),
        lam_neg=check_positive("lam_neg", lam_neg),
        beta=check_nonnegative("beta", beta),
    )


class RefusedObjective(NamedTuple):
    """Hyperparameters that failed their checks before ``policy_loss`` ran, with a tp_group: the
    error is raised among the local checks, which every rank hears of (a raise before the first
    collective would leave the other ranks waiting in it)."""

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


class Prepared(NamedTuple):
    hp: TokenParams
    lmap: LogitMap
    logits3: torch.Tensor
    shifted: bool
    batch: object
    inplace: bool


def _prepared(prepare, tp_group, logits, settings=None):
    """``prepare()``'s checked arguments; with a tp_group, only once every rank agreed on them and
    on ``settings(prepared)`` (see ``vocab_parallel.agree_on_inputs``), the slice set on the batch."""
    if check_tp_group(tp_group) is None:
        return prepare()
    from .vocab_parallel import agree_on_inputs

    device = logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")
    return agree_on_inputs(tp_group, device, prepare, settings=settings)


def dtype_name(x):
    return None if not isinstance(x, torch.Tensor) else str(x.dtype)


def agreed_settings(call, hp, lmap, **flags):
    """What every rank of a tp_group must pass alike, by name (``vocab_parallel.agree``): the
    call, the objective with its values and switches, β, the logit map (temperature, scale,
    softcap), then the call's own flags and dtypes."""
    return dict(call=call, objective=(hp.kind, hp.values, hp.lfm, hp.dhp), beta=hp.beta,
                temperature_and_logit_map=(lmap.in_scale, lmap.out_scale, lmap.softcap, lmap.tau is not None),
                **flags)


def normalizer_setting(normalizer):
    """``normalizer`` as the ranks of a tp_group must agree on it: None, or the value the loss
    divides by as a 0-d fp32 tensor (a number's on the CPU, a tensor's where it is), whose bits
    the agreement gathers without reading it on the host (``vocab_parallel.agree``)."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        return normalizer.detach().to(torch.float32)
    return torch.tensor(float(normalizer), dtype=torch.float32)


def _row_stats(logits3, batch, hp, lmap, with_entropy, shifted, inplace, tp_group, grad_in_forward=False):
    """(RowStats, None, None) of the sweeps; the tp_group's own path reduces nothing."""
    if tp_group is None:
        return row_stats(logits3, batch, hp, lmap, with_entropy=with_entropy, shifted=shifted,
                         inplace_backward=inplace, grad_in_forward=grad_in_forward)[0]
    from . import vocab_parallel

    return vocab_parallel.row_stats(logits3, batch, hp, lmap, batch.tp, with_entropy, shifted, inplace)


def check_inplace(logits, logits3, inplace_backward):
    """``inplace_backward`` overwrites the logits (``logits3``, the view the sweeps read) with their
    gradient: refuse it for a leaf that requires grad, whose values (a parameter, a test's input)
    would be lost, and for a view whose elements share memory (an ``expand``), where the rows'
    gradients would overwrite each other."""
    if not check_flag("inplace_backward", inplace_backward):
        return False
    if logits.is_leaf and logits.requires_grad:
        raise ValueError("inplace_backward=True would overwrite logits, a leaf tensor that requires "
                         "grad; use it on logits computed by the model (e.g. an LM head's output)")
    if has_internal_overlap(logits3):
        raise ValueError(f"inplace_backward=True needs logits whose elements do not share memory, got a "
                         f"view with shape {tuple(logits.shape)} and strides {logits.stride()} (e.g. an "
                         f"expand); pass inplace_backward=False or a contiguous copy")
    return True


def check_entropy_coef(entropy_coef):
    return check_nonnegative("entropy_coef", entropy_coef)


def check_grad_in_forward(grad_in_forward, objective=None, tp_group=None, entropy_coef=0.0):
    """``grad_in_forward`` is a flag, and only where the forward can know the whole gradient: a
    token-level objective (GSPO's sequence ratios come after the sweep), no tp_group (the slice's
    statistics need the group's before any gradient), and no differentiated entropy."""
    if not check_flag("grad_in_forward", grad_in_forward):
        return False
    if tp_group is not None:
        raise ValueError("grad_in_forward=True is not supported with tp_group: the gradient needs the "
                         "statistics of every rank's slice, combined after the forward sweep")
    if objective is not None and objective.sequence_level:
        raise ValueError("grad_in_forward=True is not supported with a sequence-level objective (GSPO): its "
                         "sequence ratios are formed after the sweep over the logits")
    if entropy_coef > 0:
        raise ValueError("grad_in_forward=True is not supported with entropy_coef > 0: it computes the "
                         "gradient of the loss alone, with no entropy term")
    return True


def entropy_bonus(loss, entropy_coef, weight, entropy):
    """Σ_t g_t · (loss_t − entropy_coef · H_t) from Σ_t g_t · loss_t: the entropy's gradient is
    ∂L/∂H_t = −entropy_coef · g_t, which the backward sweep folds into its one pass."""
    if entropy_coef == 0:
        return loss
    return loss - entropy_coef * (weight * entropy).sum()


def metric_names(objective, has_ref):
    """The metrics a call reports, in order: ``SPEC.md`` section 8 (ψ, ζ, survival and the
    saturated share for MHPO only; kl with reference log-probs)."""
    names = MHPO_METRICS if objective.kind == MHPO_KIND else OTHER_METRICS
    return names + (("kl",) if has_ref else ())


def metrics_from_vector(vector, objective, has_ref):
    """The metrics dict of the finalize reduction's vector: 0-d views, detached."""
    vector = vector.detach()
    return {name: vector[METRICS.index(name)] for name in metric_names(objective, has_ref)}


def metrics_of(logp, entropy, psi, zeta, batch, objective):
    """The metrics dict of per-token statistics that no sweeps op reduced (vocabulary parallelism,
    the fused linear path): the finalize reduction the op runs, on detached inputs."""
    def detached(x):
        return None if x is None else x.detach()

    _, vector = _dispatch.kernel("finalize", logp.device)(
        batch.target, None, batch.weight, detached(entropy), detached(logp), detached(psi), detached(zeta), batch.old,
        batch.ref, 0.0, objective.values()[0], mhpo=objective.kind == MHPO_KIND, metrics=True)
    return metrics_from_vector(vector, objective, batch.ref is not None)


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
    inplace_backward=False,
    tp_group=None,
    cu_seqlens=None,
    seq_valid_tokens=None,
    entropy_coef=0.0,
    grad_in_forward=False,
    grad_scale=1.0,
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

    Args:
        logits: (B, T, V), (B, T + 1, V) or (N, V), float32/bfloat16/float16. With T + 1
            positions, position t predicts ``input_ids[:, t]``; the last one predicts nothing and
            its gradient row is zero (written by the kernel: no slice, no copy, no
            ``slice_backward``). Any view whose last dim has unit stride is read in place; other
            layouts are copied once.
        input_ids: (B, T) or (N,) integer ids of the sampled tokens. At valid positions each
            must lie in [0, V); elsewhere anything goes.
        old_logprobs: (B, T) float log-probs under the rollout policy, or None for on-policy
            (old = logp detached, ratio 1).
        advantages: float, (B,) or (B, 1) per sequence, (B, T) per token, or () / (1,) for every
            token (broadcast). For 2-D logits: (N,) per token, or () / (1,); with ``cu_seqlens``,
            also (S,) or (S, 1) per sequence.
        mask: optional (B, T) bool or 0/1 completion mask.
        c, k_pos, lam_pos, k_neg, lam_neg: LFM bound and Weibull hazard shapes/scales, finite > 0.
        temperature: τ > 0, applied to the logits before the softmax: a number, or one τ_t per
            token, a floating tensor shaped like input_ids (or flat (N,)) on the logits' device
            (prime-rl passes one per token; one per sequence is ``tau[:, None].expand_as(ids)``).
            Each must be finite and > 0 at valid tokens (a NaN one is data: it makes the loss
            NaN, SPEC.md section 5); invalid tokens' values are never read. A new tensor (or value) never recompiles anything, and no gradient
            reaches it. The metrics (entropy) are those of softmax(x_t / τ_t).
        ref_logprobs, beta: optional reference log-probs (B, T) and KL weight β ≥ 0; β > 0 needs
            ref_logprobs.
        ignore_index: ids equal to it are invalid tokens.
        return_metrics: also return a dict of detached 0-d fp32 tensors, means over valid tokens:
            psi, zeta, survival (e^−ζ), abs_log_ratio, saturated_frac (|log_r| > c), entropy,
            logp, and kl (k3) when ref_logprobs is given (also at β = 0, where the KL term itself
            is never evaluated).
        normalizer: None, a number or a 0-d tensor > 0: the divisor of the aggregated sum in place
            of the local count. token-mean: Σ_t loss_t / normalizer; seq-mean-token-mean:
            Σ over sequences of their token-mean / normalizer; seq-mean-token-sum: Σ over
            sequences of their token-sum / normalizer. With it a data-parallel caller divides by
            the global count: TRL's ``dapo`` is token-mean with ``num_items_in_batch /
            num_processes``, Dr. GRPO is seq-mean-token-sum with B · max_completion_length.
        inplace_backward: the backward writes ∂L/∂logits into the logits' own storage and returns
            it, so the op allocates no logits-sized buffer. Safe when nothing reads the logits
            after this loss's backward: logits straight from a linear LM head (its backward needs
            its inputs, not its output), not used by another loss. Unsafe when another op saved
            the logits for its own backward, e.g. softcapped logits (tanh's backward reads its
            result) or a second loss on the same logits: their version counter is bumped, so
            autograd raises instead of reading overwritten values.
        tp_group: a ``torch.distributed`` process group over which the vocabulary is split
            (tensor parallelism): each rank passes its contiguous slice of the logits (…, V_r), in
            rank order (uneven slices allowed) and the same global ``input_ids`` and mask. Every
            rank returns the loss and metrics of the whole vocabulary, and its logits' gradient
            is its slice of the full gradient, with no collective in the backward. The forward
            makes two all-gathers: the agreement (a few int64 per rank: slice sizes, fingerprints
            of the inputs, hashes of the settings; one host read), then 4 fp32 per token per
            rank, never O(N·V). A bad call, or ranks that pass different hyperparameters, raise
            on every rank (``vocab_parallel``).
        cu_seqlens: for 2-D logits (N, V) and ids (N,) holding S packed sequences, their
            boundaries: a 1-D integer tensor (S + 1,) with cu[0] = 0, non-decreasing, cu[-1] = N;
            sequence i is tokens cu[i]:cu[i + 1] (the layout of flash-attention's varlen calls).
            Every per-sequence notion (the seq-mean modes, GSPO's ratio) then reads these
            sequences; old, ref and mask stay (N,). Packing the valid tokens of a padded batch
            gives the padded call's loss and gradient rows.
        seq_valid_tokens: context parallelism, where this rank holds a part of each sequence:
            (S,) integers (S = B for a padded batch, 1 for a flat one without cu_seqlens), each
            sequence's valid tokens over every rank. The aggregation counts come from it instead
            of the local mask (n_i for seq-mean-token-mean, the sequences with n_i > 0, Σ n_i for
            token-mean), so the losses of the ranks sum to the unsplit loss and their gradients to
            its gradient. Not with GSPO, whose ratio needs every rank's log-probs.
        entropy_coef: ≥ 0, an entropy bonus: loss = Σ_t g_t · (loss_t − entropy_coef · H_t), H_t
            the entropy of softmax(logits / τ), aggregated like the loss. Its gradient is part of
            the one backward sweep.
        grad_in_forward: the forward also computes ∂L/∂logits for an upstream gradient of 1, in
            one persistent launch that re-reads each row right after its statistics (two passes
            over the logits instead of three when the re-read hits L2): into the logits
            themselves with ``inplace_backward=True`` (the forward then overwrites them),
            otherwise into a buffer it allocates. The backward hands that gradient back, scaled
            by the upstream gradient only where it is not 1 (decided on the device, no sync).
            Only the loss is differentiable then (the metrics are detached anyway). Not with
            ``tp_group``, a sequence-level objective (GSPO) or ``entropy_coef > 0``. Off by
            default until a GPU measurement shows it faster (docs/one-sweep.md).
        grad_scale: with ``grad_in_forward``, the upstream gradient the loss's backward will get
            (a number > 0: TRL's 1 / gradient accumulation steps, times a loss scaler's scale):
            the forward computes the logits' gradient for it, so that when it arrives the
            backward touches nothing (another value costs one more read and write of the
            gradient, to rescale it). No effect on the loss or on any gradient's value.

    old_logprobs, advantages and ref_logprobs are data: no gradient reaches them.

    Where it runs: CUDA tensors go through the two Triton kernels (forward: one read of the
    logits; backward: one more read and one write of the gradient in the logits' dtype, all math
    in fp32). CPU tensors go through the same kernels under Triton's interpreter when
    ``TRITON_INTERPRET=1`` was set before import, and otherwise through a chunked PyTorch version
    of the same two sweeps whose memory is bounded by a chunk of rows, not N × V.
    """
    return policy_loss(
        logits, input_ids, old_logprobs, advantages, mask,
        objective=mhpo_objective(c, k_pos, lam_pos, k_neg, lam_neg, beta, tp_group),
        temperature=temperature, loss_agg_mode=loss_agg_mode, ref_logprobs=ref_logprobs, beta=beta,
        ignore_index=ignore_index, return_metrics=return_metrics, normalizer=normalizer,
        inplace_backward=inplace_backward, tp_group=tp_group, cu_seqlens=cu_seqlens,
        seq_valid_tokens=seq_valid_tokens, entropy_coef=entropy_coef, grad_in_forward=grad_in_forward,
        grad_scale=grad_scale,
    )


def policy_loss(
    logits,
    input_ids,
    old_logprobs,
    advantages,
    mask=None,
    *,
    objective=None,
    temperature=1.0,
    loss_agg_mode="seq-mean-token-mean",
    ref_logprobs=None,
    beta=0.0,
    ignore_index=-100,
    return_metrics=False,
    normalizer=None,
    inplace_backward=False,
    tp_group=None,
    cu_seqlens=None,
    seq_valid_tokens=None,
    entropy_coef=0.0,
    grad_in_forward=False,
    grad_scale=1.0,
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
    abs_log_ratio, entropy, logp, kl (when a reference is given), and for MHPO also psi, zeta,
    survival and saturated_frac. GSPO is not available with ``tp_group`` or ``seq_valid_tokens``,
    nor with ``grad_in_forward``.
    """
    def prepare():  # with a tp_group, every rank hears of any error raised in here
        chosen = resolve_objective(objective)
        if chosen.sequence_level and tp_group is not None:
            raise NotImplementedError("GSPO with tp_group is not supported: its sequence ratios need the "
                                      "global log-probs before the epilogue")
        if chosen.sequence_level and seq_valid_tokens is not None:
            raise NotImplementedError("GSPO with seq_valid_tokens (a sequence split over ranks) is not "
                                      "supported: its sequence ratio needs the log-probs of every rank")
        check_entropy_coef(entropy_coef)
        check_grad_in_forward(grad_in_forward, chosen, tp_group, entropy_coef)
        check_positive("grad_scale", grad_scale)
        hp = TokenParams.of(chosen, check_nonnegative("beta", beta))
        tau_value, tau = check_temperature(temperature)
        logits3, token_shape, shifted = check_logits(logits, input_ids)
        batch = prepare_mhpo(
            input_ids, token_shape, logits.shape[-1] if tp_group is None else None, logits.device,
            old_logprobs, advantages, mask, ref_logprobs, beta, loss_agg_mode, ignore_index,
            normalizer=normalizer, cu_seqlens=cu_seqlens, seq_valid_tokens=seq_valid_tokens, temperature=tau,
            sequence_level=chosen.sequence_level,
        )
        lmap = LogitMap.make(tau_value, tau=batch.tau)
        return Prepared(hp, lmap, logits3, shifted, batch, check_inplace(logits, logits3, inplace_backward))

    def settings(p):
        return agreed_settings(
            "policy_loss", p.hp, p.lmap, loss_agg_mode=loss_agg_mode, normalizer=normalizer_setting(normalizer),
            old_logprobs_given=old_logprobs is not None, ref_logprobs_given=ref_logprobs is not None,
            seq_valid_tokens_given=seq_valid_tokens is not None, entropy_coef=float(entropy_coef),
            return_metrics=bool(return_metrics), shifted=p.shifted, inplace_backward=p.inplace,
            dtypes=tuple(map(dtype_name, (logits, old_logprobs, advantages, mask, ref_logprobs))))

    hp, lmap, logits3, shifted, batch, inplace = _prepared(prepare, tp_group, logits, settings)
    entropy_coef = float(entropy_coef)  # checked in prepare()
    with_entropy = bool(return_metrics) or entropy_coef > 0
    # The one sweep computes a gradient: only where a backward can ask for it (under no_grad, or
    # for logits that do not require grad, it would cost a logits-sized buffer, and in place
    # would overwrite logits that no backward hands a gradient for).
    one_sweep = bool(grad_in_forward) and torch.is_grad_enabled() and logits.requires_grad
    if tp_group is not None:
        stats = _row_stats(logits3, batch, hp, lmap, with_entropy, shifted, inplace, tp_group)
        loss = entropy_bonus(stats.loss.sum(), entropy_coef, batch.weight, stats.entropy)
        if not return_metrics:
            return loss
        return loss, metrics_of(stats.logp, stats.entropy, stats.psi, stats.zeta, batch, resolve_objective(objective))
    # The sweeps' op reduces the loss and the metrics itself (the finalize launch).
    _, loss, metrics = row_stats(logits3, batch, hp, lmap, with_entropy, shifted=shifted, inplace_backward=inplace,
                                 grad_in_forward=one_sweep, totals=LOSS_AND_METRICS if return_metrics else LOSS_TOTAL,
                                 entropy_coef=entropy_coef, grad_scale=grad_scale)
    if not return_metrics:
        return loss
    return loss, metrics_from_vector(metrics, resolve_objective(objective), batch.ref is not None)


def token_logprobs(logits, input_ids, temperature=1.0, ignore_index=-100, return_entropy=False,
                   inplace_backward=False, tp_group=None, mask=None):
    """log softmax(logits / τ)[input_ids] in fp32, fused and differentiable.

    Equals ``log_softmax(logits.float() / τ, -1).gather(-1, input_ids[..., None])[..., 0]``
    (and, with ``return_entropy=True``, also ``−Σ_v p_v log p_v`` of that softmax), without
    materializing either. Positions where ``input_ids == ignore_index`` or ``mask`` (optional, bool
    or 0/1, shaped like input_ids) is false give 0 for both and pass no gradient; both results are
    differentiable. Shapes: logits (B, T, V), (B, T + 1, V) (the next-token shift, as in
    ``mhpo_loss``) or (N, V) in float32/bfloat16/float16; input_ids (B, T) or (N,); results have
    input_ids' shape, dtype float32. ``temperature`` (a number or one τ per token),
    ``inplace_backward`` and ``tp_group`` as in ``mhpo_loss``. Runs where ``mhpo_loss`` runs.
    """
    def prepare():
        tau_value, tau = check_temperature(temperature)
        logits3, token_shape, shifted = check_logits(logits, input_ids)
        batch = prepare_tokens(input_ids, token_shape, logits.shape[-1] if tp_group is None else None,
                               logits.device, ignore_index, mask, temperature=tau)
        lmap = LogitMap.make(tau_value, tau=batch.tau)
        return Prepared(mhpo_token_params(), lmap, logits3, shifted, batch,
                        check_inplace(logits, logits3, inplace_backward))

    def settings(p):
        return agreed_settings("token_logprobs", p.hp, p.lmap, return_entropy=bool(return_entropy),
                               shifted=p.shifted, inplace_backward=p.inplace, dtypes=(dtype_name(logits),))

    hp, lmap, logits3, shifted, batch, inplace = _prepared(prepare, tp_group, logits, settings)
    stats = _row_stats(logits3, batch, hp, lmap, return_entropy, shifted, inplace, tp_group)
    logp = stats.logp.reshape(batch.token_shape)
    if not return_entropy:
        return logp
    return logp, stats.entropy.reshape(batch.token_shape)


class PolicyLoss(torch.nn.Module):
    """``policy_loss`` with its objective and settings held by the module, by keyword only, every
    one checked at construction: ``PolicyLoss(objective=PPOClip(0.2, 0.28), loss_agg_mode=
    "token-mean")``. ``objective`` is a record of ``mhpo_kernels.objectives`` (default MHPO()).

    ``forward`` takes the per-batch arguments of ``policy_loss``; its ``temperature`` replaces
    the module's for one call, with a number or a per-token tensor.
    """

    def __init__(
        self, *, objective=None, temperature=1.0, loss_agg_mode="seq-mean-token-mean", beta=0.0,
        ignore_index=-100, inplace_backward=False, tp_group=None, entropy_coef=0.0, grad_in_forward=False,
        grad_scale=1.0,
    ):
        super().__init__()
        self.objective = resolve_objective(objective)
        self.temperature = check_positive("temperature", temperature)
        self.loss_agg_mode = check_agg_mode(loss_agg_mode)
        self.beta = check_nonnegative("beta", beta)
        self.ignore_index = check_ignore_index(ignore_index)
        self.inplace_backward = check_flag("inplace_backward", inplace_backward)
        self.tp_group = check_tp_group(tp_group)
        self.entropy_coef = check_entropy_coef(entropy_coef)
        self.grad_in_forward = check_grad_in_forward(grad_in_forward, self.objective, self.tp_group,
                                                     self.entropy_coef)
        self.grad_scale = check_positive("grad_scale", grad_scale)

    def forward(self, logits, input_ids, old_logprobs, advantages, mask=None, *,
                ref_logprobs=None, return_metrics=False, normalizer=None, cu_seqlens=None,
                seq_valid_tokens=None, temperature=None):
        return policy_loss(
            logits, input_ids, old_logprobs, advantages, mask, objective=self.objective,
            temperature=self.temperature if temperature is None else temperature,
            loss_agg_mode=self.loss_agg_mode, ref_logprobs=ref_logprobs, beta=self.beta,
            ignore_index=self.ignore_index, return_metrics=return_metrics, normalizer=normalizer,
            inplace_backward=self.inplace_backward, tp_group=self.tp_group, cu_seqlens=cu_seqlens,
            seq_valid_tokens=seq_valid_tokens, entropy_coef=self.entropy_coef,
            grad_in_forward=self.grad_in_forward, grad_scale=self.grad_scale,
        )

    def extra_repr(self):
        return (f"objective={self.objective!r}, temperature={self.temperature}, "
                f"loss_agg_mode={self.loss_agg_mode!r}, beta={self.beta}, entropy_coef={self.entropy_coef}")


class MHPOLoss(PolicyLoss):
    """``mhpo_loss`` with its hyperparameters held by the module, by keyword only, every one
    checked at construction: ``PolicyLoss`` with ``MHPO(c, k_pos, lam_pos, k_neg, lam_neg)``.

    ``temperature`` is the module's number; ``forward(..., temperature=tau)`` replaces it for one
    call, with a number or a per-token tensor (as ``mhpo_loss`` takes).
    """

    def __init__(self, *, c=1.5, k_pos=1.5, lam_pos=1.0, k_neg=2.0, lam_neg=0.8, beta=0.0, **settings):
        values = mhpo_params(c, k_pos, lam_pos, k_neg, lam_neg, beta).values
        super().__init__(objective=MHPO(*values), beta=beta, **settings)
        self.c, self.k_pos, self.lam_pos, self.k_neg, self.lam_neg = values

    def extra_repr(self):
        return (
            f"c={self.c}, k_pos={self.k_pos}, lam_pos={self.lam_pos}, k_neg={self.k_neg}, "
            f"lam_neg={self.lam_neg}, temperature={self.temperature}, "
            f"loss_agg_mode={self.loss_agg_mode!r}, beta={self.beta}, entropy_coef={self.entropy_coef}"
        )
