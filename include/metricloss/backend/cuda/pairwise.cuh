#pragma once
// Building blocks of the batch losses on CUDA (lifted structure, batch triplet):
//   - the batch mean and the centred batch xc = x - mean with n_i = ||xc_i||^2 (centring
//     removes a common offset that would cancel every digit of n_i + n_j - 2 xc_i.xc_j):
//     centring.cuh;
//   - a shared-memory tiled product C = A B or A B^T with a per-entry epilogue
//     (tiled_product.cuh), used here for the squared distances (epilogue: n_i + n_j - 2 acc,
//     recomputed by differences in double where small against n_i + n_j, as
//     backend/simd/pairwise.hpp does on the CPU) and for the gradient
//     dX = 2 scale (diag(S 1) - S) xc;
//   - the weights between them: near pairs, symmetrisation (batch_weights.cuh);
//   - the workspace parts every batch loss shares and the two steps that use the epilogues.
// Every reduction has a fixed order: results are deterministic. Each entry of a product is
// one thread's ascending-k sum, so the distance matrix is bitwise symmetric (and only its
// lower triangle of tiles is multiplied).
#include <metricloss/backend/cuda/batch_weights.cuh>
#include <metricloss/backend/cuda/centring.cuh>
#include <metricloss/backend/cuda/exact.cuh>
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/backend/cuda/tiled_product.cuh>
#include <metricloss/detail/views.hpp>
#include <metricloss/detail/numerics.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace metricloss {
namespace detail {
namespace cuda {

/// Epilogue of the distance product xc xc^T: D2_ij = n_i + n_j - 2 acc, exactly 0 on the
/// diagonal, and by differences of the original rows (in double) where the expansion
/// cancels or where the pair carries weight (exact.same(key_i, key_j), e.g. positive pairs).
/// A thread's norms and keys are loaded once, and its results leave in 16-byte stores when
/// N allows (rows, and for a mirrored tile columns, come in runs of V).
template <class T, class Exact>
struct SquaredDistanceEpilogue {
  MatrixView<const T> x;
  const double* norms;
  T* squared;  // N x N, row-major, stride N
  Exact exact;

  /// ||x_i - x_j||^2 by differences in double, by one thread (its warp waits).
  __device__ double exact_squared(Index i, Index j) const { return exact_squared_thread(x, i, j); }

  __device__ T entry(Index i, Index j, double scale, bool exact_pair, T acc) const {
    if (i == j) return T(0);
    double value = scale - 2.0 * static_cast<double>(acc);
    if (!(value > Numerics<T>::recompute_ratio * scale) || exact_pair)  // small, zero, negative, NaN
      value = exact_squared(i, j);
    return static_cast<T>(value);
  }

  /// Stores run[0..V) at squared[i * N + j0 ..] (entries past N dropped).
  template <int V>
  __device__ void store_run(Index i, Index j0, const T (&run)[V]) const {
    const Index n = x.rows;
    if (n % V == 0 && j0 + V <= n) {
      Vector16<T> packed;
#pragma unroll
      for (int v = 0; v < V; ++v) packed.v[v] = run[v];
      *reinterpret_cast<Vector16<T>*>(squared + i * n + j0) = packed;
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        if (j0 + v < n) squared[i * n + j0 + v] = run[v];
    }
  }

  template <int P, int V>
  __device__ void tile(const Index (&rows)[P], const Index (&cols)[P], T (&acc)[P][P], Index m,
                       Index n, bool mirror) const {
    using Key = decltype(exact.key(0));
    double row_norm[P], col_norm[P];
    Key row_key[P], col_key[P];
#pragma unroll
    for (int r = 0; r < P; ++r) {
      row_norm[r] = rows[r] < m ? norms[rows[r]] : 0.0;
      row_key[r] = exact.key(rows[r] < m ? rows[r] : 0);
    }
#pragma unroll
    for (int c = 0; c < P; ++c) {
      col_norm[c] = cols[c] < n ? norms[cols[c]] : 0.0;
      col_key[c] = exact.key(cols[c] < n ? cols[c] : 0);
    }
#pragma unroll
    for (int r = 0; r < P; ++r)
#pragma unroll
      for (int c = 0; c < P; ++c)
        if (rows[r] < m && cols[c] < n)
          acc[r][c] = entry(rows[r], cols[c], row_norm[r] + col_norm[c],
                            exact.same(row_key[r], col_key[c]), acc[r][c]);
#pragma unroll
    for (int r = 0; r < P; ++r) {
      if (rows[r] >= m) continue;
#pragma unroll
      for (int g = 0; g < P / V; ++g) {
        T run[V];
#pragma unroll
        for (int v = 0; v < V; ++v) run[v] = acc[r][g * V + v];
        store_run<V>(rows[r], cols[g * V], run);
      }
    }
    if (!mirror) return;
#pragma unroll
    for (int c = 0; c < P; ++c) {
      if (cols[c] >= n) continue;
#pragma unroll
      for (int g = 0; g < P / V; ++g) {
        T run[V];
#pragma unroll
        for (int v = 0; v < V; ++v) run[v] = acc[g * V + v][c];
        store_run<V>(cols[c], rows[g * V], run);
      }
    }
  }
};

/// The pairs that carry weight in the losses whose positive pairs do: equal labels.
template <class L>
struct SameLabel {
  VectorView<L> labels;
  __device__ L key(Index i) const { return labels[i]; }
  __device__ static bool same(L a, L b) { return a == b; }
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

  template <int P, int V>
  __device__ void tile(const Index (&rows)[P], const Index (&cols)[P], const T (&acc)[P][P],
                       Index m, Index n, bool) const {
    const Index d = grad.cols;
    const double factor = 2.0 * *scale;
    const bool nan_out = *not_finite != 0;
#pragma unroll
    for (int r = 0; r < P; ++r) {
      const Index i = rows[r];
      if (i >= m) continue;
      const double row_sum = row_sums[i];
#pragma unroll
      for (int c = 0; c < P; ++c) {
        const Index j = cols[c];
        if (j >= n) continue;
        double value = row_sum * static_cast<double>(centred[i * d + j]) - static_cast<double>(acc[r][c]);
        if (near) value += near[i * d + j];
        grad(i, j) = nan_out ? static_cast<T>(nan("")) : static_cast<T>(factor * value);
      }
    }
  }
};

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
  return enqueue_tiled_product<T, true, true>(
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

/// The gradient of a loss of the distances from its W = dL/dD2 (N x N doubles, overwritten):
/// S = W + W^T in place, S as T over D2 with near pairs by differences (finish_weights_kernel),
/// then enqueue_weighted_gradient with the scale the loss's reduction set.
template <class T>
cudaError_t enqueue_distance_weights_gradient(const BatchParts<T>& parts, double* weights,
                                              const MatrixView<const T>& x,
                                              const MatrixView<T>& grad, cudaStream_t stream) noexcept {
  const Index n = x.rows;
  const auto tiles = static_cast<unsigned>((n + symmetrise_tile - 1) / symmetrise_tile);
  symmetrise_kernel<T><<<dim3(tiles, tiles), 256, 0, stream>>>(weights, n);
  finish_weights_kernel<<<static_cast<unsigned>(n), weight_threads, 0, stream>>>(
      weights, parts.squared, n, x, parts.norms, parts.row_sums, parts.near);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  return enqueue_weighted_gradient(parts, n, grad, stream);
}

}  // namespace cuda
}  // namespace detail
}  // namespace metricloss
