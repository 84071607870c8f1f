#pragma once
// The simd backend's exact squared distance and dot product: ||a - b||^2 (or <a, b>) with
// every difference and sum in double, in double lanes widened as they load, four independent
// sums. What a loss uses for
// a distance that carries weight and that the product cannot give to its tolerance (at large
// scales every weighted lifted negative comes here: Eigen's cast expression ran one scalar
// chain of d adds, 15x the whole loss at N = 1024, D = 512).
#include <metricloss/types.hpp>

#include <xsimd/xsimd.hpp>

namespace metricloss {
namespace detail {

/// sum_j u_j v_j over d entries, with (u, v) = (a - b, a - b) when Difference, else (a, b).
template <bool Difference, class T>
double lanes_products(const T* a, const T* b, Index d) {
  using wide = xsimd::batch<double>;
  constexpr Index lanes = static_cast<Index>(wide::size);
  // Four named sums, not an array: GCC kept an array of them in memory, a store and a
  // reload per step.
  wide acc0(0.0), acc1(0.0), acc2(0.0), acc3(0.0);
  const auto step = [&](wide& acc, Index at) {
    const wide u = wide::load_unaligned(a + at), v = wide::load_unaligned(b + at);
    if (Difference) acc = xsimd::fma(u - v, u - v, acc);
    else acc = xsimd::fma(u, v, acc);
  };
  Index j = 0;
  for (; j + 4 * lanes <= d; j += 4 * lanes) {
    step(acc0, j);
    step(acc1, j + lanes);
    step(acc2, j + 2 * lanes);
    step(acc3, j + 3 * lanes);
  }
  for (; j + lanes <= d; j += lanes) step(acc0, j);
  double sum = xsimd::hadd((acc0 + acc1) + (acc2 + acc3));
  for (; j < d; ++j) {
    const double u = static_cast<double>(a[j]), v = static_cast<double>(b[j]);
    sum += Difference ? (u - v) * (u - v) : u * v;
  }
  return sum;
}

template <class T>
double exact_squared_distance(const T* a, const T* b, Index d) {
  return lanes_products<true>(a, b, d);
}

/// <a, b> with every product and sum in double (a float product is exact in double; the
/// sums round), in double lanes as exact_squared_distance.
template <class T>
double exact_dot(const T* a, const T* b, Index d) {
  return lanes_products<false>(a, b, d);
}

}  // namespace detail
}  // namespace metricloss
