#pragma once
// BatchContrastiveLoss on CUDA: the maths of detail/batch_contrastive_math.hpp (the formula
// and gradient are in <metricloss/batch_contrastive.hpp>) over the batch's N x N distances.
//   1. centre the batch; D2 by the tiled product, positive pairs and small entries by
//      differences in double (pairwise.cuh, shared with batch triplet and lifted);
//   2. the totals pass, a block per anchor a: each pair's term from its D2, recomputed by
//      differences where D2 lies within its rounding bound of the hinge's turn (so that a
//      hinge at exactly 0 stays inactive, as on the CPU); the anchor's five sums;
//   3. one block: the totals in a fixed order, L = pos_sum / C_+ + neg_sum / C_- and each
//      side's scale 1 / C (0 when a side has no terms; NaN for non-finite data or labels);
//   4. (gradient) the weights pass writes row a of W = dL/dD2 with the same decisions as
//      step 2; S = W + W^T; dX = 2 top_diff ((diag(S 1) - S) xc + near) by the tiled
//      product, near pairs by differences (batch_weights.cuh).
// Memory: one N x N of T and one of double, as batch triplet. Deterministic: every sum has
// a fixed order. normalize = true wraps this path (normalize.cuh).
#include <metricloss/backend/cuda/batch_triplet_mining.cuh>
#include <metricloss/backend/cuda/exact.cuh>
#include <metricloss/backend/cuda/pairwise.cuh>
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/batch_contrastive.hpp>
#include <metricloss/detail/batch_contrastive_math.hpp>
#include <metricloss/detail/numerics.hpp>

#include <cuda_runtime.h>

