#pragma once
// The triplet miner's shared parts: its result, its scratch memory, the binary search of
// sorted thresholds, the exact settling of ties under product rounding, and the term of one
// mined triplet. The selection rules (mining/hard.hpp, semihard.hpp, all.hpp) use them.

#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/triplet_math.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/options.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

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
/// j < n, by branch-free binary searches (the anchors with many positives; few take
/// Kernels::Scans). Eight searches step side by side: one alone is a chain of dependent
/// loads and compares, ~36 ns an entry at k = 64 where eight in flight take ~4. (AVX-512
/// gathers of the steps measured slower on an AMD machine, whose gathers are slow.)
template <bool OrEqual>
inline void count_thresholds_below(const double* t, Index k, const double* value, Index n,
                                   Index* bucket) {
  constexpr Index lanes = 8;
  Index j = 0;
  if (k > 0)
    for (; j + lanes <= n; j += lanes) {
      Index base[lanes] = {};
      for (Index length = k; length > 1;) {
        const Index half = length / 2;
        for (Index e = 0; e < lanes; ++e) {
          const double x = t[base[e] + half - 1], v = value[j + e];
          base[e] += (OrEqual ? x <= v : x < v) ? half : 0;
        }
        length -= half;
      }
      for (Index e = 0; e < lanes; ++e) {
        const double x = t[base[e]], v = value[j + e];
        bucket[j + e] = base[e] + ((OrEqual ? x <= v : x < v) ? 1 : 0);
      }
    }
  for (; j < n; ++j) bucket[j] = count_thresholds_below<OrEqual>(t, k, value[j]);
}

/// Whether q, in bucket b of the sorted thresholds t[0..k) (b of them below it), lies
/// within `bound` of a neighbouring one: the only thresholds its rounding could cross.
inline bool near_neighbour(const double* t, Index k, Index b, double q, double bound) {
  return (b > 0 && q - t[b - 1] <= bound) || (b < k && t[b] - q <= bound);
}

/// Anchors with more positives than this take the bucket sweeps (O(N log k) per anchor);
/// fewer, one scan of the row per positive (Kernels::Scans).
constexpr Index scan_limit = 16;

namespace mining {

/// Rows of a batch of exact distances requested this far ahead of their use.
constexpr Index prefetch_distance = 4;

template <class Distances, class = void>
struct HasPrefetch : std::false_type {};
template <class Distances>
struct HasPrefetch<Distances, decltype(std::declval<const Distances&>().prefetch(Index(), Index()))>
    : std::true_type {};

/// Asks the distances to start loading what exact(a, j) will read, where they can.
template <class Distances>
void prefetch_exact(const Distances& distances, Index a, Index j) {
  if constexpr (HasPrefetch<Distances>::value) distances.prefetch(a, j);
}

/// A positive of the current anchor, with what positives are sorted by.
struct Positive {
  double key;  // what positives are sorted by
  Index index;
  DistanceTerm distance;
};

/// One selection from a row of values: the smallest value above `above` (NaN: none), or
/// with `largest` the largest value.
struct Selection {
  Index chosen;
  double above;
  bool largest;
  double exact = std::numeric_limits<double>::quiet_NaN();  // chosen's, where known
};

/// The miner's per-anchor scratch memory (grow-only: nothing is allocated once warm).
struct Scratch {
  GrowOnlyBuffer<Positive> positives;
  GrowOnlyBuffer<double> thresholds, bucket_count, bucket_sum, values, negative_slope, packed;
  GrowOnlyBuffer<double> centres;  // settle_ties: a window centre and an exact distance each
  GrowOnlyBuffer<Selection> selections;
  GrowOnlyBuffer<Index> nearest, buckets, near_rows;
  GrowOnlyBuffer<std::int16_t> cells;  // ThresholdCells' table
  GrowOnlyBuffer<double> limits;       // semihard_by_cells: per bucket, what a row must beat
  GrowOnlyBuffer<Index> candidates, candidate_buckets, exact_rows;
  GrowOnlyBuffer<unsigned char> exact_flags;  // zero between anchors
  GrowOnlyBuffer<float> lanes_float;  // all_soft_anchor_lanes: 4 rows of the distances' type
  GrowOnlyBuffer<double> lanes_double;

  template <class T>
  T* lanes_scratch(std::size_t size) {
    if constexpr (std::is_same<T, float>::value) return lanes_float.data(size);
    else return lanes_double.data(size);
  }

  /// The positives of anchor a made by `make`, sorted by key (ties by row).
  template <class Classes, class Make>
  const Positive* sorted_positives(const Classes& classes, Index a, Make&& make) {
    Positive* out = positives.data(static_cast<std::size_t>(classes.positives(a)));
    Index k = 0;
    for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
      if (*p != classes.self(a)) out[k++] = make(*p);
    std::sort(out, out + k, [](const Positive& x, const Positive& y) {
      return x.key < y.key || (!(y.key < x.key) && x.index < y.index);
    });
    return out;
  }

