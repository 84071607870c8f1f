"""Pure-PyTorch references of pytorch-metric-learning's ContrastiveLoss and MultiSimilarityLoss
(with and without its MultiSimilarityMiner), and of API.md's BatchContrastiveLoss and
MultiSimilarityLoss, for issue 17's parity tests ("with normalize = true, both losses reproduce
PML's ContrastiveLoss() and MultiSimilarityLoss() (the latter with epsilon = +inf) on the same
data, in double, to 1e-12").

Where the PML formulas were read
--------------------------------
KevinMusgrave/pytorch-metric-learning, v2.8.1 (src/pytorch_metric_learning/__init__.py:
__version__ = "2.8.1"), commit 216a792c22b0154d3d3bf008a7317edc7d677e71 (2024-12-11), files
under src/pytorch_metric_learning/ (line numbers at that commit):
  losses/contrastive_loss.py          17-36 _compute_loss, 44-48 pos_calc / neg_calc, 50-51 reducer
  losses/generic_pair_loss.py         15-21 compute_loss, 26-31 mat_based_loss, 33-40 pair_based_loss
  losses/multi_similarity_loss.py     16 defaults, 25-40 _compute_loss
  losses/base_metric_loss_function.py 17-38 forward, 40-44 zero_loss(es)
  miners/multi_similarity_miner.py    10 epsilon = 0.1, 15-63 mine
  miners/base_miner.py                39-56 forward (mine under torch.no_grad)
  reducers/avg_non_zero_reducer.py    6 (ThresholdReducer with low = 0)
  reducers/threshold_reducer.py       32-46 element_reduction_helper
  reducers/mean_reducer.py            7-14
  reducers/multiple_reducers.py       15-32 (sub-losses summed)
  reducers/base_reducer.py            31-39 reduce_the_loss, 63-69 zero_loss / input_is_zero_loss
  utils/module_with_records_and_reducer.py  16-33 set_reducer, 44-45 default LpDistance(p=2)
  distances/base_distance.py          8 defaults, 26-42 forward, 61-64 margin, 66-67 normalize
  distances/lp_distance.py            12-24 compute_mat (torch.cdist)
  distances/cosine_similarity.py, distances/dot_product_similarity.py  11-12 (matmul)
  utils/loss_and_miner_utils.py       10-22 logsumexp, 31-40 get_matches_and_diffs,
                                      43-52 get_all_pairs_indices, 55-70 convert_to_pairs
  utils/common_functions.py           38-43 pos_inf / neg_inf (finfo max / min), 485-492 set_ref_emb

PML's semantics, as the code computes them
------------------------------------------
ContrastiveLoss(pos_margin=0, neg_margin=1), default distance LpDistance(normalize_embeddings=
True, p=2, power=1), default reducer AvgNonZeroReducer:
* Pairs are ordered: get_all_pairs_indices is torch.where over the N x N_r label-equality
  matrix, so (i, j) and (j, i) are both pairs. The diagonal is removed from the positives only
  when `ref_labels is labels` (an identity test, lmu 38): always without ref_emb; with ref_emb
  it is kept (a query that is also in R pairs with itself at distance 0), unless the caller
  passes the very same labels tensor as ref_labels, which removes (i, i) even though R != Q.
  (Such a self pair has d = 0: it changes MeanReducer's count and, for MultiSimilarity, adds
  S = 1 as a positive, but AvgNonZeroReducer drops its zero term.) API.md's equivalent is a
  reference set with self_index = None (all -1).
* pos term relu(d - pos_margin), neg term relu(neg_margin - d) (distance.margin(x, y) = x - y).
  ContrastiveLoss has two sub-losses, so set_reducer builds MultipleReducers with one
  AvgNonZeroReducer each and sums them: L = mean(pos terms > 0) + mean(neg terms > 0), each
  mean over the strictly positive terms of its own side only, and 0 (sum(embeddings * 0)) when
  a side has no positive term. A term at exactly 0 is dropped from the count; relu and cdist
  both give it a zero gradient. This is API.md's nonzero_mean; MeanReducer gives API.md's mean
  (over all positive pairs, plus over all negative pairs).
* Deviation 1 (generic_pair_loss.py 18-19): if every index tensor has length <= 1 (at most one
  positive and at most one negative pair), the loss is 0 with zero gradient, whatever the
  terms. Without ref_emb or a miner the pair counts are even, so this never fires; with ref_emb
  (e.g. one query, one positive and one negative in R) or a miner it does, where API.md's
  formula is nonzero.
* Deviation 2 (lp_distance.py 24): torch.cdist's default compute_mode uses the matrix-product
  form ||x||^2 + ||y||^2 - 2 x.y once either side has more than 25 rows. Coincident rows then
  can get d ~ 1e-8 (double; sqrt of a rounding residue) instead of 0: a positive term that is
  exactly 0 in API.md becomes a counted "nonzero" term, which changes the mean's count (in the
  test, ten such pairs of 240 move the loss by 0.8 % and the gradient by 0.5 % of its largest
  entry). Distinct rows lose ~1e-16/d absolute in d: invisible at 1e-12 for d = O(1), not for
  nearly coincident rows. Below 26 rows (or
  with compute_mode="donot_use_mm_for_euclid_dist") cdist takes differences and is exact to
  rounding, with a zero gradient at d = 0. pml_contrastive_loss passes compute_mode through.
* normalize: F.normalize(x, p=2, dim=1), i.e. x / max(||x||, 1e-12): a zero row stays zero
  (API.md makes it an invalid_argument).

MultiSimilarityLoss(alpha=2, beta=50, base=0.5), distance CosineSimilarity (rows normalised,
S = q r^T), reducer MeanReducer:
* pos_mask / neg_mask from the (ordered) pair indices as above; per anchor i,
  L_i = (1/alpha) log(1 + sum_{p in mask} e^{alpha(base - S_ip)})
      + (1/beta) log(1 + sum_{n in mask} e^{beta(S_in - base)}),
  lmu.logsumexp with add_one=True: masked entries are set to finfo.min (not -inf), a zero
  column is appended, and rows with an empty mask are set to 0 afterwards (the same value
  log 1 = 0). L = torch.mean over all N anchors (rows of Q), anchors with nothing included.
* Without a miner all pairs are kept: API.md's epsilon = +inf. Deviation 1 above applies here
  too (mat_based_loss goes through the same compute_loss).
MultiSimilarityMiner(epsilon=0.1), distance CosineSimilarity, under torch.no_grad:
* If the whole batch has no positive pair or no negative pair, it returns empty indices (then
  the loss is 0 by deviation 1).
* mat_pos_sorting = S with every negative (and, when `embeddings is ref_emb`, the diagonal) set
  to finfo.max; mat_neg_sorting = S with every positive (and that diagonal) set to finfo.min;
  rows sorted ascending. Kept positives: pos_sorted - eps < neg_sorted[:, -1] (the row's max
  over negatives; finfo.min when the anchor has none, so nothing is kept); kept negatives:
  neg_sorted + eps > pos_sorted[:, 0] (the row's min over positives; finfo.max when the anchor
  has none, so nothing is kept). Placeholders never pass for a finite eps, since
  finfo.max - eps == finfo.max. So: anchors with no positives or no negatives keep nothing,
  and both sides are empty or neither (up to rounding, below), as API.md says.
* Deviation 3: PML compares S_ip - eps < max_n S_in and S_in + eps > min_p S_ip; API.md writes
  S_ip < max_n S_in + eps and S_in > min_p S_ip - eps. Same in exact arithmetic; in floating
  point they can differ when S_ip - max_n S_in is within an ulp of -eps (and then one side can
  be empty while the other is not).
* Deviation 4: MultiSimilarityMiner(epsilon=inf) keeps every (anchor, row) pair as both a
  positive and a negative (finfo.max - inf = -inf), labels and diagonal included: +inf is API's
  "no miner" only as MultiSimilarityLoss without a miner. pml_multi_similarity_loss treats
  epsilon None or inf as "no miner"; pml_multi_similarity_miner reproduces the miner itself.
* Mined pairs from the miner with a finite eps go to the loss as its indices_tuple; with a miner
  the pair counts need not be even, so deviation 1 can fire in self mode too (e.g. three rows
  labelled 0, 0, 1 where only anchor 0 keeps its pair: one positive, one negative, L = 0).

The api_* functions are API.md's "New batch losses" formulas (with its reference-set rules:
P(a) = {j in R : y_j = y_a, j != self(a)}, Neg(a) = {j in R : y_j != y_a}), distances from
differences with a zero gradient at d = 0. Apart from deviations 1-4 they equal the pml_*
functions (normalize=True, reduction / reducer matched, ref with self_index=None).
"""
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# PML, step by step

