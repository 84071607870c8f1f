#pragma once
// BatchTripletLoss with Mining::all over a group's global batch X (detail/sharded.hpp) by
// exchanged statistics, O(n_r N D) per rank instead of O(N^2 D). W = d(sum)/dD2 is dense,
// so it is never exchanged; what crosses is O(N c) numbers. With t_ap = d_ap + m,
//   W_ap = sum_{n: d_an < t_ap} d'(d_ap)          (hinge; soft margin: sum_n sigma(t_ap - d_an))
//   W_an = -#{p: d_an < t_ap} d'(d_an)            (soft margin: -sum_p sigma(t_ap - d_an))
// and row i's gradient is 2 s sum_j (W_ij + W_ji) (x_i - x_j), s = top_diff / count.
// Two ways:
//  - simd, by bands of the triangle, from 2 ranks on (backend/sharded_all_bands.hpp). Where
//    the centred norms are too large for the product's values to stay finite (every rank
//    alike), the second way.
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
#include <metricloss/backend/sharded_all_candidates.hpp>
#include <metricloss/backend/sharded_all_bands.hpp>
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
  GrowOnlyBuffer<double> sorted;          // step 1: one anchor's thresholds, to sort
  AllCandidateRole candidates;            // step 3
  GrowOnlyBuffer<AllTotals> totals;       // one per rank
  GrowOnlyBuffer<std::size_t> bytes;
  ShardedAllBands<T> by_bands;            // simd, from 2 ranks on
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
      if (ranks >= 2 && work.by_bands.prepare(group, batch.x, global, static_cast<double>(loss.margin),
                                              loss.distance, loss.soft_margin))
        return work.by_bands.forward_backward(group, batch, global, loss.soft_margin, grad, top_diff);
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
      work.candidates.prepare(all, slot_first, n, loss.distance);
      const AllCandidateRole::Anchors anchors{&global, slot_first, position, all};
      if constexpr (simd) {
        const CrossProductDistances<T> distances{&work.cross, work.cross.widest_reference()};
        work.candidates.template add<Kernels>(anchors, loss.distance, loss.soft_margin, distances,
                                              first, rows, n, work.cross.weights().data(),
                                              work.cross.stride());
        work.cross.gradients(static_cast<T>(static_cast<double>(top_diff) / count), grad,
                             MatrixView<T>{});
      } else {
        double* w = work.weights.data(0);
        work.candidates.template add<Kernels>(anchors, loss.distance, loss.soft_margin,
                                              ExactSquaredDistances{work.squared.data(0), n},
                                              first, rows, n, w, n);
        cross_gradients(work.scalar, q, batch.x, static_cast<const double*>(w),
                        2.0 * static_cast<double>(top_diff) / count, grad, MatrixView<T>{});
      }
    }
    return static_cast<T>(sum / count);
  }

 private:
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
      double* t = work.sorted.data(static_cast<std::size_t>(n));
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

};

}  // namespace detail
}  // namespace metricloss
