"""The sweeps and the fused linear path as PyTorch custom ops (namespace ``mhpo_kernels::``).

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
                                   epilogue, ``torch_sweeps._sequence_terms``
                                   (O(N)), ``_finalize_kernel``
``tp_group``                       ``vocab_parallel``: ``sweeps_forward`` on  ``sweeps_backward`` (or
                                   the slice, one all-gather, the epilogue    ``_``), no collective
``fused_linear_*_loss``            ``fused_linear_forward``: per chunk a      the saved gradients,
                                   GEMM, both sweeps, two GEMMs               scaled
``fused_linear_token_logprobs``    ``fused_linear_logprobs``: per chunk a     ``fused_linear_logprobs_``
                                   GEMM and sweep 1                           ``backward``: GEMM, sweep
                                                                              2, two GEMMs
=================================  =========================================  ===========================
"""

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _dispatch
from ._sweep_types import METRICS, LogitMap, RowStats, TokenParams
from ._inputs import has_internal_overlap
from .objectives import GSPO_KIND, MHPO_KIND
from .torch_sweeps import _sequence_terms, per_sequence_sum, segment_ids
from .linear_sweeps import fused_linear_sweeps, token_logprobs_grads, token_logprobs_sweeps


# The runtime scalars of a call, in one float64 host (CPU) tensor: reading them is no device sync,
# and inside torch.compile they are a graph input, so a new value (β, τ, the entropy bonus) reuses
# the compiled graph. Slots: the objective's five values, β, the logit map's two scales, the
# epilogue's kind and MHPO's LFM/DHP switches (small integers, exact), the entropy bonus, and the
# upstream gradient the one-sweep kernel computes the logits' gradient for (``grad_in_forward``).
BETA, IN_SCALE, OUT_SCALE, KIND, LFM, DHP, ENTROPY_COEF, GRAD_SCALE = range(5, 13)


def pack_params(hp, lmap, entropy_coef=0.0, grad_scale=1.0):
    """The ``params`` host tensor of the ops (slots above)."""
    values = [*hp.values, hp.beta, lmap.in_scale, lmap.out_scale, hp.kind, hp.lfm, hp.dhp, entropy_coef, grad_scale]
    if torch.compiler.is_compiling():
        # A number that changed between calls is symbolic here; torch.tensor of it would specialize
        # the graph on its value (a recompile per value), arithmetic on a tensor keeps it an input.
        zero = torch.zeros((), dtype=torch.float64)
        return torch.stack([zero + v for v in values])
    return torch.tensor(values, dtype=torch.float64)


def _unpack(params, softcap, tau=None):
    """(TokenParams, LogitMap, every value by its slot) from ``params``: read on the host."""
    v = params.detach().numpy().tolist()
    hp = TokenParams(int(v[KIND]), tuple(v[:5]), v[BETA], bool(v[LFM]), bool(v[DHP]))
    return hp, LogitMap(v[IN_SCALE], v[OUT_SCALE], softcap, tau), v


def _without_autocast(device):
    """The ops choose their own precisions: an enclosing autocast must not recast their GEMMs."""
    return torch.autocast(device_type=device.type, enabled=False)


DOUBLE_BACKWARD = ("mhpo_kernels: double backward is not supported: the gradients of mhpo_kernels' losses "
                   "and log-probs are not themselves differentiable (backward with create_graph=True "
                   "gives them, differentiating them again raises this)")


class _NotDifferentiable(torch.autograd.Function):
    """The identity on a backward's gradients, whose own backward raises ``DOUBLE_BACKWARD``."""

    @staticmethod
    def forward(ctx, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD)


