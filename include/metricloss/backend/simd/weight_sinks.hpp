#pragma once
// Weight sinks of the simd batch paths: where a batch loss puts W_ij = dL/dD2_ij as it finds
// them, and how each turns W into dX = 2 (diag(S 1) - S) X, S = W + W^T.
//   SplitWeights   dense W in T for the product (PairwiseDistances::gradient_from_weights),
//                  except near pairs, applied by differences in double;
//   SparseWeights  a list of entries, applied by differences in double (few entries);
//   DirectWeights  each entry applied by differences in double as it comes (a W with few
//                  nonzero entries, written row by row: no list, no N x N buffer).
// All: enabled(), add(i, j, w), add_row(i, w, n), add_row_lanes(i, w, n) (w in T),
// gradient(pairwise, scale, grad).
#include <metricloss/backend/simd/pair_differences.hpp>
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/views.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>

namespace metricloss {
namespace detail {

/// One entry of a sparse W (hard and semihard).
struct WeightEntry {
  Index i, j;
  double w;
};

/// W for the product (in T), except for pairs close against their norms about the batch
/// mean (||x_i - x_j||^2 <= ratio (n_i + n_j), the pairs whose distances PairwiseDistances
/// recomputes): in diag(S 1) X - S X their term would cancel to rounding noise (and in
/// Euclidean 1/(2d) may not fit in T), so they add 2 w (x_i - x_j) by differences in double.
template <class T>
class SplitWeights {
 public:
  SplitWeights() = default;
  /// From a scratch holding pairwise (computed for x), norms and direct_gradient.
  template <class Scratch>
  SplitWeights(Scratch& work, const MatrixView<const T>& x)
      : x_(x), n_(x.rows), stride_(work.pairwise.stride()) {
    PairwiseDistances<T>& pairwise = work.pairwise;
    weights_ = pairwise.zeroed_weights().data();
    squared_ = pairwise.squared_row(0);
    T* norms = work.norms.data(static_cast<std::size_t>(n_));
    const auto centred = pairwise.centred();
    for (Index i = 0; i < n_; ++i) {
      double norm = 0.0;
      for (Index k = 0; k < x.cols; ++k) {
        const double v = static_cast<double>(centred(i, k));
        norm += v * v;
      }
      norms[i] = static_cast<T>(norm);
    }
    norms_ = norms;
    direct_storage_ = &work.direct_gradient;
  }

  bool enabled() const { return weights_ != nullptr; }

  void add(Index i, Index j, double w) {
    if (far(i, j)) {
      weights_[i * stride_ + j] += static_cast<T>(w);
      return;
    }
    add_by_differences(i, j, w);
  }

  /// add(i, j, w[j]) for j < n: the far pairs in one branch-free pass, then the close ones.
  /// Reads the distances of row i only below n (a caller with the lower triangle passes
  /// n = i).
  void add_row(Index i, const double* w, Index n) {
    // Restrict: the row of W, the distances and the norms never alias (and the loop
    // vectorises only if the compiler knows).
    T* __restrict row = weights_ + i * stride_;
    const T* __restrict squared = squared_ + i * stride_;
    const T* __restrict norms = norms_;
    const T bound = norms_[i];
    // Whether any close pair has a weight: usually none, and the second pass (a branch per
    // entry) is skipped.
    int close = 0;
    for (Index j = 0; j < n; ++j) {
      const bool far_pair = squared[j] > ratio * (bound + norms[j]);
      row[j] += far_pair ? static_cast<T>(w[j]) : T(0);
      close |= static_cast<int>(!far_pair & (w[j] != 0.0));
    }
    if (close == 0) return;
    for (Index j = 0; j < n; ++j)
      if (!far(i, j) && w[j] != 0.0) add_by_differences(i, j, w[j]);
  }

  /// add_row with w in T (Mining::all with soft_margin in lanes): the far pairs in
  /// batches, the close ones (rare) by differences where their weight is not 0.
  void add_row_lanes(Index i, const T* w, Index) {
    using batch = xsimd::batch<T>;
    constexpr Index width = static_cast<Index>(batch::size);
    T* row = weights_ + i * stride_;
    const T* squared = squared_ + i * stride_;
    const batch bound(norms_[i]), scale(ratio), zero(T(0));
    Index j = 0;
    for (; j + width <= n_; j += width) {
      const batch wj = batch::load_unaligned(w + j);
      const auto far_lanes =
          batch::load_unaligned(squared + j) > scale * (bound + batch::load_unaligned(norms_ + j));
      (batch::load_unaligned(row + j) + xsimd::select(far_lanes, wj, zero)).store_unaligned(row + j);
      if (!xsimd::all(far_lanes | (wj == zero)))
        for (Index r = j; r < j + width; ++r)
          if (!far(i, r) && w[r] != T(0)) add_by_differences(i, r, static_cast<double>(w[r]));
    }
    for (; j < n_; ++j) {
      if (far(i, j)) row[j] += w[j];
      else if (w[j] != T(0)) add_by_differences(i, j, static_cast<double>(w[j]));
    }
  }