def _set_ref_emb(embeddings, labels, ref_emb, ref_labels):
    """common_functions.set_ref_emb: no ref_emb means R is Q, the same tensor objects."""
    if ref_emb is None:
        return embeddings, labels
    return ref_emb, ref_labels


def _get_all_pairs_indices(labels, ref_labels):
    """lmu.get_matches_and_diffs + get_all_pairs_indices; the diagonal is removed from the
    matches only when ref_labels *is* labels."""
    if ref_labels is None:
        ref_labels = labels
    matches = (labels.unsqueeze(1) == ref_labels.unsqueeze(0)).byte()
    diffs = matches ^ 1
    if ref_labels is labels:
        matches.fill_diagonal_(0)
    a1, p = torch.where(matches)
    a2, n = torch.where(diffs)
    return a1, p, a2, n


def _convert_to_pairs(indices_tuple, labels, ref_labels):
    if indices_tuple is None:
        return _get_all_pairs_indices(labels, ref_labels)
    if len(indices_tuple) == 4:
        return indices_tuple
    a, p, n = indices_tuple
    return a, p, a, n


def _distance(query, ref, normalize, inverted, power=1, compute_mode=None):
    """BaseDistance.forward with LpDistance(p=2) (torch.cdist) or DotProductSimilarity."""
    maybe = (lambda x: F.normalize(x, p=2, dim=1)) if normalize else (lambda x: x)
    q = maybe(query)
    r = q if ref is None else maybe(ref)
    if inverted:
        mat = torch.matmul(q, r.t())
    elif compute_mode is None:
        mat = torch.cdist(q, r, p=2)
    else:
        mat = torch.cdist(q, r, p=2, compute_mode=compute_mode)
    if power != 1:
        mat = mat ** power
    return mat


