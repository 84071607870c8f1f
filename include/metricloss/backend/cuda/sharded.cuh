#pragma once
// Sharded batch losses on metricloss::cuda (API.md, "Global batches across processes"):
// `loss.forward_backward(ml::cuda.on(s).sharded(group), x_r, y_r, g_r, top_diff)` with x_r,
// y_r and g_r in device memory. After the agreement of detail/sharded.hpp (host statuses,
// the same on every path):
//  2. X and the labels gathered in rank order into device memory: through the group's
//     allgatherv_device on stream s where it has one (metricloss::nccl_group), else staged
//     through host memory and the group's host allgatherv (thread_group, mpi_group: no
//     CUDA-aware MPI assumed);
//  3. the single-process CUDA backend on the gathered X (deterministic: the same kernels on
//     the same bits give every rank the same loss), this rank's rows of its gradient copied
//     out, then the loss copied to the host: one stream synchronisation, as the plain call.
// This is the gather-everything path (O(N^2 D) per rank); the statistics paths of
// backend/sharded_*.hpp are host code so far. normalize = true: in step 1 each rank writes
// its unit rows into device workspace (normalize.cuh's kernel) and reads the zero-row
// verdict (a synchronisation before the agreement, so that a zero row on any rank fails on
// every rank); step 2 gathers the unit rows, step 3 chains this rank's gradient rows. A CUDA
// failure inside a collective throws on the rank that saw it; the others may then wait in
// the group's next collective.
#include <metricloss/backend/cuda/normalize.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/sharded.hpp>
#include <metricloss/detail/views.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <optional>
#include <type_traits>
#include <utility>

namespace metricloss {

namespace detail {

template <>
struct PathName<cuda_tag> {
  static constexpr const char* value = "cuda";
};

/// Groups that move device memory themselves: allgatherv_device(send, bytes, recv, counts,
/// offsets, stream), enqueued on the stream.
template <class Group, class = void>
struct gathers_device : std::false_type {};
template <class Group>
struct gathers_device<Group, std::void_t<decltype(std::declval<Group&>().allgatherv_device(
                                 static_cast<const void*>(nullptr), std::size_t{},
                                 static_cast<void*>(nullptr),
                                 static_cast<const std::size_t*>(nullptr),
                                 static_cast<const std::size_t*>(nullptr), cudaStream_t{}))>>
    : std::true_type {};

namespace cuda {

/// What a functor keeps for its sharded CUDA calls: device memory per (device, stream) for X,
/// the labels, the gradient of X and the loss, and host staging for groups without device
/// collectives. Grow-only: a warm call allocates nothing.
struct ShardedScratch : BackendSlot::Contents {
  FunctorWorkspaces device;
  GrowOnlyBuffer<char> host_send, host_recv;
};

/// Copies `rows` rows of `width` bytes, `from_pitch` and `to_pitch` bytes apart, in stream order.
inline void copy_rows(void* to, std::size_t to_pitch, const void* from, std::size_t from_pitch,
                      std::size_t width, Index rows, cudaMemcpyKind kind, cudaStream_t stream) {
  if (rows <= 0 || width == 0) return;
  throw_on_error(cudaMemcpy2DAsync(to, to_pitch, from, from_pitch, width,
                                   static_cast<std::size_t>(rows), kind, stream),
                 "metricloss: sharded cudaMemcpy2DAsync");
}

/// The bytes between rows of a view: its stride, or the row itself where one row (or none)
/// leaves the stride free (cudaMemcpy2D needs pitch >= width).
inline std::size_t pitch_of(Index rows, Index stride, std::size_t element, std::size_t width) {
  return rows > 1 ? element * static_cast<std::size_t>(stride) : width;
}

/// Gathers this rank's rows (device memory at `rows_data`, `pitch` bytes apart) into `recv`
/// (device memory, dense, every rank's rows of `width` bytes in rank order), on every rank;
/// `first` is this rank's first row of the global batch.
template <class Group>
void gather_device_rows(Group& group, ShardedScratch& work, GrowOnlyBuffer<std::size_t>& bytes,
                        const ShardStatus* status, Index first, const void* rows_data,
                        std::size_t pitch, std::size_t width, void* recv, cudaStream_t stream) {
  const int rank = group.rank();
  const ExchangeLayout layout = exchange_layout(group.size(), bytes, [&](int q) {
    return static_cast<std::size_t>(status[q].rows) * width;
  });
  const std::size_t mine = layout.counts[rank];
  const Index rows = static_cast<Index>(status[rank].rows);
  char* const all = static_cast<char*>(recv);
  if constexpr (gathers_device<Group>::value) {
    // This rank's rows go to their place first; the group then sends them from there.
    copy_rows(all + static_cast<std::size_t>(first) * width, width, rows_data, pitch, width, rows,
              cudaMemcpyDeviceToDevice, stream);
    group.allgatherv_device(all + layout.offsets[rank], mine, all, layout.counts, layout.offsets,
                            stream);
  } else {
    char* send = work.host_send.data(mine > 0 ? mine : 1);
    char* host = work.host_recv.data(layout.total > 0 ? layout.total : 1);
    copy_rows(send, width, rows_data, pitch, width, rows, cudaMemcpyDeviceToHost, stream);
    throw_on_error(cudaStreamSynchronize(stream), "metricloss: sharded cudaStreamSynchronize");
    group.allgatherv(send, mine, host, layout.counts, layout.offsets);
    if (layout.total > 0)
      throw_on_error(cudaMemcpyAsync(all, host, layout.total, cudaMemcpyHostToDevice, stream),
                     "metricloss: sharded cudaMemcpyAsync");
  }
}

/// The device parts of one call, carved from one workspace (a null base only counts them).
template <class T, class Label>
struct ShardedLayout {
  WorkspaceCarver carve;
  T* x;           // N x D: the global batch
  Label* labels;  // N
  T* grad;        // N x D: its gradient (none without one)
  T* loss;        // one T (in a double's room)
  ShardedLayout(void* base, Index n, Index d, bool gradient)
      : carve(base),
        x(carve.take<T>(static_cast<std::size_t>(n * d))),
        labels(carve.take<Label>(static_cast<std::size_t>(n))),
        grad(carve.take<T>(gradient ? static_cast<std::size_t>(n * d) : 0)),
        loss(reinterpret_cast<T*>(carve.take<double>(1))) {}
};

}  // namespace cuda

template <>
struct ShardedDevice<cuda_tag> {
  /// Step 1 with normalize = true: this rank's unit rows into device workspace; a zero row
  /// fails through `check` (the verdict read by one synchronisation). A rank without rows
  /// has nothing to normalise.
  template <class Loss, class Group, class T>
  static void normalize_rows(Loss& loss, const sharded_tag<cuda_tag, Group>& tag, Validator& check,
                             const MatrixView<const T>& x, bool gradient) {
    if (x.rows == 0) return;
    const cudaStream_t stream = tag.base.stream;
    const char* where = "metricloss: sharded normalize (cuda)";
    const auto unit = cuda::unit_rows_workspace<T>(loss, stream, x.rows, x.cols, gradient);
    MatrixView<T> rows, rows_grad;
    cuda::throw_on_error(
        cuda_core::normalize_rows<T>(unit.memory, unit.bytes, x, gradient, &rows, &rows_grad, stream), where);
    auto* verdict = static_cast<unsigned long long*>(unit.workspace->host_slot());
    cuda::throw_on_error(cudaMemcpyAsync(verdict, unit.layout.zero_row, sizeof(unsigned long long),
                                         cudaMemcpyDeviceToHost, stream),
                         where);
    cuda::throw_on_error(cudaStreamSynchronize(stream), where);
    if (*verdict != cuda::no_zero_row) fail_zero_row(check, "x", static_cast<Index>(*verdict), x.rows, x.cols);
  }

