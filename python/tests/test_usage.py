"""A module reused across steps, strided rows, label types, grad modes, copies."""
import copy
import pickle

import pytest
import torch

import metricloss
from conftest import labels_pk

ALL_BATCH = [
    lambda: metricloss.BatchTripletLoss(mining="hard"),
    lambda: metricloss.BatchTripletLoss(mining="semihard"),
    lambda: metricloss.BatchTripletLoss(mining="all", soft_margin=True),
    lambda: metricloss.LiftedStructureLoss(),
    lambda: metricloss.BatchTripletLoss(mining="semihard", normalize=True),
    lambda: metricloss.LiftedStructureLoss(normalize=True),
    lambda: metricloss.BatchContrastiveLoss(pos_margin=0.5, neg_margin=3.0),
    lambda: metricloss.BatchContrastiveLoss(distance="squared_euclidean", reduction="mean", normalize=True),
    lambda: metricloss.MultiSimilarityLoss(normalize=True),
    lambda: metricloss.MultiSimilarityLoss(beta=10.0, epsilon=float("inf")),
]


def grad_of(loss, x, y, scale=1.0):
    x = x.detach().clone().requires_grad_(True)
    (loss(x, y) * scale).backward()
    return x.grad


@pytest.mark.parametrize("make", ALL_BATCH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_gradient_leak_between_calls(make, dtype):
    """A module reused across steps (and across sizes) gives each call its own gradient, equal
    to a fresh module's, and never writes into an earlier call's gradient."""
    reused = make()
    batches = [(torch.randn(n, 5, dtype=dtype), labels_pk(n, 4)) for n in (32, 16, 32)]
    kept = []
    for x, y in batches:
        g = grad_of(reused, x, y)
        assert torch.equal(g, grad_of(make(), x, y))
        kept.append((g, g.clone()))
    for g, snapshot in kept:
        assert torch.equal(g, snapshot)
    # Two forwards before one backward: each keeps its own saved gradient.
    (x1, y1), (x2, y2) = batches[0], batches[1]
    x1, x2 = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
    (reused(x1, y1) + 3 * reused(x2, y2)).backward()
    assert torch.equal(x1.grad, grad_of(make(), batches[0][0], y1))
    torch.testing.assert_close(x2.grad, grad_of(make(), batches[1][0], y2, 3.0), rtol=0, atol=0)


def test_grad_output_scales_the_saved_gradient():
    x, y = torch.randn(16, 4, dtype=torch.float64), labels_pk(16, 4)
    loss = metricloss.LiftedStructureLoss()
    assert torch.equal(grad_of(loss, x, y, 2.5), grad_of(loss, x, y) * 2.5)


@pytest.mark.parametrize("make", ALL_BATCH)
def test_strided_rows(make):
    """Rows with an outer stride (a column slice, every other row) give the contiguous result."""
    loss = make()
    big = torch.randn(64, 9, dtype=torch.float64)
    y = labels_pk(32, 4)
    for x in (big[:32, 2:7], big[::2, :5]):
        assert x.stride(1) == 1 and x.stride(0) > 5
        xs = x.detach().requires_grad_(True)
        value = loss(xs, y)
        value.backward()
        xc = x.contiguous().requires_grad_(True)
        expected = loss(xc, y)
        expected.backward()
        torch.testing.assert_close(value, expected, rtol=1e-14, atol=0)
        torch.testing.assert_close(xs.grad, xc.grad, rtol=1e-12, atol=1e-15)


def test_strided_pairs_and_triplets():
    big = torch.randn(20, 12, dtype=torch.float64)
    a, b, c = big[:, 0:4], big[:, 4:8], big[:, 8:12]
    for loss, args in ((metricloss.ContrastiveLoss(margin=2.0), (a, b, torch.arange(20) % 2)),
                       (metricloss.TripletLoss(margin=1.0), (a, b, c))):
        value = loss(*args)
        expected = loss(*(t.contiguous() if t.dim() == 2 else t for t in args))
        torch.testing.assert_close(value, expected, rtol=1e-14, atol=0)


def test_only_required_gradients():
    a, p, n = (torch.randn(8, 3) for _ in range(3))
    a.requires_grad_(True)
    loss = metricloss.TripletLoss(margin=2.0)
    loss(a, p, n).backward()
    assert a.grad is not None and p.grad is None and n.grad is None
    assert a.grad.abs().sum() > 0


def test_no_grad_and_inference():
    x, y = torch.randn(16, 4, requires_grad=True), labels_pk(16, 4)
    loss = metricloss.BatchTripletLoss()
    with torch.no_grad():
        value = loss(x, y)
    assert value.grad_fn is None and not value.requires_grad
    assert torch.equal(value, loss(x.detach(), y))
    assert loss(x, y).requires_grad


@pytest.mark.parametrize("convert", [
    lambda y: y.to(torch.int32), lambda y: y.to(torch.int16), lambda y: y.to(torch.float32) + 0.5,
    lambda y: y.to(torch.float64) * -3, lambda y: y.tolist(),
    lambda y: torch.stack([y, y], 1)[:, 1],  # a strided int64 column, read in place
])
def test_label_types(convert):
    x, y = torch.randn(16, 4, dtype=torch.float64), labels_pk(16, 4)
    for loss in (metricloss.BatchTripletLoss(mining="all"), metricloss.LiftedStructureLoss()):
        # Same classes: the same loss (bitwise when the labels' order is kept; a relabelling
        # that reverses it changes the summation order of the classes).
        torch.testing.assert_close(loss(x, convert(y)), loss(x, y), rtol=1e-14, atol=0)


def test_contrastive_labels_mapped_jointly():
    a, b = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    ya = torch.tensor([0.5, 1.5, 2.5, 0.5, 1.5, 2.5])
    yb = torch.tensor([0.5, 2.5, 2.5, 1.5, 1.5, 7.0])
    loss = metricloss.ContrastiveLoss(margin=2.0)
    assert torch.equal(loss(a, b, labels_a=ya, labels_b=yb), loss(a, b, (ya == yb).long()))
    assert torch.equal(loss(a, b, torch.tensor([0.9, 1.9, -1.5, 0.0, 2.0, 0.2])),
                       loss(a, b, torch.tensor([0, 1, 1, 0, 1, 0])))  # Caffe's truncation


def test_options_change_between_steps():
    x, y = torch.randn(16, 4, dtype=torch.float64), labels_pk(16, 4)
    loss = metricloss.BatchTripletLoss(margin=0.2)
    loss.margin, loss.mining = 0.7, "all"
    assert torch.equal(loss(x, y), metricloss.BatchTripletLoss(margin=0.7, mining="all")(x, y))
    assert "mining='all'" in repr(loss)


def test_copies_get_their_own_functor():
    loss = metricloss.BatchTripletLoss(margin=0.3, mining="semihard")
    x, y = torch.randn(16, 4, dtype=torch.float64), labels_pk(16, 4)
    for clone in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss)),
                  copy.deepcopy(torch.nn.Sequential(loss))[0]):
        assert clone._kernel is not loss._kernel
        assert clone.margin == 0.3 and torch.equal(clone(x, y), loss(x, y))


