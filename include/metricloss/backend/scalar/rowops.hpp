#pragma once
// Row primitives of the scalar reference path: plain loops, differences and sums in double.
#include <metricloss/types.hpp>

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
};

}  // namespace detail
}  // namespace metricloss
