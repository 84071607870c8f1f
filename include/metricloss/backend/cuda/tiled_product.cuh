#pragma once
// The shared-memory tiled product C = A B or A B^T with a per-entry epilogue (the batch
// losses' distances and gradients); each entry is one thread's ascending-k sum, so A A^T is
// bitwise symmetric and only its lower triangle of tiles is multiplied. Part of pairwise.cuh.
#include <metricloss/detail/views.hpp>

#include <cuda_runtime.h>

#include <cstdint>

namespace metricloss {
namespace detail {
namespace cuda {

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

}  // namespace cuda
}  // namespace detail
}  // namespace metricloss
