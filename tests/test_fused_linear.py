"""fused_linear_mhpo_loss against mhpo_loss on materialized logits and against the float64
reference: loss, dhidden, dweight, dbias, over odd shapes and every projection option."""

import math
from dataclasses import dataclass

import pytest
import torch

import mhpo_kernels
import reference
from _cases import FP32_RTOL, UNIT_ROUNDOFF, max_rel_err
from conftest import DEVICES
from mhpo_kernels.objectives import CISPO, PPOClip


@dataclass(frozen=True)
class LinearCase:
    id: str
    B: int
    T: int
    H: int
    V: int
    chunk: object          # tokens per chunk, None = the default
    bias: bool = False
    softcap: object = None
    scale: float = 1.0
    temperature: float = 1.0
    kl: bool = False
    mask: bool = False
    flat: bool = False     # hidden (N, H)


CASES = [
    LinearCase("ragged-chunks-softcap-bias", 2, 7, 64, 1000, chunk=5, bias=True, softcap=4.0, scale=0.8),
    LinearCase("V-past-block-kl-temperature", 1, 6, 96, 4097, chunk=4, temperature=0.7, kl=True),
    LinearCase("flat-default-chunk-scale", 1, 9, 96, 3001, chunk=None, bias=True, scale=1.3, flat=True),
    LinearCase("mask-ignore-everything", 3, 4, 64, 1500, chunk=3, bias=True, softcap=6.0,
               temperature=0.9, kl=True, mask=True),
]


def make(case, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, H, V = case.B, case.T, case.H, case.V
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * H ** -0.5 * 3
    bias = torch.randn(V, generator=g) if case.bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = None
    if case.mask:
        mask = torch.rand(B, T, generator=g) > 0.3
        mask[0, 0], mask[-1] = True, False
        ids[0, 1] = -100
    old = torch.randn(B, T, generator=g) - 7.0
    kwargs = dict(
        input_ids=ids, old_logprobs=old, advantages=torch.randn(B, generator=g), mask=mask,
        temperature=case.temperature, ref_logprobs=old + 0.4 * torch.randn(B, T, generator=g) if case.kl else None,
        beta=0.1 if case.kl else 0.0,
    )
    if case.flat:
        hidden = hidden.reshape(B * T, H)
        kwargs = {k: v.reshape(-1) if isinstance(v, torch.Tensor) and v.dim() == 2 else v for k, v in kwargs.items()}
        kwargs["advantages"] = kwargs["advantages"].repeat_interleave(T)
    params = [x if x is None else x.to(device, dtype) for x in (hidden, weight, bias)]
    return params, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def transform(z, case):
    z = z * case.scale
    return z if case.softcap is None else case.softcap * torch.tanh(z / case.softcap)


def via_logits(loss_fn, params, kwargs, case, upstream):
    """(loss, grads) through materialized logits: transform(hidden @ weight.T + bias)."""
    params = [None if p is None else p.detach().requires_grad_() for p in params]
    hidden, weight, bias = params
    z = hidden @ weight.T + (bias if bias is not None else 0)
    loss = loss_fn(transform(z, case), **kwargs)
    grads = torch.autograd.grad(loss * upstream, [p for p in params if p is not None])
    return loss.detach(), grads


def fused(params, kwargs, case, upstream):
    params = [None if p is None else p.detach().requires_grad_() for p in params]
    hidden, weight, bias = params
    loss = mhpo_kernels.fused_linear_mhpo_loss(
        hidden, weight, bias=bias, logit_scale=case.scale, final_logit_softcap=case.softcap,
        chunk_size=case.chunk, **kwargs)
    grads = torch.autograd.grad(loss * upstream, [p for p in params if p is not None])
    return loss.detach(), grads


def float64(params, kwargs):
    cpu = [None if p is None else p.detach().cpu().double() for p in params]
    kw = {k: (v.cpu().double() if v.is_floating_point() else v.cpu()) if isinstance(v, torch.Tensor) else v
          for k, v in kwargs.items()}
    return cpu, kw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fp32_against_float64_and_materialized(case, device):
    params, kwargs = make(case, torch.float32, device)
    loss, grads = fused(params, kwargs, case, upstream=1.7)
    loss64, grads64 = via_logits(reference.mhpo_loss, *float64(params, kwargs), case, upstream=1.7)
    loss_m, grads_m = via_logits(mhpo_kernels.mhpo_loss, params, kwargs, case, upstream=1.7)
    assert loss.item() == pytest.approx(loss64.item(), rel=FP32_RTOL)
    assert loss.item() == pytest.approx(loss_m.item(), rel=FP32_RTOL)
    for name, g, g64, gm in zip(("dhidden", "dweight", "dbias"), grads, grads64, grads_m):
        assert g.dtype == torch.float32 and g.shape == gm.shape, name
        assert max_rel_err(g.cpu(), g64) <= FP32_RTOL, name
        assert max_rel_err(g, gm) <= FP32_RTOL, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: c.id)
