"""The benchmark CLI runs end to end (on tiny shapes) and writes its JSON and plot."""

import json
import os
import subprocess
import sys

import pytest
import torch


ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_cli_writes_json_and_plot(tmp_path):
    """As `make bench` runs on a CPU: its own process, without TRITON_INTERPRET, so the PyTorch
    path (the interpreter would time Python, slowly); and a process of its own size, since the
    CPU's memory reading walks every Python object (``harness.cpu_tensor_bytes``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench", "--preset", "tiny", "--repeats", "1", "--out",
                           str(tmp_path), "--providers", "eager"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.with_suffix(".png").exists()
    run = json.loads(json_path.read_text())
    ok = {(r["suite"], r["provider"], r["mode"]) for r in run["results"] if r["status"] == "ok"}
    for provider in ("fused", "eager"):
        assert {("logits", provider, m) for m in ("fwd", "fwd_bwd", "logprobs")} <= ok
        assert {("linear", provider, m) for m in ("fwd_bwd", "logprobs", "logprobs_grad")} <= ok
    for r in run["results"]:
        if r["status"] == "ok":
            assert r["median_ms"] > 0
            assert (r["gbps"] > 0) if r["suite"] == "logits" else (r["tflops"] > 0)
            assert r["peak_bytes"] > r["extra_bytes"] > 0  # the CPU allocator's reading, the inputs beside it
        if r["agreement_with_fused"] is not None:
            assert not r["status"].startswith("disagrees"), r
    # the process's own output, what C++ writes too (the profiler's start and stop lines)
    out, err = proc.stdout, proc.stderr
    assert "provider" in out and "ms ±" in out
    printed = (out + err).splitlines()
    assert max(map(len, printed)) <= 120, max(printed, key=len)
    assert "profiler_start" not in out + err and "USDT" not in out + err


def _row(**fields):
    row = dict(suite="logits", provider="fused", computes="MHPO", mode="fwd_bwd", case="1x8x1000-fp32",
               status="ok", median_ms=12.34, p20_ms=12.0, p80_ms=12.8, gbps=1.0, frac_copy_bw=None, tflops=None,
               frac_gemm=None, peak_bytes=3 << 20, extra_bytes=1 << 20, speedup_vs_eager=1.0)
    return {**row, **fields}


def test_console_table_fits_and_names_what_was_left_out():
    """The printed table stays within 120 columns at the widest case ids and a long error, each
    time with its spread; a skipped row is left to the JSON, and a provider that cannot run is
    named once, with what installs it."""
    from bench import report

    case = "32x1024x151936xH4096-bf16"
    rows = [_row(), _row(provider="fused-grpo", computes="GRPO"),
            _row(suite="linear", provider="liger", computes="GRPO (not MHPO)", case=case, tflops=512.3,
                 frac_gemm=0.61, status="error: RuntimeError: " + "x" * 200),
            _row(suite="linear", provider="trl", case=case, status="skipped: trl not importable")]
    text = report.table(rows, repeats=3, warmup=2)
    assert max(map(len, text.splitlines())) <= 120
    assert "12.3 ms ±0.4" in text and "fused-grpo (GRPO)" in text and "median of 3 timed calls" in text
    assert "trl" not in text and "skipped" not in text
    note = report.left_out({"trl": "trl not importable", "liger": "runs on CUDA only"})
    assert "trl: not installed (pip install '.[trl]')" in note and note.count("liger") == 1
    assert max(map(len, note.splitlines())) <= 120


def test_progress_off_a_terminal_prints_a_line_a_tenth():
    import io

    from bench import report

    stream = io.StringIO()
    progress = report.Progress(87, stream)
    for i in range(87):
        progress.step(f"row {i}")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert 9 <= len(lines) <= 11 and lines[0].startswith("[1/87]")


def test_local_run_writes_to_an_ignored_folder():
    """`make bench` leaves `git status` clean: the default output folder is ignored by git."""
    import os
    import shutil
    import subprocess

    import bench.__main__ as cli

    assert os.path.basename(cli.OUT_DIR) == "out" or os.environ.get("MHPO_BENCH_OUT")
    root = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))
    if shutil.which("git") is None or not os.path.exists(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    probe = os.path.join("bench", "out", "cpu-2000-01-01.json")
    assert subprocess.run(["git", "check-ignore", "-q", probe], cwd=root).returncode == 0


def test_readme_takes_only_committed_runs(tmp_path):
    from bench import readme

    run = tmp_path / "cpu-2000-01-01.json"
    run.write_text("{}")
    with pytest.raises(SystemExit, match="not under bench/results"):
        readme.main([str(run)])


def test_cpu_peak_memory_of_a_known_allocation():
    """On the CPU, extra is the most held at once (4 + 1 MiB, not the 7 MiB allocated in all nor
    the 3 MiB left at the end) and peak adds the tensors alive before the call."""
    import torch

    from bench import harness

    mib = 1 << 20
    held = torch.ones(3 * mib, dtype=torch.uint8)

    def step():
        a = torch.ones(4 * mib, dtype=torch.uint8)
        b = torch.ones(mib, dtype=torch.uint8)
        del a
        c = torch.ones(2 * mib, dtype=torch.uint8)
        return b, c

    peak, extra = harness.peak_memory(step, torch.device("cpu"))
    assert 5 * mib <= extra < 5 * mib + 4096
    assert peak >= extra + held.nbytes


def test_cpu_plot_says_what_it_shows(tmp_path, monkeypatch):
    """A CPU run's plot: the PyTorch path's CPU time and CPU allocator bytes, no GPU figures."""
    import matplotlib.figure

    from bench import report

    titles = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: titles.append(
        (self._suptitle.get_text(), [ax.get_ylabel() for ax in self.axes])))
    row = dict(suite="logits", mode="fwd_bwd", status="ok", V=1000, tokens=8, dtype="fp32", provider="fused",
               median_ms=1.0, peak_bytes=3 << 20, extra_bytes=1 << 20, computes="MHPO")
    grad = dict(row, suite="linear", mode="logprobs_grad")
    assert report.plot(str(tmp_path / "x.png"), {"device": "cpu", "date": "2000-01-01"}, [row, grad])
    (suptitle, ylabels), = titles
    assert "PyTorch path" in suptitle and "not GPU" in suptitle
    assert ylabels == ["median CPU ms (PyTorch path)", "extra MiB, CPU allocator (PyTorch path)"] * 2


# ---- bench/gpu_check.sh and its Python steps, on the CPU ---------------------------------------

def test_gpu_check_script_parses():
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    assert subprocess.run(["bash", "-n", "bench/gpu_check.sh"]).returncode == 0


def test_gpu_check_dry_run(tmp_path, capsys):
    """Every Python step of the GPU check runs on the CPU at tiny shapes (PyTorch path) and
    lands in the one JSON; the summary reads it."""
    import mhpo_kernels
    from bench import check_report, gpu_check

    with mhpo_kernels.use_backend("torch"):  # verl-mem's dry run: tests/test_verl_engine.py (verl's import)
        gpu_check.main(["dry-run", "--skip", "verl-mem", "--out", str(tmp_path)])
    check_report.main(["summary", "--out", str(tmp_path)])
    run = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = run["steps"]
    assert set(steps) == {"smoke", "env", "headline", "sweeps", "grid", "align", "inplace", "compile"}
    headline = {(r["case"], r["provider"]): r for r in steps["headline"]["rows"]}
    for case in gpu_check.DRY["headline"]:
        for provider in ("fused", "fused-grpo", "eager", "compile"):
            assert headline[case.id, provider]["status"] == "ok", headline[case.id, provider]
        assert headline[case.id, "liger"]["status"] == "skipped: runs on CUDA only"
        # fp32 against the eager and compiled fp32 reference: the harness's own agreement bound
        assert headline[case.id, "eager"]["agreement_with_fused"] < 1e-4
    assert (tmp_path / "headline.png").stat().st_size > 0
    smoke = steps["smoke"]
    # bf16 operands are exact in fp32; 32 products summed in fp32: a few units of 2**-24
    assert smoke["addmm_fp32_out"]["max_rel_err"] < 1e-5 and smoke["nonzero_static"]["equal"]
    assert all(smoke["rescale"].values()), smoke["rescale"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["inplace"]["linear_batch_invariant"]["batch_invariant"] is True
    assert len(steps["sweeps"]["rows"]) == 2 and all(r["fwd_gbps"] > 0 for r in steps["sweeps"]["rows"])
    assert all(r["row_splits"] == 1 and r["fwd_unsplit_gbps"] > 0 for r in steps["sweeps"]["rows"])
    # the one-sweep kernel (grad_in_forward), timed at each programs-per-SM setting
    assert steps["sweeps"]["one_sweep"] == "measured"
    assert all(r[f"one_sweep_{p}_ms"] > 0 for r in steps["sweeps"]["rows"] for p in gpu_check.ONE_SWEEP_PROGRAMS_PER_SM)
    assert all("fwd_gbps" in g for g in steps["grid"]["grid"])
    assert steps["inplace"]["bitwise_equal"] is True
    assert steps["compile"]["head_inplace"]["compiled_equals_eager"] is True
    assert steps["compile"]["fused_linear"]["compiled_equals_eager"] is True
    out = capsys.readouterr().out
    # 3 cases × 4 variants × 4 launches, each case as the launchers split it and unsplit
    assert '"launches": 96' in out and "inplace" in (tmp_path / "summary.txt").read_text()


def test_gpu_check_verl_mem_skipped_without_verl(tmp_path, monkeypatch):
    """Where verl is not installed the verl-mem step records why, as a skip (not a pass), and the
    shell's record of its exit status 0 keeps it."""
    from bench import check_report, gpu_check

    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name, *a: None if name == "verl" else real(name, *a))
    gpu_check.main(["verl-mem", "--dry-run", "--out", str(tmp_path)])
    check_report.main(["record", "--out", str(tmp_path), "--name", "verl-mem", "--rc", "0", "--seconds", "1"])
    status = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["verl-mem"]["status"]
    assert status.startswith("skipped: verl is not installed"), status


