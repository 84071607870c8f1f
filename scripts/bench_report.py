#!/usr/bin/env python3
"""Turns the benchmark JSON of scripts/bench into one Markdown table and a log-log plot.

Reads every *.json in --json-dir: Google Benchmark output of the bench_* binaries (medians of
repetitions) and torch_peers.py's output in the same schema. Each entry is classified by its
binary and name:
  loss     the binary, bench_<loss>[_caffe] (torch_<loss> for the PyTorch peer)
  role     floor  (name has "floor" or "products": the kernel of the same shapes in the binary)
           caffe  (name has "caffe": the Caffe CPU algorithm on OpenBLAS)
           torch  (torch_peers.py; a peer:<form> argument names another way of writing the same
                   loss in PyTorch. `vs PyTorch` is to the fastest pytorch-metric-learning-style
                   form that ran (index tensors from masks: no peer argument, or peer:pairs), and
                   names a hand-written dense form (sorted, rowcol) where that one is faster;
                   reference-set forms too big to run are listed with the memory they need)
           metricloss otherwise; its path (simd or scalar) and type come from the template
  variant  the named arguments other than N, D and grad (form, distance, mining, soft)
  op       fwd (grad:0 or a *_forward benchmark) or fwd+bwd
A metricloss row is divided by the floor of its loss, type, N and D (fwd+bwd only), and each
peer of the same loss, op, type, variant, N and D is divided by it. Times are CPU time: the
machines this runs on are shared, and wall time mixes in the neighbours.

Exits 1 when an expected JSON (--expect) is missing or empty or a benchmark reported an error,
so scripts/bench --quick fails when a benchmark fails to run; never on timing.
"""
import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
from collections import defaultdict

LOSS_ORDER = ["contrastive", "triplet", "batch_triplet", "lifted_structure", "batch_contrastive",
              "multi_similarity", "reference", "sharded", "sharded_mpi"]
LOSS_TITLE = {"contrastive": "ContrastiveLoss", "triplet": "TripletLoss",
              "batch_triplet": "BatchTripletLoss", "lifted_structure": "LiftedStructureLoss",
              "batch_contrastive": "BatchContrastiveLoss", "multi_similarity": "MultiSimilarityLoss",
              "reference": "Reference sets (Q = 256 queries against N rows of R)",
              "sharded": "Sharded over W thread ranks (÷ floor: slowest rank / one process)",
              "sharded_mpi": "Sharded over W MPI processes (÷ floor: slowest rank / one process, "
                             "wall; W = 4 oversubscribes 2 cores)"}
# Binaries that hold several losses: the loss of a row by its benchmark family, and the floor
# (the binary's one products benchmark) filed under each of them.
MULTI_LOSS_BINARIES = {
    "bench_batch_pair_losses": {"BM_batch_contrastive": "batch_contrastive",
                                "BM_batch_contrastive_density": "batch_contrastive",
                                "BM_multi_similarity": "multi_similarity"},
}
# Throughput shown per loss: streaming losses by bytes, product-based losses by FLOPs.
STREAMING = {"contrastive", "triplet"}
ENUMS = {
    "form": ["hadsell", "legacy"],
    "distance": ["euclidean", "squared"],
    "mining": ["all", "hard", "semihard"],
}
IGNORED_ARGS = {"threads", "min_time", "repeats", "iterations", "real_time", "manual_time",
                "process_time", "min_warmup_time"}
UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
# Counters kept: throughput; bench_reference's retained heap; torch_peers.py's peak memory of
# one forward + backward and its estimate.
COUNTERS = ("bytes_per_second", "flops", "bytes", "scratch_bytes", "peak_bytes", "estimated_bytes",
            "rank_over_single")
# torch_peers.py's forms that are not pytorch-metric-learning's way (index tensors from label
# masks): what a careful user writes by hand in O(N_q N_r) memory. Shown, not the goal's peer.
DENSE_PEER_FORMS = {"sorted", "rowcol"}

