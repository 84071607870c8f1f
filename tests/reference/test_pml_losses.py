"""Self-checks of tests/reference/pml_losses.py: the PML and API.md references against python
loops over pairs (float64) of API.md's formulas, autograd against finite differences, the
MultiSimilarityMiner's kept sets against API.md's rule, and PML's documented deviations."""
import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from pml_losses import (api_batch_contrastive_loss, api_multi_similarity_kept,  # noqa: E402
                        api_multi_similarity_loss, pml_contrastive_loss,
                        pml_multi_similarity_loss, pml_multi_similarity_miner)

REL = 1e-12
DT = torch.float64


# --- brute force: one pair at a time, API.md's words ------------------------------------------

def brute_rows(x, labels, ref, ref_labels, self_index, normalize):
    def unit(v):
        return v / torch.sqrt((v * v).sum()) if normalize else v
    q = [unit(x[i]) for i in range(x.shape[0])]
    if ref is None:
        return q, q, [int(v) for v in labels], [int(v) for v in labels], list(range(len(q)))
    r = [unit(ref[j]) for j in range(ref.shape[0])]
    self_index = [-1] * len(q) if self_index is None else [int(v) for v in self_index]
    return q, r, [int(v) for v in labels], [int(v) for v in ref_labels], self_index


def brute_contrastive(x, labels, ref=None, ref_labels=None, self_index=None, pos_margin=0.0,
                      neg_margin=1.0, squared=False, normalize=True, reduction="nonzero_mean"):
    q, r, yq, yr, self_of = brute_rows(x, labels, ref, ref_labels, self_index, normalize)
    pos_terms, neg_terms = [], []
    for a in range(len(q)):
        for j in range(len(r)):
            d2 = ((q[a] - r[j]) ** 2).sum()
            d = d2 if squared else (torch.sqrt(d2) if d2.item() > 0 else d2 * 0)
            if yq[a] == yr[j] and j != self_of[a]:
                t = d - pos_margin
                pos_terms.append(t if t.item() > 0 else t * 0)
            elif yq[a] != yr[j]:
                t = neg_margin - d
                neg_terms.append(t if t.item() > 0 else t * 0)
    loss = x.sum() * 0 + (0 if ref is None else ref.sum() * 0)
    for terms in (pos_terms, neg_terms):
        if reduction == "nonzero_mean":
            terms = [t for t in terms if t.item() > 0]
        if terms:
            loss = loss + sum(terms) / len(terms)
    return loss


def brute_kept(x, labels, ref=None, ref_labels=None, self_index=None, epsilon=math.inf):
    """API.md's kept sets: {(a, p)} and {(a, n)}."""
    q, r, yq, yr, self_of = brute_rows(x.detach(), labels, None if ref is None else ref.detach(),
                                       ref_labels, self_index, True)
    kept_pos, kept_neg = set(), set()
    for a in range(len(q)):
        pos = [j for j in range(len(r)) if yq[a] == yr[j] and j != self_of[a]]
        neg = [j for j in range(len(r)) if yq[a] != yr[j]]
        s = {j: (q[a] * r[j]).sum().item() for j in pos + neg}
        max_n = max((s[j] for j in neg), default=-math.inf)
        min_p = min((s[j] for j in pos), default=math.inf)
        every = math.isinf(epsilon)  # -inf + inf is nan: +inf keeps every pair
        kept_pos |= {(a, j) for j in pos if every or s[j] < max_n + epsilon}
        kept_neg |= {(a, j) for j in neg if every or s[j] > min_p - epsilon}
    return kept_pos, kept_neg


def brute_multi_similarity(x, labels, ref=None, ref_labels=None, self_index=None, alpha=2.0,
                           beta=50.0, base=0.5, epsilon=math.inf):
    q, r, yq, yr, self_of = brute_rows(x, labels, ref, ref_labels, self_index, True)
    kept_pos, kept_neg = brute_kept(x, labels, ref, ref_labels, self_index, epsilon)
    total = x.sum() * 0 + (0 if ref is None else ref.sum() * 0)
    for a in range(len(q)):
        pos_sum = sum((torch.exp(-alpha * ((q[a] * r[j]).sum() - base)) for (b, j) in kept_pos if b == a),
                      torch.zeros((), dtype=DT))
        neg_sum = sum((torch.exp(beta * ((q[a] * r[j]).sum() - base)) for (b, j) in kept_neg if b == a),
                      torch.zeros((), dtype=DT))
        total = total + torch.log(1 + pos_sum) / alpha + torch.log(1 + neg_sum) / beta
    return total / len(q)