def test_gpu_check_verl_mem_cuda_probe(monkeypatch):
    """verl-mem's CUDA reading, on the CPU with the allocator's statistics faked: each micro-batch's
    rise over what was allocated at its start, against the bytes of that micro-batch's logits."""
    from bench import gpu_check

    allocated, peaks, calls = iter([100, 5000]), iter([800, 5500]), []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: next(allocated))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: next(peaks))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    head = torch.nn.Linear(3, 5)
    engine = type("Engine", (), {"module": type("Model", (), {"get_output_embeddings": lambda self: head})()})()
    probe = gpu_check._MicroBatchMemory(None, 5, cuda=True)
    for n in (4, 2):
        ids = torch.nested.nested_tensor([torch.zeros(n - 1), torch.zeros(1)], layout=torch.jagged)
        probe.micro_batch(engine, {"input_ids": ids})
        head(torch.zeros(1, n, 3))
    probe.done(engine)
    entry = gpu_check._verl_mem_entry(probe.windows, 7, {}, True, 5)
    first, second = entry["micro_batches"]
    assert calls == ["reset", "reset"]
    assert (first["tokens"], first["logits_bytes"], first["extra_bytes"]) == (4, 80, 700)
    assert (second["tokens"], second["logits_bytes"], second["extra_bytes"]) == (2, 40, 500)
    assert first["predicted_extra_bytes"] == 7 * 80 and entry["extra_over_logits"] == 500 / 40


