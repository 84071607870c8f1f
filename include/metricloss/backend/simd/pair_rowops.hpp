#pragma once
// The pair primitives of the SIMD path (all that ContrastiveLoss's rows need): xsimd batches
// over D for the compile-time best instruction set, with scalar tails for D not a multiple
// of the batch width. SimdRowOps (backend/simd/rowops.hpp) adds the triplet rows.
#include <metricloss/backend/scalar/rowops.hpp>
#include <metricloss/types.hpp>

#include <xsimd/xsimd.hpp>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <array>
#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

/// sqrt(q) without a libm call: std::sqrt keeps errno for q < 0 by calling sqrt on that
/// path, and a call in the row loop makes the compiler spill the row's registers around it.
inline double square_root(double q) {
#if defined(__SSE2__)
  return _mm_cvtsd_f64(_mm_sqrt_pd(_mm_set_sd(q)));
#else
  return std::sqrt(q);
#endif
}

struct SimdPairRowOps {
  /// A coefficient too large for T (1/d at a subnormal distance d, in float) would turn a
  /// finite gradient into inf in T arithmetic; such rows are scaled in double instead.
  template <class T>
  static bool fits(double c) {
    return std::abs(c) <= static_cast<double>(std::numeric_limits<T>::max());
  }

  /// ||a - b||^2: lane sums in T over D / width entries, then the total in double.
  /// Two accumulators hide the FMA latency.
  template <class T>
  static double squared_distance(const T* a, const T* b, Index d) {
    using batch = xsimd::batch<T>;
    constexpr Index width = static_cast<Index>(batch::size);
    batch acc0(T(0)), acc1(T(0));
    Index j = 0;
    for (; j + 2 * width <= d; j += 2 * width) {
      const batch x0 = batch::load_unaligned(a + j) - batch::load_unaligned(b + j);
      const batch x1 = batch::load_unaligned(a + j + width) - batch::load_unaligned(b + j + width);
      acc0 = xsimd::fma(x0, x0, acc0);
      acc1 = xsimd::fma(x1, x1, acc1);
    }
    if (j + width <= d) {
      const batch x0 = batch::load_unaligned(a + j) - batch::load_unaligned(b + j);
      acc0 = xsimd::fma(x0, x0, acc0);
      j += width;
    }
    double sum = static_cast<double>(xsimd::hadd(acc0 + acc1));
    for (; j < d; ++j) {
      const double diff = static_cast<double>(a[j]) - static_cast<double>(b[j]);
      sum += diff * diff;
    }
    return sum;
  }

  /// out_pos = c (a - b) and out_neg = -c (a - b); either may be null (not wanted).
  template <class T>
  static void scaled_difference(T* out_pos, T* out_neg, const T* a, const T* b, double c,
                                Index d) {
    if (!fits<T>(c)) return ScalarRowOps::scaled_difference(out_pos, out_neg, a, b, c, d);
    if (out_pos && out_neg) {
      run(a, b, static_cast<T>(c), d, [&](Index j, auto v) {
        v.store_unaligned(out_pos + j);
        (-v).store_unaligned(out_neg + j);
      }, [&](Index j, T v) {
        out_pos[j] = v;
        out_neg[j] = -v;
      });
    } else if (out_pos) {
      run(a, b, static_cast<T>(c), d, [&](Index j, auto v) { v.store_unaligned(out_pos + j); },
          [&](Index j, T v) { out_pos[j] = v; });
    } else if (out_neg) {
      run(a, b, static_cast<T>(-c), d, [&](Index j, auto v) { v.store_unaligned(out_neg + j); },
          [&](Index j, T v) { out_neg[j] = v; });
    }
  }

  /// Lane sums in T: each squared distance errs by up to about (d + 8) u_T of itself.
  template <class T>
  static constexpr double sum_rounding_unit(Index d) {
    return (static_cast<double>(d) + 8.0) * (static_cast<double>(std::numeric_limits<T>::epsilon()) / 2.0);
  }

  /// values[r] = sqrt(values[r]) (Euclidean distances from squared ones), in batches: the
  /// scalar loop does not vectorise where sqrt may set errno.
  static void square_root_in_place(double* values, Index m) {
    using batch = xsimd::batch<double>;
    constexpr Index width = static_cast<Index>(batch::size);
    Index r = 0;
    for (; r + width <= m; r += width) xsimd::sqrt(batch::load_unaligned(values + r)).store_unaligned(values + r);
    for (; r < m; ++r) values[r] = std::sqrt(values[r]);
  }

