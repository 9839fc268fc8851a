"""The sweeps and the fused linear path as PyTorch custom ops (namespace ``mhpo_kernels::``).

Each op has a fake (shape-only) implementation and an autograd formula, so ``torch.compile``
traces a training step that calls ``mhpo_loss`` or ``fused_linear_mhpo_loss`` into one graph: the
ops are opaque nodes in it, and the Triton (or PyTorch) sweeps run inside them unchanged.

Op arguments are flat: tensors (absent optional ones as None; a per-token temperature is one, ``tau``,
beside the float list), the runtime scalars as one float list (``pack_params``: the objective's
values, β, the logit map, the epilogue's kind; see ``TokenParams`` and ``LogitMap``), and flags. Outputs the call did not ask for are empty tensors.
"""

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _dispatch
from ._sweep_types import LogitMap, RowStats, TokenParams
from ._inputs import has_internal_overlap, per_sequence_sum, segment_ids
from .objectives import GSPO_KIND
from .torch_sweeps import _sequence_terms
from .linear_sweeps import fused_linear_sweeps, token_logprobs_grads, token_logprobs_sweeps


def pack_params(hp, lmap):
    """One float list: the objective's five values, β, the logit map's two scales, then the
    epilogue's kind and MHPO's LFM/DHP switches (small integers, exact as floats)."""
    return [*hp.values, hp.beta, lmap.in_scale, lmap.out_scale, float(hp.kind), float(hp.lfm), float(hp.dhp)]


def _unpack(params, softcap, tau=None):
    hp = TokenParams(int(params[8]), tuple(params[:5]), params[5], bool(params[9]), bool(params[10]))
    return hp, LogitMap(params[6], params[7], softcap, tau)


def _without_autocast(device):
    """The ops choose their own precisions: an enclosing autocast must not recast their GEMMs."""
    return torch.autocast(device_type=device.type, enabled=False)


DOUBLE_BACKWARD = ("mhpo_kernels: double backward is not supported: the gradients of mhpo_kernels' losses "
                   "and log-probs are not themselves differentiable (backward with create_graph=True "
                   "gives them, differentiating them again raises this)")


def once_differentiable(backward):
    """``backward`` run without recording a graph; under ``create_graph=True`` the gradients it
    returns carry a node that raises ``DOUBLE_BACKWARD`` if differentiated (what
    ``torch.autograd.function.once_differentiable`` does, with the package's own message instead
    of PyTorch's advice to register a formula)."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return out
        present = [i for i, g in enumerate(out) if isinstance(g, Tensor)]
        if not present:
            return out
        raising = torch._C._functions.DelayedError(DOUBLE_BACKWARD.encode(), len(present))
        wrapped = raising(*[out[i].detach().requires_grad_() for i in present])
        wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
        out = list(out)
        for i, g in zip(present, wrapped):
            out[i] = g
        return tuple(out)

    return run


def _fp32(like, n):
    return torch.empty(n, dtype=torch.float32, device=like.device)


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
# ``shifted``: the logits have one more position than the tokens along T (the next-token shift):
# the per-token inputs (B·T,) are padded to (B·(T + 1),) with an invalid last position per
# sequence, so the kernels read the logits whole, and write a zero gradient row for the position
# that predicts nothing. All of it happens inside the ops, so autograd sees no slice of the logits.


def _pad_rows(x, shape, fill):
    """(B·T,) per-token values → (B·(T + 1),), ``fill`` at each sequence's last position."""
    if x is None:
        return None
    B, T = shape
    out = x.new_full((B, T + 1), fill)
    out[:, :T] = x.reshape(B, T)
    return out.reshape(-1)


def _unpad_rows(x, shape):
    """The inverse of ``_pad_rows`` (a copy): (B·(T + 1),) → (B·T,)."""
    if x is None or x.numel() == 0:
        return x
    B, T = shape
    return x.reshape(B, T + 1)[:, :T].reshape(-1)


def _token_shape(logits, shifted):
    B, T, _ = logits.shape
    return (B, T - 1) if shifted else (B, T)


