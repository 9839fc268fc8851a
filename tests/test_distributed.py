"""Multi-process runs on CPU (gloo, FileStore rendezvous, spawn, two-minute limit): what the
package does past one process."""

import pytest
import torch

import _dist


class _TinyLM(torch.nn.Module):
    """A backbone and an LM head; ``forward`` is the fused path (TRL's forward redirection runs
    the trainer's loss inside the wrapped model's forward, so FSDP's hooks see a forward)."""

    def __init__(self, H=8, V=300):
        super().__init__()
        self.body = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V, bias=False)

    def forward(self, x, ids, adv):
        import mhpo_kernels
        from mhpo_kernels.integrations.trl import gathered_head

        hidden = torch.tanh(self.body(x))
        weight, bias = gathered_head(self.head)
        return mhpo_kernels.fused_linear_mhpo_loss(hidden, weight, ids, None, adv, bias=bias, chunk_size=3,
                                                   loss_agg_mode="token-mean")


def _rank_batch(rank, B=2, T=4, H=8, V=300):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(B, T, H, generator=g), torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g)


def _fsdp2_head_worker(rank, world_size, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _TinyLM()
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(model.head, mesh=mesh)   # the head as its own unit: a DTensor outside its forward
    fully_shard(model, mesh=mesh)
    model(*_rank_batch(rank)).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(grads, f"{out_dir}/fsdp2.pt")


def test_fsdp2_head_gradient_is_reduced_across_ranks(tmp_path):
    """Under FSDP2 with the LM head as its own unit, the fused path gathers the head with
    ``full_tensor``; its backward must average the head's gradient over the ranks as FSDP2 does
    for every other parameter, not keep each rank's slice of its own gradient."""
    pytest.importorskip("trl", reason="the trl extra is not installed")
    world_size = 2
    _dist.run(_fsdp2_head_worker, world_size, tmp_path, str(tmp_path))
    got = torch.load(tmp_path / "fsdp2.pt")
    torch.manual_seed(0)
    model = _TinyLM()
    for rank in range(world_size):
        (model(*_rank_batch(rank)) / world_size).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, rtol=1e-5, atol=1e-7), name


# ---- vocabulary-parallel sweeps -----------------------------------------------------------------

def _split(V, world):
    """Uneven contiguous slices: the first ranks get one more, as 151,936 over 3 would."""
    sizes = [V // world + (r < V % world) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return list(zip(starts, sizes))


def _tp_inputs(V=1001, B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + 1, V, generator=g) * 2.0
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 1] = V - 1                       # a target in the last slice
    ids[1, 0] = 0                           # and in the first
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    ids[~mask] = V + 5                      # garbage at masked positions must not matter
    old = torch.randn(B, T, generator=g) - 6.0
    adv = torch.randn(B, generator=g)
    ref = old + 0.3 * torch.randn(B, T, generator=g)
    return full, ids, mask, old, adv, ref


TP_KW = dict(temperature=0.8, beta=0.1, loss_agg_mode="token-mean", return_metrics=True)