def test_bf16_no_worse_than_materialized(case, device):
    """In bf16 the tile is rounded to bf16 like ``hidden @ weight.T`` would be; the error against
    float64 must not exceed that of mhpo_loss on the materialized bf16 logits by more than one
    bf16 rounding (dweight is summed over chunks in fp32, the materialized GEMM in one go)."""
    params, kwargs = make(case, torch.bfloat16, device)
    loss, grads = fused(params, kwargs, case, upstream=0.6)
    loss64, grads64 = via_logits(reference.mhpo_loss, *float64(params, kwargs), case, upstream=0.6)
    loss_m, grads_m = via_logits(mhpo_kernels.mhpo_loss, params, kwargs, case, upstream=0.6)
    u = UNIT_ROUNDOFF[torch.bfloat16]
    assert abs(loss.item() - loss64.item()) <= abs(loss_m.item() - loss64.item()) + u * abs(loss64.item())
    for name, g, g64, gm in zip(("dhidden", "dweight", "dbias"), grads, grads64, grads_m):
        assert g.dtype == torch.bfloat16, name
        assert max_rel_err(g.cpu(), g64) <= max_rel_err(gm.cpu(), g64) + u, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: c.id)
def test_fp16_under_a_loss_scale_no_worse_than_materialized(case, device):
    """fp16 with a loss scaler's upstream gradient (65536) and a global token count (normalizer
    8192: g_t = 2^-13). Formed in the forward for an upstream gradient of 1, the tiles' gradient
    g_t · ∂loss_t/∂z fell mostly below fp16's normal range before the scaler's factor reached it
    (dhidden was off by up to 280% element-wise, a third of dweight's rows 0); the fp16 loss takes
    the log-probs' backward, which knows the factor. The error against float64 must not exceed
    the materialized logits' (whose backward rounds G · ∂L/∂z) by more than two fp16 roundings:
    the tile's gradient stored in fp16, and z, which the fused GEMM rounds once with the bias and
    the materialized path twice (measured: 1.1 roundings at most; 112 before)."""
    params, kwargs = make(case, torch.float16, device)
    kwargs.update(loss_agg_mode="token-mean", normalizer=8192.0)
    fused_grads = fused(params, kwargs, case, upstream=65536.0)[1]
    grads64 = via_logits(reference.mhpo_loss, *float64(params, kwargs), case, upstream=65536.0)[1]
    grads_m = via_logits(mhpo_kernels.mhpo_loss, params, kwargs, case, upstream=65536.0)[1]
    u = UNIT_ROUNDOFF[torch.float16]
    for name, g, g64, gm in zip(("dhidden", "dweight", "dbias"), fused_grads, grads64, grads_m):
        assert g.dtype == torch.float16, name
        assert max_rel_err(g.cpu(), g64) <= max_rel_err(gm.cpu(), g64) + 2 * u, name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp16_large_derivative_stays_finite(backend):
    """fp16 with one token's ratio at e^11.5 under PPO-clip (A < 0: the unclipped side, a
    derivative of 1e5): the gradient is finite and the materialized logits' (a scale chosen in
    the forward for the tiles' gradient would have had to trade this range against the small
    probabilities' precision; the fp16 loss takes the log-probs' backward instead)."""
    from mhpo_kernels.objectives import PPOClip

    g = torch.Generator().manual_seed(1)
    N, H, V = 24, 16, 50
    hidden, weight = torch.randn(N, H, generator=g).half(), (torch.randn(V, H, generator=g) * 0.3).half()
    ids = torch.randint(0, V, (N,), generator=g)
    old = torch.log_softmax(hidden.float() @ weight.float().T, -1).gather(1, ids[:, None])[:, 0]
    old[0] -= 12.5
    adv = torch.ones(N)
    adv[0] = -1.0
    kw = dict(objective=PPOClip(), loss_agg_mode="token-mean")
    grads = []
    with mhpo_kernels.use_backend(backend):
        for fused_path in (True, False):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss = (mhpo_kernels.fused_linear_policy_loss(h, w, ids, old, adv, **kw) if fused_path
                    else mhpo_kernels.policy_loss(h @ w.T, ids, old, adv, **kw))
            loss.backward()
            grads.append((h.grad, w.grad))
    for got, want in zip(*grads):
        assert torch.isfinite(got).all() and max_rel_err(got, want) <= 2 * UNIT_ROUNDOFF[torch.float16]


