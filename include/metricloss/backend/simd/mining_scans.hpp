#pragma once
// Row scans of the triplet miner for anchors with few positives (k <= scan_limit): one pass
// over the anchor's row of distances per positive threshold, in double lanes
// (SimdMiningScans, here) or plain loops (ScalarMiningScans, the reference).
// O(N k) per anchor, but a few cycles per 8 entries and no branch on the data, where the
// bucket sweep they replace (one scalar step per entry with a data-dependent branch) cost
// more than the product at N = 1024, k = 7. Entries that are not candidates hold NaN, which
// no comparison selects.
//
// Selections that keep an index keep the first in row order on ties: each lane keeps its
// first (strict compares), and lanes are merged by (value, index).
#include <metricloss/backend/scalar/mining_scans.hpp>

#include <xsimd/xsimd.hpp>

#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

struct SimdMiningScans {
  using batch = xsimd::batch<double>;
  static constexpr Index width = static_cast<Index>(batch::size);

  static Index nearest_above(const double* v, Index n, double t) {
    return select_lanes<true>(v, n, t);
  }

  static Index farthest(const double* v, Index n) {
    return select_lanes<false>(v, n, -std::numeric_limits<double>::infinity());
  }

  template <class Near>
  static void near_thresholds(const double* v, Index n, const double* t, Index k, double bound,
                              Near&& near) {
    const batch b(bound);
    Index j = 0;
    for (; j + width <= n; j += width) {
      const batch x = batch::load_unaligned(v + j);
      auto hit = xsimd::abs(x - batch(t[0])) <= b;
      for (Index i = 1; i < k; ++i) hit = hit | (xsimd::abs(x - batch(t[i])) <= b);
      if (xsimd::any(hit)) ScalarMiningScans::near_thresholds(v + j, width, t, k, bound, [&](Index r) { near(j + r); });
    }
    ScalarMiningScans::near_thresholds(v + j, n - j, t, k, bound, [&](Index r) { near(j + r); });
  }

  static void below_thresholds(const double* v, Index n, const double* t, Index k,
                               Distance distance, double* active, double* active_sum,
                               double* slope) {
    const batch zero(0.0), one(1.0);
    const Index full = n - n % width;
    for (Index j = 0; j < n; ++j) slope[j] = 0.0;
    for (Index i = 0; i < k; ++i) {
      const batch threshold(t[i]);
      batch count(0.0), sum(0.0);
      for (Index j = 0; j < full; j += width) {
        const batch x = batch::load_unaligned(v + j);
        const auto below = x < threshold;
        count += xsimd::select(below, one, zero);
        sum += xsimd::select(below, x, zero);
        (batch::load_unaligned(slope + j) + xsimd::select(below, one, zero)).store_unaligned(slope + j);
      }
      double c = xsimd::hadd(count), s = xsimd::hadd(sum);
      ScalarMiningScans::below(v, full, n, t[i], c, s, slope);
      active[i] = c;
      active_sum[i] = s;
    }
    Index j = 0;
    if (distance == Distance::squared_euclidean) {
      for (; j < full; j += width) (-batch::load_unaligned(slope + j)).store_unaligned(slope + j);
    } else {
      // distance_derivative in lanes: 0.5 / d, and 0 at d = 0 or NaN.
      const batch half(0.5), infinity(std::numeric_limits<double>::infinity());
      for (; j < full; j += width) {
        const batch x = batch::load_unaligned(v + j);
        const batch derivative = half / xsimd::select(x > zero, x, infinity);
        (-batch::load_unaligned(slope + j) * derivative).store_unaligned(slope + j);
      }
    }
    for (; j < n; ++j) slope[j] = -slope[j] * distance_derivative(v[j], distance);
  }

 private:
  /// Above: the smallest v[j] > t; else the largest v[j] > t (t = -inf: the largest). First
  /// j on ties, -1 if none (an infinite v never beats the infinite start of Above). Four
  /// independent lane sets: one would chain every batch through compare and select.
  template <bool Above>
  static Index select_lanes(const double* v, Index n, double t) {
    constexpr Index sets = 4;
    const double start = Above ? std::numeric_limits<double>::infinity() : t;
    const batch threshold(t);
    batch best[sets], index[sets], lane_index[sets];
    {
      alignas(64) double iota[width];
      for (Index l = 0; l < width; ++l) iota[l] = static_cast<double>(l);
      for (Index s = 0; s < sets; ++s) {
        best[s] = batch(start);
        index[s] = batch(-1.0);
        lane_index[s] = batch::load_aligned(iota) + batch(static_cast<double>(s * width));
      }
    }
    const batch step(static_cast<double>(sets * width));
    Index j = 0;
    for (; j + sets * width <= n; j += sets * width) {
      for (Index s = 0; s < sets; ++s) {
        const batch x = batch::load_unaligned(v + j + s * width);
        const auto better = Above ? ((x > threshold) & (x < best[s])) : (x > best[s]);
        best[s] = xsimd::select(better, x, best[s]);
        index[s] = xsimd::select(better, lane_index[s], index[s]);
        lane_index[s] += step;
      }
    }
    // The sets merged lane-wise by (value, index); a lane without a candidate holds `start`
    // and index -1, which a candidate's value always beats.
    for (Index s = 1; s < sets; ++s) {
      const auto take = (Above ? best[s] < best[0] : best[s] > best[0]) |
                        ((best[s] == best[0]) & (index[s] < index[0]));
      best[0] = xsimd::select(take, best[s], best[0]);
      index[0] = xsimd::select(take, index[s], index[0]);
    }
    alignas(64) double lane_best[width], lane_at[width];
    best[0].store_aligned(lane_best);
    index[0].store_aligned(lane_at);
    double value = start;
    Index found = -1;
    for (Index l = 0; l < width; ++l) {
      if (lane_at[l] < 0.0) continue;
      const Index at = static_cast<Index>(lane_at[l]);
      const bool wins = Above ? lane_best[l] < value : lane_best[l] > value;
      if (found < 0 || wins || (lane_best[l] == value && at < found)) {
        value = lane_best[l];
        found = at;
      }
    }
    ScalarMiningScans::select<Above>(v, j, n, t, value, found);
    return found;
  }
};

}  // namespace detail
}  // namespace metricloss