def _tp_worker(rank, world_size, backend, out_dir):
    import mhpo_kernels
    import torch.distributed as dist

    full, ids, mask, old, adv, ref = _tp_inputs()
    start, size = _split(full.shape[-1], world_size)[rank]
    out = {}
    with mhpo_kernels.use_backend(backend):
        x = full[..., start:start + size].clone().requires_grad_()
        loss, metrics = mhpo_kernels.mhpo_loss(x, ids, old, adv, mask, ref_logprobs=ref, tp_group=dist.group.WORLD,
                                               **TP_KW)
        (loss * 1.3).backward()
        logp, ent = mhpo_kernels.token_logprobs(full[..., start:start + size], ids.masked_fill(~mask, -100),
                                                return_entropy=True, tp_group=dist.group.WORLD)
    out.update(loss=loss.detach(), metrics={k: v for k, v in metrics.items()}, grad=x.grad, logp=logp, ent=ent)
    torch.save(out, f"{out_dir}/tp-{rank}.pt")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_vocab_parallel_equals_one_process(tmp_path, backend, world_size):
    """Uneven vocabulary slices over 2 and 3 ranks: every rank's loss, metrics, log-probs and
    entropy equal the single-process op's, and its logits gradient is its slice of the full one."""
    import mhpo_kernels
    import reference
    from _cases import FP32_RTOL, max_rel_err

    _dist.run(_tp_worker, world_size, tmp_path, backend, str(tmp_path))
    full, ids, mask, old, adv, ref = _tp_inputs()
    x = full.clone().requires_grad_()
    with mhpo_kernels.use_backend(backend):
        loss, metrics = mhpo_kernels.mhpo_loss(x, ids, old, adv, mask, ref_logprobs=ref, **TP_KW)
        (loss * 1.3).backward()
        logp, ent = mhpo_kernels.token_logprobs(full, ids.masked_fill(~mask, -100), return_entropy=True)
    x64 = full.double().requires_grad_()
    kw64 = {k: v for k, v in TP_KW.items() if k != "return_metrics"}
    loss64 = reference.mhpo_loss(x64, ids, old.double(), adv.double(), mask, ref_logprobs=ref.double(), **kw64)
    (loss64 * 1.3).backward()
    grads = []
    for rank, (start, size) in enumerate(_split(full.shape[-1], world_size)):
        got = torch.load(tmp_path / f"tp-{rank}.pt")
        assert abs(got["loss"].item() - loss.item()) <= FP32_RTOL * abs(loss.item())
        assert abs(got["loss"].item() - loss64.item()) <= FP32_RTOL * abs(loss64.item())
        for k, v in metrics.items():
            assert abs(got["metrics"][k].item() - v.item()) <= FP32_RTOL * max(abs(v.item()), 1e-3), k
        assert max_rel_err(got["logp"], logp) <= FP32_RTOL and max_rel_err(got["ent"], ent) <= FP32_RTOL
        assert got["grad"].shape[-1] == size
        grads.append(got["grad"])
    assert max_rel_err(torch.cat(grads, -1), x.grad) <= FP32_RTOL
    assert max_rel_err(torch.cat(grads, -1), x64.grad) <= FP32_RTOL


def _tp_bad_call_worker(rank, world_size, case, out_dir):
    import mhpo_kernels
    import torch.distributed as dist

    full, ids, mask, old, adv, _ = _tp_inputs()
    start, size = _split(full.shape[-1], world_size)[rank]
    x = full[..., start:start + size]
    if case == "id-out-of-range":
        ids = ids.clone()
        ids[0, 0] = full.shape[-1]           # valid position, one past the global vocabulary
    elif case == "tokens-disagree" and rank == 1:
        x, ids, mask, old = x[:, :-1], ids[:, :-1], mask[:, :-1], old[:, :-1]
    elif case == "empty-slice" and rank == 1:
        x = x[..., :0]
    elif case == "one-rank-bad-dtype" and rank == 0:
        x = x.to(torch.float64)
    elif case == "ids-differ" and rank == 1:
        ids = ids.clone()
        ids[1, 2] = (ids[1, 2] + 1) % full.shape[-1]
    try:
        mhpo_kernels.mhpo_loss(x, ids, old, adv, mask, tp_group=dist.group.WORLD)
        message = None
    except (TypeError, ValueError) as e:
        message = f"{type(e).__name__}: {e}"
    torch.save(message, f"{out_dir}/err-{rank}.pt")


@pytest.mark.parametrize("case, pattern", [
    ("id-out-of-range", "outside \\[0, 1001\\)"),
    ("tokens-disagree", "input_ids must have shape|disagree on the number of tokens|failed validation"),
    ("empty-slice", "vocabulary dimension|failed validation|at least 1"),
    ("one-rank-bad-dtype", "logits must be float32|failed validation"),
    ("ids-differ", "differ across ranks"),
])
def test_vocab_parallel_bad_calls_raise_on_every_rank(tmp_path, case, pattern):
    """A call that is wrong on any rank raises on every rank, before any collective could hang."""
    import re

    _dist.run(_tp_bad_call_worker, 2, tmp_path, case, str(tmp_path))
    for rank in range(2):
        message = torch.load(tmp_path / f"err-{rank}.pt")
        assert message is not None and re.search(pattern, message), (rank, message)
