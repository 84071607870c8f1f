#pragma once
// `normalize = true` on CUDA (detail/normalize.hpp has the maths and the host path):
//   1. a block per row: ||x_i|| in double (scaled by the row's largest entry where the plain
//      sum of squares would overflow or underflow, as detail::row_norm), u_i = x_i / ||x_i||
//      into workspace, and the lowest zero row's index (atomicMin);
//   2. the loss on U, its gradient dL/dU into workspace;
//   3. a block per row: dL/dx_i = (g_i - u_i (u_i . g_i)) / ||x_i||, u_i from x_i in double,
//      written to the caller's gradient only when no row is zero; with a zero row the
//      gradient is left untouched and the loss is NaN.
// The check cannot throw before the loss runs without a synchronisation, so the verdict
// travels with the loss: the call that returns a host value reads it with the value (one
// synchronisation, as without normalize) and throws invalid_argument; nothing has reached the
// caller's memory. `loss_to(d_loss)` never synchronises, so there a zero row gives a NaN at
// d_loss and an untouched gradient.
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/detail/normalize.hpp>
#include <metricloss/detail/views.hpp>

#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

namespace metricloss {
namespace detail {
namespace cuda {

constexpr int normalize_threads = 128;
/// No zero row: the verdict's initial value (all bits set by cudaMemsetAsync).
constexpr unsigned long long no_zero_row = ~0ull;

/// ||x_i|| as detail::row_norm computes it (the order of the sum aside): 0 only for a zero
/// row, NaN or inf for a non-finite one. Every thread of the block gets it.
template <class T>
__device__ double block_row_norm(const T* xi, Index d, double* shared) {
  double sum = 0.0;
  for (Index c = threadIdx.x; c < d; c += normalize_threads) {
    const double v = static_cast<double>(xi[c]);
    sum = fma(v, v, sum);
  }
  sum = block_sum<normalize_threads>(sum, shared);
  if ((sum >= 1e-290 && sum <= DBL_MAX) || isnan(sum)) return sqrt(sum);
  // Double rows with entries beyond ~1e154 or below ~1e-145 (never float rows).
  double largest = 0.0;
  for (Index c = threadIdx.x; c < d; c += normalize_threads)
    largest = fmax(largest, fabs(static_cast<double>(xi[c])));
  largest = block_max<normalize_threads>(largest, shared);
  if (largest == 0.0 || isinf(largest)) return largest;
  double scaled = 0.0;
  for (Index c = threadIdx.x; c < d; c += normalize_threads) {
    const double v = static_cast<double>(xi[c]) / largest;
    scaled = fma(v, v, scaled);
  }
  return largest * sqrt(block_sum<normalize_threads>(scaled, shared));
}

template <class T>
__global__ void __launch_bounds__(normalize_threads)
    unit_rows_kernel(MatrixView<const T> x, MatrixView<T> unit, double* norms,
                     unsigned long long* zero_row) {
  __shared__ double shared[normalize_threads / warp_size];
  const Index i = blockIdx.x;
  const T* xi = x.row(i);
  const double norm = block_row_norm(xi, x.cols, shared);
  if (threadIdx.x == 0) {
    norms[i] = norm;
    if (norm == 0.0) atomicMin(zero_row, static_cast<unsigned long long>(i));
  }
  // By the reciprocal, as the host (a zero row becomes NaN: its loss is overridden anyway).
  const double inverse = 1.0 / norm;
  T* ui = unit.row(i);
  for (Index c = threadIdx.x; c < x.cols; c += normalize_threads)
    ui[c] = static_cast<T>(static_cast<double>(xi[c]) * inverse);
}

/// Block i chains row i of the gradient (when wanted and no row is zero); block 0 also sets
/// the loss to NaN when a row is zero.
template <class T>
__global__ void __launch_bounds__(normalize_threads)
    chain_unit_rows_kernel(MatrixView<const T> x, const double* norms, MatrixView<const T> unit_grad,
                           MatrixView<T> grad, const unsigned long long* zero_row, T* device_loss) {
  __shared__ double shared[normalize_threads / warp_size];
  const bool rejected = *zero_row != no_zero_row;
  if (rejected) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *device_loss = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  if (grad.empty()) return;
  const Index i = blockIdx.x;
  const T* xi = x.row(i);
  const T* gi = unit_grad.row(i);
  const double inverse = 1.0 / norms[i];
  double along = 0.0;  // u_i . g_i
  for (Index c = threadIdx.x; c < x.cols; c += normalize_threads)
    along = fma(static_cast<double>(xi[c]) * inverse, static_cast<double>(gi[c]), along);
  along = block_sum<normalize_threads>(along, shared);
  T* out = grad.row(i);
  for (Index c = threadIdx.x; c < x.cols; c += normalize_threads)
    out[c] = static_cast<T>(
        (static_cast<double>(gi[c]) - static_cast<double>(xi[c]) * inverse * along) * inverse);
}

/// The workspace of one normalised call, carved in order (a null base counts the bytes).
template <class T>
struct NormalizeLayout {
  WorkspaceCarver carve;
  T* unit;
  T* unit_grad;
  double* norms;
  unsigned long long* zero_row;
  NormalizeLayout(void* base, Index n, Index d, bool gradient)
      : carve(base),
        unit(carve.take<T>(static_cast<std::size_t>(n * d))),
        unit_grad(gradient ? carve.take<T>(static_cast<std::size_t>(n * d)) : nullptr),
        norms(carve.take<double>(static_cast<std::size_t>(n))),
        zero_row(carve.take<unsigned long long>(1)) {}
};

}  // namespace cuda
}  // namespace detail

namespace cuda_core {

/// Device workspace (bytes) of normalize_rows for N rows of D columns, with or without room
/// for the gradient with respect to the unit rows.
template <class T>
std::size_t normalize_workspace_bytes(Index n, Index d, bool gradient) noexcept {
  return detail::cuda::NormalizeLayout<T>(nullptr, n, d, gradient).carve.bytes();
}

/// The unit rows of x, for a loss run on them by any core of this namespace. Step 1 of
/// backend/cuda/normalize.cuh: `unit` (N x D, dense, in the workspace) holds x_i / ||x_i||,
/// and `unit_grad` (null without gradient) is where the core must write dL/dU. No
/// allocation, no synchronisation, no exception.
template <class T>
cudaError_t normalize_rows(void* workspace, std::size_t workspace_bytes, const DeviceMatrix<const T>& x,
                           bool gradient, DeviceMatrix<T>* unit, DeviceMatrix<T>* unit_grad,
                           cudaStream_t stream) noexcept {
  const Index n = x.rows, d = x.cols;
  if (n < 1 || d < 1 || unit == nullptr || unit_grad == nullptr || workspace == nullptr ||
      workspace_bytes < normalize_workspace_bytes<T>(n, d, gradient))
    return cudaErrorInvalidValue;
  const detail::cuda::NormalizeLayout<T> layout(workspace, n, d, gradient);
  *unit = {layout.unit, n, d, d};
  *unit_grad = gradient ? DeviceMatrix<T>{layout.unit_grad, n, d, d} : DeviceMatrix<T>{};
  cudaError_t error = cudaMemsetAsync(layout.zero_row, 0xff, sizeof(unsigned long long), stream);
  if (error != cudaSuccess) return error;
  detail::cuda::unit_rows_kernel<T><<<static_cast<unsigned>(n), detail::cuda::normalize_threads, 0, stream>>>(
      x, *unit, layout.norms, layout.zero_row);
  return cudaGetLastError();
}

/// Step 3, after the core ran on the unit rows with its loss at `device_loss`: grad (null:
/// skipped) becomes dL/dx, or, when a row of x is zero, stays untouched and the loss becomes
/// NaN. `zero_row` (device memory, may be null) receives the lowest zero row's index, or
/// ~0ull for none. The same workspace and x as normalize_rows.
template <class T>
cudaError_t normalize_chain(void* workspace, std::size_t workspace_bytes, const DeviceMatrix<const T>& x,
                            const DeviceMatrix<T>& grad, T* device_loss,
                            unsigned long long* zero_row, cudaStream_t stream) noexcept {
  const Index n = x.rows, d = x.cols;
  const bool gradient = !grad.empty();
  if (n < 1 || d < 1 || device_loss == nullptr || workspace == nullptr ||
      workspace_bytes < normalize_workspace_bytes<T>(n, d, gradient))
    return cudaErrorInvalidValue;
  const detail::cuda::NormalizeLayout<T> layout(workspace, n, d, gradient);
  const DeviceMatrix<const T> unit_grad{layout.unit_grad, n, d, d};
  detail::cuda::chain_unit_rows_kernel<T>
      <<<static_cast<unsigned>(gradient ? n : 1), detail::cuda::normalize_threads, 0, stream>>>(
          x, layout.norms, unit_grad, grad, layout.zero_row, device_loss);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess || zero_row == nullptr) return error;
  return cudaMemcpyAsync(zero_row, layout.zero_row, sizeof(unsigned long long), cudaMemcpyDeviceToDevice,
                         stream);
}

}  // namespace cuda_core

