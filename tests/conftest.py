"""Test set-up. Without CUDA, the Triton kernels run on CPU tensors under Triton's interpreter;
the variable must be set before the kernels are first imported, hence here."""

import os

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

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Where the Triton kernels run in this session: compiled on CUDA, else interpreted on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
