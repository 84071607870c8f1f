#pragma once
// The SIMD path of the lifted structured loss: the factorisation of
// <metricloss/lifted_structure.hpp> with D2 from one X X^T product (PairwiseDistances,
// backend/simd/pairwise.hpp: lower triangle only, positive pairs recomputed by differences),
// the O(N^2) sqrt / exp of the row soft-maxes and the weights in xsimd batches
// (backend/simd/lifted_sweeps.hpp), the far pairs' precision plan
// (backend/simd/lifted_precision.hpp), and dX from one (N x N)(N x D) product.
//
// Three sweeps of the lower triangle: (1) D = sqrt(D2) in place and the nearest negatives;
// (2) the shifted exp-sums s_i; (3) after the O(|P|) pair terms, S = W + W^T of the
// negatives from both rows' soft-max factors, near pairs taken out, and S 1. The
// gradient product reads S from its lower triangle (row panels and transposed column
// panels), so neither D2 nor S is ever mirrored. Near pairs: see lifted_sweeps.hpp.
#include <metricloss/backend/simd/lifted_precision.hpp>
#include <metricloss/backend/simd/lifted_sweeps.hpp>
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/backend/simd/widen.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/lifted_structure.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

/// What the simd path keeps between calls (in the functor's slot).
template <class T>
struct SimdLiftedScratch : BackendSlot::Contents {
  LabelClasses classes;
  PairwiseDistances<T> pairwise;                       // D2, then D, lower triangle
  GrowOnlyBuffer<T> class_values;                      // N: class ids as T (masks)
  GrowOnlyBuffer<T> nearest, column_nearest;           // N: nearest negative, column part
  GrowOnlyBuffer<Recomputed> recomputed;               // the negatives recomputed in double
  GrowOnlyBuffer<double> exact_nearest, rescale;       // N: nearest over both, T sums' rescale
  GrowOnlyBuffer<double> log_normaliser, shifted_sum;  // N: a_i, s_i
  GrowOnlyBuffer<double> coefficient, list_factor;     // N: sum of h dJ/da, -coefficient / s
  GrowOnlyBuffer<T> row_factor, near_threshold;        // N: list_factor rescaled; near rule
  GrowOnlyBuffer<T> symmetric;                         // S = W + W^T, lower triangle, padded rows
  GrowOnlyBuffer<T> column_partial;                    // N: ColumnSums' lanes
  GrowOnlyBuffer<double> column_total, row_part;       // N: column and row parts of sums
  GrowOnlyBuffer<T> row_sums;                          // N: S 1
  GrowOnlyBuffer<T> near_gradient;                     // N x D: near pairs by differences
};

template <class T>
struct Backend<LiftedStructureLoss<T>, simd_tag> {
  template <class L>
  static T forward_backward(LiftedStructureLoss<T>& loss, simd_tag, const MatrixView<const T>& x,
                            const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff) {
    auto& scratch = scratch_of<SimdLiftedScratch<T>>(loss);
    double value = 0.0;
    if (lifted_trivial_case(scratch.classes, labels, Sweeps::all_finite(x), grad, value))
      return static_cast<T>(value);
    Pass pass(scratch, x, loss.margin);
    pass.distances();
    if constexpr (Precision::is_float) {  // large scales: the whole call in double, if cheaper
      if (pass.widening_pays())
        return in_double<LiftedStructureLoss<double>>(
            BackendSlotAccess::of(loss), x, grad, [&](auto& wide, const auto& xd, const auto& gd) {
              wide.margin = static_cast<double>(loss.margin);
              return Backend<LiftedStructureLoss<double>, simd_tag>::forward_backward(
                  wide, simd_tag{}, xd, labels, gd, static_cast<double>(top_diff));
            });
    }
    pass.recompute_imprecise();
    pass.row_normalisers();
    const double sum = pass.pair_terms(!grad.empty());
    const auto pairs = static_cast<double>(scratch.classes.positive_pairs());
    if (!grad.empty()) {
      pass.negative_weights();
      pass.gradient(static_cast<T>(static_cast<double>(top_diff) / pairs), grad);
    }
    return static_cast<T>(sum / (2.0 * pairs));
  }

 private:
  using Sweeps = LiftedSweeps<T>;
  using Precision = LiftedPrecision<T>;
  using ColumnSums = detail::ColumnSums<T>;

