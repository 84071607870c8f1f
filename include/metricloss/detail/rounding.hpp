#pragma once
// How far a squared distance taken from the centred product may be from the exact one.
#include <metricloss/config.hpp>
#include <metricloss/types.hpp>

#include <limits>

namespace metricloss {
namespace detail {

/// |fl(D2_ij) - D2_ij| <= product_rounding_unit<T>(d) * (n_i + n_j) for
/// D2_ij = n_i + n_j - 2 <xc_i, xc_j> in T over d columns (n_i = ||xc_i||^2): the dot
/// product's gamma_d with |<xc_i, xc_j>| <= (n_i + n_j) / 2, the norms' own gamma_d where
/// they are sums in T (the CPU path), and a few unit roundoffs for the centring and the
/// stored result. A selection that compares such a value against an
/// exact one must recompute it by differences when it lies within this bound.
template <class T>
METRICLOSS_HOST_DEVICE constexpr double product_rounding_unit(Index d) {
  return (2.0 * static_cast<double>(d) + 8.0) * (static_cast<double>(std::numeric_limits<T>::epsilon()) / 2.0);
}

}  // namespace detail
}  // namespace metricloss
