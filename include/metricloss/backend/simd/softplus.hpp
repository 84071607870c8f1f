#pragma once
// Mining::all with soft_margin in T lanes: the kernels TripletMiner runs through
// Kernels::SoftMargin on the simd path (detail/batch_triplet_mining.hpp).
// One anchor's row: dist[r] the distances to every row, +inf where r is no negative (the
// anchor's class, and the padding up to a multiple of the batch width), so that those
// lanes add exactly 0 to every sum. Per positive (t = d_ap + margin) and negative, with
// x = t - d_an and e = exp(-|x|):
//   softplus(x) = max(x, 0) + log1p(e),  sigmoid(x) = (x >= 0 ? 1 : e) / (1 + e).
// log1p is never evaluated per entry: with u = 1 + e in T (in [1, 2]) and its rounding
// error c = e - (u - 1) (exact), log1p(e) = log(u) + c / u to within c^2, and the logs of
// a row are one log of the product of its u, accumulated in double lanes (no rounding
// that matters; <= 2^512 between logs). And e needs no exp per entry where the row fits:
// exp(t - d) = exp(t - centre) exp(centre - d), one product of per-positive and
// per-negative factors (exp(d - t) likewise from their inverses). Sums run in T lanes over
// chunks of 16 batches and are totalled in double.
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/triplet_math.hpp>
#include <metricloss/options.hpp>
#include <metricloss/types.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

struct SimdSoftMargin {
  /// The row length the soft-margin kernels run over: n rounded up to the batch width.
  template <class T>
  static Index soft_margin_padded(Index n) {
    constexpr Index width = static_cast<Index>(xsimd::batch<T>::size);
    return (n + width - 1) / width * width;
  }

  /// dist[r] = d(squared[r]) (sqrt for Euclidean) for r < n, +inf up to padded.
  template <class T>
  static void soft_margin_distances(const T* squared, Index n, Index padded, Distance distance,
                                    T* dist) {
    using batch = xsimd::batch<T>;
    constexpr Index width = static_cast<Index>(batch::size);
    const bool root = distance == Distance::euclidean;
    Index r = 0;
    for (; r + width <= n; r += width) {
      const batch q = batch::load_unaligned(squared + r);
      (root ? xsimd::sqrt(q) : q).store_unaligned(dist + r);
    }
    for (; r < n; ++r) dist[r] = root ? std::sqrt(squared[r]) : squared[r];
    for (; r < padded; ++r) dist[r] = std::numeric_limits<T>::infinity();
  }

  /// The per-negative factors of the row: factor[r] = exp(centre - dist[r]) and
  /// inverse[r] = exp(dist[r] - centre) (0 and 0 where dist is +inf), with centre the middle
  /// of the finite distances and the thresholds [t_min, t_max]. False (nothing written) when
  /// they span more than 2 soft_margin_span<T>, or a distance is NaN: the row then takes
  /// the exp per entry.
  template <class T>
  static bool soft_margin_factors(const T* dist, Index padded, double t_min, double t_max,
                                  T* factor, T* inverse, double& centre) {
    using batch = xsimd::batch<T>;
    constexpr Index width = static_cast<Index>(batch::size);
    const T inf = std::numeric_limits<T>::infinity();
    const batch infinite(inf);
    batch low(inf), high(-inf);
    auto nan = infinite != infinite;
    for (Index r = 0; r < padded; r += width) {
      const batch d = batch::load_unaligned(dist + r);
      low = xsimd::min(low, d);
      high = xsimd::max(high, xsimd::select(d < infinite, d, batch(-inf)));
      nan = nan | (d != d);
    }
    if (xsimd::any(nan)) return false;
    alignas(64) T lanes_low[width], lanes_high[width];
    low.store_aligned(lanes_low);
    high.store_aligned(lanes_high);
    double lo = t_min, hi = t_max;
    for (Index l = 0; l < width; ++l) {
      lo = std::min(lo, static_cast<double>(lanes_low[l]));
      hi = std::max(hi, static_cast<double>(lanes_high[l]));
    }
    const double span = soft_margin_span<T>();
    if (!(std::isfinite(lo) && std::isfinite(hi) && hi - lo <= 2.0 * span)) return false;
    const T c = static_cast<T>(0.5 * (lo + hi));
    centre = static_cast<double>(c);
    // Rounded to T at a large magnitude the centre can sit far off the middle (ulp(7e9) =
    // 512 in float), and exp(t - c) would overflow: only an exactly usable centre factors.
    if (!(hi - centre <= span && centre - lo <= span)) return false;
    const batch cb(c), zero(T(0));
    for (Index r = 0; r < padded; r += width) {
      const batch d = batch::load_unaligned(dist + r);
      const auto finite = d < infinite;
      // Finite d: both arguments within +-span (+ rounding); +inf: 0 and 0.
      xsimd::select(finite, xsimd::exp(xsimd::select(finite, cb - d, zero)), zero).store_unaligned(factor + r);
      xsimd::select(finite, xsimd::exp(xsimd::select(finite, d - cb, zero)), zero).store_unaligned(inverse + r);
    }
    return true;
  }

