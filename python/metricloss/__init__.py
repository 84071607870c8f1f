"""metricloss for PyTorch: the fused metric-learning losses of the metricloss C++ library as
``torch.nn.Module`` losses, built from source against the installed torch.

Every loss is backed by one autograd Function (a torch::autograd::Function in
csrc/binding.cpp, so that neither pass runs Python): its forward runs metricloss's SIMD path
(``metricloss::simd``) once, computing the loss and, for the inputs autograd wants (none under
torch.no_grad()), the gradient; backward scales that saved gradient by the incoming
grad_output (no second pass). The losses are once differentiable. CPU tensors, float32 or
float64; rows may be strided (any row stride >= D, inner stride 1) and are read without a
copy. CUDA tensors (where the binding was built against a torch with CUDA: ``cuda_built()``)
run the same losses on ``metricloss::cuda`` on torch's current stream, without a
synchronisation; the batch form and ``ref=`` (no ``group=`` yet), and with
``normalize=True`` a zero row gives a NaN loss there instead of a ValueError. Labels: any integer, bool or floating dtype (floating labels are mapped to classes by
equality; NaN labels are rejected).

    import metricloss
    loss_fn = metricloss.BatchTripletLoss(margin=0.2, mining="hard")
    loss = loss_fn(embeddings, labels)
    loss.backward()

The batch losses (BatchTripletLoss, LiftedStructureLoss, BatchContrastiveLoss,
MultiSimilarityLoss) take ``normalize=True`` to L2-normalise the rows inside the call (the
gradient chained through; a zero row is a ValueError), a process group (``group=``: the loss of
the global batch over the ranks of torch.distributed, see metricloss.distributed), and a
reference set (e.g. a memory of past
batches): ``loss_fn(q, labels_q, ref=r, ref_labels=yr, self_index=None)``. Anchors are the rows
of q, positives and negatives the rows of r (the same dtype and D): P(a) = {j : yr[j] ==
labels_q[a], j != self_index[a]}, Neg(a) = {j : yr[j] != labels_q[a]}. self_index (an integer
tensor of length N_q, or None) gives the row of r that is q[a] itself, or -1. Gradients flow
to q and to r, as each requires. With ``group=`` too, q is this rank's queries and r must be
the same on every rank (metricloss.distributed). The C++ layer's messages call these q,
labels_q, r, labels_r.

Gradient memory: a loss keeps the memory of its CPU gradients once nothing holds them (x.grad
set to None, or the layer below done with them in backward) and hands it to its next call of
that size, at most 8 blocks a loss, freed with the loss (and with the last gradient on
them). torch's CPU allocator returns large blocks to the system, and taking them back costs a
page fault per 4 KiB (18 ms for a 32 MiB gradient on the machine the benchmarks ran on). Such
a gradient's storage has a fixed size: ``resize_`` to a larger shape raises.

Options have the C++ names and can be changed between calls (``loss_fn.margin = 0.3``).
Malformed arguments raise TypeError (dtype) or ValueError (device, shape, strides, values),
naming the argument; errors of the C++ layer are ValueError carrying its message.
"""
import torch

try:
    from . import _C
except ImportError as error:  # the sources (python/metricloss) rather than the installed package
    raise ImportError(
        f"metricloss: the compiled extension is missing next to {__file__} ({error}). Install "
        "the package from the repository root with `python3 -m pip install --no-build-isolation "
        "./python`, and do not run Python from inside python/, where the sources shadow it") from error

__all__ = ["ContrastiveLoss", "TripletLoss", "BatchTripletLoss", "LiftedStructureLoss",
           "BatchContrastiveLoss", "MultiSimilarityLoss", "cuda_built"]
__version__ = "0.1.0"

def cuda_built():
    """Whether this build of the binding takes CUDA tensors (it was built against a torch with
    CUDA, by nvcc); False on a CPU-only torch such as Debian's."""
    return _C.cuda_built()


# The C++ enums' values (static_asserts in csrc/kernels_common.hpp keep them in sync).
_FORMS = {"hadsell": 0, "legacy": 1}
_DISTANCES = {"euclidean": 0, "squared_euclidean": 1}
_MININGS = {"all": 0, "hard": 1, "semihard": 2}
_REDUCTIONS = {"nonzero_mean": 0, "mean": 1}


def _option(loss, name, value, table):
    if value not in table:
        choices = ", ".join(repr(k) for k in table)
        raise ValueError(f"metricloss.{loss}: option '{name}' must be one of {choices}, got {value!r}")
    return table[value]


