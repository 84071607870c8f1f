#pragma once
// Building blocks of the batch losses on CUDA (lifted structure; batch mining later):
//   - the batch mean and the centred batch xc = x - mean with n_i = ||xc_i||^2 (centring
//     removes a common offset that would cancel every digit of n_i + n_j - 2 xc_i.xc_j);
//   - a shared-memory tiled product C = A B or A B^T with a per-entry epilogue, used for
//     the squared distances (epilogue: n_i + n_j - 2 acc, recomputed by differences in
//     double where small against n_i + n_j, as backend/simd/pairwise.hpp does on the CPU)
//     and for the gradient dX = 2 scale (diag(S 1) - S) xc.
// Every reduction has a fixed order: results are deterministic. Each entry of a product is
// one thread's ascending-k sum, so the distance matrix is bitwise symmetric (and only its
// lower triangle of tiles is multiplied).
#include <metricloss/backend/cuda/exact.cuh>
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/detail/views.hpp>
#include <metricloss/detail/numerics.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace metricloss {
namespace detail {
namespace cuda {

// ---- centring --------------------------------------------------------------------------

constexpr int mean_chunk_rows = 64;
constexpr int mean_threads = 256;

inline Index mean_chunks(Index n) { return (n + mean_chunk_rows - 1) / mean_chunk_rows; }

/// partial[c][j] = sum of x_ij over the rows of chunk c (ascending), in double.
template <class T>
__global__ void __launch_bounds__(mean_threads)
    column_partial_sums_kernel(MatrixView<const T> x, double* partial) {
  const Index j = Index(blockIdx.x) * mean_threads + threadIdx.x;
  if (j >= x.cols) return;
  const Index first = Index(blockIdx.y) * mean_chunk_rows;
  const Index last = first + mean_chunk_rows < x.rows ? first + mean_chunk_rows : x.rows;
  double sum = 0.0;
  for (Index i = first; i < last; ++i) sum += static_cast<double>(x(i, j));
  partial[Index(blockIdx.y) * x.cols + j] = sum;
}

/// mean_j = (sum over chunks, ascending) / N. A template (on the batch's T) so that the
/// kernel, defined in a header, is not an ODR violation across translation units.
template <class T>
__global__ void __launch_bounds__(mean_threads)
    column_mean_kernel(const double* partial, Index chunks, Index n, Index d, double* mean) {
  const Index j = Index(blockIdx.x) * mean_threads + threadIdx.x;
  if (j >= d) return;
  double sum = 0.0;
  for (Index c = 0; c < chunks; ++c) sum += partial[c * d + j];
  mean[j] = sum / static_cast<double>(n);
}

constexpr int centre_threads = 256;

/// xc_i = x_i - mean (rounded to T), n_i = ||xc_i||^2 in double; a warp per row. Sets
/// *not_finite when x has a NaN or an infinity (an integer flag: no float atomics).
template <class T>
__global__ void __launch_bounds__(centre_threads)
    centre_kernel(MatrixView<const T> x, const double* mean, T* centred, double* norms,
                  int* not_finite) {
  const Index row = Index(blockIdx.x) * (centre_threads / warp_size) + threadIdx.x / warp_size;
  const int lane = static_cast<int>(threadIdx.x) % warp_size;
  if (row >= x.rows) return;  // whole warps leave together
  const Index d = x.cols;
  double norm = 0.0;
  bool finite = true;
  for (Index j = lane; j < d; j += warp_size) {
    const double value = static_cast<double>(x(row, j));
    finite = finite && isfinite(value);
    const T c = static_cast<T>(value - mean[j]);
    centred[row * d + j] = c;
    norm = fma(static_cast<double>(c), static_cast<double>(c), norm);
  }
  norm = group_sum(norm);
  if (lane == 0) norms[row] = norm;
  if (!finite) atomicOr(not_finite, 1);
}

/// Workspace part of the centring: mean partials and the mean.
inline std::size_t centring_bytes(Index n, Index d) {
  return aligned_bytes(sizeof(double) * static_cast<std::size_t>(mean_chunks(n) * d)) +
         aligned_bytes(sizeof(double) * static_cast<std::size_t>(d));
}

template <class T>
cudaError_t enqueue_centring(const MatrixView<const T>& x, void* workspace, T* centred,
                             double* norms, int* not_finite, cudaStream_t stream) noexcept {
  const Index n = x.rows, d = x.cols, chunks = mean_chunks(n);
  double* partial = static_cast<double*>(workspace);
  double* mean = reinterpret_cast<double*>(static_cast<char*>(workspace) +
                                           aligned_bytes(sizeof(double) * static_cast<std::size_t>(chunks * d)));
  const unsigned column_blocks = static_cast<unsigned>((d + mean_threads - 1) / mean_threads);
  if (chunks > 65535) return cudaErrorInvalidValue;  // grid.y limit: N > 4 million rows
  column_partial_sums_kernel<<<dim3(column_blocks, static_cast<unsigned>(chunks)), mean_threads, 0, stream>>>(x, partial);
  column_mean_kernel<T><<<column_blocks, mean_threads, 0, stream>>>(partial, chunks, n, d, mean);
  const Index rows_per_block = centre_threads / warp_size;
  centre_kernel<<<static_cast<unsigned>((n + rows_per_block - 1) / rows_per_block), centre_threads, 0, stream>>>(
      x, mean, centred, norms, not_finite);
  return cudaGetLastError();
}

// ---- tiled products --------------------------------------------------------------------

constexpr int tile_threads = 256;  // 16 x 16 threads

/// Register blocking by type: 8 x 8 entries per thread in float (a 128 x 128 tile), 4 x 4
/// in double (64 x 64: a double accumulator block twice the size would not fit the
/// registers). A thread's rows (and columns) are two groups of `vector` adjacent ones, so
/// that each k step reads its operands from shared memory in 16-byte loads (four FMAs per
/// byte loaded in float). k advances 16 at a time.
template <class T>
struct ProductShape {
  static constexpr int per_thread = sizeof(T) <= 4 ? 8 : 4;
  static constexpr int vector = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
  static constexpr int groups = per_thread / vector;
  static constexpr int tile = 16 * per_thread;
  static constexpr int depth = 16;
  static constexpr int loads = tile * depth / vector / tile_threads;  // per operand and thread
  static_assert(groups * vector == per_thread && loads * vector * tile_threads == tile * depth,
                "tile shape");
};

/// Sixteen aligned bytes of T.
template <class T>
struct alignas(16) Vector16 {
  T v[ProductShape<T>::vector];
};

/// One operand's slice of a k step, from global memory into registers: `Rows` (A, or B
/// transposed: tile rows of depth k each, stored k-major) or B as given (depth rows of
/// tile columns). Vectorised: 16-byte loads, which the launcher allows only for aligned
/// pointers and strides and extents divisible by the vector width.
template <class T, bool Rows, bool Vectorised>
struct TileLoader {
  using Shape = ProductShape<T>;
  static constexpr int V = Shape::vector, tile = Shape::tile;
  Vector16<T> frag[Shape::loads];

