"""python -m bench.check_report STEP: the parts of bench/gpu_check.sh that need no torch (each
call would otherwise pay torch's import): record a shell step's exit status, parse ncu's CSV,
print the summary table. The result file is the one ``bench.gpu_check`` writes."""

import argparse
import csv
import json
import os
import re

RESULT = "gpu_check.json"
HEADLINE = (8192, 151936)          # rows, V: the acceptance case, bf16


def _path(out):
    return os.path.join(out, RESULT)


def load(out):
    try:
        with open(_path(out)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"steps": {}}


def merge(out, step, result):
    """Write ``result`` as ``step``'s entry (replacing an earlier one), keeping every other."""
    os.makedirs(out, exist_ok=True)
    run = load(out)
    run["steps"].setdefault(step, {}).update(result)
    tmp = _path(out) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(run, f, indent=1, default=str)
    os.replace(tmp, _path(out))
    return run



def parse_ncu_csv(text):
    """ncu --csv --metrics ... output → per kernel launch {kernel, metric: value} (bytes, ns)."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    launches = {}
    for row in csv.DictReader(lines):
        key = row.get("ID")
        if key is None or "Metric Name" not in row:
            continue
        entry = launches.setdefault(key, {"kernel": row.get("Kernel Name", "")})
        value = float(row["Metric Value"].replace(",", "")) if row["Metric Value"] else None
        unit = row.get("Metric Unit", "")
        scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9,
                 "nsecond": 1, "usecond": 1e3, "msecond": 1e6, "ns": 1, "us": 1e3, "ms": 1e6}.get(unit, 1)
        entry[row["Metric Name"]] = None if value is None else value * scale
    return list(launches.values())


def step_ncu_parse(args):
    """DRAM bytes of each kernel at the headline case against the bytes model: the forward reads
    the logits once, the backward reads them and writes the gradient."""
    with open(args.file, errors="replace") as f:
        launches = parse_ncu_csv(f.read())
    if not launches:
        raise ValueError(f"no kernel launches in {args.file}")
    logits_bytes = HEADLINE[0] * HEADLINE[1] * 2
    for entry in launches:
        model = 2 * logits_bytes if "bwd" in entry["kernel"] else logits_bytes
        moved = (entry.get("dram__bytes_read.sum") or 0) + (entry.get("dram__bytes_write.sum") or 0)
        entry.update(model_bytes=model, moved_over_model=moved / model if model else None)
    return {"launches": launches}


def _refusal(lines, pattern):
    """The first line of a failed step's log tail that says the tool itself refused to run."""
    if not pattern:
        return None
    return next((line.strip() for line in lines if re.search(pattern, line)), None)


def step_record(args):
    """A shell step's exit status and time, and the tail of its log. A Python step that caught
    its own error, or skipped itself, exits 0: its recorded "error" or "skipped: why" stands."""
    tail = []
    if args.file and os.path.exists(args.file):
        with open(args.file, errors="replace") as f:
            lines = f.read().splitlines()
        mark = f"== {args.name}"   # steps that share a log (the sanitizers): this step's own lines
        start = max((i + 1 for i, line in enumerate(lines) if line == mark), default=0)
        tail = lines[start:][-12:]
    status = "ok" if args.rc == 0 else ("timed out" if args.rc in (124, 137) else f"exit {args.rc}")
    refusal = _refusal(tail, args.refused) if args.rc not in (0, 124, 137) else None
    if refusal:
        status = f"skipped: the tool refused ({refusal[:120]})"
    if args.skipped:   # not a tool's refusal: a step that never ran is a failure to read
        status = "not run: no time left"
    if args.skipped_because:
        status = f"skipped: {args.skipped_because}"
    recorded = load(args.out)["steps"].get(args.name, {}).get("status", "")
    if args.rc == 0 and (recorded == "error" or recorded.startswith("skipped")):
        status = recorded
    result = {"status": status, "seconds": args.seconds, "exit_code": args.rc}
    if tail:
        result["log_tail"] = tail
    return result


def summary_table(run):
    """One line per step: its status and its headline figure."""
    lines = [f"{'step':<10} {'status':<12} result", "-" * 72]
    for step, entry in run["steps"].items():
        lines.append(f"{step:<10} {entry.get('status', '?'):<12} {_headline(step, entry)}")
    return "\n".join(lines)


