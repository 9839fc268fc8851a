"""Compile the Triton kernels for an H100 (sm_90) without a GPU, and report what the code looks
like: whether it compiles, register and local-memory (spill) use, and whether logits are moved
with 16-byte vector instructions. Run as a script in a process without TRITON_INTERPRET (the
interpreter replaces the kernels); prints one JSON object."""

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mhpo_kernels._config import sweep_config  # noqa: E402
from mhpo_kernels.kernels.backward import _mhpo_bwd_kernel  # noqa: E402
from mhpo_kernels.kernels.forward import _mhpo_fwd_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
V = 151936  # Qwen's vocabulary: a multiple of 16, so rows are 16-byte aligned


def _signature(kernel, dtype, constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("p_x", "p_dx"):
            sig[name] = "*" + dtype
        elif name == "p_y":
            sig[name] = "*i64"
        elif name.startswith("p_"):
            sig[name] = "*fp32"
        elif name.startswith("stride"):
            sig[name] = "i64"
        elif name in ("T", "V"):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    # What the launcher's specialization sees for aligned tensors and a multiple-of-16 V.
    aligned = [n for n in kernel.arg_names if n.startswith(("p_", "stride")) or n == "V"]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return sig, attrs


def compile_variant(kernel, dtype, constexprs):
    block_v, num_warps = sweep_config(V)
    constexprs = {**constexprs, "BLOCK_V": block_v}
    sig, attrs = _signature(kernel, dtype, constexprs)
    compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=TARGET,
                              options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "local_bytes": int(local.group(1)) if local else None,
        "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
        "vector_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)),
    }


FWD_ALL = dict(SOFTCAP=False, WITH_ENTROPY=True, WITH_LOSS=True, HAS_OLD=True, HAS_REF=True)
FWD_MIN = dict(SOFTCAP=False, WITH_ENTROPY=False, WITH_LOSS=False, HAS_OLD=False, HAS_REF=False)
VARIANTS = {
    "fwd-bf16-all": (_mhpo_fwd_kernel, "bf16", FWD_ALL),
    "fwd-fp16-all": (_mhpo_fwd_kernel, "fp16", FWD_ALL),
    "fwd-fp32-all": (_mhpo_fwd_kernel, "fp32", FWD_ALL),
    "fwd-bf16-logprobs": (_mhpo_fwd_kernel, "bf16", FWD_MIN),
    "fwd-bf16-softcap": (_mhpo_fwd_kernel, "bf16", {**FWD_ALL, "SOFTCAP": True}),
    "bwd-bf16": (_mhpo_bwd_kernel, "bf16", dict(SOFTCAP=False, HAS_DENT=False)),
    "bwd-fp32": (_mhpo_bwd_kernel, "fp32", dict(SOFTCAP=False, HAS_DENT=False)),
    "bwd-bf16-entropy-softcap": (_mhpo_bwd_kernel, "bf16", dict(SOFTCAP=True, HAS_DENT=True)),
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(VARIANTS)
    print(json.dumps({name: compile_variant(*VARIANTS[name]) for name in names}))
