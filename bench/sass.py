"""python -m bench.sass: what the compiled sweeps cost per logit, measured from sm_90 SASS without a GPU.

Compiles every sweep variant a public entry point can launch for an H100/H200 (sm_90), exactly as
the launchers specialize it: each variant's launch is made by the launcher itself on meta tensors
and recorded instead of run (``bench.specialization``), and the signature, constexprs and
divisibility attributes Triton's binder derives from it are what is compiled. V = 151,936 (rows
on 16-byte boundaries), and a representative subset again for rows that start anywhere (V =
151,935 and 50,257, contiguous: only the data pointers 16-byte aligned); the batch's own integers
(N, T, strides, splits) are never specialized (tests/test_specialization.py), so any batch gives
the same code. Disassembles the cubins with the ``nvdisasm`` that ships in Triton's wheel
(every kernel's code in one call: the tool's start-up, half a second, is most of its time), reads
registers and spills with its ``cuobjdump``, finds the steady-state loop (the backward branch
whose body holds the logits loads) and counts its instructions. The one-sweep kernel (``grad_in_forward``) has two
such loops inside its persistent loop over rows: both are counted, pass 1 against the forward's
budget and pass 2 (the loop that stores) against the backward's. Elements per thread per iteration come from the
loads themselves (bytes loaded per thread / element size), so the count per element is exact for
the loop as compiled, whatever the compiler unrolled.

These are compiled-code figures, not speed: they say whether the instruction issue of the loop
can keep up with the memory system (``bench/NOTES.md`` has the arithmetic), nothing more.

    python -m bench.sass [--json FILE] [--cubins DIR] [NAME ...]

Run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels).
"""

import argparse
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

from typing import NamedTuple

import torch
import triton
from triton.compiler import ASTSource

from bench.specialization import TARGET, constexpr_values, recorded_launches, specialize
from mhpo_kernels import _config
from mhpo_kernels._sweep_types import LogitMap, RowStats, TokenParams
from mhpo_kernels.kernels.backward import _mhpo_bwd_kernel, _scale_rows_kernel, mhpo_bwd, scale_rows_
from mhpo_kernels.kernels.forward import _mhpo_fwd_kernel, mhpo_fwd
from mhpo_kernels.kernels.replay import BLOCK_K, NUM_WARPS as REPLAY_WARPS, _replay_bwd_kernel, _replay_fwd_kernel
from mhpo_kernels.kernels.replay import replay_bwd, replay_fwd
from mhpo_kernels.kernels.select import _select_kernel, _slice_count_kernel, _slice_gather_kernel, slice_count
from mhpo_kernels.kernels.select import slice_gather

V = 151936  # Qwen's vocabulary: a multiple of 16, so rows are 16-byte aligned
# Qwen's less one and GPT-2's: no stride or V divisible by anything, so rows start at every
# residue mod 16 bytes. V is a runtime argument, so both compile to the same code (the same
# block shape: V ≥ 4096); both are reported so that the table names the case it stands for.
UNALIGNED_V = (151935, 50257)
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The batch the variants are launched with: any other gives the same signature.
BATCH = (4, 512)
SPLITS = 2
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# The budgets the CI test holds the loops to (instructions and MUFU ops per logit).
# The rescale of grad_in_forward's gradient reads and writes each element, as the backward does.
BUDGET = {"fwd": 10.0, "fwd-softcap": 20.0, "bwd": 12.0, "bwd-softcap": 24.0, "scale": 12.0}
MUFU_BUDGET = 1.25  # outside softcap
# A selection pass of top-k or top-p (kernels/select.py) does more per logit than the statistics
# pass: a key, a bin, a warp-level histogram (tl.histogram: a ballot per bit of the bin, then
# shared-memory atomics), and for top-p two masked sums. Its own budget, from the measured loops
# (bench/NOTES.md).
BUDGET["select"] = 28.0
# A loop that does two selection loops' work in one read of an fp32 row with top-k and top-p:
# both filters counted (``_joint_pass``, two histograms per logit: top-p's uniform pass with
# top-k's first, or both runs of keys), or the tokens above top-k's bin gathered while the bin is
# counted (``_gather_pass`` with COUNT, a histogram and a one-word store per logit). Held to the
# largest pair it fuses: top-k's pass over several keys and top-p's over keys with the masses
# above and within (16.94 + 25.56 under 3.9; the others: 16.94 + 20.69, 16.94 + 24.62).
BUDGET["select-fused"] = 42.5
# Over a vocabulary split (``_slice_count_kernel``) every pass over keys sums the masses above and
# within its range (24.69 under 3.9), and the last its masses and Σ 2^d·d at the slice's own base
# (19.81): a loop that counts top-k's run beside top-p's (the uniform pass with top-k's first
# keys, both runs, or both runs with the sums at the slice's base) is held to the pair it fuses
# in the last pass, top-k's pass over keys and top-p's last (24.69 + 19.81).
BUDGET["select-fused-slices"] = 44.5
# Replay's loops (kernels/replay.py) gather one kept id per thread per step: an id load, a
# scattered logit load, the lane's online log-sum-exp with a rebase per id (two MUFU), or the
# gradient element. More work per logit than a sweep, on K of V logits: their own budget, from
# the measured loops (bench/NOTES.md).
BUDGET["replay"] = 40.0
REPLAY_MUFU_BUDGET = 2.0
# Registers per thread: at most 64 lets 4 programs of 8 warps share an SM, 32–64 KiB of loads in
# flight (bench/NOTES.md). The budgets above are the hardware's and hold for every compiler; the
# code a Triton version generates for a variant may need more registers, and where it was
# measured to, the variant and what it took are named here under that version (major.minor), so
# that the test on a machine with that Triton (the GPU image has 3.6) holds what is known and
# nothing else. 3.6: the split bf16 softcap backward with the entropy gradient takes 94 (2
# programs per SM, at small N only, where rows are split; 64 under 3.9), report
# bench/results/sass-sm90-triton3.6.json.
REGISTER_LIMIT = 64
REGISTER_EXCEPTIONS = {"3.6": {"bwd-bf16-split-softcap-entropy": 96}}


