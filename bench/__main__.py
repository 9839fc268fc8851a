"""python -m bench: time the fused op against the eager reference, after checking they agree."""

import time

import torch

import mhpo_kernels
import reference


def _time(fn, repeats=5):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, T, V = 4, 64, 32000
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(device)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    old = mhpo_kernels.token_logprobs(logits, ids) + 0.1 * torch.randn(B, T, generator=g).to(device)
    adv = torch.randn(B, generator=g).to(device)

    def step(fn, x):
        x = x.detach().requires_grad_()
        loss = fn(x, ids, old, adv)
        loss.backward()
        return loss.detach(), x.grad

    fused_loss, fused_grad = step(mhpo_kernels.mhpo_loss, logits)
    ref_loss, ref_grad = step(reference.mhpo_loss, logits.double())
    err = ((fused_grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
    assert abs(fused_loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), "loss mismatch"
    assert err <= 1e-5, f"gradient mismatch: {err:.2e}"
    t_fused = _time(lambda: step(mhpo_kernels.mhpo_loss, logits))
    t_eager = _time(lambda: step(reference.mhpo_loss, logits))
    print(f"device {device}, logits ({B}, {T}, {V}) fp32, forward+backward")
    print(f"  agreement with float64 reference: loss {fused_loss.item():.6f} vs {ref_loss.item():.6f}, "
          f"gradient max rel err {err:.1e}")
    print(f"  fused {t_fused * 1e3:8.2f} ms   eager {t_eager * 1e3:8.2f} ms")
    if device == "cpu":
        print("  (CPU timings of the PyTorch path: they say nothing about GPU speed)")


if __name__ == "__main__":
    main()
