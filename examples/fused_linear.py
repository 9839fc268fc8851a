"""The fused linear path: the loss from hidden states and the LM head, the (N, V) logits never
whole in memory (they are made a chunk of tokens at a time, and their gradient folded into the
hidden states' and the head's at once).

    python examples/fused_linear.py
"""

import torch

import mhpo_kernels


def main():
    torch.manual_seed(0)
    B, T, H, V = 2, 16, 32, 500
    hidden = torch.randn(B, T, H, requires_grad=True)      # the last layer's output at the T positions
    weight = (torch.randn(V, H) / H ** 0.5).requires_grad_()  # the LM head, (V, H)
    ids = torch.randint(0, V, (B, T))                       # the token each position predicts
    mask = torch.rand(B, T) > 0.2
    with torch.no_grad():
        old = mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, mask=mask)
    advantages = torch.randn(B)

    loss = mhpo_kernels.fused_linear_mhpo_loss(hidden, weight, ids, old, advantages, mask, chunk_size=8)
    loss.backward()

    # The same loss through materialized logits.
    h2, w2 = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    plain = mhpo_kernels.mhpo_loss(h2 @ w2.T, ids, old, advantages, mask)
    plain.backward()
    assert torch.allclose(loss, plain, rtol=1e-5, atol=1e-7)
    assert torch.allclose(hidden.grad, h2.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(weight.grad, w2.grad, rtol=1e-4, atol=1e-6)
    print(f"fused linear {loss.item():+.6f}, through logits {plain.item():+.6f}; gradients equal")


if __name__ == "__main__":
    main()
