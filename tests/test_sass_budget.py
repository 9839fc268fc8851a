"""The compiled sweeps fit the instruction budget that keeps them memory-bound on an H100/H200.

``python -m bench.sass`` compiles every sweep variant a public entry point launches for sm_90 (no
GPU needed) and counts the SASS instructions of its steady-state loop per logit. The budgets come
from the issue rate against the bandwidth (bench/NOTES.md): a bf16 forward must consume 2.15 G
logits per ms on an H200, which its 33.5 T thread-instructions per second allow at ~15.6
instructions per element at full issue and ~10 with room to hide latency; the backward moves 4
bytes per element, hence twice that, and the budget here keeps a margin under it. These are
compiled-code figures, not speed.

Rows need not start on a 16-byte boundary (odd V, (B, T + 1, V) views): the report also compiles
a subset with only the data pointers aligned (V 151,935 and 50,257, strides = V), held to the same
budgets and the same 16-byte vectors. Each variant is compiled with the signature its launch
selects, and no batch selects another (tests/test_specialization.py).

grad_in_forward's one-sweep kernel has two loops per row inside its persistent loop: pass 1 is
held to the forward's budget, pass 2 to the backward's; the rescale of its gradient in the
backward moves as many bytes per element as the backward, and has the backward's budget.
"""

import json
import os
import subprocess
import sys

import pytest

from bench.sass import (BUDGET, MUFU_BUDGET, REPLAY_MUFU_BUDGET, REPLAY_STEP, UNALIGNED_V, launched, register_limit,
                        variants)

ROOT = os.path.join(os.path.dirname(__file__), "..")


# The report committed for the Triton that CI installs: read where it is this checkout's compile.
COMMITTED = os.path.join(ROOT, "bench", "results", "sass-sm90-triton3.9.json")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Every variant's figures: the committed report where its sources digest and Triton version
    are this checkout's (``bench.sass.sources_digest``: compiling again gives the same SASS), else
    compiled here (about 150 s of CPU with a cold Triton cache)."""
    import triton

    from bench.sass import sources_digest

    with open(COMMITTED) as f:
        committed = json.load(f)
    if committed.get("sources") == sources_digest() and committed["triton"] == triton.__version__:
        assert [r["name"] for r in committed["variants"]] == list(variants())
        return committed["variants"]
    out = tmp_path_factory.mktemp("sass")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "bench.sass", "--json", str(out / "sass.json"),
                          "--cubins", str(out / "cubins")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = json.loads((out / "sass.json").read_text())["variants"]
    assert [r["name"] for r in rows] == list(variants())
    assert {r["name"] for r in rows} >= {"fwd-bf16-logprobs", "fwd-fp32-softcap-logprobs", "bwd-fp16-softcap-entropy",
                                         "fwd-bf16-tau-loss-entropy-old-ref", "bwd-bf16-tau-entropy",
                                         "bwd-bf16-softcap-tau-entropy",
                                         "fwd-bf16-loss-entropy-old-ref-v50257", "bwd-bf16-entropy-v151935",
                                         "scale-bf16", "scale-fp32-v151935"}
    for r in rows:
        assert (out / "cubins" / f"{r['name']}.cubin").exists()
    return rows


def _loops(report):
    """(name, loop report) of every loop: each sweep's, both passes of the one-sweep kernel and of
    min_p's forward, and each counting loop of the selection launch."""
    for r in report:
        yield r["name"], r
        if "pass2" in r:
            yield r["name"] + " pass 2", {**r["pass2"], "dtype": r["dtype"], "name": r["name"] + "-pass2"}
        for i, loop in enumerate(r.get("select", [])):
            yield f"{r['name']} selection {i}", {**loop, "dtype": r["dtype"], "name": f"{r['name']}-select{i}"}