  /// Rows: rows [first, first + tile) of `rows`, columns [k0, k0 + depth) of `cols`.
  /// Not Rows: columns [first, first + tile) of `rows`, rows [k0, k0 + depth) of `cols`.
  /// Entries outside are zero.
  __device__ void load(const T* a, Index ld, Index first, Index rows, Index k0, Index cols) {
#pragma unroll
    for (int l = 0; l < Shape::loads; ++l) {
      const int e = static_cast<int>(threadIdx.x) + l * tile_threads;
      Index gi, gk;
      if constexpr (Rows) {
        gi = first + e % tile;       // a warp's threads: adjacent rows (conflict-free stores)
        gk = k0 + (e / tile) * V;
      } else {
        gk = k0 + e / (tile / V);    // B as given: rows are k, a warp reads along a row
        gi = first + (e % (tile / V)) * V;
      }
      const T* src = Rows ? a + gi * ld + gk : a + gk * ld + gi;
      const bool inside = Rows ? gi < rows && gk < cols : gk < cols && gi < rows;
      if constexpr (Vectorised) {
        frag[l] = inside ? *reinterpret_cast<const Vector16<T>*>(src) : Vector16<T>{};
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const bool in = Rows ? gi < rows && gk + v < cols : gk < cols && gi + v < rows;
          frag[l].v[v] = in ? src[v] : T(0);
        }
      }
    }
  }

