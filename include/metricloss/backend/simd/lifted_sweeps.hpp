#pragma once
// The lower-triangle sweeps of the lifted loss's simd path (backend/simd/lifted_structure.hpp),
// in xsimd batches. Every N x N pass sweeps the lower triangle only, row by row: an entry
// (i, k), k < i, serves row i (row-wise, in registers) and row k (lane-wise into an N-vector
// of column sums, which stays in L1). Negatives are masked by class ids held as T.
//
// Near pairs. The product forms S_ik (xc_i - xc_k) as S_ik xc_i - S_ik xc_k, whose rounding
// error is about eps |S_ik| (|xc_i| + |xc_k|) against a true size |S_ik| D_ik; with
// S_ik ~ 1/D_ik it grows without bound as two points approach each other (near-duplicate
// positives, and hard negatives, which carry the largest soft-max weight). Pairs with
// D2_ik < near_ratio (||xc_i||^2 + ||xc_k||^2) are therefore taken out of S and applied
// by differences of the original rows; what stays in the product has a relative error
// of at most ~ 2 eps / sqrt(near_ratio) = 64 eps.
#include <metricloss/backend/simd/triangle.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/views.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

template <class T>
struct LiftedSweeps {
  using batch = xsimd::batch<T>;
  static constexpr Index width = static_cast<Index>(batch::size);

  /// exp with its argument clamped from below (-inf, NaN included: x86's max returns its
  /// second operand for NaN) to where exp is 0 in T anyway (e^-104 and e^-746 round to 0):
  /// xsimd 8.1's double exp on AVX-512 converts the exponent to int64 with a scalar cast,
  /// undefined below about -6.4e18 and for NaN. Callers keep the argument <= 0 (lanes
  /// that are no negative get D = +inf) and restore the scalar path's NaN row by row.
  static batch clamped_exp(const batch& argument) {
    constexpr T lowest = Numerics<T>::exp_floor;
    return xsimd::exp(xsimd::max(argument, batch(lowest)));
  }

  /// The same for one T, for the rows' tails: NaN (inf - inf: a recomputed entry, +inf,
  /// of a row whose T nearest is +inf) gives 0 as in the batches.
  static T clamped_exp(T argument) {
    constexpr T lowest = Numerics<T>::exp_floor;
    return std::exp(argument > lowest ? argument : lowest);
  }

  /// Row i's nearest negative among k < i, folding each such entry into column_nearest[k]
  /// too (the column's part of row k's nearest). Roots: `from` holds squared distances, whose
  /// roots go to `row` (which may be `from`); else `row` holds the distances.
  template <bool Roots>
  static T nearest_negative(const T* from, T* row, const T* class_value, T own, Index i,
                            T* column_nearest) {
    const T infinity = std::numeric_limits<T>::infinity();
    const batch own_class(own), far(infinity);
    batch nearest(infinity);
    Index k = 0;
    for (; k + width <= i; k += width) {
      batch dik = batch::load_unaligned((Roots ? from : row) + k);
      if constexpr (Roots) {
        dik = xsimd::sqrt(dik);
        dik.store_unaligned(row + k);
      }
      const batch masked =
          xsimd::select(batch::load_unaligned(class_value + k) != own_class, dik, far);
      nearest = xsimd::min(nearest, masked);
      xsimd::min(batch::load_unaligned(column_nearest + k), masked).store_unaligned(column_nearest + k);
    }
    alignas(64) T lanes[width];
    nearest.store_aligned(lanes);
    T result = infinity;
    for (Index lane = 0; lane < width; ++lane) result = std::min(result, lanes[lane]);
    for (; k < i; ++k) {
      if constexpr (Roots) row[k] = std::sqrt(from[k]);
      if (class_value[k] != own) {
        result = std::min(result, row[k]);
        column_nearest[k] = std::min(column_nearest[k], row[k]);
      }
    }
    return result;
  }

  /// Row i of the lower triangle (count = i, row_nearest = nearest_i, column_nearest =
  /// nearest), or a row of a rectangle: returns sum_{k < count} exp(row_nearest - D_ik) over the
  /// negatives (lane sums in T over blocks of `block` batches, totalled in double) and adds
  /// exp(column_nearest_k - D_ik) to column_partial[k]. With `column_wanted`, a batch of
  /// columns that are all 0 there skips its column part (those columns' sums stay as they were).
  static double shifted_exp_sums(const T* row, const T* class_value, T own, T row_nearest,
                                 const T* column_nearest, Index count, T* column_partial,
                                 const T* column_wanted = nullptr) {
    constexpr Index block = 32;
    const batch own_class(own), shift(row_nearest), far(std::numeric_limits<T>::infinity());
    double total = 0.0;
    Index k = 0;
    while (k + width <= count) {
      batch lanes(T(0));
      for (Index b = 0; b < block && k + width <= count; ++b, k += width) {
        // No negative: D = +inf, so that its exp is 0 (and its argument never positive).
        const batch dik = xsimd::select(batch::load_unaligned(class_value + k) != own_class,
                                        batch::load_unaligned(row + k), far);
        lanes += clamped_exp(shift - dik);
        if (column_wanted != nullptr && xsimd::all(batch::load_unaligned(column_wanted + k) == batch(T(0))))
          continue;
        const batch column = clamped_exp(batch::load_unaligned(column_nearest + k) - dik);
        (batch::load_unaligned(column_partial + k) + column).store_unaligned(column_partial + k);
      }
      total += static_cast<double>(xsimd::hadd(lanes));
    }
    for (; k < count; ++k) {
      if (class_value[k] == own) continue;
      total += static_cast<double>(clamped_exp(row_nearest - row[k]));
      column_partial[k] += clamped_exp(column_nearest[k] - row[k]);
    }
    return total;
  }

