#pragma once
// BatchTripletLoss with a reference set and sharded queries (detail/sharded_reference.hpp);
// the global batch: backend/sharded_batch_triplet.hpp.
#include <metricloss/backend/sharded_triplet_common.hpp>
#include <metricloss/batch_triplet.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/sharded.hpp>
#include <metricloss/detail/sharded_reference.hpp>

#include <algorithm>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

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
      mined = mine_sharded_triplets<Base>(loss, work, s.q, s.ref, sink);

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