def test_every_variant_within_the_instruction_budget(report):
    over = [(n, r) for n, r in _loops(report) if not r["instructions_per_element"] <= r["budget"]]
    assert not over, "over budget: " + ", ".join(f"{n} {r['instructions_per_element']}/{r['budget']}" for n, r in over)
    for r in report:
        sweep = r["name"].split("-")[0]
        softcap = "-softcap" if "softcap" in r["name"] else ""
        assert r["budget"] == BUDGET[("fwd" if sweep == "onesweep" else sweep) + softcap]
        # a selection loop counts its logits in one histogram, or gathers them, or neither (a tie
        # group's count); one that does two of these in one read (fp32 rows with top-k and top-p:
        # both filters' runs, ``_joint_pass``, or the gather while top-k's bin is counted) is held
        # to the two loops it fuses
        for loop in r.get("select", []):
            work = loop["histograms_per_element"] + loop["gathers_per_element"]
            assert work in (0, 1, 2) and loop["histograms_per_element"] <= 2, (r["name"], loop)
            fused = "select-fused-slices" if r["name"].endswith("-slices-joint") else "select-fused"
            assert loop["budget"] == BUDGET[fused if work == 2 else "select"], (r["name"], loop)
        if sweep == "onesweep":
            assert r["pass2"]["budget"] == BUDGET["bwd" + softcap]


def test_one_sweep_kernel_has_both_passes(report):
    """grad_in_forward's kernel: both loops found inside the persistent loop over rows, in bf16
    and fp32, aligned and at an unaligned V; pass 1 only loads, pass 2 loads and stores."""
    rows = [r for r in report if r["name"].startswith("onesweep-")]
    assert {(r["dtype"], r["aligned"]) for r in rows} == {("bf16", True), ("fp32", True), ("bf16", False)}
    for r in rows:
        assert r["loop_instructions"] and r["pass2"]["loop_instructions"], r
        assert r["vector_stores"] == 0 and r["pass2"]["vector_stores"] > 0, r


