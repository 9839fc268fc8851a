"""fused_linear_token_logprobs is differentiable in both outputs: against an eager float64
``log_softmax(z).gather`` and the entropy of the full softmax, values and the gradients of hidden,
weight and bias for random upstream gradients on the log-probs and the entropy, ignored tokens
included, on both CPU paths; and under no_grad it saves nothing."""

import pytest
import torch
import torch.nn.functional as F

import mhpo_kernels
from _cases import FP32_RTOL, max_rel_err

BACKENDS = ["triton", "torch"]


def _inputs(seed=21, B=2, T=5, H=16, V=300):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight, bias = torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 1] = ids[1, 3] = -100
    up_logp, up_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    return hidden, weight, bias, ids, up_logp, up_ent


def eager_logprobs(hidden, weight, bias, ids, temperature, softcap):
    """What the framework hooks compute: the full logits, log_softmax, gather, the full entropy."""
    z = hidden @ weight.t() + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logprobs = F.log_softmax(z / temperature, -1)
    valid = ids != -100
    logp = logprobs.gather(-1, ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def _grads(fn, leaves, ids, up_logp, up_ent, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    logp, ent = fn(*leaves, ids, **kw)
    ((logp * up_logp).sum() + (ent * up_ent).sum()).backward()
    return logp.detach(), ent.detach(), [x.grad for x in leaves]


def _fused(hidden, weight, bias, ids, **kw):
    return mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap, chunk", [(None, 3), (4.0, None)], ids=["plain-chunk3", "softcap-one-chunk"])
def test_values_and_gradients_match_eager_float64(backend, softcap, chunk):
    hidden, weight, bias, ids, up_logp, up_ent = _inputs()
    with mhpo_kernels.use_backend(backend):
        logp, ent, grads = _grads(_fused, (hidden, weight, bias), ids, up_logp, up_ent, temperature=0.8,
                                  final_logit_softcap=softcap, chunk_size=chunk)
    logp64, ent64, grads64 = _grads(lambda h, w, b, i: eager_logprobs(h, w, b, i, 0.8, softcap),
                                    (hidden.double(), weight.double(), bias.double()), ids,
                                    up_logp.double(), up_ent.double())
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ids.shape
    assert max_rel_err(logp, logp64) <= FP32_RTOL and max_rel_err(ent, ent64) <= FP32_RTOL
    for name, got, want in zip(("hidden", "weight", "bias"), grads, grads64):
        assert got.dtype == torch.float32 and max_rel_err(got, want) <= FP32_RTOL, name
    ignored = ids == -100
    assert not logp[ignored].any() and not ent[ignored].any() and not grads[0][ignored].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_alone_and_weight_alone(backend):
    """Without the entropy (the backward sweep without its entropy term) and with only the weight
    requiring grad (no dhidden GEMM): the same gradients as eager."""
    hidden, weight, bias, ids, up_logp, _ = _inputs(seed=22)
    w = weight.clone().requires_grad_()
    with mhpo_kernels.use_backend(backend):
        logp = mhpo_kernels.fused_linear_token_logprobs(hidden, w, ids, bias=bias, chunk_size=4)
    (logp * up_logp).sum().backward()
    w64 = weight.double().requires_grad_()
    logp64, _ = eager_logprobs(hidden.double(), w64, bias.double(), ids, 1.0, None)
    (logp64 * up_logp.double()).sum().backward()
    assert max_rel_err(logp.detach(), logp64) <= FP32_RTOL
    assert max_rel_err(w.grad, w64.grad) <= FP32_RTOL


def test_no_grad_saves_nothing():
    """Under no_grad, or with nothing requiring grad, the outputs carry no graph and nothing is
    saved for a backward; with grad, what is saved is the inputs and O(N) row statistics."""
    hidden, weight, bias, ids, _, _ = _inputs(seed=23)
    packed = []

    def pack(x):
        packed.append(tuple(x.shape))
        return x

    def call(h, w):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            return _fused(h, w, bias, ids, chunk_size=3)

    with torch.no_grad():
        logp, ent = call(hidden.requires_grad_(), weight)
    assert logp.grad_fn is None and ent.grad_fn is None and not packed
    logp, ent = call(hidden.detach(), weight)
    assert logp.grad_fn is None and not packed
    logp, ent = call(hidden.detach().requires_grad_(), weight)
    assert logp.grad_fn is not None and packed
    n, (V, H) = ids.numel(), weight.shape
    # hidden (N, H), weight, bias, and per-token vectors (target, τ, base, log2 sum, entropy): no tile
    assert sorted(packed) == sorted([(n, H), (V, H), (V,)] + [(n,)] * 4), packed


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask(backend):
    """``mask=``: masked positions give 0 and no gradient, as ``token_logprobs(mask=)`` and
    reference/ (float64) have it; a mask that is not 0/1 is refused."""
    import reference

    g = torch.Generator().manual_seed(17)
    hidden = torch.randn(2, 5, 16, generator=g).requires_grad_()
    weight = (torch.randn(37, 16, generator=g) * 0.3).requires_grad_()
    ids = torch.randint(0, 37, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.4
    mask[0, 0] = False
    with mhpo_kernels.use_backend(backend):
        logp, entropy = mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, chunk_size=3, mask=mask,
                                                                 return_entropy=True)
        (logp.sum() + entropy.sum()).backward()
        with pytest.raises(ValueError, match="mask"):
            mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, mask=mask.float() * 2)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_logp, ref_entropy = reference.token_logprobs(h64 @ w64.t(), ids, mask=mask, return_entropy=True)
    (ref_logp.sum() + ref_entropy.sum()).backward()
    assert not logp[~mask].any() and not entropy[~mask].any()
    assert max_rel_err(logp, ref_logp) <= FP32_RTOL and max_rel_err(entropy, ref_entropy) <= FP32_RTOL
    assert max_rel_err(hidden.grad, h64.grad) <= FP32_RTOL and max_rel_err(weight.grad, w64.grad) <= FP32_RTOL
    assert not hidden.grad[~mask].any()
