"""Launch configuration of the two sweeps: the only place that knows block sizes and warps.

Both sweeps run one program per row (or per split of a row, when the rows are too few to fill the
GPU: ``launch_splits`` below) and walk the vocabulary in BLOCK_V-wide steps, each an
[R, LANES, VEC] block: every lane (thread) owns R runs of VEC contiguous elements, VEC being one
16-byte vector (8 bf16/fp16, 4 fp32). They are memory-bound only if the loop issues few enough
instructions per element (bench/NOTES.md has the budget, ``python -m bench.sass`` the count), so:

- BLOCK_V = 4096 elements: with 8 warps that is 16 elements per lane per step (two 16-byte loads
  in bf16, four in fp32). The per-lane work of a step (rescale, one exp2) is spread over those 16
  elements; several programs fit on an SM, which keeps tens of KiB of loads in flight per SM,
  more than bandwidth × latency needs on an H100 or H200 (about 15–20 KiB per SM).
- A row shorter than one block gets the next power of two at or above V (at least 16), so small
  vocabularies do not load masked lanes for nothing.
- num_warps 8 for full blocks, fewer for small ones (each warp should own at least 256 elements).

``FP_FUSION``: the sweeps rely on a·b − c compiling to one FFMA (one rounding: the exponent of a
logit near the row max keeps its digits), so the launchers set it explicitly instead of inheriting
Triton's default, which changes in Triton 3.10.
"""

import contextlib
import contextvars
from typing import NamedTuple, Optional

BLOCK_V = 4096
NUM_WARPS = 8


class Overrides(NamedTuple):
    """What ``overridden`` sets for the launches inside its block (None: the default)."""

    block_v: Optional[int] = None
    num_warps: Optional[int] = None
    row_splits: Optional[int] = None
    min_split_blocks: Optional[int] = None
    programs_per_sm: Optional[float] = None


# Per thread and per asyncio task (a context variable, not a module global): a benchmark or a test
# that overrides the launch configuration in one thread leaves every other thread's calls alone.
_overrides = contextvars.ContextVar("mhpo_kernels_launch_overrides", default=Overrides())


def block_v():
    """The block width in force: BLOCK_V, or an ``overridden`` one."""
    return _overrides.get().block_v or BLOCK_V
VECTOR_BYTES = 16
FP_FUSION = True


class SweepConfig(NamedTuple):
    block_v: int
    num_warps: int
    r: int        # vectors per lane per step
    lanes: int    # lanes that own distinct elements (at most 32 · num_warps)
    vec: int      # elements per 16-byte vector