def _zero_loss(embeddings):
    """BaseReducer.zero_loss."""
    return torch.sum(embeddings * 0)


def _reduce(losses, reducer, embeddings):
    """AvgNonZeroReducer (ThresholdReducer(low=0)) or MeanReducer on one sub-loss."""
    if not torch.is_tensor(losses) and losses == 0:  # input_is_zero_loss
        return _zero_loss(embeddings)
    if reducer == "mean":
        return torch.mean(losses)
    if reducer != "avg_non_zero":
        raise ValueError(f"reducer must be 'avg_non_zero' or 'mean', not {reducer!r}")
    losses = losses[losses > 0]
    if len(losses) >= 1:
        return torch.mean(losses)
    return _zero_loss(embeddings)


def pml_contrastive_loss(embeddings, labels, ref_emb=None, ref_labels=None, pos_margin=0.0,
                         neg_margin=1.0, normalize=True, reducer="avg_non_zero", squared=False,
                         indices_tuple=None, compute_mode=None):
    """PML's ContrastiveLoss(pos_margin, neg_margin, distance=LpDistance(normalize_embeddings=
    normalize, p=2, power=2 if squared else 1), reducer=AvgNonZeroReducer() or MeanReducer())
    called as loss(embeddings, labels, indices_tuple, ref_emb, ref_labels). compute_mode goes
    to torch.cdist (None: torch's default, as PML calls it)."""
    ref_emb, ref_labels = _set_ref_emb(embeddings, labels, ref_emb, ref_labels)
    a1, p, a2, n = _convert_to_pairs(indices_tuple, labels, ref_labels)
    if all(len(x) <= 1 for x in (a1, p, a2, n)):
        return _zero_loss(embeddings)
    mat = _distance(embeddings, ref_emb, normalize, inverted=False, power=2 if squared else 1,
                    compute_mode=compute_mode)
    pos_loss = F.relu(mat[a1, p] - pos_margin) if len(a1) > 0 else 0
    neg_loss = F.relu(neg_margin - mat[a2, n]) if len(a2) > 0 else 0
    # MultipleReducers: one reducer per sub-loss, written into a zeros tensor, then summed.
    sub_losses = torch.zeros(2, dtype=embeddings.dtype, device=embeddings.device)
    sub_losses[0] = _reduce(pos_loss, reducer, embeddings)
    sub_losses[1] = _reduce(neg_loss, reducer, embeddings)
    return torch.sum(sub_losses)


def pml_logsumexp(x, keep_mask=None, add_one=True, dim=1):
    """lmu.logsumexp, as PML writes it."""
    if keep_mask is not None:
        x = x.masked_fill(~keep_mask, torch.finfo(x.dtype).min)
    if add_one:
        zeros = torch.zeros(x.size(dim - 1), dtype=x.dtype, device=x.device).unsqueeze(dim)
        x = torch.cat([x, zeros], dim=dim)
    output = torch.logsumexp(x, dim=dim, keepdim=True)
    if keep_mask is not None:
        output = output.masked_fill(~torch.any(keep_mask, dim=dim, keepdim=True), 0)
    return output


