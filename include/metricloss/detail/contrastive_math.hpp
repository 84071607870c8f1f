#pragma once
// The maths of the contrastive loss for one pair, shared by every backend (host and device).
#include <metricloss/config.hpp>

#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {

/// hadsell: h = max(margin - d, 0)^2 (Hadsell, Chopra, LeCun 2006; Caffe's default).
/// legacy:  h = max(margin - d^2, 0)  (Caffe's legacy_version = true).
enum class ContrastiveForm { hadsell, legacy };

namespace detail {

/// Caffe's rule: similar = (static_cast<long long>(s) != 0), i.e. |s| >= 1 for floating
/// values, written without the cast so that huge values are not UB. A NaN similarity is
/// neither: it gives a NaN term (NaN in the data propagates).
enum class Similarity { dissimilar = 0, similar = 1, unknown = 2 };

template <class L>
METRICLOSS_HOST_DEVICE inline Similarity similarity_of(L s) {
  if constexpr (std::is_floating_point<L>::value) {
    if (s != s) return Similarity::unknown;
    return (s > L(-1) && s < L(1)) ? Similarity::dissimilar : Similarity::similar;
  } else {
    return s != L(0) ? Similarity::similar : Similarity::dissimilar;
  }
}

template <class L, class M>
METRICLOSS_HOST_DEVICE inline Similarity similarity_of(L label_a, M label_b) {
  if constexpr (std::is_floating_point<L>::value || std::is_floating_point<M>::value) {
    if (label_a != label_a || label_b != label_b) return Similarity::unknown;
    // Mixed integer / floating labels (Caffe passes labels as float) compare as values.
    return static_cast<double>(label_a) == static_cast<double>(label_b) ? Similarity::similar
                                                                         : Similarity::dissimilar;
  } else {
    return label_a == label_b ? Similarity::similar : Similarity::dissimilar;
  }
}

/// One pair's contribution: `term` is the bracket of L = 1/(2N) sum_i [...], and
/// `coefficient` is d term / d(a - b) divided by 2, so that dL/da_i = coefficient/N * (a_i - b_i)
/// and dL/db_i = -dL/da_i.
struct PairTerm {
  double term;
  double coefficient;
};

/// contrastive_pair with the distance given: `distance` = sqrt(squared_distance) for hadsell
/// (a backend takes the root its own way), unused for legacy. The hinge's values are computed
/// and then selected (blends on x86), since the hinge of random pairs is active about every
/// other pair and a branch on it would be mispredicted as often. (Selecting on the similarity
/// too, by a table, measured slower in bench_contrastive, whose repeated batch lets the
/// predictor learn that branch.)
METRICLOSS_HOST_DEVICE inline PairTerm contrastive_pair_from_distance(double squared_distance,
                                                                      double distance,
                                                                      Similarity similarity,
                                                                      double margin,
                                                                      ContrastiveForm form) {
  const bool legacy = form == ContrastiveForm::legacy;
  // legacy: h = max(m - d^2, 0), gradient -2(a - b) while d^2 < m (0 at d = 0 since a - b = 0).
  // hadsell: h = max(m - d, 0)^2, gradient -2 (m - d)/d (a - b); subgradient 0 at d = 0.
  const double x = legacy ? squared_distance : distance;
  const double gap = margin - x;
  const double ratio = -gap / distance;  // -inf at d = 0 (hadsell), not selected there
  const bool active = x < margin;        // false for NaN
  const double hinge_term = legacy ? gap : gap * gap;
  const double hinge_coefficient = legacy ? -1.0 : (distance > 0.0 ? ratio : 0.0);
  const double inactive = x != x ? x : 0.0;  // NaN propagates
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // similar: d^2, gradient 2(a - b).
  const bool similar = similarity == Similarity::similar;
  const bool unknown = similarity == Similarity::unknown;
  double term = active ? hinge_term : inactive;
  double coefficient = active ? hinge_coefficient : inactive;
  term = similar ? squared_distance : term;
  coefficient = similar ? 1.0 : coefficient;
  return {unknown ? nan : term, unknown ? nan : coefficient};
}

/// The same values by branches, for the scalar reference and CUDA (a thread per pair): the
/// scalar path's branches cost less than computing and selecting both sides (5-9 % at
/// N = 256), and only the SIMD rows, whose hinge is mispredicted, need the selects.
METRICLOSS_HOST_DEVICE inline PairTerm contrastive_pair(double squared_distance,
                                                        Similarity similarity, double margin,
                                                        ContrastiveForm form) {
  if (similarity == Similarity::unknown) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {nan, nan};
  }
  if (similarity == Similarity::similar) return {squared_distance, 1.0};
  if (form == ContrastiveForm::legacy) {
    if (squared_distance < margin) return {margin - squared_distance, -1.0};
    if (squared_distance != squared_distance) return {squared_distance, squared_distance};
    return {0.0, 0.0};
  }
  const double d = sqrt(squared_distance);
  if (d < margin) {
    const double gap = margin - d;
    return {gap * gap, d > 0.0 ? -gap / d : 0.0};
  }
  if (d != d) return {d, d};  // NaN propagates
  return {0.0, 0.0};
}

}  // namespace detail
}  // namespace metricloss
