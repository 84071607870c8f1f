"""CUDA tensors (a binding built against a torch with CUDA, run where a device is): every loss's
batch form equals the CPU call in float64, through autograd, on torch's current stream; the
batch losses with normalize=True; a zero row under normalize gives a NaN loss and NaN gradients
(no synchronisation to raise); the batch losses against a reference set (self_index on either
device, normalize too) equal the CPU call; a self row with another label, or a zero row of ref
under normalize, gives NaN; mixed devices and groups are ValueErrors."""
import math

import pytest
import torch

import metricloss

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and metricloss.cuda_built()),
                                reason="needs a CUDA device and the binding's CUDA path")

BATCH = [
    lambda: metricloss.BatchTripletLoss(mining="hard"),
    lambda: metricloss.BatchTripletLoss(mining="semihard", distance="squared_euclidean"),
    lambda: metricloss.BatchTripletLoss(mining="all", soft_margin=True),
    lambda: metricloss.LiftedStructureLoss(),
    lambda: metricloss.BatchContrastiveLoss(pos_margin=0.1, neg_margin=1.8),
    lambda: metricloss.MultiSimilarityLoss(beta=10.0, epsilon=0.3),
]


def both(make, *inputs):
    """The loss and input gradients of make() on CPU tensors and on CUDA copies."""
    out = []
    for device in ("cpu", "cuda"):
        tensors = [t.detach().to(device).requires_grad_(t.is_floating_point()) for t in inputs]
        loss = make()(*tensors)
        loss.backward()
        out.append((loss.item(), [t.grad.cpu() for t in tensors if t.is_floating_point()]))
    return out


def assert_same(cpu, cuda, tol=1e-10):
    assert math.isclose(cuda[0], cpu[0], rel_tol=tol, abs_tol=1e-12)
    for g_cpu, g_cuda in zip(cpu[1], cuda[1]):
        scale = max(g_cpu.abs().max().item(), 1e-30)
        assert (g_cuda - g_cpu).abs().max().item() <= tol * scale


@pytest.mark.parametrize("make", BATCH)
@pytest.mark.parametrize("normalize", [False, True])
def test_batch_losses_match_cpu(make, normalize):
    x = torch.randn(40, 24, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (40,))

    def configured():
        loss = make()
        loss.normalize = normalize
        return loss

    cpu, cuda = both(configured, x, y)
    assert_same(cpu, cuda)


def test_pair_and_triplet_losses_match_cpu():
    a, b, c = (torch.randn(32, 16, dtype=torch.float64) for _ in range(3))
    sim = torch.randint(0, 2, (32,))
    assert_same(*both(lambda: metricloss.ContrastiveLoss(margin=2.0), a, b, sim))
    assert_same(*both(lambda: metricloss.TripletLoss(margin=0.5), a, b, c))


def test_float32_and_strided_rows():
    base = torch.randn(40, 30, device="cuda")
    x = base[:, :24].clone()
    strided = base[:, 3:27]  # row stride 30, inner stride 1: read in place
    y = torch.randint(0, 4, (40,), device="cuda")
    loss_fn = metricloss.BatchTripletLoss()
    assert torch.allclose(loss_fn(strided, y), loss_fn(strided.contiguous(), y))
    assert loss_fn(x, y).device.type == "cuda"


def test_zero_row_under_normalize_gives_nan():
    x = torch.randn(8, 4, device="cuda", dtype=torch.float64)
    x[2] = 0
    x.requires_grad_(True)
    loss = metricloss.BatchTripletLoss(normalize=True)(x, torch.arange(8, device="cuda") % 2)
    assert torch.isnan(loss).item()
    loss.backward()
    assert torch.isnan(x.grad).all().item()


def test_mixed_devices_reference_sets_and_groups_are_errors():
    x = torch.randn(8, 4, device="cuda")
    with pytest.raises(ValueError, match=r"argument 'labels' is on device cpu but the first input is on cuda:0"):
        metricloss.BatchTripletLoss()(x, torch.arange(8))
    with pytest.raises(ValueError, match=r"argument 'ref' is on device cpu but the first input is on cuda:0"):
        metricloss.BatchTripletLoss()(x, torch.arange(8, device="cuda"), ref=x.cpu(),
                                      ref_labels=torch.arange(8))