def _as_label_tensor(loss, name, value):
    if value is None:
        raise TypeError(f"metricloss.{loss}: argument '{name}' is required")
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dim() != 1:
        raise ValueError(f"metricloss.{loss}: argument '{name}' must be 1-D, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise TypeError(f"metricloss.{loss}: argument '{name}' must be an integer, bool or "
                        f"floating tensor, got {t.dtype}")
    return t


def _labels(loss, *named):
    """Labels as int64 tensors with the same equality classes (int64 passes through with its
    stride; other integer types are widened; floating labels are mapped to class indices
    jointly, so that labels_a[i] == labels_b[i] is preserved)."""
    tensors = [_as_label_tensor(loss, name, value) for name, value in named]
    for (name, _), t in zip(named[1:], tensors[1:]):  # (the C++ layer checks them against x)
        if t.device != tensors[0].device:
            raise ValueError(f"metricloss.{loss}: argument '{name}' is on device {t.device} but "
                             f"'{named[0][0]}' is on {tensors[0].device}; every tensor of a call "
                             "must be on one device")
    if not any(t.is_floating_point() for t in tensors):
        return [t if t.dtype == torch.int64 else t.to(torch.int64) for t in tensors]
    joined = torch.cat([t.to(torch.float64) for t in tensors])
    if torch.isnan(joined).any():
        names = " or ".join(f"'{name}'" for name, _ in named)
        raise ValueError(f"metricloss.{loss}: argument {names} contains NaN labels")
    ids = torch.unique(joined, return_inverse=True)[1]
    return list(torch.split(ids, [t.numel() for t in tensors]))


def _reference(loss, labels, ref, ref_labels, self_index):
    """labels alone, or labels with a reference set, prepared for the kernel: (labels, ref,
    ref_labels, self_index), the last three None without ref."""
    if ref is None:
        if ref_labels is not None or self_index is not None:
            raise TypeError(f"metricloss.{loss}: 'ref_labels' and 'self_index' need 'ref' "
                            "(the reference set's embeddings)")
        return _labels(loss, ("labels", labels)) + [None, None, None]
    ref = _embedding(loss, "ref", ref)
    if ref_labels is None:
        raise TypeError(f"metricloss.{loss}: argument 'ref' needs 'ref_labels' (the labels of its rows)")
    labels, ref_labels = _labels(loss, ("labels", labels), ("ref_labels", ref_labels))
    if self_index is not None:
        self_index = _as_label_tensor(loss, "self_index", self_index)
        if self_index.is_floating_point() or self_index.dtype == torch.bool:
            raise TypeError(f"metricloss.{loss}: argument 'self_index' must be an integer tensor, "
                            f"got {self_index.dtype}")
        self_index = self_index.to(torch.int64)  # its length and range: checked by the C++ layer
    return [labels, ref, ref_labels, self_index]


def _similarity(loss, sim):
    """sim as int64 flags: nonzero after truncation to an integer = similar (Caffe)."""
    t = _as_label_tensor(loss, "sim", sim)
    if t.dtype == torch.int64:
        return t
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"metricloss.{loss}: argument 'sim' contains non-finite values")
    return t.to(torch.int64)  # truncation toward zero, as static_cast<long long>


def _group(loss, group):
    """The C++ group of a metricloss.distributed.group, or None."""
    if group is None:
        return None
    c = getattr(group, "_c", None)
    if not isinstance(c, _C.Group):
        raise TypeError(f"metricloss.{loss}: argument 'group' must be a "
                        f"metricloss.distributed.group, got {type(group).__name__}")
    return c


def _embedding(loss, name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"metricloss.{loss}: argument '{name}' must be a torch.Tensor, "
                        f"got {type(value).__name__}")
    return value


class _Loss(torch.nn.Module):
    """Common part: the C++ functor (one per module instance; it keeps scratch memory and is
    not part of the module's state: a copy or an unpickled module gets a fresh one)."""

    _kernel_type = None

    def __init__(self):
        super().__init__()
        self._kernel = type(self)._kernel_type()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_kernel", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._kernel = type(self)._kernel_type()

    def __deepcopy__(self, memo):
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        import copy
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone


