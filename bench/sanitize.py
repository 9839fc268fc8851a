"""A small forward+backward through every kernel variant, for compute-sanitizer (memcheck,
racecheck) on a GPU: invalid rows, masks, the KL term, entropy with its gradient, bf16 and fp32,
a strided view, V not a multiple of the block."""

import torch

import mhpo_kernels


def main():
    device = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        B, T, V = 2, 9, 5003
        full = (torch.randn(B, T + 1, V, generator=g) * 2).to(device, dtype)
        ids = torch.randint(0, V, (B, T), generator=g).to(device)
        ids[0, 3] = -100
        mask = (torch.rand(B, T, generator=g) > 0.3).to(device)
        old = torch.randn(B, T, generator=g).to(device) - 8
        ref = old + 0.1
        adv = torch.randn(B, generator=g).to(device)
        x = full[:, :-1].detach().requires_grad_()
        loss, metrics = mhpo_kernels.mhpo_loss(x, ids, old, adv, mask, ref_logprobs=ref, beta=0.1,
                                               temperature=0.8, return_metrics=True)
        loss.backward()
        logp, ent = mhpo_kernels.token_logprobs(x, ids, return_entropy=True)
        (logp.sum() + ent.sum()).backward()
        torch.cuda.synchronize()
        assert torch.isfinite(x.grad).all() and torch.isfinite(loss)
        print(dtype, "loss", loss.item(), "entropy", metrics["entropy"].item())


if __name__ == "__main__":
    main()