def test_gpu_check_record_and_ncu_parse(tmp_path):
    """Without torch: a step's exit status (an error a Python step caught stands), ncu's CSV."""
    from bench import check_report

    out = str(tmp_path)
    check_report.merge(out, "grid", {"status": "error", "error": "boom"})
    check_report.main(["record", "--out", out, "--name", "grid", "--rc", "0", "--seconds", "3"])
    check_report.main(["record", "--out", out, "--name", "tests", "--rc", "124", "--seconds", "100"])
    steps = check_report.load(out)["steps"]
    assert steps["grid"]["status"] == "error" and steps["tests"]["status"] == "timed out"

    csv = tmp_path / "ncu.csv"
    header = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"'
    rows = ['"0","_mhpo_fwd_kernel","dram__bytes_read.sum","Gbyte","2.49"',
            '"0","_mhpo_fwd_kernel","dram__bytes_write.sum","Kbyte","1,024"',
            '"1","_mhpo_bwd_kernel","dram__bytes_read.sum","Gbyte","2.49"',
            '"1","_mhpo_bwd_kernel","dram__bytes_write.sum","Gbyte","2.49"',
            '"1","_mhpo_bwd_kernel","gpu__time_duration.sum","msecond","1.2"']
    csv.write_text("==PROF== Disconnected\n" + "\n".join([header] + rows) + "\n")
    check_report.main(["record", "--out", out, "--name", "ncu", "--rc", "0", "--seconds", "30"])
    check_report.main(["ncu-parse", "--out", out, "--file", str(csv)])
    ncu = check_report.load(out)["steps"]["ncu"]
    assert ncu["status"] == "ok"
    fwd, bwd = ncu["launches"]
    model = 8192 * 151936 * 2
    assert fwd["dram__bytes_write.sum"] == 1024e3 and bwd["gpu__time_duration.sum"] == 1.2e6
    assert fwd["moved_over_model"] == pytest.approx((2.49e9 + 1.024e6) / model)
    assert bwd["moved_over_model"] == pytest.approx(4.98e9 / (2 * model))


