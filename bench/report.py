"""Turning results into a table, a JSON file, the README's tables and a plot."""

import json
from collections import Counter

from .workloads import MODE_LABELS

MIB = 1 << 20


def add_speedups(results):
    """speedup_vs_<p> for p in eager, compile, trl: within each (suite, case, mode)."""
    times = {(r["suite"], r["case"], r["mode"], r["provider"]): r["median_ms"]
             for r in results if r["status"] == "ok"}
    for r in results:
        for base in ("eager", "compile", "trl"):
            t_base = times.get((r["suite"], r["case"], r["mode"], base))
            ok = r["status"] == "ok" and t_base is not None
            r[f"speedup_vs_{base}"] = t_base / r["median_ms"] if ok else None


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _with_unit(x, spec, unit):
    return "-" if x is None else format(x, spec) + unit


def _columns(r):
    """The rate and its share of the ceiling: GB/s and % copy (logits), TFLOP/s and % GEMM (linear)."""
    if r["suite"] == "linear":
        share = r["frac_gemm"] and 100 * r["frac_gemm"]
        return _with_unit(r["tflops"], ".3g", " TF/s"), _with_unit(share, ".0f", "% gemm")
    share = r["frac_copy_bw"] and 100 * r["frac_copy_bw"]
    return _with_unit(r["gbps"], ".3g", " GB/s"), _with_unit(share, ".0f", "% copy")


def _computes(r):
    """What the row computes: the provider's objective for a loss, else what the mode returns."""
    return {"logprobs": "log-probs", "logprobs_grad": "log-probs, entropy"}.get(r["mode"], r["computes"])


def _mib(x):
    return _fmt(x and x / MIB, ".0f")


