#pragma once
// Contrastive loss on CUDA: one fused pass reads a_i, b_i and the similarity of each pair
// once, reduces d_i^2 = ||a_i - b_i||^2 in double, and writes both gradient rows
//   grad_a_i = -grad_b_i = top_diff/N * c_i (a_i - b_i)        (c_i: detail::contrastive_pair)
// (16 D + 4 bytes of DRAM traffic per float pair with both gradients), then
// L = 1/(2N) sum_i term_i by the deterministic two-stage sum of rows.cuh. The gradient loop
// re-reads the row, which the distance loop has just brought into L1.
#include <metricloss/backend/cuda/rows.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/contrastive.hpp>

#include <cuda_runtime.h>

namespace metricloss {
namespace detail {
namespace cuda {

/// The per-row work of rows.cuh for one contrastive pair.
template <class T, class Source>
struct ContrastiveRows {
  MatrixView<const T> a, b;
  Source similarity;
  double margin;
  ContrastiveForm form;
  MatrixView<T> grad_a, grad_b;  // either may be empty (not wanted)
  double scale;                  // top_diff / N

  template <int Width, class Reduce>
  __device__ double row(Index i, bool active, int rank, Reduce&& reduce) const {
    const Index d = a.cols;
    const T* a_row = a.row(i);
    const T* b_row = b.row(i);
    double squared = 0.0;
    if (active) {
#pragma unroll 4
      for (Index j = rank; j < d; j += Width) {
        const double diff = static_cast<double>(a_row[j]) - static_cast<double>(b_row[j]);
        squared = fma(diff, diff, squared);
      }
    }
    squared = reduce(squared);
    if (!active) return 0.0;
    const PairTerm t = contrastive_pair(squared, similarity(i), margin, form);
    if (!grad_a.empty() || !grad_b.empty()) {
      const double c = scale * t.coefficient;
      T* ga = grad_a.empty() ? nullptr : grad_a.row(i);
      T* gb = grad_b.empty() ? nullptr : grad_b.row(i);
#pragma unroll 4
      for (Index j = rank; j < d; j += Width) {
        const T value = static_cast<T>(c * (static_cast<double>(a_row[j]) - static_cast<double>(b_row[j])));
        if (ga) ga[j] = value;
        if (gb) gb[j] = -value;
      }
    }
    return t.term;
  }
};

template <class T, class Source>
cudaError_t contrastive_enqueue(void* workspace, std::size_t workspace_bytes,
                                const ContrastiveRows<T, Source>& work, T* device_loss,
                                cudaStream_t stream) noexcept {
  const Index n = work.a.rows;
  return enqueue_rows(work, n, work.a.cols, 1.0 / (2.0 * static_cast<double>(n)), workspace,
                      workspace_bytes, device_loss, stream);
}

}  // namespace cuda
}  // namespace detail

namespace cuda_core {

/// Device workspace (bytes) that contrastive_forward_backward needs for N pairs of D columns.
template <class T>
std::size_t contrastive_workspace_bytes(Index n, Index d) noexcept {
  return detail::cuda::rows_workspace_bytes(n, d);
}

/// The contrastive loss of API.md on device memory, enqueued on `stream`; the loss goes to
/// `device_loss` (one T in device memory); gradients with data == nullptr are skipped. No
/// allocation, no synchronisation, no exception: returns cudaErrorInvalidValue for N or D
/// < 1, a null device_loss or a workspace smaller than contrastive_workspace_bytes, else the
/// launch status. Shapes, margin and aliasing are the caller's responsibility here (the
/// functor path checks them).
template <class T, class S>
cudaError_t contrastive_forward_backward(void* workspace, std::size_t workspace_bytes,
                                         const DeviceMatrix<const T>& a,
                                         const DeviceMatrix<const T>& b, const DeviceVector<S>& sim,
                                         T margin, ContrastiveForm form,
                                         const DeviceMatrix<T>& grad_a, const DeviceMatrix<T>& grad_b,
                                         T top_diff, T* device_loss, cudaStream_t stream) noexcept {
  const detail::cuda::ContrastiveRows<T, detail::SimilarityVector<S>> work{
      a, b, {sim}, margin, form, grad_a, grad_b,
      static_cast<double>(top_diff) / static_cast<double>(a.rows)};
  return detail::cuda::contrastive_enqueue(workspace, workspace_bytes, work, device_loss, stream);
}

/// As above, pair i similar when labels_a[i] == labels_b[i].
template <class T, class L, class M>
cudaError_t contrastive_forward_backward(void* workspace, std::size_t workspace_bytes,
                                         const DeviceMatrix<const T>& a,
                                         const DeviceMatrix<const T>& b,
                                         const DeviceVector<L>& labels_a,
                                         const DeviceVector<M>& labels_b, T margin,
                                         ContrastiveForm form, const DeviceMatrix<T>& grad_a,
                                         const DeviceMatrix<T>& grad_b, T top_diff, T* device_loss,
                                         cudaStream_t stream) noexcept {
  const detail::cuda::ContrastiveRows<T, detail::LabelPair<L, M>> work{
      a, b, {labels_a, labels_b}, margin, form, grad_a, grad_b,
      static_cast<double>(top_diff) / static_cast<double>(a.rows)};
  return detail::cuda::contrastive_enqueue(workspace, workspace_bytes, work, device_loss, stream);
}

}  // namespace cuda_core

namespace detail {

/// The functor path: validated views in, workspace from the functor's slot, cuda_error on
/// failure. Also serves cuda_deferred_tag<T> (loss left in device memory, NaN returned).
template <class T>
struct CudaContrastiveBackend {
  template <class Source>
  static T run(ContrastiveLoss<T>& loss, cudaStream_t stream, T* deferred_loss,
               const MatrixView<const T>& a, const MatrixView<const T>& b,
               const Source& similarity, const MatrixView<T>& grad_a,
               const MatrixView<T>& grad_b, T top_diff) {
    const cuda::ContrastiveRows<T, Source> work{
        a, b, similarity, static_cast<double>(loss.margin), loss.form, grad_a, grad_b,
        static_cast<double>(top_diff) / static_cast<double>(a.rows)};
    return cuda::run_functor_path<T>(
        BackendSlotAccess::of(loss), "metricloss::ContrastiveLoss::forward_backward (cuda)", stream,
        cuda_core::contrastive_workspace_bytes<T>(a.rows, a.cols), deferred_loss,
        [&](void* workspace, std::size_t bytes, T* device_loss) {
          return cuda::contrastive_enqueue(workspace, bytes, work, device_loss, stream);
        });
  }
};

template <class T>
struct Backend<ContrastiveLoss<T>, cuda_tag> : cuda::FunctorBackend<CudaContrastiveBackend<T>> {};
template <class T>
struct Backend<ContrastiveLoss<T>, cuda_deferred_tag<T>> : cuda::FunctorBackend<CudaContrastiveBackend<T>> {};

}  // namespace detail
}  // namespace metricloss
