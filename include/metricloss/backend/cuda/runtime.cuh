#pragma once
// The CUDA execution tag, the error type, and the workspace cache behind the functor path.
//
// Layering (as CUB): each loss has a `noexcept` core in namespace metricloss::cuda_core that
// returns cudaError_t and works in caller-owned device workspace (with a size query); the
// functor path (detail::Backend<Loss, cuda_tag>) takes its workspace from a cache, throws
// metricloss::cuda_error, and synchronises only to copy the loss back to the host.
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/errors.hpp>
#include <metricloss/exec.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace metricloss {

/// A CUDA runtime failure on the functor path: carries the cudaError_t and its string.
class cuda_error : public std::runtime_error {
 public:
  cuda_error(cudaError_t code, const std::string& where)
      : std::runtime_error(where + ": " + cudaGetErrorName(code) + ": " +
                           cudaGetErrorString(code)),
        code_(code) {}
  cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
};

/// Loss on device memory: every embedding, label and gradient map wraps device pointers
/// (or managed memory) of the current device. Work is ordered on `stream`; the returned
/// host loss value is the only synchronisation (of that stream alone).
template <class T>
struct cuda_deferred_tag;

struct cuda_tag {
  cudaStream_t stream = nullptr;

  constexpr cuda_tag() = default;
  explicit constexpr cuda_tag(cudaStream_t stream_) : stream(stream_) {}

  /// The same path on another stream (thrust's `par.on(stream)`).
  constexpr cuda_tag on(cudaStream_t stream_) const { return cuda_tag(stream_); }

  /// This path over a group's global batch (backend/cuda/sharded.cuh): device memory in and
  /// out, ordered on this tag's stream.
  template <class Group>
  constexpr sharded_tag<cuda_tag, Group> sharded(Group& group) const {
    return {*this, &group};
  }

  /// Never synchronises: the loss is written to `device_loss` (device memory, one T) in
  /// stream order, and the call returns NaN instead of the value.
  template <class T>
  constexpr cuda_deferred_tag<T> loss_to(T* device_loss) const;
};

/// cuda_tag whose loss goes to device memory; see cuda_tag::loss_to.
template <class T>
struct cuda_deferred_tag {
  cudaStream_t stream = nullptr;
  T* device_loss = nullptr;
  constexpr cuda_deferred_tag(cudaStream_t stream_, T* device_loss_)
      : stream(stream_), device_loss(device_loss_) {}
};

template <class T>
constexpr cuda_deferred_tag<T> cuda_tag::loss_to(T* device_loss) const {
  return cuda_deferred_tag<T>(stream, device_loss);
}

/// `metricloss::cuda` (legacy default stream) and `metricloss::cuda.on(stream)`.
inline constexpr cuda_tag cuda{};

namespace cuda_core {

/// Device views used by the cores: {data, rows, cols, stride} over device memory; an empty
/// matrix view (data == nullptr) is a gradient not wanted.
template <class T>
using DeviceMatrix = detail::MatrixView<T>;
template <class L>
using DeviceVector = detail::VectorView<L>;

}  // namespace cuda_core

namespace detail {
namespace cuda {

/// Bytes rounded up so that consecutive workspace parts stay 256-byte aligned.
constexpr std::size_t aligned_bytes(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

inline void throw_on_error(cudaError_t code, const char* where) {
  if (code != cudaSuccess) throw cuda_error(code, where);
}

/// Carves one workspace into 256-byte aligned parts, in order; with a null base it only
/// counts the bytes (the size query and the carving share one description).
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(void* base) : base_(static_cast<char*>(base)) {}
  template <class U>
  U* take(std::size_t count) {
    U* part = base_ ? reinterpret_cast<U*>(base_ + bytes_) : nullptr;
    bytes_ += aligned_bytes(sizeof(U) * count);
    return part;
  }
  std::size_t bytes() const { return bytes_; }

 private:
  char* base_;
  std::size_t bytes_ = 0;
};

/// loss_to(nullptr) is a caller's mistake, reported like every other bad argument.
template <class T>
void require_device_loss(const T* device_loss, const char* function) {
  if (device_loss == nullptr)
    throw metricloss::invalid_argument(std::string(function) +
                                       "(device_loss): device_loss is a null pointer");
}

/// Growth-only scratch of one (thread, device, stream): device bytes, allocated and freed in
/// stream order (cudaMallocAsync), and one pinned host slot to receive a loss value. Being
/// keyed by stream, consecutive uses are ordered by the stream itself.
class Workspace {
 public:
  Workspace(int device, cudaStream_t stream) : device_(device), stream_(stream) {}
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    // Errors are ignored: at process exit the runtime may already be unloading.
    int current = 0;
    if (cudaGetDevice(&current) != cudaSuccess) return;
    if (current != device_ && cudaSetDevice(device_) != cudaSuccess) return;
    if (device_bytes_) (void)cudaFree(device_memory_);  // synchronising, so no work is cut off
    if (host_slot_) (void)cudaFreeHost(host_slot_);
    if (current != device_) (void)cudaSetDevice(current);
  }

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }

