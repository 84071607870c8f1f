"""Parity with pure-PyTorch formulas (benchmarks/torch_peers.py, and API.md's formulas for the
modes the peers do not cover): float64, loss and every gradient entry within 1e-12 relative
(gradients relative to the largest entry); float32 within the float bounds."""
import pytest
import torch

import metricloss
from conftest import batch_triplet_reference, labels_pk, peers, triplet_reference


def close(value, reference, rel):
    scale = max(reference.abs().max().item(), 1e-300)
    return (value - reference).abs().max().item() <= rel * scale


def compare(loss_fn, reference_fn, inputs, rel_loss=1e-12, rel_grad=1e-12):
    ours_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref_in = [t.detach().clone().to(torch.float64).requires_grad_(True) for t in inputs]
    ours = loss_fn(*ours_in)
    ref = reference_fn(*ref_in)
    ours.backward()
    ref.backward()
    assert ours.dim() == 0 and ours.dtype == inputs[0].dtype
    assert close(ours.detach().to(torch.float64), ref.detach(), rel_loss), (ours.item(), ref.item())
    scale = max(r.grad.abs().max().item() for r in ref_in)
    for o, r in zip(ours_in, ref_in):
        assert (o.grad.to(torch.float64) - r.grad).abs().max().item() <= rel_grad * max(scale, 1e-300)


DTYPES = [(torch.float64, 1e-12, 1e-12), (torch.float32, 1e-5, 1e-4)]


@pytest.mark.parametrize("dtype,rel_loss,rel_grad", DTYPES)
@pytest.mark.parametrize("form", ["hadsell", "legacy"])
def test_contrastive(dtype, rel_loss, rel_grad, form):
    n, d, margin = 64, 8, 4.0
    a, b = torch.rand(n, d, dtype=dtype) * 2 - 1, torch.rand(n, d, dtype=dtype) * 2 - 1
    sim = torch.randint(0, 2, (n,))
    loss = metricloss.ContrastiveLoss(margin=margin, form=form)
    ref = lambda a, b: peers.contrastive(torch, a, b, sim != 0, margin, form == "legacy")
    compare(lambda a, b: loss(a, b, sim), ref, [a, b], rel_loss, rel_grad)
    ya, yb = torch.randint(0, 3, (n,)), torch.randint(0, 3, (n,))
    ref = lambda a, b: peers.contrastive(torch, a, b, ya == yb, margin, form == "legacy")
    compare(lambda a, b: loss(a, b, labels_a=ya, labels_b=yb), ref, [a, b], rel_loss, rel_grad)


@pytest.mark.parametrize("dtype,rel_loss,rel_grad", DTYPES)
@pytest.mark.parametrize("distance", ["squared_euclidean", "euclidean"])
def test_triplet(dtype, rel_loss, rel_grad, distance):
    a, p, n = (torch.rand(100, 16, dtype=dtype) * 2 - 1 for _ in range(3))
    loss = metricloss.TripletLoss(margin=0.2, distance=distance)
    compare(loss, lambda a, p, n: triplet_reference(a, p, n, 0.2, distance), [a, p, n], rel_loss, rel_grad)


@pytest.mark.parametrize("dtype,rel_loss,rel_grad", DTYPES)
def test_batch_hard_against_peer(dtype, rel_loss, rel_grad):
    x = torch.rand(64, 16, dtype=dtype) * 2 - 1
    y = labels_pk(64, 8)
    loss = metricloss.BatchTripletLoss(margin=0.2, mining="hard")
    compare(lambda x: loss(x, y), lambda x: peers.batch_hard(torch, x, y, 0.2), [x], rel_loss, rel_grad)


@pytest.mark.parametrize("mining", ["hard", "semihard", "all"])
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("soft_margin", [False, True])
def test_batch_triplet_modes(mining, distance, soft_margin):
    x = torch.rand(24, 6, dtype=torch.float64) * 2 - 1
    y = labels_pk(24, 4)
    loss = metricloss.BatchTripletLoss(margin=0.2, mining=mining, distance=distance, soft_margin=soft_margin)
    compare(lambda x: loss(x, y),
            lambda x: batch_triplet_reference(x, y, 0.2, mining, distance, soft_margin), [x])


@pytest.mark.parametrize("dtype,rel_loss,rel_grad", DTYPES)
@pytest.mark.parametrize("margin", [1.0, 0.2])
def test_lifted_against_peer(dtype, rel_loss, rel_grad, margin):
    x = torch.rand(64, 16, dtype=dtype) * 2 - 1
    y = labels_pk(64, 8)
    loss = metricloss.LiftedStructureLoss(margin=margin)
    compare(lambda x: loss(x, y), lambda x: peers.lifted(torch, x, y, margin), [x], rel_loss, rel_grad)


def test_nothing_to_average():
    """One class: loss 0 and a zero gradient (no NaN)."""
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(5, dtype=torch.int64)
    for loss in (metricloss.BatchTripletLoss(mining="all"), metricloss.LiftedStructureLoss()):
        x.grad = None
        value = loss(x, y)
        value.backward()
        assert value.item() == 0 and torch.count_nonzero(x.grad) == 0