  /// Into shared memory laid out [depth][tile] (k-major).
  __device__ void store(T (*tile_k)[tile]) const {
#pragma unroll
    for (int l = 0; l < Shape::loads; ++l) {
      const int e = static_cast<int>(threadIdx.x) + l * tile_threads;
      if constexpr (Rows) {
        const int r = e % tile, kk = (e / tile) * V;
#pragma unroll
        for (int v = 0; v < V; ++v) tile_k[kk + v][r] = frag[l].v[v];
      } else {
        const int kk = e / (tile / V), c = (e % (tile / V)) * V;
        *reinterpret_cast<Vector16<T>*>(&tile_k[kk][c]) = frag[l];
      }
    }
  }
};

/// C_ij = sum_k A_ik B'_kj with A row-major (M x K, stride lda) and B' = B^T (B row-major
/// N x K, TransposeB) or B' = B (row-major K x N). A square tile per block, per_thread^2
/// entries per thread, k through double-buffered shared memory (the next slice's global
/// loads are in flight while the current one is multiplied). Each entry is one thread's
/// ascending-k sum of fmas, so for A = B the product is bitwise symmetric; Symmetric
/// (A = B, M = N) computes the tiles on and below the diagonal only and hands each entry of
/// an off-diagonal tile to be stored twice, as (i, j) and (j, i) (`mirror`).
/// epilogue.tile<p, V>(rows, cols, acc, m, n, mirror) stores a thread's entries: acc[r][c]
/// at (rows[r], cols[c]) where inside m x n; rows and columns come in runs of V adjacent
/// ones.
template <class T, bool TransposeB, bool Symmetric, bool Vectorised, class Epilogue>
__global__ void __launch_bounds__(tile_threads)
    tiled_product_kernel(const T* a, Index lda, const T* b, Index ldb, Index m, Index n, Index k,
                         Epilogue epilogue) {
  using Shape = ProductShape<T>;
  constexpr int p = Shape::per_thread, tile = Shape::tile, depth = Shape::depth, V = Shape::vector;
  __shared__ alignas(16) T a_tile[2][depth][tile];
  __shared__ alignas(16) T b_tile[2][depth][tile];
  const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
  Index block_row = blockIdx.y, block_col = blockIdx.x;
  if constexpr (Symmetric) {  // blockIdx.x enumerates the lower triangle row by row
    const Index t = blockIdx.x;
    Index r = static_cast<Index>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) / 2.0);
    while (r * (r + 1) / 2 > t) --r;
    while ((r + 1) * (r + 2) / 2 <= t) ++r;
    block_row = r;
    block_col = t - r * (r + 1) / 2;
  }
  const Index row0 = block_row * tile, col0 = block_col * tile;
  TileLoader<T, true, Vectorised> a_loader;
  TileLoader<T, TransposeB, Vectorised> b_loader;
  T acc[p][p];
#pragma unroll
  for (int r = 0; r < p; ++r)
#pragma unroll
    for (int c = 0; c < p; ++c) acc[r][c] = T(0);
  a_loader.load(a, lda, row0, m, 0, k);
  b_loader.load(b, ldb, col0, n, 0, k);
  a_loader.store(a_tile[0]);
  b_loader.store(b_tile[0]);
  __syncthreads();
  int current = 0;
  for (Index k0 = 0; k0 < k; k0 += depth) {
    const bool more = k0 + depth < k;
    if (more) {
      a_loader.load(a, lda, row0, m, k0 + depth, k);
      b_loader.load(b, ldb, col0, n, k0 + depth, k);
    }
#pragma unroll
    for (int kk = 0; kk < depth; ++kk) {
      T av[p], bv[p];
#pragma unroll
      for (int g = 0; g < Shape::groups; ++g) {
        const Vector16<T> x = *reinterpret_cast<const Vector16<T>*>(&a_tile[current][kk][g * 16 * V + ty * V]);
        const Vector16<T> y = *reinterpret_cast<const Vector16<T>*>(&b_tile[current][kk][g * 16 * V + tx * V]);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          av[g * V + v] = x.v[v];
          bv[g * V + v] = y.v[v];
        }
      }
#pragma unroll
      for (int r = 0; r < p; ++r)
#pragma unroll
        for (int c = 0; c < p; ++c) acc[r][c] = fma(av[r], bv[c], acc[r][c]);
    }
    if (more) {
      a_loader.store(a_tile[current ^ 1]);
      b_loader.store(b_tile[current ^ 1]);
    }
    __syncthreads();
    current ^= 1;
  }
  Index rows[p], cols[p];
