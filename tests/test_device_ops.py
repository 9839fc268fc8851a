"""The device ops one forward + backward launches, for the call forms trainers use: the sweeps, one
prepare launch, one finalize launch, and a handful of elementwise ops in the backward. Each op is
a kernel launch on a GPU's critical path (a few microseconds each, more than the sweeps at small
N), so the count is held here and any change that adds one fails.

Counted on the Triton path under the interpreter: every ATen op that makes device work (views,
metadata and allocations excluded), the ops inside the package's custom ops included (a dispatch
mode sees only the op itself, not what its implementation runs), and every Triton launch. Not
counted: the ops Triton's interpreter runs to stage a launch's arguments, the caller's own ops
(the upstream gradients are handed in precomputed), and ops on the host tensor of runtime scalars
(``ops.pack_params``: on a GPU it stays in host memory) and what is derived from it alone.
"""

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mhpo_kernels
from mhpo_kernels import ops

from _modes import inside_package_ops
from conftest import TRITON_DEVICE

# Ops that make no device work: views, metadata, allocations without a fill.
NO_WORK = {
    "view", "_unsafe_view", "reshape", "expand", "slice", "select", "unsqueeze", "squeeze", "permute", "t",
    "transpose", "as_strided", "alias", "detach", "_reshape_alias", "unbind", "split", "narrow", "lift_fresh",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_same_size", "view_as", "expand_as", "unflatten", "flatten", "_local_scalar_dense",
}


