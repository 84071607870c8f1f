#pragma once
// BatchTripletLoss (hard, semihard; all: backend/sharded_batch_all.hpp) over a group's
// global batch X (detail/sharded.hpp) by exchanged statistics, O(n_r N D) per rank instead of O(N^2 D):
//  1. this rank's anchors Q = its rows of X are mined against the whole of X as a reference
//     set with self = their own rows: the reference-set path of each tag (simd: the jointly
//     centred product with mined distances by differences; scalar: every distance by
//     differences), so the selection is the single-process one (ties: lowest global row);
//  2. each rank publishes its (sum, count) and its W entries (two per mined term: anchor,
//     candidate, weight), O(N c) in all; every rank adds the sums and counts in rank order,
//     so every rank returns the same bits;
//  3. each rank applies every entry that touches one of its rows, in every role (anchor,
//     positive or negative of any rank's anchor), by differences in double:
//     dL/dx_i = top_diff / count * sum 2 w (x_i - x_j). No gradient is reduced.
// Mining::all, whose W is dense, exchanges per-slot counts (simd, by bands) or thresholds
// (scalar) instead (backend/sharded_batch_all.hpp).
// Mining::hard on simd splits step 1 by the triangle instead (backend/simd/hard_band.hpp):
// each rank computes a band of ~N^2 / (2W) pairs, not its n_r x N rectangle, and publishes
// per row the exact extremes among the pairs it holds (32 bytes a row of its band's end);
// each rank merges them for its own anchors and takes steps 2 and 3 as above.
#include <metricloss/backend/scalar/reference.hpp>
#include <metricloss/backend/sharded_batch_all.hpp>
#include <metricloss/backend/simd/hard_band.hpp>
#include <metricloss/backend/simd/reference.hpp>
#include <metricloss/batch_triplet.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/sharded.hpp>
#include <metricloss/detail/sharded_reference.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

/// This rank's mining totals, published to every rank.
struct ShardTotals {
  double sum = 0.0;
  double count = 0.0;
  double entries = 0.0;  // exact: entries < 2^53
};

/// What the statistics path keeps between calls (in the functor's slot).
template <class T>
struct ShardedTripletScratch : BackendSlot::Contents {
  CrossClasses classes;
  TripletMiner miner;
  CrossDistances<T> cross;                  // simd: Q x X by the centred product
  GrowOnlyBuffer<double> squared;           // scalar: Q x X by differences
  GrowOnlyBuffer<WeightEntry> entries;      // this rank's W entries (then anchor as a row of X)
  GrowOnlyBuffer<WeightEntry> all_entries;  // every rank's
  GrowOnlyBuffer<ShardTotals> totals;       // one per rank
  GrowOnlyBuffer<double> sums;              // n_r x D: this rank's gradient in double
  GrowOnlyBuffer<std::size_t> bytes;
  LabelClasses labels;                      // simd hard: X's classes
  HardBand<T> band;                         // simd hard: this rank's band of the triangle
  GrowOnlyBuffer<HardExtremes> all_extremes;
  GrowOnlyBuffer<Index> published;          // simd hard: rows of extremes from each rank
  AlignedBuffer<T> all_q;                   // reference sets: Q gathered (for grad_r)
  GrowOnlyBuffer<T> send;                   // reference sets: this rank's rows made dense
  GrowOnlyBuffer<T> parts;                  // reference sets, all: grad_r's parts
  GrowOnlyBuffer<double> dense;             // reference sets, all, scalar: n_r x N_r weights
  ScalarReferenceScratch scalar;            // reference sets, all, scalar: a gradient row
};

template <class T, class Base>
struct ShardedBackend<BatchTripletLoss<T>, Base> {
  static constexpr bool available =
      std::is_same<Base, scalar_tag>::value || std::is_same<Base, simd_tag>::value;

  static bool handles(const BatchTripletLoss<T>&, int ranks) { return ranks >= 2; }