  /// At least `bytes` of device memory, reallocated in stream order only when it grows.
  void* device_memory(std::size_t bytes) {
    if (bytes > device_bytes_) {
      if (device_memory_) throw_on_error(cudaFreeAsync(device_memory_, stream_), "metricloss: cudaFreeAsync");
      device_memory_ = nullptr;
      device_bytes_ = 0;
      throw_on_error(cudaMallocAsync(&device_memory_, bytes, stream_), "metricloss: cudaMallocAsync");
      device_bytes_ = bytes;
    }
    return device_memory_;
  }

  /// Pinned host memory for a loss value and one more word (two doubles: enough for any T,
  /// and the zero-row verdict of normalize = true).
  void* host_slot() {
    if (!host_slot_)
      throw_on_error(cudaMallocHost(&host_slot_, 2 * sizeof(double)), "metricloss: cudaMallocHost");
    return host_slot_;
  }

 private:
  int device_;
  cudaStream_t stream_;
  void* device_memory_ = nullptr;
  std::size_t device_bytes_ = 0;
  void* host_slot_ = nullptr;
};

/// A functor's CUDA workspaces, one per (device, stream), kept in the functor's backend
/// slot: they live and die with the functor (functors are used one per thread, so a
/// workspace never serves two concurrent calls), and keying by stream lets one functor drive
/// several streams without false dependencies.
struct FunctorWorkspaces : BackendSlot::Contents {
  std::vector<std::unique_ptr<Workspace>> workspaces;

  Workspace& for_stream(cudaStream_t stream) {
    int device = 0;
    throw_on_error(cudaGetDevice(&device), "metricloss: cudaGetDevice");
    for (auto& w : workspaces)
      if (w->device() == device && w->stream() == stream) return *w;
    workspaces.push_back(std::make_unique<Workspace>(device, stream));
    return *workspaces.back();
  }
};

/// The workspaces of normalize = true (backend/cuda/normalize.cuh), beside the loss's own:
/// the unit rows and their gradient.
struct NormalizeWorkspaces : BackendSlot::Contents {
  FunctorWorkspaces per_stream;
};

/// The staging of half / bfloat16 calls (backend/cuda/narrow.cuh): the widened inputs and
/// the gradients before rounding.
struct NarrowWorkspaces : BackendSlot::Contents {
  FunctorWorkspaces per_stream;
};

/// The loss at device_loss, after the stream's work so far, through the workspace's pinned
/// slot: the one synchronisation (of `stream` alone) of a call that returns it.
template <class T>
T loss_to_host(Workspace& workspace, const T* device_loss, cudaStream_t stream, const char* where) {
  T* host = static_cast<T*>(workspace.host_slot());
  throw_on_error(cudaMemcpyAsync(host, device_loss, sizeof(T), cudaMemcpyDeviceToHost, stream), where);
  throw_on_error(cudaStreamSynchronize(stream), where);
  return *host;
}

/// Runs a core on the functor path: workspace from the cache plus one slot for the loss,
/// errors thrown. `core(workspace, bytes, device_loss)` enqueues everything on the stream.
/// With `deferred_loss` the loss is left in device memory and NaN is returned; otherwise the
/// value is copied to pinned memory and the stream alone is synchronised.
template <class T, class Core>
T run_functor_path(BackendSlot& slot, const char* where, cudaStream_t stream,
                   std::size_t core_bytes, T* deferred_loss, Core&& core) {
  Workspace& workspace = slot.get<FunctorWorkspaces>().for_stream(stream);
  const std::size_t core_part = aligned_bytes(core_bytes);
  char* memory = static_cast<char*>(workspace.device_memory(core_part + sizeof(double)));
  T* device_loss = deferred_loss ? deferred_loss : reinterpret_cast<T*>(memory + core_part);
  throw_on_error(core(static_cast<void*>(memory), core_bytes, device_loss), where);
  if (deferred_loss) return std::numeric_limits<T>::quiet_NaN();
  return loss_to_host(workspace, device_loss, stream, where);
}

/// detail::Backend<Loss, cuda_tag> and <Loss, cuda_deferred_tag<T>> of every loss derive from
/// this: both tags reach Impl::run(loss, stream, deferred_loss or null, views...).
template <class Impl>
struct FunctorBackend {
  template <class Loss, class... Views>
  static auto forward_backward(Loss& loss, cuda_tag tag, const Views&... views) {
    using T = typename Loss::scalar_type;
    return Impl::run(loss, tag.stream, static_cast<T*>(nullptr), views...);
  }
  template <class Loss, class T, class... Views>
  static T forward_backward(Loss& loss, cuda_deferred_tag<T> tag, const Views&... views) {
    require_device_loss(tag.device_loss, "metricloss: cuda.loss_to");
    return Impl::run(loss, tag.stream, tag.device_loss, views...);
  }
};

}  // namespace cuda
}  // namespace detail

/// Frees a functor's CUDA workspaces now (e.g. after an unusually large batch, or before
/// destroying a stream it ran on); they are otherwise freed with the functor. Synchronising
/// (cudaFree); the next call allocates again.
template <class Loss>
void release_cuda_workspaces(Loss& loss) {
  auto& slot = detail::BackendSlotAccess::of(loss);
  slot.template reset<detail::cuda::FunctorWorkspaces>();
  slot.template reset<detail::cuda::NormalizeWorkspaces>();
  slot.template reset<detail::cuda::NarrowWorkspaces>();
}

}  // namespace metricloss