#pragma unroll
  for (int r = 0; r < p; ++r) rows[r] = row0 + (r / V) * 16 * V + ty * V + r % V;
#pragma unroll
  for (int c = 0; c < p; ++c) cols[c] = col0 + (c / V) * 16 * V + tx * V + c % V;
  epilogue.template tile<p, V>(rows, cols, acc, m, n, Symmetric && block_row != block_col);
}

/// Launches the product; 16-byte loads where the pointers, strides and extents allow.
/// Symmetric requires a == b, lda == ldb, m == n and TransposeB.
template <class T, bool TransposeB, bool Symmetric = false, class Epilogue>
cudaError_t enqueue_tiled_product(const T* a, Index lda, const T* b, Index ldb, Index m, Index n,
                                  Index k, const Epilogue& epilogue, cudaStream_t stream) noexcept {
  static_assert(!Symmetric || TransposeB, "a symmetric product is A A^T");
  using Shape = ProductShape<T>;
  constexpr int tile = Shape::tile, V = Shape::vector;
  const Index blocks_y = (m + tile - 1) / tile, blocks_x = (n + tile - 1) / tile;
  if (blocks_y > 65535) return cudaErrorInvalidValue;  // M > 8 million rows
  const auto aligned = [](const T* pointer) { return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0; };
  const bool vectorised = aligned(a) && aligned(b) && lda % V == 0 && ldb % V == 0 && k % V == 0 &&
                          (TransposeB || n % V == 0);
  const dim3 grid = Symmetric ? dim3(static_cast<unsigned>(blocks_y * (blocks_y + 1) / 2))
                              : dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  if (vectorised)
    tiled_product_kernel<T, TransposeB, Symmetric, true><<<grid, tile_threads, 0, stream>>>(a, lda, b, ldb, m, n, k, epilogue);
  else
    tiled_product_kernel<T, TransposeB, Symmetric, false><<<grid, tile_threads, 0, stream>>>(a, lda, b, ldb, m, n, k, epilogue);
  return cudaGetLastError();
}


/// Epilogue of the distance product xc xc^T: D2_ij = n_i + n_j - 2 acc, exactly 0 on the
/// diagonal, and by differences of the original rows (in double) where the expansion
/// cancels or where the pair carries weight (exact.same(key_i, key_j), e.g. positive pairs).
/// A thread's norms and keys are loaded once, and its results leave in 16-byte stores when
/// N allows (rows, and for a mirrored tile columns, come in runs of V).
template <class T, class Exact>
struct SquaredDistanceEpilogue {
  MatrixView<const T> x;
  const double* norms;
  T* squared;  // N x N, row-major, stride N
  Exact exact;

  /// ||x_i - x_j||^2 by differences in double, by one thread (its warp waits).
  __device__ double exact_squared(Index i, Index j) const { return exact_squared_thread(x, i, j); }

  __device__ T entry(Index i, Index j, double scale, bool exact_pair, T acc) const {
    if (i == j) return T(0);
    double value = scale - 2.0 * static_cast<double>(acc);
    if (!(value > Numerics<T>::recompute_ratio * scale) || exact_pair)  // small, zero, negative, NaN
      value = exact_squared(i, j);
    return static_cast<T>(value);
  }