  template <class Group, class L>
  static T forward_backward(BatchTripletLoss<T>& loss, Base, Group& group,
                            const ShardView<T, L>& batch, const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<ShardedTripletScratch<T>>(loss);
    const Index d = batch.x.cols, rows = batch.rows;
    // Every rank sees all of X: the same verdict everywhere, so no rank skips a collective.
    if (shard_not_finite(batch)) {
      fill_rows(grad, std::numeric_limits<T>::quiet_NaN());
      return std::numeric_limits<T>::quiet_NaN();
    }
    if (loss.mining == Mining::all)
      return ShardedBatchAll<T, Base>::forward_backward(loss, group, batch, grad, top_diff);

    // 1. This rank's anchors against X.
    // The reference-set path's sink: anchors as rows of q, made rows of X below.
    CrossSparseWeights<T> sink;
    sink.entries = &work.entries;
    MiningResult mined;
    bool banded = false;
    if constexpr (std::is_same<Base, simd_tag>::value)
      if (loss.mining == Mining::hard) banded = mine_hard_by_bands(loss, work, group, batch, sink, mined);
    if (!banded && rows > 0) {
      const MatrixView<const T> q{batch.x.row(batch.first), rows, d, d};
      const VectorView<L> labels_q{batch.labels.data + batch.first, rows, 1};
      const ReferenceView<T, L> ref{batch.x, batch.labels,
                                    SelfIndex{&batch.first, rows, &shard_self_at}};
      work.classes.assign(labels_q, ref.labels, ref.self);
      mined = mine(loss, work, q, ref, sink);
      WeightEntry* list = work.entries.data(static_cast<std::size_t>(sink.count));
      for (Index e = 0; e < sink.count; ++e) list[e].i += batch.first;
    }

    // 2. Totals and entries from every rank; sums in rank order.
    const int ranks = group.size();
    const ShardTotals mine_totals{mined.sum, mined.count, static_cast<double>(sink.count)};
    ShardTotals* totals = work.totals.data(static_cast<std::size_t>(ranks));
    gather(group, work.bytes, [](int) { return 1; }, &mine_totals, totals);
    double sum = 0.0, count = 0.0;
    Index entries = 0;
    for (int q = 0; q < ranks; ++q) {
      sum += totals[q].sum;
      count += totals[q].count;
      entries += static_cast<Index>(totals[q].entries);
    }
    WeightEntry* all = work.all_entries.data(static_cast<std::size_t>(entries));
    gather(group, work.bytes, [&](int q) { return static_cast<Index>(totals[q].entries); },
           static_cast<const WeightEntry*>(work.entries.data(0)), all);
    if (count == 0.0) {
      fill_rows(grad, T(0));
      return T(0);
    }

    // 3. This rank's rows in every role.
    if (!grad.empty()) {
      double* sums = work.sums.data(static_cast<std::size_t>(rows * d));
      std::fill(sums, sums + rows * d, 0.0);
      const Index first = batch.first, end = batch.first + rows;
      for (Index e = 0; e < entries; ++e) {
        const WeightEntry& entry = all[e];
        const bool anchor = entry.i >= first && entry.i < end;
        const bool candidate = entry.j >= first && entry.j < end;
        if (!anchor && !candidate) continue;
        const T* xi = batch.x.row(entry.i);
        const T* xj = batch.x.row(entry.j);
        const double two_w = 2.0 * entry.w;
        for (Index k = 0; k < d; ++k) {
          const double term = two_w * (static_cast<double>(xi[k]) - static_cast<double>(xj[k]));
          if (anchor) sums[(entry.i - first) * d + k] += term;
          if (candidate) sums[(entry.j - first) * d + k] -= term;
        }
      }
      const double scale = static_cast<double>(top_diff) / count;
      for (Index i = 0; i < rows; ++i)
        for (Index k = 0; k < d; ++k) grad.row(i)[k] = static_cast<T>(scale * sums[i * d + k]);
    }
    return static_cast<T>(sum / count);
  }