@pytest.mark.parametrize("device", DEVICES)
def test_metrics_and_logprobs_match_materialized(device):
    case = CASES[3]
    params, kwargs = make(case, torch.float32, device)
    hidden, weight, bias = params
    logits = transform(hidden @ weight.T + bias, case)
    _, metrics = mhpo_kernels.fused_linear_mhpo_loss(
        hidden, weight, bias=bias, logit_scale=case.scale, final_logit_softcap=case.softcap,
        chunk_size=case.chunk, return_metrics=True, **kwargs)
    _, expected = mhpo_kernels.mhpo_loss(logits, return_metrics=True, **kwargs)
    assert metrics.keys() == expected.keys() and "outside_support" not in metrics
    for name in metrics:
        assert metrics[name].item() == pytest.approx(expected[name].item(), rel=FP32_RTOL, abs=1e-6), name
    ids = kwargs["input_ids"]
    logp, ent = mhpo_kernels.fused_linear_token_logprobs(
        hidden, weight, ids, bias=bias, logit_scale=case.scale, final_logit_softcap=case.softcap,
        temperature=case.temperature, chunk_size=case.chunk, return_entropy=True)
    logp_m, ent_m = mhpo_kernels.token_logprobs(logits, ids, temperature=case.temperature, return_entropy=True)
    assert not logp.requires_grad and logp.shape == ids.shape
    assert max_rel_err(logp, logp_m) <= FP32_RTOL and max_rel_err(ent, ent_m) <= FP32_RTOL


@pytest.mark.parametrize("objective, dtype, min_p", [
    (PPOClip(eps_low=0.2, eps_high=0.28), torch.float32, None), (CISPO(max_ratio=1.3, min_ratio=0.7), torch.float32, 2e-3),
    (PPOClip(eps_low=0.2, eps_high=0.28), torch.float16, None)])
def test_clipped_shares_match_materialized(objective, dtype, min_p):
    """The clipped shares of PPO-clip and CISPO on the fused linear path equal the loss's on the
    materialized logits: in fp32, and on the log-probs route (a min-p softmax, fp16 hidden
    states). Some tokens are clipped at each bound, not all."""
    case = CASES[0]
    params, kwargs = make(case, dtype, "cpu")
    hidden, weight, bias = params
    logits = transform(hidden.float() @ weight.float().T + bias.float(), case).to(dtype)
    g = torch.Generator().manual_seed(1)   # ratios e^±0.6 about the policy's, advantages of both signs per token
    logp = mhpo_kernels.token_logprobs(logits, kwargs["input_ids"], temperature=case.temperature, min_p=min_p)
    kwargs = dict(kwargs, old_logprobs=(logp + 0.6 * torch.randn(logp.shape, generator=g)).clamp(max=0),
                  advantages=torch.randn(logp.shape, generator=g), mask=None, beta=0.0)
    _, fused = mhpo_kernels.fused_linear_policy_loss(
        hidden, weight, bias=bias, logit_scale=case.scale, final_logit_softcap=case.softcap, chunk_size=case.chunk,
        objective=objective, min_p=min_p, return_metrics=True, **kwargs)
    _, on_logits = mhpo_kernels.policy_loss(logits, objective=objective, min_p=min_p, return_metrics=True, **kwargs)
    assert fused.keys() == on_logits.keys()
    # fp16: the two paths round the logits differently (in the GEMM, or after it), by ~1e-3 in a
    # log-prob, so a token that close to a bound may fall on either side: one token's share apart
    one_token = 1 / (logp > -math.inf).sum().item() if dtype == torch.float16 else 0.0
    for name in ("clip_low_frac", "clip_high_frac"):
        assert 0 < on_logits[name].item() < 1, name
        assert abs(fused[name].item() - on_logits[name].item()) <= one_token, name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_filters_named_but_off_report_outside_support_on_every_path(backend):
    """Filters that are named but off (top_k=0, min_p=0, top_p=1) truncate nothing, and every path
    reports ``outside_support`` = 0 beside the same other metrics: the fused linear loss, the
    loss on the logits and the float64 reference."""
    case = CASES[3]
    params, kwargs = make(case, torch.float32, "cpu")
    hidden, weight, bias = params
    logits = transform(hidden @ weight.T + (0.0 if bias is None else bias), case)
    off = dict(top_k=0, min_p=0.0, top_p=1.0)
    with mhpo_kernels.use_backend(backend):
        _, fused = mhpo_kernels.fused_linear_mhpo_loss(
            hidden, weight, bias=bias, logit_scale=case.scale, final_logit_softcap=case.softcap,
            chunk_size=case.chunk, return_metrics=True, **kwargs, **off)
        _, on_logits = mhpo_kernels.mhpo_loss(logits, return_metrics=True, **kwargs, **off)
    (h64, w64, b64), args64 = float64(params, kwargs)
    logits64 = transform(h64 @ w64.T + (0.0 if b64 is None else b64), case)
    _, want = reference.mhpo_loss(logits64, return_metrics=True, **args64, **off)
    assert fused.keys() == on_logits.keys() == want.keys() and "outside_support" in want
    assert fused["outside_support"].item() == on_logits["outside_support"].item() == want["outside_support"].item() == 0
    for name in want:
        assert fused[name].item() == pytest.approx(want[name].item(), rel=FP32_RTOL, abs=1e-6), name


