"""Multi-process runs on CPU (gloo, FileStore rendezvous, spawn, two-minute limit): what the
package does past one process."""

import math

import pytest
import torch

import _dist


class _TinyLM(torch.nn.Module):
    """A backbone and an LM head; ``forward`` is the fused path (TRL's forward redirection runs
    the trainer's loss inside the wrapped model's forward, so FSDP's hooks see a forward)."""

    def __init__(self, H=8, V=300):
        super().__init__()
        self.body = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V, bias=False)

    def forward(self, x, ids, adv):
        import mhpo_kernels
        from mhpo_kernels.integrations.trl import gathered_head

        hidden = torch.tanh(self.body(x))
        weight, bias = gathered_head(self.head)
        return mhpo_kernels.fused_linear_mhpo_loss(hidden, weight, ids, None, adv, bias=bias, chunk_size=3,
                                                   loss_agg_mode="token-mean")


def _rank_batch(rank, B=2, T=4, H=8, V=300):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(B, T, H, generator=g), torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g)


def _fsdp2_head_worker(rank, world_size, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _TinyLM()
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(model.head, mesh=mesh)   # the head as its own unit: a DTensor outside its forward
    fully_shard(model, mesh=mesh)
    model(*_rank_batch(rank)).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(grads, f"{out_dir}/fsdp2.pt")


def test_fsdp2_head_gradient_is_reduced_across_ranks(tmp_path):
    """Under FSDP2 with the LM head as its own unit, the fused path gathers the head with
    ``full_tensor``; its backward must average the head's gradient over the ranks as FSDP2 does
    for every other parameter, not keep each rank's slice of its own gradient."""
    pytest.importorskip("trl", reason="the trl extra is not installed")
    world_size = 2
    _dist.run(_fsdp2_head_worker, world_size, tmp_path, str(tmp_path))
    got = torch.load(tmp_path / "fsdp2.pt")
    torch.manual_seed(0)
    model = _TinyLM()
    for rank in range(world_size):
        (model(*_rank_batch(rank)) / world_size).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, rtol=1e-5, atol=1e-7), name


# ---- vocabulary-parallel sweeps -----------------------------------------------------------------

def _split(V, world):
    """Uneven contiguous slices: the first ranks get one more, as 151,936 over 3 would."""
    sizes = [V // world + (r < V % world) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return list(zip(starts, sizes))


def _tp_inputs(V=1001, B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + 1, V, generator=g) * 2.0
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 1] = V - 1                       # a target in the last slice
    ids[1, 0] = 0                           # and in the first
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    ids[~mask] = V + 5                      # garbage at masked positions must not matter
    old = torch.randn(B, T, generator=g) - 6.0
    adv = torch.randn(B, generator=g)
    ref = old + 0.3 * torch.randn(B, T, generator=g)
    return full, ids, mask, old, adv, ref


TP_KW = dict(temperature=0.8, beta=0.1, loss_agg_mode="token-mean", return_metrics=True)


def _tp_clip():
    """An objective that clips some of ``_tp_inputs``' tokens at each bound, not all."""
    from mhpo_kernels.objectives import PPOClip

    return PPOClip(eps_low=0.2, eps_high=0.28)


def _tp_worker(rank, world_size, out_dir, backend):
    import mhpo_kernels
    import torch.distributed as dist
    from test_host_syncs import counting_syncs

    full, ids, mask, old, adv, ref = _tp_inputs()
    start, size = _split(full.shape[-1], world_size)[rank]
    out = {}
    with mhpo_kernels.use_backend(backend):
        x = full[..., start:start + size].clone().requires_grad_()
        with counting_syncs() as syncs:
            loss, metrics = mhpo_kernels.mhpo_loss(x, ids, old, adv, mask, ref_logprobs=ref,
                                                   tp_group=dist.group.WORLD, **TP_KW)
            (loss * 1.3).backward()
        out["syncs"] = dict(syncs.counts)
        logp, ent = mhpo_kernels.token_logprobs(full[..., start:start + size], ids.masked_fill(~mask, -100),
                                                return_entropy=True, tp_group=dist.group.WORLD)
        _, clip_metrics = mhpo_kernels.policy_loss(full[..., start:start + size], ids, old, adv, mask,
                                                   objective=_tp_clip(), tp_group=dist.group.WORLD, return_metrics=True)
    out.update(loss=loss.detach(), metrics={k: v for k, v in metrics.items()}, grad=x.grad, logp=logp, ent=ent,
               clip_metrics=clip_metrics)
    torch.save(out, f"{out_dir}/tp-{backend}-{rank}.pt")


def _on_both_paths(worker, name, tmp_path_factory):
    """``worker`` on both paths over 2 and over 3 ranks, one set of processes per world size:
    {world size: the folder of its results}."""
    runs = {}
    for world_size in (2, 3):
        runs[world_size] = tmp_path_factory.mktemp(f"{name}{world_size}")
        _dist.run_cases(worker, world_size, runs[world_size], str(runs[world_size]), ["triton", "torch"])
    return runs


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    return _on_both_paths(_tp_worker, "tp", tmp_path_factory)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_vocab_parallel_equals_one_process(tp_runs, backend, world_size):
    """Uneven vocabulary slices over 2 and 3 ranks: every rank's loss, metrics, log-probs and
    entropy equal the single-process op's, and its logits gradient is its slice of the full one.
    On the Triton path, forward and backward read the host once on each rank: the agreement's
    gathered table, which carries validation's flags too (the agreement's one collective; the
    second carries the row statistics)."""
    import mhpo_kernels
    import reference
    from _cases import FP32_RTOL, max_rel_err

    full, ids, mask, old, adv, ref = _tp_inputs()
    x = full.clone().requires_grad_()
    with mhpo_kernels.use_backend(backend):
        loss, metrics = mhpo_kernels.mhpo_loss(x, ids, old, adv, mask, ref_logprobs=ref, **TP_KW)
        (loss * 1.3).backward()
        logp, ent = mhpo_kernels.token_logprobs(full, ids.masked_fill(~mask, -100), return_entropy=True)
        _, clip_metrics = mhpo_kernels.policy_loss(full, ids, old, adv, mask, objective=_tp_clip(), return_metrics=True)
    assert 0 < clip_metrics["clip_low_frac"].item() < 1 and 0 < clip_metrics["clip_high_frac"].item() < 1
    x64 = full.double().requires_grad_()
    kw64 = {k: v for k, v in TP_KW.items() if k != "return_metrics"}
    loss64 = reference.mhpo_loss(x64, ids, old.double(), adv.double(), mask, ref_logprobs=ref.double(), **kw64)
    (loss64 * 1.3).backward()
    grads = []
    for rank, (start, size) in enumerate(_split(full.shape[-1], world_size)):
        got = torch.load(tp_runs[world_size] / f"tp-{backend}-{rank}.pt")
        if backend == "triton":  # the PyTorch path reads host-side scalars (``tests/test_host_syncs.py``)
            assert got["syncs"] == {"tolist": 1}, got["syncs"]
        assert abs(got["loss"].item() - loss.item()) <= FP32_RTOL * abs(loss.item())
        assert abs(got["loss"].item() - loss64.item()) <= FP32_RTOL * abs(loss64.item())
        for k, v in metrics.items():
            assert abs(got["metrics"][k].item() - v.item()) <= FP32_RTOL * max(abs(v.item()), 1e-3), k
        assert got["clip_metrics"].keys() == clip_metrics.keys()
        for k in ("clip_low_frac", "clip_high_frac"):   # shares of a few tokens: the same tokens
            assert got["clip_metrics"][k].item() == clip_metrics[k].item(), k
        assert max_rel_err(got["logp"], logp) <= FP32_RTOL and max_rel_err(got["ent"], ent) <= FP32_RTOL
        assert got["grad"].shape[-1] == size
        grads.append(got["grad"])
    assert max_rel_err(torch.cat(grads, -1), x.grad) <= FP32_RTOL
    assert max_rel_err(torch.cat(grads, -1), x64.grad) <= FP32_RTOL


def _tp_bad_call_worker(rank, world_size, cases, out_dir):
    """Every case in turn in one pair of processes: each raises on every rank alike, so the ranks
    stay in step from one case to the next."""
    torch.save({case: _tp_bad_call(rank, world_size, case) for case in cases}, f"{out_dir}/err-{rank}.pt")


