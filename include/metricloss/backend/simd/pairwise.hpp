#pragma once
// Pairwise squared distances between the rows of one batch, and the gradient that flows
// back through them, for the SIMD path of the batch losses (batch triplet, lifted).
//
// Distances. D2_ij = n_i + n_j - 2 <xc_i, xc_j> on the batch centred at its mean
// (xc = x - mean, n_i = ||xc_i||^2), so that one GEMM-class product does the O(N^2 D) work.
// Centring removes a common offset (every coordinate ~ 100: ||x||^2 ~ 1e6 against
// distances ~ 1e-1) that would otherwise cancel every significant digit. The expansion
// still loses digits when D2_ij is small against n_i + n_j, so those entries are recomputed
// directly by differences; losses also recompute, with by_differences(), the distances that
// carry weight in their result (mined pairs, positive pairs).
//
// Gradient. For a loss L(D2) with W_ij = dL/dD2_ij (one entry per ordered pair),
//   dL/dx_i = 2 sum_j S_ij (x_i - x_j),  S = W + W^T,   i.e.  dX = 2 (diag(S 1) - S) X,
// one (N x N)(N x D) product. Rows of diag(S 1) - S sum to zero, so X may be replaced by the
// centred xc, which keeps the product free of the offset's cancellation too.
//
// Products run through Eigen in tiles whose packing buffers fit Eigen's stack-allocation
// limit, so that no call allocates once the workspace is warm (backend/simd/products.hpp).
#include <metricloss/backend/simd/centre.hpp>
#include <metricloss/backend/simd/exact.hpp>
#include <metricloss/backend/simd/lower_products.hpp>
#include <metricloss/backend/simd/products.hpp>
#include <metricloss/backend/simd/rowops.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/views.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>

namespace metricloss {
namespace detail {

template <class T>
class PairwiseDistances {
 public:
  /// Below this fraction of n_i + n_j a squared distance is recomputed by differences
  /// (detail/numerics.hpp).
  static constexpr double recompute_ratio = Numerics<T>::recompute_ratio;

  /// Row panel height of the product's tiles that reach the diagonal (compute_lower_rows):
  /// 16 to 48 timed alike at N = 256 and 1024, D = 128, float (AVX2, 2026-12-06), 12 % and
  /// 5 % faster batch-hard than whole 128-row tiles; Eigen packs the (short) panels fast.
  static constexpr Index diagonal_panel = 32;

  /// Fills squared() for the rows of x; the diagonal is exactly 0 and the matrix symmetric.
  void compute(const MatrixView<const T>& x) {
    compute_lower(x);
    StridedMap<T> sq(squared_.data(0), x.rows, x.rows, Eigen::OuterStride<>(stride_));
    mirror_lower_triangle(sq);
  }

  /// compute() without the mirror: only the lower triangle j < i of squared() (and its zero
  /// diagonal) is written, with the same values as compute(); the upper triangle is left as
  /// it was. For callers that sweep the triangle once (each unordered pair once).
  void compute_lower(const MatrixView<const T>& x) {
    compute_lower(x, [](Index) {});
  }

  /// compute_lower(), calling row_done(i) as soon as row i (j < i) is final, while the
  /// block of rows it belongs to is still in cache, in increasing i.
  template <class F>
  void compute_lower(const MatrixView<const T>& x, F&& row_done) {
    compute_lower_rows(x, 0, x.rows, row_done);
  }