# The selection launch (top-k, top-p) keeps a 2048-bin histogram and its per-bin bounds per
# program, and is bound by its instructions, not by the loads in flight: up to 128 registers
# (2 programs of 8 warps per SM). Its own kernel, so the sweeps keep theirs.
SELECT_REGISTER_LIMIT = 128


def register_limit(name, version=triton.__version__):
    """The registers a variant may take under Triton ``version``."""
    limit = SELECT_REGISTER_LIMIT if name.startswith("select-") else REGISTER_LIMIT
    return REGISTER_EXCEPTIONS.get(".".join(version.split(".")[:2]), {}).get(name, limit)

_FWD_OFF = dict(SOFTCAP=False, WITH_ENTROPY=False, WITH_LOSS=False, HAS_OLD=False, HAS_REF=False,
                HAS_TAU=False, MIN_P=False, SELECTED=False, LOW16=False, OBJECTIVE=0, LFM=True, DHP=True,
                GRAD_IN_FORWARD=False, DX_IN_PHASE=False, SPLIT=0)
_LOSS = dict(WITH_LOSS=True, HAS_OLD=True, HAS_REF=True)
# name suffix -> constexpr flags; the forward's epilogue flags do not touch the loop, but each
# combination a public entry point launches is compiled (and so held to the budget) all the same.
FWD_FLAGS = {
    "logprobs": {},                                                     # token_logprobs
    "entropy": dict(WITH_ENTROPY=True),                                 # ..., return_entropy=True
    "loss": dict(WITH_LOSS=True),                                       # mhpo_loss, on-policy
    "loss-old-ref": dict(WITH_LOSS=True, HAS_OLD=True, HAS_REF=True),
    "loss-entropy-old-ref": dict(WITH_LOSS=True, HAS_OLD=True, HAS_REF=True, WITH_ENTROPY=True),
    # policy_loss's other epilogues (GSPO runs the log-probs sweep and its epilogue in PyTorch)
    "loss-old-ref-mhpo-ablated": dict(**_LOSS, LFM=False, DHP=False),
    "loss-old-ref-ppo-clip": dict(**_LOSS, OBJECTIVE=1),
    "loss-old-ref-cispo": dict(**_LOSS, OBJECTIVE=2),
    "loss-old-ref-sapo": dict(**_LOSS, OBJECTIVE=3),
    "loss-old-ref-gpg": dict(**_LOSS, OBJECTIVE=4),
    "softcap-logprobs": dict(SOFTCAP=True),                             # fused linear, softcapped
    "softcap-loss-entropy-old-ref": dict(SOFTCAP=True, WITH_LOSS=True, HAS_OLD=True, HAS_REF=True,
                                         WITH_ENTROPY=True),
    # a per-token temperature: τ_t is a row constant, the loop must not move
    "tau-loss-entropy-old-ref": dict(HAS_TAU=True, WITH_LOSS=True, HAS_OLD=True, HAS_REF=True,
                                     WITH_ENTROPY=True),
    "softcap-tau-logprobs": dict(SOFTCAP=True, HAS_TAU=True),
    # the sampler's truncated softmax (token_logprobs(min_p=...)): pass 1 the statistics, pass 2
    # the kept tokens' sums (``pass2``), one compare and select per logit more
    "minp-logprobs": dict(MIN_P=True),
    "minp-entropy": dict(MIN_P=True, WITH_ENTROPY=True),
    # top_k / top_p: after the statistics launch (the split forward's loop, one split) and the
    # selection launch (``select-*`` below), the finish: its one loop is the kept tokens' sums
    "selected-logprobs": dict(SELECTED=True, SPLIT=2),
    "selected-entropy": dict(SELECTED=True, WITH_ENTROPY=True, SPLIT=2),
}
# The selection launch (kernels/select.py): its counting loops, each held to its own budget
# (``BUDGET["select"]``), in code order: top-k's over bins of several keys, then its pass of
# single keys (which also sums the kept tokens); top-p's uniform first pass, its passes over
# bins of several keys, its pass of single keys. With both filters, top-k's two, then top-p's three.
SELECT_FLAGS = {
    "topk": dict(SOFTCAP=False, HAS_TAU=False, MIN_P=False, TOP_K=True, TOP_P=False),
    "topp": dict(SOFTCAP=False, HAS_TAU=False, MIN_P=False, TOP_K=False, TOP_P=True),
    "minp-topk-topp": dict(SOFTCAP=False, HAS_TAU=False, MIN_P=True, TOP_K=True, TOP_P=True),
    # the pass of single keys also sums the kept tokens' Σ 2^d·d for the entropy
    "topk-entropy": dict(SOFTCAP=False, HAS_TAU=False, WITH_ENTROPY=True, MIN_P=False, TOP_K=True, TOP_P=False),
    "topp-entropy": dict(SOFTCAP=False, HAS_TAU=False, WITH_ENTROPY=True, MIN_P=False, TOP_K=False, TOP_P=True),
}
# top-k and top-p over a vocabulary split: one counting pass a launch (kernels/select.py,
# ``_slice_count_kernel``), whose loops are the selection's: top-p's uniform pass, a pass over
# keys with the mass above and within, the kept tokens' sums (with the entropy's Σ 2^d·d); with
# both filters (JOINT) also top-p's uniform pass beside top-k's keys and both runs side by side
# (with the sums of d at the slice's own base); and the gather of top-k's candidates beside top-p
# (``_slice_gather_kernel``), the selection's gather loop, and the gather with top-k's bin counted.
SLICE_COUNT_FLAGS = dict(SOFTCAP=False, HAS_TAU=False)
# DX_IN_PHASE: the gradient is the logits (in place) or a tensor of the same strides, as the
# autograd ops allocate it for contiguous logits.
BWD_FLAGS = {
    "": dict(SOFTCAP=False, HAS_DENT=False, HAS_TAU=False, DX_IN_PHASE=True, SPLIT=False),
    "entropy": dict(SOFTCAP=False, HAS_DENT=True, HAS_TAU=False, DX_IN_PHASE=True, SPLIT=False),
    "softcap": dict(SOFTCAP=True, HAS_DENT=False, HAS_TAU=False, DX_IN_PHASE=True, SPLIT=False),
    "softcap-entropy": dict(SOFTCAP=True, HAS_DENT=True, HAS_TAU=False, DX_IN_PHASE=True, SPLIT=False),
    "tau-entropy": dict(SOFTCAP=False, HAS_DENT=True, HAS_TAU=True, DX_IN_PHASE=True, SPLIT=False),
    "softcap-tau-entropy": dict(SOFTCAP=True, HAS_DENT=True, HAS_TAU=True, DX_IN_PHASE=True, SPLIT=False),
    # a truncated softmax: the forward's threshold per row, a compare and select per logit
    "cut": dict(SOFTCAP=False, HAS_DENT=False, HAS_TAU=False, CUT=True, DX_IN_PHASE=True, SPLIT=False),
    "cut-entropy": dict(SOFTCAP=False, HAS_DENT=True, HAS_TAU=False, CUT=True, DX_IN_PHASE=True, SPLIT=False),
}

