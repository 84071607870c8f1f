"""BatchContrastiveLoss and MultiSimilarityLoss (issue 17), and normalize=True on every batch
loss: gradcheck in float64 for every option (batch form; reference form for q and r), the
reference form against API.md's formulas (tests/reference/pml_losses.py's api_* functions),
options, repr, copies, and malformed options and rows."""
import copy
import math
import pickle

import pytest
import torch
from torch.autograd import gradcheck

import metricloss
from conftest import labels_pk, pml

INF = math.inf
DT = torch.float64


def rand(*shape, scale=1.0):
    return (scale * torch.randn(*shape, dtype=DT)).requires_grad_(True)


# Every option of the two losses, each with the API.md formula's keywords. Margins and scales
# keep the random terms away from the hinges' kinks and the miner's boundaries.
CONTRASTIVE = [dict(pos_margin=pm, neg_margin=nm, distance=dist, reduction=red, normalize=norm)
               for red in ("nonzero_mean", "mean") for dist in ("euclidean", "squared_euclidean")
               for norm in (False, True)
               for pm, nm in ([(0.0, 1.0)] if norm else [(0.5, 2.5)])]
MULTI_SIMILARITY = [dict(alpha=a, beta=b, base=base, epsilon=eps, normalize=norm)
                    for norm in (False, True) for eps in (0.1, INF)
                    for a, b, base in ([(2.0, 50.0, 0.5)] if norm else [(2.0, 10.0, 0.2)])]
ALL_OPTIONS = ([(metricloss.BatchContrastiveLoss, pml.api_batch_contrastive_loss, o) for o in CONTRASTIVE]
               + [(metricloss.MultiSimilarityLoss, pml.api_multi_similarity_loss, o)
                  for o in MULTI_SIMILARITY])


def option_id(case):
    cls, _, options = case
    return cls.__name__[:-4] + "-" + "-".join(f"{k}={v}" for k, v in options.items())


def scale_of(options):
    """Unnormalised multi-similarity on rows of norm ~0.6: S of order 0.3, e^{beta S} moderate."""
    return 0.3 if "alpha" in options and not options["normalize"] else 1.0


@pytest.mark.parametrize("case", ALL_OPTIONS, ids=option_id)
def test_gradcheck_batch(case):
    cls, _, options = case
    loss = cls(**options)
    x, y = rand(12, 4, scale=scale_of(options)), labels_pk(12, 3)
    assert loss(x, y).item() > 0
    assert gradcheck(lambda x: loss(x, y), (x,))


