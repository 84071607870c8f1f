#pragma once
// Lifted structured loss on CUDA, the factorisation of <metricloss/lifted_structure.hpp>:
//   1. centre the batch (xc = x - mean, n_i = ||xc_i||^2);
//   2. D2 = n_i + n_j - 2 xc xc^T by a shared-memory tiled product into one N x N buffer
//      (small entries and positive pairs recomputed by differences in double: pairwise.cuh);
//   3. per row i (a block each): the nearest negative and the shifted sum, hence a_i;
//   4. per row i: the positive pairs' hinges h_ij, c_i = sum_j h_ij sigma(a_i - a_j), the
//      row's share of sum_{i<j} h_ij^2 and of |P|; then one block reduces L = sum/(2|P|);
//   5. (gradient) per row i, in place over D2: S_ik = W_ik + W_ki and its row sum, near
//      pairs (S ~ 1/D) taken out and applied by differences;
//   6. (gradient) dX = 2 top_diff/|P| ((diag(S 1) - S) xc + near) by the tiled product.
// The only N x N storage is the one buffer of step 2, reused by step 5 (N = 16384 in float:
// 1 GiB). Every sum has a fixed order: bitwise deterministic, no floating-point atomics.
#include <metricloss/backend/cuda/pairwise.cuh>
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/lifted_structure.hpp>

#include <cuda_runtime.h>

