"""Validation and normalization of the public arguments, before any kernel runs.

Every check raises TypeError (wrong kind or dtype) or ValueError (wrong shape or value) with a
message that starts with the argument's name. What comes out is flat (N,) per-token tensors the
sweeps read without further thought: fp32, contiguous, and an int32 target id, −1 at invalid tokens.
"""

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
# How the advantages are given (``_advantage_layout``); the prepare program reads them so.
ADV_NONE, ADV_SCALAR, ADV_PER_SEQ, ADV_PER_TOKEN = range(4)
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Batch:
    token_shape: torch.Size        # shape of input_ids: what per-token outputs are reshaped to
    cu: torch.Tensor               # (S + 1,) int64 sequence boundaries in the flat token order:
                                   # cu_seqlens, or B rows of T, or one sequence of N
    target: torch.Tensor           # (N,) int32, the id at valid tokens, −1 elsewhere
    valid: torch.Tensor            # (N,) bool
    old: Optional[torch.Tensor]    # (N,) fp32, None = on-policy
    adv: Optional[torch.Tensor]    # (N,) fp32
    weight: Optional[torch.Tensor]  # (N,) fp32 aggregation weight g_t, 0 at invalid tokens
    ref: Optional[torch.Tensor]    # (N,) fp32
    tp: Optional[object] = None    # vocab_parallel.VocabSlice when the vocabulary is split over ranks
    seq_id: Optional[torch.Tensor] = None  # (N,) int64, the sequence of each token (from cu)
    n_valid: Optional[int] = None  # valid tokens, read in validation's one host sync; None inside torch.compile
    tau: Optional[torch.Tensor] = None  # (N,) fp32 per-token temperature, 1 at invalid tokens

    @property
    def n_seqs(self):
        return self.cu.numel() - 1


def _check_real(name, value, low_ok):
    """A finite real number (not a bool, not a tensor) > 0, or ≥ 0 with ``low_ok``. Inside
    torch.compile a number that changed between calls is a symbolic graph input (so a new value
    does not recompile): its check is then a runtime assertion of the graph, not a Python branch."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    relation = ">=" if low_ok else ">"
    if torch.compiler.is_compiling():
        # As a tensor: a check of the symbolic number itself would specialize the graph on it.
        t = torch.zeros((), dtype=torch.float64) + value
        torch._assert_async(((t >= 0) if low_ok else (t > 0)) & (t < math.inf), f"{name} must be finite and {relation} 0")
        return value
    if not (math.isfinite(value) and (value >= 0 if low_ok else value > 0)):
        raise ValueError(f"{name} must be finite and {relation} 0, got {value}")
    return float(value)


def check_positive(name, value):
    """A finite real number > 0 (not a bool, not a tensor)."""
    return _check_real(name, value, low_ok=False)


def check_nonnegative(name, value):
    """A finite real number ≥ 0 (not a bool, not a tensor)."""
    return _check_real(name, value, low_ok=True)


def check_temperature(temperature):
    """(τ for the logit map, the per-token tensor or None): a number τ is checked here, finite and
    > 0; a tensor only for its kind (its shape and values are checked with the other per-token
    inputs, ``prepare_tokens``), and the map then takes τ = 1 and the tensor per row."""
    if not isinstance(temperature, torch.Tensor):
        return check_positive("temperature", temperature), None
    if not temperature.is_floating_point():
        raise TypeError(f"temperature must be a number or a floating tensor, got a {temperature.dtype} tensor")
    return 1.0, temperature  # a 0-d tensor is one τ for every token (``_check_temperature_tensor``)


def _check_temperature_tensor(tau, token_shape, device):
    """A floating tensor shaped like input_ids, or flat (N,), on ``device``: flat fp32."""
    if tau is None:
        return None
    _check_tensor("temperature", tau, device)
    n = math.prod(token_shape)
    if tau.dim() == 0:  # one τ for every token, kept on the device (as a 0-d normalizer is)
        tau = tau.expand(n)
    if tau.shape != token_shape and tuple(tau.shape) != (n,):
        raise ValueError(f"temperature must be a number, a 0-d tensor or a tensor of shape {tuple(token_shape)} "
                         f"like input_ids (or ({n},)), got shape {tuple(tau.shape)}")
    return tau.detach().reshape(-1).to(torch.float32).contiguous()


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
    """True unless ``x``'s elements provably occupy distinct memory: with the dims of size > 1
    sorted by stride, each stride exceeds the span of the smaller ones (a stride-0 expand, or a
    strided view that revisits elements, fails)."""
    span = 0
    for stride, size in sorted((abs(st), s) for s, st in zip(x.shape, x.stride()) if s > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def check_ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


def _check_tensor(name, x, device):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, but logits are on {device}")
    return x


def _check_float_per_token(name, x, token_shape, device):
    """An optional floating (B, T) tensor, returned flat in fp32 (a copy only if needed)."""
    if x is None:
        return None
    _check_tensor(name, x, device)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.shape != token_shape:
        raise ValueError(f"{name} must have shape {tuple(token_shape)} like input_ids, got {tuple(x.shape)}")
    return x.detach().reshape(-1).to(torch.float32).contiguous()


def check_float_tensor(name, x):
    """A tensor in one of the dtypes the kernels read: float32, bfloat16 or float16."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x


