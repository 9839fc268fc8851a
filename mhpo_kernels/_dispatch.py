"""Which implementation of the two sweeps runs, by device.

- CUDA (and ROCm, which PyTorch also calls "cuda") tensors: the Triton kernels, compiled.
- CPU tensors with ``TRITON_INTERPRET=1`` set before the kernels were first imported: the same
  Triton kernels, run by Triton's interpreter (slow; this is how the tests exercise them).
- CPU tensors otherwise, or Triton not installed: ``torch_sweeps``, the PyTorch version.

``use_backend("torch" | "triton")`` overrides the choice inside a ``with`` block; the tests use it to
compare the two paths in one process.
"""

import contextlib
import contextvars
import functools
import importlib
import os
import sys
import warnings

import torch

from . import torch_sweeps

_FORWARD_MODULE = f"{__package__}.kernels.forward"
# Per thread and per asyncio task: forcing a backend in one thread leaves the others' calls alone.
_forced = contextvars.ContextVar("mhpo_kernels_backend", default=None)


@contextlib.contextmanager
def use_backend(name):
    """Force ``"triton"`` or ``"torch"`` for the calls made inside the block (in this thread), and
    for their backward wherever it runs (``call_backend``; inside torch.compile, the ops choose
    when they run)."""
    if name not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _kernels_interpreted():
    """True when the Triton kernels exist and were built by the interpreter."""
    module = sys.modules.get(_FORWARD_MODULE)
    if module is None:
        if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on"):
            return False
        try:
            from .kernels import forward as module
        except ImportError:
            return False
    return type(module._mhpo_fwd_kernel).__name__ == "InterpretedFunction"


def _kernels_compiled():
    """True when the Triton kernels were compiled for a GPU (not built by the interpreter)."""
    from .kernels import forward

    return type(forward._mhpo_fwd_kernel).__name__ == "JITFunction"


def _triton_importable():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(device):
    """"triton" or "torch" for tensors on ``device``."""
    if _forced.get() is not None:
        return _forced.get()
    if device.type == "cpu":
        return "triton" if _kernels_interpreted() else "torch"
    if device.type == "cuda" and _triton_importable():
        return "triton"
    return "torch"


def call_backend(device):
    """The backend a call names in its ``LogitMap`` (``backend_for``), so that its backward runs
    where its forward ran; None inside torch.compile, which cannot read ``use_backend``'s context
    variable: there the ops choose when they run."""
    return None if torch.compiler.is_compiling() else backend_for(device)


def check_float64(device, backend=None):
    """Float64 logits, which only the PyTorch path computes: refused where the Triton kernels would
    run them (on ``backend`` if given, else ``backend_for``)."""
    if (backend or backend_for(device)) == "triton":
        raise TypeError("logits are float64, which only the PyTorch path computes (for gradcheck and debugging): "
                        "the Triton kernels read float32, bfloat16 and float16; use CPU tensors without "
                        "TRITON_INTERPRET, or mhpo_kernels.use_backend('torch')")


def _quiet(sweep):
    """``sweep`` without the interpreter's floating-point warnings. It evaluates both sides of
    every ``tl.where`` with NumPy, masked lanes included (0 · inf, log 0 in lanes the kernel then
    discards, reductions over all-NaN lanes); compiled kernels do the same silently. NumPy's error
    state is restored on exit, and so are the caller's warning filters."""
    import numpy

    @functools.wraps(sweep)
    def run(*args, **kwargs):
        with numpy.errstate(all="ignore"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
            return sweep(*args, **kwargs)

    return run


def _check_triton_runs(device):
    if not _triton_importable():
        raise RuntimeError("mhpo_kernels: the Triton backend needs triton, which is not installed here; "
                           "use_backend('torch') runs the PyTorch path")
    if device.type != "cuda" and _kernels_compiled():
        raise RuntimeError(
            f"mhpo_kernels: the Triton backend runs {device.type} tensors only under Triton's "
            f"interpreter, and TRITON_INTERPRET=1 was not set before mhpo_kernels first ran its "
            f"kernels; use CUDA tensors, set the variable before importing, or "
            f"use_backend('torch')")


# Each kernel's launcher: the module of ``kernels`` and its function on the Triton path; the
# function of ``torch_sweeps`` with the same name has the same contract on the PyTorch path.
KERNELS = {"prepare": ("prepare", "prepare"), "forward": ("forward", "mhpo_fwd"), "backward": ("backward", "mhpo_bwd"),
           "scale_rows": ("backward", "scale_rows_"), "finalize": ("finalize", "finalize"),
           "token_terms": ("finalize", "token_terms"), "slice_count": ("select", "slice_count"),
           "slice_gather": ("select", "slice_gather")}


def kernel(name, device, backend=None):
    """The launcher of kernel ``name`` (``KERNELS``) for tensors on ``device``, on ``backend`` if
    given (else ``backend_for``). Inside torch.compile, where all but the sweeps run outside any
    custom op, they are PyTorch's on every device (the graph fuses their ops; the checks become
    asserts of the graph)."""
    module, function = KERNELS[name]
    if (name in ("prepare", "finalize", "token_terms") and torch.compiler.is_compiling()) or \
            (backend or backend_for(device)) != "triton":
        return getattr(torch_sweeps, function)
    _check_triton_runs(device)
    run = getattr(importlib.import_module(f"{__package__}.kernels.{module}"), function)
    return _quiet(run) if _kernels_interpreted() else run


def sweeps(device, backend=None):
    """(forward, backward) sweep launchers for tensors on ``device`` (on ``backend`` if given)."""
    return kernel("forward", device, backend), kernel("backward", device, backend)
