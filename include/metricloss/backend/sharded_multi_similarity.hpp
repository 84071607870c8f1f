#pragma once
// MultiSimilarityLoss over a group's global batch X (detail/sharded.hpp) by exchanged row
// statistics, O(n_r N D) per rank instead of O(N^2 D). Row a's W_a. = dL_a/dS_a. depends on
// its similarities and on seven numbers (MultiSimilarityRowStats: the kept sets' limits, each
// side's shift and sum, and L_a), so:
//  1. each rank runs its rows against X (the reference-set path's similarities and rows,
//     self = its own rows): L_a, the stats and, for the gradient, its rows of W;
//  2. the ranks exchange the stats (56 bytes a row); L = sum of L_a in row order / N, the
//     same bits on every rank;
//  3. each rank adds W_ji for its rows i as candidates of every anchor j, from j's stats and
//     S_ij (multi_similarity_weight: a kept-set decision near its limit is made on the exact
//     similarity, which is bitwise symmetric, so j's rank and i's rank decide alike), and
//     takes its rows' gradient, dL/dx_i = sum_j (W_ij + W_ji) x_j (simd: one product; scalar:
//     loops in double). No gradient is reduced.
#include <metricloss/backend/scalar/multi_similarity.hpp>
#include <metricloss/backend/simd/multi_similarity.hpp>
#include <metricloss/backend/simd/similarities.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/cross_classes.hpp>
#include <metricloss/detail/multi_similarity_math.hpp>
#include <metricloss/detail/sharded.hpp>
#include <metricloss/detail/sharded_reference.hpp>
#include <metricloss/multi_similarity.hpp>

#include <algorithm>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

/// What the statistics path keeps between calls (in the functor's slot).
template <class T>
struct ShardedMultiSimilarityScratch : BackendSlot::Contents {
  CrossClasses classes;                   // this rank's rows against X
  CrossSimilarities<T> similarities;      // simd: Q x X by one product
  ScalarMultiSimilarityScratch scalar;    // scalar: S and W in double, a gradient row
  GrowOnlyBuffer<double> z;               // scalar: one row's exponents
  MultiSimilarityRowBuffers row;          // simd: one row at a time
  GrowOnlyBuffer<MultiSimilarityRowStats> stats, all_stats;  // n_r, N
  GrowOnlyBuffer<std::size_t> bytes;
  GrowOnlyBuffer<T> parts;                // reference sets: grad_r's part, then every rank's
  GrowOnlyBuffer<double> totals;          // reference sets: n_r L_r of every rank
};

template <class T, class Base>
struct ShardedBackend<MultiSimilarityLoss<T>, Base> {
  static constexpr bool simd = std::is_same<Base, simd_tag>::value;
  static constexpr bool available = simd || std::is_same<Base, scalar_tag>::value;

  static bool handles(const MultiSimilarityLoss<T>&, int ranks) { return ranks >= 2; }

  template <class Group, class L>
  static T forward_backward(MultiSimilarityLoss<T>& loss, Base, Group& group,
                            const ShardView<T, L>& batch, const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<ShardedMultiSimilarityScratch<T>>(loss);
    if (shard_not_finite(batch)) {
      fill_rows(grad, std::numeric_limits<T>::quiet_NaN());
      return std::numeric_limits<T>::quiet_NaN();
    }
    const Index n = batch.x.rows, d = batch.x.cols, rows = batch.rows, first = batch.first;
    const MultiSimilarityRule rule = rule_of(loss);
    const bool gradient = !grad.empty() && rows > 0;
    const double scale = static_cast<double>(top_diff) / static_cast<double>(n);
    const MatrixView<const T> q{rows > 0 ? batch.x.row(first) : batch.x.data, rows, d, d};

    // 1. This rank's rows: L_a, their stats, and W's rows.
    MultiSimilarityRowStats* stats = work.stats.data(static_cast<std::size_t>(rows));
    double* w = nullptr;  // scalar
    if (rows > 0) {
      const VectorView<L> labels_q{batch.labels.data + first, rows, 1};
      work.classes.assign(labels_q, batch.labels, SelfIndex{&batch.first, rows, &shard_self_at});
      if constexpr (simd) {
        work.similarities.compute(q, batch.x);
        for (Index a = 0; a < rows; ++a)
          multi_similarity_row_lanes(rule, work.classes, work.similarities, a, n, work.row,
                                     gradient ? work.similarities.weight_row(a) : nullptr, scale,
                                     stats + a);
      } else {
        double* z = work.z.data(static_cast<std::size_t>(n));
        const auto entries = static_cast<std::size_t>(rows * n);
        double* s = work.scalar.similarity.data(entries);
        cross_similarities(q, batch.x, s);
        if (gradient) w = work.scalar.weights.data(entries);
        for (Index a = 0; a < rows; ++a)
          multi_similarity_row(rule, work.classes, ExactSimilarities{s, n}, a, n, z,
                               w ? w + a * n : nullptr, scale, stats + a);
      }
    }

    // 2. Every row's stats, in row order.
    MultiSimilarityRowStats* all = work.all_stats.data(static_cast<std::size_t>(n));
    gather_rows(group, work.bytes, batch.status, static_cast<const MultiSimilarityRowStats*>(stats),
                1, all);
    double sum = 0.0;
    for (Index a = 0; a < n; ++a) sum += all[a].loss;

    // 3. This rank's rows as candidates of every anchor, then the gradient.
    if (gradient) {
      if constexpr (simd) {
        const CrossSimilarities<T>& s = work.similarities;
        add_candidate_role(rule, work.classes, s, all, first, rows, n, scale,
                           [&](Index i) { return work.similarities.weight_row(i); });
        work.similarities.gradients(grad, MatrixView<T>{});
      } else {
        const ExactSimilarities s{work.scalar.similarity.data(0), n};
        add_candidate_role(rule, work.classes, s, all, first, rows, n, scale,
                           [&](Index i) { return w + i * n; });
        similarity_gradient(work.scalar, batch.x, [&](Index i, Index j) { return w[i * n + j]; },
                            grad);
      }
    }
    return static_cast<T>(sum / static_cast<double>(n));
  }