  /// Stores run[0..V) at squared[i * N + j0 ..] (entries past N dropped).
  template <int V>
  __device__ void store_run(Index i, Index j0, const T (&run)[V]) const {
    const Index n = x.rows;
    if (n % V == 0 && j0 + V <= n) {
      Vector16<T> packed;
#pragma unroll
      for (int v = 0; v < V; ++v) packed.v[v] = run[v];
      *reinterpret_cast<Vector16<T>*>(squared + i * n + j0) = packed;
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        if (j0 + v < n) squared[i * n + j0 + v] = run[v];
    }
  }

  template <int P, int V>
  __device__ void tile(const Index (&rows)[P], const Index (&cols)[P], T (&acc)[P][P], Index m,
                       Index n, bool mirror) const {
    using Key = decltype(exact.key(0));
    double row_norm[P], col_norm[P];
    Key row_key[P], col_key[P];
#pragma unroll
    for (int r = 0; r < P; ++r) {
      row_norm[r] = rows[r] < m ? norms[rows[r]] : 0.0;
      row_key[r] = exact.key(rows[r] < m ? rows[r] : 0);
    }
#pragma unroll
    for (int c = 0; c < P; ++c) {
      col_norm[c] = cols[c] < n ? norms[cols[c]] : 0.0;
      col_key[c] = exact.key(cols[c] < n ? cols[c] : 0);
    }
#pragma unroll
    for (int r = 0; r < P; ++r)
#pragma unroll
      for (int c = 0; c < P; ++c)
        if (rows[r] < m && cols[c] < n)
          acc[r][c] = entry(rows[r], cols[c], row_norm[r] + col_norm[c],
                            exact.same(row_key[r], col_key[c]), acc[r][c]);
#pragma unroll
    for (int r = 0; r < P; ++r) {
      if (rows[r] >= m) continue;
#pragma unroll
      for (int g = 0; g < P / V; ++g) {
        T run[V];
#pragma unroll
        for (int v = 0; v < V; ++v) run[v] = acc[r][g * V + v];
        store_run<V>(rows[r], cols[g * V], run);
      }
    }
    if (!mirror) return;
#pragma unroll
    for (int c = 0; c < P; ++c) {
      if (cols[c] >= n) continue;
#pragma unroll
      for (int g = 0; g < P / V; ++g) {
        T run[V];
#pragma unroll
        for (int v = 0; v < V; ++v) run[v] = acc[g * V + v][c];
        store_run<V>(cols[c], rows[g * V], run);
      }
    }
  }
};

/// The pairs that carry weight in the losses whose positive pairs do: equal labels.
template <class L>
struct SameLabel {
  VectorView<L> labels;
  __device__ L key(Index i) const { return labels[i]; }
  __device__ static bool same(L a, L b) { return a == b; }
};

/// Epilogue of the gradient product S xc:
///   grad_ij = 2 scale (rowsum_i xc_ij - acc + near_ij),
/// with scale read from device memory (known only once the loss is reduced), near (N x D,
/// may be null) the near pairs' part computed by differences, and NaN where the data were
/// not finite.
template <class T>
struct WeightedGradientEpilogue {
  const T* centred;        // N x D, stride D
  const double* row_sums;  // sum_k S_ik
  const double* near;      // N x D or null
  const double* scale;     // top_diff / normaliser
  const int* not_finite;
  MatrixView<T> grad;

  template <int P, int V>
  __device__ void tile(const Index (&rows)[P], const Index (&cols)[P], const T (&acc)[P][P],
                       Index m, Index n, bool) const {
    const Index d = grad.cols;
    const double factor = 2.0 * *scale;
    const bool nan_out = *not_finite != 0;
#pragma unroll
    for (int r = 0; r < P; ++r) {
      const Index i = rows[r];
      if (i >= m) continue;
      const double row_sum = row_sums[i];
#pragma unroll
      for (int c = 0; c < P; ++c) {
        const Index j = cols[c];
        if (j >= n) continue;
        double value = row_sum * static_cast<double>(centred[i * d + j]) - static_cast<double>(acc[r][c]);
        if (near) value += near[i * d + j];
        grad(i, j) = nan_out ? static_cast<T>(nan("")) : static_cast<T>(factor * value);
      }
    }
  }
};

