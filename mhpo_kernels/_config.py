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


# ---- small N and the tail wave ------------------------------------------------------------------
#
# One program per row: a batch of N rows can keep busy at most N programs. The GPU's memory
# system is full only when enough bytes are in flight (Little's law: bandwidth × latency), and
# each program has one step's loads in flight at a time (BLOCK_V elements: 8 KiB in bf16), so
#
#     rows_to_fill = min(resident programs, bandwidth × step time / bytes per step)
#
# where resident programs = SMs × programs per SM (threads: 2048 per SM; registers: 65,536 per
# SM, allocated per warp in multiples of 8 per thread; at most 32 programs), and the step time is
# what one program takes per step, DRAM latency and the loop's issue together. The figures the
# defaults below are set to are leads until bench/gpu_check.sh's N sweep measures them (GB/s
# against N: the rate levels off at rows_to_fill):
# - H100 SXM and H200: 132 SMs; 3.35 and 4.8 TB/s by the datasheets, about 4.3 TB/s (read +
#   write) measured for a copy on an H200. The sweeps use 32 to 40 registers at 8 warps
#   (bench/results/sass-sm90-*.json): 40 registers × 256 threads = 10,240 per program, 6 per SM,
#   792 resident programs (8 per SM, 1,056, at 32 registers, where the thread limit binds).
# - One program moves about 8 GB/s (8 KiB per step, about 1 µs a step): full bandwidth needs
#   4.8 TB/s × 1 µs / 8 KiB = 586 rows in bf16 on an H200 and 409 on an H100 (half that in fp32,
#   16 KiB a step), of the order of the resident capacity. Below about 800 rows, then, SMs sit
#   idle, and below about 600 the memory system is short of bytes in flight: 2.9 MB are needed
#   at 600 ns of DRAM latency (4.8 TB/s × 600 ns), 22 KiB per SM, against 8 KiB per program.
# - Above it, the tail wave: N rows in waves of R resident programs leave the last wave
#   partly empty (``wave_efficiency``): 8192 rows at R 792 take 11 waves, 94 % full.
#
# The remedy below rows_to_fill: split each row over ``row_splits`` programs. Sweep 1 then runs
# as two launches, a grid (N, splits) whose programs each write one split's (max, sum of
# exponentials, entropy sum) and a grid (N,) that combines them (the lanes' own combine) and runs
# the epilogue: 12 bytes per split and row, against the row's 2V, so the extra launch is the cost.
# Sweep 2 needs no combine: program (r, j) writes split j of row r. Each split is a run of whole
# BLOCK_V blocks from the row's block base, so the splits' loops are the unsplit loop, 16-byte
# vectors included (``bench.sass`` holds them to the same budget). A split shorter than
# MIN_SPLIT_BLOCKS blocks would spend more on its launch and combine than it saves, and at most
# MAX_ROW_SPLITS are combined (one vector). ``bench/gpu_check.sh``'s N sweep times both, split
# and one program per row, which confirms or moves rows_to_fill. The one-sweep kernel does not
# split (its rows are re-read from L2, which needs rows in flight, not splits). Off CUDA (the
# interpreter) nothing is split unless ``overridden(row_splits=...)`` says so.

H100_H200_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, datasheets
STEP_SECONDS = 1.0e-6        # one program's time per BLOCK_V step (lead: about 8 GB/s per program)
SWEEP_REGISTERS = 40         # per thread, the most any sweep variant uses (bench.sass)
MAX_PROGRAMS_PER_SM = 32
MIN_SPLIT_BLOCKS = 8  # a split shorter than this many blocks spends more on its combine than it saves
MAX_ROW_SPLITS = 16              # the combine reads a row's splits as one vector of this many


class Fill(NamedTuple):
    programs_per_sm: int
    resident_programs: int    # SMs × programs_per_sm
    rows_for_bandwidth: int   # bandwidth × step time / bytes per step (resident_programs if unknown)
    rows_to_fill: int         # the fewer of the two: below it, the GPU is not full


