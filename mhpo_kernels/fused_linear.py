"""Hidden states and the LM head straight to the MHPO loss: the (N, V) logits never exist whole.

Per chunk of tokens: one GEMM makes the (rows, V) logits tile, sweep 1 gives the per-token loss
and dL/dlogp, and, since the loss is the only consumer of the logits, sweep 2 turns the tile into
its gradient in place right away, which two more GEMMs fold into dhidden and dweight. That is 3
GEMMs per chunk; a path that recomputes the tile in the backward needs 4. The backward then only
scales the stored gradients by the upstream gradient.
"""

import torch

from . import _dispatch
from ._config import fused_linear_chunk_rows
from ._inputs import LOGIT_DTYPES, check_positive, prepare_mhpo, prepare_tokens
from ._sweep_types import LogitMap, MHPOParams, RowStats
from .loss import metrics_from_stats, mhpo_params


def _check_linear(hidden, weight, bias, logit_scale, final_logit_softcap, chunk_size):
    """Validate the projection's arguments; returns hidden as (N, H) and the chunk rows."""
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if x is None and name == "bias":
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in LOGIT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (B, T, H) or (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be (V, H) with H = {hidden.shape[-1]} and V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device}, but hidden is on {hidden.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias must be a {hidden.dtype} tensor on {hidden.device}")
    check_positive("logit_scale", logit_scale)
    if final_logit_softcap is not None:
        check_positive("final_logit_softcap", final_logit_softcap)
    if chunk_size is None:
        chunk_size = fused_linear_chunk_rows(weight.shape[0], hidden.element_size())
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}")
    return hidden.reshape(-1, hidden.shape[-1]), chunk_size


def _logits_tiles(hidden, weight, bias, chunk_rows):
    """(r0, r1, hidden rows, logits tile (1, rows, V)) per chunk of tokens: one GEMM each."""
    for r0 in range(0, hidden.shape[0], chunk_rows):
        r1 = min(r0 + chunk_rows, hidden.shape[0])
        h_c = hidden[r0:r1]
        tile = torch.mm(h_c, weight.t()) if bias is None else torch.addmm(bias, h_c, weight.t())
        yield r0, r1, h_c, tile.unsqueeze(0)


def _addmm_fp32(acc, a, b):
    """acc += a @ b into an fp32 accumulator without first rounding a @ b to a's dtype.

    On CUDA, bf16/fp16 operands go through one GEMM with an fp32 output (torch ≥ 2.8); otherwise
    the operands are widened to fp32 (exact, slower)."""
    if acc.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):  # a torch without addmm(out_dtype=)
            pass
    acc.addmm_(a.float(), b.float())


def _cat(parts):
    return None if parts[0] is None else torch.cat(parts)


