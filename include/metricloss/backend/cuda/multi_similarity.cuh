#pragma once
// MultiSimilarityLoss on CUDA: the maths of detail/multi_similarity_math.hpp (the formula and
// gradient are in <metricloss/multi_similarity.hpp>) on the batch's similarities.
//   1. ||x_i|| in double, the finiteness flag and S = X X^T (similarities.cuh);
//   2. a block per anchor a, as multi_similarity_row: the extremes of its positives and
//      negatives, exact (double dot products) for the entries within twice the widest
//      rounding of an approximate extreme; the kept pairs, decided on exact dot products
//      where S lies within its rounding, rounding_unit(D) ||x_a|| ||x_j||, of a limit; the
//      exponents with each side's largest factored out; L_a; (gradient) row a of
//      W = dL/dS times top_diff;
//   3. one block: L = (1/N) sum_a L_a (NaN for non-finite data or labels);
//   4. (gradient) dX = (W + W^T) X (similarities.cuh).
// Memory: one N x N of T and one of double, as batch triplet. Deterministic: every sum has
// a fixed order. normalize = true wraps this path (normalize.cuh).
#include <metricloss/backend/cuda/batch_triplet_mining.cuh>
#include <metricloss/backend/cuda/exact.cuh>
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/backend/cuda/similarities.cuh>
#include <metricloss/detail/multi_similarity_math.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/multi_similarity.hpp>

#include <cuda_runtime.h>