  /// grad = scale (2 (diag(S 1) - S) X + the close pairs' terms).
  void gradient(PairwiseDistances<T>& pairwise, double scale, const MatrixView<T>& grad) const {
    pairwise.gradient_from_weights(static_cast<T>(scale), grad);
    if (!direct_) return;
    for (Index i = 0; i < n_; ++i) {
      T* out = grad.row(i);
      const double* in = direct_ + i * x_.cols;
      for (Index k = 0; k < x_.cols; ++k)
        out[k] = static_cast<T>(static_cast<double>(out[k]) + scale * in[k]);
    }
  }

 private:
  bool far(Index i, Index j) const { return squared_[i * stride_ + j] > ratio * (norms_[i] + norms_[j]); }

  void add_by_differences(Index i, Index j, double w) {
    const Index d = x_.cols;
    if (!direct_) {
      direct_ = direct_storage_->data(static_cast<std::size_t>(n_ * d));
      std::fill(direct_, direct_ + n_ * d, 0.0);
    }
    add_pair_by_differences(direct_, x_, i, j, w);
  }

 private:
  static constexpr T ratio = static_cast<T>(PairwiseDistances<T>::recompute_ratio);
  MatrixView<const T> x_{};
  Index n_ = 0, stride_ = 0;  // rows of W and of the distances are stride_ apart
  T* weights_ = nullptr;
  const T* squared_ = nullptr;
  const T* norms_ = nullptr;
  GrowOnlyBuffer<double>* direct_storage_ = nullptr;
  double* direct_ = nullptr;
};

/// W as a list of its entries, for hard and semihard (two per mined triplet, O(N c) in
/// all): 2 w (x_i - x_j) by differences of the original rows in double lanes, O(entries D),
/// where the dense W would cost an N x N fill, a transposed pass and an (N x N)(N x D)
/// product, and would cancel for close pairs.
template <class T>
class SparseWeights {
 public:
  SparseWeights() = default;
  /// From a scratch holding entries and direct_gradient.
  template <class Scratch>
  SparseWeights(Scratch& work, const MatrixView<const T>& x)
      : x_(x), entries_(&work.entries), accumulated_(&work.direct_gradient) {}

  bool enabled() const { return entries_ != nullptr; }

  void add(Index i, Index j, double w) {
    WeightEntry* list = entries_->data(static_cast<std::size_t>(count_ + 1));
    list[count_++] = WeightEntry{i, j, w};
  }

  /// Not taken by hard and semihard (which add single entries); correct for any W.
  void add_row(Index i, const double* w, Index n) {
    for (Index j = 0; j < n; ++j)
      if (w[j] != 0.0) add(i, j, w[j]);
  }
  void add_row_lanes(Index i, const T* w, Index n) {
    for (Index j = 0; j < n; ++j)
      if (w[j] != T(0)) add(i, j, static_cast<double>(w[j]));
  }

  /// grad = scale sum over entries of 2 w (e_i - e_j)(x_i - x_j)^T, totalled in double.
  void gradient(PairwiseDistances<T>&, double scale, const MatrixView<T>& grad) const {
    const Index n = x_.rows, d = x_.cols;
    double* sum = accumulated_->data(static_cast<std::size_t>(n * d));
    std::fill(sum, sum + n * d, 0.0);
    const WeightEntry* list = entries_->data(0);
    for (Index e = 0; e < count_; ++e) add_pair_by_differences(sum, x_, list[e].i, list[e].j, list[e].w);
    write_scaled_rows(sum, scale, grad);
  }

 private:
  MatrixView<const T> x_{};
  GrowOnlyBuffer<WeightEntry>* entries_ = nullptr;
  GrowOnlyBuffer<double>* accumulated_ = nullptr;
  Index count_ = 0;
};

/// W applied entry by entry as the rows come: 2 w (x_i - x_j) by differences of the original
/// rows in double lanes, O(nonzero entries D). For a W whose nonzero entries are few against
/// N^2 (batch contrastive once most hinges are inactive), where a dense sink would spend an
/// N x N fill, a transposed pass and an (N x N)(N x D) product on zeros. Exact for close
/// pairs too (no product to cancel in).
template <class T>
class DirectWeights {
 public:
  DirectWeights() = default;
  /// Accumulates into `sum` (N x D doubles, zeroed here).
  DirectWeights(GrowOnlyBuffer<double>& sum, const MatrixView<const T>& x)
      : x_(x), sum_(sum.data(static_cast<std::size_t>(x.rows * x.cols))) {
    std::fill(sum_, sum_ + x.rows * x.cols, 0.0);
  }

  bool enabled() const { return sum_ != nullptr; }

  void add(Index i, Index j, double w) { add_pair_by_differences(sum_, x_, i, j, w); }
  void add_row(Index i, const double* w, Index n) {
    for (Index j = 0; j < n; ++j)
      if (w[j] != 0.0) add(i, j, w[j]);
  }
  void add_row_lanes(Index i, const T* w, Index n) {
    for (Index j = 0; j < n; ++j)
      if (w[j] != T(0)) add(i, j, static_cast<double>(w[j]));
  }

  /// grad = scale sum over entries of 2 w (e_i - e_j)(x_i - x_j)^T, totalled in double.
  void gradient(PairwiseDistances<T>&, double scale, const MatrixView<T>& grad) const {
    write_scaled_rows(sum_, scale, grad);
  }

 private:
  MatrixView<const T> x_{};
  double* sum_ = nullptr;
};

}  // namespace detail
}  // namespace metricloss