def check_logits(logits, input_ids):
    """logits (B, T, V), (B, T + 1, V) or (N, V) → (a (B, T', V) view with unit stride along V,
    the token shape, shifted). ``shifted``: the logits have one more position than input_ids
    along T, the usual next-token shift (position t predicts input_ids[:, t], the last position
    predicts nothing and gets a zero gradient row)."""
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
    if logits3.stride(-1) != 1 and logits3.shape[-1] > 1:
        # The kernels read rows with unit stride; any other layout costs one copy here.
        logits3 = logits3.contiguous()
    return logits3, token_shape, shifted


def check_normalizer(normalizer, device):
    """None, a finite number > 0, or a 0-d real tensor on ``device`` (its value is checked with
    the other value checks, in ``prepare_mhpo``). Returned as a 0-d fp32 tensor or None."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 or normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise TypeError(f"normalizer must be a number or a 0-d real tensor, got a {normalizer.dtype} "
                            f"tensor of shape {tuple(normalizer.shape)}")
        if normalizer.device != device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer is on {normalizer.device}, but the inputs are on {device}")
        return normalizer.detach().to(device=device, dtype=torch.float32)
    # Not torch.tensor(value, device=...): on a GPU that is a copy from host memory (a sync), and
    # inside torch.compile it would specialize the graph on the value.
    return torch.zeros((), dtype=torch.float32, device=device) + check_positive("normalizer", normalizer)


def _check_ids(input_ids, token_shape, device, source, convert=True):
    _check_tensor("input_ids", input_ids, device)
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.shape != token_shape:
        shifted = " or one position less along T (next-token shift)" if len(token_shape) == 2 and source.startswith("logits") else ""
        raise ValueError(
            f"input_ids must have shape {tuple(token_shape)} ({source}){shifted}, got {tuple(input_ids.shape)}"
        )
    return input_ids.reshape(-1).to(torch.int64) if convert else None


def _check_mask(mask, token_shape, device):
    """Optional bool or 0/1 (B, T) mask, flat. Returns (mask, has_non_binary_values)."""
    if mask is None:
        return None, None
    _check_tensor("mask", mask, device)
    if mask.shape != token_shape:
        raise ValueError(f"mask must have shape {tuple(token_shape)} like input_ids, got {tuple(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool or 0/1 numbers, got {mask.dtype}")
    mask = mask.detach().reshape(-1)
    if mask.dtype == torch.bool:
        return mask, None
    return mask != 0, ((mask != 0) & (mask != 1)).any()


def _advantage_layout(advantages, token_shape, device, n_seqs=None):
    """How the advantages are laid out, one of ADV_PER_TOKEN, ADV_SCALAR, ADV_PER_SEQ, whatever
    the logits' rank: input_ids' shape, per token; () or (1,), the same advantage at every token;
    per sequence (B,) or (B, 1) with (B, T) ids, (S,) or (S, 1) with cu_seqlens (``n_seqs`` = S;
    1-D ids without it are one sequence)."""
    _check_tensor("advantages", advantages, device)
    if not advantages.is_floating_point():
        raise TypeError(f"advantages must be a floating tensor, got {advantages.dtype}")
    if advantages.shape == token_shape:
        return ADV_PER_TOKEN
    if advantages.dim() <= 1 and advantages.numel() == 1:
        return ADV_SCALAR
    if n_seqs is not None:
        if advantages.shape in ((n_seqs,), (n_seqs, 1)):
            return ADV_PER_SEQ
        expected = (f"(S,) or (S, 1) = ({n_seqs}, 1) per sequence of cu_seqlens, (N,) = ({token_shape[0]},) "
                    f"per token, (1,) or ()")
    elif len(token_shape) == 2:
        B, T = token_shape
        if advantages.shape in ((B,), (B, 1)):
            return ADV_PER_SEQ
        expected = f"(B,) = ({B},), (B, 1) = ({B}, 1), (B, T) = ({B}, {T}), (1,) or ()"
    else:
        expected = f"(N,) = ({token_shape[0]},), (1,) or ()"
    raise ValueError(f"advantages must have shape {expected}, got {tuple(advantages.shape)}")


def _check_advantages(advantages, token_shape, device, n_seqs=None):
    """The advantages (``_advantage_layout``) as flat (N,) fp32 per-token values, or with
    cu_seqlens and one per sequence the (S,) ones, which ``prepare_mhpo`` spreads over tokens."""
    layout = _advantage_layout(advantages, token_shape, device, n_seqs)
    adv = advantages.detach().to(torch.float32)
    if layout == ADV_PER_TOKEN:
        return adv.reshape(-1).contiguous()
    if layout == ADV_SCALAR:
        return adv.reshape(1).expand(token_shape.numel()).contiguous()
    if n_seqs is not None:
        return adv.reshape(-1).contiguous()
    B, T = token_shape
    return adv.reshape(B, 1).expand(B, T).contiguous().reshape(-1)


def _check_cu_seqlens(cu_seqlens, token_shape, device):
    """The (S + 1,) boundaries of packed sequences, as int64; None for the unpacked layouts. Its
    values (cu[0] = 0, non-decreasing, cu[-1] = N) are checked with the other value checks."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.device != device and cu_seqlens.device.type != "cpu":
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, but the inputs are on {device}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    if len(token_shape) != 1:
        raise ValueError(f"cu_seqlens describes a packed stream: flat input_ids (N,) with logits (N, V) or hidden "
                         f"(N, H); got input_ids of shape {tuple(token_shape)} (a padded batch needs no cu_seqlens)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D (S + 1,), got shape {tuple(cu_seqlens.shape)}")
    # Frameworks often keep a host copy of the boundaries (for flash-attention's max_seqlen): taken as is.
    return cu_seqlens.detach().to(device=device, dtype=torch.int64)