  /// One call's steps, on the scratch's buffers.
  struct Pass {
    SimdLiftedScratch<T>& s;
    const LabelClasses& classes;
    PairwiseDistances<T>& pairwise;
    const MatrixView<const T> x;
    const double margin;
    const Index n;
    T *class_value, *nearest, *column_nearest;
    T* distance = nullptr;  // D, lower triangle k < i, rows `rows` apart
    Index rows = 0, recomputed = 0;  // ... and the length of the list
    const Recomputed* list = nullptr;
    double *exact_nearest = nullptr, *rescale = nullptr, *list_factor = nullptr;
    double *log_normaliser = nullptr, *shifted_sum = nullptr;
    T *weight = nullptr, *near_sums = nullptr;  // S: lower triangle, rows `stride` apart
    Index stride = 0;

    Pass(SimdLiftedScratch<T>& scratch, const MatrixView<const T>& x_, double margin_)
        : s(scratch), classes(s.classes), pairwise(s.pairwise), x(x_), margin(margin_), n(x_.rows),
          class_value(buffer(s.class_values)), nearest(buffer(s.nearest)),
          column_nearest(buffer(s.column_nearest)) {
      // Class ids as T (exact below 2^24 classes), compared lane-wise to mask the negatives.
      for (Index i = 0; i < n; ++i) class_value[i] = static_cast<T>(classes.class_of(i));
    }

    template <class U>
    U* buffer(GrowOnlyBuffer<U>& b) const { return b.data(static_cast<std::size_t>(n)); }

    /// D2 on the lower triangle only (each unordered pair once), exact for the positive
    /// pairs; fused with sweep 1, on each row as soon as it is final: D = sqrt(D2) in place,
    /// and the nearest negative of every row, from its part left of the diagonal (row-wise)
    /// and right of it (the column, lane-wise).
    void distances() {
      std::fill(column_nearest, column_nearest + n, std::numeric_limits<T>::infinity());
      pairwise.compute_lower(x, [&](Index i) {
        T* row = pairwise.squared().data() + i * pairwise.stride();  // sized by compute_lower
        classes.for_each_earlier_positive(i, [&](Index k) {
          row[k] = static_cast<T>(pairwise.by_differences(k, i));
        });
        nearest[i] = Sweeps::template nearest_negative<true>(row, row, class_value, class_value[i], i, column_nearest);
      });
      for (Index i = 0; i < n; ++i) nearest[i] = std::min(nearest[i], column_nearest[i]);
      distance = pairwise.squared().data();
      rows = pairwise.stride();
    }

    /// Float at large scales, where many weighted distances would need the list: whether the
    /// whole call in double is cheaper (tuning::lifted_in_double).
    bool widening_pays() const {
      const Index imprecise = Precision::count_imprecise(pairwise, distance, class_value, nearest);
      return Precision::in_double_pays(imprecise, n, x.cols);
    }

    /// The weighted negatives that T cannot give to the tolerance, exact and in double; each
    /// row's nearest in double, over the T entries and the list (T cannot hold a recomputed
    /// distance to within exp's range beyond D ~ 1e10 in float): the shift of the list's
    /// terms and of a_i. The T sweeps keep the T nearest (the least T entry) and their sums
    /// are rescaled by exp(nearest_double - nearest_T) <= 1.
    void recompute_imprecise() {
      recomputed = Precision::recompute_weighted(pairwise, x, distance, class_value, nearest,
                                                 column_nearest, s.recomputed);
      list = s.recomputed.data(0);
      exact_nearest = buffer(s.exact_nearest);
      rescale = buffer(s.rescale);
      list_factor = buffer(s.list_factor);
      for (Index i = 0; i < n; ++i) {
        exact_nearest[i] = static_cast<double>(nearest[i]);
        rescale[i] = 0.0;  // first: the list's part of s_i
      }
      Precision::list_nearest(list, recomputed, exact_nearest);
    }