def test_gpu_check_logits_copies_found():
    from bench.gpu_check import _logits_allocations

    code = ("buf0 = empty_strided_cuda((2, 1025, 151936), (155734400, 151936, 1), torch.bfloat16)\n"
            "buf1 = empty_strided_cuda((2050, ), (1, ), torch.float32)\n"
            "buf7 = aten.clone(buf0)  # (2, 1025, 151936)\n")
    alloc, clones = _logits_allocations(code, (2, 1025, 151936))
    assert len(alloc) == 1 and len(clones) == 1


def test_gpu_check_no_logits_copy_can_fail():
    """The flattened GEMM output counts as the logits' allocation; a copy of it fails the check,
    and code in which no allocation of the logits is found is "undetermined", never a pass."""
    from bench.gpu_check import _logits_allocations, no_logits_copy

    shape = (2, 1025, 151936)
    gemm = "buf3 = empty_strided_cuda((2050, 151936), (151936, 1), torch.bfloat16)\n"
    copy = "buf9 = empty_strided_cuda((2050, 151936), (151936, 1), torch.bfloat16)\nbuf9.copy_(buf3)  # (2050, 151936)\n"
    assert no_logits_copy(*_logits_allocations(gemm, shape)) is True
    assert no_logits_copy(*_logits_allocations(gemm + copy, shape)) is False
    verdict = no_logits_copy(*_logits_allocations("buf1 = empty_strided_cuda((2050, ), (1, ), torch.float32)", shape))
    assert verdict.startswith("undetermined")


