#pragma once
// Building blocks of the batch losses on CUDA (lifted structure; batch mining later):
//   - the batch mean and the centred batch xc = x - mean with n_i = ||xc_i||^2 (centring
//     removes a common offset that would cancel every digit of n_i + n_j - 2 xc_i.xc_j);
//   - a shared-memory tiled product C = A B or A B^T with a per-entry epilogue, used for
//     the squared distances (epilogue: n_i + n_j - 2 acc, recomputed by differences in
//     double where small against n_i + n_j, as detail::PairwiseDistances does on the CPU)
//     and for the gradient dX = 2 scale (diag(S 1) - S) xc.
// Every reduction has a fixed order: results are deterministic. Each entry of a product is
// one thread's ascending-k sum, so the distance matrix is bitwise symmetric.
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/detail/views.hpp>

#include <cuda_runtime.h>

#include <type_traits>

namespace metricloss {
namespace detail {
namespace cuda {

// ---- centring --------------------------------------------------------------------------

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

// ---- tiled products --------------------------------------------------------------------

constexpr int tile_threads = 256;  // 16 x 16 threads

/// Register blocking by type: 8 x 8 entries per thread in float (a 128 x 128 tile, four
/// FMAs per shared-memory load), 4 x 4 in double (64 x 64: a double accumulator block
/// twice the size would not fit the registers). k advances 16 at a time.
template <class T>
struct ProductShape {
  static constexpr int per_thread = sizeof(T) <= 4 ? 8 : 4;
  static constexpr int tile = 16 * per_thread;
  static constexpr int depth = 16;
};

/// C_ij = sum_k A_ik B'_kj with A row-major (M x K, stride lda) and B' = B^T (B row-major
/// N x K, TransposeB) or B' = B (row-major K x N). A square tile per block, per_thread^2
/// entries per thread (strided by 16, so shared-memory reads and global writes are
/// conflict-free and coalesced), k through shared memory. Each entry is one thread's
/// ascending-k sum. epilogue(i, j, acc) stores.
template <class T, bool TransposeB, class Epilogue>
__global__ void __launch_bounds__(tile_threads)
    tiled_product_kernel(const T* a, Index lda, const T* b, Index ldb, Index m, Index n, Index k,
                         Epilogue epilogue) {
  using Shape = ProductShape<T>;
  constexpr int p = Shape::per_thread, tile = Shape::tile, depth = Shape::depth;
  __shared__ T a_tile[depth][tile + 1];  // +1: conflict-free transposing stores
  __shared__ T b_tile[depth][tile + 1];
  const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
  const Index row0 = Index(blockIdx.y) * tile, col0 = Index(blockIdx.x) * tile;
  T acc[p][p];
#pragma unroll
  for (int r = 0; r < p; ++r)
#pragma unroll
    for (int c = 0; c < p; ++c) acc[r][c] = T(0);
  for (Index k0 = 0; k0 < k; k0 += depth) {
    for (int e = static_cast<int>(threadIdx.x); e < tile * depth; e += tile_threads) {
      const int r = e / depth, kk = e % depth;
      const Index gi = row0 + r, gk = k0 + kk;
      a_tile[kk][r] = (gi < m && gk < k) ? a[gi * lda + gk] : T(0);
    }
    for (int e = static_cast<int>(threadIdx.x); e < tile * depth; e += tile_threads) {
      if constexpr (TransposeB) {
        const int c = e / depth, kk = e % depth;
        const Index gj = col0 + c, gk = k0 + kk;
        b_tile[kk][c] = (gj < n && gk < k) ? b[gj * ldb + gk] : T(0);
      } else {
        const int kk = e / tile, c = e % tile;
        const Index gj = col0 + c, gk = k0 + kk;
        b_tile[kk][c] = (gj < n && gk < k) ? b[gk * ldb + gj] : T(0);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < depth; ++kk) {
      T av[p], bv[p];
#pragma unroll
      for (int r = 0; r < p; ++r) av[r] = a_tile[kk][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < p; ++c) bv[c] = b_tile[kk][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < p; ++r)
#pragma unroll
        for (int c = 0; c < p; ++c) acc[r][c] = fma(av[r], bv[c], acc[r][c]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < p; ++r)
#pragma unroll
    for (int c = 0; c < p; ++c) {
      const Index i = row0 + ty + 16 * r, j = col0 + tx + 16 * c;
      if (i < m && j < n) epilogue(i, j, acc[r][c]);
    }
}

template <class T, bool TransposeB, class Epilogue>
cudaError_t enqueue_tiled_product(const T* a, Index lda, const T* b, Index ldb, Index m, Index n,
                                  Index k, const Epilogue& epilogue, cudaStream_t stream) noexcept {
  constexpr int tile = ProductShape<T>::tile;
  const Index blocks_y = (m + tile - 1) / tile, blocks_x = (n + tile - 1) / tile;
  if (blocks_y > 65535) return cudaErrorInvalidValue;  // M > 8 million rows
  tiled_product_kernel<T, TransposeB><<<dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y)),
                                        tile_threads, 0, stream>>>(a, lda, b, ldb, m, n, k, epilogue);
  return cudaGetLastError();
}

/// Below this fraction of n_i + n_j a squared distance is recomputed by differences (the
/// same rule and ratios as detail::PairwiseDistances on the CPU).
template <class T>
constexpr double recompute_ratio = std::is_same<T, float>::value ? 0.125 : 1.0 / 1024;

/// Epilogue of the distance product xc xc^T: D2_ij = n_i + n_j - 2 acc, exactly 0 on the
/// diagonal, and by differences of the original rows (in double) where the expansion
/// cancels or where exact(i, j) says the distance carries weight (e.g. positive pairs).
template <class T, class Exact>
struct SquaredDistanceEpilogue {
  MatrixView<const T> x;
  const double* norms;
  T* squared;  // N x N, row-major, stride N
  Exact exact;

  __device__ void operator()(Index i, Index j, T acc) const {
    const Index n = x.rows;
    if (i == j) {
      squared[i * n + j] = T(0);
      return;
    }
    const double scale = norms[i] + norms[j];
    double value = scale - 2.0 * static_cast<double>(acc);
    if (!(value > recompute_ratio<T> * scale) || exact(i, j)) {  // small, zero, negative, NaN
      const T* xi = x.row(i);
      const T* xj = x.row(j);
      double sum = 0.0;
      for (Index c = 0; c < x.cols; ++c) {
        const double diff = static_cast<double>(xi[c]) - static_cast<double>(xj[c]);
        sum = fma(diff, diff, sum);
      }
      value = sum;
    }
    squared[i * n + j] = static_cast<T>(value);
  }
};

/// exact(i, j) of the losses whose positive pairs carry weight: equal labels.
template <class L>
struct SameLabel {
  VectorView<L> labels;
  __device__ bool operator()(Index i, Index j) const { return labels[i] == labels[j]; }
};

/// Epilogue of the gradient product S xc:
///   grad_ij = 2 scale (rowsum_i xc_ij - acc + near_ij),
/// with scale read from device memory (known only once the loss is reduced), near (N x D,
/// may be null) the near pairs' part computed by differences, and NaN where the data were
/// not finite.
template <class T>
struct WeightedGradientEpilogue {
  const T* centred;        // N x D, stride D
  const double* row_sums;  // sum_k S_ik
  const double* near;      // N x D or null
  const double* scale;     // top_diff / normaliser
  const int* not_finite;
  MatrixView<T> grad;

  __device__ void operator()(Index i, Index j, T acc) const {
    const Index d = grad.cols;
    double value = row_sums[i] * static_cast<double>(centred[i * d + j]) - static_cast<double>(acc);
    if (near) value += near[i * d + j];
    grad(i, j) = *not_finite ? static_cast<T>(nan("")) : static_cast<T>(2.0 * *scale * value);
  }
};

// ---- weights: near pairs, symmetrisation -----------------------------------------------

/// Near pairs: where D2_ik < near_ratio (n_i + n_k), a weight S_ik ~ 1/D_ik (Euclidean
/// distances) makes the product's S_ik xc_i - S_ik xc_k lose every digit of S_ik (x_i - x_k)
/// (near duplicates, hard negatives). Such pairs are kept out of S and applied by
/// differences (as the CPU paths do); what stays in the product errs by ~ 64 eps relative.
constexpr double near_ratio = 1.0 / 1024;
constexpr int weight_threads = 256;

/// One chunk of row i's near pairs, in a block of weight_threads: thread t holds the weight
/// of column k0 + t (0 when not near). Adds sum_k S_ik (x_i - x_k) to near_row (each column
/// owned by one thread, k ascending: deterministic). Called by every thread of the block.
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
  const double threshold_i = near_ratio * norms[i];
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
      is_near = s != 0.0 && static_cast<double>(row[k]) < threshold_i + near_ratio * norms[k];
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

// ---- what the batch losses share --------------------------------------------------------

/// The workspace parts every batch loss uses, carved in a fixed order.
template <class T>
struct BatchParts {
  void* centring;
  T* centred;               // N x D, stride D
  double* norms;            // ||xc_i||^2
  T* squared;               // N x N: D2, later S as T
  double* near;             // N x D: near pairs' gradient by differences
  double* row_sums;         // sum_k S_ik
  double* gradient_scale;   // top_diff / normaliser, set by the loss's reduction
  int* not_finite;          // non-finite data or NaN labels

  BatchParts(WorkspaceCarver& carve, Index n, Index d) {
    const auto un = static_cast<std::size_t>(n), ud = static_cast<std::size_t>(d);
    centring = carve.take<char>(centring_bytes(n, d));
    centred = carve.take<T>(un * ud);
    norms = carve.take<double>(un);
    squared = carve.take<T>(un * un);
    near = carve.take<double>(un * ud);
    row_sums = carve.take<double>(un);
    gradient_scale = carve.take<double>(1);
    not_finite = carve.take<int>(1);
  }
};

/// Clears the flag, centres the batch and fills D2 (positive pairs by differences).
template <class T, class L>
cudaError_t enqueue_batch_distances(const BatchParts<T>& parts, const MatrixView<const T>& x,
                                    const VectorView<L>& labels, cudaStream_t stream) noexcept {
  const Index n = x.rows, d = x.cols;
  cudaError_t error = cudaMemsetAsync(parts.not_finite, 0, sizeof(int), stream);
  if (error != cudaSuccess) return error;
  error = enqueue_centring(x, parts.centring, parts.centred, parts.norms, parts.not_finite, stream);
  if (error != cudaSuccess) return error;
  return enqueue_tiled_product<T, true>(
      parts.centred, d, parts.centred, d, n, n, d,
      SquaredDistanceEpilogue<T, SameLabel<L>>{x, parts.norms, parts.squared, {labels}}, stream);
}

/// grad = 2 scale ((diag(S 1) - S) xc + near), S in parts.squared (as T).
template <class T>
cudaError_t enqueue_weighted_gradient(const BatchParts<T>& parts, Index n, const MatrixView<T>& grad,
                                      cudaStream_t stream) noexcept {
  const Index d = grad.cols;
  return enqueue_tiled_product<T, false>(
      parts.squared, n, parts.centred, d, n, d, n,
      WeightedGradientEpilogue<T>{parts.centred, parts.row_sums, parts.near, parts.gradient_scale,
                                  parts.not_finite, grad},
      stream);
}

}  // namespace cuda
}  // namespace detail
}  // namespace metricloss
