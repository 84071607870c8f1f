#pragma once
// Reference sets on CUDA (<metricloss/reference.hpp>): BatchTripletLoss, LiftedStructureLoss,
// BatchContrastiveLoss and MultiSimilarityLoss of queries Q (N_q x D) against candidates R
// (N_r x D), the maths of the scalar paths (backend/scalar/reference.hpp,
// batch_contrastive.hpp, multi_similarity.hpp), step by step:
//   1. a scan of Q, R and both label vectors for non-finite values (NaN loss and gradients),
//      and self_index (staged from the host) against the labels: a self row whose label is not
//      the query's is the verdict, reported as normalize = true reports a zero row;
//   2. D2_aj = ||q_a - r_j||^2 by differences in double (cross_kernel, tiles through shared
//      memory): exact, so there is nothing to centre, recompute or settle, and ties among
//      candidates go to the lowest row of R as on the CPU; multi-similarity takes
//      S_aj = <q_a, r_j>, summed in double in the scalar path's order (the same values, so
//      the same kept pairs);
//   3. the loss (a block per query) writes W = dL/dD2 (N_q x N_r doubles) and its share of
//      the sum and of the count; lifted first reduces each column's normaliser over Q; batch
//      contrastive sums each side first and writes W once the counts are known;
//      multi-similarity writes W = dL/dS;
//   4. grad_q_a = 2 s sum_j W_aj (q_a - r_j) and grad_r_j = 2 s sum_a W_aj (r_j - q_a), by
//      differences in double, one thread per entry (no cancellation, no near pairs);
//      multi-similarity: grad_q_a = s sum_j W_aj r_j and grad_r_j = s sum_a W_aj q_a.
// normalize = true: the unit rows of Q and of R (normalize.cuh's steps) around the same core,
// with one verdict for a self row with another label and a zero row of either set.
// Cost O(N_q N_r D) in double; memory two N_q x N_r matrices of doubles (256 x 65536: 256 MiB).
// Batch-all and semihard walk an anchor's positives one at a time (O(N_q |P| N_r)), as the
// batch kernels do. Every reduction has a fixed order: deterministic.
#include <metricloss/backend/cuda/batch_triplet.cuh>
#include <metricloss/backend/cuda/batch_triplet_mining.cuh>
#include <metricloss/backend/cuda/normalize.cuh>
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/batch_contrastive.hpp>
#include <metricloss/batch_triplet.hpp>
#include <metricloss/detail/batch_contrastive_math.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/detail/multi_similarity_math.hpp>
#include <metricloss/detail/triplet_math.hpp>
#include <metricloss/lifted_structure.hpp>
#include <metricloss/multi_similarity.hpp>
#include <metricloss/reference.hpp>

#include <cuda_runtime.h>

#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

namespace metricloss {
namespace detail {
namespace cuda {

/// No bad self row: the verdict's initial value (all bits set by cudaMemsetAsync).
constexpr unsigned long long no_bad_self = ~0ull;

template <class L, class LR>
__device__ inline bool same_label(L a, LR b) {
  using C = std::common_type_t<L, LR>;
  return static_cast<C>(a) == static_cast<C>(b);
}

template <class L>
__device__ inline bool label_finite(L label) {
  if constexpr (std::is_floating_point<L>::value) return label == label;
  return true;
}

/// Q, R and the queries' device inputs to one call of a reference core.
template <class T, class L, class LR>
struct ReferenceArgs {
  MatrixView<const T> q, r;
  VectorView<L> labels_q;
  VectorView<LR> labels_r;
  const long long* self;  // N_q entries in device memory, or null (no query is in R)
  __device__ long long self_of(Index a) const { return self ? self[a] : -1; }
};

/// BatchContrastiveLoss: an anchor's sums (ContrastiveRowSums' five, and its candidates).
constexpr int reference_contrastive_sums = 6;

/// The workspace of a reference core, carved in a fixed order.
struct ReferenceLayout {
  WorkspaceCarver carve;
  double* squared;  // N_q x N_r: D2 (multi-similarity: S)
  double* weights;  // N_q x N_r: W (multi-similarity: its exponents first, also without a gradient)
  long long* self;  // N_q
  double* anchor_sum;
  double* anchor_count;
  double* row_nearest;  // lifted, N_q each
  double* row_sum;
  double* row_log;
  double* col_nearest;  // lifted, N_r each
  double* col_sum;
  double* col_log;
  double* contrastive_sums;  // N_q x reference_contrastive_sums
  double* scales;            // batch contrastive: {pos_scale, neg_scale}
  double* gradient_scale;
  int* not_finite;
  unsigned long long* bad_self;

