#pragma once
// BatchTripletLoss on CUDA (all, hard and semihard mining; hinge or soft margin), the maths
// of <metricloss/batch_triplet.hpp> and the selection rules of
// detail/batch_triplet_mining.hpp:
//   1. centre the batch; D2 by the tiled product into one N x N buffer of T, positive pairs
//      and small entries by differences in double (pairwise.cuh);
//   2. mining, a block per anchor a (batch_triplet_mining.cuh): selections compare D2 (ties
//      to the lower index, as the CPU's ordered scans); hard and semihard terms use distances
//      by differences; `all` uses D2 for the negatives (as the CPU's product path). Each
//      anchor writes its row of W = d(sum)/dD2 (N x N doubles), its share of the sum and of
//      the count;
//   3. one block: L = sum / count (0 when count = 0; NaN for non-finite data or labels);
//   4. (gradient) S = W + W^T in place; per row, S as T over D2 with near pairs applied by
//      differences; dX = 2 top_diff/count ((diag(S 1) - S) xc + near) by the tiled product.
//      Hard mining's W has at most two entries per anchor, so it is kept sparse (as the
//      CPU's SparseWeights): row r of dX sums its entries by differences in double
//      (hard_gradient_kernel), with no N x N weights, no symmetrisation and no product.
// Memory: one N x N of T, and for `all` and semihard one N x N of double (N = 16384 in
// float: 3 GiB; hard: 1 GiB). Semihard keeps the dense W: its entries number 2 sum_a |P(a)|,
// up to 2 N (N - 1), and a workspace sized from N and D alone could not hold them in less.
// Semihard and `all` loop over an anchor's positives, each a pass over its row: O(N^2 K)
// work for classes of size K (the CPU's bucketed O(N^2 log K) is not ported).
// Deterministic throughout.
#include <metricloss/backend/cuda/batch_triplet_mining.cuh>
#include <metricloss/backend/cuda/exact.cuh>
#include <metricloss/backend/cuda/pairwise.cuh>
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/batch_triplet.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/triplet_math.hpp>

#include <cuda_runtime.h>

