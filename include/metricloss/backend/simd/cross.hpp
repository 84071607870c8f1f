#pragma once
// Query x reference squared distances and the gradients that flow back through them, for
// the simd batch paths over a reference set (the rectangular form of
// backend/simd/pairwise.hpp's square, symmetric case Q = R = X).
//
// Distances. D2_ij = n_i + m_j - 2 <qc_i, rc_j>, with Q (M x D) and R (K x D) centred at one
// mean (of all M + K rows, in double) so that a common offset cancels before the product;
// entries below recompute_ratio (n_i + m_j) (small, zero, negative, NaN) are recomputed by
// differences of the original rows. |D2_ij - ||q_i - r_j||^2| <= rounding_unit(d) (n_i + m_j)
// (detail/numerics.hpp) elsewhere.
//
// Gradients. For W_ij = dL/dD2_ij (M x K), with dD2_ij/dq_i = 2 (q_i - r_j):
//   dQ = 2 (diag(W 1) Qc - W Rc),   dR = 2 (diag(W^T 1) Rc - W^T Qc),
// two products. Pairs with D2_ij < near_ratio (n_i + m_j) are taken out of W first and
// applied by differences in double, 2 W_ij (q_i - r_j), where the products would cancel.
#include <metricloss/backend/simd/centre.hpp>
#include <metricloss/backend/simd/exact.hpp>
#include <metricloss/backend/simd/pair_differences.hpp>
#include <metricloss/backend/simd/products.hpp>
#include <metricloss/backend/simd/triangle.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/prefetch.hpp>
#include <metricloss/detail/views.hpp>

#include <Eigen/Core>
#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cstddef>

namespace metricloss {
namespace detail {

template <class T>
class CrossDistances {
  using batch = xsimd::batch<T>;
  static constexpr Index width = static_cast<Index>(batch::size);

 public:
  /// Fills squared() for the rows of q against the rows of r (same number of columns).
  void compute(const MatrixView<const T>& q, const MatrixView<const T>& r) {
    q_ = q;
    r_ = r;
    const Index m = q.rows, k = r.rows;
    centre();
    stride_ = padded_stride<T>(k);
    T* squared = squared_.data(static_cast<std::size_t>(m * stride_));
    StridedMap<T> sq(squared, m, k, Eigen::OuterStride<>(stride_));
    product_into<T>(blocking_, query_centred(), reference_centred().transpose(), sq);
    const T* n = norms_.data(0);
    const T* mr = n + m;
    const T ratio = static_cast<T>(Numerics<T>::recompute_ratio);
    const batch ratio_lanes(ratio), two(T(2));
    for (Index i = 0; i < m; ++i) {
      T* row = squared + i * stride_;
      const batch ni(n[i]);
      Index j = 0;
      for (; j + width <= k; j += width) {
        const batch scale = ni + batch::load_unaligned(mr + j);
        const batch value = scale - two * batch::load_unaligned(row + j);
        value.store_unaligned(row + j);
        if (!xsimd::all(value > ratio_lanes * scale))  // rare: small, zero or NaN entries
          for (Index lane = j; lane < j + width; ++lane)
            if (!(row[lane] > ratio * (n[i] + mr[lane]))) row[lane] = static_cast<T>(exact(i, lane));
      }
      for (; j < k; ++j) {
        const T scale = n[i] + mr[j];
        const T value = scale - T(2) * row[j];
        row[j] = value > ratio * scale ? value : static_cast<T>(exact(i, j));
      }
    }
  }

  Index queries() const { return q_.rows; }
  Index references() const { return r_.rows; }

  /// M x K squared distances of the last compute(), rows stride() apart.
  StridedMap<T> squared() {
    return StridedMap<T>(squared_.data(0), q_.rows, r_.rows, Eigen::OuterStride<>(stride_));
  }
  const T* squared_row(Index i) { return squared_.data(0) + i * stride_; }
  Index stride() const { return stride_; }

