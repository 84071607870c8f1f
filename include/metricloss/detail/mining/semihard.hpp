#pragma once
// Mining::semihard: per (anchor, positive) the nearest negative farther than the positive,
// by row scans (few positives) or by buckets of sorted thresholds (many).

#include <metricloss/detail/mining/common.hpp>
#include <metricloss/detail/mining/semihard_cells.hpp>

#include <limits>

namespace metricloss {
namespace detail {
namespace mining {

/// One anchor of semihard with many positives: O(N log k) by buckets. value holds the
/// row's distances in double; on return it holds exact values where they were recomputed
/// and NaN off the negatives, and chosen[i] positive i's negative, ties settled.
template <class Classes, class Distances>
void semihard_by_buckets(Scratch& s, Index a, Index k, const Classes& classes,
                         const Distances& distances, double* value, Selection* chosen) {
  if (semihard_by_cells(s, a, k, classes, distances, value, chosen)) return;
  const Index n = classes.candidates();
  const Index* class_of = classes.class_of();
  const double* thresholds = s.thresholds.data(0);
  // Bucket b holds the negatives farther than exactly the b nearest positives; each
  // keeps its nearest (first in row order on ties).
  Index* nearest = s.nearest.data(static_cast<std::size_t>(k + 1));
  double* nearest_value = s.bucket_sum.data(static_cast<std::size_t>(k + 1));
  std::fill(nearest, nearest + k + 1, Index(-1));
  std::fill(nearest_value, nearest_value + k + 1, std::numeric_limits<double>::infinity());
  Index* bucket = s.buckets.data(static_cast<std::size_t>(n));
  count_thresholds_below<false>(thresholds, k, value, n, bucket);
  const Index own = classes.own_class(a);
  Index farthest = -1;
  double farthest_value = -std::numeric_limits<double>::infinity();
  // Negatives within their rounding of a threshold get exact values and buckets first, as
  // one batch: each reads a row that is rarely in cache (R may be a memory of 10^5 rows),
  // and requested a few rows ahead their loads overlap.
  Index* near = s.near_rows.data(static_cast<std::size_t>(n));
  Index near_count = 0;
  if (distances.rounding(a, distances.widest()) > 0.0)
    for (Index j = 0; j < n; ++j) {
      const double q = value[j];
      const Index b = bucket[j];
      const double bound = distances.rounding(a, j);
      if (class_of[j] != own && near_neighbour(thresholds, k, b, q, bound)) near[near_count++] = j;
    }
  for (Index t = 0; t < near_count; ++t) {
    if (t + prefetch_distance < near_count) prefetch_exact(distances, a, near[t + prefetch_distance]);
    const Index j = near[t];
    value[j] = distances.exact(a, j);
    bucket[j] = count_thresholds_below<false>(thresholds, k, value[j]);
  }
  for (Index j = 0; j < n; ++j) {
    if (class_of[j] == own) {
      value[j] = std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    const double q = value[j];
    const Index b = bucket[j];
    if (q > farthest_value) {
      farthest_value = q;
      farthest = j;
    }
    if (q < nearest_value[b]) {
      nearest_value[b] = q;
      nearest[b] = j;
    }
  }
  // Suffix minimum: nearest[i] becomes the nearest negative farther than positive i - 1
  // (bucket 0, nearer than every positive, never counts).
  for (Index b = k - 1; b >= 1; --b)
    if (nearest_value[b + 1] < nearest_value[b]) {
      nearest_value[b] = nearest_value[b + 1];
      nearest[b] = nearest[b + 1];
    }
  bool any_largest = false;
  for (Index i = 0; i < k; ++i) {
    chosen[i] = nearest[i + 1] >= 0
                    ? Selection{nearest[i + 1], thresholds[i], false}
                    : Selection{farthest, -std::numeric_limits<double>::infinity(), true};
    any_largest = any_largest || chosen[i].largest;
  }
  const double bound = distances.rounding(a, distances.widest());
  if (bound > 0.0)
    settle_bucket_windows(s, distances, a, value, bucket, nearest_value, n, chosen, k, bound,
                          any_largest ? farthest_value : std::numeric_limits<double>::quiet_NaN(),
                          near);
}

/// l_ap = h(d_ap - d_an* + m), n* the nearest negative farther than p (else the farthest
/// negative), over pairs (a, p) whose anchor has a negative.
template <class Kernels, class Classes, class Distances, class Weights>
MiningResult semihard(Scratch& s, const Classes& classes, const Distances& distances,
                      double margin, Distance distance, bool soft_margin, Weights& weights) {
  using Scans = typename Kernels::Scans;
  const Index anchors = classes.anchors(), n = classes.candidates();
  const Index widest = distances.widest();
  MiningResult result;
  for (Index a = 0; a < anchors; ++a) {
    const Index k = classes.positives(a);
    if (k == 0 || classes.negatives(a) == 0) continue;
    const auto* row = distances.row(a);
    // Exact thresholds, and below exact values for negatives within the product's rounding
    // of one: a negative tied with a positive (a duplicate row) is then never "farther".
    const Positive* positives = s.sorted_positives(classes, a, [&](Index p) {
      return Positive{distances.exact(a, p), p, {}};
    });
    const double* thresholds = s.thresholds_of(positives, k);
    double* value = s.values.data(static_cast<std::size_t>(n));
    for (Index j = 0; j < n; ++j) value[j] = static_cast<double>(row[j]);
    Selection* chosen = s.selections.data(static_cast<std::size_t>(k + 1));
    if (k > scan_limit) {
      semihard_by_buckets(s, a, k, classes, distances, value, chosen);
    } else {
      // One scan per positive over the row, the anchor's class masked out by NaN; first
      // the negatives near a threshold (within the largest bound of the row, then their
      // own) get exact values.
      for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
        value[*p] = std::numeric_limits<double>::quiet_NaN();
      const double bound = distances.rounding(a, widest);
      if (bound > 0.0)
        Scans::near_thresholds(value, n, thresholds, k, bound, [&](Index j) {
          const double own_bound = distances.rounding(a, j);
          for (Index i = 0; i < k; ++i)
            if (std::abs(value[j] - thresholds[i]) <= own_bound) {
              value[j] = distances.exact(a, j);  // rare
              return;
            }
        });
      Index farthest = -2;  // not yet searched
      for (Index i = 0; i < k; ++i) {
        chosen[i] = Selection{Scans::nearest_above(value, n, thresholds[i]), thresholds[i], false};
        if (chosen[i].chosen >= 0) continue;
        if (farthest == -2) farthest = Scans::farthest(value, n);
        chosen[i] = Selection{farthest, -std::numeric_limits<double>::infinity(), true};
      }
      // value: NaN off the negatives, exact near every threshold. Ties under rounding
      // are settled on exact distances.
      const double tie_bound = distances.rounding(a, widest);
      if (tie_bound > 0.0) settle_ties<Kernels>(s, distances, a, value, n, chosen, k, tie_bound);
    }
    // positives[i].key is d_ap^2 by differences; the selection's own where it has one.
    for (Index i = 0; i < k; ++i) {
      const Index negative = chosen[i].chosen;
      const double an = chosen[i].exact == chosen[i].exact ? chosen[i].exact : distances.exact(a, negative);
      add_triplet(result, a, positives[i].index, positives[i].key, negative, an, margin, distance,
                  soft_margin, weights);
    }
  }
  return result;
}

}  // namespace mining
}  // namespace detail
}  // namespace metricloss