#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {
namespace cuda {

constexpr int lifted_threads = weight_threads;  // add_near_chunk's block size

/// Per-row arrays of the lifted kernels (each N doubles) and the call's scalars.
struct LiftedRows {
  double* log_normaliser;
  double* min_distance;
  double* shifted_sum;
  double* coefficient;
  double* pair_loss;   // sum_{j > i, y_j = y_i} h_ij^2
  double* pair_count;  // |{j > i : y_j = y_i}|
  double* row_sum;     // sum_k S_ik (BatchParts)
  double* gradient_scale;
  int* not_finite;
};

template <class L>
__device__ inline bool label_is_nan(L label) {
  if constexpr (std::is_floating_point<L>::value) return label != label;
  return false;
}

/// Step 3: nearest negative distance, shifted sum and a_i of row blockIdx.x.
template <class T, class L>
__global__ void __launch_bounds__(lifted_threads)
    lifted_row_normaliser_kernel(const T* squared, Index n, VectorView<L> labels, double margin,
                                 LiftedRows rows) {
  __shared__ double shared[lifted_threads / warp_size];
  const Index i = blockIdx.x;
  const L label = labels[i];
  if (threadIdx.x == 0 && label_is_nan(label)) atomicOr(rows.not_finite, 1);
  const T* row = squared + i * n;
  double nearest = std::numeric_limits<double>::infinity();
  for (Index k = threadIdx.x; k < n; k += lifted_threads)
    if (labels[k] != label) nearest = fmin(nearest, sqrt(static_cast<double>(row[k])));
  nearest = block_min<lifted_threads>(nearest, shared);
  double sum = 0.0;
  for (Index k = threadIdx.x; k < n; k += lifted_threads)
    if (labels[k] != label) sum += exp(nearest - sqrt(static_cast<double>(row[k])));
  sum = block_sum<lifted_threads>(sum, shared);
  if (threadIdx.x == 0) {
    rows.min_distance[i] = nearest;
    rows.shifted_sum[i] = sum;
    rows.log_normaliser[i] = lifted_log_normaliser(margin, nearest, sum);
  }
}

/// Step 4: the positive pairs of row blockIdx.x.
template <class T, class L>
__global__ void __launch_bounds__(lifted_threads)
    lifted_row_pairs_kernel(const T* squared, Index n, VectorView<L> labels, LiftedRows rows) {
  __shared__ double shared[lifted_threads / warp_size];
  const Index i = blockIdx.x;
  const L label = labels[i];
  const double a_i = rows.log_normaliser[i];
  const T* row = squared + i * n;
  double coefficient = 0.0, loss = 0.0, count = 0.0;
  for (Index j = threadIdx.x; j < n; j += lifted_threads) {
    if (j == i || !(labels[j] == label)) continue;
    const LiftedPair pair = lifted_pair(a_i, rows.log_normaliser[j], sqrt(static_cast<double>(row[j])));
    coefficient += pair.hinge * pair.share_i;
    if (j > i) {
      loss += pair.hinge * pair.hinge;
      count += 1.0;
    }
  }
  coefficient = block_sum<lifted_threads>(coefficient, shared);
  loss = block_sum<lifted_threads>(loss, shared);
  count = block_sum<lifted_threads>(count, shared);
  if (threadIdx.x == 0) {
    rows.coefficient[i] = coefficient;
    rows.pair_loss[i] = loss;
    rows.pair_count[i] = count;
  }
}

/// Step 4, second stage: L = sum/(2|P|) (0 when |P| = 0; NaN for non-finite data or labels)
/// and the gradient's scale top_diff/|P|.
template <class T>
__global__ void __launch_bounds__(finalize_threads)
    lifted_finalize_kernel(Index n, LiftedRows rows, double top_diff, T* device_loss) {
  __shared__ double shared[finalize_threads / warp_size];
  double loss = 0.0, count = 0.0;
  for (Index i = threadIdx.x; i < n; i += finalize_threads) {
    loss += rows.pair_loss[i];
    count += rows.pair_count[i];
  }
  loss = block_sum<finalize_threads>(loss, shared);
  count = block_sum<finalize_threads>(count, shared);
  if (threadIdx.x == 0) {
    const bool bad = *rows.not_finite != 0;
    const double value = count > 0.0 ? loss / (2.0 * count) : 0.0;
    *device_loss = bad ? static_cast<T>(nan("")) : static_cast<T>(value);
    *rows.gradient_scale = count > 0.0 ? top_diff / count : 0.0;
  }
}

/// Step 5: S_ik = W_ik + W_ki of row blockIdx.x written over its D2, sum_k S_ik (of the
/// stored, rounded entries), and near_i = sum over near k of S_ik (x_i - x_k) in double
/// (near pairs: Numerics<T>::near_ratio, see pairwise.cuh).
template <class T, class L>
__global__ void __launch_bounds__(lifted_threads)
    lifted_row_weights_kernel(T* squared, Index n, MatrixView<const T> x, const double* norms,
                              VectorView<L> labels, LiftedRows rows, double* near) {
  __shared__ double shared[lifted_threads / warp_size];
  __shared__ double near_weight[lifted_threads];
  const Index i = blockIdx.x, d = x.cols;
  const int tid = static_cast<int>(threadIdx.x);
  const L label = labels[i];
  const double a_i = rows.log_normaliser[i], c_i = rows.coefficient[i];
  const double min_i = rows.min_distance[i], sum_i = rows.shifted_sum[i];
  const double threshold_i = Numerics<T>::near_ratio * norms[i];
  T* row = squared + i * n;
  double* near_row = near + i * d;
  for (Index c = tid; c < d; c += lifted_threads) near_row[c] = 0.0;
  double row_sum = 0.0;
  for (Index k0 = 0; k0 < n; k0 += lifted_threads) {  // block-uniform bound
    const Index k = k0 + tid;
    double s = 0.0;
    bool is_near = false;
    if (k < n && k != i) {
      const double squared_distance = static_cast<double>(row[k]);
      const double distance = sqrt(squared_distance);
      if (labels[k] == label) {
        s = weight_on_squared(lifted_pair(a_i, rows.log_normaliser[k], distance).hinge, distance);
      } else {
        const double c_k = rows.coefficient[k];
        const double from_i =
            c_i == 0.0 ? 0.0 : lifted_negative_weight(-c_i / sum_i, exp(min_i - distance), distance);
        const double from_k =
            c_k == 0.0 ? 0.0
                       : lifted_negative_weight(-c_k / rows.shifted_sum[k],
                                                exp(rows.min_distance[k] - distance), distance);
        s = from_i + from_k;
      }
      is_near = s != 0.0 && squared_distance < threshold_i + Numerics<T>::near_ratio * norms[k];
    }
    if (k < n) {
      const T stored = is_near ? T(0) : static_cast<T>(s);
      row[k] = stored;
      row_sum += static_cast<double>(stored);
    }
    add_near_chunk(is_near, s, i, k0, x, near_row, near_weight);
  }
  row_sum = block_sum<lifted_threads>(row_sum, shared);
  if (tid == 0) rows.row_sum[i] = row_sum;
}

/// The workspace: the batch parts (pairwise.cuh), then the per-row arrays.
template <class T>
struct LiftedLayout {
  WorkspaceCarver carve;
  BatchParts<T> parts;
  LiftedRows rows{};

