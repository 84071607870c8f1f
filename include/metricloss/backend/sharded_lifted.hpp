#pragma once
// LiftedStructureLoss over a group's global batch X (detail/sharded.hpp) by exchanged row
// statistics, O(N^2 D / W) per rank instead of O(N^2 D) (the prototype of
// ../shared/design/scale-out.md, B3). With S_i = sum_{k: y_k != y_i} e^{m - D_ik},
//   J_ij = log(S_i + S_j) + D_ij,   L = 1/(2|P|) sum_{i<j, y_i = y_j} max(J_ij, 0)^2,
//   dL/dD_ij = max(J_ij, 0) / |P|                                (positive pairs)
//   dL/dD_ik = -e^{m - D_ik} (c_i + c_k) / |P|,  c_i = sum_{p in P(i)} max(J_ip, 0) / (S_i + S_p)
//                                                                (negative pairs).
// Two ways, both from 2 ranks on:
//  - simd, by bands of the triangle (backend/sharded_lifted_bands.hpp). Where the centred
//    norms are too large for the product's values to stay finite (every rank alike), the
//    second way.
//  - scalar (and that fallback), each rank for its rows i against the whole of X:
//    1. D_ik (simd: the jointly centred product, positives by exact differences; scalar: all
//       by differences, in double) and log S_i, shifted by the nearest negative (no
//       overflow, no underflow to log 0); publishes log S (N numbers in all);
//    2. with every log S: J_ip of its positive pairs, c^_i = c_i S_i = sum_p J+ e^{log S_i -
//       log(S_i + S_p)} (bounded) and l_i = sum_{p > i} J+^2; publishes (c^_i, l_i);
//    3. L = sum of l_i in row order / (2|P|), the same bits on every rank; the gradient of
//       its rows in every role from one weight per (i, k): e^{m - D_ik} c_i = c^_i e^{m -
//       D_ik - log S_i}, each exponent <= 0. The weights go through the tag's product (simd:
//       CrossDistances::gradients, near pairs by differences; scalar: loops in double). No
//       gradient is reduced.
#include <metricloss/backend/scalar/reference.hpp>
#include <metricloss/backend/sharded_lifted_bands.hpp>
#include <metricloss/backend/simd/cross.hpp>
#include <metricloss/backend/simd/hard_band.hpp>
#include <metricloss/backend/simd/multi_similarity.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/detail/multi_similarity_math.hpp>
#include <metricloss/detail/sharded.hpp>
#include <metricloss/lifted_structure.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

template <class T>
struct ShardedLiftedScratch : BackendSlot::Contents {
  LabelClasses classes;                   // of X's labels
  CrossDistances<T> cross;                // simd
  ScalarReferenceScratch scalar;          // scalar: its gradient row
  GrowOnlyBuffer<double> squared;         // scalar: n_r x N, D2 by differences
  GrowOnlyBuffer<double> distance;        // n_r x N: D in double
  GrowOnlyBuffer<double> shifted;         // n_r x N: e^{nearest_i - D_ik} (0 off the negatives)
  GrowOnlyBuffer<double> row_sum;         // n_r: sum_k of shifted
  GrowOnlyBuffer<double> exponents;       // N: one row's e^{m - D_ik - log S_k}
  GrowOnlyBuffer<double> weights;         // scalar: n_r x N, dL/dD2
  GrowOnlyBuffer<double> log_s, log_s_all;            // n_r, N
  GrowOnlyBuffer<LiftedRowTotals> totals, totals_all;  // n_r, N
  GrowOnlyBuffer<std::size_t> bytes;
  ShardedLiftedBands<T> by_bands;         // simd
};

template <class T, class Base>
struct ShardedBackend<LiftedStructureLoss<T>, Base> {
  // Exponentials in lanes on the simd path (inputs floored at -1000), std::exp on scalar.
  using Exp = std::conditional_t<std::is_same<Base, simd_tag>::value, LanesExp, PlainExp>;

  static constexpr bool available =
      std::is_same<Base, scalar_tag>::value || std::is_same<Base, simd_tag>::value;

  static bool handles(const LiftedStructureLoss<T>&, int ranks) { return ranks >= 2; }

