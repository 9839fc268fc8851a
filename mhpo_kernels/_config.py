"""Launch configuration of the two sweeps: the only place that knows block sizes and warps.

Both sweeps run one program per row and walk the vocabulary in BLOCK_V-wide steps, each an
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

from typing import NamedTuple

BLOCK_V = 4096
NUM_WARPS = 8
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
    block_v = min(BLOCK_V, max(16, 1 << (V - 1).bit_length()))
    num_warps = max(1, min(NUM_WARPS, block_v // 256))
    vec = min(VECTOR_BYTES // itemsize, block_v)
    lanes = min(32 * num_warps, block_v // vec)
    return SweepConfig(block_v, num_warps, block_v // (lanes * vec), lanes, vec)


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
