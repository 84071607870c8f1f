#pragma once
// The reference path of BatchTripletLoss: exact distances by differences, the shared mining,
// and dL/dx_i = 2 sum_j S_ij (x_i - x_j) by loops, all in double. O(N^2 D).
#include <metricloss/backend/scalar/mining_scans.hpp>
#include <metricloss/backend/scalar/rowops.hpp>
#include <metricloss/batch_triplet.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/batch_triplet_mining.hpp>
#include <metricloss/detail/buffer.hpp>

#include <algorithm>

namespace metricloss {
namespace detail {

/// N x N squared distances, all of them exact.
struct ExactSquaredDistances {
  const double* squared;
  Index n;
  const double* row(Index i) const { return squared + i * n; }
  double exact(Index i, Index j) const { return squared[i * n + j]; }
  double rounding(Index, Index) const { return 0.0; }
  Index widest() const { return 0; }
};

/// W as a dense N x N matrix in double; empty when no gradient is wanted.
struct DenseWeights {
  double* weights;
  Index n;
  bool enabled() const { return weights != nullptr; }
  void add(Index i, Index j, double w) { weights[i * n + j] += w; }
  void add_row(Index i, const double* w, Index) {
    double* row = weights + i * n;
    for (Index j = 0; j < n; ++j) row[j] += w[j];
  }
};

/// grad_i = scale sum_{j != i} (W_ij + W_ji) (x_i - x_j) for a dense N x N W (dL/dD2 over
/// ordered pairs), by loops in double; `row` is D doubles of scratch.
template <class T>
void dense_weights_gradient(const MatrixView<const T>& x, const double* w, double scale,
                            double* row, const MatrixView<T>& grad) {
  const Index n = x.rows, d = x.cols;
  for (Index i = 0; i < n; ++i) {
    std::fill(row, row + d, 0.0);
    const T* xi = x.row(i);
    for (Index j = 0; j < n; ++j) {
      const double s = w[i * n + j] + w[j * n + i];
      if (s == 0.0 || j == i) continue;
      const T* xj = x.row(j);
      for (Index k = 0; k < d; ++k)
        row[k] += s * (static_cast<double>(xi[k]) - static_cast<double>(xj[k]));
    }
    T* out = grad.row(i);
    for (Index k = 0; k < d; ++k) out[k] = static_cast<T>(scale * row[k]);
  }
}

/// The miner's kernels on this path: plain loops, soft margin over double distances.
struct ScalarMiningKernels {
  using RowOps = ScalarRowOps;
  using Scans = ScalarMiningScans;
  static constexpr bool soft_margin_lanes = false;
};

/// What the scalar path keeps between calls (in the functor's slot).
struct ScalarBatchTripletScratch : BackendSlot::Contents {
  LabelClasses classes;
  TripletMiner miner;
  GrowOnlyBuffer<double> squared, weights;  // N x N: exact distances, W
  GrowOnlyBuffer<double> gradient_row;      // D: one row of dX in double
};

template <class T>
struct Backend<BatchTripletLoss<T>, scalar_tag> {
  template <class L>
  static T forward_backward(BatchTripletLoss<T>& loss, scalar_tag, const MatrixView<const T>& x,
                            const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<ScalarBatchTripletScratch>(loss);
    T value;
    if (batch_triplet_not_finite(work.classes, x, labels, grad, value)) return value;
    const Index n = x.rows, d = x.cols;
    double* squared = work.squared.data(static_cast<std::size_t>(n * n));
    for (Index i = 0; i < n; ++i) {
      squared[i * n + i] = 0.0;
      for (Index j = 0; j < i; ++j) {
        const double q = ScalarRowOps::squared_distance(x.row(i), x.row(j), d);
        squared[i * n + j] = q;
        squared[j * n + i] = q;
      }
    }
    DenseWeights weights{nullptr, n};
    if (!grad.empty()) {
      weights.weights = work.weights.data(static_cast<std::size_t>(n * n));
      std::fill(weights.weights, weights.weights + n * n, 0.0);
    }
    const MiningResult result = work.miner.template mine<ScalarMiningKernels>(
        loss.mining, work.classes, ExactSquaredDistances{squared, n}, loss.margin, loss.distance,
        loss.soft_margin, weights);
    if (result.count == 0.0) {
      fill_rows(grad, T(0));
      return T(0);
    }
    if (!grad.empty())
      dense_weights_gradient(x, weights.weights, 2.0 * static_cast<double>(top_diff) / result.count,
                             work.gradient_row.data(static_cast<std::size_t>(d)), grad);
    return static_cast<T>(result.sum / result.count);
  }
};

}  // namespace detail
}  // namespace metricloss
