#!/usr/bin/env python3
"""The before/after table of scripts/bench-compare (issue 14).

Reads --json-dir/<side>-<run>-<binary>.json, side before or after: Google Benchmark output with
every repetition (run_type "iteration"). For each row (benchmark name) and side, the median of
the CPU time per call over all repetitions of all runs (CPU time, as scripts/bench_report.py:
the machines this runs on are shared, and wall time mixes in the neighbours); after/before;
the range of the per-run ratios (run r's after median over run r's before median), which shows
how much of a ratio is noise; and a flag on every row more than --limit (5 %) slower.

Prints the Markdown table and the summary line "N rows, worst ratio X (row), K rows over 1.05"
and writes both to --out. Exits 0 whatever the timings; 1 only when a run's JSON is missing or
unreadable, a benchmark reported an error, or no row was measured on both sides.
"""
import argparse
import datetime
import glob
import json
import os
import re
import statistics
import sys
from collections import defaultdict

LOSS_TITLE = {"batch_triplet": "BatchTripletLoss", "lifted_structure": "LiftedStructureLoss"}
MINING = ["all", "hard", "semihard"]
UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
IGNORED_ARGS = {"threads", "min_time", "repeats", "iterations", "real_time", "manual_time",
                "process_time", "min_warmup_time"}
FILE_NAME = re.compile(r"(before|after)-(\d+)-(.+)\.json$")


def split_name(name):
    """'BM_x<float, ml::simd_tag>/N:256/D:128/mining:0' -> ('BM_x', ['float', 'ml::simd_tag'],
    {'N': 256, 'D': 128, 'mining': 0})."""
    depth, cut = 0, len(name)
    for i, c in enumerate(name):
        depth += (c == "<") - (c == ">")
        if c == "/" and depth == 0:
            cut = i
            break
    match = re.match(r"([^<]*)(?:<(.*)>)?$", name[:cut])
    template = [t.strip() for t in match.group(2).split(",")] if match.group(2) else []
    args, positional = {}, []
    for token in filter(None, name[cut + 1:].split("/")):
        if ":" in token:
            key, value = token.split(":", 1)
            if key not in IGNORED_ARGS:
                args[key] = int(value) if re.fullmatch(r"-?\d+", value) else value
        elif re.fullmatch(r"-?\d+", token):
            positional.append(int(token))
    for key, value in zip(["N", "D"], positional):
        args.setdefault(key, value)
    return match.group(1), template, args


def describe(binary, name):
    """The row's columns and its sort key."""
    family, template, args = split_name(name)
    loss = binary[len("bench_"):] if binary.startswith("bench_") else binary
    dtype = "double" if "double" in template else "float"
    path = "scalar" if any("scalar" in t for t in template) else "simd"
    op = "fwd" if args.get("grad", 1) == 0 or family.lower().endswith("_forward") else "fwd+bwd"
    variant = []
    if "mining" in args:
        mining = args["mining"]
        variant.append(MINING[mining] if isinstance(mining, int) and 0 <= mining < 3 else str(mining))
    if args.get("soft"):
        variant.append("soft margin")
    variant += [f"{k}:{v}" for k, v in args.items() if k not in ("N", "D", "grad", "mining", "soft")]
    columns = {"loss": LOSS_TITLE.get(loss, loss), "variant": ", ".join(variant) or "—", "op": op,
               "type": dtype, "path": path, "N": args.get("N"), "D": args.get("D")}
    key = (loss, family, dtype != "float", path != "simd", op != "fwd+bwd",
           args.get("mining", -1), args.get("soft", -1), str(columns["variant"]),
           args.get("D") or 0, args.get("N") or 0, name)
    return columns, key


