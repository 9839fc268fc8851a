"""Shared inputs and comparisons for the tests: named shapes, regimes, tolerances by dtype."""

from dataclasses import dataclass, field

import torch

import reference

# Unit roundoff of each logits dtype: the size of one rounding of a stored gradient element.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


# Below the normal range a stored value rounds to a fixed absolute step: half of fp16's subnormal
# spacing 2⁻²⁴ (bf16 and fp32 reach their subnormals only below 1e-38).
STORE_FLOOR = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-25}


def store_error(dtype, device):
    """Relative error of storing an fp32 value in ``dtype``: one rounding, except that Triton's
    interpreter converts fp32 to bf16 by truncation (compiled Triton rounds to nearest, as
    torch does), which can cost a whole unit in the last place."""
    if dtype == torch.bfloat16 and str(device) == "cpu":
        return 2.0**-7
    return UNIT_ROUNDOFF[dtype]
# fp32 against float64: the sweeps sum ~V/4096 block partials of exp() in fp32, so the log-sum-exp
# and everything after it carry a few 1e-7 of relative error; 1e-5 leaves a 10× margin.
FP32_RTOL = 1e-5


@dataclass(frozen=True)
class Shape:
    id: str
    B: int
    T: int
    V: int
    why: str
    sliced: bool = False   # logits are full[:, :-1] of a (B, T + 1, V) tensor: a strided view
    flat: bool = False     # 2-D logits (N, V): one sequence


SHAPES = [
    Shape("V32003", 2, 2, 32003, "odd vocabulary, not a multiple of any block"),
    Shape("V50257", 1, 3, 50257, "GPT-2 vocabulary, odd, 13 blocks"),
    Shape("V300", 2, 3, 300, "vocabulary below one block"),
    Shape("V4097", 1, 3, 4097, "one element past a full block"),
    Shape("T1", 3, 1, 1000, "one token per sequence"),
    Shape("sliced", 2, 3, 5000, "logits[:, :-1] view: rows not evenly strided", sliced=True),
    Shape("flat", 1, 5, 2000, "2-D (N, V) logits: one sequence", flat=True),
]
SMALL = Shape("small", 3, 4, 1500, "regime sweeps: two sequences with valid tokens, one without")


@dataclass(frozen=True)
class Regime:
    id: str
    ratio: str = "near"          # "on-policy" (old=None), "near", "far" (saturated LFM)
    adv: str = "mixed"           # "pos", "neg", "mixed", "per-token"
    mask: bool = True
    ignore: bool = True          # some ids set to ignore_index
    garbage: bool = True         # NaN / out-of-range ids / inf in invalid positions
    kl: bool = False
    agg: str = "seq-mean-token-mean"
    temperature: float = 1.0
    dtype: torch.dtype = torch.float32
    extra: dict = field(default_factory=dict)


def make_inputs(shape, regime, seed=0, device="cpu"):
    """Random inputs for ``shape`` × ``regime``; returns (logits, kwargs for mhpo_loss)."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = shape.B, shape.T, shape.V
    full = torch.randn(B, T + shape.sliced, V, generator=g) * 2.0
    logits = full[:, :-1] if shape.sliced else full
    ids = torch.randint(0, V, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    mask = None
    if regime.mask:
        mask = torch.rand(B, T, generator=g) > 0.25
        mask[0, 0] = True
        if B > 1:
            mask[1, 0] = True
        if B > 2:
            mask[-1] = False            # one sequence with no valid token at all
        valid &= mask
    if regime.ignore and T > 1:
        ids[0, -1] = -100
        valid[0, -1] = False
    # The true log-probs of the ids, so "near" and "far" mean what they say.
    true_logp = reference.token_logprobs(
        logits.to(regime.dtype).double(), ids.clamp(min=0), regime.temperature
    ).float()
    noise = torch.randn(B, T, generator=g)
    # Log-probs stay ≤ 0 (above it they are refused): "far" is up to 12 nats either way, within that.
    old = {"on-policy": None, "near": (true_logp + 0.05 * noise).clamp(max=0.0),
           "far": (true_logp + 12.0 * noise).clamp(max=0.0)}[regime.ratio]
    if regime.adv == "per-token":
        adv = torch.randn(B, T, generator=g)
    else:
        adv = torch.randn(B, generator=g).abs() + 0.1
        if regime.adv == "neg":
            adv = -adv
        elif regime.adv == "mixed":
            adv[::2] = -adv[::2]
    ref = (true_logp + 0.3 * torch.randn(B, T, generator=g)).clamp(max=0.0) if regime.kl else None
    if regime.garbage:
        invalid = ~valid
        logits[invalid] = float("nan")
        if invalid.any():
            b, t = invalid.nonzero()[0].tolist()
            logits[b, t] = float("inf")
        if old is not None:
            old = old.masked_fill(invalid, float("nan"))
        if ref is not None:
            ref = ref.masked_fill(invalid, float("nan"))
        if adv.dim() == 2:
            adv = adv.masked_fill(invalid, float("nan"))
        if mask is not None:
            ids = ids.masked_fill(~mask, V + 7)       # out of range, but masked: must not matter
    if shape.flat:
        logits = logits.reshape(B * T, V)
        ids, old, ref, mask = (None if x is None else x.reshape(-1) for x in (ids, old, ref, mask))
        adv = adv.reshape(-1) if adv.dim() == 2 else adv.repeat_interleave(T)
    kwargs = dict(
        input_ids=ids, old_logprobs=old, advantages=adv, mask=mask,
        temperature=regime.temperature, loss_agg_mode=regime.agg,
        ref_logprobs=ref, beta=0.2 if regime.kl else 0.0, **regime.extra,
    )
    logits = logits.to(regime.dtype)
    return _to(logits, device), {k: _to(v, device) for k, v in kwargs.items()}


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def as_float64(kwargs):
    """The same keyword arguments with every floating tensor in float64 (for the ground truth)."""
    return {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in kwargs.items()
    }


def loss_and_grad(fn, logits, kwargs, upstream=1.0, compute_dtype=None):
    """(loss, d(upstream · loss)/d logits) of ``fn(logits, **kwargs)``, logits cast first."""
    x = logits.detach().to(compute_dtype or logits.dtype).requires_grad_()
    loss = fn(x, **kwargs)
    (grad,) = torch.autograd.grad(loss * upstream, x)
    return loss.detach(), grad


def max_rel_err(actual, expected):
    """max |actual − expected| / max |expected|, in float64: the error relative to the scale."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp(min=1e-30)
    return ((actual - expected).abs().max() / scale).item()