def reference_case(scale=1.0, nq=9, nr=13, d=4):
    """q, r, their labels (3 classes) and a self_index: every other query has a row of r with
    its label (exclusion is by index, not by value), the others -1."""
    q, r = rand(nq, d, scale=scale), rand(nr, d, scale=scale)
    yq, yr = torch.arange(nq) % 3, torch.arange(nr) % 3
    self_index = torch.tensor([a % 3 + 3 * ((a // 2) % 4) if a % 2 == 0 else -1 for a in range(nq)])
    assert (yr[self_index[self_index >= 0]] == yq[self_index >= 0]).all()
    return q, r, yq, yr, self_index


@pytest.mark.parametrize("with_self", [False, True])
@pytest.mark.parametrize("case", ALL_OPTIONS, ids=option_id)
def test_gradcheck_reference(case, with_self):
    cls, _, options = case
    loss = cls(**options)
    q, r, yq, yr, self_index = reference_case(scale_of(options))
    s = self_index if with_self else None
    assert loss(q, yq, ref=r, ref_labels=yr, self_index=s).item() > 0
    assert gradcheck(lambda q, r: loss(q, yq, ref=r, ref_labels=yr, self_index=s), (q, r))


@pytest.mark.parametrize("cls", [metricloss.BatchTripletLoss, metricloss.LiftedStructureLoss])
@pytest.mark.parametrize("with_ref", [False, True])
def test_gradcheck_normalize_on_triplet_and_lifted(cls, with_ref):
    loss = cls(normalize=True, **({"mining": "all", "soft_margin": True} if cls is metricloss.BatchTripletLoss else {}))
    if with_ref:
        q, r, yq, yr, self_index = reference_case()
        assert gradcheck(lambda q, r: loss(q, yq, ref=r, ref_labels=yr, self_index=self_index), (q, r))
    else:
        x, y = rand(12, 4), labels_pk(12, 3)
        assert gradcheck(lambda x: loss(x, y), (x,))


def close(value, reference, rel=1e-12):
    scale = max(reference.abs().max().item(), 1e-300)
    return (value - reference).abs().max().item() <= rel * scale


def assert_matches(ours_fn, ref_fn, inputs, rel=1e-12):
    """Loss and the gradient of every input within rel (gradients relative to the largest
    entry over all inputs), float64."""
    ours_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    ours, ref = ours_fn(*ours_in), ref_fn(*ref_in)
    ours.backward()
    ref.backward()
    assert close(ours.detach(), ref.detach(), rel), (ours.item(), ref.item())
    scale = max(max(r.grad.abs().max().item() for r in ref_in), 1e-300)
    for o, r in zip(ours_in, ref_in):
        assert (o.grad - r.grad).abs().max().item() <= rel * scale


@pytest.mark.parametrize("seed", range(3), ids=lambda s: f"seed={s}")
@pytest.mark.parametrize("with_self", [False, True])
@pytest.mark.parametrize("case", ALL_OPTIONS, ids=option_id)
def test_reference_form_against_api(case, with_self, seed):
    """loss(q, labels_q, ref=r, ref_labels=yr, self_index) = API.md's formula; also the batch
    form (ref=None: R = Q, self = identity)."""
    torch.manual_seed(seed)
    cls, api, options = case
    loss = cls(**options)
    q, r, yq, yr, self_index = reference_case(scale_of(options), nq=11, nr=17, d=5)
    s = self_index if with_self else None
    assert_matches(lambda q, r: loss(q, yq, ref=r, ref_labels=yr, self_index=s),
                   lambda q, r: api(q, yq, r, yr, s, **options), [q, r])
    x, y = rand(14, 5, scale=scale_of(options)), labels_pk(14, 2)
    assert_matches(lambda x: loss(x, y), lambda x: api(x, y, **options), [x])


def test_options_and_repr():
    loss = metricloss.BatchContrastiveLoss()
    assert (loss.pos_margin, loss.neg_margin, loss.distance, loss.reduction, loss.normalize) == \
        (0.0, 1.0, "euclidean", "nonzero_mean", False)
    assert repr(loss) == ("BatchContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance='euclidean', "
                          "reduction='nonzero_mean', normalize=False)")
    loss = metricloss.MultiSimilarityLoss(epsilon=INF, normalize=True)
    assert (loss.alpha, loss.beta, loss.base, loss.epsilon, loss.normalize) == (2.0, 50.0, 0.5, INF, True)
    assert repr(loss) == "MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5, epsilon=inf, normalize=True)"
    assert "normalize=True" in repr(metricloss.BatchTripletLoss(normalize=True))
    assert repr(metricloss.LiftedStructureLoss(margin=0.5)) == "LiftedStructureLoss(margin=0.5, normalize=False)"
    assert {"BatchContrastiveLoss", "MultiSimilarityLoss"} <= set(metricloss.__all__)


def test_options_change_between_steps():
    x, y = torch.randn(16, 4, dtype=DT), labels_pk(16, 4)
    loss = metricloss.BatchContrastiveLoss()
    loss.reduction, loss.distance, loss.normalize, loss.neg_margin = "mean", "squared_euclidean", True, 1.5
    assert torch.equal(loss(x, y), metricloss.BatchContrastiveLoss(
        neg_margin=1.5, distance="squared_euclidean", reduction="mean", normalize=True)(x, y))
    loss = metricloss.MultiSimilarityLoss()
    loss.epsilon, loss.normalize, loss.beta = INF, True, 40.0
    assert torch.equal(loss(x, y), metricloss.MultiSimilarityLoss(beta=40.0, epsilon=INF, normalize=True)(x, y))
    loss = metricloss.LiftedStructureLoss()
    loss.normalize = True
    assert close(loss(x, y), metricloss.LiftedStructureLoss()(x / x.norm(dim=1, keepdim=True), y))


@pytest.mark.parametrize("make", [
    lambda: metricloss.BatchContrastiveLoss(pos_margin=0.1, neg_margin=0.9, distance="squared_euclidean",
                                            reduction="mean", normalize=True),
    lambda: metricloss.MultiSimilarityLoss(alpha=3.0, beta=40.0, base=0.4, epsilon=INF, normalize=True),
    lambda: metricloss.BatchTripletLoss(margin=0.3, normalize=True),
    lambda: metricloss.LiftedStructureLoss(normalize=True),
])
def test_copies_get_their_own_functor(make):
    loss = make()
    x, y = torch.randn(16, 4, dtype=DT), labels_pk(16, 4)
    for clone in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss)),
                  copy.deepcopy(torch.nn.Sequential(loss))[0]):
        assert clone._kernel is not loss._kernel and type(clone._kernel) is type(loss._kernel)
        assert repr(clone) == repr(loss) and torch.equal(clone(x, y), loss(x, y))


def test_normalize_is_scale_invariant():
    """normalize=True: the loss of the unit rows, a row's gradient orthogonal to it."""
    x, y = torch.randn(16, 4, dtype=DT), labels_pk(16, 4)
    scales = torch.rand(16, 1, dtype=DT) * 10 + 0.1
    for loss in (metricloss.BatchContrastiveLoss(normalize=True),
                 metricloss.MultiSimilarityLoss(normalize=True),
                 metricloss.BatchTripletLoss(normalize=True, mining="all"),
                 metricloss.LiftedStructureLoss(normalize=True)):
        xs = (x * scales).requires_grad_(True)
        value = loss(xs, y)
        value.backward()
        assert close(value.detach(), loss(x, y))
        assert (xs.grad * xs.detach()).sum(1).abs().max().item() <= 1e-13 * xs.grad.abs().max().item()


def test_float32():
    x, y = torch.rand(32, 8) * 2 - 1, labels_pk(32, 4)
    for loss in (metricloss.BatchContrastiveLoss(normalize=True), metricloss.MultiSimilarityLoss(normalize=True),
                 metricloss.BatchContrastiveLoss(reduction="mean"),
                 metricloss.MultiSimilarityLoss(beta=10.0, epsilon=INF)):
        xf = x.clone().requires_grad_(True)
        xd = x.double().requires_grad_(True)
        value, expected = loss(xf, y), loss(xd, y)
        value.backward()
        expected.backward()
        assert value.dtype == torch.float32 and xf.grad.dtype == torch.float32
        assert close(value.double().detach(), expected.detach(), 1e-5)
        assert close(xf.grad.double(), xd.grad, 1e-4)


def test_edge_layouts():
    """One class (no negatives), classes of one (no positives): that side adds 0."""
    x = torch.randn(6, 3, dtype=DT)
    one_class, singletons = torch.zeros(6, dtype=torch.int64), torch.arange(6)
    for loss in (metricloss.BatchContrastiveLoss(normalize=True), metricloss.BatchContrastiveLoss(reduction="mean")):
        for y in (one_class, singletons):
            assert_matches(lambda x: loss(x, y), lambda x: pml.api_batch_contrastive_loss(
                x, y, normalize=loss.normalize, reduction=loss.reduction), [x])
    for eps in (0.1, INF):
        loss = metricloss.MultiSimilarityLoss(epsilon=eps, normalize=True)
        for y in (one_class, singletons):
            xs = x.clone().requires_grad_(True)
            value = loss(xs, y)
            value.backward()
            if eps == INF:
                assert value.item() > 0
                assert_matches(lambda x: loss(x, y), lambda x: pml.api_multi_similarity_loss(
                    x, y, epsilon=eps, normalize=True), [x])
            else:  # a finite epsilon keeps nothing when an anchor lacks either side
                assert value.item() == 0 and torch.count_nonzero(xs.grad) == 0


# --- errors ------------------------------------------------------------------------------------

ALL_PAIRS = [metricloss.BatchContrastiveLoss, metricloss.MultiSimilarityLoss]
NORMALIZING = ALL_PAIRS + [metricloss.BatchTripletLoss, metricloss.LiftedStructureLoss]


@pytest.mark.parametrize("cls", NORMALIZING)
def test_zero_row_with_normalize(cls):
    x, y = torch.randn(8, 4, dtype=DT), torch.arange(8) % 2
    x[3] = 0
    xg = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"argument 'x' has row 3 of norm 0.*option 'normalize' needs every row nonzero"):
        cls(normalize=True)(xg, y)
    assert xg.grad is None
    cls(normalize=False)(x, y)  # a zero row is fine without normalize
    q, r = torch.randn(5, 4, dtype=DT), torch.randn(6, 4, dtype=DT)
    r[2] = 0
    with pytest.raises(ValueError, match=r"argument 'r' has row 2 of norm 0"):
        cls(normalize=True)(q, torch.arange(5) % 2, ref=r, ref_labels=torch.arange(6) % 2)
    with pytest.raises(ValueError, match=r"argument 'q' has row 3 of norm 0"):
        cls(normalize=True)(x, y, ref=q, ref_labels=torch.arange(5) % 2)