  const double* thresholds_of(const Positive* sorted, Index k) {
    double* out = thresholds.data(static_cast<std::size_t>(k));
    for (Index i = 0; i < k; ++i) out[i] = sorted[i].key;
    return out;
  }
};

/// settle_ties' windows: per selection the value it is centred on and, once needed, the
/// exact distance of its winner; `half` is the window's half-width.
struct TieWindows {
  double* centre;
  double* exact;
  double half;
};

/// The windows of m selections over a row whose values lie within `bound` of the exact
/// distances. Centred on the winner's value itself, |v - centre| is exact where it matters.
inline TieWindows tie_windows(Scratch& scratch, const double* value, const Selection* selections,
                              Index m, double bound) {
  double* centre = scratch.centres.data(static_cast<std::size_t>(2 * m));
  TieWindows w{centre, centre + m, 2.0 * bound * (1.0 + Numerics<double>::kink_slack)};
  for (Index s = 0; s < m; ++s) {
    const Index c = selections[s].chosen;
    w.centre[s] = c < 0 ? std::numeric_limits<double>::quiet_NaN() : value[c];
    w.exact[s] = std::numeric_limits<double>::quiet_NaN();
  }
  return w;
}

/// Row j against every selection whose window holds it: compared on exact distances, the
/// exact extreme is kept, lowest row on ties. The result does not depend on the order in
/// which rows come, nor on rows outside every window coming too.
template <class Distances>
void settle_tie(const Distances& distances, Index a, const double* value, Index j,
                Selection* selections, Index m, TieWindows& w) {
  double e = std::numeric_limits<double>::quiet_NaN();  // row j's, computed once if needed
  for (Index s = 0; s < m; ++s) {
    Selection& sel = selections[s];
    if (sel.chosen < 0 || j == sel.chosen || !(std::abs(value[j] - w.centre[s]) <= w.half)) continue;
    if (!sel.largest && !(value[j] > sel.above)) continue;
    if (w.exact[s] != w.exact[s]) w.exact[s] = distances.exact(a, sel.chosen);
    if (e != e) e = distances.exact(a, j);
    const bool better = sel.largest ? e > w.exact[s] : e < w.exact[s];
    if (better || (e == w.exact[s] && j < sel.chosen)) {
      sel.chosen = j;
      w.exact[s] = e;
    }
  }
}

/// Rows whose values lie within 2 bound of a selection's (values within `bound` of the
/// exact distances; NaN: not a candidate) are compared with it on exact distances
/// (settle_tie): product rounding must not decide a tie. One pass over the row for all m
/// selections.
template <class Kernels, class Distances>
void settle_ties(Scratch& scratch, const Distances& distances, Index a, const double* value,
                 Index n, Selection* selections, Index m, double bound) {
  using Scans = typename Kernels::Scans;
  TieWindows w = tie_windows(scratch, value, selections, m, bound);
  // Rows within two bounds of the winner's value, on either side (settle_tie keeps the
  // right ones).
  Scans::near_thresholds(value, n, w.centre, m, w.half, [&](Index j) {
    settle_tie(distances, a, value, j, selections, m, w);
  });
}

/// Ties under rounding of a row bucketed by thresholds (bucket[j], its suffix minima
/// nearest_value), settled on exact distances (settle_tie), the windows found through the
/// buckets in O(1) a row, not by a scan against every selection: a negative in bucket b
/// lies above exactly the thresholds of selections 0..b-1, whose winners' values are at
/// most nearest_value[b] <= its own; it is in one of their windows only if in that one's.
/// farthest_value: the farthest negative's, where a selection took it (else NaN). rows:
/// n of scratch.
template <class Distances>
void settle_bucket_windows(Scratch& s, const Distances& distances, Index a, const double* value,
                           const Index* bucket, const double* nearest_value, Index n,
                           Selection* chosen, Index k, double bound, double farthest_value,
                           Index* rows) {
  TieWindows w = tie_windows(s, value, chosen, k, bound);
  const double top = farthest_value - w.half;  // NaN: no row is at or above it
  Index count = 0;  // the rows, in order, then settled with their rows requested ahead
  for (Index j = 0; j < n; ++j) {
    const Index b = bucket[j];
    const double v = value[j];
    if ((b > 0 && v - nearest_value[b] <= w.half) || v >= top) rows[count++] = j;
  }
  for (Index t = 0; t < count; ++t) {
    if (t + prefetch_distance < count) prefetch_exact(distances, a, rows[t + prefetch_distance]);
    settle_tie(distances, a, value, rows[t], chosen, k, w);
  }
}

/// One mined triplet from its exact squared distances (by differences).
template <class Weights>
void add_triplet(MiningResult& result, Index a, Index positive, double ap, Index negative,
                 double an, double margin, Distance distance, bool soft_margin,
                 Weights& weights) {
  const TripletTerm t = triplet_term(ap, an, margin, distance, soft_margin);
  result.sum += t.loss;
  result.count += 1.0;
  if (!weights.enabled()) return;
  if (t.positive_weight != 0.0) weights.add(a, positive, t.positive_weight);
  if (t.negative_weight != 0.0) weights.add(a, negative, -t.negative_weight);
}

/// One mined triplet, its distances recomputed by differences.
template <class Distances, class Weights>
void add_triplet(MiningResult& result, Index a, Index positive, Index negative,
                 const Distances& distances, double margin, Distance distance,
                 bool soft_margin, Weights& weights) {
  add_triplet(result, a, positive, distances.exact(a, positive), negative,
              distances.exact(a, negative), margin, distance, soft_margin, weights);
}

}  // namespace mining
}  // namespace detail
}  // namespace metricloss
