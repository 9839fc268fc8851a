"""The packed call: the valid tokens of every sequence in one flat stream, with ``cu_seqlens``.

Frameworks that remove padding (verl's ``use_remove_padding``, slime, AReaL, prime-rl, NeMo-RL,
ROLL) run the model on one stream of N tokens of S sequences and pass its (N, V) logits with the
sequence boundaries ``cu_seqlens`` (S + 1,). The loss and the gradient rows equal the padded
batch's.

    python examples/packed.py
"""

import torch

import mhpo_kernels


def main():
    torch.manual_seed(0)
    B, T, V = 3, 8, 50
    lengths = torch.tensor([8, 3, 5])                        # each sequence's completion tokens
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logits = torch.randn(B, T, V, requires_grad=True)        # (B, T, V): position t predicts ids[:, t]
    ids = torch.randint(0, V, (B, T))
    with torch.no_grad():
        old = mhpo_kernels.token_logprobs(logits, ids, mask=mask) + 0.05 * torch.randn(B, T)
    advantages = torch.randn(B)                              # one per sequence

    padded = mhpo_kernels.mhpo_loss(logits, ids, old, advantages, mask)
    padded.backward()

    # The same batch packed: the valid tokens one sequence after another, and their boundaries.
    stream = logits.detach()[mask].requires_grad_()          # (N, V), N = 16
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    packed = mhpo_kernels.mhpo_loss(stream, ids[mask], old[mask], advantages, cu_seqlens=cu_seqlens)
    packed.backward()

    assert torch.allclose(packed, padded, rtol=1e-5, atol=1e-7)
    assert torch.allclose(stream.grad, logits.grad[mask], rtol=1e-5, atol=1e-7)
    print(f"padded {padded.item():+.6f}, packed {packed.item():+.6f} over {int(lengths.sum())} tokens of "
          f"{B} sequences; gradient rows equal")


if __name__ == "__main__":
    main()