def test_truncation_passes(report):
    """min_p's forward: pass 1 is the statistics loop (at most 2 instructions longer than the
    plain one; with its loads' L2 policy the compiler schedules it apart, under triton 3.9 the
    fp32 one 3 shorter), pass 2 the kept tokens' sums, neither storing, both within the
    forward's budget (pass 2 keeps no max: a compare and a select per logit in its place). top-k
    and top-p: the finish launch's one loop is that same pass 2, and the selection launch's
    counting loops store nothing and stay within the selection budget and its register limit:
    top-k's two (bins of several keys, summing no mass: no MUFU; single keys, summing the kept
    tokens), top-p's four (uniform in d, several keys, its last pass's several keys summing the
    kept tokens, single keys), and over 16-bit keys (bf16, fp16) two counts of a tie group in d
    after each selection; 16-bit rows with both filters, twenty-one (both filters' selection,
    then each filter's alone, kernels/select.py); fp32 logits' selection has its loops over keys
    of d (with both filters, five first: top-k's counts before the gather, the gather, whose
    stores are single words, the gather that counts top-k's bin where the gather cannot hold it
    (a histogram and a word per logit, no MUFU), and for a top-k above what the gather holds
    top-p's uniform pass and the pass of both filters' runs (two histograms per logit, one MUFU),
    the two fused loops within their own budget; then each filter's alone), then a 16-bit one's
    (bf16 keys, for a row of bf16 values). The pass of single keys with
    the entropy costs at most 3 instructions more (its Σ 2^d·d); top-p's last pass costs at most 2
    more than single keys (the shift to its bins; over bf16 keys both shift, and they differ by at
    most 2 either way). Over a vocabulary split, the counting launch's three loops are top-p's: its
    uniform pass and its pass over keys, and its last pass with the entropy (the kept tokens' sums)
    with one add more, to the slice's own base (16-bit logits: the uniform pass only; their
    selection counts other keys); fp32's selection kernel, which holds the bf16 keys' loops too,
    compiles its own with a uniform register copied per element more. The split's gather launch's
    one loop is the selection kernel's gather, within 2 instructions per element. The backward of
    every truncation is the backward's loop with a compare and a select."""
    by_name = {r["name"]: r for r in report}
    for dtype in ("bf16", "fp16", "fp32"):
        for suffix in ("logprobs", "entropy"):
            r = by_name[f"fwd-{dtype}-minp-{suffix}"]
            assert r["pass2"]["loop_instructions"] and r["pass2"]["vector_stores"] == 0, r
            assert r["pass2"]["budget"] == BUDGET["fwd"]
            plain = by_name[f"fwd-{dtype}-{suffix}"]
            assert r["loop_instructions"] - plain["loop_instructions"] <= 2, (r, plain)
            finish = by_name[f"fwd-{dtype}-selected-{suffix}"]  # the same loop, its max or a cut never read
            assert finish["loop_instructions"] <= r["pass2"]["loop_instructions"] + 2, (finish, r)
        # 16-bit keys: each selection ends with two counts of a tie group in d (no sums, no MUFU); with both
        # filters, their shared first pass, top-k's last bin by single keys, top-p's run (bins of
        # several keys or single), top-p's wide run counted beside top-k's bin (the one loop with two
        # histograms) and its last pass, top-p's passes over a wide run where top-k keeps every
        # candidate, the counts, each filter alone with its counts, and the counts of top-k's tie
        # group below its bin: 20 before the last two. fp32 logits: the loops over keys of d (with
        # both filters, 5 for both before each filter's alone), then those over bf16 keys (a row of
        # bf16 values).
        for suffix, n_loops, n_loops16 in (("topk", 2, 2), ("topp", 4, 4), ("minp-topk-topp", 5 + 6, 20),
                                           ("topk-entropy", 2, 2), ("topp-entropy", 4, 4)):
            loops = by_name[f"select-{dtype}-{suffix}"]["select"]
            assert len(loops) == (n_loops if dtype == "fp32" else 0) + n_loops16 + 2, (suffix, loops)
            assert all(loop["vector_stores"] == 0 for loop in loops), (suffix, loops)
            assert all(loop["mufu_per_element"] == 0 for loop in loops[-2:]), (suffix, loops)
            fused16 = [loop for loop in loops[(n_loops if dtype == "fp32" else 0):]
                       if loop["histograms_per_element"] == 2]
            assert len(fused16) == (suffix == "minp-topk-topp"), (suffix, loops)
            for loop in fused16:   # two runs of 16-bit keys counted in one read, under the fused loops' budget
                assert loop["budget"] == BUDGET["select-fused"] >= loop["instructions_per_element"], loop
        assert len(by_name[f"select-{dtype}-slices"]["select"]) == 3
        # The split's gather of top-k's candidates beside top-p (its own launch): the selection
        # kernel's gather loop, and its gather with top-k's bin counted, no MUFU, each within 2
        # instructions per element of the kernel's (each forms d of its dtype).
        gathers = by_name[f"select-{dtype}-slices-gather"]["select"]
        kernel_gathers = by_name["select-fp32-minp-topk-topp"]["select"][1:3]
        assert [(loop["histograms_per_element"], loop["gathers_per_element"]) for loop in gathers] == [(0, 1), (1, 1)]
        for gather, kernel_gather in zip(gathers, kernel_gathers):
            assert gather["mufu_per_element"] == kernel_gather["mufu_per_element"] == 0, (gather, kernel_gather)
            gap = gather["instructions_per_element"] - kernel_gather["instructions_per_element"]
            assert abs(gap) <= 2 and gather["vector_stores"] == 0, (gather, kernel_gather)
        # The split with both filters: its three passes, and three that count top-k's run beside
        # top-p's (two histograms, one MUFU), each below the split's own pair it fuses in the last
        # pass, top-k's pass over keys and top-p's last (``BUDGET["select-fused-slices"]``).
        single, fused = [], []
        for loop in by_name[f"select-{dtype}-slices-joint"]["select"]:
            (fused if loop["histograms_per_element"] == 2 else single).append(loop)
        uniform, keys, last = (loop["instructions_per_element"] for loop in by_name[f"select-{dtype}-slices"]["select"])
        assert len(single) == len(fused) == 3 and all(loop["mufu_per_element"] <= MUFU_BUDGET for loop in fused)
        alone = sorted(loop["loop_instructions"] for loop in by_name[f"select-{dtype}-slices"]["select"])
        for mine, theirs in zip(sorted(loop["loop_instructions"] for loop in single), alone):
            assert 0 <= mine - theirs <= 4, (single, alone)   # the one filter's passes, as without top-k's run
        assert max(loop["instructions_per_element"] for loop in fused) < keys + last, (fused, keys, last)
        if dtype == "fp32":   # top-k's count, the gather, the gather with top-k's bin counted, and both
            # filters side by side (top-p's uniform pass with top-k's first, then both runs): (histograms,
            # gathered words) per logit; each fused loop costs less than the two it fuses
            both = by_name["select-fp32-minp-topk-topp"]["select"]
            assert [(loop["histograms_per_element"], loop["gathers_per_element"]) for loop in both[:5]] == \
                [(1, 0), (0, 1), (1, 1), (2, 0), (2, 0)], both
            assert [loop["mufu_per_element"] for loop in both[:5]] == [0, 0, 0, 1, 1], both
            count, gather, counted, first, joint = (loop["instructions_per_element"] for loop in both[:5])
            uniform, keys = (loop["instructions_per_element"] for loop in by_name["select-fp32-topp"]["select"][:2])
            assert counted < gather + count and first < uniform + count and joint < keys + count, both
            assert all(loop["vector_stores"] == 0 for loop in both[:5]), both
        own = {"topk": 2, "topp": 4}   # the first loops: over the dtype's own keys (fp32: keys of d)
        select = {suffix: by_name[f"select-{dtype}-{suffix}"]["select"][:own[suffix.split("-")[0]]]
                  for suffix in ("topk", "topp", "topk-entropy", "topp-entropy")}
        assert select["topk"][0]["mufu_per_element"] == 0
        for suffix in ("topk", "topp"):
            single, with_entropy = select[suffix][-1], select[suffix + "-entropy"][-1]
            assert 0 < with_entropy["instructions_per_element"] - single["instructions_per_element"] <= 3, \
                (single, with_entropy)
        # Over a vocabulary split: top_p's uniform pass and its pass over keys, and its last pass with
        # the entropy and one add (the sums at the slice's own base). 16-bit logits' selection counts
        # the logits' keys, the split's keys of d: only the uniform pass is the same loop.
        # The same loop: within one instruction of its iteration (the scheduler's). fp32's selection
        # kernel holds bf16 keys' loops too, and compiles its loops over keys of d with up to one
        # instruction per element more (a uniform register copied to a vector one, 14-17 of them
        # in 16 elements, measured against the kernel compiled without the bf16 keys; which loops of
        # a kernel get them moves with the code around them, fp16's too): the uniform passes and
        # fp32's pass over keys are allowed 17 more, and the split's pass of sums, its last pass with
        # the entropy and one add per element, is from 1 shorter (the copies outweigh the add, as
        # now) to 16 longer (the add alone).
        topp, topp_entropy = select["topp"], select["topp-entropy"]
        slices = list(by_name[f"select-{dtype}-slices"]["select"])

        def remove(*loops, longer=1):   # the slices' loop nearest to one of ``loops``: its instructions
            gap, nearest = min(((loop["loop_instructions"] - x["loop_instructions"], x) for loop in loops
                                for x in slices), key=lambda t: abs(t[0]))
            assert -1 <= gap <= longer and nearest["elements_per_thread_per_iteration"] == 16, (slices, loops)
            slices.remove(nearest)

        if dtype == "fp32":   # top_p's uniform pass, of both keys' selections; its pass over keys of d
            remove(topp[0], by_name["select-fp32-topp"]["select"][4], longer=17)
            remove(topp[1], longer=17)
            more = slices[0]["loop_instructions"] - topp_entropy[2]["loop_instructions"]
            assert -1 <= more <= 16, (slices, topp_entropy)
        else:
            remove(topp[0], longer=17)
        for suffix in ("topp", "topp-entropy"):
            last, single = (loop["instructions_per_element"] for loop in select[suffix][-2:])
            more = last - single
            assert (abs(more) <= 2) if dtype == "bf16" else (0 < more <= 2), (last, single)
        for suffix in ("", "-entropy"):
            r, plain = by_name[f"bwd-{dtype}-cut{suffix}"], by_name[f"bwd-{dtype}{suffix}"]
            assert r["mufu_per_element"] == plain["mufu_per_element"], (r, plain)