# grad_in_forward's one-sweep kernel (the forward kernel with GRAD_IN_FORWARD): two loops per
# row, pass 1 (the forward's) held to the forward budget, pass 2 (the gradient's) to the
# backward's. The gradient buffer has the logits' strides, or is the logits (DX_IN_PHASE).
ONE_SWEEP_DTYPES = ("bf16", "fp32")
ONE_SWEEP_FLAGS = {suffix: dict(FWD_FLAGS[suffix], GRAD_IN_FORWARD=True, DX_IN_PHASE=True)
                   for suffix in ("loss-old-ref", "loss-entropy-old-ref")}
ONE_SWEEP_UNALIGNED = ("bf16", "loss-entropy-old-ref", UNALIGNED_V[0])

# Rows split over programs (small N, ``_config.launch_splits``): each split's loop is the
# unsplit one from a block boundary, so the loops of the splits' forward (SPLIT=1) and of the
# split backward are held to the same budgets; the combine launch (SPLIT=2) reads no logits row.
# Every loop (log-probs, entropy, softcap) in bf16, the fp32 vector width once per sweep.
SPLIT_FWD = {"bf16": ("logprobs", "entropy", "softcap-logprobs"), "fp32": ("logprobs",)}
SPLIT_BWD = {"bf16": ("", "entropy", "softcap-entropy"), "fp32": ("entropy",)}
SPLIT_UNALIGNED = ("bf16", "logprobs", "entropy", UNALIGNED_V[0])  # dtype, forward, backward, V
# top_k / top_p on fp32 logits: the statistics launch (one split) also tests each row for bf16
# values (LOW16: an OR per lane, the low 16 bits taken once a row), which the selection then counts
# over bf16 keys.
LOW16_FWD = {"selected-stats": dict(SPLIT=1, LOW16=True),
             "selected-stats-entropy": dict(SPLIT=1, LOW16=True, WITH_ENTROPY=True)}

