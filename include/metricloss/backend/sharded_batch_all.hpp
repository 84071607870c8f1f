#pragma once
// BatchTripletLoss with Mining::all over a group's global batch X (detail/sharded.hpp) by
// exchanged statistics, O(n_r N D) per rank instead of O(N^2 D). W = d(sum)/dD2 is dense,
// so it is never exchanged; what crosses is O(N c) numbers. With t_ap = d_ap + m,
//   W_ap = sum_{n: d_an < t_ap} d'(d_ap)          (hinge; soft margin: sum_n sigma(t_ap - d_an))
//   W_an = -#{p: d_an < t_ap} d'(d_an)            (soft margin: -sum_p sigma(t_ap - d_an))
// and row i's gradient is 2 s sum_j (W_ij + W_ji) (x_i - x_j), s = top_diff / count.
// Two ways:
//  - simd, by bands of the triangle (backend/simd/all_band.hpp), from 2 ranks on: rank q
//    takes the pairs of rows [b_q, b_{q+1}) (~N^2 / (2W), each unordered pair once) and
//    publishes, per slot (anchor, positive) of the rows its band touches, the count and
//    distance sum of the negatives below the slot's threshold (soft margin: sums of sigma
//    and softplus); merged in rank order they give L and Z on every rank alike. Then, only
//    when some rank asked for a gradient, each band's part of dL/dX, reduced as lifted's
//    (backend/sharded_band.hpp). Where the centred norms are too large for the product's
//    values to stay finite (every rank alike), the second way.
//  - scalar (and that fallback), by thresholds; each rank:
//    1. mines its anchors against the whole of X as a reference set with self = their own
//       rows (the reference-set path of each tag), which gives the loss's sum and count, W's
//       rows of its anchors (the anchor role, into the tag's dense weights) and their
//       positives' W_ap; it computes each anchor's thresholds t_ap the way the miner does;
//    2. publishes (sum, count) and, per anchor and positive, one slot {t sorted ascending,
//       W_ap in class order}; sums and counts are added in rank order: the same bits on every
//       rank;
//    3. adds W_ji for its rows i in the candidate role, from anchor j's slots: W_ji itself when
//       i is j's positive, else from t_j and d_ij. Which thresholds d_ij lies below is decided
//       as the miner decides it (detail/mining/all.hpp): a product value within its rounding
//       of a kink is replaced by the exact distance by differences, which is bitwise symmetric;
//       elsewhere any value within the rounding falls on the exact side. So anchor j's rank and
//       row i's rank agree on every triplet, ties included, though their products differ.
//    4. the gradient of its rows from the weights by the tag's product (simd:
//       CrossDistances::gradients, near pairs by differences; scalar: loops in double).
//    No gradient is reduced.
#include <metricloss/backend/scalar/reference.hpp>
#include <metricloss/backend/sharded_band.hpp>
#include <metricloss/backend/simd/all_band.hpp>
#include <metricloss/backend/simd/reference.hpp>
#include <metricloss/batch_triplet.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/batch_triplet_mining.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/sharded.hpp>
#include <metricloss/detail/triplet_math.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

/// One positive of one anchor, as published: the anchor's thresholds ascending and, in the
/// same slots, W_ap of its positives in class order (the anchor itself skipped).
struct AllSlot {
  double threshold = 0.0;
  double weight = 0.0;
};

/// The sums this rank publishes first.
struct AllTotals {
  double sum = 0.0;
  double count = 0.0;
};

/// What the Mining::all statistics path keeps between calls (in the functor's slot).
template <class T>
struct ShardedAllScratch : BackendSlot::Contents {
  LabelClasses global;                    // X's labels
  CrossClasses classes;                   // this rank's anchors against X
  TripletMiner miner;
  CrossDistances<T> cross;                // simd: Q x X by the centred product
  ScalarReferenceScratch scalar;          // scalar: its gradient row
  GrowOnlyBuffer<double> squared;         // scalar: Q x X by differences
  GrowOnlyBuffer<double> weights;         // scalar: n_r x N, W in double
  GrowOnlyBuffer<Index> position;         // N: each row's place in its class
  GrowOnlyBuffer<Index> slot_first;       // N + 1: each anchor's first slot
  GrowOnlyBuffer<AllSlot> slots, all_slots;
  GrowOnlyBuffer<double> thresholds, kinks, slack;  // every slot's t and kink; each anchor's slack
  GrowOnlyBuffer<double> tile, slope, active;       // step 3: anchors' columns; one column
  GrowOnlyBuffer<Index> bucket;
  GrowOnlyBuffer<AllTotals> totals;       // one per rank
  GrowOnlyBuffer<std::size_t> bytes;
  // By bands (simd): the band, every band's slot parts, and the merged slots.
  AllBand<T> band;
  TriangleBands bands;
  GrowOnlyBuffer<AllBandSlot> band_slots, merged;
  GrowOnlyBuffer<Index> slot_offset;      // W + 1: each band's first gathered slot
  BandGradientParts<T> parts;
};