class ContrastiveLoss(_Loss):
    """Contrastive loss over pairs (a_i, b_i), d_i = ||a_i - b_i||:
    L = 1/(2N) sum_i [similar_i d_i^2 + (1 - similar_i) h_i],
    h_i = max(margin - d_i, 0)^2 (form="hadsell") or max(margin - d_i^2, 0) (form="legacy").

    Call as ``loss(a, b, sim)`` (sim nonzero = similar pair, Caffe's convention) or
    ``loss(a, b, labels_a=ya, labels_b=yb)`` (similar when ya[i] == yb[i])."""

    _kernel_type = _C.Contrastive

    def __init__(self, margin=1.0, form="hadsell"):
        super().__init__()
        self.margin = float(margin)
        _option("ContrastiveLoss", "form", form, _FORMS)
        self.form = form

    def forward(self, a, b, sim=None, *, labels_a=None, labels_b=None):
        name = "ContrastiveLoss"
        a, b = _embedding(name, "a", a), _embedding(name, "b", b)
        form = _option(name, "form", self.form, _FORMS)
        if sim is not None:
            if labels_a is not None or labels_b is not None:
                raise ValueError(f"metricloss.{name}: pass either 'sim' or 'labels_a' and 'labels_b', not both")
            sim, labels_a, labels_b = _similarity(name, sim), None, None
        else:
            if labels_a is None or labels_b is None:
                raise TypeError(f"metricloss.{name}: pass 'sim', or both 'labels_a' and 'labels_b'")
            labels_a, labels_b = _labels(name, ("labels_a", labels_a), ("labels_b", labels_b))
        return self._kernel.loss(a, b, sim, labels_a, labels_b, float(self.margin), form)

    def extra_repr(self):
        return f"margin={self.margin}, form={self.form!r}"


class TripletLoss(_Loss):
    """Explicit triplets: L = 1/N sum_i max(d(a_i, p_i) - d(a_i, n_i) + margin, 0), d squared
    Euclidean (FaceNet, the default) or Euclidean. Call as ``loss(anchor, positive, negative)``."""

    _kernel_type = _C.Triplet

    def __init__(self, margin=0.2, distance="squared_euclidean"):
        super().__init__()
        self.margin = float(margin)
        _option("TripletLoss", "distance", distance, _DISTANCES)
        self.distance = distance

    def forward(self, anchor, positive, negative):
        name = "TripletLoss"
        anchor = _embedding(name, "anchor", anchor)
        positive = _embedding(name, "positive", positive)
        negative = _embedding(name, "negative", negative)
        distance = _option(name, "distance", self.distance, _DISTANCES)
        return self._kernel.loss(anchor, positive, negative, float(self.margin), distance)

    def extra_repr(self):
        return f"margin={self.margin}, distance={self.distance!r}"


class BatchTripletLoss(_Loss):
    """Triplet loss with online mining over one labelled batch (mining="hard": batch-hard,
    "semihard": FaceNet / TF Addons, "all": mean over the triplets with a positive hinge);
    soft_margin=True replaces the hinge by softplus. Call as ``loss(x, labels)``, or against a
    reference set as ``loss(q, labels_q, ref=r, ref_labels=yr, self_index=None)``."""

    _kernel_type = _C.BatchTriplet

    def __init__(self, margin=0.2, mining="hard", distance="euclidean", soft_margin=False,
                 normalize=False):
        super().__init__()
        self.margin = float(margin)
        _option("BatchTripletLoss", "mining", mining, _MININGS)
        _option("BatchTripletLoss", "distance", distance, _DISTANCES)
        self.mining = mining
        self.distance = distance
        self.soft_margin = bool(soft_margin)
        self.normalize = bool(normalize)

    def forward(self, x, labels, *, ref=None, ref_labels=None, self_index=None, group=None):
        name = "BatchTripletLoss"
        x = _embedding(name, "x", x)
        labels, ref, ref_labels, self_index = _reference(name, labels, ref, ref_labels, self_index)
        mining = _option(name, "mining", self.mining, _MININGS)
        distance = _option(name, "distance", self.distance, _DISTANCES)
        return self._kernel.loss(x, labels, ref, ref_labels, self_index, float(self.margin),
                                 mining, distance, bool(self.soft_margin), bool(self.normalize),
                                 _group(name, group))

    def extra_repr(self):
        return (f"margin={self.margin}, mining={self.mining!r}, distance={self.distance!r}, "
                f"soft_margin={self.soft_margin}, normalize={self.normalize}")