namespace metricloss {
namespace detail {
namespace cuda {

template <class T, class L>
struct SimilarityArgs {
  const T* similarity;  // N x N
  const double* norms;  // ||x_i||
  MatrixView<const T> x;
  VectorView<L> labels;
  MultiSimilarityRule rule;
  double scale;         // top_diff / N
  double* weights;      // N x N: row a holds its exponents, then e^{z - shift}, then W
  bool gradient;
  double* anchor_loss;  // L_a
  int* not_finite;
};

/// Step 2 for anchor blockIdx.x. Thread t handles candidates j = t (mod the block) in every
/// loop, so row a of `weights` needs no barrier between the loops.
template <class T, class L>
__global__ void __launch_bounds__(similarity_threads) multi_similarity_rows_kernel(SimilarityArgs<T, L> args) {
  __shared__ double shared[similarity_threads / warp_size];
  constexpr double inf = INFINITY;
  const Index a = blockIdx.x, n = args.x.rows;
  const int tid = static_cast<int>(threadIdx.x);
  const L label = args.labels[a];
  if (tid == 0 && batch_label_is_nan(label)) atomicOr(args.not_finite, 1);
  const MultiSimilarityRule& rule = args.rule;
  const T* row = args.similarity + a * n;
  double* z = args.weights + a * n;
  const double own = product_rounding_unit<T>(args.x.cols) * args.norms[a];  // rounding(a, j) / ||x_j||
  // The extremes: the smallest positive and the largest negative similarity.
  double min_pos = inf, max_neg = -inf, widest = 0.0;
  for (Index j = tid; j < n; j += similarity_threads) {
    if (j == a) continue;
    const double v = static_cast<double>(row[j]);
    if (args.labels[j] == label) min_pos = fmin(min_pos, v);
    else max_neg = fmax(max_neg, v);
    widest = fmax(widest, args.norms[j]);
  }
  min_pos = block_min<similarity_threads>(min_pos, shared);
  max_neg = block_max<similarity_threads>(max_neg, shared);
  const double slack = 2.0 * own * block_max<similarity_threads>(widest, shared);
  if (!rule.keep_all && slack > 0.0) {
    // Only entries within twice the rounding of the approximate extreme can be the exact one.
    double exact_min = inf, exact_max = -inf;
    for (Index j = tid; j < n; j += similarity_threads) {
      if (j == a) continue;
      const double v = static_cast<double>(row[j]);
      const bool positive = args.labels[j] == label;
      if (positive && v <= min_pos + slack) exact_min = fmin(exact_min, exact_dot_thread(args.x, a, j));
      if (!positive && v >= max_neg - slack) exact_max = fmax(exact_max, exact_dot_thread(args.x, a, j));
    }
    min_pos = block_min<similarity_threads>(exact_min, shared);
    max_neg = block_max<similarity_threads>(exact_max, shared);
  }
  // Kept: positives with S < max_neg + epsilon, negatives with S > min_pos - epsilon.
  const double pos_limit = max_neg + rule.epsilon, neg_limit = min_pos - rule.epsilon;
  double pos_top = -inf, neg_top = -inf;
  for (Index j = tid; j < n; j += similarity_threads) {
    z[j] = -inf;
    if (j == a) continue;
    const double v = static_cast<double>(row[j]);
    const bool positive = args.labels[j] == label;
    if (!rule.keep_all) {
      const double limit = positive ? pos_limit : neg_limit;
      const double decided = fabs(v - limit) <= own * args.norms[j] ? exact_dot_thread(args.x, a, j) : v;
      if (positive ? !(decided < limit) : !(decided > limit)) continue;
    }
    z[j] = positive ? -rule.alpha * (v - rule.base) : rule.beta * (v - rule.base);
    if (positive) pos_top = fmax(pos_top, z[j]);
    else neg_top = fmax(neg_top, z[j]);
  }
  pos_top = block_max<similarity_threads>(pos_top, shared);
  neg_top = block_max<similarity_threads>(neg_top, shared);
  LogOnePlusSum pos, neg;
  pos.start(pos_top, pos_top != -inf);
  neg.start(neg_top, neg_top != -inf);
  // z[j] = e^{z_j - shift}, 0 where not kept; each side's sum.
  double pos_sum = 0.0, neg_sum = 0.0;
  for (Index j = tid; j < n; j += similarity_threads) {
    if (z[j] == -inf) {
      z[j] = 0.0;
      continue;
    }
    const bool positive = args.labels[j] == label;
    z[j] = exp(z[j] - (positive ? pos.shift : neg.shift));
    if (positive) pos_sum += z[j];
    else neg_sum += z[j];
  }
  pos.sum += block_sum<similarity_threads>(pos_sum, shared);
  neg.sum += block_sum<similarity_threads>(neg_sum, shared);
  if (args.gradient) {
    // d/dS of (1/alpha) log(1 + sum e^{-alpha (S - base)}) and (1/beta) log(1 + sum e^{beta (S - base)}).
    const double pos_scale = -args.scale / pos.sum, neg_scale = args.scale / neg.sum;
    for (Index j = tid; j < n; j += similarity_threads)
      z[j] *= args.labels[j] == label ? pos_scale : neg_scale;
  }
  if (tid == 0) args.anchor_loss[a] = pos.value() / rule.alpha + neg.value() / rule.beta;
}

/// Step 3: L = (1/N) sum_a L_a, in a fixed order.
template <class T>
__global__ void __launch_bounds__(finalize_threads)
    multi_similarity_finalize_kernel(Index n, const double* anchor_loss, const int* not_finite,
                                     T* device_loss) {
  __shared__ double shared[finalize_threads / warp_size];
  double sum = 0.0;
  for (Index a = threadIdx.x; a < n; a += finalize_threads) sum += anchor_loss[a];
  sum = block_sum<finalize_threads>(sum, shared);
  if (threadIdx.x == 0)
    *device_loss = *not_finite ? static_cast<T>(nan("")) : static_cast<T>(sum / static_cast<double>(n));
}

/// The workspace: the norms, S (then W + W^T as T), W, the anchors' L_a and the flag.
template <class T>
struct MultiSimilarityLayout {
  WorkspaceCarver carve;
  double* norms;
  T* similarity;
  double* weights;
  double* anchor_loss;
  int* not_finite;

