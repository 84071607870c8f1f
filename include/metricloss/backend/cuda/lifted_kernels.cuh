#pragma once
// The lifted structured loss on CUDA, steps 3 to 5 of lifted_structure.cuh: the per-row
// kernels (a block per row) and the one-block reduction of the loss.
#include <metricloss/backend/cuda/batch_weights.cuh>
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/views.hpp>

#include <cuda_runtime.h>

#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {
namespace cuda {

constexpr int lifted_threads = weight_threads;  // add_near_chunk's block size

/// Per-row arrays of the lifted kernels (each N doubles) and the call's scalars.
struct LiftedRows {
  double* log_normaliser;
  double* min_distance;
  double* shifted_sum;
  double* coefficient;
  double* pair_loss;   // sum_{j > i, y_j = y_i} h_ij^2
  double* pair_count;  // |{j > i : y_j = y_i}|
  double* row_sum;     // sum_k S_ik (BatchParts)
  double* gradient_scale;
  int* not_finite;
};

template <class L>
__device__ inline bool label_is_nan(L label) {
  if constexpr (std::is_floating_point<L>::value) return label != label;
  return false;
}

/// Step 3: nearest negative distance, shifted sum and a_i of row blockIdx.x.
template <class T, class L>
__global__ void __launch_bounds__(lifted_threads)
    lifted_row_normaliser_kernel(const T* squared, Index n, VectorView<L> labels, double margin,
                                 LiftedRows rows) {
  __shared__ double shared[lifted_threads / warp_size];
  const Index i = blockIdx.x;
  const L label = labels[i];
  if (threadIdx.x == 0 && label_is_nan(label)) atomicOr(rows.not_finite, 1);
  const T* row = squared + i * n;
  double nearest = std::numeric_limits<double>::infinity();
  for (Index k = threadIdx.x; k < n; k += lifted_threads)
    if (labels[k] != label) nearest = fmin(nearest, sqrt(static_cast<double>(row[k])));
  nearest = block_min<lifted_threads>(nearest, shared);
  double sum = 0.0;
  for (Index k = threadIdx.x; k < n; k += lifted_threads)
    if (labels[k] != label) sum += exp(nearest - sqrt(static_cast<double>(row[k])));
  sum = block_sum<lifted_threads>(sum, shared);
  if (threadIdx.x == 0) {
    rows.min_distance[i] = nearest;
    rows.shifted_sum[i] = sum;
    rows.log_normaliser[i] = lifted_log_normaliser(margin, nearest, sum);
  }
}

/// Step 4: the positive pairs of row blockIdx.x.
template <class T, class L>
__global__ void __launch_bounds__(lifted_threads)
    lifted_row_pairs_kernel(const T* squared, Index n, VectorView<L> labels, LiftedRows rows) {
  __shared__ double shared[lifted_threads / warp_size];
  const Index i = blockIdx.x;
  const L label = labels[i];
  const double a_i = rows.log_normaliser[i];
  const T* row = squared + i * n;
  double coefficient = 0.0, loss = 0.0, count = 0.0;
  for (Index j = threadIdx.x; j < n; j += lifted_threads) {
    if (j == i || !(labels[j] == label)) continue;
    const LiftedPair pair = lifted_pair(a_i, rows.log_normaliser[j], sqrt(static_cast<double>(row[j])));
    coefficient += pair.hinge * pair.share_i;
    if (j > i) {
      loss += pair.hinge * pair.hinge;
      count += 1.0;
    }
  }
  coefficient = block_sum<lifted_threads>(coefficient, shared);
  loss = block_sum<lifted_threads>(loss, shared);
  count = block_sum<lifted_threads>(count, shared);
  if (threadIdx.x == 0) {
    rows.coefficient[i] = coefficient;
    rows.pair_loss[i] = loss;
    rows.pair_count[i] = count;
  }
}

/// Step 4, second stage: L = sum/(2|P|) (0 when |P| = 0; NaN for non-finite data or labels)
/// and the gradient's scale top_diff/|P|.
template <class T>
__global__ void __launch_bounds__(finalize_threads)
    lifted_finalize_kernel(Index n, LiftedRows rows, double top_diff, T* device_loss) {
  __shared__ double shared[finalize_threads / warp_size];
  double loss = 0.0, count = 0.0;
  for (Index i = threadIdx.x; i < n; i += finalize_threads) {
    loss += rows.pair_loss[i];
    count += rows.pair_count[i];
  }
  loss = block_sum<finalize_threads>(loss, shared);
  count = block_sum<finalize_threads>(count, shared);
  if (threadIdx.x == 0) {
    const bool bad = *rows.not_finite != 0;
    const double value = count > 0.0 ? loss / (2.0 * count) : 0.0;
    *device_loss = bad ? static_cast<T>(nan("")) : static_cast<T>(value);
    *rows.gradient_scale = count > 0.0 ? top_diff / count : 0.0;
  }
}

/// Step 5: S_ik = W_ik + W_ki of row blockIdx.x written over its D2, sum_k S_ik (of the
/// stored, rounded entries), and near_i = sum over near k of S_ik (x_i - x_k) in double
/// (near pairs: Numerics<T>::near_ratio, see batch_weights.cuh).
template <class T, class L>
__global__ void __launch_bounds__(lifted_threads)
    lifted_row_weights_kernel(T* squared, Index n, MatrixView<const T> x, const double* norms,
                              VectorView<L> labels, LiftedRows rows, double* near) {
  __shared__ double shared[lifted_threads / warp_size];
  __shared__ double near_weight[lifted_threads];
  const Index i = blockIdx.x, d = x.cols;
  const int tid = static_cast<int>(threadIdx.x);
  const L label = labels[i];
  const double a_i = rows.log_normaliser[i], c_i = rows.coefficient[i];
  const double min_i = rows.min_distance[i], sum_i = rows.shifted_sum[i];
  const double threshold_i = Numerics<T>::near_ratio * norms[i];
  T* row = squared + i * n;
  double* near_row = near + i * d;
  for (Index c = tid; c < d; c += lifted_threads) near_row[c] = 0.0;
  double row_sum = 0.0;
  for (Index k0 = 0; k0 < n; k0 += lifted_threads) {  // block-uniform bound
    const Index k = k0 + tid;
    double s = 0.0;
    bool is_near = false;
    if (k < n && k != i) {
      const double squared_distance = static_cast<double>(row[k]);
      const double distance = sqrt(squared_distance);
      if (labels[k] == label) {
        s = weight_on_squared(lifted_pair(a_i, rows.log_normaliser[k], distance).hinge, distance);
      } else {
        const double c_k = rows.coefficient[k];
        const double from_i =
            c_i == 0.0 ? 0.0 : lifted_negative_weight(-c_i / sum_i, exp(min_i - distance), distance);
        const double from_k =
            c_k == 0.0 ? 0.0
                       : lifted_negative_weight(-c_k / rows.shifted_sum[k],
                                                exp(rows.min_distance[k] - distance), distance);
        s = from_i + from_k;
      }
      is_near = s != 0.0 && squared_distance < threshold_i + Numerics<T>::near_ratio * norms[k];
    }
    if (k < n) {
      const T stored = is_near ? T(0) : static_cast<T>(s);
      row[k] = stored;
      row_sum += static_cast<double>(stored);
    }
    add_near_chunk(is_near, s, i, k0, x, near_row, near_weight);
  }
  row_sum = block_sum<lifted_threads>(row_sum, shared);
  if (tid == 0) rows.row_sum[i] = row_sum;
}

}  // namespace cuda
}  // namespace detail
}  // namespace metricloss
