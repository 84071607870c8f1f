#pragma once
// The SIMD path of the lifted structured loss: the factorisation of
// <metricloss/lifted_structure.hpp> with D2 from one X X^T product (detail::PairwiseDistances,
// positive pairs recomputed by differences), the O(N^2) sqrt / exp of the row soft-maxes and
// the weights in xsimd batches, and dX from one (N x N)(N x D) product.
//
// Near pairs. The product forms S_ik (xc_i - xc_k) as S_ik xc_i - S_ik xc_k, whose rounding
// error is about eps |S_ik| (|xc_i| + |xc_k|) against a true size |S_ik| D_ik; with
// S_ik ~ 1/D_ik it grows without bound as two points approach each other (near-duplicate
// positives, and hard negatives, which carry the largest soft-max weight). Pairs with
// D2_ik < near_ratio (||xc_i||^2 + ||xc_k||^2) are therefore taken out of S and applied
// by differences of the original rows; what stays in the product has a relative error
// of at most ~ 2 eps / sqrt(near_ratio) = 64 eps.
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

    // D2 from the product, exact for the positive pairs; D = its square roots.
    pairwise.compute(x);
    T* squared = pairwise.squared().data();
    classes.for_each_positive_pair([&](Index i, Index j) {
      const T exact = static_cast<T>(pairwise.exact_squared(i, j));
      squared[i * n + j] = exact;
      squared[j * n + i] = exact;
    });
    T* distance = scratch.distance_values.data(static_cast<std::size_t>(n * n));

    // Class ids as T (exact below 2^24 classes), compared lane-wise to mask the negatives.
    T* class_value = scratch.class_values.data(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) class_value[i] = static_cast<T>(classes.class_of(i));

    // D and a_i, shifted by the nearest negative (every row has negatives: two classes at
    // least); with a gradient, exp(min_i - D_ik) of the negatives is kept in row i of the
    // weights, 0 elsewhere, so that every entry of W is written.
    const bool gradient = !grad.empty();
    T* weight = gradient ? pairwise.weights().data() : nullptr;
    double* log_normaliser = scratch.log_normaliser.data(static_cast<std::size_t>(n));
    double* min_distance = scratch.min_distance.data(static_cast<std::size_t>(n));
    double* shifted_sum = scratch.shifted_sum.data(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) {
      T* row = distance + i * n;
      const T nearest = roots_and_nearest_negative(squared + i * n, row, class_value, class_value[i], n);
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
      negative_weights(distance + i * n, class_value, class_value[i],
                       static_cast<T>(-coefficient[i] / shifted_sum[i]), n, weight + i * n);
    const T scale = static_cast<T>(static_cast<double>(top_diff) / pairs);
    const bool any_near = take_out_near_pairs(scratch, x, squared, weight);
    pairwise.gradient_from_weights(scale, grad);
    if (any_near) {
      const T* near_sums = scratch.near_gradient.data(0);
      const T two_scale = T(2) * scale;
      for (Index i = 0; i < n; ++i) {
        T* out = grad.row(i);
        const T* add = near_sums + i * x.cols;
        for (Index c = 0; c < x.cols; ++c) out[c] += two_scale * add[c];
      }
    }
    return static_cast<T>(sum / (2.0 * pairs));
  }

 private:
  static constexpr double near_ratio = 1.0 / 1024;

  /// Finite iff every x - x is 0 (it is NaN for NaN and +-inf).
  static bool all_finite(const MatrixView<const T>& x) {
    const Index d = x.cols, full = d / width * width;
    batch probe(T(0));
    T tail = T(0);
    for (Index i = 0; i < x.rows; ++i) {
      const T* row = x.row(i);
      for (Index c = 0; c < full; c += width) {
        const batch v = batch::load_unaligned(row + c);
        probe += v - v;
      }
      for (Index c = full; c < d; ++c) tail += row[c] - row[c];
    }
    return xsimd::all(probe == batch(T(0))) && tail == T(0);
  }

  /// Moves the weight of every near pair (see the top of this file) out of W into
  /// near_gradient = sum_k S_ik (x_i - x_k) by differences of the original rows. False
  /// when there is none (near_gradient is then not written).
  static bool take_out_near_pairs(LiftedStructureScratch<T>& scratch, const MatrixView<const T>& x,
                                  const T* squared, T* weight) {
    const Index n = x.rows;
    const auto xc = scratch.pairwise.centred();
    T* threshold = scratch.near_threshold.data(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i)
      threshold[i] = static_cast<T>(near_ratio * static_cast<double>(xc.row(i).squaredNorm()));
    T* near_sums = nullptr;
    for (Index i = 0; i < n; ++i) {
      const T* row = squared + i * n;
      const batch own(threshold[i]);
      Index k = 0;
      for (; k + width <= i; k += width) {
        // D2_ik < near_ratio n_i + near_ratio n_k, lane-wise: rare, so test before looking.
        const auto near = batch::load_unaligned(row + k) < own + batch::load_unaligned(threshold + k);
        if (xsimd::any(near))
          for (Index lane = k; lane < k + width; ++lane)
            move_if_near(i, lane, row[lane], threshold, x, weight, near_sums, scratch);
      }
      for (; k < i; ++k) move_if_near(i, k, row[k], threshold, x, weight, near_sums, scratch);
    }
    return near_sums != nullptr;
  }

  static void move_if_near(Index i, Index k, T squared, const T* threshold,
                           const MatrixView<const T>& x, T* weight, T*& near_sums,
                           LiftedStructureScratch<T>& scratch) {
    if (!(squared < threshold[i] + threshold[k])) return;
    const Index n = x.rows, d = x.cols;
    const T s = weight[i * n + k] + weight[k * n + i];
    weight[i * n + k] = T(0);
    weight[k * n + i] = T(0);
    if (s == T(0)) return;
    if (near_sums == nullptr) {
      near_sums = scratch.near_gradient.data(static_cast<std::size_t>(n * d));
      std::fill(near_sums, near_sums + n * d, T(0));
    }
    const T* xi = x.row(i);
    const T* xk = x.row(k);
    T* gi = near_sums + i * d;
    T* gk = near_sums + k * d;
    for (Index c = 0; c < d; ++c) {
      const T v = s * (xi[c] - xk[c]);
      gi[c] += v;
      gk[c] -= v;
    }
  }

  /// Row i of D = sqrt(D2), and min_k D_ik over the negatives k (class != own).
  static T roots_and_nearest_negative(const T* squared, T* row, const T* class_value, T own,
                                      Index n) {
    const T infinity = std::numeric_limits<T>::infinity();
    const batch own_class(own), far(infinity);
    batch nearest(infinity);
    Index k = 0;
    for (; k + width <= n; k += width) {
      const batch dik = xsimd::sqrt(batch::load_unaligned(squared + k));
      dik.store_unaligned(row + k);
      const auto negative = batch::load_unaligned(class_value + k) != own_class;
      nearest = xsimd::min(nearest, xsimd::select(negative, dik, far));
    }
    alignas(64) T lanes[width];
    nearest.store_aligned(lanes);
    T result = infinity;
    for (Index lane = 0; lane < width; ++lane) result = std::min(result, lanes[lane]);
    for (; k < n; ++k) {
      row[k] = std::sqrt(squared[k]);
      if (class_value[k] != own) result = std::min(result, row[k]);
    }
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
