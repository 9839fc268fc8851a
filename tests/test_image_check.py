"""What the code uses of torch, triton and numpy exists in the GPU image's versions.

The lent GPU machine runs torch 2.11 and triton 3.6 (bench/README.md), not the versions this
repository is developed and tested with. bench/results/image-api-torch2.11-triton3.6.json records,
for every dotted name the package, reference/ and bench/ reach through those modules, whether it
resolved in an environment with those versions (``python -m bench.image_check --record``, run
there). A name used now that the record lacks fails here until it is recorded again in such an
environment; a name recorded as missing fails too.
"""

import json
import os

from bench import image_check

RECORD = os.path.join(os.path.dirname(__file__), "..", "bench", "results", "image-api-torch2.11-triton3.6.json")
RECORD_AGAIN = ("in an environment with torch 2.11 and triton 3.6 (pip install torch==2.11.0 triton==3.6.0 into "
                "a scratch venv): python -m bench.image_check --record " + os.path.relpath(RECORD))


def test_record_is_of_the_image_versions():
    record = json.load(open(RECORD))
    assert record["versions"]["torch"].startswith("2.11.") and record["versions"]["triton"] == "3.6.0"


def test_every_name_used_exists_in_the_image_versions():
    names = json.load(open(RECORD))["names"]
    used = image_check.uses()
    unrecorded = [n for n in used if n not in names]
    assert not unrecorded, f"used but never resolved against the image's versions: {unrecorded}; record {RECORD_AGAIN}"
    missing = [n for n in used if names[n] is not True]
    assert not missing, f"used, and absent from torch 2.11 / triton 3.6: {missing}"


def test_the_scan_finds_names_and_resolve_can_fail(tmp_path):
    """The check can fail: the scan sees names through aliases and from-imports, and an attribute
    that does not exist does not resolve."""
    src = tmp_path / "m.py"
    src.write_text("import torch\nimport triton.language as tl\nfrom torch.library import custom_op\n"
                   "def f(x):\n    return tl.program_id(0) + torch.linalg.vector_norm(x) + torch.no_such_op(x)\n")
    used = image_check.uses([str(src)])
    assert {"triton.language.program_id", "torch.linalg.vector_norm", "torch.library.custom_op",
            "torch.no_such_op"} <= set(used)
    assert image_check.resolve("torch.linalg.vector_norm") and image_check.resolve("triton.language.program_id")
    assert not image_check.resolve("torch.no_such_op") and not image_check.resolve("triton.language.no_such_op")