def _tp_bad_call(rank, world_size, case):
    import mhpo_kernels
    import torch.distributed as dist
    from mhpo_kernels.objectives import GSPO, PPOClip

    full, ids, mask, old, adv, _ = _tp_inputs()
    start, size = _split(full.shape[-1], world_size)[rank]
    x = full[..., start:start + size]
    from mhpo_kernels import vocab_parallel

    kw = {}
    get_backend, fingerprint = dist.get_backend, vocab_parallel._fingerprint
    if case == "id-out-of-range":
        ids = ids.clone()
        ids[0, 0] = full.shape[-1]           # valid position, one past the global vocabulary
    elif case == "id-negative":
        ids = ids.clone()
        ids[0, 0] = -5                       # valid position (not ignore_index): refused before V is agreed
    elif case == "tokens-disagree" and rank == 1:
        x, ids, mask, old = x[:, :-1], ids[:, :-1], mask[:, :-1], old[:, :-1]
    elif case == "empty-slice" and rank == 1:
        x = x[..., :0]
    elif case == "old-positive-one-rank" and rank == 0:   # a value check of the prepare launch
        old = old.abs() + 0.5
    elif case == "one-rank-bad-dtype" and rank == 0:
        x = x.to(torch.float64)
    elif case == "ids-differ" and rank == 1:
        ids = ids.clone()
        ids[1, 2] = (ids[1, 2] + 1) % full.shape[-1]
    elif case == "ids-differ-linearly":              # +1, −2, +1: a linear checksum's blind spot
        ids, mask = ids.clone(), mask.clone()
        mask[0, :3] = True
        ids[0, :3] = torch.tensor([100, 200, 300]) + (torch.tensor([1, -2, 1]) if rank == 1 else 0)
    elif case == "ids-past-v-unfingerprinted":       # were the fingerprints to collide: V still refused everywhere
        vocab_parallel._fingerprint = lambda x: [torch.zeros((), dtype=torch.int64)] * 2
        if rank == 1:
            ids = ids.clone()
            ids[0, 0] = full.shape[-1]
    elif case == "old-differs" and rank == 1:         # data: each rank would compute another loss
        old = old.clone()
        old[0, 0] -= 0.5
    elif case == "advantages-differ" and rank == 1:
        adv = adv + 1.0
    elif case == "temperature-differs":
        kw["temperature"] = 1.0 + 0.1 * rank
    elif case == "temperature-tensor-one-rank":   # the same τ, as a 0-d tensor on rank 0
        kw["temperature"] = torch.tensor(0.8) if rank == 0 else 0.8
    elif case == "objective-differs" and rank == 1:
        kw["objective"] = PPOClip()
    elif case == "dual-clip-differs":
        kw["objective"] = PPOClip(dual_clip=3.0 + rank)
    elif case == "agg-mode-differs" and rank == 1:
        kw["loss_agg_mode"] = "token-mean"
    elif case == "metrics-differ" and rank == 1:
        kw["return_metrics"] = True
    elif case == "dtype-differs" and rank == 1:
        old = old.double()
    elif case == "gspo-one-rank" and rank == 0:
        kw["objective"] = GSPO()
    elif case == "gspo-every-rank":
        kw["objective"] = GSPO()
    elif case == "inplace-overlap":              # both ranks in place, rank 0's logits an expand
        x = x * 1 if rank else (x[:1] * 1).expand_as(x)
        kw["inplace_backward"] = True
    elif case == "bad-c-one-rank":
        kw["c"] = 0.0 if rank else 1.5
    elif case == "c-differs":
        kw["c"] = 1.5 + rank
    elif case == "objective-not-a-record-one-rank" and rank == 0:
        kw["objective"] = "grpo"
    elif case == "top-p-one-rank" and rank == 0:
        kw["top_p"] = 0.9
    elif case == "top-k-differs":                # per token, one value apart on rank 1
        kw["top_k"] = torch.full(ids.shape, 5 + rank)
    elif case == "min-p-one-rank" and rank == 0:
        kw["min_p"] = 0.1
    elif case.startswith("kept-ids"):
        flat = ids.reshape(-1) % 1001                  # two ids per token, the same on every rank
        kept = torch.stack([flat, (flat + 1) % 1001]).T.reshape(-1)
        if case == "kept-ids-past-v":
            kept[3] = 1001
        if case != "kept-ids-one-rank" or rank == 0:
            kw["kept_ids"] = (torch.arange(0, kept.numel() + 1, 2), kept)
    elif case == "float64-torch-path":           # the PyTorch path takes float64, not over a split
        x = x.double()
    elif case == "nccl-with-cpu-tensors":        # the group's backend as an NCCL group reports it
        dist.get_backend = lambda group=None: "nccl"
    elif case == "dhidden-needed-one-rank":      # the fused linear path: only rank 0 would all-reduce dhidden
        g = torch.Generator().manual_seed(3)
        x = torch.randn(*ids.shape, 8, generator=g).requires_grad_(rank == 0)
        head = torch.randn(full.shape[-1], 8, generator=g)[start:start + size]
    try:
        call = mhpo_kernels.mhpo_loss if "c" in kw else mhpo_kernels.policy_loss
        if case == "dhidden-needed-one-rank":
            def call(hidden, *args, **kwargs):
                return mhpo_kernels.fused_linear_mhpo_loss(hidden, head, *args, **kwargs)
        with mhpo_kernels.use_backend("torch" if case == "float64-torch-path" else "triton"):
            call(x, ids, old, adv, mask, tp_group=dist.group.WORLD, **kw)
        message = None
    except (TypeError, ValueError, NotImplementedError) as e:
        message = f"{type(e).__name__}: {e}"
    finally:
        dist.get_backend = get_backend
        if case == "ids-past-v-unfingerprinted":
            vocab_parallel._fingerprint = fingerprint
    return message


BAD_TP_CALLS = [
    ("id-out-of-range", "outside \\[0, 1001\\)"),
    ("id-negative", "1 id\\(s\\) outside \\[0, V\\) \\(V: the vocabulary of all ranks\\) at valid positions, e.g. -5"),
    ("tokens-disagree", "input_ids must have shape|disagree on the number of tokens|failed validation"),
    ("empty-slice", "vocabulary dimension|failed validation|at least 1"),
    ("old-positive-one-rank", "old_logprobs holds finite values above 0|rank\\(s\\) \\[0\\] failed validation"),
    ("one-rank-bad-dtype", "logits are float64, which tp_group does not take|failed validation"),
    ("ids-differ", "input_ids or mask differ across ranks"),
    ("ids-differ-linearly", "input_ids or mask differ across ranks"),
    ("ids-past-v-unfingerprinted", "outside \\[0, 1001\\)"),
    ("top-p-one-rank", "disagree on truncation"),
    ("top-k-differs", "top_k or top_p, kept_ids, or the data .* differ across ranks"),
    ("old-differs", "or the data \\(old_logprobs, ref_logprobs, advantages, token_weights, seq_valid_tokens\\) "
                    "differ across ranks"),
    ("advantages-differ", "or the data .* differ across ranks"),
    ("min-p-one-rank", "disagree on truncation"),
    ("temperature-differs", "disagree on temperature_and_logit_map"),
    ("temperature-tensor-one-rank", "disagree on temperature_is_a_tensor"),
    ("objective-differs", "disagree on objective"),
    ("dual-clip-differs", "disagree on objective"),
    ("agg-mode-differs", "disagree on loss_agg_mode"),
    ("metrics-differ", "disagree on return_metrics"),
    ("dtype-differs", "disagree on dtypes"),
    ("gspo-one-rank", "GSPO with tp_group is not supported|failed validation"),
    ("gspo-every-rank", "GSPO with tp_group is not supported"),
    ("inplace-overlap", "share memory|failed validation"),
    ("bad-c-one-rank", "c must be finite and > 0|failed validation"),
    ("c-differs", "disagree on objective"),
    ("objective-not-a-record-one-rank", "objective must be one of|failed validation"),
    ("nccl-with-cpu-tensors", "NCCL backend.*on cpu"),
    ("float64-torch-path", "float64, which tp_group does not take"),
    ("kept-ids-one-rank", "disagree on kept_ids_given"),
    ("kept-ids-past-v", "kept_ids holds ids outside \\[0, 1001\\)"),
    ("dhidden-needed-one-rank", "disagree on dhidden_needed"),
]


def test_vocab_parallel_bad_calls_raise_on_every_rank(tmp_path):
    """A call that is wrong on any rank, or ranks that pass different hyperparameters, objectives,
    flags or dtypes, raise on every rank, before any collective could hang or the ranks'
    results diverge (each case of ``BAD_TP_CALLS``, in one pair of processes)."""
    import re

    _dist.run(_tp_bad_call_worker, 2, tmp_path, [case for case, _ in BAD_TP_CALLS], str(tmp_path))
    got = [torch.load(tmp_path / f"err-{rank}.pt") for rank in range(2)]
    wrong = [(case, rank, got[rank][case]) for case, pattern in BAD_TP_CALLS for rank in range(2)
             if got[rank][case] is None or not re.search(pattern, got[rank][case])]
    assert not wrong, wrong
    # A value check of the prepare launch, read with the agreement's table: its rank raises its
    # error, the other that it failed.
    assert got[0]["old-positive-one-rank"].startswith("ValueError: old_logprobs holds finite values above 0")
    assert "rank(s) [0] failed validation" in got[1]["old-positive-one-rank"]


NORMALIZER_CASES = {  # name: (rank 0's normalizer, rank 1's)
    "numbers-differ": (6.0, 7.0),
    "tensors-differ": (torch.tensor(6.0), torch.tensor(7.0)),
    "int-tensors-differ": (torch.tensor(6), torch.tensor(7)),      # TRL's num_items_in_batch is a count
    "one-rank-none": (6.0, None),
    "number-and-tensor-differ": (6.0, torch.tensor(6.5)),
    "number-and-tensor-agree": (6.0, torch.tensor(6)),             # the same value: computes
}


def _normalizer_calls(rank, world_size):
    """(path, call(normalizer) on this rank's slice): the logits path and the fused linear path."""
    import mhpo_kernels
    import torch.distributed as dist

    full, ids, mask, old, adv, _ = _tp_inputs()
    start, size = _split(full.shape[-1], world_size)[rank]
    hidden, weight, bias, lids, lmask, lold, ladv = _tp_linear_inputs()
    wstart, wsize = _split(weight.shape[0], world_size)[rank]
    kw = dict(loss_agg_mode="token-mean", tp_group=None if world_size == 1 else dist.group.WORLD)
    return [("logits", lambda n: mhpo_kernels.mhpo_loss(full[..., start:start + size], ids, old, adv, mask,
                                                       normalizer=n, **kw)),
            ("linear", lambda n: mhpo_kernels.fused_linear_mhpo_loss(
                hidden, weight[wstart:wstart + wsize], lids, lold, ladv, lmask, bias=bias[wstart:wstart + wsize],
                chunk_size=4, normalizer=n, **kw))]


def _tp_normalizer_worker(rank, world_size, out_dir):
    import mhpo_kernels

    out = {}
    with mhpo_kernels.use_backend("torch"):
        for case, normalizers in NORMALIZER_CASES.items():
            for path, call in _normalizer_calls(rank, world_size):
                try:
                    out[case, path] = call(normalizers[rank]).detach()
                except ValueError as e:
                    out[case, path] = str(e)
    torch.save(out, f"{out_dir}/normalizer-{rank}.pt")


def test_vocab_parallel_normalizer_is_agreed(tmp_path):
    """Ranks that pass different normalizers (numbers, 0-d float or integer tensors, one rank
    none) raise on every rank, naming normalizer, on the logits path and the fused linear path,
    instead of returning different losses; a number and a tensor of the same value agree and give
    one process's loss. A tensor's value is compared in the agreement's all-gather, not read
    on the host."""
    import mhpo_kernels
    from _cases import FP32_RTOL

    _dist.run(_tp_normalizer_worker, 2, tmp_path, str(tmp_path))
    got = [torch.load(tmp_path / f"normalizer-{rank}.pt") for rank in range(2)]
    with mhpo_kernels.use_backend("torch"):
        single = {path: call(6.0) for path, call in _normalizer_calls(0, 1)}
    for (case, path), _ in got[0].items():
        for rank in range(2):
            result = got[rank][case, path]
            if case.endswith("-agree"):
                assert isinstance(result, torch.Tensor), (case, path, rank, result)
                assert abs(result.item() - single[path].item()) <= FP32_RTOL * abs(single[path].item())
            else:
                assert isinstance(result, str) and "disagree on normalizer" in result, (case, path, rank, result)


