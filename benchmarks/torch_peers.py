#!/usr/bin/env python3
"""PyTorch peers of the metricloss benchmarks: what a user would write instead.

Single-threaded CPU PyTorch, forward + backward by autograd of the same formulas as API.md,
at the sizes of the C++ benchmarks, float32, with the same data distributions (uniform in
[-1, 1], P x K labels with 8 samples per class). Each case is timed as Google Benchmark does:
repetitions of a batch of iterations long enough to measure, reporting the median per-iteration
wall and CPU time. The output is Google Benchmark's JSON schema (median aggregates only), so
scripts/bench_report.py reads it like the C++ binaries' output.

Names pair with the C++ benchmarks' by loss and arguments: torch_<loss>/N:<n>/D:<d>/<arg>:<v>
with form 0 = hadsell, 1 = legacy; distance 1 = squared (FaceNet); mining 0 = all, 1 = hard,
2 = semihard. Exits 0 with a message (and writes no JSON) when `import torch` fails.

Issue 17 (bench_batch_pair_losses): torch_batch_contrastive and torch_multi_similarity
/N:<n>/D:128/normalize:<0|1>, pytorch-metric-learning's formulas with its masks and reducers
(ContrastiveLoss; MultiSimilarityMiner then MultiSimilarityLoss) from tests/reference/pml_losses.py.

Reference sets (bench_reference, issue 15): torch_reference/N:<N_r>/D:128/Q:256[/mining:<m>]
[/peer:<form>], Q (256 x 128) with gradient against R (N_r x 128, detached: a memory takes no
gradient), written as pytorch-metric-learning computes losses with ref_emb: one Q x R distance
matrix (torch.cdist, as its LpDistance), pairs and triplets as index tensors from label masks
(torch.where), the loss gathered at those indices. Other forms of the same loss are timed
beside it: peer:pairs (index tensors of the positive pairs, each against every row of R: the
form a PML user turns to when the triplet mask does not fit, and PML-style semihard), and the
dense forms a careful user writes in O(N_q N_r) memory, peer:sorted (each query's negatives
sorted once, torch.searchsorted) and peer:rowcol (lifted's row and column sums). A case whose
estimated memory exceeds --max-gib (batch-all's N_q x N_r x N_r triplet mask, lifted's
|P| x |N| pair mask, the |P| x N_r forms at N_r = 65536) is not run: the JSON's "infeasible"
list gives the bytes it would need. Reference entries carry the counters estimated_bytes and,
at the N_r of --peak-n, peak_bytes: the process's peak resident memory over one forward +
backward beyond its inputs (VmHWM after a reset through /proc/self/clear_refs, less VmRSS
before it, in a fresh process per case after one warm-up call). --check compares the forms with
each other and with the metricloss binding in double.

Usage: torch_peers.py --out FILE [--quick] [--repetitions R] [--min-time SECONDS] [--filter S]
                      [--max-gib G] [--peak-n N ...] [--check]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict

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


# Issue 17's batch losses as pytorch-metric-learning computes them: tests/reference/pml_losses.py
# holds PML's steps (its masks, index tensors, reducers, miner), checked there against the
# library. The contrastive loss is taken from it as it is; the multi-similarity loss and miner
# are its functions with the normalisation as a parameter (PML's CosineSimilarity normalises;
# normalize:0 is PML with DotProductSimilarity, the library's normalize = false).

def pml_reference():
    """tests/reference/pml_losses.py as a module."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "tests", "reference"))
    try:
        import pml_losses
    finally:
        sys.path.pop(0)
    return pml_losses


def batch_contrastive_pml(pml, x, labels, normalize):
    """PML's ContrastiveLoss() (pos_margin 0, neg_margin 1, LpDistance, AvgNonZeroReducer)."""
    return pml.pml_contrastive_loss(x, labels, pos_margin=0.0, neg_margin=1.0, normalize=normalize)


