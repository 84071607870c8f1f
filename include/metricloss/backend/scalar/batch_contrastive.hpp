#pragma once
// The scalar reference path of BatchContrastiveLoss: every D2 by differences in double, the
// rows of detail/batch_contrastive_math.hpp over every ordered pair, and the gradient by
// loops in double, dL/dx_i = 2 sum_j (W_ij + W_ji) (x_i - x_j) (dense_weights_gradient; with a reference set:
// backend/scalar/reference.hpp's cross_gradients).
#include <metricloss/backend/scalar/batch_triplet.hpp>
#include <metricloss/backend/scalar/reference.hpp>
#include <metricloss/batch_contrastive.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/batch_contrastive_math.hpp>
#include <metricloss/detail/label_classes.hpp>

#include <algorithm>
#include <limits>

namespace metricloss {
namespace detail {

/// The reference path's buffers (classes, D2, W, one gradient row) and the batch's classes.
struct ScalarBatchContrastiveScratch : ScalarReferenceScratch {
  LabelClasses batch_classes;
};

/// The sweep of every anchor: totals, then W (when `w` is given) with the totals' scales.
template <class Classes, class Distances>
ContrastiveTotals contrastive_weights(const ContrastiveRule& rule, const Classes& classes,
                                      const Distances& distances, Index candidates, double* w) {
  ContrastiveTotals totals;
  for (Index a = 0; a < classes.anchors(); ++a)
    contrastive_row(rule, classes, distances, a, candidates, totals);
  if (w != nullptr) {
    ContrastiveTotals again;
    const double pos = totals.pos_scale(rule), neg = totals.neg_scale(rule);
    for (Index a = 0; a < classes.anchors(); ++a)
      contrastive_row(rule, classes, distances, a, candidates, again, w + a * candidates, pos, neg);
  }
  return totals;
}

template <class T>
struct Backend<BatchContrastiveLoss<T>, scalar_tag> {
  template <class L>
  static T forward_backward(BatchContrastiveLoss<T>& loss, scalar_tag,
                            const MatrixView<const T>& x, const VectorView<L>& labels,
                            const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<ScalarBatchContrastiveScratch>(loss);
    T value;
    if (batch_triplet_not_finite(work.batch_classes, x, labels, grad, value)) return value;
    const Index n = x.rows, d = x.cols;
    const auto entries = static_cast<std::size_t>(n * n);
    double* squared = work.squared.data(entries);
    cross_distances(x, x, false, squared);
    double* w = grad.empty() ? nullptr : work.weights.data(entries);
    const ContrastiveRule rule(loss.pos_margin, loss.neg_margin, loss.distance, loss.reduction);
    const ContrastiveTotals totals =
        contrastive_weights(rule, work.batch_classes, ExactSquaredDistances{squared, n}, n, w);
    if (w != nullptr)
      dense_weights_gradient(x, w, 2.0 * static_cast<double>(top_diff),
                             work.gradient_row.data(static_cast<std::size_t>(d)), grad);
    return static_cast<T>(totals.loss(rule));
  }
};

template <class T>
struct ReferenceBackend<BatchContrastiveLoss<T>, scalar_tag> {
  static constexpr bool available = true;

  template <class L, class LR>
  static T forward_backward(BatchContrastiveLoss<T>& loss, scalar_tag,
                            const MatrixView<const T>& q, const VectorView<L>& labels,
                            const ReferenceView<T, LR>& ref, const MatrixView<T>& grad_q,
                            const MatrixView<T>& grad_r, T top_diff) {
    auto& work = scratch_of<ScalarBatchContrastiveScratch>(loss);
    if (reference_not_finite(work.classes, q, labels, ref, grad_q, grad_r))
      return std::numeric_limits<T>::quiet_NaN();
    const Index nr = ref.r.rows;
    const auto entries = static_cast<std::size_t>(q.rows * nr);
    double* squared = work.squared.data(entries);
    cross_distances(q, ref.r, false, squared);
    const bool gradient = !grad_q.empty() || !grad_r.empty();
    double* w = gradient ? work.weights.data(entries) : nullptr;
    const ContrastiveRule rule(loss.pos_margin, loss.neg_margin, loss.distance, loss.reduction);
    const ContrastiveTotals totals =
        contrastive_weights(rule, work.classes, ExactSquaredDistances{squared, nr}, nr, w);
    if (gradient)
      cross_gradients(work, q, ref.r, w, 2.0 * static_cast<double>(top_diff), grad_q, grad_r);
    return static_cast<T>(totals.loss(rule));
  }
};

}  // namespace detail
}  // namespace metricloss
