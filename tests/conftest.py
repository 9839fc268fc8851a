"""Test set-up. Without CUDA, the Triton kernels run on CPU tensors under Triton's interpreter;
the variable must be set before the kernels are first imported, hence here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Where the Triton kernels run in this session: compiled on CUDA, else interpreted on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
