"""A new batch shape never means a new compile.

Triton compiles a kernel once per specialization key: the constexprs, the launch options, each
argument's type, and, unless the parameter is ``do_not_specialize``d, whether an integer is 1 or
divisible by 16 and whether a data pointer is 16-byte aligned. The integers that move with the
batch (N, T, the row strides T·V or (T + 1)·V, the split count and length) must not be in it.

Each case below is a public call with its backward, made over 30 batch shapes (B and T in
1..64, the four logits layouts the entry points take; the fused linear path's chunks of a few
rows) at a fixed V and dtype, with the launches recorded instead of run
(``bench.specialization``): the keys are those Triton's launcher would compute for an sm_90 GPU.
Every kernel variant (a kernel and its constexpr flags) must have one key. V is odd, so that the
row strides T·V and (T + 1)·V fall on every residue mod 16 as T varies; V's own divisibility,
the dtype and the data pointers' alignment do choose the variant (the loops rely on 16-byte
aligned data pointers for their vectors), and stay fixed here. A few cases again at a V that is
a multiple of 16, where the rows are aligned (the kernels' ROWS_ALIGNED) at every batch.
"""

import inspect
import random

import pytest
import torch

import mhpo_kernels
from bench.specialization import (constexpr_values, recorded_launches, runtime_arguments, specialize,
                                  specialization_key)
from mhpo_kernels import _config, objectives
from mhpo_kernels.kernels import backward, forward, select

V = 151935          # Qwen's vocabulary less one: odd, 38 blocks, so up to 16 splits of a row
ALIGNED_V = 151936  # Qwen's
DTYPE = torch.bfloat16
# The fused linear cases compute their logits tiles (real GEMMs): a V of their own, odd too and
# past one block, so the same block shape, at a 37th of the cost; and a small hidden size.
V_LINEAR = 4099
H = 8
N_SHAPES = 30  # an integer is keyed on = 1, % 16 == 0 or neither: the 10 fixed shapes give each
KERNELS = (forward._mhpo_fwd_kernel, backward._mhpo_bwd_kernel, backward._scale_rows_kernel, select._select_kernel)
LAYOUTS = ("contiguous", "shifted", "sliced", "flat")


def _shapes():
    """N_SHAPES (B, T, layout, splits): the shapes where an integer is 1 or 16 first, then random ones.
    ``splits`` is what ``launch_splits`` would give a small N on the GPU (forced here)."""
    rng = random.Random(0)
    fixed = [(1, 1, "contiguous"), (1, 1, "shifted"), (1, 1, "flat"), (1, 16, "contiguous"), (16, 1, "sliced"),
             (1, 15, "shifted"), (2, 8, "flat"), (16, 16, "contiguous"), (64, 64, "shifted"), (3, 5, "sliced")]
    shapes = [(b, t, layout, 2 + i % 15) for i, (b, t, layout) in enumerate(fixed)]
    while len(shapes) < N_SHAPES:
        shapes.append((rng.randint(1, 64), rng.randint(1, 64), rng.choice(LAYOUTS), rng.randint(2, 16)))
    return shapes


class _Head(torch.autograd.Function):
    """A model's output: logits that require grad, never written or read (the launches that
    would read them are only recorded), so a 64 × 65 × V batch costs no memory traffic.
    ``strides``: a layout of its own, not a view, so that the in-place cases may overwrite it and
    its gradient needs no buffer-sized zeros."""

    @staticmethod
    def forward(ctx, w, shape, strides):
        return torch.empty_strided(shape, strides, dtype=DTYPE)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros(1), None, None


class Batch:
    def __init__(self, B, T, layout, rng, V=V):
        self.w = torch.zeros(1, requires_grad=True)
        # "sliced": (B, T + 1, V)[:, :-1], the rows of a shifted batch read in place
        shape, strides = {"flat": ((B * T, V), (V, 1)), "contiguous": ((B, T, V), (T * V, V, 1)),
                          "shifted": ((B, T + 1, V), ((T + 1) * V, V, 1)),
                          "sliced": ((B, T, V), ((T + 1) * V, V, 1))}[layout]
        self.logits = _Head.apply(self.w, shape, strides)
        token_shape = (B * T,) if layout == "flat" else (B, T)
        self.ids = torch.randint(0, V, token_shape, generator=rng)
        self.old = -torch.rand(token_shape, generator=rng) - 0.5
        self.adv = torch.randn(token_shape, generator=rng)
        self.tau = torch.rand(token_shape, generator=rng) + 0.5