def _tp_linear_inputs(V=701, B=2, T=5, H=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * H ** -0.5 * 3
    bias = torch.randn(V, generator=g) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    old = torch.randn(B, T, generator=g) - 6.0
    return hidden, weight, bias, ids, mask, old, torch.randn(B, generator=g)


LINEAR_KW = dict(chunk_size=3, final_logit_softcap=6.0, temperature=0.9, return_metrics=True)


def _tp_linear_worker(rank, world_size, out_dir, backend):
    import mhpo_kernels
    import torch.distributed as dist

    hidden, weight, bias, ids, mask, old, adv = _tp_linear_inputs()
    start, size = _split(weight.shape[0], world_size)[rank]
    out = {}
    with mhpo_kernels.use_backend(backend):
        for reduce in (True, False):
            h = hidden.clone().requires_grad_()
            w = weight[start:start + size].clone().requires_grad_()
            b = bias[start:start + size].clone().requires_grad_()
            loss, metrics = mhpo_kernels.fused_linear_mhpo_loss(h, w, ids, old, adv, mask, bias=b,
                                                                tp_group=dist.group.WORLD, reduce_dhidden=reduce,
                                                                **LINEAR_KW)
            (loss * 0.7).backward()
            out[reduce] = dict(loss=loss.detach(), metrics=metrics, dh=h.grad, dw=w.grad, db=b.grad)
        out["logp"] = mhpo_kernels.fused_linear_token_logprobs(
            hidden, weight[start:start + size], ids, bias=bias[start:start + size], chunk_size=3,
            final_logit_softcap=6.0, temperature=0.9, tp_group=dist.group.WORLD)
    torch.save(out, f"{out_dir}/tpl-{backend}-{rank}.pt")


@pytest.fixture(scope="module")
def tp_linear_runs(tmp_path_factory):
    return _on_both_paths(_tp_linear_worker, "tpl", tmp_path_factory)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_vocab_parallel_fused_linear_equals_one_process(tp_linear_runs, backend, world_size):
    """The LM head's rows split over ranks (uneven): loss and metrics on every rank, dhidden
    reduced inside the op (or left partial, summing to the same), and each rank's dweight and
    dbias slices equal the single-process fused path's."""
    import mhpo_kernels
    from _cases import FP32_RTOL, max_rel_err

    hidden, weight, bias, ids, mask, old, adv = _tp_linear_inputs()
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    with mhpo_kernels.use_backend(backend):
        loss, metrics = mhpo_kernels.fused_linear_mhpo_loss(h, w, ids, old, adv, mask, bias=b, **LINEAR_KW)
        (loss * 0.7).backward()
        logp = mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, bias=bias, chunk_size=3,
                                                        final_logit_softcap=6.0, temperature=0.9)
    ranks = [torch.load(tp_linear_runs[world_size] / f"tpl-{backend}-{r}.pt") for r in range(world_size)]
    for got in ranks:
        assert abs(got[True]["loss"].item() - loss.item()) <= FP32_RTOL * abs(loss.item())
        for k, v in metrics.items():
            assert abs(got[True]["metrics"][k].item() - v.item()) <= FP32_RTOL * max(abs(v.item()), 1e-3), k
        assert max_rel_err(got[True]["dh"], h.grad) <= FP32_RTOL
        assert max_rel_err(got["logp"], logp) <= FP32_RTOL
    assert max_rel_err(sum(got[False]["dh"] for got in ranks), h.grad) <= FP32_RTOL
    assert max_rel_err(torch.cat([got[True]["dw"] for got in ranks]), w.grad) <= FP32_RTOL
    assert max_rel_err(torch.cat([got[True]["db"] for got in ranks]), b.grad) <= FP32_RTOL


# ---- data parallel -------------------------------------------------------------------------------

class _HeadLM(torch.nn.Module):
    """A backbone and an LM head trained through the fused linear path."""

    def __init__(self, H=8, V=300):
        super().__init__()
        self.body = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V, bias=False)

    def forward(self, x, ids, adv, mask, normalizer=None):
        import mhpo_kernels

        return mhpo_kernels.fused_linear_mhpo_loss(torch.tanh(self.body(x)), self.head.weight, ids, None, adv, mask,
                                                   chunk_size=3, loss_agg_mode="token-mean", normalizer=normalizer)


def _dp_batch(B=4, T=5, H=8, V=300):
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[:, 0] = True
    mask[0] = True                                 # ragged: the ranks hold different token counts
    return torch.randn(B, T, H, generator=g), torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g), mask


def _ddp_worker(rank, world_size, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(_HeadLM())
    x, ids, adv, mask = (t.chunk(world_size)[rank] for t in _dp_batch())
    # DDP averages gradients over ranks: dividing each rank's token sum by (global tokens / world)
    # makes the average the gradient of the global token mean. That is TRL's dapo normalizer.
    count = mask.sum().float()
    dist.all_reduce(count)
    model(x, ids, adv, mask, normalizer=count / world_size).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, f"{out_dir}/ddp.pt")


def test_ddp_with_a_global_normalizer_equals_one_process(tmp_path):
    """Two DDP ranks on halves of a batch with ragged token counts: with the normalizer set from
    the global token count, the averaged gradient equals one process's on the whole batch (a
    local token-mean would weight the ranks' tokens unequally)."""
    from _cases import FP32_RTOL, max_rel_err

    _dist.run(_ddp_worker, 2, tmp_path, str(tmp_path))
    got = torch.load(tmp_path / "ddp.pt")
    torch.manual_seed(0)
    model = _HeadLM()
    model(*_dp_batch()).backward()
    for name, p in model.named_parameters():
        assert max_rel_err(got[name], p.grad) <= FP32_RTOL, name


def _tp_objective_worker(rank, world_size, out_dir):
    import mhpo_kernels
    import torch.distributed as dist
    from mhpo_kernels.objectives import PPOClip

    full, ids, mask, old, adv, ref = _tp_inputs()
    start, size = _split(full.shape[-1], world_size)[rank]
    x = full[..., start:start + size].clone().requires_grad_()
    loss = mhpo_kernels.policy_loss(x, ids, old, adv, mask, objective=PPOClip(0.2, 0.28, dual_clip=3.0),
                                    ref_logprobs=ref, beta=0.1, tp_group=dist.group.WORLD)
    loss.backward()
    torch.save(dict(loss=loss.detach(), grad=x.grad), f"{out_dir}/tpo-{rank}.pt")


def test_vocab_parallel_takes_other_objectives(tmp_path):
    """policy_loss with a vocabulary split over ranks: the epilogue is the objective's."""
    import mhpo_kernels
    from _cases import FP32_RTOL, max_rel_err
    from mhpo_kernels.objectives import PPOClip

    _dist.run(_tp_objective_worker, 2, tmp_path, str(tmp_path))
    full, ids, mask, old, adv, ref = _tp_inputs()
    x = full.clone().requires_grad_()
    loss = mhpo_kernels.policy_loss(x, ids, old, adv, mask, objective=PPOClip(0.2, 0.28, dual_clip=3.0),
                                    ref_logprobs=ref, beta=0.1)
    loss.backward()
    got = [torch.load(tmp_path / f"tpo-{r}.pt") for r in range(2)]
    assert all(abs(g["loss"].item() - loss.item()) <= FP32_RTOL * abs(loss.item()) for g in got)
    assert max_rel_err(torch.cat([g["grad"] for g in got], -1), x.grad) <= FP32_RTOL


def _megatron_worker(rank, world_size, out_dir):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    import mhpo_kernels

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    g = torch.Generator().manual_seed(0)
    T, B, V = 5, 2, 1000                                   # Megatron's (T, B, V) layout, even slices
    logits = torch.randn(T, B, V, generator=g) * 2
    ids = torch.randint(0, V, (T, B), generator=g)
    per = V // world_size
    x = logits[..., rank * per:(rank + 1) * per].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x.clone(), ids)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    y = x.detach().clone().requires_grad_()
    logp = mhpo_kernels.token_logprobs(y, ids, tp_group=parallel_state.get_tensor_model_parallel_group())
    (gy,) = torch.autograd.grad(-logp.sum(), y)
    torch.save(dict(loss=loss.detach(), logp=logp.detach(), gx=gx, gy=gy), f"{out_dir}/mc-{rank}.pt")


