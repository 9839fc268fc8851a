"""Benchmark cases, their inputs, and the work models that turn a time into GB/s or TFLOP/s.

Two suites: ``logits`` (the op on materialized logits) and ``linear`` (hidden states and the LM
head, the logits never whole).
"""

from dataclasses import dataclass
from typing import Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SUITES = ("logits", "linear")
MODES = ("fwd_bwd", "fwd", "logprobs")  # most important first
MODE_LABELS = {"fwd": "forward", "fwd_bwd": "forward+backward", "logprobs": "log-probs (no grad)",
               "logprobs_grad": "log-probs + entropy, forward+backward"}
SUITE_MODES = {"logits": MODES, "linear": ("fwd_bwd", "logprobs", "logprobs_grad")}

# Per-token scalars the fused op reads and writes besides the logits (ids, old/ref logp,
# advantage, aggregation weight, and the saved row statistics): a generous 64 bytes per sweep.
SCALAR_BYTES_PER_TOKEN = 64


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    V: int
    dtype: str = "bf16"
    H: Optional[int] = None   # set for the linear suite

    @property
    def suite(self):
        return "logits" if self.H is None else "linear"

    @property
    def tokens(self):
        return self.B * self.T

    @property
    def id(self):
        h = "" if self.H is None else f"xH{self.H}"
        return f"{self.B}x{self.T}x{self.V}{h}-{self.dtype}"

    @property
    def logits_bytes(self):
        return self.tokens * self.V * DTYPES[self.dtype].itemsize


def bytes_moved(case, mode):
    """Logits suite: the fewest bytes any implementation must move, and exactly what the fused op
    moves. forward: read the logits once; forward+backward: read them in the forward, read them
    again and write their gradient in the backward (3 passes); log-probs: one read. Plus the O(N)
    per-token scalars of each sweep. Every provider's GB/s uses this model, so GB/s is an
    effective rate: a provider that moves more bytes shows it as a lower figure."""
    if case.suite != "logits":
        return None
    passes = {"fwd": 1, "fwd_bwd": 3, "logprobs": 1}[mode]
    sweeps = 2 if mode == "fwd_bwd" else 1
    return passes * case.logits_bytes + sweeps * SCALAR_BYTES_PER_TOKEN * case.tokens


def gemm_flops(case, mode):
    """Linear suite: the GEMM floor. A training step needs the logits (N·V·H multiply-adds),
    dhidden and dweight: 3 · 2·N·V·H flops, and so do differentiable log-probs (whose fused op
    makes a fourth, recomputing the tile in the backward); the no-grad log-probs only the first."""
    if case.suite != "linear":
        return None
    return (1 if mode == "logprobs" else 3) * 2 * case.tokens * case.V * case.H


# Real vocabularies: Llama-2/Mistral 32000, Llama-3 128256, Qwen2/3 151936.
VOCABS = (32000, 128256, 151936)
TOKENS = (4096, 8192, 16384)
SEQ_LEN = 1024  # tokens per sequence in the (B, T) layout


