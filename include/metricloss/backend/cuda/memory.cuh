#pragma once
// Cross-batch memory on the device: CrossBatchMemory's FIFO ring (<metricloss/memory.hpp>,
// the same bookkeeping, detail::Ring) with its rows and labels in device memory, for the
// reference-set losses on metricloss::cuda:
//   metricloss::DeviceCrossBatchMemory<float> memory(capacity, dim);   // cudaMalloc, once
//   auto slots = memory.enqueue(ml::cuda.on(stream), x, labels);      // x, labels: device maps
//   loss.forward_backward(ml::cuda.on(stream), x, labels, memory.reference(slots), grad_x, ml::skip);
// enqueue is one kernel on the tag's stream (rows copied, labels converted to L): no
// allocation and no synchronisation after construction. The slots are host bookkeeping, as
// the host memory's, and serve as the self_index.
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/memory.hpp>
#include <metricloss/reference.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace metricloss {
namespace detail {
namespace cuda {

constexpr int enqueue_threads = 128;

/// Row `at.skipped + i` of the batch into slot (first + i) % capacity, a block per kept row.
template <class T, class LX, class L>
__global__ void __launch_bounds__(enqueue_threads)
    enqueue_rows_kernel(MatrixView<const T> x, VectorView<LX> labels, Index skipped, Index first,
                        Index capacity, T* rows, L* slot_labels) {
  const Index i = blockIdx.x, slot = (first + i) % capacity, d = x.cols;
  const T* from = x.row(skipped + i);
  T* to = rows + slot * d;
  for (Index c = threadIdx.x; c < d; c += enqueue_threads) to[c] = from[c];
  if (threadIdx.x == 0) slot_labels[slot] = static_cast<L>(labels[skipped + i]);
}

}  // namespace cuda
}  // namespace detail

/// A FIFO ring of `capacity` embeddings of dimension `dim` (scalar T) with labels (type L),
/// in device memory of the device current at construction. Not copyable; movable.
template <class T, class L = std::int64_t>
class DeviceCrossBatchMemory {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "metricloss::DeviceCrossBatchMemory<T>: T must be float or double");
  static_assert(std::is_arithmetic<L>::value, "metricloss::DeviceCrossBatchMemory: labels are arithmetic");

 public:
  using scalar_type = T;
  using label_type = L;
  using Slots = MemorySlots;

  DeviceCrossBatchMemory(Index capacity, Index dim) : ring_{capacity}, dim_(dim) {
    detail::check_memory_shape<T>("DeviceCrossBatchMemory", capacity, dim);
    const char* where = "metricloss::DeviceCrossBatchMemory: cudaMalloc";
    detail::cuda::throw_on_error(cudaMalloc(&rows_, sizeof(T) * static_cast<std::size_t>(capacity * dim)), where);
    const cudaError_t error = cudaMalloc(&labels_, sizeof(L) * static_cast<std::size_t>(capacity));
    if (error != cudaSuccess) {
      (void)cudaFree(rows_);
      detail::cuda::throw_on_error(error, where);
    }
  }
  DeviceCrossBatchMemory(const DeviceCrossBatchMemory&) = delete;
  DeviceCrossBatchMemory& operator=(const DeviceCrossBatchMemory&) = delete;
  DeviceCrossBatchMemory(DeviceCrossBatchMemory&& other) noexcept
      : ring_(other.ring_), dim_(other.dim_), rows_(std::exchange(other.rows_, nullptr)),
        labels_(std::exchange(other.labels_, nullptr)) {}
  DeviceCrossBatchMemory& operator=(DeviceCrossBatchMemory&& other) noexcept {
    std::swap(ring_, other.ring_);
    std::swap(dim_, other.dim_);
    std::swap(rows_, other.rows_);
    std::swap(labels_, other.labels_);
    return *this;
  }
  /// Synchronising (cudaFree): work still reading the memory completes first.
  ~DeviceCrossBatchMemory() {
    if (rows_) (void)cudaFree(rows_);
    if (labels_) (void)cudaFree(labels_);
  }

  Index capacity() const { return ring_.capacity; }
  Index dim() const { return dim_; }
  /// Rows holding an embedding and a label (slots never written hold neither).
  Index size() const { return ring_.size; }

  /// Copies the batch (device maps; x: N x dim, labels: length N, any arithmetic type,
  /// converted to L) into the ring on the tag's stream; returns the slots of its rows.
  template <class X, class LX>
  Slots enqueue(cuda_tag tag, const Eigen::MatrixBase<X>& x, const Eigen::MatrixBase<LX>& labels) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::DeviceCrossBatchMemory<T>::enqueue: embeddings must have scalar type T");
    detail::Validator check("DeviceCrossBatchMemory", detail::scalar_name<T>(), "enqueue");
    const auto xv = detail::input_view(x);
    const auto lv = detail::label_view(labels);
    detail::check_enqueue(check, xv, lv, dim_);
    detail::Ring ring = ring_;
    const detail::Ring::Placement at = ring.place(xv.rows);
    if (at.kept > 0) {
      detail::cuda::enqueue_rows_kernel<<<static_cast<unsigned>(at.kept), detail::cuda::enqueue_threads, 0, tag.stream>>>(
          xv, lv, at.skipped, at.first, ring_.capacity, rows_, labels_);
      detail::cuda::throw_on_error(cudaGetLastError(), "metricloss::DeviceCrossBatchMemory::enqueue");
    }
    ring_ = ring;  // only once the copy is enqueued
    return at.slots;
  }

  /// The valid rows as a reference set (device memory; no query among them).
  ReferenceSet<T, L> reference() const { return {{rows_view(), labels_view(), {}}}; }

  /// The same, with the rows `slots` being the queries themselves (the batch just enqueued).
  /// `slots` must outlive the reference set's use.
  ReferenceSet<T, L> reference(const Slots& slots) const {
    return {{rows_view(), labels_view(), detail::self_index_of(slots)}};
  }

  /// The stored rows (capacity x dim, slot order, row-major) and labels, in device memory.
  const T* rows() const { return rows_; }
  const L* labels() const { return labels_; }

 private:
  detail::MatrixView<const T> rows_view() const { return {rows_, ring_.size, dim_, dim_}; }
  detail::VectorView<L> labels_view() const { return {labels_, ring_.size, 1}; }

  detail::Ring ring_;
  Index dim_;
  T* rows_ = nullptr;
  L* labels_ = nullptr;
};

}  // namespace metricloss
