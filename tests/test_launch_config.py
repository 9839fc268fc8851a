"""The launch arithmetic of ``_config``: resident programs, rows to fill the GPU, the tail wave,
row splits and the benchmark's override, on made-up device properties (no GPU needed)."""

from types import SimpleNamespace

import pytest
import torch

from mhpo_kernels import _config

V = 151936


def _props(name="NVIDIA H200", sms=132):
    return SimpleNamespace(name=name, multi_processor_count=sms, max_threads_per_multi_processor=2048,
                           regs_per_multiprocessor=65536)


@pytest.mark.parametrize("name, bandwidth, expected_rows", [("NVIDIA H200", 4.8e12, 586),
                                                            ("NVIDIA H100 80GB HBM3", 3.35e12, 409)])
def test_rows_to_fill_bf16(name, bandwidth, expected_rows):
    fill = _config.rows_to_fill(_props(name), V, 2)
    # 40 registers × 256 threads = 10,240 per program: 6 of 65,536 per SM, 792 on 132 SMs.
    assert (fill.programs_per_sm, fill.resident_programs) == (6, 792)
    # bandwidth × 1 µs per step / 8 KiB per step (4096 bf16), rounded up.
    assert fill.rows_for_bandwidth == expected_rows == -(-int(bandwidth * 1e-6) // 8192)
    assert fill.rows_to_fill == expected_rows


def test_rows_to_fill_limits():
    # 32 registers: the thread limit binds (2048 / 256 = 8 programs per SM).
    assert _config.rows_to_fill(_props(), V, 2, registers=32).programs_per_sm == 8
    # fp32: 16 KiB per step, half the rows for the same bytes in flight.
    assert _config.rows_to_fill(_props(), V, 4).rows_for_bandwidth == 293
    # An unknown device: the resident capacity alone; a measured bandwidth is taken as given.
    unknown = _config.rows_to_fill(_props("Some GPU", sms=10), V, 2)
    assert unknown.rows_to_fill == unknown.resident_programs == 60
    assert _config.rows_to_fill(_props("Some GPU", sms=10), V, 2, bandwidth=8192e6).rows_to_fill == 1
    # A small vocabulary: fewer warps, more programs per SM (capped at 32).
    small = _config.rows_to_fill(_props(), 100, 2)
    assert _config.sweep_config(100, 2).num_warps == 1 and small.programs_per_sm == 32


def test_wave_efficiency_and_row_splits():
    assert _config.wave_efficiency(8192, 792) == pytest.approx(8192 / (11 * 792))
    assert _config.wave_efficiency(792 * 3, 792) == 1.0 and _config.wave_efficiency(0, 792) == 1.0
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
