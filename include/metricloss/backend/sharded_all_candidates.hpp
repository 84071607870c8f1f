#pragma once
// Step 3 of the sharded batch-all statistics path (backend/sharded_batch_all.hpp): from every
// anchor's published slots, W_ji for this rank's rows i in the candidate role of each anchor
// j, decided as the miner decides it (detail/mining/all.hpp): a product value within its
// rounding of a kink is replaced by the exact distance by differences, which is bitwise
// symmetric, so anchor j's rank and row i's rank agree on every triplet, ties included.
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/mining/common.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/triplet_math.hpp>
#include <metricloss/options.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

/// One positive of one anchor, as published: the anchor's thresholds ascending and, in the
/// same slots, W_ap of its positives in class order (the anchor itself skipped).
struct AllSlot {
  double threshold = 0.0;
  double weight = 0.0;
};

/// An anchor's slots' kinks: each threshold t as a squared distance (-inf where t <= 0 under
/// Euclidean, which no distance lies below), as the miner forms them
/// (mining::exact_near_kinks). Returns the anchor's slack, kink_slack of the largest |kink|.
inline double slot_kinks(const double* t, Index k, Distance distance, double* kink) {
  double largest = 0.0;
  for (Index s = 0; s < k; ++s) {
    if (distance == Distance::squared_euclidean || t[s] > 0.0) {
      kink[s] = distance == Distance::squared_euclidean ? t[s] : t[s] * t[s];
      largest = std::max(largest, std::abs(kink[s]));
    } else {
      kink[s] = -std::numeric_limits<double>::infinity();
    }
  }
  return largest * Numerics<double>::kink_slack;
}

class AllCandidateRole {
  /// Anchors per tile: their columns of the distances, transposed into rows.
  static constexpr Index column_tile = 32;

 public:
  /// Every slot's threshold and kink (the squared distance of its threshold; -inf where
  /// t <= 0 under Euclidean, which no distance lies below) and each anchor's slack, as the
  /// miner forms them (mining::exact_near_kinks), from the n anchors' slots `all`.
  void prepare(const AllSlot* all, const Index* slot_first, Index n, Distance distance) {
    const Index total = slot_first[n];
    double* t = thresholds_.data(static_cast<std::size_t>(total));
    double* kink = kinks_.data(static_cast<std::size_t>(total));
    double* slack = slack_.data(static_cast<std::size_t>(n));
    for (Index s = 0; s < total; ++s) t[s] = all[s].threshold;
    for (Index j = 0; j < n; ++j)
      slack[j] = slot_kinks(t + slot_first[j], slot_first[j + 1] - slot_first[j], distance,
                            kink + slot_first[j]);
  }

  /// The anchors' classes and slots: `global` X's labels, slot_first[j] anchor j's first slot,
  /// position[g] row g's place in its class.
  struct Anchors {
    const LabelClasses* global;
    const Index* slot_first;
    const Index* position;
    const AllSlot* all;
  };

  /// W_ji for this rank's rows i (global first + i) and every anchor j, added to w (rows x n,
  /// row stride `stride`). Anchor by anchor, as the miner scans an anchor's row: a tile of
  /// anchors' columns is transposed into rows of doubles, each row becomes W_j. in place,
  /// and the tile is added back.
  template <class Kernels, class Distances, class W>
  void add(const Anchors& anchors, Distance distance, bool soft_margin, const Distances& distances,
           Index first, Index rows, Index n, W* w, Index stride) {
    const Index* slot_first = anchors.slot_first;
    double* tile = tile_.data(static_cast<std::size_t>(column_tile * rows));
    // The query whose rounding bound is the largest against every anchor.
    Index widest = 0;
    for (Index i = 1; i < rows; ++i)
      if (distances.rounding(i, 0) > distances.rounding(widest, 0)) widest = i;
    for (Index j0 = 0; j0 < n; j0 += column_tile) {
      const Index width = std::min(column_tile, n - j0);
      // In blocks of 8 rows: each write a cache line of the tile, each read a short run.
      for (Index i0 = 0; i0 < rows; i0 += 8) {
        const Index height = std::min(Index(8), rows - i0);
        for (Index c = 0; c < width; ++c)
          for (Index i = i0; i < i0 + height; ++i)
            tile[c * rows + i] = static_cast<double>(distances.row(i)[j0 + c]);
      }
      for (Index c = 0; c < width; ++c) {
        double* column = tile + c * rows;
        if (slot_first[j0 + c + 1] == slot_first[j0 + c])
          std::fill(column, column + rows, 0.0);
        else
          anchor_column<Kernels>(anchors, distance, soft_margin, distances, first, rows, j0 + c,
                                 widest, column);
      }
      for (Index i0 = 0; i0 < rows; i0 += 8) {
        const Index height = std::min(Index(8), rows - i0);
        for (Index c = 0; c < width; ++c)
          for (Index i = i0; i < i0 + height; ++i)
            w[i * stride + j0 + c] += static_cast<W>(tile[c * rows + i]);
      }
    }
  }