/// The miner's sink for this rank's anchors: W_ap of the positives into the published slots
/// (always: other ranks need them even when this rank wants no gradient), and the anchor's
/// row of W into the tag's dense weights when the gradient is wanted.
template <class Dense>
struct ShardedAllSink {
  Dense dense;
  bool gradient = false;
  AllSlot* slots = nullptr;          // this rank's, from its first anchor's first slot
  const Index* slot_first = nullptr;  // global
  const Index* position = nullptr;    // global
  Index first = 0;                    // this rank's first row of X

  bool enabled() const { return true; }
  void add(Index a, Index p, double w) {
    const Index g = first + a;
    const Index slot = position[p] - (position[g] < position[p] ? 1 : 0);
    slots[slot_first[g] - slot_first[first] + slot].weight += w;
    if (gradient) dense.add(a, p, w);
  }
  void add_row(Index a, const double* v, Index n) {
    if (gradient) dense.add_row(a, v, n);
  }
  template <class U>
  void add_row_lanes(Index a, const U* v, Index n) {
    if (gradient) dense.add_row_lanes(a, v, n);
  }
};

template <class T, class Base>
struct ShardedBatchAll {
  static constexpr bool simd = std::is_same<Base, simd_tag>::value;
  using Kernels = std::conditional_t<simd, SimdMiningKernels, ScalarMiningKernels>;

  template <class Group, class L>
  static T forward_backward(BatchTripletLoss<T>& loss, Group& group, const ShardView<T, L>& batch,
                            const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<ShardedAllScratch<T>>(loss);
    const Index n = batch.x.rows, d = batch.x.cols, rows = batch.rows, first = batch.first;
    const int ranks = group.size();
    const bool gradient = !grad.empty() && rows > 0;
    LabelClasses& global = work.global;
    global.assign(batch.labels);  // the caller has refused NaN labels
    if constexpr (simd) {
      if (ranks >= 2 &&
          work.band.prepare(batch.x, global, static_cast<double>(loss.margin), loss.distance,
                            loss.soft_margin, triangle_band_start(n, ranks, group.rank()),
                            triangle_band_start(n, ranks, group.rank() + 1)))
        return by_band(work, group, batch, loss.soft_margin, grad, top_diff);
    }

    // The slots' layout, known to every rank from the labels alone.
    Index* position = work.position.data(static_cast<std::size_t>(n));
    for (Index c = 0; c < global.classes(); ++c)
      for (const Index* m = global.class_begin(c); m != global.class_end(c); ++m)
        position[*m] = m - global.class_begin(c);
    Index* slot_first = work.slot_first.data(static_cast<std::size_t>(n + 1));
    slot_first[0] = 0;
    for (Index j = 0; j < n; ++j)
      slot_first[j + 1] = slot_first[j] + slots_of(global, j);
    const Index own_slots = slot_first[first + rows] - slot_first[first];
    AllSlot* slots = work.slots.data(static_cast<std::size_t>(own_slots));
    std::fill(slots, slots + own_slots, AllSlot{});

    // 1. This rank's anchors against X.
    AllTotals totals_mine;
    const MatrixView<const T> q{rows > 0 ? batch.x.row(first) : batch.x.data, rows, d, d};
    if (rows > 0) {
      const VectorView<L> labels_q{batch.labels.data + first, rows, 1};
      const ReferenceView<T, L> ref{batch.x, batch.labels,
                                    SelfIndex{&batch.first, rows, &shard_self_at}};
      work.classes.assign(labels_q, ref.labels, ref.self);
      const MiningResult mined = mine(loss, work, q, batch.x, gradient, first, slots);
      totals_mine = {mined.sum, mined.count};
    }

    // 2. Totals and slots from every rank; sums in rank order.
    AllTotals* totals = work.totals.data(static_cast<std::size_t>(ranks));
    gather(group, work.bytes, [](int) { return 1; }, &totals_mine, totals);
    double sum = 0.0, count = 0.0;
    for (int r = 0; r < ranks; ++r) {
      sum += totals[r].sum;
      count += totals[r].count;
    }
    const ShardStatus* status = batch.status;
    AllSlot* all = work.all_slots.data(static_cast<std::size_t>(slot_first[n]));
    gather(group, work.bytes,
           [&](int r) {
             Index begin = 0;
             for (int s = 0; s < r; ++s) begin += status[s].rows;
             return slot_first[begin + status[r].rows] - slot_first[begin];
           },
           static_cast<const AllSlot*>(slots), all);
    if (count == 0.0) {
      fill_rows(grad, T(0));
      return T(0);
    }

    // 3. and 4.
    if (gradient) {
      prepare_kinks(work, all, n, loss.distance);
      if constexpr (simd) {
        const CrossProductDistances<T> distances{&work.cross, work.cross.widest_reference()};
        add_candidate_role(loss, work, distances, all, first, rows, n,
                           work.cross.weights().data(), work.cross.stride());
        work.cross.gradients(static_cast<T>(static_cast<double>(top_diff) / count), grad,
                             MatrixView<T>{});
      } else {
        double* w = work.weights.data(0);
        add_candidate_role(loss, work, ExactSquaredDistances{work.squared.data(0), n}, all, first,
                           rows, n, w, n);
        cross_gradients(work.scalar, q, batch.x, static_cast<const double*>(w),
                        2.0 * static_cast<double>(top_diff) / count, grad, MatrixView<T>{});
      }
    }
    return static_cast<T>(sum / count);
  }

