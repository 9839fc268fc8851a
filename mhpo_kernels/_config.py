"""Launch configuration of the two sweeps: the only place that knows block sizes and warps.

Both sweeps run one program per row and walk the vocabulary in BLOCK_V-wide steps. They are
memory-bound (a handful of flops per element read), so the numbers are chosen to keep enough bytes
in flight per SM, not for arithmetic:

- BLOCK_V = 4096 elements: with 8 warps that is 16 elements per thread per step, two 16-byte
  loads in bf16 (four in fp32). Several programs fit on an SM, which keeps tens of KiB of loads
  outstanding per SM: more than bandwidth × latency needs on an H100 (about 15 KiB per SM).
  Larger blocks only add registers; smaller ones add loop overhead per byte.
- A row shorter than one block gets the next power of two at or above V (at least 16), so small
  vocabularies do not load masked lanes for nothing.
- num_warps 8 for full blocks, fewer for small ones (each warp should own at least 256 lanes).

These are first choices from the arithmetic above; bench/NOTES.md records what a GPU run measured.
"""

BLOCK_V = 4096
NUM_WARPS = 8


def sweep_config(V):
    """(BLOCK_V, num_warps) for a sweep over rows of length V (any logits dtype)."""
    block_v = min(BLOCK_V, max(16, 1 << (V - 1).bit_length()))
    num_warps = max(1, min(NUM_WARPS, block_v // 256))
    return block_v, num_warps


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