# Replay: the forward's gather loop; the backward's, GATHER (the gradient elements into the (K,)
# buffer) and the scatter of that buffer, bf16 and fp32.
REPLAY_DTYPES = ("bf16", "fp32")
REPLAY_FLAGS = {
    "fwd-logprobs": (_replay_fwd_kernel, dict(SOFTCAP=False, WITH_ENTROPY=False, HAS_TAU=False)),
    "fwd-entropy": (_replay_fwd_kernel, dict(SOFTCAP=False, WITH_ENTROPY=True, HAS_TAU=False)),
    "bwd-gather": (_replay_bwd_kernel, dict(GATHER=True, SOFTCAP=False, HAS_DENT=False, HAS_TAU=False)),
    "bwd-gather-entropy": (_replay_bwd_kernel, dict(GATHER=True, SOFTCAP=False, HAS_DENT=True, HAS_TAU=False)),
    "bwd-scatter": (_replay_bwd_kernel, dict(GATHER=False, SOFTCAP=False, HAS_DENT=False, HAS_TAU=False)),
}
REPLAY_STEP = BLOCK_K // (32 * REPLAY_WARPS)  # kept ids per thread per step (the compiler unrolls steps)

# The unaligned rows' subset: the loops differ only by dtype (vector width), entropy and softcap,
# so one of each; the other epilogues sit after the same loop.
UNALIGNED_DTYPES = ("bf16", "fp32")
UNALIGNED_FWD = ("logprobs", "loss-entropy-old-ref", "softcap-loss-entropy-old-ref")
UNALIGNED_BWD = ("", "entropy", "softcap-entropy")

# grad_in_forward's backward: its gradient times the loss's upstream gradient, in place, rows
# whose factor is 1 skipped (``backward.scale_rows_``); aligned and at the first unaligned V.
SCALE_DTYPES = ("bf16", "fp32")


class Variant(NamedTuple):
    kernel: object
    dtype: str
    constexprs: dict
    V: int
    aligned: bool   # V a multiple of 16, so contiguous rows start on 16-byte boundaries


def variants():
    """{name: Variant} for every sweep a public entry point can launch, aligned, then the
    unaligned subset (names ending in -v<V>)."""
    out = {}
    for dtype in ITEMSIZE:
        for suffix, flags in FWD_FLAGS.items():
            out[f"fwd-{dtype}-{suffix}"] = Variant(_mhpo_fwd_kernel, dtype, {**_FWD_OFF, **flags}, V, True)
        for suffix, flags in BWD_FLAGS.items():
            out[f"bwd-{dtype}" + (f"-{suffix}" if suffix else "")] = Variant(
                _mhpo_bwd_kernel, dtype, flags, V, True)
        for suffix, flags in SELECT_FLAGS.items():
            out[f"select-{dtype}-{suffix}"] = Variant(_select_kernel, dtype, flags, V, True)
        out[f"select-{dtype}-slices"] = Variant(_slice_count_kernel, dtype, {**SLICE_COUNT_FLAGS, "JOINT": False},
                                                V, True)
        out[f"select-{dtype}-slices-joint"] = Variant(_slice_count_kernel, dtype,
                                                      {**SLICE_COUNT_FLAGS, "JOINT": True}, V, True)
        out[f"select-{dtype}-slices-gather"] = Variant(_slice_gather_kernel, dtype, SLICE_COUNT_FLAGS, V, True)
    for dtype in ONE_SWEEP_DTYPES:
        for suffix, flags in ONE_SWEEP_FLAGS.items():
            out[f"onesweep-{dtype}-{suffix}"] = Variant(_mhpo_fwd_kernel, dtype, {**_FWD_OFF, **flags}, V, True)
    for dtype in SPLIT_FWD:
        for suffix in SPLIT_FWD[dtype]:
            out[f"fwd-{dtype}-split-{suffix}"] = Variant(
                _mhpo_fwd_kernel, dtype, {**_FWD_OFF, **FWD_FLAGS[suffix], "SPLIT": 1}, V, True)
        for suffix in SPLIT_BWD[dtype]:
            out[f"bwd-{dtype}-split" + (f"-{suffix}" if suffix else "")] = Variant(
                _mhpo_bwd_kernel, dtype, {**BWD_FLAGS[suffix], "SPLIT": True}, V, True)
    for suffix, flags in LOW16_FWD.items():
        out[f"fwd-fp32-{suffix}"] = Variant(_mhpo_fwd_kernel, "fp32", {**_FWD_OFF, **flags}, V, True)
    for v in UNALIGNED_V:
        for dtype in UNALIGNED_DTYPES:
            for suffix in UNALIGNED_FWD:
                out[f"fwd-{dtype}-{suffix}-v{v}"] = Variant(
                    _mhpo_fwd_kernel, dtype, {**_FWD_OFF, **FWD_FLAGS[suffix]}, v, False)
            for suffix in UNALIGNED_BWD:
                out[f"bwd-{dtype}" + (f"-{suffix}" if suffix else "") + f"-v{v}"] = Variant(
                    _mhpo_bwd_kernel, dtype, BWD_FLAGS[suffix], v, False)
    dtype, suffix, v = ONE_SWEEP_UNALIGNED
    out[f"onesweep-{dtype}-{suffix}-v{v}"] = Variant(
        _mhpo_fwd_kernel, dtype, {**_FWD_OFF, **ONE_SWEEP_FLAGS[suffix]}, v, False)
    dtype, fwd, bwd, v = SPLIT_UNALIGNED
    out[f"fwd-{dtype}-split-{fwd}-v{v}"] = Variant(
        _mhpo_fwd_kernel, dtype, {**_FWD_OFF, **FWD_FLAGS[fwd], "SPLIT": 1}, v, False)
    out[f"bwd-{dtype}-split-{bwd}-v{v}"] = Variant(
        _mhpo_bwd_kernel, dtype, {**BWD_FLAGS[bwd], "SPLIT": True}, v, False)
    for dtype in SCALE_DTYPES:
        out[f"scale-{dtype}"] = Variant(_scale_rows_kernel, dtype, {}, V, True)
        out[f"scale-{dtype}-v{UNALIGNED_V[0]}"] = Variant(_scale_rows_kernel, dtype, {}, UNALIGNED_V[0], False)
    for dtype in REPLAY_DTYPES:
        for suffix, (kernel, flags) in REPLAY_FLAGS.items():
            out[f"replay-{dtype}-{suffix}"] = Variant(kernel, dtype, flags, V, True)
    return out