  /// Rows [first, end) of the lower triangle only (j < i; the centring, norms and exact()
  /// over all of x): a band of the triangle, as the sharded statistics split it between
  /// ranks. squared_row(i) is row i for i in [first, end); squared() and the gradients need
  /// first = 0 and end = x.rows.
  template <class F>
  void compute_lower_rows(const MatrixView<const T>& x, Index first, Index end, F&& row_done) {
    x_ = x;
    first_ = first;
    const Index n = x.rows, d = x.cols;
    centre_rows<T>([&](Index i) { return x.row(i); }, n, d, mean_.data(static_cast<std::size_t>(d)),
                   centred_.data(static_cast<std::size_t>(n * d)), norms_.data(static_cast<std::size_t>(n)));
    stride_ = padded_stride<T>(end);
    const Index stride = stride_;
    T* squared = squared_.data(static_cast<std::size_t>((end - first) * stride));
    StridedMap<T> sq(squared, end - first, end, Eigen::OuterStride<>(stride));
    const ConstStridedMap<T> xc = centred();
    using batch = xsimd::batch<T>;
    constexpr Index lanes = static_cast<Index>(batch::size);
    const T* norms = norms_.data(static_cast<std::size_t>(x.rows));
    const T ratio = static_cast<T>(recompute_ratio);
    const auto fix = [&](Index i, Index j) {
      T& entry = squared[(i - first) * stride + j];
      const T scale = norms[i] + norms[j];
      T value = scale - T(2) * entry;
      if (!(value > ratio * scale)) value = static_cast<T>(by_differences(i, j));
      entry = value;
    };
    // Lower-triangular tiles of xc xc^T only: half the product's FLOPs. Each block row is
    // turned into D2 right after its tiles, while it is still in cache.
    const Index width = ProductTiles<T>::width(d), depth = ProductTiles<T>::depth(d);
    for (Index i0 = first; i0 < end; i0 += width) {
      const Index mi = std::min(width, end - i0);
      for (Index j0 = 0; j0 < i0 + mi - 1; j0 += width) {
        const Index nj = std::min(width, end - j0);
        // A tile that reaches the diagonal goes by row panels of `step` rows, each only as
        // wide as its last row needs: about half the tile's FLOPs, not all of them.
        const Index step = j0 + nj > i0 ? diagonal_panel : mi;
        for (Index r0 = i0; r0 < i0 + mi; r0 += step) {
          const Index mr = std::min(step, i0 + mi - r0);
          const Index nc = std::min(nj, r0 + mr - 1 - j0);
          if (nc <= 0) continue;
          auto tile = sq.block(r0 - first, j0, mr, nc);
          for (Index k0 = 0; k0 < d; k0 += depth) {
            const Index kk = std::min(depth, d - k0);
            if (k0 == 0)
              tile.noalias() = xc.block(r0, k0, mr, kk) * xc.block(j0, k0, nc, kk).transpose();
            else
              tile.noalias() += xc.block(r0, k0, mr, kk) * xc.block(j0, k0, nc, kk).transpose();
          }
        }
      }
      // D2 = n_i + n_j - 2 g_ij on the lower triangle, row by row in batches; the rare small
      // (or zero, negative, NaN) entries are recomputed by differences.
      for (Index i = i0; i < i0 + mi; ++i) {
        T* row = squared + (i - first) * stride;
        const batch norm_i(norms[i]);
        Index j = 0;
        for (; j + lanes <= i; j += lanes) {
          const batch scale = norm_i + batch::load_unaligned(norms + j);
          const batch value = scale - T(2) * batch::load_unaligned(row + j);
          if (xsimd::all(value > ratio * scale)) {
            value.store_unaligned(row + j);
          } else {
            for (Index k = j; k < j + lanes; ++k) fix(i, k);
          }
        }
        for (; j < i; ++j) fix(i, j);
        row[i] = T(0);
        row_done(i);
      }
    }
  }

  Index size() const { return x_.rows; }

  /// N x N squared distances of the last compute().
  StridedMap<T> squared() {
    const Index n = x_.rows;
    return StridedMap<T>(squared_.data(static_cast<std::size_t>(n * stride_)), n, n,
                         Eigen::OuterStride<>(stride_));
  }
  const T* squared_row(Index i) { return squared_.data(0) + (i - first_) * stride_; }

  /// The row stride of squared() and of the weights (padded_stride).
  Index stride() const { return stride_; }

  /// ||x_i - x_j||^2 by differences of the original rows: lane sums in T, totalled in
  /// double, so it errs by up to ~(d + 8) u_T of itself (SimdRowOps::sum_rounding_unit),
  /// free of the product's cancellation. Where that is not enough, backend/simd/exact.hpp.
  double by_differences(Index i, Index j) const {
    return SimdRowOps::squared_distance(x_.row(i), x_.row(j), x_.cols);
  }

  /// ||x_i - x_j||^2 with every difference and sum in double (backend/simd/exact.hpp): the
  /// backend's one exact squared distance, as CrossDistances::exact. Mining settles ties and
  /// the strict ">" of semihard on it, so a float batch selects what the scalar path and a
  /// reference set select (by_differences' float lane sums err by ~(d + 8) u_T: two
  /// negatives 3.5e-8 apart at D = 33 were picked the wrong way round).
  double exact(Index i, Index j) const {
    return exact_squared_distance(x_.row(i), x_.row(j), x_.cols);
  }

