#pragma once
// Sweeps of the lower triangle of an N x N matrix, row by row, for the simd batch paths: an
// entry (i, k), k < i, serves row i (row-wise, in registers) and row k (lane-wise into an
// N-vector of column sums, which stays in L1), so each unordered pair is read once.
#include <metricloss/detail/buffer.hpp>
#include <metricloss/types.hpp>

#include <algorithm>
#include <cstddef>

namespace metricloss {
namespace detail {

/// Column sums over the lower triangle (or a rectangle): lane-wise partial sums in T over
/// blocks of `rows` rows, totalled in double.
template <class T>
struct ColumnSums {
  static constexpr Index rows = 32;
  T* partial;
  double* total;
  Index n;
  ColumnSums(GrowOnlyBuffer<T>& partial_, GrowOnlyBuffer<double>& total_, Index n_)
      : partial(partial_.data(static_cast<std::size_t>(n_))),
        total(total_.data(static_cast<std::size_t>(n_))), n(n_) {
    std::fill(partial, partial + n, T(0));
    std::fill(total, total + n, 0.0);
  }
  void row_done(Index i) {
    if ((i + 1) % rows == 0) flush(i);
  }
  /// The same for a rectangle, whose every row writes all n columns.
  void rectangle_row_done(Index i) {
    if ((i + 1) % rows == 0) flush(n);
  }
  void finish() { flush(n); }
  void flush(Index end) {  // rows up to `end` have written columns k < end
    for (Index k = 0; k < end; ++k) {
      total[k] += static_cast<double>(partial[k]);
      partial[k] = T(0);
    }
  }
};

}  // namespace detail
}  // namespace metricloss