def _bad_cu_seqlens(cu, n):
    return (cu[0] != 0) | (cu[-1] != n) | (cu[1:] < cu[:-1]).any()


def sequence_boundaries(token_shape, device, cu_seqlens=None):
    """(cu, seq_id): the (S + 1,) boundaries and each token's sequence, for every layout, so that
    one code path aggregates them all: cu_seqlens as given, B rows of T, or one sequence of N."""
    n = math.prod(token_shape)
    if cu_seqlens is not None:
        cu = cu_seqlens
    elif len(token_shape) == 2:
        cu = torch.arange(token_shape[0] + 1, device=device, dtype=torch.int64) * token_shape[1]
    else:
        cu = torch.arange(2, device=device, dtype=torch.int64) * n  # no copy from host memory: no sync
    return cu, segment_ids(cu, n)


def segment_ids(cu, n):
    """The sequence index of each of n tokens from the boundaries cu (an empty sequence holds none)."""
    positions = torch.arange(n, device=cu.device, dtype=torch.int64)
    # The clamp keeps malformed boundaries (refused by the value checks) from indexing out of range.
    return (torch.bucketize(positions, cu, right=True) - 1).clamp_(min=0).clamp_(max=cu.numel() - 2)


def per_sequence_sum(x, seq_id, n_seqs):
    """Σ of x (N,) over each sequence's tokens: (S,), in x's dtype, 0 for an empty sequence.
    ``seq_id`` (N,) is non-decreasing: tokens in sequence order, as ``segment_ids`` gives them.

    Bitwise reproducible on every device, with no atomics and no host sync: a segmented reduction
    over the boundaries, each sequence summed in an order fixed by the boundaries alone (on CUDA a
    ``cub::DeviceSegmentedReduce``, run-to-run deterministic; on CPU left to right). Not
    ``index_add_``, whose CUDA kernel adds with atomics in whatever order the threads arrive, nor
    a difference of a running sum, since ``cumsum`` of a floating CUDA tensor is among the ops
    ``torch.use_deterministic_algorithms`` lists as nondeterministic. ``unsafe=True`` skips the
    op's own checks of the boundaries, which read them on the host."""
    starts = torch.arange(n_seqs + 1, device=seq_id.device, dtype=seq_id.dtype)
    # Exact integer work: where each sequence starts, cu itself for well-formed boundaries; the
    # cummax keeps malformed ones (refused by the value checks, maybe after this runs) non-decreasing
    # within [0, N], so that no segment reads outside x.
    bounds = torch.searchsorted(seq_id, starts).cummax(0).values
    return torch.segment_reduce(x, "sum", offsets=bounds, unsafe=True)


