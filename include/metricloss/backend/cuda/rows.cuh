#pragma once
// The row-wise launch shared by the losses over independent rows (contrastive, explicit
// triplets): each row's distances are reduced by a group of threads, the row's gradients
// written by the same group, and the per-row loss terms summed deterministically (per block,
// then by a one-block finalize kernel):  loss = final_scale * sum_i term_i.
//
// Layouts, by D: 8 lanes per row (D <= 32), a warp per row (D <= 1024), a block per row
// (larger D). A Work type provides
//   template <int Width, class Reduce>
//   __device__ double row(Index i, bool active, int rank, Reduce&& reduce) const;
// run by the Width threads of the group (rank 0 .. Width-1), every one of them calling
// reduce(double) -> group total the same number of times (inactive ones too), and returning
// the row's term (the value on rank 0 is used).
#include <metricloss/backend/cuda/reduce.cuh>

#include <cuda_runtime.h>

namespace metricloss {
namespace detail {
namespace cuda {

constexpr int row_threads = 256;

/// A group of `Lanes` threads per row; the loop bound is block-uniform so that whole warps
/// always reach the shuffles together.
template <int Lanes, class Work>
__global__ void __launch_bounds__(row_threads) group_rows_kernel(Work work, Index n, double* partials) {
  constexpr int rows_per_block = row_threads / Lanes;
  __shared__ double shared[row_threads / warp_size];
  const int lane = static_cast<int>(threadIdx.x) % Lanes;
  const int group = static_cast<int>(threadIdx.x) / Lanes;
  double total = 0.0;
  for (Index first = Index(blockIdx.x) * rows_per_block; first < n;
       first += Index(gridDim.x) * rows_per_block) {
    const Index row = first + group;
    const double term = work.template row<Lanes>(row, row < n, lane,
                                                 [](double v) { return group_sum<Lanes>(v); });
    if (lane == 0 && row < n) total += term;
  }
  total = block_sum<row_threads>(total, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

/// A block per row, for long rows.
template <class Work>
__global__ void __launch_bounds__(row_threads) block_rows_kernel(Work work, Index n, double* partials) {
  __shared__ double shared[row_threads / warp_size];
  const int rank = static_cast<int>(threadIdx.x);
  double total = 0.0;
  for (Index row = blockIdx.x; row < n; row += gridDim.x) {
    const double term = work.template row<row_threads>(
        row, true, rank, [&](double v) { return block_sum<row_threads>(v, shared); });
    if (rank == 0) total += term;
  }
  total = block_sum<row_threads>(total, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

enum class RowLayout { lanes8, warp, block };

inline RowLayout row_layout(Index d) {
  return d <= 32 ? RowLayout::lanes8 : d <= 1024 ? RowLayout::warp : RowLayout::block;
}

/// First-stage blocks for N rows of D columns (also the number of partials).
inline int row_blocks(Index n, Index d) {
  switch (row_layout(d)) {
    case RowLayout::lanes8: return partial_blocks(n, row_threads / 8);
    case RowLayout::warp: return partial_blocks(n, row_threads / warp_size);
    default: return partial_blocks(n, 1);
  }
}

/// Workspace bytes of enqueue_rows: one double per first-stage block.
inline std::size_t rows_workspace_bytes(Index n, Index d) noexcept {
  return sizeof(double) * static_cast<std::size_t>(row_blocks(n, d));
}

/// Enqueues both stages on `stream`; noexcept, reports bad arguments as cudaErrorInvalidValue.
template <class T, class Work>
cudaError_t enqueue_rows(const Work& work, Index n, Index d, double final_scale, void* workspace,
                         std::size_t workspace_bytes, T* device_loss, cudaStream_t stream) noexcept {
  if (n < 1 || d < 1 || device_loss == nullptr || workspace == nullptr) return cudaErrorInvalidValue;
  if (workspace_bytes < rows_workspace_bytes(n, d)) return cudaErrorInvalidValue;
  const int blocks = row_blocks(n, d);
  double* partials = static_cast<double*>(workspace);
  switch (row_layout(d)) {
    case RowLayout::lanes8:
      group_rows_kernel<8><<<blocks, row_threads, 0, stream>>>(work, n, partials);
      break;
    case RowLayout::warp:
      group_rows_kernel<warp_size><<<blocks, row_threads, 0, stream>>>(work, n, partials);
      break;
    default:
      block_rows_kernel<<<blocks, row_threads, 0, stream>>>(work, n, partials);
  }
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  finalize_sum_kernel<<<1, finalize_threads, 0, stream>>>(partials, blocks, final_scale, device_loss);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace detail
}  // namespace metricloss