  ReferenceLayout(void* workspace, Index nq, Index nr) : carve(workspace) {
    const auto uq = static_cast<std::size_t>(nq), ur = static_cast<std::size_t>(nr);
    squared = carve.take<double>(uq * ur);
    weights = carve.take<double>(uq * ur);
    self = carve.take<long long>(uq);
    anchor_sum = carve.take<double>(uq);
    anchor_count = carve.take<double>(uq);
    row_nearest = carve.take<double>(uq);
    row_sum = carve.take<double>(uq);
    row_log = carve.take<double>(uq);
    col_nearest = carve.take<double>(ur);
    col_sum = carve.take<double>(ur);
    col_log = carve.take<double>(ur);
    contrastive_sums = carve.take<double>(uq * reference_contrastive_sums);
    scales = carve.take<double>(2);
    gradient_scale = carve.take<double>(1);
    not_finite = carve.take<int>(1);
    bad_self = carve.take<unsigned long long>(1);
  }
};

constexpr int scan_threads = 256;

/// Step 1: *not_finite for a non-finite entry of Q or R or a NaN label; *bad_self the lowest
/// query whose self row is out of range or has another label.
template <class T, class L, class LR>
__global__ void __launch_bounds__(scan_threads)
    reference_scan_kernel(ReferenceArgs<T, L, LR> args, int* not_finite,
                          unsigned long long* bad_self) {
  const Index stride = static_cast<Index>(gridDim.x) * scan_threads;
  const Index first = static_cast<Index>(blockIdx.x) * scan_threads + threadIdx.x;
  const Index d = args.q.cols, nq = args.q.rows, nr = args.r.rows;
  bool finite = true;
  for (Index e = first; e < nq * d; e += stride) finite = finite && isfinite(static_cast<double>(args.q(e / d, e % d)));
  for (Index e = first; e < nr * d; e += stride) finite = finite && isfinite(static_cast<double>(args.r(e / d, e % d)));
  for (Index j = first; j < nr; j += stride) finite = finite && label_finite(args.labels_r[j]);
  for (Index a = first; a < nq; a += stride) {
    finite = finite && label_finite(args.labels_q[a]);
    const long long s = args.self_of(a);
    if (s < -1 || s >= nr) {
      atomicMin(bad_self, static_cast<unsigned long long>(a));
    } else if (s >= 0) {
      const L yq = args.labels_q[a];
      const LR yr = args.labels_r[s];
      if (label_finite(yq) && label_finite(yr) && !same_label(yq, yr))
        atomicMin(bad_self, static_cast<unsigned long long>(a));
    }
  }
  if (!finite) atomicOr(not_finite, 1);
}

constexpr int cross_tile = 32;  // a 32 x 32 tile of D2 per block, 32 columns of D at a time
constexpr int cross_rows_per_thread = 4;
constexpr int cross_threads = cross_tile * cross_tile / cross_rows_per_thread;

/// What step 2 computes for each pair.
enum class CrossForm { squared_differences, products };

/// Step 2: D2 or S (N_q x N_r, stride N_r) in double, k ascending. The products are rounded
/// and added one at a time (no fma): float products are exact in double, so S is the scalar
/// path's, and with it every kept-pair decision.
template <CrossForm Form, class T>
__global__ void __launch_bounds__(cross_threads)
    cross_kernel(MatrixView<const T> q, MatrixView<const T> r, double* out) {
  __shared__ double q_tile[cross_tile][cross_tile + 1];
  __shared__ double r_tile[cross_tile][cross_tile + 1];
  const int tx = static_cast<int>(threadIdx.x) % cross_tile;
  const int ty = static_cast<int>(threadIdx.x) / cross_tile;
  constexpr int ty_count = cross_threads / cross_tile;
  const Index a0 = static_cast<Index>(blockIdx.y) * cross_tile;
  const Index j0 = static_cast<Index>(blockIdx.x) * cross_tile;
  const Index nq = q.rows, nr = r.rows, d = q.cols;
  double sum[cross_rows_per_thread] = {};
  for (Index k0 = 0; k0 < d; k0 += cross_tile) {
    for (int row = ty; row < cross_tile; row += ty_count) {
      const Index a = a0 + row, j = j0 + row, k = k0 + tx;
      q_tile[row][tx] = (a < nq && k < d) ? static_cast<double>(q(a, k)) : 0.0;
      r_tile[row][tx] = (j < nr && k < d) ? static_cast<double>(r(j, k)) : 0.0;
    }
    __syncthreads();
    const int width = d - k0 < cross_tile ? static_cast<int>(d - k0) : cross_tile;
    for (int k = 0; k < width; ++k) {
      const double rv = r_tile[tx][k];
#pragma unroll
      for (int i = 0; i < cross_rows_per_thread; ++i) {
        const double qv = q_tile[ty + i * ty_count][k];
        if constexpr (Form == CrossForm::products) {
          sum[i] = __dadd_rn(sum[i], __dmul_rn(qv, rv));
        } else {
          const double diff = qv - rv;
          sum[i] = fma(diff, diff, sum[i]);
        }
      }
    }
    __syncthreads();
  }
  const Index j = j0 + tx;
  if (j >= nr) return;
#pragma unroll
  for (int i = 0; i < cross_rows_per_thread; ++i) {
    const Index a = a0 + ty + i * ty_count;
    if (a < nq) out[a * nr + j] = sum[i];
  }
}

constexpr int reference_threads = 256;

/// Step 3 of BatchTripletLoss: mining of query blockIdx.x over R, the rules of the batch
/// kernel (batch_triplet_mining.cuh) on exact values.
template <class T, class L, class LR>
__global__ void __launch_bounds__(reference_threads)
    reference_mining_kernel(ReferenceArgs<T, L, LR> args, const double* squared, double margin,
                            Mining mining, Distance distance, bool soft_margin, double* weights,
                            double* anchor_sum, double* anchor_count) {
  __shared__ double shared[reference_threads / warp_size];
  __shared__ Candidate shared_candidates[reference_threads / warp_size];
  __shared__ unsigned char is_positive[reference_threads];
  const Index a = blockIdx.x, nr = args.r.rows;
  const int tid = static_cast<int>(threadIdx.x);
  const L label = args.labels_q[a];
  const long long self = args.self_of(a);
  const double* row = squared + a * nr;
  double* w = weights ? weights + a * nr : nullptr;
  if (w)
    for (Index j = tid; j < nr; j += reference_threads) w[j] = 0.0;
  const auto positive_at = [&](Index j) { return j != self && same_label(label, args.labels_r[j]); };
  const auto negative_at = [&](Index j) { return !same_label(label, args.labels_r[j]); };
  double positives = 0.0, negatives = 0.0;
  for (Index j = tid; j < nr; j += reference_threads) {
    positives += positive_at(j) ? 1.0 : 0.0;
    negatives += negative_at(j) ? 1.0 : 0.0;
  }
  positives = block_sum<reference_threads>(positives, shared);
  negatives = block_sum<reference_threads>(negatives, shared);  // a barrier: w is zeroed
  double sum = 0.0, count = 0.0;
  // One triplet's term; thread 0 writes its weights (block-uniform arguments). No candidate
  // (p or n < 0) only where every value was NaN: the loss is NaN then anyway.
  const auto triplet = [&](Index p, Index n) {
    count += 1.0;
    if (p < 0 || n < 0) return;
    const TripletTerm t = triplet_term(row[p], row[n], margin, distance, soft_margin);
    if (w && tid == 0) {
      if (t.positive_weight != 0.0) w[p] += t.positive_weight;
      if (t.negative_weight != 0.0) w[n] -= t.negative_weight;
    }
    sum += t.loss;
  };
  // The nearest (Largest = false) or farthest negative with D2 above `above`.
  const auto negative_of = [&](auto largest, double above) {
    constexpr bool Largest = decltype(largest)::value;
    Candidate best{0.0, -1};
    for (Index j = tid; j < nr; j += reference_threads)
      if (negative_at(j) && row[j] > above) best = better<Largest>(best, Candidate{row[j], static_cast<long long>(j)});
    return block_best<Largest, reference_threads>(best, shared_candidates);
  };
  if (positives > 0.0 && negatives > 0.0) {
    const double below_all = -std::numeric_limits<double>::infinity();
    if (mining == Mining::hard) {
      Candidate farthest_positive{0.0, -1};
      for (Index j = tid; j < nr; j += reference_threads)
        if (positive_at(j)) farthest_positive = better<true>(farthest_positive, Candidate{row[j], static_cast<long long>(j)});
      farthest_positive = block_best<true, reference_threads>(farthest_positive, shared_candidates);
      const Candidate nearest = negative_of(std::false_type{}, below_all);
      triplet(farthest_positive.index, nearest.index);
    } else {
      const Candidate farthest = negative_of(std::true_type{}, below_all);
      for (Index j0 = 0; j0 < nr; j0 += reference_threads) {  // positives in row order
        const Index j = j0 + tid;
        is_positive[tid] = j < nr && positive_at(j);
        __syncthreads();
        for (int t = 0; t < reference_threads; ++t) {
          if (!is_positive[t]) continue;
          const Index p = j0 + t;
          if (mining == Mining::semihard) {
            const Candidate farther = negative_of(std::false_type{}, row[p]);
            triplet(p, farther.index >= 0 ? farther.index : farthest.index);
            continue;
          }
          // all: every negative against positive p, t_p = d_ap + m.
          const DistanceTerm positive = distance_from_squared(row[p], distance);
          const double threshold = positive.value + margin;
          double active = 0.0, hinge_sum = 0.0, slope_sum = 0.0;
          for (Index k = tid; k < nr; k += reference_threads) {
            if (!negative_at(k)) continue;
            const DistanceTerm negative = distance_from_squared(row[k], distance);
            if (!soft_margin && !(negative.value < threshold)) continue;
            const HingeTerm h = hinge(threshold - negative.value, soft_margin);
            active += 1.0;
            hinge_sum += h.value;
            slope_sum += h.slope;
            if (w) w[k] -= h.slope * negative.derivative;  // column k: this thread's
          }
          active = block_sum<reference_threads>(active, shared);
          hinge_sum = block_sum<reference_threads>(hinge_sum, shared);
          slope_sum = block_sum<reference_threads>(slope_sum, shared);
          sum += hinge_sum;
          count += active;
          if (w && tid == 0 && slope_sum != 0.0) w[p] += slope_sum * positive.derivative;
        }
        __syncthreads();  // is_positive is rewritten next
      }
    }
  }
  if (tid == 0) {
    anchor_sum[a] = sum;
    anchor_count[a] = count;
  }
}

/// Step 3 of LiftedStructureLoss, rows: query blockIdx.x's normaliser over R's negatives,
/// shifted by its nearest negative.
template <class T, class L, class LR>
__global__ void __launch_bounds__(reference_threads)
    lifted_row_normaliser_kernel(ReferenceArgs<T, L, LR> args, const double* squared, double margin,
                                 double* row_nearest, double* row_sum, double* row_log) {
  __shared__ double shared[reference_threads / warp_size];
  const Index a = blockIdx.x, nr = args.r.rows;
  const L label = args.labels_q[a];
  const double* row = squared + a * nr;
  double nearest = std::numeric_limits<double>::infinity();
  for (Index j = threadIdx.x; j < nr; j += reference_threads)
    if (!same_label(label, args.labels_r[j])) nearest = fmin(nearest, sqrt(row[j]));
  nearest = block_min<reference_threads>(nearest, shared);
  double sum = 0.0;
  for (Index j = threadIdx.x; j < nr; j += reference_threads)
    if (!same_label(label, args.labels_r[j])) sum += exp(nearest - sqrt(row[j]));
  sum = block_sum<reference_threads>(sum, shared);
  if (threadIdx.x == 0) {
    row_nearest[a] = nearest;
    row_sum[a] = sum;
    row_log[a] = lifted_log_normaliser(margin, nearest, sum);
  }
}

/// Lifted, columns: candidate j's normaliser over Q's negatives (a thread per column, Q in
/// order: coalesced across j).
template <class T, class L, class LR>
__global__ void __launch_bounds__(reference_threads)
    lifted_column_normaliser_kernel(ReferenceArgs<T, L, LR> args, const double* squared,
                                    double margin, double* col_nearest, double* col_sum,
                                    double* col_log) {
  const Index j = static_cast<Index>(blockIdx.x) * reference_threads + threadIdx.x;
  const Index nq = args.q.rows, nr = args.r.rows;
  if (j >= nr) return;
  const LR label = args.labels_r[j];
  double nearest = std::numeric_limits<double>::infinity();
  for (Index a = 0; a < nq; ++a)
    if (!same_label(args.labels_q[a], label)) nearest = fmin(nearest, sqrt(squared[a * nr + j]));
  double sum = 0.0;
  for (Index a = 0; a < nq; ++a)
    if (!same_label(args.labels_q[a], label)) sum += exp(nearest - sqrt(squared[a * nr + j]));
  col_nearest[j] = nearest;
  col_sum[j] = sum;
  col_log[j] = lifted_log_normaliser(margin, nearest, sum);
}

/// Lifted, the positive pairs of query blockIdx.x: half the squared hinges and the pair count
/// (the finalisation gives sum / (2 |P|) and top_diff / |P|), the positive weights, and the
/// row normaliser's negative weights -c p / (2 D).
template <class T, class L, class LR>
__global__ void __launch_bounds__(reference_threads)
    lifted_row_pairs_kernel(ReferenceArgs<T, L, LR> args, const double* squared,
                            const double* row_nearest, const double* row_sum, const double* row_log,
                            const double* col_log, double* weights, double* anchor_sum,
                            double* anchor_count) {
  __shared__ double shared[reference_threads / warp_size];
  const Index a = blockIdx.x, nr = args.r.rows;
  const L label = args.labels_q[a];
  const long long self = args.self_of(a);
  const double* row = squared + a * nr;
  double* w = weights ? weights + a * nr : nullptr;
  double sum = 0.0, pairs = 0.0, share = 0.0;
  for (Index j = threadIdx.x; j < nr; j += reference_threads) {
    if (w) w[j] = 0.0;
    if (j == self || !same_label(label, args.labels_r[j])) continue;
    const double distance = sqrt(row[j]);
    const LiftedPair pair = lifted_pair(row_log[a], col_log[j], distance);
    sum += 0.5 * pair.hinge * pair.hinge;
    pairs += 1.0;
    share += pair.hinge * pair.share_i;
    if (w) w[j] = weight_on_squared(pair.hinge, distance);
  }
  sum = block_sum<reference_threads>(sum, shared);
  pairs = block_sum<reference_threads>(pairs, shared);
  share = block_sum<reference_threads>(share, shared);
  if (threadIdx.x == 0) {
    anchor_sum[a] = sum;
    anchor_count[a] = pairs;
  }
  if (!w || share == 0.0) return;
  const double factor = -share / row_sum[a];
  for (Index j = threadIdx.x; j < nr; j += reference_threads) {
    if (same_label(label, args.labels_r[j])) continue;
    const double distance = sqrt(row[j]);
    w[j] += lifted_negative_weight(factor, exp(row_nearest[a] - distance), distance);
  }
}

/// Lifted, the column normaliser's negative weights of candidate j (after the row kernel):
/// its coefficient sum over Q's positive pairs of j, then its share of each negative's weight.
template <class T, class L, class LR>
__global__ void __launch_bounds__(reference_threads)
    lifted_column_weights_kernel(ReferenceArgs<T, L, LR> args, const double* squared,
                                 const double* row_log, const double* col_nearest,
                                 const double* col_sum, const double* col_log, double* weights) {
  const Index j = static_cast<Index>(blockIdx.x) * reference_threads + threadIdx.x;
  const Index nq = args.q.rows, nr = args.r.rows;
  if (j >= nr) return;
  const LR label = args.labels_r[j];
  double share = 0.0;
  for (Index a = 0; a < nq; ++a) {
    if (args.self_of(a) == j || !same_label(args.labels_q[a], label)) continue;
    const LiftedPair pair = lifted_pair(row_log[a], col_log[j], sqrt(squared[a * nr + j]));
    share += pair.hinge * pair.share_j;
  }
  if (share == 0.0) return;
  const double factor = -share / col_sum[j];
  for (Index a = 0; a < nq; ++a) {
    if (same_label(args.labels_q[a], label)) continue;
    const double distance = sqrt(squared[a * nr + j]);
    weights[a * nr + j] += lifted_negative_weight(factor, exp(col_nearest[j] - distance), distance);
  }
}

/// Step 3 of BatchContrastiveLoss for query blockIdx.x (the rows of
/// detail/batch_contrastive_math.hpp on exact D2): without `weights` the anchor's sums, with
/// them its row of W = dL/dD2, each side's 1 / C from `scales`.
template <class T, class L, class LR>
__global__ void __launch_bounds__(reference_threads)
    reference_contrastive_kernel(ReferenceArgs<T, L, LR> args, const double* squared,
                                 ContrastiveRule rule, double* anchor_sums, const double* scales,
                                 double* weights) {
  __shared__ double shared[reference_threads / warp_size];
  const Index a = blockIdx.x, nr = args.r.rows;
  const int tid = static_cast<int>(threadIdx.x);
  const L label = args.labels_q[a];
  const long long self = args.self_of(a);
  const double* row = squared + a * nr;
  double* w = weights ? weights + a * nr : nullptr;
  const double pos_scale = w ? scales[0] : 0.0, neg_scale = w ? scales[1] : 0.0;
  double sums[reference_contrastive_sums] = {};  // pos_sum, neg_sum, pos_active, neg_active, positives, candidates
  for (Index j = tid; j < nr; j += reference_threads) {
    if (j == self) {
      if (w) w[j] = 0.0;
      continue;
    }
    const bool positive = same_label(label, args.labels_r[j]);
    const ContrastiveTerm term = positive ? rule.positive(row[j]) : rule.negative(row[j]);
    if (w) {
      w[j] = term.slope * (positive ? pos_scale : neg_scale);
      continue;
    }
    const double active = term.value > 0.0 ? 1.0 : 0.0;
    sums[positive ? 0 : 1] += term.value;
    sums[positive ? 2 : 3] += active;
    sums[4] += positive ? 1.0 : 0.0;
    sums[5] += 1.0;
  }
  if (w) return;
  for (int s = 0; s < reference_contrastive_sums; ++s) {
    const double total = block_sum<reference_threads>(sums[s], shared);
    if (tid == 0) anchor_sums[a * reference_contrastive_sums + s] = total;
  }
}

/// BatchContrastiveLoss's totals over the queries (fixed order), L and each side's 1 / C; W
/// carries those, so the gradient's scale is top_diff.
template <class T>
__global__ void __launch_bounds__(finalize_threads)
    reference_contrastive_finalize_kernel(Index nq, const double* anchor_sums, ContrastiveRule rule,
                                          const int* not_finite, double top_diff, T* device_loss,
                                          double* scales, double* gradient_scale) {
  __shared__ double shared[finalize_threads / warp_size];
  double sums[reference_contrastive_sums] = {};
  for (Index a = threadIdx.x; a < nq; a += finalize_threads)
    for (int s = 0; s < reference_contrastive_sums; ++s) sums[s] += anchor_sums[a * reference_contrastive_sums + s];
  for (int s = 0; s < reference_contrastive_sums; ++s) sums[s] = block_sum<finalize_threads>(sums[s], shared);
  if (threadIdx.x != 0) return;
  ContrastiveTotals totals;
  totals.pos_sum = sums[0];
  totals.neg_sum = sums[1];
  totals.pos_active = sums[2];
  totals.neg_active = sums[3];
  totals.pos_pairs = sums[4];
  totals.neg_pairs = sums[5] - sums[4];
  *device_loss = *not_finite ? static_cast<T>(nan("")) : static_cast<T>(totals.loss(rule));
  scales[0] = totals.pos_scale(rule);
  scales[1] = totals.neg_scale(rule);
  *gradient_scale = top_diff;
}

/// Step 3 of MultiSimilarityLoss for query blockIdx.x: multi_similarity_row
/// (detail/multi_similarity_math.hpp) on exact S (no rounding to allow for), self(a)
/// skipped. `z` (row a of the weights) holds the exponents, then e^{z - shift}, then (with
/// `gradient`) dL_a/dS_a; L_a and a count of 1 go to the anchor sums (L = mean over Q).
template <class T, class L, class LR>
__global__ void __launch_bounds__(reference_threads)
    reference_multi_similarity_kernel(ReferenceArgs<T, L, LR> args, const double* similarity,
                                      MultiSimilarityRule rule, double* weights, bool gradient,
                                      double* anchor_sum, double* anchor_count) {
  __shared__ double shared[reference_threads / warp_size];
  constexpr double inf = INFINITY;
  const Index a = blockIdx.x, nr = args.r.rows;
  const int tid = static_cast<int>(threadIdx.x);
  const L label = args.labels_q[a];
  const long long self = args.self_of(a);
  const double* row = similarity + a * nr;
  double* z = weights + a * nr;
  // The extremes: the smallest positive and the largest negative similarity.
  double min_pos = inf, max_neg = -inf;
  for (Index j = tid; j < nr; j += reference_threads) {
    if (j == self) continue;
    if (same_label(label, args.labels_r[j])) min_pos = fmin(min_pos, row[j]);
    else max_neg = fmax(max_neg, row[j]);
  }
  min_pos = block_min<reference_threads>(min_pos, shared);
  max_neg = block_max<reference_threads>(max_neg, shared);
  // Kept: positives with S < max_neg + epsilon, negatives with S > min_pos - epsilon.
  const double pos_limit = max_neg + rule.epsilon, neg_limit = min_pos - rule.epsilon;
  double pos_top = -inf, neg_top = -inf;
  for (Index j = tid; j < nr; j += reference_threads) {
    z[j] = -inf;
    if (j == self) continue;
    const double v = row[j];
    const bool positive = same_label(label, args.labels_r[j]);
    if (!rule.keep_all && (positive ? !(v < pos_limit) : !(v > neg_limit))) continue;
    z[j] = positive ? -rule.alpha * (v - rule.base) : rule.beta * (v - rule.base);
    if (positive) pos_top = fmax(pos_top, z[j]);
    else neg_top = fmax(neg_top, z[j]);
  }
  pos_top = block_max<reference_threads>(pos_top, shared);
  neg_top = block_max<reference_threads>(neg_top, shared);
  LogOnePlusSum pos, neg;
  pos.start(pos_top, pos_top != -inf);
  neg.start(neg_top, neg_top != -inf);
  double pos_sum = 0.0, neg_sum = 0.0;
  for (Index j = tid; j < nr; j += reference_threads) {
    if (z[j] == -inf) {
      z[j] = 0.0;
      continue;
    }
    const bool positive = same_label(label, args.labels_r[j]);
    z[j] = exp(z[j] - (positive ? pos.shift : neg.shift));
    if (positive) pos_sum += z[j];
    else neg_sum += z[j];
  }
  pos.sum += block_sum<reference_threads>(pos_sum, shared);
  neg.sum += block_sum<reference_threads>(neg_sum, shared);
  if (gradient) {
    // d/dS of (1/alpha) log(1 + sum e^{-alpha (S - base)}) and (1/beta) log(1 + sum e^{beta (S - base)}).
    const double pos_scale = -1.0 / pos.sum, neg_scale = 1.0 / neg.sum;
    for (Index j = tid; j < nr; j += reference_threads)
      z[j] *= same_label(label, args.labels_r[j]) ? pos_scale : neg_scale;
  }
  if (tid == 0) {
    anchor_sum[a] = pos.value() / rule.alpha + neg.value() / rule.beta;
    anchor_count[a] = 1.0;
  }
}

/// Step 4's term of candidate (or query) `other` in column c: W (q_c - other_c) of D2's
/// gradient (twice that, by `factor`), W other_c of S's.
template <CrossForm Form>
struct GradientTerm {
  static constexpr double factor = Form == CrossForm::products ? 1.0 : 2.0;
  __device__ static double of(double own, double other) {
    if constexpr (Form == CrossForm::products) return other;
    return own - other;
  }
};

/// Step 4, grad_q: a block per (query, 256 columns), R's rows in order (W_aj read once per
/// block, R's columns coalesced).
template <CrossForm Form, class T>
__global__ void __launch_bounds__(reference_threads)
    reference_grad_q_kernel(MatrixView<const T> q, MatrixView<const T> r, const double* weights,
                            const double* gradient_scale, const int* not_finite,
                            const unsigned long long* bad_self, MatrixView<T> grad_q) {
  if (*bad_self != no_bad_self) return;  // rejected: nothing is written
  const Index a = blockIdx.x, c = static_cast<Index>(blockIdx.y) * reference_threads + threadIdx.x;
  const Index nr = r.rows;
  if (c >= q.cols) return;
  const double* w = weights + a * nr;
  const double qc = static_cast<double>(q(a, c));
  double sum = 0.0;
  for (Index j = 0; j < nr; ++j) {
    const double s = w[j];
    if (s != 0.0) sum = fma(s, GradientTerm<Form>::of(qc, static_cast<double>(r(j, c))), sum);
  }
  grad_q(a, c) = *not_finite ? static_cast<T>(nan(""))
                             : static_cast<T>(GradientTerm<Form>::factor * *gradient_scale * sum);
}

/// Step 4, grad_r: a block per (candidate, 256 columns), Q's rows in order.
template <CrossForm Form, class T>
__global__ void __launch_bounds__(reference_threads)
    reference_grad_r_kernel(MatrixView<const T> q, MatrixView<const T> r, const double* weights,
                            const double* gradient_scale, const int* not_finite,
                            const unsigned long long* bad_self, MatrixView<T> grad_r) {
  if (*bad_self != no_bad_self) return;
  const Index j = blockIdx.x, c = static_cast<Index>(blockIdx.y) * reference_threads + threadIdx.x;
  const Index nq = q.rows, nr = r.rows;
  if (c >= r.cols) return;
  const double rc = static_cast<double>(r(j, c));
  double sum = 0.0;
  for (Index a = 0; a < nq; ++a) {
    const double s = weights[a * nr + j];
    if (s != 0.0) sum = fma(s, GradientTerm<Form>::of(rc, static_cast<double>(q(a, c))), sum);
  }
  grad_r(j, c) = *not_finite ? static_cast<T>(nan(""))
                             : static_cast<T>(GradientTerm<Form>::factor * *gradient_scale * sum);
}

/// Step 3's end: the loss (NaN for non-finite data or a rejected self index).
template <class T>
__global__ void reference_reject_kernel(const unsigned long long* bad_self, T* device_loss) {
  if (*bad_self != no_bad_self) *device_loss = static_cast<T>(nan(""));
}

/// normalize = true: the call's one verdict, in the order the host checks (a self row with
/// another label, then a zero row of Q, then of R): the row, with the kind in the top two
/// bits (0, 1, 2), or ~0ull for none. When there is one, both zero-row words are set to row 0
/// so that neither chain writes a gradient.
template <class Word>  // unsigned long long (a template, as every kernel here: no ODR issue)
__global__ void reference_normalize_verdict_kernel(const Word* bad_self, Word* q_zero, Word* r_zero,
                                                   Word* report) {
  Word out = no_zero_row;
  if (*bad_self != no_bad_self) out = *bad_self;
  else if (*q_zero != no_zero_row) out = (1ull << 62) | *q_zero;
  else if (*r_zero != no_zero_row) out = (2ull << 62) | *r_zero;
  *report = out;
  if (out != no_zero_row) *q_zero = *r_zero = 0;
}

/// Which loss a reference core computes.
struct TripletReferenceOptions {
  double margin;
  Mining mining;
  Distance distance;
  bool soft_margin;
};
struct LiftedReferenceOptions {
  double margin;
};

template <class T, class L, class LR, class Options>
cudaError_t reference_enqueue(void* workspace, std::size_t workspace_bytes,
                              const ReferenceArgs<T, L, LR>& args, const Options& options,
                              const MatrixView<T>& grad_q, const MatrixView<T>& grad_r,
                              double top_diff, T* device_loss, unsigned long long* verdict,
                              cudaStream_t stream) noexcept {
  const Index nq = args.q.rows, nr = args.r.rows, d = args.q.cols;
  if (nq < 1 || nr < 1 || d < 1 || args.r.cols != d || device_loss == nullptr || workspace == nullptr)
    return cudaErrorInvalidValue;
  if ((nq + cross_tile - 1) / cross_tile > 65535) return cudaErrorInvalidValue;  // grid.y limit
  const ReferenceLayout layout(workspace, nq, nr);
  if (workspace_bytes < layout.carve.bytes()) return cudaErrorInvalidValue;
  constexpr bool similarity = std::is_same<Options, MultiSimilarityRule>::value;
  constexpr CrossForm form = similarity ? CrossForm::products : CrossForm::squared_differences;
  const bool gradient = !grad_q.empty() || !grad_r.empty();
  double* weights = gradient ? layout.weights : nullptr;
  cudaError_t error = cudaMemsetAsync(layout.not_finite, 0, sizeof(int), stream);
  if (error == cudaSuccess) error = cudaMemsetAsync(layout.bad_self, 0xff, sizeof(unsigned long long), stream);
  if (error != cudaSuccess) return error;
  const Index scan_items = (nq > nr ? nq : nr) * d;
  const auto scan_blocks = static_cast<unsigned>(
      scan_items / scan_threads + 1 < 1024 ? scan_items / scan_threads + 1 : 1024);
  reference_scan_kernel<<<scan_blocks, scan_threads, 0, stream>>>(args, layout.not_finite, layout.bad_self);
  const dim3 tiles(static_cast<unsigned>((nr + cross_tile - 1) / cross_tile),
                   static_cast<unsigned>((nq + cross_tile - 1) / cross_tile));
  cross_kernel<form><<<tiles, cross_threads, 0, stream>>>(args.q, args.r, layout.squared);
  const auto queries = static_cast<unsigned>(nq);
  const auto column_blocks = static_cast<unsigned>((nr + reference_threads - 1) / reference_threads);
  if constexpr (std::is_same<Options, ContrastiveRule>::value) {
    reference_contrastive_kernel<<<queries, reference_threads, 0, stream>>>(
        args, layout.squared, options, layout.contrastive_sums, layout.scales, nullptr);
    reference_contrastive_finalize_kernel<<<1, finalize_threads, 0, stream>>>(
        nq, layout.contrastive_sums, options, layout.not_finite, top_diff, device_loss,
        layout.scales, layout.gradient_scale);
    if (gradient)
      reference_contrastive_kernel<<<queries, reference_threads, 0, stream>>>(
          args, layout.squared, options, layout.contrastive_sums, layout.scales, weights);
  } else if constexpr (similarity) {
    reference_multi_similarity_kernel<<<queries, reference_threads, 0, stream>>>(
        args, layout.squared, options, layout.weights, gradient, layout.anchor_sum, layout.anchor_count);
  } else if constexpr (std::is_same<Options, TripletReferenceOptions>::value) {
    reference_mining_kernel<<<queries, reference_threads, 0, stream>>>(
        args, layout.squared, options.margin, options.mining, options.distance,
        options.soft_margin, weights, layout.anchor_sum, layout.anchor_count);
  } else {
    lifted_row_normaliser_kernel<<<queries, reference_threads, 0, stream>>>(
        args, layout.squared, options.margin, layout.row_nearest, layout.row_sum, layout.row_log);
    lifted_column_normaliser_kernel<<<column_blocks, reference_threads, 0, stream>>>(
        args, layout.squared, options.margin, layout.col_nearest, layout.col_sum, layout.col_log);
    lifted_row_pairs_kernel<<<queries, reference_threads, 0, stream>>>(
        args, layout.squared, layout.row_nearest, layout.row_sum, layout.row_log, layout.col_log,
        weights, layout.anchor_sum, layout.anchor_count);
    if (gradient)
      lifted_column_weights_kernel<<<column_blocks, reference_threads, 0, stream>>>(
          args, layout.squared, layout.row_log, layout.col_nearest, layout.col_sum,
          layout.col_log, weights);
  }
  if constexpr (!std::is_same<Options, ContrastiveRule>::value)
    batch_finalize_kernel<<<1, finalize_threads, 0, stream>>>(nq, layout.anchor_sum, layout.anchor_count,
                                                              layout.not_finite, top_diff, device_loss,
                                                              layout.gradient_scale);
  reference_reject_kernel<<<1, 1, 0, stream>>>(layout.bad_self, device_loss);
  const auto column_chunks = static_cast<unsigned>((d + reference_threads - 1) / reference_threads);
  if (!grad_q.empty())
    reference_grad_q_kernel<form><<<dim3(queries, column_chunks), reference_threads, 0, stream>>>(
        args.q, args.r, layout.weights, layout.gradient_scale, layout.not_finite, layout.bad_self, grad_q);
  if (!grad_r.empty())
    reference_grad_r_kernel<form><<<dim3(static_cast<unsigned>(nr), column_chunks), reference_threads, 0, stream>>>(
        args.q, args.r, layout.weights, layout.gradient_scale, layout.not_finite, layout.bad_self, grad_r);
  error = cudaGetLastError();
  if (error != cudaSuccess || verdict == nullptr) return error;
  return cudaMemcpyAsync(verdict, layout.bad_self, sizeof(unsigned long long), cudaMemcpyDeviceToDevice, stream);
}

}  // namespace cuda
}  // namespace detail

namespace cuda_core {

/// Device workspace (bytes) of the reference-set cores for N_q queries and N_r candidates:
/// two N_q x N_r matrices of doubles and O(N_q + N_r) more.
inline std::size_t reference_workspace_bytes(Index nq, Index nr) noexcept {
  return detail::cuda::ReferenceLayout(nullptr, nq, nr).carve.bytes();
}

/// BatchTripletLoss of queries q (labels_q) against the reference set r (labels_r) on device
/// memory, enqueued on `stream`. self_index: N_q entries in device memory (the row of r that
/// is q_a itself, or -1), or null. grad_q / grad_r with data == nullptr are skipped. A self
/// entry out of [-1, N_r) or whose row has another label rejects the call: NaN at
/// device_loss, no gradient written, and the lowest such query at `verdict` (device memory,
/// may be null; all bits set when none). No allocation, no synchronisation, no exception:
/// cudaErrorInvalidValue for empty or mismatched shapes, N_q above 65535 tiles of 32, an undeclared mining,
/// a null device_loss or too small a workspace, else the launch status.
template <class T, class L, class LR>
cudaError_t batch_triplet_reference_forward_backward(
    void* workspace, std::size_t workspace_bytes, const DeviceMatrix<const T>& q,
    const DeviceVector<L>& labels_q, const DeviceMatrix<const T>& r, const DeviceVector<LR>& labels_r,
    const long long* self_index, T margin, Mining mining, Distance distance, bool soft_margin,
    const DeviceMatrix<T>& grad_q, const DeviceMatrix<T>& grad_r, T top_diff, T* device_loss,
    unsigned long long* verdict, cudaStream_t stream) noexcept {
  if (mining != Mining::all && mining != Mining::hard && mining != Mining::semihard)
    return cudaErrorInvalidValue;
  return detail::cuda::reference_enqueue(
      workspace, workspace_bytes, detail::cuda::ReferenceArgs<T, L, LR>{q, r, labels_q, labels_r, self_index},
      detail::cuda::TripletReferenceOptions{static_cast<double>(margin), mining, distance, soft_margin},
      grad_q, grad_r, static_cast<double>(top_diff), device_loss, verdict, stream);
}

/// LiftedStructureLoss of queries q against the reference set r; as above.
template <class T, class L, class LR>
cudaError_t lifted_structure_reference_forward_backward(
    void* workspace, std::size_t workspace_bytes, const DeviceMatrix<const T>& q,
    const DeviceVector<L>& labels_q, const DeviceMatrix<const T>& r, const DeviceVector<LR>& labels_r,
    const long long* self_index, T margin, const DeviceMatrix<T>& grad_q,
    const DeviceMatrix<T>& grad_r, T top_diff, T* device_loss, unsigned long long* verdict,
    cudaStream_t stream) noexcept {
  return detail::cuda::reference_enqueue(
      workspace, workspace_bytes, detail::cuda::ReferenceArgs<T, L, LR>{q, r, labels_q, labels_r, self_index},
      detail::cuda::LiftedReferenceOptions{static_cast<double>(margin)}, grad_q, grad_r,
      static_cast<double>(top_diff), device_loss, verdict, stream);
}

/// BatchContrastiveLoss of queries q against the reference set r; as above (cudaErrorInvalidValue
/// also for an undeclared distance or reduction).
template <class T, class L, class LR>
cudaError_t batch_contrastive_reference_forward_backward(
    void* workspace, std::size_t workspace_bytes, const DeviceMatrix<const T>& q,
    const DeviceVector<L>& labels_q, const DeviceMatrix<const T>& r, const DeviceVector<LR>& labels_r,
    const long long* self_index, T pos_margin, T neg_margin, Distance distance, Reduction reduction,
    const DeviceMatrix<T>& grad_q, const DeviceMatrix<T>& grad_r, T top_diff, T* device_loss,
    unsigned long long* verdict, cudaStream_t stream) noexcept {
  if (distance != Distance::euclidean && distance != Distance::squared_euclidean) return cudaErrorInvalidValue;
  if (reduction != Reduction::nonzero_mean && reduction != Reduction::mean) return cudaErrorInvalidValue;
  return detail::cuda::reference_enqueue(
      workspace, workspace_bytes, detail::cuda::ReferenceArgs<T, L, LR>{q, r, labels_q, labels_r, self_index},
      detail::ContrastiveRule(static_cast<double>(pos_margin), static_cast<double>(neg_margin), distance, reduction),
      grad_q, grad_r, static_cast<double>(top_diff), device_loss, verdict, stream);
}

/// MultiSimilarityLoss of queries q against the reference set r, on S = Q R^T; as above. The
/// options are the functor's, checked by it (alpha, beta > 0 and finite; base finite; epsilon
/// finite or +infinity).
template <class T, class L, class LR>
cudaError_t multi_similarity_reference_forward_backward(
    void* workspace, std::size_t workspace_bytes, const DeviceMatrix<const T>& q,
    const DeviceVector<L>& labels_q, const DeviceMatrix<const T>& r, const DeviceVector<LR>& labels_r,
    const long long* self_index, T alpha, T beta, T base, T epsilon, const DeviceMatrix<T>& grad_q,
    const DeviceMatrix<T>& grad_r, T top_diff, T* device_loss, unsigned long long* verdict,
    cudaStream_t stream) noexcept {
  return detail::cuda::reference_enqueue(
      workspace, workspace_bytes, detail::cuda::ReferenceArgs<T, L, LR>{q, r, labels_q, labels_r, self_index},
      detail::MultiSimilarityRule(static_cast<double>(alpha), static_cast<double>(beta),
                                  static_cast<double>(base), static_cast<double>(epsilon)),
      grad_q, grad_r, static_cast<double>(top_diff), device_loss, verdict, stream);
}

}  // namespace cuda_core

namespace detail {

/// The self index staged for the device: a host copy grown only when a call needs more.
struct CudaSelfStaging : BackendSlot::Contents {
  GrowOnlyBuffer<long long> self;
};

/// The functor path of a reference core on both cuda tags: self_index (host memory, range
/// checked by check_reference) is staged into the workspace; a call returning the value
/// brings the loss and the self verdict back in one synchronisation and throws
/// invalid_argument for a self row with another label (nothing written); loss_to(d_loss)
/// leaves NaN there and the gradients untouched.
/// Where run_reference_functor_path keeps its parts in the functor's workspace for `stream`:
/// the core's workspace, the loss (a double's room), the self verdict. The same bytes on every
/// call of the same shape, so normalize = true finds the verdict after the call.
struct ReferenceCallMemory {
  cuda::Workspace* workspace;
  char* memory;
  std::size_t core_bytes;
  void* loss;
  unsigned long long* verdict;
};

inline ReferenceCallMemory reference_call_memory(BackendSlot& slot, cudaStream_t stream, Index nq, Index nr) {
  cuda::Workspace& workspace = slot.get<cuda::FunctorWorkspaces>().for_stream(stream);
  const std::size_t core_bytes = cuda_core::reference_workspace_bytes(nq, nr);
  const std::size_t core_part = cuda::aligned_bytes(core_bytes), loss_part = cuda::aligned_bytes(sizeof(double));
  char* memory = static_cast<char*>(workspace.device_memory(core_part + loss_part + sizeof(unsigned long long)));
  return {&workspace, memory, core_bytes, memory + core_part,
          reinterpret_cast<unsigned long long*>(memory + core_part + loss_part)};
}

template <class T, class Loss, class LR, class Core>
T run_reference_functor_path(Loss& loss, const char* where, const char* loss_name,
                             cudaStream_t stream, T* deferred_loss, const MatrixView<const T>& q,
                             const ReferenceView<T, LR>& ref, Core&& core) {
  auto& slot = BackendSlotAccess::of(loss);
  const ReferenceCallMemory call = reference_call_memory(slot, stream, q.rows, ref.r.rows);
  char* memory = call.memory;
  const std::size_t core_bytes = call.core_bytes;
  cuda::Workspace& workspace = *call.workspace;
  T* device_loss = deferred_loss ? deferred_loss : static_cast<T*>(call.loss);
  unsigned long long* verdict = call.verdict;
  const long long* self = nullptr;
  if (ref.self.given()) {
    const cuda::ReferenceLayout layout(memory, q.rows, ref.r.rows);
    long long* staged = slot.template get<CudaSelfStaging>().self.data(static_cast<std::size_t>(q.rows));
    for (Index a = 0; a < q.rows; ++a) staged[a] = static_cast<long long>(ref.self[a]);
    // Pageable memory: the copy is staged before the call returns, so the buffer is free
    // for the next call.
    cuda::throw_on_error(cudaMemcpyAsync(layout.self, staged, sizeof(long long) * static_cast<std::size_t>(q.rows),
                                         cudaMemcpyHostToDevice, stream), where);
    self = layout.self;
  }
  cuda::throw_on_error(core(static_cast<void*>(memory), core_bytes, self, device_loss, verdict), where);
  if (deferred_loss) return std::numeric_limits<T>::quiet_NaN();
  auto* host = static_cast<double*>(workspace.host_slot());
  cuda::throw_on_error(cudaMemcpyAsync(host, device_loss, sizeof(T), cudaMemcpyDeviceToHost, stream), where);
  cuda::throw_on_error(cudaMemcpyAsync(host + 1, verdict, sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream), where);
  cuda::throw_on_error(cudaStreamSynchronize(stream), where);
  unsigned long long bad = 0;
  std::memcpy(&bad, host + 1, sizeof bad);
  if (bad != cuda::no_bad_self) {
    const auto a = static_cast<Index>(bad);
    fail_self_label(Validator(loss_name, scalar_name<T>(), "forward_backward"), a, ref.self[a]);
  }
  T value;
  std::memcpy(&value, host, sizeof value);
  return value;
}

template <class T>
struct CudaTripletReference {
  template <class L, class LR>
  static T run(BatchTripletLoss<T>& loss, cudaStream_t stream, T* deferred_loss,
               const MatrixView<const T>& q, const VectorView<L>& labels,
               const ReferenceView<T, LR>& ref, const MatrixView<T>& grad_q,
               const MatrixView<T>& grad_r, T top_diff) {
    return run_reference_functor_path<T>(
        loss, "metricloss::BatchTripletLoss::forward_backward (cuda, reference set)",
        "BatchTripletLoss", stream, deferred_loss, q, ref,
        [&](void* workspace, std::size_t bytes, const long long* self, T* device_loss,
            unsigned long long* verdict) {
          return cuda_core::batch_triplet_reference_forward_backward<T, L, LR>(
              workspace, bytes, q, labels, ref.r, ref.labels, self, loss.margin, loss.mining,
              loss.distance, loss.soft_margin, grad_q, grad_r, top_diff, device_loss, verdict, stream);
        });
  }
};

template <class T>
struct CudaLiftedReference {
  template <class L, class LR>
  static T run(LiftedStructureLoss<T>& loss, cudaStream_t stream, T* deferred_loss,
               const MatrixView<const T>& q, const VectorView<L>& labels,
               const ReferenceView<T, LR>& ref, const MatrixView<T>& grad_q,
               const MatrixView<T>& grad_r, T top_diff) {
    return run_reference_functor_path<T>(
        loss, "metricloss::LiftedStructureLoss::forward_backward (cuda, reference set)",
        "LiftedStructureLoss", stream, deferred_loss, q, ref,
        [&](void* workspace, std::size_t bytes, const long long* self, T* device_loss,
            unsigned long long* verdict) {
          return cuda_core::lifted_structure_reference_forward_backward<T, L, LR>(
              workspace, bytes, q, labels, ref.r, ref.labels, self, loss.margin, grad_q, grad_r,
              top_diff, device_loss, verdict, stream);
        });
  }
};

template <class T>
struct CudaContrastiveReference {
  template <class L, class LR>
  static T run(BatchContrastiveLoss<T>& loss, cudaStream_t stream, T* deferred_loss,
               const MatrixView<const T>& q, const VectorView<L>& labels,
               const ReferenceView<T, LR>& ref, const MatrixView<T>& grad_q,
               const MatrixView<T>& grad_r, T top_diff) {
    return run_reference_functor_path<T>(
        loss, "metricloss::BatchContrastiveLoss::forward_backward (cuda, reference set)",
        "BatchContrastiveLoss", stream, deferred_loss, q, ref,
        [&](void* workspace, std::size_t bytes, const long long* self, T* device_loss,
            unsigned long long* verdict) {
          return cuda_core::batch_contrastive_reference_forward_backward<T, L, LR>(
              workspace, bytes, q, labels, ref.r, ref.labels, self, loss.pos_margin,
              loss.neg_margin, loss.distance, loss.reduction, grad_q, grad_r, top_diff,
              device_loss, verdict, stream);
        });
  }
};

template <class T>
struct CudaMultiSimilarityReference {
  template <class L, class LR>
  static T run(MultiSimilarityLoss<T>& loss, cudaStream_t stream, T* deferred_loss,
               const MatrixView<const T>& q, const VectorView<L>& labels,
               const ReferenceView<T, LR>& ref, const MatrixView<T>& grad_q,
               const MatrixView<T>& grad_r, T top_diff) {
    return run_reference_functor_path<T>(
        loss, "metricloss::MultiSimilarityLoss::forward_backward (cuda, reference set)",
        "MultiSimilarityLoss", stream, deferred_loss, q, ref,
        [&](void* workspace, std::size_t bytes, const long long* self, T* device_loss,
            unsigned long long* verdict) {
          return cuda_core::multi_similarity_reference_forward_backward<T, L, LR>(
              workspace, bytes, q, labels, ref.r, ref.labels, self, loss.alpha, loss.beta,
              loss.base, loss.epsilon, grad_q, grad_r, top_diff, device_loss, verdict, stream);
        });
  }
};

/// ReferenceBackend on both cuda tags (the host's tag argument becomes the stream and the
/// deferred loss).
template <class Impl>
struct CudaReferenceBackend {
  static constexpr bool available = true;
  template <class Loss, class L, class LR, class T>
  static T forward_backward(Loss& loss, cuda_tag tag, const MatrixView<const T>& q,
                            const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                            const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
    return Impl::run(loss, tag.stream, static_cast<T*>(nullptr), q, labels, ref, grad_q, grad_r, top_diff);
  }
  template <class Loss, class L, class LR, class T>
  static T forward_backward(Loss& loss, cuda_deferred_tag<T> tag, const MatrixView<const T>& q,
                            const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                            const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
    cuda::require_device_loss(tag.device_loss, "metricloss: cuda.loss_to");
    return Impl::run(loss, tag.stream, tag.device_loss, q, labels, ref, grad_q, grad_r, top_diff);
  }
};

template <class T>
struct ReferenceBackend<BatchTripletLoss<T>, cuda_tag> : CudaReferenceBackend<CudaTripletReference<T>> {};
template <class T>
struct ReferenceBackend<BatchTripletLoss<T>, cuda_deferred_tag<T>>
    : CudaReferenceBackend<CudaTripletReference<T>> {};
template <class T>
struct ReferenceBackend<LiftedStructureLoss<T>, cuda_tag> : CudaReferenceBackend<CudaLiftedReference<T>> {};
template <class T>
struct ReferenceBackend<LiftedStructureLoss<T>, cuda_deferred_tag<T>>
    : CudaReferenceBackend<CudaLiftedReference<T>> {};
template <class T>
struct ReferenceBackend<BatchContrastiveLoss<T>, cuda_tag> : CudaReferenceBackend<CudaContrastiveReference<T>> {};
template <class T>
struct ReferenceBackend<BatchContrastiveLoss<T>, cuda_deferred_tag<T>>
    : CudaReferenceBackend<CudaContrastiveReference<T>> {};
template <class T>
struct ReferenceBackend<MultiSimilarityLoss<T>, cuda_tag> : CudaReferenceBackend<CudaMultiSimilarityReference<T>> {};
template <class T>
struct ReferenceBackend<MultiSimilarityLoss<T>, cuda_deferred_tag<T>>
    : CudaReferenceBackend<CudaMultiSimilarityReference<T>> {};

namespace cuda {

/// normalize = true with a reference set on device memory: the unit rows of Q and of R
/// (normalize.cuh's step 1 for each, R's after Q's in the normalize workspace), the loss on
/// them through call(deferred tag, ...) with dL/dU in workspace, the one verdict
/// (reference_normalize_verdict_kernel), then step 3 for each. The call that returns L
/// throws the verdict's invalid_argument after its one synchronisation, nothing written;
/// loss_to leaves NaN at d_loss and both gradients untouched.
template <class Loss, class T, class LR, class Call>
T normalized_reference_on_device(Loss& loss, cudaStream_t stream, T* deferred_loss, Validator& check,
                                 const MatrixView<const T>& q, const ReferenceView<T, LR>& ref,
                                 const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, Call&& call) {
  const char* where = "metricloss: normalize (cuda, reference set)";
  const Index nq = q.rows, nr = ref.r.rows, d = q.cols;
  const bool want_q = !grad_q.empty(), want_r = !grad_r.empty();
  const std::size_t r_bytes = cuda_core::normalize_workspace_bytes<T>(nr, d, want_r);
  const std::size_t loss_part = aligned_bytes(sizeof(double));
  const auto unit = unit_rows_workspace<T>(loss, stream, nq, d, want_q, r_bytes + loss_part + sizeof(unsigned long long));
  char* r_memory = unit.memory + unit.bytes;
  T* own_loss = reinterpret_cast<T*>(r_memory + r_bytes);
  auto* report = reinterpret_cast<unsigned long long*>(r_memory + r_bytes + loss_part);
  T* device_loss = deferred_loss ? deferred_loss : own_loss;
  MatrixView<T> q_rows, q_grad, r_rows, r_grad;
  throw_on_error(cuda_core::normalize_rows<T>(unit.memory, unit.bytes, q, want_q, &q_rows, &q_grad, stream), where);
  throw_on_error(cuda_core::normalize_rows<T>(r_memory, r_bytes, ref.r, want_r, &r_rows, &r_grad, stream), where);
  ReferenceView<T, LR> unit_ref = ref;
  unit_ref.r = MatrixView<const T>{r_rows.data, r_rows.rows, r_rows.cols, r_rows.stride};
  call(cuda_deferred_tag<T>(stream, device_loss),
       MatrixView<const T>{q_rows.data, q_rows.rows, q_rows.cols, q_rows.stride}, unit_ref, q_grad, r_grad);
  const NormalizeLayout<T> r_layout(r_memory, nr, d, want_r);
  reference_normalize_verdict_kernel<<<1, 1, 0, stream>>>(
      reference_call_memory(BackendSlotAccess::of(loss), stream, nq, nr).verdict, unit.layout.zero_row,
      r_layout.zero_row, report);
  throw_on_error(cudaGetLastError(), where);
  throw_on_error(cuda_core::normalize_chain<T>(unit.memory, unit.bytes, q, grad_q, device_loss, nullptr, stream),
                 where);
  throw_on_error(cuda_core::normalize_chain<T>(r_memory, r_bytes, ref.r, grad_r, device_loss, nullptr, stream),
                 where);
  if (deferred_loss) return std::numeric_limits<T>::quiet_NaN();
  // One synchronisation brings the loss and the verdict.
  auto* host = static_cast<double*>(unit.workspace->host_slot());
  throw_on_error(cudaMemcpyAsync(host, own_loss, sizeof(T), cudaMemcpyDeviceToHost, stream), where);
  throw_on_error(cudaMemcpyAsync(host + 1, report, sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream),
                 where);
  throw_on_error(cudaStreamSynchronize(stream), where);
  unsigned long long verdict = 0;
  std::memcpy(&verdict, host + 1, sizeof verdict);
  if (verdict != no_zero_row) {
    const auto row = static_cast<Index>(verdict & ((1ull << 62) - 1));
    const auto kind = verdict >> 62;
    if (kind == 0) fail_self_label(check, row, ref.self[row]);
    if (kind == 1) fail_zero_row(check, "q", row, nq, d);
    fail_zero_row(check, "r", row, nr, d);
  }
  T value;
  std::memcpy(&value, host, sizeof value);
  return value;
}

}  // namespace cuda

/// Both cuda tags normalise the reference form on the device too.
template <>
struct DeviceReferenceNormalize<cuda_tag> {
  static constexpr bool available = true;
  template <class Loss, class T, class LR, class Call>
  static T reference(Loss& loss, cuda_tag tag, Validator& check, const MatrixView<const T>& q,
                     const ReferenceView<T, LR>& ref, const MatrixView<T>& grad_q,
                     const MatrixView<T>& grad_r, Call&& call) {
    return cuda::normalized_reference_on_device<Loss, T>(loss, tag.stream, nullptr, check, q, ref, grad_q,
                                                         grad_r, call);
  }
};

template <class T>
struct DeviceReferenceNormalize<cuda_deferred_tag<T>> {
  static constexpr bool available = true;
  template <class Loss, class LR, class Call>
  static T reference(Loss& loss, cuda_deferred_tag<T> tag, Validator& check, const MatrixView<const T>& q,
                     const ReferenceView<T, LR>& ref, const MatrixView<T>& grad_q,
                     const MatrixView<T>& grad_r, Call&& call) {
    cuda::require_device_loss(tag.device_loss, "metricloss: cuda.loss_to");
    return cuda::normalized_reference_on_device<Loss, T>(loss, tag.stream, tag.device_loss, check, q, ref,
                                                         grad_q, grad_r, call);
  }
};

}  // namespace detail
}  // namespace metricloss
