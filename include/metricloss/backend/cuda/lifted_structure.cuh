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
// The kernels of steps 3 to 5 are in lifted_kernels.cuh.
#include <metricloss/backend/cuda/lifted_kernels.cuh>
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