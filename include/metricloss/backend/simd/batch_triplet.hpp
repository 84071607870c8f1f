#pragma once
// The SIMD path of BatchTripletLoss: distances by one product on the centred batch
// (PairwiseDistances, backend/simd/pairwise.hpp), the shared mining
// (detail/batch_triplet_mining.hpp) with mined distances recomputed by differences, and
// dX = 2 (diag(S 1) - S) X through a weight sink (backend/simd/weight_sinks.hpp): by one
// product with close pairs by differences (all), or by differences (hard, semihard).
#include <metricloss/backend/simd/mining_scans.hpp>
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/backend/simd/rowops.hpp>
#include <metricloss/backend/simd/softplus.hpp>
#include <metricloss/backend/simd/weight_sinks.hpp>
#include <metricloss/batch_triplet.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/batch_triplet_mining.hpp>
#include <metricloss/detail/buffer.hpp>


namespace metricloss {
namespace detail {

/// The miner's kernels on this path: scans and soft-margin rows in lanes.
struct SimdMiningKernels {
  using RowOps = SimdRowOps;
  using Scans = SimdMiningScans;
  using SoftMargin = SimdSoftMargin;
  static constexpr bool soft_margin_lanes = true;
};

/// What the simd path keeps between calls (in the functor's slot).
template <class T>
struct SimdBatchTripletScratch : BackendSlot::Contents {
  LabelClasses classes;
  TripletMiner miner;
  PairwiseDistances<T> pairwise;            // distances and products
  GrowOnlyBuffer<T> norms;                  // N: ||x_i - mean||^2 (SplitWeights)
  GrowOnlyBuffer<double> direct_gradient;   // N x D: the terms applied by differences
  GrowOnlyBuffer<WeightEntry> entries;      // W's entries (SparseWeights)
};

/// The product's squared distances to select, differences for the loss.
template <class T>
struct ProductSquaredDistances {
  PairwiseDistances<T>* pairwise;
  const T* row(Index i) const { return pairwise->squared_row(i); }
  double exact(Index i, Index j) const { return pairwise->exact(i, j); }
  /// How far row(i)[j] may be from exact(i, j).
  double rounding(Index i, Index j) const { return pairwise->rounding_bound(i, j); }
  /// The row of the largest centred norm: rounding(i, widest()) bounds rounding(i, j).
  Index widest() const {
    const T* norms = pairwise->centred_norms();
    Index w = 0;
    for (Index j = 1; j < pairwise->size(); ++j)
      if (norms[j] > norms[w]) w = j;
    return w;
  }
};

template <class T>
struct Backend<BatchTripletLoss<T>, simd_tag> {
  template <class L>
  static T forward_backward(BatchTripletLoss<T>& loss, simd_tag, const MatrixView<const T>& x,
                            const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<SimdBatchTripletScratch<T>>(loss);
    T value;
    if (batch_triplet_not_finite(work.classes, x, labels, grad, value)) return value;
    work.pairwise.compute(x);
    if (loss.mining == Mining::all) {
      SplitWeights<T> weights;
      if (!grad.empty()) weights = SplitWeights<T>(work, x);
      return run(loss, work, weights, grad, top_diff);
    }
    SparseWeights<T> weights;
    if (!grad.empty()) weights = SparseWeights<T>(work, x);
    return run(loss, work, weights, grad, top_diff);
  }

 private:
  template <class Weights>
  static T run(BatchTripletLoss<T>& loss, SimdBatchTripletScratch<T>& work, Weights& weights,
               const MatrixView<T>& grad, T top_diff) {
    const MiningResult result = work.miner.template mine<SimdMiningKernels>(
        loss.mining, work.classes, ProductSquaredDistances<T>{&work.pairwise}, loss.margin,
        loss.distance, loss.soft_margin, weights);
    if (result.count == 0.0) {
      fill_rows(grad, T(0));
      return T(0);
    }
    if (!grad.empty())
      weights.gradient(work.pairwise, static_cast<double>(top_diff) / result.count, grad);
    return static_cast<T>(result.sum / result.count);
  }
};

}  // namespace detail
}  // namespace metricloss
