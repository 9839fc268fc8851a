"""The sweeps as PyTorch custom ops (namespace ``mhpo_kernels::``).

Each op has a fake (shape-only) implementation and an autograd formula, so ``torch.compile``
traces a training step into one graph: the ops are opaque nodes in it, and the Triton (or
PyTorch) launchers run inside them unchanged. Op arguments are named (``SweepsArgs``): tensors
(absent optional ones None), flags, and the runtime scalars as one host float64 tensor
(``pack_params``). Outputs the call did not ask for are empty tensors.

What runs, by call and flag (kernels in ``kernels/``; the prepare launch comes first in every
call, from ``_inputs``):

=================================  =========================================  ===========================
call and flags                     forward                                    backward
=================================  =========================================  ===========================
loss or log-probs on logits        ``sweeps_forward``: ``_mhpo_fwd_kernel``   ``sweeps_backward``:
                                   (at small N split: SPLIT 1, then 2),       ``_mhpo_bwd_kernel``
                                   then ``_finalize_kernel`` for a loss
``inplace_backward``               the same                                   ``sweeps_backward_``, into
                                                                              the logits
``grad_in_forward``                ``sweeps_forward``: ``_mhpo_fwd_kernel``   ``scale_rows_``:
                                   with GRAD_IN_FORWARD (persistent, both     ``_scale_rows_kernel``,
                                   passes), ``_finalize_kernel``              nothing at ``grad_scale``
``grad_in_forward`` and in place   ``OneSweepInplace``:                       ``scale_rows_``
                                   ``sweeps_forward_grad_``
GSPO (sequence-level)              ``sweeps_forward``: sweep 1 without the    ``sweeps_backward``
                                   epilogue, ``epilogue.sequence_terms``
                                   (O(N)), ``_finalize_kernel``
``min_p`` (log-probs)              ``sweeps_forward``: ``_mhpo_fwd_kernel``   ``sweeps_backward``: the
                                   with MIN_P (a second pass per row)         kernel with CUT
``top_k``, ``top_p``               ``_mhpo_fwd_kernel`` (SPLIT 1, the         the kernel with CUT
                                   statistics; fp32 logits with LOW16,
                                   each row's test of bf16 values),
                                   ``_select_kernel`` (the counting
                                   passes), ``_mhpo_fwd_kernel`` (SPLIT 2
                                   with SELECTED: the finish)
``kept_ids`` (replay)              ``_mhpo_fwd_kernel`` on the other rows,    ``_replay_bwd_kernel``
                                   then ``_replay_fwd_kernel``                (GATHER), the kernel,
                                                                              ``_replay_bwd_kernel``
                                                                              (SCATTER)
a loss with any of these           the same, then ``_prepare_kernel`` for     the same
                                   the kept tokens' weights,
                                   ``_token_terms_kernel`` (the epilogue on
                                   (N,) vectors), ``_finalize_kernel``
``tp_group``                       ``vocab_parallel``: ``sweeps_forward`` on  ``sweeps_backward`` (or
                                   the slice (with ``kept_ids``, its ids),    ``_``), no collective
                                   one all-gather, the epilogue
``tp_group`` with ``min_p``        ``sweeps_forward`` on the slice, one       the kernel with CUT (the
                                   all-gather of its bases, then              slice's threshold)
                                   ``sweeps_forward`` with ``cut`` (the
                                   statistics, the finish), then as above
=================================  =========================================  ===========================

The fused linear path's ops are in ``linear_ops``.
"""

import collections
import inspect
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _dispatch
from ._op_support import GRAD_SCALE, ENTROPY_COEF, _fp32, _unpack, _without_autocast, once_differentiable, pack_params
from ._inputs import INT32_MAX, has_internal_overlap
from ._sweep_types import ADV_NONE, METRICS, RowStats
from .objectives import GPG_KIND, GSPO_KIND
from .epilogue import per_sequence_sum, segment_ids, sequence_terms


# Out of place, the gradient takes the logits' strides where they are a view with small gaps (a
# (B, T + 1, V)[:, :-1] slice, a vocabulary cut out of a padded one): its rows then start where
# the logits' rows do mod 16 bytes, so the backward stores 16-byte vectors at any V, where a
# contiguous buffer would put the rows out of phase at an odd V. Gaps beyond this share of the
# logits would cost memory: then the buffer is contiguous.
GRAD_GAP_SHARE = 1 / 8