def once_differentiable(backward):
    """``backward`` run without recording a graph; under ``create_graph=True`` its gradients pass
    through ``_NotDifferentiable``, so that differentiating them raises the package's own error
    (``torch.autograd.function.once_differentiable`` raises one that names no package)."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return out
        present = [i for i, g in enumerate(out) if isinstance(g, Tensor)]
        if not present:
            return out
        wrapped = _NotDifferentiable.apply(*[out[i].detach().requires_grad_() for i in present])
        out = list(out)
        for i, g in zip(present, wrapped):
            out[i] = g
        return tuple(out)

    return run


def _fp32(like, n):
    """(n,) for per-token results: fp32, float64 for float64 input (the PyTorch path's own)."""
    return torch.empty(n, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32, device=like.device)


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


class SweepsArgs(NamedTuple):
    """``sweeps_forward``'s inputs by name (autograd's setup receives them as a tuple)."""

    logits: Tensor
    target: Tensor
    old: Optional[Tensor]
    adv: Optional[Tensor]
    weight: Optional[Tensor]
    ref: Optional[Tensor]
    tau: Optional[Tensor]
    params: Tensor
    softcap: bool
    with_entropy: bool
    with_loss: bool
    shifted: bool
    inplace_backward: bool
    cu: Optional[Tensor] = None
    grad_in_forward: bool = False
    totals: int = 0
    entropy_bonus: bool = False


NO_TOTALS, LOSS_TOTAL, LOSS_AND_METRICS = range(3)


def _token_rows(x, shifted):
    """The rows of ``x`` (B, T', V) that are tokens: the first T' − 1 positions when shifted."""
    return x[:, :-1] if shifted else x


def _totals(logits, stats, target, weight, old, ref, hp, entropy_coef, totals):
    """The finalize reduction of sweep 1's rows: (0-d loss, metrics), or two empty tensors."""
    if totals == NO_TOTALS:
        return _fp32(logits, 0), _fp32(logits, 0)
    finalize = _dispatch.kernel("finalize", logits.device)
    return finalize(target, stats.loss, weight, stats.entropy, stats.logp, stats.psi, stats.zeta, old, ref,
                    entropy_coef, hp.values[0], mhpo=hp.kind == MHPO_KIND, metrics=totals == LOSS_AND_METRICS)


def _forward_sweep(a, grad=None):
    """Sweep 1 (and with ``grad``, the gradient for an upstream gradient of 1 in the same launch),
    then the finalize reduction: the outputs of ``sweeps_forward`` but the gradient."""
    hp, lmap, values = _unpack(a.params, a.softcap, a.tau)
    entropy_coef = values[ENTROPY_COEF]
    forward_sweep, _ = _dispatch.sweeps(a.logits.device)
    sequence_level = a.with_loss and a.cu is not None
    extra = {} if grad is None else {"grad": _token_rows(grad, a.shifted), "zero_tail": a.shifted,
                                     "grad_scale": values[GRAD_SCALE]}
    with _without_autocast(a.logits.device):
        # The KL term runs only for β > 0: the reference log-probs are then not read (they still
        # give the kl metric).
        ref = a.ref if hp.beta > 0 else None
        stats = forward_sweep(_token_rows(a.logits, a.shifted), a.target, a.old, a.adv, a.weight, ref, hp, lmap,
                              with_entropy=a.with_entropy, with_loss=a.with_loss and not sequence_level, **extra)
    if sequence_level:  # O(N) between the sweeps: the sequence ratios from the log-probs
        n = stats.logp.numel()
        psi, seq_coef, loss, coef = _sequence_terms(stats.logp, a.target >= 0, a.old, a.adv, a.weight, ref, hp,
                                                    segment_ids(a.cu, n), a.cu.numel() - 1)
        stats = stats._replace(psi=psi, zeta=seq_coef, loss=loss, coef=coef)
    totals = _totals(a.logits, stats, a.target, a.weight, a.old, a.ref, hp, entropy_coef, a.totals)
    return tuple(_fp32(a.logits, 0) if x is None else x for x in stats) + totals


def _fake_outputs(a, grad):
    B, T, _ = a.logits.shape
    n = B * (T - 1 if a.shifted else T)
    present = (True, True, True, a.with_entropy) + (a.with_loss,) * 4
    stats = tuple(_fp32(a.logits, n if p else 0) for p in present)
    total = _fp32(a.logits, 1).reshape(()) if a.totals else _fp32(a.logits, 0)
    return stats + (grad, total, _fp32(a.logits, len(METRICS) if a.totals == LOSS_AND_METRICS else 0))


@torch.library.custom_op("mhpo_kernels::sweeps_forward", mutates_args=())
def sweeps_forward(
    logits: Tensor, target: Tensor, old: Optional[Tensor], adv: Optional[Tensor],
    weight: Optional[Tensor], ref: Optional[Tensor], tau: Optional[Tensor], params: Tensor,
    softcap: bool, with_entropy: bool, with_loss: bool, shifted: bool, inplace_backward: bool,
    cu: Optional[Tensor] = None, grad_in_forward: bool = False, totals: int = 0, entropy_bonus: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sweep 1: the ``RowStats`` fields in order, each (N,) fp32 (empty when not asked for); then
    with ``grad_in_forward`` ∂L/∂logits for an upstream gradient of 1, from the same launch, in a
    buffer of the logits' shape and dtype (else empty), whose backward rescales it; then with
    ``totals`` the finalize reduction: the 0-d loss (Σ_t g_t·loss_t, less the entropy bonus when
    ``entropy_bonus``) and with LOSS_AND_METRICS the (len(METRICS),) metrics (else empty).
    ``params``: the runtime scalars (``pack_params``), a host tensor. ``inplace_backward``
    changes only the autograd formula: its backward overwrites the logits. ``cu``: the (S + 1,)
    sequence boundaries over the tokens, for a sequence-level objective (GSPO) only."""
    a = SweepsArgs(logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy, with_loss, shifted,
                   inplace_backward, cu, grad_in_forward, totals, entropy_bonus)
    grad = _grad_buffer(logits) if grad_in_forward else None
    out = _forward_sweep(a, grad)
    return out[:8] + (logits.new_empty(0) if grad is None else grad,) + out[8:]


@sweeps_forward.register_fake
def _(*args):
    a = SweepsArgs(*args)
    return _fake_outputs(a, _grad_buffer(a.logits) if a.grad_in_forward else a.logits.new_empty(0))


@torch.library.custom_op("mhpo_kernels::sweeps_forward_grad_", mutates_args=("logits",))
def sweeps_forward_grad_(
    logits: Tensor, target: Tensor, old: Optional[Tensor], adv: Optional[Tensor],
    weight: Optional[Tensor], ref: Optional[Tensor], tau: Optional[Tensor], params: Tensor,
    softcap: bool, with_entropy: bool, shifted: bool, totals: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
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
    expected = _unpack(params, False)[2][GRAD_SCALE]
    _dispatch.kernel("scale_rows", grad.device)(_token_rows(grad, shifted), target, upstream, expected)


@scale_rows_.register_fake
def _(grad, target, upstream, params, shifted):
    return None


def _hand_back(grad, target, d_total, params, shifted):
    """The gradient the forward computed for the upstream gradient it was told of, times the
    loss's upstream gradient over that one (a no-op when they agree). Only the loss is
    differentiable then: the forward marks the log-probs and entropy non-differentiable."""
    if d_total is None:
        return None
    scale_rows_(grad, target, d_total, params, shifted)
    return grad


class OneSweepInplace(torch.autograd.Function):
    """``grad_in_forward`` with ``inplace_backward``: the forward overwrites the logits with their
    gradient (``sweeps_forward_grad_``, whose version bump makes any other node that saved the
    logits refuse to run), the backward scales it and hands it back. Returns the eight
    ``RowStats`` fields, the 0-d loss and the metrics."""

    @staticmethod
    def forward(ctx, logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy, shifted, totals):
        out = sweeps_forward_grad_(logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy,
                                   shifted, totals)
        ctx.save_for_backward(logits, target, params)  # after the overwrite: it is the gradient now
        ctx.shifted = shifted
        ctx.mark_non_differentiable(*out[:8], out[9])  # only the 0-d loss
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, _base, _log2_sum, _logp, _entropy, _psi, _zeta, _loss, _coef, d_total, _metrics):
        grad, target, params = ctx.saved_tensors
        return (_hand_back(grad, target, d_total, params, ctx.shifted),) + (None,) * 11


def _loss_gradient(d_loss, d_total):
    """The loss's upstream gradient: the 0-d total's, plus per token (N,) where a caller
    differentiated the per-token losses themselves."""
    return _add(d_total, d_loss)


def _backward_sweep(logits, grad, target, base, lse2_rest, dlogp, entropy, dentropy, tau, params, softcap,
                    shifted):
    _, backward_sweep = _dispatch.sweeps(logits.device)
    _, lmap, _ = _unpack(params, softcap, tau)
    with _without_autocast(logits.device):
        backward_sweep(_token_rows(logits, shifted), _token_rows(grad, shifted), target, base, lse2_rest, dlogp,
                       entropy, dentropy, lmap, zero_tail=shifted)
    return grad


@torch.library.custom_op("mhpo_kernels::sweeps_backward", mutates_args=())
def sweeps_backward(
    logits: Tensor, target: Tensor, base: Tensor, lse2_rest: Tensor, dlogp: Tensor,
    entropy: Optional[Tensor], dentropy: Optional[Tensor], tau: Optional[Tensor], params: Tensor,
    softcap: bool, shifted: bool,
) -> Tensor:
    """Sweep 2: ∂L/∂logits in the logits' dtype and shape, from ∂L/∂logp and ∂L/∂H per token."""
    grad = _grad_buffer(logits)
    return _backward_sweep(logits, grad, target, base, lse2_rest, dlogp, entropy, dentropy, tau, params,
                           softcap, shifted)


@sweeps_backward.register_fake
def _(logits, target, base, lse2_rest, dlogp, entropy, dentropy, tau, params, softcap, shifted):
    return _grad_buffer(logits)


@torch.library.custom_op("mhpo_kernels::sweeps_backward_", mutates_args=("logits",))
def sweeps_backward_(
    logits: Tensor, target: Tensor, base: Tensor, lse2_rest: Tensor, dlogp: Tensor,
    entropy: Optional[Tensor], dentropy: Optional[Tensor], tau: Optional[Tensor], params: Tensor,
    softcap: bool, shifted: bool,
) -> None:
    """Sweep 2 in place: overwrite ``logits`` with ∂L/∂logits (each element is read before the
    same lane writes it)."""
    _backward_sweep(logits, logits, target, base, lse2_rest, dlogp, entropy, dentropy, tau, params,
                    softcap, shifted)


@sweeps_backward_.register_fake
def _(logits, target, base, lse2_rest, dlogp, entropy, dentropy, tau, params, softcap, shifted):
    return None


def _sweeps_setup(ctx, inputs, output):
    a = SweepsArgs(*inputs)
    base, lse2_rest, logp, entropy, psi, zeta, loss, coef, grad, _, metrics = output
    ctx.totals = a.totals
    ctx.grad_in_forward = a.grad_in_forward
    if a.totals:  # the 0-d loss is the loss's one differentiable output
        ctx.mark_non_differentiable(loss)
    if a.grad_in_forward:  # the backward needs only the gradient and which rows are tokens
        ctx.save_for_backward(grad, a.target, a.params)
        ctx.shifted = a.shifted
        ctx.mark_non_differentiable(base, lse2_rest, logp, entropy, psi, zeta, loss, coef, grad, metrics)
        ctx.set_materialize_grads(False)
        return
    # GSPO (cu given): zeta holds each token's share of its sequence term's derivative (_sequence_terms)
    seq = a.with_loss and a.cu is not None
    ctx.sequence_level = seq
    ctx.save_for_backward(a.logits, a.target, base, lse2_rest, coef, entropy, zeta if seq else None,
                          a.weight if seq or a.entropy_bonus else None, a.cu if seq else None, a.tau, a.params)
    ctx.softcap, ctx.with_entropy, ctx.with_loss = a.softcap, a.with_entropy, a.with_loss
    ctx.shifted, ctx.inplace, ctx.entropy_bonus = a.shifted, a.inplace_backward, a.entropy_bonus
    ctx.mark_non_differentiable(base, lse2_rest, psi, zeta, coef, grad, metrics)
    ctx.set_materialize_grads(False)


def _add(x, y):
    return y if x is None else x if y is None else x + y


@once_differentiable
def _sweeps_backward(ctx, _base, _log2_sum, d_logp, d_entropy, _psi, _zeta, d_loss, _coef, _grad, d_total, _metrics):
    nothing = (None,) * 17
    if ctx.totals:
        d_loss = None   # the per-token losses are not differentiable then: the 0-d total is
    else:
        d_total = None  # the empty placeholder output
    if ctx.grad_in_forward:
        grad, target, params = ctx.saved_tensors
        return (_hand_back(grad, target, d_total, params, ctx.shifted),) + nothing[1:]
    logits, target, base, lse2_rest, coef, entropy, seq_coef, weight, cu, tau, params = ctx.saved_tensors
    if not ctx.with_loss:
        d_loss = d_total = None
    d_entropy = d_entropy if ctx.with_entropy else None
    # The loss is Σ_t g_t·loss_t (− entropy_coef · Σ_t g_t·H_t): ∂L/∂logp_t = ∂L/∂loss · coef_t,
    # coef_t = g_t · d loss_t / d logp_t, and the bonus adds ∂L/∂H_t = −entropy_coef · g_t · ∂L/∂loss.
    d_loss = _loss_gradient(d_loss, d_total)
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
    args = (target, base, lse2_rest, dlogp, entropy if dent is not None else None, dent, tau, params, ctx.softcap,
            ctx.shifted)
    if ctx.inplace:
        sweeps_backward_(logits, *args)
        grad = logits
    else:
        grad = sweeps_backward(logits, *args)
    return (grad,) + nothing[1:]


torch.library.register_autograd("mhpo_kernels::sweeps_forward", _sweeps_backward, setup_context=_sweeps_setup)


def row_stats(logits, batch, hp, lmap, with_entropy, shifted=False, inplace_backward=False, grad_in_forward=False,
              totals=NO_TOTALS, entropy_coef=0.0, grad_scale=1.0):
    """Sweep 1 on (B, T, V) logits (or (B, T + 1, V) when ``shifted``) and a prepared batch:
    (``RowStats`` with absent fields None, whose logp, entropy and loss carry gradient to the
    logits; with ``totals`` the 0-d loss, differentiable, else None; with LOSS_AND_METRICS the
    detached metrics vector (``_sweep_types.METRICS``), else None).
    The KL term runs only for β > 0 (the reference log-probs then only give the kl metric).
    ``grad_in_forward`` (a token-level loss only): the logits' gradient is computed in the same
    launch, into the logits themselves with ``inplace_backward``; only the loss is differentiable.
    ``entropy_coef``: the bonus the loss total subtracts (with ``totals``). ``grad_scale``: the
    upstream gradient ``grad_in_forward`` computes the logits' gradient for."""
    with_loss = batch.adv is not None
    ref = batch.ref if hp.beta > 0 or totals == LOSS_AND_METRICS else None
    params = pack_params(hp, lmap, entropy_coef, grad_scale)
    if grad_in_forward and inplace_backward:
        out = OneSweepInplace.apply(logits, batch.target, batch.old, batch.adv, batch.weight, ref, lmap.tau,
                                    params, lmap.softcap, bool(with_entropy), bool(shifted), totals)
        out = out[:8] + (None,) + out[8:]
    else:
        out = sweeps_forward(logits, batch.target, batch.old, batch.adv, batch.weight, ref, lmap.tau, params,
                             lmap.softcap, bool(with_entropy), with_loss, bool(shifted), bool(inplace_backward),
                             batch.boundaries() if hp.kind == GSPO_KIND else None, bool(grad_in_forward), totals,
                             totals != NO_TOTALS and with_loss and bool(with_entropy) and _nonzero(entropy_coef))
    present = (True, True, True, with_entropy) + (with_loss,) * 4
    stats = RowStats(*(x if p else None for x, p in zip(out[:8], present)))
    return stats, (out[9] if totals else None), (out[10] if totals == LOSS_AND_METRICS else None)


def _nonzero(value):
    """``value != 0`` for a number; inside torch.compile a guard on it (the value itself stays a
    graph input, so a new nonzero value does not recompile)."""
    return value != 0


# ---- hidden states and LM head ------------------------------------------------------------------

@torch.library.custom_op("mhpo_kernels::fused_linear_forward", mutates_args=())
def fused_linear_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, old: Optional[Tensor],
    adv: Tensor, g: Tensor, ref: Optional[Tensor], tau: Optional[Tensor], params: Tensor,
    softcap: bool, chunk_rows: int, with_entropy: bool, need_dh: bool, need_dw: bool, need_db: bool,
    entropy_coef: float = 0.0, n_valid: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, logp, entropy, psi, zeta, dhidden, dweight (fp32), dbias (fp32)); the gradients are
    for an upstream gradient of 1 and empty when not asked for. ``n_valid``: the valid tokens as
    validation counted them, None inside torch.compile (``linear_sweeps._valid_rows``)."""
    hp, lmap, _ = _unpack(params, softcap, tau)
    with _without_autocast(hidden.device):
        loss, logp, entropy, psi, zeta, dh, dw, db = fused_linear_sweeps(
            hidden, weight, bias, target, old, adv, g, ref, hp, lmap, chunk_rows, with_entropy,
            need_dh, need_dw, need_db, n_valid=n_valid, entropy_coef=entropy_coef)
    return (loss, logp, _fp32(hidden, 0) if entropy is None else entropy, psi, zeta,
            hidden.new_empty(0) if dh is None else dh, _fp32(hidden, 0) if dw is None else dw,
            _fp32(hidden, 0) if db is None else db)


@fused_linear_forward.register_fake
def _(hidden, weight, bias, target, old, adv, g, ref, tau, params, softcap, chunk_rows, with_entropy,
      need_dh, need_dw, need_db, entropy_coef=0.0, n_valid=None):
    n = hidden.shape[0]
    return (
        torch.empty((), dtype=torch.float32, device=hidden.device), _fp32(hidden, n),
        _fp32(hidden, n if with_entropy else 0), _fp32(hidden, n), _fp32(hidden, n),
        torch.empty(hidden.shape if need_dh else (0,), dtype=hidden.dtype, device=hidden.device),
        torch.empty(weight.shape if need_dw else (0,), dtype=torch.float32, device=hidden.device),
        _fp32(hidden, weight.shape[0] if need_db else 0),
    )


class LinearArgs(NamedTuple):
    """``fused_linear_forward``'s inputs by name (autograd's setup receives them as a tuple)."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    target: Tensor
    old: Optional[Tensor]
    adv: Tensor
    g: Tensor
    ref: Optional[Tensor]
    tau: Optional[Tensor]
    params: Tensor
    softcap: bool
    chunk_rows: int
    with_entropy: bool
    need_dh: bool
    need_dw: bool
    need_db: bool
    entropy_coef: float = 0.0
    n_valid: Optional[int] = None


