"""Shared by the binding's tests: the pure-PyTorch peers of benchmarks/torch_peers.py and the
PML / API.md references of tests/reference/pml_losses.py (imported by path), and pure-PyTorch
references of the modes the peers do not cover, from API.md's formulas. Each reference returns
the loss; autograd gives its gradient."""
import importlib.util
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peers = _load("torch_peers", REPO / "benchmarks" / "torch_peers.py")
# pytorch-metric-learning's ContrastiveLoss / MultiSimilarityLoss (+ miner) step by step, and
# API.md's formulas of the all-pairs losses (issue 17); see its docstring.
pml = _load("pml_losses", REPO / "tests" / "reference" / "pml_losses.py")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pairwise_distance(x, squared):
    """d(x_i, x_j) with a zero (and zero-gradient) diagonal, by differences."""
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    if squared:
        return d2
    eye = torch.eye(x.shape[0], dtype=torch.bool)
    return torch.where(eye, torch.zeros_like(d2), torch.sqrt(torch.where(eye, torch.ones_like(d2), d2)))


def batch_triplet_reference(x, labels, margin, mining, distance, soft_margin):
    """API.md's BatchTripletLoss, term by term."""
    d = pairwise_distance(x, distance == "squared_euclidean")
    h = torch.nn.functional.softplus if soft_margin else torch.relu
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(x.shape[0], dtype=torch.bool)
    pos, neg = same & ~eye, ~same
    zero = x.sum() * 0
    if mining == "all":
        t = h(d[:, :, None] - d[:, None, :] + margin)
        mask = pos[:, :, None] & neg[:, None, :]
        vals = t[mask]
        z = mask.sum() if soft_margin else (vals > 0).sum()
        return vals.sum() / z if z > 0 else zero
    terms = []
    for a in range(x.shape[0]):
        if not pos[a].any() or not neg[a].any():
            continue
        dn = d[a][neg[a]]
        if mining == "hard":
            terms.append(h(d[a][pos[a]].max() - dn.min() + margin))
            continue
        for p in torch.nonzero(pos[a]).flatten().tolist():
            farther = dn > d[a, p]
            n_star = dn[farther].min() if farther.any() else dn.max()
            terms.append(h(d[a, p] - n_star + margin))
    return torch.stack(terms).mean() if terms else zero


def triplet_reference(anchor, positive, negative, margin, distance):
    if distance == "squared_euclidean":
        return peers.triplet_facenet(torch, anchor, positive, negative, margin)
    d_ap = ((anchor - positive) ** 2).sum(1).sqrt()
    d_an = ((anchor - negative) ** 2).sum(1).sqrt()
    return torch.clamp(d_ap - d_an + margin, min=0).mean()


def labels_pk(n, per_class):
    """n labels, per_class of each class, shuffled."""
    return (torch.arange(n) // per_class)[torch.randperm(n)]