def _check_seq_valid_tokens(seq_valid_tokens, n_seqs, device):
    """Each sequence's valid tokens over every rank that holds a part of it (context
    parallelism), (S,) integers; its values are checked against the local counts later."""
    if seq_valid_tokens is None:
        return None
    _check_tensor("seq_valid_tokens", seq_valid_tokens, device)
    if (seq_valid_tokens.is_floating_point() or seq_valid_tokens.is_complex()
            or seq_valid_tokens.dtype == torch.bool):
        raise TypeError(f"seq_valid_tokens must be an integer tensor, got {seq_valid_tokens.dtype}")
    if seq_valid_tokens.shape != (n_seqs,):
        raise ValueError(f"seq_valid_tokens must have shape (S,) = ({n_seqs},), one count per sequence, "
                         f"got {tuple(seq_valid_tokens.shape)}")
    return seq_valid_tokens.detach().to(torch.float32)


INT32_MAX = 2**31 - 1
_BAD_IDS = "input_ids holds ids outside [0, V) at valid positions (use ignore_index or mask to skip)"
_BAD_MASK = "mask must hold only 0 and 1 (or be bool)"


_BAD_NORMALIZER = "normalizer must be finite and > 0"
_BAD_TEMPERATURE = "temperature must be finite and > 0 at valid tokens (a NaN one is data: it propagates)"


def _raise_on_bad_values(ids, valid, V, mask_not_binary, normalizer=None, extra=()):
    """The checks that look at values: one host sync eagerly; inside torch.compile, which cannot
    branch on data, asynchronous asserts in the graph instead (an error at the next sync).
    ``extra``: more (0-d bool flag, message) pairs, raised as ValueError(message) when set.
    Returns the number of valid tokens, read in the same sync (the fused linear path sizes its
    compaction by it), or None inside torch.compile."""
    # V None: the vocabulary is split over ranks and its size not yet known; the upper bound is
    # checked once the ranks have agreed on it (vocab_parallel.agree_on_inputs).
    bad_ids = valid & ((ids < 0) | (ids >= (V if V is not None else INT32_MAX)))
    checks = [(bad_ids.any(), None)]
    if mask_not_binary is not None:
        checks.append((mask_not_binary, _BAD_MASK))
    if normalizer is not None:
        checks.append((~(torch.isfinite(normalizer) & (normalizer > 0)), _BAD_NORMALIZER))
    checks.extend(extra)
    if torch.compiler.is_compiling():
        for flag, message in checks:
            torch._assert_async(~flag, message or _BAD_IDS)
        return None
    n_valid, *flags = torch.stack([valid.sum()] + [flag.to(torch.int64) for flag, _ in checks]).tolist()
    if flags[0]:
        where = bad_ids.nonzero()[0, 0].item()
        raise ValueError(
            f"input_ids holds {int(bad_ids.sum())} id(s) outside [0, {V if V is not None else INT32_MAX}) "
            f"at valid positions, "
            f"e.g. {ids[where].item()} at flat position {where} (use ignore_index or mask to skip)"
        )
    for flag, (_, message) in zip(flags[1:], checks[1:]):
        if flag:
            raise ValueError(message if message != _BAD_NORMALIZER else f"{message}, got {normalizer.item()}")
    return n_valid