# --- data -------------------------------------------------------------------------------------

def make_case(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, d = 10, 4
    x = torch.randn(n, d, generator=g, dtype=DT)
    labels = torch.randint(0, 3, (n,), generator=g)
    if name == "one_class":
        labels = torch.zeros(n, dtype=torch.long)
    elif name == "singletons":
        labels = torch.arange(n)
    elif name == "duplicates":  # coincident rows within a class and across classes
        labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 0, 1])
        x[1] = x[0]
        x[2] = 2 * x[0]  # same direction: coincident after normalisation (exactly: a power of 2)
        x[4] = x[3]
        x[9] = x[0]      # other class, same point
    elif name == "clustered":  # tight classes: some anchors keep nothing at a small epsilon
        x = torch.randn(3, d, generator=g, dtype=DT)[labels] + 0.5 * x
    elif name == "pair":
        x, labels = x[:2], torch.tensor([4, 4])
    return x, labels


CASES = ["random", "clustered", "one_class", "singletons", "duplicates", "pair"]


def values_and_grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    value = fn(*inputs)
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    return value.detach(), grads


def assert_same(fn_a, fn_b, *inputs, rel=REL):
    va, ga = values_and_grads(fn_a, *inputs)
    vb, gb = values_and_grads(fn_b, *inputs)
    assert abs(va.item() - vb.item()) <= rel * max(abs(vb.item()), 1e-300), (va.item(), vb.item())
    scale = max(max(g.abs().max().item() for g in gb), 1e-300)
    for a, b in zip(ga, gb):
        assert (a - b).abs().max().item() <= rel * scale
    return va.item()


