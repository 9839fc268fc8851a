"""Validation of the public arguments: first what the host knows without reading a tensor (types,
dtypes, shapes, devices, numbers), each error naming its argument (TypeError for a kind or dtype,
ValueError for a shape or value); then one prepare launch computes the flat per-token inputs of
the sweeps and the value checks' flags, read in the call's one host sync (asserts of the graph
inside torch.compile)."""

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ._sweep_types import (
    ADV_NONE, ADV_PER_SEQ, ADV_PER_TOKEN, ADV_SCALAR, AGG_MODES, STATUS_ADV_VARIES, STATUS_BAD_IDS, STATUS_CU,
    STATUS_FIRST_BAD, STATUS_MASK, STATUS_N_VALID, STATUS_NORM, STATUS_NOT_ONE_EACH, STATUS_OLD_POSITIVE,
    STATUS_REF_POSITIVE, STATUS_SEQ_COUNTS, STATUS_TAU, STATUS_MIN_P, STATUS_TOP_P, STATUS_TOKEN_W,
    STATUS_KEPT_OFFSETS, STATUS_KEPT_IDS, STATUS_KEPT_TWICE,
)

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT32_MAX = 2**31 - 1
FP32_TINY, FP32_BELOW_ONE = 2.0**-149, 1 - 2.0**-24   # fp32's smallest value above 0, largest below 1
FP32_NORMAL, FP32_MAX = 2.0**-126, (2 - 2.0**-23) * 2.0**127   # fp32's smallest normal value, largest value
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


@dataclass
class Batch:
    """The per-token inputs of the sweeps, flat over the N tokens of ``input_ids``."""

    token_shape: torch.Size         # shape of input_ids: what per-token outputs are reshaped to
    cu: Optional[torch.Tensor]      # (S + 1,) int64 boundaries of a packed stream, else None
    n_seqs: int                     # S: sequences (cu_seqlens, B rows of T, or one of N)
    T: int                          # tokens per row of a padded batch (0 when packed)
    target: torch.Tensor            # (N,) int32, the id at valid tokens, −1 elsewhere
    old: Optional[torch.Tensor] = None     # (N,) fp32, None = on-policy
    adv: Optional[torch.Tensor] = None     # (N,) fp32
    weight: Optional[torch.Tensor] = None  # (N,) fp32 aggregation weight g_t, 0 at invalid tokens
    ref: Optional[torch.Tensor] = None     # (N,) fp32
    tau: Optional[torch.Tensor] = None     # (N,) fp32 per-token temperature (read at valid tokens only)
    n_valid: Optional[int] = None   # valid tokens, read in validation's one host sync (with a split vocabulary,
    #                                 the agreement's); None inside torch.compile
    tp: Optional[object] = None     # vocab_parallel.VocabSlice when the vocabulary is split over ranks
    # A split vocabulary: (the prepare launch's status, not read yet; a function of its values read
    # on the host that gives the error they raise, or None): the agreement reads it (vocab_parallel).
    unread_status: Optional[tuple] = None
    min_p: Optional[torch.Tensor] = None   # (N,) fp32 min_p per token (SPEC.md, section 9), None: off
    top_k: Optional[torch.Tensor] = None   # (N,) int32 top_k per token, None: off
    top_p: Optional[torch.Tensor] = None   # (N,) fp32 top_p per token, None: off
    kept_offsets: Optional[torch.Tensor] = None  # (N + 1,) int64: a replayed kept set (``check_kept_ids``)
    kept_ids: Optional[torch.Tensor] = None      # (K,) int32

    @property
    def valid(self):
        return self.target >= 0

    def truncation(self):
        """The sampler's filters per token and the replayed kept set, by ``LogitMap.make``'s names."""
        return dict(min_p=self.min_p, top_k=self.top_k, top_p=self.top_p, kept_offsets=self.kept_offsets,
                    kept_ids=self.kept_ids)

    def layout(self):
        """(cu, S, T) as the prepare launch reads the sequences."""
        return self.cu, self.n_seqs, self.T

    def boundaries(self):
        """The (S + 1,) sequence boundaries of every layout (made on the device when not packed)."""
        from .torch_sweeps import boundaries

        return boundaries(self.cu, self.n_seqs, self.T, self.target.device)