def test_float_loss_accumulated_in_double():
    x = torch.rand(256, 32) * 2 - 1
    y = labels_pk(256, 8)
    value = metricloss.LiftedStructureLoss()(x, y)
    expected = metricloss.LiftedStructureLoss()(x.double(), y)
    assert value.dtype == torch.float32
    assert abs(value.item() - expected.item()) <= 1e-5 * abs(expected.item())


def test_no_gradient_computed_without_autograd():
    loss = metricloss.LiftedStructureLoss()
    x, y = torch.randn(16, 4, requires_grad=True), labels_pk(16, 4)
    with torch.no_grad():
        loss(x, y)
    with torch.inference_mode():
        loss(x, y)
    loss(x.detach(), y)
    assert loss._kernel.gradient_calls == 0
    loss(x, y)
    assert loss._kernel.gradient_calls == 1


def test_once_differentiable():
    x, y = torch.randn(16, 4, dtype=torch.float64, requires_grad=True), labels_pk(16, 4)
    value = metricloss.BatchTripletLoss(mining="all")(x, y)
    with pytest.raises(RuntimeError, match=r"once differentiable"):
        torch.autograd.grad(value, x, create_graph=True)


@pytest.mark.parametrize("make", ALL_BATCH)
def test_retained_graph_and_shared_inputs(make):
    """backward twice on a retained graph accumulates the same gradient twice; one input in two
    calls gets the sum (the saved gradient handed to autograd is never modified under it)."""
    loss = make()
    x, y = torch.randn(24, 5, dtype=torch.float64), labels_pk(24, 4)
    g = grad_of(make(), x, y)
    xs = x.clone().requires_grad_(True)
    value = loss(xs, y)
    value.backward(retain_graph=True)
    value.backward(retain_graph=True)
    value.backward()
    torch.testing.assert_close(xs.grad, 3 * g, rtol=1e-15, atol=0)
    y2 = labels_pk(24, 6)
    xs = x.clone().requires_grad_(True)
    (loss(xs, y) + loss(xs, y2)).backward()
    torch.testing.assert_close(xs.grad, g + grad_of(make(), x, y2), rtol=1e-15, atol=0)


