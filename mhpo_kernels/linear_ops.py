"""The fused linear path's custom ops and autograd formulas: on one rank (``torch.library`` ops,
opaque to torch.compile like the sweeps' ops in ``ops``) and over a vocabulary slice (autograd
functions around ``linear_sweeps`` with ``tp``). The chunk loops themselves are ``linear_sweeps``.

=================================  =========================================  ===========================
call                               forward                                    backward
=================================  =========================================  ===========================
``fused_linear_*_loss``            ``fused_linear_forward``: per chunk a      the saved gradients,
                                   GEMM, both sweeps, two GEMMs               scaled
``fused_linear_token_logprobs``    ``fused_linear_logprobs``: per chunk a     ``fused_linear_logprobs_``
                                   GEMM and sweep 1                           ``backward``: GEMM, sweep
                                                                              2, two GEMMs
=================================  =========================================  ===========================
"""

import dataclasses
import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .linear_sweeps import fused_linear_sweeps, token_logprobs_grads, token_logprobs_sweeps
from ._op_support import ENTROPY_COEF, _fp32, _unpack, _without_autocast, once_differentiable
from ._sweep_types import LogitMap, truncated_rows
from .epilogue import left_out
from .vocab_parallel import outside_kept_set


# ---- hidden states and LM head ------------------------------------------------------------------

@torch.library.custom_op("mhpo_kernels::fused_linear_forward", mutates_args=())
def fused_linear_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, old: Optional[Tensor],
    adv: Tensor, g: Tensor, ref: Optional[Tensor], tau: Optional[Tensor], params: Tensor,
    softcap: bool, chunk_rows: int, with_entropy: bool, need_dh: bool, need_dw: bool, need_db: bool,
    n_valid: Optional[int] = None, batch_invariant: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, logp, entropy, psi, zeta, dhidden, dweight (fp32), dbias (fp32)); the gradients are
    for an upstream gradient of 1 and empty when not asked for. The entropy bonus's coefficient is
    ``params``' (a runtime scalar: a new one is no recompile). ``n_valid``: the valid tokens as
    validation counted them, None inside torch.compile (``linear_sweeps._valid_rows``).
    ``batch_invariant``: every chunk ``chunk_rows`` rows (``linear_sweeps._whole_chunks``)."""
    hp, lmap, values = _unpack(params, softcap, tau)
    with _without_autocast(hidden.device):
        loss, logp, entropy, psi, zeta, dh, dw, db = fused_linear_sweeps(
            hidden, weight, bias, target, old, adv, g, ref, hp, lmap, chunk_rows, with_entropy,
            need_dh, need_dw, need_db, n_valid=n_valid, entropy_coef=values[ENTROPY_COEF],
            batch_invariant=batch_invariant)
    return (loss, logp, _fp32(hidden, 0) if entropy is None else entropy, psi, zeta,
            hidden.new_empty(0) if dh is None else dh, _fp32(hidden, 0) if dw is None else dw,
            _fp32(hidden, 0) if db is None else db)


@fused_linear_forward.register_fake
def _(hidden, weight, bias, target, old, adv, g, ref, tau, params, softcap, chunk_rows, with_entropy,
      need_dh, need_dw, need_db, n_valid=None, batch_invariant=False):
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
    n_valid: Optional[int] = None
    batch_invariant: bool = False


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
    computed for 1 (None where not needed): each element multiplied in fp32 and rounded once (the
    factor a (1,) fp32 tensor: a 0-d one would be computed in the gradients' dtype on CUDA)."""
    h_dtype, w_dtype = dtypes
    factor = d_loss.float().reshape(1)

    def scaled(x, need, dtype):
        if not need:
            return None
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        return torch.mul(x, factor, out=out)

    return tuple(scaled(x, need, dtype) for x, need, dtype in zip(saved, needs, (h_dtype, w_dtype, w_dtype)))


@once_differentiable
def _linear_backward(ctx, d_loss, *_):
    if d_loss is None:
        return (None,) * len(LinearArgs._fields)
    grads = scaled_linear_grads(ctx.saved_tensors, ctx.needs, ctx.dtypes, d_loss)
    return grads + (None,) * (len(LinearArgs._fields) - 3)


torch.library.register_autograd("mhpo_kernels::fused_linear_forward", _linear_backward, setup_context=_linear_setup)


# ---- differentiable log-probs and entropy of an LM head ------------------------------------------