def pml_multi_similarity_miner(embeddings, labels, ref_emb=None, ref_labels=None, epsilon=0.1):
    """PML's MultiSimilarityMiner(epsilon)(embeddings, labels, ref_emb, ref_labels): the pair
    indices (a1, p, a2, n) it keeps, each (anchor row of Q, row of R)."""
    with torch.no_grad():
        ref_emb, ref_labels = _set_ref_emb(embeddings, labels, ref_emb, ref_labels)
        mat = _distance(embeddings, ref_emb, normalize=True, inverted=True)
        a1, p, a2, n = _get_all_pairs_indices(labels, ref_labels)
        if len(a1) == 0 or len(a2) == 0:
            empty = torch.tensor([], device=labels.device, dtype=torch.long)
            return empty.clone(), empty.clone(), empty.clone(), empty.clone()
        mat_neg_sorting = mat
        mat_pos_sorting = mat.clone()
        pos_ignore = torch.finfo(mat.dtype).max  # is_inverted: c_f.pos_inf
        neg_ignore = torch.finfo(mat.dtype).min
        mat_pos_sorting[a2, n] = pos_ignore
        mat_neg_sorting[a1, p] = neg_ignore
        if embeddings is ref_emb:
            mat_pos_sorting.fill_diagonal_(pos_ignore)
            mat_neg_sorting.fill_diagonal_(neg_ignore)
        pos_sorted, pos_sorted_idx = torch.sort(mat_pos_sorting, dim=1)
        neg_sorted, neg_sorted_idx = torch.sort(mat_neg_sorting, dim=1)
        hard_pos_idx = torch.where(pos_sorted - epsilon < neg_sorted[:, -1].unsqueeze(1))
        hard_neg_idx = torch.where(neg_sorted + epsilon > pos_sorted[:, 0].unsqueeze(1))
        a1 = hard_pos_idx[0]
        p = pos_sorted_idx[a1, hard_pos_idx[1]]
        a2 = hard_neg_idx[0]
        n = neg_sorted_idx[a2, hard_neg_idx[1]]
        return a1, p, a2, n


def pml_multi_similarity_loss(embeddings, labels, ref_emb=None, ref_labels=None, alpha=2,
                              beta=50, base=0.5, epsilon=None, indices_tuple=None):
    """PML's MultiSimilarityLoss(alpha, beta, base) (CosineSimilarity, MeanReducer). epsilon None
    or +inf: no miner (all pairs); a finite epsilon: the indices_tuple of
    MultiSimilarityMiner(epsilon) on the same inputs, as a PML training loop passes it."""
    if epsilon is not None and not math.isinf(epsilon):
        if indices_tuple is not None:
            raise ValueError("give epsilon or indices_tuple, not both")
        indices_tuple = pml_multi_similarity_miner(embeddings, labels, ref_emb, ref_labels, epsilon)
    ref_emb, ref_labels = _set_ref_emb(embeddings, labels, ref_emb, ref_labels)
    a1, p, a2, n = _convert_to_pairs(indices_tuple, labels, ref_labels)
    if all(len(x) <= 1 for x in (a1, p, a2, n)):
        return _zero_loss(embeddings)
    mat = _distance(embeddings, ref_emb, normalize=True, inverted=True)
    pos_mask, neg_mask = torch.zeros_like(mat), torch.zeros_like(mat)
    pos_mask[a1, p] = 1
    neg_mask[a2, n] = 1
    pos_exp = base - mat  # distance.margin(mat, base), inverted: y - x
    neg_exp = mat - base  # distance.margin(base, mat)
    pos_loss = (1.0 / alpha) * pml_logsumexp(alpha * pos_exp, keep_mask=pos_mask.bool(), add_one=True)
    neg_loss = (1.0 / beta) * pml_logsumexp(beta * neg_exp, keep_mask=neg_mask.bool(), add_one=True)
    return torch.mean(pos_loss + neg_loss)  # MeanReducer, element reduction over N anchors


# ---------------------------------------------------------------------------------------------
# API.md's formulas

def _api_rows(x, labels, ref, ref_labels, self_index, normalize):
    """Q, R, and the positive / negative masks of API.md's reference-set rules. Without ref,
    R = Q and self = identity (the batch loss)."""
    if normalize:
        if (x.detach().norm(dim=1) == 0).any() or (ref is not None and (ref.detach().norm(dim=1) == 0).any()):
            raise ValueError("normalize: a zero row")
        x = x / x.norm(dim=1, keepdim=True)
        ref = None if ref is None else ref / ref.norm(dim=1, keepdim=True)
    if ref is None:
        ref, ref_labels = x, labels
        self_index = torch.arange(x.shape[0])
    same = labels[:, None] == ref_labels[None, :]
    is_self = torch.zeros_like(same)
    if self_index is not None:
        rows = torch.nonzero(torch.as_tensor(self_index) >= 0).flatten()
        is_self[rows, torch.as_tensor(self_index)[rows]] = True
    return x, ref, same & ~is_self, ~same


