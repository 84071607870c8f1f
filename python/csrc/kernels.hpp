// The binding's interface to metricloss: plain pointers, shapes and strides, no torch and no
// Eigen headers. kernels_*.cpp instantiate the losses (metricloss::simd) behind it, so those
// translation units compile without torch's headers, in parallel with binding.cpp;
// kernels_cuda.cu (nvcc, no torch headers either) runs CudaLosses on metricloss::cuda, and
// kernels_cuda_stub.cpp stands in for it where the installed torch has no CUDA.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

namespace metricloss_python {

enum class Scalar { f32, f64 };

/// Row-major rows: element (i, j) at data[i * stride + j] (stride in elements).
struct Rows {
  const void* data;
  std::int64_t rows, cols, stride;
};

/// A gradient output of the inputs' shape; data == nullptr passes metricloss::skip.
struct Grad {
  void* data;
  std::int64_t rows, cols, stride;
};

/// int64 labels (or similarity flags, or self indices), element i at data[i * stride].
struct Labels {
  const std::int64_t* data;
  std::int64_t size, stride;
};

/// A reference set (metricloss::reference): candidates r with their labels, and the row of r
/// that is each query itself (-1: none); self.data == nullptr when no self_index is given.
struct Reference {
  Rows r;
  Labels labels, self;
};

/// A group of ranks for the sharded batch losses (metricloss's group concept): rank, size and
/// an allgatherv of bytes, here a callback (the binding's torch.distributed process group:
/// metricloss/distributed.py). A null Group* passes no group: one process.
struct Group {
  int rank = 0, size = 1;
  std::function<void(const void* send, std::size_t bytes, void* recv, const std::size_t* counts,
                     const std::size_t* offsets)>
      allgatherv;
};

// One object per Python module instance: it owns one metricloss functor per scalar type
// (created on first use), whose scratch memory is reused from call to call. The options are
// passed with every call and written into the functor's public members, so a Python user
// can change `loss.margin` between steps. Errors are metricloss::invalid_argument.

class Contrastive {
 public:
  Contrastive();
  ~Contrastive();
  double run(Scalar, double margin, int form, Rows a, Rows b, Labels sim, Grad ga, Grad gb);
  double run(Scalar, double margin, int form, Rows a, Rows b, Labels labels_a, Labels labels_b,
             Grad ga, Grad gb);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class Triplet {
 public:
  Triplet();
  ~Triplet();
  double run(Scalar, double margin, int distance, Rows anchor, Rows positive, Rows negative,
             Grad ga, Grad gp, Grad gn);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class BatchTriplet {
 public:
  BatchTriplet();
  ~BatchTriplet();
  double run(Scalar, double margin, int mining, int distance, bool soft_margin, bool normalize,
             Rows x, Labels labels, Grad gx, const Group* group = nullptr);
  double run(Scalar, double margin, int mining, int distance, bool soft_margin, bool normalize,
             Rows q, Labels labels_q, Reference ref, Grad gq, Grad gr, const Group* group = nullptr);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class Lifted {
 public:
  Lifted();
  ~Lifted();
  double run(Scalar, double margin, bool normalize, Rows x, Labels labels, Grad gx,
             const Group* group = nullptr);
  double run(Scalar, double margin, bool normalize, Rows q, Labels labels_q, Reference ref,
             Grad gq, Grad gr, const Group* group = nullptr);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// metricloss::BatchContrastiveLoss's options (distance and reduction: the C++ enums' values).
struct BatchContrastiveOptions {
  double pos_margin = 0, neg_margin = 1;
  int distance = 0, reduction = 0;
  bool normalize = false;
};

class BatchContrastive {
 public:
  BatchContrastive();
  ~BatchContrastive();
  double run(Scalar, const BatchContrastiveOptions&, Rows x, Labels labels, Grad gx,
             const Group* group = nullptr);
  double run(Scalar, const BatchContrastiveOptions&, Rows q, Labels labels_q, Reference ref,
             Grad gq, Grad gr, const Group* group = nullptr);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// metricloss::MultiSimilarityLoss's options (epsilon may be +infinity: every pair kept).
struct MultiSimilarityOptions {
  double alpha = 2, beta = 50, base = 0.5, epsilon = 0.1;
  bool normalize = false;
};

class MultiSimilarity {
 public:
  MultiSimilarity();
  ~MultiSimilarity();
  double run(Scalar, const MultiSimilarityOptions&, Rows x, Labels labels, Grad gx,
             const Group* group = nullptr);
  double run(Scalar, const MultiSimilarityOptions&, Rows q, Labels labels_q, Reference ref,
             Grad gq, Grad gr, const Group* group = nullptr);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Where a CUDA call runs: the device's index and torch's current stream on it (a
/// cudaStream_t; null: the legacy default stream).
struct Device {
  int index = 0;
  void* stream = nullptr;
};

/// Whether this build has the CUDA path (kernels_cuda.cu); false with kernels_cuda_stub.cpp.
bool cuda_built();

/// The batch form of every loss on device memory (metricloss::cuda.on(stream), the loss
/// written to `loss` in device memory, one T, in stream order: no synchronisation). Every
/// pointer in the descriptors is device memory of `device`. One object per module; its
/// functors (and their device workspaces) are created on first use. Errors:
/// metricloss::invalid_argument before anything is enqueued, metricloss::cuda_error.
class CudaLosses {
 public:
  CudaLosses();
  ~CudaLosses();
  void contrastive(Scalar, double margin, int form, Rows a, Rows b, Labels sim, Grad ga, Grad gb,
                   Device, void* loss);
  void contrastive(Scalar, double margin, int form, Rows a, Rows b, Labels labels_a,
                   Labels labels_b, Grad ga, Grad gb, Device, void* loss);
  void triplet(Scalar, double margin, int distance, Rows anchor, Rows positive, Rows negative,
               Grad ga, Grad gp, Grad gn, Device, void* loss);
  void batch_triplet(Scalar, double margin, int mining, int distance, bool soft_margin,
                     bool normalize, Rows x, Labels labels, Grad gx, Device, void* loss);
  void lifted(Scalar, double margin, bool normalize, Rows x, Labels labels, Grad gx, Device,
              void* loss);
  /// Against a reference set: q, labels_q, ref.r, ref.labels and the gradients on the device;
  /// ref.self (if any) in host memory.
  void batch_triplet(Scalar, double margin, int mining, int distance, bool soft_margin,
                     bool normalize, Rows q, Labels labels_q, Reference ref, Grad gq, Grad gr,
                     Device, void* loss);
  void lifted(Scalar, double margin, bool normalize, Rows q, Labels labels_q, Reference ref,
              Grad gq, Grad gr, Device, void* loss);
  void batch_contrastive(Scalar, const BatchContrastiveOptions&, Rows x, Labels labels, Grad gx,
                         Device, void* loss);
  void multi_similarity(Scalar, const MultiSimilarityOptions&, Rows x, Labels labels, Grad gx,
                        Device, void* loss);
  void batch_contrastive(Scalar, const BatchContrastiveOptions&, Rows q, Labels labels_q,
                         Reference ref, Grad gq, Grad gr, Device, void* loss);
  void multi_similarity(Scalar, const MultiSimilarityOptions&, Rows q, Labels labels_q,
                        Reference ref, Grad gq, Grad gr, Device, void* loss);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace metricloss_python
