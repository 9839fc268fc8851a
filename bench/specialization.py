"""The compiled variant a Triton launch selects, computed without a GPU.

A ``kernel[grid](*args, **kwargs)`` launch binds its arguments with a binder that Triton builds
from the kernel's signature (``triton.runtime.jit.create_function_from_signature``) and the
backend of the current target; the binder turns each argument into a type and a specialization
(``native_specialize_impl``: a 16-byte aligned data pointer, an integer divisible by 16, an
integer equal to 1, unless the parameter is in ``do_not_specialize``), and the kernel cache is
keyed on those together with the launch options (``compute_cache_key``). A new key is a new
compile. This module runs the same binder for an NVIDIA target (sm_90 by default: the backend
object needs no GPU) over launches recorded instead of run, so that the tests can count keys on
the CPU and ``bench.sass`` can compile exactly the signature a launch selects.

    with recorded_launches(kernel_a, kernel_b) as launches:
        public_call(...)                      # the kernels are not run; launches are recorded
    keys = {specialization_key(launch) for launch in launches}

Data pointers. On the CPU a tensor's ``data_ptr`` is a host address, whose alignment is whatever
the host allocator gave. The binder here sees each tensor as if its storage began on a 256-byte
boundary, as the CUDA caching allocator's blocks do: the pointer's alignment is that of the
tensor's storage offset in bytes (a view that starts mid-storage is as aligned as it would be
on the GPU), and the same call gives the same key on any machine.
"""

import contextlib
import inspect
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, KernelParam, compute_cache_key, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200


class Launch(NamedTuple):
    """One recorded ``kernel[grid](*args, **kwargs)``: the kernel object launched (a JITFunction,
    or the interpreter's InterpretedFunction), its grid and its arguments as passed."""

    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict

    @property
    def name(self):
        return self.kernel.fn.__name__


class Specialization(NamedTuple):
    """What the launcher derives from a launch for ``target``: the kernel cache key, and what a
    compile for that key receives (``JITFunction._pack_args``): the signature {name: type}, the
    constexprs {(index,): value}, the attributes {(index,): [["tt.divisibility", 16]] ...} and
    the parsed backend options."""

    key: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: Any


@contextlib.contextmanager
def recorded_launches(*kernels):
    """Inside the block, launches of ``kernels`` are appended to the yielded list instead of run
    (each returns None). The kernel objects stay where they are: only their ``run``, which
    ``kernel[grid]`` calls, is replaced, and restored on exit (not reentrant for one kernel)."""
    launches = []
    kernels = list({id(k): k for k in kernels}.values())
    for kernel in kernels:
        def record(*args, grid, warmup, _kernel=kernel, **kwargs):
            assert not warmup, "a warm-up compiles: record launches only"
            launches.append(Launch(_kernel, grid, args, kwargs))

        kernel.run = record
    try:
        yield launches
    finally:
        for kernel in kernels:
            del kernel.run  # the class's run again


class _Pointer:
    """A tensor as the binder sees it: its dtype, and a data pointer aligned as the tensor's
    storage offset in bytes (the storage itself on a 256-byte boundary)."""

    __slots__ = ("dtype", "_ptr")

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self._ptr = 256 + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self):
        return self._ptr


def _params(kernel):
    """The kernel's KernelParams: its own for a JITFunction; for the interpreter's stand-in, built
    as JITFunction builds them, from the same ``do_not_specialize`` lists."""
    if isinstance(kernel, JITFunction):
        return kernel.params
    options = getattr(kernel, "kwargs", {})
    dns = options.get("do_not_specialize") or []
    dns_oa = options.get("do_not_specialize_on_alignment") or []
    return [KernelParam(i, p, i in dns or p.name in dns, i in dns_oa or p.name in dns_oa)
            for i, p in enumerate(inspect.signature(kernel.fn).parameters.values())]


def _debug(kernel):
    return kernel.debug if isinstance(kernel, JITFunction) else getattr(kernel, "kwargs", {}).get("debug")


_binders = {}


def _binder(kernel, target):
    cache = (kernel.fn, target.backend, target.arch, target.warp_size)
    if cache not in _binders:
        backend = make_backend(target)
        params = _params(kernel)
        binder = create_function_from_signature(inspect.signature(kernel.fn), params, backend)
        _binders[cache] = backend, params, binder
    return _binders[cache]


def _as_bound(x):
    return _Pointer(x) if isinstance(x, torch.Tensor) else x


def specialize(launch, target=TARGET, real_pointers=False):
    """The ``Specialization`` Triton's launcher computes for ``launch`` on ``target``, following
    ``JITFunction.run`` step for step up to the cache lookup. ``real_pointers``: bind the tensors
    themselves, their data pointers as they are (on a GPU, the launcher's view exactly), instead
    of as if each storage began on a 256-byte boundary."""
    backend, params, binder = _binder(launch.kernel, target)
    as_bound = (lambda x: x) if real_pointers else _as_bound
    kwargs = {k: as_bound(v) for k, v in launch.kwargs.items()}
    # The options JITFunction.run adds before binding (they are part of the key).
    kwargs["debug"] = kwargs.get("debug", _debug(launch.kernel)) or knobs.runtime.debug
    for option in ("instrumentation_mode", "fpsan_homomorphic_casts"):   # the second from triton 3.7 on
        if hasattr(knobs.compilation, option):
            kwargs[option] = getattr(knobs.compilation, option)
    bound_args, specialization, options = binder(*map(as_bound, launch.args), **kwargs)
    if knobs.runtime.add_stages_inspection_hook is not None:
        _, stages_hash = knobs.runtime.add_stages_inspection_hook()
        specialization.append(f'("custom_pipeline", {stages_hash})')
    key = compute_cache_key({}, specialization, options)
    # _pack_args reads nothing of the kernel but its params.
    options, signature, constexprs, attrs = JITFunction._pack_args(
        SimpleNamespace(params=params), backend, kwargs, bound_args, specialization, options)
    return Specialization(key, signature, constexprs, attrs, options)


def specialization_key(launch, target=TARGET):
    """The kernel cache key Triton's launcher computes for ``launch`` on ``target``: equal keys,
    one compiled variant; a new key, a new compile."""
    return specialize(launch, target).key


def runtime_arguments(launch, target=TARGET):
    """{name: (type, specialization)} of the launch's non-constexpr arguments, as the binder
    sees them ('D': divisible by 16; '': not; None: not specialized): the part of the key a
    batch's shape could move."""
    spec = specialize(launch, target)
    names = [p.name for p in _binder(launch.kernel, target)[1]]
    out = {}
    for i, name in enumerate(names):
        ty = spec.signature[name]
        if ty == "constexpr":
            continue
        out[name] = (ty, "D" if spec.attrs.get((i,)) else ("" if (i,) in spec.attrs else None))
    return out


def constexpr_values(launch, target=TARGET):
    """{name: value} of the launch's constexprs (the flags that choose a kernel variant, and any
    integer Triton made a constexpr because it was 1)."""
    spec = specialize(launch, target)
    names = [p.name for p in _binder(launch.kernel, target)[1]]
    return {names[i]: value for (i,), value in spec.constexprs.items()}
