#pragma once
// The scalar reference path of MultiSimilarityLoss: every S_aj = <q_a, r_j> by loops in
// double, the rows of detail/multi_similarity_math.hpp, and by loops in double
//   dL/dx_i = sum_j (W_ij + W_ji) x_j   (batch),   dQ = W R,  dR = W^T Q   (reference set).
#include <metricloss/backend/scalar/reference.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/cross_classes.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/multi_similarity_math.hpp>
#include <metricloss/multi_similarity.hpp>

#include <algorithm>
#include <limits>

namespace metricloss {
namespace detail {

struct ScalarMultiSimilarityScratch : BackendSlot::Contents {
  LabelClasses batch_classes;
  CrossClasses cross_classes;
  GrowOnlyBuffer<double> similarity, weights;  // N_q x N_r: S, W = dL/dS times top_diff
  GrowOnlyBuffer<double> z;                    // N_r: one row's exponents
  GrowOnlyBuffer<double> gradient_row;         // D
};

/// Similarities in double, exact for the scalar path (no rounding to allow for).
struct ExactSimilarities {
  const double* s;
  Index n;
  const double* row(Index i) const { return s + i * n; }
  double exact(Index i, Index j) const { return s[i * n + j]; }
  double rounding(Index, Index) const { return 0.0; }
  double widest_rounding(Index) const { return 0.0; }
};

/// <q_a, r_j> for every pair, in double.
template <class T>
void cross_similarities(const MatrixView<const T>& q, const MatrixView<const T>& r, double* out) {
  for (Index a = 0; a < q.rows; ++a)
    for (Index j = 0; j < r.rows; ++j) {
      double sum = 0.0;
      for (Index k = 0; k < q.cols; ++k)
        sum += static_cast<double>(q.row(a)[k]) * static_cast<double>(r.row(j)[k]);
      out[a * r.rows + j] = sum;
    }
}

/// out_i = sum_j (w(i, j)) from_j for every row i of out (either may be empty), in double.
template <class T, class Weight>
void similarity_gradient(ScalarMultiSimilarityScratch& work, const MatrixView<const T>& from,
                         Weight weight, const MatrixView<T>& out) {
  const Index d = from.cols;
  double* row = work.gradient_row.data(static_cast<std::size_t>(d));
  for (Index i = 0; i < out.rows; ++i) {
    std::fill(row, row + d, 0.0);
    for (Index j = 0; j < from.rows; ++j) {
      const double w = weight(i, j);
      if (w == 0.0) continue;
      for (Index k = 0; k < d; ++k) row[k] += w * static_cast<double>(from.row(j)[k]);
    }
    for (Index k = 0; k < d; ++k) out.row(i)[k] = static_cast<T>(row[k]);
  }
}

/// The sum of the anchors' L_a (in order) and, when w is given, W scaled by `scale`.
template <class Classes>
double multi_similarity_rows(const MultiSimilarityRule& rule, const Classes& classes,
                             const double* s, Index candidates, ScalarMultiSimilarityScratch& work,
                             double* w, double scale) {
  double* z = work.z.data(static_cast<std::size_t>(candidates));
  double sum = 0.0;
  for (Index a = 0; a < classes.anchors(); ++a)
    sum += multi_similarity_row(rule, classes, ExactSimilarities{s, candidates}, a, candidates, z,
                                w ? w + a * candidates : nullptr, scale);
  return sum;
}

template <class T>
MultiSimilarityRule rule_of(const MultiSimilarityLoss<T>& loss) {
  return {static_cast<double>(loss.alpha), static_cast<double>(loss.beta),
          static_cast<double>(loss.base), static_cast<double>(loss.epsilon)};
}

template <class T>
struct Backend<MultiSimilarityLoss<T>, scalar_tag> {
  template <class L>
  static T forward_backward(MultiSimilarityLoss<T>& loss, scalar_tag, const MatrixView<const T>& x,
                            const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<ScalarMultiSimilarityScratch>(loss);
    T value;
    if (batch_triplet_not_finite(work.batch_classes, x, labels, grad, value)) return value;
    const Index n = x.rows;
    const auto entries = static_cast<std::size_t>(n * n);
    double* s = work.similarity.data(entries);
    cross_similarities(x, x, s);
    double* w = grad.empty() ? nullptr : work.weights.data(entries);
    const double scale = static_cast<double>(top_diff) / static_cast<double>(n);
    const double sum = multi_similarity_rows(rule_of(loss), work.batch_classes, s, n, work, w, scale);
    if (w != nullptr)
      similarity_gradient(work, x, [&](Index i, Index j) { return w[i * n + j] + w[j * n + i]; }, grad);
    return static_cast<T>(sum / static_cast<double>(n));
  }
};

template <class T>
struct ReferenceBackend<MultiSimilarityLoss<T>, scalar_tag> {
  static constexpr bool available = true;

  template <class L, class LR>
  static T forward_backward(MultiSimilarityLoss<T>& loss, scalar_tag, const MatrixView<const T>& q,
                            const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                            const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
    auto& work = scratch_of<ScalarMultiSimilarityScratch>(loss);
    if (reference_not_finite(work.cross_classes, q, labels, ref, grad_q, grad_r))
      return std::numeric_limits<T>::quiet_NaN();
    const Index nq = q.rows, nr = ref.r.rows;
    const auto entries = static_cast<std::size_t>(nq * nr);
    double* s = work.similarity.data(entries);
    cross_similarities(q, ref.r, s);
    const bool gradient = !grad_q.empty() || !grad_r.empty();
    double* w = gradient ? work.weights.data(entries) : nullptr;
    const double scale = static_cast<double>(top_diff) / static_cast<double>(nq);
    const double sum = multi_similarity_rows(rule_of(loss), work.cross_classes, s, nr, work, w, scale);
    if (gradient) {
      similarity_gradient(work, ref.r, [&](Index a, Index j) { return w[a * nr + j]; }, grad_q);
      similarity_gradient(work, q, [&](Index j, Index a) { return w[a * nr + j]; }, grad_r);
    }
    return static_cast<T>(sum / static_cast<double>(nq));
  }
};

}  // namespace detail
}  // namespace metricloss