  LiftedLayout(void* workspace, Index n, Index d) : carve(workspace), parts(carve, n, d) {
    double** arrays[] = {&rows.log_normaliser, &rows.min_distance, &rows.shifted_sum,
                         &rows.coefficient,    &rows.pair_loss,    &rows.pair_count};
    for (double** array : arrays) *array = carve.take<double>(static_cast<std::size_t>(n));
    rows.row_sum = parts.row_sums;
    rows.gradient_scale = parts.gradient_scale;
    rows.not_finite = parts.not_finite;
  }
};

template <class T, class L>
cudaError_t lifted_enqueue(void* workspace, std::size_t workspace_bytes, const MatrixView<const T>& x,
                           const VectorView<L>& labels, double margin, const MatrixView<T>& grad,
                           double top_diff, T* device_loss, cudaStream_t stream) noexcept {
  const Index n = x.rows;
  if (n < 1 || x.cols < 1 || device_loss == nullptr || workspace == nullptr) return cudaErrorInvalidValue;
  const LiftedLayout<T> layout(workspace, n, x.cols);
  if (workspace_bytes < layout.carve.bytes()) return cudaErrorInvalidValue;
  const BatchParts<T>& parts = layout.parts;
  const LiftedRows& rows = layout.rows;
  cudaError_t error = enqueue_batch_distances(parts, x, labels, stream);
  if (error != cudaSuccess) return error;
  const auto blocks = static_cast<unsigned>(n);
  lifted_row_normaliser_kernel<<<blocks, lifted_threads, 0, stream>>>(parts.squared, n, labels, margin, rows);
  lifted_row_pairs_kernel<<<blocks, lifted_threads, 0, stream>>>(parts.squared, n, labels, rows);
  lifted_finalize_kernel<<<1, finalize_threads, 0, stream>>>(n, rows, top_diff, device_loss);
  error = cudaGetLastError();
  if (error != cudaSuccess || grad.empty()) return error;
  lifted_row_weights_kernel<<<blocks, lifted_threads, 0, stream>>>(parts.squared, n, x, parts.norms,
                                                                   labels, rows, parts.near);
  error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  return enqueue_weighted_gradient(parts, n, grad, stream);
}

}  // namespace cuda
}  // namespace detail

namespace cuda_core {

/// Device workspace (bytes) of lifted_structure_forward_backward for N rows of D columns:
/// dominated by one N x N matrix of T.
template <class T>
std::size_t lifted_structure_workspace_bytes(Index n, Index d) noexcept {
  return detail::cuda::LiftedLayout<T>(nullptr, n, d).carve.bytes();
}

/// The lifted structured loss of API.md on device memory, enqueued on `stream`; the loss
/// goes to `device_loss` (one T in device memory); grad.data == nullptr skips the gradient.
/// No allocation, no synchronisation, no exception: cudaErrorInvalidValue for N or D < 1, a
/// null device_loss or too small a workspace, else the launch status. Shapes, margin and
/// aliasing are the caller's responsibility here (the functor path checks them).
template <class T, class L>
cudaError_t lifted_structure_forward_backward(void* workspace, std::size_t workspace_bytes,
                                              const DeviceMatrix<const T>& x,
                                              const DeviceVector<L>& labels, T margin,
                                              const DeviceMatrix<T>& grad, T top_diff,
                                              T* device_loss, cudaStream_t stream) noexcept {
  return detail::cuda::lifted_enqueue(workspace, workspace_bytes, x, labels,
                                      static_cast<double>(margin), grad,
                                      static_cast<double>(top_diff), device_loss, stream);
}

}  // namespace cuda_core

namespace detail {

/// The functor path for both cuda tags (see CudaContrastiveBackend).
template <class T>
struct CudaLiftedStructureBackend {
  template <class L>
  static T run(LiftedStructureLoss<T>& loss, cudaStream_t stream, T* deferred_loss,
               const MatrixView<const T>& x, const VectorView<L>& labels,
               const MatrixView<T>& grad, T top_diff) {
    return cuda::run_functor_path<T>(
        BackendSlotAccess::of(loss), "metricloss::LiftedStructureLoss::forward_backward (cuda)", stream,
        cuda_core::lifted_structure_workspace_bytes<T>(x.rows, x.cols), deferred_loss,
        [&](void* workspace, std::size_t bytes, T* device_loss) {
          return cuda_core::lifted_structure_forward_backward<T, L>(
              workspace, bytes, x, labels, loss.margin, grad, top_diff, device_loss, stream);
        });
  }
};

template <class T>
struct Backend<LiftedStructureLoss<T>, cuda_tag> : cuda::FunctorBackend<CudaLiftedStructureBackend<T>> {};
template <class T>
struct Backend<LiftedStructureLoss<T>, cuda_deferred_tag<T>> : cuda::FunctorBackend<CudaLiftedStructureBackend<T>> {};

}  // namespace detail
}  // namespace metricloss