def test_gpu_check_limits_add_up_to_its_time():
    """The steps' limits (the sanitizer loop's included) add up to at most the script's 360 s, so
    no step is starved by the ones before it on a cold machine."""
    import re

    text = open("bench/gpu_check.sh").read()
    limits = [int(n) for n in re.findall(r"^\s*(?:tool_step \S+ |step )\S+ (\d+) ", text, re.M)]
    loop = re.search(r"^for tool in (.*); do$", text, re.M).group(1)
    limits += [int(n) for n in re.findall(r":(\d+)", loop)]
    assert len(limits) >= 14, limits
    assert "TOTAL=${GPU_CHECK_SECONDS:-360}" in text
    assert sum(limits) <= 360, (sum(limits), limits)


def test_gpu_check_records_a_refusing_tool_as_skipped(tmp_path):
    """ncu without counter permission (and any tool that refuses, on its own lines) is "skipped:
    why", not a failure; a real failure stays one, and so does a target's error whose message
    happens to say "not supported"; a step that never started is "not run"."""
    import re

    from bench import check_report

    pattern = re.search(r"^REFUSED='(.*)'$", open("bench/gpu_check.sh").read(), re.M).group(1)
    logs = {
        "ncu": (1, "==PROF== Connected\n==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access "
                   "NVIDIA GPU Performance Counters\n"),
        "synccheck": (1, "========= Error: Device not supported\n"),
        "racecheck": (1, "==ERROR== Failed to load the profiler library: LibraryNotLoaded\n"),
        "memcheck": (3, "========= Invalid __global__ read of size 2 bytes\n"),
        "initcheck": (2, '{"status": "error", "error": "NotImplementedError: bf16 atomics not supported"}\n'),
    }
    for name, (rc, text) in logs.items():
        (tmp_path / f"{name}.log").write_text(text)
        check_report.main(["record", "--out", str(tmp_path), "--name", name, "--rc", str(rc), "--seconds", "3",
                           "--file", str(tmp_path / f"{name}.log"), "--refused", pattern])
    # The sanitizers share one log: a tool's refusal earlier in it is not the next tool's.
    shared = tmp_path / "sanitizers.log"
    shared.write_text("== racecheck\n========= Error: Device not supported\n== memcheck-after\n"
                      "RuntimeError: CUDA error: an illegal memory access was encountered\n")
    check_report.main(["record", "--out", str(tmp_path), "--name", "memcheck-after", "--rc", "2", "--seconds", "3",
                       "--file", str(shared), "--refused", pattern])
    check_report.main(["record", "--out", str(tmp_path), "--name", "tool-absent", "--rc", "0", "--seconds", "0",
                       "--skipped-because", "compute-sanitizer not installed"])
    check_report.main(["record", "--out", str(tmp_path), "--name", "grid", "--rc", "124", "--seconds", "0",
                       "--skipped"])
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert steps["ncu"]["status"].startswith("skipped: the tool refused (==ERROR== ERR_NVGPUCTRPERM")
    assert steps["synccheck"]["status"].startswith("skipped: the tool refused")
    assert steps["racecheck"]["status"].startswith("skipped: the tool refused")
    assert steps["memcheck"]["status"] == "exit 3"
    assert steps["initcheck"]["status"] == "exit 2"
    assert steps["memcheck-after"]["status"] == "exit 2"
    assert steps["tool-absent"]["status"] == "skipped: compute-sanitizer not installed"
    assert steps["grid"]["status"] == "not run: no time left"
    # Only the tool steps pass the pattern: a pytest tail that says "not supported" is a failure.
    assert 'STEP_REFUSED=$REFUSED step "$@"' in open("bench/gpu_check.sh").read()


def test_gpu_check_target_error_exits_non_zero(monkeypatch, capsys):
    """A step run under a tool or in shares (the sanitizers' and ncu's target, warm) that catches
    its own error exits non-zero: the shell records only its exit status, and 0 read as "ok"."""
    from bench import gpu_check

    def fails(args):
        raise RuntimeError("out of memory")

    monkeypatch.setitem(gpu_check.STEPS, "sanitize-target", fails)
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["sanitize-target", "--dry-run"])
    assert exit_.value.code == 2 and '"status": "error"' in capsys.readouterr().out