  template <class Group, class L>
  static T forward_backward(LiftedStructureLoss<T>& loss, Base, Group& group,
                            const ShardView<T, L>& batch, const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<ShardedLiftedScratch<T>>(loss);
    const Index n = batch.x.rows, d = batch.x.cols, rows = batch.rows, first = batch.first;
    // NaN, no positive pair, one class: every rank sees all of X and stops alike.
    double trivial = 0.0;
    if (lifted_trivial_case(work.classes, batch.labels, all_finite(batch.x), grad, trivial))
      return static_cast<T>(trivial);
    const LabelClasses& classes = work.classes;
    const double margin = static_cast<double>(loss.margin);
    const double pairs = static_cast<double>(classes.positive_pairs());
    if constexpr (std::is_same<Base, simd_tag>::value)
      if (work.by_bands.prepare(group, batch.x, classes))
        return work.by_bands.forward_backward(group, batch, classes, margin, pairs, grad, top_diff);
    const MatrixView<const T> q{rows > 0 ? batch.x.row(first) : batch.x.data, rows, d, d};

    // 1. Distances of this rank's rows to X, and their log S.
    double* dist = work.distance.data(static_cast<std::size_t>(rows * n));
    distances(work, q, batch.x, first, classes, dist);
    // S_i = e^{m - nearest_i} sum_k e^{nearest_i - D_ik}: exponents <= 0, in lanes.
    double* log_s = work.log_s.data(static_cast<std::size_t>(rows));
    double* shifted = work.shifted.data(static_cast<std::size_t>(rows * n));
    double* row_sum = work.row_sum.data(static_cast<std::size_t>(rows));
    const Index* class_of = classes.class_of();
    for (Index i = 0; i < rows; ++i) {
      const double* row = dist + i * n;
      double* e = shifted + i * n;
      const Index own = class_of[first + i];
      double nearest = std::numeric_limits<double>::infinity();
      for (Index k = 0; k < n; ++k)
        if (class_of[k] != own) nearest = std::min(nearest, row[k]);
      for (Index k = 0; k < n; ++k)
        e[k] = class_of[k] != own ? nearest - row[k] : -std::numeric_limits<double>::infinity();
      Exp::in_place(e, n);
      double sum = 0.0;
      for (Index k = 0; k < n; ++k) sum += e[k];
      row_sum[i] = sum;
      log_s[i] = lifted_log_normaliser(margin, nearest, sum);
    }
    double* log_s_all = work.log_s_all.data(static_cast<std::size_t>(n));
    gather_rows(group, work.bytes, batch.status, static_cast<const double*>(log_s), 1, log_s_all);

    // 2. The positive pairs of this rank's rows.
    LiftedRowTotals* totals = work.totals.data(static_cast<std::size_t>(rows));
    for (Index i = 0; i < rows; ++i) {
      const Index g = first + i;
      LiftedRowTotals t;
      for (const Index* p = classes.members_begin(g); p != classes.members_end(g); ++p) {
        if (*p == g) continue;
        const LiftedPair pair = lifted_pair(log_s_all[g], log_s_all[*p], dist[i * n + *p]);
        t.scaled_coefficient += pair.hinge * pair.share_i;
        if (*p > g) t.loss += pair.hinge * pair.hinge;
      }
      totals[i] = t;
    }
    LiftedRowTotals* all = work.totals_all.data(static_cast<std::size_t>(n));
    gather_rows(group, work.bytes, batch.status, static_cast<const LiftedRowTotals*>(totals), 1,
                all);
    double sum = 0.0;
    for (Index i = 0; i < n; ++i) sum += all[i].loss;
    const T value = static_cast<T>(sum / (2.0 * pairs));
    if (grad.empty() || rows == 0) return value;

    // 3. dL/dD2 of this rank's rows against X, in every role, then the product. Negative
    // (i, k): e^{m - D_ik} (c_i + c_k) = c^_i shifted_ik / row_sum_i + c^_k e^{m - D_ik -
    // log S_k}, the second exponent <= 0 (i is a negative of k).
    double* exponents = work.exponents.data(static_cast<std::size_t>(n));
    const auto fill_row = [&](Index i, auto&& store) {
      const Index g = first + i;
      const Index own = class_of[g];
      const double* row = dist + i * n;
      for (Index k = 0; k < n; ++k)
        exponents[k] = class_of[k] != own ? margin - row[k] - log_s_all[k]
                                          : -std::numeric_limits<double>::infinity();
      Exp::in_place(exponents, n);
      const double own_share = all[g].scaled_coefficient / row_sum[i];
      const double* e = shifted + i * n;
      for (Index k = 0; k < n; ++k) {
        double w = 0.0;
        if (class_of[k] != own)
          w = -(own_share * e[k] + all[k].scaled_coefficient * exponents[k]);
        else if (k != g)
          w = lifted_pair(log_s_all[g], log_s_all[k], row[k]).hinge;
        store(k, weight_on_squared(w / pairs, row[k]));
      }
    };
    if constexpr (std::is_same<Base, simd_tag>::value) {
      auto w = work.cross.zeroed_weights();
      for (Index i = 0; i < rows; ++i)
        fill_row(i, [&](Index k, double v) { w(i, k) = static_cast<T>(v); });
      work.cross.gradients(top_diff, grad, MatrixView<T>{});
    } else {
      double* w = work.weights.data(static_cast<std::size_t>(rows * n));
      for (Index i = 0; i < rows; ++i) fill_row(i, [&](Index k, double v) { w[i * n + k] = v; });
      cross_gradients(work.scalar, q, batch.x, w, 2.0 * static_cast<double>(top_diff), grad,
                      MatrixView<T>{});
    }
    return value;
  }

 private:
  /// D_ik for this rank's rows q (rows first.. of x) against x, in double.
  static void distances(ShardedLiftedScratch<T>& work, const MatrixView<const T>& q,
                        const MatrixView<const T>& x, Index first, const LabelClasses& classes,
                        double* out) {
    const Index rows = q.rows, n = x.rows;
    if (rows == 0) return;
    if constexpr (std::is_same<Base, simd_tag>::value) {
      work.cross.compute(q, x);
      for (Index i = 0; i < rows; ++i) {
        const T* row = work.cross.squared_row(i);
        const Index own = classes.class_of(first + i);
        for (Index k = 0; k < n; ++k)
          out[i * n + k] = std::sqrt(classes.class_of(k) == own
                                         ? work.cross.exact(i, k)
                                         : static_cast<double>(std::max(row[k], T(0))));
      }
    } else {
      double* squared = work.squared.data(static_cast<std::size_t>(rows * n));
      cross_distances(q, x, false, squared);
      for (Index e = 0; e < rows * n; ++e) out[e] = std::sqrt(squared[e]);
    }
  }
};

}  // namespace detail
}  // namespace metricloss
