"""The kernels compile for an H100 (sm_90) on this GPU-less machine, with no register spills and
16-byte vector loads and stores of the logits rows. This is the only check of the compiled code
that runs without a GPU: the interpreter accepts programs the compiler would reject."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(HERE, "_aot.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_variant_compiles_without_spills(report):
    for name, r in report.items():
        assert r["local_bytes"] == 0, f"{name} spills to local memory: {r}"
        assert r["registers"] is not None and r["registers"] <= 128, f"{name}: {r}"


def test_logits_move_in_16_byte_vectors(report):
    for name, r in report.items():
        assert r["vector_loads"] > 0, f"{name} loads logits element by element: {r}"
        if name.startswith("bwd"):
            assert r["vector_stores"] > 0, f"{name} stores the gradient element by element: {r}"
