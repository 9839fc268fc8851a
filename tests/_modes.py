"""A dispatch mode sees a custom op only as one call, not what its implementation runs: for the
counters (host syncs, device ops), the mode must also be active inside the package's ops."""

import contextlib

import torch._library.custom_ops


@contextlib.contextmanager
def inside_package_ops(mode):
    """Run every ``mhpo_kernels::`` (and ``mhpo_kernels_test::``) op's implementations with ``mode`` active, inside the block."""
    def inside(fn):
        def run(*args, **kwargs):
            with mode:
                return fn(*args, **kwargs)
        return run

    patched = [(op, dict(op._backend_fns)) for name, op in torch._library.custom_ops.OPDEFS.items()
               if name.startswith("mhpo_kernels")]  # the tests' own mhpo_kernels_test:: too
    for op, fns in patched:
        op._backend_fns.update({k: inside(fn) for k, fn in fns.items()})
    try:
        yield
    finally:
        for op, fns in patched:
            op._backend_fns.clear()
            op._backend_fns.update(fns)