 private:
  /// W_ji for this rank's rows i (global first + i) and every anchor j != i, added to
  /// weight_row(i)[j].
  template <class Similarities, class WeightRow>
  static void add_candidate_role(const MultiSimilarityRule& rule, const CrossClasses& classes,
                                 const Similarities& s, const MultiSimilarityRowStats* all,
                                 Index first, Index rows, Index n, double scale,
                                 WeightRow&& weight_row) {
    const Index* class_of = classes.class_of();
    for (Index i = 0; i < rows; ++i) {
      const Index g = first + i, own = class_of[g];
      const auto* row = s.row(i);
      auto* out = weight_row(i);
      using W = std::remove_reference_t<decltype(*out)>;
      for (Index j = 0; j < n; ++j) {
        if (j == g) continue;
        const double v = static_cast<double>(row[j]);
        const double weight = multi_similarity_weight(rule, all[j], class_of[j] == own, v,
                                                      s.rounding(i, j),
                                                      [&] { return s.exact(i, j); }, scale);
        out[j] += static_cast<W>(weight);
      }
    }
  }
};

/// MultiSimilarityLoss with a reference set (detail/sharded_reference.hpp), queries sharded,
/// R on every rank, O(n_r N_r D) per rank. L = (1/N_q) sum_a L_a, and L_a and its gradient
/// terms depend on q_a and R only, so each rank runs the reference-set path on its queries
/// with top_diff n_r / N_q: its rows of grad_q are final, its L_r = (1/n_r) sum of its L_a,
/// and its grad_r is its queries' part. The ranks gather n_r L_r (added in rank order: L,
/// the same bits on every rank) and, when any rank wants grad_r, every rank's part (N_r x D
/// each), added in rank order in double. A non-finite value on any rank: NaN on all.
template <class T, class Base>
struct ShardedReferenceBackend<MultiSimilarityLoss<T>, Base> {
  static constexpr bool available =
      std::is_same<Base, scalar_tag>::value || std::is_same<Base, simd_tag>::value;

  static bool handles(const MultiSimilarityLoss<T>&, int ranks) { return ranks >= 2; }

  template <class Group, class L, class LR>
  static T forward_backward(MultiSimilarityLoss<T>& loss, Base base, Group& group,
                            const ShardedQueries<T, L, LR>& s, const MatrixView<T>& grad_q,
                            const MatrixView<T>& grad_r, T top_diff) {
    auto& work = scratch_of<ShardedMultiSimilarityScratch<T>>(loss);
    const Index rows = s.q.rows, nr = s.ref.r.rows, d = s.q.cols;
    const int ranks = group.size();
    T* part = nullptr;  // this rank's part of grad_r, then every rank's
    if (s.any_grad_r) {
      part = work.parts.data(static_cast<std::size_t>((ranks + 1) * nr * d));
      std::fill(part, part + nr * d, T(0));
    }
    double mine = 0.0;
    if (rows > 0) {
      const T local_top = static_cast<T>(static_cast<double>(top_diff) * static_cast<double>(rows) /
                                         static_cast<double>(s.n));
      const T value = ReferenceBackend<MultiSimilarityLoss<T>, Base>::forward_backward(
          loss, base, s.q, s.labels, s.ref, grad_q,
          part != nullptr ? MatrixView<T>{part, nr, d, d} : MatrixView<T>{}, local_top);
      mine = static_cast<double>(value) * static_cast<double>(rows);
    }
    double* totals = work.totals.data(static_cast<std::size_t>(ranks));
    gather(group, work.bytes, [](int) { return 1; }, &mine, totals);
    double sum = 0.0;
    for (int q = 0; q < ranks; ++q) sum += totals[q];
    if (sum != sum) {  // NaN on some rank: every rank sees it (no further collective)
      fill_rows(grad_q, std::numeric_limits<T>::quiet_NaN());
      fill_rows(grad_r, std::numeric_limits<T>::quiet_NaN());
      return std::numeric_limits<T>::quiet_NaN();
    }
    if (part != nullptr) add_grad_r_parts(group, work.bytes, part, nr, d, grad_r);
    return static_cast<T>(sum / static_cast<double>(s.n));
  }
};

}  // namespace detail
}  // namespace metricloss