def sweep_config(V, itemsize):
    """The launch configuration of a sweep over rows of length V with ``itemsize``-byte logits."""
    width = min(block_v(), max(16, 1 << (V - 1).bit_length()))
    num_warps = max(1, min(_overrides.get().num_warps or NUM_WARPS, width // 256))
    vec = min(VECTOR_BYTES // itemsize, width)
    lanes = min(32 * num_warps, width // vec)
    return SweepConfig(width, num_warps, width // (lanes * vec), lanes, vec)


# Fused linear path: tokens per chunk. Each chunk materializes one (rows, V) logits tile in the
# hidden states' dtype, turned into its gradient in place, so the tile is the working memory that
# scales with the chunk; beside it live the fp32 weight-gradient accumulator (V × H × 4 bytes,
# 2.5 GB at V 151,936, H 4096) and dhidden (N × H). 1 GiB of tile keeps the three GEMMs per chunk
# large enough to run near the GEMM rate (about 3,300 rows at V 151,936 in bf16) while adding
# less than the fp32 accumulator itself.
FUSED_LINEAR_TILE_BYTES = 1 << 30
CHUNK_ROWS_MULTIPLE = 256   # GEMM-friendly row counts
CHUNK_ROWS_MAX = 8192       # beyond this the tile only costs memory


def fused_linear_chunk_rows(V, itemsize):
    """Default tokens per chunk: the largest multiple of 256 rows whose tile fits the budget."""
    rows = FUSED_LINEAR_TILE_BYTES // (V * itemsize)
    rows = rows // CHUNK_ROWS_MULTIPLE * CHUNK_ROWS_MULTIPLE
    return max(CHUNK_ROWS_MULTIPLE, min(CHUNK_ROWS_MAX, rows))


# ---- small N: row splits, and the segments that make them invisible ----------------------------
#
# One program per row keeps one BLOCK_V block of loads in flight, so a batch of few rows leaves
# the memory system short of bytes in flight. The rule, with its one lead (bench/NOTES.md, "Small
# N", has the arithmetic; the `sweeps` step of bench/gpu_check.sh measures where GB/s levels off,
# which replaces it): each SM needs IN_FLIGHT_PER_SM bytes in flight, an H200's 4.8 TB/s × about
# 1 µs per step (DRAM latency and the loop's issue together) over its 132 SMs, so a sweep fills
# the GPU from
#
#     rows_to_fill = ceil(SMs × IN_FLIGHT_PER_SM / (BLOCK_V × itemsize))
#
# rows: 586 in bf16 and 293 in fp32 on 132 SMs (an H100 and an H200 alike until measured). Below
# it each row is split over ``row_splits`` programs: sweep 1 as a grid (N, splits) and a combine
# launch, sweep 2 as a grid (N, splits). The one-sweep kernel does not split. Off CUDA (the
# interpreter) nothing is split unless ``overridden(row_splits=...)`` says so.
#
# Batch invariance: sweep 1 reduces every row in the same ``row_segments`` segments, runs of
# whole blocks from the row's block base that depend on V and the block shape alone, one segment
# at a time, and folds the segments' sums left to right (forward.py). A split is a run of whole
# segments, and the combine launch folds the segments it stored in the same order, so a row has
# the same bits whether one program or several read it, whatever N chose (SPEC.md, section 4).
# A segment is at least MIN_SPLIT_BLOCKS blocks long (a shorter split spends more on its launch
# and combine than it saves, and each segment costs its program one combine across lanes), and
# a row has at most MAX_ROW_SPLITS of them.
IN_FLIGHT_PER_SM = 4.8e12 * 1.0e-6 / 132   # bytes; a lead until measured
MIN_SPLIT_BLOCKS = 8
MAX_ROW_SPLITS = 16


def rows_to_fill(sms, V, itemsize):
    """How many rows of V ``itemsize``-byte logits a sweep needs to fill a GPU of ``sms`` SMs."""
    return -(-int(sms * IN_FLIGHT_PER_SM) // (sweep_config(V, itemsize).block_v * itemsize))


def row_segments(V, width):
    """The segments sweep 1 reduces a row of V in, with blocks ``width`` wide: as many runs of at
    least MIN_SPLIT_BLOCKS blocks (or an ``overridden`` length) as the row holds, at most
    MAX_ROW_SPLITS, at least 1."""
    blocks = _overrides.get().min_split_blocks or MIN_SPLIT_BLOCKS
    return max(1, min(V // (blocks * width), MAX_ROW_SPLITS))


def segment_length(V, cfg):
    """Elements (whole blocks) per segment of a row walked from its block base (any lead)."""
    return split_length(V, cfg, row_segments(V, cfg.block_v))


def row_splits(n_rows, V, fill_rows):
    """Programs per row that would bring ``n_rows`` up to ``fill_rows`` programs, at most one per
    segment of the row: 1 when the rows alone fill the GPU."""
    if n_rows == 0 or n_rows >= fill_rows:
        return 1
    return max(1, min(-(-fill_rows // n_rows), row_segments(V, block_v())))


def launch_splits(n_rows, V, itemsize, device):
    """Programs per row the sweeps launch for ``n_rows`` rows of V ``itemsize``-byte logits on
    ``device``: ``row_splits`` against ``rows_to_fill`` on CUDA, 1 elsewhere, at most one per
    segment of the row; ``overridden(row_splits=...)`` forces it (tests, the benchmark)."""
    if _overrides.get().row_splits is not None:
        splits = _overrides.get().row_splits
    elif device.type == "cuda":
        import torch

        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = row_splits(n_rows, V, rows_to_fill(sms, V, itemsize))
    else:
        return 1
    return max(1, min(splits, row_segments(V, sweep_config(V, itemsize).block_v)))


def _row_blocks(V, cfg):
    """Blocks a row of V walks from its block base, at most VEC − 1 elements before it (any lead)."""
    return -(-(V + cfg.vec - 1) // cfg.block_v)


def split_length(V, cfg, splits):
    """Elements (whole blocks) per split of a row walked from its block base: ``splits`` runs
    cover any row, the last possibly shorter or empty."""
    return -(-_row_blocks(V, cfg) // splits) * cfg.block_v


# ---- the one-sweep kernel (grad_in_forward) ---------------------------------------------------
#
# Persistent: a few programs per SM take the rows in turn, so at most that many rows are between
# their two reads at once, and a row's second read hits L2 only if the rows in flight fit in it.
# Each program is part-way through its row, so on average half of each row in flight is still to
# be re-read: P programs keep P · row_bytes / 2 pending. Sized from the device's L2 (PyTorch
# reports 60 MB on an H200, 50 MB on an H100) so that the pending half-rows fill at most half of
# it (the other half for the gradient's writes passing through): P = L2 / row_bytes, at least one
# program per SM and at most two. bf16 rows of V 151,936 (304 KB): 207 programs on an H200 (1.6
# per SM, L2 in MiB), 172 on an H100. The first pass loads with "evict_last", the second with
# "evict_first". ``overridden(programs_per_sm=...)`` replaces the rule (bench/gpu_check.sh times
# 1, 1.5 and 2 per SM against it).
MAX_PROGRAMS_PER_SM_ONE_SWEEP = 2
INTERPRETED_PROGRAMS = 4  # under Triton's interpreter (CPU tensors) each program costs milliseconds


def one_sweep_programs(sms, l2_bytes, row_bytes, per_sm=None):
    """The one-sweep grid on a device of ``sms`` SMs and ``l2_bytes`` of L2 for rows of
    ``row_bytes``: ``per_sm`` × SMs when given, else L2 / row_bytes within [SMs, 2 · SMs]."""
    if per_sm is not None:
        return max(sms, int(per_sm * sms))
    by_l2 = l2_bytes // max(row_bytes, 1) if l2_bytes else sms
    return max(sms, min(MAX_PROGRAMS_PER_SM_ONE_SWEEP * sms, by_l2))


def persistent_programs(n_rows, device, row_bytes=0):
    """The one-sweep kernel's grid for ``n_rows`` rows of ``row_bytes`` (``one_sweep_programs``
    on CUDA), never more than the rows."""
    if device.type == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device)
        programs = one_sweep_programs(props.multi_processor_count, getattr(props, "L2_cache_size", 0), row_bytes,
                                      _overrides.get().programs_per_sm)
    else:
        programs = INTERPRETED_PROGRAMS
    return max(1, min(n_rows, programs))


def on_device(device):
    """The launch context of a kernel over tensors on ``device``: a CUDA tensor's own device (not
    whichever is current, which on a multi-GPU host may be another), nothing elsewhere."""
    if device.type == "cuda":
        import torch

        return torch.cuda.device(device)
    return contextlib.nullcontext()


@contextlib.contextmanager
def overridden(block_v=None, num_warps=None, row_splits=None, min_split_blocks=None, programs_per_sm=None):
    """For the tests and the benchmark only: the launches inside the block, in this thread (or
    task), use these instead of BLOCK_V, NUM_WARPS, ``launch_splits``'s choice, MIN_SPLIT_BLOCKS
    and the one-sweep kernel's programs per SM (a row shorter than block_v still gets its power
    of two, and no row more splits than segments; Triton compiles each new shape once). Nested
    blocks keep what they do not set."""
    outer = _overrides.get()
    token = _overrides.set(Overrides(block_v or outer.block_v, num_warps or outer.num_warps,
                                     row_splits or outer.row_splits, min_split_blocks or outer.min_split_blocks,
                                     programs_per_sm or outer.programs_per_sm))
    try:
        yield sweep_config
    finally:
        _overrides.reset(token)