def _check_real(name, value, low_ok):
    """A finite real number (not a bool, not a tensor) > 0, or ≥ 0 with ``low_ok``; inside
    torch.compile, where it may be a symbolic input, an assertion of the graph."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    relation = ">=" if low_ok else ">"
    if torch.compiler.is_compiling():
        # As a tensor: a check of the symbolic number itself would specialize the graph on it.
        t = torch.zeros((), dtype=torch.float64, device="cpu") + value
        torch._assert_async(((t >= 0) if low_ok else (t > 0)) & (t < math.inf), f"{name} must be finite and {relation} 0")
        return value
    try:
        finite = math.isfinite(value)
    except OverflowError:   # an int beyond a float's range
        raise ValueError(f"{name} must be finite and {relation} 0, got an int beyond a float's range") from None
    if not (finite and (value >= 0 if low_ok else value > 0)):
        raise ValueError(f"{name} must be finite and {relation} 0, got {value}")
    return float(value)


def check_positive(name, value):  # a finite real number > 0
    return _check_real(name, value, low_ok=False)


def check_nonnegative(name, value):  # a finite real number ≥ 0
    return _check_real(name, value, low_ok=True)


def check_temperature(temperature):
    """(τ for the logit map, the per-token tensor or None); a tensor's shape and values are
    checked with the other per-token inputs, and the map then takes τ = 1."""
    if not isinstance(temperature, torch.Tensor):
        return check_positive("temperature", temperature), None
    if not temperature.is_floating_point():
        raise TypeError(f"temperature must be a number or a floating tensor, got a {temperature.dtype} tensor")
    return 1.0, temperature  # a 0-d tensor is one τ for every token (``_per_token_tensor``)


def _per_token_tensor(name, x, token_shape, device):
    """A tensor of one value per token, shaped like input_ids or flat (N,), or 0-d (one value for
    every token, kept on the device as a 0-d normalizer is), on ``device``: flat (N,), detached."""
    _check_tensor(name, x, device)
    n = math.prod(token_shape)
    if x.dim() == 0:
        x = x.expand(n)
    if x.shape != token_shape and tuple(x.shape) != (n,):
        raise ValueError(f"{name} must be a number, a 0-d tensor or a tensor of shape {tuple(token_shape)} "
                         f"like input_ids (or ({n},)), got shape {tuple(x.shape)}")
    return x.detach().reshape(-1)


class Sampling(NamedTuple):
    """The sampler's filters (SPEC.md, section 9) as ``check_sampling`` leaves them: each None
    (off), a number, or a tensor of one value per token (its values checked in the prepare launch)."""

    min_p: object = None
    top_k: object = None
    top_p: object = None

    @property
    def on(self):
        return any(v is not None for v in self)



# Per filter: whether its numbers are integers, when a number is off, the numbers that are refused
# (NaN among them), and the range the message states.
_FILTERS = dict(
    min_p=(False, lambda v: v <= 0, lambda v: not v <= 1, "lie in [0, 1] (≤ 0 is off)"),
    top_k=(True, lambda v: v <= 0, lambda v: False, "be an integer (≤ 0 is off)"),
    top_p=(False, lambda v: v >= 1, lambda v: not v > 0, "be > 0 (≥ 1 is off)"),
)


def _check_filter(name, value):
    integer, off, bad, allowed = _FILTERS[name]
    if value is None or isinstance(value, torch.Tensor):
        if value is not None and not (_is_integer(value) if integer else value.is_floating_point()):
            raise TypeError(f"{name} must be a number or {'an integer' if integer else 'a floating'} tensor, "
                            f"got a {value.dtype} tensor")
        return value
    kinds = (numbers.Integral, torch.SymInt) if integer else (numbers.Real, torch.SymFloat, torch.SymInt)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be None, {'an int' if integer else 'a number'} or a tensor, "
                        f"got {type(value).__name__}")
    if not integer and value != value and not torch.compiler.is_compiling():   # inside: the asserts below
        raise ValueError(f"{name} must {allowed}, got {value}")
    if off(value):
        return None
    if torch.compiler.is_compiling():  # the bound as an assert (top_p's: the prepare launch's), not a guard
        if name == "min_p":
            torch._assert_async(torch.zeros((), dtype=torch.float64, device="cpu") + value <= 1,
                                f"{name} must {allowed}")
        return value
    if bad(value):
        raise ValueError(f"{name} must {allowed}, got {value}")
    if integer:
        return int(value)
    # On stays on in fp32, which the kernels read: a value below its smallest (which rounds to 0),
    # or a top_p between 1 and the largest fp32 below 1 (which rounds to 1), takes that bound.
    return min(max(float(value), FP32_TINY), FP32_BELOW_ONE) if 0 < value < 1 else float(value)


def check_sampling(min_p=None, top_k=None, top_p=None):
    """The sampler's filters: None, a number (off as SPEC.md, section 9 says: None then), or a
    tensor shaped like input_ids (its shape and values checked with the other per-token inputs).
    Inside torch.compile a number stays a graph input: whether it is on is a guard."""
    return Sampling(_check_filter("min_p", min_p), _check_filter("top_k", top_k), _check_filter("top_p", top_p))


def check_kept_ids(kept_ids, sampling):
    """``kept_ids``: None, or the sampler's kept set per token row as CSR, a pair (offsets, ids)
    (SPEC.md, section 9); its shapes and values are checked with the other per-token inputs."""
    if kept_ids is None:
        return None
    if not (isinstance(kept_ids, (tuple, list)) and len(kept_ids) == 2):
        raise TypeError(f"kept_ids must be None or a pair (offsets, ids) of integer tensors, got "
                        f"{type(kept_ids).__name__}")
    if sampling.on:
        raise ValueError("kept_ids replays the sampler's kept set, which its filters already made: min_p, top_k "
                         "and top_p must be off with it")
    return tuple(kept_ids)


def _kept_tensors(kept_ids, token_shape, device, V):
    """The replayed kept set as (int64 offsets (N + 1,), ids (K,) as given, their int64 keys
    row · V + id sorted), whose values the prepare launch checks (``STATUS_KEPT_*``: offsets
    0 ... K non-decreasing, ids in [0, V), no key twice), or None."""
    if kept_ids is None:
        return None
    offsets, ids = kept_ids
    n = math.prod(token_shape)
    for name, x in (("offsets", offsets), ("ids", ids)):
        _check_tensor(f"kept_ids' {name}", x, device, "int")
        if x.dim() != 1:
            raise ValueError(f"kept_ids' {name} must be 1-D, got shape {tuple(x.shape)}")
    if offsets.numel() != n + 1:
        raise ValueError(f"kept_ids' offsets must have shape ({n + 1},): one more than the {n} tokens of input_ids "
                         f"(row r keeps ids[offsets[r]:offsets[r + 1]]), got ({offsets.numel()},)")
    offsets, ids = offsets.detach().to(torch.int64).contiguous(), ids.detach().contiguous()
    row_of = torch.searchsorted(offsets, torch.arange(ids.numel(), device=device), right=True) - 1
    return offsets, ids, (row_of * V + ids).sort().values   # one key per (row, id) for ids in [0, V)


def _filter_tensor(name, value, token_shape, device):
    """A filter's value (``check_sampling``) as (N,) on ``device``, fp32 (top_k int32), or None."""
    if value is None:
        return None
    n = math.prod(token_shape)
    dtype = torch.int32 if name == "top_k" else torch.float32
    if not isinstance(value, torch.Tensor):
        value = min(value, INT32_MAX) if name == "top_k" else value
        if not torch.compiler.is_compiling():  # ``check_sampling`` rounded it for fp32
            return torch.empty(n, dtype=dtype, device=device).fill_(value)  # one device op
        # Arithmetic: a new value is a graph input, no recompile; rounded for fp32 as a float64 tensor is.
        value = torch.zeros(n, dtype=torch.int64 if name == "top_k" else torch.float64, device=device) + value
    else:
        value = _per_token_tensor(name, value, token_shape, device)
    if name == "top_k":  # any k beyond the vocabulary keeps every finite logit; any k ≤ 0 is off
        value = value.to(torch.int64).clamp(-1, INT32_MAX)
    elif value.dtype == torch.float64:  # what fp32 would round off or to 1: kept on, or refused (min_p > 1)
        on = (value > 0) & (value < 1)
        value = torch.where(on, value.clamp(FP32_TINY, FP32_BELOW_ONE), value)
        if name == "min_p":   # the prepare launch refuses NaN and fp32 values above 1
            value = torch.where(value > 1, math.nan, value)
    return value.to(dtype).contiguous()