def aggregation_weights(valid, seq_id, n_seqs, loss_agg_mode, normalizer=None, seq_counts=None):
    """g_t of the spec's "Aggregation" from the (N,) validity and each token's sequence:
    loss = Σ_t g_t · loss_t.

    ``normalizer`` (a 0-d tensor) replaces the count as the divisor of the aggregated sum: the
    valid tokens for token-mean, the sequences with a valid token for the seq-mean modes.
    ``seq_counts`` (S,) replaces the local valid tokens of each sequence (context parallelism:
    the count over every rank), and so every count derived from them.
    """
    valid_f = valid.to(torch.float32)
    tokens_per_seq = per_sequence_sum(valid_f, seq_id, n_seqs) if seq_counts is None else seq_counts
    if loss_agg_mode == "token-mean":
        divisor = tokens_per_seq.sum().clamp(min=1) if normalizer is None else normalizer
        return valid_f / divisor
    divisor = (tokens_per_seq > 0).sum().clamp(min=1) if normalizer is None else normalizer
    if loss_agg_mode == "seq-mean-token-mean":
        return valid_f / (tokens_per_seq.clamp(min=1)[seq_id] * divisor)
    return valid_f / divisor  # seq-mean-token-sum


def _token_batch(input_ids, token_shape, V, device, ignore_index, mask, source, cu_seqlens, temperature):
    """The Batch's ids, validity, sequences and per-token τ, and the value checks still to make."""
    ids = _check_ids(input_ids, token_shape, device, source)
    ignore_index = check_ignore_index(ignore_index)
    mask, mask_not_binary = _check_mask(mask, token_shape, device)
    cu_seqlens = _check_cu_seqlens(cu_seqlens, token_shape, device)
    tau = _check_temperature_tensor(temperature, token_shape, device)
    valid = ids != ignore_index
    if mask is not None:
        valid = valid & mask
    cu, seq_id = sequence_boundaries(token_shape, device, cu_seqlens)
    extra = []
    if cu_seqlens is not None:
        extra.append((_bad_cu_seqlens(cu, ids.numel()),
                      f"cu_seqlens must start at 0, be non-decreasing and end at N = {ids.numel()} (the "
                      f"number of tokens)"))
    if tau is not None:  # invalid tokens' τ may be anything: it is never used
        # τ_t is data like a logit: NaN propagates (SPEC.md, section 5); τ ≤ 0 or +inf is a misuse
        extra.append(((valid & ((tau <= 0) | tau.isinf())).any(), _BAD_TEMPERATURE))
        tau = torch.where(valid, tau, 1.0)
    target = torch.where(valid, ids, -1).to(torch.int32)  # validated: every valid id < V < 2³¹
    batch = Batch(token_shape, cu, target, valid, None, None, None, None, seq_id=seq_id, tau=tau)
    return batch, ids, mask_not_binary, extra


# ---- the prepare launch -------------------------------------------------------------------------
#
# On the Triton path, outside torch.compile, everything above that looks at values runs in one
# launch (``kernels/prepare.py``): the host checks shapes, dtypes and devices, the program computes
# the per-token inputs and the value checks' flags, and the host reads those flags in the call's
# one sync. Inside torch.compile, and on the PyTorch path, the same work is the PyTorch ops above
# (the compiled graph fuses them). STATUS_* are the slots of the flags the program writes.
STATUS_N_VALID, STATUS_BAD_IDS, STATUS_FIRST_BAD, STATUS_MASK, STATUS_CU, STATUS_TAU, STATUS_NORM = range(7)
STATUS_SLOTS = 7


def _kernel_route(device, V, use_kernel):
    """The prepare program's launcher where it applies, else None."""
    if not use_kernel or V is None or torch.compiler.is_compiling():
        return None
    from . import _dispatch

    return _dispatch.prepare_kernel(device)


def _flat(x):
    return None if x is None else x.detach().reshape(-1)


def _advantage_mode(advantages, token_shape, device, n_seqs, packed):
    """(``_advantage_layout``, the flat view the prepare program reads; it converts the dtype)."""
    layout = _advantage_layout(advantages, token_shape, device, n_seqs if packed else None)
    flat = _flat(advantages)
    return layout, (flat if layout == ADV_SCALAR else flat.contiguous())


def _raise_on_status(status, ids, V, normalizer):
    """Validation's one host sync: read the program's flags, raise what they say; the valid count."""
    flags = status.tolist()
    if flags[STATUS_BAD_IDS]:
        where = flags[STATUS_FIRST_BAD]
        raise ValueError(
            f"input_ids holds {flags[STATUS_BAD_IDS]} id(s) outside [0, {V}) at valid positions, "
            f"e.g. {ids[where].item()} at flat position {where} (use ignore_index or mask to skip)")
    if flags[STATUS_MASK]:
        raise ValueError(_BAD_MASK)
    if flags[STATUS_NORM]:
        value = normalizer.item() if isinstance(normalizer, torch.Tensor) else normalizer
        raise ValueError(f"{_BAD_NORMALIZER}, got {value}")
    return flags[STATUS_N_VALID], flags[STATUS_CU], flags[STATUS_TAU]


