#pragma once
// Row primitives of the scalar reference path: plain loops, differences and sums in double.
#include <metricloss/detail/triplet_math.hpp>
#include <metricloss/types.hpp>

#include <algorithm>
#include <cmath>

namespace metricloss {
namespace detail {

struct ScalarRowOps {
  /// ||a - b||^2 over d entries, accumulated in double.
  template <class T>
  static double squared_distance(const T* a, const T* b, Index d) {
    double sum = 0.0;
    for (Index j = 0; j < d; ++j) {
      const double diff = static_cast<double>(a[j]) - static_cast<double>(b[j]);
      sum += diff * diff;
    }
    return sum;
  }

  /// out_pos = c (a - b) and out_neg = -c (a - b); either may be null (not wanted).
  template <class T>
  static void scaled_difference(T* out_pos, T* out_neg, const T* a, const T* b, double c,
                                Index d) {
    for (Index j = 0; j < d; ++j) {
      const T value = static_cast<T>(c * (static_cast<double>(a[j]) - static_cast<double>(b[j])));
      if (out_pos) out_pos[j] = value;
      if (out_neg) out_neg[j] = -value;
    }
  }

  /// d2 = ||a - b||^2, c = coefficient_of(d2), then out_pos = c (a - b), out_neg = -out_pos.
  template <class T, class CoefficientOf>
  static void fused_pair(const T* a, const T* b, Index d, T* out_pos, T* out_neg,
                         CoefficientOf&& coefficient_of) {
    const double c = coefficient_of(squared_distance(a, b, d));
    if (out_pos || out_neg) scaled_difference(out_pos, out_neg, a, b, c, d);
  }

  /// Every term in double already: no rounding to guard against.
  template <class T>
  static constexpr double sum_rounding_unit(Index) {
    return 0.0;
  }
  template <class T>
  static void exact_anchor_squared_distances(const T* a, const T* p, const T* n, Index d,
                                             double& positive, double& negative) {
    anchor_squared_distances(a, p, n, d, positive, negative);
  }

  /// ||a - p||^2 and ||a - n||^2 in one pass over the anchor row, accumulated in double.
  template <class T>
  static void anchor_squared_distances(const T* a, const T* p, const T* n, Index d,
                                       double& positive, double& negative) {
    double sum_p = 0.0, sum_n = 0.0;
    add_anchor_squared_distances(a, p, n, 0, d, sum_p, sum_n);
    positive = sum_p;
    negative = sum_n;
  }

  /// Adds the terms of entries [begin, d) to the two sums, in double (also the tail of the
  /// SIMD rows).
  template <class T>
  static void add_anchor_squared_distances(const T* a, const T* p, const T* n, Index begin,
                                           Index d, double& sum_p, double& sum_n) {
    for (Index j = begin; j < d; ++j) {
      const double x = static_cast<double>(a[j]);
      const double diff_p = x - static_cast<double>(p[j]);
      const double diff_n = x - static_cast<double>(n[j]);
      sum_p += diff_p * diff_p;
      sum_n += diff_n * diff_n;
    }
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
    for (Index j = 0; j < d; ++j) {
      const double x = static_cast<double>(a[j]);
      const double x_minus_n = x - static_cast<double>(n[j]);
      const double to_p = c_p * (x - static_cast<double>(p[j]));
      const double to_n = c_n * x_minus_n;
      if (grad_a) grad_a[j] = static_cast<T>(multiply_add(-c_n, x_minus_n, to_p));
      if (grad_p) grad_p[j] = static_cast<T>(-to_p);
      if (grad_n) grad_n[j] = static_cast<T>(to_n);
    }
  }

  /// values[r] = sqrt(values[r]) (Euclidean distances from squared ones).
  static void square_root_in_place(double* values, Index m) {
    for (Index r = 0; r < m; ++r) values[r] = std::sqrt(values[r]);
  }

  /// sum_r softplus(t - values[r]); each sigmoid(t - values[r]) is added to slopes[r] and
  /// their sum returned in slope_sum. (Mining::all with soft_margin, one positive.)
  static double soft_margin_row(double t, const double* values, Index m, double* slopes,
                                double& slope_sum) {
    double sum = 0.0, slope = 0.0;
    for (Index r = 0; r < m; ++r) {
      const HingeTerm h = hinge(t - values[r], /*soft_margin=*/true);
      sum += h.value;
      slope += h.slope;
      slopes[r] += h.slope;
    }
    slope_sum = slope;
    return sum;
  }
};

}  // namespace detail
}  // namespace metricloss