def test_vocab_parallel_layout_matches_megatron(tmp_path):
    """Megatron-core's own vocab_parallel_cross_entropy on the same slices (its layout: contiguous
    slices in rank order): −logp and its gradient slices agree to fp32 accuracy."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from _cases import FP32_RTOL, max_rel_err

    _dist.run(_megatron_worker, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"mc-{rank}.pt")
        assert max_rel_err(-got["logp"], got["loss"]) <= FP32_RTOL
        assert max_rel_err(got["gy"], got["gx"]) <= FP32_RTOL


def _tp_edge_worker(rank, world_size, out_dir):
    import mhpo_kernels
    import torch.distributed as dist

    hidden, weight, bias, ids, mask, old, adv = _tp_linear_inputs()
    start, size = _split(weight.shape[0], world_size)[rank]
    with mhpo_kernels.use_backend("torch"):
        loss = mhpo_kernels.fused_linear_mhpo_loss(hidden, weight[start:start + size], ids, old, adv, mask,
                                                   tp_group=dist.group.WORLD)
        full, tids, tmask, told, tadv, _ = _tp_inputs()
        full[0, 1] = float("-inf")
        full[0, 1, 3] = 0.0                          # one finite logit, on rank 0's slice only
        s0, s1 = _split(full.shape[-1], world_size)[rank]
        tids = tids.clone()
        tids[0, 1] = 3
        tmask = tmask.clone()
        tmask[0, 1] = True
        logp = mhpo_kernels.token_logprobs(full[..., s0:s0 + s1], tids.masked_fill(~tmask, -100),
                                           tp_group=dist.group.WORLD)
    torch.save(dict(loss=loss, logp=logp), f"{out_dir}/edge-{rank}.pt")


def test_vocab_parallel_default_chunk_and_a_slice_of_minus_inf(tmp_path):
    """Uneven slices with the default chunk run; a token whose logits are −inf on a whole rank's
    slice is finite on the PyTorch path (that slice adds zero probability)."""
    _dist.run(_tp_edge_worker, 2, tmp_path, str(tmp_path))
    got = [torch.load(tmp_path / f"edge-{r}.pt") for r in range(2)]
    assert torch.isfinite(got[0]["loss"]) and got[0]["loss"].item() == got[1]["loss"].item()
    assert torch.isfinite(got[0]["logp"]).all() and abs(got[0]["logp"][0, 1].item()) < 1e-6


# ---- chunks on the fused linear path: one collective per chunk, so every rank makes the same ------

CHUNK_SPLIT = [(0, 600), (600, 101)]       # uneven enough for different default chunks (below)
CHUNK_TILE_BYTES = 512 * 4 * 101           # 512 rows of the small slice, 256 of the large one


def _chunk_inputs(B=2, T=300, H=16, V=701):
    g = torch.Generator().manual_seed(8)
    return (torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * H ** -0.5 * 3,
            torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g))


def _tp_chunk_worker(rank, world_size, out_dir):
    import mhpo_kernels
    import mhpo_kernels._config as config
    import torch.distributed as dist

    hidden, weight, ids, adv = _chunk_inputs()
    start, size = CHUNK_SPLIT[rank]
    config.FUSED_LINEAR_TILE_BYTES = CHUNK_TILE_BYTES
    out = {}
    with mhpo_kernels.use_backend("torch"):
        w = weight[start:start + size].clone().requires_grad_()
        h = hidden.clone().requires_grad_()
        loss = mhpo_kernels.fused_linear_mhpo_loss(h, w, ids, None, adv, tp_group=dist.group.WORLD)
        loss.backward()
        logp = mhpo_kernels.fused_linear_token_logprobs(hidden, weight[start:start + size], ids,
                                                        tp_group=dist.group.WORLD)
        out["default"] = dict(loss=loss.detach(), dh=h.grad, dw=w.grad, logp=logp)
        for name, call in (("loss", mhpo_kernels.fused_linear_mhpo_loss),
                           ("logprobs", mhpo_kernels.fused_linear_token_logprobs)):
            args = (hidden, w, ids, None, adv) if name == "loss" else (hidden, w, ids)
            try:
                call(*args, chunk_size=100 + 50 * rank, tp_group=dist.group.WORLD)
                out[name] = None
            except ValueError as e:
                out[name] = str(e)
    torch.save(out, f"{out_dir}/chunk-{rank}.pt")


def test_vocab_parallel_chunks_are_agreed(tmp_path, monkeypatch):
    """Every chunk is one collective, so every rank must make the same chunks. Slices whose own
    default chunk differs (512 rows of the small one, 256 of the large: 2 and 3 chunks of 600
    tokens) make the largest slice's chunks and give one process's loss, log-probs and
    gradients; explicit chunk sizes that differ raise on every rank."""
    import mhpo_kernels
    import mhpo_kernels._config as config
    from _cases import FP32_RTOL, max_rel_err

    monkeypatch.setattr(config, "FUSED_LINEAR_TILE_BYTES", CHUNK_TILE_BYTES)
    assert [config.fused_linear_chunk_rows(size, 4) for _, size in CHUNK_SPLIT] == [256, 512]
    _dist.run(_tp_chunk_worker, 2, tmp_path, str(tmp_path))
    hidden, weight, ids, adv = _chunk_inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with mhpo_kernels.use_backend("torch"):
        loss = mhpo_kernels.fused_linear_mhpo_loss(h, w, ids, None, adv)
        loss.backward()
        logp = mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids)
    got = [torch.load(tmp_path / f"chunk-{r}.pt") for r in range(2)]
    for g in got:
        d = g["default"]
        assert abs(d["loss"].item() - loss.item()) <= FP32_RTOL * abs(loss.item())
        assert max_rel_err(d["dh"], h.grad) <= FP32_RTOL and max_rel_err(d["logp"], logp) <= FP32_RTOL
        for name in ("loss", "logprobs"):
            assert g[name] is not None and "disagree on chunk_size" in g[name], (name, g[name])
    assert max_rel_err(torch.cat([g["default"]["dw"] for g in got]), w.grad) <= FP32_RTOL


# ---- per-token temperature and differentiable fused log-probs over a vocabulary split ---------------

def _tp_tau_worker(rank, world_size, out_dir):
    """One spawn, several checks: the fused (log-prob, entropy) differentiated through a split head
    on both paths, mhpo_loss with a per-token τ on split logits, and a τ that differs across ranks."""
    import mhpo_kernels
    import torch.distributed as dist

    group = dist.group.WORLD
    hidden, weight, bias, ids, mask, old, adv = _tp_linear_inputs()
    g = torch.Generator().manual_seed(9)
    tau = torch.rand(ids.shape, generator=g) * 1.7 + 0.3
    up_logp, up_ent = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
    ids = ids.masked_fill(~mask, -100)
    start, size = _split(weight.shape[0], world_size)[rank]
    out = {}
    for backend in ("triton", "torch"):
        h = hidden.clone().requires_grad_()
        w = weight[start:start + size].clone().requires_grad_()
        b = bias[start:start + size].clone().requires_grad_()
        with mhpo_kernels.use_backend(backend):
            logp, ent = mhpo_kernels.fused_linear_token_logprobs(
                h, w, ids, bias=b, chunk_size=3, final_logit_softcap=6.0, temperature=tau,
                return_entropy=True, tp_group=group)
        ((logp * up_logp).sum() + (ent * up_ent).sum()).backward()
        out[backend] = dict(logp=logp.detach(), ent=ent.detach(), dh=h.grad, dw=w.grad, db=b.grad)
    full, lids, lmask, lold, ladv, _ = _tp_inputs()
    ltau = torch.rand(lids.shape, generator=g) * 1.7 + 0.3
    vstart, vsize = _split(full.shape[-1], world_size)[rank]
    x = full[..., vstart:vstart + vsize].clone().requires_grad_()
    loss = mhpo_kernels.mhpo_loss(x, lids, lold, ladv, lmask, temperature=ltau, tp_group=group)
    loss.backward()
    out["loss"], out["grad"] = loss.detach(), x.grad
    differs = ltau.clone()
    if rank == 1:
        differs[tuple(lmask.nonzero()[0].tolist())] += 0.5       # at a valid token: refused
    try:
        mhpo_kernels.mhpo_loss(full[..., vstart:vstart + vsize], lids, lold, ladv, lmask, temperature=differs,
                               tp_group=group)
        out["differs"] = None
    except ValueError as e:
        out["differs"] = str(e)
    masked = ltau.clone()
    if rank == 1:
        masked[tuple((~lmask).nonzero()[0].tolist())] = float("nan")  # at an invalid token: allowed
    out["masked"] = mhpo_kernels.mhpo_loss(full[..., vstart:vstart + vsize], lids, lold, ladv, lmask,
                                           temperature=masked, tp_group=group)
    torch.save(dict(out, ltau=ltau), f"{out_dir}/tau-{rank}.pt")


def test_vocab_parallel_per_token_temperature_and_differentiable_logprobs(tmp_path):
    """2 ranks: the differentiable fused (log-prob, entropy) with a per-token τ over a split head
    equals the eager float64 result on every rank (dhidden reduced, dweight/dbias the rank's
    rows), on both paths; mhpo_loss with a per-token τ over split logits equals the reference; a τ
    that differs at a valid token raises on every rank, one that differs at an invalid token
    changes nothing."""
    import reference
    from _cases import FP32_RTOL, max_rel_err
    from test_fused_linear_logprobs import eager_logprobs

    world_size = 2
    _dist.run(_tp_tau_worker, world_size, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"tau-{r}.pt") for r in range(world_size)]
    hidden, weight, bias, ids, mask, old, adv = _tp_linear_inputs()
    g = torch.Generator().manual_seed(9)
    tau = torch.rand(ids.shape, generator=g) * 1.7 + 0.3
    up_logp, up_ent = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
    ids = ids.masked_fill(~mask, -100)
    h64, w64, b64 = (x.double().requires_grad_() for x in (hidden, weight, bias))
    logp64, ent64 = eager_logprobs(h64, w64, b64, ids, tau.double().unsqueeze(-1), 6.0)
    ((logp64 * up_logp.double()).sum() + (ent64 * up_ent.double()).sum()).backward()
    for backend in ("triton", "torch"):
        for got in ranks:
            r = got[backend]
            assert max_rel_err(r["logp"], logp64) <= FP32_RTOL and max_rel_err(r["ent"], ent64) <= FP32_RTOL
            assert max_rel_err(r["dh"], h64.grad) <= FP32_RTOL
        assert max_rel_err(torch.cat([got[backend]["dw"] for got in ranks]), w64.grad) <= FP32_RTOL
        assert max_rel_err(torch.cat([got[backend]["db"] for got in ranks]), b64.grad) <= FP32_RTOL
    full, lids, lmask, lold, ladv, _ = _tp_inputs()
    x64 = full.double().requires_grad_()
    loss64 = reference.mhpo_loss(x64, lids, lold.double(), ladv.double(), lmask,
                                 temperature=ranks[0]["ltau"].double())
    loss64.backward()
    for got in ranks:
        assert abs(got["loss"].item() - loss64.item()) <= FP32_RTOL * abs(loss64.item())
        assert got["differs"] is not None and "differ across ranks" in got["differs"], got["differs"]
        assert "temperature" in got["differs"]
        assert torch.equal(got["masked"], got["loss"])
    assert max_rel_err(torch.cat([got["grad"] for got in ranks], -1), x64.grad) <= FP32_RTOL


# ---- a truncated softmax over a vocabulary split: a replayed kept set, min_p ----------------------

def _replay_inputs(V=1001, B=2, T=5):
    """Logits (B, T, V), targets, and kept sets whose ids fall in every slice (sizes 0 to 150, the
    target outside its set on some rows; on token 3, a target in the first of 2 slices and its
    one kept id in the second)."""
    from test_replay import _kept_sets

    full, ids, mask, old, adv, ref = _tp_inputs(V, B, T)
    full = full[:, :-1].contiguous()
    ids = ids.masked_fill(~mask, 0)
    ids[0, 3], mask[0, 3] = 10, True
    offsets, kept = _kept_sets(ids, V, seed=40, outside_every=3)
    assert offsets[4] - offsets[3] == 1
    kept[offsets[3]] = 900
    return full, ids, mask, old, adv, ref, (offsets, kept)


def _truncated_inputs(case):
    """(logits, ids, mask, old, adv, ref, the log-probs' truncation, the loss's) of a case: a
    replayed kept set (``_replay_inputs``), or min_p, top_k, top_p or all three over logits on a
    grid of 1/8 (no value within rounding of ln 0.05 or ln 0.2 below the largest), per token
    (off at some) for the log-probs and numbers for the loss, the targets the row's largest logit on every other token (one of
    them in each slice) and random elsewhere (mostly outside); on token 1 the first slice keeps
    nothing (the largest logit, in the second, is 6 above its own) and holds the target, on
    token 6 it holds only −inf logits and the target."""
    full, ids, mask, old, adv, ref, kept_ids = _replay_inputs()
    if case == "replay":
        return full, ids, mask, old, adv, ref, dict(kept_ids=kept_ids), dict(kept_ids=kept_ids)
    g = torch.Generator().manual_seed(43)
    full = torch.randint(-48, 48, full.shape, generator=g) / 8.0
    full[0, 0, 1000] = full[1, 2, 3] = 6.0           # a largest logit in the last slice and in the first
    full[0, 1, 1000] = 12.0
    full[1, 1, :501] = -math.inf                     # token 6: the first slice only −inf, and the target
    top = full.argmax(-1)
    ids[:, ::2] = top[:, ::2]
    ids[0, 1], mask[0, 1] = 5, True
    ids[1, 1], mask[1, 1] = 7, True

    def per_token(*values):
        return torch.tensor(values).repeat(ids.numel())[:ids.numel()].reshape(ids.shape)

    filters = dict(min_p=(per_token(0.05, 0.2, 0.0), 0.05), top_k=(per_token(3, 10, 0), 10),
                   top_p=(per_token(0.5, 0.9, 1.0), 0.9))
    if case == "filters":   # min_p, then top_k, then top_p, with the three off at different tokens
        filters = dict(min_p=(per_token(0.05, 0.0, 0.2, 0.1), 0.1), top_k=(per_token(3, 40, 0), 40),
                       top_p=(per_token(0.9, 0.5, 0.7, 1.0, 0.95), 0.8))
    else:
        filters = {case: filters[case]}
    if case == "top_k":  # token 6 (its target a −inf logit) keeps every finite logit of the vocabulary: still on
        filters["top_k"][0][1, 1] = full.shape[-1] + 5
    return (full, ids, mask, old, adv, ref, {name: v[0] for name, v in filters.items()},
            {name: v[1] for name, v in filters.items()})


def filtered_at(logprobs_kw, where):
    """Whether a filter of ``_truncated_inputs`` is on at token ``where`` (min_p > 0, top_k > 0,
    top_p < 1)."""
    on = dict(min_p=lambda v: v > 0, top_k=lambda v: v > 0, top_p=lambda v: v < 1)
    return any(on[name](v[where]) for name, v in logprobs_kw.items())


def _tp_truncated_worker(rank, world_size, out_dir, case):
    import mhpo_kernels
    import torch.distributed as dist

    full, ids, mask, old, adv, ref, logprobs_kw, loss_kw = _truncated_inputs(case)
    start, size = _split(full.shape[-1], world_size)[rank]
    out = {}
    for backend in ("triton", "torch"):
        with mhpo_kernels.use_backend(backend):
            x = full[..., start:start + size].clone().requires_grad_()
            logp, ent = mhpo_kernels.token_logprobs(x, ids, return_entropy=True, mask=mask, tp_group=dist.group.WORLD,
                                                    **logprobs_kw)
            (torch.where(logp.isinf(), 0.0, logp).sum() + ent.sum()).backward()
            y = full[..., start:start + size].clone().requires_grad_()
            loss, metrics = mhpo_kernels.mhpo_loss(y, ids, old, adv, mask, ref_logprobs=ref, beta=0.1,
                                                   entropy_coef=0.01, return_metrics=True,
                                                   loss_agg_mode="seq-mean-token-mean", tp_group=dist.group.WORLD,
                                                   **loss_kw)
            loss.backward()
            finite, whole = (full[..., start:start + size].clone().requires_grad_() for _ in range(2))
            for z, drop_inf in ((finite, True), (whole, False)):   # −inf log-probs: no gradient either way
                lp = mhpo_kernels.token_logprobs(z, ids, mask=mask, tp_group=dist.group.WORLD, **logprobs_kw)
                (torch.where(lp.isinf(), 0.0, lp) if drop_inf else lp).sum().backward()
            if case != "replay":  # a NaN logit in the second slice at a valid token's row and an invalid one's
                nan = full.clone()
                nan[0, 3, 900] = nan[tuple((~mask).nonzero()[0].tolist()) + (900,)] = float("nan")
                nan_logp, nan_ent = mhpo_kernels.token_logprobs(nan[..., start:start + size].clone(), ids,
                                                                return_entropy=True, mask=mask,
                                                                tp_group=dist.group.WORLD, **logprobs_kw)
        out[backend] = dict(logp=logp.detach(), ent=ent.detach(), dx=x.grad, loss=loss.detach(), dy=y.grad,
                            metrics=metrics, outside=(finite.grad, whole.grad))
        if case != "replay":
            out[backend]["nan"] = (nan_logp, nan_ent)
    if case == "replay":
        offsets, kept = logprobs_kw["kept_ids"]
        bad = (offsets, kept + (full.shape[-1] if rank == 1 else 0))   # an id past V on rank 1 only
        try:
            mhpo_kernels.token_logprobs(full[..., start:start + size], ids, kept_ids=bad, tp_group=dist.group.WORLD)
            out["bad"] = None
        except ValueError as e:
            out["bad"] = str(e)
    torch.save(out, f"{out_dir}/{case}-{rank}.pt")


def _same_as_one_process(got, logp64, ent64, loss64, outside64):
    """One rank's truncated log-probs, entropy, loss and outside_support against float64."""
    from _cases import FP32_RTOL, max_rel_err

    assert torch.equal(got["logp"].isinf(), logp64.isinf())
    fin = logp64.isfinite()
    assert max_rel_err(got["logp"][fin], logp64[fin]) <= FP32_RTOL
    assert max_rel_err(got["ent"], ent64) <= FP32_RTOL
    assert abs(got["loss"].item() - loss64.item()) <= FP32_RTOL * abs(loss64.item())
    assert abs(got["metrics"]["outside_support"].item() - outside64.item()) <= 1e-7


