#pragma once
// Mining::hard: per anchor its farthest positive and nearest negative, ties settled on
// exact distances.

#include <metricloss/detail/mining/common.hpp>

#include <limits>

namespace metricloss {
namespace detail {
namespace mining {

/// The member of a's class (not a) with the largest exact distance, lowest row on ties,
/// among those whose product value is within 2 bound of `chosen`'s (the largest value).
template <class Classes, class Distances>
Index exact_farthest_member(const Classes& classes, const Distances& distances,
                            Index a, Index chosen, double bound) {
  const auto* row = distances.row(a);
  // As a difference: exact where the two values are close, whatever their size.
  const double top = static_cast<double>(row[chosen]);
  const double window = 2.0 * bound * (1.0 + Numerics<double>::kink_slack);
  double best = std::numeric_limits<double>::quiet_NaN();
  for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p) {
    if (*p == classes.self(a) || *p == chosen || !(top - static_cast<double>(row[*p]) <= window)) continue;
    if (best != best) best = distances.exact(a, chosen);
    const double e = distances.exact(a, *p);
    if (e > best || (e == best && *p < chosen)) {
      best = e;
      chosen = *p;
    }
  }
  return chosen;
}

/// l_a = h(max_p d_ap - min_n d_an + m), over anchors with a positive and a negative.
/// Product values select; where another row is within their rounding of the selected
/// one, exact distances decide (ties to the lowest row).
template <class Kernels, class Classes, class Distances, class Weights>
MiningResult hard(Scratch& s, const Classes& classes, const Distances& distances,
                  double margin, Distance distance, bool soft_margin, Weights& weights) {
  using Scans = typename Kernels::Scans;
  const Index anchors = classes.anchors(), n = classes.candidates();
  const Index widest = distances.widest();
  double* value = s.values.data(static_cast<std::size_t>(n));
  MiningResult result;
  for (Index a = 0; a < anchors; ++a) {
    if (classes.positives(a) == 0 || classes.negatives(a) == 0) continue;
    const auto* row = distances.row(a);
    const double bound = distances.rounding(a, widest);
    Index positive = -1;
    for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
      if (*p != classes.self(a) && (positive < 0 || row[*p] > row[positive])) positive = *p;
    if (bound > 0.0) positive = exact_farthest_member(classes, distances, a, positive, bound);
    for (Index j = 0; j < n; ++j) value[j] = static_cast<double>(row[j]);
    for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
      value[*p] = std::numeric_limits<double>::quiet_NaN();
    Selection negative{Scans::nearest_above(value, n, -std::numeric_limits<double>::infinity()),
                       -std::numeric_limits<double>::infinity(), false};
    if (negative.chosen < 0) {
      // Every negative at +inf (an overflowed distance): the first one, as a strict
      // scan in row order keeps it; the loss is then not finite anyway.
      const Index own = classes.own_class(a);
      for (Index j = 0; j < n && negative.chosen < 0; ++j)
        if (classes.class_of()[j] != own) negative.chosen = j;
    }
    if (bound > 0.0) settle_ties<Kernels>(s, distances, a, value, n, &negative, 1, bound);
    add_triplet(result, a, positive, negative.chosen, distances, margin, distance, soft_margin,
                weights);
  }
  return result;
}

}  // namespace mining
}  // namespace detail
}  // namespace metricloss