  template <class Loss, class Group, class T, class L>
  static T run(Loss& loss, const sharded_tag<cuda_tag, Group>& tag, const MatrixView<const T>& x,
               const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff,
               const ShardStatus* status, Index n, Index first,
               GrowOnlyBuffer<std::size_t>& bytes) {
    Group& group = *tag.group;
    const cudaStream_t stream = tag.base.stream;
    const Index d = static_cast<Index>(status[0].cols);
    using Label = std::remove_const_t<L>;
    auto& work = scratch_of<cuda::ShardedScratch>(loss);
    const bool gradient = !grad.empty();
    cuda::Workspace& workspace = work.device.for_stream(stream);
    const cuda::ShardedLayout<T, Label> parts(
        workspace.device_memory(cuda::ShardedLayout<T, Label>(nullptr, n, d, gradient).carve.bytes()),
        n, d, gradient);
    // normalize = true: the unit rows of step 1 are gathered, and this rank's gradient rows
    // land next to them, to be chained into grad.
    const bool unit = loss.normalize && x.rows > 0;
    MatrixView<const T> rows = x;
    MatrixView<T> rows_grad = grad;
    std::optional<cuda::UnitRowsWorkspace<T>> unit_rows;
    if (unit) {
      unit_rows = cuda::unit_rows_workspace<T>(loss, stream, x.rows, d, gradient);
      rows = {unit_rows->layout.unit, x.rows, d, d};
      if (gradient) rows_grad = {unit_rows->layout.unit_grad, x.rows, d, d};
    }

    // 2. The global batch, in rank order (a rank without rows sends nothing).
    const std::size_t row_bytes = sizeof(T) * static_cast<std::size_t>(d);
    cuda::gather_device_rows(group, work, bytes, status, first, rows.data,
                             cuda::pitch_of(rows.rows, rows.stride, sizeof(T), row_bytes), row_bytes,
                             parts.x, stream);
    cuda::gather_device_rows(group, work, bytes, status, first, labels.data,
                             cuda::pitch_of(labels.size, labels.stride, sizeof(Label), sizeof(Label)),
                             sizeof(Label), parts.labels, stream);

    // 3. The single-process backend on X; this rank's rows of its gradient; L to the host.
    MatrixView<T> all_grad{};
    if (gradient) all_grad = {parts.grad, n, d, d};
    Backend<Loss, cuda_deferred_tag<T>>::forward_backward(
        loss, cuda_deferred_tag<T>(stream, parts.loss), MatrixView<const T>{parts.x, n, d, d},
        VectorView<Label>{parts.labels, n, 1}, all_grad, top_diff);
    if (gradient)
      cuda::copy_rows(rows_grad.data, cuda::pitch_of(rows_grad.rows, rows_grad.stride, sizeof(T), row_bytes),
                      parts.grad + static_cast<std::size_t>(first * d), row_bytes, row_bytes,
                      rows_grad.rows, cudaMemcpyDeviceToDevice, stream);
    if (unit && gradient)
      cuda::throw_on_error(cuda_core::normalize_chain<T>(unit_rows->memory, unit_rows->bytes, x, grad,
                                                         parts.loss, nullptr, stream),
                           "metricloss: sharded normalize (cuda)");
    return cuda::loss_to_host(workspace, parts.loss, stream, "metricloss: sharded loss to host");
  }
};

}  // namespace detail
}  // namespace metricloss
