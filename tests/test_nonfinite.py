"""The non-finite contract (SPEC.md, section 5), fuzzed across the three paths: the Triton kernels
(under the interpreter on CPU), the PyTorch path (``use_backend("torch")``) and ``reference/`` in
float64, for every objective and aggregation mode, ``token_logprobs`` and the fused linear path.

Each run draws a fresh seed (``MHPO_NONFINITE_SEED=N`` replays one; every failure message starts
with it). Per objective it draws a vocabulary (5, 33 or 37: odd, so the last 16-byte vector of a
row is partly past its end), an aggregation mode, β (0 or 0.3) and the entropy bonus's
coefficient (0 or 0.05), each value in every run, and whether the batch goes in padded, (B, T, V),
or packed, (B·T, V) with ``cu_seqlens`` (the same sequences), then:

- a clean call, and the same call with garbage (NaN, ±inf, an out-of-range id) in every input at
  every invalid token (mask false or ``ignore_index``): loss, gradient and metrics bit-identical;
- ``budget(4)`` injections of one of NaN, +inf, −inf at one valid token, at one of the targets of
  ``TARGETS``, each combination at most once per run, with the invalid garbage as well.

What an injection must do is the contract's: ``poison`` (a NaN that enters the loss, a +inf
logit, a whole row of one non-finite value: the loss is NaN, the poisoned rows of the gradient are NaN, every other row bit-identical
to the clean call's), ``no-op`` (an input the loss does not read: old log-probs for GPG, the
reference at β = 0: everything bit-identical) or ``agree`` (the paths agree on whether the loss is
finite, and on its value within fp32 accuracy; a NaN loss comes with the token's row NaN; rows
of other tokens stay bit-identical). Every call returns its metrics too: after any injection the
paths report the same ones, each NaN, the same infinity or finite within fp32 accuracy of the
reference's on every path, and a no-op changes none but those that report the unread input
(``REPORTED``).

``MHPO_FUZZ_SCALE`` scales the number of injections, as in ``test_fuzz.py``. The examples are
sized for the interpreter: B = 2, T = 3, one call per path per example.
"""

import itertools
import math
import os
import random
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import mhpo_kernels
import reference
from _cases import FP32_RTOL
from mhpo_kernels.objectives import CISPO, GPG, GSPO, MHPO, SAPO, PPOClip

SCALE = float(os.environ.get("MHPO_FUZZ_SCALE", "1"))
RUN_SEED = int(os.environ.get("MHPO_NONFINITE_SEED", random.SystemRandom().randrange(2**31)))
PATHS = ("triton", "torch", "reference")
AGG = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
VALUES = (math.nan, math.inf, -math.inf)
B, T = 2, 3
MASKED, IGNORED = (1, 2), (0, 2)  # the invalid tokens of every example: one of each kind
IGNORE_INDEX = -100
BETA = 0.3
ENTROPY_COEF = 0.05

OBJECTIVES = {
    "mhpo": MHPO(),
    "mhpo-no-lfm": MHPO(lfm=False),
    "mhpo-no-dhp": MHPO(dhp=False),
    "ppo-clip": PPOClip(eps_low=0.2, eps_high=0.28),
    "ppo-dual-clip": PPOClip(dual_clip=3.0),
    "cispo": CISPO(max_ratio=4.0, min_ratio=0.5),
    "sapo": SAPO(),
    "gpg": GPG(),
    "gspo": GSPO(eps_low=0.2, eps_high=0.28),
}


def budget(n):
    return max(1, int(n * SCALE))


def _valid_mask():
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[MASKED] = valid[IGNORED] = False
    return valid


VALID = _valid_mask()
VALID_TOKENS = [tuple(bt) for bt in VALID.nonzero().tolist()]
INVALID_TOKENS = (MASKED, IGNORED)


# ---- what can be poisoned --------------------------------------------------------------------
#
# A row per injection target: where the value goes (``inject(inputs, b, t, value, rng)`` edits the
# dict of tensors in place), whether a NaN there enters the loss (``enters(objective, beta)``) and
# whether the poison reaches the whole sequence under GSPO (the sequence ratio and advantage mix
# every token of it) or only the token. The per-token temperature is one of them: a NaN τ_t is
# data like any other input (it makes the loss NaN); ±inf is refused by validation
# (``test_validation.py``) and so is not injected.


def _nan_or_plus_inf_logit(value, logits):
    return math.isnan(value) or (logits and value == math.inf)


