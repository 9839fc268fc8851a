"""The policy objectives ``policy_loss`` computes, as frozen, validated records.

Every token-level objective is the same two sweeps with a different per-token epilogue (chosen in
the kernel by a constexpr, its hyperparameters passed as runtime values: a new value never
recompiles). GSPO is sequence-level: the forward sweep gives the log-probs, the sequence terms are
O(N) work between the sweeps, and the usual backward sweep writes the gradient. SPEC.md, section 7,
gives each objective's per-token loss and its derivative.
"""

import math
import numbers
from dataclasses import dataclass, fields
from typing import Optional

import torch

# The epilogue each objective selects in the kernels (``token_math._token_loss``).
MHPO_KIND, PPO_CLIP_KIND, CISPO_KIND, SAPO_KIND, GPG_KIND, GSPO_KIND = range(6)


def _real(owner, name, value, *, low=None, low_open=True, high=None, optional=False):
    """Check one field: a finite real number in the stated range, or None when optional; inside
    torch.compile, where it may be a symbolic input, the range as an assertion of the graph."""
    if value is None and optional:
        return
    where = f"{owner}.{name}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a real number, got {type(value).__name__}")
    if torch.compiler.is_compiling():
        # As a tensor, the message not formatting it: a check of the symbolic number itself would
        # specialize the graph on it, and formatting it cannot be traced.
        t = torch.zeros((), dtype=torch.float64, device="cpu") + value
        ok = t.abs() < math.inf   # False for NaN too
        if low is not None:
            ok = ok & ((t > low) if low_open else (t >= low))
        if high is not None:
            ok = ok & (t < high)
        rule = "" if low is None else f" and {'>' if low_open else '>='} {low}"
        torch._assert_async(ok, f"{where} must be finite{rule}{'' if high is None else f' and < {high}'}")
        return
    if not (value == value and abs(value) != math.inf):   # math.isfinite, as torch.compile traces a number
        raise ValueError(f"{where} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{where} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value >= high:
        raise ValueError(f"{where} must be < {high}, got {value}")


class _Objective:
    """What the sweeps need of an objective: the epilogue kind, its five runtime values, flags."""

    kind: int
    sequence_level = False

    def values(self):
        return (0.0,) * 5

    def flags(self):
        return (True, True)  # LFM, DHP: meaningful for MHPO only

    def __repr__(self):
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{type(self).__name__}({args})"


@dataclass(frozen=True, repr=False)
class MHPO(_Objective):
    """MHPO (the paper's defaults): w = exp(ψ − ζ), loss = −w·A with ψ = c·tanh(log r / c) and the
    Weibull hazard ζ. Ablations: ``lfm=False`` gives ψ = log r (no modulator), ``dhp=False``
    gives ζ = 0 (no hazard penalty)."""

    c: float = 1.5
    k_pos: float = 1.5
    lam_pos: float = 1.0
    k_neg: float = 2.0
    lam_neg: float = 0.8
    lfm: bool = True
    dhp: bool = True
    kind = MHPO_KIND

    def __post_init__(self):
        for name in ("c", "k_pos", "lam_pos", "k_neg", "lam_neg"):
            _real("MHPO", name, getattr(self, name), low=0.0)
        for name in ("lfm", "dhp"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MHPO.{name} must be a bool, got {type(getattr(self, name)).__name__}")

    def values(self):
        return (self.c, self.k_pos, self.lam_pos, self.k_neg, self.lam_neg)

    def flags(self):
        return (self.lfm, self.dhp)


@dataclass(frozen=True, repr=False)
class PPOClip(_Objective):
    """PPO's clipped surrogate, loss = max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high)): GRPO, DAPO
    (ε_high > ε_low), BNPO and Dr. GRPO differ from it only in ε and aggregation. ``dual_clip``
    = C > 1 caps a negative-advantage token's loss at −A·C (verl's ``clip_ratio_c``)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    kind = PPO_CLIP_KIND

    def __post_init__(self):
        _real("PPOClip", "eps_low", self.eps_low, low=0.0, low_open=False, high=1.0)
        _real("PPOClip", "eps_high", self.eps_high, low=0.0, low_open=False)
        _real("PPOClip", "dual_clip", self.dual_clip, low=1.0, optional=True)

    def values(self):
        return (self.eps_low, self.eps_high, 0.0 if self.dual_clip is None else self.dual_clip, 0.0, 0.0)


@dataclass(frozen=True, repr=False)
class CISPO(_Objective):
    """CISPO: loss = −sg[clip(r, min_ratio, max_ratio)]·A·logp: the clipped ratio only weights
    the plain policy gradient. TRL's ``cispo`` is (0, ε_high); verl's is (1 − ε_low, 1 + ε_high)."""

    max_ratio: float = 5.0
    min_ratio: float = 0.0
    kind = CISPO_KIND

    def __post_init__(self):
        _real("CISPO", "max_ratio", self.max_ratio, low=0.0)
        _real("CISPO", "min_ratio", self.min_ratio, low=0.0, low_open=False)
        if torch.compiler.is_compiling():   # an assertion of the graph, as in _real
            torch._assert_async(torch.zeros((), dtype=torch.float64, device="cpu") + self.min_ratio <= self.max_ratio,
                                "CISPO.min_ratio must be <= max_ratio")
        elif self.min_ratio > self.max_ratio:
            raise ValueError(f"CISPO.min_ratio must be <= max_ratio, got {self.min_ratio} > {self.max_ratio}")

    def values(self):
        return (self.max_ratio, self.min_ratio, 0.0, 0.0, 0.0)


@dataclass(frozen=True, repr=False)
class SAPO(_Objective):
    """SAPO's soft gate: loss = −σ(τ(r − 1))·(4/τ)·A, τ = tau_pos for A > 0, tau_neg otherwise."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05
    kind = SAPO_KIND

    def __post_init__(self):
        _real("SAPO", "tau_pos", self.tau_pos, low=0.0)
        _real("SAPO", "tau_neg", self.tau_neg, low=0.0)

    def values(self):
        return (self.tau_pos, self.tau_neg, 0.0, 0.0, 0.0)


@dataclass(frozen=True, repr=False)
class GPG(_Objective):
    """GPG: the plain policy gradient, loss = −A·logp (no ratio)."""

    kind = GPG_KIND


@dataclass(frozen=True, repr=False)
class GSPO(_Objective):
    """GSPO: the sequence's ratio s_i = exp(masked mean over its tokens of log r), PPO-clipped,
    loss_i = max(−A_i·s_i, −A_i·clip(s_i, 1 − ε_low, 1 + ε_high)), with the gradient through the
    mean (TRL's ``importance_sampling_level="sequence"``). Every valid token of sequence i carries
    loss_i, aggregated like any per-token loss. Needs one advantage per sequence."""

    eps_low: float = 3e-4
    eps_high: float = 4e-4
    kind = GSPO_KIND
    sequence_level = True

    def __post_init__(self):
        _real("GSPO", "eps_low", self.eps_low, low=0.0, low_open=False, high=1.0)
        _real("GSPO", "eps_high", self.eps_high, low=0.0, low_open=False)

    def values(self):
        return (self.eps_low, self.eps_high, 0.0, 0.0, 0.0)


OBJECTIVES = (MHPO, PPOClip, CISPO, SAPO, GPG, GSPO)


def check_objective(objective):
    if isinstance(objective, type) and issubclass(objective, OBJECTIVES):
        raise TypeError(f"objective must be an instance, got the class {objective.__name__}: pass "
                        f"{objective.__name__}() (or with its hyperparameters, e.g. PPOClip(eps_low=0.2))")
    if not isinstance(objective, OBJECTIVES):
        names = ", ".join(o.__name__ for o in OBJECTIVES)
        raise TypeError(f"objective must be one of {names} (from mhpo_kernels.objectives), "
                        f"got {type(objective).__name__}")
    return objective
