#pragma once
// The SIMD path of MultiSimilarityLoss on the similarity form of the batch core: S by one
// product (CrossSimilarities, the batch as Q = R = X with self = identity), the rows of
// detail/multi_similarity_math.hpp with their kept sets decided on exact similarities where
// the product's rounding could decide them, and the gradient by one product (batch) or two
// (reference set).
#include <metricloss/backend/scalar/multi_similarity.hpp>
#include <metricloss/backend/simd/multi_similarity_row.hpp>
#include <metricloss/backend/simd/similarities.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/cross_classes.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/multi_similarity_math.hpp>
#include <metricloss/multi_similarity.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace metricloss {
namespace detail {

/// e[j] = exp(e[j]) in double lanes (xsimd::exp; the tail through one padded batch, so every
/// entry takes the same kernel): the sharded lifted rows' exponentials (backend/sharded_lifted.hpp). Inputs below
/// -1000 (-inf: not kept) are raised to it first: e^-1000 is 0 in double all the same, and
/// xsimd's exp converts x / ln 2 to an integer before it selects 0, which for -inf is undefined.
struct LanesExp {
  static void in_place(double* e, Index n) {
    using batch = xsimd::batch<double>;
    constexpr Index lanes = static_cast<Index>(batch::size);
    const batch floor(-1000.0);
    Index j = 0;
    for (; j + lanes <= n; j += lanes)
      xsimd::exp(xsimd::max(batch::load_unaligned(e + j), floor)).store_unaligned(e + j);
    if (j == n) return;
    alignas(64) double tail[lanes];
    for (Index k = 0; k < lanes; ++k) tail[k] = j + k < n ? e[j + k] : -1000.0;
    xsimd::exp(xsimd::max(batch::load_aligned(tail), floor)).store_aligned(tail);
    for (Index k = 0; j + k < n; ++k) e[j + k] = tail[k];
  }
};

template <class T>
struct SimdMultiSimilarityScratch : BackendSlot::Contents {
  LabelClasses batch_classes;
  CrossClasses cross_classes;
  CrossSimilarities<T> similarities;
  MultiSimilarityRowBuffers row;  // one anchor's row at a time
};

/// Every anchor's row in order; W's rows into `similarities` when `gradient`. Returns sum L_a.
template <class T, class Classes>
double simd_multi_similarity_rows(const MultiSimilarityRule& rule, const Classes& classes,
                                  SimdMultiSimilarityScratch<T>& work, Index candidates,
                                  bool gradient, double scale) {
  double sum = 0.0;
  for (Index a = 0; a < classes.anchors(); ++a)
    sum += multi_similarity_row_lanes(rule, classes, work.similarities, a, candidates, work.row,
                                      gradient ? work.similarities.weight_row(a) : nullptr, scale);
  return sum;
}

template <class T>
struct Backend<MultiSimilarityLoss<T>, simd_tag> {
  template <class L>
  static T forward_backward(MultiSimilarityLoss<T>& loss, simd_tag, const MatrixView<const T>& x,
                            const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<SimdMultiSimilarityScratch<T>>(loss);
    T value;
    if (batch_triplet_not_finite(work.batch_classes, x, labels, grad, value)) return value;
    work.similarities.compute_symmetric(x);
    const double n = static_cast<double>(x.rows);
    const double sum = simd_multi_similarity_rows(rule_of(loss), work.batch_classes, work, x.rows,
                                                  !grad.empty(), static_cast<double>(top_diff) / n);
    if (!grad.empty()) work.similarities.symmetric_gradient(grad);
    return static_cast<T>(sum / n);
  }
};

template <class T>
struct ReferenceBackend<MultiSimilarityLoss<T>, simd_tag> {
  static constexpr bool available = true;

  template <class L, class LR>
  static T forward_backward(MultiSimilarityLoss<T>& loss, simd_tag, const MatrixView<const T>& q,
                            const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                            const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
    auto& work = scratch_of<SimdMultiSimilarityScratch<T>>(loss);
    if (reference_not_finite(work.cross_classes, q, labels, ref, grad_q, grad_r))
      return std::numeric_limits<T>::quiet_NaN();
    work.similarities.compute(q, ref.r);
    const bool gradient = !grad_q.empty() || !grad_r.empty();
    const double n = static_cast<double>(q.rows);
    const double sum = simd_multi_similarity_rows(rule_of(loss), work.cross_classes, work, ref.r.rows,
                                                  gradient, static_cast<double>(top_diff) / n);
    if (gradient) work.similarities.gradients(grad_q, grad_r);
    return static_cast<T>(sum / n);
  }
};

}  // namespace detail
}  // namespace metricloss