def _linear_setup(ctx, inputs, output):
    a = LinearArgs(*inputs)
    _, logp, entropy, psi, zeta, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.needs = (a.need_dh, a.need_dw, a.need_db)
    ctx.dtypes = (a.hidden.dtype, a.weight.dtype)
    ctx.mark_non_differentiable(logp, entropy, psi, zeta, dh, dw, db)
    ctx.set_materialize_grads(False)


def scaled_linear_grads(saved, needs, dtypes, d_loss):
    """(dhidden, dweight, dbias) for the upstream gradient ``d_loss`` from the ones the forward
    computed for 1 (None where not needed): the fp32 accumulators round once, here."""
    h_dtype, w_dtype = dtypes

    def scaled(x, need, dtype):
        if not need:
            return None
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        return torch.mul(x, d_loss, out=out)

    return tuple(scaled(x, need, dtype) for x, need, dtype in zip(saved, needs, (h_dtype, w_dtype, w_dtype)))


@once_differentiable
def _linear_backward(ctx, d_loss, *_):
    if d_loss is None:
        return (None,) * 18
    return scaled_linear_grads(ctx.saved_tensors, ctx.needs, ctx.dtypes, d_loss) + (None,) * 15


torch.library.register_autograd("mhpo_kernels::fused_linear_forward", _linear_backward, setup_context=_linear_setup)


