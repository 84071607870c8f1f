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
  wide acc[4] = {wide(0.0), wide(0.0), wide(0.0), wide(0.0)};
  Index j = 0;
  for (; j + 4 * lanes <= d; j += 4 * lanes)
    for (Index s = 0; s < 4; ++s) {
      const wide diff = wide::load_unaligned(a + j + s * lanes) - wide::load_unaligned(b + j + s * lanes);
      acc[s] = xsimd::fma(diff, diff, acc[s]);
    }
  for (; j + lanes <= d; j += lanes) {
    const wide diff = wide::load_unaligned(a + j) - wide::load_unaligned(b + j);
    acc[0] = xsimd::fma(diff, diff, acc[0]);
  }
  double sum = xsimd::hadd((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; j < d; ++j) {
    const double diff = static_cast<double>(a[j]) - static_cast<double>(b[j]);
    sum += diff * diff;
  }
  return sum;
}

}  // namespace detail
}  // namespace metricloss