    /// Sweep 2: s_i = sum_k exp(nearest_i - D_ik) over the negatives, again from the row
    /// part and the column part of the triangle; a_i = log s_i + margin - nearest_i (every
    /// row has negatives: two classes at least).
    void row_normalisers() {
      log_normaliser = buffer(s.log_normaliser);
      shifted_sum = buffer(s.shifted_sum);
      ColumnSums columns(s.column_partial, s.column_total, n);
      for (Index i = 0; i < n; ++i) {
        shifted_sum[i] = Sweeps::shifted_exp_sums(distance + i * rows, class_value, class_value[i],
                                                  nearest[i], nearest, i, columns.partial);
        columns.row_done(i);
      }
      columns.finish();
      Precision::list_exp_sums(list, recomputed, exact_nearest, rescale);
      Precision::merge_sums(n, recomputed > 0, nearest, exact_nearest, columns.total, rescale, shifted_sum);
      for (Index i = 0; i < n; ++i)
        log_normaliser[i] = lifted_log_normaliser(margin, exact_nearest[i], shifted_sum[i]);
    }

    /// Positive pairs: O(|P|) scalar work. Returns sum of h^2; with the gradient, each row's
    /// coefficient sum h dJ/da_i, and the pair weights h_ij / (2 D_ij) at (j, i) of S (its
    /// own buffer, rows padded: no 4 KiB-aliasing stride).
    double pair_terms(bool gradient) {
      if (gradient) {
        stride = padded_stride<T>(n);
        weight = s.symmetric.data(static_cast<std::size_t>(n * stride));
      }
      double* coefficient = buffer(s.coefficient);
      std::fill(coefficient, coefficient + n, 0.0);
      double sum = 0.0;
      classes.for_each_positive_pair([&](Index i, Index j) {
        double dij = static_cast<double>(distance[j * rows + i]);
        // J_ij = ... + D_ij: T's rounding of D_ij (eps D) moves the hinge by as much.
        if (Precision::storage_unit * dij > Precision::tolerance)
          dij = std::sqrt(exact_squared_distance(x.row(i), x.row(j), x.cols));
        const LiftedPair pair = lifted_pair(log_normaliser[i], log_normaliser[j], dij);
        sum += pair.hinge * pair.hinge;
        if (!gradient) return;
        coefficient[i] += pair.hinge * pair.share_i;
        coefficient[j] += pair.hinge * pair.share_j;
        weight[j * stride + i] = static_cast<T>(weight_on_squared(pair.hinge, dij));
      });
      return sum;
    }

    /// Sweep 3: the symmetric weights S_ik = W_ik + W_ki of the negatives, straight into the
    /// lower triangle, near pairs taken out, and the row sums S 1 (row and column parts).
    void negative_weights() {
      const double* coefficient = s.coefficient.data(0);
      T* row_factor = buffer(s.row_factor);
      for (Index i = 0; i < n; ++i) {
        list_factor[i] = -coefficient[i] / shifted_sum[i];
        row_factor[i] = static_cast<T>(list_factor[i] * rescale[i]);
      }
      T* threshold = buffer(s.near_threshold);
      Sweeps::near_thresholds(pairwise.centred(), threshold);
      double* row_part = buffer(s.row_part);
      ColumnSums columns(s.column_partial, s.column_total, n);
      for (Index i = 0; i < n; ++i) {
        row_part[i] = Sweeps::symmetric_weights(i, distance + i * rows, class_value, nearest, row_factor,
                                                threshold, x, weight + i * stride, columns.partial,
                                                near_sums, s.near_gradient);
        columns.row_done(i);
      }
      columns.finish();
      // The recomputed negatives (0 in the sweep: D = +inf there), in double.
      for (Index e = 0; e < recomputed; ++e) {
        const Index i = list[e].i, k = list[e].k;
        T& slot = weight[i * stride + k];
        slot = static_cast<T>(Precision::list_weight(list[e], list_factor, exact_nearest));
        Sweeps::move_if_near(i, k, static_cast<T>(list[e].distance), threshold, x, slot, near_sums,
                             s.near_gradient);
        row_part[i] += static_cast<double>(slot);
        columns.total[k] += static_cast<double>(slot);
      }
      T* row_sums = buffer(s.row_sums);
      for (Index i = 0; i < n; ++i) row_sums[i] = static_cast<T>(row_part[i] + columns.total[i]);
    }

    /// dX = scale 2 (diag(S 1) - S) X by the product, plus the near pairs by differences.
    void gradient(T scale, const MatrixView<T>& grad) {
      pairwise.gradient_from_symmetric_weights(weight, stride, scale, s.row_sums.data(0), grad);
      if (near_sums != nullptr) Sweeps::add_near_sums(near_sums, scale, grad);
    }
  };
};

}  // namespace detail
}  // namespace metricloss
