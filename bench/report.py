"""Turning results into a table, a JSON file and a plot."""

import json
from collections import Counter

from .workloads import MODE_LABELS

MIB = 1 << 20


def add_speedups(results):
    """speedup_vs_eager / speedup_vs_compile for every timed row, within its (case, mode)."""
    times = {(r["case"], r["mode"], r["provider"]): r["median_ms"] for r in results if r["status"] == "ok"}
    for r in results:
        for base in ("eager", "compile"):
            t_base = times.get((r["case"], r["mode"], base))
            ok = r["status"] == "ok" and t_base is not None
            r[f"speedup_vs_{base}"] = t_base / r["median_ms"] if ok else None


def _fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def table(results):
    header = ["provider", "computes", "mode", "case", "median ms", "GB/s", "% copy", "peak MiB",
              "extra MiB", "x eager", "x compile"]
    rows = [header]
    for r in results:
        if r["status"] != "ok":
            rows.append([r["provider"], r["computes"], r["mode"], r["case"], r["status"]] + [""] * 6)
            continue
        rows.append([
            r["provider"], r["computes"], r["mode"], r["case"], _fmt(r["median_ms"], ".3f"),
            _fmt(r["gbps"], ".0f"), _fmt(r["frac_copy_bw"] and 100 * r["frac_copy_bw"], ".0f"),
            _fmt(r["peak_bytes"] and r["peak_bytes"] / MIB, ".0f"),
            _fmt(r["extra_bytes"] and r["extra_bytes"] / MIB, ".0f"),
            _fmt(r["speedup_vs_eager"], ".2f"), _fmt(r["speedup_vs_compile"], ".2f"),
        ])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(results, mode="fwd_bwd"):
    """The README's table: one mode, every case and provider."""
    out = ["| case | provider | computes | median ms | GB/s | % of copy | extra MiB | × eager | × compile |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["mode"] != mode:
            continue
        if r["status"] != "ok":
            out.append(f"| {r['case']} | {r['provider']} | {r['computes']} | {r['status']} | | | | | |")
            continue
        out.append(
            f"| {r['case']} | {r['provider']} | {r['computes']} | {r['median_ms']:.3f} | "
            f"{_fmt(r['gbps'], '.0f')} | {_fmt(r['frac_copy_bw'] and 100 * r['frac_copy_bw'], '.0f')} | "
            f"{_fmt(r['extra_bytes'] and r['extra_bytes'] / MIB, '.0f')} | "
            f"{_fmt(r['speedup_vs_eager'], '.2f')} | {_fmt(r['speedup_vs_compile'], '.2f')} |"
        )
    return "\n".join(out)


def write_json(path, meta, results):
    with open(path, "w") as f:
        json.dump({**meta, "results": results}, f, indent=1)


def plot(path, meta, results):
    """Time and extra memory against vocabulary size, per provider, forward+backward, at the
    (tokens, dtype) with the most vocabularies measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["mode"] == "fwd_bwd" and r["status"] == "ok"]
    if not rows:
        return False
    groups = Counter((r["tokens"], r["dtype"]) for r in rows)
    tokens, dtype = max(groups, key=lambda k: (len({r["V"] for r in rows if (r["tokens"], r["dtype"]) == k}), k))
    rows = [r for r in rows if (r["tokens"], r["dtype"]) == (tokens, dtype)]
    has_memory = any(r["extra_bytes"] is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_memory else 1, figsize=(11 if has_memory else 6, 4), squeeze=False)
    for provider in dict.fromkeys(r["provider"] for r in rows):
        pts = sorted((r["V"], r["median_ms"], r["extra_bytes"]) for r in rows if r["provider"] == provider)
        label = provider + (" (GRPO)" if any(r["computes"] != "MHPO" for r in rows if r["provider"] == provider) else "")
        axes[0][0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        if has_memory:
            axes[0][1].plot([p[0] for p in pts], [p[2] / MIB for p in pts], "o-", label=label)
    axes[0][0].set(xlabel="vocabulary V", ylabel="median ms", title=f"{MODE_LABELS['fwd_bwd']}, {tokens} tokens, {dtype}")
    if has_memory:
        axes[0][1].set(xlabel="vocabulary V", ylabel="extra MiB beyond inputs", title="memory")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{meta['device']} ({meta['date']})" + (": PyTorch path, says nothing about GPU speed" if meta["device"] == "cpu" else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