  /// sum_r softplus(t - dist[r]) for one positive; with Slopes, each sigmoid is added to
  /// slopes[r] and their sum returned in slope_sum. Factored: e from the factors of
  /// soft_margin_factors (centre as it returned); else exp(-|x|) per entry, its argument
  /// clamped to exp's range (NaN kept).
  template <bool Factored, bool Slopes, class T>
  static double soft_margin_row_lanes(double t, double centre, const T* dist, const T* factor,
                                      const T* inverse, Index padded, T* slopes,
                                      double& slope_sum) {
    using batch = xsimd::batch<T>;
    using wide = xsimd::batch<double>;
    constexpr Index width = static_cast<Index>(batch::size);
    constexpr Index halves = width / static_cast<Index>(wide::size);
    constexpr Index chunk = 16 * width, logs_every = 512;
    const batch tb(static_cast<T>(t)), zero(T(0)), one(T(1));
    const batch a(static_cast<T>(Factored ? std::exp(t - centre) : 0.0));
    const batch a_inverse(static_cast<T>(Factored ? std::exp(centre - t) : 0.0));
    const batch lowest(soft_margin_lowest<T>());
    std::array<wide, halves> product;
    product.fill(wide(1.0));
    double relu_total = 0.0, correction_total = 0.0, log_total = 0.0, slope_total = 0.0;
    Index batches = 0;
    for (Index r0 = 0; r0 < padded; r0 += chunk) {
      const Index r1 = std::min(padded, r0 + chunk);
      batch relu(T(0)), correction(T(0)), slope(T(0));
      for (Index r = r0; r < r1; r += width) {
        const batch x = tb - batch::load_unaligned(dist + r);
        const auto below = x < zero;
        batch e;
        if constexpr (Factored) {
          e = xsimd::select(below, a * batch::load_unaligned(factor + r),
                            a_inverse * batch::load_unaligned(inverse + r));
        } else {
          const batch y = -xsimd::abs(x);
          const auto in_range = y >= lowest;  // false for NaN: exp never sees it
          e = xsimd::exp(xsimd::select(in_range, y, lowest));
          e = xsimd::select(in_range, e, xsimd::select(y != y, y, zero));
        }
        const batch u = one + e;
        const batch inverse_u = one / u;
        relu += xsimd::max(x, zero);
        correction = xsimd::fma(e - (u - one), inverse_u, correction);
        multiply_widened(product, u);
        if constexpr (Slopes) {
          const batch s = xsimd::select(below, e, one) * inverse_u;
          slope += s;
          (batch::load_unaligned(slopes + r) + s).store_unaligned(slopes + r);
        }
      }
      relu_total += static_cast<double>(xsimd::hadd(relu));
      correction_total += static_cast<double>(xsimd::hadd(correction));
      if constexpr (Slopes) slope_total += static_cast<double>(xsimd::hadd(slope));
      batches += (r1 - r0) / width;
      if (batches >= logs_every || r1 == padded) {
        for (wide& p : product) {
          log_total += xsimd::hadd(xsimd::log(p));
          p = wide(1.0);
        }
        batches = 0;
      }
    }
    slope_sum = slope_total;
    return relu_total + (log_total + correction_total);
  }

  /// slopes[r] = -slopes[r] dd/dq(dist[r]): the weights of the negatives' squared distances
  /// from their summed sigmoids (0 stays 0, also at dist = +inf).
  template <class T>
  static void soft_margin_negative_weights(T* slopes, const T* dist, Index padded,
                                           Distance distance) {
    using batch = xsimd::batch<T>;
    constexpr Index width = static_cast<Index>(batch::size);
    const batch half(T(0.5)), zero(T(0)), infinite(std::numeric_limits<T>::infinity());
    for (Index r = 0; r < padded; r += width) {
      const batch s = batch::load_unaligned(slopes + r);
      if (distance == Distance::squared_euclidean) {
        (-s).store_unaligned(slopes + r);
      } else {
        const batch d = batch::load_unaligned(dist + r);
        (-s * (half / xsimd::select(d > zero, d, infinite))).store_unaligned(slopes + r);
      }
    }
  }

 private:
  /// The largest |argument| of a soft-margin factor's exp (detail/numerics.hpp).
  template <class T>
  static constexpr double soft_margin_span() {
    return Numerics<T>::soft_margin_span;
  }
  /// The smallest argument handed to exp (detail/numerics.hpp).
  template <class T>
  static constexpr T soft_margin_lowest() {
    return Numerics<T>::soft_margin_lowest;
  }

  /// product[h] *= the double lanes of u (u itself for double).
  template <class T, std::size_t H>
  static void multiply_widened(std::array<xsimd::batch<double>, H>& product,
                               const xsimd::batch<T>& u) {
    if constexpr (std::is_same<T, double>::value) {
      product[0] *= u;
    } else {
      using wide = xsimd::batch<double>;
      alignas(64) T lanes[xsimd::batch<T>::size];
      u.store_aligned(lanes);
      for (std::size_t h = 0; h < H; ++h) product[h] *= wide::load_aligned(lanes + h * wide::size);
    }
  }
};

}  // namespace detail
}  // namespace metricloss
