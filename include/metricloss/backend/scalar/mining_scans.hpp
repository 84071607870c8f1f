#pragma once
// Row scans of the triplet miner (detail/batch_triplet_mining.hpp) for anchors with few
// positives, as plain loops: the reference, and the tails of the SIMD scans
// (backend/simd/mining_scans.hpp). Entries that are not candidates hold NaN, which no
// comparison selects; selections that keep an index keep the first in row order on ties.
#include <metricloss/detail/triplet_math.hpp>
#include <metricloss/options.hpp>
#include <metricloss/types.hpp>

#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

/// The reference: plain loops.
struct ScalarMiningScans {
  /// The smallest v[j] > t (first j on ties; NaN and +inf never), or -1.
  static Index nearest_above(const double* v, Index n, double t) {
    double value = std::numeric_limits<double>::infinity();
    Index found = -1;
    select<true>(v, 0, n, t, value, found);
    return found;
  }

  /// The largest v[j] (first j on ties; NaN never), or -1.
  static Index farthest(const double* v, Index n) {
    const double lowest = -std::numeric_limits<double>::infinity();
    double value = lowest;
    Index found = -1;
    select<false>(v, 0, n, lowest, value, found);
    return found;
  }

  /// Continues a selection over j in [begin, n): Above, the smallest v[j] > t; else the
  /// largest v[j] (t unused). Strict compares: an earlier j keeps a tie.
  template <bool Above>
  static void select(const double* v, Index begin, Index n, double t, double& value, Index& found) {
    for (Index j = begin; j < n; ++j)
      if (Above ? (v[j] > t && v[j] < value) : v[j] > value) {
        value = v[j];
        found = j;
      }
  }

  /// Adds to count and sum the v[j] < t for j in [begin, n), and 1 to slope[j] for each.
  static void below(const double* v, Index begin, Index n, double t, double& count, double& sum,
                    double* slope) {
    for (Index j = begin; j < n; ++j)
      if (v[j] < t) {
        count += 1.0;
        sum += v[j];
        slope[j] += 1.0;
      }
  }

  /// Calls near(j) for every j with |v[j] - t[i]| <= bound for some i < k.
  template <class Near>
  static void near_thresholds(const double* v, Index n, const double* t, Index k, double bound,
                              Near&& near) {
    for (Index j = 0; j < n; ++j)
      for (Index i = 0; i < k; ++i)
        if (std::abs(v[j] - t[i]) <= bound) {
          near(j);
          break;
        }
  }

  /// For each threshold t[i]: active[i] = #{j : v[j] < t[i]}, active_sum[i] = the sum of those
  /// v[j]; and slope[j] = -#{i : v[j] < t[i]} * distance_derivative(v[j]) (0 for NaN).
  static void below_thresholds(const double* v, Index n, const double* t, Index k,
                               Distance distance, double* active, double* active_sum,
                               double* slope) {
    for (Index j = 0; j < n; ++j) slope[j] = 0.0;
    for (Index i = 0; i < k; ++i) {
      double count = 0.0, sum = 0.0;
      below(v, 0, n, t[i], count, sum, slope);
      active[i] = count;
      active_sum[i] = sum;
    }
    for (Index j = 0; j < n; ++j) slope[j] = -slope[j] * distance_derivative(v[j], distance);
  }
};

/// The SIMD path: batches of doubles, scalar tails.
}  // namespace detail
}  // namespace metricloss
