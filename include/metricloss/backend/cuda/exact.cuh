#pragma once
// The CUDA backend's exact squared distance: ||x_i - x_j||^2 with every difference and sum
// in double (fma), in two forms of the same terms:
//   exact_squared_thread  one thread, four independent sums (several loads in flight);
//                         symmetric in i and j bit for bit, so comparisons that read it for
//                         both sides (ties, duplicate rows) tie exactly;
//   exact_squared_block   the block's threads share the columns, one block_sum (every
//                         thread gets the total): for the few distances a block needs at D
//                         in the thousands;
// and the similarity form's exact dot product, exact_dot_thread (multi-similarity).
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/detail/views.hpp>

#include <cuda_runtime.h>

namespace metricloss {
namespace detail {
namespace cuda {

/// sum_c term(x_ic, x_jc, .) in double over four independent sums (several loads in flight),
/// added in a fixed order: the one loop of exact_squared_thread and exact_dot_thread.
template <class T, class Term>
__device__ inline double four_sums(const MatrixView<const T>& x, Index i, Index j, Term term) {
  const T* xi = x.row(i);
  const T* xj = x.row(j);
  const Index d = x.cols;
  double sum[4] = {0.0, 0.0, 0.0, 0.0};
  Index c = 0;
#pragma unroll 2
  for (; c + 4 <= d; c += 4)
#pragma unroll
    for (int u = 0; u < 4; ++u)
      sum[u] = term(static_cast<double>(xi[c + u]), static_cast<double>(xj[c + u]), sum[u]);
  for (; c < d; ++c) sum[0] = term(static_cast<double>(xi[c]), static_cast<double>(xj[c]), sum[0]);
  return (sum[0] + sum[1]) + (sum[2] + sum[3]);
}

template <class T>
__device__ inline double exact_squared_thread(const MatrixView<const T>& x, Index i, Index j) {
  return four_sums(x, i, j, [](double a, double b, double s) {
    const double diff = a - b;
    return fma(diff, diff, s);
  });
}

/// The similarity form's exact value, <x_i, x_j> with every product and sum in double (fma);
/// symmetric in i and j bit for bit.
template <class T>
__device__ inline double exact_dot_thread(const MatrixView<const T>& x, Index i, Index j) {
  return four_sums(x, i, j, [](double a, double b, double s) { return fma(a, b, s); });
}

template <int Threads, class T>
__device__ inline double exact_squared_block(const MatrixView<const T>& x, Index i, Index j,
                                             double* shared) {
  const T* xi = x.row(i);
  const T* xj = x.row(j);
  double sum = 0.0;
  for (Index c = threadIdx.x; c < x.cols; c += Threads) {
    const double diff = static_cast<double>(xi[c]) - static_cast<double>(xj[c]);
    sum = fma(diff, diff, sum);
  }
  return block_sum<Threads>(sum, shared);
}

}  // namespace cuda
}  // namespace detail
}  // namespace metricloss
