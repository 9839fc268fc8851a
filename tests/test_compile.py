"""torch.compile(fullgraph=True) traces a loss computation through the custom ops with no graph
break, and its forward and (AOTAutograd-compiled) backward give the eager result. A fresh inductor
cache, so a warm cache cannot hide a broken registration."""

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import mhpo_kernels
from _cases import FP32_RTOL, SMALL, Regime, make_inputs, max_rel_err


@pytest.fixture(autouse=True)
def fresh_compile_state(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def logits_step(logits, ids, old, adv, mask, ref):
    """With per-token weights of the policy term (a rollout correction's), made in the graph."""
    loss, metrics = mhpo_kernels.mhpo_loss(logits, ids, old, adv, mask, ref_logprobs=ref, beta=0.1,
                                           temperature=0.8, return_metrics=True, token_weights=torch.sigmoid(old))
    return loss, metrics["entropy"], metrics["kl"]


def head_step(hidden, weight, ids, old, adv, mask):
    """A trainer's call: full logits (B, T + 1, V) from a linear head, gradient written in place."""
    logits = hidden @ weight.t()
    return (mhpo_kernels.mhpo_loss(logits, ids[:, 1:], old[:, 1:], adv, mask[:, 1:], normalizer=5.0,
                                   loss_agg_mode="token-mean", inplace_backward=True),)


def one_sweep_step(logits, ids, old, adv, mask, ref):
    """grad_in_forward: the gradient from the forward's launch, handed back scaled."""
    loss, metrics = mhpo_kernels.mhpo_loss(logits, ids, old, adv, mask, ref_logprobs=ref, beta=0.1,
                                           temperature=0.8, return_metrics=True, grad_in_forward=True)
    return loss, metrics["entropy"], metrics["kl"]


def one_sweep_head_step(hidden, weight, ids, old, adv, mask):
    """grad_in_forward in place: the forward overwrites the head's output with its gradient."""
    logits = hidden @ weight.t()
    return (mhpo_kernels.mhpo_loss(logits, ids[:, 1:], old[:, 1:], adv, mask[:, 1:], loss_agg_mode="token-mean",
                                   inplace_backward=True, grad_in_forward=True),)


def linear_step(hidden, weight, ids, old, adv, mask):
    loss, metrics = mhpo_kernels.fused_linear_mhpo_loss(
        hidden, weight, ids, old, adv, mask, chunk_size=5, final_logit_softcap=8.0,
        loss_agg_mode="token-mean", return_metrics=True)
    return loss, metrics["psi"], metrics["entropy"]


def linear_logprobs_step(hidden, weight, ids, old, adv, mask):
    """The differentiable fused (log-prob, entropy) with a per-token temperature, as an RL hook
    calls it: both outputs in the loss."""
    tau = torch.sigmoid(old) + 0.5
    logp, ent = mhpo_kernels.fused_linear_token_logprobs(
        hidden, weight, ids.masked_fill(~mask, -100), temperature=tau, return_entropy=True, chunk_size=5,
        final_logit_softcap=8.0)
    return (logp * adv[:, None]).sum() + 0.1 * ent.sum(), ent.mean()


def replayed_step(logits, ids, old, adv, mask, ref):
    """A replayed kept set, made in the graph: on every other token its target and two more ids."""
    flat = ids.reshape(-1).clamp(min=0)
    kept = torch.stack([flat, (flat + 1) % logits.shape[-1], (flat + 7) % logits.shape[-1]], 1)[::2]
    counts = (torch.arange(flat.numel()) % 2 == 0).long() * 3
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    loss, metrics = mhpo_kernels.mhpo_loss(logits, ids, old, adv, mask, ref_logprobs=ref, beta=0.1, temperature=0.8,
                                           return_metrics=True, entropy_coef=0.01, kept_ids=(offsets, kept.reshape(-1)))
    return loss, metrics["entropy"], metrics["outside_support"]


def linear_truncated_step(hidden, weight, ids, old, adv, mask):
    """The fused linear loss over the sampler's filtered softmax."""
    loss, metrics = mhpo_kernels.fused_linear_mhpo_loss(
        hidden, weight, ids, old, adv, mask, chunk_size=5, min_p=0.01, top_p=0.9, return_metrics=True)
    return loss, metrics["entropy"], metrics["outside_support"]


# Steps whose custom ops the other steps already take through inductor, and whose own glue is
# plain ATen (the kept set's checks: a sort, a searchsorted; the truncated loss's O(N) epilogue):
# dynamo and AOT autograd (the graph, the fake implementations, the partitioned backward) without
# inductor's C++ code generation, most of a compile's time on a CPU.
BACKENDS = {replayed_step: "aot_eager", linear_truncated_step: "aot_eager"}


def _logits_args():
    logits, kw = make_inputs(SMALL, Regime("compile", kl=True, garbage=False))
    return logits.requires_grad_(), kw["input_ids"], kw["old_logprobs"], kw["advantages"], kw["mask"], kw["ref_logprobs"]


def _linear_args():
    g = torch.Generator().manual_seed(4)
    B, T, H, V = 2, 6, 32, 700
    return (torch.randn(B, T, H, generator=g).requires_grad_(), (torch.randn(V, H, generator=g) * 0.3).requires_grad_(),
            torch.randint(0, V, (B, T), generator=g), torch.randn(B, T, generator=g) - 6, torch.randn(B, generator=g),
            torch.rand(B, T, generator=g) > 0.2)


def _fresh(args):
    return [a.detach().clone().requires_grad_() if a.requires_grad else a for a in args]


@pytest.mark.parametrize("step, make_args", [(logits_step, _logits_args), (head_step, _linear_args),
                                             (linear_step, _linear_args), (one_sweep_step, _logits_args),
                                             (one_sweep_head_step, _linear_args)],
                         ids=["mhpo_loss", "full-logits-inplace", "fused_linear_mhpo_loss", "grad-in-forward",
                              "grad-in-forward-inplace"])
def test_no_graph_breaks(step, make_args):
    explanation = torch._dynamo.explain(step)(*make_args())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("step, make_args", [(logits_step, _logits_args), (head_step, _linear_args),
                                             (linear_step, _linear_args), (linear_logprobs_step, _linear_args),
                                             (one_sweep_step, _logits_args), (one_sweep_head_step, _linear_args),
                                             (replayed_step, _logits_args), (linear_truncated_step, _linear_args)],
                         ids=["mhpo_loss", "full-logits-inplace", "fused_linear_mhpo_loss",
                              "fused_linear_token_logprobs", "grad-in-forward", "grad-in-forward-inplace",
                              "kept-ids", "fused-linear-top-p"])
def test_compiled_step_equals_eager(step, make_args):
    args = make_args()
    eager_args, compiled_args = _fresh(args), _fresh(args)
    expected = step(*eager_args)
    got = torch.compile(step, fullgraph=True, backend=BACKENDS.get(step, "inductor"))(*compiled_args)
    (expected[0] * 1.3).backward()
    (got[0] * 1.3).backward()
    for e, c in zip(expected, got):
        assert c.item() == pytest.approx(e.item(), rel=FP32_RTOL)
    for e, c in zip(eager_args, compiled_args):
        if e.requires_grad:
            assert max_rel_err(c.grad, e.grad) <= FP32_RTOL


def _objectives():
    from mhpo_kernels.objectives import CISPO, GPG, GSPO, MHPO, SAPO, PPOClip

    return {"mhpo": MHPO(), "mhpo-no-lfm": MHPO(lfm=False), "mhpo-no-dhp": MHPO(c=1.2, dhp=False),
            "ppo-clip-dual": PPOClip(eps_low=0.2, eps_high=0.28, dual_clip=3.0),
            "cispo": CISPO(max_ratio=1.3, min_ratio=0.7), "sapo": SAPO(tau_pos=1.0, tau_neg=1.05), "gpg": GPG(),
            "gspo": GSPO(eps_low=0.05, eps_high=0.08)}


def every_objective_step(logits, ids, old, adv, mask):
    """Every objective in one graph (one compilation for all), each on its own logits leaf."""
    return tuple(mhpo_kernels.policy_loss(x, ids, old, adv, mask, objective=objective, temperature=0.9)
                 for x, objective in zip(logits, _objectives().values()))


def test_every_objective_compiles_and_equals_eager():
    """policy_loss with each objective, GSPO's sequence-advantage check included, traces into
    one graph with fullgraph=True; losses and gradients equal eager's. Dynamo and AOT autograd:
    the objectives differ inside the custom ops, whose glue logits_step takes through inductor."""
    g = torch.Generator().manual_seed(6)
    B, T, V = 2, 3, 40
    base = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    old = torch.randn(B, T, generator=g) - 3.5
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    n = len(_objectives())
    eager_x = [base.clone().requires_grad_() for _ in range(n)]
    compiled_x = [base.clone().requires_grad_() for _ in range(n)]
    expected = every_objective_step(eager_x, ids, old, adv, mask)
    got = torch.compile(every_objective_step, fullgraph=True, backend="aot_eager")(compiled_x, ids, old, adv, mask)
    sum(expected).backward()
    sum(got).backward()
    for name, e, c, ex, cx in zip(_objectives(), expected, got, eager_x, compiled_x):
        assert c.item() == pytest.approx(e.item(), rel=FP32_RTOL), name
        assert ex.grad.abs().sum() > 0, name
        assert max_rel_err(cx.grad, ex.grad) <= FP32_RTOL, name


def test_custom_ops_registered():
    for name in ("sweeps_forward", "sweeps_backward", "sweeps_forward_grad_", "scale_rows_", "fused_linear_forward",
                 "fused_linear_logprobs", "fused_linear_logprobs_backward"):
        assert hasattr(torch.ops.mhpo_kernels, name)


@pytest.mark.parametrize("config", ["logits-all", "logits-minimal", "logits-shifted-inplace", "logits-shifted-tau",
                                    "logits-truncated-loss", "logits-shifted-truncated", "logits-shifted-replayed",
                                    "logits-grad-in-forward", "logits-shifted-grad-in-forward",
                                    "linear-all", "linear-head-only-bf16", "linear-logprobs-tau"])
def test_opcheck(config):
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration agree
    with what the ops really do, in the configurations the public functions use."""
    from mhpo_kernels import linear_ops, ops

    g = torch.Generator().manual_seed(5)
    from mhpo_kernels._sweep_types import LogitMap, mhpo_token_params

    params = ops.pack_params(mhpo_token_params(beta=0.1), LogitMap.make(0.9))
    if config.startswith("logits"):
        shifted = config.startswith("logits-shifted")
        x = torch.randn(2, 4 if shifted else 3, 200, generator=g).requires_grad_()
        ids = torch.randint(0, 200, (6,), generator=g, dtype=torch.int32)
        ids[4] = -1
        full = config != "logits-minimal"
        tau = torch.rand(6, generator=g) + 0.5 if config == "logits-shifted-tau" else None
        vec = [torch.randn(6, generator=g) for _ in range(4)]
        args = (x, ids, vec[0] if full else None, vec[1] if full else None, vec[2] if full else None,
                vec[3] if full else None, tau, params, False, full, full, shifted, False)
        if config.endswith("grad-in-forward"):  # the flag, and the in-place forward and row scaling
            # All but the AOT dispatch check, which returns every output from one joint graph: the
            # gradient buffer is then both a graph output and what the backward scales in place,
            # which AOT's partitioner rejects ("was invalid, but is output"). The compiled steps
            # with grad_in_forward above go through AOT autograd as a training step does.
            torch.library.opcheck(ops.sweeps_forward, args + (None, True),
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
            fwd_args = (x.detach().clone(),) + args[1:8] + (False, full, shifted)
            torch.library.opcheck(ops.sweeps_forward_grad_, fwd_args)
            torch.library.opcheck(ops.scale_rows_, (x.detach().clone(), ids, torch.tensor(2.5), params, shifted))
            return
        truncated = "truncated" in config
        kwargs = dict(min_p=torch.tensor([0.05, 0.0, 0.2, 0.05, 0.1, 1.0]), top_k=torch.tensor([5, 0, 1, 300, 9, 3], dtype=torch.int32),
                      top_p=torch.tensor([0.9, 1.0, 0.5, 0.3, 1.0, 0.05])) if truncated else {}
        if config == "logits-truncated-loss":  # the loss's second prepare launch: its sequences and aggregation
            kwargs.update(cu=torch.tensor([0, 2, 6]), totals=1, agg=0, normalizer=torch.tensor(3.0))
        elif truncated or config == "logits-shifted-replayed":
            args = (x, ids, None, None, None, None, tau, params, False, True, False, shifted, False)
        replayed = dict(kept_offsets=torch.tensor([0, 3, 3, 4, 6, 6, 8]),
                        kept_ids=torch.tensor([1, 7, 9, 4, 0, 199, 5, 6], dtype=torch.int32))
        if config == "logits-shifted-replayed":  # rows 0, 2, 3 and 5 replayed (4 is no token)
            kwargs = replayed
        torch.library.opcheck(ops.sweeps_forward, args, kwargs)
        if shifted:  # the backward ops themselves, out of place and in place
            stats = ops.SweepsOut(*(s.detach() for s in ops.sweeps_forward(*args, **kwargs)))
            bwd_args = (x.detach().clone(), ids, stats.lse2_base, stats.lse2_rest, torch.randn(6, generator=g),
                        stats.entropy, torch.randn(6, generator=g), tau, params, False, True,
                        stats.cut if truncated else None)
            bwd_kwargs = replayed if config == "logits-shifted-replayed" else {}
            torch.library.opcheck(ops.sweeps_backward, bwd_args, bwd_kwargs)
            torch.library.opcheck(ops.sweeps_backward_, bwd_args, bwd_kwargs)
    elif config == "linear-logprobs-tau":
        h = torch.randn(6, 16, generator=g).requires_grad_()
        w = (torch.randn(50, 16, generator=g) * 0.3).requires_grad_()
        b = torch.randn(50, generator=g).requires_grad_()
        ids = torch.randint(0, 50, (6,), generator=g, dtype=torch.int32)
        ids[2] = -1
        tau = torch.rand(6, generator=g) + 0.5
        args = (h, w, b, ids, tau, params, True, 4, True)
        torch.library.opcheck(linear_ops.fused_linear_logprobs, args)
        _, ent, base, lse2_rest, _ = (s.detach() for s in linear_ops.fused_linear_logprobs(*args))
        bwd_args = (h.detach(), w.detach(), b.detach(), ids, tau, base, lse2_rest, ent, torch.randn(6, generator=g),
                    torch.randn(6, generator=g), params, True, 4, True, True, True)
        torch.library.opcheck(linear_ops.fused_linear_logprobs_backward, bwd_args)
    else:
        dtype = torch.float32 if config == "linear-all" else torch.bfloat16
        h = torch.randn(6, 16, generator=g).to(dtype)
        w = (torch.randn(50, 16, generator=g) * 0.3).to(dtype).requires_grad_()
        need_dh = config == "linear-all"
        h.requires_grad_(need_dh)
        ids = torch.randint(0, 50, (6,), generator=g, dtype=torch.int32)
        args = (h, w, None, ids, None, torch.randn(6, generator=g), torch.full((6,), 1 / 6), None, None, params,
                True, 4, True, need_dh, True, False)
        torch.library.opcheck(linear_ops.fused_linear_forward, args)


def test_new_temperature_tensor_does_not_recompile():
    """A per-token temperature is data: a compiled step called with new τ values (and a different
    scalar τ in a second compiled function's place) reuses the graph: one frame, no recompile."""
    logits, kw = make_inputs(SMALL, Regime("compile-tau", garbage=False))
    ids, old, adv, mask = kw["input_ids"], kw["old_logprobs"], kw["advantages"], kw["mask"]
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(x, tau):
        return mhpo_kernels.mhpo_loss(x, ids, old, adv, mask, temperature=tau)

    g = torch.Generator().manual_seed(6)
    results = []
    for _ in range(3):
        tau = torch.rand(ids.shape, generator=g) * 1.7 + 0.3
        x = logits.detach().clone().requires_grad_()
        loss = step(x, tau)
        loss.backward()
        expected = mhpo_kernels.mhpo_loss(logits, ids, old, adv, mask, temperature=tau)
        results.append((loss.item(), expected.item()))
    assert counter.frame_count == 1, counter.frame_count
    for got, expected in results:
        assert got == pytest.approx(expected, rel=FP32_RTOL)
    assert len({round(e, 9) for _, e in results}) == 3  # the τ values did change the loss


VALUES = [(1.0, 0.1, 0.01, 3.0), (0.7, 0.2, 0.02, 4.0), (1.3, 0.05, 0.03, 5.0), (0.9, 0.3, 0.5, 7.0)]


def _hyper_calls():
    """Each public form with every hyperparameter that may change between calls as an argument:
    temperature τ, β, entropy_coef, a float normalizer, the sampler's filters (token_logprobs and
    the module: τ), on the logits and on the fused linear path."""
    from mhpo_kernels.objectives import PPOClip

    def mhpo(x, i, tau, beta, ec, norm):
        return mhpo_kernels.mhpo_loss(x, i["ids"], i["old"], i["adv"], i["mask"], temperature=tau, beta=beta,
                                      ref_logprobs=i["ref"], entropy_coef=ec, normalizer=norm, return_metrics=True)[0]

    def policy(x, i, tau, beta, ec, norm):
        return mhpo_kernels.policy_loss(x, i["ids"], i["old"], i["adv"], i["mask"], objective=PPOClip(),
                                        temperature=tau, beta=beta, ref_logprobs=i["ref"], entropy_coef=ec,
                                        normalizer=norm, loss_agg_mode="token-mean")

    def logprobs(x, i, tau, *_):
        logp, entropy = mhpo_kernels.token_logprobs(x, i["ids"], temperature=tau, return_entropy=True)
        return logp.sum() + entropy.sum()

    def mhpo_truncated(x, i, tau, beta, ec, norm):
        return mhpo_kernels.mhpo_loss(x, i["ids"], i["old"], i["adv"], i["mask"], temperature=tau, min_p=beta / 10,
                                      top_p=0.6 + beta, entropy_coef=ec, normalizer=norm, return_metrics=True)[0]

    def logprobs_truncated(x, i, tau, beta, *_):
        logp, entropy = mhpo_kernels.token_logprobs(x, i["ids"], temperature=tau, return_entropy=True, min_p=beta,
                                                    top_k=10, top_p=0.6 + beta)
        return torch.where(logp.isinf(), 0.0, logp).sum() + entropy.sum()

    module = mhpo_kernels.MHPOLoss(beta=0.1)

    def module_forward(x, i, tau, *_):
        return module(x, i["ids"], i["old"], i["adv"], i["mask"], ref_logprobs=i["ref"], temperature=tau)

    head = torch.randn(24, 24, generator=torch.Generator().manual_seed(11)) * 0.3

    def fused_linear(x, i, tau, beta, ec, norm):  # the logits' tensor as hidden states (H = V)
        return mhpo_kernels.fused_linear_mhpo_loss(x[:, :-1], head, i["ids"], i["old"], i["adv"], i["mask"],
                                                   temperature=tau, beta=beta, ref_logprobs=i["ref"],
                                                   entropy_coef=ec, normalizer=norm)

    return [mhpo, policy, logprobs, logprobs_truncated, mhpo_truncated, module_forward, fused_linear]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("call", _hyper_calls(), ids=lambda c: c.__name__)
def test_new_hyperparameter_values_compile_at_most_twice(call, backend):
    """A new τ, β, entropy_coef or normalizer under torch.compile(fullgraph=True): dynamo compiles
    the first values as constants, then once with them as graph inputs, and never again (they
    reach the ops as a host tensor, and their checks are asserts on it); each call equals eager."""
    g = torch.Generator().manual_seed(8)
    B, T, V = 2, 3, 24
    i = dict(ids=torch.randint(0, V, (B, T), generator=g), mask=torch.ones(B, T, dtype=torch.bool),
             old=torch.randn(B, T, generator=g) - 3, ref=torch.randn(B, T, generator=g) - 3,
             adv=torch.randn(B, generator=g))
    logits = torch.randn(B, T + 1, V, generator=g) * 2
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(call, backend=counter, fullgraph=True)
    losses = set()
    with mhpo_kernels.use_backend(backend):
        for values in VALUES:
            x, e = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            got, expected = compiled(x, i, *values), call(e, i, *values)
            got.backward()
            expected.backward()
            assert max_rel_err(got.detach(), expected.detach()) <= FP32_RTOL
            assert max_rel_err(x.grad, e.grad) <= FP32_RTOL
            losses.add(round(expected.item(), 6))
    assert counter.frame_count <= 2, counter.frame_count
    assert len(losses) == len(VALUES)   # the values did change the result


def _length_calls():
    """Calls whose batch length varies from step to step, as RL's does: a padded batch with the
    shift, a packed stream of GSPO sequences, the fused linear path."""
    from mhpo_kernels.objectives import GSPO

    def padded(i):
        return mhpo_kernels.mhpo_loss(i["x"], i["ids"], i["old"], i["adv"], i["mask"])

    def packed(i):
        n = i["ids"].numel()
        cu = torch.tensor([0, n // 2, n])
        return mhpo_kernels.policy_loss(i["x"][:, :-1].reshape(n, -1), i["ids"].reshape(-1), i["old"].reshape(-1),
                                        i["adv"], objective=GSPO(), cu_seqlens=cu)

    def linear(i):
        return mhpo_kernels.fused_linear_mhpo_loss(i["x"][:, :-1, :8], i["head"], i["ids"], i["old"], i["adv"],
                                                   i["mask"])

    return [padded, packed, linear]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("call", _length_calls(), ids=lambda c: c.__name__)
def test_new_batch_lengths_compile_at_most_twice(call, backend):
    """A new length T under torch.compile(fullgraph=True): dynamo compiles the first as a constant,
    then once with the sizes symbolic, and never again (no check may specialize on a size: the
    value checks' messages name N, the number of tokens, only when eager); each call equals eager."""
    g = torch.Generator().manual_seed(9)
    B, V = 2, 24
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(call, backend=counter, fullgraph=True)
    with mhpo_kernels.use_backend(backend):
        for T in (3, 4, 5, 7):
            i = dict(x=torch.randn(B, T + 1, V, generator=g), ids=torch.randint(0, V, (B, T), generator=g),
                     old=-torch.rand(B, T, generator=g) - 1, adv=torch.randn(2, generator=g),
                     mask=torch.rand(B, T, generator=g) > 0.2, head=torch.randn(V, 8, generator=g))
            got, expected = compiled(i), call(i)
            assert max_rel_err(got.detach(), expected.detach()) <= FP32_RTOL, T
    assert counter.frame_count <= 2, counter.frame_count


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_new_objective_hyperparameters_compile_under_fullgraph(backend):
    """The objective's own values (mhpo_loss's c, a PPOClip built in the step with a new ε) compile
    once more and never again, as τ and β do (docs/compile.md), rather than failing the fullgraph
    trace (their finiteness check called math.isfinite, which dynamo cannot trace on a symbolic
    number), and each call equals eager."""
    from mhpo_kernels.objectives import PPOClip

    g = torch.Generator().manual_seed(10)
    B, T, V = 2, 3, 24
    x, ids = torch.randn(B, T + 1, V, generator=g), torch.randint(0, V, (B, T), generator=g)
    old, adv = -torch.rand(B, T, generator=g) - 1, torch.randn(B, generator=g)

    def mhpo(c):
        return mhpo_kernels.mhpo_loss(x, ids, old, adv, c=c)

    def ppo(eps):
        return mhpo_kernels.policy_loss(x, ids, old, adv, objective=PPOClip(eps_low=eps, eps_high=eps))

    with mhpo_kernels.use_backend(backend):
        for call, values in ((mhpo, (1.5, 1.2, 0.9)), (ppo, (0.2, 0.1, 0.05))):
            torch._dynamo.reset()
            counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
            compiled = torch.compile(call, backend=counter, fullgraph=True)
            results = [(compiled(v).item(), call(v).item()) for v in values]
            assert all(got == pytest.approx(want, rel=FP32_RTOL) for got, want in results), results
            assert len({round(want, 7) for _, want in results}) == len(values)
            assert counter.frame_count <= 2, (call.__name__, counter.frame_count)


def test_bad_values_inside_compile_raise_the_packages_message():
    """Inside torch.compile(fullgraph=True), a bad objective value (c ≤ 0, a NaN ε, CISPO's
    min_ratio above max_ratio) or a NaN min_p or top_p raises the package's message, an assertion
    of the graph, both as the first call's constant and once the value is symbolic; not dynamo's
    own error (its check formatted the value, which dynamo cannot trace)."""
    from mhpo_kernels.objectives import CISPO, PPOClip

    g = torch.Generator().manual_seed(11)
    B, T, V = 2, 3, 24
    x, ids = torch.randn(B, T + 1, V, generator=g), torch.randint(0, V, (B, T), generator=g)
    old, adv = -torch.rand(B, T, generator=g) - 1, torch.randn(B, generator=g)
    nan = float("nan")
    calls = {
        "c must be finite and > 0": (lambda v: mhpo_kernels.mhpo_loss(x, ids, old, adv, c=v), (1.5, 1.2, -1.0)),
        "PPOClip.eps_low must be finite": (
            lambda v: mhpo_kernels.policy_loss(x, ids, old, adv, objective=PPOClip(eps_low=v)), (0.2, 0.1, nan)),
        "CISPO.min_ratio must be <= max_ratio": (
            lambda v: mhpo_kernels.policy_loss(x, ids, old, adv, objective=CISPO(max_ratio=2.0, min_ratio=v)),
            (0.5, 0.8, 3.0)),
        "min_p must lie in": (lambda v: mhpo_kernels.token_logprobs(x, ids, min_p=v), (0.1, 0.2, nan)),
        "top_p must be > 0": (lambda v: mhpo_kernels.token_logprobs(x, ids, top_p=v), (0.9, 0.8, nan)),
    }
    with mhpo_kernels.use_backend("torch"):
        for message, (call, values) in calls.items():
            for bad_at in (0, 2):   # the first call's constant; a value symbolic by then
                torch._dynamo.reset()
                compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
                for v in values[:bad_at]:
                    compiled(v)
                with pytest.raises(RuntimeError, match=message) as raised:
                    compiled(values[2])
                assert not isinstance(raised.value, torch._dynamo.exc.TorchDynamoException), (message, bad_at)
