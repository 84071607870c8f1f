#pragma once
// The batch losses' weights S before the gradient product: near pairs kept out of S and
// applied by differences, W + W^T in place, and S as T with its row sums. Part of
// pairwise.cuh, which includes it.
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/views.hpp>

#include <cuda_runtime.h>

namespace metricloss {
namespace detail {
namespace cuda {

/// Near pairs: where D2_ik < Numerics<T>::near_ratio (n_i + n_k), a weight S_ik ~ 1/D_ik
/// (Euclidean distances) makes the product's S_ik xc_i - S_ik xc_k lose every digit of
/// S_ik (x_i - x_k) (near duplicates, hard negatives). Such pairs are kept out of S and
/// applied by differences (as the CPU paths do).
constexpr int weight_threads = 256;

/// One chunk of row i's near pairs, in a block of weight_threads: thread t holds the weight
/// of column k0 + t (0 when not near). Adds sum_k S_ik (x_i - x_k) to near_row (each column
/// owned by one thread, k ascending: deterministic). Called by every thread of the block.
/// Also adds hard mining's sparse entries (batch_triplet.cuh's hard_gradient_kernel).
template <class T>
__device__ inline void add_near_chunk(bool is_near, double weight, Index i, Index k0,
                                      const MatrixView<const T>& x, double* near_row,
                                      double* shared_weights) {
  if (!__syncthreads_or(is_near)) return;  // rare
  const int tid = static_cast<int>(threadIdx.x);
  shared_weights[tid] = is_near ? weight : 0.0;
  __syncthreads();
  const T* xi = x.row(i);
  for (int t = 0; t < weight_threads; ++t) {
    const double w = shared_weights[t];
    if (w == 0.0) continue;
    const T* xk = x.row(k0 + t);
    for (Index c = tid; c < x.cols; c += weight_threads)
      near_row[c] += w * (static_cast<double>(xi[c]) - static_cast<double>(xk[c]));
  }
  __syncthreads();
}

constexpr int symmetrise_tile = 32;

/// W <- W + W^T in place (N x N doubles), one pair of mirrored 32 x 32 tiles per block:
/// both entries of a pair get the same bits.
__device__ inline void symmetrise_tiles(double* w, Index n) {
  __shared__ double upper[symmetrise_tile][symmetrise_tile + 1];
  __shared__ double lower[symmetrise_tile][symmetrise_tile + 1];
  const Index ti = blockIdx.y, tj = blockIdx.x;
  if (tj > ti) return;
  const int c = static_cast<int>(threadIdx.x) % symmetrise_tile;
  for (int r = static_cast<int>(threadIdx.x) / symmetrise_tile; r < symmetrise_tile;
       r += static_cast<int>(blockDim.x) / symmetrise_tile) {
    const Index i = ti * symmetrise_tile + r, j = tj * symmetrise_tile + c;
    upper[r][c] = (i < n && j < n) ? w[i * n + j] : 0.0;  // tile (ti, tj)
    const Index i2 = tj * symmetrise_tile + r, j2 = ti * symmetrise_tile + c;
    lower[r][c] = (i2 < n && j2 < n) ? w[i2 * n + j2] : 0.0;  // tile (tj, ti)
  }
  __syncthreads();
  for (int r = static_cast<int>(threadIdx.x) / symmetrise_tile; r < symmetrise_tile;
       r += static_cast<int>(blockDim.x) / symmetrise_tile) {
    const Index i = ti * symmetrise_tile + r, j = tj * symmetrise_tile + c;
    if (i < n && j < n) w[i * n + j] = upper[r][c] + lower[c][r];
    const Index i2 = tj * symmetrise_tile + r, j2 = ti * symmetrise_tile + c;
    if (i2 < n && j2 < n) w[i2 * n + j2] = lower[r][c] + upper[c][r];
  }
}

template <class T>  // a template, so that the header-defined kernel is not an ODR violation
__global__ void __launch_bounds__(256) symmetrise_kernel(double* w, Index n) {
  symmetrise_tiles(w, n);
}

/// Per row i of a symmetric S (doubles): writes S as T into `out` (N x N; the distance
/// buffer, whose row i it reads first), with near pairs set to 0 and their part added by
/// differences to near (N x D); row_sum_i = sum_k of the stored entries.
template <class T>
__global__ void __launch_bounds__(weight_threads)
    finish_weights_kernel(const double* s_matrix, T* squared_then_s, Index n,
                          MatrixView<const T> x, const double* norms, double* row_sums,
                          double* near) {
  __shared__ double shared[weight_threads / warp_size];
  __shared__ double near_weight[weight_threads];
  const Index i = blockIdx.x, d = x.cols;
  const int tid = static_cast<int>(threadIdx.x);
  const double threshold_i = Numerics<T>::near_ratio * norms[i];
  T* row = squared_then_s + i * n;
  const double* s_row = s_matrix + i * n;
  double* near_row = near + i * d;
  for (Index c = tid; c < d; c += weight_threads) near_row[c] = 0.0;
  double row_sum = 0.0;
  for (Index k0 = 0; k0 < n; k0 += weight_threads) {  // block-uniform bound
    const Index k = k0 + tid;
    double s = 0.0;
    bool is_near = false;
    if (k < n && k != i) {
      s = s_row[k];
      is_near = s != 0.0 && static_cast<double>(row[k]) < threshold_i + Numerics<T>::near_ratio * norms[k];
    }
    if (k < n) {
      const T stored = is_near ? T(0) : static_cast<T>(s);
      row[k] = stored;
      row_sum += static_cast<double>(stored);
    }
    add_near_chunk(is_near, s, i, k0, x, near_row, near_weight);
  }
  row_sum = block_sum<weight_threads>(row_sum, shared);
  if (tid == 0) row_sums[i] = row_sum;
}

}  // namespace cuda
}  // namespace detail
}  // namespace metricloss