namespace metricloss {
namespace detail {
namespace cuda {

constexpr int contrastive_threads = 256;

/// An anchor's sums in the totals pass (the fields of ContrastiveRowSums), per anchor.
constexpr int contrastive_sums = 5;

template <class T, class L>
struct ContrastiveArgs {
  const T* squared;     // N x N
  const double* norms;  // ||xc_i||^2 of the centred batch
  MatrixView<const T> x;
  VectorView<L> labels;
  ContrastiveRule rule;
  double* anchor_sums;   // N x contrastive_sums, written by the totals pass
  const double* scales;  // {pos_scale, neg_scale} from step 3: read by the weights pass
  double* weights;       // N x N, or null (the totals pass)
  int* not_finite;
};

/// Steps 2 and 4 for anchor blockIdx.x: the totals pass (weights null) writes the anchor's
/// sums; the weights pass writes its row of W. Both take the same D2 for every pair.
template <class T, class L>
__global__ void __launch_bounds__(contrastive_threads) contrastive_rows_kernel(ContrastiveArgs<T, L> args) {
  __shared__ double shared[contrastive_threads / warp_size];
  const Index a = blockIdx.x, n = args.x.rows;
  const int tid = static_cast<int>(threadIdx.x);
  const L label = args.labels[a];
  const T* row = args.squared + a * n;
  double* w = args.weights ? args.weights + a * n : nullptr;
  const double pos_scale = w ? args.scales[0] : 0.0, neg_scale = w ? args.scales[1] : 0.0;
  const double unit = product_rounding_unit<T>(args.x.cols);
  const ContrastiveRule& rule = args.rule;
  double pos_sum = 0.0, neg_sum = 0.0, pos_active = 0.0, neg_active = 0.0, positives = 0.0;
  for (Index j = tid; j < n; j += contrastive_threads) {
    if (j == a) {
      if (w) w[j] = 0.0;
      continue;
    }
    const bool positive = args.labels[j] == label;
    double d2 = static_cast<double>(row[j]);
    if (fabs(d2 - (positive ? rule.pos_turn : rule.neg_turn)) <= unit * (args.norms[a] + args.norms[j]))
      d2 = exact_squared_thread(args.x, a, j);  // rare: near the hinge's turn
    const ContrastiveTerm term = positive ? rule.positive(d2) : rule.negative(d2);
    if (w) {
      w[j] = term.slope * (positive ? pos_scale : neg_scale);
      continue;
    }
    const double active = term.value > 0.0 ? 1.0 : 0.0;
    if (positive) {
      positives += 1.0;
      pos_sum += term.value;
      pos_active += active;
    } else {
      neg_sum += term.value;
      neg_active += active;
    }
  }
  if (w) return;
  if (tid == 0 && batch_label_is_nan(label)) atomicOr(args.not_finite, 1);
  const double sums[contrastive_sums] = {pos_sum, neg_sum, pos_active, neg_active, positives};
  for (int s = 0; s < contrastive_sums; ++s) {
    const double total = block_sum<contrastive_threads>(sums[s], shared);
    if (tid == 0) args.anchor_sums[a * contrastive_sums + s] = total;
  }
}

/// Step 3: the totals over the anchors (fixed order), L, and each side's scale.
template <class T>
__global__ void __launch_bounds__(finalize_threads)
    contrastive_finalize_kernel(Index n, const double* anchor_sums, ContrastiveRule rule,
                                const int* not_finite, double top_diff, T* device_loss,
                                double* scales, double* gradient_scale) {
  __shared__ double shared[finalize_threads / warp_size];
  double sums[contrastive_sums] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (Index a = threadIdx.x; a < n; a += finalize_threads)
    for (int s = 0; s < contrastive_sums; ++s) sums[s] += anchor_sums[a * contrastive_sums + s];
  for (int s = 0; s < contrastive_sums; ++s) sums[s] = block_sum<finalize_threads>(sums[s], shared);
  if (threadIdx.x != 0) return;
  ContrastiveTotals totals;
  totals.pos_sum = sums[0];
  totals.neg_sum = sums[1];
  totals.pos_active = sums[2];
  totals.neg_active = sums[3];
  totals.pos_pairs = sums[4];
  totals.neg_pairs = static_cast<double>(n) * static_cast<double>(n - 1) - sums[4];
  *device_loss = *not_finite ? static_cast<T>(nan("")) : static_cast<T>(totals.loss(rule));
  scales[0] = totals.pos_scale(rule);
  scales[1] = totals.neg_scale(rule);
  *gradient_scale = top_diff;  // W carries the 1 / C of each side
}

/// The workspace: the batch parts (pairwise.cuh), W, the anchors' sums and the two scales.
template <class T>
struct BatchContrastiveLayout {
  WorkspaceCarver carve;
  BatchParts<T> parts;
  double* weights;  // N x N: W, then S
  double* anchor_sums;
  double* scales;

