"""Malformed arguments raise a clear exception naming the argument; errors of the C++ layer
surface as ValueError with the C++ message."""
import pytest
import torch

import metricloss


def x_and_labels(n=8, d=4, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype), torch.arange(n) % 2


BATCH = [metricloss.BatchTripletLoss, metricloss.LiftedStructureLoss,
         metricloss.BatchContrastiveLoss, metricloss.MultiSimilarityLoss]


@pytest.mark.parametrize("cls", BATCH)
@pytest.mark.parametrize("dtype", [torch.float16, torch.int64, torch.bfloat16])
def test_wrong_dtype(cls, dtype):
    x, y = x_and_labels()
    with pytest.raises(TypeError, match=r"argument 'x' must be float32 or float64"):
        cls()(x.to(dtype), y)


def test_mixed_dtypes_name_the_argument():
    a = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"argument 'b' has dtype Double"):
        metricloss.ContrastiveLoss()(a, a.double(), torch.ones(4))
    with pytest.raises(TypeError, match=r"argument 'negative' has dtype Double"):
        metricloss.TripletLoss()(a, a, a.double())


def test_not_a_tensor():
    with pytest.raises(TypeError, match=r"argument 'x' must be a torch.Tensor"):
        metricloss.BatchTripletLoss()([[1.0, 2.0]], [0])


@pytest.mark.parametrize("cls", BATCH)
def test_wrong_device(cls):
    """A device this build does not take (meta stands in for CUDA on a CPU-only torch)."""
    x = torch.empty(8, 4, device="meta")
    with pytest.raises(ValueError, match=r"argument 'x' is on device meta; this build of metricloss takes CPU tensors"):
        cls()(x, torch.arange(8))
    with pytest.raises(ValueError, match=r"argument 'labels' is on device meta"):
        cls()(torch.randn(8, 4), torch.empty(8, dtype=torch.int64, device="meta"))


def test_cuda_built_matches_torch():
    """The CUDA path is built exactly where torch has CUDA (setup.py), unless left out."""
    import os
    if os.environ.get("METRICLOSS_CUDA", "1") != "0" and torch.version.cuda is not None:
        pytest.skip("torch has CUDA: whether nvcc was found decides")
    assert metricloss.cuda_built() is False


@pytest.mark.skipif(not torch.cuda.is_available() or metricloss.cuda_built(),
                    reason="needs a CUDA device and a build without the CUDA path")
def test_cuda_tensor_without_the_cuda_path():
    x = torch.randn(8, 4, device="cuda")
    with pytest.raises(ValueError, match=r"argument 'x' is on device cuda:0; .*CPU tensors only"):
        metricloss.BatchTripletLoss()(x, torch.arange(8, device="cuda"))


@pytest.mark.parametrize("cls", BATCH)
def test_non_contiguous_inner_dimension(cls):
    x, y = x_and_labels(n=8, d=6)
    with pytest.raises(ValueError, match=r"argument 'x' must have a contiguous inner dimension"):
        cls()(x[:, ::2], y)
    with pytest.raises(ValueError, match=r"argument 'x' must have a contiguous inner dimension"):
        cls()(torch.randn(6, 8).t(), y)


def test_overlapping_rows():
    x = torch.randn(1, 4).expand(8, 4)
    with pytest.raises(ValueError, match=r"argument 'x' has overlapping rows"):
        metricloss.BatchTripletLoss()(x, torch.arange(8))


@pytest.mark.parametrize("cls", BATCH)
@pytest.mark.parametrize("shape", [(8,), (2, 4, 4), ()])
def test_dims(cls, shape):
    with pytest.raises(ValueError, match=r"argument 'x' must be 2-D"):
        cls()(torch.randn(shape), torch.arange(8))


def test_shape_mismatch_from_cpp():
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"ContrastiveLoss.*'b'"):
        metricloss.ContrastiveLoss()(a, b, torch.ones(4))
    with pytest.raises(ValueError, match=r"TripletLoss.*'positive'"):
        metricloss.TripletLoss()(a, torch.randn(4, 2), a)
    with pytest.raises(ValueError, match=r"ContrastiveLoss.*'sim'"):
        metricloss.ContrastiveLoss()(a, a, torch.ones(3))


@pytest.mark.parametrize("cls", BATCH)
def test_labels(cls):
    x, _ = x_and_labels()
    with pytest.raises(ValueError, match=cls.__name__) as info:
        cls()(x, torch.arange(7))
    assert "labels" in str(info.value)
    with pytest.raises(ValueError, match=r"argument 'labels' must be 1-D"):
        cls()(x, torch.zeros(8, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"argument 'labels' contains NaN"):
        cls()(x, torch.tensor([0.0, float("nan")] * 4))


def test_empty_batch_from_cpp():
    with pytest.raises(ValueError, match=r"BatchTripletLoss.*'x'"):
        metricloss.BatchTripletLoss()(torch.randn(0, 4), torch.zeros(0, dtype=torch.int64))


@pytest.mark.parametrize("margin", [-1.0, float("nan"), float("inf")])
def test_bad_margin_from_cpp(margin):
    x, y = x_and_labels()
    with pytest.raises(ValueError, match=r"margin"):
        metricloss.BatchTripletLoss(margin=margin)(x, y)
    with pytest.raises(ValueError, match=r"margin"):
        metricloss.LiftedStructureLoss(margin=margin)(x, y)


def test_bad_options():
    with pytest.raises(ValueError, match=r"option 'mining' must be one of 'all', 'hard', 'semihard'"):
        metricloss.BatchTripletLoss(mining="easy")
    with pytest.raises(ValueError, match=r"option 'distance'"):
        metricloss.TripletLoss(distance="cosine")
    with pytest.raises(ValueError, match=r"option 'form'"):
        metricloss.ContrastiveLoss(form="caffe")
    loss = metricloss.BatchTripletLoss()
    loss.mining = "hardest"  # changed between steps: checked at the call
    with pytest.raises(ValueError, match=r"option 'mining'"):
        loss(*x_and_labels())


def test_contrastive_call_forms():
    a = torch.randn(4, 3)
    loss = metricloss.ContrastiveLoss()
    with pytest.raises(TypeError, match=r"pass 'sim', or both 'labels_a' and 'labels_b'"):
        loss(a, a)
    with pytest.raises(ValueError, match=r"not both"):
        loss(a, a, torch.ones(4), labels_a=torch.ones(4), labels_b=torch.ones(4))
    with pytest.raises(ValueError, match=r"argument 'sim' contains non-finite"):
        loss(a, a, torch.tensor([1.0, float("nan"), 0.0, 1.0]))


def test_errors_leave_module_usable():
    loss = metricloss.BatchTripletLoss()
    with pytest.raises(ValueError):
        loss(torch.randn(4, 3), torch.arange(3))
    x = torch.randn(8, 3, requires_grad=True)
    loss(x, torch.arange(8) % 2).backward()
    assert torch.isfinite(x.grad).all()