def test_per_token_temperature_leaves_the_loop_alone(report):
    """τ_t is loaded and divided into k (and the slope) once per row: each per-token-temperature
    variant's loop has the MUFU ops of the same variant with a scalar τ and at most one
    instruction more or less (the scheduler's register moves and address arithmetic: measured
    ±1 MOV/IMAD/SHF in a 120–306 instruction loop, bench/NOTES.md), never a per-logit division."""
    by_name = {r["name"]: r for r in report}
    pairs = {"fwd-{}-tau-loss-entropy-old-ref": "fwd-{}-loss-entropy-old-ref",
             "fwd-{}-softcap-tau-logprobs": "fwd-{}-softcap-logprobs",
             "bwd-{}-tau-entropy": "bwd-{}-entropy", "bwd-{}-softcap-tau-entropy": "bwd-{}-softcap-entropy"}
    for dtype in ("bf16", "fp16", "fp32"):
        for tau, scalar in pairs.items():
            a, b = by_name[tau.format(dtype)], by_name[scalar.format(dtype)]
            assert abs(a["loop_instructions"] - b["loop_instructions"]) <= 1, (a, b)
            assert a["mufu_per_element"] == b["mufu_per_element"], (a, b)
            assert a["elements_per_thread_per_iteration"] == b["elements_per_thread_per_iteration"]


