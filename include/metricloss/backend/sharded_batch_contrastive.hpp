#pragma once
// BatchContrastiveLoss over a group's global batch X (detail/sharded.hpp) by exchanged
// totals, O(n_r N D) per rank instead of O(N^2 D). A pair's term and its weight depend on
// d_ij and the two labels only, and L on the totals (each side's sum and count), so:
//  1. each rank sweeps its rows against X (the reference-set path's distances, self = its
//     own rows) for the totals: on the simd path the lower triangle (candidates j < i of X:
//     each unordered pair once over all ranks, as the single-process simd path), on the
//     scalar path every ordered pair (as the single-process scalar path);
//  2. the ranks exchange their totals (six numbers each) and add them in rank order: the
//     same L on every rank;
//  3. each rank writes W_ij for its rows i against every j with the global scales and takes
//     its rows' gradient, 2 s sum_j W_ij (x_i - x_j) (simd: CrossDistances::gradients, near
//     pairs by differences, or, when the global totals count few active hinges, each
//     nonzero weight by differences, as the single-process path decides; scalar: loops in
//     double). Row i's weight of pair (i, j) is W_ij + W_ji: on the simd path the
//     triangle's one entry, on the scalar path 2 W_ij.
// Each hinge near its turn is decided on the distance by differences, bitwise symmetric, and
// elsewhere every value within its rounding lies on the exact side: the rank of i and the
// rank of j decide each pair alike. No gradient is reduced.
#include <metricloss/backend/scalar/batch_contrastive.hpp>
#include <metricloss/backend/scalar/reference.hpp>
#include <metricloss/backend/simd/batch_contrastive.hpp>
#include <metricloss/backend/simd/cross.hpp>
#include <metricloss/backend/simd/reference.hpp>
#include <metricloss/backend/simd/tuning.hpp>
#include <metricloss/backend/simd/weight_sinks.hpp>
#include <metricloss/backend/simd/widen.hpp>
#include <metricloss/batch_contrastive.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/batch_contrastive_math.hpp>
#include <metricloss/detail/cross_classes.hpp>
#include <metricloss/detail/sharded.hpp>

#include <algorithm>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

/// What the statistics path keeps between calls (in the functor's slot).
template <class T>
struct ShardedContrastiveScratch : BackendSlot::Contents {
  CrossClasses classes;                    // this rank's rows against X
  CrossDistances<T> cross;                 // simd: Q x X by the centred product
  ScalarReferenceScratch scalar;           // scalar: D2, W and a gradient row
  GrowOnlyBuffer<double> row, widened;     // simd: one row of W; one row of D2 in double
  GrowOnlyBuffer<double> direct;           // simd: n_r x D (+ D) sums of few weights
  GrowOnlyBuffer<ContrastiveTotals> totals;  // one per rank
  GrowOnlyBuffer<std::size_t> bytes;
};

template <class T, class Base>
struct ShardedBackend<BatchContrastiveLoss<T>, Base> {
  static constexpr bool simd = std::is_same<Base, simd_tag>::value;
  static constexpr bool available = simd || std::is_same<Base, scalar_tag>::value;

  static bool handles(const BatchContrastiveLoss<T>&, int ranks) { return ranks >= 2; }