def _grad_buffer(logits):
    """An empty tensor for ∂L/∂logits: the logits' strides (as above), else contiguous."""
    if not logits.is_contiguous() and logits.stride(-1) == 1 and not has_internal_overlap(logits):
        span = 1 + sum((n - 1) * st for n, st in zip(logits.shape, logits.stride()))
        if span <= logits.numel() * (1 + GRAD_GAP_SHARE):
            return torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype, device=logits.device)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


# ---- the two sweeps over (B, T, V) logits -------------------------------------------------------
#
# ``shifted``: the logits have one more position than the tokens along T (the next-token shift).
# The sweeps read the first T positions as a view (strides, no copy), and the backward's
# programs past the N tokens write the zero gradient rows of position T (``rows._row_or_tail``).
# All of it happens inside the ops, so autograd sees no slice of the logits.


NO_TOTALS, LOSS_TOTAL, LOSS_AND_METRICS = range(3)


class SweepsOut(NamedTuple):
    """``sweeps_forward``'s outputs by name (the op returns a plain tuple, absent ones empty)."""

    lse2_base: Tensor
    lse2_rest: Tensor
    logp: Tensor
    entropy: Tensor
    psi: Tensor
    zeta: Tensor
    loss: Tensor
    coef: Tensor
    grad: Tensor          # grad_in_forward: ∂L/∂logits for an upstream gradient of 1
    total: Tensor         # 0-d: Σ_t g_t · loss_t (less the entropy bonus)
    metrics: Tensor       # (len(METRICS),)
    kept_weight: Tensor   # a truncated loss: g over the tokens inside their kept set
    kept_target: Tensor   # and its targets, −1 at the tokens it left out (int32)
    cut: Tensor           # a filter or a given cut: each row's threshold


def _token_rows(x, shifted):
    """The rows of ``x`` (B, T', V) that are tokens: the first T' − 1 positions when shifted."""
    return x[:, :-1] if shifted else x


def _totals(like, stats, target, weight, old, adv, ref, hp, entropy_coef, totals, target0=None):
    """The finalize reduction of sweep 1's rows: (0-d loss, metrics), or two empty tensors."""
    if totals == NO_TOTALS:
        return _fp32(like, 0), _fp32(like, 0)
    finalize = _dispatch.kernel("finalize", like.device)
    return finalize(target, stats.loss, weight, stats.entropy, stats.logp, stats.psi, stats.zeta, old, adv, ref,
                    entropy_coef, hp, metrics=totals == LOSS_AND_METRICS, target0=target0)


def metrics_vector(logp, entropy, psi, zeta, target, weight, old, adv, ref, hp, target0=None):
    """The metrics of per-token values no sweeps op reduced (vocabulary parallelism, the fused
    linear path): the finalize reduction on detached inputs, without the loss."""
    stats = RowStats(None, None, *(None if x is None else x.detach() for x in (logp, entropy, psi, zeta)), None, None)
    return _totals(logp, stats, target, weight, old, adv, ref, hp, 0.0, LOSS_AND_METRICS, target0)[1]


def kept_tokens(logp, lmap, cut, target, old, kind, layout, agg, normalizer):
    """(target, g) of a loss over a truncated softmax (SPEC.md, section 9): the prepare launch
    once more, over the sequences ``layout`` = ``Batch.layout()``, with the aggregation ``agg``
    and ``normalizer``. A target outside its row's kept set (log-prob −inf), or whose old
    log-prob is −inf for an objective that reads it, becomes invalid (−1): g is formed without it."""
    prepare = _dispatch.kernel("prepare", target.device)
    rows = dict(kept=(lmap.kept_start, lmap.kept_end)) if lmap.replayed else dict(cut=cut)
    cu, n_seqs, T = layout
    target, g, _, _ = prepare(target, None, cu, None, ADV_NONE, None, normalizer, None, n_seqs, T, INT32_MAX, -1, agg,
                              True, old=None if kind == GPG_KIND else old, logp=logp, **rows)
    return target, g


