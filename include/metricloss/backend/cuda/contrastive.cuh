#pragma once
// Contrastive loss on CUDA: one fused kernel reads a_i, b_i and the similarity of each pair
// once, reduces d_i^2 = ||a_i - b_i||^2 in double, and writes both gradient rows
//   grad_a_i = -grad_b_i = top_diff/N * c_i (a_i - b_i)        (c_i: detail::contrastive_pair)
// (16 D + 4 bytes of DRAM traffic per float pair with both gradients). The per-row loss
// terms are summed per block in double and the blocks' partials by a second one-block
// kernel, both in a fixed order: L = 1/(2N) sum_i term_i, deterministic, no atomics.
//
// Layouts, by D: a group of 8 lanes per row (D <= 32), a warp per row (D <= 1024), a block
// per row (larger D). The gradient pass re-reads the row, which its distance pass has just
// brought into L1, so DRAM sees each input once.
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/contrastive.hpp>

#include <cuda_runtime.h>

namespace metricloss {
namespace detail {
namespace cuda {

template <class T, class Source>
struct ContrastiveArgs {
  MatrixView<const T> a, b;
  Source similarity;
  double margin;
  ContrastiveForm form;
  MatrixView<T> grad_a, grad_b;  // either may be empty (not wanted)
  double scale;                  // top_diff / N
};

constexpr int contrastive_threads = 256;

/// Row work shared by both layouts, run by the `Width` threads `rank` = 0 .. Width-1 of a
/// row's group; `reduce` sums a double over the group. Returns the row's loss term.
template <int Width, class T, class Source, class Reduce>
__device__ inline double contrastive_row(const ContrastiveArgs<T, Source>& args, Index row,
                                         bool active, int rank, Reduce&& reduce) {
  const Index d = args.a.cols;
  const T* a = args.a.row(row);
  const T* b = args.b.row(row);
  double squared = 0.0;
  if (active) {
#pragma unroll 4
    for (Index j = rank; j < d; j += Width) {
      const double diff = static_cast<double>(a[j]) - static_cast<double>(b[j]);
      squared = fma(diff, diff, squared);
    }
  }
  squared = reduce(squared);  // every thread of the group, active or not, takes part
  if (!active) return 0.0;
  const PairTerm t = contrastive_pair(squared, args.similarity(row), args.margin, args.form);
  if (!args.grad_a.empty() || !args.grad_b.empty()) {
    const double c = args.scale * t.coefficient;
    T* grad_a = args.grad_a.empty() ? nullptr : args.grad_a.row(row);
    T* grad_b = args.grad_b.empty() ? nullptr : args.grad_b.row(row);
#pragma unroll 4
    for (Index j = rank; j < d; j += Width) {
      const T value = static_cast<T>(c * (static_cast<double>(a[j]) - static_cast<double>(b[j])));
      if (grad_a) grad_a[j] = value;
      if (grad_b) grad_b[j] = -value;
    }
  }
  return t.term;
}

/// A group of `Lanes` threads per row; the loop bound is block-uniform so that whole warps
/// always reach the shuffles together.
template <int Lanes, class T, class Source>
__global__ void __launch_bounds__(contrastive_threads)
    contrastive_group_kernel(ContrastiveArgs<T, Source> args, double* partials) {
  constexpr int rows_per_block = contrastive_threads / Lanes;
  __shared__ double shared[contrastive_threads / warp_size];
  const int lane = static_cast<int>(threadIdx.x) % Lanes;
  const int group = static_cast<int>(threadIdx.x) / Lanes;
  const Index n = args.a.rows;
  double total = 0.0;
  for (Index first = Index(blockIdx.x) * rows_per_block; first < n;
       first += Index(gridDim.x) * rows_per_block) {
    const Index row = first + group;
    const double term = contrastive_row<Lanes>(args, row, row < n, lane,
                                               [](double v) { return group_sum<Lanes>(v); });
    if (lane == 0) total += term;
  }
  total = block_sum<contrastive_threads>(total, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

/// A block per row, for long rows.
template <class T, class Source>
__global__ void __launch_bounds__(contrastive_threads)
    contrastive_block_kernel(ContrastiveArgs<T, Source> args, double* partials) {
  __shared__ double shared[contrastive_threads / warp_size];
  const int rank = static_cast<int>(threadIdx.x);
  double total = 0.0;
  for (Index row = blockIdx.x; row < args.a.rows; row += gridDim.x) {
    const double term = contrastive_row<contrastive_threads>(
        args, row, true, rank, [&](double v) { return block_sum<contrastive_threads>(v, shared); });
    if (rank == 0) total += term;
  }
  total = block_sum<contrastive_threads>(total, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

enum class RowLayout { lanes8, warp, block };

inline RowLayout contrastive_layout(Index d) {
  return d <= 32 ? RowLayout::lanes8 : d <= 1024 ? RowLayout::warp : RowLayout::block;
}

inline int contrastive_blocks(Index n, Index d) {
  switch (contrastive_layout(d)) {
    case RowLayout::lanes8: return partial_blocks(n, contrastive_threads / 8);
    case RowLayout::warp: return partial_blocks(n, contrastive_threads / warp_size);
    default: return partial_blocks(n, 1);
  }
}

template <class T, class Source>
cudaError_t contrastive_enqueue(void* workspace, std::size_t workspace_bytes,
                                const ContrastiveArgs<T, Source>& args, T* device_loss,
                                cudaStream_t stream) noexcept {
  const Index n = args.a.rows, d = args.a.cols;
  if (n < 1 || d < 1 || device_loss == nullptr || workspace == nullptr) return cudaErrorInvalidValue;
  const int blocks = contrastive_blocks(n, d);
  if (workspace_bytes < sizeof(double) * static_cast<std::size_t>(blocks)) return cudaErrorInvalidValue;
  double* partials = static_cast<double*>(workspace);
  switch (contrastive_layout(d)) {
    case RowLayout::lanes8:
      contrastive_group_kernel<8><<<blocks, contrastive_threads, 0, stream>>>(args, partials);
      break;
    case RowLayout::warp:
      contrastive_group_kernel<warp_size><<<blocks, contrastive_threads, 0, stream>>>(args, partials);
      break;
    default:
      contrastive_block_kernel<<<blocks, contrastive_threads, 0, stream>>>(args, partials);
  }
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  finalize_sum_kernel<<<1, finalize_threads, 0, stream>>>(partials, blocks,
                                                          1.0 / (2.0 * static_cast<double>(n)),
                                                          device_loss);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace detail

namespace cuda_core {

/// Device workspace (bytes) that contrastive_forward_backward needs for N pairs of D columns.
template <class T>
std::size_t contrastive_workspace_bytes(Index n, Index d) noexcept {
  return sizeof(double) * static_cast<std::size_t>(detail::cuda::contrastive_blocks(n, d));
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
  const detail::cuda::ContrastiveArgs<T, detail::SimilarityVector<S>> args{
      a, b, {sim}, margin, form, grad_a, grad_b,
      static_cast<double>(top_diff) / static_cast<double>(a.rows)};
  return detail::cuda::contrastive_enqueue(workspace, workspace_bytes, args, device_loss, stream);
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
  const detail::cuda::ContrastiveArgs<T, detail::LabelPair<L, M>> args{
      a, b, {labels_a, labels_b}, margin, form, grad_a, grad_b,
      static_cast<double>(top_diff) / static_cast<double>(a.rows)};
  return detail::cuda::contrastive_enqueue(workspace, workspace_bytes, args, device_loss, stream);
}

}  // namespace cuda_core

namespace detail {

/// The functor path: validated views in, workspace from the per-thread cache, cuda_error on
/// failure. Also serves cuda_deferred_tag<T> (loss left in device memory, NaN returned).
template <class T>
struct CudaContrastiveBackend {
  template <class Source>
  static T run(ContrastiveLoss<T>& loss, cudaStream_t stream, T* deferred_loss,
               const MatrixView<const T>& a, const MatrixView<const T>& b,
               const Source& similarity, const MatrixView<T>& grad_a,
               const MatrixView<T>& grad_b, T top_diff) {
    const cuda::ContrastiveArgs<T, Source> args{
        a, b, similarity, static_cast<double>(loss.margin), loss.form, grad_a, grad_b,
        static_cast<double>(top_diff) / static_cast<double>(a.rows)};
    return cuda::run_functor_path<T>(
        "metricloss::ContrastiveLoss::forward_backward (cuda)", stream,
        cuda_core::contrastive_workspace_bytes<T>(a.rows, a.cols), deferred_loss,
        [&](void* workspace, std::size_t bytes, T* device_loss) {
          return cuda::contrastive_enqueue(workspace, bytes, args, device_loss, stream);
        });
  }
};

template <class T>
struct Backend<ContrastiveLoss<T>, cuda_tag> {
  template <class Source>
  static T forward_backward(ContrastiveLoss<T>& loss, cuda_tag tag, const MatrixView<const T>& a,
                            const MatrixView<const T>& b, const Source& similarity,
                            const MatrixView<T>& grad_a, const MatrixView<T>& grad_b, T top_diff) {
    return CudaContrastiveBackend<T>::run(loss, tag.stream, nullptr, a, b, similarity, grad_a,
                                          grad_b, top_diff);
  }
};

template <class T>
struct Backend<ContrastiveLoss<T>, cuda_deferred_tag<T>> {
  template <class Source>
  static T forward_backward(ContrastiveLoss<T>& loss, cuda_deferred_tag<T> tag,
                            const MatrixView<const T>& a, const MatrixView<const T>& b,
                            const Source& similarity, const MatrixView<T>& grad_a,
                            const MatrixView<T>& grad_b, T top_diff) {
    cuda::require_device_loss(tag.device_loss, "metricloss::ContrastiveLoss<T>::forward_backward");
    return CudaContrastiveBackend<T>::run(loss, tag.stream, tag.device_loss, a, b, similarity,
                                          grad_a, grad_b, top_diff);
  }
};

}  // namespace detail
}  // namespace metricloss