@pytest.mark.parametrize("options,match", [
    (dict(pos_margin=math.nan), r"option 'pos_margin' is nan"),
    (dict(neg_margin=math.nan), r"option 'neg_margin' is nan"),
    (dict(neg_margin=INF), r"option 'neg_margin' is inf"),
    (dict(pos_margin=-INF), r"option 'pos_margin'"),
])
def test_bad_contrastive_options_from_cpp(options, match):
    x, y = torch.randn(8, 4), torch.arange(8) % 2
    loss = metricloss.BatchContrastiveLoss(**options)
    with pytest.raises(ValueError, match=r"BatchContrastiveLoss.*" + match):
        loss(x, y)
    with pytest.raises(ValueError, match=match):
        loss(x, y, ref=x, ref_labels=y)


@pytest.mark.parametrize("options,match", [
    (dict(alpha=-1.0), r"option 'alpha' is -1; it must be finite and > 0"),
    (dict(alpha=0.0), r"option 'alpha'"),
    (dict(beta=-50.0), r"option 'beta'"),
    (dict(beta=INF), r"option 'beta'"),
    (dict(alpha=math.nan), r"option 'alpha'"),
    (dict(base=math.nan), r"option 'base'"),
    (dict(epsilon=-INF), r"option 'epsilon' is -inf; it must be finite or \+infinity"),
    (dict(epsilon=math.nan), r"option 'epsilon'"),
])
def test_bad_multi_similarity_options_from_cpp(options, match):
    x, y = torch.randn(8, 4), torch.arange(8) % 2
    loss = metricloss.MultiSimilarityLoss(**options)
    with pytest.raises(ValueError, match=r"MultiSimilarityLoss.*" + match):
        loss(x, y)
    with pytest.raises(ValueError, match=match):
        loss(x, y, ref=x, ref_labels=y)


def test_bad_option_strings():
    with pytest.raises(ValueError, match=r"option 'reduction' must be one of 'nonzero_mean', 'mean', got 'sum'"):
        metricloss.BatchContrastiveLoss(reduction="sum")
    with pytest.raises(ValueError, match=r"option 'distance' must be one of 'euclidean', 'squared_euclidean'"):
        metricloss.BatchContrastiveLoss(distance="cosine")
    loss = metricloss.BatchContrastiveLoss()
    loss.reduction = "avg_non_zero"  # changed between steps: checked at the call
    with pytest.raises(ValueError, match=r"option 'reduction'"):
        loss(torch.randn(8, 4), torch.arange(8) % 2)
    with pytest.raises(ValueError):
        metricloss.MultiSimilarityLoss(alpha="two")