def _backward(*outputs):
    sum(x.sum() for x in outputs).backward()


# name -> the public call and its backward on a Batch; each launches one forward variant (two
# with splits) and its backward.
LOGITS_CASES = {
    "logprobs": lambda b: _backward(mhpo_kernels.token_logprobs(b.logits, b.ids)),
    "logprobs-entropy": lambda b: _backward(*mhpo_kernels.token_logprobs(b.logits, b.ids, return_entropy=True)),
    "logprobs-tau-inplace": lambda b: _backward(mhpo_kernels.token_logprobs(b.logits, b.ids, temperature=b.tau,
                                                                           inplace_backward=True)),
    "loss-on-policy": lambda b: _backward(mhpo_kernels.mhpo_loss(b.logits, b.ids, None, b.adv)),
    "loss-old": lambda b: _backward(mhpo_kernels.mhpo_loss(b.logits, b.ids, b.old, b.adv)),
    "loss-entropy-old-ref": lambda b: _backward(mhpo_kernels.mhpo_loss(
        b.logits, b.ids, b.old, b.adv, ref_logprobs=b.old, beta=0.1, entropy_coef=0.01)),
    "loss-tau-entropy-old-ref": lambda b: _backward(mhpo_kernels.mhpo_loss(
        b.logits, b.ids, b.old, b.adv, ref_logprobs=b.old, beta=0.1, entropy_coef=0.01, temperature=b.tau)),
    "ppo-clip": lambda b: _backward(mhpo_kernels.policy_loss(b.logits, b.ids, b.old, b.adv,
                                                             objective=objectives.PPOClip())),
    "gspo": lambda b: _backward(mhpo_kernels.policy_loss(b.logits, b.ids, b.old, b.adv[..., :1].expand_as(b.adv),
                                                         objective=objectives.GSPO())),
    "grad-in-forward": lambda b: _backward(mhpo_kernels.mhpo_loss(b.logits, b.ids, b.old, b.adv,
                                                                  grad_in_forward=True)),
    "grad-in-forward-inplace": lambda b: _backward(mhpo_kernels.mhpo_loss(
        b.logits, b.ids, b.old, b.adv, ref_logprobs=b.old, beta=0.1, grad_in_forward=True, inplace_backward=True)),
    # A truncated softmax: the log-probs' sweep and a loss's (whose epilogue runs after it) launch
    # the same variants, with the min_p pass, or the statistics, the selection and the finish.
    "logprobs-min-p": lambda b: _backward(mhpo_kernels.token_logprobs(b.logits, b.ids, min_p=0.1)),
    "loss-on-policy-min-p": lambda b: _backward(mhpo_kernels.mhpo_loss(b.logits, b.ids, None, b.adv, min_p=0.1)),
    "logprobs-top-k": lambda b: _backward(mhpo_kernels.token_logprobs(b.logits, b.ids, top_k=20)),
    "loss-on-policy-top-k": lambda b: _backward(mhpo_kernels.mhpo_loss(b.logits, b.ids, None, b.adv, top_k=20)),
}
# Rows split over programs (small N on a GPU): the split forward, its combine, the split backward.
SPLIT_CASES = ("logprobs", "logprobs-entropy", "loss-entropy-old-ref", "loss-tau-entropy-old-ref")


