"""Multi-process tests on CPU: gloo, a FileStore rendezvous (no ports), the spawn start method, and a
hard time limit so that a hang fails the test instead of eating CI."""

import datetime
import os
import sys
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120


def _entry(rank, world_size, store_path, fn, args, result_dir):
    """One rank: the group, ``fn``, a barrier, then a hard exit. Tearing gloo and the FileStore
    down in the usual way races with the other ranks' teardown now and then (an abort in a
    background thread at exit); nothing is left to clean up in a throwaway process."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # children re-import the kernels: same backend
    from _interpreter import in_a_roomy_frame, patch_the_language_once_per_launch

    if os.environ["TRITON_INTERPRET"] == "1":
        patch_the_language_once_per_launch()
    code = 0
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
        in_a_roomy_frame(fn, rank, world_size, *args)
        dist.barrier()                 # every rank is done talking before any rank leaves
    except BaseException:
        with open(os.path.join(result_dir, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _interpreter_broken():
    """Triton's interpreter before 3.7 fails beside NumPy 2.4 or later (a CUDA image may pair them;
    the CPU set-up never does)."""
    import numpy
    import triton

    def version(module):
        return tuple(int(p) for p in module.__version__.split(".")[:2])

    return version(triton) < (3, 7) and version(numpy) >= (2, 4)


def run(fn, world_size, tmp_path, *args, timeout=TIMEOUT_S):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes with a gloo group;
    raise with the failing ranks' tracebacks, or after ``timeout`` seconds. The ranks compute on
    CPU tensors (gloo), so they run the Triton kernels under the interpreter even where CUDA is:
    skipped, with the reason, where that interpreter cannot run."""
    if _interpreter_broken():
        import pytest

        pytest.skip("the ranks run the Triton kernels on CPU tensors under the interpreter, which this triton "
                    "(< 3.7) cannot beside numpy >= 2.4")
    store = os.path.join(str(tmp_path), "store")
    ctx = mp.start_processes(_entry, args=(world_size, store, fn, args, str(tmp_path)),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} did not finish within {timeout} s")
    except mp.ProcessExitedException as e:
        errors = sorted(f for f in os.listdir(tmp_path) if f.startswith("error-"))
        detail = "\n".join(open(os.path.join(tmp_path, f)).read() for f in errors) or str(e)
        raise AssertionError(f"{fn.__name__} failed:\n{detail}") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _each_case(rank, world_size, fn, out_dir, cases):
    for case in cases:
        fn(rank, world_size, out_dir, case)


def run_cases(fn, world_size, tmp_path, out_dir, cases, timeout=TIMEOUT_S):
    """``run`` of ``fn(rank, world_size, out_dir, case)`` for each of ``cases`` in turn, in one set of
    processes: one start-up (the imports of a spawned process) for all of them."""
    run(_each_case, world_size, tmp_path, fn, out_dir, cases, timeout=timeout)
