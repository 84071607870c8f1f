#pragma once
// The SIMD path of the lifted structured loss: the factorisation of
// <metricloss/lifted_structure.hpp> with D2 from one X X^T product (detail::PairwiseDistances,
// positive pairs recomputed by differences), the O(N^2) sqrt / exp of the row soft-maxes and
// the weights in xsimd batches, and dX from one (N x N)(N x D) product.
#include <metricloss/backend/simd/rowops.hpp>
#include <metricloss/detail/pairwise.hpp>
#include <metricloss/lifted_structure.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

template <class T>
struct Backend<LiftedStructureLoss<T>, simd_tag> {
  using batch = xsimd::batch<T>;
  static constexpr Index width = static_cast<Index>(batch::size);

  template <class L>
  static T forward_backward(LiftedStructureLoss<T>& loss, simd_tag, const MatrixView<const T>& x,
                            const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff) {
    LiftedStructureScratch<T>& scratch = loss.scratch_;
    double value = 0.0;
    if (lifted_trivial_case(scratch.classes, labels, all_finite(x), grad, value))
      return static_cast<T>(value);
    const LabelClasses& classes = scratch.classes;
    const Index n = x.rows;
    const double margin = loss.margin;
    PairwiseDistances<T>& pairwise = scratch.pairwise;

    // D: the product's D2, exact for the positive pairs, then square roots in place.
    pairwise.compute(x);
    T* distance = pairwise.squared().data();
    classes.for_each_positive_pair([&](Index i, Index j) {
      const T exact = static_cast<T>(pairwise.exact_squared(i, j));
      distance[i * n + j] = exact;
      distance[j * n + i] = exact;
    });
    square_roots(distance, n * n);

    // Class ids as T (exact below 2^24 classes), compared lane-wise to mask the negatives.
    T* class_value = scratch.class_values.data(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) class_value[i] = static_cast<T>(classes.class_of(i));

    // a_i, shifted by the nearest negative; with a gradient, exp(min_i - D_ik) of the
    // negatives is kept in row i of the weights (0 elsewhere).
    const bool gradient = !grad.empty();
    T* weight = gradient ? pairwise.zeroed_weights().data() : nullptr;
    double* log_normaliser = scratch.log_normaliser.data(static_cast<std::size_t>(n));
    double* min_distance = scratch.min_distance.data(static_cast<std::size_t>(n));
    double* shifted_sum = scratch.shifted_sum.data(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) {
      if (!classes.has_negatives(i)) {
        min_distance[i] = std::numeric_limits<double>::infinity();
        shifted_sum[i] = 0.0;
        log_normaliser[i] = -std::numeric_limits<double>::infinity();
        continue;
      }
      const T* row = distance + i * n;
      const T nearest = nearest_negative(row, class_value, class_value[i], n);
      min_distance[i] = static_cast<double>(nearest);
      shifted_sum[i] = shifted_exp_sum(row, class_value, class_value[i], nearest, n,
                                       gradient ? weight + i * n : nullptr);
      log_normaliser[i] = lifted_log_normaliser(margin, min_distance[i], shifted_sum[i]);
    }

    // Positive pairs: O(|P|) scalar work.
    double* coefficient = scratch.coefficient.data(static_cast<std::size_t>(n));
    std::fill(coefficient, coefficient + n, 0.0);
    double sum = 0.0;
    classes.for_each_positive_pair([&](Index i, Index j) {
      const double dij = static_cast<double>(distance[i * n + j]);
      const LiftedPair pair = lifted_pair(log_normaliser[i], log_normaliser[j], dij);
      sum += pair.hinge * pair.hinge;
      if (!gradient) return;
      coefficient[i] += pair.hinge * pair.share_i;
      coefficient[j] += pair.hinge * pair.share_j;
      weight[i * n + j] = static_cast<T>(weight_on_squared(pair.hinge, dij));
    });
    const auto pairs = static_cast<double>(classes.positive_pairs());
    if (!gradient) return static_cast<T>(sum / (2.0 * pairs));

    for (Index i = 0; i < n; ++i)
      if (classes.has_negatives(i))
        negative_weights(distance + i * n, class_value, class_value[i],
                         static_cast<T>(-coefficient[i] / shifted_sum[i]), n, weight + i * n);
    pairwise.gradient_from_weights(static_cast<T>(static_cast<double>(top_diff) / pairs), grad);
    return static_cast<T>(sum / (2.0 * pairs));
  }