# ---- differentiable log-probs and entropy of an LM head ------------------------------------------

@torch.library.custom_op("mhpo_kernels::fused_linear_logprobs", mutates_args=())
def fused_linear_logprobs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, tau: Optional[Tensor],
    params: Tensor, softcap: bool, chunk_rows: int, with_entropy: bool, n_valid: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logp, entropy (empty unless asked), base, lse2_rest), each (N,) fp32; 1 GEMM per chunk. The
    last two are the row statistics the backward needs. ``n_valid`` as in ``fused_linear_forward``."""
    _, lmap, _ = _unpack(params, softcap, tau)
    with _without_autocast(hidden.device):
        logp, entropy, base, lse2_rest = token_logprobs_sweeps(hidden, weight, bias, target, lmap, chunk_rows,
                                                              with_entropy, n_valid=n_valid)
    return logp, _fp32(hidden, 0) if entropy is None else entropy, base, lse2_rest


@fused_linear_logprobs.register_fake
def _(hidden, weight, bias, target, tau, params, softcap, chunk_rows, with_entropy, n_valid=None):
    n = hidden.shape[0]
    return _fp32(hidden, n), _fp32(hidden, n if with_entropy else 0), _fp32(hidden, n), _fp32(hidden, n)


@torch.library.custom_op("mhpo_kernels::fused_linear_logprobs_backward", mutates_args=())
def fused_linear_logprobs_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, tau: Optional[Tensor],
    base: Tensor, lse2_rest: Tensor, entropy: Optional[Tensor], dlogp: Tensor, dentropy: Optional[Tensor],
    params: Tensor, softcap: bool, chunk_rows: int, need_dh: bool, need_dw: bool, need_db: bool,
    n_valid: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dhidden, dweight, dbias) in the inputs' dtypes (empty when not asked for): per chunk, the
    tile recomputed (1 GEMM), turned into its gradient by sweep 2, folded (2 GEMMs)."""
    _, lmap, _ = _unpack(params, softcap, tau)
    with _without_autocast(hidden.device):
        dh, dw, db = token_logprobs_grads(hidden, weight, bias, target, lmap, chunk_rows, base, lse2_rest,
                                          entropy, dlogp, dentropy, need_dh, need_dw, need_db, n_valid=n_valid)
    return (hidden.new_empty(0) if dh is None else dh, weight.new_empty(0) if dw is None else dw.to(weight.dtype),
            weight.new_empty(0) if db is None else db.to(weight.dtype))


