#pragma once
// The scalar reference path of the batch losses over queries Q against a reference set R
// (<metricloss/reference.hpp>): exact N_q x N_r distances by differences, the batch losses'
// own maths on CrossClasses, and by loops, in double,
//   dL/dq_a = 2 s sum_j W_aj (q_a - r_j),   dL/dr_j = 2 s sum_a W_aj (r_j - q_a),
// W = dL/dD2 before the scale s. O(N_q N_r D); no R x R matrix.
#include <metricloss/backend/scalar/batch_triplet.hpp>
#include <metricloss/backend/scalar/lifted_structure.hpp>
#include <metricloss/backend/scalar/rowops.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/batch_triplet_mining.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/cross_classes.hpp>
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/lifted_structure.hpp>
#include <metricloss/reference.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

/// What the scalar reference-set path keeps between calls (in the functor's slot).
struct ScalarReferenceScratch : BackendSlot::Contents {
  CrossClasses classes;
  TripletMiner miner;
  GrowOnlyBuffer<double> squared, distance, weights;                // N_q x N_r: D2, D, W
  GrowOnlyBuffer<double> row_nearest, row_sum, row_log, row_share;  // N_q (lifted, over R)
  GrowOnlyBuffer<double> col_nearest, col_sum, col_log, col_share;  // N_r (lifted, over Q)
  GrowOnlyBuffer<double> gradient_row;                              // D
};

/// D2 (squared) or D (roots) of every (q_a, r_j), by differences in double.
template <class T>
void cross_distances(const MatrixView<const T>& q, const MatrixView<const T>& r, bool roots,
                     double* out) {
  const Index nr = r.rows, d = q.cols;
  for (Index a = 0; a < q.rows; ++a)
    for (Index j = 0; j < nr; ++j) {
      const double s = ScalarRowOps::squared_distance(q.row(a), r.row(j), d);
      out[a * nr + j] = roots ? std::sqrt(s) : s;
    }
}

/// grad_q and grad_r from W (dL/dD2 before `scale`), by differences; either may be empty.
template <class T>
void cross_gradients(ScalarReferenceScratch& work, const MatrixView<const T>& q,
                     const MatrixView<const T>& r, const double* w, double scale,
                     const MatrixView<T>& grad_q, const MatrixView<T>& grad_r) {
  const Index nq = q.rows, nr = r.rows, d = q.cols;
  double* row = work.gradient_row.data(static_cast<std::size_t>(d));
  for (Index a = 0; a < nq && !grad_q.empty(); ++a) {
    std::fill(row, row + d, 0.0);
    for (Index j = 0; j < nr; ++j) {
      const double s = w[a * nr + j];
      if (s == 0.0) continue;
      for (Index k = 0; k < d; ++k)
        row[k] += s * (static_cast<double>(q.row(a)[k]) - static_cast<double>(r.row(j)[k]));
    }
    for (Index k = 0; k < d; ++k) grad_q.row(a)[k] = static_cast<T>(scale * row[k]);
  }
  for (Index j = 0; j < nr && !grad_r.empty(); ++j) {
    std::fill(row, row + d, 0.0);
    for (Index a = 0; a < nq; ++a) {
      const double s = w[a * nr + j];
      if (s == 0.0) continue;
      for (Index k = 0; k < d; ++k)
        row[k] += s * (static_cast<double>(r.row(j)[k]) - static_cast<double>(q.row(a)[k]));
    }
    for (Index k = 0; k < d; ++k) grad_r.row(j)[k] = static_cast<T>(scale * row[k]);
  }
}

/// BatchTripletLoss of Q against R: the batch loss's mining with anchors from Q and
/// candidates from R (ties to the lowest row of R).
template <class T, class L, class LR>
T scalar_batch_triplet_reference(BatchTripletLoss<T>& loss, const MatrixView<const T>& q,
                                 const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                                 const MatrixView<T>& grad_q, const MatrixView<T>& grad_r,
                                 T top_diff) {
  auto& work = scratch_of<ScalarReferenceScratch>(loss);
  if (reference_not_finite(work.classes, q, labels, ref, grad_q, grad_r))
    return std::numeric_limits<T>::quiet_NaN();
  const Index nq = q.rows, nr = ref.r.rows;
  const auto entries = static_cast<std::size_t>(nq * nr);
  double* squared = work.squared.data(entries);
  cross_distances(q, ref.r, false, squared);
  const bool gradient = !grad_q.empty() || !grad_r.empty();
  DenseWeights weights{nullptr, nr};
  if (gradient) {
    weights.weights = work.weights.data(entries);
    std::fill(weights.weights, weights.weights + entries, 0.0);
  }
  const MiningResult result = work.miner.template mine<ScalarMiningKernels>(
      loss.mining, work.classes, ExactSquaredDistances{squared, nr}, loss.margin, loss.distance,
      loss.soft_margin, weights);
  if (result.count == 0.0) {
    fill_rows(grad_q, T(0));
    fill_rows(grad_r, T(0));
    return T(0);
  }
  if (gradient)
    cross_gradients(work, q, ref.r, weights.weights,
                    2.0 * static_cast<double>(top_diff) / result.count, grad_q, grad_r);
  return static_cast<T>(result.sum / result.count);
}