def format_time(seconds):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def load(json_dir, binaries, runs):
    """{(binary, name): {side: {run: [cpu seconds per repetition]}}}, and the problems found."""
    times = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    problems = []
    found = set()
    for path in sorted(glob.glob(os.path.join(json_dir, "*.json"))):
        match = FILE_NAME.search(os.path.basename(path))
        if not match:
            continue
        side, run, binary = match.group(1), int(match.group(2)), match.group(3)
        found.add((side, run, binary))
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as error:
            problems.append(f"{path}: {error}")
            continue
        for b in data.get("benchmarks", []):
            name = b.get("run_name", b["name"])
            if b.get("error_occurred"):
                problems.append(f"{path}: {name}: {b.get('error_message', 'error')}")
                continue
            if b.get("run_type", "iteration") != "iteration":
                continue
            scale = UNIT_SECONDS[b.get("time_unit", "ns")]
            times[(binary, name)][side][run].append(b["cpu_time"] * scale)
    for binary in binaries:
        for run in range(1, runs + 1):
            for side in ("before", "after"):
                if (side, run, binary) not in found:
                    problems.append(f"missing: {side}-{run}-{binary}.json")
    return times, problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json-dir", required=True)
    parser.add_argument("--out", required=True, help="the Markdown file to write")
    parser.add_argument("--before", default="before", help="the before side's label")
    parser.add_argument("--after", default="after", help="the after side's label")
    parser.add_argument("--command", default="scripts/bench-compare")
    parser.add_argument("--settings", default="", help="runs, repetitions and min time, in words")
    parser.add_argument("--expect-runs", type=int, default=0)
    parser.add_argument("--binaries", default="", help="comma-separated binaries expected per run")
    parser.add_argument("--limit", type=float, default=1.05, help="flag rows slower than this")
    args = parser.parse_args()

    binaries = [b for b in args.binaries.split(",") if b]
    times, problems = load(args.json_dir, binaries, args.expect_runs)

    rows, one_sided = [], []
    for (binary, name), sides in times.items():
        columns, key = describe(binary, name)
        before = [t for run in sides.get("before", {}).values() for t in run]
        after = [t for run in sides.get("after", {}).values() for t in run]
        if not before or not after:
            one_sided.append((key, columns, name, "before" if before else "after",
                              statistics.median(before or after)))
            continue
        b, a = statistics.median(before), statistics.median(after)
        per_run = [statistics.median(sides["after"][r]) / statistics.median(sides["before"][r])
                   for r in sorted(set(sides["before"]) & set(sides["after"]))]
        rows.append((key, columns, name, b, a, a / b, per_run, len(before), len(after)))
    rows.sort(key=lambda r: r[0])
    one_sided.sort(key=lambda r: r[0])

    def row_text(c):
        return f"{c['loss']} {c['variant']} {c['op']} {c['type']} {c['path']} N={c['N']} D={c['D']}"

    lines = [
        f"Before: {args.before}  ",
        f"After: {args.after}  ",
        f"`{args.command}`, {datetime.date.today().isoformat()}: {args.settings}. "
        "Median CPU time per call over all repetitions of all runs of a side; "
        "per run: the range of run r's after/before medians.",
        "",
        "| loss | variant | op | type | path | N | D | before | after | after/before | per run | |",
        "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for _, c, name, b, a, ratio, per_run, _, _ in rows:
        spread = (f"{min(per_run):.3f}–{max(per_run):.3f}" if len(per_run) > 1
                  else f"{per_run[0]:.3f}" if per_run else "—")
        flag = f"**> {args.limit:.2f}**" if ratio > args.limit else ""
        lines.append(f"| {c['loss']} | {c['variant']} | {c['op']} | {c['type']} | {c['path']} | "
                     f"{c['N']} | {c['D']} | {format_time(b)} | {format_time(a)} | "
                     f"{ratio:.3f} | {spread} | {flag} |")
    for _, c, name, side, t in one_sided:
        before, after = (format_time(t), "—") if side == "before" else ("—", format_time(t))
        lines.append(f"| {c['loss']} | {c['variant']} | {c['op']} | {c['type']} | {c['path']} | "
                     f"{c['N']} | {c['D']} | {before} | {after} | — | — | {side} only |")

    over = [r for r in rows if r[5] > args.limit]
    if rows:
        worst = max(rows, key=lambda r: r[5])
        summary = (f"{len(rows)} rows, worst ratio {worst[5]:.3f} ({row_text(worst[1])}), "
                   f"{len(over)} rows over {args.limit:.2f}")
    else:
        summary = f"0 rows, worst ratio — (none), 0 rows over {args.limit:.2f}"
    if one_sided:
        summary += f"; {len(one_sided)} rows on one side only"
    lines += ["", summary]
    if over:
        lines += [f"- over {args.limit:.2f}: {row_text(r[1])}: {r[5]:.3f}" for r in over]
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text, end="")

    for problem in problems:
        print(f"bench_compare: {problem}", file=sys.stderr)
    if not rows:
        print("bench_compare: no row was measured on both sides", file=sys.stderr)
    return 1 if problems or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
