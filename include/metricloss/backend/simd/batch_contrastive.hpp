#pragma once
// The SIMD path of BatchContrastiveLoss on the batch core: distances by one product on the
// centred rows (PairwiseDistances; CrossDistances for a reference set), each hinge near its
// turn decided on the distance by differences, the rows of detail/batch_contrastive_math.hpp
// (the batch's lower triangle: each unordered pair once), and the gradient through a dense
// weight sink: one product, near pairs by differences.
#include <metricloss/backend/simd/batch_triplet.hpp>
#include <metricloss/backend/simd/cross.hpp>
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/backend/simd/reference.hpp>
#include <metricloss/backend/simd/weight_sinks.hpp>
#include <metricloss/batch_contrastive.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/batch_contrastive_math.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/cross_classes.hpp>

#include <algorithm>
#include <limits>

namespace metricloss {
namespace detail {

/// What the simd path keeps between calls (in the functor's slot).
template <class T>
struct SimdBatchContrastiveScratch : BackendSlot::Contents {
  LabelClasses classes;
  PairwiseDistances<T> pairwise;           // the batch's distances and products
  GrowOnlyBuffer<T> norms;                 // N: ||x_i - mean||^2 (SplitWeights)
  GrowOnlyBuffer<double> direct_gradient;  // N x D: near pairs by differences (SplitWeights)
  GrowOnlyBuffer<double> weight_row;       // one row of W
  CrossClasses cross_classes;
  CrossDistances<T> cross;                 // Q x R distances and products
};

/// Two sweeps of contrastive_row over the anchors (totals, then W into `sink` with the
/// totals' scales); `end(a)` is anchor a's candidate range.
template <class Classes, class Distances, class End, class Sink>
ContrastiveTotals contrastive_sweeps(const ContrastiveRule& rule, const Classes& classes,
                                     const Distances& distances, End end, Sink& sink,
                                     double* row, Index width) {
  ContrastiveTotals totals;
  for (Index a = 0; a < classes.anchors(); ++a)
    contrastive_row(rule, classes, distances, a, end(a), totals);
  if (!sink.enabled()) return totals;
  ContrastiveTotals again;
  const double pos = totals.pos_scale(rule), neg = totals.neg_scale(rule);
  for (Index a = 0; a < classes.anchors(); ++a) {
    const Index e = end(a);
    contrastive_row(rule, classes, distances, a, e, again, row, pos, neg);
    std::fill(row + e, row + width, 0.0);
    sink.add_row(a, row, width);
  }
  return totals;
}

template <class T>
struct Backend<BatchContrastiveLoss<T>, simd_tag> {
  template <class L>
  static T forward_backward(BatchContrastiveLoss<T>& loss, simd_tag, const MatrixView<const T>& x,
                            const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<SimdBatchContrastiveScratch<T>>(loss);
    T value;
    if (batch_triplet_not_finite(work.classes, x, labels, grad, value)) return value;
    work.pairwise.compute(x);
    const ContrastiveRule rule(loss.pos_margin, loss.neg_margin, loss.distance, loss.reduction);
    SplitWeights<T> weights;
    if (!grad.empty()) weights = SplitWeights<T>(work, x);
    double* row = work.weight_row.data(static_cast<std::size_t>(x.rows));
    const ContrastiveTotals totals =
        contrastive_sweeps(rule, work.classes, ProductSquaredDistances<T>{&work.pairwise},
                           [](Index a) { return a; }, weights, row, x.rows);
    if (!grad.empty()) weights.gradient(work.pairwise, static_cast<double>(top_diff), grad);
    return static_cast<T>(totals.loss(rule));
  }
};

template <class T>
struct ReferenceBackend<BatchContrastiveLoss<T>, simd_tag> {
  static constexpr bool available = true;

  template <class L, class LR>
  static T forward_backward(BatchContrastiveLoss<T>& loss, simd_tag, const MatrixView<const T>& q,
                            const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                            const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
    auto& work = scratch_of<SimdBatchContrastiveScratch<T>>(loss);
    if (reference_not_finite(work.cross_classes, q, labels, ref, grad_q, grad_r))
      return std::numeric_limits<T>::quiet_NaN();
    work.cross.compute(q, ref.r);
    const ContrastiveRule rule(loss.pos_margin, loss.neg_margin, loss.distance, loss.reduction);
    const bool gradient = !grad_q.empty() || !grad_r.empty();
    CrossDenseWeights<T> weights;
    if (gradient) weights = {work.cross.zeroed_weights().data(), work.cross.stride()};
    const Index nr = ref.r.rows;
    double* row = work.weight_row.data(static_cast<std::size_t>(nr));
    const ContrastiveTotals totals = contrastive_sweeps(
        rule, work.cross_classes, CrossProductDistances<T>{&work.cross, work.cross.widest_reference()},
        [nr](Index) { return nr; }, weights, row, nr);
    if (gradient) work.cross.gradients(top_diff, grad_q, grad_r);
    return static_cast<T>(totals.loss(rule));
  }
};

}  // namespace detail
}  // namespace metricloss
