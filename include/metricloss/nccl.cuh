#pragma once
// Ranks as members of an NCCL communicator: a group for sharded batch losses on the CUDA
// path (API.md, "Global batches"). Link metricloss::nccl (NCCL ships with the CUDA toolkit).
//
//   #include <metricloss/nccl.cuh>
//   // one rank per GPU (NCCL refuses two ranks on one device); this GPU current
//   metricloss::nccl_group group(comm, stream);
//   float L = loss.forward_backward(metricloss::cuda.on(stream).sharded(group), x_r, y_r, g_r,
//                                   top_diff);   // x_r, y_r, g_r in device memory
//
// The communicator is viewed, not owned. Every rank must make the same sequence of sharded
// calls, with its communicator's device current. NCCL has no allgatherv: the variable-length
// gather is one grouped ncclBroadcast per rank that sends anything (every rank knows every
// count, so all ranks skip the same empty ones). The agreement's few host bytes are staged
// through device memory on the group's stream (synchronised); device memory grows only, so
// a warm call allocates nothing. NCCL failures throw metricloss::nccl_error.
#include <metricloss/cuda.cuh>

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <stdexcept>
#include <string>

namespace metricloss {

/// An NCCL failure: carries the ncclResult_t and NCCL's string for it.
class nccl_error : public std::runtime_error {
 public:
  nccl_error(ncclResult_t code, const std::string& where)
      : std::runtime_error(where + ": NCCL error " + std::to_string(static_cast<int>(code)) +
                           ": " + ncclGetErrorString(code)),
        code_(code) {}
  ncclResult_t code() const noexcept { return code_; }

 private:
  ncclResult_t code_;
};

namespace detail {
inline void throw_on_nccl(ncclResult_t code, const char* where) {
  if (code != ncclSuccess) throw nccl_error(code, where);
}
}  // namespace detail

class nccl_group {
 public:
  /// `stream` orders the agreement's host exchanges (the losses' data moves on the tag's
  /// stream).
  explicit nccl_group(ncclComm_t comm, cudaStream_t stream = nullptr)
      : comm_(comm), stream_(stream) {
    detail::throw_on_nccl(ncclCommUserRank(comm_, &rank_), "metricloss::nccl_group: ncclCommUserRank");
    detail::throw_on_nccl(ncclCommCount(comm_, &size_), "metricloss::nccl_group: ncclCommCount");
    detail::throw_on_nccl(ncclCommCuDevice(comm_, &device_), "metricloss::nccl_group: ncclCommCuDevice");
  }
  nccl_group(const nccl_group&) = delete;
  nccl_group& operator=(const nccl_group&) = delete;
  ~nccl_group() {
    if (staging_) (void)cudaFree(staging_);  // errors ignored: the runtime may be unloading
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  ncclComm_t comm() const { return comm_; }
  /// The communicator's CUDA device: current in every thread that calls with this group.
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }

  /// Device memory: rank q's `counts[q]` bytes land at recv + offsets[q] on every rank,
  /// enqueued on `stream`. send == recv + offsets[rank()] is allowed (in place).
  void allgatherv_device(const void* send, std::size_t bytes, void* recv,
                         const std::size_t* counts, const std::size_t* offsets,
                         cudaStream_t stream) {
    (void)bytes;  // counts[rank()]: every rank knows every count
    detail::throw_on_nccl(ncclGroupStart(), "metricloss::nccl_group: ncclGroupStart");
    ncclResult_t failed = ncclSuccess;
    for (int q = 0; q < size_ && failed == ncclSuccess; ++q) {
      if (counts[q] == 0) continue;
      char* to = static_cast<char*>(recv) + offsets[q];
      failed = ncclBroadcast(q == rank_ ? send : to, to, counts[q], ncclUint8, q, comm_, stream);
    }
    // The group is closed whatever happened inside it.
    const ncclResult_t ended = ncclGroupEnd();
    detail::throw_on_nccl(failed, "metricloss::nccl_group: ncclBroadcast");
    detail::throw_on_nccl(ended, "metricloss::nccl_group: ncclGroupEnd");
  }

  /// Host memory (the agreement's statuses and messages): staged through device memory on
  /// stream(), which this synchronises.
  void allgatherv(const void* send, std::size_t bytes, void* recv, const std::size_t* counts,
                  const std::size_t* offsets) {
    std::size_t total = 0;
    for (int q = 0; q < size_; ++q)
      if (offsets[q] + counts[q] > total) total = offsets[q] + counts[q];
    if (total == 0) return;
    char* staging = staging_bytes(total);
    const char* where = "metricloss::nccl_group::allgatherv";
    if (bytes > 0)
      detail::cuda::throw_on_error(cudaMemcpyAsync(staging + offsets[rank_], send, bytes,
                                                   cudaMemcpyHostToDevice, stream_),
                                   where);
    allgatherv_device(staging + offsets[rank_], bytes, staging, counts, offsets, stream_);
    detail::cuda::throw_on_error(
        cudaMemcpyAsync(recv, staging, total, cudaMemcpyDeviceToHost, stream_), where);
    detail::cuda::throw_on_error(cudaStreamSynchronize(stream_), where);
  }

 private:
  char* staging_bytes(std::size_t bytes) {
    if (bytes > staging_size_) {
      // Grows rarely (the statuses are 40 bytes a rank; messages only on failing calls).
      const std::size_t size = bytes < 4096 ? 4096 : bytes;
      if (staging_) {
        detail::cuda::throw_on_error(cudaStreamSynchronize(stream_), "metricloss::nccl_group");
        (void)cudaFree(staging_);
        staging_ = nullptr;
        staging_size_ = 0;
      }
      detail::cuda::throw_on_error(cudaMalloc(&staging_, size), "metricloss::nccl_group: cudaMalloc");
      staging_size_ = size;
    }
    return static_cast<char*>(staging_);
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  int rank_ = 0, size_ = 1, device_ = 0;
  void* staging_ = nullptr;
  std::size_t staging_size_ = 0;
};

}  // namespace metricloss
