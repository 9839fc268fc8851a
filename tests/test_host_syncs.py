"""At most one host sync per call on the Triton path, forward and backward together, the custom
ops' insides included: validation's one read of its flags and the valid-token count. None inside
torch.compile. And the fp32-output GEMM is chosen from the torch version and the device alone.

A host sync is any operation whose result the host must wait for: a scalar read
(``aten._local_scalar_dense`` or ``is_nonzero``: ``.item()``, ``bool()``, ``int()``), ``.tolist()`` (on a CPU tensor
it reads memory without the dispatcher, so it is counted at the Python level), a tensor made from
Python data on a named device (``torch.tensor(x, device=...)``: on a GPU a copy from host memory,
counted at the Python level too), and the ops whose output shape depends on values (``nonzero``,
boolean-mask indexing, ``masked_select``). On a GPU
each of them waits for the stream; counted here on CPU tensors, where the same calls are made.
"""

import collections
import contextlib

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

from _modes import inside_package_ops

import mhpo_kernels
from mhpo_kernels import linear_sweeps
from mhpo_kernels.objectives import GSPO, PPOClip

DATA_DEPENDENT = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_dim",
                  "unique_consecutive"}


class HostSyncs(TorchDispatchMode):
    """Counts host syncs by name, for the ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in DATA_DEPENDENT:
            self.counts[name] += 1
        elif name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.counts["boolean index"] += 1
        return func(*args, **kwargs)

    @property
    def total(self):
        return sum(self.counts.values())


@contextlib.contextmanager
def counting_syncs(outside_ops=True):
    """A ``HostSyncs`` active inside every custom op of the package (a dispatch mode alone sees
    only the op, not what its implementation runs), and around the call when ``outside_ops``.
    Inside the ops only: torch.compile runs no frame while a dispatch mode is active, but a
    compiled graph calls the ops' implementations eagerly, so the count there is the run's."""
    mode = HostSyncs()
    tolist, tensor, as_tensor = torch.Tensor.tolist, torch.tensor, torch.as_tensor

    def counted_tolist(self):
        mode.counts["tolist"] += 1
        return tolist(self)

    def from_host(make, name):
        """A tensor made from Python data on a named device: on a GPU a copy from host memory that
        waits like a read (a tensor made without a device, or with the literal ``device="cpu"``
        the package writes for its host tensors, stays in host memory: no sync; a device taken
        from an input, CPU in these runs, counts as it would on a GPU)."""
        def run(*args, **kwargs):
            if kwargs.get("device") not in (None, "cpu"):
                mode.counts[name] += 1
            return make(*args, **kwargs)
        return run

    torch.Tensor.tolist = counted_tolist
    torch.tensor, torch.as_tensor = from_host(tensor, "tensor(device=)"), from_host(as_tensor, "as_tensor(device=)")
    try:
        with inside_package_ops(mode), mode if outside_ops else contextlib.nullcontext():
            yield mode
    finally:
        torch.Tensor.tolist = tolist
        torch.tensor, torch.as_tensor = tensor, as_tensor


B, T, V, H = 2, 4, 40, 16


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 1] = -100                                   # an ignored token: the compaction runs
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -1] = False
    return dict(
        logits=(torch.randn(B, T + 1, V, generator=g) * 2).requires_grad_(),  # the op's own shift
        hidden=torch.randn(B, T, H, generator=g).requires_grad_(),
        weight=(torch.randn(V, H, generator=g) * 0.5).requires_grad_(),
        ids=ids, mask=mask, old=torch.randn(B, T, generator=g) - 3, adv=torch.randn(B, generator=g),
    )


def _mhpo(i):
    return mhpo_kernels.mhpo_loss(i["logits"], i["ids"], i["old"], i["adv"], i["mask"], return_metrics=True)[0]


def _mhpo_inplace(i):
    return mhpo_kernels.mhpo_loss(i["logits"] * 1.0, i["ids"], i["old"], i["adv"], i["mask"],
                                  inplace_backward=True)


def _policy(i):
    return mhpo_kernels.policy_loss(i["logits"], i["ids"], i["old"], i["adv"], i["mask"], objective=PPOClip())


def _gspo(i):
    """A sequence-level objective: its advantage check rides validation's sync."""
    return mhpo_kernels.policy_loss(i["logits"], i["ids"], i["old"], i["adv"], i["mask"], objective=GSPO())