TRUNCATED_CASES = ["replay", "min_p", "top_k", "top_p", "filters"]


def _cases_on_two_ranks(worker, name, cases, tmp_path_factory):
    """``worker``'s ``cases`` on 2 ranks, in one set of processes: the folder of their results."""
    out = tmp_path_factory.mktemp(name)
    _dist.run_cases(worker, 2, out, str(out), cases)
    return out


@pytest.fixture(scope="module")
def truncated_runs(tmp_path_factory):
    return _cases_on_two_ranks(_tp_truncated_worker, "truncated", TRUNCATED_CASES, tmp_path_factory)


@pytest.mark.parametrize("case", TRUNCATED_CASES)
def test_vocab_parallel_truncated(truncated_runs, case):
    """A replayed kept set, or the sampler's filters, over 2 uneven vocabulary slices: the
    log-probs, entropy, loss and ``outside_support`` equal the float64 reference on every rank,
    and the logits' gradients are the ranks' slices of the reference's, on both paths; a target
    outside its set passes no log-prob gradient on any rank. Replay: each rank reads the kept ids
    of its slice, and kept sets that differ across ranks raise on every rank. min_p: the threshold
    is the largest logit's of every slice; top_k, top_p and the three together: counted over
    every slice (per token, some off, for the log-probs; numbers for the loss; logits on a grid
    of 1/8, so ties at the cutoffs, kept or dropped together)."""
    import reference
    from _cases import FP32_RTOL, max_rel_err

    world_size = 2
    full, ids, mask, old, adv, ref, logprobs_kw, loss_kw = _truncated_inputs(case)
    x64 = full.double().requires_grad_()
    logp64, ent64 = reference.token_logprobs(x64, ids, return_entropy=True, mask=mask, **logprobs_kw)
    (torch.where(logp64.isinf(), 0.0, logp64).sum() + ent64.sum()).backward()
    y64 = full.double().requires_grad_()
    loss64, metrics64 = reference.mhpo_loss(y64, ids, old.double(), adv.double(), mask, ref_logprobs=ref.double(),
                                            beta=0.1, entropy_coef=0.01, return_metrics=True, **loss_kw)
    loss64.backward()
    assert logp64.isinf().any() and 0 < metrics64["outside_support"] < 0.5
    ranks = [torch.load(truncated_runs / f"{case}-{r}.pt") for r in range(world_size)]
    for backend in ("triton", "torch"):
        for got in (r[backend] for r in ranks):
            _same_as_one_process(got, logp64, ent64, loss64, metrics64["outside_support"])
            assert torch.equal(*got["outside"])
        for name, want in (("dx", x64.grad), ("dy", y64.grad)):
            assert max_rel_err(torch.cat([r[backend][name] for r in ranks], -1), want) <= FP32_RTOL, (backend, name)
        if case != "replay":  # the NaN row is NaN on every rank (SPEC.md, section 5), every other row as without it
            row = torch.zeros_like(mask)
            row[0, 3] = True
            assert mask[0, 3] and filtered_at(logprobs_kw, (0, 3))
            for got in (r[backend] for r in ranks):
                for a, b in zip(got["nan"], (got["logp"], got["ent"])):
                    assert a[row].isnan().all() and torch.equal(a[~row], b[~row]), backend
    if case == "replay":
        for got in ranks:
            assert got["bad"] is not None and "kept_ids, or the data" in got["bad"], got["bad"]


def _linear_truncated_inputs(case):
    """(hidden, weight, ids, mask, old, adv, the log-probs' truncation, the loss's) of the fused
    linear path: a replayed kept set over ``_tp_linear_inputs``, or the filters of
    ``_truncated_inputs`` over logits on a grid of 1/8 (hidden one-hot, a head on the grid: z =
    the head's entry, exactly), the targets the row's largest logit on every
    other token and random elsewhere (mostly outside); on token 1 the first slice keeps nothing
    (the largest logit, in the second, is 6 above its own) and holds the target."""
    from test_replay import _kept_sets

    hidden, weight, bias, ids, mask, old, adv = _tp_linear_inputs()
    if case == "replay":
        kept_ids = _kept_sets(ids, weight.shape[0], seed=41, outside_every=3)
        return hidden, weight, ids, mask, old, adv, dict(kept_ids=kept_ids), dict(kept_ids=kept_ids)
    g = torch.Generator().manual_seed(44)
    V, H = weight.shape
    unit = torch.arange(ids.numel()).reshape(ids.shape) % H
    hidden = torch.nn.functional.one_hot(unit, H).float()
    weight = torch.randint(-48, 48, (V, H), generator=g) / 8.0
    weight[V - 1, 1] = 12.0
    top = weight[:, unit].argmax(0)
    ids[:, ::2] = top[:, ::2]
    ids[0, 1], mask[0, 1] = 5, True
    *_, logprobs_kw, loss_kw = _truncated_inputs(case)   # the filters, per token and for the loss
    return hidden, weight, ids, mask, old, adv, logprobs_kw, loss_kw


def _tp_linear_truncated_worker(rank, world_size, out_dir, case):
    import mhpo_kernels
    import torch.distributed as dist

    hidden, weight, ids, mask, old, adv, logprobs_kw, loss_kw = _linear_truncated_inputs(case)
    start, size = _split(weight.shape[0], world_size)[rank]
    out = {}
    for backend in ("triton", "torch"):
        with mhpo_kernels.use_backend(backend):
            h, w = hidden.clone().requires_grad_(), weight[start:start + size].clone().requires_grad_()
            logp, ent = mhpo_kernels.fused_linear_token_logprobs(
                h, w, ids, mask=mask, return_entropy=True, chunk_size=3, tp_group=dist.group.WORLD, **logprobs_kw)
            (torch.where(logp.isinf(), 0.0, logp).sum() + ent.sum()).backward()
            h2, w2 = hidden.clone().requires_grad_(), weight[start:start + size].clone().requires_grad_()
            loss, metrics = mhpo_kernels.fused_linear_mhpo_loss(
                h2, w2, ids, old, adv, mask, chunk_size=3, entropy_coef=0.01, return_metrics=True,
                tp_group=dist.group.WORLD, **loss_kw)
            loss.backward()
            grads = []
            for drop_inf in (True, False):   # a −inf log-prob passes no gradient either way
                h3 = hidden.clone().requires_grad_()
                lp = mhpo_kernels.fused_linear_token_logprobs(h3, weight[start:start + size], ids, mask=mask,
                                                              chunk_size=3, tp_group=dist.group.WORLD, **logprobs_kw)
                (torch.where(lp.isinf(), 0.0, lp) if drop_inf else lp).sum().backward()
                grads.append(h3.grad)
        out[backend] = dict(logp=logp.detach(), ent=ent.detach(), dh=h.grad, dw=w.grad, loss=loss.detach(),
                            dh2=h2.grad, dw2=w2.grad, metrics=metrics, inf_grads=grads)
    torch.save(out, f"{out_dir}/linear-{case}-{rank}.pt")