  /// ||q_i - r_j||^2 by differences in double (backend/simd/exact.hpp).
  double exact(Index i, Index j) const { return exact_squared_distance(q_.row(i), r_.row(j), q_.cols); }

  /// Starts loading row j of R (what exact(i, j) reads) into cache.
  void prefetch_reference(Index j) const {
    const char* row = reinterpret_cast<const char*>(r_.row(j));
    const Index bytes = r_.cols * static_cast<Index>(sizeof(T));
    for (Index offset = 0; offset < bytes; offset += 64) prefetch_line(row + offset);
  }

  /// A bound on |squared()(i, j) - ||q_i - r_j||^2| (detail/numerics.hpp).
  double rounding_bound(Index i, Index j) {
    const T* n = norms_.data(0);
    return product_rounding_unit<T>(q_.cols) *
           (static_cast<double>(n[i]) + static_cast<double>(n[q_.rows + j]));
  }

  /// The centred rows' squared norms: Q's M, then R's K.
  const T* centred_norms() { return norms_.data(0); }

  /// The row of R with the largest centred norm: rounding_bound(i, widest_reference())
  /// bounds rounding_bound(i, j) for every j.
  Index widest_reference() {
    const T* m = norms_.data(0) + q_.rows;
    Index w = 0;
    for (Index j = 1; j < r_.rows; ++j)
      if (m[j] > m[w]) w = j;
    return w;
  }

  /// M x K weights W (dL/dD2_ij), set to zero, for the caller to fill.
  StridedMap<T> zeroed_weights() {
    StridedMap<T> w(weights_.data(static_cast<std::size_t>(q_.rows * stride_)), q_.rows, r_.rows,
                    Eigen::OuterStride<>(stride_));
    w.setZero();
    return w;
  }

  /// M x K weights W, unset: for a caller that writes every entry.
  StridedMap<T> weights_to_fill() {
    return StridedMap<T>(weights_.data(static_cast<std::size_t>(q_.rows * stride_)), q_.rows, r_.rows,
                         Eigen::OuterStride<>(stride_));
  }

  /// The weights of the last zeroed_weights(), as the caller left them.
  StridedMap<T> weights() {
    return StridedMap<T>(weights_.data(0), q_.rows, r_.rows, Eigen::OuterStride<>(stride_));
  }

  /// grad_q = scale dQ and grad_r = scale dR (either may be empty) from W of
  /// zeroed_weights() or weights_to_fill(), which this destroys (its near pairs are taken out).
  void gradients(T scale, const MatrixView<T>& grad_q, const MatrixView<T>& grad_r) {
    const Index m = q_.rows, k = r_.rows, d = q_.cols;
    T* w = weights_.data(0);
    double* near_q = near_.data(static_cast<std::size_t>((m + k) * d));
    double* near_r = near_q + m * d;
    std::fill(near_q, near_q + (m + k) * d, 0.0);
    double* row_sums = sums_.data(static_cast<std::size_t>(m));
    ColumnSums<T> columns(partial_, column_sums_, k);
    const T* n = norms_.data(0);
    const T* sq = squared_.data(0);
    const T near_ratio = static_cast<T>(Numerics<T>::near_ratio);  // 2^-10: exact scaling
    // Row sums in T lanes over blocks of `block` batches, totalled in double; column sums in
    // T lanes, flushed to double every 32 rows (ColumnSums).
    constexpr Index block = 32;
    T* partial = columns.partial;
    const batch zero(T(0)), near_lanes(near_ratio);
    for (Index i = 0; i < m; ++i) {
      T* wrow = w + i * stride_;
      const T* sqrow = sq + i * stride_;
      const batch ni(n[i]);
      double row_total = 0.0;
      Index j = 0;
      while (j + width <= k) {
        batch lanes(T(0));
        for (Index b = 0; b < block && j + width <= k; ++b, j += width) {
          batch wij = batch::load_unaligned(wrow + j);
          const auto near = batch::load_unaligned(sqrow + j) < near_lanes * (ni + batch::load_unaligned(n + m + j));
          if (xsimd::any(near & (wij != zero))) {  // rare: pairs the products would cancel
            for (Index lane = j; lane < j + width; ++lane) take_out_if_near(i, lane, near_ratio, near_q, near_r);
            wij = batch::load_unaligned(wrow + j);
          }
          lanes += wij;
          (batch::load_unaligned(partial + j) + wij).store_unaligned(partial + j);
        }
        row_total += static_cast<double>(xsimd::hadd(lanes));
      }
      for (; j < k; ++j) {
        take_out_if_near(i, j, near_ratio, near_q, near_r);
        row_total += static_cast<double>(wrow[j]);
        partial[j] += wrow[j];
      }
      row_sums[i] = row_total;
      columns.rectangle_row_done(i);
    }
    columns.finish();
    const ConstStridedMap<T> weights(w, m, k, Eigen::OuterStride<>(stride_));
    const T two_scale = T(2) * scale;
    if (!grad_q.empty()) {
      StridedMap<T> out = staged(staging_, m, d);
      product_into<T>(blocking_, weights, reference_centred(), out);  // W Rc
      finish_cross_gradient(out, query_centred(), row_sums, near_q, two_scale, scale);
      copy_rows(out, grad_q);
    }
    if (!grad_r.empty()) {
      StridedMap<T> out = staged(staging_, k, d);
      product_into<T>(blocking_, weights.transpose(), query_centred(), out);  // W^T Qc
      finish_cross_gradient(out, reference_centred(), columns.total, near_r, two_scale, scale);
      copy_rows(out, grad_r);
    }
  }