  MultiSimilarityLayout(void* workspace, Index n) : carve(workspace) {
    const auto un = static_cast<std::size_t>(n);
    norms = carve.take<double>(un);
    similarity = carve.take<T>(un * un);
    weights = carve.take<double>(un * un);
    anchor_loss = carve.take<double>(un);
    not_finite = carve.take<int>(1);
  }
};

template <class T, class L>
cudaError_t multi_similarity_enqueue(void* workspace, std::size_t workspace_bytes,
                                     const MatrixView<const T>& x, const VectorView<L>& labels,
                                     const MultiSimilarityRule& rule, const MatrixView<T>& grad,
                                     double top_diff, T* device_loss, cudaStream_t stream) noexcept {
  const Index n = x.rows;
  if (n < 1 || x.cols < 1 || device_loss == nullptr || workspace == nullptr) return cudaErrorInvalidValue;
  const MultiSimilarityLayout<T> layout(workspace, n);
  if (workspace_bytes < layout.carve.bytes()) return cudaErrorInvalidValue;
  cudaError_t error = cudaMemsetAsync(layout.not_finite, 0, sizeof(int), stream);
  if (error != cudaSuccess) return error;
  error = enqueue_similarities(x, layout.norms, layout.similarity, layout.not_finite, stream);
  if (error != cudaSuccess) return error;
  const auto blocks = static_cast<unsigned>(n);
  const SimilarityArgs<T, L> args{layout.similarity, layout.norms, x, labels, rule,
                                  top_diff / static_cast<double>(n), layout.weights, !grad.empty(),
                                  layout.anchor_loss, layout.not_finite};
  multi_similarity_rows_kernel<<<blocks, similarity_threads, 0, stream>>>(args);
  multi_similarity_finalize_kernel<<<1, finalize_threads, 0, stream>>>(n, layout.anchor_loss,
                                                                       layout.not_finite, device_loss);
  error = cudaGetLastError();
  if (error != cudaSuccess || grad.empty()) return error;
  return enqueue_similarity_gradient(layout.weights, layout.similarity, x, layout.not_finite, grad,
                                     stream);
}

}  // namespace cuda
}  // namespace detail

namespace cuda_core {

/// Device workspace (bytes) of multi_similarity_forward_backward for N rows of D columns:
/// one N x N matrix of T and one of double.
template <class T>
std::size_t multi_similarity_workspace_bytes(Index n, Index /*d*/) noexcept {
  return detail::cuda::MultiSimilarityLayout<T>(nullptr, n).carve.bytes();
}

/// MultiSimilarityLoss of API.md on device memory (rows as given), enqueued on `stream`;
/// the loss goes to `device_loss` (one T in device memory); grad.data == nullptr skips the
/// gradient. No allocation, no synchronisation, no exception: cudaErrorInvalidValue for N or
/// D < 1, a null device_loss or too small a workspace, else the launch status. The options
/// are the functor's, checked by it (alpha, beta > 0 and finite; base finite; epsilon finite
/// or +infinity).
template <class T, class L>
cudaError_t multi_similarity_forward_backward(void* workspace, std::size_t workspace_bytes,
                                              const DeviceMatrix<const T>& x,
                                              const DeviceVector<L>& labels, T alpha, T beta,
                                              T base, T epsilon, const DeviceMatrix<T>& grad,
                                              T top_diff, T* device_loss, cudaStream_t stream) noexcept {
  const detail::MultiSimilarityRule rule(static_cast<double>(alpha), static_cast<double>(beta),
                                         static_cast<double>(base), static_cast<double>(epsilon));
  return detail::cuda::multi_similarity_enqueue(workspace, workspace_bytes, x, labels, rule, grad,
                                                static_cast<double>(top_diff), device_loss, stream);
}

}  // namespace cuda_core

namespace detail {

/// The functor path for both cuda tags (see CudaContrastiveBackend).
template <class T>
struct CudaMultiSimilarityBackend {
  template <class L>
  static T run(MultiSimilarityLoss<T>& loss, cudaStream_t stream, T* deferred_loss,
               const MatrixView<const T>& x, const VectorView<L>& labels,
               const MatrixView<T>& grad, T top_diff) {
    return cuda::run_functor_path<T>(
        BackendSlotAccess::of(loss), "metricloss::MultiSimilarityLoss::forward_backward (cuda)",
        stream, cuda_core::multi_similarity_workspace_bytes<T>(x.rows, x.cols), deferred_loss,
        [&](void* workspace, std::size_t bytes, T* device_loss) {
          return cuda_core::multi_similarity_forward_backward<T, L>(
              workspace, bytes, x, labels, loss.alpha, loss.beta, loss.base, loss.epsilon, grad,
              top_diff, device_loss, stream);
        });
  }
};

template <class T>
struct Backend<MultiSimilarityLoss<T>, cuda_tag> : cuda::FunctorBackend<CudaMultiSimilarityBackend<T>> {};
template <class T>
struct Backend<MultiSimilarityLoss<T>, cuda_deferred_tag<T>>
    : cuda::FunctorBackend<CudaMultiSimilarityBackend<T>> {};

}  // namespace detail
}  // namespace metricloss