def _case(tokens, V, dtype, H=None):
    return Case(tokens // SEQ_LEN, SEQ_LEN, V, dtype, H)


PRESETS = {
    # The acceptance cases first: 8192 tokens × 151,936 bf16 on logits, then a vocabulary sweep
    # for the plot, fp32, one sequence of 65,536 rows; for the LM head, H 4096 at 8k-32k tokens.
    "headline": [_case(8192, V, "bf16") for V in reversed(VOCABS)]
    + [_case(8192, 151936, "fp32"), Case(1, 65536, 32000, "bf16")]
    + [_case(n, 151936, "bf16", 4096) for n in (32768, 8192)] + [_case(16384, 128256, "bf16", 4096)],
    "full": [_case(n, V, d) for d in ("bf16", "fp32") for V in VOCABS for n in TOKENS]
    + [Case(1, 65536, 32000, "bf16"), Case(1, 65536, 151936, "bf16")]
    + [_case(n, V, "bf16", 4096) for V in (151936, 128256) for n in (8192, 16384, 32768)],
    # Without CUDA: small shapes, only to exercise the harness and the CPU path.
    "cpu": [Case(2, 128, 32000, "fp32"), Case(2, 256, 32000, "fp32"), Case(2, 128, 128256, "fp32"),
            Case(2, 128, 32000, "fp32", 256), Case(2, 256, 32000, "fp32", 256)],
    # For the test that runs the whole CLI: one case per suite.
    "tiny": [Case(1, 8, 1000, "fp32"), Case(1, 8, 1000, "fp32", 32)],
}


def _randn(shape, scale, dtype, device, generator):
    """A normal tensor drawn on the device in row blocks through fp32, so a 10 GB tensor needs no
    20 GB temporary."""
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1, shape[-1])
    rows = max(1, (1 << 28) // (4 * shape[-1]))
    for r in range(0, flat.shape[0], rows):
        n = min(rows, flat.shape[0] - r)
        flat[r:r + n] = torch.randn(n, shape[-1], generator=generator, device=device) * scale
    return out


KEPT = 50  # the replayed kept set per token: the sampler's top-50, as a top_k = 50 sampler keeps


def make_inputs(case, device, seed=0, extras=True):
    """Trainer-shaped inputs. Logits suite: ``full_logits`` (B, T+1, V) as a model returns them,
    and ``logits``, the view [:, :-1] that predicts the ids. Linear suite: hidden (B, T, H) and an LM head (V, H) scaled so the logits
    have unit-ish spread. Both: sampled ids, old and reference log-probs near the current policy,
    a mask with ragged completion lengths, per-sequence advantages. Logits suite, with
    ``extras``: also the packed copy (``_packed``) and ``kept_ids``, each row's KEPT largest
    logits as a replayed kept set (CSR), made untimed; without, no memory beyond the padded batch
    (a copy of the logits would count against what the providers measured find free)."""
    import mhpo_kernels

    g = torch.Generator(device="cpu").manual_seed(seed)
    g_device = torch.Generator(device=device).manual_seed(seed)
    B, T, V, dtype = case.B, case.T, case.V, DTYPES[case.dtype]
    inputs = {}
    with torch.no_grad():
        if case.suite == "logits":
            full = _randn((B, T + 1, V), 2.0, dtype, device, g_device)
            inputs.update(full_logits=full, logits=full[:, :-1])
        else:
            inputs["hidden"] = _randn((B, T, case.H), 1.0, dtype, device, g_device)
            inputs["weight"] = _randn((V, case.H), 2.0 * case.H ** -0.5, dtype, device, g_device)
        ids = torch.randint(0, V, (B, T), generator=g).to(device)
        if case.suite == "logits":
            logp = mhpo_kernels.token_logprobs(inputs["logits"], ids)
        else:
            logp = mhpo_kernels.fused_linear_token_logprobs(inputs["hidden"], inputs["weight"], ids)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    noise = torch.randn(2, B, T, generator=g).to(device)
    inputs.update(
        input_ids=ids,
        mask=(torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(device),
        old_logprobs=logp + 0.1 * noise[0],
        ref_logprobs=logp + 0.2 * noise[1],
        advantages=torch.randn(B, generator=g).to(device),
    )
    if case.suite == "logits" and extras:
        inputs.update(_packed(inputs))
        with torch.no_grad():
            kept = inputs["logits"].topk(min(KEPT, V), -1).indices.reshape(-1).to(torch.int32)
        offsets = torch.arange(B * T + 1, device=device) * min(KEPT, V)
        inputs["kept_ids"] = (offsets, kept)
    return inputs


def _packed(inputs):
    """The same batch as a packing framework feeds it: the valid tokens of every sequence, one
    after the other, (N_valid, V) logits and (N_valid,) per-token tensors, with their boundaries
    ``cu_seqlens`` (S + 1,). Made once, untimed; the loss is the padded batch's."""
    mask = inputs["mask"]
    lengths = mask.sum(-1)
    with torch.no_grad():
        return dict(
            packed_logits=inputs["logits"][mask], packed_input_ids=inputs["input_ids"][mask],
            packed_old_logprobs=inputs["old_logprobs"][mask], packed_ref_logprobs=inputs["ref_logprobs"][mask],
            cu_seqlens=torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]),
        )