@torch.library.custom_op("mhpo_kernels::fused_linear_logprobs", mutates_args=())
def fused_linear_logprobs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, tau: Optional[Tensor],
    params: Tensor, softcap: bool, chunk_rows: int, with_entropy: bool, n_valid: Optional[int] = None,
    min_p: Optional[Tensor] = None, top_k: Optional[Tensor] = None, top_p: Optional[Tensor] = None,
    batch_invariant: bool = False, kept_offsets: Optional[Tensor] = None, kept_ids: Optional[Tensor] = None,
    loss: bool = False, old: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logp, entropy (empty unless asked), base, lse2_rest, cut (empty unless filtered)), each
    (N,) fp32; 1 GEMM per chunk. The last three are the row statistics the backward needs.
    ``n_valid`` as in ``fused_linear_forward``; ``min_p``, ``top_k``, ``top_p`` (N,): the
    sampler's truncated softmax (SPEC.md, section 9), whose kept sets ``cut`` holds;
    ``kept_offsets`` and ``kept_ids``: a replayed kept set (``LogitMap``). ``loss``: the log-probs
    of a truncated loss, with its ``old`` log-probs (None for an objective that reads none): the
    backward leaves out the tokens the loss leaves out (``_grad_target``)."""
    _, lmap, _ = _unpack(params, softcap, tau, min_p=min_p, top_k=top_k, top_p=top_p, kept_offsets=kept_offsets,
                         kept_ids=kept_ids)
    with _without_autocast(hidden.device):
        logp, entropy, base, lse2_rest, cut = token_logprobs_sweeps(hidden, weight, bias, target, lmap, chunk_rows,
                                                                   with_entropy, n_valid=n_valid,
                                                                   batch_invariant=batch_invariant)
    return (logp, _fp32(hidden, 0) if entropy is None else entropy, base, lse2_rest,
            _fp32(hidden, 0) if cut is None else cut)


@fused_linear_logprobs.register_fake
def _(hidden, weight, bias, target, tau, params, softcap, chunk_rows, with_entropy, n_valid=None, min_p=None,
      top_k=None, top_p=None, batch_invariant=False, kept_offsets=None, kept_ids=None, loss=False, old=None):
    n = hidden.shape[0]
    filtered = min_p is not None or top_k is not None or top_p is not None
    return (_fp32(hidden, n), _fp32(hidden, n if with_entropy else 0), _fp32(hidden, n), _fp32(hidden, n),
            _fp32(hidden, n if filtered else 0))


@torch.library.custom_op("mhpo_kernels::fused_linear_logprobs_backward", mutates_args=())
def fused_linear_logprobs_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, tau: Optional[Tensor],
    base: Tensor, lse2_rest: Tensor, entropy: Optional[Tensor], dlogp: Tensor, dentropy: Optional[Tensor],
    params: Tensor, softcap: bool, chunk_rows: int, need_dh: bool, need_dw: bool, need_db: bool,
    n_valid: Optional[int] = None, cut: Optional[Tensor] = None, batch_invariant: bool = False,
    kept_offsets: Optional[Tensor] = None, kept_ids: Optional[Tensor] = None, grad_target: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dhidden, dweight, dbias) in the inputs' dtypes (empty when not asked for): per chunk, the
    tile recomputed (1 GEMM), turned into its gradient by sweep 2, folded (2 GEMMs). ``cut``: the
    forward's kept-set thresholds of a filtered softmax; ``kept_offsets``, ``kept_ids``: a
    replayed kept set; ``grad_target``: the targets with −1 at the tokens that pass no gradient
    (``linear_sweeps.token_logprobs_grads``)."""
    _, lmap, _ = _unpack(params, softcap, tau, cut=cut, kept_offsets=kept_offsets, kept_ids=kept_ids)
    with _without_autocast(hidden.device):
        dh, dw, db = token_logprobs_grads(hidden, weight, bias, target, lmap, chunk_rows, base, lse2_rest,
                                          entropy, dlogp, dentropy, need_dh, need_dw, need_db, n_valid=n_valid,
                                          batch_invariant=batch_invariant, grad_target=grad_target)
    return (hidden.new_empty(0) if dh is None else dh, weight.new_empty(0) if dw is None else dw.to(weight.dtype),
            weight.new_empty(0) if db is None else db.to(weight.dtype))


@fused_linear_logprobs_backward.register_fake
def _(hidden, weight, bias, target, tau, base, lse2_rest, entropy, dlogp, dentropy, params, softcap,
      chunk_rows, need_dh, need_dw, need_db, n_valid=None, cut=None, batch_invariant=False, kept_offsets=None,
      kept_ids=None, grad_target=None):
    return (hidden.new_empty(hidden.shape if need_dh else (0,)), weight.new_empty(weight.shape if need_dw else (0,)),
            weight.new_empty(weight.shape[0] if need_db else 0))