def multi_similarity_pml(torch, pml, x, labels, normalize, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    """PML's MultiSimilarityMiner(epsilon) then MultiSimilarityLoss(alpha, beta, base) on its
    indices, as a PML training loop calls them (pml_losses.py's pml_multi_similarity_miner and
    pml_multi_similarity_loss, the similarity normalised or not)."""
    with torch.no_grad():  # the miner
        mat = pml._distance(x, None, normalize, inverted=True)
        a1, p, a2, n = pml._get_all_pairs_indices(labels, labels)
        mat_neg_sorting = mat
        mat_pos_sorting = mat.clone()
        mat_pos_sorting[a2, n] = torch.finfo(mat.dtype).max
        mat_neg_sorting[a1, p] = torch.finfo(mat.dtype).min
        mat_pos_sorting.fill_diagonal_(torch.finfo(mat.dtype).max)
        mat_neg_sorting.fill_diagonal_(torch.finfo(mat.dtype).min)
        pos_sorted, pos_sorted_idx = torch.sort(mat_pos_sorting, dim=1)
        neg_sorted, neg_sorted_idx = torch.sort(mat_neg_sorting, dim=1)
        hard_pos_idx = torch.where(pos_sorted - epsilon < neg_sorted[:, -1].unsqueeze(1))
        hard_neg_idx = torch.where(neg_sorted + epsilon > pos_sorted[:, 0].unsqueeze(1))
        a1, p = hard_pos_idx[0], pos_sorted_idx[hard_pos_idx[0], hard_pos_idx[1]]
        a2, n = hard_neg_idx[0], neg_sorted_idx[hard_neg_idx[0], hard_neg_idx[1]]
    mat = pml._distance(x, None, normalize, inverted=True)  # the loss computes its own
    pos_mask, neg_mask = torch.zeros_like(mat), torch.zeros_like(mat)
    pos_mask[a1, p] = 1
    neg_mask[a2, n] = 1
    pos_loss = (1.0 / alpha) * pml.pml_logsumexp(alpha * (base - mat), keep_mask=pos_mask.bool(), add_one=True)
    neg_loss = (1.0 / beta) * pml.pml_logsumexp(beta * (mat - base), keep_mask=neg_mask.bool(), add_one=True)
    return torch.mean(pos_loss + neg_loss)


# Reference sets (bench_reference, issue 15): Q = 256 queries (8 per class) with gradient against
# R of N_r rows (labels uniform over 1024 classes), detached, D = 128, float. Each loss below is
# the metricloss formula (API.md, "Reference sets": anchors from Q, candidates from R), written the
# way pytorch-metric-learning (PML) computes a loss with ref_emb: one Q x R distance matrix
# (LpDistance: torch.cdist), the pairs or triplets as index tensors from label masks
# (get_all_pairs_indices / get_all_triplets_indices with ref_labels: torch.where), mining under
# torch.no_grad, the loss gathered from the matrix at those indices. One difference in the
# peers' favour: the matrix is computed once (PML's miner and loss each compute it).

REF_QUERIES = 256
REF_CLASSES = 1024
REF_SIZES = (1024, 8192, 65536)


def ref_pairs_indices(torch, labels, ref_labels):
    """PML's get_all_pairs_indices(labels, ref_labels): positive and negative pairs from the
    N_q x N_r masks (no diagonal is removed: R is another set)."""
    matches = (labels[:, None] == ref_labels[None, :]).byte()
    diffs = matches ^ 1
    a1, p = torch.where(matches)
    a2, n = torch.where(diffs)
    return a1, p, a2, n


def ref_hard(torch, q, r, yq, yr, margin):
    """Batch-hard: BatchHardMiner's get_max_per_row / get_min_per_row over masks filled from
    the pair indices, then l_a = max(d_ap* - d_an* + m, 0) averaged over the anchors with both
    a positive and a negative (metricloss's mean; PML's default reducer would drop zeros)."""
    mat = torch.cdist(q, r)
    with torch.no_grad():
        dist = mat.detach()
        a1, p, a2, n = ref_pairs_indices(torch, yq, yr)
        pos_mask = torch.zeros_like(dist)
        pos_mask[a1, p] = 1
        hardest_p = (dist * pos_mask).max(dim=1).indices
        has_p = torch.any(pos_mask != 0, dim=1)
        neg_mask = torch.full_like(dist, float("inf"))
        neg_mask[a2, n] = 1
        masked = dist * neg_mask
        masked[torch.isnan(masked) | torch.isinf(masked)] = float("inf")
        hardest_n = masked.min(dim=1).indices
        has_n = torch.any(neg_mask != float("inf"), dim=1)
        anchors = torch.where(has_p & has_n)[0]
    return torch.relu(mat[anchors, hardest_p[anchors]] - mat[anchors, hardest_n[anchors]] + margin).mean()


def ref_semihard_pairs(torch, q, r, yq, yr, margin):
    """Semihard (FaceNet, as TF Addons) from the positive-pair index tensors: every pair (a, p)
    against every row of R (|P| x N_r), n* = the nearest negative farther than p, else the
    farthest negative; mean of max(d_ap - d_an* + m, 0) over the pairs."""
    mat = torch.cdist(q, r)
    with torch.no_grad():
        dist = mat.detach()
        a, p, _, _ = ref_pairs_indices(torch, yq, yr)
        negative = (yq[:, None] != yr[None, :])[a]
        d_an = dist[a]
        farther = negative & (d_an > dist[a, p][:, None])
        semihard = torch.where(farther, d_an, float("inf")).argmin(dim=1)
        hardest = torch.where(negative, d_an, float("-inf")).argmax(dim=1)
        n = torch.where(farther.any(dim=1), semihard, hardest)
        keep = torch.where(negative.any(dim=1))[0]
        del negative, d_an, farther
    a, p, n = a[keep], p[keep], n[keep]
    return torch.relu(mat[a, p] - mat[a, n] + margin).mean()


def ref_sorted_negatives(torch, dist, yq, yr):
    """Each query's negatives sorted by distance (non-negatives last, as +inf), their rows of R
    and counts, and the positive pairs with, per query, the pair's rank among its positives."""
    same = yq[:, None] == yr[None, :]
    sorted_neg, order = dist.masked_fill(same, float("inf")).sort(dim=1)
    neg_count = (~same).sum(dim=1)
    a, p = torch.where(same)
    rank = same.cumsum(dim=1)[a, p] - 1
    width = int(rank.max()) + 1 if len(a) else 1
    return sorted_neg, order, neg_count, a, p, rank, width


def ref_semihard_sorted(torch, q, r, yq, yr, margin):
    """Semihard as a careful user writes it when |P| x N_r does not fit: each query's negatives
    sorted once (N_q x N_r), n* found by torch.searchsorted of d_ap (strictly farther)."""
    mat = torch.cdist(q, r)
    with torch.no_grad():
        dist = mat.detach()
        sorted_neg, order, neg_count, a, p, rank, width = ref_sorted_negatives(torch, dist, yq, yr)
        values = torch.full((dist.shape[0], width), float("inf"), dtype=dist.dtype)
        values[a, rank] = dist[a, p]
        first_farther = torch.searchsorted(sorted_neg, values, right=True)[a, rank]
        last = neg_count[a] - 1
        n = order[a, torch.where(first_farther <= last, first_farther, last).clamp(min=0)]
        keep = torch.where(neg_count[a] > 0)[0]
    a, p, n = a[keep], p[keep], n[keep]
    return torch.relu(mat[a, p] - mat[a, n] + margin).mean()


def ref_all_pml(torch, q, r, yq, yr, margin):
    """Batch-all as PML: get_all_triplets_indices(labels, ref_labels), an N_q x N_r x N_r mask
    through torch.where, then AvgNonZeroReducer: sum of max(d_ap - d_an + m, 0) over the number
    of positive terms (metricloss's Z)."""
    mat = torch.cdist(q, r)
    with torch.no_grad():
        matches = (yq[:, None] == yr[None, :]).byte()
        diffs = matches ^ 1
        triplets = matches.unsqueeze(2) * diffs.unsqueeze(1)
        a, p, n = torch.where(triplets)
        del triplets
    losses = torch.relu(mat[a, p] - mat[a, n] + margin)
    return losses.sum() / (losses > 0).sum().clamp(min=1)


def ref_all_pairs(torch, q, r, yq, yr, margin):
    """Batch-all from the positive-pair index tensors against every row of R (|P| x N_r, dense
    under autograd): the form a user turns to when the triplet mask does not fit."""
    mat = torch.cdist(q, r)
    with torch.no_grad():
        a, p, _, _ = ref_pairs_indices(torch, yq, yr)
        negative = (yq[:, None] != yr[None, :])[a]
    losses = torch.relu((mat[a, p][:, None] - mat[a] + margin).masked_fill(~negative, 0))
    return losses.sum() / (losses > 0).sum().clamp(min=1)


def ref_all_sorted(torch, q, r, yq, yr, margin):
    """Batch-all in O(N_q N_r) memory: per pair, the c negatives with d_an < d_ap + m are a
    prefix of the query's sorted negatives, so the pair adds c (d_ap + m) - (sum of that
    prefix), from a cumulative sum of the sorted distances (with gradient); Z = sum of c."""
    mat = torch.cdist(q, r)
    with torch.no_grad():
        dist = mat.detach()
        sorted_neg, order, neg_count, a, p, rank, width = ref_sorted_negatives(torch, dist, yq, yr)
        values = torch.full((dist.shape[0], width), float("inf"), dtype=dist.dtype)
        values[a, rank] = dist[a, p] + margin
        count = torch.searchsorted(sorted_neg, values, right=False)[a, rank]
        del sorted_neg, values
    prefix = torch.nn.functional.pad(mat.gather(1, order).cumsum(dim=1), (1, 0))
    hinge_sums = count * (mat[a, p] + margin) - prefix[a, count]
    return hinge_sums.sum() / count.sum().clamp(min=1)


def ref_lifted_pml(torch, q, r, yq, yr, margin):
    """Lifted structure as PML's LiftedStructureLoss computes it from the pair index tensors
    (an |P| x |N| mask of the negatives attached to each positive pair, then a masked
    logsumexp), with metricloss's second sum: the negatives of the pair's candidate j are the
    negative pairs in column j of the same Q x R matrix (n == j). PML compares a2 == p there,
    a query index with a reference index (scale-out.md A1), which makes its loss depend on the
    order of R. L = mean over ordered positive pairs of max(J, 0)^2 / 2."""
    mat = torch.cdist(q, r)
    with torch.no_grad():
        a1, p, a2, n = ref_pairs_indices(torch, yq, yr)
        keep = (a2[None, :] == a1[:, None]) | (n[None, :] == p[:, None])
    neg_pairs = (margin - mat[a2, n])[None, :].masked_fill(~keep, float("-inf"))
    neg_loss = torch.logsumexp(neg_pairs, dim=1)
    return (torch.relu(neg_loss + mat[a1, p]) ** 2 / 2).mean()


def ref_lifted_rowcol(torch, q, r, yq, yr, margin):
    """Lifted structure in O(N_q N_r) memory: the masked exp(m - D) of the Q x R matrix summed
    along rows (the anchor's negatives in R) and columns (the candidate's negatives in Q)."""
    mat = torch.cdist(q, r)
    same = yq[:, None] == yr[None, :]
    e = torch.exp(margin - mat).masked_fill(same, 0)
    rows, cols = e.sum(dim=1), e.sum(dim=0)
    a, p = torch.where(same)
    j = torch.log(rows[a] + cols[p]) + mat[a, p]
    return (torch.relu(j) ** 2).sum() / (2 * len(a))


# (mining or None for lifted, peer form or "" for the PML form, function, margin)
REF_FORMS = [
    (1, "", ref_hard, 0.2),
    (2, "pairs", ref_semihard_pairs, 0.2),
    (2, "sorted", ref_semihard_sorted, 0.2),
    (0, "", ref_all_pml, 0.2),
    (0, "pairs", ref_all_pairs, 0.2),
    (0, "sorted", ref_all_sorted, 0.2),
    (None, "", ref_lifted_pml, 1.0),
    (None, "rowcol", ref_lifted_rowcol, 1.0),
]


def ref_estimate(function, q, r, yq, yr):
    """Peak bytes a form's forward + backward needs beyond its inputs, from the shapes and the
    label counts (the dominant tensors; calibrated against peak_bytes measured at N_r = 1024
    and 8192). Decides which cases are run (--max-gib)."""
    nq, nr = q.shape[0], r.shape[0]
    same = yq[:, None] == yr[None, :]
    pos_per_query = same.sum(dim=1).to(float)
    pairs, negatives = float(pos_per_query.sum()), float(nq * nr - pos_per_query.sum())
    triplets = float((pos_per_query * (nr - pos_per_query)).sum())
    dense = nq * nr
    if function is ref_all_pml:  # the uint8 triplet mask, then indices and gathered losses
        return nq * nr * nr + triplets * 64 + dense * 16
    if function is ref_lifted_pml:  # |P| x |N|: two bool compares, their or, float masked, exp
        return pairs * negatives * 17 + negatives * 40 + dense * 16
    if function in (ref_semihard_pairs, ref_all_pairs):  # |P| x N_r gathers and masks
        return pairs * nr * (18 if function is ref_all_pairs else 14) + dense * 16
    return dense * 40 + negatives * 16  # N_q x N_r matrices: distances, masks, sort, indices


def ref_make(torch, n, d=128, seed=None):
    generator = torch.Generator().manual_seed(1000 + n if seed is None else seed)
    q = uniform(torch, REF_QUERIES, d, generator)
    r = uniform(torch, n, d, generator).detach()
    yq = pk_labels(torch, REF_QUERIES, PER_CLASS, generator)
    yr = torch.randint(0, REF_CLASSES, (n,), generator=generator)
    return (q,), (r, yq, yr)


def ref_name(n, mining, form, d=128):
    name = f"torch_reference/N:{n}/D:{d}/Q:{REF_QUERIES}"
    if mining is not None:
        name += f"/mining:{mining}"
    return name + (f"/peer:{form}" if form else "")


def reference_cases(torch, quick):
    """(name, inputs factory, loss closure, function) per N_r and form; --quick leaves out
    N_r = 65536 as scripts/bench --quick does for the C++ rows."""
    out = []
    for n in REF_SIZES[:2] if quick else REF_SIZES:
        for mining, form, function, margin in REF_FORMS:
            out.append((ref_name(n, mining, form), lambda n=n: ref_make(torch, n),
                        lambda t, s, f=function, m=margin: f(torch, *t, *s, m), function))
    return out


def measure_peak(name):
    """In this (fresh) process: one warm-up forward + backward of the reference case, then the
    peak resident memory of a second one over the resident memory before it, in bytes."""
    import torch
    torch.set_num_threads(1)
    for case_name, make, loss_of, _ in reference_cases(torch, False):
        if case_name == name:
            break
    else:
        raise SystemExit(f"torch_peers: no reference case {name}")
    tensors, constants = make()

    def status(field):
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith(field + ":"))) * 1024

    def step():
        for t in tensors:
            t.grad = None
        loss_of(tensors, constants).backward()
    step()
    for t in tensors:
        t.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    before = status("VmRSS")
    step()
    print(json.dumps({"name": name, "peak_bytes": status("VmHWM") - before}))


