#pragma once
// Query x reference similarities S = Q R^T and the gradients that flow back through them:
// the similarity form of the batch core (backend/simd/cross.hpp is the distance form). A dot
// product has no offset to cancel, so the rows are used as given.
//
//   |fl(S_ij) - <q_i, r_j>| <= rounding_unit(d) ||q_i|| ||r_j||   (detail/numerics.hpp: the
//   product's bound per unit of n_i + n_j, and |<q, r>| <= ||q|| ||r|| <= (n_i + n_j) / 2)
//
// Gradients. For W_ij = dL/dS_ij (M x K): dQ = W R and dR = W^T Q, two products; the batch
// case (Q = R = X) is dX = (W + W^T) X, one.
#include <metricloss/backend/simd/exact.hpp>
#include <metricloss/backend/simd/products.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/views.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>

namespace metricloss {
namespace detail {

template <class T>
class CrossSimilarities {
 public:
  /// Fills the M x K similarities of the rows of q against the rows of r.
  void compute(const MatrixView<const T>& q, const MatrixView<const T>& r) {
    q_ = q;
    r_ = r;
    const Index m = q.rows, k = r.rows;
    stride_ = padded_stride<T>(k);
    T* values = similarity_.data(static_cast<std::size_t>(m * stride_));
    s_ = values;
    StridedMap<T> s(values, m, k, Eigen::OuterStride<>(stride_));
    product_into<T>(blocking_, map(q), map(r).transpose(), s);
    finish();
  }

  /// compute(x, x) for one batch: block rows of the lower triangle (the diagonal blocks
  /// whole), about half the product's FLOPs, then mirrored, so S is exactly symmetric.
  void compute_symmetric(const MatrixView<const T>& x) {
    q_ = r_ = x;
    const Index n = x.rows;
    stride_ = padded_stride<T>(n);
    T* values = similarity_.data(static_cast<std::size_t>(n * stride_));
    s_ = values;
    const auto rows = map(x);
    for (Index i0 = 0; i0 < n; i0 += symmetric_block) {
      const Index h = std::min(symmetric_block, n - i0);
      StridedMap<T> band(values + i0 * stride_, h, i0 + h, Eigen::OuterStride<>(stride_));
      product_into<T>(blocking_, rows.middleRows(i0, h), rows.topRows(i0 + h).transpose(), band);
    }
    StridedMap<T> s(values, n, n, Eigen::OuterStride<>(stride_));
    mirror_lower_triangle(s);
    finish(true);
  }

 private:
  /// Rows per band of compute_symmetric: the float kernel's 48-row register block
  /// (AVX-512). Measured 2026-12-04 (bench_batch_pair_losses, multi-similarity, D = 128):
  /// 48 and 128 rows alike, 256 (at N = 256 the whole product, mirrored) 7-35 % slower.
  static constexpr Index symmetric_block = 48;

  /// The norms (in double) and the rounding unit of the last compute; `same`: r is q.
  void finish(bool same = false) {
    const Index m = q_.rows, k = r_.rows;
    const MatrixView<const T> q = q_, r = r_;
    double* norms = norms_.data(static_cast<std::size_t>(m + k));
    n_ = norms;
    widest_ = 0.0;
    for (Index i = 0; i < m + k; ++i) {
      const T* row = i < m ? q.row(i) : r.row(i - m);
      norms[i] = same && i >= m ? norms[i - m] : std::sqrt(exact_dot(row, row, q.cols));
      if (i >= m) widest_ = std::max(widest_, norms[i]);
    }
    unit_ = product_rounding_unit<T>(q.cols);
  }

 public:
  const T* row(Index i) const { return s_ + i * stride_; }
  /// <q_i, r_j> in double.
  double exact(Index i, Index j) const { return exact_dot(q_.row(i), r_.row(j), q_.cols); }
  /// A bound on |row(i)[j] - exact(i, j)|, and on every j of row i.
  double rounding(Index i, Index j) const {
    return unit_ * n_[i] * n_[q_.rows + j];
  }
  double widest_rounding(Index i) const { return unit_ * n_[i] * widest_; }

  /// Row i of W (dL/dS), K entries; every row must be written before gradients().
  T* weight_row(Index i) {
    return weights_.data(static_cast<std::size_t>(q_.rows * stride_)) + i * stride_;
  }

  /// grad_q = W R and grad_r = W^T Q (either may be empty).
  void gradients(const MatrixView<T>& grad_q, const MatrixView<T>& grad_r) {
    const ConstStridedMap<T> w = weights();
    if (!grad_q.empty()) {
      StridedMap<T> out = staged(staging_, q_.rows, q_.cols);
      product_into<T>(blocking_, w, map(r_), out);
      copy_rows(out, grad_q);
    }
    if (!grad_r.empty()) {
      StridedMap<T> out = staged(staging_, r_.rows, r_.cols);
      product_into<T>(blocking_, w.transpose(), map(q_), out);
      copy_rows(out, grad_r);
    }
  }

  /// grad = (W + W^T) X for the batch case (q = r = x); W is destroyed.
  void symmetric_gradient(const MatrixView<T>& grad) {
    StridedMap<T> w(weight_row(0), q_.rows, r_.rows, Eigen::OuterStride<>(stride_));
    add_transpose_in_place(w);
    StridedMap<T> out = staged(staging_, q_.rows, q_.cols);
    product_into<T>(blocking_, w, map(q_), out);
    copy_rows(out, grad);
  }

 private:
  static ConstStridedMap<T> map(const MatrixView<const T>& m) {
    return ConstStridedMap<T>(m.data, m.rows, m.cols, Eigen::OuterStride<>(m.stride));
  }
  ConstStridedMap<T> weights() {
    return ConstStridedMap<T>(weight_row(0), q_.rows, r_.rows, Eigen::OuterStride<>(stride_));
  }

  MatrixView<const T> q_{}, r_{};
  Index stride_ = 0;
  double unit_ = 0.0, widest_ = 0.0;
  const T* s_ = nullptr;        // the similarities of the last compute()
  const double* n_ = nullptr;   // their rows' norms
  GrowOnlyBuffer<T> similarity_, weights_;
  GrowOnlyBuffer<double> norms_;  // ||q_i||, then ||r_j||
  AlignedBuffer<T> staging_;      // the gradient products, before they go to the caller
  GemmBlocking<T> blocking_;      // Eigen's packed panels
};

}  // namespace detail
}  // namespace metricloss