class LogprobsArgs(NamedTuple):
    """``fused_linear_logprobs``' inputs by name (autograd's setup receives them as a tuple)."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    target: Tensor
    tau: Optional[Tensor]
    params: Tensor
    softcap: bool
    chunk_rows: int
    with_entropy: bool
    n_valid: Optional[int] = None
    min_p: Optional[Tensor] = None
    top_k: Optional[Tensor] = None
    top_p: Optional[Tensor] = None
    batch_invariant: bool = False
    kept_offsets: Optional[Tensor] = None
    kept_ids: Optional[Tensor] = None
    loss: bool = False
    old: Optional[Tensor] = None


def _grad_target(target, logp, truncated, loss, old, dentropy):
    """``target`` with −1 at the tokens that pass no gradient at all (SPEC.md, section 9), or None
    where there are none: those a truncated loss leaves out (``epilogue.left_out``), and of
    log-probs alone, a target outside its kept set whose entropy gets no gradient either."""
    if truncated is None or not (loss or dentropy is None):
        return None
    return torch.where(left_out(logp, truncated, old if loss else None), -1, target)


def _logprobs_setup(ctx, inputs, output):
    a = LogprobsArgs(*inputs)
    filtered = any(x is not None for x in (a.min_p, a.top_k, a.top_p))
    logp, entropy, base, lse2_rest, cut = output
    truncated = filtered or a.kept_offsets is not None
    ctx.save_for_backward(a.hidden, a.weight, a.bias, a.target, a.tau, base, lse2_rest,
                          entropy if a.with_entropy else None, cut if filtered else None, a.kept_offsets, a.kept_ids,
                          logp if truncated else None, a.old if a.loss else None)
    ctx.loss = a.loss
    ctx.params, ctx.softcap, ctx.chunk_rows, ctx.n_valid = a.params, a.softcap, a.chunk_rows, a.n_valid
    ctx.batch_invariant = bool(a.batch_invariant)
    ctx.mark_non_differentiable(base, lse2_rest, cut)
    ctx.set_materialize_grads(False)


@once_differentiable
def _logprobs_backward(ctx, d_logp, d_entropy, _base, _log2_sum, _cut):
    hidden, weight, bias, target, tau, base, lse2_rest, entropy, cut, kept_offsets, kept_ids, logp, old = \
        ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[:2]
    need_db = bias is not None and ctx.needs_input_grad[2]
    if entropy is None:
        d_entropy = None
    if (d_logp is None and d_entropy is None) or not (need_dh or need_dw or need_db):
        return (None,) * len(LogprobsArgs._fields)
    dlogp = torch.zeros_like(base) if d_logp is None else d_logp.float().contiguous()
    dent = None if d_entropy is None else d_entropy.float().contiguous()
    # From the saved tensors: under torch.compile the host params are not read here.
    truncated = None if logp is None else truncated_rows(cut, **LogitMap.replay_rows(kept_offsets))
    dh, dw, db = fused_linear_logprobs_backward(
        hidden, weight, bias, target, tau, base, lse2_rest, entropy if dent is not None else None, dlogp, dent,
        ctx.params, ctx.softcap, ctx.chunk_rows, need_dh, need_dw, need_db, ctx.n_valid, cut, ctx.batch_invariant,
        kept_offsets, kept_ids, _grad_target(target, logp, truncated, ctx.loss, old, dent))
    grads = (dh if need_dh else None, dw if need_dw else None, db if need_db else None)
    return grads + (None,) * (len(LogprobsArgs._fields) - 3)


torch.library.register_autograd("mhpo_kernels::fused_linear_logprobs", _logprobs_backward,
                                setup_context=_logprobs_setup)


# ---- over a vocabulary slice (tensor parallelism) -----------------------------------------------

class _VocabParallelLinear(torch.autograd.Function):
    """The fused linear path on this rank's rows of the LM head (``linear_sweeps`` with ``tp``):
    the forward computes the loss and the gradients for an upstream gradient of 1, the backward
    scales them; no collective in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, batch, hp, lmap, chunk_rows, with_entropy, needs, reduce_dhidden,
                entropy_coef):
        loss, logp, entropy, psi, zeta, dh, dw, db = fused_linear_sweeps(
            hidden, weight, bias, batch.target, batch.old, batch.adv, batch.weight,
            batch.ref if hp.beta > 0 else None, hp, lmap, chunk_rows, with_entropy, *needs,
            tp=batch.tp, reduce_dhidden=reduce_dhidden, n_valid=batch.n_valid, entropy_coef=entropy_coef)
        ctx.save_for_backward(dh, dw, db)
        ctx.needs, ctx.dtypes = needs, (hidden.dtype, weight.dtype)
        empty = logp.new_empty(0)
        outputs = (logp, empty if entropy is None else entropy, psi, zeta)
        ctx.mark_non_differentiable(*outputs)
        return (loss,) + outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, d_loss, *_):
        return scaled_linear_grads(ctx.saved_tensors, ctx.needs, ctx.dtypes, d_loss) + (None,) * 8


