#!/usr/bin/env python3
"""PyTorch peers of the metricloss benchmarks: what a user would write instead.

Single-threaded CPU PyTorch, forward + backward by autograd of the same formulas as API.md,
at the sizes of the C++ benchmarks, float32, with the same data distributions (uniform in
[-1, 1], P x K labels with 8 samples per class). Each case is timed as Google Benchmark does:
repetitions of a batch of iterations long enough to measure, reporting the median per-iteration
wall and CPU time. The output is Google Benchmark's JSON schema (median aggregates only), so
scripts/bench_report.py reads it like the C++ binaries' output.

Names pair with the C++ benchmarks' by loss and arguments: torch_<loss>/N:<n>/D:<d>/<arg>:<v>
with form 0 = hadsell, 1 = legacy; distance 1 = squared (FaceNet); mining 1 = hard. Exits 0
with a message (and writes no JSON) when `import torch` fails.

Usage: torch_peers.py --out FILE [--quick] [--repetitions R] [--min-time SECONDS]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

PER_CLASS = 8


def pk_labels(torch, n, per_class, generator):
    labels = torch.arange(n) // per_class
    return labels[torch.randperm(n, generator=generator)]


def uniform(torch, n, d, generator):
    return (torch.rand(n, d, generator=generator, dtype=torch.float32) * 2 - 1).requires_grad_(True)


# The losses, each a function of tensors that returns the scalar loss (autograd does the rest).

def contrastive(torch, a, b, similar, margin, legacy):
    """Caffe's ContrastiveLossLayer: 1/(2N) sum[s d^2 + (1 - s) h], h by form."""
    dist_sq = ((a - b) ** 2).sum(dim=1)
    if legacy:
        dissimilar = torch.clamp(margin - dist_sq, min=0)
    else:
        dissimilar = torch.clamp(margin - torch.sqrt(dist_sq), min=0) ** 2
    per_pair = torch.where(similar, dist_sq, dissimilar)
    return per_pair.sum() / (2 * a.shape[0])


def triplet_facenet(torch, anchor, positive, negative, margin):
    """FaceNet: mean of max(||a - p||^2 - ||a - n||^2 + margin, 0)."""
    d_ap = ((anchor - positive) ** 2).sum(dim=1)
    d_an = ((anchor - negative) ** 2).sum(dim=1)
    return torch.clamp(d_ap - d_an + margin, min=0).mean()


def batch_hard(torch, x, labels, margin):
    """Batch-hard triplet loss (Hermans et al.), Euclidean, the usual vectorised PyTorch form."""
    dist = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(x.shape[0], dtype=torch.bool)
    hardest_positive = (dist * (same & ~eye)).max(dim=1).values
    hardest_negative = dist.masked_fill(same, float("inf")).min(dim=1).values
    return torch.clamp(hardest_positive - hardest_negative + margin, min=0).mean()


def lifted(torch, x, labels, margin):
    """Lifted structured loss as the Caffe layer computes it (Song et al. 2016), vectorised:
    J_ij = log(sum_{k neg i} e^(m - D_ik) + sum_{l neg j} e^(m - D_jl)) + D_ij over positive
    pairs i < j; L = sum max(J, 0)^2 / (2 |P|)."""
    dist = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    negatives = (~same).to(x.dtype)
    row_sums = (torch.exp(margin - dist) * negatives).sum(dim=1)
    j = torch.log(row_sums[:, None] + row_sums[None, :]) + dist
    positive_pairs = torch.triu(same, diagonal=1)
    hinge = torch.clamp(j[positive_pairs], min=0)
    return (hinge ** 2).sum() / (2 * positive_pairs.sum())