def peak_of(name):
    """peak_bytes of a reference case from a fresh interpreter (glibc's mmap threshold fixed at
    64 KiB, so that every tensor's pages go back to the kernel when freed and no earlier case's
    heap hides a peak); None when it could not be measured."""
    import subprocess
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure-peak", name],
                              env=env, capture_output=True, text=True, timeout=900)
        return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError, OSError) as error:
        print(f"torch_peers: peak memory of {name} not measured ({error})", file=sys.stderr)
        return None


def check_reference(torch):
    """Every form of a loss against the others (double, small sets: N_q = 24 against 40 and 300
    rows, 6 classes so that rows have several positives), and against the metricloss binding
    when it imports. Exits 1 on a mismatch."""
    try:
        import metricloss
    except ImportError:
        metricloss = None
    worst = 0.0
    for nq, nr in ((24, 40), (24, 300)):
        generator = torch.Generator().manual_seed(nr)
        q0 = torch.rand(nq, 5, generator=generator, dtype=torch.float64) * 2 - 1
        r = torch.rand(nr, 5, generator=generator, dtype=torch.float64) * 2 - 1
        yq, yr = torch.arange(nq) % 6, torch.randint(0, 8, (nr,), generator=generator)
        results = defaultdict(list)
        for mining, form, function, margin in REF_FORMS:
            q = q0.clone().requires_grad_(True)
            value = function(torch, q, r, yq, yr, margin)
            value.backward()
            results[mining].append((form or "pml", value.detach(), q.grad))
        if metricloss is not None:
            for mining in (0, 1, 2, None):
                q = q0.clone().requires_grad_(True)
                loss = (metricloss.LiftedStructureLoss(margin=1.0) if mining is None else
                        metricloss.BatchTripletLoss(margin=0.2, mining=["all", "hard", "semihard"][mining]))
                value = loss(q, yq, ref=r, ref_labels=yr)
                value.backward()
                results[mining].append(("metricloss", value.detach(), q.grad))
        for mining, rows in results.items():
            _, value0, grad0 = rows[0]
            for form, value, grad in rows[1:]:
                error = max(abs(float(value - value0)) / max(abs(float(value0)), 1e-300),
                            float((grad - grad0).abs().max() / grad0.abs().max().clamp(min=1e-300)))
                worst = max(worst, error)
                print(f"check N_r = {nr}, mining {mining}: {rows[0][0]} {float(value0):.12f}, "
                      f"{form} {float(value):.12f}, relative error {error:.1e}")
    print(f"check: worst relative error {worst:.1e}" + ("" if metricloss else " (metricloss binding absent)"))
    return 0 if worst < 1e-10 else 1


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
    # Issue 17 (bench_batch_pair_losses): --quick at N = 1024, the size of its quick C++ rows.
    pml = pml_reference()
    for n in (1024,) if quick else (256, 1024, 4096):
        for normalize in (0, 1):
            out.append((f"torch_batch_contrastive/N:{n}/D:128/normalize:{normalize}",
                        lambda n=n: make_batch(n, 128),
                        lambda t, s, z=normalize == 1: batch_contrastive_pml(pml, *t, *s, z)))
            out.append((f"torch_multi_similarity/N:{n}/D:128/normalize:{normalize}",
                        lambda n=n: make_batch(n, 128),
                        lambda t, s, z=normalize == 1: multi_similarity_pml(torch, pml, *t, *s, z)))
    return out