# The ratio goals of issues 2, 3 and 4, for float simd forward_backward rows.
#   (loss, predicate on the row, kind, bound, text)
GOALS = [
    ("contrastive", lambda r: True, "floor", 1.5, "≤ 1.5× floor"),
    ("triplet", lambda r: True, "floor", 1.5, "≤ 1.5× floor"),
    ("batch_triplet", lambda r: r["N"] == 1024, "floor", 3.0, "≤ 3× products"),
    ("lifted_structure", lambda r: r["N"] == 1024 and r["D"] == 128, "floor", 2.0, "≤ 2× products"),
    ("lifted_structure", lambda r: r["N"] == 1024 and r["D"] == 128, "caffe", 50.0, "≥ 50× Caffe"),
    # Issue 15: lifted (no mining) and hard/semihard within 2x of Q R^T and W R, all within 3x.
    ("reference", lambda r: r["variant"].get("mining", 1) != 0, "floor", 2.0, "≤ 2× products"),
    ("reference", lambda r: r["variant"].get("mining") == 0, "floor", 3.0, "≤ 3× products"),
    # Issue 15: every reference-set row at least 5x faster than its PyTorch peer
    # (pytorch-metric-learning's way: index tensors from masks; torch_peers.py).
    ("reference", lambda r: True, "torch", 5.0, "≥ 5× PyTorch"),
    # Issue 17: batch contrastive and multi-similarity (default options, normalize off and on)
    # within 2x of X X^T and (N x N) X, and at least 5x faster than PML's formulas in PyTorch.
    # (Not the density rows, BM_batch_contrastive_density: they fit a tuning number.)
    ("batch_contrastive", lambda r: "negatives%" not in r["variant"], "floor", 2.0, "≤ 2× products"),
    ("multi_similarity", lambda r: True, "floor", 2.0, "≤ 2× products"),
    ("batch_contrastive", lambda r: "negatives%" not in r["variant"], "torch", 5.0, "≥ 5× PyTorch"),
    ("multi_similarity", lambda r: True, "torch", 5.0, "≥ 5× PyTorch"),
    # Issue 16: a rank of W = 2 within 1.3/W of the single-process call (bench_sharded: its
    # "÷ floor" is the slowest rank's CPU time over the single-process call's, same X).
    ("sharded", lambda r: r["N"] == 4096 and r["variant"].get("W") == 2
     and r["variant"].get("loss") in ("hard", "all", "lifted"), "floor", 0.65, "≤ 1.3/W of one process"),
    ("sharded_mpi", lambda r: r["N"] == 4096 and r["variant"].get("W") == 2
     and r["variant"].get("loss") in ("hard", "all", "lifted"), "floor", 0.65, "≤ 1.3/W of one process"),
]
# What the plot draws per loss: the metricloss variant shown (the one the PyTorch peer computes).
PLOT_VARIANT = {"contrastive": {"form": 0}, "triplet": {"distance": 1},
                "batch_triplet": {"mining": 1, "soft": 0}, "lifted_structure": {},
                "batch_contrastive": {"normalize": 0}, "multi_similarity": {"normalize": 0},
                "reference": {"mining": 1}}
PLOT_D = 128


def split_name(name):
    """'BM_x<float, ml::simd_tag>/N:256/D:128/form:0' -> ('BM_x', ['float', 'ml::simd_tag'],
    ['N:256', 'D:128', 'form:0'])."""
    depth, cut = 0, len(name)
    for i, c in enumerate(name):
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "/" and depth == 0:
            cut = i
            break
    head, tail = name[:cut], name[cut + 1:]
    match = re.match(r"([^<]*)(?:<(.*)>)?$", head)
    family = match.group(1)
    template = [t.strip() for t in match.group(2).split(",")] if match.group(2) else []
    return family, template, [t for t in tail.split("/") if t] if tail else []