def poisoned_then_released(t):
    """Fills t.grad with NaN and drops it, so its memory goes back to the loss's pool."""
    t.grad.fill_(float("nan"))
    t.grad = None


@pytest.mark.parametrize("make", ALL_BATCH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_memory_reused_once_released(make, dtype):
    """A CPU gradient's memory returns to its loss when the last tensor on it dies, and the
    next call of that size gets it back, every entry rewritten (it was NaN): the same gradient
    as a fresh module's, zero rows included."""
    loss = make()
    y = labels_pk(48, 4)
    x1, x2 = torch.randn(48, 6, dtype=dtype), torch.randn(48, 6, dtype=dtype) * 3
    x2[:8] = x2[8:16]  # coincident rows: zero distances
    first = x1.clone().requires_grad_(True)
    loss(first, y).backward()
    block = first.grad.data_ptr()
    assert loss._kernel.pooled_gradients == 0  # first.grad holds it
    poisoned_then_released(first)
    assert loss._kernel.pooled_gradients == 1
    second = x2.clone().requires_grad_(True)
    loss(second, y).backward()
    assert second.grad.data_ptr() == block
    assert torch.equal(second.grad, grad_of(make(), x2, y))


def test_pair_and_triplet_gradients_reused():
    """The same for the losses of pairs and triplets, whose zero rows (satisfied hinges) are
    written as zeros, not skipped."""
    n, d = 40, 5
    a, b, c = (torch.randn(n, d, dtype=torch.float64) for _ in range(3))
    b[:10] = a[:10]  # zero distances
    c[10:20] = a[10:20] + 50  # satisfied hinges: zero gradient rows
    sim = (torch.arange(n) % 3 == 0).long()
    for make, inputs, call in [
        (lambda: metricloss.ContrastiveLoss(margin=2.0), (a, b), lambda l, t: l(*t, sim)),
        (lambda: metricloss.ContrastiveLoss(form="legacy"), (a, b), lambda l, t: l(*t, sim)),
        (lambda: metricloss.TripletLoss(margin=0.5), (a, b, c), lambda l, t: l(*t)),
        (lambda: metricloss.TripletLoss(distance="euclidean"), (a, b, c), lambda l, t: l(*t)),
    ]:
        loss = make()
        ts = [t.clone().requires_grad_(True) for t in inputs]
        call(loss, ts).backward()
        blocks = sorted(t.grad.data_ptr() for t in ts)
        for t in ts:
            poisoned_then_released(t)
        assert loss._kernel.pooled_gradients == len(ts)
        fresh = [t.clone().requires_grad_(True) for t in inputs]
        call(make(), fresh).backward()
        again = [t.clone().requires_grad_(True) for t in inputs]
        call(loss, again).backward()
        assert sorted(t.grad.data_ptr() for t in again) == blocks
        for g, f in zip(again, fresh):
            assert torch.equal(g.grad, f.grad)


def test_gradient_pool_is_bounded_and_outlives_its_module():
    """At most 8 blocks wait (the oldest are freed); a gradient outlives its module; held
    gradients are never handed out again; no gradient under no_grad."""
    loss = metricloss.LiftedStructureLoss()
    for n in range(8, 20):  # 12 sizes, each released
        x = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
        loss(x, labels_pk(n, 4)).backward()
        x.grad = None
    assert loss._kernel.pooled_gradients == 8
    held = []
    for _ in range(3):  # held gradients: fresh memory each call, none taken back
        x = torch.randn(19, 3, dtype=torch.float64, requires_grad=True)
        loss(x, labels_pk(19, 4)).backward()
        held.append(x.grad)
    assert len({g.data_ptr() for g in held}) == 3
    assert loss._kernel.pooled_gradients == 7  # the 19-row block was taken, then held
    with torch.no_grad():
        loss(torch.randn(19, 3, dtype=torch.float64), labels_pk(19, 4))
    assert loss._kernel.pooled_gradients == 7
    snapshot = [g.clone() for g in held]
    del loss
    for g, s in zip(held, snapshot):
        assert torch.equal(g, s)
    del held  # their blocks go back to a pool that only they kept alive