def _prepare_by_kernel(launch, input_ids, token_shape, V, device, ignore_index, mask, source, cu_seqlens,
                       temperature, advantages=None, loss_agg_mode=None, normalizer=None):
    """The Batch from one prepare launch and one host read (see above); ``advantages`` None for
    log-probs alone (no weights)."""
    _check_ids(input_ids, token_shape, device, source, convert=False)
    ignore_index = check_ignore_index(ignore_index)
    if mask is not None:
        _check_tensor("mask", mask, device)
        if mask.shape != token_shape:
            raise ValueError(f"mask must have shape {tuple(token_shape)} like input_ids, got {tuple(mask.shape)}")
        if mask.is_complex():
            raise TypeError(f"mask must be bool or 0/1 numbers, got {mask.dtype}")
    cu_seqlens = _check_cu_seqlens(cu_seqlens, token_shape, device)
    tau = _check_temperature_tensor(temperature, token_shape, device)
    N = math.prod(token_shape)
    if cu_seqlens is not None:
        n_seqs, T = cu_seqlens.numel() - 1, 0
    elif len(token_shape) == 2:
        n_seqs, T = token_shape[0], token_shape[1]
    else:
        n_seqs, T = 1, N
    with_weight = advantages is not None
    adv_mode, adv = ADV_NONE, None
    if with_weight:
        adv_mode, adv = _advantage_mode(advantages, token_shape, device, n_seqs, cu_seqlens is not None)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.detach().to(device)
    target, weight, adv_t, status = launch(
        _flat(input_ids), _flat(mask), cu_seqlens, adv, adv_mode, tau, normalizer, n_seqs, T, V, ignore_index,
        AGG_MODES.index(loss_agg_mode) if with_weight else 0, with_weight)
    n_valid, bad_cu, bad_tau = _raise_on_status(status, _flat(input_ids), V, normalizer)
    if bad_cu:
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at N = {N} (the number of tokens)")
    if bad_tau:
        raise ValueError(_BAD_TEMPERATURE)
    cu = cu_seqlens if cu_seqlens is not None else None
    return Batch(token_shape, cu, target, None, None, adv_t, weight, None, n_valid=n_valid, tau=tau)


def prepare_tokens(input_ids, token_shape, V, device, ignore_index, mask=None, source="logits without V",
                   normalizer=None, cu_seqlens=None, temperature=None, use_kernel=False):
    """Validate ids and mask (and a per-token ``temperature`` tensor) for ``token_shape`` tokens
    over a vocabulary of V; return a Batch with target, validity, sequences and τ filled in.
    ``source`` names where token_shape comes from. ``use_kernel``: a caller that reads only the
    target, τ and the valid count may take the prepare launch (validity and sequences then None)."""
    launch = _kernel_route(device, V, use_kernel and normalizer is None)
    if launch is not None:
        return _prepare_by_kernel(launch, input_ids, token_shape, V, device, ignore_index, mask, source,
                                  cu_seqlens, temperature)
    batch, ids, mask_not_binary, extra = _token_batch(input_ids, token_shape, V, device, ignore_index, mask,
                                                      source, cu_seqlens, temperature)
    batch.n_valid = _raise_on_bad_values(ids, batch.valid, V, mask_not_binary, normalizer, extra)
    return batch


_ADV_NOT_PER_SEQUENCE = ("advantages must be one per sequence for GSPO: (B,) or (B, 1) (with cu_seqlens (S,) "
                         "or (S, 1)), or per token and constant over each sequence's valid tokens")


def _advantages_vary_within_a_sequence(batch):
    """0-d bool: whether the per-token advantages differ within a sequence's valid tokens (a
    sequence-level objective needs one advantage per sequence)."""
    S, seq_id, valid = batch.n_seqs, batch.seq_id, batch.valid
    first = torch.full((S,), float("inf"), device=valid.device).scatter_reduce(
        0, seq_id, torch.where(valid, batch.adv, float("inf")), "amin")
    last = torch.full((S,), float("-inf"), device=valid.device).scatter_reduce(
        0, seq_id, torch.where(valid, batch.adv, float("-inf")), "amax")
    has_tokens = per_sequence_sum(valid.to(torch.float32), seq_id, S) > 0
    # "<", not "!=": a NaN advantage is not a shape error; it makes the loss NaN, as at any objective
    return ((first < last) & has_tokens).any()


