"""What the package's custom ops share (``ops``, the sweeps; ``linear_ops``, the fused linear path):
the runtime scalars as one host tensor, and a backward that cannot be differentiated again."""

import functools

import torch
from torch import Tensor

from ._sweep_types import LogitMap, TokenParams


# The runtime scalars of a call, in one float64 host (CPU) tensor: reading them is no device sync,
# and inside torch.compile they are a graph input, so a new value (β, τ, the entropy bonus) reuses
# the compiled graph. Slots: the objective's five values, β, the logit map's two scales, the
# epilogue's kind and MHPO's LFM/DHP switches (small integers, exact), the entropy bonus, the
# upstream gradient the one-sweep kernel computes the logits' gradient for (``grad_in_forward``),
# and the backend the sweeps run on (an index of ``BACKENDS``; −1: the one current where they
# run), the call's ``LogitMap.backend``: its backward runs where its forward ran.
BETA, IN_SCALE, OUT_SCALE, KIND, LFM, DHP, ENTROPY_COEF, GRAD_SCALE, BACKEND = range(5, 14)
BACKENDS = ("triton", "torch")


def pack_params(hp, lmap, entropy_coef=0.0, grad_scale=1.0):
    """The ``params`` host tensor of the ops (slots above)."""
    values = [*hp.values, hp.beta, lmap.in_scale, lmap.out_scale, hp.kind, hp.lfm, hp.dhp, entropy_coef, grad_scale,
              -1 if lmap.backend is None else BACKENDS.index(lmap.backend)]
    if torch.compiler.is_compiling():
        # A number that changed between calls is symbolic here; torch.tensor of it would specialize
        # the graph on its value (a recompile per value), arithmetic on a tensor keeps it an input.
        zero = torch.zeros((), dtype=torch.float64, device="cpu")
        return torch.stack([zero + v for v in values])
    return torch.tensor(values, dtype=torch.float64, device="cpu")   # not torch's default device


def _unpack(params, softcap, tau=None, **per_row):
    """(TokenParams, LogitMap, every value by its slot) from ``params``: read on the host.
    ``per_row``: the map's truncation tensors by name (``LogitMap``; a replayed kept set as its
    CSR ``kept_offsets`` and ``kept_ids``)."""
    v = params.detach().numpy().tolist()
    hp = TokenParams(int(v[KIND]), tuple(v[:5]), v[BETA], bool(v[LFM]), bool(v[DHP]))
    replay = LogitMap.replay_rows(per_row.pop("kept_offsets", None))
    backend = None if v[BACKEND] < 0 else BACKENDS[int(v[BACKEND])]
    lmap = LogitMap(v[IN_SCALE], v[OUT_SCALE], softcap, tau, **per_row, **replay, backend=backend)
    return hp, lmap, v


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
        present = [g.detach().requires_grad_() for g in out if isinstance(g, Tensor)]
        if not present:
            return out
        wrapped = iter(_NotDifferentiable.apply(*present))
        return tuple(next(wrapped) if isinstance(g, Tensor) else g for g in out)

    return run


def _fp32(like, n):
    """(n,) for per-token results: fp32, float64 for float64 input (the PyTorch path's own)."""
    return torch.empty(n, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32, device=like.device)
