#pragma once
// Weights applied by differences of the original rows, in double lanes (the values widened
// as they load): the terms 2 w (x_i - x_j) that the product's form would cancel to rounding
// noise for close pairs, or that are too few to be worth a product.
#include <metricloss/detail/views.hpp>

#include <xsimd/xsimd.hpp>

namespace metricloss {
namespace detail {

/// sum_i += 2 w (x_i - x_j) and sum_j -= the same, rows of `sum` d apart, in double lanes
/// (the values widened as they load): one weight applied by differences of the rows.
template <class T>
void add_pair_by_differences(double* sum, const MatrixView<const T>& x, Index i, Index j, double w) {
  using wide = xsimd::batch<double>;
  constexpr Index lanes = static_cast<Index>(wide::size);
  const Index d = x.cols;
  const T *xi = x.row(i), *xj = x.row(j);
  double *gi = sum + i * d, *gj = sum + j * d;
  const double two_w = 2.0 * w;
  const wide factor(two_w);
  Index k = 0;
  for (; k + lanes <= d; k += lanes) {
    const wide term = factor * (wide::load_unaligned(xi + k) - wide::load_unaligned(xj + k));
    (wide::load_unaligned(gi + k) + term).store_unaligned(gi + k);
    (wide::load_unaligned(gj + k) - term).store_unaligned(gj + k);
  }
  for (; k < d; ++k) {
    const double term = two_w * (static_cast<double>(xi[k]) - static_cast<double>(xj[k]));
    gi[k] += term;
    gj[k] -= term;
  }
}

/// gq += 2 w (q - r) and gr -= the same (rows of length d), in double lanes: one weight of
/// a query x reference pair applied by differences.
template <class T>
void add_cross_pair_by_differences(double* gq, double* gr, const T* q, const T* r, Index d,
                                   double w) {
  using wide = xsimd::batch<double>;
  constexpr Index lanes = static_cast<Index>(wide::size);
  const double two_w = 2.0 * w;
  const wide factor(two_w);
  Index k = 0;
  for (; k + lanes <= d; k += lanes) {
    const wide term = factor * (wide::load_unaligned(q + k) - wide::load_unaligned(r + k));
    (wide::load_unaligned(gq + k) + term).store_unaligned(gq + k);
    (wide::load_unaligned(gr + k) - term).store_unaligned(gr + k);
  }
  for (; k < d; ++k) {
    const double term = two_w * (static_cast<double>(q[k]) - static_cast<double>(r[k]));
    gq[k] += term;
    gr[k] -= term;
  }
}

/// grad = scale sum, row by row (sum: grad's rows in double, contiguous).
template <class T>
void write_scaled_rows(const double* sum, double scale, const MatrixView<T>& grad) {
  for (Index i = 0; i < grad.rows; ++i) {
    T* out = grad.row(i);
    const double* in = sum + i * grad.cols;
    for (Index k = 0; k < grad.cols; ++k) out[k] = static_cast<T>(scale * in[k]);
  }
}

/// gq += v (a - b), gr -= v (a - b), in double, entry by entry (CrossDistances' near pairs).
template <class T>
void add_cross_difference(double* gq, double* gr, const T* a, const T* b, Index d, double v) {
  for (Index c = 0; c < d; ++c) {
    const double term = v * (static_cast<double>(a[c]) - static_cast<double>(b[c]));
    gq[c] += term;
    gr[c] -= term;
  }
}

}  // namespace detail
}  // namespace metricloss
