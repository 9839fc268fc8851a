"""The fused linear path's chunk loop: per chunk of tokens, one GEMM makes the logits tile, sweep 1
gives the per-token loss and dL/dlogp, sweep 2 turns the tile into its gradient in place, and two
GEMMs fold it into dhidden and dweight (3 GEMMs per chunk; recomputing the tile in the backward
would take 4)."""

import functools

import torch

from . import _dispatch
from ._sweep_types import MHPOParams, RowStats


def _logits_tiles(hidden, weight, bias, target, chunk_rows):
    """(r0, r1, hidden rows, logits tile (1, rows, V)) per chunk of tokens: one GEMM each. The
    hidden states of invalid tokens are zeroed first: they may hold anything, and a NaN there
    would otherwise reach dweight through the GEMM (0 · NaN = NaN)."""
    for r0 in range(0, hidden.shape[0], chunk_rows):
        r1 = min(r0 + chunk_rows, hidden.shape[0])
        h_c = torch.where((target[r0:r1] >= 0).unsqueeze(-1), hidden[r0:r1], 0.0)
        tile = torch.mm(h_c, weight.t()) if bias is None else torch.addmm(bias, h_c, weight.t())
        yield r0, r1, h_c, tile.unsqueeze(0)


@functools.lru_cache(maxsize=None)
def _has_fp32_out_addmm(device_type, dtype):
    """Whether this torch runs ``addmm(..., out_dtype=torch.float32)`` for ``dtype`` operands
    (CUDA, torch ≥ 2.8): probed once on tiny tensors, so that a real GEMM's errors (out of
    memory) are never mistaken for a missing overload."""
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    a = torch.zeros(2, 2, dtype=dtype, device=device_type)
    acc = torch.zeros(2, 2, dtype=torch.float32, device=device_type)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def _addmm_fp32(acc, a, b):
    """acc += a @ b into an fp32 accumulator without first rounding a @ b to a's dtype: one GEMM
    with an fp32 output where torch has it (CUDA bf16/fp16), else on operands widened to fp32
    (exact, slower)."""
    if _has_fp32_out_addmm(acc.device.type, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _cat(parts):
    return None if parts[0] is None else torch.cat(parts)


def fused_linear_sweeps(hidden, weight, bias, target, old, adv, g, ref, hp, lmap, chunk_rows,
                        with_entropy, need_dh, need_dw, need_db):
    """(loss, logp, entropy, psi, zeta, dhidden, dweight, dbias) from hidden (N, H), weight (V, H):
    the loss a 0-d fp32 sum of g_t · loss_t, the per-token fields (N,) fp32 (entropy None unless
    asked), the gradients for an upstream gradient of 1 (None unless asked; dweight and dbias in
    fp32, dhidden in hidden's dtype)."""
    forward_sweep, backward_sweep = _dispatch.sweeps(hidden.device)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_db else None
    parts = []
    for r0, r1, h_c, tile in _logits_tiles(hidden, weight, bias, target, chunk_rows):
        def rows(x):
            return None if x is None else x[r0:r1]

        stats = forward_sweep(tile, rows(target), rows(old), rows(adv), rows(g), rows(ref), hp, lmap,
                              with_entropy=with_entropy, with_loss=True)
        parts.append(stats)
        if not (need_dh or need_dw or need_db):
            continue
        # The tile becomes ∂L/∂logits for an upstream gradient of 1.
        backward_sweep(tile, tile, rows(target), stats.row_max, stats.log_sum, stats.coef, None, None, lmap)
        grad = tile[0]
        if need_dh:
            torch.mm(grad, weight, out=dh[r0:r1])
        if need_dw:
            _addmm_fp32(dw, grad.t(), h_c)
        if need_db:
            db += grad.sum(0, dtype=torch.float32)
    if parts:
        stats = RowStats(*(None if f[0] is None else torch.cat(f) for f in zip(*parts)))
    else:  # no tokens
        stats = RowStats.empty(0, hidden.device, with_entropy=with_entropy, with_loss=True)
    return stats.loss.sum(), stats.logp, stats.entropy, stats.psi, stats.zeta, dh, dw, db


def token_logprobs_sweeps(hidden, weight, bias, target, lmap, chunk_rows, with_entropy):
    """No-grad (logp, entropy or None), each (N,) fp32, chunk by chunk."""
    forward_sweep, _ = _dispatch.sweeps(hidden.device)
    logp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logp) if with_entropy else None
    for r0, r1, _, tile in _logits_tiles(hidden, weight, bias, target, chunk_rows):
        stats = forward_sweep(tile, target[r0:r1], None, None, None, None, MHPOParams(), lmap,
                              with_entropy=with_entropy, with_loss=False)
        logp[r0:r1] = stats.logp
        if with_entropy:
            entropy[r0:r1] = stats.entropy
    return logp, entropy
