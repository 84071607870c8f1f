#pragma once
// Eigen products of the simd batch paths without heap allocation, and the layout of their
// N x N matrices (padded rows, tiled transposed passes).
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/types.hpp>

#include <Eigen/Core>

#include <algorithm>

namespace metricloss {
namespace detail {

template <class T>
using StridedMap = Eigen::Map<RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using ConstStridedMap = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Depth and width of product tiles: each of Eigen's packed panels (depth x width) stays
/// within its stack-allocation limit, so Eigen never calls malloc.
template <class T>
struct ProductTiles {
  static constexpr Index bytes = EIGEN_STACK_ALLOCATION_LIMIT / 2;
  static Index depth(Index k) { return std::min<Index>(k, 256); }
  static Index width(Index k) {
    const Index w = bytes / static_cast<Index>(sizeof(T)) / std::max<Index>(depth(k), 1);
    return std::max<Index>(16, w / 16 * 16);
  }
};

/// C = A B (or C += A B when `accumulate`), (m x k)(k x n), computed tile by tile without
/// heap allocation.
template <class T, class DA, class DB, class DC>
void product_without_allocation(const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b,
                                const Eigen::MatrixBase<DC>& c_out, bool accumulate = false) {
  auto& c = const_cast<Eigen::MatrixBase<DC>&>(c_out);
  const Index m = a.rows(), k = a.cols(), n = b.cols();
  const Index depth = ProductTiles<T>::depth(k), width = ProductTiles<T>::width(k);
  for (Index i0 = 0; i0 < m; i0 += width) {
    const Index mi = std::min(width, m - i0);
    for (Index j0 = 0; j0 < n; j0 += width) {
      const Index nj = std::min(width, n - j0);
      auto tile = c.block(i0, j0, mi, nj);
      for (Index k0 = 0; k0 < k; k0 += depth) {
        const Index kk = std::min(depth, k - k0);
        if (k0 == 0 && !accumulate)
          tile.noalias() = a.block(i0, k0, mi, kk) * b.block(k0, j0, kk, nj);
        else
          tile.noalias() += a.block(i0, k0, mi, kk) * b.block(k0, j0, kk, nj);
      }
    }
  }
}

/// Eigen's cache blocking of one product, its packed panels in buffers we own, so that a
/// large product runs as one call without heap allocation. product_without_allocation's
/// tiles, each within Eigen's stack panels, repack the left operand once per tile: at Q of
/// 256 rows against R of 65536, Q was packed 1024 times (~20% of the reference-set call).
template <class T>
class GemmBlocking : public Eigen::internal::level3_blocking<T, T> {
 public:
  /// Plans a product with a rows x cols row-major result and inner size depth. Eigen runs
  /// it as the column-major product of the transposes: its m is our cols, its n our rows.
  void plan(Index rows, Index cols, Index depth) {
    this->m_mc = cols;
    this->m_nc = rows;
    this->m_kc = depth;
    Eigen::internal::computeProductBlockingSizes<T, T, 1, Index>(this->m_kc, this->m_mc, this->m_nc, 1);
    this->m_blockA = packed_a_.data(static_cast<std::size_t>(this->m_kc * this->m_mc));
    this->m_blockB = packed_b_.data(static_cast<std::size_t>(this->m_kc * this->m_nc));
  }