// ---- weights: near pairs, symmetrisation -----------------------------------------------

/// Near pairs: where D2_ik < Numerics<T>::near_ratio (n_i + n_k), a weight S_ik ~ 1/D_ik
/// (Euclidean distances) makes the product's S_ik xc_i - S_ik xc_k lose every digit of
/// S_ik (x_i - x_k) (near duplicates, hard negatives). Such pairs are kept out of S and
/// applied by differences (as the CPU paths do).
constexpr int weight_threads = 256;

/// One chunk of row i's near pairs, in a block of weight_threads: thread t holds the weight
/// of column k0 + t (0 when not near). Adds sum_k S_ik (x_i - x_k) to near_row (each column
/// owned by one thread, k ascending: deterministic). Called by every thread of the block.
template <class T>
__device__ inline void add_near_chunk(bool is_near, double weight, Index i, Index k0,
                                      const MatrixView<const T>& x, double* near_row,
                                      double* shared_weights) {
  if (!__syncthreads_or(is_near)) return;  // rare
  const int tid = static_cast<int>(threadIdx.x);
  shared_weights[tid] = is_near ? weight : 0.0;
  __syncthreads();
  const T* xi = x.row(i);
  for (int t = 0; t < weight_threads; ++t) {
    const double w = shared_weights[t];
    if (w == 0.0) continue;
    const T* xk = x.row(k0 + t);
    for (Index c = tid; c < x.cols; c += weight_threads)
      near_row[c] += w * (static_cast<double>(xi[c]) - static_cast<double>(xk[c]));
  }
  __syncthreads();
}

constexpr int symmetrise_tile = 32;

/// W <- W + W^T in place (N x N doubles), one pair of mirrored 32 x 32 tiles per block:
/// both entries of a pair get the same bits.
__device__ inline void symmetrise_tiles(double* w, Index n) {
  __shared__ double upper[symmetrise_tile][symmetrise_tile + 1];
  __shared__ double lower[symmetrise_tile][symmetrise_tile + 1];
  const Index ti = blockIdx.y, tj = blockIdx.x;
  if (tj > ti) return;
  const int c = static_cast<int>(threadIdx.x) % symmetrise_tile;
  for (int r = static_cast<int>(threadIdx.x) / symmetrise_tile; r < symmetrise_tile;
       r += static_cast<int>(blockDim.x) / symmetrise_tile) {
    const Index i = ti * symmetrise_tile + r, j = tj * symmetrise_tile + c;
    upper[r][c] = (i < n && j < n) ? w[i * n + j] : 0.0;  // tile (ti, tj)
    const Index i2 = tj * symmetrise_tile + r, j2 = ti * symmetrise_tile + c;
    lower[r][c] = (i2 < n && j2 < n) ? w[i2 * n + j2] : 0.0;  // tile (tj, ti)
  }
  __syncthreads();
  for (int r = static_cast<int>(threadIdx.x) / symmetrise_tile; r < symmetrise_tile;
       r += static_cast<int>(blockDim.x) / symmetrise_tile) {
    const Index i = ti * symmetrise_tile + r, j = tj * symmetrise_tile + c;
    if (i < n && j < n) w[i * n + j] = upper[r][c] + lower[c][r];
    const Index i2 = tj * symmetrise_tile + r, j2 = ti * symmetrise_tile + c;
    if (i2 < n && j2 < n) w[i2 * n + j2] = lower[r][c] + upper[c][r];
  }
}

template <class T>  // a template, so that the header-defined kernel is not an ODR violation
__global__ void __launch_bounds__(256) symmetrise_kernel(double* w, Index n) {
  symmetrise_tiles(w, n);
}