  /// This rank's anchors q against ref (work.classes assigned): their terms into `sink`
  /// (anchors as rows of q); sum and count.
  template <class L>
  static MiningResult mine(BatchTripletLoss<T>& loss, ShardedTripletScratch<T>& work,
                           const MatrixView<const T>& q, const ReferenceView<T, L>& ref,
                           CrossSparseWeights<T>& sink) {
    if constexpr (std::is_same<Base, simd_tag>::value) {
      work.cross.compute(q, ref.r);
      const CrossProductDistances<T> distances{&work.cross, work.cross.widest_reference()};
      return work.miner.template mine<SimdMiningKernels>(loss.mining, work.classes, distances,
                                                         loss.margin, loss.distance,
                                                         loss.soft_margin, sink);
    } else {
      const Index nr = ref.r.rows;
      double* squared = work.squared.data(static_cast<std::size_t>(q.rows * nr));
      cross_distances(q, ref.r, false, squared);
      return work.miner.template mine<ScalarMiningKernels>(
          loss.mining, work.classes, ExactSquaredDistances{squared, nr}, loss.margin,
          loss.distance, loss.soft_margin, sink);
    }
  }

 private:
  /// Step 1 of Mining::hard by bands of the triangle: this rank's band, every rank's
  /// extremes gathered and merged for this rank's anchors, their terms into `mined` and
  /// `sink` (anchors as rows of X). False where the band could not be computed (on every
  /// rank alike: they hold the same X), before any collective.
  template <class Group, class L>
  static bool mine_hard_by_bands(BatchTripletLoss<T>& loss, ShardedTripletScratch<T>& work,
                                 Group& group, const ShardView<T, L>& batch,
                                 CrossSparseWeights<T>& sink, MiningResult& mined) {
    const Index n = batch.x.rows;
    const int ranks = group.size(), rank = group.rank();
    if (!work.labels.assign(batch.labels)) return false;
    const Index start = triangle_band_start(n, ranks, rank);
    const Index end = triangle_band_start(n, ranks, rank + 1);
    if (!work.band.compute(batch.x, work.labels.class_of(), start, end)) return false;
    // A rank publishes its band's rows [0, end): none when the band is empty.
    Index* published = work.published.data(static_cast<std::size_t>(ranks));
    Index total = 0;
    for (int q = 0; q < ranks; ++q) {
      const Index b = triangle_band_start(n, ranks, q), e = triangle_band_start(n, ranks, q + 1);
      published[q] = e > b ? e : Index(0);
      total += published[q];
    }
    HardExtremes* all = work.all_extremes.data(static_cast<std::size_t>(total));
    gather(group, work.bytes, [&](int q) { return published[q]; },
           static_cast<const HardExtremes*>(work.band.extremes()), all);
    for (Index a = batch.first; a < batch.first + batch.rows; ++a) {
      HardExtremes merged;
      Index offset = 0;
      for (int q = 0; q < ranks; ++q) {
        if (a < published[q]) merged.merge(all[offset + a]);
        offset += published[q];
      }
      if (merged.positive_row < 0 || merged.negative_row < 0) continue;
      const TripletTerm t = triplet_term(merged.positive, merged.negative, loss.margin,
                                         loss.distance, loss.soft_margin);
      mined.sum += t.loss;
      mined.count += 1.0;
      if (t.positive_weight != 0.0) sink.add(a, merged.positive_row, t.positive_weight);
      if (t.negative_weight != 0.0) sink.add(a, merged.negative_row, -t.negative_weight);
    }
    return true;
  }

};

/// BatchTripletLoss with a reference set (detail/sharded_reference.hpp), queries sharded, R on
/// every rank, O(n_r N_r D) per rank. Hard and semihard (Mining::all: all_triplets below):
///  1. this rank's queries mined against R by the tag's reference-set path (selections and
///     ties exactly the single process's: each query's terms depend on it and R only);
///  2. every rank's (sum, count) gathered, added in rank order: L = sum / count, the same
///     bits on every rank; a non-finite value or NaN label on any rank makes it NaN on all;
///  3. grad_q from this rank's entries (2 w (q_i - r_j), in double). When any rank wants
///     grad_r: Q and every rank's entries gathered, and grad_r = -sum 2 w (q_i - r_j) over all
///     of them in global order, the single process's order: the same bits on every rank.
template <class T, class Base>
struct ShardedReferenceBackend<BatchTripletLoss<T>, Base> {
  static constexpr bool available =
      std::is_same<Base, scalar_tag>::value || std::is_same<Base, simd_tag>::value;

