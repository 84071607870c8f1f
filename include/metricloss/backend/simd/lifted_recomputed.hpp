#pragma once
// The negatives the lifted loss's simd path recomputes in double (backend/simd/
// lifted_precision.hpp): a short list, whose nearest distances, shifted exp-sums and weights
// are taken in double beside the vectorised sweeps in T.
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/detail/views.hpp>

#include <algorithm>
#include <cmath>

namespace metricloss {
namespace detail {

/// A negative recomputed in double (recompute_weighted): the pair (i, k), k < i, and D_ik.
struct Recomputed {
  Index i, k;
  double distance;
};

/// The list's steps (LiftedPrecision's base).
struct LiftedRecomputedList {
  /// Each row's nearest over the list too: exact_nearest_i = min(it, D_ik) for every entry.
  static void list_nearest(const Recomputed* list, Index count, double* exact_nearest) {
    for (Index e = 0; e < count; ++e) {
      const Recomputed& r = list[e];
      exact_nearest[r.i] = std::min(exact_nearest[r.i], r.distance);
      exact_nearest[r.k] = std::min(exact_nearest[r.k], r.distance);
    }
  }

  /// The list's part of the shifted exp-sums: sums_i += exp(exact_nearest_i - D_ik), and the
  /// same for k, over the entries, in double.
  static void list_exp_sums(const Recomputed* list, Index count, const double* exact_nearest,
                            double* sums) {
    for (Index e = 0; e < count; ++e) {
      const Index i = list[e].i, k = list[e].k;
      const double dik = list[e].distance;
      sums[i] += std::exp(exact_nearest[i] - dik);
      sums[k] += std::exp(exact_nearest[k] - dik);
    }
  }

  /// An entry's S_ik = (f_i exp(nearest_i - D_ik) + f_k exp(nearest_k - D_ik)) / (2 D_ik) in
  /// double, f = list_factor (the factors of the double sums).
  static double list_weight(const Recomputed& r, const double* list_factor, const double* exact_nearest) {
    const double both = list_factor[r.i] * std::exp(exact_nearest[r.i] - r.distance) +
                        list_factor[r.k] * std::exp(exact_nearest[r.k] - r.distance);
    return weight_on_squared(both, r.distance);
  }
};

}  // namespace detail
}  // namespace metricloss
