"""A GRPO-style loop with the MHPO loss on a tiny model, on the CPU in seconds.

Each step: sample a group of completions per prompt, score them (the reward is the share of
completion tokens equal to a target token), turn rewards into group-normalized advantages, take
the rollout policy's log-probs with ``token_logprobs`` (no gradient), then a few optimizer steps
on ``mhpo_loss``. The model's logits (B, C + 1, V) go in whole against the (B, C) completion ids
(``examples/batching.py``).

    python examples/grpo_padded.py
"""

import os
import sys

import torch

import mhpo_kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from batching import make_batch  # noqa: E402

V, H, TARGET = 16, 32, 7
PROMPTS = [[1, 2, 3], [4, 5], [6]]
GROUP, MAX_NEW, STEPS, INNER = 4, 6, 5, 2


class TinyLM(torch.nn.Module):
    """Embedding, a causal running mean, an LM head: enough to learn a token preference."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.head = torch.nn.Linear(H, V)

    def forward(self, ids):
        h = self.embed(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1)[:, None]
        return self.head(torch.tanh(h))


@torch.no_grad()
def sample(model, prompt, n):
    """n completions of MAX_NEW tokens (a completion ends early at token 0), each sampled from the
    prompt left-padded as the batch holds it: TinyLM has no attention mask, so the pads are part
    of the context its log-probs are scored in, and must be part of the one it samples in."""
    width = max(len(p) for p in PROMPTS)
    out, logps = [], []
    for _ in range(n):
        ids = [0] * (width - len(prompt)) + list(prompt)
        completion = []
        for _ in range(MAX_NEW):
            p = model(torch.tensor([ids])).softmax(-1)[0, -1]
            token = int(torch.multinomial(p, 1))
            completion.append(token)
            logps.append(float(p[token].log()))
            ids.append(token)
            if token == 0:
                break
        out.append(completion)
    return out, logps


def main():
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for step in range(STEPS):
        prompts = [p for p in PROMPTS for _ in range(GROUP)]
        sampled = [sample(model, p, GROUP) for p in PROMPTS]
        completions = [c for group, _ in sampled for c in group]
        input_ids, completion_ids, mask, P = make_batch(prompts, completions)
        rewards = torch.tensor([sum(t == TARGET for t in c) / len(c) for c in completions])
        grouped = rewards.view(len(PROMPTS), GROUP)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        with torch.no_grad():   # the rollout policy's log-probs
            old_logprobs = mhpo_kernels.token_logprobs(model(input_ids)[:, P - 1:], completion_ids, mask=mask)
        # They are the sampler's, token for token (mask[..] orders them as the sampling did).
        assert torch.allclose(old_logprobs[mask], torch.tensor([lp for _, lps in sampled for lp in lps]), atol=1e-5)
        for _ in range(INNER):
            logits = model(input_ids)[:, P - 1:]                 # (B, C + 1, V): the op shifts
            loss, metrics = mhpo_kernels.mhpo_loss(logits, completion_ids, old_logprobs, advantages, mask,
                                                   return_metrics=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"step {step}: mean reward {rewards.mean():.3f}, loss {loss.item():+.4f}, "
              f"|log r| {metrics['abs_log_ratio'].item():.4f}")


if __name__ == "__main__":
    main()