def _kernel_applies(advantages, token_shape, cu_seqlens, seq_valid_tokens, sequence_level):
    """Whether the prepare launch covers a loss call: not for context parallelism's counts, a
    sequence-level objective's advantage check, or packed (N,) advantages that could be (S,)."""
    if seq_valid_tokens is not None or sequence_level:
        return False
    if cu_seqlens is None or not isinstance(cu_seqlens, torch.Tensor) or not isinstance(advantages, torch.Tensor):
        return True
    n = math.prod(token_shape)
    return not (advantages.dim() == 1 and cu_seqlens.numel() - 1 == n and n > 1)


def prepare_mhpo(
    input_ids, token_shape, V, device, old_logprobs, advantages, mask, ref_logprobs, beta,
    loss_agg_mode, ignore_index, source="logits without V", normalizer=None, cu_seqlens=None,
    seq_valid_tokens=None, temperature=None, sequence_level=False, use_kernel=False,
):
    """Validate every per-token argument of the MHPO loss; return the Batch for the sweeps.
    ``sequence_level`` (GSPO): the advantages must be one per sequence, checked in the same sync.
    ``use_kernel``: a caller that reads only the target, weights, advantages, old, ref, τ and the
    valid count may take the prepare launch (validity and sequences are then None)."""
    check_agg_mode(loss_agg_mode)
    beta = check_nonnegative("beta", beta)
    if beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0 (the KL term needs it)")
    launch = _kernel_route(device, V, use_kernel and _kernel_applies(advantages, token_shape, cu_seqlens,
                                                                      seq_valid_tokens, sequence_level))
    if launch is not None:
        if normalizer is not None and not isinstance(normalizer, torch.Tensor):
            normalizer = check_positive("normalizer", normalizer)
        else:
            check_normalizer(normalizer, device)
        old = _check_float_per_token("old_logprobs", old_logprobs, token_shape, device)
        ref = _check_float_per_token("ref_logprobs", ref_logprobs, token_shape, device)
        batch = _prepare_by_kernel(launch, input_ids, token_shape, V, device, ignore_index, mask, source,
                                   cu_seqlens, temperature, advantages, loss_agg_mode, normalizer)
        batch.old, batch.ref = old, ref
        return batch
    normalizer = check_normalizer(normalizer, device)
    batch, ids, mask_not_binary, extra = _token_batch(input_ids, token_shape, V, device, ignore_index, mask,
                                                      source, cu_seqlens, temperature)
    batch.old = _check_float_per_token("old_logprobs", old_logprobs, token_shape, device)
    batch.ref = _check_float_per_token("ref_logprobs", ref_logprobs, token_shape, device)
    packed = cu_seqlens is not None
    adv = _check_advantages(advantages, token_shape, device, batch.n_seqs if packed else None)
    N, S = ids.numel(), batch.n_seqs
    if packed and (advantages.dim() == 2 or adv.shape != (N,)):
        adv = adv[batch.seq_id]
    elif packed and S == N and advantages.dim() == 1 and N > 1:
        # (N,) and (S,) coincide: read per token, which is the same only if every sequence has one token.
        extra.append(((batch.cu[1:] - batch.cu[:-1] != 1).any(),
                      f"advantages of shape ({N},) are ambiguous: cu_seqlens has S = N = {N} sequences but not "
                      f"one token each: pass per-sequence advantages as (S, 1)"))
    batch.adv = adv
    seq_counts = _check_seq_valid_tokens(seq_valid_tokens, S, device)
    if seq_counts is not None:
        local = per_sequence_sum(batch.valid.to(torch.float32), batch.seq_id, S)
        extra.append(((seq_counts < local).any(),
                      "seq_valid_tokens must count each sequence's valid tokens over every rank: it is below "
                      "this rank's own count for some sequence"))
    if sequence_level:
        extra.append((_advantages_vary_within_a_sequence(batch), _ADV_NOT_PER_SEQUENCE))
    batch.n_valid = _raise_on_bad_values(ids, batch.valid, V, mask_not_binary, normalizer, extra)
    batch.weight = aggregation_weights(batch.valid, batch.seq_id, S, loss_agg_mode, normalizer, seq_counts)
    return batch