def _left_out_inputs():
    """Logits (1, 4, 20) and hidden states (3, 8) with an LM head (20, 8), each with targets
    outside their replayed kept sets whose kept logits hold +inf or NaN, in either slice of 10."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 20, generator=g)
    x[0, 0, 13], x[0, 1, 2], x[0, 2, 15], x[0, 3, 4] = math.inf, math.inf, math.nan, math.nan
    kept = (torch.tensor([0, 2, 4, 6, 8]), torch.tensor([13, 2, 13, 2, 4, 15, 4, 15]))
    hidden, weight = torch.randn(3, 8, generator=g), torch.randn(20, 8, generator=g)
    hidden[1] = math.nan
    linear_kept = (torch.tensor([0, 2, 4, 6]), torch.tensor([1, 14, 13, 2, 3, 11]))   # token 1: 12 outside
    return (x, torch.tensor([[12, 12, 3, 3]]), kept), (hidden, weight, torch.tensor([1, 12, 3]), linear_kept)


def _value_and_grads(fn, *leaves):
    """(fn's value, its gradients): of the sum of its finite values, or of a 0-d loss itself."""
    leaves = [t.clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    (torch.where(out.isinf(), 0.0, out).sum() if out.dim() else out).backward()
    return (out.detach(),) + tuple(t.grad for t in leaves)


def _left_out_runs(x, ids, kept, hidden, weight, linear_ids, linear_kept, lib, **tp):
    """``_value_and_grads`` of the log-probs and of a loss, on the logits and on the LM head
    (∂/∂hidden and ∂/∂weight), for ``_left_out_inputs``, with ``lib`` (mhpo_kernels or the
    reference, which has no fused linear path: it takes the logits the head makes)."""
    from mhpo_kernels.objectives import MHPO

    fused = lib.__name__ == "mhpo_kernels"
    old, adv = -torch.ones(1, 4, dtype=x.dtype), torch.ones(1, 4, dtype=x.dtype)
    linear_old, linear_adv = -torch.ones(1, 3, dtype=x.dtype), torch.ones(1, dtype=x.dtype)
    loss = dict(objective=MHPO(), entropy_coef=0.01)

    def head_logprobs(h, w):
        if fused:
            return lib.fused_linear_token_logprobs(h, w, linear_ids, kept_ids=linear_kept, **tp)
        return lib.token_logprobs(h @ w.T, linear_ids, kept_ids=linear_kept)

    def head_loss(h, w):
        args = (linear_ids[None], linear_old, linear_adv)
        if fused:
            return lib.fused_linear_policy_loss(h[None], w, *args, kept_ids=linear_kept, **loss, **tp)
        return lib.policy_loss(h[None] @ w.T, *args, kept_ids=linear_kept, **loss)

    return (
        _value_and_grads(lambda z: lib.token_logprobs(z, ids, kept_ids=kept, **tp), x),
        _value_and_grads(lambda z: lib.policy_loss(z, ids, old, adv, kept_ids=kept, **loss, **tp), x),
        _value_and_grads(head_logprobs, hidden, weight),
        _value_and_grads(head_loss, hidden, weight))


def _tp_left_out_worker(rank, world_size, out_dir):
    import mhpo_kernels
    import torch.distributed as dist

    (x, ids, kept), (hidden, weight, linear_ids, linear_kept) = _left_out_inputs()
    cols = slice(10 * rank, 10 * rank + 10)
    out = {}
    for backend in ("triton", "torch"):
        with mhpo_kernels.use_backend(backend):
            out[backend] = _left_out_runs(x[..., cols], ids, kept, hidden, weight[cols], linear_ids, linear_kept,
                                          mhpo_kernels, tp_group=dist.group.WORLD)
    torch.save(out, f"{out_dir}/left-out-{rank}.pt")


def test_vocab_parallel_target_outside_a_non_finite_kept_set(tmp_path):
    """A target outside its replayed kept set has log-prob −inf on every rank whatever the set's
    logits hold (SPEC.md, sections 6 and 9), as in one process: +inf or NaN among them, in the
    target's slice or the other, merged NaN into it before. A loss leaves such tokens out, with
    their entropy bonus (0 · NaN was NaN): every token left out, it is 0. The log-probs alone
    and the losses give those rows no gradient, not 0 · NaN: the logits' rows are 0, and the
    head's hidden state of NaN at such a token reaches neither dhidden nor dweight, as in the
    float64 reference with that state taking no part."""
    import reference
    from test_truncation import _close

    _dist.run(_tp_left_out_worker, 2, tmp_path, str(tmp_path))
    (x, ids, kept), (hidden, weight, linear_ids, linear_kept) = _left_out_inputs()
    clean = torch.where(torch.tensor([False, True, False]).unsqueeze(-1), 0.0, hidden)   # token 1's state: none
    want = _left_out_runs(x.double(), ids, kept, clean.double(), weight.double(), linear_ids, linear_kept, reference)
    assert (want[0][0] == -math.inf).all() and want[2][0][1] == -math.inf and want[2][0][[0, 2]].isfinite().all()
    for rank in range(2):
        cols = slice(10 * rank, 10 * rank + 10)
        got = torch.load(tmp_path / f"left-out-{rank}.pt")
        for backend, (logprobs, loss, linear_logprobs, linear_loss) in got.items():
            assert (logprobs[0] == -math.inf).all() and loss[0] == 0, (rank, backend, logprobs[0], loss[0])
            assert not logprobs[1].any() and not loss[1].any(), (rank, backend)
            for (value, dh, dw), (want_value, want_dh, want_dw) in ((linear_logprobs, want[2]), (linear_loss, want[3])):
                assert not dh[1].any() and dw.isfinite().all(), (rank, backend)
                _close(value, want_value)
                _close(dh, want_dh)
                _close(dw, want_dw[cols])


LINEAR_TRUNCATED_CASES = ["replay", "min_p", "filters"]


@pytest.fixture(scope="module")
def linear_truncated_runs(tmp_path_factory):
    return _cases_on_two_ranks(_tp_linear_truncated_worker, "linear-truncated", LINEAR_TRUNCATED_CASES,
                               tmp_path_factory)


@pytest.mark.parametrize("case", LINEAR_TRUNCATED_CASES)
def test_vocab_parallel_fused_linear_truncated(linear_truncated_runs, case):
    """The fused linear path over 2 slices of the head with a replayed kept set, min_p (the
    threshold the largest logit's of every slice), or min_p, top_k and top_p together (counted
    over every slice; per token, some off, for the log-probs, numbers for the loss): log-probs, entropy, the loss and ``outside_support`` equal the float64
    reference of the logits on every rank, dhidden is the full one on every rank and dweight each
    rank's rows, on both paths; a −inf log-prob passes no gradient."""
    import reference
    from _cases import FP32_RTOL, max_rel_err

    world_size = 2
    hidden, weight, ids, mask, old, adv, logprobs_kw, loss_kw = _linear_truncated_inputs(case)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp64, ent64 = reference.token_logprobs(h64 @ w64.T, ids, return_entropy=True, mask=mask, **logprobs_kw)
    (torch.where(logp64.isinf(), 0.0, logp64).sum() + ent64.sum()).backward()
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss64, metrics64 = reference.mhpo_loss(torch.where(mask.unsqueeze(-1), h2, 0.0) @ w2.T, ids, old.double(),
                                            adv.double(), mask, entropy_coef=0.01, return_metrics=True, **loss_kw)
    loss64.backward()
    assert logp64.isinf().any() and 0 < metrics64["outside_support"] < 1
    ranks = [torch.load(linear_truncated_runs / f"linear-{case}-{r}.pt") for r in range(world_size)]
    for backend in ("triton", "torch"):
        for got in (r[backend] for r in ranks):
            _same_as_one_process(got, logp64, ent64, loss64, metrics64["outside_support"])
            assert max_rel_err(got["dh"], h64.grad) <= FP32_RTOL and max_rel_err(got["dh2"], h2.grad) <= FP32_RTOL
            assert torch.equal(*got["inf_grads"])
        for name, want in (("dw", w64.grad), ("dw2", w2.grad)):
            assert max_rel_err(torch.cat([r[backend][name] for r in ranks]), want) <= FP32_RTOL, (backend, name)


def _count_slice_reads(reads, sums):
    """Make ``slice_select``'s launches add 1 to ``reads`` (N,) at each row they read (a counting
    pass's mode not COUNT_SKIP, a gather's first slot ≥ 0), and to ``sums`` where that read is the
    pass of sums alone (COUNT_SUMS over an empty range of keys: klo > khi)."""
    import types
    from mhpo_kernels import _dispatch, slice_select
    from mhpo_kernels._sweep_types import COUNT_SKIP, COUNT_SUMS

    def kernel(name, device, backend):
        launch = _dispatch.kernel(name, device, backend)

        def counted(logits, target, lmap, base, mode, klo, khi, *rest):
            reads.add_(mode != COUNT_SKIP)
            sums.add_((mode == COUNT_SUMS) & (klo > khi))
            return launch(logits, target, lmap, base, mode, klo, khi, *rest)

        def gathered(logits, target, lmap, base, from_key, first, *rest):
            reads.add_(first >= 0)
            return launch(logits, target, lmap, base, from_key, first, *rest)
        return gathered if name == "slice_gather" else counted

    slice_select._dispatch = types.SimpleNamespace(kernel=kernel)


def _tp_random_rows_worker(rank, world_size, out_dir, dtype):
    from test_truncation import _random_rows

    dtype = getattr(torch, dtype)
    x, min_p, top_k, top_p = _random_rows(60, 512, seed=7, rounded=None if dtype == torch.float32 else dtype)
    start, size = _split(512, world_size)[rank]
    ids = x.argmax(-1)
    out = {backend: _filtered_slice(x[:, start:start + size].to(dtype), ids, backend, min_p, top_k, top_p)
           for backend in ("triton", "torch")}
    torch.save(out, f"{out_dir}/rows-{rank}.pt")


def _filtered_slice(x, ids, backend, min_p, top_k, top_p):
    """``token_logprobs`` of this rank's slice ``x`` of the rows with the filters, over the world
    group, on ``backend``: the log-probs, entropy, the slice's gradient of the log-probs' sum, and
    the reads of each row by the selection's launches (``_count_slice_reads``)."""
    import mhpo_kernels
    import torch.distributed as dist

    reads, sums = torch.zeros(len(ids), dtype=torch.int64), torch.zeros(len(ids), dtype=torch.int64)
    _count_slice_reads(reads, sums)
    with mhpo_kernels.use_backend(backend):
        leaf = x.clone().requires_grad_()
        logp, ent = mhpo_kernels.token_logprobs(leaf, ids, return_entropy=True, min_p=min_p, top_k=top_k,
                                                top_p=top_p, tp_group=dist.group.WORLD)
        logp.sum().backward()
    return dict(logp=logp.detach(), ent=ent.detach(), grad=leaf.grad, reads=reads, sums=sums)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vocab_parallel_random_rows_keep_the_sorts_set(tmp_path, dtype):
    """On 60 random rows of ties, near-ties and spreads (``test_truncation._random_rows``, bf16
    values for bf16 logits) split over 2 slices, per-token min_p, top_k and top_p keep the float64
    sort's set, ties across slices together: each kept token but the target (the largest) has a
    non-zero gradient on its rank, every other token a zero one, and the log-probs and entropy are
    the oracle's, on both paths. The selection reads a slice at most 3 times for one filter (4
    with the statistics), the last pass summing the kept tokens, and twice for both
    (``slice_select._decide_gathered``)."""
    import reference
    from test_truncation import _random_rows
    from _cases import FP32_RTOL, max_rel_err

    world_size = 2
    _dist.run(_tp_random_rows_worker, world_size, tmp_path, str(tmp_path), dtype)
    rounded = None if dtype == "float32" else getattr(torch, dtype)
    x, min_p, top_k, top_p = _random_rows(60, 512, seed=7, rounded=rounded)
    ids = x.argmax(-1)
    want = reference.kept_set(x.double(), min_p=min_p, top_k=top_k, top_p=top_p)
    assert want.sum(-1).min() >= 1 and (want.sum(-1) < 512).all()
    want_logp, want_ent = reference.token_logprobs(x.double(), ids, return_entropy=True, min_p=min_p, top_k=top_k,
                                                   top_p=top_p)
    ranks = [torch.load(tmp_path / f"rows-{r}.pt") for r in range(world_size)]
    for backend in ("triton", "torch"):
        got = torch.cat([r[backend]["grad"] for r in ranks], -1) != 0
        got[torch.arange(60), ids] = True
        for row in range(60):
            assert torch.equal(got[row], want[row]), (backend, row, int(got[row].sum()), int(want[row].sum()))
        for r in ranks:
            assert max_rel_err(r[backend]["logp"], want_logp) <= FP32_RTOL, backend
            assert max_rel_err(r[backend]["ent"], want_ent) <= FP32_RTOL, backend
        reads, sums = ranks[0][backend]["reads"], ranks[0][backend]["sums"]
        assert torch.equal(reads, ranks[1][backend]["reads"]) and torch.equal(sums, ranks[1][backend]["sums"])
        one, both = (top_k > 0) ^ (top_p < 1), (top_k > 0) & (top_p < 1)
        assert one.any() and both.any()
        assert reads[one].max() <= 3, (backend, reads)
        # both: a counting pass and the gather (a row of 512 never leaves more than 2048), no pass of sums
        assert (reads[both] == 2).all() and (sums[both] == 0).all(), (backend, reads, sums)
        # rows that took all three counting passes, summed by the last (no pass of sums)
        assert ((reads == 3) & (sums == 0) & one).any(), (reads, sums)


def _tp_joint_rows_worker(rank, world_size, out_dir):
    from test_truncation import _random_rows

    x, min_p, top_k, top_p = _random_rows(12, 3000, seed=19, kinds=("kp", "mkp", "k", "p"), k_above=2048)
    start, size = _split(3000, world_size)[rank]
    ids = x.argmax(-1)
    out = {(str(dtype), backend): _filtered_slice(x[:, start:start + size].to(dtype), ids, backend, min_p, top_k,
                                                  top_p)
           for dtype in (torch.float32, torch.bfloat16) for backend in ("triton", "torch")}
    torch.save(out, f"{out_dir}/joint-{rank}.pt")


def test_vocab_parallel_top_k_above_the_gather(tmp_path):
    """12 random rows of 3,000 (``test_truncation._random_rows``, fp32 and bf16 values) over 3
    uneven slices, with a top_k above 2048 beside top_p (with or without min_p), or either alone,
    or a top_k the gather holds beside top_p, in the same call: the rows with both and a top_k
    above 2048 count top-p's uniform bins and top-k's keys in one pass, then both runs side by
    side (``slice_select._joint``), and read each slice 3 times, summing the kept tokens in the
    last, as one launch does (``select._top_k_top_p_joint``); the others take their own passes in
    the same launches. Each keeps the float64 sort's set (each kept token but the target has a
    non-zero gradient on its rank, every other token a zero one), with the oracle's log-probs and
    entropy, on both paths."""
    import reference
    from test_truncation import _random_rows
    from _cases import FP32_RTOL, max_rel_err

    world_size = 3
    _dist.run(_tp_joint_rows_worker, world_size, tmp_path, str(tmp_path))
    x, min_p, top_k, top_p = _random_rows(12, 3000, seed=19, kinds=("kp", "mkp", "k", "p"), k_above=2048)
    both = (top_k > 2048) & (top_p < 1)
    gathered = (top_k > 0) & (top_k <= 2048) & (top_p < 1)   # min_p left fewer: top_k 523, gathered
    assert both.sum() == 5 and gathered.sum() == 1 and ((top_k > 2048) & ~both).any() and ((top_p < 1) & ~both).any()
    ranks = [torch.load(tmp_path / f"joint-{r}.pt") for r in range(world_size)]
    for dtype in (torch.float32, torch.bfloat16):
        z = x.to(dtype).double()
        ids = x.argmax(-1)
        want = reference.kept_set(z, min_p=min_p, top_k=top_k, top_p=top_p)
        assert want.sum(-1).min() >= 1 and (want.sum(-1) < 3000).all()
        want_logp, want_ent = reference.token_logprobs(z, ids, return_entropy=True, min_p=min_p, top_k=top_k,
                                                       top_p=top_p)
        for backend in ("triton", "torch"):
            got = [r[str(dtype), backend] for r in ranks]
            kept = torch.cat([g["grad"] for g in got], -1) != 0
            kept[torch.arange(12), ids] = True
            for row in range(12):
                assert torch.equal(kept[row], want[row]), (dtype, backend, row)
            for g in got:
                assert max_rel_err(g["logp"], want_logp) <= FP32_RTOL, (dtype, backend)
                assert max_rel_err(g["ent"], want_ent) <= FP32_RTOL, (dtype, backend)
                assert torch.equal(g["reads"], got[0]["reads"]) and torch.equal(g["sums"], got[0]["sums"])
            reads, sums = got[0]["reads"], got[0]["sums"]
            assert (reads[both] == 3).all() and (sums[both] == 0).all(), (dtype, backend, reads, sums)
            assert reads[~both].max() <= 3, (dtype, backend, reads)


def _smallest_kept(x, top_k, top_p):
    """Each row's smallest token that the float64 sort keeps (ids (R,))."""
    import reference

    keep = reference.kept_set(x.detach().double(), top_k=top_k, top_p=top_p)
    return torch.where(keep, x.detach(), math.inf).argmin(-1)


def _tp_gather_worker(rank, world_size, out_dir):
    import mhpo_kernels
    import torch.distributed as dist
    from test_truncation import _fp32_rows_for_the_gather

    rows = list(_fp32_rows_for_the_gather())
    x = torch.stack([z for z, _, _, _ in rows])
    top_k, top_p = torch.tensor([k for _, k, _, _ in rows]), torch.tensor([p for _, _, p, _ in rows])
    ids = _smallest_kept(x, top_k, top_p)
    start, size = _split(x.shape[-1], world_size)[rank]
    all_reduce, shapes = dist.all_reduce, []

    def recorded(tensor, *args, **kwargs):
        shapes.append(tuple(tensor.shape))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = recorded
    out = {}
    for backend in ("triton", "torch"):
        reads, sums = torch.zeros(len(rows), dtype=torch.int64), torch.zeros(len(rows), dtype=torch.int64)
        _count_slice_reads(reads, sums)
        shapes.clear()
        with mhpo_kernels.use_backend(backend):
            leaf = x[:, start:start + size].clone().requires_grad_()
            logp, ent = mhpo_kernels.token_logprobs(leaf, ids, return_entropy=True, top_k=top_k, top_p=top_p,
                                                    tp_group=dist.group.WORLD)
            (logp + ent).sum().backward()
        out[backend] = dict(logp=logp.detach(), ent=ent.detach(), grad=leaf.grad, reads=reads, sums=sums,
                            all_reduces=list(shapes))
    torch.save(out, f"{out_dir}/gather-{rank}.pt")


def test_vocab_parallel_both_filters_gather_top_k_candidates(tmp_path):
    """top_k and top_p over 3 uneven slices of rows of 4,000 (``test_truncation._fp32_rows_for_the_gather``):
    a row gathers top_k's candidates once at most 2048 lie from its k-th value's bin up over every
    slice, each slice's after the slices before it, in the next pass's place, and decides both
    filters from them with the kept tokens' sums (``slice_select._decide_gathered``): the
    selection reads each slice twice (one counting pass, the gather) or three times (two). 2500
    tokens tied at the k-th value: the third pass gathers the 10 above them and counts their bin
    key by key. A top_k of 3000, above what the gather holds, of 2200 with 2500 tokens tied at its
    k-th value, or of 2601 with 2500 tied 1 above it and a top_p that keeps them all: both filters
    side by side, three passes (``slice_select._joint``). No pass of sums after; a top_k of the
    whole row is off (top_p's passes alone). The rows of each kind share each pass's launch and its all-reduces: 3 of N × 2 × 2048 counts (top-k's runs beside
    top-p's), 3 of the sums, and one of N × 3 counts for each pass that may gather. On both
    paths every row has the float64 oracle's log-probs, entropy and gradient."""
    import reference
    from _cases import FP32_RTOL, max_rel_err
    from test_truncation import _fp32_rows_for_the_gather

    world_size = 3
    _dist.run(_tp_gather_worker, world_size, tmp_path, str(tmp_path))
    rows = list(_fp32_rows_for_the_gather())
    x = torch.stack([z for z, _, _, _ in rows]).double().requires_grad_()
    top_k, top_p = torch.tensor([k for _, k, _, _ in rows]), torch.tensor([p for _, _, p, _ in rows])
    ids = _smallest_kept(x, top_k, top_p)
    logp, ent = reference.token_logprobs(x, ids, return_entropy=True, top_k=top_k, top_p=top_p)
    (logp + ent).sum().backward()
    ranks = [torch.load(tmp_path / f"gather-{r}.pt") for r in range(world_size)]
    for backend in ("triton", "torch"):
        assert max_rel_err(torch.cat([r[backend]["grad"] for r in ranks], -1), x.grad) <= FP32_RTOL, backend
        for r in ranks:
            assert max_rel_err(r[backend]["logp"], logp) <= FP32_RTOL, backend
            assert max_rel_err(r[backend]["ent"], ent) <= FP32_RTOL, backend
        reads, sums = ranks[0][backend]["reads"], ranks[0][backend]["sums"]
        assert all(torch.equal(reads, r[backend]["reads"]) for r in ranks), backend
        assert reads[:4].tolist() == [2, 3, 3, 3] and reads[5:].tolist() == [3, 3], (backend, reads)
        assert sums[:4].sum() == sums[5:].sum() == 0, (backend, sums)
        assert reads[4] <= 3, (backend, reads)   # top_p alone
        shapes = ranks[0][backend]["all_reduces"]
        n = len(rows)
        assert shapes.count((n, 2, 2048)) == 3 and shapes.count((n, world_size)) == 2, (backend, shapes)
        assert len(shapes) == 3 + 3 + 2, (backend, shapes)   # and the passes' sums


def _tp_last_pass_worker(rank, world_size, out_dir):
    import mhpo_kernels
    import reference
    import torch.distributed as dist
    from mhpo_kernels import slice_select
    from test_truncation import _rows_for_the_last_pass

    decide, by_the_middle = slice_select._decide, []

    def decide_spy(cnt, w_lo, w_hi, above, s_hi, s_in, goal, shift, last, by_mass):
        by_the_middle.append(bool(last and ((shift > 0) & (cnt.sum(-1) > 0)).any()))
        return decide(cnt, w_lo, w_hi, above, s_hi, s_in, goal, shift, last, by_mass)

    slice_select._decide = decide_spy
    out = []
    for z, top_p in _rows_for_the_last_pass():
        x = torch.from_numpy(z).reshape(1, -1)
        keep = reference.kept_set(x.double(), top_p=top_p)[0]
        ids = torch.where(keep, x.flatten(), math.inf).argmin().reshape(1)   # the smallest kept
        start, size = _split(x.shape[-1], world_size)[rank]
        row = {}
        for backend in ("triton", "torch"):
            by_the_middle.clear()
            with mhpo_kernels.use_backend(backend):
                leaf = x[:, start:start + size].clone().requires_grad_()
                logp, ent = mhpo_kernels.token_logprobs(leaf, ids, return_entropy=True, top_p=top_p,
                                                        tp_group=dist.group.WORLD)
                (logp + ent).sum().backward()
            row[backend] = dict(logp=logp.detach(), ent=ent.detach(), grad=leaf.grad, middle=any(by_the_middle))
        out.append(row)
    torch.save(out, f"{out_dir}/last-{rank}.pt")


def test_vocab_parallel_top_p_last_pass(tmp_path):
    """Rows whose top_p cutoff lies among the densest fp32 keys, near the largest
    (``test_truncation._rows_for_the_last_pass``), split over 2 slices: the selection's last pass
    decides bins of several keys by the middle of their bounds, as in one launch, and the kept set
    is the sort's (each kept token's gradient non-zero, every other one's zero), with the float64
    oracle's log-probs and entropy, on both paths."""
    import reference
    from test_truncation import _rows_for_the_last_pass
    from _cases import FP32_RTOL, max_rel_err

    world_size = 2
    _dist.run(_tp_last_pass_worker, world_size, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"last-{r}.pt") for r in range(world_size)]
    middle = {"triton": 0, "torch": 0}
    for i, (z, top_p) in enumerate(_rows_for_the_last_pass()):
        x = torch.from_numpy(z).reshape(1, -1).double().requires_grad_()
        keep = reference.kept_set(x.detach(), top_p=top_p)[0]
        ids = torch.where(keep, x.detach().flatten(), math.inf).argmin().reshape(1)
        logp, ent = reference.token_logprobs(x, ids, return_entropy=True, top_p=top_p)
        (logp + ent).sum().backward()
        for backend in middle:
            got = [r[i][backend] for r in ranks]
            assert torch.equal(torch.cat([g["grad"] for g in got], -1)[0] != 0, x.grad[0] != 0), (i, backend)
            assert torch.equal(x.grad[0] != 0, keep), i
            for g in got:
                assert max_rel_err(g["logp"], logp.detach()) <= FP32_RTOL and max_rel_err(g["ent"], ent.detach()) <= FP32_RTOL
            middle[backend] += got[0]["middle"]
    assert min(middle.values()) >= 4, middle


def _edge_rows():
    """(logits (5, 24), ids, filters) of five rows over 2 slices of 12: +0 and −0, tied largest,
    one in each slice (top_k 1 keeps both); a slice whose kept tokens lie 160 below the largest
    (top_k 24 keeps every token; their sum at the common base would be 0 in fp32) holding the
    target; a row of −inf only with min_p and top_k on (no finite softmax: not truncated); +0
    twice and −0 twice, one of each in each slice, with top_k 1, and +0 three times in the first
    slice and −0 three times in the second with top_k 2 (the last pass's single keys start at
    +0's: −0 is the same value, kept with it)."""
    g = torch.Generator().manual_seed(50)
    x = torch.randn(5, 24, generator=g) - 3.0
    x[0, 0], x[0, 12] = 0.0, -0.0
    x[1, 0] = 110.0
    x[2] = -math.inf
    x[3, [0, 12]], x[3, [1, 13]] = 0.0, -0.0
    x[4, 0:3], x[4, 12:15] = 0.0, -0.0
    ids = torch.tensor([0, 15, 3, 0, 13])
    filters = dict(min_p=torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0]), top_k=torch.tensor([1, 24, 3, 1, 2]))
    return x, ids, filters


