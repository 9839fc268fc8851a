"""The launch arithmetic of ``_config``: rows to fill the GPU, row splits and the benchmark's
override (no GPU needed)."""


import pytest
import torch

from mhpo_kernels import _config

V = 151936


def test_rows_to_fill():
    # 132 SMs × an H200's bandwidth × 1 µs / 132 bytes in flight, over 8 KiB a step (4096
    # bf16) or 16 KiB (fp32), rounded up: the lead bench/gpu_check.sh's `sweeps` step measures.
    assert _config.rows_to_fill(132, V, 2) == -(-int(4.8e12 * 1e-6) // 8192) == 586
    assert _config.rows_to_fill(132, V, 4) == 293
    assert _config.rows_to_fill(66, V, 2) == 293


def test_row_splits():
    # 128 rows would want 5 splits, but a split stays at least 8 blocks (32,768) long: 4.
    assert [_config.row_splits(n, V, 586) for n in (128, 256, 512, 586, 8192)] == [4, 3, 2, 1, 1]
    assert _config.row_splits(1, V, 586) == V // (_config.MIN_SPLIT_BLOCKS * _config.BLOCK_V) == 4
    assert _config.row_splits(1, 1000, 586) == 1


def test_override_is_scoped():
    before = _config.sweep_config(V, 2)
    with _config.overridden(block_v=8192, num_warps=16) as sweep_config:
        cfg = sweep_config(V, 2)
        assert (cfg.block_v, cfg.num_warps) == (8192, 16)
        assert cfg.r * cfg.lanes * cfg.vec == cfg.block_v
        assert sweep_config(100, 2).block_v == 128   # short rows keep their power of two
    assert _config.sweep_config(V, 2) == before


def test_overrides_and_backend_stay_in_their_thread():
    """``overridden`` and ``use_backend`` set context variables: another thread running at the
    same time sees the defaults (they were module globals, which every thread shared)."""
    import threading

    import mhpo_kernels
    from mhpo_kernels import _dispatch

    inside, seen = threading.Event(), {}

    def other():
        inside.wait(10)
        seen["cfg"] = _config.sweep_config(151936, 2)
        seen["splits"] = _config.launch_splits(8, 151936, 2, torch.device("cpu"))
        seen["backend"] = _dispatch.backend_for(torch.device("meta"))

    thread = threading.Thread(target=other)
    thread.start()
    with _config.overridden(block_v=1024, num_warps=4, row_splits=3), mhpo_kernels.use_backend("triton"):
        assert _config.sweep_config(151936, 2).block_v == 1024
        assert _config.launch_splits(8, 151936, 2, torch.device("cpu")) == 3
        assert _dispatch.backend_for(torch.device("meta")) == "triton"
        inside.set()
        thread.join(10)
    assert seen["cfg"].block_v == _config.BLOCK_V and seen["cfg"].num_warps == _config.NUM_WARPS
    assert seen["splits"] == 1 and seen["backend"] == "torch"
    with _config.overridden(block_v=2048):
        with _config.overridden(row_splits=2):      # nested: keeps the outer block width
            assert _config.sweep_config(151936, 2).block_v == 2048
        assert _config.launch_splits(8, 151936, 2, torch.device("cpu")) == 1