def cases(torch, quick):
    """(name, inputs factory, loss closure) at the C++ benchmarks' sizes (the smallest, quick)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for n in (256,) if quick else (256, 65536):
        d = 128
        margin = (d ** 0.5) * 0.8  # contrastive.cpp's margin
        for form in (0, 1):
            def make(n=n, d=d):
                a, b = uniform(torch, n, d, generator), uniform(torch, n, d, generator)
                similar = (pk_labels(torch, n, 2, generator) % 2) != 0
                return (a, b), (similar,)
            out.append((f"torch_contrastive/N:{n}/D:{d}/form:{form}", make,
                        lambda t, s, m=margin, legacy=form == 1: contrastive(torch, *t, *s, m, legacy)))
        def make_triplet(n=n, d=d):
            return tuple(uniform(torch, n, d, generator) for _ in range(3)), ()
        out.append((f"torch_triplet/N:{n}/D:{d}/distance:1", make_triplet,
                    lambda t, s: triplet_facenet(torch, *t, 0.2)))
    def make_batch(n, d):  # one P x K batch: embeddings and labels
        return (uniform(torch, n, d, generator),), (pk_labels(torch, n, PER_CLASS, generator),)
    for n in (256,) if quick else (256, 1024, 4096):
        out.append((f"torch_batch_triplet/N:{n}/D:128/mining:1/soft:0", lambda n=n: make_batch(n, 128),
                    lambda t, s: batch_hard(torch, *t, *s, 0.2)))
        for d in (128, 512):
            out.append((f"torch_lifted_structure/N:{n}/D:{d}/grad:1", lambda n=n, d=d: make_batch(n, d),
                        lambda t, s: lifted(torch, *t, *s, 1.0)))
    return out


def time_case(make, loss_of, repetitions, min_time):
    tensors, constants = make()

    def step():
        for t in tensors:
            t.grad = None
        loss = loss_of(tensors, constants)
        loss.backward()
        return loss

    loss = step()  # warm-up; also a sanity check that the formula is finite
    if not all(bool(t.grad.isfinite().all()) for t in tensors) or not bool(loss.isfinite()):
        raise RuntimeError("non-finite loss or gradient")
    # Grow the batch of iterations until it lasts min_time, as Google Benchmark does.
    iterations = 1
    while True:
        start = time.perf_counter()
        for _ in range(iterations):
            step()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or iterations >= 1 << 20:
            break
        iterations = max(iterations * 2, int(iterations * min_time * 1.4 / max(elapsed, 1e-9)))
    real, cpu = [], []
    for _ in range(repetitions):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(iterations):
            step()
        real.append((time.perf_counter() - wall0) / iterations)
        cpu.append((time.process_time() - cpu0) / iterations)
    return statistics.median(real), statistics.median(cpu), iterations


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="smoke test: smallest sizes, one short repetition")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per repetition")
    parser.add_argument("--filter", default="", help="run only names containing this string")
    args = parser.parse_args()
    try:
        import torch
    except ImportError as error:
        print(f"torch_peers: PyTorch peers skipped: `import torch` failed ({error}); "
              "scripts/bench --with-peers installs Debian's python3-torch", file=sys.stderr)
        return 0
    torch.set_num_threads(1)
    repetitions = 1 if args.quick else args.repetitions
    min_time = 0.01 if args.quick else args.min_time
    benchmarks = []
    for name, make, loss_of in cases(torch, args.quick):
        if args.filter not in name:
            continue
        real, cpu, iterations = time_case(make, loss_of, repetitions, min_time)
        print(f"{name:48s} {real * 1e6:12.1f} us {cpu * 1e6:12.1f} us cpu  x{iterations}", flush=True)
        benchmarks.append({
            "name": f"{name}_median", "run_name": name, "run_type": "aggregate",
            "aggregate_name": "median", "repetitions": repetitions, "iterations": iterations,
            "real_time": real * 1e9, "cpu_time": cpu * 1e9, "time_unit": "ns",
        })
    context = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host_name": platform.node(),
        "executable": "torch_peers.py", "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(), "python": platform.python_version(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"context": context, "benchmarks": benchmarks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
