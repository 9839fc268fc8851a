"""Turning results into a table, a JSON file, the README's tables and a plot; the run's progress."""

import json
import math
import re
import shutil
import sys
import textwrap
import time
from collections import Counter

from .workloads import MODE_LABELS

MIB = 1 << 20
# The widest line the console gets: the table, the progress line and the closing notes.
WIDTH = 120
# What installs a baseline's package, for the line that names the providers left out.
INSTALL = {"trl": "pip install '.[trl]'", "liger_kernel": "pip install liger-kernel"}


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


def _ms(r):
    """'12.3 ms ±0.4': the median to 3 significant digits (3 decimals at most) and half the
    spread from the 20th to the 80th percentile, to the same decimals."""
    median, spread = r["median_ms"], (r["p80_ms"] - r["p20_ms"]) / 2
    decimals = min(3, max(0, 2 - math.floor(math.log10(median)))) if median > 0 else 3
    return f"{median:.{decimals}f} ms ±{spread:.{decimals}f}"


def _num(x):
    """3 significant digits, without an exponent from 100 up; "-" for None."""
    return "-" if x is None else f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _label(r):
    """The provider, with what its loss computes where that is not MHPO (GRPO's clipped objective)."""
    loss = r["mode"] in ("fwd", "fwd_bwd") and not r["computes"].startswith("MHPO")
    return f"{r['provider']} ({r['computes'].split(' ')[0]})" if loss else r["provider"]


def _cells(r, share):
    """A shown row's cells; a row that did not run (an error, out of memory, disagreeing with the
    fused op) has its status in place of the figures."""
    if r["status"] != "ok":
        return [r["case"], _label(r), r["status"]]
    rate, frac = (r["tflops"], r["frac_gemm"]) if r["suite"] == "linear" else (r["gbps"], r["frac_copy_bw"])
    cells = [r["case"], _label(r), _ms(r), _num(rate)]
    if share:
        cells.append(_fmt(frac and 100 * frac, ".0f"))
    return cells + [_num(r["extra_bytes"] and r["extra_bytes"] / MIB), _fmt(r["speedup_vs_eager"], ".2f")]


def _header(suite, share):
    rate, of = ("TFLOP/s", "% gemm") if suite == "linear" else ("GB/s", "% copy")
    return ["case", "provider", "median", rate] + ([of] if share else []) + ["extra MiB", "x eager"]


def table(results, repeats, warmup):
    """The console's table, no line wider than WIDTH: per suite and mode a heading and the rows
    that ran or failed (a skipped row is left to the JSON and to ``left_out``), each time as its
    median ± half the 20th-80th percentile spread of ``repeats`` calls (after ``warmup``), the rate under the work
    model (with its share of the measured ceiling, on CUDA), the memory beyond the inputs and the
    speed-up against eager."""
    shown = [r for r in results if not r["status"].startswith("skipped")]
    if not shown:
        return "no row ran: the JSON has each row's reason"
    share = any(r["frac_copy_bw"] or r["frac_gemm"] for r in shown)
    sections = {}
    for r in shown:
        sections.setdefault((r["suite"], r["mode"]), []).append(_cells(r, share))
    widths = _widths([_header(s, share) for s, _ in sections] + [c for rows in sections.values() for c in rows])
    lines = [f"times: median of {repeats} timed call{'s' * (repeats != 1)} after {warmup} warm-up calls, "
             "± half the spread from the 20th to the 80th percentile"]
    for (suite, mode), rows in sections.items():
        lines += ["", f"{suite}: {MODE_LABELS[mode]}"]
        lines += [_row(c, widths) for c in [_header(suite, share), ["-" * w for w in widths]] + rows]
    return "\n".join(_clip(line) for line in lines)


def _widths(rows):
    """Each column's width over the rows that fill it: a status row fills only case and provider."""
    n = max(len(row) for row in rows)
    return [max(len(row[i]) for row in rows if len(row) == n or i < 2) for i in range(n)]


def _row(cells, widths):
    """Case and provider to the left, figures to the right; a status runs on to the line's end."""
    if len(cells) == 3:
        head = "  ".join(c.ljust(w) for c, w in zip(cells[:2], widths))
        return f"{head}  {cells[2]}"
    return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def _clip(line):
    return line if len(line) <= WIDTH else line[:WIDTH - 3] + "..."


def left_out(reasons):
    """The closing note: each provider that could not run (``{name: reason}``, the reason from
    ``Provider.unavailable``) once, a missing package named with what installs it; "" for none."""
    if not reasons:
        return ""
    said = "; ".join(f"{name}: {_install_hint(reason)}" for name, reason in reasons.items())
    return "\n".join(textwrap.wrap(f"left out (their rows are in the JSON as skipped): {said}", WIDTH,
                                    subsequent_indent="  ", break_on_hyphens=False))


def _install_hint(reason):
    """A reason as the closing note says it: "trl not importable" as "not installed (pip install
    '.[trl]')", a module missing inside an installed package and any other reason as they are."""
    found = re.fullmatch(r"(\S+) not importable", reason)
    if not found:
        return reason
    module = found.group(1)
    top = module.split(".")[0]
    said = "not installed" if module == top else reason
    return f"{said} ({INSTALL[top]})" if top in INSTALL else said


class Progress:
    """The run's progress on ``stream`` (stderr): on a terminal one line, rewritten in place
    (carriage return) before each row; elsewhere (a log, a pipe) a line for the first row and
    then one each time another tenth of the rows is done, so ten or so in all."""

    def __init__(self, total, stream=None):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._next_tenth = 0
        self._shown = 0

    def step(self, label):
        """Row ``label`` is about to be measured."""
        tenth = 10 * self.done // self.total
        self.done += 1
        line = _clip(f"[{self.done}/{self.total}] {clock(self.elapsed())} {label}")
        if self.tty:  # one column short of the terminal's width, so that the cursor never wraps
            line = line[:min(WIDTH, shutil.get_terminal_size().columns) - 1]
            self.stream.write("\r" + line.ljust(self._shown))
            self._shown = len(line)
        elif tenth >= self._next_tenth:
            self.stream.write(line + "\n")
            self._next_tenth = tenth + 1
        self.stream.flush()

    def elapsed(self):
        return time.monotonic() - self.started

    def close(self):
        """Clears the terminal's line, so that what follows starts on a clean one."""
        if self.tty and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()


def clock(seconds):
    """'47 s', '5 min 47 s'."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


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