@dataclass(frozen=True)
class Target:
    name: str
    inject: Callable
    enters: Callable
    sequence: bool       # poisons the whole sequence under GSPO
    logits: bool = False
    poisons: Callable = _nan_or_plus_inf_logit   # (value, logits): which values make the loss NaN


def _at(key):
    def inject(inputs, b, t, value, rng):
        inputs[key][b, t] = value
    return inject


def _logit(where):
    def inject(inputs, b, t, value, rng):
        V = inputs["logits"].shape[-1]
        y = int(inputs["input_ids"][b, t])
        if where == "target":
            v = y
        elif where == "last":            # alone in the row's last 16-byte vector (V odd)
            v = V - 1
            if y == v:
                inputs["input_ids"][b, t] = y = 0
        elif where == "row":
            v = slice(None)
        else:
            v = rng.choice([u for u in range(V) if u != y])
        inputs["logits"][b, t, v] = value
    return inject


def _advantage(inputs, b, t, value, rng):
    adv = inputs["advantages"]
    adv[(b,) if adv.dim() == 1 else (b, t)] = value


def _always(objective, beta):
    return True


TARGETS = (
    Target("logit-target", _logit("target"), _always, sequence=True, logits=True),
    Target("logit-other", _logit("other"), _always, sequence=True, logits=True),
    Target("logit-last-vector", _logit("last"), _always, sequence=True, logits=True),
    # A whole row of one value: even −inf everywhere leaves no softmax (0/0).
    Target("logit-row", _logit("row"), _always, sequence=True, logits=True, poisons=lambda value, logits: True),
    Target("old", _at("old_logprobs"), lambda o, beta: not isinstance(o, GPG), sequence=True),
    Target("adv", _advantage, _always, sequence=True),
    Target("ref", _at("ref_logprobs"), lambda o, beta: beta > 0, sequence=False),
    Target("temperature", _at("temperature"), _always, sequence=True),
)


def expectation(target, value, objective, beta):
    """'poison', 'no-op' or 'agree' (module docstring)."""
    if not target.enters(objective, beta):
        return "no-op"
    if target.poisons(value, target.logits):
        return "poison"
    return "agree"


def poisoned_rows(target, objective, b, t):
    rows = torch.zeros(B, T, dtype=torch.bool)
    if objective.sequence_level and target.sequence:
        rows[b] = VALID[b]
    rows[b, t] = True
    return rows


# ---- inputs and calls ------------------------------------------------------------------------


def _inputs(seed, V, objective):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[IGNORED] = IGNORE_INDEX
    logp = reference.token_logprobs(logits.double(), ids.clamp(min=0)).float()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[MASKED] = False
    # GSPO: one advantage per sequence, (B,), so that an injection sets the sequence's
    adv = torch.randn(B, generator=g) if objective.sequence_level else torch.randn(B, T, generator=g)
    return dict(
        logits=logits, input_ids=ids, mask=mask,
        old_logprobs=(logp + 0.3 * torch.randn(B, T, generator=g)).clamp(max=0.0),   # log-probs: ≤ 0
        advantages=adv,
        ref_logprobs=(logp + 0.3 * torch.randn(B, T, generator=g)).clamp(max=0.0),
        temperature=torch.rand(B, T, generator=g) + 0.5,
    )


def _with_garbage(inputs, rng):
    """The same inputs with NaN, ±inf and an out-of-range id at every invalid token."""
    out = {k: v.clone() for k, v in inputs.items()}
    V = out["logits"].shape[-1]
    for b, t in INVALID_TOKENS:
        out["logits"][b, t, rng.randrange(V)] = rng.choice(VALUES)
        out["logits"][b, t, V - 1] = rng.choice(VALUES)
        for key in ("old_logprobs", "advantages", "ref_logprobs", "temperature"):
            if out[key].dim() == 2:
                out[key][b, t] = rng.choice(VALUES)
    out["input_ids"][MASKED] = V + 7
    return out


def _packed(inputs):
    """The batch as one stream of its B sequences, (B·T, ...) with ``cu_seqlens``; the advantage
    stays (B,) per sequence where it is one."""
    out = {k: v.reshape(B * T, *v.shape[2:]) if v.dim() >= 2 else v for k, v in inputs.items()}
    out["cu_seqlens"] = torch.arange(0, B * T + 1, T)
    return out