def test_one_exp2_per_element_outside_softcap(report):
    """One exp2 per logit in the sweeps (their lanes rebase once per block); replay's forward
    rebases its lane at every kept id: two (its backward, one)."""
    for r in report:
        if r["name"].startswith("replay-"):
            assert r["mufu_per_element"] <= REPLAY_MUFU_BUDGET, r
        elif "softcap" not in r["name"]:
            assert r["mufu_per_element"] <= MUFU_BUDGET, r


def test_replay_loops(report):
    """Replay gathers one kept id per thread per step (the compiler unrolls steps), in bf16 and
    fp32: the forward's loop and the backward's two (GATHER: the gradient elements into a buffer;
    the scatter), none with vectors; two exp2 per id in the forward, one in the gradient's."""
    rows = {r["name"]: r for r in report if r["name"].startswith("replay-")}
    assert {n.split("-", 2)[2] for n in rows} == {"fwd-logprobs", "fwd-entropy", "bwd-gather", "bwd-gather-entropy",
                                                  "bwd-scatter"}
    for name, r in rows.items():
        assert r["loop_instructions"] and r["elements_per_thread_per_iteration"] % REPLAY_STEP == 0, r
        assert r["vector_loads"] == r["vector_stores"] == 0, r
        assert r["mufu_per_element"] == {"fwd": 2, "bwd": 0 if name.endswith("scatter") else 1}[name.split("-")[2]], r