def check_agg_mode(loss_agg_mode):
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    return loss_agg_mode


def check_flag(name, value):
    """A bool (not a truthy object: ``"no"`` must not mean True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_tp_group(tp_group):
    """None or a ``torch.distributed`` process group."""
    if tp_group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(tp_group, dist.ProcessGroup)):
        raise TypeError(f"tp_group must be None or a torch.distributed ProcessGroup, got {type(tp_group).__name__}")
    return tp_group


def has_internal_overlap(x):
    """True unless ``x``'s elements provably occupy distinct memory (each stride, smallest first,
    exceeds the span of the dims below it)."""
    span = 0
    for stride, size in sorted((abs(st), s) for s, st in zip(x.shape, x.stride()) if s > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def overwrites_a_leaf(logits):
    """Whether writing into ``logits`` would overwrite a leaf that requires grad: it is one, or a
    view of one."""
    return logits.requires_grad and (logits if logits._base is None else logits._base).is_leaf


def check_inplace(logits, logits3, inplace_backward):
    """``inplace_backward``, refused for a leaf that requires grad or a view of one (its values
    would be lost) and for logits whose elements share memory (the rows' gradients would
    overwrite each other)."""
    if not check_flag("inplace_backward", inplace_backward):
        return False
    if overwrites_a_leaf(logits):
        raise ValueError("inplace_backward=True would overwrite logits, a leaf tensor that requires grad or a "
                         "view of one; use it on logits computed by the model (e.g. an LM head's output)")
    if has_internal_overlap(logits3):
        raise ValueError(f"inplace_backward=True needs logits whose elements do not share memory, got a "
                         f"view with shape {tuple(logits.shape)} and strides {logits.stride()} (e.g. an "
                         f"expand); pass inplace_backward=False or a contiguous copy")
    return True


def check_grad_in_forward(grad_in_forward, objective=None, tp_group=None, entropy_coef=0.0):
    """``grad_in_forward``, only where the forward knows the whole gradient."""
    if not check_flag("grad_in_forward", grad_in_forward):
        return False
    if tp_group is not None:
        raise ValueError("grad_in_forward=True is not supported with tp_group: the gradient needs the "
                         "statistics of every rank's slice, combined after the forward sweep")
    if objective is not None and objective.sequence_level:
        raise ValueError("grad_in_forward=True is not supported with a sequence-level objective (GSPO): its "
                         "sequence ratios are formed after the sweep over the logits")
    if entropy_coef > 0:
        raise ValueError("grad_in_forward=True is not supported with entropy_coef > 0: it computes the "
                         "gradient of the loss alone, with no entropy term")
    return True


def check_ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(f"ignore_index must lie in int64's range, got {ignore_index}")
    return int(ignore_index)


def _is_integer(x):
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def _check_tensor(name, x, device, kind=None, host_ok=False):
    """A tensor on ``device`` (or, ``host_ok``, on the CPU); ``kind`` "float", "int" or "real" (a
    mask: bool or 0/1 numbers): of that kind of dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != device and not (host_ok and x.device.type == "cpu"):
        raise ValueError(f"{name} is on {x.device}, but the inputs are on {device}")
    if kind == "real" and x.is_complex():
        raise TypeError(f"{name} must be bool or 0/1 numbers, got {x.dtype}")
    if kind == "float" and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if kind == "int" and not _is_integer(x):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x