def _exact_distance(q, r, squared):
    """d(q_a, r_j) from differences; zero (with zero gradient) where q_a == r_j."""
    d2 = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    if squared:
        return d2
    zero = d2 == 0
    return torch.where(zero, torch.zeros_like(d2), torch.sqrt(torch.where(zero, torch.ones_like(d2), d2)))


def _zero(*tensors):
    return sum(t.sum() * 0 for t in tensors if t is not None)


def api_batch_contrastive_loss(x, labels, ref=None, ref_labels=None, self_index=None, pos_margin=0.0,
                               neg_margin=1.0, distance="euclidean", normalize=False,
                               reduction="nonzero_mean"):
    """API.md's BatchContrastiveLoss: positive terms [d - pos_margin]+ over P, negative terms
    [neg_margin - d]+ over Neg; L = mean of the nonzero positive terms + mean of the nonzero
    negative terms (reduction "nonzero_mean"), or of all terms of each side ("mean"); a side
    with nothing to average adds 0."""
    q, r, pos, neg = _api_rows(x, labels, ref, ref_labels, self_index, normalize)
    d = _exact_distance(q, r, distance == "squared_euclidean")
    loss = _zero(x, ref)
    for mask, terms in ((pos, torch.relu(d - pos_margin)), (neg, torch.relu(neg_margin - d))):
        terms = terms[mask]
        if reduction == "nonzero_mean":
            terms = terms[terms > 0]
        elif reduction != "mean":
            raise ValueError(reduction)
        if terms.numel() > 0:
            loss = loss + terms.mean()
    return loss


def api_multi_similarity_loss(x, labels, ref=None, ref_labels=None, self_index=None, alpha=2.0,
                              beta=50.0, base=0.5, epsilon=0.1, normalize=False):
    """API.md's MultiSimilarityLoss on S = q r^T: positives kept when S_ip < max_n S_in + eps,
    negatives when S_in > min_p S_ip - eps (all with eps = +inf);
    L = 1/N_q sum_i [(1/alpha) log(1 + sum_p e^{-alpha(S_ip - base)})
                     + (1/beta) log(1 + sum_n e^{beta(S_in - base)})]."""
    q, r, pos, neg = _api_rows(x, labels, ref, ref_labels, self_index, normalize)
    s = q @ r.t()
    if math.isinf(epsilon):
        keep_pos, keep_neg = pos, neg
    else:
        inf = torch.tensor(math.inf, dtype=s.dtype)
        with torch.no_grad():
            max_neg = torch.where(neg, s, -inf).max(dim=1, keepdim=True).values
            min_pos = torch.where(pos, s, inf).min(dim=1, keepdim=True).values
            keep_pos = pos & (s < max_neg + epsilon)
            keep_neg = neg & (s > min_pos - epsilon)

    def log1p_sum_exp(z, keep):
        z = torch.where(keep, z, torch.tensor(-math.inf, dtype=z.dtype))
        z = torch.cat([z, torch.zeros(z.shape[0], 1, dtype=z.dtype)], dim=1)
        return torch.logsumexp(z, dim=1)

    per_anchor = (log1p_sum_exp(-alpha * (s - base), keep_pos) / alpha
                  + log1p_sum_exp(beta * (s - base), keep_neg) / beta)
    return per_anchor.mean() + _zero(x, ref)


def api_multi_similarity_kept(x, labels, ref=None, ref_labels=None, self_index=None, epsilon=0.1,
                              normalize=True):
    """API.md's kept sets as (anchor, row) index pairs, in the miner's output form (a1, p, a2, n)."""
    q, r, pos, neg = _api_rows(x.detach(), labels, None if ref is None else ref.detach(), ref_labels,
                               self_index, normalize)
    s = q @ r.t()
    inf = torch.tensor(math.inf, dtype=s.dtype)
    max_neg = torch.where(neg, s, -inf).max(dim=1, keepdim=True).values
    min_pos = torch.where(pos, s, inf).min(dim=1, keepdim=True).values
    a1, p = torch.where(pos & (s < max_neg + epsilon))
    a2, n = torch.where(neg & (s > min_pos - epsilon))
    return a1, p, a2, n