  static bool handles(const BatchTripletLoss<T>&, int ranks) { return ranks >= 2; }

  template <class Group, class L, class LR>
  static T forward_backward(BatchTripletLoss<T>& loss, Base, Group& group,
                            const ShardedQueries<T, L, LR>& s, const MatrixView<T>& grad_q,
                            const MatrixView<T>& grad_r, T top_diff) {
    auto& work = scratch_of<ShardedTripletScratch<T>>(loss);
    if (loss.mining == Mining::all) return all_triplets(loss, work, group, s, grad_q, grad_r, top_diff);
    const Index d = s.q.cols, rows = s.q.rows;
    const int ranks = group.size();
    // 1. This rank's queries against R.
    const bool finite = work.classes.assign(s.labels, s.ref.labels, s.ref.self) &&
                        all_finite(s.q) && all_finite(s.ref.r);
    CrossSparseWeights<T> sink;
    sink.entries = &work.entries;
    MiningResult mined;
    if (finite && rows > 0)
      mined = ShardedBackend<BatchTripletLoss<T>, Base>::mine(loss, work, s.q, s.ref, sink);

    // 2. Every rank's totals (entries: -1 for a rank that saw a non-finite value).
    const ShardTotals mine_totals{mined.sum, mined.count, finite ? static_cast<double>(sink.count) : -1.0};
    ShardTotals* totals = work.totals.data(static_cast<std::size_t>(ranks));
    gather(group, work.bytes, [](int) { return 1; }, &mine_totals, totals);
    double sum = 0.0, count = 0.0;
    Index entries = 0;
    bool all_finite_ranks = true;
    for (int q = 0; q < ranks; ++q) {
      sum += totals[q].sum;
      count += totals[q].count;
      if (totals[q].entries < 0.0) all_finite_ranks = false;
      else entries += static_cast<Index>(totals[q].entries);
    }
    if (!all_finite_ranks) {
      fill_rows(grad_q, std::numeric_limits<T>::quiet_NaN());
      fill_rows(grad_r, std::numeric_limits<T>::quiet_NaN());
      return std::numeric_limits<T>::quiet_NaN();
    }
    const double scale = count != 0.0 ? static_cast<double>(top_diff) / count : 0.0;

    // 3. grad_q from this rank's entries; grad_r from every rank's, on the gathered Q.
    if (!grad_q.empty()) {
      if (count == 0.0) fill_rows(grad_q, T(0));
      else sink.gradients(work.sums, s.q, s.ref.r, scale, grad_q, MatrixView<T>{});
    }
    if (s.any_grad_r) {
      T* all_q = work.all_q.data(static_cast<std::size_t>(s.n * d));
      gather_dense_rows(group, work.bytes, s.status, s.q, work.send, all_q);
      WeightEntry* list = work.entries.data(static_cast<std::size_t>(sink.count));
      for (Index e = 0; e < sink.count; ++e) list[e].i += s.first;
      WeightEntry* all = work.all_entries.data(static_cast<std::size_t>(entries));
      gather(group, work.bytes, [&](int q) { return static_cast<Index>(totals[q].entries); },
             static_cast<const WeightEntry*>(list), all);
      if (!grad_r.empty()) {
        if (count == 0.0) {
          fill_rows(grad_r, T(0));
        } else {
          CrossSparseWeights<T> every;
          every.entries = &work.all_entries;
          every.count = entries;
          every.gradients(work.sums, MatrixView<const T>{all_q, s.n, d, d}, s.ref.r, scale,
                          MatrixView<T>{}, grad_r);
        }
      }
    }
    return count != 0.0 ? static_cast<T>(sum / count) : T(0);
  }

