"""Reference sets: loss(q, labels_q, ref=r, ref_labels=yr, self_index=None) for BatchTripletLoss
and LiftedStructureLoss (BatchContrastiveLoss and MultiSimilarityLoss: test_all_pairs.py for
their gradcheck, the shared checks here). gradcheck for q and r, the reduction to the batch loss (r = q,
self_index = arange), which gradients are computed, and malformed calls."""
import pytest
import torch
from torch.autograd import gradcheck

import metricloss
from conftest import labels_pk

MODES = [(mining, distance, soft_margin) for mining in ("hard", "semihard", "all")
         for distance in ("euclidean", "squared_euclidean") for soft_margin in (False, True)]
LOSSES = [lambda: metricloss.BatchTripletLoss(margin=0.5, mining="semihard"),
          lambda: metricloss.LiftedStructureLoss(margin=1.0),
          lambda: metricloss.BatchTripletLoss(margin=0.2, mining="all", normalize=True),
          lambda: metricloss.LiftedStructureLoss(normalize=True),
          lambda: metricloss.BatchContrastiveLoss(pos_margin=0.5, neg_margin=3.0),
          lambda: metricloss.BatchContrastiveLoss(reduction="mean", normalize=True),
          lambda: metricloss.MultiSimilarityLoss(normalize=True),
          lambda: metricloss.MultiSimilarityLoss(beta=10.0, epsilon=float("inf"))]


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def reference_case(nq=10, nr=14, d=4):
    """q and r of random rows, 3 classes; self_index: half the queries have a row of r with
    their label (not equal to them: exclusion is by index), the others -1."""
    q, r = rand(nq, d), rand(nr, d)
    yq, yr = torch.arange(nq) % 3, torch.arange(nr) % 3
    self_index = torch.tensor([a % 3 + 3 * ((a // 2) % 4) if a % 2 == 0 else -1 for a in range(nq)])
    assert (yr[self_index[self_index >= 0]] == yq[self_index >= 0]).all()
    return q, r, yq, yr, self_index


@pytest.mark.parametrize("mining", ["hard", "semihard", "all"])
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("with_self", [False, True])
def test_gradcheck_batch_triplet_soft_margin(mining, distance, with_self):
    q, r, yq, yr, self_index = reference_case()
    loss = metricloss.BatchTripletLoss(margin=0.5, mining=mining, distance=distance, soft_margin=True)
    s = self_index if with_self else None
    assert gradcheck(lambda q, r: loss(q, yq, ref=r, ref_labels=yr, self_index=s), (q, r))


@pytest.mark.parametrize("mining", ["hard", "semihard", "all"])
def test_gradcheck_batch_triplet_hinge(mining):
    """Hinge on well-separated classes (tight clusters far apart) with a margin larger than the
    gaps, so that every mined term is active and far from the kink and from ties."""
    centres = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]], dtype=torch.float64)
    yq, yr = torch.arange(9) % 3, torch.arange(12) % 3
    q = (centres[yq] + 0.3 * torch.randn(9, 3, dtype=torch.float64)).requires_grad_(True)
    r = (centres[yr] + 0.3 * torch.randn(12, 3, dtype=torch.float64)).requires_grad_(True)
    loss = metricloss.BatchTripletLoss(margin=8.0, mining=mining)
    value = loss(q, yq, ref=r, ref_labels=yr)
    assert value.item() > 0
    assert gradcheck(lambda q, r: loss(q, yq, ref=r, ref_labels=yr), (q, r))


@pytest.mark.parametrize("margin", [1.0, 0.2])
@pytest.mark.parametrize("with_self", [False, True])
def test_gradcheck_lifted(margin, with_self):
    q, r, yq, yr, self_index = reference_case()
    loss = metricloss.LiftedStructureLoss(margin=margin)
    s = self_index if with_self else None
    assert gradcheck(lambda q, r: loss(q, yq, ref=r, ref_labels=yr, self_index=s), (q, r))


def reduction(loss, x, y, scale=1.0):
    """(batch loss, batch gradient) and (reference loss, grad_q + grad_r) with r = q."""
    xb = x.clone().requires_grad_(True)
    batch = loss(xb, y)
    (batch * scale).backward()
    q, r = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    value = loss(q, y, ref=r, ref_labels=y, self_index=torch.arange(x.shape[0]))
    (value * scale).backward()
    return batch, xb.grad, value, q.grad + r.grad


def assert_equal_within(value, expected, rel):
    scale = max(expected.abs().max().item(), 1e-300)
    assert (value - expected).abs().max().item() <= rel * scale, (value, expected)


@pytest.mark.parametrize("mining,distance,soft_margin", MODES)
def test_reduces_to_batch_triplet(mining, distance, soft_margin):
    x, y = torch.randn(24, 6, dtype=torch.float64), labels_pk(24, 4)
    loss = metricloss.BatchTripletLoss(margin=0.3, mining=mining, distance=distance,
                                       soft_margin=soft_margin)
    batch, batch_grad, value, grad = reduction(loss, x, y)
    assert value.dtype == torch.float64 and value.dim() == 0
    assert_equal_within(value.detach(), batch.detach(), 1e-12)
    assert_equal_within(grad, batch_grad, 1e-12)


@pytest.mark.parametrize("margin", [1.0, 0.2])
def test_reduces_to_lifted(margin):
    x, y = torch.randn(24, 6, dtype=torch.float64), labels_pk(24, 4)
    batch, batch_grad, value, grad = reduction(metricloss.LiftedStructureLoss(margin=margin), x, y)
    assert_equal_within(value.detach(), batch.detach(), 1e-12)
    assert_equal_within(grad, batch_grad, 1e-12)


@pytest.mark.parametrize("make", LOSSES)
def test_float32_and_grad_output(make):
    x, y = torch.rand(32, 8) * 2 - 1, labels_pk(32, 4)
    batch, batch_grad, value, grad = reduction(make(), x, y, scale=2.5)
    assert value.dtype == torch.float32 and grad.dtype == torch.float32
    assert_equal_within(value.detach(), batch.detach(), 1e-5)
    assert_equal_within(grad, batch_grad, 1e-4)


@pytest.mark.parametrize("make", LOSSES)
def test_one_tensor_as_queries_and_reference(make):
    """x passed as both q and ref: autograd sums grad_q and grad_r into x.grad."""
    loss = make()
    x0, y = torch.randn(16, 5, dtype=torch.float64), labels_pk(16, 4)
    x = x0.clone().requires_grad_(True)
    loss(x, y, ref=x, ref_labels=y, self_index=torch.arange(16)).backward()
    _, batch_grad, _, _ = reduction(loss, x0, y)
    assert_equal_within(x.grad, batch_grad, 1e-12)


@pytest.mark.parametrize("make", LOSSES)
def test_only_required_gradients(make):
    loss = make()
    q0, r0, yq, yr, self_index = reference_case()
    q, r = q0.detach().clone().requires_grad_(True), r0.detach().clone().requires_grad_(True)
    loss(q, yq, ref=r, ref_labels=yr, self_index=self_index).backward()
    # r without grad: q.grad alone (grad_r skipped), the same as with both.
    q1, r1 = q0.detach().clone().requires_grad_(True), r0.detach().clone()
    loss(q1, yq, ref=r1, ref_labels=yr, self_index=self_index).backward()
    assert r1.grad is None and q1.grad is not None
    torch.testing.assert_close(q1.grad, q.grad, rtol=1e-13, atol=1e-15)
    # q without grad, r with: r.grad alone.
    q2, r2 = q0.detach().clone(), r0.detach().clone().requires_grad_(True)
    loss(q2, yq, ref=r2, ref_labels=yr, self_index=self_index).backward()
    assert q2.grad is None and r2.grad is not None and r2.grad.abs().sum() > 0
    torch.testing.assert_close(r2.grad, r.grad, rtol=1e-13, atol=1e-15)
    # Neither (or no_grad): no gradient computed.
    calls = loss._kernel.gradient_calls
    with torch.no_grad():
        value = loss(q, yq, ref=r, ref_labels=yr)
    loss(q0.detach(), yq, ref=r0.detach(), ref_labels=yr)
    assert value.grad_fn is None and loss._kernel.gradient_calls == calls


@pytest.mark.parametrize("make", LOSSES)
def test_strided_rows_and_label_types(make):
    loss = make()
    big = torch.randn(40, 11, dtype=torch.float64)
    q, r = big[::2, 1:6], big[20:, 6:11]
    yq, yr = torch.arange(20) % 4, torch.arange(20) % 5
    assert q.stride(0) > 5 and r.stride(0) > 5
    expected = loss(q.contiguous(), yq, ref=r.contiguous(), ref_labels=yr)
    torch.testing.assert_close(loss(q, yq, ref=r, ref_labels=yr), expected, rtol=1e-14, atol=0)
    # Floating labels are mapped jointly with the queries' labels; integer types are widened.
    torch.testing.assert_close(loss(q, yq.double() / 4, ref=r, ref_labels=yr.to(torch.float32) / 4),
                               expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(loss(q, yq.to(torch.int32), ref=r, ref_labels=yr.tolist(),
                                    self_index=torch.full((20,), -1, dtype=torch.int16)),
                               expected, rtol=1e-14, atol=0)


BATCH = [metricloss.BatchTripletLoss, metricloss.LiftedStructureLoss,
         metricloss.BatchContrastiveLoss, metricloss.MultiSimilarityLoss]


def malformed():
    return torch.randn(8, 4), torch.arange(8) % 2, torch.randn(6, 4), torch.arange(6) % 2


@pytest.mark.parametrize("cls", BATCH)
def test_error_shapes_from_cpp(cls):
    q, yq, r, yr = malformed()
    with pytest.raises(ValueError, match=r"argument 'r' has shape 6x3, expected 4 columns"):
        cls()(q, yq, ref=r[:, :3], ref_labels=yr)
    with pytest.raises(ValueError, match=r"argument 'labels_r' has length 5, expected 6"):
        cls()(q, yq, ref=r, ref_labels=yr[:5])
    with pytest.raises(ValueError, match=r"argument 'labels_q' has length 7, expected 8"):
        cls()(q, yq[:7], ref=r, ref_labels=yr)


@pytest.mark.parametrize("cls", BATCH)
def test_error_self_index(cls):
    q, yq, r, yr = malformed()
    bad = torch.full((8,), -1)
    bad[3] = 6
    with pytest.raises(ValueError, match=r"argument 'self_index' has self_index\[3\] = 6, neither -1"):
        cls()(q, yq, ref=r, ref_labels=yr, self_index=bad)
    bad[3] = -2
    with pytest.raises(ValueError, match=r"self_index\[3\] = -2"):
        cls()(q, yq, ref=r, ref_labels=yr, self_index=bad)
    with pytest.raises(ValueError, match=r"argument 'self_index' has length 7, expected 8"):
        cls()(q, yq, ref=r, ref_labels=yr, self_index=torch.full((7,), -1))
    with pytest.raises(ValueError, match=r"labels_r\[0\] differs from labels_q\[1\]"):
        cls()(q, yq, ref=r, ref_labels=yr, self_index=torch.tensor([-1, 0] + [-1] * 6))
    with pytest.raises(TypeError, match=r"argument 'self_index' must be an integer tensor"):
        cls()(q, yq, ref=r, ref_labels=yr, self_index=torch.full((8,), -1.0))
    with pytest.raises(ValueError, match=r"argument 'self_index' must be 1-D"):
        cls()(q, yq, ref=r, ref_labels=yr, self_index=torch.full((8, 1), -1))


@pytest.mark.parametrize("cls", BATCH)
def test_error_call_forms(cls):
    q, yq, r, yr = malformed()
    with pytest.raises(TypeError, match=r"argument 'ref' needs 'ref_labels'"):
        cls()(q, yq, ref=r)
    with pytest.raises(TypeError, match=r"'ref_labels' and 'self_index' need 'ref'"):
        cls()(q, yq, ref_labels=yr)
    with pytest.raises(TypeError, match=r"'ref_labels' and 'self_index' need 'ref'"):
        cls()(q, yq, self_index=torch.arange(8))
    with pytest.raises(TypeError, match=r"argument 'ref' must be a torch.Tensor"):
        cls()(q, yq, ref=r.tolist(), ref_labels=yr)


@pytest.mark.parametrize("cls", BATCH)
def test_error_dtype_device_layout(cls):
    q, yq, r, yr = malformed()
    with pytest.raises(TypeError, match=r"argument 'x' must be float32 or float64"):
        cls()(q.half(), yq, ref=r, ref_labels=yr)
    with pytest.raises(TypeError, match=r"argument 'ref' must be float32 or float64"):
        cls()(q, yq, ref=r.half(), ref_labels=yr)
    with pytest.raises(TypeError, match=r"argument 'ref' has dtype Double but the first input has Float"):
        cls()(q, yq, ref=r.double(), ref_labels=yr)
    with pytest.raises(ValueError, match=r"argument 'ref' is on device meta"):
        cls()(q, yq, ref=torch.empty(6, 4, device="meta"), ref_labels=yr)
    with pytest.raises(ValueError, match=r"argument 'ref_labels' is on device meta"):
        cls()(q, yq, ref=r, ref_labels=torch.empty(6, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match=r"argument 'ref' must be 2-D"):
        cls()(q, yq, ref=r[0], ref_labels=yr)
    with pytest.raises(ValueError, match=r"argument 'ref' must have a contiguous inner dimension"):
        cls()(q, yq, ref=torch.randn(4, 6).t(), ref_labels=yr)
    with pytest.raises(ValueError, match=r"'labels' or 'ref_labels' contains NaN"):
        cls()(q, yq, ref=r, ref_labels=torch.tensor([0.0, float("nan")] * 3))


@pytest.mark.parametrize("cls", BATCH)
def test_errors_write_nothing_and_leave_module_usable(cls):
    loss = cls()
    q, yq, r, yr = malformed()
    q.requires_grad_(True)
    r.requires_grad_(True)
    with pytest.raises(ValueError):
        loss(q, yq, ref=r, ref_labels=yr[:5])
    assert q.grad is None and r.grad is None
    loss(q, yq, ref=r, ref_labels=yr).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(r.grad).all()