def _replayed(var):
    return var.kernel in (_replay_fwd_kernel, _replay_bwd_kernel)


def _replay_bytes(var):
    """Bytes a replay loop loads per kept id: the int32 id and the logit, or (the scatter) the id
    and the fp32 gradient element; None for the sweeps."""
    if not _replayed(var):
        return None
    return 4 + (4 if var.constexprs.get("GATHER") is False else ITEMSIZE[var.dtype])


def launch_of(var, batch=BATCH, splits=SPLITS):
    """The launch the launcher makes for variant ``var``: (B, T, V) logits of its dtype, contiguous,
    and per-token tensors as the flags ask, all on the meta device, the launch recorded instead of
    run. A split variant is launched with ``splits`` splits per row. Raises if the launcher
    launches no kernel with the variant's flags (the table names only what runs)."""
    f = var.constexprs
    B, T = batch
    N = B * T
    logits = torch.empty(B, T, var.V, dtype=DTYPES[var.dtype], device="meta")
    target = torch.empty(N, dtype=torch.int32, device="meta")

    def per_token(present=True):
        return torch.empty(N, device="meta") if present else None

    def logit_map():
        return LogitMap.make(1.0, softcap=30.0 if f["SOFTCAP"] else None, tau=per_token(f["HAS_TAU"]),
                             min_p=per_token(f.get("MIN_P", False)),
                             top_k=torch.empty(N, dtype=torch.int32, device="meta") if f.get("TOP_K") else None,
                             top_p=per_token(f.get("TOP_P", False) or f.get("SELECTED", False) or f.get("LOW16", False)),
                             cut=per_token(f.get("CUT", False)))

    # The autograd ops' gradient buffer: the logits' layout (in phase), or the logits themselves.
    grad = torch.empty_like(logits)
    with recorded_launches(_mhpo_fwd_kernel, _select_kernel, var.kernel) as launches, _config.overridden(row_splits=splits if f.get("SPLIT") else None):
        if var.kernel in (_mhpo_fwd_kernel, _select_kernel):  # the forward launches the selection
            f = {**_FWD_OFF, **f}
            loss = f["WITH_LOSS"]
            hp = TokenParams(f["OBJECTIVE"], (1.5, 1.5, 1.0, 2.0, 0.8), 0.1, f["LFM"], f["DHP"])
            mhpo_fwd(logits, target, per_token(f["HAS_OLD"]), per_token(loss), per_token(loss),
                     per_token(f["HAS_REF"]), hp, logit_map(), with_entropy=f["WITH_ENTROPY"], with_loss=loss,
                     grad=grad if f["GRAD_IN_FORWARD"] else None)
            f = var.constexprs
        elif _replayed(var):
            lmap = LogitMap.make(1.0, kept_offsets=torch.empty(N + 1, dtype=torch.int64, device="meta"),
                                 kept_ids=torch.empty(8 * N, dtype=torch.int32, device="meta"))
            if var.kernel is _replay_fwd_kernel:
                out = RowStats.empty(N, "meta", with_entropy=f["WITH_ENTROPY"], with_loss=False)
                replay_fwd(logits, target, lmap, out, f["WITH_ENTROPY"])
            else:
                dent = f["HAS_DENT"]
                replay_bwd(logits, grad, target, per_token(), per_token(), per_token(), per_token(dent),
                           per_token(dent), lmap, f["GATHER"], torch.empty(8 * N, device="meta"))
        elif var.kernel is _slice_count_kernel:
            keys = torch.empty(N, dtype=torch.int64, device="meta")
            ints = torch.empty(N, dtype=torch.int32, device="meta")
            slice_count(logits, target, logit_map(), per_token(), ints, keys, keys, ints, per_token(), per_token(),
                        per_token(), (keys, keys, ints) if f["JOINT"] else None)
        elif var.kernel is _slice_gather_kernel:
            keys = torch.empty(N, dtype=torch.int64, device="meta")
            slots = torch.empty(N, 2, 2048, device="meta")
            first = torch.empty(N, dtype=torch.int32, device="meta")
            slice_gather(logits, target, logit_map(), per_token(), keys, first, keys, keys, slots[:, 0],
                         slots[:, 1].view(torch.int32))
        elif var.kernel is _mhpo_bwd_kernel:
            dent = f["HAS_DENT"]
            mhpo_bwd(logits, grad, target, per_token(), per_token(), per_token(), per_token(dent), per_token(dent),
                     logit_map())
        else:
            scale_rows_(grad, target, torch.empty((), device="meta"), 0.5)
    for launch in launches:
        if launch.kernel is not var.kernel:
            continue
        values = constexpr_values(launch)
        if all(values.get(k) == v for k, v in f.items()):
            assert values.get("ROWS_ALIGNED", var.aligned) == var.aligned, (var, values)  # replay: none
            return launch
    raise ValueError(f"the launcher launches no {var.kernel.__name__} with {f}: "
                     f"{[constexpr_values(launch) for launch in launches]}")