def classify(binary, name):
    family, template, tokens = split_name(name)
    args, positional = {}, []
    for token in tokens:
        if ":" in token:
            key, value = token.split(":", 1)
            if key in IGNORED_ARGS:
                continue
            try:
                args[key] = int(value)
            except ValueError:
                args[key] = value
        elif re.fullmatch(r"-?\d+", token):
            positional.append(int(token))
    for key, value in zip(["N", "D"], positional):
        args.setdefault(key, value)
    lower = family.lower()
    if binary == "torch_peers":
        role = "torch"
        loss = family[len("torch_"):]
    else:
        loss = re.sub(r"_caffe$", "", binary[len("bench_"):] if binary.startswith("bench_") else binary)
        # bench_sharded_mpi runs once per W (bench_sharded_mpi_w2.json): one loss for all.
        loss = re.sub(r"^sharded_mpi_w\d+$", "sharded_mpi", loss)
        if "caffe" in lower:
            role = "caffe"
        elif "floor" in lower or "products" in lower:
            role = "floor"
        else:
            role = "metricloss"
    dtype = "double" if "double" in template else "float"
    path = "scalar" if any("scalar" in t for t in template) else "simd"
    forward_only = lower.endswith("_forward") or args.get("grad", 1) == 0
    variant = {k: v for k, v in args.items() if k not in ("N", "D", "grad", "peer")}
    return {"loss": loss, "role": role, "dtype": dtype, "path": path,
            "op": "fwd" if forward_only else "fwd+bwd", "N": args.get("N"), "D": args.get("D"),
            "variant": variant, "family": family, "name": name, "peer": str(args.get("peer", ""))}


def variant_text(variant):
    parts = []
    for key in ("form", "distance", "mining"):
        if key in variant:
            names = ENUMS[key]
            value = variant[key]
            parts.append(names[value] if isinstance(value, int) and 0 <= value < len(names) else f"{key} {value}")
    if variant.get("soft"):
        parts.append("soft margin")
    if variant.get("normalize"):
        parts.append("normalize")
    for key, value in sorted(variant.items()):
        if key not in ENUMS and key not in ("soft", "normalize"):
            parts.append(f"{key} {value}")
    return ", ".join(parts) or "—"


