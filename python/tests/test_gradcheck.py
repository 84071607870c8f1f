"""torch.autograd.gradcheck in float64 for every loss, option and mining mode (random inputs
with a fixed seed: no ties, no hinge at its kink)."""
import pytest
import torch
from torch.autograd import gradcheck

import metricloss
from conftest import labels_pk


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("form", ["hadsell", "legacy"])
@pytest.mark.parametrize("by_labels", [False, True])
def test_contrastive(form, by_labels):
    a, b = rand(10, 4), rand(10, 4)
    loss = metricloss.ContrastiveLoss(margin=3.0, form=form)
    if by_labels:
        ya, yb = torch.randint(0, 2, (10,)), torch.randint(0, 2, (10,))
        assert gradcheck(lambda a, b: loss(a, b, labels_a=ya, labels_b=yb), (a, b))
    else:
        sim = torch.tensor([1, 0] * 5)
        assert gradcheck(lambda a, b: loss(a, b, sim), (a, b))


@pytest.mark.parametrize("distance", ["squared_euclidean", "euclidean"])
def test_triplet(distance):
    a, p, n = rand(9, 5), rand(9, 5), rand(9, 5)
    loss = metricloss.TripletLoss(margin=1.0, distance=distance)
    assert gradcheck(loss, (a, p, n))


@pytest.mark.parametrize("mining", ["hard", "semihard", "all"])
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("soft_margin", [False, True])
def test_batch_triplet(mining, distance, soft_margin):
    x = rand(12, 5)
    y = labels_pk(12, 3)
    loss = metricloss.BatchTripletLoss(margin=0.5, mining=mining, distance=distance,
                                       soft_margin=soft_margin)
    assert gradcheck(lambda x: loss(x, y), (x,))


@pytest.mark.parametrize("margin", [1.0, 0.2])
def test_lifted(margin):
    x = rand(12, 5)
    y = labels_pk(12, 3)
    loss = metricloss.LiftedStructureLoss(margin=margin)
    assert gradcheck(lambda x: loss(x, y), (x,))


def test_partial_inputs_gradcheck():
    """Only some inputs require grad: the others are passed as metricloss::skip."""
    a, p = rand(6, 3), rand(6, 3)
    n = torch.randn(6, 3, dtype=torch.float64)
    loss = metricloss.TripletLoss(margin=2.0)
    assert gradcheck(lambda a, p: loss(a, p, n), (a, p))