  BatchContrastiveLayout(void* workspace, Index n, Index d) : carve(workspace), parts(carve, n, d) {
    const auto un = static_cast<std::size_t>(n);
    weights = carve.take<double>(un * un);
    anchor_sums = carve.take<double>(un * contrastive_sums);
    scales = carve.take<double>(2);
  }
};

template <class T, class L>
cudaError_t batch_contrastive_enqueue(void* workspace, std::size_t workspace_bytes,
                                      const MatrixView<const T>& x, const VectorView<L>& labels,
                                      const ContrastiveRule& rule, const MatrixView<T>& grad,
                                      double top_diff, T* device_loss, cudaStream_t stream) noexcept {
  const Index n = x.rows;
  if (n < 1 || x.cols < 1 || device_loss == nullptr || workspace == nullptr) return cudaErrorInvalidValue;
  const BatchContrastiveLayout<T> layout(workspace, n, x.cols);
  if (workspace_bytes < layout.carve.bytes()) return cudaErrorInvalidValue;
  const BatchParts<T>& parts = layout.parts;
  cudaError_t error = enqueue_batch_distances(parts, x, labels, stream);
  if (error != cudaSuccess) return error;
  ContrastiveArgs<T, L> args{parts.squared, parts.norms, x, labels, rule, layout.anchor_sums,
                             layout.scales, nullptr, parts.not_finite};
  const auto blocks = static_cast<unsigned>(n);
  contrastive_rows_kernel<<<blocks, contrastive_threads, 0, stream>>>(args);
  contrastive_finalize_kernel<<<1, finalize_threads, 0, stream>>>(
      n, layout.anchor_sums, rule, parts.not_finite, top_diff, device_loss, layout.scales,
      parts.gradient_scale);
  error = cudaGetLastError();
  if (error != cudaSuccess || grad.empty()) return error;
  args.weights = layout.weights;
  contrastive_rows_kernel<<<blocks, contrastive_threads, 0, stream>>>(args);
  return enqueue_distance_weights_gradient(parts, layout.weights, x, grad, stream);
}

}  // namespace cuda
}  // namespace detail

namespace cuda_core {

/// Device workspace (bytes) of batch_contrastive_forward_backward for N rows of D columns:
/// one N x N matrix of T and one of double.
template <class T>
std::size_t batch_contrastive_workspace_bytes(Index n, Index d) noexcept {
  return detail::cuda::BatchContrastiveLayout<T>(nullptr, n, d).carve.bytes();
}

/// BatchContrastiveLoss of API.md on device memory (rows as given), enqueued on
/// `stream`; the loss goes to `device_loss` (one T in device memory); grad.data == nullptr
/// skips the gradient. No allocation, no synchronisation, no exception:
/// cudaErrorInvalidValue for N or D < 1, an undeclared distance or reduction, a null
/// device_loss or too small a workspace, else the launch status.
template <class T, class L>
cudaError_t batch_contrastive_forward_backward(void* workspace, std::size_t workspace_bytes,
                                               const DeviceMatrix<const T>& x,
                                               const DeviceVector<L>& labels, T pos_margin,
                                               T neg_margin, Distance distance, Reduction reduction,
                                               const DeviceMatrix<T>& grad, T top_diff,
                                               T* device_loss, cudaStream_t stream) noexcept {
  if (distance != Distance::euclidean && distance != Distance::squared_euclidean) return cudaErrorInvalidValue;
  if (reduction != Reduction::nonzero_mean && reduction != Reduction::mean) return cudaErrorInvalidValue;
  const detail::ContrastiveRule rule(static_cast<double>(pos_margin), static_cast<double>(neg_margin),
                                     distance, reduction);
  return detail::cuda::batch_contrastive_enqueue(workspace, workspace_bytes, x, labels, rule, grad,
                                                 static_cast<double>(top_diff), device_loss, stream);
}

}  // namespace cuda_core

namespace detail {

/// The functor path for both cuda tags (see CudaContrastiveBackend).
template <class T>
struct CudaBatchContrastiveBackend {
  template <class L>
  static T run(BatchContrastiveLoss<T>& loss, cudaStream_t stream, T* deferred_loss,
               const MatrixView<const T>& x, const VectorView<L>& labels,
               const MatrixView<T>& grad, T top_diff) {
    return cuda::run_functor_path<T>(
        BackendSlotAccess::of(loss), "metricloss::BatchContrastiveLoss::forward_backward (cuda)",
        stream, cuda_core::batch_contrastive_workspace_bytes<T>(x.rows, x.cols), deferred_loss,
        [&](void* workspace, std::size_t bytes, T* device_loss) {
          return cuda_core::batch_contrastive_forward_backward<T, L>(
              workspace, bytes, x, labels, loss.pos_margin, loss.neg_margin, loss.distance,
              loss.reduction, grad, top_diff, device_loss, stream);
        });
  }
};

template <class T>
struct Backend<BatchContrastiveLoss<T>, cuda_tag> : cuda::FunctorBackend<CudaBatchContrastiveBackend<T>> {};
template <class T>
struct Backend<BatchContrastiveLoss<T>, cuda_deferred_tag<T>>
    : cuda::FunctorBackend<CudaBatchContrastiveBackend<T>> {};

}  // namespace detail
}  // namespace metricloss