class DeviceOps(TorchDispatchMode):
    """Counts device ops by name; ``host`` holds the tensors that live in host memory on a GPU."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.host = {}
        self.launching = False

    def _is_host(self, tensors):
        return bool(tensors) and all(id(t) in self.host for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self.launching or func.namespace == "mhpo_kernels":
            return out
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if self._is_host(inputs):  # views of host tensors too
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.host[id(t)] = t
        elif name not in NO_WORK:
            self.counts[name] += 1
        return out

    @property
    def total(self):
        return sum(self.counts.values())


@contextlib.contextmanager
def counting_device_ops():
    """A ``DeviceOps`` active around the call and inside the package's custom ops, with Triton's
    launches counted (``triton:<kernel>``) and the host scalars marked."""
    from triton.runtime.interpreter import InterpretedFunction

    mode = DeviceOps()
    run, pack = InterpretedFunction.run, ops.pack_params

    def counted_run(self, *args, **kwargs):
        mode.counts[f"triton:{self.fn.__name__}"] += 1
        mode.launching = True
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.launching = False

    def marked_pack(*args, **kwargs):
        params = pack(*args, **kwargs)
        mode.host[id(params)] = params
        return params

    InterpretedFunction.run, ops.pack_params = counted_run, marked_pack
    try:
        with inside_package_ops(mode), mode:
            yield mode
    finally:
        InterpretedFunction.run, ops.pack_params = run, pack


B, T, V = 2, 4, 40


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 1] = -100
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -1] = False
    return dict(logits=(torch.randn(B, T + 1, V, generator=g) * 2).requires_grad_(),
                flat=(torch.randn(B * T, V, generator=g) * 2).requires_grad_(), ids=ids, mask=mask,
                old=torch.randn(B, T, generator=g) - 3, ref=torch.randn(B, T, generator=g) - 3,
                adv=torch.randn(B, generator=g), cu=torch.tensor([0, 3, B * T]))


def _mhpo(i):  # what the TRL trainer calls
    loss, _ = mhpo_kernels.mhpo_loss(i["logits"], i["ids"], i["old"], i["adv"], i["mask"], return_metrics=True)
    return (loss,)


def _mhpo_kl_entropy(i):
    loss, _ = mhpo_kernels.mhpo_loss(i["logits"], i["ids"], i["old"], i["adv"], i["mask"], return_metrics=True,
                                     ref_logprobs=i["ref"], beta=0.04, entropy_coef=0.01)
    return (loss,)


def _packed(i):
    loss, _ = mhpo_kernels.policy_loss(i["flat"], i["ids"].reshape(-1), i["old"].reshape(-1), i["adv"],
                                       i["mask"].reshape(-1), cu_seqlens=i["cu"], return_metrics=True)
    return (loss,)


def _token_logprobs(i):  # verl's switch: log-probs and entropy, both differentiated
    return mhpo_kernels.token_logprobs(i["logits"], i["ids"], return_entropy=True)


def _truncated(**filters):
    def loss(i):
        loss, _ = mhpo_kernels.mhpo_loss(i["logits"], i["ids"], i["old"], i["adv"], i["mask"], return_metrics=True,
                                         **filters)
        return (loss,)

    def logprobs(i):
        return mhpo_kernels.token_logprobs(i["logits"], i["ids"], return_entropy=True, **filters)

    loss.__name__ = "_mhpo_" + "_".join(filters)
    logprobs.__name__ = "_token_logprobs_" + "_".join(filters)
    return loss, logprobs


# A kept set of B·T rows: rows 1 and 5 untruncated.
_KEPT = (torch.tensor([0, 3, 3, 5, 8, 10, 10, 12, 14]), torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 9, 11]))
_min_p, _ = _truncated(min_p=0.1)
_top_k_top_p, _logprobs_top_k_top_p = _truncated(top_k=10, top_p=0.9)
_kept, _logprobs_kept = _truncated(kept_ids=_KEPT)

# (call, the device ops it makes today, the budget it must stay within)
CALLS = [
    (_mhpo, 5, 10),               # prepare, sweep 1, finalize; dlogp = coef · ∂L, sweep 2
    (_mhpo_kl_entropy, 7, 10),    # and ∂L/∂H = −entropy_coef · g · ∂L (two ops)
    (_packed, 5, 10),
    (_token_logprobs, 3, 6),      # prepare, sweep 1, sweep 2
    # A truncated loss: a number's per-token tensor (one fill), and after sweep 1 the prepare
    # launch again (the weights without the targets outside the kept set) and the epilogue.
    (_min_p, 8, 10),
    # top_k and top_p: sweep 1 is three launches (statistics, selection, finish), two fills.
    (_top_k_top_p, 11, 12),
    (_logprobs_top_k_top_p, 7, 8),
    # Replay: the kept set's (row, id) keys sorted for its checks (6), the replayed rows left out
    # of the sweeps (2 each way) and read by the replay kernels (one forward, two backward).
    (_kept, 21, 22),
    (_logprobs_kept, 17, 18),
]


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="counts the interpreter's launches")
@pytest.mark.parametrize("call, expected, budget", CALLS, ids=[c[0].__name__.strip("_") for c in CALLS])
def test_device_ops_per_call(call, expected, budget):
    i = _inputs()
    with mhpo_kernels.use_backend("triton"):
        call(i)                                              # first call outside: nothing cached differs
        outs = call(_inputs())
        grads = [torch.randn_like(o) for o in outs]          # the caller's own ops, outside the count
        with counting_device_ops() as ops_:
            outs = call(i)
            torch.autograd.backward(outs, grads)
    launches = {k: v for k, v in ops_.counts.items() if k.startswith("triton:")}
    assert ops_.total <= budget, dict(ops_.counts)
    assert ops_.total == expected, dict(ops_.counts)
    assert sum(launches.values()) >= 3, launches          # the counter sees the launches


def test_counter_sees_device_ops_and_skips_host_ones():
    """Not blind: a device op counts, one on the host scalars does not, nor a view."""
    with counting_device_ops() as ops_:
        params = ops.pack_params(mhpo_kernels._sweep_types.mhpo_token_params(), mhpo_kernels._sweep_types.LogitMap.make(1.0))
        -params[3].float()
        x = torch.ones(4)
        (x * 2).view(2, 2)
    assert dict(ops_.counts) == {"ones": 1, "mul": 1}, dict(ops_.counts)
