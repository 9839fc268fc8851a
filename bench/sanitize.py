"""A small forward+backward through every kernel variant, for compute-sanitizer (memcheck,
racecheck) on a GPU: invalid rows, masks, the KL term, entropy with its gradient, bf16 and fp32,
a strided view, V not a multiple of the block; and the fused linear path with softcap."""

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

        # The fused linear path: tiles, in-place gradient, softcap.
        h = torch.randn(B, T, 64, generator=g).to(device, dtype).requires_grad_()
        w = (torch.randn(V, 64, generator=g) * 0.25).to(device, dtype).requires_grad_()
        loss = mhpo_kernels.fused_linear_mhpo_loss(h, w, ids, old, adv, mask, ref_logprobs=ref, beta=0.1,
                                                   final_logit_softcap=30.0, chunk_size=5)
        loss.backward()
        torch.cuda.synchronize()
        assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


if __name__ == "__main__":
    main()