def launched(var):
    """``bench.specialization.Specialization`` of the variant's launch: its cache key and the
    signature, constexprs, attributes and options a compile for that key receives."""
    return specialize(launch_of(var), TARGET)


def compile_variant(var):
    """The compiled kernel of Variant ``var``, compiled as Triton's launcher would for its launch."""
    spec = launched(var)
    return triton.compile(ASTSource(var.kernel, spec.signature, spec.constexprs, spec.attrs), target=TARGET,
                          options=spec.options.__dict__)


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LDG_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _ldg_bytes(text):
    """Bytes one thread loads with this LDG (32-bit unless the width says otherwise)."""
    for part in text.split()[0].split(".")[1:]:
        if part in _LDG_BYTES:
            return _LDG_BYTES[part]
    return 4


def parse_sass(sass):
    """[(address, instruction text)] of a SASS listing (``nvdisasm`` or ``cuobjdump -sass``)."""
    return [(int(a, 16), t.strip()) for a, t in _INSTR.findall(sass)]


def _kernel_code(cubin):
    """The machine code of the one kernel in a cubin (an ELF64 file): its ``.text.<name>`` section."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * entsize) for i in range(count)]
    strtab = sections[names][4]
    code = [cubin[off:off + size] for name, _, _, _, off, size in sections
            if cubin[strtab + name:cubin.index(b"\0", strtab + name)].startswith(b".text.")]
    assert len(code) == 1, f"{len(code)} kernels in a cubin"
    return code[0]


def disassemble(cubins):
    """[[(address, instruction text)]] of each cubin's kernel, in order: their code laid end to end
    and disassembled by one ``nvdisasm`` call, then cut at each kernel's bounds (addresses, branch
    targets among them, count from the start of the first)."""
    code = [_kernel_code(c) for c in cubins]
    bounds = [sum(map(len, code[:i])) for i in range(len(code) + 1)]
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(b"".join(code))
        f.flush()
        out = subprocess.run([os.path.join(TOOLS, "nvdisasm"), "--binary", "SM90", f.name], capture_output=True,
                             text=True, check=True).stdout
    instrs = parse_sass(out)
    return [[(a, t) for a, t in instrs if lo <= a < hi] for lo, hi in zip(bounds, bounds[1:])]


def _loops(instrs):
    """[(bytes loaded per thread per iteration, body, innermost)] of every backward branch
    ``[target, branch]`` whose body holds a global load, in address order."""
    branches = []
    for i, (addr, text) in enumerate(instrs):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            branches.append((i, addr, int(m.group(1), 16)))
    loops = []
    for i, addr, start in branches:
        body = [t for a, t in instrs[: i + 1] if a >= start]
        loaded = sum(_ldg_bytes(t.split(" ", 1)[-1] if t.startswith("@") else t)
                     for t in body if re.search(r"(^|\s)LDG", t))
        innermost = not any(start <= a < addr for _, a, _ in branches if a != addr)
        if loaded:
            loops.append((loaded, body, innermost))
    return loops


def _block_loops(instrs):
    """[(bytes loaded per thread per iteration, body)] of the innermost loops that load a block of
    logits: those that load the most bytes per iteration, in address order. The loop over a row's
    segments holds a block loop (it is not innermost), and the combine's fold over a row's stored
    segments loads a few scalars (it loads less)."""
    inner = [(loaded, body) for loaded, body, innermost in _loops(instrs) if innermost]
    most = max((loaded for loaded, _ in inner), default=0)
    return [(loaded, body) for loaded, body in inner if loaded == most]


def steady_loop(instrs):
    """The instructions of the innermost loop that loads the most bytes per iteration: the body
    of a backward branch ``[target, branch]``. None if the code has no loop with a global load."""
    loops = _block_loops(instrs)
    return loops[0] if loops else None


def cut_loops(instrs):
    """The truncated forward's two loops, (pass 1, pass 2): the innermost loops with a global load,
    in address order, neither storing. None unless there are exactly two."""
    inner = _block_loops(instrs)
    if len(inner) != 2 or any(re.search(r"(^|\s)STG", t) for _, body in inner for t in body):
        return None
    return tuple(inner)


def steady_loops(instrs):
    """The one-sweep kernel's two steady-state loops, (pass 1, pass 2): the innermost loops with a
    global load (the persistent loop over rows holds both), pass 2 the one that stores. None
    unless there are exactly two such loops, one storing."""
    inner = [(loaded, body) for loaded, body, innermost in _loops(instrs) if innermost]
    storing = [bool(any(re.search(r"(^|\s)STG", t) for t in body)) for _, body in inner]
    if len(inner) != 2 or storing.count(True) != 1:
        return None
    return tuple(sorted(inner, key=lambda loop: any(re.search(r"(^|\s)STG", t) for t in loop[1])))


def _loop_report(loop, dtype, bytes_per_element=None):
    if loop is None:
        return {"elements_per_thread_per_iteration": None, "loop_instructions": None,
                "instructions_per_element": None, "mufu_per_element": None, "vector_loads": 0,
                "vector_stores": 0}
    loaded, body = loop
    body = [t for t in body if not t.endswith("NOP")]
    elements = loaded // (bytes_per_element or ITEMSIZE[dtype])
    mufu = sum(1 for t in body if "MUFU" in t)
    return {
        "elements_per_thread_per_iteration": elements,
        "loop_instructions": len(body),
        "instructions_per_element": round(len(body) / elements, 2),
        "mufu_per_element": round(mufu / elements, 3),
        "vector_loads": sum(1 for t in body if re.search(r"\bLDG\S*\.128\b", t)),
        "vector_stores": sum(1 for t in body if re.search(r"\bSTG\S*\.128\b", t)),
    }


def _selection_work(loop, dtype):
    """What a selection loop does per logit: the bins it counts (its shared-memory increments,
    ``tl.histogram``'s, one per logit and histogram under triton 3.9) and the words it gathers
    (its one-word global stores)."""
    loaded, body = loop
    elements = loaded // ITEMSIZE[dtype]
    return {"histograms_per_element": round(sum(1 for t in body if "ATOMS.POPC.INC" in t) / elements, 2),
            "gathers_per_element": round(sum(1 for t in body if re.search(r"\bSTG\.E(\s|$)", t)) / elements, 2)}


def select_budget(loop, name=""):
    """A selection loop's budget: a counting loop's or the gather's, or where one read does the
    work of two (two histograms per logit, or a histogram and a gathered word) the two loops it
    fuses (the split's own, for a split's counting pass: variant ``name`` ``-slices-joint``)."""
    work = loop.get("histograms_per_element", 0) + loop.get("gathers_per_element", 0)
    if work > 1:
        return BUDGET["select-fused-slices" if name.endswith("-slices-joint") else "select-fused"]
    return BUDGET["select"]


def analyze(cubin_path, instrs, dtype, two_passes=False, cut=False, select=False, replay=None):
    """The loop report of one cubin and its disassembly ``instrs`` (``disassemble``): registers,
    spills, elements and instructions per element (``replay``: the bytes a replay loop loads per
    kept id, its id with its logit or its fp32 gradient element).
    ``two_passes`` (the one-sweep kernel) or ``cut`` (min_p's forward): the fields are pass 1's,
    and ``pass2`` holds pass 2's (None for either if the two loops are not found). ``select``
    (the selection launch): the fields are its first counting loop's, and ``select`` lists them
    all (top-k's, then top-p's)."""
    usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", cubin_path],
                           capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    report = {"registers": int(regs.group(1)), "spill_bytes": int(local.group(1)) if local else 0}
    if select:
        loops = [{**_loop_report(loop, dtype), **_selection_work(loop, dtype)} for loop in _block_loops(instrs)]
        return {**report, **(loops[0] if loops else _loop_report(None, dtype)), "select": loops}
    if not (two_passes or cut):
        return {**report, **_loop_report(steady_loop(instrs), dtype, replay)}
    loops = steady_loops(instrs) if two_passes else cut_loops(instrs)
    pass1, pass2 = loops if loops is not None else (None, None)
    return {**report, **_loop_report(pass1, dtype), "pass2": _loop_report(pass2, dtype)}


def budget_for(name, pass2=False):
    """The budget of a variant's loop: the forward's or the backward's; the one-sweep kernel's
    pass 1 is held to the forward's, its pass 2 to the backward's."""
    sweep = name.split("-")[0]
    if sweep == "onesweep":
        sweep = "bwd" if pass2 else "fwd"
    return BUDGET[sweep + ("-softcap" if "softcap" in name else "")]


def _cubin(name):
    return compile_variant(variants()[name]).asm["cubin"]


def _compile_all(names, processes):
    """{name: cubin} of ``names``, compiled in ``processes`` forked workers (each compile is one
    process's work: the machine's cores compile the variants side by side)."""
    if processes <= 1 or len(names) <= 1:
        return {name: _cubin(name) for name in names}
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return dict(zip(names, pool.map(_cubin, names, chunksize=1)))


def measure(names, cubin_dir, processes=None):
    os.makedirs(cubin_dir, exist_ok=True)
    table = variants()
    # One compile per kernel cache key, as on the GPU (V enters as its block shape).
    keys = {name: (table[name].kernel.__name__, launched(table[name]).key) for name in names}
    first = {}
    for name, key in keys.items():
        first.setdefault(key, name)
    cubins = _compile_all(list(first.values()), processes or os.cpu_count() or 1)
    sass = dict(zip(cubins, disassemble(list(cubins.values()))))
    rows = []
    done = {}
    for name in names:
        var, key = table[name], keys[name]
        path = os.path.join(cubin_dir, f"{name}.cubin")
        cubin = cubins[first[key]]
        with open(path, "wb") as f:
            f.write(cubin)
        if key not in done:
            done[key] = analyze(path, sass[first[key]], var.dtype, var.constexprs.get("GRAD_IN_FORWARD", False),
                                var.kernel is _mhpo_fwd_kernel and var.constexprs.get("MIN_P", False),
                                var.kernel in (_select_kernel, _slice_count_kernel, _slice_gather_kernel),
                                _replay_bytes(var))
        report = done[key]
        if "pass2" in report:
            report = {**report, "pass2": {**report["pass2"], "budget": budget_for(name, pass2=True)}}
        if "select" in report:
            report = {**report, "select": [{**loop, "budget": select_budget(loop, name)} for loop in report["select"]]}
        rows.append({"name": name, "dtype": var.dtype, "V": var.V, "aligned": var.aligned, **report,
                     "budget": budget_for(name)})
    return rows


def print_table(rows, file=sys.stdout):
    head = f"{'variant':<46} {'elem/thr/it':>11} {'instr/elem':>10} {'budget':>6} {'MUFU/elem':>9} {'regs':>4} {'spill':>5}"
    print(head, file=file)
    for r in rows:
        print(f"{r['name']:<46} {r['elements_per_thread_per_iteration']!s:>11} "
              f"{r['instructions_per_element']!s:>10} {r['budget']:>6} {r['mufu_per_element']!s:>9} "
              f"{r['registers']:>4} {r['spill_bytes']:>5}", file=file)
        if "pass2" in r:
            p = r["pass2"]
            print(f"{'  pass 2':<46} {p['elements_per_thread_per_iteration']!s:>11} "
                  f"{p['instructions_per_element']!s:>10} {p['budget']:>6} {p['mufu_per_element']!s:>9}", file=file)
        for p in r.get("select", []):
            print(f"{'  selection pass':<46} {p['elements_per_thread_per_iteration']!s:>11} "
                  f"{p['instructions_per_element']!s:>10} {p['budget']:>6} {p['mufu_per_element']!s:>9}", file=file)


def sources_digest():
    """A sha256 of everything a report compiles from: the package's Python files (the kernels, and
    the launchers and calls whose signatures ``recorded_launches`` takes) and this script with
    ``bench/specialization.py`` (the variants). With the Triton version, which ships the compiler
    and ptxas, it names the compile: a report whose digest and version match the checkout's is
    what compiling it again gives (``tests/test_sass_budget.py`` reads such a report instead)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    paths = [os.path.join("bench", "sass.py"), os.path.join("bench", "specialization.py")]
    for folder, _, files in os.walk(os.path.join(root, "mhpo_kernels")):
        paths += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
    digest = hashlib.sha256()
    for path in sorted(p.replace(os.sep, "/") for p in paths):
        with open(os.path.join(root, path), "rb") as f:
            digest.update(path.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench.sass compiles the kernels: run it without TRITON_INTERPRET")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="variants to compile (default: all)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--cubins", default=os.path.join("bench", "results", "cubins"),
                        help="directory for <name>.cubin")
    args = parser.parse_args(argv)
    names = args.names or list(variants())
    rows = measure(names, args.cubins)
    print_table(rows)
    report = {"what": "compiled-code figures from sm_90 SASS (instructions, registers), not speed",
              "target": "sm_90", "V": V, "unaligned_V": list(UNALIGNED_V), "triton": triton.__version__,
              "sources": sources_digest() if names == list(variants()) else None, "variants": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