#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {
namespace cuda {

/// Step 3: L = sum / count, and the gradient's scale top_diff / count.
template <class T>
__global__ void __launch_bounds__(finalize_threads)
    batch_finalize_kernel(Index n, const double* anchor_sum, const double* anchor_count,
                          const int* not_finite, double top_diff, T* device_loss,
                          double* gradient_scale) {
  __shared__ double shared[finalize_threads / warp_size];
  double sum = 0.0, count = 0.0;
  for (Index i = threadIdx.x; i < n; i += finalize_threads) {
    sum += anchor_sum[i];
    count += anchor_count[i];
  }
  sum = block_sum<finalize_threads>(sum, shared);
  count = block_sum<finalize_threads>(count, shared);
  if (threadIdx.x == 0) {
    const double value = count > 0.0 ? sum / count : 0.0;
    *device_loss = *not_finite ? static_cast<T>(nan("")) : static_cast<T>(value);
    *gradient_scale = count > 0.0 ? top_diff / count : 0.0;
  }
}

constexpr int hard_gradient_threads = weight_threads;  // add_near_chunk's block

/// Hard mining's gradient from its sparse W: anchor a's entries are (a, rows[2a],
/// weights[2a]) and (a, rows[2a + 1], weights[2a + 1]) (row -1: no entry), and an entry
/// (i, j, w) adds 2 scale w (x_i - x_j) to row i and 2 scale w (x_j - x_i) to row j. Block r
/// adds its own two entries, then finds the other anchors whose entries name row r by a scan
/// of `rows` (O(N) ints, read from L2: O(N^2) in all, as the mining's pass over D2) and adds
/// theirs in anchor order (add_near_chunk), all by differences of the original rows in double,
/// into `sum` (row r of an N x D buffer): a fixed order, so deterministic, and exact for close
/// pairs. NaN rows where the data were not finite.
template <class T>
__global__ void __launch_bounds__(hard_gradient_threads)
    hard_gradient_kernel(MatrixView<const T> x, const int* rows, const double* weights,
                         double* sum, const double* scale, const int* not_finite, MatrixView<T> grad) {
  __shared__ double shared_weights[hard_gradient_threads];
  const Index r = blockIdx.x, n = x.rows, d = x.cols;
  const int tid = static_cast<int>(threadIdx.x);
  if (*not_finite != 0) {  // block-uniform
    for (Index c = tid; c < d; c += hard_gradient_threads) grad(r, c) = static_cast<T>(nan(""));
    return;
  }
  const T* xr = x.row(r);
  double* acc = sum + r * d;  // column c is thread (c mod threads)'s alone
  const int p = rows[2 * r], q = rows[2 * r + 1];
  const double wp = weights[2 * r], wq = weights[2 * r + 1];
  for (Index c = tid; c < d; c += hard_gradient_threads) {
    const double xc = static_cast<double>(xr[c]);
    double v = 0.0;
    if (p >= 0) v += wp * (xc - static_cast<double>(x(p, c)));
    if (q >= 0) v += wq * (xc - static_cast<double>(x(q, c)));
    acc[c] = v;
  }
  // An anchor's rows differ from it and from each other: at most one of them is r.
  for (Index a0 = 0; a0 < n; a0 += hard_gradient_threads) {
    const Index a = a0 + tid;
    const int slot = a >= n ? -1 : rows[2 * a] == r ? 0 : rows[2 * a + 1] == r ? 1 : -1;
    add_near_chunk(slot >= 0, slot >= 0 ? weights[2 * a + slot] : 0.0, r, a0, x, acc, shared_weights);
  }
  const double factor = 2.0 * *scale;
  for (Index c = tid; c < d; c += hard_gradient_threads) grad(r, c) = static_cast<T>(factor * acc[c]);
}

/// The workspace: the batch parts (pairwise.cuh), W (dense, or hard's two entries per anchor)
/// and the per-anchor sums.
template <class T>
struct BatchTripletLayout {
  WorkspaceCarver carve;
  BatchParts<T> parts;
  double* weights = nullptr;       // N x N: W, then S (all, semihard)
  int* hard_rows = nullptr;        // 2 N: anchor a's entries' rows (hard)
  double* hard_weights = nullptr;  // 2 N: their weights (hard)
  double* anchor_sum;
  double* anchor_count;

  BatchTripletLayout(void* workspace, Index n, Index d, bool sparse) : carve(workspace), parts(carve, n, d) {
    const auto un = static_cast<std::size_t>(n);
    if (sparse) {
      hard_rows = carve.take<int>(2 * un);
      hard_weights = carve.take<double>(2 * un);
    } else {
      weights = carve.take<double>(un * un);
    }
    anchor_sum = carve.take<double>(un);
    anchor_count = carve.take<double>(un);
  }
};

template <class T, class L>
cudaError_t batch_triplet_enqueue(void* workspace, std::size_t workspace_bytes,
                                  const MatrixView<const T>& x, const VectorView<L>& labels,
                                  double margin, Mining mining, Distance distance, bool soft_margin,
                                  const MatrixView<T>& grad, double top_diff, T* device_loss,
                                  cudaStream_t stream) noexcept {
  const Index n = x.rows;
  if (n < 1 || x.cols < 1 || device_loss == nullptr || workspace == nullptr) return cudaErrorInvalidValue;
  if (mining != Mining::all && mining != Mining::hard && mining != Mining::semihard) return cudaErrorInvalidValue;
  if (n > std::numeric_limits<int>::max()) return cudaErrorInvalidValue;  // hard's rows are int
  const bool sparse = mining == Mining::hard;
  const BatchTripletLayout<T> layout(workspace, n, x.cols, sparse);
  if (workspace_bytes < layout.carve.bytes()) return cudaErrorInvalidValue;
  const BatchParts<T>& parts = layout.parts;
  cudaError_t error = enqueue_batch_distances(parts, x, labels, stream);
  if (error != cudaSuccess) return error;
  const bool gradient = !grad.empty();
  const MiningArgs<T, L> args{parts.squared, parts.norms, n, x, labels, margin, mining, distance, soft_margin,
                              gradient ? layout.weights : nullptr, gradient ? layout.hard_rows : nullptr,
                              gradient ? layout.hard_weights : nullptr, layout.anchor_sum,
                              layout.anchor_count, parts.not_finite};
  const auto blocks = static_cast<unsigned>(n);
  mining_kernel<<<blocks, mining_threads, 0, stream>>>(args);
  batch_finalize_kernel<<<1, finalize_threads, 0, stream>>>(n, layout.anchor_sum, layout.anchor_count,
                                                            parts.not_finite, top_diff, device_loss,
                                                            parts.gradient_scale);
  error = cudaGetLastError();
  if (error != cudaSuccess || !gradient) return error;
  if (sparse) {
    hard_gradient_kernel<T><<<blocks, hard_gradient_threads, 0, stream>>>(
        x, layout.hard_rows, layout.hard_weights, parts.near, parts.gradient_scale, parts.not_finite, grad);
    return cudaGetLastError();
  }
  return enqueue_distance_weights_gradient(parts, layout.weights, x, grad, stream);
}

}  // namespace cuda
}  // namespace detail

