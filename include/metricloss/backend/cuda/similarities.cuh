#pragma once
// The similarity form of the batch core on CUDA (multi-similarity; the CPU's is
// backend/simd/similarities.hpp):
//   - ||x_i|| in double and the flag for non-finite entries, a block per row;
//   - S = X X^T by the tiled product (lower triangle of tiles, mirrored: bitwise symmetric),
//     no centring: a dot product has no offset to cancel; its rounding is
//     product_rounding_unit(D) ||x_i|| ||x_j||;
//   - the gradient dX = (W + W^T) X: W symmetrised in place (batch_weights.cuh), stored as T
//     over S, one tiled product.
#include <metricloss/backend/cuda/batch_weights.cuh>
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/tiled_product.cuh>
#include <metricloss/detail/views.hpp>

#include <cuda_runtime.h>

namespace metricloss {
namespace detail {
namespace cuda {

constexpr int similarity_threads = 256;

/// ||x_i|| (in double) and the flag for non-finite entries.
template <class T>
__global__ void __launch_bounds__(similarity_threads)
    row_norms_kernel(MatrixView<const T> x, double* norms, int* not_finite) {
  __shared__ double shared[similarity_threads / warp_size];
  const T* xi = x.row(blockIdx.x);
  double sum = 0.0;
  bool finite = true;
  for (Index c = threadIdx.x; c < x.cols; c += similarity_threads) {
    const double v = static_cast<double>(xi[c]);
    finite = finite && isfinite(v);
    sum = fma(v, v, sum);
  }
  const bool all_finite = __syncthreads_and(finite) != 0;
  sum = block_sum<similarity_threads>(sum, shared);
  if (threadIdx.x != 0) return;
  if (!all_finite) atomicOr(not_finite, 1);
  norms[blockIdx.x] = sqrt(sum);
}

/// Epilogue of X X^T: S_ij = acc, stored at (i, j) and, for a mirrored tile, at (j, i).
template <class T>
struct SimilarityEpilogue {
  T* similarity;  // N x N, stride N
  Index n;

  template <int P, int V>
  __device__ void tile(const Index (&rows)[P], const Index (&cols)[P], const T (&acc)[P][P],
                       Index m, Index columns, bool mirror) const {
#pragma unroll
    for (int r = 0; r < P; ++r)
#pragma unroll
      for (int c = 0; c < P; ++c) {
        if (rows[r] >= m || cols[c] >= columns) continue;
        similarity[rows[r] * n + cols[c]] = acc[r][c];
        if (mirror) similarity[cols[c] * n + rows[r]] = acc[r][c];
      }
  }
};

/// Epilogue of the gradient product S X: grad_ij = acc (W already carries top_diff / N),
/// NaN where the data were not finite.
template <class T>
struct SimilarityGradientEpilogue {
  const int* not_finite;
  MatrixView<T> grad;

  template <int P, int V>
  __device__ void tile(const Index (&rows)[P], const Index (&cols)[P], const T (&acc)[P][P],
                       Index m, Index columns, bool) const {
    const bool nan_out = *not_finite != 0;
#pragma unroll
    for (int r = 0; r < P; ++r)
#pragma unroll
      for (int c = 0; c < P; ++c)
        if (rows[r] < m && cols[c] < columns)
          grad(rows[r], cols[c]) = nan_out ? static_cast<T>(nan("")) : acc[r][c];
  }
};

/// S (double, symmetric) into `out` as T.
template <class T>
__global__ void __launch_bounds__(256) weights_as_kernel(const double* weights, T* out, Index count) {
  for (Index i = Index(blockIdx.x) * 256 + threadIdx.x; i < count; i += Index(gridDim.x) * 256)
    out[i] = static_cast<T>(weights[i]);
}

/// The norms (and the flag, which the caller clears) and S = X X^T into `similarity` (N x N).
template <class T>
cudaError_t enqueue_similarities(const MatrixView<const T>& x, double* norms, T* similarity,
                                 int* not_finite, cudaStream_t stream) noexcept {
  const Index n = x.rows;
  row_norms_kernel<T><<<static_cast<unsigned>(n), similarity_threads, 0, stream>>>(x, norms, not_finite);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  return enqueue_tiled_product<T, true, true>(x.data, x.stride, x.data, x.stride, n, n, x.cols,
                                              SimilarityEpilogue<T>{similarity, n}, stream);
}

/// grad = (W + W^T) X: `weights` (N x N doubles, W carrying every scale) is symmetrised in
/// place and stored as T into `as_t` (N x N, e.g. the similarity buffer, no longer needed).
template <class T>
cudaError_t enqueue_similarity_gradient(double* weights, T* as_t, const MatrixView<const T>& x,
                                        const int* not_finite, const MatrixView<T>& grad,
                                        cudaStream_t stream) noexcept {
  const Index n = x.rows, entries = n * n;
  const auto tiles = static_cast<unsigned>((n + symmetrise_tile - 1) / symmetrise_tile);
  symmetrise_kernel<T><<<dim3(tiles, tiles), 256, 0, stream>>>(weights, n);
  const auto blocks = static_cast<unsigned>(entries / 256 < 4096 ? entries / 256 + 1 : 4096);
  weights_as_kernel<T><<<blocks, 256, 0, stream>>>(weights, as_t, entries);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  return enqueue_tiled_product<T, false>(as_t, n, x.data, x.stride, n, x.cols, n,
                                         SimilarityGradientEpilogue<T>{not_finite, grad}, stream);
}

}  // namespace cuda
}  // namespace detail
}  // namespace metricloss
