"""Every malformed call raises TypeError/ValueError naming the argument, before any kernel runs."""

import contextlib
import math

import pytest
import torch

import mhpo_kernels
import reference

B, T, V = 2, 3, 64


def good_args():
    return dict(
        logits=torch.randn(B, T, V), input_ids=torch.randint(0, V, (B, T)),
        old_logprobs=-torch.rand(B, T) - 0.5, advantages=torch.randn(B),
        mask=torch.ones(B, T, dtype=torch.bool),
    )


BAD_CALLS = [
    # (id, change to the arguments, exception, argument named in the message)
    ("logits-not-tensor", dict(logits=[[0.0]]), TypeError, "logits"),
    ("logits-int", dict(logits=torch.zeros(B, T, V, dtype=torch.int32)), TypeError, "logits"),
    ("logits-float64", dict(logits=torch.zeros(B, T, V, dtype=torch.float64)), TypeError, "logits"),
    ("logits-1d", dict(logits=torch.zeros(V)), ValueError, "logits"),
    ("logits-4d", dict(logits=torch.zeros(1, B, T, V)), ValueError, "logits"),
    ("logits-V0", dict(logits=torch.zeros(B, T, 0)), ValueError, "logits"),
    ("ids-float", dict(input_ids=torch.zeros(B, T)), TypeError, "input_ids"),
    ("ids-shape", dict(input_ids=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "input_ids"),
    ("ids-too-large", dict(input_ids=torch.full((B, T), V)), ValueError, "input_ids"),
    ("ids-negative", dict(input_ids=torch.full((B, T), -1)), ValueError, "input_ids"),
    ("old-shape", dict(old_logprobs=torch.zeros(B)), ValueError, "old_logprobs"),
    ("old-int", dict(old_logprobs=torch.zeros(B, T, dtype=torch.long)), TypeError, "old_logprobs"),
    ("adv-shape", dict(advantages=torch.zeros(B + 1)), ValueError, "advantages"),
    ("adv-int", dict(advantages=torch.zeros(B, dtype=torch.long)), TypeError, "advantages"),
    ("adv-not-tensor", dict(advantages=1.0), TypeError, "advantages"),
    ("mask-shape", dict(mask=torch.ones(B, T + 1, dtype=torch.bool)), ValueError, "mask"),
    ("mask-not-binary", dict(mask=torch.full((B, T), 2.0)), ValueError, "mask"),
    ("mask-complex", dict(mask=torch.ones(B, T, dtype=torch.complex64)), TypeError, "mask"),
    ("ref-shape", dict(ref_logprobs=torch.zeros(T), beta=0.1), ValueError, "ref_logprobs"),
    ("beta-without-ref", dict(beta=0.1), ValueError, "ref_logprobs"),
    ("beta-negative", dict(beta=-0.1, ref_logprobs=torch.zeros(B, T)), ValueError, "beta"),
    ("beta-nan", dict(beta=math.nan, ref_logprobs=torch.zeros(B, T)), ValueError, "beta"),
    ("temperature-zero", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature-negative", dict(temperature=-1.0), ValueError, "temperature"),
    ("temperature-int-tensor", dict(temperature=torch.ones(B, T, dtype=torch.long)), TypeError, "temperature"),
    ("temperature-shape", dict(temperature=torch.ones(B, T + 1)), ValueError, "temperature"),
    ("temperature-per-sequence", dict(temperature=torch.ones(B)), ValueError, "temperature"),
    ("temperature-device", dict(temperature=torch.ones(B, T, device="meta")), ValueError, "temperature"),
    ("temperature-tensor-zero", dict(temperature=torch.ones(B, T).index_fill_(1, torch.tensor([1]), 0.0)),
     ValueError, "temperature"),
    ("temperature-tensor-minus-inf", dict(temperature=torch.full((B, T), -math.inf)), ValueError, "temperature"),
    ("temperature-tensor-inf", dict(temperature=torch.full((B, T), math.inf)), ValueError, "temperature"),
    ("temperature-tensor-negative", dict(temperature=-torch.ones(B, T)), ValueError, "temperature"),
    ("temperature-not-number", dict(temperature="hot"), TypeError, "temperature"),
    ("agg-unknown", dict(loss_agg_mode="seq-sum"), ValueError, "loss_agg_mode"),
    ("ignore-index-float", dict(ignore_index=-100.0), TypeError, "ignore_index"),
    ("ignore-index-beyond-int64", dict(ignore_index=-10**30), ValueError, "ignore_index must lie in int64"),
    ("beta-int-beyond-float", dict(beta=10**400, ref_logprobs=torch.zeros(B, T)), ValueError, "beta must be finite"),
    # the weights 1/normalizer are fp32: a number outside its normal range would vanish or overflow
    ("normalizer-below-fp32", dict(normalizer=1e-50), ValueError, "normalizer must lie in fp32's normal range"),
    ("normalizer-above-fp32", dict(normalizer=1e39), ValueError, "normalizer must lie in fp32's normal range"),
    ("normalizer-shape", dict(normalizer=torch.ones(1)), ValueError, "normalizer must be a number or a 0-d"),
    ("normalizer-bool", dict(normalizer=torch.tensor(True)), TypeError, "normalizer"),
    ("device-mismatch", dict(advantages=torch.zeros(B, device="meta")), ValueError, "advantages"),
] + [
    (f"{name}-{what}", {name: value}, ValueError, name)
    for name in ("c", "k_pos", "lam_pos", "k_neg", "lam_neg")
    for what, value in (("zero", 0.0), ("negative", -1.0), ("nan", math.nan), ("inf", math.inf))
] + [(f"{name}-bool", {name: True}, TypeError, name) for name in ("c", "k_pos")]


@pytest.mark.parametrize("change, error, name", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_naming_argument(change, error, name, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a sweep ran before validation finished")

    monkeypatch.setattr(mhpo_kernels._dispatch, "sweeps", no_kernel)
    with pytest.raises(error, match=name):
        mhpo_kernels.mhpo_loss(**{**good_args(), **change})


@pytest.mark.parametrize("change, error, name", [
    (dict(c=0.0), ValueError, "c"), (dict(temperature=-2.0), ValueError, "temperature"),
    (dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode"), (dict(beta=-1.0), ValueError, "beta"),
], ids=["c", "temperature", "agg", "beta"])
def test_module_checks_at_construction(change, error, name):
    with pytest.raises(error, match=name):
        mhpo_kernels.MHPOLoss(**change)


def test_token_logprobs_checks():
    logits, ids = torch.randn(2, 5, 10), torch.randint(0, 10, (2, 5))
    with pytest.raises(ValueError, match="input_ids"):
        mhpo_kernels.token_logprobs(logits, ids + 10)
    with pytest.raises(ValueError, match="temperature"):
        mhpo_kernels.token_logprobs(logits, ids, temperature=0)
    with pytest.raises(TypeError, match="logits"):
        mhpo_kernels.token_logprobs(logits.double(), ids)


def test_masked_and_ignored_positions_may_hold_anything():
    """Out-of-range ids, NaN logits/old/advantages where invalid: same result as clean inputs."""
    args = good_args()
    args["mask"][1, 2] = False
    args["input_ids"][0, 1] = -100
    args["advantages"] = torch.randn(B, T)
    loss_clean = mhpo_kernels.mhpo_loss(**args)
    dirty = {k: v.clone() for k, v in args.items()}
    for b, t in ((1, 2), (0, 1)):
        dirty["logits"][b, t] = math.nan
        dirty["old_logprobs"][b, t] = math.nan
        dirty["advantages"][b, t] = math.inf
    dirty["input_ids"][1, 2] = 10**9
    assert torch.equal(mhpo_kernels.mhpo_loss(**dirty), loss_clean)
    # A per-token temperature: its values at invalid tokens are never read (NaN, 0, −1 are fine).
    tau = torch.rand(B, T) + 0.5
    loss_tau = mhpo_kernels.mhpo_loss(**args, temperature=tau)
    dirty_tau = tau.clone()
    dirty_tau[1, 2], dirty_tau[0, 1] = math.nan, -1.0
    assert torch.equal(mhpo_kernels.mhpo_loss(**dirty, temperature=dirty_tau), loss_tau)
    assert not torch.equal(loss_tau, loss_clean)


def _no_kernel(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a sweep ran before validation finished")

    monkeypatch.setattr(mhpo_kernels._dispatch, "sweeps", no_kernel)


@pytest.mark.parametrize("call", ["mhpo_loss", "policy_loss", "token_logprobs"])
@pytest.mark.parametrize("view", ["expand", "overlapping-strides"])
def test_inplace_backward_refuses_logits_that_share_memory(call, view, monkeypatch):
    """An expand (stride 0) or a strided view that revisits elements: the in-place backward would
    write each shared element once per row that reads it, so it is refused before any kernel."""
    p = torch.randn(T + 1, V, requires_grad=True)
    if view == "expand":
        x = (p[:T] * 1).expand(B, T, V)
    else:
        x = (p * 1).as_strided((B, T, V), (V, V, 1))  # rows 1..T of sequence 0 are rows 0..T-1 of sequence 1
    args = good_args()
    _no_kernel(monkeypatch)
    with pytest.raises(ValueError, match="inplace_backward.*share memory"):
        if call == "token_logprobs":
            mhpo_kernels.token_logprobs(x, args["input_ids"], inplace_backward=True)
        else:
            getattr(mhpo_kernels, call)(x, args["input_ids"], args["old_logprobs"], args["advantages"],
                                        inplace_backward=True)


def test_inplace_backward_on_a_non_overlapping_view_is_exact():
    """A strided but non-overlapping view (a slice along T, padded rows) is still written in place
    and gives the out-of-place gradient."""
    args = good_args()
    base = torch.randn(B, T + 2, V + 3, requires_grad=True)

    def grad(inplace):
        x = (base * 1)[:, 1:T + 1, :V]
        (g,) = torch.autograd.grad(mhpo_kernels.mhpo_loss(x, args["input_ids"], args["old_logprobs"],
                                                          args["advantages"], inplace_backward=inplace), base)
        return g

    assert torch.equal(grad(True), grad(False))


@pytest.mark.parametrize("triton, error", [
    ("installed", "the Triton backend runs cpu tensors only under Triton's interpreter"),
    ("absent", "the Triton backend needs triton, which is not installed here")])
def test_triton_backend_on_cpu_without_the_interpreter_is_a_clear_error(triton, error):
    """In a fresh process without TRITON_INTERPRET, the kernels are compiled for a GPU: forcing
    them on CPU tensors raises the package's error, not Triton's "0 active drivers"; and so it
    does where Triton is not installed, not an ImportError."""
    import os
    import subprocess
    import sys

    script = ("import sys\nsys.modules['triton'] = None\n" if triton == "absent" else "") + (
              "import torch, mhpo_kernels\n"
              "x = torch.randn(2, 3, 8)\n"
              "with mhpo_kernels.use_backend('triton'):\n"
              "    mhpo_kernels.mhpo_loss(x, torch.randint(0, 8, (2, 3)), None, torch.randn(2))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"RuntimeError: mhpo_kernels: {error}" in done.stderr, done.stderr[-2000:]


def _double_backward_cases():
    args = good_args()
    ids, old, adv = args["input_ids"], args["old_logprobs"], args["advantages"]
    return {
        "mhpo_loss": lambda x: mhpo_kernels.mhpo_loss(x, ids, old, adv),
        "mhpo_loss-inplace": lambda x: mhpo_kernels.mhpo_loss(x * 1, ids, old, adv, inplace_backward=True),
        "token_logprobs-entropy": lambda x: sum(t.sum() for t in mhpo_kernels.token_logprobs(x, ids, return_entropy=True)),
        "fused_linear": lambda x: mhpo_kernels.fused_linear_mhpo_loss(
            x[..., :8], torch.randn(V, 8, generator=torch.Generator().manual_seed(1)), ids, old, adv, chunk_size=4),
    }


@pytest.mark.parametrize("case", list(_double_backward_cases()))
def test_double_backward_is_a_clear_error(case):
    """create_graph=True gives the ordinary gradient; differentiating it again raises an error
    that names the package and says double backward is unsupported."""
    fn = _double_backward_cases()[case]
    x = torch.randn(B, T, V, requires_grad=True)
    (expected,) = torch.autograd.grad(fn(x), x)
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    assert torch.equal(g.detach(), expected)
    with pytest.raises(RuntimeError, match="mhpo_kernels: double backward is not supported"):
        g.pow(2).sum().backward()


@pytest.mark.parametrize("change, error, name", [
    (dict(ignore_index="x"), TypeError, "ignore_index"), (dict(ignore_index=1.0), TypeError, "ignore_index"),
    (dict(inplace_backward="yes"), TypeError, "inplace_backward"),
    (dict(inplace_backward=1), TypeError, "inplace_backward"),
    (dict(tp_group="world"), TypeError, "tp_group"), (dict(k_neg=math.inf), ValueError, "k_neg"),
], ids=["ignore-index-str", "ignore-index-float", "inplace-str", "inplace-int", "tp-group", "k-neg-inf"])
def test_module_checks_every_argument_at_construction(change, error, name):
    with pytest.raises(error, match=name):
        mhpo_kernels.MHPOLoss(**change)


def test_module_takes_hyperparameters_by_keyword_only():
    """MHPOLoss(0.7) would read as a temperature and set c: refused."""
    with pytest.raises(TypeError):
        mhpo_kernels.MHPOLoss(0.7)
    assert mhpo_kernels.MHPOLoss(c=0.7).c == 0.7


@pytest.mark.parametrize("name", ["c", "k_pos", "lam_pos", "k_neg", "lam_neg"])
def test_module_hyperparameters_cannot_be_set_afterwards(name):
    """They are the module's objective's: one set afterwards would show in its repr and never
    reach the loss, so it is refused, and the module keeps its loss."""
    module = mhpo_kernels.MHPOLoss(c=2.0)
    before = repr(module)
    with pytest.raises(AttributeError, match=f"MHPOLoss.{name} is its objective's, fixed at construction"):
        setattr(module, name, 0.3)
    assert repr(module) == before and getattr(module, name) == getattr(module.objective, name)


@pytest.mark.parametrize("logits_dim", [2, 3])
def test_advantage_shapes_mean_the_same_for_2d_and_3d_logits(logits_dim):
    """(B, 1) is one advantage per sequence, like (B,); () and (1,) are one advantage for every
    token, for 2-D and 3-D logits alike: each equals the explicit per-token advantages."""
    args = good_args()
    adv = args.pop("advantages")
    if logits_dim == 2:
        args = dict(logits=args["logits"][0], input_ids=args["input_ids"][0], old_logprobs=args["old_logprobs"][0],
                    mask=args["mask"][0])
    token_shape = args["input_ids"].shape

    def loss(a):
        return mhpo_kernels.mhpo_loss(**args, advantages=a)

    shapes = [adv[0].reshape(()), adv[:1].clone()]
    expanded = [adv[0].expand(token_shape), adv[0].expand(token_shape)]
    if logits_dim == 3:
        shapes.append(adv.reshape(B, 1))
        expanded.append(adv.reshape(B, 1).expand(B, T))
    for a, full in zip(shapes, expanded):
        assert torch.equal(loss(a), loss(full.contiguous())), tuple(a.shape)


def test_gspo_takes_one_advantage_per_sequence_as_b_by_1():
    from mhpo_kernels.objectives import GSPO

    args = good_args()
    adv = args.pop("advantages")
    got = mhpo_kernels.policy_loss(**args, advantages=adv.reshape(B, 1), objective=GSPO())
    assert torch.equal(got, mhpo_kernels.policy_loss(**args, advantages=adv, objective=GSPO()))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_finite_input_raises_no_warning_in_user_code(backend):
    """NaN and inf logits (valid and masked rows) run under warnings as errors: the interpreter's
    floating-point warnings from masked lanes stay inside the package's launches, and the
    caller's warning filters and NumPy error state are what they were."""
    import warnings

    import numpy

    args = good_args()
    args["logits"] = args["logits"].clone().requires_grad_()
    with torch.no_grad():
        args["logits"][0, 1, 3] = math.nan
        args["logits"][1, 0, :] = math.inf
        args["logits"][1, 2, 5] = -math.inf
        args["logits"][0, 2, :] = math.nan      # a whole row: NumPy's all-NaN reductions
    args["mask"][1, 0] = False

    def call():
        with mhpo_kernels.use_backend(backend):
            loss = mhpo_kernels.mhpo_loss(**args, return_metrics=True)[0]
            loss.backward()
            mhpo_kernels.token_logprobs(args["logits"].detach(), args["input_ids"], return_entropy=True)
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call()  # first: imports that install their own filters (sympy's, through torch) happen here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        filters, errstate = list(warnings.filters), numpy.geterr()
        loss = call()
        assert warnings.filters == filters and numpy.geterr() == errstate
    assert torch.isnan(loss)



def test_temperature_errors_on_every_op():
    """The per-token temperature is checked (kind, shape, values at valid tokens) by every public
    function that takes one, before any kernel runs."""
    hidden, weight = torch.randn(B, T, 8), torch.randn(V, 8)
    ids = torch.randint(0, V, (B, T))
    bad = torch.ones(B, T)
    bad[0, 0] = 0.0
    calls = [
        lambda tau: mhpo_kernels.token_logprobs(torch.randn(B, T, V), ids, temperature=tau),
        lambda tau: mhpo_kernels.policy_loss(torch.randn(B, T, V), ids, None, torch.randn(B), temperature=tau),
        lambda tau: mhpo_kernels.MHPOLoss()(torch.randn(B, T, V), ids, None, torch.randn(B), temperature=tau),
        lambda tau: mhpo_kernels.fused_linear_mhpo_loss(hidden, weight, ids, None, torch.randn(B), temperature=tau),
        lambda tau: mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, temperature=tau),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="temperature must be finite and > 0 at valid tokens"):
            call(bad)
        with pytest.raises(ValueError, match="temperature must be a number, a 0-d tensor or a tensor of shape"):
            call(torch.ones(B * T + 1))
        with pytest.raises(TypeError, match="temperature"):
            call(torch.ones(B, T, dtype=torch.int64))
    ids[0, 0] = -100  # the bad τ is now at an ignored token: accepted
    for call in calls:
        call(bad)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_likely_mistakes_are_named(backend):
    """The objective's class for an instance, and per-token losses whose advantages do not
    broadcast: errors that say the mistake, not "got type" or torch's broadcast message."""
    from mhpo_kernels.objectives import PPOClip

    logits, ids = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    with mhpo_kernels.use_backend(backend):
        with pytest.raises(TypeError, match=r"got the class PPOClip: pass PPOClip\(\)"):
            mhpo_kernels.policy_loss(logits, ids, None, torch.randn(2), objective=PPOClip)
    logp = torch.randn(2, 3).requires_grad_()
    with pytest.raises(ValueError, match=r"advantages must have shape \(B,\) = \(2,\), .*\(B, T\) = \(2, 3\).*got \(5,\)"):
        mhpo_kernels.mhpo_token_loss(logp, None, torch.randn(5))
    loss, _, _ = mhpo_kernels.mhpo_token_loss(logp, None, torch.randn(2, 1))   # per sequence: fine
    assert loss.shape == (2, 3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_misaligned_ids_name_the_next_token_convention(backend):
    """The nearest detectable misuse of the next-token shift (logits two positions longer than
    the ids, or ids longer than the logits) says which shapes go together and how (B, T, V)
    logits are read."""
    logits = torch.randn(2, 7, 11)
    with mhpo_kernels.use_backend(backend):
        for ids in (torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)):
            with pytest.raises(ValueError, match=r"seqs\[:, 1:\].*read as already aligned"):
                mhpo_kernels.mhpo_loss(logits, ids, None, torch.ones(2))
            with pytest.raises(ValueError, match=r"seqs\[:, 1:\]"):
                mhpo_kernels.token_logprobs(logits, ids)


@pytest.mark.parametrize("path", ["triton", "torch", "reference"])
@pytest.mark.parametrize("name", ["old_logprobs", "ref_logprobs"])
def test_positive_logprobs_are_refused(path, name):
    """A negative log-likelihood passed where log-probs go (finite values above 0 beyond
    rounding at valid tokens) is refused on every path; values within rounding of 0, values at
    invalid tokens and non-finite values (data, SPEC section 5) are not."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 11, generator=g)
    ids = torch.randint(0, 11, (2, 4), generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    logp = -torch.rand(2, 4, generator=g) - 0.5

    def call(value):
        kw = dict(old_logprobs=logp, ref_logprobs=logp - 0.1, beta=0.1)
        kw[name] = value
        old = kw.pop("old_logprobs")
        if path == "reference":
            return reference.mhpo_loss(logits.double(), ids, old.double(), torch.ones(2, dtype=torch.float64),
                                       mask, **{k: v.double() if isinstance(v, torch.Tensor) else v
                                                for k, v in kw.items()})
        with mhpo_kernels.use_backend(path):
            return mhpo_kernels.mhpo_loss(logits, ids, old, torch.ones(2), mask, **kw)

    with pytest.raises(ValueError, match=f"{name} holds finite values above 0 at valid tokens"):
        call(-logp)                                     # an NLL
    rounding = logp.clone()
    rounding[0, 0] = 1e-3
    invalid = logp.clone()
    invalid[1, 3] = 5.0                                 # a masked token
    non_finite = logp.clone()
    non_finite[0, 1] = float("nan")
    assert torch.isfinite(call(rounding)) and torch.isfinite(call(invalid))
    assert torch.isnan(call(non_finite))
    for value in (float("inf"), float("-inf")):        # not refused: the loss says what they make of it
        infinite = logp.clone()
        infinite[0, 2] = value
        call(infinite)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.uint16, torch.uint32],
                         ids=lambda dtype: str(dtype)[6:])
def test_ids_of_every_integer_dtype_mean_the_same(backend, dtype):
    """Integer ids of any width, unsigned included (a tokenizer's uint16), give the int64 call's
    loss, metrics and gradient bit for bit, and the float64 reference's within fp32 rounding."""
    from _cases import FP32_RTOL
    from conftest import TRITON_DEVICE

    args = {k: v.to(TRITON_DEVICE) for k, v in good_args().items()}
    args["mask"][1, 2] = False
    results = []
    for ids in (args["input_ids"], args["input_ids"].to(dtype)):
        logits = args["logits"].clone().requires_grad_()
        with mhpo_kernels.use_backend(backend):
            loss, metrics = mhpo_kernels.mhpo_loss(**{**args, "logits": logits, "input_ids": ids}, return_metrics=True)
            loss.backward()
            logp = mhpo_kernels.token_logprobs(logits.detach(), ids, mask=args["mask"])
        results.append((loss.detach(), metrics, logits.grad, logp))
    (loss, metrics, grad, logp), (loss_u, metrics_u, grad_u, logp_u) = results
    assert torch.equal(loss, loss_u) and torch.equal(grad, grad_u) and torch.equal(logp, logp_u)
    assert all(torch.equal(metrics[k], metrics_u[k]) for k in metrics)
    x64 = args["logits"].cpu().double()
    loss64 = reference.mhpo_loss(x64, args["input_ids"].cpu(), args["old_logprobs"].cpu().double(),
                                 args["advantages"].cpu().double(), args["mask"].cpu())
    # A mean of terms of size up to about |A|, each within fp32 rounding, which may cancel far below
    # them (random inputs: a loss of 1.8e-4 from terms of 0.5 came out 1.9e-5 off relative to itself).
    scale = max(abs(loss64.item()), args["advantages"].abs().mean().item())
    assert abs(loss_u.item() - loss64.item()) <= FP32_RTOL * scale


@pytest.mark.parametrize("value", ["no", 1, None], ids=["str", "int", "None"])
def test_output_flags_are_bools_on_every_op(value, monkeypatch):
    """A flag that shapes a result (return_metrics, return_entropy, reduce_dhidden) must be a bool,
    as inplace_backward must: "no" meaning True would change what the call returns."""
    def no_kernel(*args, **kwargs):
        raise AssertionError("a sweep ran before validation finished")

    monkeypatch.setattr(mhpo_kernels._dispatch, "sweeps", no_kernel)
    hidden, weight = torch.randn(B, T, 8), torch.randn(V, 8)
    ids = torch.randint(0, V, (B, T))
    calls = {
        "return_metrics": [
            lambda f: mhpo_kernels.mhpo_loss(torch.randn(B, T, V), ids, None, torch.randn(B), return_metrics=f),
            lambda f: mhpo_kernels.policy_loss(torch.randn(B, T, V), ids, None, torch.randn(B), return_metrics=f),
            lambda f: mhpo_kernels.fused_linear_mhpo_loss(hidden, weight, ids, None, torch.randn(B), return_metrics=f),
        ],
        "return_entropy": [
            lambda f: mhpo_kernels.token_logprobs(torch.randn(B, T, V), ids, return_entropy=f),
            lambda f: mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, return_entropy=f),
        ],
        "reduce_dhidden": [
            lambda f: mhpo_kernels.fused_linear_mhpo_loss(hidden, weight, ids, None, torch.randn(B), reduce_dhidden=f),
            lambda f: mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, reduce_dhidden=f),
        ],
    }
    for name, of_name in calls.items():
        for call in of_name:
            with pytest.raises(TypeError, match=f"{name} must be a bool, got"):
                call(value)


def test_a_tensor_on_another_device_names_the_inputs_device():
    """On the fused linear path too, which has hidden states and no logits."""
    hidden, weight, ids = torch.randn(B, T, 8), torch.randn(V, 8), torch.randint(0, V, (B, T))
    calls = [
        lambda old: mhpo_kernels.mhpo_loss(torch.randn(B, T, V), ids, old, torch.randn(B)),
        lambda old: mhpo_kernels.fused_linear_mhpo_loss(hidden, weight, ids, old, torch.randn(B)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="old_logprobs is on meta, but the inputs are on cpu"):
            call(torch.zeros(B, T, device="meta"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_default_device_leaves_the_host_scalars_on_the_host(backend):
    """Under ``with torch.device(...)`` (or torch.set_default_device) the ops' runtime scalars stay
    a host tensor: on the meta device they read as garbage (a loss of 0 or 3.7e30, silently), on
    CUDA they would be a device read per op. Loss, metrics and gradients equal the call outside
    it, on the logits (with a filter, a per-token τ) and on the fused linear path."""
    from conftest import TRITON_DEVICE

    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(2, 4, 16, generator=g, device=TRITON_DEVICE), torch.randint(0, 16, (2, 3), generator=g)
    old, adv = -torch.rand(2, 3, generator=g) - 1, torch.randn(2, generator=g)
    hidden, head = torch.randn(2, 3, 8, generator=g), torch.randn(16, 8, generator=g)
    ids, old, adv, hidden, head = (t.to(TRITON_DEVICE) for t in (ids, old, adv, hidden, head))
    tau = torch.full((2, 3), 0.7, device=TRITON_DEVICE)
    calls = {
        "logits": lambda x, h: mhpo_kernels.mhpo_loss(x, ids, old, adv, top_k=5, temperature=tau,
                                                      return_metrics=True),
        "fused linear": lambda x, h: mhpo_kernels.fused_linear_mhpo_loss(h, head, ids, old, adv, return_metrics=True),
    }
    for name, call in calls.items():
        results = []
        for default in (None, "meta"):
            xx, hh = x.clone().requires_grad_(), hidden.clone().requires_grad_()
            with mhpo_kernels.use_backend(backend), torch.device(default) if default else contextlib.nullcontext():
                loss, metrics = call(xx, hh)
                loss.backward()
            results.append((loss.detach(), metrics, xx.grad if name == "logits" else hh.grad))
        (loss, metrics, grad), (loss_m, metrics_m, grad_m) = results
        assert loss.device == loss_m.device and torch.equal(loss, loss_m), name
        assert all(torch.equal(metrics[k], metrics_m[k]) for k in metrics) and torch.equal(grad, grad_m), name
