#pragma once
// The SIMD path of the batch losses over queries Q against a reference set R
// (<metricloss/reference.hpp>): Q x R distances by one product on the jointly centred rows,
// recomputed by differences where the product cancels (CrossDistances, backend/simd/cross.hpp),
// the shared mining on CrossClasses with mined distances recomputed by differences, and
//   dQ = 2 (diag(W 1) Qc - W Rc),   dR = 2 (diag(W^T 1) Rc - W^T Qc)
// by two products with near pairs by differences (all), or W as a list of entries applied by
// differences in double (hard, semihard). O(N_q N_r D); no R x R matrix.
#include <metricloss/backend/simd/batch_triplet.hpp>
#include <metricloss/backend/simd/cross.hpp>
#include <metricloss/backend/simd/weight_sinks.hpp>
#include <metricloss/batch_triplet.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/batch_triplet_mining.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/cross_classes.hpp>
#include <metricloss/reference.hpp>

#include <algorithm>
#include <limits>

namespace metricloss {
namespace detail {

/// What the simd reference-set path keeps between calls (in the functor's slot).
template <class T>
struct SimdReferenceScratch : BackendSlot::Contents {
  CrossClasses classes;
  TripletMiner miner;
  CrossDistances<T> cross;
  GrowOnlyBuffer<WeightEntry> entries;  // W's entries (hard, semihard)
  GrowOnlyBuffer<double> sums;          // (N_q + N_r) x D: the entries' gradient in double
};

/// The product's Q x R squared distances to select, differences for the loss.
template <class T>
struct CrossProductDistances {
  CrossDistances<T>* cross;
  Index widest_row;
  const T* row(Index i) const { return cross->squared_row(i); }
  double exact(Index i, Index j) const { return cross->exact(i, j); }
  double rounding(Index i, Index j) const { return cross->rounding_bound(i, j); }
  Index widest() const { return widest_row; }
  void prefetch(Index, Index j) const { cross->prefetch_reference(j); }
};

/// W dense in T, in CrossDistances' weights (Mining::all); its near pairs are applied by
/// differences when CrossDistances::gradients takes them out.
template <class T>
struct CrossDenseWeights {
  T* w = nullptr;
  Index stride = 0;
  bool enabled() const { return w != nullptr; }
  void add(Index i, Index j, double v) { w[i * stride + j] += static_cast<T>(v); }
  void add_row(Index i, const double* v, Index n) {
    T* row = w + i * stride;
    for (Index j = 0; j < n; ++j) row[j] += static_cast<T>(v[j]);
  }
  void add_row_lanes(Index i, const T* v, Index n) {
    T* row = w + i * stride;
    for (Index j = 0; j < n; ++j) row[j] += v[j];
  }
};

/// W as a list of entries (hard, semihard: two per mined term).
template <class T>
struct CrossSparseWeights {
  GrowOnlyBuffer<WeightEntry>* entries = nullptr;
  Index count = 0;
  bool enabled() const { return entries != nullptr; }
  void add(Index i, Index j, double v) {
    entries->data(static_cast<std::size_t>(count + 1))[count] = WeightEntry{i, j, v};
    ++count;
  }
  void add_row(Index i, const double* v, Index n) {
    for (Index j = 0; j < n; ++j)
      if (v[j] != 0.0) add(i, j, v[j]);
  }
  void add_row_lanes(Index i, const T* v, Index n) {
    for (Index j = 0; j < n; ++j)
      if (v[j] != T(0)) add(i, j, static_cast<double>(v[j]));
  }

  /// grad_q = scale sum 2 w (q_i - r_j), grad_r = -the same per r_j, totalled in double
  /// (sums only for the gradients asked for: R may be a memory of 10^5 rows).
  void gradients(GrowOnlyBuffer<double>& storage, const MatrixView<const T>& q,
                 const MatrixView<const T>& r, double scale, const MatrixView<T>& grad_q,
                 const MatrixView<T>& grad_r) const {
    const Index d = q.cols;
    const Index nq = grad_q.empty() ? 0 : q.rows, nr = grad_r.empty() ? 0 : r.rows;
    double* sum_q = storage.data(static_cast<std::size_t>((nq + nr) * d + 2 * d));
    double* sum_r = sum_q + nq * d;
    double* discard = sum_r + nr * d;  // 2 d: the half of a term whose gradient is skipped
    std::fill(sum_q, sum_q + (nq + nr) * d, 0.0);
    const WeightEntry* list = entries->data(0);
    for (Index e = 0; e < count; ++e)
      add_cross_pair_by_differences(nq > 0 ? sum_q + list[e].i * d : discard,
                                    nr > 0 ? sum_r + list[e].j * d : discard + d,
                                    q.row(list[e].i), r.row(list[e].j), d, list[e].w);
    if (!grad_q.empty()) write_scaled_rows(sum_q, scale, grad_q);
    if (!grad_r.empty()) write_scaled_rows(sum_r, scale, grad_r);
  }
};

template <class T>
struct ReferenceBackend<BatchTripletLoss<T>, simd_tag> {
  static constexpr bool available = true;

  template <class L, class LR>
  static T forward_backward(BatchTripletLoss<T>& loss, simd_tag, const MatrixView<const T>& q,
                            const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                            const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
    auto& work = scratch_of<SimdReferenceScratch<T>>(loss);
    if (reference_not_finite(work.classes, q, labels, ref, grad_q, grad_r))
      return std::numeric_limits<T>::quiet_NaN();
    work.cross.compute(q, ref.r);
    const CrossProductDistances<T> distances{&work.cross, work.cross.widest_reference()};
    const bool gradient = !grad_q.empty() || !grad_r.empty();
    MiningResult result;
    if (loss.mining == Mining::all) {
      CrossDenseWeights<T> weights;
      if (gradient) weights = {work.cross.zeroed_weights().data(), work.cross.stride()};
      result = mine(loss, work, distances, weights);
      if (result.count != 0.0 && gradient)
        work.cross.gradients(static_cast<T>(static_cast<double>(top_diff) / result.count), grad_q,
                             grad_r);
    } else {
      CrossSparseWeights<T> weights;
      if (gradient) weights.entries = &work.entries;
      result = mine(loss, work, distances, weights);
      if (result.count != 0.0 && gradient)
        weights.gradients(work.sums, q, ref.r, static_cast<double>(top_diff) / result.count,
                          grad_q, grad_r);
    }
    if (result.count == 0.0) {
      fill_rows(grad_q, T(0));
      fill_rows(grad_r, T(0));
      return T(0);
    }
    return static_cast<T>(result.sum / result.count);
  }

 private:
  template <class Weights>
  static MiningResult mine(BatchTripletLoss<T>& loss, SimdReferenceScratch<T>& work,
                           const CrossProductDistances<T>& distances, Weights& weights) {
    return work.miner.template mine<SimdMiningKernels>(loss.mining, work.classes, distances,
                                                       loss.margin, loss.distance,
                                                       loss.soft_margin, weights);
  }
};

}  // namespace detail
}  // namespace metricloss