def test_no_spills_and_16_byte_vectors(report):
    for r in report:
        assert r["spill_bytes"] == 0, r
        # 8 warps × 64 registers: 4 programs per SM, 32–64 KiB of loads in flight; the exceptions
        # measured under an older Triton are named, by version, in bench.sass.REGISTER_EXCEPTIONS
        assert r["registers"] <= register_limit(r["name"]), r
    for _, r in _loops(report):
        if r["name"].startswith("replay-"):  # gathers, one id at a time (test_replay_loops)
            continue
        # Each lane moves whole 16-byte vectors: one per VEC elements it owns per iteration.
        vectors = r["elements_per_thread_per_iteration"] * {"bf16": 2, "fp16": 2, "fp32": 4}[r["dtype"]] // 16
        assert r["vector_loads"] == vectors, r
        if r["name"].startswith(("bwd", "scale", "onesweep")) and not (r["name"].startswith("onesweep")
                                                                    and not r["name"].endswith("-pass2")):
            assert r["vector_stores"] == vectors, r


def test_unaligned_rows_compiled_for_every_sweep_and_dtype(report):
    """Each sweep's loop (log-probs, entropy, softcap; forward and backward) in bf16 and fp32 is
    compiled for rows at any residue, at each unaligned V."""
    unaligned = [r for r in report if not r["aligned"] and r["name"].startswith(("fwd-", "bwd-"))]
    for v in UNALIGNED_V:
        rows = [r for r in unaligned if r["V"] == v]
        assert {(r["name"].split("-")[0], r["dtype"], "softcap" in r["name"]) for r in rows} == {
            (sweep, dtype, softcap) for sweep in ("fwd", "bwd") for dtype in ("bf16", "fp32")
            for softcap in (False, True)}
        assert all(r["V"] % 16 for r in rows)


def test_compiled_as_launched():
    """Each variant is compiled from its own launch by the launcher (``bench.sass.launch_of``),
    with what Triton's binder derives from it: divisibility by 16 only for the logits' and the
    gradient's data pointers, the launcher's own buffers (the split partials, the selection's
    gathered candidates; where the variant has them: an absent one is None, a constant) and V
    where V is a multiple of 16 (not for the replay kernels, whose gathers by id no V aligns), never for an integer that moves with the batch (N, T, a stride,
    the split count or length) or a per-token pointer; the strides int64
    (tests/test_specialization.py has the keys)."""
    for name, var in variants().items():
        spec = launched(var)
        names = var.kernel.arg_names
        divisible = {names[i] for (i,), attrs in spec.attrs.items() if attrs}
        aligned_v = {"V"} & set(names) if var.aligned and not name.startswith("replay-") else set()
        present = {n for n in names if spec.signature[n] != "constexpr"}
        assert divisible == {"p_x", "p_dx", "p_part", "p_gather"} & present | aligned_v, name
        assert all(spec.signature[n] == "i64" for n in names if n.startswith("stride")), name
        assert all(spec.signature[n] == "i32" for n in ("N", "T", "V", "n_segs", "seg_len", "split_segs", "split_len") if n in names), name


def test_split_rows_keep_the_loop(report):
    """A split of a row (small N) is a run of whole blocks from the row's block base: its loop is
    the unsplit one, with the same vectors and MUFU ops and at most two instructions more (the
    loop's bound is the split's end instead of the row's; measured under triton 3.9: −1 to +2 in
    loops of 89 to 310 instructions, bench/NOTES.md; under 3.6 one split loop is 3 shorter, 87
    against 90), at an aligned and an unaligned V."""
    by_name = {r["name"]: r for r in report}
    splits = [r for r in report if "-split" in r["name"]]
    assert {(r["name"].split("-")[0], r["dtype"], r["aligned"]) for r in splits} == {
        ("fwd", "bf16", True), ("fwd", "fp32", True), ("bwd", "bf16", True), ("bwd", "fp32", True),
        ("fwd", "bf16", False), ("bwd", "bf16", False)}
    for r in splits:
        whole = by_name[r["name"].replace("-split", "")]
        assert r["loop_instructions"] - whole["loop_instructions"] <= 2, (r, whole)
        assert r["mufu_per_element"] == whole["mufu_per_element"], (r, whole)
        assert r["elements_per_thread_per_iteration"] == whole["elements_per_thread_per_iteration"]