def _forward_sweep(a, grad=None):
    """Sweep 1 (and with ``grad``, the gradient for an upstream gradient of 1 in the same launch),
    then the finalize reduction: the outputs of ``sweeps_forward`` but the gradient.

    GSPO's sequence ratios, and a loss over a truncated softmax (``min_p``, ``top_k``,
    ``top_p``, a replayed kept set), take the epilogue after the sweep, on (N,) vectors: with
    truncation, a target outside the kept set (log-prob −inf) leaves the aggregation as an
    invalid token does, and the weights are formed again (``kept_tokens``, SPEC.md, section 9)."""
    hp, lmap, values = _unpack(a.params, a.softcap, a.tau, min_p=a.min_p, top_k=a.top_k, top_p=a.top_p, cut=a.cut,
                               kept_offsets=a.kept_offsets, kept_ids=a.kept_ids)
    entropy_coef = values[ENTROPY_COEF]
    if a.logits.dtype == torch.float64:
        _dispatch.check_float64(a.logits.device, lmap.backend)
    forward_sweep, _ = _dispatch.sweeps(a.logits.device, lmap.backend)
    truncated = a.with_loss and lmap.truncated
    after = a.with_loss and (a.sequence_level or truncated)
    extra = {} if grad is None else {"grad": _token_rows(grad, a.shifted), "zero_tail": a.shifted,
                                     "grad_scale": values[GRAD_SCALE]}
    with _without_autocast(a.logits.device):
        # The KL term runs only for β > 0: the reference log-probs are then not read (they still
        # give the kl metric).
        ref = a.ref if hp.beta > 0 else None
        stats = forward_sweep(_token_rows(a.logits, a.shifted), a.target, a.old, a.adv, a.weight, ref, hp, lmap,
                              with_entropy=a.with_entropy, with_loss=a.with_loss and not after, **extra)
    target, weight = a.target, a.weight
    if truncated:
        B, T = _token_rows(a.logits, a.shifted).shape[:2]  # the sequences, unless cu says otherwise
        layout = (None, B, T) if a.cu is None else (a.cu, a.cu.numel() - 1, 0)
        target, weight = kept_tokens(stats.logp, lmap, stats.cut, a.target, a.old, hp.kind, layout, a.agg,
                                     a.normalizer)
    if after:  # O(N) between the sweeps
        if a.sequence_level:  # GSPO; zeta: each token's share of its sequence term's derivative
            valid = target >= 0
            psi, zeta, loss, coef = sequence_terms(stats.logp, valid, a.old, a.adv, weight, ref, hp,
                                                   segment_ids(a.cu, valid.numel()), a.cu.numel() - 1)
        else:
            psi, zeta, loss, coef = _dispatch.kernel("token_terms", a.logits.device)(
                stats.logp, target, a.old, a.adv, weight, ref, hp)
        stats = stats._replace(psi=psi, zeta=zeta, loss=loss, coef=coef)
    totals = _totals(a.logits, stats, target, weight, a.old, a.adv, a.ref, hp, entropy_coef, a.totals,
                     a.target if truncated else None)
    def present(x):  # absent outputs as empty tensors, each its own
        return _fp32(a.logits, 0) if x is None else x

    kept = (weight, target) if truncated else (present(None), a.target.new_empty(0, dtype=torch.int32))
    return tuple(map(present, stats[:8])) + totals + kept + (present(stats.cut),)


def _thresholds(a):
    """Whether the forward gives each row's kept-set threshold: a filter, or one given."""
    return a.min_p is not None or a.top_k is not None or a.top_p is not None or a.cut is not None


def _kept_weights(a):
    """Whether the forward gives the weights of the tokens inside their kept set: a truncated loss."""
    return a.with_loss and (a.min_p is not None or a.top_k is not None or a.top_p is not None
                            or a.kept_offsets is not None)


def _fake_outputs(a, grad):
    B, T, _ = a.logits.shape
    n = B * (T - 1 if a.shifted else T)
    present = (True, True, True, a.with_entropy) + (a.with_loss,) * 4
    stats = tuple(_fp32(a.logits, n if p else 0) for p in present)
    total = _fp32(a.logits, 1).reshape(()) if a.totals else _fp32(a.logits, 0)
    kept = n if _kept_weights(a) else 0
    return stats + (grad, total, _fp32(a.logits, len(METRICS) if a.totals == LOSS_AND_METRICS else 0),
                    _fp32(a.logits, kept), a.target.new_empty(kept, dtype=torch.int32),
                    _fp32(a.logits, n if _thresholds(a) else 0))