 private:
  /// The simd path by bands (backend/simd/all_band.hpp): every band's slot parts, merged
  /// per slot in rank order (the same bits on every rank), give L and Z; then, where some
  /// rank asked for it, the bands' gradient parts, which each rank adds for its own rows.
  template <class Group, class L>
  static T by_band(ShardedAllScratch<T>& work, Group& group, const ShardView<T, L>& batch,
                   bool soft_margin, const MatrixView<T>& grad, T top_diff) {
    const int ranks = group.size();
    const Index n = batch.x.rows;
    TriangleBands& bands = work.bands;
    bands.assign(n, ranks);
    AllBand<T>& band = work.band;
    const AllBandSlot* mine = band.slots();
    const Index* slot_first = band.slot_first();
    // Band q's parts: the slots of rows [0, e_q), from slot_offset[q] in what is gathered.
    Index* slot_offset = work.slot_offset.data(static_cast<std::size_t>(ranks) + 1);
    slot_offset[0] = 0;
    for (int q = 0; q < ranks; ++q) slot_offset[q + 1] = slot_offset[q] + slot_first[bands.end_of(q)];
    AllBandSlot* all = work.band_slots.data(static_cast<std::size_t>(slot_offset[ranks]));
    gather(group, work.bytes, [&](int q) { return slot_first[bands.end_of(q)]; }, mine, all);
    AllBandSlot* merged = work.merged.data(static_cast<std::size_t>(slot_first[n]));
    const double* t = band.slot_thresholds();
    const LabelClasses& classes = work.global;
    double sum = 0.0, count = 0.0;
    for (Index a = 0; a < n; ++a) {
      const Index f = slot_first[a], k = slot_first[a + 1] - f;
      if (k == 0) continue;
      const int from = bands.first_band(a);
      for (Index s = f; s < f + k; ++s) {
        AllBandSlot m;
        for (int q = from; q < ranks; ++q) {
          m.count += all[slot_offset[q] + s].count;
          m.sum += all[slot_offset[q] + s].sum;
        }
        merged[s] = m;
      }
      if (soft_margin) {
        for (Index s = f; s < f + k; ++s) sum += merged[s].sum;
        count += static_cast<double>(k) * static_cast<double>(classes.negatives(a));
      } else {
        for (Index s = f; s < f + k; ++s) {
          sum += merged[s].count * t[s] - merged[s].sum;
          count += merged[s].count;
        }
      }
    }
    if (count == 0.0) {
      fill_rows(grad, T(0));
      return T(0);
    }
    const T value = static_cast<T>(sum / count);
    if (!some_rank_wants_grad(batch.status, ranks)) return value;
    const T* part = band.gradient(merged, static_cast<double>(top_diff) / count);
    work.parts.reduce(group, work.bytes, bands, batch, part, grad);
    return value;
  }