class LiftedStructureLoss(_Loss):
    """Lifted structured loss (Song et al. 2016) as the Caffe layer computes it, with exact
    distances. Call as ``loss(x, labels)``, or against a reference set as
    ``loss(q, labels_q, ref=r, ref_labels=yr, self_index=None)``."""

    _kernel_type = _C.Lifted

    def __init__(self, margin=1.0, normalize=False):
        super().__init__()
        self.margin = float(margin)
        self.normalize = bool(normalize)

    def forward(self, x, labels, *, ref=None, ref_labels=None, self_index=None, group=None):
        name = "LiftedStructureLoss"
        x = _embedding(name, "x", x)
        labels, ref, ref_labels, self_index = _reference(name, labels, ref, ref_labels, self_index)
        return self._kernel.loss(x, labels, ref, ref_labels, self_index, float(self.margin),
                                 bool(self.normalize), _group(name, group))

    def extra_repr(self):
        return f"margin={self.margin}, normalize={self.normalize}"


class BatchContrastiveLoss(_Loss):
    """Contrastive loss over every pair of a labelled batch (pytorch-metric-learning's
    ContrastiveLoss; Hadsell et al. 2006 with linear hinges), d Euclidean or squared Euclidean:
    positive pairs (same label, i != j) [d_ij - pos_margin]+, negative pairs
    [neg_margin - d_ij]+; L = (mean of the positive terms) + (mean of the negative terms), each
    over the terms > 0 (reduction="nonzero_mean", PML's AvgNonZeroReducer) or over every pair
    of its side ("mean"), a side without terms adding 0. normalize=True (PML's default) takes
    the L2-normalised rows. Call as ``loss(x, labels)``, or against a reference set as
    ``loss(q, labels_q, ref=r, ref_labels=yr, self_index=None)``."""

    _kernel_type = _C.BatchContrastive

    def __init__(self, pos_margin=0.0, neg_margin=1.0, distance="euclidean",
                 reduction="nonzero_mean", normalize=False):
        super().__init__()
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)
        _option("BatchContrastiveLoss", "distance", distance, _DISTANCES)
        _option("BatchContrastiveLoss", "reduction", reduction, _REDUCTIONS)
        self.distance = distance
        self.reduction = reduction
        self.normalize = bool(normalize)

    def forward(self, x, labels, *, ref=None, ref_labels=None, self_index=None, group=None):
        name = "BatchContrastiveLoss"
        x = _embedding(name, "x", x)
        labels, ref, ref_labels, self_index = _reference(name, labels, ref, ref_labels, self_index)
        distance = _option(name, "distance", self.distance, _DISTANCES)
        reduction = _option(name, "reduction", self.reduction, _REDUCTIONS)
        return self._kernel.loss(x, labels, ref, ref_labels, self_index, float(self.pos_margin),
                                 float(self.neg_margin), distance, reduction, bool(self.normalize),
                                 _group(name, group))

    def extra_repr(self):
        return (f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, "
                f"distance={self.distance!r}, reduction={self.reduction!r}, "
                f"normalize={self.normalize}")


class MultiSimilarityLoss(_Loss):
    """Multi-similarity loss (Wang et al. 2019) as pytorch-metric-learning's MultiSimilarityLoss
    with its MultiSimilarityMiner(epsilon), on S_ij = <x_i, x_j> (the cosine similarity with
    normalize=True, PML's default). Anchor i keeps the positives p with
    S_ip < max_n S_in + epsilon and the negatives n with S_in > min_p S_ip - epsilon
    (epsilon=float("inf") keeps every pair: the loss without a miner);
    L = 1/N sum_i [(1/alpha) log(1 + sum_p e^{-alpha (S_ip - base)})
                   + (1/beta) log(1 + sum_n e^{beta (S_in - base)})].
    Call as ``loss(x, labels)``, or against a reference set as
    ``loss(q, labels_q, ref=r, ref_labels=yr, self_index=None)``."""

    _kernel_type = _C.MultiSimilarity

    def __init__(self, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, normalize=False):
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)
        self.epsilon = float(epsilon)
        self.normalize = bool(normalize)

    def forward(self, x, labels, *, ref=None, ref_labels=None, self_index=None, group=None):
        name = "MultiSimilarityLoss"
        x = _embedding(name, "x", x)
        labels, ref, ref_labels, self_index = _reference(name, labels, ref, ref_labels, self_index)
        return self._kernel.loss(x, labels, ref, ref_labels, self_index, float(self.alpha),
                                 float(self.beta), float(self.base), float(self.epsilon),
                                 bool(self.normalize), _group(name, group))

    def extra_repr(self):
        return (f"alpha={self.alpha}, beta={self.beta}, base={self.base}, "
                f"epsilon={self.epsilon}, normalize={self.normalize}")
