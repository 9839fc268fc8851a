"""The small records that pass between the public functions and the two sweeps."""

from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch

from .objectives import CISPO_KIND, PPO_CLIP_KIND

LOG2E = 1.4426950408889634

# The aggregation modes, in the order the prepare launch numbers them.
AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
# How the advantages are laid out (``_inputs._laid_out``); the prepare launch reads them so.
ADV_NONE, ADV_SCALAR, ADV_PER_SEQ, ADV_PER_TOKEN = range(4)
# The prepare launch's status vector (int64), read by the host in validation's one sync: the valid
# tokens, then each value check's count of offending tokens or sequences (the first bad id's flat
# position in its own slot), 0 where the check passed or does not apply.
(STATUS_N_VALID, STATUS_BAD_IDS, STATUS_FIRST_BAD, STATUS_MASK, STATUS_CU, STATUS_TAU, STATUS_NORM,
 STATUS_SEQ_COUNTS, STATUS_ADV_VARIES, STATUS_NOT_ONE_EACH, STATUS_OLD_POSITIVE, STATUS_REF_POSITIVE,
 STATUS_MIN_P, STATUS_TOP_P, STATUS_TOKEN_W, STATUS_KEPT_OFFSETS, STATUS_KEPT_IDS, STATUS_KEPT_TWICE) = range(18)
STATUS_SLOTS = 18
# A log-prob more than this above 0 at a valid token is no rounding error of a log-prob (a
# negative log-likelihood passed by mistake); the old and reference log-probs are refused then.
LOGP_ABOVE_ZERO = 1e-2
# The selection counts a row's candidates in this many bins a pass (kernels/select.py); over a
# vocabulary split each pass is a launch of one of these kinds (``slice_select.py``); the last three
# count top-k's run beside top-p's, in a second histogram.
SELECT_BINS = 2048
COUNT_SKIP, COUNT_UNIFORM, COUNT_KEYS, COUNT_SUMS, COUNT_JOINT_UNIFORM, COUNT_JOINT, COUNT_JOINT_SUMS = range(7)

# The finalize reduction's outputs: the 0-d loss, and the metrics as one fp32 vector in these slots.
METRICS = ("psi", "zeta", "survival", "abs_log_ratio", "saturated_frac", "entropy", "logp", "kl", "outside_support",
           "clip_low_frac", "clip_high_frac")
# The metrics each call reports, by objective (``loss.metrics_from_vector``): MHPO's own four only
# for MHPO, the clipped shares only for an objective that clips its token ratio (``clip_bounds``).
MHPO_METRICS = ("psi", "zeta", "survival", "abs_log_ratio", "saturated_frac", "entropy", "logp")
OTHER_METRICS = ("abs_log_ratio", "entropy", "logp")
CLIP_METRICS = OTHER_METRICS + ("clip_low_frac", "clip_high_frac")


@dataclass(frozen=True)
class TokenParams:
    """The per-token epilogue: which objective (``objectives.*_KIND``, and MHPO's LFM/DHP switches:
    compile-time flags of the kernels) and its runtime scalars (five slots whose meaning the
    objective defines, and β: kernel arguments, never compile-time)."""

    kind: int = 0
    values: tuple = (1.5, 1.5, 1.0, 2.0, 0.8)
    beta: float = 0.0
    lfm: bool = True
    dhp: bool = True

    @staticmethod
    def of(objective, beta):
        lfm, dhp = objective.flags()
        return TokenParams(objective.kind, tuple(float(v) for v in objective.values()), float(beta), lfm, dhp)


def clip_bounds(hp):
    """(lo, hi): the token ratio's clip bounds whose crossings the metrics count (PPO-clip's
    1 − ε_low and 1 + ε_high, CISPO's min_ratio and max_ratio), or None for an objective that
    clips no token ratio."""
    if hp.kind == PPO_CLIP_KIND:
        return 1.0 - hp.values[0], 1.0 + hp.values[1]
    if hp.kind == CISPO_KIND:
        return hp.values[1], hp.values[0]
    return None


