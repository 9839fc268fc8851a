"""python -m bench.readme RESULTS.json: write that run's forward+backward tables into README.md,
between the benchmark markers, with its device, date and plot. Only this command touches the
README; it takes a run under bench/results (committed), never one in the ignored bench/out,
whose files the README's links would miss in every other checkout."""

import json
import os
import sys

from .report import markdown_table

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def section(path):
    with open(path) as f:
        run = json.load(f)
    stem = os.path.splitext(os.path.relpath(path, os.path.dirname(README)))[0]
    lines = [
        f"Measured on **{run['device']}**, {run['date']} (torch {run['torch']}, triton {run['triton']}"
        + (f", liger_kernel {run['liger_kernel']}" if run.get("liger_kernel") else "") + ")"
        + (f" on {run['cpu_threads']} CPU thread{'s' if run['cpu_threads'] > 1 else ''}" if run.get("cpu_threads") else "")
        + "."
        + (f" Device-to-device copy: {run['copy_bandwidth_gbps']:.0f} GB/s." if run.get("copy_bandwidth_gbps") else "")
        + (f" bf16 GEMM: {run['gemm_tflops']:.0f} TFLOP/s." if run.get("gemm_tflops") else "")
        + f" Raw numbers: [`{stem}.json`]({stem}.json).",
        "",
    ]
    if run.get("note"):
        lines += [f"*{run['note']}.*", ""]
    if run.get("memory"):
        lines += [f"Peak and extra MiB: {run['memory']}.", ""]
    results = run["results"]
    lines += ["On logits, forward+backward (loss and logits gradient); `fused-packed` is the same batch as "
              "its valid tokens with `cu_seqlens`; rate under the 3-pass byte model:",
              "", markdown_table(results, "logits"), "",
              "From hidden states and the LM head, forward+backward (loss, dhidden, dweight); rate "
              "against the 3-GEMM floor 3 · 2·N·V·H:", "", markdown_table(results, "linear"), ""]
    if any(r["mode"] == "logprobs_grad" for r in results):
        lines += ["From hidden states and the LM head, differentiable log-probs and entropy (forward, then "
                  "the backward of random upstream gradients on both: the hook verl, prime-rl and NeMo-RL "
                  "call); rate against the same 3-GEMM floor, where the fused op makes a fourth:",
                  "", markdown_table(results, "linear", "logprobs_grad"), ""]
    if os.path.exists(os.path.join(os.path.dirname(README), stem + ".png")):
        lines += [f"![time and memory]({stem}.png)", ""]
    return "\n".join(lines)


def main(argv=None):
    (path,) = argv or sys.argv[1:]
    results = os.path.realpath(os.path.join(os.path.dirname(__file__), "results"))
    if os.path.commonpath([results, os.path.realpath(path)]) != results:
        sys.exit(f"{path} is not under bench/results: copy the run there first (the README links to it)")
    with open(README) as f:
        text = f.read()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(README, "w") as f:
        f.write(head + START + "\n" + section(path) + END + tail)


if __name__ == "__main__":
    main()
