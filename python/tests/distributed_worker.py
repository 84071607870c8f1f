"""One rank of test_distributed.py: joins a gloo process group on loopback, computes every case
of CASES on its shard of the global batch with group=metricloss.distributed.group(), and saves
the losses, its gradient rows and the error messages of the malformed calls to OUT.

    python3 distributed_worker.py RANK WORLD PORT SHARDS OUT     (SHARDS: "7,0,11")
"""
import datetime
import sys

import torch
import torch.distributed as dist

import metricloss
import metricloss.distributed

D = 5


def global_batch(n):
    """X (n x D, float64, fixed seed) and labels: classes 0..2 spread over the batch (split
    across ranks), class 3 in the last rows only (one rank), a singleton class 4 (an anchor
    without positives). The same on every rank and in the test."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, D, dtype=torch.float64, generator=g)
    labels = torch.arange(n) % 3
    labels[n - 3:n - 1] = 3
    labels[n - 1] = 4
    return x, labels


def reference_set(x, labels):
    """R (7 x D): rows 0, 3 and 6 of x, then four others; its labels (class 5: no query's);
    and each query's row of R or -1."""
    g = torch.Generator().manual_seed(8)
    r = torch.cat([x[[0, 3, 6]], torch.randn(4, D, dtype=torch.float64, generator=g)])
    r_labels = torch.cat([labels[[0, 3, 6]], torch.tensor([0, 1, 5, 5])])
    self_index = torch.full((x.shape[0],), -1, dtype=torch.int64)
    self_index[[0, 3, 6]] = torch.tensor([0, 1, 2])
    return r, r_labels, self_index


def cases():
    """(name, loss module) for every loss, mode and option of the batch losses."""
    out = []
    for mining in ("all", "hard", "semihard"):
        for soft in (False, True):
            for distance in ("euclidean", "squared_euclidean"):
                out.append((f"triplet {mining} soft={soft} {distance}",
                            metricloss.BatchTripletLoss(0.2, mining, distance, soft)))
        out.append((f"triplet {mining} normalize",
                    metricloss.BatchTripletLoss(0.2, mining, normalize=True)))
    for normalize in (False, True):
        out.append((f"lifted normalize={normalize}", metricloss.LiftedStructureLoss(1.0, normalize)))
    for reduction in ("nonzero_mean", "mean"):
        for distance in ("euclidean", "squared_euclidean"):
            out.append((f"contrastive {reduction} {distance}",
                        metricloss.BatchContrastiveLoss(0.1, 1.0, distance, reduction)))
    out.append(("contrastive normalize", metricloss.BatchContrastiveLoss(normalize=True)))
    out.append(("multi-similarity", metricloss.MultiSimilarityLoss()))
    out.append(("multi-similarity normalize", metricloss.MultiSimilarityLoss(normalize=True)))
    out.append(("multi-similarity epsilon=inf", metricloss.MultiSimilarityLoss(epsilon=float("inf"))))
    return out


def main():
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    shards = [int(s) for s in sys.argv[4].split(",")]
    out_path = sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    group = metricloss.distributed.group()
    x, labels = global_batch(sum(shards))
    first = sum(shards[:rank])
    mine = slice(first, first + shards[rank])
    results = {}
    for name, loss_fn in cases():
        x_local = x[mine].clone().requires_grad_()
        value = loss_fn(x_local, labels[mine], group=group)
        value.backward()
        grad = x_local.grad if x_local.grad is not None else torch.zeros_like(x_local)
        second = loss_fn(x[mine], labels[mine], group=group)  # a second call: the same bits
        results[name] = (value.item(), second.item(), grad.clone())
    # Against a reference set, the same on every rank: copies of queries 0, 3 and 6 (their
    # self_index rows, passed by every rank for its own queries) and four other rows.
    r, r_labels, self_index = reference_set(x, labels)
    for name, loss_fn in cases():
        q_local = x[mine].clone().requires_grad_()
        ref = r.clone().requires_grad_()
        value = loss_fn(q_local, labels[mine], ref=ref, ref_labels=r_labels,
                        self_index=self_index[mine], group=group)
        value.backward()
        grad_q = q_local.grad if q_local.grad is not None else torch.zeros_like(q_local)
        grad_r = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        results["reference " + name] = (value.item(), value.item(), grad_q.clone(), grad_r.clone())
    # A malformed call on the last rank (labels one short): every rank raises the same error.
    errors = {}
    for name, loss_fn in (("triplet", metricloss.BatchTripletLoss()),
                          ("lifted", metricloss.LiftedStructureLoss())):
        bad = labels[mine][:-1] if rank == world - 1 and shards[rank] > 0 else labels[mine]
        if rank == world - 1 and shards[rank] == 0:
            bad = torch.zeros(1, dtype=torch.int64)
        try:
            loss_fn(x[mine], bad, group=group)
            errors[name] = ""
        except ValueError as error:
            errors[name] = str(error)
    torch.save({"results": results, "errors": errors, "repr": repr(group)}, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
