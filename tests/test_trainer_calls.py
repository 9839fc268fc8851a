"""The calls trainers make: full logits with the next-token shift (no slice backward), the gradient
written in place, a caller's normalizer, and β = 0 with a reference far from the policy."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mhpo_kernels
import reference
from _cases import FP32_RTOL, max_rel_err
from conftest import TRITON_DEVICE

BACKENDS = ["triton", "torch"]
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


def _inputs(B=3, T=5, V=700, seed=0, device=TRITON_DEVICE):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + 1, V, generator=g) * 2.0
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, :1] = True
    old = torch.randn(B, T, generator=g) - 6.0
    adv = torch.randn(B, generator=g)
    ref = old + 0.3 * torch.randn(B, T, generator=g)
    return [x.to(device) for x in (full, ids, mask, old, adv, ref)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_logits_equal_the_sliced_call(backend):
    """(B, T + 1, V) logits with (B, T) ids: position t predicts ids[:, t]; the result equals the
    sliced call and the float64 reference, and the last position's gradient row is exactly 0."""
    full, ids, mask, old, adv, ref = _inputs()
    kwargs = dict(old_logprobs=old, advantages=adv, mask=mask, ref_logprobs=ref, beta=0.1, temperature=0.8)
    with mhpo_kernels.use_backend(backend):
        x = full.detach().clone().requires_grad_()
        loss, metrics = mhpo_kernels.mhpo_loss(x, ids, return_metrics=True, **kwargs)
        (loss * 1.7).backward()
        xs = full[:, :-1].detach().clone().requires_grad_()
        loss_s, metrics_s = mhpo_kernels.mhpo_loss(xs, ids, return_metrics=True, **kwargs)
        (loss_s * 1.7).backward()
        logp, ent = mhpo_kernels.token_logprobs(full, ids, temperature=0.8, return_entropy=True)
    if backend == "triton":  # rows are independent programs: the same rows give the same bits
        assert loss.item() == loss_s.item()
        assert all(metrics[k].item() == metrics_s[k].item() for k in metrics)
        assert torch.equal(x.grad[:, :-1], xs.grad)
    else:  # PyTorch's vectorized row sums split differently at another offset: fp32 rounding
        assert abs(loss.item() - loss_s.item()) <= 1e-6 * abs(loss_s.item())
        assert max_rel_err(x.grad[:, :-1], xs.grad) <= 1e-6
    assert torch.equal(x.grad[:, -1], torch.zeros_like(x.grad[:, -1]))

    x64 = full[:, :-1].detach().cpu().double().requires_grad_()
    kw64 = {k: v.cpu().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else
            (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    loss64 = reference.mhpo_loss(x64, ids.cpu(), **kw64)
    (loss64 * 1.7).backward()
    assert abs(loss.item() - loss64.item()) <= FP32_RTOL * abs(loss64.item())
    assert max_rel_err(x.grad[:, :-1].cpu(), x64.grad) <= FP32_RTOL
    logp64, ent64 = reference.token_logprobs(x64.detach(), ids.cpu(), 0.8, return_entropy=True)
    assert logp.shape == ids.shape and max_rel_err(logp.cpu(), logp64) <= FP32_RTOL
    assert max_rel_err(ent.cpu(), ent64) <= FP32_RTOL


def test_logits_that_fit_neither_shape_are_refused():
    full, ids, *_ = _inputs()
    with pytest.raises(ValueError, match="input_ids must have shape .*next-token shift"):
        mhpo_kernels.mhpo_loss(full, ids[:, :-1], None, torch.ones(3, device=full.device))
    with pytest.raises(ValueError, match="input_ids must have shape"):  # 2-D logits: N = N
        mhpo_kernels.token_logprobs(full[0], ids[0])


class _Recorder(TorchDispatchMode):
    """Records every op that runs and the sizes of the new buffers it returns (views of its
    inputs are not allocations)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        flat = out if isinstance(out, (tuple, list)) else [out]
        new = [t.numel() for t in flat
               if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen]
        self.calls.append((str(func), new))
        return out


def _backward_audit(inplace, backend):
    """Run the full-logits call's backward under the recorder: logits from a linear head (the
    case ``inplace_backward`` is for), H small enough that only the logits are logits-sized."""
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 2, 6, 4, 900
    hidden = torch.randn(B, T + 1, H, generator=g).to(TRITON_DEVICE).requires_grad_()
    head = (torch.randn(V, H, generator=g) * 0.5).to(TRITON_DEVICE).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g).to(TRITON_DEVICE)
    with mhpo_kernels.use_backend(backend):
        logits = hidden @ head.t()
        version = logits._version
        loss = mhpo_kernels.mhpo_loss(logits, ids, None, torch.randn(B, generator=g).to(TRITON_DEVICE),
                                      inplace_backward=inplace)
        with _Recorder() as rec:
            loss.backward()
    big = [name for name, sizes in rec.calls if any(n >= logits.numel() for n in sizes)]
    return rec.calls, big, logits, version, (hidden.grad, head.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_logits_backward_allocates_one_gradient_and_no_slice(backend):
    calls, big, *_ = _backward_audit(False, backend)
    assert not any("slice_backward" in name for name, _ in calls), calls
    assert big == ["mhpo_kernels.sweeps_backward.default"], big


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_allocates_nothing_logits_sized(backend):
    calls, big, logits, version, grads = _backward_audit(True, backend)
    assert not any("slice_backward" in name for name, _ in calls), calls
    assert big == [], big
    assert any("sweeps_backward_" in name for name, _ in calls)
    assert logits._version > version  # the mutation is visible to autograd
    _, _, _, _, expected = _backward_audit(False, backend)
    for got, want in zip(grads, expected):
        assert torch.equal(got, want)


def test_inplace_backward_raises_where_the_logits_are_saved_elsewhere():
    """A term that saved the logits for its own backward and runs after this loss's backward would
    read the gradient instead: autograd raises, it does not compute garbage."""
    full, ids, _, old, adv, _ = _inputs()
    h = full.detach().clone().requires_grad_()
    logits = h * 1.0
    other = (logits ** 2).mean()            # saves logits; created first, so its backward runs last
    loss = mhpo_kernels.mhpo_loss(logits, ids, old, adv, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


@pytest.mark.parametrize("view", ["leaf", "view", "slice"])
@pytest.mark.parametrize("call", ["mhpo_loss", "token_logprobs"])
def test_inplace_backward_refuses_a_leaf_and_its_views(view, call):
    """A view of a leaf writes into the leaf's storage: refused as the leaf is, before any launch,
    and its values are left alone."""
    full, ids, _, old, adv, _ = _inputs()
    leaf = full.clone().requires_grad_()
    logits = {"leaf": leaf, "view": leaf.view(full.shape), "slice": leaf[:, :]}[view]
    args = (old, adv) if call == "mhpo_loss" else ()
    with pytest.raises(ValueError, match="inplace_backward=True would overwrite logits, a leaf"):
        getattr(mhpo_kernels, call)(logits, ids, *args, inplace_backward=True)
    assert torch.equal(leaf.detach(), full)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", ["loss", "loss-inplace", "loss-grad-in-forward", "logprobs"])
def test_full_logits_of_empty_completions(backend, call):
    """(B, 1, V) logits with (B, 0) ids: the shift's one position and no token. The loss is 0 and
    the gradient zero rows, as the float64 reference's on the (B, 0, V) slice (the empty view of
    the tokens' rows may have no address: only the shift's rows are written)."""
    full, ids, _, old, adv, _ = _inputs(T=0, V=37)
    base = full.detach().clone().requires_grad_()
    with mhpo_kernels.use_backend(backend):
        logits = base * 1.0
        if call == "logprobs":
            loss = mhpo_kernels.token_logprobs(logits, ids).sum()
        else:
            loss = mhpo_kernels.mhpo_loss(logits, ids, old, adv, inplace_backward=call == "loss-inplace",
                                          grad_in_forward=call == "loss-grad-in-forward")
        loss.backward()
    x64 = full[:, :-1].detach().cpu().double().requires_grad_()
    if call == "logprobs":
        loss64 = reference.token_logprobs(x64, ids.cpu()).sum()
    else:
        loss64 = reference.mhpo_loss(x64, ids.cpu(), old.cpu().double(), adv.cpu().double())
    loss64.backward()
    assert loss.item() == loss64.item() == 0.0
    assert torch.equal(base.grad, torch.zeros_like(base.grad))
    assert x64.grad.shape == (3, 0, 37)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
def test_normalizer_divides_the_aggregated_sum(backend, mode, as_tensor):
    """normalizer = D gives Σ_t loss_t / D (token-mean), Σ_seq token-mean / D, Σ_seq token-sum / D."""
    full, ids, mask, old, adv, ref = _inputs(seed=2)
    mask[-1] = False  # a sequence without tokens: it counts for neither the sums nor D
    D = 7.5
    norm = torch.tensor(D, device=full.device) if as_tensor else D
    kwargs = dict(old_logprobs=old, advantages=adv, mask=mask, ref_logprobs=ref, beta=0.05)
    with mhpo_kernels.use_backend(backend):
        x = full.detach().clone().requires_grad_()
        loss = mhpo_kernels.mhpo_loss(x, ids, loss_agg_mode=mode, normalizer=norm, **kwargs)
        loss.backward()
    x64 = full.detach().cpu().double().requires_grad_()
    kw64 = {k: v.cpu().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else
            (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    loss64 = reference.mhpo_loss(x64, ids.cpu(), loss_agg_mode=mode, normalizer=D, **kw64)
    loss64.backward()
    assert abs(loss.item() - loss64.item()) <= FP32_RTOL * abs(loss64.item())
    assert max_rel_err(x.grad.cpu(), x64.grad) <= FP32_RTOL
    # What the normalizer means: the local count's result, rescaled by count / D.
    valid = mask.cpu()
    count = valid.sum() if mode == "token-mean" else valid.any(-1).sum()
    local = reference.mhpo_loss(x64.detach(), ids.cpu(), loss_agg_mode=mode, **kw64)
    assert abs(loss64.item() - local.item() * count.item() / D) <= 1e-12 * abs(loss64.item())


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-2.0, ValueError), (math.inf, ValueError),
                                        ("3", TypeError), (torch.ones(2), ValueError)])
def test_bad_normalizer_is_refused(bad, error):
    full, ids, mask, old, adv, _ = _inputs()
    with pytest.raises(error, match="normalizer"):
        mhpo_kernels.mhpo_loss(full, ids, old, adv, mask, normalizer=bad)
    with pytest.raises(ValueError, match="normalizer"):
        mhpo_kernels.mhpo_loss(full, ids, old, adv, mask, normalizer=torch.tensor(0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_zero_never_evaluates_the_kl_term(backend):
    """ref infinitely far from logp (e^d = inf; a non-finite log-prob is data, SPEC section 5) at
    β = 0: the loss is the policy term alone, finite, and the kl metric is still reported (not
    finite, as k3 = e^d − d − 1 is there)."""
    full, ids, mask, old, adv, _ = _inputs(seed=4)
    far = torch.full_like(old, float("inf"))
    with mhpo_kernels.use_backend(backend):
        x = full.detach().clone().requires_grad_()
        loss, metrics = mhpo_kernels.mhpo_loss(x, ids, old, adv, mask, ref_logprobs=far, beta=0.0,
                                               return_metrics=True)
        loss.backward()
        expected = mhpo_kernels.mhpo_loss(full, ids, old, adv, mask)
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert loss.item() == expected.item()
    assert "kl" in metrics and not torch.isfinite(metrics["kl"])
