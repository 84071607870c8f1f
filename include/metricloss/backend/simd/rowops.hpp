#pragma once
// Row primitives of the SIMD path: the pair primitives (backend/simd/pair_rowops.hpp) and
// the triplet rows, an anchor with its positive and its negative.
#include <metricloss/backend/scalar/rowops.hpp>
#include <metricloss/backend/simd/exact.hpp>
#include <metricloss/backend/simd/pair_rowops.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/triplet_math.hpp>
#include <metricloss/types.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

struct SimdRowOps : SimdPairRowOps {
  /// The same two distances with every term in double (the backend's one exact distance),
  /// for the rows where the lanes' rounding could decide the result (a hinge within it of its
  /// kink). Two passes over the anchor: such rows are rare.
  template <class T>
  static void exact_anchor_squared_distances(const T* a, const T* p, const T* n, Index d,
                                             double& positive, double& negative) {
    positive = exact_squared_distance(a, p, d);
    negative = exact_squared_distance(a, n, d);
  }

  /// ||a - p||^2 and ||a - n||^2 in one pass over the anchor row: lane sums in T, totals in
  /// double (as squared_distance).
  template <class T>
  static void anchor_squared_distances(const T* a, const T* p, const T* n, Index d,
                                       double& positive, double& negative) {
    using batch = xsimd::batch<T>;
    constexpr Index width = static_cast<Index>(batch::size);
    batch acc_p0(T(0)), acc_p1(T(0)), acc_n0(T(0)), acc_n1(T(0));
    Index j = 0;
    for (; j + 2 * width <= d; j += 2 * width) {
      const batch x0 = batch::load_unaligned(a + j), x1 = batch::load_unaligned(a + j + width);
      const batch p0 = x0 - batch::load_unaligned(p + j);
      const batch p1 = x1 - batch::load_unaligned(p + j + width);
      const batch n0 = x0 - batch::load_unaligned(n + j);
      const batch n1 = x1 - batch::load_unaligned(n + j + width);
      acc_p0 = xsimd::fma(p0, p0, acc_p0);
      acc_p1 = xsimd::fma(p1, p1, acc_p1);
      acc_n0 = xsimd::fma(n0, n0, acc_n0);
      acc_n1 = xsimd::fma(n1, n1, acc_n1);
    }
    if (j + width <= d) {
      const batch x0 = batch::load_unaligned(a + j);
      const batch p0 = x0 - batch::load_unaligned(p + j);
      const batch n0 = x0 - batch::load_unaligned(n + j);
      acc_p0 = xsimd::fma(p0, p0, acc_p0);
      acc_n0 = xsimd::fma(n0, n0, acc_n0);
      j += width;
    }
    double sum_p = static_cast<double>(xsimd::hadd(acc_p0 + acc_p1));
    double sum_n = static_cast<double>(xsimd::hadd(acc_n0 + acc_n1));
    ScalarRowOps::add_anchor_squared_distances(a, p, n, j, d, sum_p, sum_n);
    positive = sum_p;
    negative = sum_n;
  }

  /// The three gradient rows of one triplet, each of which may be null (not wanted):
  ///   grad_a = c_p (a - p) - c_n (a - n),  grad_p = -c_p (a - p),  grad_n = c_n (a - n).
  /// An inactive triplet (c_p = c_n = 0) writes zeros without reading its rows.
  template <class T>
  static void triplet_gradients(T* grad_a, T* grad_p, T* grad_n, const T* a, const T* p,
                                const T* n, double c_p, double c_n, Index d) {
    if (c_p == 0.0 && c_n == 0.0) {
      if (grad_a) std::fill(grad_a, grad_a + d, T(0));
      if (grad_p) std::fill(grad_p, grad_p + d, T(0));
      if (grad_n) std::fill(grad_n, grad_n + d, T(0));
      return;
    }
    if (!fits<T>(c_p) || !fits<T>(c_n))
      return ScalarRowOps::triplet_gradients(grad_a, grad_p, grad_n, a, p, n, c_p, c_n, d);
    // One loop per subset of wanted outputs, so the loop body has no branches.
    const int wanted = (grad_a ? 1 : 0) | (grad_p ? 2 : 0) | (grad_n ? 4 : 0);
    const T cp = static_cast<T>(c_p), cn = static_cast<T>(c_n);
    switch (wanted) {
      case 1: return triplet_gradient_rows<true, false, false>(grad_a, grad_p, grad_n, a, p, n, cp, cn, d);
      case 2: return triplet_gradient_rows<false, true, false>(grad_a, grad_p, grad_n, a, p, n, cp, cn, d);
      case 3: return triplet_gradient_rows<true, true, false>(grad_a, grad_p, grad_n, a, p, n, cp, cn, d);
      case 4: return triplet_gradient_rows<false, false, true>(grad_a, grad_p, grad_n, a, p, n, cp, cn, d);
      case 5: return triplet_gradient_rows<true, false, true>(grad_a, grad_p, grad_n, a, p, n, cp, cn, d);
      case 6: return triplet_gradient_rows<false, true, true>(grad_a, grad_p, grad_n, a, p, n, cp, cn, d);
      case 7: return triplet_gradient_rows<true, true, true>(grad_a, grad_p, grad_n, a, p, n, cp, cn, d);
      default: return;
    }
  }

 private:
  template <bool WantA, bool WantP, bool WantN, class T>
  static void triplet_gradient_rows(T* grad_a, T* grad_p, T* grad_n, const T* a, const T* p,
                                    const T* n, T c_p, T c_n, Index d) {
    using batch = xsimd::batch<T>;
    constexpr Index width = static_cast<Index>(batch::size);
    const batch cpb(c_p), cnb(c_n);
    Index j = 0;
    // grad_a = fnma(c_n, a - n, c_p (a - p)), written out: left to the compiler, which of the
    // two products it fuses would depend on which outputs are stored, and so would its bits.
    for (; j + width <= d; j += width) {
      const batch x = batch::load_unaligned(a + j);
      const batch to_p = cpb * (x - batch::load_unaligned(p + j));
      const batch x_minus_n = x - batch::load_unaligned(n + j);
      if constexpr (WantA) xsimd::fnma(cnb, x_minus_n, to_p).store_unaligned(grad_a + j);
      if constexpr (WantP) (-to_p).store_unaligned(grad_p + j);
      if constexpr (WantN) (cnb * x_minus_n).store_unaligned(grad_n + j);
    }
    for (; j < d; ++j) {
      const T to_p = c_p * (a[j] - p[j]);
      const T to_n = c_n * (a[j] - n[j]);
      if constexpr (WantA) grad_a[j] = multiply_add(-c_n, a[j] - n[j], to_p);
      if constexpr (WantP) grad_p[j] = -to_p;
      if constexpr (WantN) grad_n[j] = to_n;
    }
  }
};

}  // namespace detail
}  // namespace metricloss
