"""Packed sequences (``cu_seqlens``), context parallelism (``seq_valid_tokens``), the entropy
bonus (``entropy_coef``) and ``token_logprobs(mask=)``: each against the padded call and the
float64 reference, on the Triton kernels (interpreted on CPU) and on the PyTorch path."""

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import _dist
import mhpo_kernels
import reference
from _cases import FP32_RTOL, max_rel_err
from conftest import TRITON_DEVICE
from mhpo_kernels.objectives import CISPO, GPG, GSPO, MHPO, SAPO, PPOClip

MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
PATHS = ("triton", "torch")
OBJECTIVES = [MHPO(), MHPO(lfm=False), PPOClip(eps_low=0.2, eps_high=0.28, dual_clip=3.0), CISPO(max_ratio=1.2),
              SAPO(), GPG(), GSPO(eps_low=0.2, eps_high=0.3)]
B, T, V, H = 4, 4, 37, 8


def _device(path):
    return TRITON_DEVICE if path == "triton" else "cpu"


def _padded(seed=0, device="cpu"):
    """A padded batch whose rows exercise the aggregation: row 2 is all padding (an empty
    sequence once packed), row 3 is kept but all its ids are ignore_index (a sequence with tokens
    and none of them valid); old log-probs near the current ones, so that no objective is clipped
    everywhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 2] = -100
    ids[3] = -100
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[0, :2] = True
    mask[1, 3] = False
    mask[2] = False
    mask[3, :2] = True
    logp = reference.token_logprobs(x.double(), ids.clamp(min=0)).float()
    old = logp + 0.1 * torch.randn(B, T, generator=g)
    ref = logp + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    case = dict(x=x, ids=ids, mask=mask, old=old, ref=ref, adv=adv, adv_tok=torch.randn(B, T, generator=g))
    return {k: v.to(device) for k, v in case.items()}


def _pack(case):
    """The masked positions of the padded batch as one stream and its boundaries."""
    keep = case["mask"]
    cu = torch.zeros(B + 1, dtype=torch.int32, device=keep.device)
    cu[1:] = keep.sum(1).cumsum(0)
    return keep, cu


def _loss(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss * 1.7, x)
    return loss.detach(), grad


def _modes(path, i=0):
    """Every mode on the PyTorch path; one per case on the interpreted kernels, cycling. The
    aggregation weights g_t are computed before either sweep runs (``_inputs``), by the same code
    for both paths, so the kernels see a mode only as the g_t vector; the interpreter costs tens
    of milliseconds per row and launch."""
    return MODES if path == "torch" else (MODES[i % len(MODES)],)


@pytest.mark.parametrize("path", PATHS)
def test_packed_equals_padded(path):
    """Packing the valid tokens of a padded batch gives the padded call's loss and its gradient
    rows, for every objective and mode, and both equal the float64 reference of the packed call;
    per-sequence and per-token advantages."""
    c = _padded(device=_device(path))
    keep, cu = _pack(c)
    for i, objective in enumerate(OBJECTIVES):
        per_token = [False] if objective.sequence_level or path == "triton" else [False, True]
        for mode in _modes(path, i):
            for tok in per_token:
                adv = c["adv_tok"] if tok else c["adv"]
                kw = dict(objective=objective, loss_agg_mode=mode, ref_logprobs=c["ref"], beta=0.05,
                          entropy_coef=0.02)
                # On the kernels the padded call runs for one objective per mode: padded against
                # the reference is what the other test files check, for every objective.
                with_padded = path == "torch" or i < len(MODES)
                with mhpo_kernels.use_backend(path):
                    if with_padded:
                        padded, g_padded = _loss(mhpo_kernels.policy_loss, c["x"], c["ids"], c["old"], adv,
                                                 c["mask"], **kw)
                    kw["ref_logprobs"] = c["ref"][keep]
                    adv_p = adv[keep] if tok else adv
                    packed, g_packed = _loss(mhpo_kernels.policy_loss, c["x"][keep], c["ids"][keep],
                                             c["old"][keep], adv_p, cu_seqlens=cu, **kw)
                kw["ref_logprobs"] = kw["ref_logprobs"].double()
                expected, g_expected = _loss(reference.policy_loss, c["x"][keep].double(), c["ids"][keep],
                                             c["old"][keep].double(), adv_p.double(), cu_seqlens=cu, **kw)
                where = f"{objective!r} {mode} per_token={tok}"
                if with_padded:
                    assert packed.item() == pytest.approx(padded.item(), rel=FP32_RTOL, abs=1e-7), where
                    assert max_rel_err(g_packed, g_padded[keep]) <= FP32_RTOL, where
                assert packed.item() == pytest.approx(expected.item(), rel=FP32_RTOL, abs=1e-7), where
                assert max_rel_err(g_packed, g_expected) <= FP32_RTOL, where
                assert g_expected.abs().max() > 0, where      # the comparison is not between zeros


@pytest.mark.parametrize("path", PATHS)
def test_fused_linear_packed_equals_padded(path):
    """hidden (N, H) with cu_seqlens: the padded call's loss and hidden/weight/bias gradients,
    with the entropy bonus, for every mode."""
    g = torch.Generator().manual_seed(3)
    c = _padded(seed=3, device=_device(path))
    keep, cu = _pack(c)
    hidden = torch.randn(B, T, H, generator=g).to(keep.device)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(keep.device)
    bias = (torch.randn(V, generator=g) * 0.1).to(keep.device)

    def run(h, *args, **kwargs):
        h, w, b = (t.detach().clone().requires_grad_() for t in (h, weight, bias))
        loss = mhpo_kernels.fused_linear_mhpo_loss(h, w, *args, bias=b, chunk_size=3, entropy_coef=0.05, **kwargs)
        return (loss.detach(), *torch.autograd.grad(loss, (h, w, b)))

    for mode in _modes(path):
        with mhpo_kernels.use_backend(path):
            padded = run(hidden, c["ids"], c["old"], c["adv"], c["mask"], loss_agg_mode=mode)
            packed = run(hidden[keep], c["ids"][keep], c["old"][keep], c["adv"], cu_seqlens=cu, loss_agg_mode=mode)
        assert packed[0].item() == pytest.approx(padded[0].item(), rel=FP32_RTOL), mode
        assert max_rel_err(packed[1], padded[1][keep]) <= FP32_RTOL, mode
        for got, want in zip(packed[2:], padded[2:]):
            assert max_rel_err(got, want) <= FP32_RTOL, mode


@pytest.mark.parametrize("path", PATHS)
def test_entropy_coef_against_reference(path):
    """loss = Σ g_t (loss_t − coef · H_t) and its gradient, every mode, against float64 autograd;
    on shifted (B, T + 1, V) logits with a temperature, and on the fused linear path with softcap."""
    c = _padded(seed=5, device=_device(path))
    g = torch.Generator().manual_seed(6)
    full = torch.cat([c["x"], torch.randn(B, 1, V, generator=g).to(c["x"].device)], 1)
    hidden = torch.randn(B, T, H, generator=g).to(full.device)
    weight = torch.randn(V, H, generator=g).to(full.device)
    for i, mode in enumerate(MODES):
        kw = dict(loss_agg_mode=mode, temperature=0.7, entropy_coef=0.3)
        with mhpo_kernels.use_backend(path):
            got = _loss(mhpo_kernels.mhpo_loss, full, c["ids"], c["old"], c["adv"], c["mask"], **kw)
        want = _loss(reference.mhpo_loss, full.double(), c["ids"], c["old"].double(), c["adv"].double(),
                     c["mask"], **kw)
        assert got[0].item() == pytest.approx(want[0].item(), rel=FP32_RTOL), mode
        assert max_rel_err(got[1], want[1]) <= FP32_RTOL, mode
        without = reference.mhpo_loss(full.double(), c["ids"], c["old"].double(), c["adv"].double(), c["mask"],
                                      loss_agg_mode=mode, temperature=0.7)
        assert abs(want[0].item() - without.item()) > 1e-2, mode   # the bonus is not negligible here
        if mode not in _modes(path, i + 1):
            continue
        lin = dict(loss_agg_mode=mode, temperature=0.7, entropy_coef=0.3, final_logit_softcap=5.0)
        w = weight.detach().clone().requires_grad_()
        with mhpo_kernels.use_backend(path):
            loss = mhpo_kernels.fused_linear_mhpo_loss(hidden, w, c["ids"], c["old"], c["adv"], c["mask"],
                                                       chunk_size=5, **lin)
            (gw,) = torch.autograd.grad(loss, w)
        w64 = weight.double().requires_grad_()
        z = 5.0 * torch.tanh(hidden.double() @ w64.t() / 5.0)
        want_lin = reference.mhpo_loss(z, c["ids"], c["old"].double(), c["adv"].double(), c["mask"],
                                       loss_agg_mode=mode, temperature=0.7, entropy_coef=0.3)
        (gw64,) = torch.autograd.grad(want_lin, w64)
        assert loss.item() == pytest.approx(want_lin.item(), rel=FP32_RTOL), mode
        assert max_rel_err(gw, gw64) <= FP32_RTOL, mode


@pytest.mark.parametrize("path", PATHS)
def test_token_logprobs_mask(path):
    """mask= acts like ignore_index (0 and no gradient where false); the log-prob and the entropy
    are differentiable, against float64 autograd of the reference."""
    c = _padded(seed=7, device=_device(path))
    g = torch.Generator().manual_seed(8)
    up_logp, up_ent = (torch.randn(B, T, generator=g).to(c["x"].device) for _ in range(2))
    x = c["x"].clone()
    x[~c["mask"]] = float("nan")                 # whatever a masked row holds reaches nothing
    results = []
    for fn, logits in ((mhpo_kernels.token_logprobs, x), (reference.token_logprobs, x.double())):
        leaf = logits.detach().clone().requires_grad_()
        with mhpo_kernels.use_backend(path):
            logp, ent = fn(leaf, c["ids"], temperature=0.9, return_entropy=True, mask=c["mask"])
            (grad,) = torch.autograd.grad((logp * up_logp).sum() + (ent * up_ent).sum(), leaf)
        results.append((logp.detach(), ent.detach(), grad))
    (logp, ent, grad), (logp64, ent64, grad64) = results
    valid = c["mask"] & (c["ids"] != -100)
    assert torch.equal(logp[~valid], torch.zeros_like(logp[~valid]))
    assert torch.equal(ent[~valid], torch.zeros_like(ent[~valid]))
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))
    assert max_rel_err(logp, logp64) <= FP32_RTOL
    assert max_rel_err(ent, ent64) <= FP32_RTOL
    assert max_rel_err(grad, grad64) <= FP32_RTOL


def _bad_calls():
    c = _padded()
    keep, cu = _pack(c)
    x, ids, old = c["x"][keep], c["ids"][keep], c["old"][keep]
    N = ids.numel()

    def call(**kw):
        args = dict(cu_seqlens=cu, advantages=c["adv"])
        args.update(kw)
        adv = args.pop("advantages")
        logits = args.pop("logits", x)
        return lambda: mhpo_kernels.mhpo_loss(logits, args.pop("input_ids", ids), old if logits is x else None,
                                              adv, **args)

    return [
        (call(cu_seqlens=cu.float()), TypeError, "cu_seqlens"),
        (call(cu_seqlens=cu.reshape(1, -1)), ValueError, "cu_seqlens"),
        (call(cu_seqlens=cu + 1), ValueError, "cu_seqlens"),
        (call(cu_seqlens=torch.tensor([0, 3, 2, N])), ValueError, "cu_seqlens"),
        (call(cu_seqlens=torch.tensor([0, 2, N - 1])), ValueError, "cu_seqlens"),
        (call(cu_seqlens=[0, N]), TypeError, "cu_seqlens"),
        (call(logits=c["x"], input_ids=c["ids"]), ValueError, "cu_seqlens"),
        (call(advantages=torch.randn(B + 1)), ValueError, "advantages"),
        (call(cu_seqlens=torch.tensor([0] * (N - 1) + [N - 1, N]), advantages=torch.randn(N)), ValueError,
         "ambiguous"),
        (call(seq_valid_tokens=torch.full((B,), 9.0)), TypeError, "seq_valid_tokens"),
        (call(seq_valid_tokens=torch.full((B + 1,), 9)), ValueError, "seq_valid_tokens"),
        (call(seq_valid_tokens=torch.zeros(B, dtype=torch.int64)), ValueError, "seq_valid_tokens"),
        (call(entropy_coef=-0.1), ValueError, "entropy_coef"),
        (call(entropy_coef=torch.tensor(0.1)), TypeError, "entropy_coef"),
        (lambda: mhpo_kernels.policy_loss(x, ids, old, c["adv"], cu_seqlens=cu, objective=GSPO(),
                                          seq_valid_tokens=torch.full((B,), 9)), NotImplementedError,
         "seq_valid_tokens"),
        (lambda: mhpo_kernels.fused_linear_mhpo_loss(torch.randn(B, T, H), torch.randn(V, H), c["ids"], None,
                                                     c["adv"], cu_seqlens=cu), ValueError, "cu_seqlens"),
        (lambda: mhpo_kernels.MHPOLoss(entropy_coef=float("inf")), ValueError, "entropy_coef"),
    ]


def test_bad_packed_inputs_name_the_argument():
    with mhpo_kernels.use_backend("torch"):
        for call, error, name in _bad_calls():
            with pytest.raises(error, match=name):
                call()


def test_module_and_compile_with_varying_sequence_count(tmp_path, monkeypatch):
    """``MHPOLoss.forward(cu_seqlens=)`` under torch.compile(fullgraph=True): with the sequence
    count marked dynamic, one graph serves every S, and each S gives the eager result. (The graph
    is the subject here, so the sweeps inside the ops are the PyTorch ones.)"""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    module = mhpo_kernels.MHPOLoss(entropy_coef=0.1)
    c = _padded(seed=9)
    keep, _ = _pack(c)
    x, ids, old = c["x"][keep], c["ids"][keep], c["old"][keep]
    N = ids.numel()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    with mhpo_kernels.use_backend("torch"):
        for cuts in ([0, 3, N], [0, 2, 5, N], [0, 1, 1, 4, N], [0, 1, 2, 3, 6, N]):
            cu = torch.tensor(cuts)
            adv = torch.linspace(-1, 1, cu.numel() - 1)
            torch._dynamo.mark_dynamic(cu, 0)
            torch._dynamo.mark_dynamic(adv, 0)
            e_x, c_x = x.clone().requires_grad_(), x.clone().requires_grad_()
            e_loss = module(e_x, ids, old, adv, cu_seqlens=cu)
            c_loss = compiled(c_x, ids, old, adv, cu_seqlens=cu)
            e_loss.backward()
            c_loss.backward()
            assert c_loss.item() == pytest.approx(e_loss.item(), rel=FP32_RTOL), cuts
            assert max_rel_err(c_x.grad, e_x.grad) <= FP32_RTOL, cuts
    torch._dynamo.reset()
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for 4 sequence counts (S = 2 … 5)"


def test_opcheck_sequence_level_with_boundaries():
    """The sweeps' custom op with GSPO's sequence boundaries: schema, fake implementation and
    autograd registration agree with what it does (an empty sequence among them)."""
    from mhpo_kernels import ops
    from mhpo_kernels._sweep_types import LogitMap, TokenParams

    g = torch.Generator().manual_seed(13)
    x = torch.randn(1, 7, 30, generator=g).requires_grad_()
    ids = torch.randint(0, 30, (7,), generator=g, dtype=torch.int32)
    ids[3] = -1
    cu = torch.tensor([0, 2, 2, 7])
    old = torch.randn(7, generator=g) * 0.05 - 3.4
    adv = torch.tensor([0.5, 0.5, -1.0, -1.0, -1.0, -1.0, -1.0])
    params = ops.pack_params(TokenParams.of(GSPO(eps_low=0.2, eps_high=0.3), 0.0), LogitMap.make(1.0))
    with mhpo_kernels.use_backend("torch"):
        torch.library.opcheck(ops.sweeps_forward, (x, ids, old, adv, torch.full((7,), 0.25), None, None, params, False,
                                                   True, True, False, False, cu),
                              {"sequence_level": True})


# ---- two ranks: the vocabulary split (tp_group) and context parallelism ------------------------

CUT = 20  # rank 0 holds the vocabulary [0, CUT), rank 1 [CUT, V)


def _cp_split(ids, cu):
    """Rank 0's tokens: the first half of every sequence (rank 1 has the rest), the boundaries of
    each rank's part, and every sequence's valid tokens over both ranks."""
    first_half = torch.zeros(ids.numel(), dtype=torch.bool)
    for s in range(B):
        a, b = int(cu[s]), int(cu[s + 1])
        first_half[a:a + (b - a + 1) // 2] = True
    seq = torch.bucketize(torch.arange(ids.numel()), cu, right=True) - 1
    counts = torch.zeros(B, dtype=torch.int64).index_add_(0, seq, (ids != -100).long())
    parts = []
    for mine in (first_half, ~first_half):
        local_cu = torch.zeros(B + 1, dtype=torch.int64)
        local_cu[1:] = torch.zeros(B, dtype=torch.int64).index_add_(0, seq[mine], torch.ones_like(seq[mine])).cumsum(0)
        parts.append((mine, local_cu))
    return parts, counts


def _two_rank_worker(rank, world, out_dir):
    import torch.distributed as dist

    c = _padded(seed=11)
    keep, cu = _pack(c)
    x, ids, old, adv, ref = c["x"][keep], c["ids"][keep], c["old"][keep], c["adv"], c["ref"][keep]
    g = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(ids.numel(), H, generator=g), torch.randn(V, H, generator=g)
    results = {}
    lo, hi = (0, CUT) if rank == 0 else (CUT, V)
    # The Triton kernels on each rank's vocabulary slice of the packed stream; one mode (the split
    # meets the aggregation only through g_t, which the context-parallel part covers in every mode).
    for mode in MODES[:1]:
        xr = x[:, lo:hi].clone().requires_grad_()
        loss = mhpo_kernels.mhpo_loss(xr, ids, old, adv, cu_seqlens=cu, loss_agg_mode=mode, ref_logprobs=ref,
                                      beta=0.05, entropy_coef=0.1, tp_group=dist.group.WORLD)
        loss.backward()
        results[f"tp/{mode}"] = (loss.detach(), xr.grad)
        # The same stream on both ranks with its own valid counts as seq_valid_tokens: the same loss.
        counts = torch.zeros(cu.numel() - 1, dtype=torch.int64).index_add_(
            0, torch.bucketize(torch.arange(ids.numel()), cu, right=True) - 1, (ids != -100).long())
        results[f"tp-counts/{mode}"] = mhpo_kernels.mhpo_loss(
            x[:, lo:hi], ids, old, adv, cu_seqlens=cu, loss_agg_mode=mode, ref_logprobs=ref, beta=0.05,
            entropy_coef=0.1, seq_valid_tokens=counts, tp_group=dist.group.WORLD)
        # The fused linear path on this rank's rows of the head: the loss, this rank's dW rows, and
        # dhidden, which the op all-reduces over the group (reduce_dhidden=True).
        w = weight[lo:hi].clone().requires_grad_()
        h = hidden.clone().requires_grad_()
        lin = mhpo_kernels.fused_linear_mhpo_loss(h, w, ids, old, adv, cu_seqlens=cu, loss_agg_mode=mode,
                                                  tp_group=dist.group.WORLD, chunk_size=4)
        lin.backward()
        results[f"tp-linear/{mode}"] = (lin.detach(), w.grad, h.grad)
    other_cu = cu.clone()
    other_cu[1] -= rank                       # a valid stream, but not the one rank 0 describes
    try:
        mhpo_kernels.mhpo_loss(x[:, lo:hi], ids, old, adv, cu_seqlens=other_cu, tp_group=dist.group.WORLD)
    except ValueError as e:
        results["tp/cu-differ"] = str(e)

    parts, counts = _cp_split(ids, cu)
    mine, local_cu = parts[rank]
    with mhpo_kernels.use_backend("torch"):   # the split changes only the aggregation weights
        for mode in MODES:
            xr = x[mine].clone().requires_grad_()
            # (S, 1): per sequence even when this rank's part happens to hold N = S tokens
            loss = mhpo_kernels.mhpo_loss(xr, ids[mine], old[mine], adv[:, None], cu_seqlens=local_cu,
                                          loss_agg_mode=mode, seq_valid_tokens=counts, entropy_coef=0.1)
            loss.backward()
            w = weight.clone().requires_grad_()
            lin = mhpo_kernels.fused_linear_mhpo_loss(hidden[mine], w, ids[mine], old[mine], adv[:, None],
                                                      cu_seqlens=local_cu, loss_agg_mode=mode,
                                                      seq_valid_tokens=counts, chunk_size=4)
            lin.backward()
            totals = torch.stack([loss.detach(), lin.detach()])
            dw = w.grad.clone()
            dist.all_reduce(totals)
            dist.all_reduce(dw)                       # DDP's gradient sum
            results[f"cp/{mode}"] = (totals, xr.grad, dw)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_two_ranks_tp_group_and_context_parallel(tmp_path):
    """One spawn, two gloo ranks. (1) tp_group with cu_seqlens: every rank's loss is the
    single-process packed loss and its logits gradient its vocabulary columns; with
    seq_valid_tokens (the stream's own counts) the same loss; on the fused linear path, the loss,
    the rank's rows of the head gradient and the whole dhidden. (2) A stream split
    inside every sequence over the ranks, with seq_valid_tokens: the ranks' losses sum to the
    unsplit loss and their gradients are its gradient rows (and, on the fused linear path, the
    summed weight gradient is the unsplit one), in every mode. Expected: the float64 reference."""
    _dist.run(_two_rank_worker, 2, tmp_path, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    c = _padded(seed=11)
    keep, cu = _pack(c)
    x, ids, old, adv, ref = (c["x"][keep].double(), c["ids"][keep], c["old"][keep].double(), c["adv"].double(),
                             c["ref"][keep].double())
    g = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(ids.numel(), H, generator=g).double(), torch.randn(V, H, generator=g).double()
    parts, _ = _cp_split(ids, cu)
    for r in range(2):
        message = "cu_seqlens, the per-token temperature, min_p, top_k or top_p, kept_ids, or the data"
        assert message in got[r].get("tp/cu-differ", ""), r
    for mode in MODES:
        loss, grad = _loss(reference.mhpo_loss, x, ids, old, adv, cu_seqlens=cu, loss_agg_mode=mode,
                           ref_logprobs=ref, beta=0.05, entropy_coef=0.1)
        for r, (lo, hi) in enumerate(((0, CUT), (CUT, V)) if f"tp/{mode}" in got[0] else ()):
            tp_loss, tp_grad = got[r][f"tp/{mode}"]
            assert tp_loss.item() == pytest.approx(loss.item(), rel=FP32_RTOL), mode
            assert max_rel_err(tp_grad, grad[:, lo:hi] / 1.7) <= FP32_RTOL, mode
            assert got[r][f"tp-counts/{mode}"].item() == pytest.approx(loss.item(), rel=FP32_RTOL), mode
            w, h = weight.clone().requires_grad_(), hidden.clone().requires_grad_()
            lin = reference.mhpo_loss(h @ w.t(), ids, old, adv, cu_seqlens=cu, loss_agg_mode=mode)
            dh, dw = torch.autograd.grad(lin, (h, w))
            tp_lin, tp_dw, tp_dh = got[r][f"tp-linear/{mode}"]
            assert tp_lin.item() == pytest.approx(lin.item(), rel=FP32_RTOL), mode
            assert max_rel_err(tp_dw, dw[lo:hi]) <= FP32_RTOL and max_rel_err(tp_dh, dh) <= FP32_RTOL, mode

        loss, grad = _loss(reference.mhpo_loss, x, ids, old, adv, cu_seqlens=cu, loss_agg_mode=mode,
                           entropy_coef=0.1)
        w = weight.clone().requires_grad_()
        lin = reference.mhpo_loss(hidden @ w.t(), ids, old, adv, cu_seqlens=cu, loss_agg_mode=mode)
        (dw,) = torch.autograd.grad(lin, w)
        unsplit = torch.zeros_like(grad)
        for r, (mine, _) in enumerate(parts):
            totals, part, dw_sum = got[r][f"cp/{mode}"]
            assert totals[0].item() == pytest.approx(loss.item(), rel=FP32_RTOL), mode
            assert totals[1].item() == pytest.approx(lin.item(), rel=FP32_RTOL), mode
            assert max_rel_err(dw_sum, dw) <= FP32_RTOL, mode
            unsplit[mine] = part.double()
        assert max_rel_err(unsplit, grad / 1.7) <= FP32_RTOL, mode


@pytest.mark.parametrize("path", ["triton", "torch", "reference"])
def test_packed_per_token_temperature_and_one_advantage(path):
    """Sequences of different lengths with one τ_t per token, and a single advantage for every
    token (shape ()): the packed call equals the padded batch's loss and gradient rows."""
    c = _padded(seed=13)
    keep, cu = _pack(c)
    g = torch.Generator().manual_seed(14)
    tau = torch.rand(B, T, generator=g) + 0.5
    assert len(set((cu[1:] - cu[:-1]).tolist())) > 1           # the lengths differ
    adv = torch.tensor(0.7)

    def run(x, **kw):
        x = (x.double() if path == "reference" else x).detach().requires_grad_()
        kw = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() and path == "reference" else v
              for k, v in kw.items()}
        if path == "reference":
            loss = reference.mhpo_loss(x, **kw, entropy_coef=0.1)
        else:
            with mhpo_kernels.use_backend(path):
                loss = mhpo_kernels.mhpo_loss(x, **kw, entropy_coef=0.1)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach().double(), grad.double()

    padded_loss, padded_grad = run(c["x"], input_ids=c["ids"], old_logprobs=c["old"], advantages=adv, mask=c["mask"],
                                   temperature=tau)
    loss, grad = run(c["x"][keep], input_ids=c["ids"][keep], old_logprobs=c["old"][keep], advantages=adv,
                     temperature=tau[keep], cu_seqlens=cu)
    assert loss.item() == pytest.approx(padded_loss.item(), rel=FP32_RTOL)
    assert max_rel_err(grad, padded_grad[keep]) <= FP32_RTOL
    full_loss, _ = run(c["x"], input_ids=c["ids"], old_logprobs=c["old"], advantages=adv.expand(B, T),
                       mask=c["mask"], temperature=tau)
    assert padded_loss.item() == pytest.approx(full_loss.item(), rel=FP32_RTOL)