 private:
  /// Mining::all: W is dense (n_r x N_r), so each rank's queries keep their weights and the
  /// ranks exchange only (sum, count); grad_q by the tag's product of this rank's weights,
  /// scaled by the global count, and grad_r from every rank's part (N_r x D each) added in
  /// rank order in double, when any rank wants it.
  template <class Group, class L, class LR>
  static T all_triplets(BatchTripletLoss<T>& loss, ShardedTripletScratch<T>& work, Group& group,
                        const ShardedQueries<T, L, LR>& s, const MatrixView<T>& grad_q,
                        const MatrixView<T>& grad_r, T top_diff) {
    const Index d = s.q.cols, rows = s.q.rows, nr = s.ref.r.rows;
    const int ranks = group.size();
    const bool finite = work.classes.assign(s.labels, s.ref.labels, s.ref.self) &&
                        all_finite(s.q) && all_finite(s.ref.r);
    const bool gradient = rows > 0 && (!grad_q.empty() || s.any_grad_r);
    MiningResult mined;
    double* dense = nullptr;  // scalar: dL/dD2 in double
    if (finite && rows > 0) {
      if constexpr (std::is_same<Base, simd_tag>::value) {
        work.cross.compute(s.q, s.ref.r);
        const CrossProductDistances<T> distances{&work.cross, work.cross.widest_reference()};
        CrossDenseWeights<T> weights;
        if (gradient) weights = {work.cross.zeroed_weights().data(), work.cross.stride()};
        mined = work.miner.template mine<SimdMiningKernels>(Mining::all, work.classes, distances,
                                                            loss.margin, loss.distance,
                                                            loss.soft_margin, weights);
      } else {
        const auto entries = static_cast<std::size_t>(rows * nr);
        double* squared = work.squared.data(entries);
        cross_distances(s.q, s.ref.r, false, squared);
        DenseWeights weights{nullptr, nr};
        if (gradient) {
          dense = weights.weights = work.dense.data(entries);
          std::fill(dense, dense + entries, 0.0);
        }
        mined = work.miner.template mine<ScalarMiningKernels>(
            Mining::all, work.classes, ExactSquaredDistances{squared, nr}, loss.margin,
            loss.distance, loss.soft_margin, weights);
      }
    }
    const ShardTotals mine_totals{mined.sum, mined.count, finite ? 0.0 : -1.0};
    ShardTotals* totals = work.totals.data(static_cast<std::size_t>(ranks));
    gather(group, work.bytes, [](int) { return 1; }, &mine_totals, totals);
    double sum = 0.0, count = 0.0;
    bool every_rank_finite = true;
    for (int q = 0; q < ranks; ++q) {
      sum += totals[q].sum;
      count += totals[q].count;
      every_rank_finite = every_rank_finite && totals[q].entries >= 0.0;
    }
    if (!every_rank_finite) {  // every rank sees it: no further collective
      fill_rows(grad_q, std::numeric_limits<T>::quiet_NaN());
      fill_rows(grad_r, std::numeric_limits<T>::quiet_NaN());
      return std::numeric_limits<T>::quiet_NaN();
    }
    T* part = nullptr;  // this rank's part of grad_r, then every rank's
    if (s.any_grad_r) {
      part = work.parts.data(static_cast<std::size_t>((ranks + 1) * nr * d));
      std::fill(part, part + nr * d, T(0));
    }
    const MatrixView<T> part_view = part != nullptr ? MatrixView<T>{part, nr, d, d} : MatrixView<T>{};
    if (count == 0.0) {
      fill_rows(grad_q, T(0));
    } else if (gradient) {
      const double scale = static_cast<double>(top_diff) / count;
      if constexpr (std::is_same<Base, simd_tag>::value)
        work.cross.gradients(static_cast<T>(scale), grad_q, part_view);
      else
        cross_gradients(work.scalar, s.q, s.ref.r, dense, 2.0 * scale, grad_q, part_view);
    }
    if (part != nullptr) add_grad_r_parts(group, work.bytes, part, nr, d, grad_r);
    return count != 0.0 ? static_cast<T>(sum / count) : T(0);
  }
};

}  // namespace detail
}  // namespace metricloss
