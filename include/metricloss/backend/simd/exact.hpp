#pragma once
// The simd backend's exact squared distance: ||a - b||^2 with every difference and sum in
// double, in double lanes widened as they load, four independent sums. What a loss uses for
// a distance that carries weight and that the product cannot give to its tolerance (at large
// scales every weighted lifted negative comes here: Eigen's cast expression ran one scalar
// chain of d adds, 15x the whole loss at N = 1024, D = 512).
#include <metricloss/types.hpp>

#include <xsimd/xsimd.hpp>

namespace metricloss {
namespace detail {

template <class T>
double exact_squared_distance(const T* a, const T* b, Index d) {
  using wide = xsimd::batch<double>;
  constexpr Index lanes = static_cast<Index>(wide::size);
  // Four named sums, not an array: GCC kept an array of them in memory, a store and a
  // reload per step.
  wide acc0(0.0), acc1(0.0), acc2(0.0), acc3(0.0);
  const auto step = [&](wide& acc, Index at) {
    const wide diff = wide::load_unaligned(a + at) - wide::load_unaligned(b + at);
    acc = xsimd::fma(diff, diff, acc);
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
    const double diff = static_cast<double>(a[j]) - static_cast<double>(b[j]);
    sum += diff * diff;
  }
  return sum;
}

}  // namespace detail
}  // namespace metricloss