@fused_linear_logprobs_backward.register_fake
def _(hidden, weight, bias, target, tau, base, lse2_rest, entropy, dlogp, dentropy, params, softcap,
      chunk_rows, need_dh, need_dw, need_db, n_valid=None):
    return (hidden.new_empty(hidden.shape if need_dh else (0,)), weight.new_empty(weight.shape if need_dw else (0,)),
            weight.new_empty(weight.shape[0] if need_db else 0))


def _logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, target, tau, params, softcap, chunk_rows, with_entropy, *n_valid = inputs
    logp, entropy, base, lse2_rest = output
    ctx.save_for_backward(hidden, weight, bias, target, tau, base, lse2_rest, entropy if with_entropy else None)
    ctx.params, ctx.softcap, ctx.chunk_rows = params, softcap, chunk_rows
    ctx.n_valid = n_valid[0] if n_valid else None
    ctx.mark_non_differentiable(base, lse2_rest)
    ctx.set_materialize_grads(False)


@once_differentiable
def _logprobs_backward(ctx, d_logp, d_entropy, _base, _log2_sum):
    hidden, weight, bias, target, tau, base, lse2_rest, entropy = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[:2]
    need_db = bias is not None and ctx.needs_input_grad[2]
    if entropy is None:
        d_entropy = None
    if (d_logp is None and d_entropy is None) or not (need_dh or need_dw or need_db):
        return (None,) * 10
    dlogp = torch.zeros_like(base) if d_logp is None else d_logp.float().contiguous()
    dent = None if d_entropy is None else d_entropy.float().contiguous()
    dh, dw, db = fused_linear_logprobs_backward(
        hidden, weight, bias, target, tau, base, lse2_rest, entropy if dent is not None else None, dlogp, dent,
        ctx.params, ctx.softcap, ctx.chunk_rows, need_dh, need_dw, need_db, ctx.n_valid)
    grads = (dh if need_dh else None, dw if need_dw else None, db if need_db else None)
    return grads + (None,) * 7


torch.library.register_autograd("mhpo_kernels::fused_linear_logprobs", _logprobs_backward,
                                setup_context=_logprobs_setup)
