"""Replay (SPEC.md, section 9): the sampler's kept set handed over as CSR ``kept_ids=(offsets,
ids)``; log-probs, entropy, gradients and losses on the Triton kernels and the PyTorch path
against the float64 reference, which builds the kept set as a mask.

The kept set is given, so no value sits near a cutoff: random logits are enough, and fp32's error
is that of a softmax over the kept logits (FP32_RTOL). The inputs hold what replay must get
right: empty rows (not truncated), sets longer than the kernel's step of 128 ids, a target outside
its set, NaN logits outside a set (never read) and a −inf logit inside one."""

import math

import pytest
import torch

import mhpo_kernels
import reference
from _cases import FP32_RTOL
from test_truncation import _close, _loss_and_grad, _loss_inputs, _run, _same_loss, head_grads

BACKENDS = ["triton", "torch"]
SIZES = (5, 0, 150, 1, 40, 0)  # kept ids per row, in turn: 0 is an untruncated row


def _kept_sets(ids, V, seed, outside_every=4):
    """CSR kept sets over the rows of ``ids`` (flat order): sizes from SIZES, the target inside
    the set but on every ``outside_every``-th truncated row."""
    g = torch.Generator().manual_seed(seed)
    flat = ids.reshape(-1).tolist()
    offsets, kept, truncated = [0], [], 0
    for r, y in enumerate(flat):
        n = SIZES[r % len(SIZES)]
        if n:
            row = [v for v in torch.randperm(V, generator=g).tolist() if v != y][:n]
            truncated += 1
            if truncated % outside_every:
                row[-1] = y
            kept += row
        offsets.append(len(kept))
    return torch.tensor(offsets), torch.tensor(kept)


def _logits(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "shifted", "flat"])
def test_logprobs_entropy_and_gradient(backend, layout):
    B, T, V = 2, 6, 300
    tokens = _logits((B, T, V), seed=1)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    offsets, kept = _kept_sets(ids, V, seed=3)
    outside = torch.zeros(B * T, V, dtype=torch.bool)   # of a truncated row's set
    for r in range(B * T):
        if offsets[r + 1] > offsets[r]:
            outside[r] = True
            outside[r, kept[offsets[r]:offsets[r + 1]]] = False
    outside = outside.reshape(B, T, V)
    tokens.masked_fill_(outside & (torch.arange(V) % 7 == 0), float("nan"))   # never read
    tokens.view(B * T, V)[2, kept[offsets[2]]] = float("-inf")                # inside a set: p = 0
    x = torch.cat([tokens, _logits((B, 1, V), seed=5)], 1) if layout == "shifted" else tokens
    kw = dict(kept_ids=(offsets, kept))
    if layout == "padded":
        kw["temperature"] = torch.rand(B, T, generator=torch.Generator().manual_seed(4)) + 0.5
    if layout == "flat":
        x, ids = x.reshape(B * T, V), ids.reshape(-1)
    upstream = torch.linspace(-1.0, 2.0, ids.numel()).reshape(ids.shape)
    with mhpo_kernels.use_backend(backend):
        logp, ent, grad = _run(mhpo_kernels.token_logprobs, x, ids, upstream, **kw)
    want_logp, want_ent, want_grad = _run(reference.token_logprobs, x.double(), ids, upstream.double(), **kw)
    assert logp.isinf().any() and not logp.isnan().any(), "some target outside its set, and no NaN read"
    _close(logp, want_logp)
    _close(ent, want_ent)
    _close(grad, want_grad)
    grad_tokens = grad[:, :T] if layout == "shifted" else grad.reshape(B, T, V)
    assert not grad_tokens[outside].any(), "zero outside the kept sets"


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaying_the_filters_kept_set_is_filtering(backend):
    """The kept set top_k and top_p make, replayed, gives the filters' own results (to fp32), and
    in place the same gradient bits as out of place."""
    B, T, V = 2, 3, 300
    x = (torch.randint(-48, 48, (B, T, V), generator=torch.Generator().manual_seed(5)) / 8.0)
    ids = x.argmax(-1)
    keep = reference.kept_set(x.double(), top_k=20, top_p=0.9).reshape(B * T, V)
    kept = keep.nonzero()
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(-1).cumsum(0)])
    upstream = torch.linspace(-1.0, 2.0, ids.numel()).reshape(ids.shape)
    with mhpo_kernels.use_backend(backend):
        replayed = _run(mhpo_kernels.token_logprobs, x, ids, upstream, kept_ids=(offsets, kept[:, 1]))
        filtered = _run(mhpo_kernels.token_logprobs, x, ids, upstream, top_k=20, top_p=0.9)
        in_place = x.clone().requires_grad_()
        logp, ent = mhpo_kernels.token_logprobs(in_place * 1, ids, return_entropy=True, inplace_backward=True,
                                                kept_ids=(offsets, kept[:, 1]))
        (logp * upstream + 0.5 * ent).sum().backward()
    for got, want in zip(replayed, filtered):
        _close(got, want.double())
    assert torch.equal(in_place.grad, replayed[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective, agg", [("mhpo", "seq-mean-token-mean"), ("mhpo", "token-mean"),
                                            ("mhpo", "seq-mean-token-sum"), ("ppo-clip", "token-mean"),
                                            ("gspo", "seq-mean-token-mean")])
