#pragma once
// Deterministic reductions in double, layered warp -> block -> device (as CUB). Every sum is
// taken in a fixed order that depends only on the launch shape, never on scheduling, and
// no floating-point atomics are used: same inputs and launch, bitwise the same result.
#include <metricloss/backend/cuda/runtime.cuh>

#include <cuda_runtime.h>

namespace metricloss {
namespace detail {
namespace cuda {

constexpr int warp_size = 32;

/// Sum over the `Width` lanes of each aligned group (a power of two <= 32) by a xor
/// butterfly: every lane of the group ends with the bitwise-same total, since IEEE
/// addition is commutative and each step pairs the same two values on both lanes.
template <int Width = warp_size>
__device__ inline double group_sum(double value) {
#pragma unroll
  for (int offset = Width / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset, Width);
  return value;
}

/// Sum over a block of `Threads` threads (a multiple of 32); every thread gets the total.
/// `shared` holds Threads / 32 doubles. Ends with a barrier, so `shared` may be reused.
template <int Threads>
__device__ inline double block_sum(double value, double* shared) {
  static_assert(Threads % warp_size == 0 && Threads <= 1024, "block_sum: bad block size");
  constexpr int warps = Threads / warp_size;
  value = group_sum(value);
  const int warp = static_cast<int>(threadIdx.x) / warp_size;
  if (threadIdx.x % warp_size == 0) shared[warp] = value;
  __syncthreads();
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < warps; ++w) total += shared[w];  // same order on every thread
  __syncthreads();
  return total;
}

/// Minimum over a block (exact, so any order gives the same value); every thread gets it.
template <int Threads>
__device__ inline double block_min(double value, double* shared) {
  constexpr int warps = Threads / warp_size;
#pragma unroll
  for (int offset = warp_size / 2; offset > 0; offset /= 2)
    value = fmin(value, __shfl_xor_sync(0xffffffffu, value, offset));
  const int warp = static_cast<int>(threadIdx.x) / warp_size;
  if (threadIdx.x % warp_size == 0) shared[warp] = value;
  __syncthreads();
  double result = shared[0];
#pragma unroll
  for (int w = 1; w < warps; ++w) result = fmin(result, shared[w]);
  __syncthreads();
  return result;
}

/// Maximum over a block (exact); every thread gets it.
template <int Threads>
__device__ inline double block_max(double value, double* shared) {
  return -block_min<Threads>(-value, shared);
}

/// A candidate of an arg-min / arg-max: index -1 is "none" and loses to any candidate.
struct Candidate {
  double value;
  long long index;
};

/// The better of two candidates; ties go to the lower index, so the result is the one a
/// sequential scan in index order with a strict comparison would keep.
template <bool Largest>
__device__ inline Candidate better(const Candidate& x, const Candidate& y) {
  if (x.index < 0) return y;
  if (y.index < 0) return x;
  const bool x_wins = Largest ? x.value > y.value : x.value < y.value;
  const bool y_wins = Largest ? y.value > x.value : y.value < x.value;
  if (x_wins) return x;
  if (y_wins) return y;
  return x.index < y.index ? x : y;
}

/// Arg-min (Largest = false) or arg-max over a block; every thread gets the result (exact,
/// so deterministic). `shared` holds Threads / 32 candidates.
template <bool Largest, int Threads>
__device__ inline Candidate block_best(Candidate c, Candidate* shared) {
  constexpr int warps = Threads / warp_size;
#pragma unroll
  for (int offset = warp_size / 2; offset > 0; offset /= 2) {
    const Candidate other{__shfl_xor_sync(0xffffffffu, c.value, offset),
                          __shfl_xor_sync(0xffffffffu, c.index, offset)};
    c = better<Largest>(c, other);
  }
  const int warp = static_cast<int>(threadIdx.x) / warp_size;
  if (threadIdx.x % warp_size == 0) shared[warp] = c;
  __syncthreads();
  Candidate result = shared[0];
#pragma unroll
  for (int w = 1; w < warps; ++w) result = better<Largest>(result, shared[w]);
  __syncthreads();
  return result;
}

constexpr int finalize_threads = 256;

/// Second stage: out = scale * sum(partials[0 .. count)), one block, fixed order.
template <class T>
__global__ void __launch_bounds__(finalize_threads)
    finalize_sum_kernel(const double* partials, int count, double scale, T* out) {
  __shared__ double shared[finalize_threads / warp_size];
  double value = 0.0;
  for (int i = static_cast<int>(threadIdx.x); i < count; i += finalize_threads) value += partials[i];
  value = block_sum<finalize_threads>(value, shared);
  if (threadIdx.x == 0) *out = static_cast<T>(value * scale);
}

/// Upper bound on first-stage blocks, so the partials fit a fixed, small workspace and the
/// launch shape (hence the summation order) does not depend on the device.
constexpr int max_partial_blocks = 2048;

inline int partial_blocks(long long work_items, int items_per_block) {
  const long long blocks = (work_items + items_per_block - 1) / items_per_block;
  return static_cast<int>(blocks < max_partial_blocks ? (blocks < 1 ? 1 : blocks) : max_partial_blocks);
}

}  // namespace cuda
}  // namespace detail
}  // namespace metricloss