namespace cuda_core {

/// Device workspace (bytes) of batch_triplet_forward_backward for N rows of D columns and
/// the given mining: one N x N matrix of T, and for `all` and semihard one of double.
template <class T>
std::size_t batch_triplet_workspace_bytes(Index n, Index d, Mining mining) noexcept {
  return detail::cuda::BatchTripletLayout<T>(nullptr, n, d, mining == Mining::hard).carve.bytes();
}

/// The workspace enough for every mining (the largest of the above).
template <class T>
std::size_t batch_triplet_workspace_bytes(Index n, Index d) noexcept {
  return batch_triplet_workspace_bytes<T>(n, d, Mining::all);
}

/// BatchTripletLoss of API.md on device memory, enqueued on `stream`; the loss goes to
/// `device_loss` (one T in device memory); grad.data == nullptr skips the gradient. No
/// allocation, no synchronisation, no exception: cudaErrorInvalidValue for N or D < 1, an
/// undeclared mining, a null device_loss or too small a workspace, else the launch status.
template <class T, class L>
cudaError_t batch_triplet_forward_backward(void* workspace, std::size_t workspace_bytes,
                                           const DeviceMatrix<const T>& x,
                                           const DeviceVector<L>& labels, T margin, Mining mining,
                                           Distance distance, bool soft_margin,
                                           const DeviceMatrix<T>& grad, T top_diff, T* device_loss,
                                           cudaStream_t stream) noexcept {
  return detail::cuda::batch_triplet_enqueue(workspace, workspace_bytes, x, labels,
                                             static_cast<double>(margin), mining, distance,
                                             soft_margin, grad, static_cast<double>(top_diff),
                                             device_loss, stream);
}

}  // namespace cuda_core

namespace detail {

/// The functor path for both cuda tags (see CudaContrastiveBackend).
template <class T>
struct CudaBatchTripletBackend {
  template <class L>
  static T run(BatchTripletLoss<T>& loss, cudaStream_t stream, T* deferred_loss,
               const MatrixView<const T>& x, const VectorView<L>& labels,
               const MatrixView<T>& grad, T top_diff) {
    return cuda::run_functor_path<T>(
        BackendSlotAccess::of(loss), "metricloss::BatchTripletLoss::forward_backward (cuda)", stream,
        cuda_core::batch_triplet_workspace_bytes<T>(x.rows, x.cols, loss.mining), deferred_loss,
        [&](void* workspace, std::size_t bytes, T* device_loss) {
          return cuda_core::batch_triplet_forward_backward<T, L>(
              workspace, bytes, x, labels, loss.margin, loss.mining, loss.distance,
              loss.soft_margin, grad, top_diff, device_loss, stream);
        });
  }
};

template <class T>
struct Backend<BatchTripletLoss<T>, cuda_tag> : cuda::FunctorBackend<CudaBatchTripletBackend<T>> {};
template <class T>
struct Backend<BatchTripletLoss<T>, cuda_deferred_tag<T>> : cuda::FunctorBackend<CudaBatchTripletBackend<T>> {};

}  // namespace detail
}  // namespace metricloss