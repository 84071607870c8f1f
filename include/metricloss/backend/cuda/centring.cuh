#pragma once
// The batch mean and the centred batch xc = x - mean with n_i = ||xc_i||^2, each sum in a
// fixed order (centring removes a common offset that would cancel every digit of
// n_i + n_j - 2 xc_i.xc_j). A part of pairwise.cuh, which includes it.
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/detail/views.hpp>

#include <cuda_runtime.h>

#include <cstddef>

namespace metricloss {
namespace detail {
namespace cuda {

constexpr int mean_chunk_rows = 64;
constexpr int mean_threads = 256;

inline Index mean_chunks(Index n) { return (n + mean_chunk_rows - 1) / mean_chunk_rows; }

/// partial[c][j] = sum of x_ij over the rows of chunk c (ascending), in double.
template <class T>
__global__ void __launch_bounds__(mean_threads)
    column_partial_sums_kernel(MatrixView<const T> x, double* partial) {
  const Index j = Index(blockIdx.x) * mean_threads + threadIdx.x;
  if (j >= x.cols) return;
  const Index first = Index(blockIdx.y) * mean_chunk_rows;
  const Index last = first + mean_chunk_rows < x.rows ? first + mean_chunk_rows : x.rows;
  double sum = 0.0;
  for (Index i = first; i < last; ++i) sum += static_cast<double>(x(i, j));
  partial[Index(blockIdx.y) * x.cols + j] = sum;
}

/// mean_j = (sum over chunks, ascending) / N. A template (on the batch's T) so that the
/// kernel, defined in a header, is not an ODR violation across translation units.
template <class T>
__global__ void __launch_bounds__(mean_threads)
    column_mean_kernel(const double* partial, Index chunks, Index n, Index d, double* mean) {
  const Index j = Index(blockIdx.x) * mean_threads + threadIdx.x;
  if (j >= d) return;
  double sum = 0.0;
  for (Index c = 0; c < chunks; ++c) sum += partial[c * d + j];
  mean[j] = sum / static_cast<double>(n);
}

constexpr int centre_threads = 256;

/// xc_i = x_i - mean (rounded to T), n_i = ||xc_i||^2 in double; a warp per row. Sets
/// *not_finite when x has a NaN or an infinity (an integer flag: no float atomics).
template <class T>
__global__ void __launch_bounds__(centre_threads)
    centre_kernel(MatrixView<const T> x, const double* mean, T* centred, double* norms,
                  int* not_finite) {
  const Index row = Index(blockIdx.x) * (centre_threads / warp_size) + threadIdx.x / warp_size;
  const int lane = static_cast<int>(threadIdx.x) % warp_size;
  if (row >= x.rows) return;  // whole warps leave together
  const Index d = x.cols;
  double norm = 0.0;
  bool finite = true;
  for (Index j = lane; j < d; j += warp_size) {
    const double value = static_cast<double>(x(row, j));
    finite = finite && isfinite(value);
    const T c = static_cast<T>(value - mean[j]);
    centred[row * d + j] = c;
    norm = fma(static_cast<double>(c), static_cast<double>(c), norm);
  }
  norm = group_sum(norm);
  if (lane == 0) norms[row] = norm;
  if (!finite) atomicOr(not_finite, 1);
}

/// Workspace part of the centring: mean partials and the mean.
inline std::size_t centring_bytes(Index n, Index d) {
  return aligned_bytes(sizeof(double) * static_cast<std::size_t>(mean_chunks(n) * d)) +
         aligned_bytes(sizeof(double) * static_cast<std::size_t>(d));
}

template <class T>
cudaError_t enqueue_centring(const MatrixView<const T>& x, void* workspace, T* centred,
                             double* norms, int* not_finite, cudaStream_t stream) noexcept {
  const Index n = x.rows, d = x.cols, chunks = mean_chunks(n);
  double* partial = static_cast<double*>(workspace);
  double* mean = reinterpret_cast<double*>(static_cast<char*>(workspace) +
                                           aligned_bytes(sizeof(double) * static_cast<std::size_t>(chunks * d)));
  const unsigned column_blocks = static_cast<unsigned>((d + mean_threads - 1) / mean_threads);
  if (chunks > 65535) return cudaErrorInvalidValue;  // grid.y limit: N > 4 million rows
  column_partial_sums_kernel<<<dim3(column_blocks, static_cast<unsigned>(chunks)), mean_threads, 0, stream>>>(x, partial);
  column_mean_kernel<T><<<column_blocks, mean_threads, 0, stream>>>(partial, chunks, n, d, mean);
  const Index rows_per_block = centre_threads / warp_size;
  centre_kernel<<<static_cast<unsigned>((n + rows_per_block - 1) / rows_per_block), centre_threads, 0, stream>>>(
      x, mean, centred, norms, not_finite);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace detail
}  // namespace metricloss
