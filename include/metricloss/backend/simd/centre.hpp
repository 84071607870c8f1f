#pragma once
// Rows centred at their mean (in double) before a product of the simd batch core: a common
// offset cancels before it can round, and ||x_i - x_j||^2 = n_i + n_j - 2 <xc_i, xc_j> is
// formed from the centred rows' norms n (backend/simd/pairwise.hpp, backend/simd/cross.hpp).
#include <metricloss/backend/simd/exact.hpp>
#include <metricloss/detail/views.hpp>

#include <algorithm>

namespace metricloss {
namespace detail {

/// xc (n x d, contiguous) = the rows row_of(0..n) less their mean, and norms[i] = ||xc_i||^2
/// summed in double; `mean` (d doubles) is scratch.
template <class T, class RowOf>
void centre_rows(const RowOf& row_of, Index n, Index d, double* mean, T* xc, T* norms) {
  std::fill(mean, mean + d, 0.0);
  for (Index i = 0; i < n; ++i) {
    const T* row = row_of(i);
    for (Index c = 0; c < d; ++c) mean[c] += static_cast<double>(row[c]);
  }
  for (Index c = 0; c < d; ++c) mean[c] /= static_cast<double>(n);
  for (Index i = 0; i < n; ++i) {
    const T* row = row_of(i);
    T* out = xc + i * d;
    for (Index c = 0; c < d; ++c) out[c] = static_cast<T>(static_cast<double>(row[c]) - mean[c]);
    // In double lanes: one scalar chain of d dependent adds per row was a tenth of batch-hard
    // at N = 256, D = 128.
    norms[i] = static_cast<T>(exact_dot(out, out, d));
  }
}

}  // namespace detail
}  // namespace metricloss