def table(results):
    header = ["suite", "provider", "computes", "mode", "case", "median ms", "rate", "of ceiling",
              "peak MiB", "extra MiB", "x eager", "x compile", "x trl"]
    rows = [header]
    for r in results:
        if r["status"] != "ok":
            rows.append([r["suite"], r["provider"], _computes(r), r["mode"], r["case"], r["status"]] + [""] * 7)
            continue
        rows.append([r["suite"], r["provider"], _computes(r), r["mode"], r["case"], _fmt(r["median_ms"], ".3f"),
                     *_columns(r), _mib(r["peak_bytes"]), _mib(r["extra_bytes"]),
                     _fmt(r["speedup_vs_eager"], ".2f"), _fmt(r["speedup_vs_compile"], ".2f"),
                     _fmt(r["speedup_vs_trl"], ".2f")])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) if i < 5 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(results, suite, mode="fwd_bwd"):
    """The README's table for one suite and mode: every case and provider."""
    base = "× trl" if suite == "linear" else "× compile"
    out = [f"| case | provider | computes | median ms | rate | of ceiling | peak MiB | extra MiB | × eager | {base} |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["suite"] != suite or r["mode"] != mode:
            continue
        if r["status"] != "ok":
            out.append(f"| {r['case']} | {r['provider']} | {_computes(r)} | {r['status']} | | | | | | |")
            continue
        rate, share = _columns(r)
        other = r["speedup_vs_trl"] if suite == "linear" else r["speedup_vs_compile"]
        out.append(f"| {r['case']} | {r['provider']} | {_computes(r)} | {r['median_ms']:.3f} | {rate} | "
                   f"{share} | {_mib(r['peak_bytes'])} | {_mib(r['extra_bytes'])} | "
                   f"{_fmt(r['speedup_vs_eager'], '.2f')} | {_fmt(other, '.2f')} |")
    return "\n".join(out)


def write_json(path, meta, results):
    with open(path, "w") as f:
        json.dump({**meta, "results": results}, f, indent=1)


def _sweep(rows, axis):
    """The rows of the most common fixed setting, to plot against ``axis`` (V or tokens)."""
    fixed = "tokens" if axis == "V" else "V"
    groups = Counter((r[fixed], r["dtype"]) for r in rows)
    if not groups:
        return [], None
    key = max(groups, key=lambda k: (len({r[axis] for r in rows if (r[fixed], r["dtype"]) == k}), k))
    return [r for r in rows if (r[fixed], r["dtype"]) == key], f"{fixed} {key[0]}, {key[1]}"


# What the plot shows: per suite and mode, time and memory against the axis that varies.
PLOTS = (("logits", "fwd_bwd", "V"), ("linear", "fwd_bwd", "tokens"), ("linear", "logprobs_grad", "tokens"))


def plot(path, meta, results):
    """Forward+backward on logits and on the LM head, and the differentiable (log-prob, entropy):
    time and the memory beyond the inputs (extra) against V (logits) or tokens (linear). A CPU
    run's axes and title say what its figures are: the PyTorch path's CPU time and the bytes of
    the CPU allocator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for suite, mode, axis in PLOTS:
        rows = [r for r in results if r["suite"] == suite and r["mode"] == mode and r["status"] == "ok"]
        rows, label = _sweep(rows, axis)
        if rows:
            panels.append((suite, mode, axis, rows, label))
    if not panels:
        return False
    has_memory = any(r["extra_bytes"] is not None for *_, rows, _ in panels for r in rows)
    cpu = meta["device"] == "cpu"
    ncols = 2 if has_memory else 1
    fig, axes = plt.subplots(len(panels), ncols, figsize=(5.5 * ncols, 4 * len(panels)), squeeze=False)
    for (suite, mode, axis, rows, label), ax_row in zip(panels, axes):
        for provider in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted((r[axis], r["median_ms"], r["extra_bytes"], r["computes"]) for r in rows
                         if r["provider"] == provider)
            name = provider + ("" if pts[0][3].startswith("MHPO") else " (GRPO)")
            ax_row[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            if has_memory:
                ax_row[1].plot([p[0] for p in pts], [(p[2] or 0) / MIB for p in pts], "o-", label=name)
        ax_row[0].set(xlabel=axis, ylabel="median CPU ms (PyTorch path)" if cpu else "median ms",
                      title=f"{suite}: {MODE_LABELS[mode]}, {label}")
        if has_memory:
            ax_row[1].set(xlabel=axis, ylabel="extra MiB, CPU allocator (PyTorch path)" if cpu else "extra MiB",
                          title=f"{suite}: memory beyond the inputs")
        for ax in ax_row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    cpu_note = ": PyTorch path, CPU time and CPU allocator bytes, not GPU figures" if cpu else ""
    fig.suptitle(f"{meta['device']} ({meta['date']}){cpu_note}", fontsize=10 if cpu else None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def headline_plot(path, result):
    """The headline step's figure: per case (bars grouped by case, one bar per provider), the
    rate under the bytes model as a share of the measured copy rate and the memory beyond the
    inputs. Returns the file written, or why none was (no matplotlib, nothing measured)."""
    try:
        import matplotlib
    except ImportError:
        return "skipped: matplotlib not importable"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if not rows:
        return "skipped: no provider ran"
    cases = list(dict.fromkeys(r["case"] for r in result["rows"]))
    providers = list(dict.fromkeys(r["provider"] for r in result["rows"]))
    copy = result.get("copy_gbps")
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.3 * len(cases)), 8), sharex=True)
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        at = {r["case"]: r for r in rows if r["provider"] == provider}
        xs = [c + (i - (len(providers) - 1) / 2) * width for c in range(len(cases))]
        rate = [100 * at[c]["gbps"] / copy if c in at and copy else (at[c]["gbps"] if c in at else 0) for c in cases]
        extra = [at[c]["extra_bytes"] / 2**30 if c in at and at[c]["extra_bytes"] is not None else 0 for c in cases]
        axes[0].bar(xs, rate, width, label=provider)
        axes[1].bar(xs, extra, width, label=provider)
    axes[0].set_ylabel("% of copy rate (bytes model)" if copy else "GB/s (bytes model; CPU: meaningless)")
    axes[1].set_ylabel("extra GiB beyond the inputs")
    axes[1].set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=8)
    axes[0].set_title("forward + backward, whole calls, L2 evicted before each (0: not run, see the JSON)")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
