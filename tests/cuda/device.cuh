#pragma once
// Device-side test support for the CUDA path: device detection (tests skip visibly without a
// device), RAII device buffers and strided device matrices mirroring support.hpp's Strided.
#include "../support.hpp"

#include <metricloss/cuda.cuh>

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <limits>
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

/// A NaN label makes a batch loss's value and every gradient entry NaN (x: 5 rows or more).
template <class T, class Loss>
void check_nan_label_propagates(Loss loss, const Matrix<T>& x) {
  const Index n = x.rows(), d = x.cols();
  std::vector<float> labels(static_cast<std::size_t>(n), 1.0f);
  labels[3] = std::numeric_limits<float>::quiet_NaN();
  labels[4] = 2.0f;
  const DeviceStrided<T> dx(x, 0, T(0));
  DeviceStrided<T> dg(Matrix<T>::Zero(n, d), 0, T(0));
  const DeviceVectorOf<float> dl(labels);
  CHECK(std::isnan(loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map())));
  CHECK(dg.dense().array().isNaN().all());
}

/// A batch loss is deterministic on the device: forward_backward on the legacy stream, the
/// deferred loss (loss_to) on another stream, and its cuda_core call in caller-owned
/// workspace, core(workspace, bytes, x, labels, grad, device_loss, stream), give the same
/// bits, loss and gradient.
template <class T, class L, class Loss, class Core>
void check_deterministic_core(Loss loss, const Matrix<T>& x, const std::vector<L>& labels,
                              std::size_t bytes, Core&& core) {
  const Index n = x.rows(), d = x.cols();
  const DeviceStrided<T> dx(x, 0, T(0));
  const DeviceVectorOf<L> dl(labels);
  DeviceStrided<T> g1(Matrix<T>::Zero(n, d), 0, T(0)), g2(Matrix<T>::Zero(n, d), 0, T(0));
  const T v1 = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), g1.map());
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceBuffer<T> device_loss(1);
  CHECK(std::isnan(
      loss.forward_backward(ml::cuda.on(stream).loss_to(device_loss.data()), dx.cmap(), dl.map(), g2.map())));
  check_cuda(cudaStreamSynchronize(stream));
  const T v2 = device_loss.download()[0];
  CHECK(std::memcmp(&v1, &v2, sizeof(T)) == 0);
  CHECK(g1.dense() == g2.dense());
  DeviceBuffer<char> workspace(bytes);
  DeviceStrided<T> g3(Matrix<T>::Zero(n, d), 0, T(0));
  const ml::cuda_core::DeviceMatrix<const T> xv{dx.buffer.data(), n, d, d};
  const ml::cuda_core::DeviceVector<L> lv{dl.buffer.data(), n, 1};
  const ml::cuda_core::DeviceMatrix<T> gv{g3.buffer.data(), n, d, d};
  CHECK(core(static_cast<void*>(workspace.data()), bytes, xv, lv, gv, device_loss.data(), stream) == cudaSuccess);
  check_cuda(cudaStreamSynchronize(stream));
  const T v3 = device_loss.download()[0];
  CHECK(std::memcmp(&v1, &v3, sizeof(T)) == 0);
  CHECK(g1.dense() == g3.dense());
  check_cuda(cudaStreamDestroy(stream));
}

}  // namespace mltest