def _call(path, objective, inputs, mode, beta, entropy_coef=0.0, packed=False):
    """(loss, dloss/dlogits, metrics) on one path: fp32 for the sweeps, float64 for the reference.
    The gradient is (B, T, V) whether the call was padded or ``packed``."""
    if packed:
        inputs = _packed(inputs)
    x = inputs["logits"].detach().clone()
    kwargs = dict({k: v for k, v in inputs.items() if k != "logits"}, objective=objective, loss_agg_mode=mode,
                  beta=beta, ignore_index=IGNORE_INDEX, entropy_coef=entropy_coef, return_metrics=True)
    if path == "reference":
        x = x.double()
        kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
        x.requires_grad_()
        loss, metrics = reference.policy_loss(x, **kwargs)
    else:
        x.requires_grad_()
        with mhpo_kernels.use_backend(path):
            loss, metrics = mhpo_kernels.policy_loss(x, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad.reshape(B, T, -1), {k: v.detach() for k, v in metrics.items()}


def _scale(objective, inputs, mode, beta, entropy_coef=0.0, packed=False):
    """Σ_t g_t·(|loss_t| + entropy_coef·H_t) in float64 (from the reference's own per-token terms):
    each fp32 term carries FP32_RTOL of its own magnitude, so the loss carries FP32_RTOL of this."""
    x = inputs["logits"].double()
    ids = inputs["input_ids"]
    valid = VALID & (ids != IGNORE_INDEX)
    x = torch.where(valid.unsqueeze(-1), x, 0.0)
    logp, ent = reference.token_logprobs(x, torch.where(valid, ids, 0), temperature=inputs["temperature"].double(),
                                         return_entropy=True)
    old = inputs["old_logprobs"].double()
    adv = inputs["advantages"].double().reshape(B, -1).expand(B, T)
    terms = reference.objective_loss(logp, torch.where(valid, old, 0.0), torch.where(valid, adv, 0.0),
                                     valid, objective).abs()
    if beta > 0:
        d = inputs["ref_logprobs"].double() - logp
        terms = terms + beta * (torch.expm1(d) - d).abs()
    terms = terms + entropy_coef * torch.where(valid, ent, 0.0).abs()
    return reference.aggregate(terms, valid, mode).item()


def _same(a, b):
    """Bit-identical, NaN included."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0)) and torch.equal(a.isnan(), b.isnan())


# The metrics that report an input the loss does not read (rule 4): they change with it.
REPORTED = {"ref": ("kl",), "old": ("abs_log_ratio",)}


def _metrics_agree(where, results):
    """The paths report the same metrics, each NaN, the same infinity or finite on every path,
    and a finite one within fp32 accuracy of the float64 reference's: a metric is a mean over
    the valid tokens of O(1) values (a share, a log-ratio, ψ, an entropy)."""
    want = results["reference"][2]
    for path in ("triton", "torch"):
        got = results[path][2]
        assert set(got) == set(want), f"{where} {path}: metrics {sorted(got)}, the reference's {sorted(want)}"
        for key, w in want.items():
            assert _same_class(got[key], w) and (not torch.isfinite(w) or abs(got[key].item() - w.item())
                                                 <= FP32_RTOL * max(1.0, abs(w.item()))), \
                f"{where} {path}: metric {key} is {got[key].item()}, the reference's {w.item()}"


def _same_result(result, clean, reported=()):
    """Two calls' (loss, gradient, metrics) bit-identical, the metrics ``reported`` left out."""
    metrics, clean_metrics = ({k: m for k, m in r[2].items() if k not in reported} for r in (result, clean))
    return _same(result[0], clean[0]) and _same(result[1], clean[1]) and metrics.keys() == clean_metrics.keys() \
        and all(_same(m, clean_metrics[k]) for k, m in metrics.items())


def _check_injection(tag, objective, clean, dirty_inputs, target, value, b, t, mode, beta, **call):
    """One injection on the three paths against the contract; ``clean`` (per path) may be None
    for a replay, which then checks only the poisoned token. ``call``: entropy_coef, packed."""
    kind = expectation(target, value, objective, beta)
    rows = poisoned_rows(target, objective, b, t)
    results = {p: _call(p, objective, dirty_inputs, mode, beta, **call) for p in PATHS}
    for path, (loss, grad, metrics) in results.items():
        where = f"{tag} {path}: {target.name}={value} at {(b, t)} ({kind})"
        if clean is not None:
            clean_grad = clean[path][1]
            if kind == "no-op":
                assert _same_result((loss, grad, metrics), clean[path], REPORTED.get(target.name, ())), where
                continue
            assert _same(grad[~rows], clean_grad[~rows]), f"{where}: another token's gradient row changed"
        if kind == "poison":
            assert loss.isnan(), f"{where}: loss {loss.item()}, not NaN"
            assert grad[rows].isnan().all(), f"{where}: a poisoned gradient row is not all NaN"
        elif kind == "agree" and loss.isnan():  # the token's own term is NaN (e.g. a KL of inf − inf)
            assert grad[b, t].isnan().all(), f"{where}: the NaN term's gradient row is not all NaN"
    _metrics_agree(f"{tag}: {target.name}={value} at {(b, t)} ({kind})", results)
    if kind == "agree":
        finite = {p: bool(torch.isfinite(loss)) for p, (loss, _, _) in results.items()}
        tag_finite = f"{tag}: {target.name}={value} at {(b, t)}: finite {finite}, losses " + \
            str({p: loss.item() for p, (loss, _, _) in results.items()})
        assert len(set(finite.values())) == 1, tag_finite
        if finite["reference"]:
            want = results["reference"][0].item()
            tol = FP32_RTOL * _scale(objective, dirty_inputs, mode, beta, **call) + 1e-30
            for path in ("triton", "torch"):
                assert abs(results[path][0].item() - want) <= tol, tag_finite


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_policy_loss_non_finite(name):
    objective = OBJECTIVES[name]
    index = list(OBJECTIVES).index(name)
    rng = random.Random(f"{RUN_SEED}-{name}")
    V, mode = rng.choice((5, 33, 37)), rng.choice(AGG)
    beta = (0.0, BETA)[(index + RUN_SEED) % 2]   # both values in every run
    call = dict(entropy_coef=(0.0, ENTROPY_COEF)[(index + RUN_SEED // 2) % 2], packed=rng.random() < 0.5)
    tag = f"MHPO_NONFINITE_SEED={RUN_SEED} {name} V={V} {mode} beta={beta} {call}"
    inputs = _inputs(rng.randrange(2**31), V, objective)

    clean = {p: _call(p, objective, inputs, mode, beta, **call) for p in PATHS}
    for path, (loss, grad, metrics) in clean.items():
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), f"{tag} {path}: clean input not finite"
        assert all(torch.isfinite(m) for m in metrics.values()), f"{tag} {path}: clean input's metrics not finite"
        assert not grad[~VALID].any(), f"{tag} {path}"
    _metrics_agree(f"{tag}: clean", clean)
    garbage = _with_garbage(inputs, rng)
    for path in PATHS:
        assert _same_result(_call(path, objective, garbage, mode, beta, **call), clean[path]), \
            f"{tag} {path}: garbage at invalid tokens changed the result"

    combos = [(target, value) for target, value in itertools.product(TARGETS, VALUES)
              if not (target.name == "temperature" and math.isinf(value))]   # refused by validation
    rng.shuffle(combos)
    for target, value in combos[:budget(4)]:
        b, t = rng.choice(VALID_TOKENS)
        dirty = _with_garbage(inputs, rng)
        target.inject(dirty, b, t, value, rng)
        _check_injection(tag, objective, clean, dirty, target, value, b, t, mode, beta, **call)


TARGET = {target.name: target for target in TARGETS}


def test_token_logprobs_non_finite():
    """Log-probs and entropy per token (and their gradient) under the same injections into the
    logits: a NaN or +inf makes that token's log-prob, entropy and gradient row NaN, −inf agrees
    with the reference, ignored tokens change nothing."""
    rng = random.Random(f"{RUN_SEED}-token_logprobs")
    V = rng.choice((5, 33, 37))
    tag = f"MHPO_NONFINITE_SEED={RUN_SEED} token_logprobs V={V}"
    inputs = _inputs(rng.randrange(2**31), V, GPG())
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(rng.randrange(2**31)))

    def call(path, inp):
        x = inp["logits"].detach().clone()
        if path == "reference":
            x = x.double().requires_grad_()
            logp, ent = reference.token_logprobs(x, inp["input_ids"], ignore_index=IGNORE_INDEX, return_entropy=True)
        else:
            x.requires_grad_()
            with mhpo_kernels.use_backend(path):
                logp, ent = mhpo_kernels.token_logprobs(x, inp["input_ids"], ignore_index=IGNORE_INDEX,
                                                        return_entropy=True)
        (grad,) = torch.autograd.grad((upstream.to(logp.dtype) * logp).sum() - ent.sum(), x)
        return logp.detach(), ent.detach(), grad

    clean = {p: call(p, inputs) for p in PATHS}
    garbage = {k: v.clone() for k, v in inputs.items()}
    garbage["logits"][IGNORED] = torch.tensor(VALUES * V)[:V]
    for path in PATHS:
        assert all(_same(a, c) for a, c in zip(call(path, garbage), clean[path])), f"{tag} {path}: ignored token"

    combos = [(t, v) for t, v in itertools.product(TARGETS, VALUES) if t.logits]
    rng.shuffle(combos)
    for target, value in combos[:budget(3)]:
        b, t = rng.choice(VALID_TOKENS + [MASKED])   # no mask here: only the ignored token is invalid
        dirty = {k: v.clone() for k, v in inputs.items()}
        target.inject(dirty, b, t, value, rng)
        where = f"{tag}: {target.name}={value} at {(b, t)}"
        others = torch.ones(B, T, dtype=torch.bool)
        others[b, t] = False
        results = {p: call(p, dirty) for p in PATHS}
        for path, (logp, ent, grad) in results.items():
            c_logp, c_ent, c_grad = clean[path]
            assert _same(logp[others], c_logp[others]) and _same(ent[others], c_ent[others]), f"{where} {path}"
            assert _same(grad[others], c_grad[others]), f"{where} {path}"
            if target.poisons(value, True):
                assert logp[b, t].isnan() and ent[b, t].isnan() and grad[b, t].isnan().all(), f"{where} {path}"
        if not target.poisons(value, True):
            logp64, ent64, _ = results["reference"]
            for path in ("triton", "torch"):
                logp, ent, _ = results[path]
                for got, want in ((logp[b, t], logp64[b, t]), (ent[b, t], ent64[b, t])):
                    assert _same_class(got, want) and (not torch.isfinite(want) or
                                                       abs(got.item() - want.item()) <= FP32_RTOL * max(1.0, abs(want.item()))), \
                        f"{where} {path}: {got.item()} vs {want.item()}"


def _same_class(a, b):
    """Both NaN, both the same infinity, or both finite."""
    a, b = a.double(), b.double()
    return bool(a.isnan() == b.isnan() and a.isposinf() == b.isposinf() and a.isneginf() == b.isneginf())


# ---- the fused linear path against materialized logits -----------------------------------------

LINEAR_TARGETS = ("hidden", "old_logprobs", "advantages", "ref_logprobs")


def test_fused_linear_non_finite():
    """``fused_linear_policy_loss`` with NaN and ±inf in the hidden states, old log-probs,
    advantages and reference log-probs, at valid and invalid tokens, on both sweep paths against
    ``reference.policy_loss`` of the logits materialized in float64 (z = h·Wᵀ, softcapped or not)."""
    rng = random.Random(f"{RUN_SEED}-fused_linear")
    objective = OBJECTIVES[rng.choice([n for n, o in OBJECTIVES.items() if not o.sequence_level])]
    mode, cap, beta = rng.choice(AGG), rng.choice((None, 4.0)), rng.choice((0.0, BETA))
    N, H, V = B * T, 8, rng.choice((5, 33, 37))
    tag = f"MHPO_NONFINITE_SEED={RUN_SEED} fused linear {objective!r} V={V} cap={cap} {mode} beta={beta}"
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    ids = torch.randint(0, V, (N,), generator=g)
    ids[IGNORED[0] * T + IGNORED[1]] = IGNORE_INDEX
    mask = VALID.reshape(-1) | (ids == IGNORE_INDEX)
    z = hidden.double() @ weight.double().T
    logp = reference.token_logprobs(z if cap is None else cap * torch.tanh(z / cap), ids.clamp(min=0)).float()
    inputs = dict(hidden=hidden, old_logprobs=(logp + 0.3 * torch.randn(N, generator=g)).clamp(max=0.0),
                  advantages=torch.randn(N, generator=g),
                  ref_logprobs=(logp + 0.3 * torch.randn(N, generator=g)).clamp(max=0.0))
    valid = VALID.reshape(-1)

    def call(path, inp):
        h, w = inp["hidden"].clone().requires_grad_(), weight.clone().requires_grad_()
        kwargs = dict(mask=mask, objective=objective, loss_agg_mode=mode, beta=beta, ignore_index=IGNORE_INDEX,
                      ref_logprobs=inp["ref_logprobs"])
        if path == "reference":
            h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            zz = h64 @ w64.T
            zz = zz if cap is None else cap * torch.tanh(zz / cap)
            kw64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
            loss = reference.policy_loss(zz, ids, inp["old_logprobs"].double(), inp["advantages"].double(), **kw64)
            return (loss.detach(), *torch.autograd.grad(loss, (h64,))), zz.detach()
        with mhpo_kernels.use_backend(path):
            loss = mhpo_kernels.fused_linear_policy_loss(h, w, ids, inp["old_logprobs"], inp["advantages"],
                                                         final_logit_softcap=cap, chunk_size=4, **kwargs)
        return (loss.detach(), *torch.autograd.grad(loss, (h, w))), None

    clean = {p: call(p, inputs)[0] for p in PATHS}
    for path in ("triton", "torch"):
        assert abs(clean[path][0].item() - clean["reference"][0].item()) <= 1e-4 * (1 + abs(clean["reference"][0].item())), tag
    garbage = {k: v.clone() for k, v in inputs.items()}
    for n in (~valid).nonzero().squeeze(-1).tolist():
        garbage["hidden"][n, rng.randrange(H)] = rng.choice(VALUES)
        for key in LINEAR_TARGETS[1:]:
            garbage[key][n] = rng.choice(VALUES)
    for path in ("triton", "torch"):
        assert all(_same(a, c) for a, c in zip(call(path, garbage)[0], clean[path])), f"{tag} {path}: invalid token"

    combos = list(itertools.product(LINEAR_TARGETS, VALUES))
    rng.shuffle(combos)
    for key, value in combos[:budget(3)]:
        n = rng.choice(valid.nonzero().squeeze(-1).tolist())
        dirty = {k: v.clone() for k, v in garbage.items()}
        if key == "hidden":
            dirty[key][n, rng.randrange(H)] = value
        else:
            dirty[key][n] = value
        results = {p: call(p, dirty) for p in PATHS}
        z_row = results["reference"][1][n]
        # What the softmax of the materialized row sees decides: NaN or +inf there is a poisoned row.
        enters = {"hidden": True, "old_logprobs": not isinstance(objective, GPG), "advantages": True,
                  "ref_logprobs": beta > 0}[key]
        poison = enters and (math.isnan(value) or bool((z_row.isnan() | z_row.isposinf()).any()))
        where = f"{tag}: {key}={value} at token {n}, losses " + str({p: r[0][0].item() for p, r in results.items()})
        for path in ("triton", "torch"):
            loss, dh, dw = results[path][0]
            others = torch.ones(N, dtype=torch.bool)
            others[n] = False
            assert _same(dh[others], clean[path][1][others]), f"{where} {path}: another token's dhidden row"
            if not enters:
                assert _same(loss, clean[path][0]) and _same(dh, clean[path][1]), where
            elif poison:
                assert loss.isnan() and dh[n].isnan().all(), where
        loss64 = results["reference"][0][0]
        if poison:
            assert loss64.isnan(), where
        elif enters:
            finite = [bool(torch.isfinite(results[p][0][0])) for p in PATHS]
            assert len(set(finite)) == 1, where
            if finite[0]:
                for path in ("triton", "torch"):
                    assert abs(results[path][0][0].item() - loss64.item()) <= 1e-4 * (1 + abs(loss64.item())), where


# ---- replayed regressions ------------------------------------------------------------------------
#
# Each once gave a finite loss (or a finite gradient row) on one path where the contract wants NaN:
# (objective, V, target, value, token). Replayed on every run with fixed inputs.

REGRESSIONS = {
    # tl.maximum / tl.minimum drop NaN: the clipped ratio of a NaN old log-prob was finite.
    "old-nan-ppo-clip": (PPOClip(), 37, "old", math.nan, (0, 1)),
    "old-nan-ppo-dual-clip": (PPOClip(dual_clip=3.0), 37, "old", math.nan, (0, 1)),
    "old-nan-cispo": (CISPO(), 37, "old", math.nan, (0, 1)),
    # A NaN log-prob reached PPO-clip's max and was dropped there.
    "logit-nan-ppo-clip": (PPOClip(), 37, "logit-other", math.nan, (0, 1)),
    # Alone in the row's last 16-byte vector, a NaN left its lane at the floor base, and the
    # combine dropped the lane as negligible: every objective's forward gave a finite log-prob.
    # The row statistics do not depend on the objective: three of them stand for all.
    **{f"last-vector-nan-V{V}-{name}": (OBJECTIVES[name], V, "logit-last-vector", math.nan, (1, 1))
       for V, name in ((37, "mhpo"), (37, "ppo-clip"), (37, "gspo"), (33, "gpg"))},
    # +inf logits: the PyTorch path took a floor base for any non-finite row max and gave a finite
    # loss with a NaN gradient row; Triton PPO-clip dropped the NaN log-prob in its max.
    **{f"plus-inf-logit-{name}": (OBJECTIVES[name], 37, "logit-other", math.inf, (0, 0))
       for name in ("mhpo", "mhpo-no-lfm", "mhpo-no-dhp", "sapo", "gspo", "ppo-clip")},
    # A NaN per-token temperature is data, as a NaN logit is: validation refuses only τ ≤ 0.
    "temperature-nan-mhpo": (MHPO(), 37, "temperature", math.nan, (0, 1)),
    "temperature-nan-ppo-clip": (PPOClip(), 33, "temperature", math.nan, (1, 0)),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regressions(name):
    objective, V, target, value, (b, t) = REGRESSIONS[name]
    inputs = _inputs(0, V, objective)
    TARGET[target].inject(inputs, b, t, value, random.Random(0))
    # β = 0, as found: a KL term would turn a log-prob of −inf into NaN and hide the finding.
    _check_injection(f"regression {name}", objective, None, inputs, TARGET[target], value, b, t,
                     "seq-mean-token-mean", 0.0)


def test_gspo_nan_advantage():
    """The contract for GSPO's advantage: a NaN one makes the loss NaN, as for every objective."""
    inputs = _inputs(0, 5, OBJECTIVES["gspo"])
    _advantage(inputs, 0, 0, math.nan, None)
    _check_injection("gspo NaN advantage", OBJECTIVES["gspo"], None, inputs, TARGET["adv"], math.nan, 0, 0,
                     "seq-mean-token-mean", BETA)


def test_gspo_infinite_reference_poisons_its_own_row():
    """A reference log-prob of +inf makes the token's KL term inf − inf, NaN: under GSPO too its
    gradient row is NaN in every element (the sequence term is clean: only its own row)."""
    inputs = _inputs(0, 5, OBJECTIVES["gspo"])
    TARGET["ref"].inject(inputs, 0, 1, math.inf, random.Random(0))
    _check_injection("gspo +inf reference", OBJECTIVES["gspo"], None, inputs, TARGET["ref"], math.inf, 0, 1,
                     "seq-mean-token-mean", BETA)


@pytest.mark.parametrize("name", ["ppo-clip", "sapo", "gpg", "mhpo"])
def test_nan_token_weight_poisons_its_row(name):
    """A NaN token weight at a valid token is data (SPEC.md, section 3): the loss is NaN and the
    token's gradient row NaN in every element on every path, also where the objective's
    derivative is a select that the clipped branch zeroes (PPO-clip, ratio e above 1 + ε, A > 0)."""
    objective = OBJECTIVES[name]
    inputs = _inputs(0, 5, objective)
    b, t = VALID_TOKENS[0]
    logp = reference.token_logprobs(inputs["logits"].double(), inputs["input_ids"].clamp(min=0),
                                    temperature=inputs["temperature"].double())
    inputs["old_logprobs"][b, t] = float(logp[b, t]) - 1.0
    inputs["advantages"][b, t] = 1.0
    inputs["token_weights"] = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) + 0.5
    inputs["token_weights"][b, t] = math.nan
    for path in PATHS:
        loss, grad, _ = _call(path, objective, inputs, "seq-mean-token-mean", 0.0)
        assert loss.isnan() and grad[b, t].isnan().all(), (path, grad[b, t])
        assert not grad[VALID & ~poisoned_rows(TARGET["adv"], objective, b, t)].isnan().any(), path


@pytest.mark.parametrize("name", ["ppo-clip", "sapo", "gspo"])
def test_an_infinite_ratio_where_the_term_is_flat_passes_no_gradient(name):
    """An old log-prob of −inf (r = inf even in float64) with A > 0: PPO-clip's clip binds, SAPO's
    gate saturates, GSPO's sequence ratio is clipped, so the token's term is flat in its log-prob
    (SPEC.md, section 7) and its gradient row is 0 on every path (autograd's 0 · inf gave the
    reference NaN there); the loss agrees."""
    objective = OBJECTIVES[name]
    inputs = _inputs(0, 5, objective)
    b, t = VALID_TOKENS[0]
    inputs["old_logprobs"][b, t] = -math.inf
    inputs["advantages"].abs_()
    results = {path: _call(path, objective, inputs, "seq-mean-token-mean", 0.0) for path in PATHS}
    want = results["reference"][0].item()
    for path, (loss, grad, _) in results.items():
        assert torch.isfinite(loss) and abs(loss.item() - want) <= FP32_RTOL * abs(want), (path, loss, want)
        assert not grad[b, t].any(), (path, grad[b, t])
    # A token weight of 0 there: w multiplies the advantage (SPEC.md, section 3), so PPO-clip's
    # −A·w·r is 0 · inf, NaN, on every path (a weight applied after the term gave the reference a
    # finite loss); SAPO's saturated gate and GSPO's mean over the sequence stay finite, alike.
    inputs["token_weights"] = torch.ones(B, T)
    inputs["token_weights"][b, t] = 0.0
    results = {path: _call(path, objective, inputs, "seq-mean-token-mean", 0.0) for path in PATHS}
    for path, (loss, grad, _) in results.items():
        if name == "ppo-clip":
            assert loss.isnan() and grad[b, t].isnan().all(), (path, loss)
        else:
            want = results["reference"][0].item()
            assert torch.isfinite(loss) and abs(loss.item() - want) <= FP32_RTOL * abs(want), (path, loss, want)


@pytest.mark.parametrize("truncation", ["filters", "replay"])
def test_a_nan_term_under_a_truncated_softmax_poisons_its_kept_set(truncation):
    """A NaN old log-prob at a valid token whose target is inside its kept set: the loss is NaN,
    the token's gradient row NaN in every element under the filters, and over the kept set only
    under replay (0 outside it, written without reading the logits there), on every path alike
    (the PyTorch path and the reference gave 0 outside the filters' kept set, Triton NaN)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 4, 24, generator=g)
    ids = x.argmax(-1)
    old, adv = -torch.rand(1, 4, generator=g) - 0.5, torch.randn(1, 4, generator=g)
    old[0, 1] = math.nan
    kw = dict(top_p=0.9, top_k=5) if truncation == "filters" else dict(
        kept_ids=(torch.arange(0, 13, 3), torch.cat([torch.stack([i, (i + 1) % 24, (i + 2) % 24]) for i in ids[0]])))
    rows = {}
    for path in PATHS:
        z = (x.double() if path == "reference" else x).clone().requires_grad_()
        if path == "reference":
            loss = reference.mhpo_loss(z, ids, old.double(), adv.double(), **kw)
        else:
            with mhpo_kernels.use_backend(path):
                loss = mhpo_kernels.mhpo_loss(z, ids, old, adv, **kw)
        loss.backward()
        assert loss.isnan(), path
        rows[path] = z.grad[0, 1]
        assert not z.grad[0, [0, 2, 3]].isnan().any(), path
    nan = rows["reference"].isnan()
    assert int(nan.sum()) == 24 if truncation == "filters" else 1 < int(nan.sum()) < 24
    for path, row in rows.items():
        assert torch.equal(row.isnan(), nan) and not row[~nan].any(), (path, row)


@pytest.mark.parametrize("truncation", ["filters", "replay"])
def test_fused_linear_infinite_advantage_under_a_truncated_softmax(truncation):
    """SPEC.md, section 5, rule 5 on the fused linear path's truncated loss: an infinite
    advantage gives an infinite loss, as on the logits and in the reference (its gradient used
    to be attached as a zero-valued Σ coef · logp minus its detached copy: inf − inf, NaN); the
    finite tokens' gradient rows stay finite."""
    g = torch.Generator().manual_seed(13)
    N, H, V = 6, 8, 20
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    ids, old = torch.randint(0, V, (N,), generator=g), -torch.rand(N, generator=g) - 1
    kw = dict(top_k=V, min_p=1e-9) if truncation == "filters" else dict(
        kept_ids=(torch.arange(N + 1) * 2, torch.stack([ids, (ids + 1) % V], 1).flatten()))
    for sign in (1.0, -1.0):
        adv = torch.randn(N, generator=g)
        adv[0] = sign * math.inf
        want = reference.mhpo_loss(hidden.double() @ weight.double().T, ids, old.double(), adv.double(), **kw)
        assert want.item() == -sign * math.inf
        for path in ("triton", "torch"):
            h = hidden.clone().requires_grad_()
            with mhpo_kernels.use_backend(path):
                loss = mhpo_kernels.fused_linear_mhpo_loss(h, weight, ids, old, adv, **kw)
                logits_loss = mhpo_kernels.mhpo_loss(hidden @ weight.T, ids, old, adv, **kw)
            loss.backward()
            assert loss.item() == logits_loss.item() == want.item(), (path, sign, loss, logits_loss)
            assert torch.isfinite(h.grad[1:]).all(), (path, sign)