def _tp_edge_rows_worker(rank, world_size, out_dir):
    import mhpo_kernels
    import torch.distributed as dist

    x, ids, filters = _edge_rows()
    start, size = _split(24, world_size)[rank]
    out = {}
    for backend in ("triton", "torch"):
        with mhpo_kernels.use_backend(backend):
            leaf = x[:, start:start + size].clone().requires_grad_()
            logp, ent = mhpo_kernels.token_logprobs(leaf, ids, return_entropy=True, tp_group=dist.group.WORLD, **filters)
            (torch.where(logp.isinf(), 0.0, logp) + ent).sum().backward()
        out[backend] = dict(logp=logp.detach(), ent=ent.detach(), grad=leaf.grad)
    torch.save(out, f"{out_dir}/edge-{rank}.pt")


def test_vocab_parallel_filters_edge_rows(tmp_path):
    """Rows at the edges of the selection over 2 slices (``_edge_rows``) give the one-process
    log-probs, entropy and gradient (the PyTorch path's, which the Triton path's equal elsewhere)
    on each path, NaN where it gives NaN: ties of +0 and −0 across slices kept together, a slice
    far below the largest summed at its own base, a row without a finite logit left untruncated."""
    import mhpo_kernels
    from _cases import FP32_RTOL, max_rel_err

    world_size = 2
    _dist.run(_tp_edge_rows_worker, world_size, tmp_path, str(tmp_path))
    x, ids, filters = _edge_rows()
    ranks = [torch.load(tmp_path / f"edge-{r}.pt") for r in range(world_size)]
    leaf = x.clone().requires_grad_()
    with mhpo_kernels.use_backend("torch"):
        logp, ent = mhpo_kernels.token_logprobs(leaf, ids, return_entropy=True, **filters)
        (torch.where(logp.isinf(), 0.0, logp) + ent).sum().backward()
    assert abs(logp[0].item() + math.log(2)) < 1e-6 and logp[1].isfinite() and logp[2].isnan(), logp
    assert abs(logp[3].item() + math.log(4)) < 1e-6 and abs(logp[4].item() + math.log(6)) < 1e-6, logp
    for backend in ("triton", "torch"):
        grad = torch.cat([r[backend]["grad"] for r in ranks], -1)
        assert torch.equal(grad.isnan(), leaf.grad.isnan()), backend
        assert max_rel_err(grad.nan_to_num(), leaf.grad.nan_to_num()) <= FP32_RTOL, backend
        for r in ranks:
            for name, want in (("logp", logp), ("ent", ent)):
                got = r[backend][name]
                assert torch.equal(got.isnan(), want.isnan()), (backend, name, got, want)
                assert max_rel_err(got.nan_to_num(), want.detach().nan_to_num()) <= FP32_RTOL, (backend, name, got, want)



