#pragma once
// Row primitives of the SIMD path: xsimd batches over D for the compile-time best
// instruction set, with scalar tails for D not a multiple of the batch width.
#include <metricloss/types.hpp>

#include <xsimd/xsimd.hpp>

namespace metricloss {
namespace detail {

struct SimdRowOps {
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
};

}  // namespace detail
}  // namespace metricloss