 private:
  /// Anchor j's W_ji over this rank's rows, in place of their squared distances `column`
  /// (the approximate ones of the tag): W_ji from j's slot where i is j's positive, else
  /// from j's thresholds, with the miner's decisions (mining::all, exact_near_kinks).
  template <class Kernels, class Distances>
  void anchor_column(const Anchors& anchors, Distance distance, bool soft_margin,
                     const Distances& distances, Index first, Index rows, Index j, Index widest,
                     double* column) {
    using Scans = typename Kernels::Scans;
    const LabelClasses& global = *anchors.global;
    const Index* slot_first = anchors.slot_first;
    const Index k = slot_first[j + 1] - slot_first[j];
    const double* t = thresholds_.data(0) + slot_first[j];
    // j's class among this rank's rows: not j's negatives (NaN, below no threshold).
    const Index c = global.class_of(j);
    const Index* members = std::lower_bound(global.class_begin(c), global.class_end(c), first);
    const Index* members_end = std::lower_bound(members, global.class_end(c), first + rows);
    for (const Index* m = members; m != members_end; ++m)
      column[*m - first] = std::numeric_limits<double>::quiet_NaN();
    double* slope = slope_.data(static_cast<std::size_t>(rows));
    if (!soft_margin) {
      const double bound = distances.rounding(widest, j);
      if (bound > 0.0) {
        const double* kink = kinks_.data(0) + slot_first[j];
        const double slack = slack_.data(0)[j];
        Scans::near_thresholds(column, rows, kink, k, bound + slack, [&](Index i) {
          const double own_bound = distances.rounding(i, j) + slack;
          for (Index s = 0; s < k; ++s)
            if (std::abs(column[i] - kink[s]) <= own_bound) {
              column[i] = distances.exact(i, j);  // rare
              return;
            }
        });
      }
    }
    if (distance == Distance::euclidean) Kernels::RowOps::square_root_in_place(column, rows);
    if (soft_margin) {
      for (Index i = 0; i < rows; ++i) {
        double with = 0.0;
        if (column[i] == column[i])
          for (Index s = 0; s < k; ++s) with += hinge(t[s] - column[i], true).slope;
        slope[i] = -with * distance_derivative(column[i], distance);
      }
    } else if (k <= scan_limit) {
      double* active = active_.data(static_cast<std::size_t>(2 * k));
      Scans::below_thresholds(column, rows, t, k, distance, active, active + k, slope);
    } else {
      Index* bucket = bucket_.data(static_cast<std::size_t>(rows));
      count_thresholds_below<true>(t, k, column, rows, bucket);
      for (Index i = 0; i < rows; ++i)
        slope[i] = column[i] == column[i]
                       ? -static_cast<double>(k - bucket[i]) * distance_derivative(column[i], distance)
                       : 0.0;
    }
    std::copy(slope, slope + rows, column);
    // j's positives among this rank's rows: W_ji as j's rank published it.
    const Index* position = anchors.position;
    for (const Index* m = members; m != members_end; ++m) {
      const Index g = *m;
      if (g == j) {
        column[g - first] = 0.0;
        continue;
      }
      column[g - first] = anchors.all[slot_first[j] + position[g] - (position[j] < position[g] ? 1 : 0)].weight;
    }
  }

  GrowOnlyBuffer<double> thresholds_, kinks_, slack_;  // every slot's t and kink; each anchor's slack
  GrowOnlyBuffer<double> tile_, slope_, active_;       // anchors' columns; one column
  GrowOnlyBuffer<Index> bucket_;
};

}  // namespace detail
}  // namespace metricloss