 private:
  /// Finite iff every x - x is 0 (it is NaN for NaN and +-inf).
  static bool all_finite(const MatrixView<const T>& x) {
    batch probe(T(0));
    T tail = T(0);
    for (Index i = 0; i < x.rows; ++i) {
      const T* row = x.row(i);
      Index c = 0;
      for (; c + width <= x.cols; c += width) {
        const batch v = batch::load_unaligned(row + c);
        probe += v - v;
      }
      for (; c < x.cols; ++c) tail += row[c] - row[c];
    }
    return xsimd::all(probe == batch(T(0))) && tail == T(0);
  }

  static void square_roots(T* values, Index size) {
    Index k = 0;
    for (; k + width <= size; k += width)
      xsimd::sqrt(batch::load_unaligned(values + k)).store_unaligned(values + k);
    for (; k < size; ++k) values[k] = std::sqrt(values[k]);
  }

  /// min_k D_ik over the negatives k (class != own).
  static T nearest_negative(const T* row, const T* class_value, T own, Index n) {
    const T infinity = std::numeric_limits<T>::infinity();
    const batch own_class(own), far(infinity);
    batch nearest(infinity);
    Index k = 0;
    for (; k + width <= n; k += width) {
      const auto negative = batch::load_unaligned(class_value + k) != own_class;
      nearest = xsimd::min(nearest, xsimd::select(negative, batch::load_unaligned(row + k), far));
    }
    alignas(64) T lanes[width];
    nearest.store_aligned(lanes);
    T result = infinity;
    for (Index lane = 0; lane < width; ++lane) result = std::min(result, lanes[lane]);
    for (; k < n; ++k)
      if (class_value[k] != own) result = std::min(result, row[k]);
    return result;
  }

  /// sum_k exp(nearest - D_ik) over the negatives; exp values written to `exps` (negatives)
  /// and 0 (others) when it is not null. Lane sums in T over blocks of `block` batches,
  /// totalled in double.
  static double shifted_exp_sum(const T* row, const T* class_value, T own, T nearest, Index n,
                                T* exps) {
    constexpr Index block = 32;
    const batch own_class(own), shift(nearest), zero(T(0));
    double total = 0.0;
    Index k = 0;
    while (k + width <= n) {
      batch lanes(T(0));
      for (Index b = 0; b < block && k + width <= n; ++b, k += width) {
        const auto negative = batch::load_unaligned(class_value + k) != own_class;
        const batch e =
            xsimd::select(negative, xsimd::exp(shift - batch::load_unaligned(row + k)), zero);
        lanes += e;
        if (exps) e.store_unaligned(exps + k);
      }
      total += static_cast<double>(xsimd::hadd(lanes));
    }
    for (; k < n; ++k) {
      const T e = class_value[k] != own ? std::exp(nearest - row[k]) : T(0);
      total += static_cast<double>(e);
      if (exps) exps[k] = e;
    }
    return total;
  }

  /// W_ik = row_factor exp(min_i - D_ik) / (2 D_ik) over the negatives k (0 at D_ik = 0),
  /// from the exp values held in `weights`; positive entries are left as they are.
  static void negative_weights(const T* row, const T* class_value, T own, T row_factor, Index n,
                               T* weights) {
    const batch own_class(own), factor(row_factor), zero(T(0));
    Index k = 0;
    for (; k + width <= n; k += width) {
      const auto negative = batch::load_unaligned(class_value + k) != own_class;
      const batch dik = batch::load_unaligned(row + k);
      const batch current = batch::load_unaligned(weights + k);
      const batch w = xsimd::select(dik > zero, factor * current / (dik + dik), zero);
      xsimd::select(negative, w, current).store_unaligned(weights + k);
    }
    for (; k < n; ++k)
      if (class_value[k] != own)
        weights[k] = static_cast<T>(lifted_negative_weight(static_cast<double>(row_factor),
                                                           static_cast<double>(weights[k]),
                                                           static_cast<double>(row[k])));
  }
};

}  // namespace detail
}  // namespace metricloss