def _min_p_tie_inputs(R=8, V=37):
    """Rows whose largest logit is in the first of two slices (20 and 17), with two equal logits,
    one in each slice, exactly at min_p's threshold (min_p = their ratio to the largest), each
    row twice: the target on the one copy, then on the other."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(R, V, generator=g)
    min_p = torch.empty(R)
    for r in range(R):
        x[r, 2] = 3.0 + r * 0.37
        x[r, 5] = x[r, 25] = x[r, 2] - (1.3 + 0.21 * r)
        min_p[r] = math.exp(x[r, 5].item() - x[r, 2].item())
    return torch.cat([x, x]), torch.tensor([5] * R + [25] * R), torch.cat([min_p, min_p])


def _min_p_tie_calls(x, ids, min_p, tp_group, backend):
    """(log-probs, their gradient) on the logits path and on the fused linear path (one-hot hidden
    states, the head the logits' transpose: the same logits, exactly)."""
    import mhpo_kernels

    out = []
    with mhpo_kernels.use_backend(backend):
        for linear in (False, True):
            leaf = (x.T if linear else x).clone().requires_grad_()
            if linear:
                lp = mhpo_kernels.fused_linear_token_logprobs(torch.eye(x.shape[0]), leaf, ids, min_p=min_p,
                                                              tp_group=tp_group)
            else:
                lp = mhpo_kernels.token_logprobs(leaf, ids, min_p=min_p, tp_group=tp_group)
            torch.where(lp.isinf(), 0.0, lp).sum().backward()
            out.append((lp.detach(), leaf.grad.T if linear else leaf.grad))
    return out


def _tp_min_p_tie_worker(rank, world_size, out_dir):
    import torch.distributed as dist

    x, ids, min_p = _min_p_tie_inputs()
    start, size = ((0, 20), (20, 17))[rank]
    torch.save({b: _min_p_tie_calls(x[:, start:start + size], ids, min_p, dist.group.WORLD, b)
                for b in ("triton", "torch")}, f"{out_dir}/min-p-tie-{rank}.pt")


def test_vocab_parallel_min_p_keeps_ties_at_the_threshold_together(tmp_path):
    """min_p's threshold on d at the largest slice base, alike on every rank: two equal logits at
    it, one in each slice, are both kept on every rank, as in one process (the slices' own
    thresholds, each at its own base, rounded apart and dropped one), on the logits and the fused
    linear paths, both backends; the gradient is the slices' of one process's."""
    from _cases import FP32_RTOL, max_rel_err

    _dist.run(_tp_min_p_tie_worker, 2, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"min-p-tie-{r}.pt") for r in range(2)]
    x, ids, min_p = _min_p_tie_inputs()
    for backend in ("triton", "torch"):
        for path, (want_lp, want_grad) in enumerate(_min_p_tie_calls(x, ids, min_p, None, backend)):
            R = ids.numel() // 2
            assert want_lp[:R].isfinite().sum() > 0 and torch.equal(want_lp[:R].isinf(), want_lp[R:].isinf())
            for got in (r[backend][path] for r in ranks):
                assert torch.equal(got[0].isinf(), want_lp.isinf()), (backend, path, got[0], want_lp)
                fin = want_lp.isfinite()
                assert max_rel_err(got[0][fin], want_lp[fin]) <= FP32_RTOL, (backend, path)
            grad = torch.cat([ranks[0][backend][path][1], ranks[1][backend][path][1]], -1)
            assert max_rel_err(grad, want_grad) <= FP32_RTOL, (backend, path)
