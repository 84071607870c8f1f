#pragma once
// Mining::all: every triplet, by counts and sums below each hinge's threshold (hinge) or
// by every (positive, negative) pair (soft margin: mining/all_soft.hpp).

#include <metricloss/detail/mining/all_soft.hpp>
#include <metricloss/detail/mining/cells.hpp>
#include <metricloss/detail/mining/common.hpp>

#include <limits>

namespace metricloss {
namespace detail {
namespace mining {

/// The hinges' kinks as squared distances, into s.centres (a kink at t <= 0 has no
/// negative below it: NaN), and their slack: the rounding of t^2 and of the square root
/// later, kink_slack of the largest.
inline const double* squared_kinks(Scratch& s, const double* thresholds, Index k,
                                   Distance distance, double& slack) {
  double* kink = s.centres.data(static_cast<std::size_t>(k));
  double largest = 0.0;
  for (Index i = 0; i < k; ++i) {
    const double t = thresholds[i];
    kink[i] = distance == Distance::squared_euclidean ? t
              : t > 0.0 ? t * t : std::numeric_limits<double>::quiet_NaN();
    if (std::abs(kink[i]) > largest) largest = std::abs(kink[i]);
  }
  slack = largest * Numerics<double>::kink_slack;
  return kink;
}

/// Squared product values (value[j], within rounding(a, j) of exact) near the kink of a
/// hinge, d_an = t_i, replaced by exact ones: which side of t_i a negative lies on decides
/// whether its triplet counts in Z, and a hinge at exactly 0 must not.
template <class Kernels, class Distances>
void exact_near_kinks(Scratch& s, const Distances& distances, Index a, double* value, Index n,
                      const double* thresholds, Index k, Distance distance, Index widest) {
  using Scans = typename Kernels::Scans;
  const double bound = distances.rounding(a, widest);
  if (!(bound > 0.0)) return;
  double slack = 0.0;
  const double* kink = squared_kinks(s, thresholds, k, distance, slack);
  Scans::near_thresholds(value, n, kink, k, bound + slack, [&](Index j) {
    const double own_bound = distances.rounding(a, j) + slack;
    for (Index i = 0; i < k; ++i)
      if (std::abs(value[j] - kink[i]) <= own_bound) {
        value[j] = distances.exact(a, j);  // rare
        return;
      }
  });
}

/// exact_near_kinks, the square roots and bucket[j] = count_thresholds_below<true> of
/// every row, for long rows: ThresholdCells over the kinks, widened to the rounding, give
/// most rows their bucket by a look-up (an unmarked cell lies a cell's width, >= 2^-30 of
/// the kinks, from every kink: no square root's rounding crosses one); the rows in marked
/// cells are tested against their two nearest kinks (as exact_near_kinks against all), and
/// recomputed and counted on their distances where near. False (value untouched) where
/// cells do not pay.
template <class Kernels, class Distances>
bool buckets_by_cells(Scratch& s, const Distances& distances, Index a, double* value,
                      Index* bucket, Index n, const double* thresholds, Index k,
                      Distance distance, Index widest) {
  const double bound = distances.rounding(a, widest);
  const bool recompute = bound > 0.0;
  double slack = 0.0;
  const double* kink = squared_kinks(s, thresholds, k, distance, slack);
  ThresholdCells cells;
  if (!cells.build(s.cells, kink, k, n, (recompute ? bound : 0.0) + slack))
    return false;
  Index* marked = s.near_rows.data(static_cast<std::size_t>(n));
  Index marked_count = 0;
  for (Index j = 0; j < n; ++j) {
    const Index code = cells.code(value[j]);
    bucket[j] = code - 1;
    marked[marked_count] = j;
    marked_count += code == 0 ? 1 : 0;
  }
  // A marked row near no kink (by more than its rounding and kink_slack) has as many
  // thresholds at most its distance as kinks below its squared one; a near one is
  // recomputed (where rounded) and counted on its distance, from its cell's lower bound.
  Index* near = s.exact_rows.data(static_cast<std::size_t>(n));
  Index near_count = 0;
  for (Index t = 0; t < marked_count; ++t) {
    const Index j = marked[t];
    const double v = value[j];
    const Index i = count_from<false>(kink, k, cells.below(v), v);
    const double own_bound = (recompute ? distances.rounding(a, j) : 0.0) + slack;
    if (near_neighbour(kink, k, i, v, own_bound))
      near[near_count++] = j;
    else
      bucket[j] = i;
  }
  for (Index t = 0; t < near_count; ++t) {
    if (recompute) {
      if (t + prefetch_distance < near_count) prefetch_exact(distances, a, near[t + prefetch_distance]);
      value[near[t]] = distances.exact(a, near[t]);
    }
    bucket[near[t]] = cells.below(value[near[t]]);
  }
  if (distance == Distance::euclidean) Kernels::RowOps::square_root_in_place(value, n);
  for (Index t = 0; t < near_count; ++t)
    bucket[near[t]] = count_from<true>(thresholds, k, bucket[near[t]], value[near[t]]);
  return true;
}

/// One anchor of Mining::all with the hinge and few positives: one scan per threshold
/// t_p counts the negatives with d_an < t_p and sums their distances, and counts per
/// negative the positives it is active with. value holds the row's distances.
template <class Kernels, class Classes, class T, class Weights>
void all_hinge_scan(Scratch& s, MiningResult& result, Index a, const Positive* positives, Index k,
                    const Classes& classes, const T*, double* value, double* slope,
                    Distance distance, Weights& weights) {
  constexpr bool lanes = Kernels::soft_margin_lanes;
  using Scans = typename Kernels::Scans;
  const Index n = classes.candidates();
  for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
    value[*p] = std::numeric_limits<double>::quiet_NaN();
  double* active = s.bucket_count.data(static_cast<std::size_t>(k));
  double* active_sum = s.bucket_sum.data(static_cast<std::size_t>(k));
  Scans::below_thresholds(value, n, s.thresholds.data(0), k, distance, active, active_sum, slope);
  for (Index i = 0; i < k; ++i) {
    result.sum += active[i] * positives[i].key - active_sum[i];
    result.count += active[i];
    if (weights.enabled() && active[i] > 0.0)
      weights.add(a, positives[i].index, active[i] * positives[i].distance.derivative);
  }
  if (!weights.enabled()) return;
  if constexpr (lanes) {
    // In T, as W holds them: SplitWeights' batches then need no conversion.
    T* w = s.template lanes_scratch<T>(static_cast<std::size_t>(n));
    for (Index j = 0; j < n; ++j) w[j] = static_cast<T>(slope[j]);
    weights.add_row_lanes(a, static_cast<const T*>(w), n);
  } else {
    weights.add_row(a, slope, n);
  }
}

/// Every triplet. Hinge: sum of max(d_ap + m - d_an, 0), count = active triplets, by
/// buckets with prefix sums. Softplus: count = all triplets (softplus is positive).
template <class Kernels, class Classes, class Distances, class Weights>
MiningResult all(Scratch& s, const Classes& classes, const Distances& distances, double margin,
                 Distance distance, bool soft_margin, Weights& weights) {
  const Index anchors = classes.anchors(), n = classes.candidates();
  const Index widest = distances.widest();
  const Index* class_of = classes.class_of();
  double* value = s.values.data(static_cast<std::size_t>(n));
  Index* bucket = s.buckets.data(static_cast<std::size_t>(n));
  double* slope = s.negative_slope.data(static_cast<std::size_t>(n));
  MiningResult result;
  for (Index a = 0; a < anchors; ++a) {
    const Index k = classes.positives(a);
    if (k == 0 || classes.negatives(a) == 0) continue;
    // Positives by threshold t_p = d_ap + m; a negative is active with p when d_an < t_p.
    const Positive* positives = s.sorted_positives(classes, a, [&](Index p) {
      const DistanceTerm d = distance_from_squared(distances.exact(a, p), distance);
      return Positive{d.value + margin, p, d};
    });
    const double* thresholds = s.thresholds_of(positives, k);
    const auto* row = distances.row(a);
    if constexpr (Kernels::soft_margin_lanes) {
      if (soft_margin) {
        all_soft_anchor_lanes<Kernels>(s, result, a, positives, k, classes, row, distance, weights);
        continue;
      }
    }
    // Distances of the whole row (one vectorisable pass; the anchor's class is skipped),
    // exact where a product value is within its rounding of a hinge's kink.
    for (Index j = 0; j < n; ++j) value[j] = static_cast<double>(row[j]);
    const bool by_cells = !soft_margin && k > scan_limit &&
                          buckets_by_cells<Kernels>(s, distances, a, value, bucket, n, thresholds,
                                                    k, distance, widest);
    if (!by_cells) {
      if (!soft_margin)
        exact_near_kinks<Kernels>(s, distances, a, value, n, thresholds, k, distance, widest);
      if (distance == Distance::euclidean) Kernels::RowOps::square_root_in_place(value, n);
    }
    const Index own = classes.own_class(a);
    if constexpr (!Kernels::soft_margin_lanes) {  // else taken above
      if (soft_margin) {
        all_soft_anchor<Kernels>(s, result, a, positives, k, n, class_of, own, value, slope,
                                  distance, weights);
        continue;
      }
    }
    if (k <= scan_limit) {
      all_hinge_scan<Kernels>(s, result, a, positives, k, classes, row, value, slope, distance,
                              weights);
      continue;
    }
    // Bucket b: negatives with exactly b thresholds <= d_an, active with positives b..k-1.
    // Four interleaved copies of the counts and sums, so that runs of one bucket do not
    // chain every add through the same memory word.
    constexpr Index copies = 4;
    const Index stride = k + 1;
    double* counts = s.bucket_count.data(static_cast<std::size_t>(copies * stride));
    double* sums = s.bucket_sum.data(static_cast<std::size_t>(copies * stride));
    std::fill(counts, counts + copies * stride, 0.0);
    std::fill(sums, sums + copies * stride, 0.0);
    if (!by_cells) count_thresholds_below<true>(thresholds, k, value, n, bucket);
    for (Index j = 0; j < n; ++j) {
      if (class_of[j] == own) continue;
      const Index slot = (j % copies) * stride + bucket[j];
      counts[slot] += 1.0;
      sums[slot] += value[j];
    }
    for (Index c = 1; c < copies; ++c)
      for (Index b = 0; b < stride; ++b) {
        counts[b] += counts[c * stride + b];
        sums[b] += sums[c * stride + b];
      }
    const double* count = counts;
    const double* sum = sums;
    double active = 0.0, active_sum = 0.0;
    for (Index i = 0; i < k; ++i) {
      active += count[i];
      active_sum += sum[i];
      result.sum += active * thresholds[i] - active_sum;
      result.count += active;
      if (weights.enabled() && active > 0.0)
        weights.add(a, positives[i].index, active * positives[i].distance.derivative);
    }
    if (!weights.enabled()) continue;
    // Negative j is active with k - bucket[j] positives (one branch-free pass).
    for (Index j = 0; j < n; ++j) {
      const double with = class_of[j] == own ? 0.0 : static_cast<double>(k - bucket[j]);
      slope[j] = -with * distance_derivative(value[j], distance);
    }
    weights.add_row(a, slope, n);
  }
  return result;
}

}  // namespace mining
}  // namespace detail
}  // namespace metricloss
