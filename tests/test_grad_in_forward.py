"""grad_in_forward=True: the logits' gradient computed in the forward (one persistent launch on the
Triton path, the two sweeps back to back on the PyTorch path) against the two-sweep path,
bit for bit at the upstream gradient the forward is told of (``grad_scale``, 1 by default),
within the rescale's own rounding at any other."""

import pytest
import torch

import mhpo_kernels
from mhpo_kernels import MHPOLoss, mhpo_loss, policy_loss, token_logprobs
from mhpo_kernels._config import one_sweep_programs, persistent_programs
from mhpo_kernels._inputs import check_grad_in_forward
from mhpo_kernels.objectives import CISPO, GPG, GSPO, MHPO, SAPO, PPOClip

from _cases import STORE_FLOOR, store_error

OBJECTIVES = {
    "mhpo": MHPO(), "mhpo-no-lfm": MHPO(lfm=False), "mhpo-no-dhp": MHPO(dhp=False),
    "ppo-clip": PPOClip(eps_low=0.2, eps_high=0.28), "ppo-dual-clip": PPOClip(dual_clip=3.0),
    "cispo": CISPO(), "sapo": SAPO(), "gpg": GPG(),
}


def _inputs(seed, B, T, V, dtype, shifted):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T + 1 if shifted else T, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    old = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).gather(-1, ids[..., None])[..., 0]
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[-1] = False                       # a sequence without a valid token: zero rows
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    tau = torch.rand(B, T, generator=g) + 0.5
    return x, ids, old, adv, mask, ref, tau


def _no_backward_sweep(*args, **kwargs):
    raise AssertionError("grad_in_forward ran the backward sweep")


def _run(x0, args, upstream, monkeypatch=None, **kw):
    leaf = x0.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf, as an LM head's output: inplace_backward may overwrite it
    loss, metrics = policy_loss(logits, *args, return_metrics=True, **kw)
    if kw.get("grad_in_forward"):
        # the gradient is already there: in the logits themselves when in place
        assert torch.equal(logits.detach(), x0) != kw["inplace_backward"]
        with monkeypatch.context() as m:
            m.setattr(mhpo_kernels.ops, "_backward_sweep", _no_backward_sweep)
            loss.backward(upstream)
    else:
        loss.backward(upstream)
    return loss.detach(), metrics, leaf.grad


