"""Test support: two speed-ups of Triton's interpreter that change nothing it computes."""


def patch_the_language_once_per_launch():
    """Triton's interpreter patches ``triton.language`` when a kernel launch starts and undoes it
    when the launch ends; it also patches it again at every call of a ``@triton.jit`` helper from
    inside the kernel (``InterpretedFunction.__call__``). For a helper that reaches the language
    through modules the launch has patched already (``tl``, ``tl.core``), that repeated patch
    changes nothing, and it was about half of an interpreted call's time (``inspect.getmembers``
    of five modules per call: ``mhpo_loss`` forward and backward at (3, 5, 64), 1,100 helper
    calls, 0.96 of 1.79 s). Here such a call skips it; a helper that reaches a module not yet
    patched in this launch (Triton's own ``tl.zeros`` reaches ``tl.core``) is patched as before,
    and the launch's own patch and undo are untouched. Where the interpreter is built otherwise
    (another Triton), nothing is changed."""
    import inspect

    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    executor = getattr(interpreter, "GridExecutor", None)
    patch_lang, empty = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if executor is None or patch_lang is None or empty is None:
        return
    state = {"launch": False, "patched": set()}
    launch = executor.__call__

    def languages(fn):  # the modules _patch_lang patches for fn
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def launch_patching_once(self, *args, **kwargs):
        state["launch"], state["patched"] = True, set()
        try:
            return launch(self, *args, **kwargs)
        finally:
            state["launch"] = False

    def patch_lang_once(fn):
        if state["launch"]:
            modules = languages(fn)
            if state["patched"] and modules <= state["patched"]:  # a helper's call, nothing new
                return empty()
            state["patched"] |= modules
        return patch_lang(fn)

    executor.__call__ = launch_patching_once
    interpreter._patch_lang = patch_lang_once


def _call(fn, args, kwargs):
    return fn(*args, **kwargs)


# CPython (3.11 to 3.13) keeps Python frames in 16 KiB chunks and frees a chunk as soon as its
# first frame returns. An interpreted kernel calls small functions millions of times at one depth;
# where that depth is the first frame of a chunk, each call maps and unmaps a chunk (857,000 pairs
# in one 21 s test: 9 s of system time). A frame that reserves 512 KiB of stack slots gets a chunk
# of 1 MiB to itself whose other half holds every frame called below it: no chunk boundary below.
_ROOMY_SLOTS = 1 << 16
_roomy_call = type(_call)(_call.__code__.replace(co_stacksize=_call.__code__.co_stacksize + _ROOMY_SLOTS),
                          _call.__globals__)


def in_a_roomy_frame(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, called from a frame whose stack chunk has room for every frame
    below it (above); what it computes is unchanged."""
    return _roomy_call(fn, args, kwargs)