/// Per row i of a symmetric S (doubles): writes S as T into `out` (N x N; the distance
/// buffer, whose row i it reads first), with near pairs set to 0 and their part added by
/// differences to near (N x D); row_sum_i = sum_k of the stored entries.
template <class T>
__global__ void __launch_bounds__(weight_threads)
    finish_weights_kernel(const double* s_matrix, T* squared_then_s, Index n,
                          MatrixView<const T> x, const double* norms, double* row_sums,
                          double* near) {
  __shared__ double shared[weight_threads / warp_size];
  __shared__ double near_weight[weight_threads];
  const Index i = blockIdx.x, d = x.cols;
  const int tid = static_cast<int>(threadIdx.x);
  const double threshold_i = Numerics<T>::near_ratio * norms[i];
  T* row = squared_then_s + i * n;
  const double* s_row = s_matrix + i * n;
  double* near_row = near + i * d;
  for (Index c = tid; c < d; c += weight_threads) near_row[c] = 0.0;
  double row_sum = 0.0;
  for (Index k0 = 0; k0 < n; k0 += weight_threads) {  // block-uniform bound
    const Index k = k0 + tid;
    double s = 0.0;
    bool is_near = false;
    if (k < n && k != i) {
      s = s_row[k];
      is_near = s != 0.0 && static_cast<double>(row[k]) < threshold_i + Numerics<T>::near_ratio * norms[k];
    }
    if (k < n) {
      const T stored = is_near ? T(0) : static_cast<T>(s);
      row[k] = stored;
      row_sum += static_cast<double>(stored);
    }
    add_near_chunk(is_near, s, i, k0, x, near_row, near_weight);
  }
  row_sum = block_sum<weight_threads>(row_sum, shared);
  if (tid == 0) row_sums[i] = row_sum;
}

// ---- what the batch losses share --------------------------------------------------------

/// The workspace parts every batch loss uses, carved in a fixed order.
template <class T>
struct BatchParts {
  void* centring;
  T* centred;               // N x D, stride D
  double* norms;            // ||xc_i||^2
  T* squared;               // N x N: D2, later S as T
  double* near;             // N x D: near pairs' gradient by differences
  double* row_sums;         // sum_k S_ik
  double* gradient_scale;   // top_diff / normaliser, set by the loss's reduction
  int* not_finite;          // non-finite data or NaN labels

  BatchParts(WorkspaceCarver& carve, Index n, Index d) {
    const auto un = static_cast<std::size_t>(n), ud = static_cast<std::size_t>(d);
    centring = carve.take<char>(centring_bytes(n, d));
    centred = carve.take<T>(un * ud);
    norms = carve.take<double>(un);
    squared = carve.take<T>(un * un);
    near = carve.take<double>(un * ud);
    row_sums = carve.take<double>(un);
    gradient_scale = carve.take<double>(1);
    not_finite = carve.take<int>(1);
  }
};

/// Clears the flag, centres the batch and fills D2 (positive pairs by differences).
template <class T, class L>
cudaError_t enqueue_batch_distances(const BatchParts<T>& parts, const MatrixView<const T>& x,
                                    const VectorView<L>& labels, cudaStream_t stream) noexcept {
  const Index n = x.rows, d = x.cols;
  cudaError_t error = cudaMemsetAsync(parts.not_finite, 0, sizeof(int), stream);
  if (error != cudaSuccess) return error;
  error = enqueue_centring(x, parts.centring, parts.centred, parts.norms, parts.not_finite, stream);
  if (error != cudaSuccess) return error;
  return enqueue_tiled_product<T, true, true>(
      parts.centred, d, parts.centred, d, n, n, d,
      SquaredDistanceEpilogue<T, SameLabel<L>>{x, parts.norms, parts.squared, {labels}}, stream);
}

/// grad = 2 scale ((diag(S 1) - S) xc + near), S in parts.squared (as T).
template <class T>
cudaError_t enqueue_weighted_gradient(const BatchParts<T>& parts, Index n, const MatrixView<T>& grad,
                                      cudaStream_t stream) noexcept {
  const Index d = grad.cols;
  return enqueue_tiled_product<T, false>(
      parts.squared, n, parts.centred, d, n, d, n,
      WeightedGradientEpilogue<T>{parts.centred, parts.row_sums, parts.near, parts.gradient_scale,
                                  parts.not_finite, grad},
      stream);
}

}  // namespace cuda
}  // namespace detail
}  // namespace metricloss