def test_frozen_head_and_no_grad():
    """A frozen LM head (LoRA) gets no weight gradient, and none is computed; under no_grad the
    loss is the same and nothing is differentiable."""
    case = CASES[0]
    params, kwargs = make(case, torch.float32, "cpu")
    hidden, weight, bias = params
    h = hidden.clone().requires_grad_()
    loss = mhpo_kernels.fused_linear_mhpo_loss(h, weight, bias=bias, logit_scale=case.scale,
                                               final_logit_softcap=case.softcap, chunk_size=case.chunk, **kwargs)
    loss.backward()
    assert h.grad is not None and weight.grad is None and bias.grad is None
    with torch.no_grad():
        loss_ng = mhpo_kernels.fused_linear_mhpo_loss(h, weight, bias=bias, logit_scale=case.scale,
                                                      final_logit_softcap=case.softcap, chunk_size=case.chunk, **kwargs)
    assert not loss_ng.requires_grad and torch.equal(loss_ng, loss.detach())


@pytest.mark.parametrize("change, error, name", [
    (dict(weight=torch.randn(50, 32)), ValueError, "weight"),
    (dict(weight=torch.randn(50, 16, dtype=torch.bfloat16)), TypeError, "weight"),
    (dict(bias=torch.randn(49)), ValueError, "bias"),
    (dict(hidden=torch.randn(16)), ValueError, "hidden"),
    (dict(input_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, "input_ids"),
    (dict(input_ids=torch.full((2, 3), 50)), ValueError, "input_ids"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(final_logit_softcap=0.0), ValueError, "final_logit_softcap"),
    (dict(logit_scale=-1.0), ValueError, "logit_scale"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(beta=0.5), ValueError, "ref_logprobs"),
    (dict(bias=torch.randn(50, dtype=torch.float16)), TypeError, "bias must have hidden's dtype"),
    (dict(bias=torch.randn(50, device="meta")), ValueError, "bias is on meta, but hidden is on cpu"),
    (dict(chunk_size="4"), TypeError, "chunk_size must be None or an int"),
    (dict(chunk_size=2.0), TypeError, "chunk_size must be None or an int"),
    (dict(hidden=torch.randn(2, 3, 0), weight=torch.randn(50, 0)), ValueError, "hidden must be .* with H >= 1"),
    # hidden one position longer than the ids: the ids' error (not old_logprobs'), naming the slice
    (dict(hidden=torch.randn(2, 4, 16)), ValueError, r"input_ids must have shape \(2, 4\).*hidden\[:, :-1\]"),
], ids=["weight-H", "weight-dtype", "bias-shape", "hidden-1d", "ids-shape", "ids-range", "chunk",
        "softcap", "scale", "temperature", "beta-no-ref", "bias-dtype", "bias-device", "chunk-str", "chunk-float",
        "H-0", "hidden-shifted"])
def test_bad_calls_raise(change, error, name):
    args = dict(hidden=torch.randn(2, 3, 16), weight=torch.randn(50, 16), input_ids=torch.randint(0, 50, (2, 3)),
                old_logprobs=-torch.rand(2, 3), advantages=torch.randn(2))
    args.update(change)
    with pytest.raises(error, match=name):
        mhpo_kernels.fused_linear_mhpo_loss(**args)


@pytest.mark.parametrize("bad", ["int64", "bool", "float64"])
def test_autocast_leaves_inputs_it_does_not_cast_to_the_checks(bad):
    """Integer, bool and float64 hidden states or bias are refused under autocast as without it
    (autocast would have cast them to bf16 and the call run on them)."""
    dtype = getattr(torch, bad)
    hidden, weight = torch.randn(2, 3, 16), torch.randn(50, 16)
    ids, old, adv = torch.randint(0, 50, (2, 3)), -torch.rand(2, 3), torch.randn(2)
    for args in (dict(hidden=hidden.to(dtype), weight=weight.to(dtype)), dict(bias=torch.zeros(50, dtype=dtype))):
        args = {**dict(hidden=hidden, weight=weight), **args}
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="must be float32|dtype"):
            mhpo_kernels.fused_linear_mhpo_loss(input_ids=ids, old_logprobs=old, advantages=adv, **args)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradient_accumulates_in_fp32(device):
    """Summing one bf16 GEMM per chunk into dweight must not round each product (or the running
    sum) to bf16: over 200 chunks that loses ~1e-3, fp32 keeps ~1e-6."""
    from mhpo_kernels.linear_sweeps import _addmm_fp32

    g = torch.Generator().manual_seed(5)
    a = torch.randn(200, 64, 8, generator=g).to(device, torch.bfloat16)
    b = torch.randn(200, 8, 32, generator=g).to(device, torch.bfloat16)
    acc = torch.zeros(64, 32, device=device)
    for i in range(200):
        _addmm_fp32(acc, a[i], b[i])
    exact = torch.einsum("nik,nkj->ij", a.double().cpu(), b.double().cpu())
    assert max_rel_err(acc.cpu(), exact) <= 1e-5


