#pragma once
// The anchors of a batch-all band (backend/simd/all_band.hpp): each anchor's slots (its
// positives when it has negatives, sorted by threshold t_ap = d_ap + m from exact
// distances, as the single process's miner), their kinks as squared distances, and one
// anchor's scan over candidates, hinge or soft margin, adding to its slots' parts.
#include <metricloss/backend/sharded_all_candidates.hpp>
#include <metricloss/backend/simd/mining_scans.hpp>
#include <metricloss/backend/simd/pair_rowops.hpp>
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/backend/simd/softplus.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/mining/common.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/triplet_math.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace metricloss {
namespace detail {

/// One slot's part from one band: hinge, the count and distance sum of the negatives below
/// its threshold; soft margin, the sums of sigma and of softplus over the negatives.
struct AllBandSlot {
  double count = 0.0;
  double sum = 0.0;
};

template <class T>
class AllBandAnchors {
 public:
  /// Slots, thresholds (ascending per anchor), kinks and slacks of every anchor, and for each
  /// (anchor, positive in class order) its slot's rank and d'(d_ap). `pairwise` holds the
  /// rows' centred product; `widest` is the row of the largest centred norm.
  void build(PairwiseDistances<T>& pairwise, const LabelClasses& classes, double margin,
             Distance distance, Index widest) {
    pairwise_ = &pairwise;
    distance_ = distance;
    widest_ = widest;
    const Index n = pairwise.size();
    Index* position = position_.data(static_cast<std::size_t>(n));
    for (Index c = 0; c < classes.classes(); ++c)
      for (const Index* m = classes.class_begin(c); m != classes.class_end(c); ++m)
        position[*m] = m - classes.class_begin(c);
    Index* slot_first = slot_first_.data(static_cast<std::size_t>(n) + 1);
    slot_first[0] = 0;
    Index widest_class = 0;
    for (Index a = 0; a < n; ++a) {
      const Index k = classes.negatives(a) > 0 ? classes.positives(a) : 0;
      slot_first[a + 1] = slot_first[a] + k;
      widest_class = std::max(widest_class, k);
    }
    const Index total = slot_first[n];
    double* t = threshold_.data(static_cast<std::size_t>(total));
    double* kink = kink_.data(static_cast<std::size_t>(total));
    double* derivative = derivative_.data(static_cast<std::size_t>(total));
    Index* rank = rank_.data(static_cast<std::size_t>(total));
    double* slack = slack_.data(static_cast<std::size_t>(n));
    double* key = key_.data(static_cast<std::size_t>(widest_class));
    Index* order = order_.data(static_cast<std::size_t>(widest_class));
    for (Index a = 0; a < n; ++a) {
      const Index f = slot_first[a], k = slot_first[a + 1] - f;
      slack[a] = 0.0;
      if (k == 0) continue;
      Index e = 0;
      for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p) {
        if (*p == a) continue;
        const DistanceTerm d = distance_from_squared(pairwise.exact(a, *p), distance_);
        key[e] = d.value + margin;
        derivative[f + e] = d.derivative;
        ++e;
      }
      std::iota(order, order + k, Index(0));
      std::sort(order, order + k, [&](Index u, Index v) { return key[u] < key[v] || (key[u] == key[v] && u < v); });
      for (Index s = 0; s < k; ++s) {
        t[f + s] = key[order[s]];
        rank[f + order[s]] = s;
      }
      slack[a] = slot_kinks(t + f, k, distance_, kink + f);
    }
  }

  /// Anchor a's slots are [slot_first()[a], slot_first()[a + 1]).
  const Index* slot_first() { return slot_first_.data(0); }
  /// Every slot's threshold t_ap, ascending within an anchor; its kink as a squared distance.
  const double* thresholds() { return threshold_.data(0); }
  const double* kinks() { return kink_.data(0); }
  /// Per anchor, the slack on its kinks (the square root's rounding).
  const double* slacks() { return slack_.data(0); }
  /// Per row, its position in its class; per (anchor, positive in class order), its slot's
  /// rank among the anchor's slots and d'(d_ap).
  const Index* positions() { return position_.data(0); }
  const Index* ranks() { return rank_.data(0); }
  const double* derivatives() { return derivative_.data(0); }

  /// The most slots of an anchor among rows [0, end).
  Index widest_slots(Index end) {
    const Index* slot_first = slot_first_.data(0);
    Index k = 0;
    for (Index j = 0; j < end; ++j) k = std::max(k, slot_first[j + 1] - slot_first[j]);
    return k;
  }

  /// Soft margin, anchor a over m candidates with product D2 `squared` (T; +inf, or set to
  /// +inf in the distances by mark(dist): not a negative of a), as the miner's
  /// all_soft_anchor_lanes: adds a's slot parts to `out` and writes the candidates' weights
  /// on D2 to weight[0, m) (which may be `squared`).
  template <class Mark>
  void soft_scan(Index a, const T* squared, Index m, AllBandSlot* out, T* weight, Mark&& mark) {
    const Index f = slot_first_.data(0)[a], k = slot_first_.data(0)[a + 1] - f;
    const double* t = threshold_.data(0) + f;
    const Index padded = SimdSoftMargin::soft_margin_padded<T>(m);
    T* dist = soft_.data(static_cast<std::size_t>(4 * padded));
    T* factor = dist + padded;
    T* inverse = factor + padded;
    T* slope = inverse + padded;
    SimdSoftMargin::soft_margin_distances(squared, m, padded, distance_, dist);
    mark(dist);
    double centre = 0.0;
    const bool factored =
        SimdSoftMargin::soft_margin_factors(dist, padded, t[0], t[k - 1], factor, inverse, centre);
    std::fill(slope, slope + padded, T(0));
    for (Index s = 0; s < k; ++s) {
      double positive_slope = 0.0;
      out[s].sum += factored
                        ? SimdSoftMargin::soft_margin_row_lanes<true, true>(
                              t[s], centre, dist, factor, inverse, padded, slope, positive_slope)
                        : SimdSoftMargin::soft_margin_row_lanes<false, true>(
                              t[s], centre, dist, factor, inverse, padded, slope, positive_slope);
      out[s].count += positive_slope;
    }
    SimdSoftMargin::soft_margin_negative_weights(slope, dist, padded, distance_);
    std::copy(slope, slope + m, weight);
  }

  /// The hinge, anchor a over m candidates: value[r] their squared product distances (NaN:
  /// not a negative of a), global(r) their rows. Adds a's slot parts to `out` and leaves in
  /// slope[r] the candidates' weights on D2 (0 off the negatives).
  template <class Global>
  void scan(Index a, double* value, Index m, Global&& global, AllBandSlot* out, double* slope) {
    const Index f = slot_first_.data(0)[a], k = slot_first_.data(0)[a + 1] - f;
    const double* t = threshold_.data(0) + f;
    PairwiseDistances<T>& pairwise = *pairwise_;
    // As mining::exact_near_kinks: which side of a kink a value lies on decides its triplet.
    const double bound = pairwise.rounding_bound(a, widest_);
    if (bound > 0.0) {
      const double* kink = kink_.data(0) + f;
      const double slack = slack_.data(0)[a];
      SimdMiningScans::near_thresholds(value, m, kink, k, bound + slack, [&](Index r) {
        const Index j = global(r);
        const double own = pairwise.rounding_bound(a, j) + slack;
        for (Index s = 0; s < k; ++s)
          if (std::abs(value[r] - kink[s]) <= own) {
            value[r] = pairwise.exact(a, j);  // rare
            return;
          }
      });
    }
    if (distance_ == Distance::euclidean) SimdPairRowOps::square_root_in_place(value, m);
    if (k <= scan_limit) {
      double* active = active_.data(static_cast<std::size_t>(2 * k));
      SimdMiningScans::below_thresholds(value, m, t, k, distance_, active, active + k, slope);
      for (Index s = 0; s < k; ++s) {
        out[s].count += active[s];
        out[s].sum += active[k + s];
      }
      return;
    }
    // Bucket b: the negatives with b thresholds <= d, below the thresholds b..k-1.
    Index* bucket = bucket_.data(static_cast<std::size_t>(m));
    double* counts = active_.data(static_cast<std::size_t>(2 * (k + 1)));
    double* sums = counts + k + 1;
    std::fill(counts, counts + 2 * (k + 1), 0.0);
    count_thresholds_below<true>(t, k, value, m, bucket);
    for (Index r = 0; r < m; ++r) {
      if (value[r] != value[r]) {
        slope[r] = 0.0;
        continue;
      }
      counts[bucket[r]] += 1.0;
      sums[bucket[r]] += value[r];
      slope[r] = -static_cast<double>(k - bucket[r]) * distance_derivative(value[r], distance_);
    }
    double below = 0.0, below_sum = 0.0;
    for (Index s = 0; s < k; ++s) {
      below += counts[s];
      below_sum += sums[s];
      out[s].count += below;
      out[s].sum += below_sum;
    }
  }

 private:
  PairwiseDistances<T>* pairwise_ = nullptr;
  Distance distance_ = Distance::euclidean;
  Index widest_ = 0;
  GrowOnlyBuffer<Index> position_, slot_first_, rank_, order_, bucket_;
  GrowOnlyBuffer<double> threshold_, kink_, derivative_, slack_, key_, active_;
  GrowOnlyBuffer<T> soft_;  // soft_scan's rows
};

}  // namespace detail
}  // namespace metricloss
