"""float64 logits on the PyTorch path: every step in float64, so ``torch.autograd.gradcheck``
holds (for the terms whose gradient is the derivative of the loss: MHPO's hazard ζ carries no
gradient by definition, so MHPO is checked with ``dhp=False`` by gradcheck and against the float64
reference's autograd as it is). The Triton kernels read float32, bfloat16 and float16 only: float64
there is a clear error."""

import pytest
import torch

import mhpo_kernels
import reference
from mhpo_kernels.objectives import GPG, GSPO, MHPO, SAPO

B, T, V = 2, 3, 7


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) - 1.0
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    tau = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return x, ids, mask, old, adv, tau


@pytest.mark.parametrize("objective", [MHPO(dhp=False), GPG(), SAPO(), GSPO()], ids=repr)
def test_gradcheck_policy_loss(objective):
    x, ids, mask, old, adv, tau = _inputs()
    bonus = 0.0 if objective.sequence_level else 0.05

    def loss(x):
        return mhpo_kernels.policy_loss(x, ids, old, adv, mask, objective=objective, temperature=tau,
                                        ref_logprobs=old - 0.1, beta=0.1, entropy_coef=bonus)

    with mhpo_kernels.use_backend("torch"):
        assert loss(x).dtype == torch.float64
        assert torch.autograd.gradcheck(loss, (x.requires_grad_(),))


def test_gradcheck_token_logprobs_and_entropy():
    x, ids, mask, _, _, tau = _inputs(1)
    with mhpo_kernels.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda x: mhpo_kernels.token_logprobs(x, ids, temperature=tau, return_entropy=True, mask=mask),
            (x.requires_grad_(),))


def test_mhpo_equals_the_float64_reference():
    """MHPO as defined (ζ without gradient): loss and gradient equal the reference's in float64, to
    the fp32 rounding of the per-token constants (old log-probs, advantages, weights: prepared in
    fp32), far below anything fp32 logits could show."""
    x, ids, mask, old, adv, _ = _inputs(2)
    with mhpo_kernels.use_backend("torch"):
        xa = x.clone().requires_grad_()
        loss = mhpo_kernels.mhpo_loss(xa, ids, old, adv, mask)
        loss.backward()
    xr = x.clone().requires_grad_()
    want = reference.mhpo_loss(xr[:, :-1], ids, old, adv, mask)
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-6 * abs(want.item())
    assert (xa.grad - xr.grad).abs().max() <= 1e-6 * xr.grad.abs().max()


def test_non_finite_logit_propagates_in_float64():
    x, ids, mask, old, adv, _ = _inputs(3)
    x[0, 1, 2] = float("nan")                      # a valid row
    with mhpo_kernels.use_backend("torch"):
        assert torch.isnan(mhpo_kernels.mhpo_loss(x, ids, old, adv, mask))
    assert torch.isnan(reference.mhpo_loss(x[:, :-1], ids, old, adv, mask))


def test_triton_path_refuses_float64():
    x, ids, mask, old, adv, _ = _inputs()
    with mhpo_kernels.use_backend("triton"):
        with pytest.raises(TypeError, match="float64, which only the PyTorch path computes"):
            mhpo_kernels.mhpo_loss(x, ids, old, adv, mask)
        with pytest.raises(TypeError, match="float64"):
            mhpo_kernels.token_logprobs(x, ids)


def test_float64_under_torch_compile():
    """Under torch.compile(fullgraph=True), float64 logits trace (the backend is chosen when the op
    runs, not read from ``use_backend`` at trace time): the PyTorch path's loss and gradient equal
    eager's bit for bit, and the Triton path refuses them with the same error as eagerly."""
    x, ids, mask, old, adv, tau = _inputs(4)

    def loss(x):
        return mhpo_kernels.mhpo_loss(x, ids, old, adv, mask, temperature=tau)

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    with mhpo_kernels.use_backend("torch"):
        got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = compiled(got_x), loss(want_x)
        got.backward(), want.backward()
        assert got.dtype == torch.float64 and torch.equal(got, want) and torch.equal(got_x.grad, want_x.grad)
    with mhpo_kernels.use_backend("triton"):
        with pytest.raises(TypeError, match="float64, which only the PyTorch path computes"):
            compiled(x)