  /// The fused pair primitive: d2 = ||a - b||^2, c = coefficient_of(d2), then
  /// out_pos = c (a - b), out_neg = -c (a - b). Rows of up to 8 batches keep a - b in
  /// registers, so each input element is loaded once; longer rows take two passes (the
  /// second from L1).
  template <class T, class CoefficientOf>
  static void fused_pair(const T* a, const T* b, Index d, T* out_pos, T* out_neg,
                         CoefficientOf&& coefficient_of) {
    using batch = xsimd::batch<T>;
    constexpr Index width = static_cast<Index>(batch::size);
    switch (d / width) {
      case 0: return fused_pair_in_registers<0>(a, b, d, out_pos, out_neg, coefficient_of);
      case 1: return fused_pair_in_registers<1>(a, b, d, out_pos, out_neg, coefficient_of);
      case 2: return fused_pair_in_registers<2>(a, b, d, out_pos, out_neg, coefficient_of);
      case 3: return fused_pair_in_registers<3>(a, b, d, out_pos, out_neg, coefficient_of);
      case 4: return fused_pair_in_registers<4>(a, b, d, out_pos, out_neg, coefficient_of);
      case 5: return fused_pair_in_registers<5>(a, b, d, out_pos, out_neg, coefficient_of);
      case 6: return fused_pair_in_registers<6>(a, b, d, out_pos, out_neg, coefficient_of);
      case 7: return fused_pair_in_registers<7>(a, b, d, out_pos, out_neg, coefficient_of);
      case 8: return fused_pair_in_registers<8>(a, b, d, out_pos, out_neg, coefficient_of);
      default: {
        const double c = coefficient_of(squared_distance(a, b, d));
        scaled_difference(out_pos, out_neg, a, b, c, d);
      }
    }
  }

 private:
  template <class T, class StoreBatch, class StoreOne>
  static void run(const T* a, const T* b, T c, Index d, StoreBatch&& store_batch,
                  StoreOne&& store_one) {
    using batch = xsimd::batch<T>;
    constexpr Index width = static_cast<Index>(batch::size);
    const batch cb(c);
    Index j = 0;
    for (; j + width <= d; j += width)
      store_batch(j, cb * (batch::load_unaligned(a + j) - batch::load_unaligned(b + j)));
    for (; j < d; ++j) store_one(j, c * (a[j] - b[j]));
  }

  template <Index full_batches, class T, class CoefficientOf>
  static void fused_pair_in_registers(const T* a, const T* b, Index d, T* out_pos, T* out_neg,
                                      CoefficientOf& coefficient_of) {
    using batch = xsimd::batch<T>;
    constexpr Index width = static_cast<Index>(batch::size);
    std::array<batch, full_batches + 1> diff;  // + 1: never a zero-size array
    batch acc0(T(0)), acc1(T(0));
    for (Index k = 0; k < full_batches; ++k) {
      diff[k] = batch::load_unaligned(a + k * width) - batch::load_unaligned(b + k * width);
      if (k % 2 == 0)
        acc0 = xsimd::fma(diff[k], diff[k], acc0);
      else
        acc1 = xsimd::fma(diff[k], diff[k], acc1);
    }
    constexpr Index tail_begin = full_batches * width;
    T tail[width];
    double squared = full_batches > 0 ? static_cast<double>(xsimd::hadd(acc0 + acc1)) : 0.0;
    for (Index j = tail_begin; j < d; ++j) {
      const T t = a[j] - b[j];
      tail[j - tail_begin] = t;
      squared += static_cast<double>(t) * static_cast<double>(t);
    }
    const double coefficient = coefficient_of(squared);
    if (!fits<T>(coefficient))
      return ScalarRowOps::scaled_difference(out_pos, out_neg, a, b, coefficient, d);
    const T c = static_cast<T>(coefficient);
    const batch positive(c), negative(-c);
    if (out_pos) {
      for (Index k = 0; k < full_batches; ++k) (positive * diff[k]).store_unaligned(out_pos + k * width);
      for (Index j = tail_begin; j < d; ++j) out_pos[j] = c * tail[j - tail_begin];
    }
    if (out_neg) {
      for (Index k = 0; k < full_batches; ++k) (negative * diff[k]).store_unaligned(out_neg + k * width);
      for (Index j = tail_begin; j < d; ++j) out_neg[j] = -c * tail[j - tail_begin];
    }
  }
};

}  // namespace detail
}  // namespace metricloss
