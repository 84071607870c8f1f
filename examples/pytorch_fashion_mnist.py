#!/usr/bin/python3
"""Fashion-MNIST with metricloss from PyTorch: a small torch.nn network trained with
metricloss.BatchTripletLoss, Recall@1/2/4/8 on the test set, and the wall time of a training
step against the same loss written in plain PyTorch (mining="hard": benchmarks/torch_peers.py's
batch_hard; "all", the default: the usual vectorised N x N x N form, below).

    /usr/bin/python3 -m pip install --no-build-isolation ./python   # once, see README "Python"
    /usr/bin/python3 examples/pytorch_fashion_mnist.py [--epochs 3] [--mining all|hard|semihard]

The data are Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), as for the
C++ example examples/fashion_mnist. The network is the C++ example's (784 -> 256 -> 64, ReLU,
L2-normalised embeddings, Adam 1e-3 with cosine decay, P x K batches of 10 classes).
Exits 77 (skipped) when the data set is not installed.
"""
import argparse
import gzip
import importlib.util
import math
import os
import pathlib
import struct
import sys
import time

import torch

import metricloss

REPO = pathlib.Path(__file__).resolve().parents[1]
RECALL_KS = (1, 2, 4, 8)


def read_idx_gz(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def load(directory, prefix):
    images = read_idx_gz(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx_gz(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))
    return images.reshape(images.shape[0], -1).float() / 255.0, labels.long()


def peers_module():
    spec = importlib.util.spec_from_file_location("torch_peers", REPO / "benchmarks" / "torch_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain_pytorch_loss(mining, margin):
    """The same loss in PyTorch ops, as a user would write it (Euclidean, hinge)."""
    peers = peers_module()
    if mining == "hard":
        return lambda x, y: peers.batch_hard(torch, x, y, margin)
    if mining == "all":
        def batch_all(x, y):  # mean over the triplets with a positive hinge; N^3 tensor
            d = torch.cdist(x, x)
            same = y[:, None] == y[None, :]
            eye = torch.eye(x.shape[0], dtype=torch.bool)
            valid = (same & ~eye)[:, :, None] & (~same)[:, None, :]
            hinge = torch.relu(d[:, :, None] - d[:, None, :] + margin) * valid
            return hinge.sum() / torch.clamp((hinge > 0).sum(), min=1)
        return batch_all
    return None  # semihard: no vectorised peer here


class Embedding(torch.nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, dim))

    def forward(self, x):
        return torch.nn.functional.normalize(self.layers(x), dim=1)


def pk_batches(labels, classes, per_class, generator):
    """One epoch of P x K batches: every image once, classes drawn in turn."""
    pools = [torch.nonzero(labels == c).flatten() for c in range(10)]
    pools = [p[torch.randperm(len(p), generator=generator)] for p in pools]
    steps = min(len(p) for p in pools) // per_class * 10 // classes
    cursor = [0] * 10
    for step in range(steps):
        chosen = torch.randperm(10, generator=generator)[:classes].tolist()
        rows = []
        for c in chosen:
            if cursor[c] + per_class > len(pools[c]):
                cursor[c] = 0
            rows.append(pools[c][cursor[c]:cursor[c] + per_class])
            cursor[c] += per_class
        yield torch.cat(rows)


@torch.no_grad()
def recall_at_k(points, labels, block=1000):
    """Recall@K (Song et al. 2016): does any of the K exact Euclidean nearest neighbours among
    the other test images share the query's class?"""
    hits = torch.zeros(len(RECALL_KS))
    norms = (points * points).sum(1)
    for first in range(0, len(points), block):
        q = points[first:first + block]
        d = norms[None, :] - 2 * q @ points.t()  # ||q||^2 left out: same for every candidate
        d[torch.arange(len(q)), torch.arange(first, first + len(q))] = float("inf")
        nearest = d.topk(max(RECALL_KS), dim=1, largest=False).indices
        match = labels[nearest] == labels[first:first + len(q), None]
        for i, k in enumerate(RECALL_KS):
            hits[i] += match[:, :k].any(1).sum()
    return (hits / len(points)).tolist()


def show_recall(what, recall):
    print(f"{what:28s} " + "  ".join(f"R@{k} {r:.4f}" for k, r in zip(RECALL_KS, recall)), flush=True)


def time_steps(model, loss_fn, batches, images, labels, lr):
    """Median wall time of a full training step (embed, loss, backward, Adam) and of the loss's
    forward + backward alone, on the same batches, with a copy of the model."""
    import copy
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step_times, loss_times = [], []
    for rows in batches:
        start = time.perf_counter()
        embeddings = model(images[rows])
        detached = embeddings.detach().requires_grad_(True)
        loss_start = time.perf_counter()
        loss = loss_fn(detached, labels[rows])
        loss.backward()
        loss_times.append(time.perf_counter() - loss_start)
        optimizer.zero_grad()
        embeddings.backward(detached.grad)
        optimizer.step()
        step_times.append(time.perf_counter() - start)
    median = lambda v: sorted(v)[len(v) // 2]
    return median(step_times), median(loss_times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mining", default="all", choices=["all", "hard", "semihard"])
    parser.add_argument("--margin", type=float, default=0.2)
    parser.add_argument("--images-per-class", type=int, default=None,
                        help="K of the P x K batches (default 4 for hard, 16 otherwise, as the C++ example)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the benchmarks' setting)")
    parser.add_argument("--timing-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.data, "train-images-idx3-ubyte.gz")):
        print(f"pytorch_fashion_mnist: Fashion-MNIST not found in {args.data} "
              "(apt-get install dataset-fashion-mnist, or pass --data DIR)", file=sys.stderr)
        return 77
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    per_class = args.images_per_class or (4 if args.mining == "hard" else 16)

    train_x, train_y = load(args.data, "train")
    test_x, test_y = load(args.data, "t10k")
    print(f"Fashion-MNIST: {len(train_x)} training, {len(test_x)} test images; "
          f"BatchTripletLoss(mining={args.mining!r}, margin={args.margin}), batches of 10 x {per_class}, "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    show_recall("raw pixels", recall_at_k(test_x, test_y))

    model = Embedding()
    loss_fn = metricloss.BatchTripletLoss(margin=args.margin, mining=args.mining)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    with torch.no_grad():
        show_recall("untrained network", recall_at_k(model(test_x), test_y))
    steps_per_epoch = sum(1 for _ in pk_batches(train_y, 10, per_class, torch.Generator().manual_seed(0)))
    total_steps, step = args.epochs * steps_per_epoch, 0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        running = 0.0
        for rows in pk_batches(train_y, 10, per_class, generator):
            for group in optimizer.param_groups:  # cosine decay, as the C++ example
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            loss = loss_fn(model(train_x[rows]), train_y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += loss.item()
            step += 1
        with torch.no_grad():
            recall = recall_at_k(model(test_x), test_y)
        show_recall(f"epoch {epoch} loss {running / steps_per_epoch:.4f}", recall)
    print(f"training: {step} steps in {time.perf_counter() - start:.1f} s")

    # The same steps with the loss in plain PyTorch, timed against metricloss.
    peer = plain_pytorch_loss(args.mining, args.margin)
    batches = [rows for _, rows in zip(range(args.timing_steps), pk_batches(train_y, 10, per_class, generator))]
    rows = batches[0]
    with torch.no_grad():
        e = model(train_x[rows])
    if peer is None:
        print(f"timing: no plain-PyTorch peer for mining={args.mining!r}")
        return 0
    ours, theirs = loss_fn(e, train_y[rows]).item(), peer(e, train_y[rows]).item()
    print(f"same batch: metricloss {ours:.6f}, plain PyTorch {theirs:.6f}")
    ml_step, ml_loss = time_steps(model, loss_fn, batches, train_x, train_y, args.lr)
    pt_step, pt_loss = time_steps(model, peer, batches, train_x, train_y, args.lr)
    print(f"median of {len(batches)} steps, batch {len(rows)}:")
    print(f"  training step: metricloss {ml_step * 1e3:.3f} ms, plain PyTorch {pt_step * 1e3:.3f} ms "
          f"({pt_step / ml_step:.2f}x)")
    print(f"  loss forward+backward: metricloss {ml_loss * 1e3:.3f} ms, plain PyTorch {pt_loss * 1e3:.3f} ms "
          f"({pt_loss / ml_loss:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
