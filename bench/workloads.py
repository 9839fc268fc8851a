"""Benchmark shapes, their inputs, and the bytes-moved model that turns a time into GB/s."""

from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd_bwd", "fwd", "logprobs")  # most important first
MODE_LABELS = {"fwd": "forward", "fwd_bwd": "forward+backward", "logprobs": "token_logprobs"}

# Per-token scalars the fused op reads and writes besides the logits (ids, old/ref logp,
# advantage, aggregation weight, and the saved row statistics): a generous 64 bytes per pass.
SCALAR_BYTES_PER_TOKEN = 64


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    V: int
    dtype: str = "bf16"

    @property
    def tokens(self):
        return self.B * self.T

    @property
    def id(self):
        return f"{self.B}x{self.T}x{self.V}-{self.dtype}"

    @property
    def logits_bytes(self):
        return self.tokens * self.V * DTYPES[self.dtype].itemsize


def bytes_moved(case, mode):
    """The fewest bytes any implementation must move, and exactly what the fused op moves.

    forward: read the logits once; forward+backward: read them in the forward, read them again
    and write their gradient in the backward (3 passes); token_logprobs: one read. Plus the O(N)
    per-token scalars of each pass. Every provider's GB/s uses this same model, so GB/s is an
    effective rate: a provider that moves more bytes shows it as a lower figure.
    """
    passes = {"fwd": 1, "fwd_bwd": 3, "logprobs": 1}[mode]
    sweeps = 2 if mode == "fwd_bwd" else 1
    return passes * case.logits_bytes + sweeps * SCALAR_BYTES_PER_TOKEN * case.tokens


# Real vocabularies: Llama-2/Mistral 32000, Llama-3 128256, Qwen2/3 151936.
VOCABS = (32000, 128256, 151936)
TOKENS = (4096, 8192, 16384)
SEQ_LEN = 1024  # tokens per sequence in the (B, T) layout


def _case(tokens, V, dtype):
    return Case(tokens // SEQ_LEN, SEQ_LEN, V, dtype)


PRESETS = {
    # The acceptance shape (8192 tokens × 151,936, bf16), a vocabulary sweep at 8192 tokens for the
    # plot, fp32 at the headline vocabulary, and one long sequence of 65,536 rows.
    "headline": [_case(8192, V, "bf16") for V in reversed(VOCABS)]
    + [_case(8192, 151936, "fp32"), Case(1, 65536, 32000, "bf16")],
    "full": [_case(n, V, d) for d in ("bf16", "fp32") for V in VOCABS for n in TOKENS]
    + [Case(1, 65536, 32000, "bf16"), Case(1, 65536, 151936, "bf16")],
    # Without CUDA: small shapes, only to exercise the harness and the CPU path.
    "cpu": [Case(2, 128, 32000, "fp32"), Case(2, 256, 32000, "fp32"), Case(2, 128, 128256, "fp32")],
    # For the test that runs the whole CLI.
    "tiny": [Case(1, 8, 1000, "fp32"), Case(1, 8, 3000, "fp32")],
}


def make_inputs(case, device, seed=0):
    """Trainer-shaped inputs: logits (B, T+1, V) as a model returns them, used as the view
    [:, :-1]; sampled ids; old and reference log-probs near the current policy; a mask with
    ragged completion lengths; per-sequence advantages."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    g_device = torch.Generator(device=device).manual_seed(seed)
    B, T, V = case.B, case.T, case.V
    full = torch.empty(B, T + 1, V, dtype=DTYPES[case.dtype], device=device)
    # Drawn on the device in row blocks through fp32, so a 10 GB case needs no 20 GB temporary.
    rows = max(1, (1 << 28) // (4 * V))
    flat = full.view(-1, V)
    for r in range(0, flat.shape[0], rows):
        n = min(rows, flat.shape[0] - r)
        flat[r:r + n] = torch.randn(n, V, generator=g_device, device=device) * 2.0
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    with torch.no_grad():
        import mhpo_kernels

        logp = mhpo_kernels.token_logprobs(full[:, :-1], ids)
    noise = torch.randn(2, B, T, generator=g).to(device)
    return {
        "full_logits": full,
        "logits": full[:, :-1],
        "input_ids": ids,
        "old_logprobs": logp + 0.1 * noise[0],
        "ref_logprobs": logp + 0.2 * noise[1],
        "advantages": torch.randn(B, generator=g).to(device),
        "mask": mask,
    }