def _sweeps_forward(
    logits: Tensor, target: Tensor, old: Optional[Tensor], adv: Optional[Tensor],
    weight: Optional[Tensor], ref: Optional[Tensor], tau: Optional[Tensor], params: Tensor,
    softcap: bool, with_entropy: bool, with_loss: bool, shifted: bool, inplace_backward: bool,
    cu: Optional[Tensor] = None, grad_in_forward: bool = False, totals: int = 0, entropy_bonus: bool = False,
    min_p: Optional[Tensor] = None, top_k: Optional[Tensor] = None, top_p: Optional[Tensor] = None, agg: int = -1,
    normalizer: Optional[Tensor] = None, sequence_level: bool = False, kept_offsets: Optional[Tensor] = None,
    kept_ids: Optional[Tensor] = None, cut: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor]:
    """Sweep 1, outputs in order: the ``RowStats`` fields, each (N,) fp32 (empty when not asked
    for); with ``grad_in_forward``, ∂L/∂logits for an upstream gradient of 1 from the same launch
    (its backward rescales it); with ``totals``, the 0-d loss (less the entropy bonus when
    ``entropy_bonus``) and with LOSS_AND_METRICS the metrics vector; with a truncated loss, the
    weights and targets of the tokens inside the kept set; with a filter or ``cut``, each row's threshold.
    ``params``: the runtime scalars (``pack_params``), a host tensor. ``cut``: each row's
    threshold given (a vocabulary slice's under min_p). ``cu``, ``agg``, ``normalizer``: the
    sequences and aggregation of GSPO and of a truncated loss. ``inplace_backward`` changes only
    the autograd formula."""
    a = SweepsArgs(**locals())   # the arguments alone: the first statement
    grad = _grad_buffer(logits) if grad_in_forward else None
    out = _forward_sweep(a, grad)
    return out[:8] + (logits.new_empty(0) if grad is None else grad,) + out[8:]


def _arguments_of(name, fn):
    """A record ``name`` of ``fn``'s arguments, by name, with its defaults (autograd's setup and
    the fake receive the op's arguments as a tuple)."""
    params = inspect.signature(fn).parameters.values()
    return collections.namedtuple(name, [p.name for p in params],
                                  defaults=[p.default for p in params if p.default is not p.empty])


SweepsArgs = _arguments_of("SweepsArgs", _sweeps_forward)
sweeps_forward = torch.library.custom_op("mhpo_kernels::sweeps_forward", mutates_args=())(_sweeps_forward)


@sweeps_forward.register_fake
def _(*args):
    a = SweepsArgs(*args)
    return _fake_outputs(a, _grad_buffer(a.logits) if a.grad_in_forward else a.logits.new_empty(0))


