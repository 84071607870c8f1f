#pragma once
// A band's part of dL/dX from weights on its pairs (backend/simd/lifted_band.hpp,
// backend/simd/all_band.hpp): rows [first, end) of the strictly lower triangle hold
// w_ij = dL/dD2_ij (both roles of the unordered pair), and the band's part of row a is
//   g_a = 2 s sum_b w_ab (x_a - x_b) = 2 s (r_a xc_a - sum_b w_ab xc_b),  r_a = sum_b w_ab,
// over the band's pairs (a, b), rows [0, end). The sum over b is one product over the band
// (band_product); a pair close against its rows' centred norms, where that product would
// cancel, is applied by differences in double instead and leaves the product.
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/backend/simd/lower_products.hpp>
#include <metricloss/backend/simd/products.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/views.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>

namespace metricloss {
namespace detail {

template <class T>
class BandGradient {
  using batch = xsimd::batch<T>;
  static constexpr Index lanes = static_cast<Index>(batch::size);

 public:
  // Sums gather in T (a row's in lanes over this many batches, a column's over this many
  // rows), then in double: each T partial adds at most ~64 terms.
  static constexpr Index flush_blocks = 64;
  static constexpr Index flush_rows = 64;

  /// Starts a band's gradient over rows [0, end) of x: no pair applied yet.
  void begin(const MatrixView<const T>& x, const T* centred_norms, Index end) {
    x_ = x;
    norms_ = centred_norms;
    end_ = end;
    const Index d = x.cols;
    double* near = near_.data(static_cast<std::size_t>(end * d));
    std::fill(near, near + end * d, 0.0);
    double* sums = row_sums_.data(static_cast<std::size_t>(end));
    std::fill(sums, sums + end, 0.0);
    T* column = column_.data(static_cast<std::size_t>(end));
    std::fill(column, column + end, T(0));
  }

  /// r_a, in double.
  double* row_sums() { return row_sums_.data(0); }
  /// Column sums in T, flushed into row_sums() by flush_columns.
  T* column() { return column_.data(0); }

  /// Pair (i, j) with weight w and product value `squared`: applied by differences when
  /// close (returns 0, what the product keeps), else returned as it is.
  T apart(Index i, Index j, T weight, T squared) {
    if (weight == T(0)) return weight;
    const double scale = static_cast<double>(norms_[i]) + static_cast<double>(norms_[j]);
    if (!(static_cast<double>(squared) < Numerics<T>::near_ratio * scale)) return weight;
    const Index d = x_.cols;
    const T* a = x_.row(i);
    const T* b = x_.row(j);
    double* ga = near_.data(0) + i * d;
    double* gb = near_.data(0) + j * d;
    const double v = 2.0 * static_cast<double>(weight);
    for (Index c = 0; c < d; ++c) {
      const double term = v * (static_cast<double>(a[c]) - static_cast<double>(b[c]));
      ga[c] += term;
      gb[c] -= term;
    }
    return T(0);
  }

  /// One batch of row i's weights, columns [j, j + lanes), with their product values: close
  /// pairs applied apart. Returns what the product keeps.
  batch apart_lanes(Index i, Index j, batch weight, const T* squared) {
    const auto close = batch::load_unaligned(squared + j) <
                           static_cast<T>(Numerics<T>::near_ratio) *
                               (batch(norms_[i]) + batch::load_unaligned(norms_ + j)) &&
                       weight != batch(T(0));
    if (!xsimd::any(close)) return weight;
    alignas(64) T lane[lanes];
    weight.store_aligned(lane);
    for (Index k = 0; k < lanes; ++k) lane[k] = apart(i, j + k, lane[k], squared[j + k]);
    return batch::load_aligned(lane);
  }

  /// A row's lanes, added to its sum in double.
  static void flush(batch& acc, double& sum) {
    sum += static_cast<double>(xsimd::hadd(acc));
    acc = batch(T(0));
  }

  /// The column sums of rows up to i, gathered in T, added to `sums` in double.
  static void flush(T* column, double* sums, Index i) {
    for (Index j = 0; j <= i; ++j) {
      sums[j] += static_cast<double>(column[j]);
      column[j] = T(0);
    }
  }

  /// flush() of this band's columns into its row sums.
  void flush_columns(Index i) { flush(column_.data(0), row_sums_.data(0), i); }

  /// For weights written whole: row i's (entries j < i, at `row`) close pairs applied apart
  /// and its sums taken, both roles. `squared` is row i of the product's D2.
  void sweep_row(Index i, Index first, T* row, const T* squared) {
    T* column = column_.data(0);
    batch acc(T(0));
    double row_sum = 0.0;
    Index j = 0;
    for (; j + lanes <= i; j += lanes) {
      const batch weight = apart_lanes(i, j, batch::load_unaligned(row + j), squared);
      weight.store_unaligned(row + j);
      acc += weight;
      (batch::load_unaligned(column + j) + weight).store_unaligned(column + j);
      if ((j / lanes) % flush_blocks == flush_blocks - 1) flush(acc, row_sum);
    }
    row_sum += static_cast<double>(xsimd::hadd(acc));
    for (; j < i; ++j) {
      const T weight = apart(i, j, row[j], squared[j]);
      row[j] = weight;
      row_sum += static_cast<double>(weight);
      column[j] += weight;
    }
    row_sums_.data(0)[i] += row_sum;
    if ((i - first) % flush_rows == flush_rows - 1 || i + 1 == end_) flush_columns(i);
  }

  /// The band's part of scale dL/dX, rows [0, end) x D (rows D apart): the product over
  /// the band's weights w (rows [first, end) at w + (i - first) * stride; destroyed) with
  /// the row sums and the pairs applied apart.
  const T* finish(const ConstStridedMap<T>& xc, T* w, Index stride, Index first, double scale) {
    const Index end = end_, d = x_.cols;
    StridedMap<T> out(gradient_.data(static_cast<std::size_t>(end * d)), end, d,
                      Eigen::OuterStride<>(d));
    band_product(xc, w, stride, first, end, out);
    const double* near = near_.data(0);
    const double* row_sums = row_sums_.data(0);
    for (Index a = 0; a < end; ++a) {
      const double r = row_sums[a];
      const double* n_a = near + a * d;
      T* o = &out(a, 0);
      const T* c = xc.data() + a * d;
      for (Index k = 0; k < d; ++k)
        o[k] = static_cast<T>(2.0 * scale * (r * static_cast<double>(c[k]) - static_cast<double>(o[k])) +
                              scale * n_a[k]);
    }
    return gradient_.data(0);
  }

 private:
  MatrixView<const T> x_{};
  const T* norms_ = nullptr;
  Index end_ = 0;
  GrowOnlyBuffer<double> near_, row_sums_;
  GrowOnlyBuffer<T> column_, gradient_;
};

}  // namespace detail
}  // namespace metricloss
