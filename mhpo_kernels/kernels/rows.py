"""Row addressing shared by the two sweeps: one program per (b, t) row of a (B, T, V) tensor."""

import triton
import triton.language as tl


@triton.jit
def _row_ptr(p, row, T, stride_b, stride_t):
    """Pointer to the start of flat row ``row`` = b·T + t of a (B, T, V) tensor.

    int64 offsets: b · stride_b passes 2³¹ elements as soon as the tensor passes 4 GiB in bf16.
    """
    i_b = row // T
    i_t = row - i_b * T
    return p + i_b.to(tl.int64) * stride_b + i_t.to(tl.int64) * stride_t


@triton.jit
def _row_target(p_y, row, V):
    """(y, valid, n_read): the target id, whether the row is a valid token (0 ≤ y < V; the
    launcher writes −1 for invalid ones), and how many logits to read (0 for invalid rows)."""
    y = tl.load(p_y + row)
    valid = (y >= 0) & (y < V)
    return y, valid, tl.where(valid, V, 0)