/// LiftedStructureLoss of Q against R: row normalisers over R's negatives of each query,
/// column normalisers over Q's negatives of each candidate, one J per ordered positive pair.
template <class T, class L, class LR>
T scalar_lifted_reference(LiftedStructureLoss<T>& loss, const MatrixView<const T>& q,
                          const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                          const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
  auto& work = scratch_of<ScalarReferenceScratch>(loss);
  if (reference_not_finite(work.classes, q, labels, ref, grad_q, grad_r))
    return std::numeric_limits<T>::quiet_NaN();
  const CrossClasses& classes = work.classes;
  const Index nq = q.rows, nr = ref.r.rows;
  const auto pairs = static_cast<double>(classes.positive_pairs());
  if (pairs == 0.0) {
    fill_rows(grad_q, T(0));
    fill_rows(grad_r, T(0));
    return T(0);
  }
  const auto entries = static_cast<std::size_t>(nq * nr);
  double* distance = work.distance.data(entries);
  cross_distances(q, ref.r, true, distance);
  const auto negative = [&](Index a, Index j) {
    return classes.own_class(a) != classes.class_of(j);
  };
  const double margin = loss.margin;

  // Normalisers, each shifted by its nearest negative: rows over R, columns over Q.
  double* row_nearest = work.row_nearest.data(static_cast<std::size_t>(nq));
  double* row_sum = work.row_sum.data(static_cast<std::size_t>(nq));
  double* row_log = work.row_log.data(static_cast<std::size_t>(nq));
  double* col_nearest = work.col_nearest.data(static_cast<std::size_t>(nr));
  double* col_sum = work.col_sum.data(static_cast<std::size_t>(nr));
  double* col_log = work.col_log.data(static_cast<std::size_t>(nr));
  std::fill(row_nearest, row_nearest + nq, std::numeric_limits<double>::infinity());
  std::fill(col_nearest, col_nearest + nr, std::numeric_limits<double>::infinity());
  std::fill(row_sum, row_sum + nq, 0.0);
  std::fill(col_sum, col_sum + nr, 0.0);
  for (Index a = 0; a < nq; ++a)
    for (Index j = 0; j < nr; ++j)
      if (negative(a, j)) {
        row_nearest[a] = std::min(row_nearest[a], distance[a * nr + j]);
        col_nearest[j] = std::min(col_nearest[j], distance[a * nr + j]);
      }
  for (Index a = 0; a < nq; ++a)
    for (Index j = 0; j < nr; ++j)
      if (negative(a, j)) {
        row_sum[a] += std::exp(row_nearest[a] - distance[a * nr + j]);
        col_sum[j] += std::exp(col_nearest[j] - distance[a * nr + j]);
      }
  for (Index a = 0; a < nq; ++a)
    row_log[a] = lifted_log_normaliser(margin, row_nearest[a], row_sum[a]);
  for (Index j = 0; j < nr; ++j)
    col_log[j] = lifted_log_normaliser(margin, col_nearest[j], col_sum[j]);

  // Positive pairs: the loss, each normaliser's coefficient, the positive weights.
  const bool gradient = !grad_q.empty() || !grad_r.empty();
  double* row_share = work.row_share.data(static_cast<std::size_t>(nq));
  double* col_share = work.col_share.data(static_cast<std::size_t>(nr));
  std::fill(row_share, row_share + nq, 0.0);
  std::fill(col_share, col_share + nr, 0.0);
  double* w = gradient ? work.weights.data(entries) : nullptr;
  if (gradient) std::fill(w, w + entries, 0.0);
  double sum = 0.0;
  for (Index a = 0; a < nq; ++a)
    for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p) {
      const Index j = *p;
      if (j == classes.self(a)) continue;
      const double daj = distance[a * nr + j];
      const LiftedPair pair = lifted_pair(row_log[a], col_log[j], daj);
      sum += pair.hinge * pair.hinge;
      if (!gradient) continue;
      row_share[a] += pair.hinge * pair.share_i;
      col_share[j] += pair.hinge * pair.share_j;
      w[a * nr + j] = weight_on_squared(pair.hinge, daj);
    }
  if (!gradient) return static_cast<T>(sum / (2.0 * pairs));

  // Negative weights from both normalisers: -c p / (2 D), p the soft-max weight.
  for (Index a = 0; a < nq; ++a)
    for (Index j = 0; j < nr; ++j) {
      if (!negative(a, j)) continue;
      const double daj = distance[a * nr + j];
      if (row_share[a] != 0.0)
        w[a * nr + j] += lifted_negative_weight(-row_share[a] / row_sum[a],
                                                std::exp(row_nearest[a] - daj), daj);
      if (col_share[j] != 0.0)
        w[a * nr + j] += lifted_negative_weight(-col_share[j] / col_sum[j],
                                                std::exp(col_nearest[j] - daj), daj);
    }
  cross_gradients(work, q, ref.r, w, 2.0 * static_cast<double>(top_diff) / pairs, grad_q, grad_r);
  return static_cast<T>(sum / (2.0 * pairs));
}

template <class T>
struct ReferenceBackend<BatchTripletLoss<T>, scalar_tag> {
  static constexpr bool available = true;
  template <class L, class LR>
  static T forward_backward(BatchTripletLoss<T>& loss, scalar_tag, const MatrixView<const T>& q,
                            const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                            const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
    return scalar_batch_triplet_reference(loss, q, labels, ref, grad_q, grad_r, top_diff);
  }
};

template <class T>
struct ReferenceBackend<LiftedStructureLoss<T>, scalar_tag> {
  static constexpr bool available = true;
  template <class L, class LR>
  static T forward_backward(LiftedStructureLoss<T>& loss, scalar_tag, const MatrixView<const T>& q,
                            const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                            const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
    return scalar_lifted_reference(loss, q, labels, ref, grad_q, grad_r, top_diff);
  }
};

}  // namespace detail
}  // namespace metricloss