  /// Anchor j's published slots: its positives, when it has negatives (else it mines nothing).
  static Index slots_of(const LabelClasses& global, Index j) {
    return global.negatives(j) > 0 ? global.positives(j) : 0;
  }

  /// Step 1 on the tag's distances: the miner with the sink, then each anchor's thresholds
  /// t_ap = d_ap + m from the same exact distances the miner sorted them by, ascending.
  static MiningResult mine(BatchTripletLoss<T>& loss, ShardedAllScratch<T>& work,
                           const MatrixView<const T>& q, const MatrixView<const T>& x,
                           bool gradient, Index first, AllSlot* slots) {
    const Index rows = q.rows, n = x.rows;
    const auto run = [&](const auto& distances, auto dense) {
      ShardedAllSink<decltype(dense)> sink{dense, gradient, slots, work.slot_first.data(0),
                                           work.position.data(0), first};
      const MiningResult result = work.miner.template mine<Kernels>(
          Mining::all, work.classes, distances, loss.margin, loss.distance, loss.soft_margin, sink);
      const Index* slot_first = work.slot_first.data(0);
      double* t = work.thresholds.data(static_cast<std::size_t>(n));
      for (Index a = 0; a < rows; ++a) {
        const Index g = first + a;
        const Index k = slot_first[g + 1] - slot_first[g];
        if (k == 0) continue;
        Index e = 0;
        for (const Index* p = work.classes.members_begin(a); p != work.classes.members_end(a); ++p)
          if (*p != g)
            t[e++] = distance_from_squared(distances.exact(a, *p), loss.distance).value + loss.margin;
        std::sort(t, t + k);
        AllSlot* own = slots + (slot_first[g] - slot_first[first]);
        for (Index s = 0; s < k; ++s) own[s].threshold = t[s];
      }
      return result;
    };
    if constexpr (simd) {
      work.cross.compute(q, x);
      CrossDenseWeights<T> dense;
      if (gradient) dense = {work.cross.zeroed_weights().data(), work.cross.stride()};
      return run(CrossProductDistances<T>{&work.cross, work.cross.widest_reference()}, dense);
    } else {
      double* squared = work.squared.data(static_cast<std::size_t>(rows * n));
      cross_distances(q, x, false, squared);
      DenseWeights dense{nullptr, n};
      if (gradient) {
        dense.weights = work.weights.data(static_cast<std::size_t>(rows * n));
        std::fill(dense.weights, dense.weights + rows * n, 0.0);
      }
      return run(ExactSquaredDistances{squared, n}, dense);
    }
  }

  /// Every slot's kink (the squared distance of its threshold; -inf where t <= 0 under
  /// Euclidean, which no distance lies below) and each anchor's slack, as the miner forms
  /// them (mining::exact_near_kinks).
  static void prepare_kinks(ShardedAllScratch<T>& work, const AllSlot* all, Index n,
                            Distance distance) {
    const Index* slot_first = work.slot_first.data(0);
    const Index total = slot_first[n];
    double* t = work.thresholds.data(static_cast<std::size_t>(total));
    double* kink = work.kinks.data(static_cast<std::size_t>(total));
    double* slack = work.slack.data(static_cast<std::size_t>(n));
    for (Index j = 0; j < n; ++j) {
      double largest = 0.0;
      for (Index s = slot_first[j]; s < slot_first[j + 1]; ++s) {
        t[s] = all[s].threshold;
        const double value = distance == Distance::squared_euclidean ? t[s] : t[s] * t[s];
        if (distance == Distance::squared_euclidean || t[s] > 0.0) {
          kink[s] = value;
          largest = std::max(largest, std::abs(value));
        } else {
          kink[s] = -std::numeric_limits<double>::infinity();
        }
      }
      slack[j] = largest * Numerics<double>::kink_slack;
    }
  }