def test_invalid_tokens_hidden_states_may_hold_anything():
    """A masked or ignored token's hidden state may be NaN or inf: it must reach no gradient, the
    weight's included (its GEMM would otherwise multiply 0 by NaN)."""
    case = CASES[3]
    params, kwargs = make(case, torch.float32, "cpu")
    clean_loss, clean_grads = fused(params, kwargs, case, upstream=1.0)
    hidden = params[0].clone()
    invalid = ~kwargs["mask"] | (kwargs["input_ids"] == -100)
    hidden[invalid] = float("nan")
    hidden[invalid.nonzero()[0].unbind()] = float("inf")
    loss, grads = fused([hidden] + params[1:], kwargs, case, upstream=1.0)
    assert torch.equal(loss, clean_loss)
    assert torch.equal(grads[1], clean_grads[1]) and torch.equal(grads[2], clean_grads[2])
    assert torch.equal(grads[0][~invalid], clean_grads[0][~invalid]) and not grads[0][invalid].any()


def _gemm_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_padded_tokens_take_no_part_in_the_gemms():
    """At 50 % padding a training step does at most 55 % of the GEMM FLOPs of the same batch
    without padding (the three GEMMs scale with the valid tokens), and the result is unchanged
    by whatever the padded rows hold."""
    from mhpo_kernels import linear_sweeps

    g = torch.Generator().manual_seed(3)
    N, H, V = 16, 32, 300
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    target = torch.randint(0, V, (N,), generator=g, dtype=torch.int32)
    adv, w = torch.randn(N, generator=g), torch.full((N,), 1.0 / N)
    padded = target.clone()
    padded[N // 2:] = -1
    dirty = hidden.clone()
    dirty[N // 2:] = float("nan")
    hp, lmap = mhpo_kernels._sweep_types.mhpo_token_params(), mhpo_kernels._sweep_types.LogitMap.make(1.0)

    def step(h, t, out):
        n = h.shape[0]
        out.append(linear_sweeps.fused_linear_sweeps(h, weight, None, t, None, adv[:n], w[:n], None,
                                                     hp, lmap, 4, False, True, True, False,
                                                     n_valid=int((t >= 0).sum())))

    full, half = [], []
    flops_full = _gemm_flops(lambda: step(hidden, target, full))
    flops_half = _gemm_flops(lambda: step(dirty, padded, half))
    assert flops_full > 0 and flops_half <= 0.55 * flops_full
    loss, logp, _, _, _, dh, dw, _ = half[0]
    assert torch.isfinite(loss) and torch.isfinite(dw).all() and torch.isfinite(dh).all()
    assert not dh[N // 2:].any() and not logp[N // 2:].any()
    # The valid half alone, in the same chunks, gives the same weight gradient bit for bit.
    alone = []
    step(hidden[: N // 2], target[: N // 2], alone)
    assert torch.equal(dw, alone[0][6])
