"""Test set-up. Without CUDA, the Triton kernels run on CPU tensors under Triton's interpreter;
the variable must be set before the kernels are first imported, hence here."""

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (make test: a worker per core) each worker's intra-op thread pool gets its
# share of the cores: with a pool per worker as wide as the machine, the pools oversubscribe the
# cores and large CPU ops stall (the bench CLI test: 16 s alone, 51 s beside another worker).
# Processes the tests spawn (tests/_dist.py) inherit the variable.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
    from _interpreter import patch_the_language_once_per_launch

    patch_the_language_once_per_launch()


def pytest_itemcollected(item):
    """Each test's set-up (its fixtures) and call run from a roomy frame
    (``_interpreter.in_a_roomy_frame``: a third off the interpreted tests' time); pytest's
    protocol and every plugin's hooks are left as they are."""
    from _interpreter import in_a_roomy_frame

    for name in ("setup", "runtest"):
        setattr(item, name, functools.partial(in_a_roomy_frame, getattr(item, name)))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Where the Triton kernels run in this session: compiled on CUDA, else interpreted on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# MHPO_TESTS_AS_ON_CUDA=1 (a CPU machine only): the package dispatches as it does where CUDA is,
# with the Triton kernels compiled rather than interpreted, so that every test that runs them on
# CPU tensors fails with the package's refusal. That is how the `interpreter` marker's list
# (INTERPRETER_ONLY below) is made: such tests cannot run on a GPU machine, and are skipped there.
if os.environ.get("MHPO_TESTS_AS_ON_CUDA") == "1":
    from mhpo_kernels import _dispatch

    _dispatch._kernels_interpreted = lambda: False
    _dispatch._kernels_compiled = lambda: True


def _interpreter_only():
    path = os.path.join(os.path.dirname(__file__), "interpreter_only.txt")
    with open(path) as f:
        return {line.strip() for line in f if line.strip() and not line.startswith("#")}


INTERPRETER_ONLY = _interpreter_only()
INTERPRETER_REASON = ("runs the Triton kernels on CPU tensors, which needs Triton's interpreter; where CUDA is "
                      "they are compiled instead (the CUDA subset is every other test)")


def pytest_collection_modifyitems(config, items):
    """Mark the interpreter-only tests (``interpreter``), and skip them where CUDA is."""
    for item in items:
        if item.nodeid in INTERPRETER_ONLY:
            item.add_marker(pytest.mark.interpreter)
            if torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason=INTERPRETER_REASON))