def _like_ids(name, x, token_shape, device, kind):
    """An optional tensor shaped like input_ids (its values: the prepare launch), flat, detached
    and contiguous; of ``kind`` "float": in fp32 (a copy only if needed)."""
    if x is None:
        return None
    _check_tensor(name, x, device, kind)
    if x.shape != token_shape:
        raise ValueError(f"{name} must have shape {tuple(token_shape)} like input_ids, got {tuple(x.shape)}")
    x = x.detach().reshape(-1)
    return (x.to(torch.float32) if kind == "float" else x).contiguous()


def check_float_tensor(name, x):
    """A tensor in one of the dtypes the kernels read: float32, bfloat16 or float16."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x


def check_logits(logits, input_ids, tp_group=None):
    """(a (B, T', V) view of the logits with unit stride along V, the token shape, shifted):
    ``shifted``, logits one position longer than input_ids along T (the next-token shift)."""
    if isinstance(logits, torch.Tensor) and logits.dtype == torch.float64:
        from . import _dispatch

        if tp_group is not None:
            raise TypeError("logits are float64, which tp_group does not take: the slices' statistics combine in "
                            "fp32; pass float32 logits, or the whole vocabulary without tp_group")
        if not torch.compiler.is_compiling():  # inside, the sweeps op refuses them when it runs
            _dispatch.check_float64(logits.device)
    else:
        check_float_tensor("logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (B, T, V), (B, T + 1, V) or (N, V), got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a vocabulary dimension V >= 1, got V = 0")
    token_shape, shifted = logits.shape[:-1], False
    if (logits.dim() == 3 and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2
            and tuple(input_ids.shape) == (logits.shape[0], logits.shape[1] - 1)):
        token_shape, shifted = input_ids.shape, True
    logits3 = logits if logits.dim() == 3 else logits.unsqueeze(0)
    if logits3.stride(-1) != 1:
        # The kernels read rows with unit stride: a vocabulary of one takes it as a view (its one
        # element has no neighbour), any other layout costs one copy here.
        logits3 = logits3.as_strided(logits3.shape, (*logits3.stride()[:2], 1)) if logits3.shape[-1] == 1 \
            else logits3.contiguous()
    return logits3, token_shape, shifted


def check_normalizer(normalizer, device):
    """None, a finite number > 0, or a 0-d real tensor on ``device`` or the CPU (its value is
    checked in the prepare launch)."""
    if normalizer is None:
        return None
    if not isinstance(normalizer, torch.Tensor):
        value = check_positive("normalizer", normalizer)
        if not torch.compiler.is_compiling() and not FP32_NORMAL <= value <= FP32_MAX:
            # the weights 1/normalizer are fp32: beyond this range they vanish or overflow
            raise ValueError(f"normalizer must lie in fp32's normal range [{FP32_NORMAL:.4g}, {FP32_MAX:.4g}] "
                             f"(the weights 1/normalizer are fp32), got {value}")
        return value
    if normalizer.is_complex() or normalizer.dtype == torch.bool:
        raise TypeError(f"normalizer must be a number or a 0-d real tensor, got a {normalizer.dtype} tensor")
    if normalizer.dim() != 0:
        raise ValueError(f"normalizer must be a number or a 0-d tensor, got a tensor of shape "
                         f"{tuple(normalizer.shape)}")
    return _check_tensor("normalizer", normalizer, device, host_ok=True).detach().to(device)


def _check_ids(input_ids, token_shape, device, source):
    _check_tensor("input_ids", input_ids, device, "int")
    if input_ids.shape != token_shape:
        shifted = ""
        if len(token_shape) == 2 and source.startswith("logits"):
            B, T = token_shape
            shifted = (f" or ({B}, {T - 1}): the ids each position predicts. Logits (B, T + 1, V), a model's output "
                       f"on seqs, go whole with ids (B, T) = seqs[:, 1:] (the next-token shift); logits (B, T, V) "
                       f"with ids (B, T) are read as already aligned, position t predicting ids[:, t]")
        elif len(token_shape) == 2 and tuple(input_ids.shape) == (token_shape[0], token_shape[1] - 1):
            raise ValueError(f"input_ids must have shape {tuple(token_shape)} ({source}), got "
                             f"{tuple(input_ids.shape)}: hidden states take no next-token shift; pass "
                             f"hidden[:, :-1], the positions that predict the ids")
        raise ValueError(f"input_ids must have shape {tuple(token_shape)} ({source}){shifted}, "
                         f"got {tuple(input_ids.shape)}")
    ids = input_ids.detach().reshape(-1)
    # Unsigned ids (a tokenizer's uint16 or uint32) as int64: the kernels compare them with a negative ignore_index.
    return (ids if ids.dtype.is_signed else ids.to(torch.int64)).contiguous()


def _laid_out(name, x, token_shape, device, cu, n_seqs):
    """(layout, values, ambiguous) of the advantages, or of another input laid out as they may be
    (``name``): ADV_PER_TOKEN (input_ids' shape), ADV_SCALAR (() or (1,)) or ADV_PER_SEQ ((B,) or
    (B, 1) with (B, T) ids; (S,) or (S, 1) with cu_seqlens, ``n_seqs`` = S). Values flat,
    contiguous but for one value for all; ambiguous: (N,) with as many sequences of cu_seqlens as
    tokens, read per token, which is the same only if every sequence has one token (the prepare
    launch checks it)."""
    _check_tensor(name, x, device, "float")
    per_seq = (n_seqs,) if cu is not None else token_shape[:1] if len(token_shape) == 2 else None
    if x.shape == token_shape:
        layout = ADV_PER_TOKEN
    elif x.dim() <= 1 and x.numel() == 1:
        layout = ADV_SCALAR
    elif per_seq is not None and x.shape in (per_seq, (*per_seq, 1)):
        layout = ADV_PER_SEQ
    elif cu is not None:
        raise ValueError(f"{name} must have shape (S,) or (S, 1) = ({n_seqs}, 1) per sequence of cu_seqlens, "
                         f"(N,) = ({token_shape[0]},) per token, (1,) or (), got {tuple(x.shape)}")
    elif per_seq is not None:
        B, T = token_shape
        raise ValueError(f"{name} must have shape (B,) = ({B},), (B, 1) = ({B}, 1), (B, T) = ({B}, {T}), (1,) "
                         f"or (), got {tuple(x.shape)}")
    else:
        raise ValueError(f"{name} must have shape (N,) = ({token_shape[0]},), (1,) or (), got {tuple(x.shape)}")
    flat = x.detach().reshape(-1)
    ambiguous = cu is not None and layout == ADV_PER_TOKEN and x.dim() == 1 and n_seqs == flat.numel() > 1
    return layout, flat if layout == ADV_SCALAR else flat.contiguous(), ambiguous


def _check_cu_seqlens(cu_seqlens, token_shape, device):
    """The (S + 1,) boundaries of packed sequences as int64 (their values: the prepare launch)."""
    if cu_seqlens is None:
        return None
    _check_tensor("cu_seqlens", cu_seqlens, device, "int", host_ok=True)
    if len(token_shape) != 1:
        raise ValueError(f"cu_seqlens describes a packed stream: flat input_ids (N,) with logits (N, V) or hidden "
                         f"(N, H); got input_ids of shape {tuple(token_shape)} (a padded batch needs no cu_seqlens)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape (S + 1,), one more than the S sequences, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() == 1 and token_shape[0] > 0:   # the kernels index the first sequence
        raise ValueError(f"{dict(_messages(token_shape[0]))[STATUS_CU]}: (S + 1,) with S ≥ 1 for N > 0, got shape (1,)")
    # Frameworks often keep a host copy of the boundaries (for flash-attention's max_seqlen): taken as is.
    return cu_seqlens.detach().to(device=device, dtype=torch.int64).contiguous()   # the kernels read it flat


def _check_seq_valid_tokens(seq_valid_tokens, n_seqs, device):
    """Each sequence's valid tokens over every rank (context parallelism), (S,) integers."""
    if seq_valid_tokens is None:
        return None
    _check_tensor("seq_valid_tokens", seq_valid_tokens, device, "int")
    if seq_valid_tokens.shape != (n_seqs,):
        raise ValueError(f"seq_valid_tokens must have shape (S,) = ({n_seqs},), one count per sequence, "
                         f"got {tuple(seq_valid_tokens.shape)}")
    return seq_valid_tokens.detach().to(torch.float32).contiguous()


def _messages(N=None):
    """The status slots that fail a call, in the order they are raised, with their messages (N:
    the number of tokens; None: unnamed)."""
    n = "N" if N is None else f"N = {N}"
    positive = ("{} holds finite values above 0 at valid tokens: log-probs are ≤ 0 (a negative log-likelihood "
                "passed by mistake? pass log-probs, e.g. -nll)")
    return (
        (STATUS_BAD_IDS, "input_ids holds ids outside [0, V) at valid positions (use ignore_index or mask to skip)"),
        (STATUS_MASK, "mask must hold only 0 and 1 (or be bool)"),
        (STATUS_NORM, "normalizer must be finite and > 0"),
        (STATUS_CU, f"cu_seqlens must start at 0, be non-decreasing and end at {n} (the number of tokens)"),
        (STATUS_TAU, "temperature must be finite and > 0 at valid tokens (a NaN one is data: it propagates)"),
        (STATUS_NOT_ONE_EACH, f"advantages or token_weights of shape ({'N' if N is None else N},) are ambiguous: "
                              f"cu_seqlens has S = {n} sequences but not one token each: pass per-sequence values "
                              f"as (S, 1)"),
        (STATUS_SEQ_COUNTS, "seq_valid_tokens must count each sequence's valid tokens over every rank: it is below "
                            "this rank's own count for some sequence"),
        (STATUS_ADV_VARIES, "advantages must be one per sequence for GSPO: (B,) or (B, 1) (with cu_seqlens (S,) or "
                            "(S, 1)), or per token and constant over each sequence's valid tokens"),
        (STATUS_OLD_POSITIVE, positive.format("old_logprobs")),
        (STATUS_REF_POSITIVE, positive.format("ref_logprobs")),
        (STATUS_MIN_P, "min_p must lie in [0, 1] at valid tokens (≤ 0 is off): it holds NaN or a value above 1"),
        (STATUS_TOP_P, "top_p must be > 0 at valid tokens (≥ 1 is off): it holds NaN or a value ≤ 0"),
        (STATUS_TOKEN_W, "token_weights must be ≥ 0 at valid tokens: it holds a negative value"),
        (STATUS_KEPT_OFFSETS, "kept_ids' offsets must start at 0, be non-decreasing and end at the number of ids"),
        (STATUS_KEPT_IDS, "kept_ids holds ids outside [0, V) (V: the logits' last dimension)"),
        (STATUS_KEPT_TWICE, "kept_ids holds an id twice in one row's kept set"))


def status_error(flags, ids, V, normalizer):
    """The error of the first flag set among the prepare launch's status values ``flags`` (host
    integers), or None. V None: split over ranks (the launch flags negative ids)."""
    for slot, message in _messages(ids.numel()):
        if not flags[slot]:
            continue
        if slot == STATUS_BAD_IDS:
            where = flags[STATUS_FIRST_BAD]
            span = f"[0, {V})" if V is not None else "[0, V) (V: the vocabulary of all ranks)"
            message = (f"input_ids holds {flags[slot]} id(s) outside {span} at valid positions, e.g. "
                       f"{ids[where].item()} at flat position {where} (use ignore_index or mask to skip)")
        elif slot == STATUS_NORM:
            message = f"{message}, got {normalizer.item() if isinstance(normalizer, torch.Tensor) else normalizer}"
        return ValueError(message)
    return None


def status_failed(flags):
    """Whether the prepare launch's status values ``flags`` (host integers) fail the call."""
    return any(flags[slot] for slot, _ in _messages(0))


def _raise_on_status(status, ids, V, normalizer):
    """The call's one host sync: raise the first flag of the prepare launch that is set; return
    the number of valid tokens (None inside torch.compile, where each flag is an assert)."""
    if torch.compiler.is_compiling():   # N unnamed: formatting a symbolic size would specialize the graph on it
        for slot, message in _messages():
            torch._assert_async(status[slot] == 0, message)
        return None
    flags = status.tolist()
    error = status_error(flags, ids, V, normalizer)
    if error is not None:
        raise error
    return flags[STATUS_N_VALID]


def prepare_tokens(input_ids, token_shape, V, device, ignore_index, mask=None, source="logits without V",
                   cu_seqlens=None, temperature=None, advantages=None, loss_agg_mode=None, normalizer=None,
                   seq_valid_tokens=None, sequence_level=False, old=None, ref=None, sampling=Sampling(),
                   token_weights=None, kept_ids=None):
    """Every check of the per-token arguments for ``token_shape`` tokens over a vocabulary of V
    (None: split over ranks), then the prepare launch and its status read (with V None, left to
    the agreement of the ranks: ``Batch.unread_status``): the Batch. Without
    ``advantages`` (log-probs alone) no weights; ``old`` and ``ref`` are only checked for sign;
    ``sampling``: the sampler's filters (``check_sampling``); ``token_weights``: w_t, laid out
    as the advantages may be, multiplied into each token's advantage by the prepare launch;
    ``kept_ids``: a replayed kept set (``check_kept_ids``)."""
    from . import _dispatch

    ids = _check_ids(input_ids, token_shape, device, source)
    ignore_index = check_ignore_index(ignore_index)
    mask = _like_ids("mask", mask, token_shape, device, "real")
    cu = _check_cu_seqlens(cu_seqlens, token_shape, device)
    tau = None if temperature is None else \
        _per_token_tensor("temperature", temperature, token_shape, device).to(torch.float32).contiguous()
    min_p, top_k, top_p = (_filter_tensor(name, v, token_shape, device) for name, v in sampling._asdict().items())
    N = ids.numel()
    n_seqs, T = (cu.numel() - 1, 0) if cu is not None else tuple(token_shape) if len(token_shape) == 2 else (1, N)
    adv_mode, adv, one_token_each, seq_counts, tw_mode, tw = ADV_NONE, None, False, None, ADV_NONE, None
    with_weight = advantages is not None
    if with_weight:
        adv_mode, adv, one_token_each = _laid_out("advantages", advantages, token_shape, device, cu, n_seqs)
        seq_counts = _check_seq_valid_tokens(seq_valid_tokens, n_seqs, device)
        if token_weights is not None:
            tw_mode, tw, ambiguous = _laid_out("token_weights", token_weights, token_shape, device, cu, n_seqs)
            one_token_each = one_token_each or ambiguous
        normalizer = check_normalizer(normalizer, device)
    bound = V if V is not None else INT32_MAX  # a split vocabulary: checked once the ranks agree on V
    kept_set = _kept_tensors(kept_ids, token_shape, device, bound)
    target, weight, adv_t, status = _dispatch.kernel("prepare", device)(
        ids, mask, cu, adv, adv_mode, tau, normalizer, seq_counts, n_seqs, T, bound, ignore_index,
        AGG_MODES.index(loss_agg_mode) if with_weight else 0, with_weight,
        same_adv=sequence_level and adv_mode == ADV_PER_TOKEN, one_token_each=one_token_each, old=old, ref=ref,
        min_p=min_p, top_p=top_p, tw=tw, tw_mode=tw_mode, kept_set=kept_set)
    n_valid = unread = None
    if V is None and not torch.compiler.is_compiling():  # read with the agreement's table: one sync
        unread = (status, lambda flags: status_error(flags, ids, V, normalizer))
    else:
        n_valid = _raise_on_status(status, ids, V, normalizer)
    kept_offsets, kept_ids = (None, None) if kept_set is None else (kept_set[0], kept_set[1].to(torch.int32))
    return Batch(token_shape, cu, n_seqs, T, target, old, adv_t, weight, ref, tau, n_valid, min_p=min_p, top_k=top_k,
                 top_p=top_p, kept_offsets=kept_offsets, kept_ids=kept_ids, unread_status=unread)


def prepare_mhpo(input_ids, token_shape, V, device, old_logprobs, advantages, mask, ref_logprobs, beta,
                 loss_agg_mode, ignore_index, **options):
    """``prepare_tokens`` for a policy loss, whose own arguments are checked first; ``options``
    by ``prepare_tokens``' names (``sequence_level``, GSPO: the advantages one per sequence)."""
    check_agg_mode(loss_agg_mode)
    if check_nonnegative("beta", beta) > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0 (the KL term needs it)")
    if isinstance(input_ids, torch.Tensor) and input_ids.shape != token_shape:  # its own error before theirs
        _check_ids(input_ids, token_shape, device, options.get("source", "logits without V"))
    old = _like_ids("old_logprobs", old_logprobs, token_shape, device, "float")
    ref = _like_ids("ref_logprobs", ref_logprobs, token_shape, device, "float")
    _check_tensor("advantages", advantages, device)
    return prepare_tokens(input_ids, token_shape, V, device, ignore_index, mask, advantages=advantages,
                          loss_agg_mode=loss_agg_mode, old=old, ref=ref, **options)