def vocab_parallel_linear(hidden, weight, bias, batch, hp, lmap, chunk_rows, with_entropy, reduce_dhidden,
                          entropy_coef=0.0):
    """(loss, logp, entropy, psi, zeta) of the fused linear path over a vocabulary slice."""
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    return _VocabParallelLinear.apply(hidden, weight, bias, batch, hp, lmap, chunk_rows, with_entropy, needs,
                                      reduce_dhidden, entropy_coef)


class _VocabParallelLogprobs(torch.autograd.Function):
    """Differentiable (logp, entropy) of this rank's rows of the LM head, global over the group,
    and the rows' kept-set thresholds (the filters'): the forward is ``linear_sweeps.token_logprobs_sweeps`` with
    ``tp`` (its combine makes the global statistics), the backward ``token_logprobs_grads`` with
    those statistics, whose only collective is dhidden's all-reduce."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, batch, lmap, chunk_rows, with_entropy, reduce_dhidden, loss, old):
        # A replayed kept set: this rank's ids (vocab_parallel.py); its targets outside their
        # sets get no log-prob gradient on any rank.
        outside = outside_kept_set(lmap, batch.target) if lmap.replayed else None
        if lmap.replayed:
            lmap = dataclasses.replace(lmap, kept_ids=batch.tp.local_kept_ids(lmap.kept_ids))
        logp, entropy, base, lse2_rest, cut = token_logprobs_sweeps(hidden, weight, bias, batch.target, lmap,
                                                                    chunk_rows, with_entropy, tp=batch.tp,
                                                                    n_valid=batch.n_valid)
        if outside is not None:   # −inf whatever the set's logits hold (a NaN there would merge to NaN)
            logp = torch.where(outside, -math.inf, logp)
        # A target outside its kept set (or at −inf, in none) has log-prob −inf on every rank.
        truncated = lmap.truncated_rows(cut)
        if cut is not None:
            # The filters' thresholds on this slice's exponents at ``base``, where the backward
            # forms them.
            lmap = dataclasses.replace(lmap, min_p=None, top_k=None, top_p=None, cut=cut)
        ctx.save_for_backward(hidden, weight, bias, base, lse2_rest, entropy, logp, truncated, old if loss else None)
        ctx.loss = loss
        ctx.batch, ctx.lmap, ctx.chunk_rows, ctx.reduce_dhidden = batch, lmap, chunk_rows, reduce_dhidden
        ctx.set_materialize_grads(False)  # an entropy kept for logging only adds no backward term
        empty = logp.new_empty(0)
        cut = empty if cut is None else cut
        ctx.mark_non_differentiable(cut)
        return logp, empty if entropy is None else entropy, cut

    @staticmethod
    @once_differentiable
    def backward(ctx, d_logp, d_entropy, _cut):
        hidden, weight, bias, base, lse2_rest, entropy, logp, truncated, old = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        dent = None if entropy is None or d_entropy is None else d_entropy.float().contiguous()
        dlogp = torch.zeros_like(base) if d_logp is None else d_logp.float().contiguous()
        if truncated is not None:  # a target outside its kept set: no log-prob gradient
            dlogp = torch.where(left_out(logp, truncated), 0.0, dlogp)
        # Every rank runs the same backward (dhidden's all-reduce included), whichever output got a gradient.
        dh, dw, db = token_logprobs_grads(
            hidden, weight, bias, ctx.batch.target, ctx.lmap, ctx.chunk_rows, base, lse2_rest, entropy,
            dlogp, dent, need_dh, need_dw, need_db and bias is not None, tp=ctx.batch.tp,
            reduce_dhidden=ctx.reduce_dhidden, n_valid=ctx.batch.n_valid,
            grad_target=_grad_target(ctx.batch.target, logp, truncated, ctx.loss, old, dent))
        grads = (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(weight.dtype))
        return grads + (None,) * 7


def vocab_parallel_logprobs(hidden, weight, bias, batch, lmap, chunk_rows, with_entropy, reduce_dhidden, loss=False,
                            old=None):
    """(logp, entropy or an empty tensor, the rows' thresholds of the filters or an empty tensor)
    of the fused linear path over a vocabulary slice; ``loss`` and ``old`` as in
    ``fused_linear_logprobs``."""
    return _VocabParallelLogprobs.apply(hidden, weight, bias, batch, lmap, chunk_rows, with_entropy,
                                        reduce_dhidden, loss, old)