REFERENCE = [
    lambda: metricloss.BatchTripletLoss(mining="hard"),
    lambda: metricloss.BatchTripletLoss(mining="semihard", distance="squared_euclidean"),
    lambda: metricloss.BatchTripletLoss(mining="all", soft_margin=True),
    lambda: metricloss.LiftedStructureLoss(),
    lambda: metricloss.BatchContrastiveLoss(),
    lambda: metricloss.BatchContrastiveLoss(pos_margin=0.5, neg_margin=4.0, reduction="mean"),
    lambda: metricloss.MultiSimilarityLoss(),
    lambda: metricloss.MultiSimilarityLoss(alpha=1.0, beta=10.0, base=0.2, epsilon=math.inf),
    lambda: metricloss.BatchTripletLoss(mining="all", normalize=True),
    lambda: metricloss.LiftedStructureLoss(normalize=True),
    lambda: metricloss.BatchContrastiveLoss(normalize=True),
    lambda: metricloss.MultiSimilarityLoss(normalize=True),
]


@pytest.mark.parametrize("make", REFERENCE)
@pytest.mark.parametrize("self_on", ["none", "cpu", "cuda"])
def test_reference_sets_match_cpu(make, self_on):
    q = torch.randn(24, 16, dtype=torch.float64)
    r = torch.randn(60, 16, dtype=torch.float64)
    yq = torch.randint(0, 4, (24,))
    yr = torch.randint(0, 4, (60,))
    self_index = None
    if self_on != "none":  # query 3 is row 7 of r
        r[7] = q[3]
        yr[7] = yq[3]
        self_index = torch.full((24,), -1, dtype=torch.int64)
        self_index[3] = 7
    out = []
    for device in ("cpu", "cuda"):
        qd = q.to(device).requires_grad_()
        rd = r.to(device).requires_grad_()
        si = None if self_index is None else self_index.to("cpu" if self_on == "cpu" else device)
        loss = make()(qd, yq.to(device), ref=rd, ref_labels=yr.to(device), self_index=si)
        assert loss.device.type == device
        loss.backward()
        out.append((loss.item(), [qd.grad.cpu(), rd.grad.cpu()]))
    assert_same(out[0], out[1])


def test_reference_set_self_row_with_another_label_gives_nan():
    q = torch.randn(6, 4, device="cuda", requires_grad=True)
    r = torch.randn(9, 4, device="cuda")
    yq = torch.tensor([0, 1, 0, 1, 0, 1], device="cuda")
    yr = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0], device="cuda")
    loss = metricloss.LiftedStructureLoss()(q, yq, ref=r, ref_labels=yr,
                                             self_index=torch.tensor([1, -1, -1, -1, -1, -1]))
    assert torch.isnan(loss).item()
    loss.backward()
    assert torch.isnan(q.grad).all().item()


def test_reference_set_zero_row_under_normalize_gives_nan():
    q = torch.randn(6, 4, device="cuda", dtype=torch.float64, requires_grad=True)
    r = torch.randn(9, 4, device="cuda", dtype=torch.float64)
    r[5] = 0
    r.requires_grad_(True)
    yq = torch.tensor([0, 1, 0, 1, 0, 1], device="cuda")
    yr = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0], device="cuda")
    loss = metricloss.MultiSimilarityLoss(normalize=True)(q, yq, ref=r, ref_labels=yr)
    assert torch.isnan(loss).item()
    loss.backward()
    assert torch.isnan(q.grad).all().item()
    assert torch.isnan(r.grad).all().item()


def test_runs_on_the_current_stream():
    x = torch.randn(64, 32, device="cuda")
    y = torch.randint(0, 8, (64,), device="cuda")
    expected = metricloss.MultiSimilarityLoss()(x, y).item()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loss = metricloss.MultiSimilarityLoss()(x, y)
    stream.synchronize()
    assert loss.item() == expected