# (id, objective, dtype, V, shifted, inplace, tau, ref, agg mode)
CASES = [
    ("mhpo-fp32", "mhpo", torch.float32, 40, False, False, False, False, "seq-mean-token-mean"),
    ("mhpo-bf16-inplace-shifted", "mhpo", torch.bfloat16, 37, True, True, False, True, "token-mean"),
    ("mhpo-fp32-tau-ref-inplace", "mhpo", torch.float32, 37, False, True, True, True, "seq-mean-token-sum"),
    ("no-lfm-bf16", "mhpo-no-lfm", torch.bfloat16, 64, False, False, True, False, "token-mean"),
    ("no-dhp-fp32-shifted", "mhpo-no-dhp", torch.float32, 33, True, False, False, True, "seq-mean-token-mean"),
    ("ppo-bf16-inplace", "ppo-clip", torch.bfloat16, 48, False, True, False, False, "seq-mean-token-mean"),
    ("ppo-dual-fp32-tau-shifted", "ppo-dual-clip", torch.float32, 41, True, True, True, False, "token-mean"),
    ("cispo-bf16-ref", "cispo", torch.bfloat16, 35, False, False, False, True, "seq-mean-token-sum"),
    ("sapo-fp32-shifted-inplace", "sapo", torch.float32, 40, True, True, False, True, "token-mean"),
    ("gpg-bf16-tau", "gpg", torch.bfloat16, 39, False, False, True, False, "seq-mean-token-mean"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_two_sweeps(case, backend, monkeypatch):
    """Loss, metrics and gradient equal the two-sweep path's bitwise at G = 1; at a random G the
    gradient is the G = 1 one rescaled (one more rounding of the stored value)."""
    _, name, dtype, V, shifted, inplace, with_tau, with_ref, agg = case
    B, T = 3, 4  # 12 rows (15 shifted), more than the 4 programs of the interpreter's persistent grid
    x0, ids, old, adv, mask, ref, tau = _inputs(CASES.index(case), B, T, V, dtype, shifted)
    args = (ids, old, adv, mask)
    kw = dict(objective=OBJECTIVES[name], loss_agg_mode=agg, inplace_backward=inplace,
              temperature=tau if with_tau else 0.9)
    if with_ref:
        kw.update(ref_logprobs=ref, beta=0.05)
    with mhpo_kernels.use_backend(backend):
        # (the upstream gradient, the one the forward is told of: TRL's 1 / accumulation steps)
        for upstream, grad_scale in ((1.0, 1.0), (0.37, 1.0), (0.37, 0.37)):
            upstream = torch.tensor(upstream)
            loss2, metrics2, grad2 = _run(x0, args, upstream, **kw)
            loss1, metrics1, grad1 = _run(x0, args, upstream, monkeypatch, grad_in_forward=True,
                                          grad_scale=grad_scale, **kw)
            assert torch.equal(loss1, loss2)
            assert metrics1.keys() == metrics2.keys()
            for key in metrics2:
                assert torch.equal(metrics1[key], metrics2[key]), key
            assert grad2.abs().sum() > 0
            if shifted:
                assert not grad1[:, -1].any()   # the position that predicts nothing
            assert not grad1[-1].any()          # the sequence without a valid token
            if upstream.item() == grad_scale:   # computed for it in the forward: nothing rescaled
                assert torch.equal(grad1, grad2)
            else:
                # grad1 = round(G · round(g)), grad2 = round(g_G): two roundings of the stored
                # value against one (fp32: a few units of 2⁻²⁴ from the rescaled a0 as well).
                tol = 3 * store_error(dtype, x0.device) if dtype != torch.float32 else 1e-6
                err = (grad1.float() - grad2.float()).abs()
                assert (err <= tol * grad2.float().abs() + STORE_FLOOR[dtype]).all()


def test_persistent_grid():
    cpu = torch.device("cpu")
    assert persistent_programs(3, cpu) == 3
    assert persistent_programs(1000, cpu) == 4
    assert persistent_programs(0, cpu) == 1
    # CUDA: sized from L2 (one_sweep_programs), within one and two programs per SM
    h200, h100 = (132, 60 * 2**20), (132, 50 * 2**20)
    row = 151936 * 2
    assert one_sweep_programs(*h200, row) == 60 * 2**20 // row == 207
    assert one_sweep_programs(*h100, row) == 50 * 2**20 // row == 172
    assert one_sweep_programs(*h200, 151936 * 4) == 132           # fp32 rows: at least one per SM
    assert one_sweep_programs(*h200, 32000 * 2) == 264            # short rows: at most two per SM
    assert one_sweep_programs(*h200, row, per_sm=1.5) == 198      # the benchmark's override


def test_persistent_grid_overridden_for_a_block(monkeypatch):
    """The benchmark times the one-sweep kernel at set programs per SM inside
    ``_config.overridden``: the launches in the block use it, those after it the rule again."""
    import types

    from mhpo_kernels import _config

    props = types.SimpleNamespace(multi_processor_count=132, L2_cache_size=60 * 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda, row = torch.device("cuda", 0), 151936 * 2
    assert persistent_programs(10**6, cuda, row) == 207
    with _config.overridden(programs_per_sm=1.5):
        assert persistent_programs(10**6, cuda, row) == 198
        with _config.overridden(row_splits=2):   # a nested block keeps it
            assert persistent_programs(10**6, cuda, row) == 198
    assert persistent_programs(10**6, cuda, row) == 207


def test_module_and_mhpo_loss():
    x0, ids, old, adv, mask, _, _ = _inputs(3, 2, 3, 30, torch.float32, False)
    grads = []
    for module in (MHPOLoss(c=1.2), MHPOLoss(c=1.2, grad_in_forward=True)):
        leaf = x0.clone().requires_grad_()
        module(leaf * 1, ids, old, adv, mask).backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    leaf = x0.clone().requires_grad_()
    mhpo_loss(leaf * 1, ids, old, adv, mask, c=1.2, grad_in_forward=True).backward()
    assert torch.equal(leaf.grad, grads[0])


def test_no_backward_no_gradient_pass(monkeypatch):
    """Under no_grad, or for logits that do not require grad, grad_in_forward runs the plain
    forward sweep: the same loss, no gradient buffer, and in place the logits are left as they were
    (no backward will hand a gradient for them)."""
    from mhpo_kernels import ops

    x0, ids, old, adv, mask, _, _ = _inputs(4, 2, 3, 30, torch.float32, False)
    expected = mhpo_loss(x0, ids, old, adv, mask)
    seen = []
    forward = ops._forward_sweep
    monkeypatch.setattr(ops, "_forward_sweep", lambda *a, **kw: seen.append(a[-1]) or forward(*a, **kw))
    for grad_enabled, requires_grad in ((False, True), (True, False)):
        x = x0.clone().requires_grad_(requires_grad)
        with torch.set_grad_enabled(grad_enabled):
            logits = x * 1 if requires_grad else x     # a leaf that requires grad is refused in place
            loss = mhpo_loss(logits, ids, old, adv, mask, grad_in_forward=True, inplace_backward=True)
        assert torch.equal(loss, expected) and torch.equal(logits.detach(), x0)
    assert seen == [None, None]   # no gradient buffer handed to the sweep


def test_refusals():
    x0, ids, old, adv, mask, _, _ = _inputs(4, 2, 3, 30, torch.float32, False)
    x = x0.clone().requires_grad_()
    with pytest.raises(ValueError, match="grad_in_forward.*sequence-level"):
        policy_loss(x, ids, old, adv, mask, objective=GSPO(), grad_in_forward=True)
    with pytest.raises(ValueError, match="grad_in_forward.*entropy_coef"):
        mhpo_loss(x, ids, old, adv, mask, entropy_coef=0.01, grad_in_forward=True)
    with pytest.raises(ValueError, match="grad_in_forward.*entropy_coef"):
        MHPOLoss(entropy_coef=0.01, grad_in_forward=True)
    with pytest.raises(TypeError, match="grad_in_forward must be a bool"):
        MHPOLoss(grad_in_forward=1)
    with pytest.raises(TypeError, match="grad_in_forward must be a bool"):
        mhpo_loss(x, ids, old, adv, mask, grad_in_forward="yes")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="grad_scale must be finite and > 0"):
            mhpo_loss(x, ids, old, adv, mask, grad_in_forward=True, grad_scale=bad)
        with pytest.raises(ValueError, match="grad_scale"):
            MHPOLoss(grad_in_forward=True, grad_scale=bad)
    with pytest.raises(TypeError, match="grad_scale"):
        mhpo_loss(x, ids, old, adv, mask, grad_in_forward=True, grad_scale=torch.tensor(0.5))
    # tp_group: refused among the local checks that every rank runs (a group object stands in)
    with pytest.raises(ValueError, match="grad_in_forward.*tp_group"):
        check_grad_in_forward(True, MHPO(), object())
    with pytest.raises(TypeError, match="grad_in_forward"):
        token_logprobs(x, ids, grad_in_forward=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_linear_tiles_take_one_sweep(backend, monkeypatch):
    """Without tp_group each logits tile becomes its gradient in the forward's launch: the backward
    sweep never runs, and the gradients are those of mhpo_loss on the full logits."""
    from mhpo_kernels import _dispatch, fused_linear_mhpo_loss

    from _cases import FP32_RTOL, max_rel_err

    g = torch.Generator().manual_seed(9)
    B, T, H, V = 2, 5, 16, 45
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    ids = torch.randint(0, V, (B, T), generator=g)
    old, adv, mask = torch.randn(B, T, generator=g) - 3, torch.randn(B, generator=g), torch.rand(B, T, generator=g) > 0.2
    with mhpo_kernels.use_backend(backend):
        h0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        mhpo_loss(h0 @ w0.t(), ids, old, adv, mask).backward()
        sweeps = _dispatch.sweeps

        def forward_only(device, backend=None):
            return sweeps(device, backend)[0], _no_backward_sweep

        monkeypatch.setattr(_dispatch, "sweeps", forward_only)
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        fused_linear_mhpo_loss(h1, w1, ids, old, adv, mask, chunk_size=4).backward()
    assert max_rel_err(h1.grad, h0.grad) <= FP32_RTOL
    assert max_rel_err(w1.grad, w0.grad) <= FP32_RTOL


def test_inplace_flat_logits_and_a_second_reader_raises():
    """In place on 2-D (N, V) logits (a view the op reshapes) gives the default path's gradient;
    an op that saved the same logits for its backward raises instead of reading the gradient."""
    x0, ids, old, adv, mask, _, _ = _inputs(5, 1, 6, 30, torch.float32, False)
    flat = dict(input_ids=ids[0], old_logprobs=old[0], advantages=adv.expand(6), mask=mask[0] | True)
    grads = []
    for gif in (False, True):
        leaf = x0[0].clone().requires_grad_()
        mhpo_loss(leaf * 1, **flat, inplace_backward=True, grad_in_forward=gif).backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    leaf = x0[0].clone().requires_grad_()
    logits = leaf * 1
    other = logits.sin().sum()  # sin saves its input
    loss = mhpo_loss(logits, **flat, inplace_backward=True, grad_in_forward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
def test_a_second_backward_is_a_clear_error(backend, inplace):
    """The forward's gradient is scaled in place by the first backward: a second backward through
    the same loss raises the package's error, where the two-sweep path simply differentiates again."""
    from conftest import TRITON_DEVICE

    x0, ids, old, adv, mask, _, _ = (t.to(TRITON_DEVICE) for t in _inputs(6, 2, 3, 30, torch.float32, False))
    grads = []
    with mhpo_kernels.use_backend(backend):
        for gif in (False, True):
            leaf = x0.clone().requires_grad_()
            loss = mhpo_loss(leaf * 1, ids, old, adv, mask, inplace_backward=inplace, grad_in_forward=gif)
            loss.backward(retain_graph=True)
            grads.append(leaf.grad.clone())
            if gif:
                with pytest.raises(RuntimeError, match="grad_in_forward=True computes the logits' gradient once"):
                    loss.backward()
            elif not inplace:  # in place, the first backward overwrote the logits the second would read
                loss.backward()
                assert torch.equal(leaf.grad, 2 * grads[0])
    assert torch.equal(grads[0], grads[1])
