#pragma once
// Explicit triplet loss on CUDA: one fused pass reads anchor_i, positive_i and negative_i
// once, reduces q_ap = ||a_i - p_i||^2 and q_an = ||a_i - n_i||^2 in double, takes the
// triplet's term and weights from detail::triplet_term, and writes the three gradient rows
//   grad_a = c_p (a - p) - c_n (a - n),  grad_p = -c_p (a - p),  grad_n = c_n (a - n),
//   c_x = 2 top_diff/N w_x
// (an inactive triplet writes zeros without re-reading its rows); then
// L = 1/N sum_i term_i by the deterministic two-stage sum of rows.cuh.
#include <metricloss/backend/cuda/rows.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/triplet.hpp>

#include <cuda_runtime.h>

namespace metricloss {
namespace detail {
namespace cuda {

/// The per-row work of rows.cuh for one explicit triplet.
template <class T>
struct TripletRows {
  MatrixView<const T> anchor, positive, negative;
  double margin;
  Distance distance;
  MatrixView<T> grad_anchor, grad_positive, grad_negative;  // any may be empty (not wanted)
  double scale;                                             // 2 top_diff / N

  template <int Width, class Reduce>
  __device__ double row(Index i, bool active, int rank, Reduce&& reduce) const {
    const Index d = anchor.cols;
    const T* a = anchor.row(i);
    const T* p = positive.row(i);
    const T* n = negative.row(i);
    double squared_positive = 0.0, squared_negative = 0.0;
    if (active) {
#pragma unroll 4
      for (Index j = rank; j < d; j += Width) {
        const double x = static_cast<double>(a[j]);
        const double to_p = x - static_cast<double>(p[j]);
        const double to_n = x - static_cast<double>(n[j]);
        squared_positive = fma(to_p, to_p, squared_positive);
        squared_negative = fma(to_n, to_n, squared_negative);
      }
    }
    squared_positive = reduce(squared_positive);
    squared_negative = reduce(squared_negative);
    if (!active) return 0.0;
    const TripletTerm t = triplet_term(squared_positive, squared_negative, margin, distance,
                                       /*soft_margin=*/false);
    if (grad_anchor.empty() && grad_positive.empty() && grad_negative.empty()) return t.loss;
    const double c_p = scale * t.positive_weight, c_n = scale * t.negative_weight;
    T* ga = grad_anchor.empty() ? nullptr : grad_anchor.row(i);
    T* gp = grad_positive.empty() ? nullptr : grad_positive.row(i);
    T* gn = grad_negative.empty() ? nullptr : grad_negative.row(i);
    if (c_p == 0.0 && c_n == 0.0) {
      for (Index j = rank; j < d; j += Width) {
        if (ga) ga[j] = T(0);
        if (gp) gp[j] = T(0);
        if (gn) gn[j] = T(0);
      }
      return t.loss;
    }
#pragma unroll 4
    for (Index j = rank; j < d; j += Width) {
      const double x = static_cast<double>(a[j]);
      const double to_p = c_p * (x - static_cast<double>(p[j]));
      const double to_n = c_n * (x - static_cast<double>(n[j]));
      if (ga) ga[j] = static_cast<T>(to_p - to_n);
      if (gp) gp[j] = static_cast<T>(-to_p);
      if (gn) gn[j] = static_cast<T>(to_n);
    }
    return t.loss;
  }
};

}  // namespace cuda
}  // namespace detail

namespace cuda_core {

/// Device workspace (bytes) that triplet_forward_backward needs for N triplets of D columns.
template <class T>
std::size_t triplet_workspace_bytes(Index n, Index d) noexcept {
  return detail::cuda::rows_workspace_bytes(n, d);
}

/// The explicit triplet loss of API.md on device memory, enqueued on `stream`; the loss goes
/// to `device_loss` (one T in device memory); gradients with data == nullptr are skipped.
/// No allocation, no synchronisation, no exception: cudaErrorInvalidValue for N or D < 1, a
/// null device_loss or too small a workspace, else the launch status. Shapes, margin and
/// aliasing are the caller's responsibility here (the functor path checks them).
template <class T>
cudaError_t triplet_forward_backward(void* workspace, std::size_t workspace_bytes,
                                     const DeviceMatrix<const T>& anchor,
                                     const DeviceMatrix<const T>& positive,
                                     const DeviceMatrix<const T>& negative, T margin,
                                     Distance distance, const DeviceMatrix<T>& grad_anchor,
                                     const DeviceMatrix<T>& grad_positive,
                                     const DeviceMatrix<T>& grad_negative, T top_diff,
                                     T* device_loss, cudaStream_t stream) noexcept {
  const Index n = anchor.rows;
  const detail::cuda::TripletRows<T> work{
      anchor, positive, negative, static_cast<double>(margin), distance, grad_anchor,
      grad_positive, grad_negative, 2.0 * static_cast<double>(top_diff) / static_cast<double>(n)};
  return detail::cuda::enqueue_rows(work, n, anchor.cols, 1.0 / static_cast<double>(n),
                                    workspace, workspace_bytes, device_loss, stream);
}

}  // namespace cuda_core

namespace detail {

/// The functor path for both cuda tags (see CudaContrastiveBackend).
template <class T>
struct CudaTripletBackend {
  static T run(TripletLoss<T>& loss, cudaStream_t stream, T* deferred_loss,
               const MatrixView<const T>& anchor, const MatrixView<const T>& positive,
               const MatrixView<const T>& negative, const MatrixView<T>& grad_anchor,
               const MatrixView<T>& grad_positive, const MatrixView<T>& grad_negative,
               T top_diff) {
    return cuda::run_functor_path<T>(
        BackendSlotAccess::of(loss), "metricloss::TripletLoss::forward_backward (cuda)", stream,
        cuda_core::triplet_workspace_bytes<T>(anchor.rows, anchor.cols), deferred_loss,
        [&](void* workspace, std::size_t bytes, T* device_loss) {
          return cuda_core::triplet_forward_backward<T>(
              workspace, bytes, anchor, positive, negative, loss.margin, loss.distance,
              grad_anchor, grad_positive, grad_negative, top_diff, device_loss, stream);
        });
  }
};

template <class T>
struct Backend<TripletLoss<T>, cuda_tag> : cuda::FunctorBackend<CudaTripletBackend<T>> {};
template <class T>
struct Backend<TripletLoss<T>, cuda_deferred_tag<T>> : cuda::FunctorBackend<CudaTripletBackend<T>> {};

}  // namespace detail
}  // namespace metricloss