def reference_set(seed=1):
    g = torch.Generator().manual_seed(seed)
    q, yq = torch.randn(6, 4, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    r, yr = torch.randn(9, 4, generator=g, dtype=DT), torch.randint(0, 3, (9,), generator=g)
    r[2] = q[0]  # a query also in R, not excluded by PML
    yr[2] = yq[0]
    return q, yq, r, yr


# --- ContrastiveLoss --------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reduction,reducer", [("nonzero_mean", "avg_non_zero"), ("mean", "mean")])
@pytest.mark.parametrize("squared", [False, True])
def test_contrastive_batch(case, reduction, reducer, squared):
    x, y = make_case(case)
    margins = dict(pos_margin=0.1, neg_margin=1.2) if squared else dict(pos_margin=0.0, neg_margin=1.0)
    pml = lambda x: pml_contrastive_loss(x, y, reducer=reducer, squared=squared, **margins)
    api = lambda x: api_batch_contrastive_loss(x, y, normalize=True, reduction=reduction,
                                               distance="squared_euclidean" if squared else "euclidean", **margins)
    brute = lambda x: brute_contrastive(x, y, reduction=reduction, squared=squared, **margins)
    value = assert_same(pml, brute, x)
    assert_same(api, brute, x)
    if case in ("one_class", "pair"):  # no negative pairs; positives of distance > pos_margin
        assert value > 0


@pytest.mark.parametrize("reduction,reducer", [("nonzero_mean", "avg_non_zero"), ("mean", "mean")])
def test_contrastive_reference_set(reduction, reducer):
    q, yq, r, yr = reference_set()
    pml = lambda q, r: pml_contrastive_loss(q, yq, r, yr, reducer=reducer)
    api = lambda q, r: api_batch_contrastive_loss(q, yq, r, yr, normalize=True, reduction=reduction)
    brute = lambda q, r: brute_contrastive(q, yq, r, yr, reduction=reduction)
    assert_same(pml, brute, q, r)
    assert_same(api, brute, q, r)
    # API.md's reduction property: R = Q with self = identity is the batch loss.
    assert_same(lambda q: api_batch_contrastive_loss(q, yq, q, yq, torch.arange(6), normalize=True,
                                                     reduction=reduction),
                lambda q: api_batch_contrastive_loss(q, yq, normalize=True, reduction=reduction), q)


def test_contrastive_ref_self_pairs_kept_unless_same_labels_object():
    x, y = make_case("random")
    batch = pml_contrastive_loss(x, y, reducer="mean").item()
    with_self = pml_contrastive_loss(x, y, x, y.clone(), reducer="mean").item()
    same_object = pml_contrastive_loss(x, y, x.clone(), y, reducer="mean").item()
    api_no_self = api_batch_contrastive_loss(x, y, x, y, None, normalize=True, reduction="mean").item()
    assert abs(with_self - api_no_self) <= REL * api_no_self
    assert with_self < batch  # the extra zero-distance positives lower the mean
    assert abs(same_object - batch) <= REL * batch  # `ref_labels is labels` drops (i, i)


def test_contrastive_at_most_one_pair_each_is_zero():
    """generic_pair_loss.py 18-19: one positive and one negative pair give L = 0."""
    q, yq = torch.tensor([[1.0, 0.0]], dtype=DT), torch.tensor([0])
    r, yr = torch.tensor([[0.6, 0.8], [0.8, 0.6]], dtype=DT), torch.tensor([0, 1])
    assert pml_contrastive_loss(q, yq, r, yr).item() == 0
    assert api_batch_contrastive_loss(q, yq, r, yr, normalize=True).item() > 0


def test_contrastive_cdist_matrix_product_form():
    """Above 25 rows torch.cdist (PML's LpDistance) uses ||x||^2 + ||y||^2 - 2x.y: coincident
    rows get d ~ 1e-8, counted as a nonzero positive term. compute_mode restores exactness."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 5, generator=g, dtype=DT), torch.randint(0, 4, (30,), generator=g)
    exact = "donot_use_mm_for_euclid_dist"
    assert_same(lambda x: pml_contrastive_loss(x, y, compute_mode=exact),
                lambda x: api_batch_contrastive_loss(x, y, normalize=True), x)
    assert_same(lambda x: pml_contrastive_loss(x, y), lambda x: api_batch_contrastive_loss(x, y, normalize=True),
                x)  # distinct rows at d = O(1): the product form costs ~1e-16 relative in d
    x[10:20], y[10:20] = x[:10], y[:10]  # ten coincident positive pairs
    unit = torch.nn.functional.normalize(x, dim=1)
    assert torch.cdist(unit, unit)[torch.arange(10), torch.arange(10, 20)].max().item() > 1e-9
    default = pml_contrastive_loss(x, y).item()
    api = api_batch_contrastive_loss(x, y, normalize=True).item()
    assert abs(pml_contrastive_loss(x, y, compute_mode=exact).item() - api) <= REL * api
    assert abs(default - api) > 1e-6 * api


# --- MultiSimilarityLoss ----------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("epsilon", [math.inf, 0.1, 0.5])
def test_multi_similarity_batch(case, epsilon):
    x, y = make_case(case)
    pml_eps = None if math.isinf(epsilon) else epsilon
    pml = lambda x: pml_multi_similarity_loss(x, y, epsilon=pml_eps)
    api = lambda x: api_multi_similarity_loss(x, y, epsilon=epsilon, normalize=True)
    brute = lambda x: brute_multi_similarity(x, y, epsilon=epsilon)
    assert_same(api, brute, x)
    a1, p, a2, n = pml_multi_similarity_miner(x, y, epsilon=epsilon) if pml_eps else (None,) * 4
    if pml_eps is None or max(len(a1), len(a2)) > 1 or len(a1) + len(a2) == 0:  # else deviation 1
        assert_same(pml, brute, x)


@pytest.mark.parametrize("epsilon", [math.inf, 0.1])
def test_multi_similarity_reference_set(epsilon):
    q, yq, r, yr = reference_set()
    pml_eps = None if math.isinf(epsilon) else epsilon
    assert_same(lambda q, r: pml_multi_similarity_loss(q, yq, r, yr, epsilon=pml_eps),
                lambda q, r: brute_multi_similarity(q, yq, r, yr, epsilon=epsilon), q, r)
    assert_same(lambda q, r: api_multi_similarity_loss(q, yq, r, yr, epsilon=epsilon, normalize=True),
                lambda q, r: brute_multi_similarity(q, yq, r, yr, epsilon=epsilon), q, r)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("case", ["random", "clustered", "duplicates"])
@pytest.mark.parametrize("epsilon", [0.1, 0.02, 1.0])
def test_miner_kept_sets(seed, case, epsilon):
    x, y = make_case(case, seed)
    a1, p, a2, n = pml_multi_similarity_miner(x, y, epsilon=epsilon)
    mined_pos = set(zip(a1.tolist(), p.tolist()))
    mined_neg = set(zip(a2.tolist(), n.tolist()))
    assert len(mined_pos) == len(a1) and len(mined_neg) == len(a2)  # no duplicates
    kept_pos, kept_neg = brute_kept(x, y, epsilon=epsilon)
    assert (mined_pos, mined_neg) == (kept_pos, kept_neg)
    k1, kp, k2, kn = api_multi_similarity_kept(x, y, epsilon=epsilon)
    assert (set(zip(k1.tolist(), kp.tolist())), set(zip(k2.tolist(), kn.tolist()))) == (kept_pos, kept_neg)
    # Both sides empty or neither, per anchor.
    assert {a for a, _ in kept_pos} == {a for a, _ in kept_neg}


def test_miner_drops_anchors():
    """The clustered data exercise anchors whose positives all beat their negatives by eps."""
    x, y = make_case("clustered")
    a1, _, a2, _ = pml_multi_similarity_miner(x, y, epsilon=0.1)
    kept = set(a1.tolist())
    assert kept == set(a2.tolist()) and 0 < len(kept) < x.shape[0]


def test_miner_reference_set():
    q, yq, r, yr = reference_set()
    a1, p, a2, n = pml_multi_similarity_miner(q, yq, r, yr, epsilon=0.1)
    assert (set(zip(a1.tolist(), p.tolist())), set(zip(a2.tolist(), n.tolist()))) == \
        brute_kept(q, yq, r, yr, epsilon=0.1)


def test_multi_similarity_mined_single_pairs_is_zero():
    """Deviation 1 with the miner: rows labelled 0, 0, 1 where only anchor 0 keeps its pairs."""
    x = torch.tensor([[1.0, 0.0], [math.cos(0.5), math.sin(0.5)], [math.cos(0.3), -math.sin(0.3)]], dtype=DT)
    y = torch.tensor([0, 0, 1])
    a1, p, a2, n = pml_multi_similarity_miner(x, y, epsilon=0.1)
    assert (a1.tolist(), p.tolist(), a2.tolist(), n.tolist()) == ([0], [1], [0], [2])
    assert pml_multi_similarity_loss(x, y, epsilon=0.1).item() == 0
    assert api_multi_similarity_loss(x, y, epsilon=0.1, normalize=True).item() > 0


def test_miner_with_infinite_epsilon_keeps_everything():
    """Deviation 4: MultiSimilarityMiner(epsilon=inf) is not 'no miner'."""
    x, y = make_case("random")
    a1, p, a2, n = pml_multi_similarity_miner(x, y, epsilon=math.inf)
    assert len(a1) == len(a2) == x.shape[0] ** 2


# --- gradients --------------------------------------------------------------------------------

def gradcheck_case():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 3, generator=g, dtype=DT), torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])


@pytest.mark.parametrize("fn", [
    lambda x, y: pml_contrastive_loss(x, y),
    lambda x, y: pml_contrastive_loss(x, y, reducer="mean", squared=True),
    lambda x, y: pml_contrastive_loss(x[:5], y[:5], x[3:], y[3:]),
    lambda x, y: api_batch_contrastive_loss(x, y, normalize=True),
    lambda x, y: pml_multi_similarity_loss(x, y),
    lambda x, y: pml_multi_similarity_loss(x, y, epsilon=0.3),
    lambda x, y: pml_multi_similarity_loss(x[:5], y[:5], x[3:], y[3:], epsilon=0.3),
    lambda x, y: api_multi_similarity_loss(x, y, epsilon=0.3, normalize=True),
], ids=["contrastive", "contrastive_mean_squared", "contrastive_ref", "api_contrastive", "ms", "ms_mined",
        "ms_mined_ref", "api_ms"])
def test_gradcheck(fn):
    x, y = gradcheck_case()
    x.requires_grad_(True)
    assert fn(x, y).item() > 0
    assert torch.autograd.gradcheck(lambda x: fn(x, y), (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