def mhpo_token_params(c=1.5, k_pos=1.5, lam_pos=1.0, k_neg=2.0, lam_neg=0.8, beta=0.0):
    """TokenParams of MHPO with these hyperparameters."""
    return TokenParams(0, (c, k_pos, lam_pos, k_neg, lam_neg), beta)


# LogitMap's tensors of one value per row: what a subset of the rows takes a subset of.
PER_ROW = ("tau", "min_p", "top_k", "top_p", "cut", "kept_start", "kept_end")


def truncated_rows(cut, kept_start=None, kept_end=None):
    """(N,) bool: the rows truncated to a kept set: a replayed one not empty (``kept_start``,
    ``kept_end``: the CSR offsets' two views), else a finite threshold in ``cut`` (the filters');
    None when neither is given."""
    if kept_start is not None:
        return kept_end > kept_start
    return None if cut is None else cut > -float("inf")


@dataclass(frozen=True, eq=False)
class LogitMap:
    """x ↦ z, the logit the softmax sees: z = s·x/τ, or with softcap z = cap·tanh(s·x/cap)/τ.

    Stored as two multipliers, z = out_scale · x · in_scale or out_scale · tanh(in_scale · x); the
    sweeps take the derived constants below (``kernels/logit_map.py`` says how they are used).
    With a per-token temperature, ``tau`` holds τ_t per row ((N,) fp32, 1 at invalid rows) and the
    scalars are those of τ = 1: τ_t divides ``log2_scale`` and ``slope`` row by row (it never
    enters ``tanh_scale``), once per row, in each sweep. ``min_p`` ((N,) fp32, ≤ 0 off), ``top_k``
    ((N,) int32, ≤ 0 off) and ``top_p`` ((N,) fp32, ≥ 1 off) truncate the softmax to the
    sampler's kept set (SPEC.md, section 9), which the forward finds; ``cut``, the backward's,
    is the forward's threshold per row (``RowStats.cut``), and given to a forward without the
    filters, the threshold its sums use (a vocabulary slice's under min_p). ``kept_start``, ``kept_end`` ((N,)
    int64) and ``kept_ids`` ((K,) int32) replay a kept set instead: row r keeps
    ids[kept_start[r]:kept_end[r]] (none given: not truncated). From CSR offsets they are views,
    offsets[:-1] and offsets[1:] (``replay_rows``); a subset of the rows keeps the ids whole.
    """

    in_scale: float
    out_scale: float
    softcap: bool
    tau: Optional[torch.Tensor] = None
    min_p: Optional[torch.Tensor] = None
    top_k: Optional[torch.Tensor] = None
    top_p: Optional[torch.Tensor] = None
    cut: Optional[torch.Tensor] = None
    kept_start: Optional[torch.Tensor] = None
    kept_end: Optional[torch.Tensor] = None
    kept_ids: Optional[torch.Tensor] = None
    backend: Optional[str] = None   # the sweeps' ("triton", "torch"; None: the one current where they run)

    @property
    def filtered(self):
        """Whether the forward finds a kept set (a filter is given)."""
        return self.min_p is not None or self.top_k is not None or self.top_p is not None

    @property
    def replayed(self):
        """Whether a kept set is given (replay)."""
        return self.kept_start is not None

    @property
    def truncated(self):
        """Whether the softmax is truncated to a kept set, found or given."""
        return self.filtered or self.replayed

    def truncated_rows(self, cut):
        """(N,) bool: the rows truncated to a kept set, given the forward's thresholds ``cut``
        (``truncated_rows`` below); None when neither is on."""
        return truncated_rows(cut, self.kept_start, self.kept_end)

    @property
    def log2_scale(self):
        """k with k · u(x) = z · log2(e), u(x) = x or tanh(in_scale · x)."""
        return LOG2E * (self.out_scale if self.softcap else self.in_scale)

    @property
    def tanh_scale(self):
        """2 · log2(e) · in_scale: tanh(in_scale · x) = 1 − 2 / (1 + 2^(tanh_scale · x))."""
        return 2.0 * LOG2E * self.in_scale

    @property
    def slope(self):
        """dz/dx without softcap, and dz/dx / (1 − u²) with it: s/τ either way."""
        return self.in_scale * self.out_scale

    def rows(self, index):
        """The map of a subset of the rows (a slice or an index tensor of the per-row tensors)."""

        def rows(x):
            return None if x is None else x[index]

        return replace(self, **{name: rows(getattr(self, name)) for name in PER_ROW})

    def kept_row_of(self):
        """(K,) int64: the row of each kept id among this map's rows, −1 for an id of none. The
        rows' ranges of ids are disjoint: +(i + 1) at row i's start, −(i + 1) at its end, summed
        along the ids (no host sync)."""
        mark = torch.arange(1, self.kept_start.numel() + 1, device=self.kept_start.device)
        delta = torch.zeros(self.kept_ids.numel() + 1, dtype=torch.int64, device=mark.device)
        delta.index_add_(0, self.kept_start, mark).index_add_(0, self.kept_end, -mark)
        return delta.cumsum(0)[:-1] - 1

    @staticmethod
    def replay_rows(kept_offsets):
        """``kept_start`` and ``kept_end`` of CSR offsets (N + 1,): views, no copy (None: none)."""
        if kept_offsets is None:
            return dict(kept_start=None, kept_end=None)
        return dict(kept_start=kept_offsets[:-1], kept_end=kept_offsets[1:])

    @staticmethod
    def make(temperature: float, logit_scale: float = 1.0, softcap: Optional[float] = None, tau=None, min_p=None,
             top_k=None, top_p=None, cut=None, kept_offsets=None, kept_ids=None, backend=None):
        """``temperature`` a float; or 1.0 with ``tau`` the per-row τ_t ((N,) fp32). A call's map
        names its ``backend`` (``_dispatch.call_backend``), so that its backward runs where its
        forward ran, even outside the forward's ``use_backend`` block: the two backends form the
        exponents apart, and a kept set's threshold from one need not hold in the other."""
        rest = dict(tau=tau, min_p=min_p, top_k=top_k, top_p=top_p, cut=cut, kept_ids=kept_ids, backend=backend,
                    **LogitMap.replay_rows(kept_offsets))
        if softcap is None:
            return LogitMap(logit_scale / temperature, 1.0, False, **rest)
        return LogitMap(logit_scale / softcap, softcap / temperature, True, **rest)