  /// A bound on |squared()(i, j) - ||x_i - x_j||^2| (detail/numerics.hpp).
  double rounding_bound(Index i, Index j) {
    const T* norms = norms_.data(0);
    return product_rounding_unit<T>(x_.cols) * (static_cast<double>(norms[i]) + static_cast<double>(norms[j]));
  }

  /// The squared norms n_i = ||xc_i||^2 of the centred rows of the last compute() (in T,
  /// as the expansion used them).
  const T* centred_norms() { return norms_.data(0); }

  /// N x N weight matrix W (dL/dD2_ij) as the last call left it, for a caller that writes
  /// every entry (saves zeroed_weights()'s pass over N^2).
  StridedMap<T> weights() {
    const Index n = x_.rows;
    return StridedMap<T>(weights_.data(static_cast<std::size_t>(n * stride_)), n, n, Eigen::OuterStride<>(stride_));
  }

  /// N x N weight matrix W (dL/dD2_ij), set to zero, for the caller to fill.
  StridedMap<T> zeroed_weights() {
    const Index n = x_.rows;
    StridedMap<T> w(weights_.data(static_cast<std::size_t>(n * stride_)), n, n, Eigen::OuterStride<>(stride_));
    w.setZero();
    return w;
  }

  /// grad = scale * 2 (diag(S 1) - S) X with S = W + W^T, W from zeroed_weights()
  /// (destroyed: it is symmetrised in place).
  void gradient_from_weights(T scale, const MatrixView<T>& grad) {
    const Index n = x_.rows, d = x_.cols;
    const Index stride = stride_;
    T* w = weights_.data(static_cast<std::size_t>(n * stride));
    T* row_sums = row_sums_.data(static_cast<std::size_t>(n));
    StridedMap<T> symmetric(w, n, n, Eigen::OuterStride<>(stride));
    add_transpose_in_place(symmetric);
    for (Index i = 0; i < n; ++i) w[i * stride + i] = T(0);  // cancels in diag(S 1) - S
    // Row sums: lane sums in T over blocks of 16 batches (no worse than the product's own
    // N-term sums in T), totalled in double.
    using batch = xsimd::batch<T>;
    constexpr Index lanes = static_cast<Index>(batch::size), block = 16 * lanes;
    for (Index i = 0; i < n; ++i) {
      const T* row = w + i * stride;
      double sum = 0.0;
      Index j = 0;
      while (j + lanes <= n) {
        batch partial(T(0));
        const Index end = std::min(n, j + block);
        for (; j + lanes <= end; j += lanes) partial += batch::load_unaligned(row + j);
        sum += static_cast<double>(xsimd::hadd(partial));
      }
      for (; j < n; ++j) sum += static_cast<double>(row[j]);
      row_sums[i] = static_cast<T>(sum);
    }
    const ConstStridedMap<T> s(w, n, n, Eigen::OuterStride<>(stride));
    StridedMap<T> out = staged(staging_, n, d);
    product_without_allocation<T>(s, centred(), out);  // out = S xc
    const ConstStridedMap<T> xc = centred();
    const T two_scale = T(2) * scale;
    for (Index i = 0; i < n; ++i)
      out.row(i) = two_scale * (row_sums[i] * xc.row(i) - out.row(i));
    copy_rows(out, grad);
  }

  /// grad = scale * 2 (diag(r) - S) X for a symmetric S whose strictly lower triangle the
  /// caller wrote into `w` (gradient_from_lower_weights, backend/simd/lower_products.hpp).
  void gradient_from_symmetric_weights(T* w, Index stride, T scale, const T* row_sums,
                                       const MatrixView<T>& grad) {
    StridedMap<T> out = staged(staging_, x_.rows, x_.cols);
    gradient_from_lower_weights(centred(), w, stride, scale, row_sums, out);
    copy_rows(out, grad);
  }

  /// The centred batch xc = x - mean (N x D, contiguous).
  ConstStridedMap<T> centred() {
    return ConstStridedMap<T>(centred_.data(static_cast<std::size_t>(x_.rows * x_.cols)), x_.rows,
                              x_.cols, Eigen::OuterStride<>(x_.cols));
  }

 private:
  MatrixView<const T> x_{};
  Index stride_ = 0;
  Index first_ = 0;  // the first row of squared() (compute_lower_rows)
  GrowOnlyBuffer<T> centred_, squared_, weights_, norms_, row_sums_;
  AlignedBuffer<T> staging_;  // the gradient products, before they go to the caller
  GrowOnlyBuffer<double> mean_;
};

}  // namespace detail
}  // namespace metricloss