def _token_logprobs(i):
    logp, entropy = mhpo_kernels.token_logprobs(i["logits"], i["ids"], return_entropy=True)
    return logp.sum() + entropy.sum()


def _fused_linear(i):
    return mhpo_kernels.fused_linear_mhpo_loss(i["hidden"], i["weight"], i["ids"], i["old"], i["adv"], i["mask"],
                                               chunk_size=3, return_metrics=True)[0]


def _fused_linear_logprobs(i):
    logp, entropy = mhpo_kernels.fused_linear_token_logprobs(i["hidden"], i["weight"], i["ids"], chunk_size=3,
                                                             return_entropy=True)
    return logp.sum() + entropy.sum()


CALLS = [_mhpo, _mhpo_inplace, _policy, _gspo, _token_logprobs, _fused_linear, _fused_linear_logprobs]


def _step(call, i):
    out = call(i)
    if out.requires_grad:
        out.backward()
    return out


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.__name__.strip("_"))
def test_one_host_sync_per_call(call):
    """Exactly one: validation's, which shows the counter sees it; forward and backward."""
    i = _inputs()
    with counting_syncs() as syncs:
        _step(call, i)
    assert syncs.total == 1, dict(syncs.counts)
    assert syncs.counts["tolist"] == 1


@torch.library.custom_op("mhpo_kernels_test::compact", mutates_args=())
def _compact(target: torch.Tensor) -> torch.Tensor:
    """What the fused linear path did before: ``bool(valid.all())``, then ``nonzero``."""
    valid = target >= 0
    return target.clone() if bool(valid.all()) else target[valid.nonzero().squeeze(-1)]


@_compact.register_fake
def _(target):
    return torch.empty(torch.library.get_ctx().new_dynamic_size(), dtype=target.dtype)


def test_counter_sees_tensors_made_from_host_data():
    """``torch.tensor(x, device=...)`` with an input's device counts (a copy from host memory on a
    GPU; CPU in these runs); without a device, or with the literal "cpu" (a host tensor), it does
    not."""
    with counting_syncs() as syncs:
        torch.tensor([1.0, 2.0], device=torch.zeros(1).device)
        torch.tensor([1.0, 2.0])
        torch.tensor([1.0, 2.0], device="cpu")
    assert dict(syncs.counts) == {"tensor(device=)": 1}, dict(syncs.counts)


def test_counter_sees_syncs_inside_custom_ops():
    """The counter is not blind inside an op: the old compaction is two syncs there."""
    with counting_syncs() as syncs:
        _compact(torch.tensor([0, -1, 2]))
    assert syncs.total == 2 and syncs.counts["nonzero"] == 1, dict(syncs.counts)


