#pragma once
// The row kernels of the sharded lifted loss's band (backend/simd/lifted_band.hpp): row i
// against its columns j < i in T's lanes, masks by class ids held as T.
#include <metricloss/backend/simd/band_gradient.hpp>
#include <metricloss/detail/views.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

template <class T>
struct LiftedBandRows {
  using batch = xsimd::batch<T>;
  static constexpr Index lanes = static_cast<Index>(batch::size);
  // Sums gather in T, then in double (BandGradient's flushes).
  using Gradient = BandGradient<T>;
  static constexpr Index flush_blocks = Gradient::flush_blocks;

  /// Pass 1: D_ij = sqrt(max(D2_ij, 0)) of row i (squared `sq`) into row[0, i), each
  /// negative's lowering near_col[j]. Returns row i's nearest negative (inf: none).
  static T distances(const T* sq, Index i, const T* cls, T* row, T* near_col) {
    const T inf = std::numeric_limits<T>::infinity();
    const T ci = cls[i];
    batch near(inf);
    Index j = 0;
    for (; j + lanes <= i; j += lanes) {
      const batch v = xsimd::sqrt(xsimd::max(batch::load_unaligned(sq + j), batch(T(0))));
      v.store_unaligned(row + j);
      const auto negative = batch::load_unaligned(cls + j) != batch(ci);
      near = xsimd::select(negative, xsimd::min(near, v), near);
      const batch column = batch::load_unaligned(near_col + j);
      xsimd::select(negative, xsimd::min(column, v), column).store_unaligned(near_col + j);
    }
    T nearest = lowest(near);
    for (; j < i; ++j) {
      const T v = std::sqrt(std::max(sq[j], T(0)));
      row[j] = v;
      if (cls[j] != ci) {
        nearest = std::min(nearest, v);
        near_col[j] = std::min(near_col[j], v);
      }
    }
    return nearest;
  }

  /// Pass 2: for row i's negatives j, e^{nearest_i - D_ij} into er[j] and e^{nearest_j -
  /// D_ij} into ec[j], added to column[j] (exponents <= 0, floored at -1000: 0; 0 off the
  /// negatives). Returns the sum of er.
  static double shifted(const T* row, Index i, const T* cls, const T* nearest, T* er, T* ec,
                        T* column) {
    const batch floor(T(-1000)), zero(T(0));
    const T ci = cls[i];
    const batch near_i(nearest[i]);
    batch acc(T(0));
    double row_sum = 0.0;
    Index j = 0;
    for (; j + lanes <= i; j += lanes) {
      const batch v = batch::load_unaligned(row + j);
      const auto negative = batch::load_unaligned(cls + j) != batch(ci);
      const batch a = xsimd::select(negative, xsimd::exp(xsimd::max(near_i - v, floor)), zero);
      const batch b = xsimd::select(
          negative, xsimd::exp(xsimd::max(batch::load_unaligned(nearest + j) - v, floor)), zero);
      a.store_unaligned(er + j);
      b.store_unaligned(ec + j);
      acc += a;
      (batch::load_unaligned(column + j) + b).store_unaligned(column + j);
      if ((j / lanes) % flush_blocks == flush_blocks - 1) Gradient::flush(acc, row_sum);
    }
    row_sum += static_cast<double>(xsimd::hadd(acc));
    for (; j < i; ++j) {
      const bool negative = cls[j] != ci;
      const T a = negative ? std::exp(std::max(nearest[i] - row[j], T(-1000))) : T(0);
      const T b = negative ? std::exp(std::max(nearest[j] - row[j], T(-1000))) : T(0);
      er[j] = a;
      ec[j] = b;
      row_sum += static_cast<double>(a);
      column[j] += b;
    }
    return row_sum;
  }

  /// Step 3: row i's weights on D2, in place of its distances `row`: for negatives
  /// (factor_i er + factor_j ec) / (2 D), 0 at D = 0; 0 at positives (applied later). Pairs
  /// close against their rows' norms go to `gradient` by differences; column[j] gathers the
  /// weights. Returns their sum.
  static double negative_weights(BandGradient<T>& gradient, Index i, const T* cls,
                                 const T* factor, const T* er, const T* ec, const T* sq, T* row,
                                 T* column) {
    const batch zero(T(0)), two(T(2));
    const T ci = cls[i];
    const batch factor_i(factor[i]);
    batch acc(T(0));
    double row_sum = 0.0;
    Index j = 0;
    for (; j + lanes <= i; j += lanes) {
      const batch v = batch::load_unaligned(row + j);
      const auto negative = batch::load_unaligned(cls + j) != batch(ci);
      const batch dd = factor_i * batch::load_unaligned(er + j) +
                       batch::load_unaligned(factor + j) * batch::load_unaligned(ec + j);
      const batch weight =
          gradient.apart_lanes(i, j, xsimd::select(negative && v > zero, dd / (two * v), zero), sq);
      weight.store_unaligned(row + j);
      acc += weight;
      (batch::load_unaligned(column + j) + weight).store_unaligned(column + j);
      if ((j / lanes) % flush_blocks == flush_blocks - 1)
        Gradient::flush(acc, row_sum);
    }
    row_sum += static_cast<double>(xsimd::hadd(acc));
    for (; j < i; ++j) {
      T weight = T(0);
      if (cls[j] != ci && row[j] > T(0))
        weight = (factor[i] * er[j] + factor[j] * ec[j]) / (T(2) * row[j]);
      weight = gradient.apart(i, j, weight, sq[j]);
      row[j] = weight;
      row_sum += static_cast<double>(weight);
      column[j] += weight;
    }
    return row_sum;
  }

  static T lowest(const batch& b) {
    alignas(64) T lane[lanes];
    b.store_aligned(lane);
    T m = lane[0];
    for (Index k = 1; k < lanes; ++k) m = std::min(m, lane[k]);
    return m;
  }

};

}  // namespace detail
}  // namespace metricloss