@pytest.mark.parametrize("path", PATHS)
def test_strided_boundaries_are_read_as_their_values(path):
    """cu_seqlens as a strided view (every other element of a longer tensor) gives the loss and
    gradient of its contiguous copy: the kernels read it flat, so it is made contiguous first
    (the Triton path read [0, 1, 3, 10] for [0, 3, 7, 10], values that pass every check)."""
    device = _device(path)
    g = torch.Generator().manual_seed(5)
    N = 10
    x = torch.randn(N, V, generator=g).to(device)
    ids = torch.randint(0, V, (N,), generator=g).to(device)
    old = reference.token_logprobs(x.double().cpu(), ids.cpu()).float().to(device) + 0.1
    wide = torch.tensor([0, 1, 3, 5, 7, 8, 10, 11], dtype=torch.int64, device=device)
    cu = wide[::2]
    assert not cu.is_contiguous() and cu.tolist() == [0, 3, 7, 10]
    for objective in (MHPO(), GSPO(eps_low=0.2, eps_high=0.3)):
        adv = torch.randn(3, generator=g).to(device)
        with mhpo_kernels.use_backend(path):
            got = _loss(mhpo_kernels.policy_loss, x, ids, old.clamp(max=0), adv, objective=objective, cu_seqlens=cu)
            want = _loss(mhpo_kernels.policy_loss, x, ids, old.clamp(max=0), adv, objective=objective,
                         cu_seqlens=cu.contiguous())
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), objective


@pytest.mark.parametrize("path", PATHS)
def test_degenerate_streams_on_both_paths(path):
    """Boundaries of no sequence for N > 0 tokens are refused by name on both paths (the PyTorch
    path raised an IndexError), and GSPO with per-token advantages on no tokens gives 0."""
    device = _device(path)
    x, ids = torch.randn(4, V, device=device), torch.zeros(4, dtype=torch.int64, device=device)
    with mhpo_kernels.use_backend(path):
        with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
            mhpo_kernels.policy_loss(x, ids, None, torch.zeros(0, device=device), objective=GSPO(),
                                     cu_seqlens=torch.zeros(1, dtype=torch.int64, device=device))
        for shape in ((2, 0, V), (0, V)):
            empty = torch.randn(shape, device=device, requires_grad=True)
            loss = mhpo_kernels.policy_loss(empty, torch.zeros(shape[:-1], dtype=torch.int64, device=device), None,
                                            torch.zeros(shape[:-1], device=device), objective=GSPO())
            loss.backward()
            assert loss.item() == 0 and empty.grad.shape == empty.shape