 private:
  AlignedBuffer<T> packed_a_, packed_b_;
};

/// C = A B, (m x k)(k x n), C row-major, A and B with unit inner stride (maps or their
/// transposes), by Eigen's blocked kernel in one call on blocking's panels.
template <class T, class DA, class DB, class DC>
void product_into(GemmBlocking<T>& blocking, const Eigen::MatrixBase<DA>& a,
                  const Eigen::MatrixBase<DB>& b, const Eigen::MatrixBase<DC>& c_out) {
  auto& c = const_cast<Eigen::MatrixBase<DC>&>(c_out);
  static_assert((int(DC::Flags) & Eigen::RowMajorBit) != 0, "product_into: C is row-major");
  constexpr int order_a = (int(DA::Flags) & Eigen::RowMajorBit) != 0 ? Eigen::RowMajor : Eigen::ColMajor;
  constexpr int order_b = (int(DB::Flags) & Eigen::RowMajorBit) != 0 ? Eigen::RowMajor : Eigen::ColMajor;
  const Index m = a.rows(), k = a.cols(), n = b.cols();
  c.setZero();  // the kernel accumulates
  if (m == 0 || n == 0 || k == 0) return;
  eigen_assert(a.derived().innerStride() == 1 && b.derived().innerStride() == 1 &&
               c.derived().innerStride() == 1);
  blocking.plan(m, n, k);
  Eigen::internal::general_matrix_matrix_product<Index, T, order_a, false, T, order_b, false,
                                                 Eigen::RowMajor, 1>::run(
      m, n, k, a.derived().data(), a.derived().outerStride(), b.derived().data(),
      b.derived().outerStride(), c.derived().data(), 1, c.derived().outerStride(), T(1), blocking,
      nullptr);
}

/// The row stride of an N x N matrix of T: N padded to an odd number of 64-byte lines, so
/// that the entries of a column spread over every cache set. With a stride of N at
/// N = 1024 floats (4 KiB) they all fall in one set: the transposed passes ran 2-3x slower
/// and the column sweeps thrash.
template <class T>
constexpr Index padded_stride(Index n) {
  constexpr Index per_line = 64 / static_cast<Index>(sizeof(T));
  Index lines = (n + per_line - 1) / per_line;
  if (lines % 2 == 0) ++lines;
  return lines * per_line;
}

/// Square tiles for the transposed passes over an N x N matrix: a plain sweep that writes
/// (j, i) while reading (i, j) strides down a column; by tiles (and rows padded_stride
/// apart) both sides stay in L1.
constexpr Index transpose_tile = 32;

/// m(j, i) = m(i, j) for j < i: the lower triangle mirrored into the upper.
template <class T>
void mirror_lower_triangle(StridedMap<T>& m) {
  const Index n = m.rows(), b = transpose_tile;
  for (Index i0 = 0; i0 < n; i0 += b) {
    const Index bi = std::min(b, n - i0);
    for (Index j0 = 0; j0 < i0; j0 += b) m.block(j0, i0, b, bi) = m.block(i0, j0, bi, b).transpose();
    for (Index i = i0; i < i0 + bi; ++i)
      for (Index j = i0; j < i; ++j) m(j, i) = m(i, j);
  }
}

/// m = m + m^T in place (both triangles; the diagonal doubles).
template <class T>
void add_transpose_in_place(StridedMap<T>& m) {
  const Index n = m.rows(), b = transpose_tile;
  for (Index i0 = 0; i0 < n; i0 += b) {
    const Index bi = std::min(b, n - i0);
    for (Index j0 = 0; j0 < i0; j0 += b) {
      auto lower = m.block(i0, j0, bi, b);
      auto upper = m.block(j0, i0, b, bi);
      lower += upper.transpose();
      upper = lower.transpose();
    }
    for (Index i = i0; i < i0 + bi; ++i) {
      m(i, i) += m(i, i);
      for (Index j = i0; j < i; ++j) {
        const T s = m(i, j) + m(j, i);
        m(i, j) = s;
        m(j, i) = s;
      }
    }
  }
}

/// Where Eigen writes a product bound for a caller's buffer: rows of whole 64-byte lines from
/// a 64-byte boundary, copied out afterwards (copy_rows). Eigen's small-size products peel
/// by the destination's alignment, so written straight into the caller's gradient their
/// rounding followed its address; staged, the bits are the same wherever it lies.
template <class T>
StridedMap<T> staged(AlignedBuffer<T>& buffer, Index rows, Index cols) {
  constexpr Index per_line = 64 / static_cast<Index>(sizeof(T));
  const Index stride = std::max<Index>(1, (cols + per_line - 1) / per_line) * per_line;
  return StridedMap<T>(buffer.data(static_cast<std::size_t>(rows * stride)), rows, cols,
                       Eigen::OuterStride<>(stride));
}

/// out = m, row by row (a plain copy: bit for bit).
template <class T>
void copy_rows(const StridedMap<T>& m, const MatrixView<T>& out) {
  for (Index i = 0; i < m.rows(); ++i) std::copy(m.row(i).data(), m.row(i).data() + m.cols(), out.row(i));
}

/// out_i = two_scale (sums_i c_i - out_i) + scale near_i, out_i the product W Rc (or W^T
/// Qc) of CrossDistances::gradients: the diagonal part, the product's sign, and the near
/// pairs' part.
template <class T>
void finish_cross_gradient(StridedMap<T>& out, const ConstStridedMap<T>& centred, const double* sums,
                           const double* near, T two_scale, T scale) {
  const Index d = out.cols();
  for (Index i = 0; i < out.rows(); ++i) {
    out.row(i) = two_scale * (static_cast<T>(sums[i]) * centred.row(i) - out.row(i));
    for (Index c = 0; c < d; ++c)
      out(i, c) = static_cast<T>(static_cast<double>(out(i, c)) +
                                 static_cast<double>(scale) * near[i * d + c]);
  }
}

}  // namespace detail
}  // namespace metricloss