  template <class Group, class L>
  static T forward_backward(BatchContrastiveLoss<T>& loss, Base, Group& group,
                            const ShardView<T, L>& batch, const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<ShardedContrastiveScratch<T>>(loss);
    if (shard_not_finite(batch)) {
      fill_rows(grad, std::numeric_limits<T>::quiet_NaN());
      return std::numeric_limits<T>::quiet_NaN();
    }
    const Index n = batch.x.rows, d = batch.x.cols, rows = batch.rows, first = batch.first;
    const ContrastiveRule rule(loss.pos_margin, loss.neg_margin, loss.distance, loss.reduction);
    const MatrixView<const T> q{rows > 0 ? batch.x.row(first) : batch.x.data, rows, d, d};

    // 1. This rank's totals.
    ContrastiveTotals mine;
    if (rows > 0) {
      const VectorView<L> labels_q{batch.labels.data + first, rows, 1};
      work.classes.assign(labels_q, batch.labels, SelfIndex{&batch.first, rows, &shard_self_at});
      if constexpr (simd) {
        work.cross.compute(q, batch.x);
        const auto distances = cross_distances_of(work);
        const Index widest = distances.widest();
        for (Index a = 0; a < rows; ++a) {
          const Index end = first + a;  // the lower triangle of X
          contrastive_row_lanes(rule, work.classes, distances,
                                widened_row(distances.row(a), end, work.widened), a, end,
                                distances.rounding(a, widest), mine);
        }
      } else {
        double* squared = work.scalar.squared.data(static_cast<std::size_t>(rows * n));
        cross_distances(q, batch.x, false, squared);
        const ExactSquaredDistances distances{squared, n};
        for (Index a = 0; a < rows; ++a)
          contrastive_row(rule, work.classes, distances, a, n, mine);
      }
    }

    // 2. Every rank's totals, added in rank order.
    const int ranks = group.size();
    ContrastiveTotals* all = work.totals.data(static_cast<std::size_t>(ranks));
    gather(group, work.bytes, [](int) { return 1; }, &mine, all);
    ContrastiveTotals totals;
    for (int r = 0; r < ranks; ++r) {
      totals.pos_sum += all[r].pos_sum;
      totals.neg_sum += all[r].neg_sum;
      totals.pos_active += all[r].pos_active;
      totals.neg_active += all[r].neg_active;
      totals.pos_pairs += all[r].pos_pairs;
      totals.neg_pairs += all[r].neg_pairs;
    }

    // 3. This rank's rows of W against all of X, and their gradient.
    if (!grad.empty() && rows > 0) {
      const double pos = totals.pos_scale(rule), neg = totals.neg_scale(rule);
      ContrastiveTotals again;
      if constexpr (simd) {
        const auto distances = cross_distances_of(work);
        const Index widest = distances.widest();
        double* row = work.row.data(static_cast<std::size_t>(n));
        const auto weights_of = [&](Index a) {
          contrastive_row_lanes(rule, work.classes, distances,
                                widened_row(distances.row(a), n, work.widened), a, n,
                                distances.rounding(a, widest), again, row, pos, neg);
        };
        const double nn = static_cast<double>(n);
        if ((totals.pos_active + totals.neg_active) * tuning::direct_weights_per_pair <= nn * nn) {
          double* sum = work.direct.data(static_cast<std::size_t>((rows + 1) * d));
          double* discard = sum + rows * d;  // X's side of each term: another rank's rows
          std::fill(sum, sum + rows * d, 0.0);
          for (Index a = 0; a < rows; ++a) {
            weights_of(a);
            for (Index j = 0; j < n; ++j)
              if (row[j] != 0.0)
                add_cross_pair_by_differences(sum + a * d, discard, q.row(a), batch.x.row(j), d, row[j]);
          }
          write_scaled_rows(sum, static_cast<double>(top_diff), grad);
        } else {
          CrossDenseWeights<T> sink{work.cross.zeroed_weights().data(), work.cross.stride()};
          for (Index a = 0; a < rows; ++a) {
            weights_of(a);
            sink.add_row(a, row, n);
          }
          work.cross.gradients(top_diff, grad, MatrixView<T>{});
        }
      } else {
        const ExactSquaredDistances distances{work.scalar.squared.data(0), n};
        double* w = work.scalar.weights.data(static_cast<std::size_t>(rows * n));
        for (Index a = 0; a < rows; ++a)
          contrastive_row(rule, work.classes, distances, a, n, again, w + a * n, pos, neg);
        // Over ordered pairs, W_ij = W_ji: row i's pair weight is W_ij + W_ji = 2 W_ij.
        cross_gradients(work.scalar, q, batch.x, static_cast<const double*>(w),
                        4.0 * static_cast<double>(top_diff), grad, MatrixView<T>{});
      }
    }
    return static_cast<T>(totals.loss(rule));
  }

 private:
  static CrossProductDistances<T> cross_distances_of(ShardedContrastiveScratch<T>& work) {
    return {&work.cross, work.cross.widest_reference()};
  }
};

}  // namespace detail
}  // namespace metricloss
