"""``batch_invariant=True`` on the fused linear path: a row's log-prob, entropy and dhidden row,
and under a loss whose weights are its own (token-mean with a fixed normalizer) its dhidden row,
have the same bits alone, among 700 rows and shifted by 37 rows (SPEC.md, section 4), on the
PyTorch path (chunks of 64); the Triton kernels (under the interpreter, which costs milliseconds
per row) among 40, in chunks of 16. Bitwise: equality, no tolerance."""

import functools

import pytest
import torch

import mhpo_kernels

H, V, SHIFT = 16, 96, 37


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n + SHIFT, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    ids = torch.randint(0, V, (n + SHIFT,), generator=g)
    old = -torch.rand(n + SHIFT, generator=g) * 3 - 0.1
    adv = torch.randn(n + SHIFT, generator=g)
    return hidden, weight, ids, old, adv


def _logprobs(hidden, weight, ids, batch_invariant=True, chunk=64):
    h = hidden.clone().requires_grad_()
    logp, entropy = mhpo_kernels.fused_linear_token_logprobs(h, weight, ids, chunk_size=chunk, return_entropy=True,
                                                           batch_invariant=batch_invariant)
    (logp.sum() + 0.3 * entropy.sum()).backward()
    return logp.detach(), entropy.detach(), h.grad


def _loss_grad(hidden, weight, ids, old, adv, chunk=64):
    h = hidden.clone().requires_grad_()
    loss = mhpo_kernels.fused_linear_mhpo_loss(h, weight, ids, old, adv, chunk_size=chunk, loss_agg_mode="token-mean",
                                               normalizer=1.0, batch_invariant=True)
    loss.backward()
    return (h.grad,)


@pytest.mark.parametrize("backend, n, chunk", [("triton", 40, 16), ("torch", 700, 64)])
def test_a_row_has_the_same_bits_in_any_batch(backend, n, chunk):
    hidden, weight, ids, old, adv = _inputs(n)
    with mhpo_kernels.use_backend(backend):
        for base, extra in ((_logprobs, ()), (_loss_grad, (old, adv))):
            fn = functools.partial(base, chunk=chunk)
            among = fn(hidden[SHIFT:], weight, ids[SHIFT:], *(x[SHIFT:] for x in extra))
            shifted = fn(hidden, weight, ids, *extra)
            for a, s in zip(among, shifted):
                assert torch.equal(s[SHIFT:], a), base.__name__
            for r in (0, n // 2 + 1, n - 1):
                alone = fn(hidden[SHIFT + r:SHIFT + r + 1], weight, ids[SHIFT + r:SHIFT + r + 1],
                           *(x[SHIFT + r:SHIFT + r + 1] for x in extra))
                for a, x in zip(alone, among):
                    assert torch.equal(a[0], x[r]), (base.__name__, r)


def test_the_flag_is_checked():
    """Without the flag a row alone is computed by a GEMM of another shape (equal to rounding; its
    bits may differ); a flag that is not a bool is refused."""
    hidden, weight, ids, _, _ = _inputs(200)
    with mhpo_kernels.use_backend("torch"):
        alone = _logprobs(hidden[:1], weight, ids[:1], batch_invariant=False)
        among = _logprobs(hidden, weight, ids, batch_invariant=False)
    assert all(torch.allclose(a[0], x[0], rtol=1e-5, atol=1e-6) for a, x in zip(alone, among))
    with pytest.raises(TypeError, match="batch_invariant must be a bool"):
        mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, batch_invariant=1)