@pytest.mark.parametrize("call", [_mhpo, _fused_linear], ids=["mhpo_loss", "fused_linear_mhpo_loss"])
def test_no_host_sync_under_compile(call):
    """A compiled step, forward and backward: no data-dependent op in its graphs, none inside the
    ops when the graph runs them. aot_eager gives the graphs inductor would get; generating code
    for them adds no sync."""
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(call, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    _step(compiled, _inputs())                      # traced outside the counter
    assert len(graphs) == 2                         # forward and backward
    ops_in_graphs = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert "mhpo_kernels" in " ".join(ops_in_graphs)
    assert not {o for o in ops_in_graphs if any(f"aten.{d}." in o for d in DATA_DEPENDENT)}, ops_in_graphs
    i = _inputs()
    with counting_syncs(outside_ops=False) as syncs:
        _step(compiled, i)
    torch._dynamo.reset()
    assert syncs.total == 0, dict(syncs.counts)
    assert i["hidden" if call is _fused_linear else "logits"].grad is not None


def test_counter_counts_inside_ops_while_compiled():
    """The count inside the ops is not blind under compile: the old compaction, compiled."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: _compact(t) + 1, backend="aot_eager", fullgraph=True)
    compiled(torch.tensor([0, -1, 2]))
    with counting_syncs(outside_ops=False) as syncs:
        compiled(torch.tensor([0, -1, 2]))
    torch._dynamo.reset()
    assert syncs.total == 2, dict(syncs.counts)


def test_fused_linear_uncompacted_equals_compacted():
    """Inside torch.compile the fused linear path does not compact (n_valid None): the rows
    without a token go through the GEMMs and must add nothing, whatever their hidden states hold."""
    g = torch.Generator().manual_seed(3)
    n = 7
    hidden, weight = torch.randn(n, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    target = torch.randint(0, V, (n,), generator=g, dtype=torch.int32)
    target[[1, 4]] = -1
    hidden[1], hidden[4] = float("nan"), float("inf")
    old, adv = torch.randn(n, generator=g) - 3, torch.randn(n, generator=g)
    weights = (target >= 0).float() / 5
    from mhpo_kernels._sweep_types import LogitMap, TokenParams
    from mhpo_kernels.objectives import MHPO

    def run(n_valid):
        return linear_sweeps.fused_linear_sweeps(
            hidden, weight, None, target, old, adv, weights, None, TokenParams.of(MHPO(), 0.0),
            LogitMap.make(1.0, 1.0, None), 3, False, True, True, False, n_valid=n_valid)

    compacted, full = run(5), run(None)
    for a, b in zip(compacted, full):
        if a is not None:
            assert torch.isfinite(a).all()
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert compacted[1][[1, 4]].eq(0).all() and compacted[5][[1, 4]].eq(0).all()
    logp, *_ = linear_sweeps.token_logprobs_sweeps(hidden, weight, None, target, LogitMap.make(1.0, 1.0, None), 3,
                                                  False, n_valid=None)
    torch.testing.assert_close(logp, compacted[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("version, device, dtype, expected", [
    ("2.8.0+cu128", "cuda", torch.bfloat16, True),
    ("2.11.0", "cuda", torch.float16, True),
    ("2.13.0a0+git1234", "cuda", torch.bfloat16, True),
    ("2.7.1+cu126", "cuda", torch.bfloat16, False),
    ("1.13.1", "cuda", torch.float16, False),
    ("2.11.0", "cuda", torch.float32, False),
    ("2.11.0", "cpu", torch.bfloat16, False),
])
def test_fp32_out_addmm_from_version_and_device(monkeypatch, version, device, dtype, expected):
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch.version, "hip", None)
    assert linear_sweeps._has_fp32_out_addmm(device, dtype) is expected


def test_fp32_out_addmm_not_on_rocm_and_never_cached(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.11.0")
    monkeypatch.setattr(torch.version, "hip", "7.0.0")
    assert linear_sweeps._has_fp32_out_addmm("cuda", torch.bfloat16) is False
    monkeypatch.setattr(torch.version, "hip", None)   # the same arguments, decided afresh
    assert linear_sweeps._has_fp32_out_addmm("cuda", torch.bfloat16) is True


def test_fp32_out_addmm_failure_surfaces(monkeypatch):
    """Where the overload should exist, a failing GEMM raises: no silent widened fallback."""
    monkeypatch.setattr(linear_sweeps, "_has_fp32_out_addmm", lambda device_type, dtype: True)

    def failing_addmm(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch, "addmm", failing_addmm)
    acc = torch.zeros(3, 2)
    with pytest.raises(RuntimeError, match="out of memory"):
        linear_sweeps._addmm_fp32(acc, torch.ones(3, 4, dtype=torch.bfloat16), torch.ones(4, 2, dtype=torch.bfloat16))