def load(json_dir):
    """Entries with median times (seconds) and counters, and the errors reported."""
    entries, errors, contexts = [], [], {}
    for path in sorted(glob.glob(os.path.join(json_dir, "*.json"))):
        binary = os.path.splitext(os.path.basename(path))[0]
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as error:
            errors.append(f"{path}: unreadable JSON ({error})")
            continue
        contexts[binary] = data.get("context", {})
        runs = defaultdict(list)
        medians = {}
        for b in data.get("benchmarks", []):
            run_name = b.get("run_name", b["name"])
            if b.get("error_occurred"):
                errors.append(f"{binary}: {run_name}: {b.get('error_message', 'error')}")
                continue
            scale = UNIT_SECONDS[b.get("time_unit", "ns")]
            record = {"cpu": b["cpu_time"] * scale, "real": b["real_time"] * scale,
                      "counters": {k: b[k] for k in COUNTERS if k in b}}
            if b.get("run_type") == "aggregate":
                if b.get("aggregate_name") == "median":
                    medians[run_name] = record
            else:
                runs[run_name].append(record)
        for run_name in list(medians) + [r for r in runs if r not in medians]:
            if run_name in medians:
                record = medians[run_name]
            else:  # one repetition: no aggregates, take the median of what there is
                group = runs[run_name]
                record = {"cpu": statistics.median(r["cpu"] for r in group),
                          "real": statistics.median(r["real"] for r in group),
                          "counters": group[len(group) // 2]["counters"]}
            entry = classify(binary, run_name)
            if "rank_over_single" in record["counters"]:
                # bench_sharded(_mpi): the manual time is the slowest rank's (CPU time for
                # threads, wall time for processes).
                record = dict(record, cpu=record["real"])
            entry.update(record, binary=binary)
            entries.extend(file_under_losses(entry))
        # Peer cases not run because they would not fit in memory (torch_peers.py): no time.
        for skipped in data.get("infeasible", []):
            entry = classify(binary, skipped["name"])
            entry.update(cpu=None, real=None, binary=binary, infeasible=skipped.get("message", "not run"),
                         counters={"estimated_bytes": skipped.get("estimated_bytes")})
            entries.append(entry)
        if not data.get("benchmarks"):
            errors.append(f"{path}: no benchmarks in the JSON")
    return entries, errors, contexts


def file_under_losses(entry):
    """The entry as it enters the table: in a binary of several losses (MULTI_LOSS_BINARIES),
    a loss's row under that loss, and the floor once under each loss of the binary."""
    families = MULTI_LOSS_BINARIES.get(entry["binary"])
    if not families:
        return [entry]
    if entry["role"] == "floor":
        return [dict(entry, loss=loss) for loss in families.values()]
    return [dict(entry, loss=families.get(entry["family"], entry["loss"]))]


def key(entry, with_variant=True):
    variant = tuple(sorted(entry["variant"].items())) if with_variant else ()
    return (entry["loss"], entry["op"], entry["dtype"], entry["N"], entry["D"], variant)


def format_time(seconds):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def format_ratio(value):
    if value is None:
        return "—"
    return f"{value:.2f}×" if value < 10 else f"{value:.0f}×" if value >= 100 else f"{value:.1f}×"


def throughput(entry):
    counters = entry["counters"]
    if entry["loss"] in STREAMING and "bytes_per_second" in counters:
        return f"{counters['bytes_per_second'] / 1e9:.1f} GB/s"
    if "flops" in counters:
        return f"{counters['flops'] / 1e9:.1f} GFLOP/s"
    if "bytes_per_second" in counters:
        return f"{counters['bytes_per_second'] / 1e9:.1f} GB/s"
    return "—"


def build_rows(entries):
    floors, peers = {}, defaultdict(list)
    for e in entries:
        if e["role"] == "floor":
            floors[(e["loss"], e["dtype"], e["N"], e["D"])] = e
        elif e["role"] in ("caffe", "torch"):
            peers[(e["role"],) + key(e)].append(e)
    rows = []
    for e in entries:
        if e["role"] != "metricloss":
            continue
        floor = floors.get((e["loss"], e["dtype"], e["N"], e["D"])) if e["op"] == "fwd+bwd" else None
        row = dict(e)
        row["floor"] = floor
        row["floor_ratio"] = e["cpu"] / floor["cpu"] if floor else None
        if "rank_over_single" in e["counters"]:
            row["floor_ratio"] = e["counters"]["rank_over_single"]
        for role in ("caffe", "torch"):
            # Every form of the peer; the ratio is to the fastest index-tensor form that ran, and
            # the fastest dense form is kept beside it.
            forms = peers.get((role,) + key(e), [])
            timed = [p for p in forms if p.get("cpu") and p["peer"] not in DENSE_PEER_FORMS]
            dense = [p for p in forms if p.get("cpu") and p["peer"] in DENSE_PEER_FORMS]
            peer = min(timed, key=lambda p: p["cpu"]) if timed else None
            row[role] = peer
            row[role + "_forms"] = forms
            row[role + "_speedup"] = peer["cpu"] / e["cpu"] if peer else None
            row[role + "_dense"] = min(dense, key=lambda p: p["cpu"]) if dense else None
            row[role + "_not_run"] = [p for p in forms if p.get("infeasible")
                                      and p["peer"] not in DENSE_PEER_FORMS]
        row["goals"] = []
        if e["dtype"] == "float" and e["path"] == "simd" and e["op"] == "fwd+bwd":
            for loss, applies, kind, bound, text in GOALS:
                if loss != e["loss"] or not applies(e):
                    continue
                value = row["floor_ratio"] if kind == "floor" else row[kind + "_speedup"]
                met = None if value is None else (value <= bound if kind == "floor" else value >= bound)
                row["goals"].append((text, value, met))
        rows.append(row)

    def order(r):
        variant = tuple(sorted((k, str(v)) for k, v in r["variant"].items()))
        return (LOSS_ORDER.index(r["loss"]) if r["loss"] in LOSS_ORDER else len(LOSS_ORDER), r["loss"],
                r["op"] != "fwd+bwd", r["dtype"] != "float", r["path"] != "simd", variant,
                r["N"] or 0, r["D"] or 0)
    rows.sort(key=order)
    unpaired = [e["name"] for e in entries if e["role"] in ("caffe", "torch")
                and not any(any(p is e for p in r.get(e["role"] + "_forms", [])) for r in rows)]
    return rows, unpaired


def goal_text(goals):
    out = []
    for text, value, met in goals:
        mark = "?" if met is None else "✓" if met else "✗"
        out.append(f"{text} {mark}")
    return "; ".join(out)


def markdown(rows, header_lines):
    lines = list(header_lines)
    lines.append("| loss | variant | op | type | path | N | D | CPU time | throughput "
                 "| ÷ floor | vs Caffe | vs PyTorch | goal |")
    lines.append("|---|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|")
    for r in rows:
        lines.append("| " + " | ".join([
            LOSS_TITLE.get(r["loss"], r["loss"]), variant_text(r["variant"]), r["op"], r["dtype"],
            r["path"], str(r["N"]), str(r["D"]), format_time(r["cpu"]), throughput(r),
            format_ratio(r["floor_ratio"]), format_ratio(r["caffe_speedup"]),
            torch_cell(r), goal_text(r["goals"]) or ""]) + " |")
    return lines


def torch_cell(r):
    """`vs PyTorch`: the index-tensor form's ratio (its peer name if not the first form), 'not
    run' where it needs too much memory, and a faster dense form's ratio beside it."""
    if r["torch"]:
        text = format_ratio(r["torch_speedup"]) + (f" ({r['torch']['peer']})" if r["torch"]["peer"] else "")
    elif r.get("torch_not_run"):
        text = "not run (memory)"
    else:
        text = "—"
    dense = r.get("torch_dense")
    if dense and (not r["torch"] or dense["cpu"] < r["torch"]["cpu"]):
        text += f"; {format_ratio(dense['cpu'] / r['cpu'])} ({dense['peer']})"
    return text


def format_bytes(value):
    if value is None:
        return "—"
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def reference_memory(rows):
    """Per reference-set row: our retained heap (scratch_bytes) beside every PyTorch form's time
    ratio and peak memory (peak_bytes), or the memory a form would need when it was not run."""
    lines = []
    for r in rows:
        if r["loss"] != "reference" or not r.get("torch_forms"):
            continue
        forms = []
        for p in sorted(r["torch_forms"], key=lambda p: p["peer"]):
            name = p["peer"] or "PML"
            if p.get("infeasible"):
                forms.append(f"{name} not run (needs ~{format_bytes(p['counters'].get('estimated_bytes'))})")
            else:
                peak = p["counters"].get("peak_bytes")
                forms.append(f"{name} {format_ratio(p['cpu'] / r['cpu'])}"
                             + (f", peak {format_bytes(peak)}" if peak is not None else ""))
        variant = variant_text({k: v for k, v in r["variant"].items() if k != "Q"})
        label = "lifted" if variant == "—" else variant
        lines.append(f"- {label}, N = {r['N']}: ours {format_time(r['cpu'])}, scratch "
                     f"{format_bytes(r['counters'].get('scratch_bytes'))}; PyTorch: " + "; ".join(forms))
    if lines:
        lines.insert(0, "Reference sets against PyTorch (time ratio PyTorch/ours per form, peak memory "
                        "of one forward + backward over its inputs):")
    return lines


def goal_summary(rows):
    lines, met, total = [], 0, 0
    for r in rows:
        for text, value, ok in r["goals"]:
            total += 1
            met += bool(ok)
            mark = "not measured" if ok is None else "met" if ok else "MISSED"
            if ok is None and "PyTorch" in text and r.get("torch_not_run"):
                needs = max(p["counters"].get("estimated_bytes") or 0 for p in r["torch_not_run"])
                mark = f"not measured: the PyTorch peer was not run (needs ~{format_bytes(needs)})"
            variant = variant_text(r["variant"])
            variant = "" if variant == "—" else f" {variant}"
            lines.append(f"- {LOSS_TITLE.get(r['loss'], r['loss'])}{variant}, "
                         f"N = {r['N']}, D = {r['D']}: {format_ratio(value)} (goal {text}): {mark}")
    return [f"Ratio goals of issues 2–4, 15, 16 and 17 (float, simd, forward_backward): {met} of {total} met."] + lines


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = fields.get("Model name", "?").strip()
        family, number = fields.get("CPU family", "").strip(), fields.get("Model", "").strip()
        if family and number:
            model += f" (family {family}, model {number})"
        flags = fields.get("Flags", "").split()
        isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sse4_2", "SSE4.2"))
                    if flag in flags), None)
        cpus = fields.get("CPU(s)", "?").strip()
        return f"{model}, {cpus} CPUs" + (f", {isa}" if isa else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"


def shrink_png(path):
    """A 64-colour palette: the plot has a handful of colours, and the PNG is committed to docs/."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)


def plot(entries, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        print(f"bench_report: no plot, matplotlib is missing ({error})", file=sys.stderr)
        return []
    losses = [l for l in LOSS_ORDER if any(e["loss"] == l for e in entries)]
    if not losses:
        return []
    columns = 2 if len(losses) > 1 else 1
    rows = (len(losses) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    styles = {"metricloss": ("metricloss (simd)", "o-", "C0"), "floor": ("floor, same binary", "s--", "C7"),
              "caffe": ("Caffe CPU on OpenBLAS", "^-", "C3"), "torch": ("PyTorch CPU, autograd", "v-", "C1")}
    for axis, loss in zip(axes.flat, losses):
        wanted = PLOT_VARIANT.get(loss, {})
        for role, (label, style, color) in styles.items():
            points = sorted(
                (e["N"], e["cpu"]) for e in entries
                if e["loss"] == loss and e["role"] == role and e["dtype"] == "float" and e.get("cpu")
                and not e.get("peer")
                and e["op"] == "fwd+bwd" and e["D"] == PLOT_D and e["path"] == "simd"
                and (role == "floor" or all(e["variant"].get(k) == v for k, v in wanted.items())))
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], style, color=color,
                          label=label, markersize=5)
        shown = variant_text({k: v for k, v in wanted.items()})
        axis.set_title(f"{LOSS_TITLE.get(loss, loss)} ({shown}, D = {PLOT_D})" if shown != "—"
                       else f"{LOSS_TITLE.get(loss, loss)} (D = {PLOT_D})", fontsize=10)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("N (rows in the batch)")
        axis.set_ylabel("CPU time per forward+backward (s)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(losses):]:
        axis.set_visible(False)
    figure.tight_layout()
    written = []
    for ext in ("png", "svg"):
        path = os.path.join(out_dir, f"plot.{ext}")
        figure.savefig(path, dpi=90 if ext == "png" else None)
        if ext == "png":
            shrink_png(path)
        written.append(path)
    plt.close(figure)
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-dir", required=True)
    parser.add_argument("--out", required=True, help="folder for table.md and plot.png/svg")
    parser.add_argument("--command", default="scripts/bench", help="the command, for the header")
    parser.add_argument("--expect", default="", help="comma-separated JSON names that must exist")
    parser.add_argument("--date", default=None)
    args = parser.parse_args()

    entries, errors, contexts = load(args.json_dir)
    for name in filter(None, args.expect.split(",")):
        if not os.path.isfile(os.path.join(args.json_dir, name + ".json")):
            errors.append(f"{name}.json is missing: the benchmark did not run")
    rows, unpaired = build_rows(entries)

    date = args.date or next((c.get("date") for c in contexts.values() if c.get("date")), "?")
    load_factor = [e["real"] / e["cpu"] for e in entries if e.get("cpu") and e["binary"] != "torch_peers"]
    torch_note = ("PyTorch " + contexts["torch_peers"].get("torch_version", "?") + ", 1 thread"
                  + (", " + contexts["torch_peers"]["malloc"]
                     if contexts["torch_peers"].get("malloc", "glibc defaults") != "glibc defaults" else "")
                  if "torch_peers" in contexts else "PyTorch peers not run (python3-torch absent)")
    header = [
        f"Command: `{args.command}`  ",
        f"Date: {date}  ",
        f"CPU: {cpu_model()}; single thread; {torch_note}; Caffe peers on OpenBLAS, 1 thread.  ",
        "Times are medians over repetitions of CPU time per call; `÷ floor` is our time over the "
        "floor's (same binary: a streaming kernel moving the same bytes, or the Eigen products "
        "X·Xᵀ and (N×N)·X), lower is better; `vs Caffe`/`vs PyTorch` are the peer's time over "
        "ours, higher is better."
        + (f" Median wall/CPU time {statistics.median(load_factor):.2f}: a loaded machine "
           "inflates wall time; CPU time is what is compared." if load_factor else ""),
        "",
    ]
    lines = markdown(rows, header)
    lines += [""] + goal_summary(rows)
    memory = reference_memory(rows)
    if memory:
        lines += [""] + memory
    if unpaired:
        lines += ["", "Peer entries with no metricloss row: " + ", ".join(unpaired)]
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    print(text)
    for path in plot(entries, args.out):
        print(f"wrote {path}")
    print(f"wrote {os.path.join(args.out, 'table.md')}")
    if errors:
        print("bench_report: FAILED:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
