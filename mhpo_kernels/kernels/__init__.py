"""The Triton kernels: ``token_math`` (per-token helpers), ``forward`` (sweep 1), ``backward``
(sweep 2). Imported only when a Triton path runs, so the package works without Triton."""
