#pragma once
// Online triplet mining over one labelled batch, shared by the CPU backends of
// BatchTripletLoss. A backend supplies the squared distances and receives the gradient as
// weights on squared distances; the selection and the loss are decided here only.
//
//   Distances: row(a)[j]  squared distance used to select (approximate on the simd path),
//              exact(a, j) squared distance by differences, used in the loss of mined pairs;
//              rounding(a, j) a bound on |row(a)[j] - exact(a, j)| (0 when exact);
//              widest() a j whose rounding(a, j) is the largest of row a, for every a.
//   Weights:   enabled()   false when no gradient is wanted;
//              add(i, j, w) adds w = d(sum)/d q_ij, where sum is the loss before division by
//              its count (the caller scales by top_diff / count);
//              add_row(i, w, n) adds w[j] to every (i, j) (zeros included);
//              add_row_lanes(i, w, n) the same with w in the distances' type (only where
//              Kernels::soft_margin_lanes).
//   Kernels:   the backend's part, handed in: RowOps (row primitives: square roots, a
//              soft-margin row over double distances), Scans (the row scans:
//              ScalarMiningScans or SimdMiningScans), soft_margin_lanes and, where it is
//              true, SoftMargin (the soft-margin rows in lanes of T: SimdSoftMargin).
//
// Selection compares squared distances: d is monotone in q for both Distance kinds. Costs,
// with c = the largest class size and k = c - 1 positives per anchor:
//   hard      O(N^2): one pass over each anchor's row.
//   semihard  k <= scan_limit (16): one scan of the anchor's row per positive, in lanes
//             (Kernels::Scans), for the nearest negative farther than it; O(N^2 c) but a few
//             cycles per 8 entries. More positives: O(N^2 log c), the positives sorted by
//             distance cut the negatives into buckets (binary search), and a suffix minimum
//             over buckets gives every positive its nearest farther negative.
//   all       the same two regimes with counts and sums of the negatives' distances below
//             each threshold give, per positive, the number of active triplets and their
//             summed hinge (sum over active n of d_ap + m - d_an), and per negative the
//             number of positives it is active with. soft_margin: O(N^2 c), since softplus
//             does not factor (its exp does: see SimdRowOps' lane kernels).
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/triplet_math.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/options.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace metricloss {
namespace detail {

/// The loss before normalisation, and what it is divided by (anchors for hard, pairs for
/// semihard, triplets with a positive hinge for all). L = sum / count, or 0 when count = 0.
struct MiningResult {
  double sum = 0.0;
  double count = 0.0;
};

/// The number of sorted thresholds t[0..k) below v (strictly, or at most v): a binary search
/// whose steps are conditional moves, since which way a random distance goes is a coin flip
/// that a branch would mispredict.
template <bool OrEqual>
inline Index count_thresholds_below(const double* t, Index k, double v) {
  if (k == 0) return 0;
  const double* base = t;
  Index length = k;
  while (length > 1) {
    const Index half = length / 2;
    base = (OrEqual ? base[half - 1] <= v : base[half - 1] < v) ? base + half : base;
    length -= half;
  }
  return (base - t) + ((OrEqual ? *base <= v : *base < v) ? 1 : 0);
}

/// bucket[j] = the number of sorted thresholds below value[j] (strictly, or at most), for
/// j < n, by a branch-free binary search per entry (the anchors with many positives; few
/// take Kernels::Scans).
template <bool OrEqual>
inline void count_thresholds_below(const double* t, Index k, const double* value, Index n,
                                   Index* bucket) {
  for (Index j = 0; j < n; ++j) bucket[j] = count_thresholds_below<OrEqual>(t, k, value[j]);
}

/// Anchors with more positives than this take the bucket sweeps (O(N log k) per anchor);
/// fewer, one scan of the row per positive (Kernels::Scans).
constexpr Index scan_limit = 16;

/// Mining with its per-anchor scratch memory (grow-only). Kernels::RowOps (the backend's
/// row primitives) supplies the O(N^2 c) inner loop of Mining::all with soft_margin:
/// soft_margin_row over double distances, or the soft_margin_*lanes kernels over the
/// distances in their own type (see all_soft_anchor_lanes).
class TripletMiner {
 public:
  template <class Kernels, class Distances, class Weights>
  MiningResult mine(Mining mining, const LabelClasses& classes, const Distances& distances,
                    double margin, Distance distance, bool soft_margin, Weights& weights) {
    switch (mining) {
      case Mining::hard: return hard<Kernels>(classes, distances, margin, distance, soft_margin, weights);
      case Mining::semihard:
        return semihard<Kernels>(classes, distances, margin, distance, soft_margin, weights);
      case Mining::all:
        return all<Kernels>(classes, distances, margin, distance, soft_margin, weights);
    }
    return {};
  }

 private:
  struct Positive {
    double key;  // what positives are sorted by
    Index index;
    DistanceTerm distance;
  };

  /// l_a = h(max_p d_ap - min_n d_an + m), over anchors with a positive and a negative.
  /// Product values select; where another row is within their rounding of the selected
  /// one, exact distances decide (ties to the lowest row).
  template <class Kernels, class Distances, class Weights>
  MiningResult hard(const LabelClasses& classes, const Distances& distances, double margin,
                    Distance distance, bool soft_margin, Weights& weights) {
    using Scans = typename Kernels::Scans;
    const Index n = classes.size();
    const Index widest = distances.widest();
    double* value = values_.data(static_cast<std::size_t>(n));
    MiningResult result;
    for (Index a = 0; a < n; ++a) {
      if (classes.positives(a) == 0 || classes.negatives(a) == 0) continue;
      const auto* row = distances.row(a);
      const double bound = distances.rounding(a, widest);
      Index positive = -1;
      for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
        if (*p != a && (positive < 0 || row[*p] > row[positive])) positive = *p;
      if (bound > 0.0) positive = exact_farthest_member(classes, distances, a, positive, bound);
      for (Index j = 0; j < n; ++j) value[j] = static_cast<double>(row[j]);
      for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
        value[*p] = std::numeric_limits<double>::quiet_NaN();
      Selection negative{Scans::nearest_above(value, n, -std::numeric_limits<double>::infinity()),
                         -std::numeric_limits<double>::infinity(), false};
      if (negative.chosen < 0) {
        // Every negative at +inf (an overflowed distance): the first one, as a strict
        // scan in row order keeps it; the loss is then not finite anyway.
        const Index own = classes.class_of()[a];
        for (Index j = 0; j < n && negative.chosen < 0; ++j)
          if (classes.class_of()[j] != own) negative.chosen = j;
      }
      if (bound > 0.0) settle_ties<Kernels>(distances, a, value, n, &negative, 1, bound);
      add_triplet(result, a, positive, negative.chosen, distances, margin, distance, soft_margin,
                  weights);
    }
    return result;
  }

  /// The member of a's class (not a) with the largest exact distance, lowest row on ties,
  /// among those whose product value is within 2 bound of `chosen`'s (the largest value).
  template <class Distances>
  static Index exact_farthest_member(const LabelClasses& classes, const Distances& distances,
                                     Index a, Index chosen, double bound) {
    const auto* row = distances.row(a);
    // As a difference: exact where the two values are close, whatever their size.
    const double top = static_cast<double>(row[chosen]);
    const double window = 2.0 * bound * (1.0 + Numerics<double>::kink_slack);
    double best = std::numeric_limits<double>::quiet_NaN();
    for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p) {
      if (*p == a || *p == chosen || !(top - static_cast<double>(row[*p]) <= window)) continue;
      if (best != best) best = distances.exact(a, chosen);
      const double e = distances.exact(a, *p);
      if (e > best || (e == best && *p < chosen)) {
        best = e;
        chosen = *p;
      }
    }
    return chosen;
  }

  /// One selection from a row of values: the smallest value above `above` (NaN: none), or
  /// with `largest` the largest value.
  struct Selection {
    Index chosen;
    double above;
    bool largest;
  };

  /// Rows whose values lie within 2 bound of a selection's (values within `bound` of the
  /// exact distances; NaN: not a candidate) are compared with it on exact distances, and
  /// the exact extreme is kept, lowest row on ties: product rounding must not decide a tie.
  /// One pass over the row for all m selections.
  template <class Kernels, class Distances>
  void settle_ties(const Distances& distances, Index a, const double* value, Index n,
                   Selection* selections, Index m, double bound) {
    using Scans = typename Kernels::Scans;
    double* centre = centres_.data(static_cast<std::size_t>(2 * m));
    double* exact = centre + m;
    // Rows within two bounds of the winner's value, on either side (the predicate keeps
    // the right ones): centred on the value itself, |v - centre| is exact where it matters.
    const double half = 2.0 * bound * (1.0 + Numerics<double>::kink_slack);
    for (Index s = 0; s < m; ++s) {
      const Index c = selections[s].chosen;
      centre[s] = c < 0 ? std::numeric_limits<double>::quiet_NaN() : value[c];
      exact[s] = std::numeric_limits<double>::quiet_NaN();
    }
    Scans::near_thresholds(value, n, centre, m, half, [&](Index j) {
      for (Index s = 0; s < m; ++s) {
        Selection& sel = selections[s];
        if (sel.chosen < 0 || j == sel.chosen || !(std::abs(value[j] - centre[s]) <= half)) continue;
        if (!sel.largest && !(value[j] > sel.above)) continue;
        if (exact[s] != exact[s]) exact[s] = distances.exact(a, sel.chosen);
        const double e = distances.exact(a, j);
        const bool better = sel.largest ? e > exact[s] : e < exact[s];
        if (better || (e == exact[s] && j < sel.chosen)) {
          sel.chosen = j;
          exact[s] = e;
        }
      }
    });
  }

  /// l_ap = h(d_ap - d_an* + m), n* the nearest negative farther than p (else the farthest
  /// negative), over pairs (a, p) whose anchor has a negative.
  template <class Kernels, class Distances, class Weights>
  MiningResult semihard(const LabelClasses& classes, const Distances& distances, double margin,
                        Distance distance, bool soft_margin, Weights& weights) {
    using Scans = typename Kernels::Scans;
    const Index n = classes.size();
    const Index widest = distances.widest();
    MiningResult result;
    for (Index a = 0; a < n; ++a) {
      const Index k = classes.positives(a);
      if (k == 0 || classes.negatives(a) == 0) continue;
      const auto* row = distances.row(a);
      // Exact thresholds, and below exact values for negatives within the product's rounding
      // of one: a negative tied with a positive (a duplicate row) is then never "farther".
      const Positive* positives = sorted_positives(classes, a, [&](Index p) {
        return Positive{distances.exact(a, p), p, {}};
      });
      const double* thresholds = thresholds_of(positives, k);
      double* value = values_.data(static_cast<std::size_t>(n));
      for (Index j = 0; j < n; ++j) value[j] = static_cast<double>(row[j]);
      Selection* chosen = selections_.data(static_cast<std::size_t>(k + 1));
      if (k > scan_limit) {
        semihard_by_buckets(a, k, classes, distances, value, chosen);
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
      }
      // value: NaN off the negatives, exact near every threshold. Ties under rounding are
      // settled on exact distances.
      const double bound = distances.rounding(a, widest);
      if (bound > 0.0) settle_ties<Kernels>(distances, a, value, n, chosen, k, bound);
      for (Index i = 0; i < k; ++i)
        add_triplet(result, a, positives[i].index, chosen[i].chosen, distances, margin, distance,
                    soft_margin, weights);
    }
    return result;
  }

  /// One anchor of semihard with many positives: O(N log k) by buckets. value holds the
  /// row's distances in double; on return it holds exact values where they were recomputed
  /// and NaN off the negatives, and chosen[i] positive i's negative.
  template <class Distances>
  void semihard_by_buckets(Index a, Index k, const LabelClasses& classes,
                           const Distances& distances, double* value, Selection* chosen) {
    const Index n = classes.size();
    const Index* class_of = classes.class_of();
    const double* thresholds = thresholds_.data(0);
    // Bucket b holds the negatives farther than exactly the b nearest positives; each
    // keeps its nearest (first in row order on ties).
    Index* nearest = nearest_.data(static_cast<std::size_t>(k + 1));
    double* nearest_value = bucket_sum_.data(static_cast<std::size_t>(k + 1));
    std::fill(nearest, nearest + k + 1, Index(-1));
    std::fill(nearest_value, nearest_value + k + 1, std::numeric_limits<double>::infinity());
    Index* bucket = buckets_.data(static_cast<std::size_t>(n));
    count_thresholds_below<false>(thresholds, k, value, n, bucket);
    const Index own = class_of[a];
    Index farthest = -1;
    double farthest_value = -std::numeric_limits<double>::infinity();
    for (Index j = 0; j < n; ++j) {
      if (class_of[j] == own) {
        value[j] = std::numeric_limits<double>::quiet_NaN();
        continue;
      }
      double q = value[j];
      Index b = bucket[j];
      const double bound = distances.rounding(a, j);
      if (bound > 0.0 && ((b > 0 && q - thresholds[b - 1] <= bound) || (b < k && thresholds[b] - q <= bound))) {
        q = distances.exact(a, j);  // rare
        value[j] = q;
        b = count_thresholds_below<false>(thresholds, k, q);
      }
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
    for (Index i = 0; i < k; ++i)
      chosen[i] = nearest[i + 1] >= 0
                      ? Selection{nearest[i + 1], thresholds[i], false}
                      : Selection{farthest, -std::numeric_limits<double>::infinity(), true};
  }

  /// Every triplet. Hinge: sum of max(d_ap + m - d_an, 0), count = active triplets, by
  /// buckets with prefix sums. Softplus: count = all triplets (softplus is positive).
  template <class Kernels, class Distances, class Weights>
  MiningResult all(const LabelClasses& classes, const Distances& distances, double margin,
                   Distance distance, bool soft_margin, Weights& weights) {
    const Index n = classes.size();
    const Index widest = distances.widest();
    const Index* class_of = classes.class_of();
    double* value = values_.data(static_cast<std::size_t>(n));
    Index* bucket = buckets_.data(static_cast<std::size_t>(n));
    double* slope = negative_slope_.data(static_cast<std::size_t>(n));
    MiningResult result;
    for (Index a = 0; a < n; ++a) {
      const Index k = classes.positives(a);
      if (k == 0 || classes.negatives(a) == 0) continue;
      // Positives by threshold t_p = d_ap + m; a negative is active with p when d_an < t_p.
      const Positive* positives = sorted_positives(classes, a, [&](Index p) {
        const DistanceTerm d = distance_from_squared(distances.exact(a, p), distance);
        return Positive{d.value + margin, p, d};
      });
      const double* thresholds = thresholds_of(positives, k);
      const auto* row = distances.row(a);
      if constexpr (Kernels::soft_margin_lanes) {
        if (soft_margin) {
          all_soft_anchor_lanes<Kernels>(result, a, positives, k, classes, row, distance, weights);
          continue;
        }
      }
      // Distances of the whole row (one vectorisable pass; the anchor's class is skipped),
      // exact where a product value is within its rounding of a hinge's kink.
      for (Index j = 0; j < n; ++j) value[j] = static_cast<double>(row[j]);
      if (!soft_margin) exact_near_kinks<Kernels>(distances, a, value, n, thresholds, k, distance, widest);
      if (distance == Distance::euclidean) Kernels::RowOps::square_root_in_place(value, n);
      const Index own = class_of[a];
      if constexpr (!Kernels::soft_margin_lanes) {  // else taken above
        if (soft_margin) {
          all_soft_anchor<Kernels>(result, a, positives, k, n, class_of, own, value, slope, distance, weights);
          continue;
        }
      }
      if (k <= scan_limit) {
        all_hinge_scan<Kernels>(result, a, positives, k, classes, row, value, slope, distance, weights);
        continue;
      }
      // Bucket b: negatives with exactly b thresholds <= d_an, active with positives b..k-1.
      // Four interleaved copies of the counts and sums, so that runs of one bucket do not
      // chain every add through the same memory word.
      constexpr Index copies = 4;
      const Index stride = k + 1;
      double* counts = bucket_count_.data(static_cast<std::size_t>(copies * stride));
      double* sums = bucket_sum_.data(static_cast<std::size_t>(copies * stride));
      std::fill(counts, counts + copies * stride, 0.0);
      std::fill(sums, sums + copies * stride, 0.0);
      count_thresholds_below<true>(thresholds, k, value, n, bucket);
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

  /// Squared product values (value[j], within rounding(a, j) of exact) near the kink of a
  /// hinge, d_an = t_i, replaced by exact ones: which side of t_i a negative lies on decides
  /// whether its triplet counts in Z, and a hinge at exactly 0 must not.
  template <class Kernels, class Distances>
  void exact_near_kinks(const Distances& distances, Index a, double* value, Index n,
                        const double* thresholds, Index k, Distance distance, Index widest) {
    using Scans = typename Kernels::Scans;
    const double bound = distances.rounding(a, widest);
    if (!(bound > 0.0)) return;
    // The kinks as squared distances (a kink at t <= 0 has no negative below it); the
    // rounding of t^2 and of the square root later is covered by kink_slack.
    double* kink = centres_.data(static_cast<std::size_t>(k));
    double largest = 0.0;
    for (Index i = 0; i < k; ++i) {
      const double t = thresholds[i];
      kink[i] = distance == Distance::squared_euclidean ? t
                : t > 0.0 ? t * t : std::numeric_limits<double>::quiet_NaN();
      if (std::abs(kink[i]) > largest) largest = std::abs(kink[i]);
    }
    const double slack = largest * Numerics<double>::kink_slack;
    Scans::near_thresholds(value, n, kink, k, bound + slack, [&](Index j) {
      const double own_bound = distances.rounding(a, j) + slack;
      for (Index i = 0; i < k; ++i)
        if (std::abs(value[j] - kink[i]) <= own_bound) {
          value[j] = distances.exact(a, j);  // rare
          return;
        }
    });
  }

  /// One anchor of Mining::all with the hinge and few positives: one scan per threshold
  /// t_p counts the negatives with d_an < t_p and sums their distances, and counts per
  /// negative the positives it is active with. value holds the row's distances.
  template <class Kernels, class T, class Weights>
  void all_hinge_scan(MiningResult& result, Index a, const Positive* positives, Index k,
                      const LabelClasses& classes, const T*, double* value, double* slope,
                      Distance distance, Weights& weights) {
    constexpr bool lanes = Kernels::soft_margin_lanes;
    using Scans = typename Kernels::Scans;
    const Index n = classes.size();
    for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
      value[*p] = std::numeric_limits<double>::quiet_NaN();
    double* active = bucket_count_.data(static_cast<std::size_t>(k));
    double* active_sum = bucket_sum_.data(static_cast<std::size_t>(k));
    Scans::below_thresholds(value, n, thresholds_.data(0), k, distance, active, active_sum, slope);
    for (Index i = 0; i < k; ++i) {
      result.sum += active[i] * positives[i].key - active_sum[i];
      result.count += active[i];
      if (weights.enabled() && active[i] > 0.0)
        weights.add(a, positives[i].index, active[i] * positives[i].distance.derivative);
    }
    if (!weights.enabled()) return;
    if constexpr (lanes) {
      // In T, as W holds them: SplitWeights' batches then need no conversion.
      T* w = lanes_scratch<T>(static_cast<std::size_t>(n));
      for (Index j = 0; j < n; ++j) w[j] = static_cast<T>(slope[j]);
      weights.add_row_lanes(a, static_cast<const T*>(w), n);
    } else {
      weights.add_row(a, slope, n);
    }
  }

  /// One anchor of Mining::all with soft_margin: every (p, n) pair, O(k N).
  template <class Kernels, class Weights>
  void all_soft_anchor(MiningResult& result, Index a, const Positive* positives, Index k,
                       Index n, const Index* class_of, Index own, const double* value,
                       double* slope, Distance distance, Weights& weights) {
    // The negatives' distances, packed.
    double* packed = packed_.data(static_cast<std::size_t>(n));
    Index m = 0;
    for (Index j = 0; j < n; ++j)
      if (class_of[j] != own) packed[m++] = value[j];
    std::fill(slope, slope + m, 0.0);
    for (Index i = 0; i < k; ++i) {
      // sum_n softplus(t_p - d_an), and its slopes, summed for p and added per n.
      double positive_slope = 0.0;
      result.sum += Kernels::RowOps::soft_margin_row(positives[i].key, packed, m, slope, positive_slope);
      if (weights.enabled())
        weights.add(a, positives[i].index, positive_slope * positives[i].distance.derivative);
    }
    result.count += static_cast<double>(k) * static_cast<double>(m);
    if (!weights.enabled()) return;
    // Unpacked in place, from the last: slope[j] for every j (0 in the anchor's class).
    Index r = m;
    for (Index j = n - 1; j >= 0; --j)
      slope[j] = class_of[j] == own ? 0.0 : -slope[--r] * distance_derivative(value[j], distance);
    weights.add_row(a, slope, n);
  }

  /// One anchor of Mining::all with soft_margin in lanes of T, the distances' type: the
  /// row's distances once (+inf off the negatives), then one kernel pass per positive over
  /// the whole row, and the negatives' weights in one pass. O(k N).
  template <class Kernels, class T, class Weights>
  void all_soft_anchor_lanes(MiningResult& result, Index a, const Positive* positives, Index k,
                             const LabelClasses& classes, const T* row, Distance distance,
                             Weights& weights) {
    const Index n = classes.size();
    const Index padded = Kernels::SoftMargin::template soft_margin_padded<T>(n);
    T* dist = lanes_scratch<T>(static_cast<std::size_t>(4 * padded));
    T* factor = dist + padded;
    T* inverse = factor + padded;
    T* slope = inverse + padded;
    Kernels::SoftMargin::soft_margin_distances(row, n, padded, distance, dist);
    for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
      dist[*p] = std::numeric_limits<T>::infinity();
    // Positives are sorted by threshold: the first and last span them.
    double centre = 0.0;
    const bool factored = Kernels::SoftMargin::soft_margin_factors(dist, padded, positives[0].key,
                                                      positives[k - 1].key, factor, inverse, centre);
    const bool wanted = weights.enabled();
    if (wanted) std::fill(slope, slope + padded, T(0));
    for (Index i = 0; i < k; ++i) {
      double positive_slope = 0.0;
      const double t = positives[i].key;
      if (factored && wanted)
        result.sum += Kernels::SoftMargin::template soft_margin_row_lanes<true, true>(
            t, centre, dist, factor, inverse, padded, slope, positive_slope);
      else if (factored)
        result.sum += Kernels::SoftMargin::template soft_margin_row_lanes<true, false>(
            t, centre, dist, factor, inverse, padded, slope, positive_slope);
      else if (wanted)
        result.sum += Kernels::SoftMargin::template soft_margin_row_lanes<false, true>(
            t, centre, dist, factor, inverse, padded, slope, positive_slope);
      else
        result.sum += Kernels::SoftMargin::template soft_margin_row_lanes<false, false>(
            t, centre, dist, factor, inverse, padded, slope, positive_slope);
      if (wanted) weights.add(a, positives[i].index, positive_slope * positives[i].distance.derivative);
    }
    result.count += static_cast<double>(k) * static_cast<double>(classes.negatives(a));
    if (!wanted) return;
    Kernels::SoftMargin::soft_margin_negative_weights(slope, dist, padded, distance);
    weights.add_row_lanes(a, static_cast<const T*>(slope), n);
  }

  template <class T>
  T* lanes_scratch(std::size_t size) {
    if constexpr (std::is_same<T, float>::value) return lanes_float_.data(size);
    else return lanes_double_.data(size);
  }

  /// The positives of anchor a made by `make`, sorted by key (ties by row).
  template <class Make>
  const Positive* sorted_positives(const LabelClasses& classes, Index a, Make&& make) {
    Positive* positives = positives_.data(static_cast<std::size_t>(classes.positives(a)));
    Index k = 0;
    for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
      if (*p != a) positives[k++] = make(*p);
    std::sort(positives, positives + k, [](const Positive& x, const Positive& y) {
      return x.key < y.key || (!(y.key < x.key) && x.index < y.index);
    });
    return positives;
  }

  const double* thresholds_of(const Positive* positives, Index k) {
    double* thresholds = thresholds_.data(static_cast<std::size_t>(k));
    for (Index i = 0; i < k; ++i) thresholds[i] = positives[i].key;
    return thresholds;
  }

  /// One mined triplet, its distances recomputed by differences.
  template <class Distances, class Weights>
  static void add_triplet(MiningResult& result, Index a, Index positive, Index negative,
                          const Distances& distances, double margin, Distance distance,
                          bool soft_margin, Weights& weights) {
    const TripletTerm t = triplet_term(distances.exact(a, positive), distances.exact(a, negative),
                                       margin, distance, soft_margin);
    result.sum += t.loss;
    result.count += 1.0;
    if (!weights.enabled()) return;
    if (t.positive_weight != 0.0) weights.add(a, positive, t.positive_weight);
    if (t.negative_weight != 0.0) weights.add(a, negative, -t.negative_weight);
  }

  GrowOnlyBuffer<Positive> positives_;
  GrowOnlyBuffer<double> thresholds_, bucket_count_, bucket_sum_, values_, negative_slope_, packed_;
  GrowOnlyBuffer<double> centres_;  // settle_ties: a window centre and an exact distance per selection
  GrowOnlyBuffer<Selection> selections_;
  GrowOnlyBuffer<Index> nearest_, buckets_;
  GrowOnlyBuffer<float> lanes_float_;  // all_soft_anchor_lanes: 4 rows of the distances' type
  GrowOnlyBuffer<double> lanes_double_;
};

}  // namespace detail
}  // namespace metricloss