namespace detail {
namespace cuda {

/// A call's unit rows and their gradient in the functor's normalize workspace of `stream`,
/// with `extra` bytes after them. Carving the same bytes again (the sharded call's steps 1
/// and 3) finds the rows in place.
template <class T>
struct UnitRowsWorkspace {
  Workspace* workspace;
  char* memory;
  std::size_t bytes;  // the unit rows' part: cuda_core::normalize_workspace_bytes
  NormalizeLayout<T> layout;
};

template <class T, class Loss>
UnitRowsWorkspace<T> unit_rows_workspace(Loss& loss, cudaStream_t stream, Index rows, Index d,
                                         bool gradient, std::size_t extra = 0) {
  Workspace& workspace = scratch_of<NormalizeWorkspaces>(loss).per_stream.for_stream(stream);
  const std::size_t bytes = cuda_core::normalize_workspace_bytes<T>(rows, d, gradient);
  char* memory = static_cast<char*>(workspace.device_memory(bytes + extra));
  return {&workspace, memory, bytes, NormalizeLayout<T>(memory, rows, d, gradient)};
}

/// The batch form on device memory: call(deferred tag, unit rows, their gradient) runs the
/// loss on the unit rows with its loss in device memory; the verdict comes back with the
/// loss (see the header comment).
template <class Loss, class T, class Call>
T normalized_on_device(Loss& loss, cudaStream_t stream, T* deferred_loss, Validator& check,
                       const MatrixView<const T>& x, const MatrixView<T>& grad, Call&& call) {
  const char* where = "metricloss: normalize (cuda)";
  const bool gradient = !grad.empty();
  // After the unit rows: the loss, in a double's room (bytes is a multiple of 256).
  const auto unit = unit_rows_workspace<T>(loss, stream, x.rows, x.cols, gradient, sizeof(double));
  T* own_loss = reinterpret_cast<T*>(unit.memory + unit.bytes);
  T* device_loss = deferred_loss ? deferred_loss : own_loss;
  MatrixView<T> rows, rows_grad;
  throw_on_error(cuda_core::normalize_rows<T>(unit.memory, unit.bytes, x, gradient, &rows, &rows_grad, stream),
                 where);
  call(cuda_deferred_tag<T>(stream, device_loss), MatrixView<const T>{rows.data, rows.rows, rows.cols, rows.stride},
       rows_grad);
  throw_on_error(cuda_core::normalize_chain<T>(unit.memory, unit.bytes, x, grad, device_loss, nullptr, stream),
                 where);
  if (deferred_loss) return std::numeric_limits<T>::quiet_NaN();
  // One synchronisation brings the loss and the verdict.
  auto* host = static_cast<double*>(unit.workspace->host_slot());
  throw_on_error(cudaMemcpyAsync(host, own_loss, sizeof(T), cudaMemcpyDeviceToHost, stream), where);
  throw_on_error(cudaMemcpyAsync(host + 1, unit.layout.zero_row, sizeof(unsigned long long),
                                 cudaMemcpyDeviceToHost, stream),
                 where);
  throw_on_error(cudaStreamSynchronize(stream), where);
  unsigned long long zero_row = 0;
  std::memcpy(&zero_row, host + 1, sizeof zero_row);
  if (zero_row != no_zero_row) fail_zero_row(check, "x", static_cast<Index>(zero_row), x.rows, x.cols);
  T value;
  std::memcpy(&value, host, sizeof value);
  return value;
}

}  // namespace cuda

/// Both cuda tags normalise on the device.
template <>
struct DeviceNormalize<cuda_tag> {
  static constexpr bool available = true;
  template <class Loss, class T, class Call>
  static T batch(Loss& loss, cuda_tag tag, Validator& check, const MatrixView<const T>& x,
                 const MatrixView<T>& grad, Call&& call) {
    return cuda::normalized_on_device<Loss, T>(loss, tag.stream, nullptr, check, x, grad, call);
  }
};

template <class T>
struct DeviceNormalize<cuda_deferred_tag<T>> {
  static constexpr bool available = true;
  template <class Loss, class Call>
  static T batch(Loss& loss, cuda_deferred_tag<T> tag, Validator& check, const MatrixView<const T>& x,
                 const MatrixView<T>& grad, Call&& call) {
    cuda::require_device_loss(tag.device_loss, "metricloss: cuda.loss_to");
    return cuda::normalized_on_device<Loss, T>(loss, tag.stream, tag.device_loss, check, x, grad, call);
  }
};

}  // namespace detail
}  // namespace metricloss