def _forward_sweep(logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy, with_loss, shifted,
                   cu, grad=None):
    """Sweep 1 (and with ``grad``, the gradient for an upstream gradient of 1 in the same launch)."""
    if shifted:
        shape = _token_shape(logits, True)
        target = _pad_rows(target, shape, -1)
        old, adv, weight, ref = (_pad_rows(x, shape, 0.0) for x in (old, adv, weight, ref))
        tau = _pad_rows(tau, shape, 1.0)
    hp, lmap = _unpack(params, softcap, tau)
    forward_sweep, _ = _dispatch.sweeps(logits.device)
    sequence_level = with_loss and hp.kind == GSPO_KIND
    extra = {} if grad is None else {"grad": grad}
    with _without_autocast(logits.device):
        stats = forward_sweep(logits, target, old, adv, weight, ref, hp, lmap,
                              with_entropy=with_entropy, with_loss=with_loss and not sequence_level, **extra)
    if shifted:
        stats = RowStats(*(_unpad_rows(x, shape) for x in stats))
        target, old, adv, weight, ref = (_unpad_rows(x, shape) for x in (target, old, adv, weight, ref))
    if sequence_level:  # O(N) between the sweeps: the sequence ratios from the log-probs
        n = stats.logp.numel()
        psi, seq_coef, loss, coef = _sequence_terms(stats.logp, target >= 0, old, adv, weight, ref, hp,
                                                    segment_ids(cu, n), cu.numel() - 1)
        stats = stats._replace(psi=psi, zeta=seq_coef, loss=loss, coef=coef)
    return tuple(_fp32(logits, 0) if x is None else x for x in stats)