  /// Anchors per tile of step 3: their columns of the distances, transposed into rows.
  static constexpr Index column_tile = 32;

  /// Step 3: W_ji for this rank's rows i (global first + i) and every anchor j, added to
  /// w (rows x n, row stride `stride`). Anchor by anchor, as the miner scans an anchor's row:
  /// a tile of anchors' columns is transposed into rows of doubles, each row becomes
  /// W_j. in place, and the tile is added back.
  template <class Distances, class W>
  static void add_candidate_role(const BatchTripletLoss<T>& loss, ShardedAllScratch<T>& work,
                                 const Distances& distances, const AllSlot* all, Index first,
                                 Index rows, Index n, W* w, Index stride) {
    const Index* slot_first = work.slot_first.data(0);
    double* tile = work.tile.data(static_cast<std::size_t>(column_tile * rows));
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
          anchor_column(loss, work, distances, all, first, rows, j0 + c, widest, column);
      }
      for (Index i0 = 0; i0 < rows; i0 += 8) {
        const Index height = std::min(Index(8), rows - i0);
        for (Index c = 0; c < width; ++c)
          for (Index i = i0; i < i0 + height; ++i)
            w[i * stride + j0 + c] += static_cast<W>(tile[c * rows + i]);
      }
    }
  }

  /// Anchor j's W_ji over this rank's rows, in place of their squared distances `column`
  /// (the approximate ones of the tag): W_ji from j's slot where i is j's positive, else
  /// from j's thresholds, with the miner's decisions (mining::all, exact_near_kinks).
  template <class Distances>
  static void anchor_column(const BatchTripletLoss<T>& loss, ShardedAllScratch<T>& work,
                            const Distances& distances, const AllSlot* all, Index first,
                            Index rows, Index j, Index widest, double* column) {
    using Scans = typename Kernels::Scans;
    const LabelClasses& global = work.global;
    const Index* slot_first = work.slot_first.data(0);
    const Index k = slot_first[j + 1] - slot_first[j];
    const double* t = work.thresholds.data(0) + slot_first[j];
    const Distance distance = loss.distance;
    // j's class among this rank's rows: not j's negatives (NaN, below no threshold).
    const Index c = global.class_of(j);
    const Index* members = std::lower_bound(global.class_begin(c), global.class_end(c), first);
    const Index* members_end = std::lower_bound(members, global.class_end(c), first + rows);
    for (const Index* m = members; m != members_end; ++m)
      column[*m - first] = std::numeric_limits<double>::quiet_NaN();
    double* slope = work.slope.data(static_cast<std::size_t>(rows));
    if (!loss.soft_margin) {
      const double bound = distances.rounding(widest, j);
      if (bound > 0.0) {
        const double* kink = work.kinks.data(0) + slot_first[j];
        const double slack = work.slack.data(0)[j];
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
    if (loss.soft_margin) {
      for (Index i = 0; i < rows; ++i) {
        double with = 0.0;
        if (column[i] == column[i])
          for (Index s = 0; s < k; ++s) with += hinge(t[s] - column[i], true).slope;
        slope[i] = -with * distance_derivative(column[i], distance);
      }
    } else if (k <= scan_limit) {
      double* active = work.active.data(static_cast<std::size_t>(2 * k));
      Scans::below_thresholds(column, rows, t, k, distance, active, active + k, slope);
    } else {
      Index* bucket = work.bucket.data(static_cast<std::size_t>(rows));
      count_thresholds_below<true>(t, k, column, rows, bucket);
      for (Index i = 0; i < rows; ++i)
        slope[i] = column[i] == column[i]
                       ? -static_cast<double>(k - bucket[i]) * distance_derivative(column[i], distance)
                       : 0.0;
    }
    std::copy(slope, slope + rows, column);
    // j's positives among this rank's rows: W_ji as j's rank published it.
    const Index* position = work.position.data(0);
    for (const Index* m = members; m != members_end; ++m) {
      const Index g = *m;
      if (g == j) {
        column[g - first] = 0.0;
        continue;
      }
      column[g - first] = all[slot_first[j] + position[g] - (position[j] < position[g] ? 1 : 0)].weight;
    }
  }
};

}  // namespace detail
}  // namespace metricloss