@torch.library.custom_op("mhpo_kernels::sweeps_forward_grad_", mutates_args=("logits",))
def sweeps_forward_grad_(
    logits: Tensor, target: Tensor, old: Optional[Tensor], adv: Optional[Tensor],
    weight: Optional[Tensor], ref: Optional[Tensor], tau: Optional[Tensor], params: Tensor,
    softcap: bool, with_entropy: bool, shifted: bool, totals: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sweep 1 with the loss, and in the same launch ``logits`` overwritten with ∂L/∂logits for an
    upstream gradient of 1 (each row is read whole before the same program writes it); the
    ``RowStats`` fields and the totals as in ``sweeps_forward``. No autograd formula of its own:
    ``OneSweepInplace`` carries it."""
    a = SweepsArgs(logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy, True, shifted, True,
                   totals=totals)
    return _forward_sweep(a, logits)


@sweeps_forward_grad_.register_fake
def _(logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy, shifted, totals=0):
    a = SweepsArgs(logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy, True, shifted, True,
                   totals=totals)
    out = _fake_outputs(a, None)
    return out[:8] + out[9:]


@torch.library.custom_op("mhpo_kernels::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: Tensor, target: Tensor, upstream: Tensor, params: Tensor, shifted: bool) -> None:
    """The valid tokens' rows of ``grad`` (B, T, V), computed for the upstream gradient
    ``params[GRAD_SCALE]``, times the 0-d ``upstream`` over it, in place (the shift's last
    position, a zero row, is not a token); nothing when they are equal (decided on the device, no
    sync)."""
    _, lmap, values = _unpack(params, False)
    _dispatch.kernel("scale_rows", grad.device, lmap.backend)(_token_rows(grad, shifted), target, upstream,
                                                              values[GRAD_SCALE])


scale_rows_.register_fake(lambda *_, **__: None)


ONE_BACKWARD = ("mhpo_kernels: grad_in_forward=True computes the logits' gradient once, in the forward, and the "
                "first backward hands it over, scaled in place: a second backward through the same loss "
                "(retain_graph=True) is not supported; pass grad_in_forward=False to differentiate it again")


def _hand_back(ctx, d_total):
    """The gradient the forward computed for the upstream gradient it was told of, times the
    loss's upstream gradient over that one (a no-op when they agree), once. Only the loss is
    differentiable then: the forward marks the log-probs and entropy non-differentiable."""
    if d_total is None:
        return None
    if getattr(ctx, "handed_back", False):
        raise RuntimeError(ONE_BACKWARD)
    ctx.handed_back = True
    grad, target, params = ctx.saved_tensors
    scale_rows_(grad, target, d_total, params, ctx.shifted)
    return grad


class OneSweepInplace(torch.autograd.Function):
    """``grad_in_forward`` with ``inplace_backward``: the forward overwrites the logits with their
    gradient (``sweeps_forward_grad_``, whose version bump makes any other node that saved the
    logits refuse to run), the backward scales it and hands it back. Returns
    ``sweeps_forward_grad_``'s outputs: ``SweepsOut``'s but the gradient (in the logits)."""

    @staticmethod
    def forward(ctx, logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy, shifted, totals):
        out = sweeps_forward_grad_(logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy,
                                   shifted, totals)
        ctx.save_for_backward(logits, target, params)  # after the overwrite: it is the gradient now
        ctx.shifted = shifted
        ctx.mark_non_differentiable(*out[:8], *out[9:])  # only the 0-d loss
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, _base, _log2_sum, _logp, _entropy, _psi, _zeta, _loss, _coef, d_total, _metrics, _weight,
                 _kept_target, _cut):
        return (_hand_back(ctx, d_total),) + (None,) * 11


def _backward_sweep(logits, grad, target, base, lse2_rest, dlogp, entropy, dentropy, tau, params, softcap,
                    shifted, cut, kept_offsets, kept_ids):
    _, lmap, _ = _unpack(params, softcap, tau, cut=cut, kept_offsets=kept_offsets, kept_ids=kept_ids)
    _, backward_sweep = _dispatch.sweeps(logits.device, lmap.backend)
    with _without_autocast(logits.device):
        backward_sweep(_token_rows(logits, shifted), _token_rows(grad, shifted), target, base, lse2_rest, dlogp,
                       entropy, dentropy, lmap, zero_tail=shifted)
    return grad


@torch.library.custom_op("mhpo_kernels::sweeps_backward", mutates_args=())
def sweeps_backward(
    logits: Tensor, target: Tensor, base: Tensor, lse2_rest: Tensor, dlogp: Tensor,
    entropy: Optional[Tensor], dentropy: Optional[Tensor], tau: Optional[Tensor], params: Tensor,
    softcap: bool, shifted: bool, cut: Optional[Tensor] = None, kept_offsets: Optional[Tensor] = None,
    kept_ids: Optional[Tensor] = None,
) -> Tensor:
    """Sweep 2: ∂L/∂logits in the logits' dtype and shape, from ∂L/∂logp and ∂L/∂H per token;
    ``cut``: the forward's kept-set thresholds of a filtered softmax; ``kept_offsets`` and
    ``kept_ids``: a replayed kept set."""
    grad = _grad_buffer(logits)
    return _backward_sweep(logits, grad, target, base, lse2_rest, dlogp, entropy, dentropy, tau, params,
                           softcap, shifted, cut, kept_offsets, kept_ids)


sweeps_backward.register_fake(lambda logits, *_, **__: _grad_buffer(logits))


@torch.library.custom_op("mhpo_kernels::sweeps_backward_", mutates_args=("logits",))
def sweeps_backward_(
    logits: Tensor, target: Tensor, base: Tensor, lse2_rest: Tensor, dlogp: Tensor,
    entropy: Optional[Tensor], dentropy: Optional[Tensor], tau: Optional[Tensor], params: Tensor,
    softcap: bool, shifted: bool, cut: Optional[Tensor] = None, kept_offsets: Optional[Tensor] = None,
    kept_ids: Optional[Tensor] = None,
) -> None:
    """Sweep 2 in place: overwrite ``logits`` with ∂L/∂logits (each element is read before it is
    written)."""
    _backward_sweep(logits, logits, target, base, lse2_rest, dlogp, entropy, dentropy, tau, params,
                    softcap, shifted, cut, kept_offsets, kept_ids)


sweeps_backward_.register_fake(lambda *_, **__: None)


def backward_sweep(logits, inplace, **args):
    """Sweep 2 by name: the gradient in a new buffer, or with ``inplace`` written into ``logits``."""
    if not inplace:
        return sweeps_backward(logits, **args)
    sweeps_backward_(logits, **args)
    return logits


def _sweeps_setup(ctx, inputs, output):
    a = SweepsArgs(*inputs)
    base, lse2_rest, logp, entropy, psi, zeta, loss, coef, grad, _, metrics, kept_weight, kept_target, cut = output
    ctx.totals = a.totals
    ctx.grad_in_forward = a.grad_in_forward
    if a.totals:  # the 0-d loss is the loss's one differentiable output
        ctx.mark_non_differentiable(loss)
    if a.grad_in_forward:  # the backward needs only the gradient and which rows are tokens
        ctx.save_for_backward(grad, a.target, a.params)
        ctx.shifted = a.shifted
        ctx.mark_non_differentiable(base, lse2_rest, logp, entropy, psi, zeta, loss, coef, grad, metrics, kept_weight,
                                    kept_target, cut)
        ctx.set_materialize_grads(False)
        return
    # GSPO (cu given): zeta holds each token's share of its sequence term's derivative (_sequence_terms)
    seq = a.with_loss and a.sequence_level
    # A truncated loss: a token it left out (outside its kept set, or an old log-prob of −inf) has
    # no gradient, and its row is written zero without being read, as an invalid token's.
    weight, target = (kept_weight, kept_target) if _kept_weights(a) else (a.weight, a.target)
    ctx.sequence_level = seq
    ctx.save_for_backward(a.logits, target, base, lse2_rest, coef, entropy, zeta if seq else None,
                          weight if seq or a.entropy_bonus else None, a.cu if seq else None, a.tau, a.params,
                          cut if _thresholds(a) else None, a.kept_offsets, a.kept_ids)
    ctx.softcap, ctx.with_entropy, ctx.with_loss = a.softcap, a.with_entropy, a.with_loss
    ctx.shifted, ctx.inplace, ctx.entropy_bonus = a.shifted, a.inplace_backward, a.entropy_bonus
    ctx.mark_non_differentiable(base, lse2_rest, psi, zeta, coef, grad, metrics, kept_weight, kept_target, cut)
    ctx.set_materialize_grads(False)


def _add(x, y):
    return y if x is None else x if y is None else x + y


@once_differentiable
def _sweeps_backward(ctx, _base, _log2_sum, d_logp, d_entropy, _psi, _zeta, d_loss, _coef, _grad, d_total, _metrics,
                     _weight, _kept_target, _cut):
    nothing = (None,) * len(SweepsArgs._fields)
    if ctx.totals:
        d_loss = None   # the per-token losses are not differentiable then: the 0-d total is
    else:
        d_total = None  # the empty placeholder output
    if ctx.grad_in_forward:
        return (_hand_back(ctx, d_total),) + nothing[1:]
    logits, target, base, lse2_rest, coef, entropy, seq_coef, weight, cu, tau, params, cut, kept_offsets, kept_ids = \
        ctx.saved_tensors
    if not ctx.with_loss:
        d_loss = d_total = None
    d_entropy = d_entropy if ctx.with_entropy else None
    # The loss is Σ_t g_t·loss_t (− entropy_coef · Σ_t g_t·H_t): ∂L/∂logp_t = ∂L/∂loss · coef_t,
    # coef_t = g_t · d loss_t / d logp_t, and the bonus adds ∂L/∂H_t = −entropy_coef · g_t · ∂L/∂loss.
    d_loss = _add(d_total, d_loss)  # the 0-d total's, or (N,) where the per-token losses were differentiated
    dlogp = None if d_loss is None else coef * d_loss
    if d_loss is not None and ctx.sequence_level:  # loss_t = g_t · loss_i(every logp of sequence i)
        seq_id = segment_ids(cu, coef.numel())
        per_seq = per_sequence_sum(weight * d_loss, seq_id, cu.numel() - 1)
        dlogp = dlogp + seq_coef * per_seq[seq_id]
    dlogp = _add(dlogp, d_logp)
    if d_total is not None and ctx.entropy_bonus:
        d_entropy = _add(d_entropy, weight * (d_total * -params[ENTROPY_COEF].float()))
    if dlogp is None and d_entropy is None:
        return nothing
    dlogp = torch.zeros_like(lse2_rest) if dlogp is None else dlogp.to(lse2_rest.dtype).contiguous()
    dent = None if d_entropy is None else d_entropy.to(lse2_rest.dtype).contiguous()
    grad = backward_sweep(logits, ctx.inplace, target=target, base=base, lse2_rest=lse2_rest, dlogp=dlogp,
                          entropy=entropy if dent is not None else None, dentropy=dent, tau=tau, params=params,
                          softcap=ctx.softcap, shifted=ctx.shifted, cut=cut, kept_offsets=kept_offsets,
                          kept_ids=kept_ids)
    return (grad,) + nothing[1:]


torch.library.register_autograd("mhpo_kernels::sweeps_forward", _sweeps_backward, setup_context=_sweeps_setup)


def row_stats(logits, batch, hp, lmap, with_entropy, shifted=False, inplace_backward=False, grad_in_forward=False,
              totals=NO_TOTALS, entropy_coef=0.0, grad_scale=1.0, agg=-1, normalizer=None):
    """Sweep 1 on (B, T, V) logits ((B, T + 1, V) when ``shifted``) and a prepared batch:
    (``RowStats``, absent fields None; with ``totals`` the differentiable 0-d loss; with
    LOSS_AND_METRICS the detached metrics vector). ``grad_in_forward``: the logits' gradient for
    the upstream gradient ``grad_scale`` from the same launch (into the logits with
    ``inplace_backward``). ``agg``, ``normalizer``: a truncated loss's aggregation."""
    with_loss = batch.adv is not None
    truncated = with_loss and lmap.truncated
    ref = batch.ref if hp.beta > 0 or totals == LOSS_AND_METRICS else None
    inputs = dict(target=batch.target, old=batch.old, adv=batch.adv, weight=batch.weight, ref=ref, tau=lmap.tau,
                  params=pack_params(hp, lmap, entropy_coef, grad_scale), softcap=lmap.softcap,
                  with_entropy=bool(with_entropy), shifted=bool(shifted), totals=totals)
    if grad_in_forward and inplace_backward:
        out = OneSweepInplace.apply(logits, *inputs.values())
        out = SweepsOut(*out[:8], None, *out[8:])   # the gradient is in the logits
    else:
        out = sweeps_forward(logits, **inputs, with_loss=with_loss, inplace_backward=bool(inplace_backward),
                             cu=batch.boundaries() if hp.kind == GSPO_KIND else batch.cu if truncated else None,
                             grad_in_forward=bool(grad_in_forward),
                             entropy_bonus=bool(totals) and with_loss and bool(with_entropy) and entropy_coef != 0,
                             min_p=lmap.min_p, top_k=lmap.top_k, top_p=lmap.top_p, agg=agg if truncated else -1,
                             normalizer=normalizer if truncated else None, sequence_level=hp.kind == GSPO_KIND,
                             kept_offsets=batch.kept_offsets, kept_ids=lmap.kept_ids)
        out = SweepsOut(*out)
    present = (True, True, True, with_entropy) + (with_loss,) * 4
    stats = RowStats(*(x if p else None for x, p in zip(out[:8], present)), cut=out.cut if lmap.filtered else None)
    return stats, (out.total if totals else None), (out.metrics if totals == LOSS_AND_METRICS else None)
