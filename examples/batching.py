"""Build the (ids, mask) pair mhpo_kernels expects from prompts and completions.

The loss scores the completion tokens. A model reads ``input_ids`` (B, P + C): each prompt left-
padded to P tokens, then its completion right-padded to C. Its logits at positions P − 1 … P + C − 1
predict the completion tokens, so ``logits[:, P - 1:]`` (B, C + 1, V) goes to the op whole with
``completion_ids`` (B, C): position t of that slice predicts ``completion_ids[:, t]``, and the op
applies this next-token shift itself (its last position predicts nothing). ``completion_mask``
(B, C) is true at real completion tokens, false at padding.

    python examples/batching.py
"""

import torch


def make_batch(prompts, completions, pad_id=0):
    """(input_ids (B, P + C), completion_ids (B, C), completion_mask (B, C), P) from lists of
    token-id lists."""
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in completions)
    B = len(prompts)
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    completion_mask = torch.zeros(B, C, dtype=torch.bool)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(prompt):P] = torch.tensor(prompt)
        input_ids[i, P:P + len(completion)] = torch.tensor(completion)
        completion_mask[i, :len(completion)] = True
    return input_ids, input_ids[:, P:], completion_mask, P


def main():
    import mhpo_kernels

    prompts = [[5, 6, 7], [8, 9]]
    completions = [[11, 12], [13, 14, 15, 16]]
    input_ids, completion_ids, completion_mask, P = make_batch(prompts, completions)
    V = 32
    logits = torch.randn(*input_ids.shape, V)            # stands for model(input_ids).logits
    logp = mhpo_kernels.token_logprobs(logits[:, P - 1:], completion_ids, mask=completion_mask)
    # The same log-probs from the logits sliced by hand: position t predicts the token at t + 1.
    by_hand = torch.log_softmax(logits[:, P - 1:-1], -1).gather(-1, completion_ids[..., None])[..., 0]
    assert torch.allclose(logp, torch.where(completion_mask, by_hand, 0.0), atol=1e-5)
    print("input_ids\n", input_ids, "\ncompletion_ids\n", completion_ids, "\ncompletion_mask\n", completion_mask)
    print("log-probs of the completion tokens\n", logp)


if __name__ == "__main__":
    main()
