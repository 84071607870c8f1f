#pragma once
// The scalar reference of the lifted structured loss: the factorisation of
// <metricloss/lifted_structure.hpp> with exact distances by differences and plain loops,
// everything in double. O(N^2 D); the reference the SIMD path is tested against.
#include <metricloss/backend/scalar/rowops.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/lifted_structure.hpp>

#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

/// What the scalar path keeps between calls (in the functor's slot).
struct ScalarLiftedScratch : BackendSlot::Contents {
  LabelClasses classes;
  GrowOnlyBuffer<double> distance, weight;  // N x N: D, W
  GrowOnlyBuffer<double> log_normaliser, min_distance, shifted_sum, coefficient;  // N
  GrowOnlyBuffer<double> gradient_row;  // D: one row of dX in double
};

template <class T>
struct Backend<LiftedStructureLoss<T>, scalar_tag> {
  template <class L>
  static T forward_backward(LiftedStructureLoss<T>& loss, scalar_tag, const MatrixView<const T>& x,
                            const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff) {
    auto& scratch = scratch_of<ScalarLiftedScratch>(loss);
    double value = 0.0;
    if (lifted_trivial_case(scratch.classes, labels, all_finite(x), grad, value))
      return static_cast<T>(value);
    const LabelClasses& classes = scratch.classes;
    const Index n = x.rows, d = x.cols;
    const auto nn = static_cast<std::size_t>(n * n);
    const double margin = loss.margin;
    const auto negative = [&](Index i, Index k) { return classes.class_of(k) != classes.class_of(i); };

    double* distance = scratch.distance.data(nn);
    for (Index i = 0; i < n; ++i) {
      distance[i * n + i] = 0.0;
      for (Index k = 0; k < i; ++k) {
        const double dik = std::sqrt(ScalarRowOps::squared_distance(x.row(i), x.row(k), d));
        distance[i * n + k] = dik;
        distance[k * n + i] = dik;
      }
    }

    // a_i, shifted by the nearest negative.
    double* log_normaliser = scratch.log_normaliser.data(static_cast<std::size_t>(n));
    double* min_distance = scratch.min_distance.data(static_cast<std::size_t>(n));
    double* shifted_sum = scratch.shifted_sum.data(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) {
      const double* row = distance + i * n;
      double nearest = std::numeric_limits<double>::infinity();
      for (Index k = 0; k < n; ++k)
        if (negative(i, k)) nearest = std::min(nearest, row[k]);
      double sum = 0.0;
      for (Index k = 0; k < n; ++k)
        if (negative(i, k)) sum += std::exp(nearest - row[k]);
      min_distance[i] = nearest;
      shifted_sum[i] = sum;
      log_normaliser[i] = lifted_log_normaliser(margin, nearest, sum);
    }

    // Positive pairs: the loss, c_i, and the positive weights W_ij (i < j).
    const bool gradient = !grad.empty();
    double* coefficient = scratch.coefficient.data(static_cast<std::size_t>(n));
    std::fill(coefficient, coefficient + n, 0.0);
    double* weight = gradient ? scratch.weight.data(nn) : nullptr;
    if (gradient) std::fill(weight, weight + nn, 0.0);
    double sum = 0.0;
    classes.for_each_positive_pair([&](Index i, Index j) {
      const double dij = distance[i * n + j];
      const LiftedPair pair = lifted_pair(log_normaliser[i], log_normaliser[j], dij);
      sum += pair.hinge * pair.hinge;
      if (!gradient) return;
      coefficient[i] += pair.hinge * pair.share_i;
      coefficient[j] += pair.hinge * pair.share_j;
      weight[i * n + j] = weight_on_squared(pair.hinge, dij);
    });
    const auto pairs = static_cast<double>(classes.positive_pairs());
    if (!gradient) return static_cast<T>(sum / (2.0 * pairs));

    // Negative weights W_ik = -c_i p_ik / (2 D_ik).
    for (Index i = 0; i < n; ++i) {
      if (coefficient[i] == 0.0) continue;
      const double row_factor = -coefficient[i] / shifted_sum[i];
      for (Index k = 0; k < n; ++k)
        if (negative(i, k)) {
          const double dik = distance[i * n + k];
          weight[i * n + k] =
              lifted_negative_weight(row_factor, std::exp(min_distance[i] - dik), dik);
        }
    }

    // dL/dx_i = 2/|P| sum_k (W_ik + W_ki) (x_i - x_k), by differences.
    const double scale = 2.0 * static_cast<double>(top_diff) / pairs;
    double* row = scratch.gradient_row.data(static_cast<std::size_t>(d));
    for (Index i = 0; i < n; ++i) {
      std::fill(row, row + d, 0.0);
      const T* xi = x.row(i);
      for (Index k = 0; k < n; ++k) {
        const double s = weight[i * n + k] + weight[k * n + i];
        if (k == i || s == 0.0) continue;
        const T* xk = x.row(k);
        for (Index c = 0; c < d; ++c)
          row[c] += s * (static_cast<double>(xi[c]) - static_cast<double>(xk[c]));
      }
      T* out = grad.row(i);
      for (Index c = 0; c < d; ++c) out[c] = static_cast<T>(scale * row[c]);
    }
    return static_cast<T>(sum / (2.0 * pairs));
  }

};

}  // namespace detail
}  // namespace metricloss