class FusedLinearMHPOFunction(torch.autograd.Function):
    """Loss (0-d fp32, differentiable to hidden, weight, bias) and detached per-token RowStats
    fields (logp, entropy, psi, zeta) from hidden (N, H) and weight (V, H)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, old, adv, g, ref, hp, lmap, chunk_rows,
                with_entropy, with_grad):
        forward_sweep, backward_sweep = _dispatch.sweeps(hidden.device)
        need_dh, need_dw, need_db = (with_grad and ctx.needs_input_grad[i] for i in range(3))
        N, H = hidden.shape
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_db else None
        parts = []
        for r0, r1, h_c, tile in _logits_tiles(hidden, weight, bias, chunk_rows):
            def rows(x):
                return None if x is None else x[r0:r1]

            stats = forward_sweep(tile, rows(target), rows(old), rows(adv), rows(g), rows(ref), hp,
                                  lmap, with_entropy=with_entropy, with_loss=True)
            parts.append(stats)
            if not (need_dh or need_dw or need_db):
                continue
            # The tile becomes ∂L/∂logits for G = 1 (the upstream gradient scales it in backward).
            backward_sweep(tile, tile, rows(target), stats.row_max, stats.log_sum, stats.coef,
                           None, None, lmap)
            grad = tile[0]
            if need_dh:
                torch.mm(grad, weight, out=dh[r0:r1])
            if need_dw:
                _addmm_fp32(dw, grad.t(), h_c)
            if need_db:
                db += grad.sum(0, dtype=torch.float32)
        stats = RowStats(*(_cat(list(field)) if parts else None for field in zip(*parts)))
        if not parts:  # N = 0
            stats = RowStats.empty(0, hidden.device, with_entropy=with_entropy, with_loss=True)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        outputs = (stats.loss.sum(), stats.logp, stats.entropy, stats.psi, stats.zeta)
        ctx.mark_non_differentiable(*(x for x in outputs[1:] if x is not None))
        return outputs

    @staticmethod
    def backward(ctx, d_loss, *_):
        dh, dw, db = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes

        def scaled(x, dtype):
            if x is None:
                return None
            out = torch.empty(x.shape, dtype=dtype, device=x.device)
            return torch.mul(x, d_loss, out=out)  # fp32 accumulators round once, here

        return (scaled(dh, h_dtype), scaled(dw, w_dtype), scaled(db, w_dtype)) + (None,) * 10


def fused_linear_mhpo_loss(
    hidden, weight, input_ids, old_logprobs, advantages, mask=None, *, bias=None,
    logit_scale=1.0, final_logit_softcap=None, chunk_size=None, c=1.5, k_pos=1.5, lam_pos=1.0,
    k_neg=2.0, lam_neg=0.8, temperature=1.0, loss_agg_mode="seq-mean-token-mean",
    ref_logprobs=None, beta=0.0, ignore_index=-100, return_metrics=False,
):
    """``mhpo_loss`` on the logits of an LM head, without ever allocating N × V.

    Equals ``mhpo_loss(z, input_ids, ...)`` with every keyword of ``mhpo_loss``, where

        z = s · (hidden @ weight.T + bias)                      s = logit_scale
        z = cap · tanh(z / cap)                                 if final_logit_softcap (Gemma)

    and the gradient flows to ``hidden``, ``weight`` and ``bias``.

    Args:
        hidden: (B, T, H) or (N, H), float32/bfloat16/float16; input_ids etc. as in ``mhpo_loss``
            with shapes (B, T) or (N,).
        weight: (V, H) in hidden's dtype; bias: optional (V,).
        chunk_size: tokens per chunk; default: the most rows whose (rows, V) logits tile fits
            1 GiB (``_config.FUSED_LINEAR_TILE_BYTES``), a multiple of 256.

    Memory beyond the inputs: one logits tile (chunk_size × V in hidden's dtype), the weight
    gradient accumulated in fp32 (V × H × 4 bytes: 2.5 GB at V 151,936, H 4096) and dhidden
    (N × H in hidden's dtype), all held from the forward to the backward; per-token scalars.
    The tile GEMM runs in hidden's dtype with fp32 accumulation (the logits are rounded to that
    dtype as ``hidden @ weight.T`` would be); the sweeps compute in fp32.
    """
    hp = mhpo_params(c, k_pos, lam_pos, k_neg, lam_neg, beta)
    hidden2d, chunk_rows = _check_linear(hidden, weight, bias, logit_scale, final_logit_softcap, chunk_size)
    lmap = LogitMap.make(check_positive("temperature", temperature), logit_scale, final_logit_softcap)
    batch = prepare_mhpo(
        input_ids, hidden.shape[:-1], weight.shape[0], hidden.device, old_logprobs, advantages,
        mask, ref_logprobs, beta, loss_agg_mode, ignore_index, source="hidden without H",
    )
    with_grad = torch.is_grad_enabled()
    loss, logp, entropy, psi, zeta = FusedLinearMHPOFunction.apply(
        hidden2d, weight, bias, batch.target, batch.old, batch.adv, batch.weight, batch.ref, hp,
        lmap, chunk_rows, bool(return_metrics), with_grad,
    )
    if not return_metrics:
        return loss
    return loss, metrics_from_stats(logp, entropy, psi, zeta, batch, hp.c)


@torch.no_grad()
def fused_linear_token_logprobs(
    hidden, weight, input_ids, *, bias=None, logit_scale=1.0, final_logit_softcap=None,
    chunk_size=None, temperature=1.0, ignore_index=-100, return_entropy=False,
):
    """``token_logprobs`` of the LM head's logits (see ``fused_linear_mhpo_loss`` for z), chunked:
    for the old- and reference-policy passes. Not differentiable: the results carry no gradient.
    Returns fp32 log-probs shaped like input_ids (and the entropy), 0 at ignored positions."""
    hidden2d, chunk_rows = _check_linear(hidden, weight, bias, logit_scale, final_logit_softcap, chunk_size)
    lmap = LogitMap.make(check_positive("temperature", temperature), logit_scale, final_logit_softcap)
    batch = prepare_tokens(input_ids, hidden.shape[:-1], weight.shape[0], hidden.device, ignore_index,
                           source="hidden without H")
    forward_sweep, _ = _dispatch.sweeps(hidden.device)
    logp = torch.empty(hidden2d.shape[0], dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logp) if return_entropy else None
    for r0, r1, _, tile in _logits_tiles(hidden2d, weight, bias, chunk_rows):
        stats = forward_sweep(tile, batch.target[r0:r1], None, None, None, None, MHPOParams(), lmap,
                              with_entropy=return_entropy, with_loss=False)
        logp[r0:r1] = stats.logp
        if return_entropy:
            entropy[r0:r1] = stats.entropy
    logp = logp.reshape(batch.token_shape)
    return (logp, entropy.reshape(batch.token_shape)) if return_entropy else logp