def _device_bandwidth(props):
    name = getattr(props, "name", "")
    return next((bw for key, bw in H100_H200_BANDWIDTH.items() if key in name), None)


def rows_to_fill(props, V, itemsize, registers=SWEEP_REGISTERS, bandwidth=None, step_seconds=STEP_SECONDS):
    """How many rows a sweep over rows of V ``itemsize``-byte logits needs to fill the GPU
    described by ``props`` (``torch.cuda.get_device_properties``, or anything with
    ``multi_processor_count`` and, optionally, ``max_threads_per_multi_processor``,
    ``regs_per_multiprocessor`` and ``name``). ``bandwidth`` in bytes/s; default: the datasheet's
    for an H100 or H200, else unknown (then the resident capacity alone decides)."""
    cfg = sweep_config(V, itemsize)
    threads = 32 * cfg.num_warps
    regs_per_program = -(-registers // 8) * 8 * threads
    per_sm = min(getattr(props, "max_threads_per_multi_processor", 2048) // threads,
                 getattr(props, "regs_per_multiprocessor", 65536) // regs_per_program, MAX_PROGRAMS_PER_SM)
    resident = props.multi_processor_count * per_sm
    bandwidth = bandwidth or _device_bandwidth(props)
    if bandwidth is None:
        for_bandwidth = resident
    else:
        for_bandwidth = -(-int(bandwidth * step_seconds) // (cfg.block_v * itemsize))
    return Fill(per_sm, resident, for_bandwidth, min(resident, for_bandwidth))


def wave_efficiency(n_rows, resident_programs):
    """Share of the program slots busy over the waves N rows take (1.0 for whole waves)."""
    waves = -(-n_rows // resident_programs)
    return n_rows / (waves * resident_programs) if n_rows else 1.0


def row_splits(n_rows, V, fill_rows):
    """Programs per row that would bring ``n_rows`` up to ``fill_rows`` programs, each split at
    least MIN_SPLIT_BLOCKS blocks long: 1 when the rows alone fill the GPU."""
    if n_rows == 0 or n_rows >= fill_rows:
        return 1
    return max(1, min(-(-fill_rows // n_rows), V // (MIN_SPLIT_BLOCKS * block_v()), MAX_ROW_SPLITS))


def launch_splits(n_rows, V, itemsize, device):
    """Programs per row the sweeps launch for ``n_rows`` rows of V ``itemsize``-byte logits on
    ``device``: ``row_splits`` against ``rows_to_fill`` on CUDA, 1 elsewhere, at most one per
    block of the row; ``overridden(row_splits=...)`` forces it (tests, the benchmark)."""
    if _overrides.get().row_splits is not None:
        splits = _overrides.get().row_splits
    elif device.type == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device)
        splits = row_splits(n_rows, V, rows_to_fill(props, V, itemsize).rows_to_fill)
    else:
        return 1
    return max(1, min(splits, _row_blocks(V, sweep_config(V, itemsize)), MAX_ROW_SPLITS))


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
# program per SM and at most two. bf16 rows of V 151,936 (304 KB): 197 programs on an H200 (1.5
# per SM, L2 in MiB), 172 on an H100. The first pass loads with "evict_last", the second with
# "evict_first". ``PROGRAMS_PER_SM`` set to a number overrides the rule (bench/gpu_check.sh times
# 1, 1.5 and 2 per SM against it).
PROGRAMS_PER_SM = None
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
                                      PROGRAMS_PER_SM)
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
def overridden(block_v=None, num_warps=None, row_splits=None):
    """For the tests and the benchmark only: the launches inside the block, in this thread (or
    task), use these instead of BLOCK_V, NUM_WARPS and ``launch_splits``'s choice (a row shorter
    than block_v still gets its power of two, and no row more splits than blocks; Triton compiles
    each new shape once). Nested blocks keep what they do not set."""
    outer = _overrides.get()
    token = _overrides.set(Overrides(block_v or outer.block_v, num_warps or outer.num_warps,
                                     row_splits or outer.row_splits))
    try:
        yield sweep_config
    finally:
        _overrides.reset(token)