@torch.library.custom_op("mhpo_kernels::sweeps_forward", mutates_args=())
def sweeps_forward(
    logits: Tensor, target: Tensor, old: Optional[Tensor], adv: Optional[Tensor],
    weight: Optional[Tensor], ref: Optional[Tensor], tau: Optional[Tensor], params: List[float],
    softcap: bool, with_entropy: bool, with_loss: bool, shifted: bool, inplace_backward: bool,
    cu: Optional[Tensor] = None, grad_in_forward: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sweep 1: the ``RowStats`` fields in order, each (N,) fp32 (empty when not asked for), then
    with ``grad_in_forward`` ∂L/∂logits for an upstream gradient of 1, from the same launch, in a
    buffer of the logits' shape and dtype (else empty); its backward rescales that buffer.
    ``inplace_backward`` changes only the autograd formula: its backward overwrites the logits.
    ``cu``: the (S + 1,) sequence boundaries over the B·T tokens, for a sequence-level objective."""
    grad = _grad_buffer(logits) if grad_in_forward else None
    stats = _forward_sweep(logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy, with_loss,
                           shifted, cu, grad)
    return stats + (logits.new_empty(0) if grad is None else grad,)


@sweeps_forward.register_fake
def _(logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy, with_loss, shifted,
      inplace_backward, cu=None, grad_in_forward=False):
    B, T = _token_shape(logits, shifted)
    present = (True, True, True, with_entropy) + (with_loss,) * 4
    grad = _grad_buffer(logits) if grad_in_forward else logits.new_empty(0)
    return tuple(_fp32(logits, B * T if p else 0) for p in present) + (grad,)


@torch.library.custom_op("mhpo_kernels::sweeps_forward_grad_", mutates_args=("logits",))
def sweeps_forward_grad_(
    logits: Tensor, target: Tensor, old: Optional[Tensor], adv: Optional[Tensor],
    weight: Optional[Tensor], ref: Optional[Tensor], tau: Optional[Tensor], params: List[float],
    softcap: bool, with_entropy: bool, shifted: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sweep 1 with the loss, and in the same launch ``logits`` overwritten with ∂L/∂logits for an
    upstream gradient of 1 (each row is read whole before the same program writes it). No
    autograd formula of its own: ``OneSweepInplace`` carries it."""
    return _forward_sweep(logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy, True,
                          shifted, None, logits)


@sweeps_forward_grad_.register_fake
def _(logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy, shifted):
    B, T = _token_shape(logits, shifted)
    present = (True, True, True, with_entropy) + (True,) * 4
    return tuple(_fp32(logits, B * T if p else 0) for p in present)


@torch.library.custom_op("mhpo_kernels::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: Tensor, scale: Tensor, shifted: bool) -> None:
    """Row r of ``grad`` (B, T, V) times ``scale[r]``, in place, ``scale`` one value per token
    ((B·(T − 1),) when ``shifted``: the last position's zero row is left alone). Rows whose scale
    is 1 are not touched (the check is on the device, no sync)."""
    if shifted:
        scale = _pad_rows(scale, _token_shape(grad, True), 1.0)
    _dispatch.scale_rows(grad.device)(grad, scale.float().contiguous())


@scale_rows_.register_fake
def _(grad, scale, shifted):
    return None


def _hand_back(grad, target, d_loss, shifted):
    """The gradient the forward computed for an upstream gradient of 1, times the loss's upstream
    gradient per token (1 at invalid tokens, whose rows are zero): a no-op when it is 1. Only the
    loss is differentiable then: the forward marks the log-probs and entropy non-differentiable."""
    if d_loss is None:
        return None
    scale_rows_(grad, torch.where(target >= 0, d_loss.float(), 1.0), shifted)
    return grad


class OneSweepInplace(torch.autograd.Function):
    """``grad_in_forward`` with ``inplace_backward``: the forward overwrites the logits with their
    gradient (``sweeps_forward_grad_``, whose version bump makes any other node that saved the
    logits refuse to run), the backward scales it and hands it back. Returns the first eight
    ``sweeps_forward`` outputs."""

    @staticmethod
    def forward(ctx, logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy, shifted):
        out = sweeps_forward_grad_(logits, target, old, adv, weight, ref, tau, params, softcap, with_entropy,
                                   shifted)
        ctx.save_for_backward(logits, target)  # after the overwrite: it is the gradient now
        ctx.shifted = shifted
        ctx.mark_non_differentiable(*out[:6], out[7])
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, _base, _log2_sum, _logp, _entropy, _psi, _zeta, d_loss, _coef):
        grad, target = ctx.saved_tensors
        return (_hand_back(grad, target, d_loss, ctx.shifted),) + (None,) * 10


def _backward_sweep(logits, grad, target, base, log2_sum, dlogp, entropy, dentropy, tau, params, softcap,
                    shifted):
    _, backward_sweep = _dispatch.sweeps(logits.device)
    if shifted:
        shape = _token_shape(logits, True)
        target = _pad_rows(target, shape, -1)
        base, log2_sum, dlogp, entropy, dentropy = (
            _pad_rows(x, shape, 0.0) for x in (base, log2_sum, dlogp, entropy, dentropy))
        tau = _pad_rows(tau, shape, 1.0)
    _, lmap = _unpack(params, softcap, tau)
    with _without_autocast(logits.device):
        return backward_sweep(logits, grad, target, base, log2_sum, dlogp, entropy, dentropy, lmap)


@torch.library.custom_op("mhpo_kernels::sweeps_backward", mutates_args=())
def sweeps_backward(
    logits: Tensor, target: Tensor, base: Tensor, log2_sum: Tensor, dlogp: Tensor,
    entropy: Optional[Tensor], dentropy: Optional[Tensor], tau: Optional[Tensor], params: List[float],
    softcap: bool, shifted: bool,
) -> Tensor:
    """Sweep 2: ∂L/∂logits in the logits' dtype and shape, from ∂L/∂logp and ∂L/∂H per token."""
    grad = _grad_buffer(logits)
    return _backward_sweep(logits, grad, target, base, log2_sum, dlogp, entropy, dentropy, tau, params,
                           softcap, shifted)


@sweeps_backward.register_fake
def _(logits, target, base, log2_sum, dlogp, entropy, dentropy, tau, params, softcap, shifted):
    return _grad_buffer(logits)


@torch.library.custom_op("mhpo_kernels::sweeps_backward_", mutates_args=("logits",))
def sweeps_backward_(
    logits: Tensor, target: Tensor, base: Tensor, log2_sum: Tensor, dlogp: Tensor,
    entropy: Optional[Tensor], dentropy: Optional[Tensor], tau: Optional[Tensor], params: List[float],
    softcap: bool, shifted: bool,
) -> None:
    """Sweep 2 in place: overwrite ``logits`` with ∂L/∂logits (each element is read before the
    same lane writes it)."""
    _backward_sweep(logits, logits, target, base, log2_sum, dlogp, entropy, dentropy, tau, params,
                    softcap, shifted)


@sweeps_backward_.register_fake
def _(logits, target, base, log2_sum, dlogp, entropy, dentropy, tau, params, softcap, shifted):
    return None


def _sweeps_setup(ctx, inputs, output):
    logits, target, _, _, weight, _, tau, params, softcap, with_entropy, with_loss, shifted, inplace, *rest = inputs
    cu = rest[:1]
    ctx.grad_in_forward = len(rest) > 1 and rest[1]
    base, log2_sum, logp, entropy, psi, zeta, _, coef, grad = output
    if ctx.grad_in_forward:  # the backward needs only the gradient and which rows are tokens
        ctx.save_for_backward(grad, target)
        ctx.shifted = shifted
        ctx.mark_non_differentiable(base, log2_sum, logp, entropy, psi, zeta, coef, grad)
        ctx.set_materialize_grads(False)
        return
    ctx.sequence_level = with_loss and _unpack(params, softcap)[0].kind == GSPO_KIND
    # GSPO: zeta holds each token's share of its sequence term's derivative (see _sequence_terms)
    seq = ctx.sequence_level
    ctx.save_for_backward(logits, target, base, log2_sum, coef, entropy, zeta if seq else None,
                          weight if seq else None, cu[0] if seq else None, tau)
    ctx.params, ctx.softcap, ctx.with_entropy, ctx.with_loss = params, softcap, with_entropy, with_loss
    ctx.shifted, ctx.inplace = shifted, inplace
    ctx.mark_non_differentiable(base, log2_sum, psi, zeta, coef, grad)
    ctx.set_materialize_grads(False)


@once_differentiable
def _sweeps_backward(ctx, _base, _log2_sum, d_logp, d_entropy, _psi, _zeta, d_loss, _coef, _grad):
    if ctx.grad_in_forward:
        grad, target = ctx.saved_tensors
        return (_hand_back(grad, target, d_loss, ctx.shifted),) + (None,) * 14
    logits, target, base, log2_sum, coef, entropy, seq_coef, weight, cu, tau = ctx.saved_tensors
    d_loss = d_loss if ctx.with_loss else None
    d_entropy = d_entropy if ctx.with_entropy else None
    if d_loss is None and d_logp is None and d_entropy is None:
        return (None,) * 15
    # The loss output is g_t · loss_t per token, so ∂L/∂logp_t = (∂L/∂loss_t) · coef_t.
    dlogp = torch.zeros_like(log2_sum)
    if d_loss is not None:
        dlogp = dlogp + coef * d_loss
        if ctx.sequence_level:  # loss_t = g_t · loss_i(every logp of sequence i)
            seq_id = segment_ids(cu, dlogp.numel())
            per_seq = per_sequence_sum(weight * d_loss, seq_id, cu.numel() - 1)
            dlogp = dlogp + seq_coef * per_seq[seq_id]
    if d_logp is not None:
        dlogp = dlogp + d_logp
    dent = None if d_entropy is None else d_entropy.float().contiguous()
    args = (target, base, log2_sum, dlogp.float().contiguous(), entropy if dent is not None else None,
            dent, tau, ctx.params, ctx.softcap, ctx.shifted)
    if ctx.inplace:
        sweeps_backward_(logits, *args)
        grad = logits
    else:
        grad = sweeps_backward(logits, *args)
    return (grad,) + (None,) * 14


torch.library.register_autograd("mhpo_kernels::sweeps_forward", _sweeps_backward, setup_context=_sweeps_setup)


def row_stats(logits, batch, hp, lmap, with_entropy, shifted=False, inplace_backward=False, grad_in_forward=False):
    """Sweep 1 on (B, T, V) logits (or (B, T + 1, V) when ``shifted``) and a prepared batch, as
    ``RowStats`` (absent fields None) whose logp, entropy and loss carry gradient to the logits.
    The KL term runs only for β > 0: the reference log-probs are not read at β = 0.
    ``grad_in_forward`` (a token-level loss only): the logits' gradient is computed in the same
    launch, into the logits themselves with ``inplace_backward``; only the loss is differentiable."""
    with_loss = batch.adv is not None
    ref = batch.ref if hp.beta > 0 else None
    if grad_in_forward and inplace_backward:
        out = OneSweepInplace.apply(logits, batch.target, batch.old, batch.adv, batch.weight, ref, lmap.tau,
                                    pack_params(hp, lmap), lmap.softcap, bool(with_entropy), bool(shifted))
    else:
        out = sweeps_forward(logits, batch.target, batch.old, batch.adv, batch.weight, ref, lmap.tau,
                             pack_params(hp, lmap), lmap.softcap, bool(with_entropy), with_loss,
                             bool(shifted), bool(inplace_backward), batch.cu if hp.kind == GSPO_KIND else None,
                             bool(grad_in_forward))
    present = (True, True, True, with_entropy) + (with_loss,) * 4
    return RowStats(*(x if p else None for x, p in zip(out, present)))


# ---- hidden states and LM head ------------------------------------------------------------------

@torch.library.custom_op("mhpo_kernels::fused_linear_forward", mutates_args=())
def fused_linear_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, old: Optional[Tensor],
    adv: Tensor, g: Tensor, ref: Optional[Tensor], tau: Optional[Tensor], params: List[float],
    softcap: bool, chunk_rows: int, with_entropy: bool, need_dh: bool, need_dw: bool, need_db: bool,
    entropy_coef: float = 0.0, n_valid: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, logp, entropy, psi, zeta, dhidden, dweight (fp32), dbias (fp32)); the gradients are
    for an upstream gradient of 1 and empty when not asked for. ``n_valid``: the valid tokens as
    validation counted them, None inside torch.compile (``linear_sweeps._valid_rows``)."""
    hp, lmap = _unpack(params, softcap, tau)
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


def _linear_setup(ctx, inputs, output):
    hidden, weight = inputs[0], inputs[1]
    _, logp, entropy, psi, zeta, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.needs = inputs[13:16]
    ctx.dtypes = (hidden.dtype, weight.dtype)
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
    params: List[float], softcap: bool, chunk_rows: int, with_entropy: bool, n_valid: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logp, entropy (empty unless asked), base, log2_sum), each (N,) fp32; 1 GEMM per chunk. The
    last two are the row statistics the backward needs. ``n_valid`` as in ``fused_linear_forward``."""
    _, lmap = _unpack(params, softcap, tau)
    with _without_autocast(hidden.device):
        logp, entropy, base, log2_sum = token_logprobs_sweeps(hidden, weight, bias, target, lmap, chunk_rows,
                                                              with_entropy, n_valid=n_valid)
    return logp, _fp32(hidden, 0) if entropy is None else entropy, base, log2_sum