def test_losses_leave_out_targets_outside_the_kept_set(backend, objective, agg):
    """Every aggregation mode, with β, the entropy bonus and an old log-prob of −inf at a target
    inside its set: the loss, its gradient and ``outside_support`` equal the reference's."""
    c = _loss_inputs(seed=21)
    ids = c["ids"]
    offsets, kept = _kept_sets(ids, c["x"].shape[-1], seed=22, outside_every=3)
    objectives = dict(mhpo=None, gspo=mhpo_kernels.objectives.GSPO(),
                      **{"ppo-clip": mhpo_kernels.objectives.PPOClip(eps_low=0.2, eps_high=0.28)})
    adv = c["adv"] if objective == "gspo" else c["adv"][:, None] * torch.linspace(0.5, 1.5, ids.shape[1])
    kw = dict(loss_agg_mode=agg, beta=0.05, entropy_coef=0.01, kept_ids=(offsets, kept))
    args = (ids, c["old"], adv, c["mask"])
    with mhpo_kernels.use_backend(backend):
        got = _loss_and_grad(mhpo_kernels.policy_loss, c["x"], *args, ref_logprobs=c["ref"],
                             objective=objectives[objective] or mhpo_kernels.objectives.MHPO(), **kw)
    want = _loss_and_grad(reference.mhpo_loss, c["x"].double(), ids, c["old"].double(), adv.double(), c["mask"],
                          ref_logprobs=c["ref"].double(), objective=objectives[objective], **kw)
    assert 0 < want[1]["outside_support"].item() < 0.5
    _same_loss(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_minus_inf_target_inside_its_kept_set_is_outside(backend):
    """−inf logits are outside every kept set, a replayed one too (SPEC.md, section 9): a target
    listed in its row's set whose logit is −inf leaves the loss like one outside the set (counted
    in ``outside_support``); in an empty row, which is not truncated, it stays, with log-prob −inf."""
    V = 16
    x = _logits((1, 4, V), seed=31)
    ids = torch.tensor([[0, 1, 2, 3]])
    x[0, 1, 1] = x[0, 3, 3] = -math.inf             # row 1: inside its set; row 3: an empty row
    offsets, kept = torch.tensor([0, 2, 5, 7, 7]), torch.tensor([0, 5, 1, 2, 3, 2, 9])
    old = torch.tensor([[-1.0, -2.0, -1.5, -0.5]])
    adv = torch.tensor([[1.0, -1.0, 0.5, 2.0]])
    kw = dict(loss_agg_mode="token-mean", kept_ids=(offsets, kept))
    with mhpo_kernels.use_backend(backend):
        got = _loss_and_grad(mhpo_kernels.mhpo_loss, x, ids, old, adv, **kw)
    want = _loss_and_grad(reference.mhpo_loss, x.double(), ids, old.double(), adv.double(), **kw)
    assert want[1]["outside_support"].item() == 0.25
    _same_loss(got, want)
    # Its log-prob (−inf) passes no gradient, whatever the upstream one (here 1 at every token).
    grads = []
    for fn, z in ((mhpo_kernels.token_logprobs, x), (reference.token_logprobs, x.double())):
        z = z.clone().requires_grad_()
        with mhpo_kernels.use_backend(backend):
            fn(z, ids, kept_ids=(offsets, kept)).backward(torch.ones(ids.shape, dtype=z.dtype))
        grads.append(z.grad)
    assert not grads[0][0, 1].any() and grads[0][0, 3].any()
    _close(*grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_stream_through_the_module(backend):
    """A packed stream with kept sets, through MHPOLoss.forward, equals the reference. Row 1 has
    no set and its target's logit is −inf: its log-prob −inf is data there (SPEC.md, section 5),
    the token stays in the loss."""
    c = _loss_inputs(seed=23)
    keep = c["mask"].reshape(-1)
    x, ids = c["x"].reshape(-1, c["x"].shape[-1])[keep].clone(), c["ids"].reshape(-1)[keep]
    old = c["old"].reshape(-1)[keep]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), c["mask"].sum(-1).cumsum(0)])
    kept_ids = _kept_sets(ids, x.shape[-1], seed=24)
    assert SIZES[1] == 0
    x[1, ids[1]] = -math.inf
    module = mhpo_kernels.MHPOLoss(loss_agg_mode="token-mean")
    with mhpo_kernels.use_backend(backend):
        got = _loss_and_grad(module, x, ids, old, c["adv"], cu_seqlens=cu, kept_ids=kept_ids)
    _same_loss(got, _loss_and_grad(reference.mhpo_loss, x.double(), ids, old.double(), c["adv"].double(),
                                   cu_seqlens=cu, loss_agg_mode="token-mean", kept_ids=kept_ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_kept_sets_are_refused(backend):
    """Each check of a kept set, in the prepare launch of either path, raises its message."""
    c = _loss_inputs(seed=25)
    ids, N, V = c["ids"], c["ids"].numel(), c["x"].shape[-1]
    offsets, kept = _kept_sets(ids, V, seed=26)
    twice = kept.clone()
    twice[1] = twice[0]
    # Id 0 twice in the first row with two ids (its keys sort first), an id twice in the last.
    twice_first, twice_last = kept.clone(), kept.clone()
    pairs = [r for r in range(N) if offsets[r + 1] - offsets[r] >= 2]
    twice_first[offsets[pairs[0]]:offsets[pairs[0]] + 2] = 0
    twice_last[offsets[pairs[-1] + 1] - 1] = twice_last[offsets[pairs[-1]]]
    at_v, below_0 = kept.clone(), kept.clone()
    at_v[-1], below_0[0] = V, -1
    cases = [
        (TypeError, "pair", kept),
        (ValueError, rf"shape \({N + 1},\)", (offsets[:-1], kept)),
        (ValueError, "start at 0, be non-decreasing", (offsets.flip(0), kept)),
        (ValueError, "end at the number of ids", (offsets, kept[:-1])),
        (ValueError, r"outside \[0, V\)", (offsets, kept + V)),
        (ValueError, "an id twice", (offsets, twice)),
        (ValueError, "an id twice", (offsets, twice_first)),
        (ValueError, "an id twice", (offsets, twice_last)),
        (ValueError, r"outside \[0, V\)", (offsets, at_v)),
        (ValueError, r"outside \[0, V\)", (offsets, below_0)),
        (TypeError, "integer tensor", (offsets.float(), kept)),
        (ValueError, "must be off with it", (offsets, kept), dict(top_k=5)),
        (ValueError, "nor kept_ids", (offsets, kept), dict(grad_in_forward=True)),
        (NotImplementedError, "seq_valid_tokens", (offsets, kept), dict(seq_valid_tokens=torch.full((3,), 5))),
    ]
    x = c["x"].clone().requires_grad_()
    with mhpo_kernels.use_backend(backend):
        for error, match, kept_ids, *extra in cases:
            with pytest.raises(error, match=match):
                mhpo_kernels.mhpo_loss(x, ids, c["old"], c["adv"], c["mask"], kept_ids=kept_ids,
                                       **(extra[0] if extra else {}))
        with pytest.raises(ValueError, match="an id twice"):
            mhpo_kernels.token_logprobs(x, ids, kept_ids=(offsets, twice))
        hidden, weight = torch.randn(*ids.shape, 8), torch.randn(V, 8)
        with pytest.raises(ValueError, match="must be off with it"):
            mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, kept_ids=(offsets, kept), top_p=0.9)
        with pytest.raises(NotImplementedError, match="seq_valid_tokens"):
            mhpo_kernels.fused_linear_mhpo_loss(hidden, weight, ids, c["old"], c["adv"], c["mask"],
                                                kept_ids=(offsets, kept), seq_valid_tokens=torch.full((3,), 5))
        with pytest.raises(ValueError, match="an id twice"):
            mhpo_kernels.fused_linear_mhpo_loss(hidden, weight, ids, c["old"], c["adv"], c["mask"],
                                                kept_ids=(offsets, twice))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_inside_a_kept_set(backend):
    """A NaN or +inf logit inside a row's kept set makes that row's log-prob, entropy and gradient
    NaN, as without truncation (SPEC.md, section 5), and leaves the other rows alone; the same at
    an invalid token is never read."""
    B, T, V = 1, 4, 40
    x = _logits((B, T, V), seed=30)
    ids = torch.tensor([[3, 5, 7, -100]])
    offsets, kept = torch.tensor([0, 3, 6, 9, 12]), torch.tensor([3, 1, 2, 5, 8, 9, 7, 10, 11, 0, 1, 2])
    x[0, 0, 1], x[0, 1, 9], x[0, 3, 1] = float("nan"), float("inf"), float("nan")   # rows 0, 1; row 3 invalid
    upstream = torch.ones(B, T)
    with mhpo_kernels.use_backend(backend):
        logp, ent, grad = _run(mhpo_kernels.token_logprobs, x, ids, upstream, kept_ids=(offsets, kept))
    want_logp, want_ent, want_grad = _run(reference.token_logprobs, x.double(), ids, upstream.double(),
                                          kept_ids=(offsets, kept))
    for got, want in ((logp, want_logp), (ent, want_ent)):
        assert got[0, :2].isnan().all() and want[0, :2].isnan().all()
        assert got[0, 3] == want[0, 3] == 0
        _close(got[0, 2:3], want[0, 2:3])
    assert grad[0, :2].isnan().any(dim=-1).all() and want_grad[0, :2].isnan().any(dim=-1).all()
    _close(grad[0, 2], want_grad[0, 2])
    assert not grad[0, 3].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_a_left_out_token_adds_nothing_whatever_its_row_holds(backend, value):
    """A target outside its kept set leaves the loss as an invalid token does (SPEC.md, section
    9), also with +inf or NaN among its row's kept logits and an entropy bonus (whose g_t·H_t is
    then 0·NaN): the loss and its gradient are bit-identical to those with that row clean, that
    row's gradient is 0, not 0 · NaN, and both equal the reference's. Log-probs alone give the
    row no gradient either; an entropy differentiated (even times 0) gives it the entropy's, NaN."""
    x = _logits((1, 3, 16), seed=31)
    ids = torch.tensor([[1, 2, 3]])                    # row 1 keeps {5, 6}: its target 2 is outside
    kept = (torch.tensor([0, 2, 4, 6]), torch.tensor([1, 4, 5, 6, 3, 7]))
    old, adv = torch.full((1, 3), -1.0), torch.tensor([[1.0, -0.5, 0.7]])
    dirty = x.clone()
    dirty[0, 1, 5] = value

    def loss(fn, z):
        z = z.clone().requires_grad_()
        out = fn(z, ids, old.to(z.dtype), adv.to(z.dtype), kept_ids=kept, entropy_coef=0.01)
        out.backward()
        return out.detach(), z.grad

    def logprobs(fn, z, entropy_weight):
        z = z.clone().requires_grad_()
        logp, ent = fn(z, ids, kept_ids=kept, return_entropy=True)
        total = torch.where(logp.isinf(), 0.0, logp).sum()
        (total if entropy_weight is None else total + entropy_weight * ent[0, 1]).backward()
        return z.grad

    with mhpo_kernels.use_backend(backend):
        (got, grad), (clean, clean_grad) = loss(mhpo_kernels.mhpo_loss, dirty), loss(mhpo_kernels.mhpo_loss, x)
        lp_grad = logprobs(mhpo_kernels.token_logprobs, dirty, None)
        ent_grad = logprobs(mhpo_kernels.token_logprobs, dirty, 0)
    want, want_grad = loss(reference.mhpo_loss, dirty.double())
    assert torch.equal(got, clean) and torch.equal(grad, clean_grad), (got, clean)
    assert not grad[0, 1].any() and not want_grad[0, 1].any()
    assert math.isfinite(want.item()) and abs(got.item() - want.item()) <= FP32_RTOL * abs(want.item())
    _close(grad, want_grad)
    want_lp_grad = logprobs(reference.token_logprobs, dirty.double(), None)
    assert not lp_grad[0, 1].any() and not want_lp_grad[0, 1].any()
    _close(lp_grad, want_lp_grad)
    assert ent_grad[0, 1, [5, 6]].isnan().all()
    assert logprobs(reference.token_logprobs, dirty.double(), 0)[0, 1].isnan().any()


def _head(N, H, V, seed):
    """Hidden states and an LM head (weight, bias) on a grid: the logits they make are exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-16, 16, (N, H), generator=g) / 8.0
    return hidden, torch.randint(-24, 24, (V, H), generator=g) / 16.0, torch.randint(-8, 8, (V,), generator=g) / 16.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_fused_linear_token_logprobs(backend, batch_invariant):
    """From hidden states and the head, in chunks of 4 tokens (each chunk's rows a slice of the
    kept sets; with ``batch_invariant`` the last chunk padded with rows of no kept set), two
    ignored tokens (left out before the chunks; one with NaN hidden states, never read):
    log-probs, entropy and the gradients of hidden, weight and bias equal the float64 reference
    of the logits they make."""
    N, H, V = 11, 8, 300   # 9 valid tokens: chunks of 4, 4 and 1 (with batch_invariant, 3 rows of padding)
    hidden, weight, bias = _head(N, H, V, seed=30)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(31))
    ids[[3, 8]] = -100
    hidden[3] = float("nan")
    offsets, kept = _kept_sets(ids.clamp(min=0), V, seed=32)
    upstream = torch.linspace(-1.0, 1.0, N)

    def run(fn, h, w, b):
        return head_grads(fn, upstream, h, w, b)

    def fused(h, w, b):
        return mhpo_kernels.fused_linear_token_logprobs(h, w, ids, bias=b, return_entropy=True, chunk_size=4,
                                                        kept_ids=(offsets, kept), batch_invariant=batch_invariant)

    def eager(h, w, b):
        h = torch.where((ids >= 0).unsqueeze(-1), h, 0.0)   # an ignored token's state takes no part
        return reference.token_logprobs(h @ w.T + b, ids, return_entropy=True, kept_ids=(offsets, kept))

    with mhpo_kernels.use_backend(backend):
        got = run(fused, hidden, weight, bias)
    want = run(eager, hidden.double(), weight.double(), bias.double())
    assert want[0].isinf().any() and not want[0].isinf().all()
    for a, b in zip(got, want):
        _close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_loss(backend):
    """The fused linear loss with a replayed kept set, a reference KL term and an entropy bonus:
    the loss, ``outside_support`` and the gradients of hidden, weight and bias equal the float64
    reference of the logits they make."""
    from mhpo_kernels.objectives import MHPO

    B, T, H, V = 2, 5, 8, 300
    hidden, weight, bias = _head(B * T, H, V, seed=33)
    hidden = hidden.reshape(B, T, H)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(34))
    offsets, kept = _kept_sets(ids, V, seed=35, outside_every=3)
    g = torch.Generator().manual_seed(36)
    old, ref = -torch.rand(B, T, generator=g) * 3 - 0.05, -torch.rand(B, T, generator=g) * 3 - 0.05
    adv, mask = torch.randn(B, generator=g), torch.ones(B, T, dtype=torch.bool)
    kw = dict(objective=MHPO(), return_metrics=True, ref_logprobs=ref, beta=0.05, entropy_coef=0.01,
              kept_ids=(offsets, kept))

    def run(loss_fn, h, w, b):
        h, w, b = (t.clone().requires_grad_() for t in (h, w, b))
        loss, metrics = loss_fn(h, w, b)
        loss.backward()
        return loss.detach(), metrics, (h.grad, w.grad, b.grad)

    def fused(h, w, b):
        return mhpo_kernels.fused_linear_policy_loss(h, w, ids, old, adv, mask, bias=b, chunk_size=3, **kw)

    def eager(h, w, b):
        return reference.policy_loss(h @ w.T + b, ids, old.double(), adv.double(), mask,
                                     **{**kw, "ref_logprobs": ref.double()})

    with mhpo_kernels.use_backend(backend):
        loss, metrics, grads = run(fused, hidden, weight, bias)
    want, want_metrics, want_grads = run(eager, hidden.double(), weight.double(), bias.double())
    assert 0 < want_metrics["outside_support"] < 0.5
    assert loss.item() == pytest.approx(want.item(), rel=FP32_RTOL, abs=FP32_RTOL)
    assert metrics["outside_support"].item() == pytest.approx(want_metrics["outside_support"].item(), abs=1e-7)
    for a, b in zip(grads, want_grads):
        _close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_left_out_states_reach_no_gradient(backend):
    """Hidden states of NaN at a token whose target is outside its replayed kept set (log-prob
    −inf) and, in a loss, at one whose old log-prob is −inf (its row NaN): the loss leaves both
    out, and the log-probs alone give the first no gradient (its entropy given none). What those
    states hold reaches no gradient (dhidden's rows 0; dweight and dbias finite, not 0 · NaN),
    which equals the float64 reference's with those states taking no part."""
    from mhpo_kernels.objectives import MHPO

    N, H, V = 6, 8, 40
    hidden, weight, bias = _head(N, H, V, seed=37)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    offsets = torch.tensor([0, 3, 6, 9, 12, 12, 15])   # token 2's set leaves its target 3 out; token 4's is empty
    kept = torch.tensor([1, 7, 8, 2, 9, 10, 11, 12, 13, 4, 0, 14, 6, 15, 16])
    old, adv, mask = torch.full((1, N), -1.0), torch.tensor([0.7]), torch.ones(1, N, dtype=torch.bool)
    old[0, 3] = -math.inf                               # token 3: inside its set, its old log-prob −inf
    upstream = torch.linspace(-1.0, 1.0, N).reshape(1, N)

    def grads(fn, h, w, b):
        h, w, b = (t.clone().requires_grad_() for t in (h, w, b))
        out = fn(h, w, b)
        total = torch.where(out.isinf(), 0.0, out * upstream.to(out.dtype)).sum() if out.dim() else out
        total.backward()
        return out.detach(), h.grad, w.grad, b.grad

    for name in ("logprobs", "loss"):
        rows = torch.tensor([False, False, True, name == "loss", False, False])
        dirty = hidden.clone()
        dirty[rows] = math.nan
        if name == "logprobs":
            def fused(h, w, b):
                return mhpo_kernels.fused_linear_token_logprobs(h[None], w, ids, bias=b, chunk_size=4,
                                                                kept_ids=(offsets, kept))

            def eager(h, w, b):
                h = torch.where(rows.unsqueeze(-1), 0.0, h)   # those states take no part
                return reference.token_logprobs(h[None] @ w.T + b, ids, kept_ids=(offsets, kept))
        else:
            kw = dict(objective=MHPO(), entropy_coef=0.01, kept_ids=(offsets, kept))

            def fused(h, w, b):
                return mhpo_kernels.fused_linear_policy_loss(h[None], w, ids, old, adv, mask, bias=b, chunk_size=4,
                                                             **kw)

            def eager(h, w, b):
                h = torch.where(rows.unsqueeze(-1), 0.0, h)
                return reference.policy_loss(h[None] @ w.T + b, ids, old.double(), adv.double(), mask, **kw)

        with mhpo_kernels.use_backend(backend):
            got = grads(fused, dirty, weight, bias)
        want = grads(eager, dirty.double(), weight.double(), bias.double())
        assert not got[1][rows].any() and got[2].isfinite().all() and got[3].isfinite().all(), name
        for a, b in zip(got, want):
            _close(a, b)
