#pragma once
// Device-side test support for the CUDA path: device detection (tests skip visibly without a
// device), RAII device buffers and strided device matrices mirroring support.hpp's Strided.
#include "../support.hpp"

#include <metricloss/cuda.cuh>

#include <cuda_runtime.h>

#include <vector>

namespace mltest {

inline bool device_present() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

/// True (after a visible WARN) when there is no CUDA device: the caller returns.
inline bool skip_without_device() {
  if (device_present()) return false;
  WARN("no CUDA device: skipped");
  return true;
}

inline void check_cuda(cudaError_t code) {
  if (code != cudaSuccess) throw ml::cuda_error(code, "test");
}

template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t count) : count_(count) {
    check_cuda(cudaMalloc(&data_, sizeof(T) * (count ? count : 1)));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(data_); }
  void upload(const std::vector<T>& host) {
    check_cuda(cudaMemcpy(data_, host.data(), sizeof(T) * host.size(), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    check_cuda(cudaMemcpy(host.data(), data_, sizeof(T) * count_, cudaMemcpyDeviceToHost));
    return host;
  }
  T* data() const { return data_; }
  std::size_t size() const { return count_; }

 private:
  T* data_ = nullptr;
  std::size_t count_;
};

/// A row-major matrix in device memory with outer stride D + pad, padding set to a sentinel.
template <class T>
struct DeviceStrided {
  Index rows, cols, stride;
  DeviceBuffer<T> buffer;
  DeviceStrided(const Matrix<T>& m, Index pad, T sentinel)
      : rows(m.rows()), cols(m.cols()), stride(m.cols() + pad),
        buffer(Strided<T>(m, pad, sentinel).storage) {}
  ml::RowMap<T> map() { return ml::RowMap<T>(buffer.data(), rows, cols, Eigen::OuterStride<>(stride)); }
  ml::ConstRowMap<T> cmap() const {
    return ml::ConstRowMap<T>(buffer.data(), rows, cols, Eigen::OuterStride<>(stride));
  }
  /// Back to the host as a Strided (padding included, for padding_is).
  Strided<T> host() const {
    Strided<T> s(Matrix<T>::Zero(rows, cols), stride - cols, T(0));
    s.storage = buffer.download();
    return s;
  }
  Matrix<T> dense() const {
    const Strided<T> s = host();
    return s.cmap();
  }
};

/// A label vector in device memory.
template <class L>
struct DeviceVectorOf {
  DeviceBuffer<L> buffer;
  explicit DeviceVectorOf(const std::vector<L>& host) : buffer(host) {}
  Eigen::Map<const Eigen::Matrix<L, Eigen::Dynamic, 1>> map() const {
    return {buffer.data(), static_cast<Index>(buffer.size())};
  }
};

}  // namespace mltest