def time_case(make, loss_of, repetitions, min_time):
    tensors, constants = make()

    def step():
        for t in tensors:
            t.grad = None
        loss = loss_of(tensors, constants)
        loss.backward()
        return loss

    start = time.perf_counter()
    loss = step()  # warm-up; also a sanity check that the formula is finite
    warm_up = time.perf_counter() - start
    if not all(bool(t.grad.isfinite().all()) for t in tensors) or not bool(loss.isfinite()):
        raise RuntimeError("non-finite loss or gradient")
    # Grow the batch of iterations until it lasts min_time, as Google Benchmark does (one
    # iteration, without trying it, when the warm-up call alone lasted min_time).
    iterations = 1
    while warm_up < min_time:
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


def keep_freed_memory():
    """glibc's malloc from here on: every block from the heap (M_MMAP_MAX = 0) and the heap
    never trimmed (M_TRIM_THRESHOLD at its largest), so a freed tensor's pages are reused by
    the next one instead of being returned to the kernel and faulted in again (zeroed) on the
    next call. What a caching allocator (jemalloc, tcmalloc) gives PyTorch on CPU."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2 ** 31 - 1)):
        raise SystemExit("torch_peers: mallopt failed (--keep-freed-memory needs glibc)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file to write (required unless --check)")
    parser.add_argument("--quick", action="store_true", help="smoke test: smallest sizes, one short repetition")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per repetition")
    parser.add_argument("--filter", default="", help="run only names containing this string")
    parser.add_argument("--max-gib", type=float, default=8.0,
                        help="reference cases estimated to need more memory are not run (GiB)")
    parser.add_argument("--peak-n", type=int, nargs="*", default=[65536],
                        help="N_r of the reference cases whose peak memory is measured")
    parser.add_argument("--check", action="store_true",
                        help="only compare the reference forms with each other (and metricloss)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory for reuse (no mmap, no trim): PyTorch without "
                             "the page faults of fresh allocations (large tensors at N_r = 65536)")
    parser.add_argument("--measure-peak", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_peak:
        measure_peak(args.measure_peak)
        return 0
    if not args.out and not args.check:
        parser.error("--out is required")
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")  # the BLAS under torch.cdist too (scripts/bench sets them)
    try:
        import torch
    except ImportError as error:
        print(f"torch_peers: PyTorch peers skipped: `import torch` failed ({error}); "
              "scripts/bench --with-peers installs Debian's python3-torch", file=sys.stderr)
        return 0
    torch.set_num_threads(1)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.check:
        return check_reference(torch)
    repetitions = 1 if args.quick else args.repetitions
    min_time = 0.01 if args.quick else args.min_time
    benchmarks, infeasible = [], []

    def record(name, real, cpu, iterations, **counters):
        print(f"{name:48s} {real * 1e6:12.1f} us {cpu * 1e6:12.1f} us cpu  x{iterations}", flush=True)
        benchmarks.append(dict({
            "name": f"{name}_median", "run_name": name, "run_type": "aggregate",
            "aggregate_name": "median", "repetitions": repetitions, "iterations": iterations,
            "real_time": real * 1e9, "cpu_time": cpu * 1e9, "time_unit": "ns",
        }, **counters))

    for name, make, loss_of in cases(torch, args.quick):
        if args.filter not in name:
            continue
        record(name, *time_case(make, loss_of, repetitions, min_time))
    cap = args.max_gib * 2 ** 30
    for name, make, loss_of, function in reference_cases(torch, args.quick):
        if args.filter not in name:
            continue
        made = make()
        estimate = ref_estimate(function, *made[0], *made[1])
        if estimate > cap:
            message = (f"not run: needs about {estimate / 2 ** 30:.1f} GiB (estimated), over the "
                       f"{args.max_gib:g} GiB cap (--max-gib)")
            print(f"{name:48s} {message}", flush=True)
            infeasible.append({"name": name, "estimated_bytes": estimate, "message": message})
            continue
        counters = {"estimated_bytes": estimate}
        real, cpu, iterations = time_case(lambda: made, loss_of, repetitions, min_time)
        del made
        if int(name.split("/N:")[1].split("/")[0]) in args.peak_n:
            peak = peak_of(name)
            if peak is not None:
                counters["peak_bytes"] = peak
                print(f"{name:48s} peak {peak / 2 ** 20:.0f} MiB over its inputs", flush=True)
        record(name, real, cpu, iterations, **counters)
    context = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host_name": platform.node(),
        "executable": "torch_peers.py", "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(), "python": platform.python_version(),
        "malloc": "glibc, freed memory kept (--keep-freed-memory)" if args.keep_freed_memory else "glibc defaults",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"context": context, "benchmarks": benchmarks, "infeasible": infeasible}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