@fused_linear_logprobs.register_fake
def _(hidden, weight, bias, target, tau, params, softcap, chunk_rows, with_entropy, n_valid=None):
    n = hidden.shape[0]
    return _fp32(hidden, n), _fp32(hidden, n if with_entropy else 0), _fp32(hidden, n), _fp32(hidden, n)


@torch.library.custom_op("mhpo_kernels::fused_linear_logprobs_backward", mutates_args=())
def fused_linear_logprobs_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, tau: Optional[Tensor],
    base: Tensor, log2_sum: Tensor, entropy: Optional[Tensor], dlogp: Tensor, dentropy: Optional[Tensor],
    params: List[float], softcap: bool, chunk_rows: int, need_dh: bool, need_dw: bool, need_db: bool,
    n_valid: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dhidden, dweight, dbias) in the inputs' dtypes (empty when not asked for): per chunk, the
    tile recomputed (1 GEMM), turned into its gradient by sweep 2, folded (2 GEMMs)."""
    _, lmap = _unpack(params, softcap, tau)
    with _without_autocast(hidden.device):
        dh, dw, db = token_logprobs_grads(hidden, weight, bias, target, lmap, chunk_rows, base, log2_sum,
                                          entropy, dlogp, dentropy, need_dh, need_dw, need_db, n_valid=n_valid)
    return (hidden.new_empty(0) if dh is None else dh, weight.new_empty(0) if dw is None else dw.to(weight.dtype),
            weight.new_empty(0) if db is None else db.to(weight.dtype))


@fused_linear_logprobs_backward.register_fake
def _(hidden, weight, bias, target, tau, base, log2_sum, entropy, dlogp, dentropy, params, softcap,
      chunk_rows, need_dh, need_dw, need_db, n_valid=None):
    return (hidden.new_empty(hidden.shape if need_dh else (0,)), weight.new_empty(weight.shape if need_dw else (0,)),
            weight.new_empty(weight.shape[0] if need_db else 0))


def _logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, target, tau, params, softcap, chunk_rows, with_entropy, *n_valid = inputs
    logp, entropy, base, log2_sum = output
    ctx.save_for_backward(hidden, weight, bias, target, tau, base, log2_sum, entropy if with_entropy else None)
    ctx.params, ctx.softcap, ctx.chunk_rows = params, softcap, chunk_rows
    ctx.n_valid = n_valid[0] if n_valid else None
    ctx.mark_non_differentiable(base, log2_sum)
    ctx.set_materialize_grads(False)


@once_differentiable
def _logprobs_backward(ctx, d_logp, d_entropy, _base, _log2_sum):
    hidden, weight, bias, target, tau, base, log2_sum, entropy = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[:2]
    need_db = bias is not None and ctx.needs_input_grad[2]
    if entropy is None:
        d_entropy = None
    if (d_logp is None and d_entropy is None) or not (need_dh or need_dw or need_db):
        return (None,) * 10
    dlogp = torch.zeros_like(base) if d_logp is None else d_logp.float().contiguous()
    dent = None if d_entropy is None else d_entropy.float().contiguous()
    dh, dw, db = fused_linear_logprobs_backward(
        hidden, weight, bias, target, tau, base, log2_sum, entropy if dent is not None else None, dlogp, dent,
        ctx.params, ctx.softcap, ctx.chunk_rows, need_dh, need_dw, need_db, ctx.n_valid)
    grads = (dh if need_dh else None, dw if need_dw else None, db if need_db else None)
    return grads + (None,) * 7


torch.library.register_autograd("mhpo_kernels::fused_linear_logprobs", _logprobs_backward,
                                setup_context=_logprobs_setup)