def _headline(step, e):
    try:
        if step == "sweeps" and e.get("rows"):
            first, last = e["rows"][0], e["rows"][-1]
            pred = e.get("predicted", {}).get("rows_to_fill")
            split = "" if "fwd_unsplit_gbps" not in first else (
                f"; N {first['N']} at {first['row_splits']} splits against 1: fwd {first['fwd_gbps']:.0f} / "
                f"{first['fwd_unsplit_gbps']:.0f}, bwd {first['bwd_gbps']:.0f} / {first['bwd_unsplit_gbps']:.0f} GB/s")
            return (f"fwd {first['fwd_gbps']:.0f}->{last['fwd_gbps']:.0f} GB/s, bwd {first['bwd_gbps']:.0f}->"
                    f"{last['bwd_gbps']:.0f} GB/s for N {first['N']}->{last['N']}; predicted fill {pred} rows{split}")
        if step == "headline" and e.get("rows"):
            first = e["rows"][0]["case"]
            at = {r["provider"]: r for r in e["rows"] if r["case"] == first}
            fused = at.get("fused", {})
            if fused.get("status") != "ok":
                return f"{first}: fused {fused.get('status', 'not run')}"
            copy = f" ({100 * fused['frac_copy_bw']:.0f}% copy)" if fused.get("frac_copy_bw") else ""
            others = ", ".join(f"{p} {r['median_ms'] / fused['median_ms']:.2f}x" if r["status"] == "ok"
                               else f"{p} {r['status'][:30]}" for p, r in at.items() if p != "fused")
            return f"{first}: fused {fused['median_ms']:.2f} ms, {fused['gbps']:.0f} GB/s{copy}; time of {others}"
        if step == "grid" and e.get("grid"):
            ok = [g for g in e["grid"] if "fwd_gbps" in g]
            best = max(ok, key=lambda g: g["fwd_gbps"] + g["bwd_gbps"]) if ok else None
            return "no configuration ran" if best is None else (
                f"best BLOCK_V {best['block_v']} x {best['num_warps']} warps: fwd {best['fwd_gbps']:.0f}, "
                f"bwd {best['bwd_gbps']:.0f} GB/s (default {e['default']})")
        if step == "align" and e.get("pairs"):
            return "; ".join(f"V {p['unaligned']['V']}/{p['aligned']['V']}: fwd x{p['fwd_ratio']:.2f}, "
                             f"bwd x{p['bwd_ratio']:.2f}" for p in e["pairs"])
        if step == "inplace" and "bitwise_equal" in e:
            return (f"bitwise equal over {e['repeats']} repeats: {e['bitwise_equal']} {e['grad_mismatches']}; "
                    f"fused linear rows in any batch: {e.get('linear_batch_invariant', '-')}")
        if step == "compile":
            return "; ".join(f"{k}: {v.get('sync_debug_error_mode', v.get('error', '?'))}, graph "
                             f"{v.get('cuda_graph', '-')}, no logits copy {v.get('no_logits_copy', '-')}, "
                             f"eager syncs {v.get('eager_syncs_per_call', '-')}"
                             for k, v in e.items() if isinstance(v, dict))
        if step == "ncu" and e.get("launches"):
            return "; ".join(f"{x['kernel'][:24]}: {x['moved_over_model']:.2f} of model"
                             for x in e["launches"] if x.get("moved_over_model") is not None)
        if step == "verl-mem" and e.get("cases"):
            return "peak extra per micro-batch, logits tensors measured/predicted: " + ", ".join(
                f"{k} {v['extra_over_logits']:.2f}/{v['predicted_buffers']}" if "extra_over_logits" in v
                else f"{k} error" for k, v in e["cases"].items())
        if step == "smoke" and "rescale" in e:
            return (f"addmm fp32-out taken {e['addmm_fp32_out']['taken']} (rel err "
                    f"{e['addmm_fp32_out']['max_rel_err']:.1e}), nonzero_static {e['nonzero_static']['equal']}, "
                    f"rescale {all(e['rescale'].values())}")
        if step == "env" and "device" in e:
            return f"{e['device']}, torch {e['torch']}, triton {e['triton']}, one sweep: {e['one_sweep']}"
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        return f"(unreadable: {err!r})"
    tail = e.get("log_tail") or []
    return tail[-1][:60] if tail else ""


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.check_report", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("record", "ncu-parse", "summary"))
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--name", help="record: the step's name")
    parser.add_argument("--rc", type=int, default=0)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--skipped", action="store_true", help="record: the step did not start")
    parser.add_argument("--skipped-because", help="record: the step did not start, for this reason")
    parser.add_argument("--refused", help="record: a regex of log lines that mean the tool refused to run")
    parser.add_argument("--file", help="record: the step's log; ncu-parse: ncu's CSV")
    args = parser.parse_args(argv)
    if args.step == "summary":
        table = summary_table(load(args.out))
        with open(os.path.join(args.out, "summary.txt"), "w") as f:
            f.write(table + "\n")
        print(table)
    elif args.step == "record":
        merge(args.out, args.name, step_record(args))
    else:
        earlier = load(args.out)["steps"].get("ncu", {}).get("status")
        try:
            result = {**step_ncu_parse(args), "status": "ok"}
        except (OSError, ValueError) as e:
            result = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        if earlier not in (None, "ok"):   # what ncu itself ended with stands
            result["status"] = earlier
        merge(args.out, "ncu", result)
        print(f"ncu: {result['status']}")


if __name__ == "__main__":
    main()
