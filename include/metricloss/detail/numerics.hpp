#pragma once
// The precision policy: every float/double threshold of the library, in one traits struct
// per type (host and device), each with the reason for its value. Backends read
// Numerics<T>::name; no numeric threshold is defined anywhere else.
//
// One error model for a squared distance taken from the centred product
//   D2_ij = n_i + n_j - 2 <xc_i, xc_j>   (n_i = ||xc_i||^2, in T over d columns):
//   |fl(D2_ij) - D2_ij| <= rounding_unit(d) * (n_i + n_j).
// One rule on when it is not good enough: below recompute_ratio * (n_i + n_j) the entry is
// recomputed by differences; and a decision (a selection, a hinge's side) that a product
// value within its bound of a competitor or a kink would make is made on exact distances.
#include <metricloss/config.hpp>
#include <metricloss/types.hpp>

#include <limits>

namespace metricloss {
namespace detail {

template <class T>
struct Numerics;

/// What float and double share: the same reasons, values in T's terms.
template <class T>
struct NumericsCommon {
  static constexpr double epsilon = static_cast<double>(std::numeric_limits<T>::epsilon());

  /// The product's error bound per unit of n_i + n_j: the dot product's gamma_d with
  /// |<xc_i, xc_j>| <= (n_i + n_j) / 2, the norms' own gamma_d where they are sums in T
  /// (the CPU path), and a few unit roundoffs for the centring and the stored result.
  METRICLOSS_HOST_DEVICE static constexpr double rounding_unit(Index d) {
    return (2.0 * static_cast<double>(d) + 8.0) * (epsilon / 2.0);
  }

  /// Lifted: a pair with D2 < near_ratio (n_i + n_k) is applied by differences, not through
  /// the product, where its weight S ~ 1/D would cancel (what stays errs by ~64 eps).
  static constexpr double near_ratio = 1.0 / 1024;

  /// Lifted: exp(-40) ~ 4e-18, a negative this much beyond both rows' nearest weighs
  /// nothing against the tolerance.
  static constexpr double soft_max_window = 40.0;

  /// Explicit triplets: a row is recomputed in double when its hinge argument lies within
  /// this many times the rounding of its two distances; 4, not more: on random float data
  /// at D = 128 a factor of 1024 sent ~20% of Euclidean rows to double.
  static constexpr double hinge_rounding_factor = 4.0;

  /// Batch triplet: relative slack on a hinge's kink held as a squared distance (t^2
  /// rounded, its root taken again later) and on tie windows: a few ulps of double.
  static constexpr double kink_slack = 0x1p-50;
};

template <>
struct Numerics<float> : NumericsCommon<float> {
  /// Squared distances below this fraction of n_i + n_j are recomputed by differences: the
  /// expansion errs by ~eps (n_i + n_j), so what is kept errs by <= ~eps / ratio (~5e-7).
  static constexpr double recompute_ratio = 0.125;
  /// Lifted: the soft-max window widened by what the T distances that decide it may err, per
  /// unit of D: D and the nearest each by ~ eps D (storage) + eps (n_i + n_k) / (2 D) <
  /// eps D / (2 ratio) (kept product entries have D2 > ratio (n_i + n_k)), with a margin of 8.
  static constexpr double soft_max_slack = 16.0 * (1.0 + 1.0 / (2.0 * recompute_ratio)) * epsilon;
  /// Lifted: error allowed in a weighted distance (the exponent of its soft-max weight):
  /// the gradient then errs by ~2x this against its largest entry, half of API.md's 1e-4.
  static constexpr double lifted_tolerance = 2.5e-5;
  /// Lifted: relative error of D held in T (D2 rounded to T, then its root), which a
  /// recompute in double removes.
  static constexpr double storage_unit = epsilon;
  /// exp's argument clamped from below here: e^-104 rounds to 0 in float (and xsimd 8.1's
  /// AVX-512 exp is undefined for arguments below ~-6.4e18 and NaN).
  static constexpr float exp_floor = -104.0f;
  /// Soft margin: the largest |argument| of a factor's exp, whose result stays normal.
  static constexpr double soft_margin_span = 80.0;
  /// Soft margin: the smallest argument handed to exp (e^-87 is still normal in float);
  /// below it e is taken as 0.
  static constexpr float soft_margin_lowest = -87.0f;
};

template <>
struct Numerics<double> : NumericsCommon<double> {
  /// As float's: the kept entries err by <= ~eps / ratio (~2e-13).
  static constexpr double recompute_ratio = 1.0 / 1024;
  /// As float's.
  static constexpr double soft_max_slack = 16.0 * (1.0 + 1.0 / (2.0 * recompute_ratio)) * epsilon;
  /// As float's, half of API.md's 1e-10.
  static constexpr double lifted_tolerance = 2.5e-11;
  /// D held in double is what the recompute would give: nothing to remove.
  static constexpr double storage_unit = 0.0;
  /// e^-746 rounds to 0 in double.
  static constexpr double exp_floor = -746.0;
  /// As float's, for double's range.
  static constexpr double soft_margin_span = 700.0;
  static constexpr double soft_margin_lowest = -708.0;
};

/// The product's rounding unit (Numerics<T>::rounding_unit), the name every backend uses.
template <class T>
METRICLOSS_HOST_DEVICE constexpr double product_rounding_unit(Index d) {
  return Numerics<T>::rounding_unit(d);
}

}  // namespace detail
}  // namespace metricloss