  /// Row i of the lower triangle of S, from row i of D (`row`): for a negative k,
  ///   S_ik = (f_i exp(nearest_i - D_ik) + f_k exp(nearest_k - D_ik)) / (2 D_ik)
  /// (0 at D_ik = 0) with f = row_factor; positive entries keep the pair weight already
  /// there. Near pairs (see the top of this file) are moved out of S into near_sums by
  /// differences of the original rows. Returns the row part of S 1 (k < i) and adds S_ik
  /// to column_partial[k].
  static double symmetric_weights(Index i, const T* row, const T* class_value,
                                  const T* nearest, const T* row_factor, const T* threshold,
                                  const MatrixView<const T>& x, T* out, T* column_partial,
                                  T*& near_sums, GrowOnlyBuffer<T>& near_gradient) {
    constexpr Index block = 32;
    const T own = class_value[i];
    const batch own_class(own), shift(nearest[i]), factor(row_factor[i]), zero(T(0)),
        own_threshold(threshold[i]), far(std::numeric_limits<T>::infinity());
    double total = 0.0;
    Index k = 0;
    while (k + width <= i) {
      batch lanes(T(0));
      for (Index b = 0; b < block && k + width <= i; ++b, k += width) {
        const auto negative = batch::load_unaligned(class_value + k) != own_class;
        const batch dik = batch::load_unaligned(row + k);
        const batch negative_dik = xsimd::select(negative, dik, far);  // as in shifted_exp_sums
        const batch both = factor * clamped_exp(shift - negative_dik) +
                           batch::load_unaligned(row_factor + k) *
                               clamped_exp(batch::load_unaligned(nearest + k) - negative_dik);
        const batch w = xsimd::select(dik > zero, both / (dik + dik), zero);
        batch s = xsimd::select(negative, w, batch::load_unaligned(out + k));
        // D2_ik < near_ratio n_i + near_ratio n_k, lane-wise: rare, so test before looking.
        if (xsimd::any(dik * dik < own_threshold + batch::load_unaligned(threshold + k))) {
          s.store_unaligned(out + k);
          for (Index lane = k; lane < k + width; ++lane)
            move_if_near(i, lane, row[lane], threshold, x, out[lane], near_sums, near_gradient);
          s = batch::load_unaligned(out + k);
        }
        s.store_unaligned(out + k);
        lanes += s;
        (batch::load_unaligned(column_partial + k) + s).store_unaligned(column_partial + k);
      }
      total += static_cast<double>(xsimd::hadd(lanes));
    }
    for (; k < i; ++k) {
      const T dik = row[k];
      T s = out[k];
      if (class_value[k] != own)
        s = dik > T(0) ? (row_factor[i] * clamped_exp(nearest[i] - dik) +
                          row_factor[k] * clamped_exp(nearest[k] - dik)) / (dik + dik)
                       : T(0);
      out[k] = s;
      move_if_near(i, k, dik, threshold, x, out[k], near_sums, near_gradient);
      total += static_cast<double>(out[k]);
      column_partial[k] += out[k];
    }
    return total;
  }

  /// The near-pair rule's per-row terms: threshold_i = near_ratio ||xc_i||^2 (a pair is near
  /// when D2_ik < threshold_i + threshold_k), from the centred batch.
  template <class Centred>
  static void near_thresholds(const Centred& xc, T* threshold) {
    for (Index i = 0; i < xc.rows(); ++i)
      threshold[i] = static_cast<T>(Numerics<T>::near_ratio * static_cast<double>(xc.row(i).squaredNorm()));
  }

  /// When (i, k) is a near pair, moves s = S_ik out: near_sums_i += s (x_i - x_k),
  /// near_sums_k -= s (x_i - x_k), and s = 0.
  static void move_if_near(Index i, Index k, T distance, const T* threshold,
                           const MatrixView<const T>& x, T& s, T*& near_sums,
                           GrowOnlyBuffer<T>& near_gradient) {
    if (!(distance * distance < threshold[i] + threshold[k])) return;
    const Index n = x.rows, d = x.cols;
    const T value = s;
    s = T(0);
    if (value == T(0)) return;
    if (near_sums == nullptr) {
      near_sums = near_gradient.data(static_cast<std::size_t>(n * d));
      std::fill(near_sums, near_sums + n * d, T(0));
    }
    const T* xi = x.row(i);
    const T* xk = x.row(k);
    T* gi = near_sums + i * d;
    T* gk = near_sums + k * d;
    for (Index c = 0; c < d; ++c) {
      const T v = value * (xi[c] - xk[c]);
      gi[c] += v;
      gk[c] -= v;
    }
  }

  /// grad += 2 scale near_sums (N x D, rows D apart): the near pairs' part of dX.
  static void add_near_sums(const T* near_sums, T scale, const MatrixView<T>& grad) {
    const T two_scale = T(2) * scale;
    for (Index i = 0; i < grad.rows; ++i) {
      T* out = grad.row(i);
      const T* add = near_sums + i * grad.cols;
      for (Index c = 0; c < grad.cols; ++c) out[c] += two_scale * add[c];
    }
  }

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
};

}  // namespace detail
}  // namespace metricloss
