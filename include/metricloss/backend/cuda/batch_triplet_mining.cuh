#pragma once
// BatchTripletLoss on CUDA, step 2 of batch_triplet.cuh: the mining kernel (a block per
// anchor) and its block-wide selections, which settle ties on exact distances.
#include <metricloss/backend/cuda/exact.cuh>
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/triplet_math.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/options.hpp>

#include <cuda_runtime.h>

#include <type_traits>

namespace metricloss {
namespace detail {
namespace cuda {

constexpr int mining_threads = 256;

template <class L>
__device__ inline bool batch_label_is_nan(L label) {
  if constexpr (std::is_floating_point<L>::value) return label != label;
  return false;
}

template <class T, class L>
struct MiningArgs {
  const T* squared;  // N x N
  const double* norms;  // ||xc_i||^2 of the centred batch
  Index n;
  MatrixView<const T> x;
  VectorView<L> labels;
  double margin;
  Mining mining;
  Distance distance;
  bool soft_margin;
  double* weights;  // N x N doubles, or null (no gradient, or hard's sparse W)
  // Hard mining's W, two entries per anchor (batch_triplet.cuh's hard_gradient_kernel):
  // null without a gradient or for other minings.
  int* hard_rows;
  double* hard_weights;
  double* anchor_sum;
  double* anchor_count;
  int* not_finite;
};

/// How far D2(a, j) may be from ||x_a - x_j||^2 (the product's rounding bound).
template <class T, class L>
__device__ inline double rounding_of(const MiningArgs<T, L>& args, Index a, Index j) {
  return product_rounding_unit<T>(args.x.cols) * (args.norms[a] + args.norms[j]);
}

/// A selection from product values, settled on exact distances: every candidate j (value(j)
/// gives its value as the selection saw it, or NaN if j is not a candidate) within the two
/// rounding bounds of the winner's is compared by exact_squared_thread, lowest row on ties.
/// Product rounding then never decides a tie. Every thread gets the result.
template <bool Largest, class T, class L, class Value>
__device__ inline Candidate block_settle(const MiningArgs<T, L>& args, Index a, Candidate winner,
                                         Value&& value, Candidate* shared) {
  if (winner.index < 0) return winner;
  const double own = rounding_of(args, a, static_cast<Index>(winner.index));
  Candidate best{0.0, -1};
  for (Index j = threadIdx.x; j < args.n; j += mining_threads) {
    const double q = value(j);
    if (!(fabs(q - winner.value) <= own + rounding_of(args, a, j))) continue;  // NaN: not one
    best = better<Largest>(best, Candidate{exact_squared_thread(args.x, a, j), static_cast<long long>(j)});
  }
  best = block_best<Largest, mining_threads>(best, shared);
  // None when the winner's own value is not finite (an overflowed distance): keep it.
  return best.index >= 0 ? best : winner;
}

/// The nearest negative (Largest = false) or the farthest (true) of anchor a by D2; index -1
/// only when there is none (NaN entries take part, so a non-finite row still names a valid
/// row: the loss is NaN then anyway).
template <bool Largest, class T, class L>
__device__ inline Candidate block_negative(const MiningArgs<T, L>& args, Index a, L label,
                                           Candidate* shared) {
  const T* row = args.squared + a * args.n;
  Candidate best{0.0, -1};
  for (Index j = threadIdx.x; j < args.n; j += mining_threads) {
    if (args.labels[j] == label) continue;
    best = better<Largest>(best, Candidate{static_cast<double>(row[j]), static_cast<long long>(j)});
  }
  return block_best<Largest, mining_threads>(best, shared);
}

/// block_negative with its ties settled on exact distances (block_settle).
template <bool Largest, class T, class L>
__device__ inline Candidate block_negative_exact(const MiningArgs<T, L>& args, Index a, L label,
                                                 Candidate* shared) {
  const T* row = args.squared + a * args.n;
  const Candidate chosen = block_negative<Largest>(args, a, label, shared);
  return block_settle<Largest>(args, a, chosen, [&](Index j) {
    return args.labels[j] == label ? static_cast<double>(NAN) : static_cast<double>(row[j]);
  }, shared);
}

/// Semihard's nearest negative of anchor a strictly farther than `above`, an exact squared
/// distance from exact_squared_thread (index -1 when there is none). A product entry within its rounding bound of
/// `above` is recomputed by differences, so that a negative tied with the positive (a
/// duplicate row, say) is never taken for a farther one by rounding.
template <class T, class L>
__device__ inline Candidate block_nearest_farther(const MiningArgs<T, L>& args, Index a, L label,
                                                  double above, Candidate* shared) {
  const T* row = args.squared + a * args.n;
  const double unit = product_rounding_unit<T>(args.x.cols);
  Candidate best{0.0, -1};
  for (Index j = threadIdx.x; j < args.n; j += mining_threads) {
    if (args.labels[j] == label) continue;
    double q = static_cast<double>(row[j]);
    if (fabs(q - above) <= unit * (args.norms[a] + args.norms[j]))  // rare
      q = exact_squared_thread(args.x, a, j);
    if (q > above) best = better<false>(best, Candidate{q, static_cast<long long>(j)});
  }
  best = block_best<false, mining_threads>(best, shared);
  // Ties among the farther negatives, settled exactly (the same values as above).
  return block_settle<false>(args, a, best, [&](Index j) {
    if (args.labels[j] == label) return static_cast<double>(NAN);
    double q = static_cast<double>(row[j]);
    if (fabs(q - above) <= unit * (args.norms[a] + args.norms[j])) q = exact_squared_thread(args.x, a, j);
    return q > above ? q : static_cast<double>(NAN);
  }, shared);
}

/// The term of triplet (a, p, n) with distances by differences (every thread gets it).
template <class T, class L>
__device__ inline TripletTerm block_triplet_term(const MiningArgs<T, L>& args, Index a, Index p,
                                                 Index n, double* shared) {
  const double squared_positive = exact_squared_block<mining_threads>(args.x, a, p, shared);
  const double squared_negative = exact_squared_block<mining_threads>(args.x, a, n, shared);
  return triplet_term(squared_positive, squared_negative, args.margin, args.distance, args.soft_margin);
}

/// One mined triplet (a, p, n) with distances by differences: its term, and (thread 0) its
/// weights into row a of W. Returns the term's loss (on every thread).
template <class T, class L>
__device__ inline double mined_triplet(const MiningArgs<T, L>& args, Index a, Index p, Index n,
                                       double* shared) {
  const TripletTerm t = block_triplet_term(args, a, p, n, shared);
  if (args.weights && threadIdx.x == 0) {
    double* w = args.weights + a * args.n;
    if (t.positive_weight != 0.0) w[p] += t.positive_weight;
    if (t.negative_weight != 0.0) w[n] -= t.negative_weight;
  }
  return t.loss;
}

/// Step 2 for anchor blockIdx.x.
template <class T, class L>
__global__ void __launch_bounds__(mining_threads) mining_kernel(MiningArgs<T, L> args) {
  __shared__ double shared[mining_threads / warp_size];
  __shared__ Candidate shared_candidates[mining_threads / warp_size];
  __shared__ unsigned char is_positive[mining_threads];
  const Index a = blockIdx.x, n = args.n;
  const int tid = static_cast<int>(threadIdx.x);
  const L label = args.labels[a];
  if (tid == 0 && batch_label_is_nan(label)) atomicOr(args.not_finite, 1);
  const T* row = args.squared + a * n;
  double* w = args.weights ? args.weights + a * n : nullptr;
  if (w)
    for (Index j = tid; j < n; j += mining_threads) w[j] = 0.0;
  if (args.hard_rows && tid == 0) {  // no entry unless a triplet is mined below
    args.hard_rows[2 * a] = -1;
    args.hard_rows[2 * a + 1] = -1;
  }
  // |P(a)| and whether Neg(a) is empty.
  double positives = 0.0, negatives = 0.0;
  for (Index j = tid; j < n; j += mining_threads) {
    if (j == a) continue;
    if (args.labels[j] == label) positives += 1.0;
    else negatives += 1.0;
  }
  positives = block_sum<mining_threads>(positives, shared);
  negatives = block_sum<mining_threads>(negatives, shared);  // ends with a barrier: w is zeroed
  double sum = 0.0, count = 0.0;
  if (positives > 0.0 && negatives > 0.0) {
    if (args.mining == Mining::hard) {
      Candidate farthest_positive{0.0, -1};
      for (Index j = tid; j < n; j += mining_threads)
        if (j != a && args.labels[j] == label)
          farthest_positive = better<true>(farthest_positive, Candidate{static_cast<double>(row[j]), j});
      farthest_positive = block_best<true, mining_threads>(farthest_positive, shared_candidates);
      farthest_positive = block_settle<true>(args, a, farthest_positive, [&](Index j) {
        return j != a && args.labels[j] == label ? static_cast<double>(row[j]) : static_cast<double>(NAN);
      }, shared_candidates);
      const Candidate nearest_negative = block_negative_exact<false>(args, a, label, shared_candidates);
      const Index p = farthest_positive.index, q = nearest_negative.index;
      const TripletTerm t = block_triplet_term(args, a, p, q, shared);
      if (tid == 0 && args.hard_rows) {
        // A zero weight is no entry, as the dense W skips it.
        args.hard_rows[2 * a] = t.positive_weight != 0.0 ? static_cast<int>(p) : -1;
        args.hard_rows[2 * a + 1] = t.negative_weight != 0.0 ? static_cast<int>(q) : -1;
        args.hard_weights[2 * a] = t.positive_weight;
        args.hard_weights[2 * a + 1] = -t.negative_weight;
      }
      sum = t.loss;
      count = 1.0;
    } else {
      // The positives one at a time, in row order (a block-uniform walk).
      const Candidate farthest_negative = block_negative_exact<true>(args, a, label, shared_candidates);
      for (Index j0 = 0; j0 < n; j0 += mining_threads) {
        const Index j = j0 + tid;
        is_positive[tid] = j < n && j != a && args.labels[j] == label;
        __syncthreads();
        for (int t = 0; t < mining_threads; ++t) {
          if (!is_positive[t]) continue;
          const Index p = j0 + t;
          if (args.mining == Mining::semihard) {
            const double q_ap = exact_squared_thread(args.x, a, p);  // every thread, same bits
            const Candidate farther = block_nearest_farther(args, a, label, q_ap, shared_candidates);
            const Index negative = farther.index >= 0 ? farther.index : farthest_negative.index;
            sum += mined_triplet(args, a, p, negative, shared);
            count += 1.0;
            continue;
          }
          // all: every negative of a against positive p; t_p = d_ap + m.
          const DistanceTerm positive = distance_from_squared(exact_squared_block<mining_threads>(args.x, a, p, shared), args.distance);
          const double threshold = positive.value + args.margin;
          // The kink d_an = t_p as a squared distance (none below t <= 0): product values
          // within their rounding of it are recomputed, so a hinge at exactly 0 stays out of
          // the count. kink_slack covers the rounding of t^2 and of the root.
          const double kink = args.distance == Distance::squared_euclidean ? threshold
                              : threshold > 0.0 ? threshold * threshold : static_cast<double>(NAN);
          const double slack = fabs(kink) * Numerics<double>::kink_slack;
          double active = 0.0, hinge_sum = 0.0, slope_sum = 0.0;
          for (Index k = tid; k < n; k += mining_threads) {
            if (args.labels[k] == label) continue;
            double q = static_cast<double>(row[k]);
            if (!args.soft_margin && fabs(q - kink) <= rounding_of(args, a, k) + slack)
              q = exact_squared_thread(args.x, a, k);  // rare
            const DistanceTerm negative = distance_from_squared(q, args.distance);
            const HingeTerm h = hinge(threshold - negative.value, args.soft_margin);
            if (!args.soft_margin && !(negative.value < threshold)) continue;
            active += 1.0;
            hinge_sum += h.value;
            slope_sum += h.slope;
            if (w) w[k] -= h.slope * negative.derivative;  // column k: owned by this thread
          }
          active = block_sum<mining_threads>(active, shared);
          hinge_sum = block_sum<mining_threads>(hinge_sum, shared);
          slope_sum = block_sum<mining_threads>(slope_sum, shared);
          sum += hinge_sum;
          count += active;
          if (w && tid == 0 && slope_sum != 0.0) w[p] += slope_sum * positive.derivative;
        }
        __syncthreads();  // is_positive is rewritten next
      }
    }
  }
  if (tid == 0) {
    args.anchor_sum[a] = sum;
    args.anchor_count[a] = count;
  }
}

}  // namespace cuda
}  // namespace detail
}  // namespace metricloss