  /// The centred rows: Q's and R's, contiguous (M + K) x D, Q first.
  ConstStridedMap<T> query_centred() {
    return ConstStridedMap<T>(centred_.data(0), q_.rows, q_.cols, Eigen::OuterStride<>(q_.cols));
  }
  ConstStridedMap<T> reference_centred() {
    return ConstStridedMap<T>(centred_.data(0) + q_.rows * q_.cols, r_.rows, r_.cols,
                              Eigen::OuterStride<>(r_.cols));
  }

 private:
  /// W_ij, when (i, j) is a near pair (D2_ij < near_ratio (n_i + m_j)), applied by
  /// differences into the near rows and set to 0.
  void take_out_if_near(Index i, Index j, T near_ratio, double* near_q, double* near_r) {
    T& wij = weights_.data(0)[i * stride_ + j];
    const T* n = norms_.data(0);
    if (wij == T(0) || !(squared_.data(0)[i * stride_ + j] < near_ratio * (n[i] + n[q_.rows + j]))) return;
    const Index d = q_.cols;
    add_cross_difference(near_q + i * d, near_r + j * d, q_.row(i), r_.row(j), d, 2.0 * static_cast<double>(wij));
    wij = T(0);
  }

  /// Q and R at one mean (of all M + K rows).
  void centre() {
    const Index m = q_.rows, k = r_.rows, d = q_.cols;
    centre_rows<T>([&](Index i) { return i < m ? q_.row(i) : r_.row(i - m); }, m + k, d,
                   mean_.data(static_cast<std::size_t>(d)),
                   centred_.data(static_cast<std::size_t>((m + k) * d)),
                   norms_.data(static_cast<std::size_t>(m + k)));
  }

  MatrixView<const T> q_{}, r_{};
  Index stride_ = 0;
  GrowOnlyBuffer<T> centred_, squared_, weights_, norms_;  // norms: Q's M, then R's K
  GrowOnlyBuffer<T> partial_;                              // K: ColumnSums' lanes
  GrowOnlyBuffer<double> mean_, sums_, column_sums_, near_;  // sums_: M row sums
  AlignedBuffer<T> staging_;  // the gradient products, before they go to the caller
  GemmBlocking<T> blocking_;  // Eigen's packed panels of the three products
};

}  // namespace detail
}  // namespace metricloss