class RowStats(NamedTuple):
    """What sweep 1 writes per row, each (N,) fp32; 0 at invalid rows.

    The row's log-sum-exp in base 2, log2 Σ_v 2^(k·u(x_v)) = lse2_base + lse2_rest, is kept in two
    parts so that neither loses the other's bits. ``loss`` and ``coef`` already carry the
    aggregation weight g_t, so the loss is ``loss.sum()`` and dL/dlogp_t = G · coef_t. Fields a
    sweep was not asked for are None.
    """

    lse2_base: torch.Tensor           # b = fp32(k · max_v u(x_v)) = z(max)·log2(e), rounded
    lse2_rest: torch.Tensor           # log2 Σ_v 2^(k·u(x_v) − b): log2 p_v = k·u(x_v) − b − lse2_rest
    logp: torch.Tensor                # z_y − lse
    entropy: Optional[torch.Tensor]   # −Σ_v p_v log p_v
    psi: Optional[torch.Tensor]       # ψ
    zeta: Optional[torch.Tensor]      # ζ
    loss: Optional[torch.Tensor]      # g_t · loss_t
    coef: Optional[torch.Tensor]      # g_t · d loss_t / d logp_t
    cut: Optional[torch.Tensor] = None  # truncated: the kept set is d_v = k·u(x_v) − b ≥ cut (−inf: all)

    @staticmethod
    def empty(n, device, *, with_entropy, with_loss, truncated=False, dtype=torch.float32):
        def new():
            return torch.empty(n, device=device, dtype=dtype)

        return RowStats(
            lse2_base=new(),
            lse2_rest=new(),
            logp=new(),
            entropy=new() if with_entropy else None,
            psi=new() if with_loss else None,
            zeta=new() if with_loss else None,
            loss=new() if with_loss else None,
            coef=new() if with_loss else None,
            cut=new() if truncated else None,
        )
