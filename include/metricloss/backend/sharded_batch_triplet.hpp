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
// With a reference set: backend/sharded_reference_triplet.hpp.
#include <metricloss/backend/sharded_batch_all.hpp>
#include <metricloss/backend/sharded_reference_triplet.hpp>
#include <metricloss/backend/sharded_triplet_common.hpp>
#include <metricloss/backend/simd/hard_band.hpp>
#include <metricloss/batch_triplet.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/sharded.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

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
      mined = mine_sharded_triplets<Base>(loss, work, q, ref, sink);
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

}  // namespace detail
}  // namespace metricloss
