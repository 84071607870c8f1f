#pragma once
// The gradient product of symmetric weights over the lower triangle (the batch, and a band of
// it for the sharded paths): S xc from the strictly lower triangle of S alone, by row panels
// and transposed column panels, without a W + W^T pass or heap allocation.
#include <metricloss/backend/simd/products.hpp>
#include <metricloss/detail/views.hpp>

#include <Eigen/Core>

#include <algorithm>

namespace metricloss {
namespace detail {

/// c = lhs rhs (assign) or c += lhs rhs, by products of (rows x chunk)(chunk x chunk) panels,
/// each packed panel within Eigen's stack-allocation limit (no heap); every entry of lhs is
/// packed once when rhs has at most chunk columns.
template <class T, class A, class B, class C>
void accumulate_panels(const A& lhs, const B& rhs, C&& c, bool assign) {
  constexpr Index chunk = sizeof(T) <= 4 ? 128 : 64;
  const Index depth = lhs.cols(), d = rhs.cols();
  for (Index j0 = 0; j0 < d; j0 += chunk) {
    const Index nj = std::min(chunk, d - j0);
    auto tile = c.middleCols(j0, nj);
    for (Index k0 = 0; k0 < depth; k0 += chunk) {
      const Index kk = std::min(chunk, depth - k0);
      if (assign && k0 == 0)
        tile.noalias() = lhs.middleCols(k0, kk) * rhs.block(k0, j0, kk, nj);
      else
        tile.noalias() += lhs.middleCols(k0, kk) * rhs.block(k0, j0, kk, nj);
    }
  }
}

/// Diagonal block of the symmetric weights: gradient_from_lower_weights() reads the
/// strictly lower triangle, and mirrors it within the diagonal blocks of this size.
constexpr Index symmetric_block = 128;

/// out = scale * 2 (diag(r) - S) X for a symmetric S with zero diagonal whose strictly
/// lower triangle (j < i) the caller wrote into `s` (N x N, row i at s + i * stride; a
/// stride that is not a multiple of 4 KiB keeps the product's strided reads of S out of
/// the same cache sets), and r = row_sums (normally
/// S 1; a caller that applies some pairs by other means leaves them out of both). No
/// W + W^T pass: the product runs over the lower triangle by row panels, S[I, :I] xc,
/// and transposed column panels, S[below K, K]^T xc; only the diagonal blocks are
/// completed in place (their upper parts and the diagonal are overwritten). Entries
/// above the diagonal blocks are never read.
template <class T>
void gradient_from_lower_weights(const ConstStridedMap<T>& xc, T* w, Index stride, T scale,
                                 const T* row_sums, StridedMap<T>& out) {
  const Index n = xc.rows(), b = symmetric_block;
  for (Index i0 = 0; i0 < n; i0 += b) {
    const Index end = std::min(n, i0 + b);
    for (Index i = i0; i < end; ++i) {
      w[i * stride + i] = T(0);
      for (Index j = i + 1; j < end; ++j) w[i * stride + j] = w[j * stride + i];
    }
  }
  const ConstStridedMap<T> s(w, n, n, Eigen::OuterStride<>(stride));
  for (Index i0 = 0; i0 < n; i0 += b) {  // out[I] = S[I, :end(I)] xc[:end(I)]
    const Index mi = std::min(b, n - i0), end = i0 + mi;
    accumulate_panels<T>(s.block(i0, 0, mi, end), xc.topRows(end), out.middleRows(i0, mi), true);
  }
  for (Index k0 = 0; k0 + b < n; k0 += b) {  // out[K] += S[below, K]^T xc[below]
    const Index below = k0 + b, rest = n - below;
    accumulate_panels<T>(s.block(below, k0, rest, b).transpose(), xc.middleRows(below, rest),
                         out.middleRows(k0, b), false);
  }
  const T two_scale = T(2) * scale;
  for (Index i = 0; i < n; ++i)
    out.row(i) = two_scale * (row_sums[i] * xc.row(i) - out.row(i));
}

/// out = S xc over the pairs of a band of the strictly lower triangle: rows [first, end),
/// row i of the weights at w + (i - first) * stride with its entries j < i; out (rows
/// [0, end)) gets, in row a, the sum over the band's pairs (a, b) of S_ab xc_b, both roles.
/// As gradient_from_lower_weights: row panels S[I, :end(I)] xc and transposed column panels
/// (the band's columns below `first`, and each of its diagonal blocks' rows below it); the
/// diagonal blocks (aligned at `first`) are completed in place, their upper parts and
/// diagonal overwritten.
template <class T>
void band_product(const ConstStridedMap<T>& xc, T* w, Index stride, Index first, Index end,
                  StridedMap<T>& out) {
  const Index b = symmetric_block, rows = end - first;
  for (Index i0 = first; i0 < end; i0 += b) {
    const Index stop = std::min(end, i0 + b);
    for (Index i = i0; i < stop; ++i) {
      T* row = w + (i - first) * stride;
      row[i] = T(0);
      for (Index j = i + 1; j < stop; ++j) row[j] = w[(j - first) * stride + i];
    }
  }
  out.topRows(first).setZero();
  if (rows == 0) return;
  const ConstStridedMap<T> s(w, rows, end, Eigen::OuterStride<>(stride));
  for (Index i0 = first; i0 < end; i0 += b) {  // out[I] = S[I, :end(I)] xc[:end(I)]
    const Index mi = std::min(b, end - i0), stop = i0 + mi;
    accumulate_panels<T>(s.block(i0 - first, 0, mi, stop), xc.topRows(stop),
                         out.middleRows(i0, mi), true);
  }
  for (Index k0 = 0; k0 < first; k0 += b) {  // out[K] += S[band, K]^T xc[band], K < first
    const Index kk = std::min(b, first - k0);
    accumulate_panels<T>(s.middleCols(k0, kk).transpose(), xc.middleRows(first, rows),
                         out.middleRows(k0, kk), false);
  }
  for (Index k0 = first; k0 + b < end; k0 += b) {  // out[K] += S[below, K]^T xc[below]
    const Index below = k0 + b;
    accumulate_panels<T>(s.block(below - first, k0, end - below, b).transpose(),
                         xc.middleRows(below, end - below), out.middleRows(k0, b), false);
  }
}

}  // namespace detail
}  // namespace metricloss
