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

METRICLOSS_HOST_DEVICE inline PairTerm contrastive_pair(double squared_distance,
                                                        Similarity similarity, double margin,
                                                        ContrastiveForm form) {
  if (similarity == Similarity::unknown) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {nan, nan};
  }
  if (similarity == Similarity::similar) return {squared_distance, 1.0};  // d^2, gradient 2(a - b)
  if (form == ContrastiveForm::legacy) {
    // h = max(m - d^2, 0), gradient -2(a - b) while d^2 < m (0 at d = 0 since a - b = 0).
    if (squared_distance < margin) return {margin - squared_distance, -1.0};
    if (squared_distance != squared_distance) return {squared_distance, squared_distance};
    return {0.0, 0.0};
  }
  // hadsell: h = max(m - d, 0)^2, gradient -2 (m - d)/d (a - b); subgradient 0 at d = 0.
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
