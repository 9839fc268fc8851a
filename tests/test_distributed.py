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