def _linear(B, T, rng, **kwargs):
    """The fused linear path (softcapped, as Gemma's head): chunks of a random size, so each
    tile's row count varies too; kept to a few rows, the tiles' GEMMs being real (and the
    weight's gradient, whose GEMMs launch no kernel, not asked for)."""
    hidden = torch.randn(B, T, H, dtype=DTYPE, generator=rng, requires_grad=True)
    weight = torch.randn(V_LINEAR, H, dtype=DTYPE, generator=rng)
    ids = torch.randint(0, V_LINEAR, (B, T), generator=rng)
    chunk = int(torch.randint(max(1, B * T // 3), B * T + 1, (), generator=rng))  # at most 4 chunks
    return hidden, weight, ids, dict(final_logit_softcap=30.0, chunk_size=chunk, **kwargs)


def _linear_logprobs(B, T, rng):
    hidden, weight, ids, kw = _linear(B, T, rng)
    _backward(*mhpo_kernels.fused_linear_token_logprobs(hidden, weight, ids, return_entropy=True, **kw))


def _linear_loss(B, T, rng):
    hidden, weight, ids, kw = _linear(B, T, rng)
    old, adv = -torch.rand(B, T, generator=rng) - 0.5, torch.randn(B, T, generator=rng)
    _backward(mhpo_kernels.fused_linear_mhpo_loss(hidden, weight, ids, old, adv, **kw))


LINEAR_CASES = {"linear-softcap-logprobs-entropy": _linear_logprobs, "linear-softcap-loss": _linear_loss}


def _variant(launch):
    """A kernel variant: the kernel, its declared constexpr flags (not integers Triton made
    constexprs because they were 1: those are what this test looks for), the launch options."""
    params = inspect.signature(launch.kernel.fn).parameters
    declared = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    flags = {k: v for k, v in constexpr_values(launch).items() if k in declared}
    options = {k: v for k, v in launch.kwargs.items() if k not in declared}
    return (launch.name, tuple(sorted(flags.items())), tuple(sorted(options.items())))


def record_cases(v=V, cases=tuple(LOGITS_CASES), n_shapes=N_SHAPES, linear=True):
    """{case: [(shape, Launch)]} of the cases over the first ``n_shapes`` shapes at V = ``v``."""
    out = {}
    shapes = _shapes()[:n_shapes]
    for case in cases:
        call = LOGITS_CASES[case]
        for split in ((False, True) if case in SPLIT_CASES else (False,)):
            name = case + ("-split" if split else "")
            out[name] = []
            for i, (B, T, layout, splits) in enumerate(shapes):
                batch = Batch(B, T, layout, torch.Generator().manual_seed(i), v)
                with recorded_launches(*KERNELS) as recorded:
                    if split:
                        with _config.overridden(row_splits=splits):
                            call(batch)
                    else:
                        call(batch)
                out[name] += [((B, T, layout, splits if split else 1), launch) for launch in recorded]
    rng = random.Random(1)
    for case, call in LINEAR_CASES.items() if linear else ():
        out[case] = []
        for i in range(N_SHAPES):
            B, T = rng.randint(1, 3), rng.randint(1, 6)
            with recorded_launches(*KERNELS) as recorded:
                call(B, T, torch.Generator().manual_seed(i))
            out[case] += [((B, T, "linear", 1), launch) for launch in recorded]
    return out


@pytest.fixture(scope="module")
def launches():
    return record_cases()


@pytest.fixture(scope="module")
def aligned_launches():
    return record_cases(ALIGNED_V, ("logprobs", "loss-entropy-old-ref", "grad-in-forward"), 20, linear=False)


def keys_by_variant(launches):
    """{variant: {key: [(case, shape, launch)]}}."""
    by_variant = {}
    for case, recorded in launches.items():
        for shape, launch in recorded:
            by_variant.setdefault(_variant(launch), {}).setdefault(specialization_key(launch), []).append(
                (case, shape, launch))
    return by_variant


def _describe(keys):
    """What differs between a variant's keys: the arguments whose (type, specialization) or
    constexpr value is not the same in all of them, with a shape that gives each."""
    seen = {}
    for key, uses in keys.items():
        case, shape, launch = uses[0]
        args = runtime_arguments(launch)
        args.update({k: ("constexpr", v) for k, v in constexpr_values(launch).items() if k not in args})
        seen[key] = (case, shape, args)
    names = set().union(*(a for _, _, a in seen.values()))
    differ = sorted(n for n in names if len({str(a.get(n)) for _, _, a in seen.values()}) > 1)
    return "; ".join(f"{case} {shape}: " + ", ".join(f"{n}={args.get(n)}" for n in differ)
                     for case, shape, args in seen.values())


def test_every_case_launched_its_kernels(launches, aligned_launches):
    """The sweeps, or with grad_in_forward the one-sweep kernel and the rescale of its gradient;
    the fused linear loss makes its one sweep per tile and rescales nothing."""
    for case, recorded in {**launches, **aligned_launches}.items():
        expected = {"_mhpo_fwd_kernel", "_mhpo_bwd_kernel"}
        if case.startswith("grad-in-forward"):
            expected = {"_mhpo_fwd_kernel", "_scale_rows_kernel"}
        elif case.endswith("top-k"):
            expected = {"_mhpo_fwd_kernel", "_select_kernel", "_mhpo_bwd_kernel"}
        elif case == "linear-softcap-loss":
            expected = {"_mhpo_fwd_kernel"}
        assert {launch.name for _, launch in recorded} == expected, case
    splits = {dict(_variant(launch)[1]).get("SPLIT") for case, recorded in launches.items()
              if case.endswith("-split") for _, launch in recorded}
    assert splits == {1, 2, True}
    rows_aligned = {v: {dict(_variant(launch)[1])["ROWS_ALIGNED"] for recorded in cases.values()
                        for _, launch in recorded} for v, cases in ((V, launches), (ALIGNED_V, aligned_launches))}
    assert rows_aligned == {V: {False}, ALIGNED_V: {True}}


@pytest.mark.parametrize("recorded", ["launches", "aligned_launches"])
def test_one_key_per_kernel_variant(recorded, request):
    by_variant = keys_by_variant(request.getfixturevalue(recorded))
    assert len(by_variant) >= (20 if recorded == "launches" else 6)
    respecialized = {v: keys for v, keys in by_variant.items() if len(keys) > 1}
    assert not respecialized, "\n".join(
        f"{name} {dict(flags)}: {len(keys)} keys: {_describe(keys)}" for (name, flags, _), keys in respecialized.items())


def test_pointers_bound_as_on_the_gpu():
    """The binder sees a CPU tensor as if its storage began on a 256-byte boundary: for a tensor
    whose host address is 16-byte aligned, the same key as the tensor itself bound (Triton's own
    path for torch tensors); a view that starts 2 bytes in is unaligned either way."""
    x = torch.empty(4 * 16 + 1, dtype=DTYPE)
    target = torch.zeros(4, dtype=torch.int32)
    upstream = torch.tensor(0.5)
    assert x.data_ptr() % 16 == 0 and target.data_ptr() % 16 == 0
    with recorded_launches(backward._scale_rows_kernel) as recorded:
        backward.scale_rows_(x[:64].view(4, 1, 16), target, upstream)
        backward.scale_rows_(x[1:].view(4, 1, 16), target, upstream)
    aligned, view = recorded
    assert specialize(aligned).key == specialize(aligned, real_pointers=True).key
    assert runtime_arguments(aligned)["p_dx"] == ("*bf16", "D")
    assert specialize(view).key == specialize(view, real_pointers=True).key
    assert runtime_arguments(view)["p_dx"] == ("*bf16", "")


def test_bench_sass_compiles_the_key_of_any_batch():
    """``bench.sass`` compiles each variant from one launch of the launcher (meta tensors): any
    other batch, rows of more than 2³¹ elements in all (int64 strides either way) and splits of
    any count included, has the same key, so the SASS it measures is the SASS that runs."""
    from bench import sass

    batches = [(1, 1), (1, 16), (3, 7), (64, 65), (1, 14200), (3, 14200)]  # 14,200 · V > 2³¹
    for name, var in sass.variants().items():
        key = sass.launched(var).key
        for i, batch in enumerate(batches):
            splits = 2 + 3 * i if var.constexprs.get("SPLIT") else 1
            assert specialize(sass.launch_of(var, batch, splits)).key == key, (name, batch, splits)


# The one flag a batch's shape does choose: out of place, the gradient buffer of a (B, T + 1,
# V)[:, :-1] view takes the view's strides only when the gaps are small (T ≥ 8,
# ``ops.GRAD_GAP_SHARE``); below that it is contiguous, and at an odd V its rows are then out
# of phase with the logits' (DX_IN_PHASE False: the gradient's stores are not vectors).
SHAPE_CHOSEN = {"sliced": {"DX_IN_PHASE"}}


@pytest.mark.parametrize("recorded", ["launches", "aligned_launches"])
def test_variants_do_not_follow_the_batch(recorded, request):
    """Each call launches the same kernel variants at every shape of a layout: no flag the
    launchers derive from the tensors (ROWS_ALIGNED, DX_IN_PHASE, SPLIT) moves with B or T, but
    for the gradient buffer's phase above."""
    for case, recorded in request.getfixturevalue(recorded).items():
        by_shape = {}
        for (B, T, layout, splits), launch in recorded:
            name, flags, options = _variant(launch)
            flags = tuple((k, v) for k, v in flags if k not in SHAPE_CHOSEN.get(layout, ()))
            by_shape.setdefault(layout, {}).setdefault((B, T, splits), set()).add((name, flags, options))
        for layout, variants in by_shape.items():
            distinct = {frozenset(v) for v in variants.values()}
            assert len(distinct) == 1, (case, layout, [sorted(set(v) - set.intersection(*map(set, distinct)))
                                                       for v in distinct])
