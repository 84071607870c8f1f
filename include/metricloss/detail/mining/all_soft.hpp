#pragma once
// Mining::all with soft_margin: softplus does not factor over the negatives, so every
// (positive, negative) pair of an anchor is summed, in double or in lanes of T.

#include <metricloss/detail/mining/common.hpp>

#include <limits>

namespace metricloss {
namespace detail {
namespace mining {

/// One anchor of Mining::all with soft_margin: every (p, n) pair, O(k N).
template <class Kernels, class Weights>
void all_soft_anchor(Scratch& s, MiningResult& result, Index a, const Positive* positives, Index k,
                     Index n, const Index* class_of, Index own, const double* value,
                     double* slope, Distance distance, Weights& weights) {
  // The negatives' distances, packed.
  double* packed = s.packed.data(static_cast<std::size_t>(n));
  Index m = 0;
  for (Index j = 0; j < n; ++j)
    if (class_of[j] != own) packed[m++] = value[j];
  std::fill(slope, slope + m, 0.0);
  for (Index i = 0; i < k; ++i) {
    // sum_n softplus(t_p - d_an), and its slopes, summed for p and added per n.
    double positive_slope = 0.0;
    result.sum += Kernels::RowOps::soft_margin_row(positives[i].key, packed, m, slope, positive_slope);
    if (weights.enabled())
      weights.add(a, positives[i].index, positive_slope * positives[i].distance.derivative);
  }
  result.count += static_cast<double>(k) * static_cast<double>(m);
  if (!weights.enabled()) return;
  // Unpacked in place, from the last: slope[j] for every j (0 in the anchor's class).
  Index r = m;
  for (Index j = n - 1; j >= 0; --j)
    slope[j] = class_of[j] == own ? 0.0 : -slope[--r] * distance_derivative(value[j], distance);
  weights.add_row(a, slope, n);
}

/// One anchor of Mining::all with soft_margin in lanes of T, the distances' type: the
/// row's distances once (+inf off the negatives), then one kernel pass per positive over
/// the whole row, and the negatives' weights in one pass. O(k N).
template <class Kernels, class Classes, class T, class Weights>
void all_soft_anchor_lanes(Scratch& s, MiningResult& result, Index a, const Positive* positives,
                           Index k, const Classes& classes, const T* row,
                           Distance distance, Weights& weights) {
  const Index n = classes.candidates();
  const Index padded = Kernels::SoftMargin::template soft_margin_padded<T>(n);
  T* dist = s.template lanes_scratch<T>(static_cast<std::size_t>(4 * padded));
  T* factor = dist + padded;
  T* inverse = factor + padded;
  T* slope = inverse + padded;
  Kernels::SoftMargin::soft_margin_distances(row, n, padded, distance, dist);
  for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
    dist[*p] = std::numeric_limits<T>::infinity();
  // Positives are sorted by threshold: the first and last span them.
  double centre = 0.0;
  const bool factored = Kernels::SoftMargin::soft_margin_factors(dist, padded, positives[0].key,
                                                    positives[k - 1].key, factor, inverse, centre);
  const bool wanted = weights.enabled();
  if (wanted) std::fill(slope, slope + padded, T(0));
  for (Index i = 0; i < k; ++i) {
    double positive_slope = 0.0;
    const double t = positives[i].key;
    if (factored && wanted)
      result.sum += Kernels::SoftMargin::template soft_margin_row_lanes<true, true>(
          t, centre, dist, factor, inverse, padded, slope, positive_slope);
    else if (factored)
      result.sum += Kernels::SoftMargin::template soft_margin_row_lanes<true, false>(
          t, centre, dist, factor, inverse, padded, slope, positive_slope);
    else if (wanted)
      result.sum += Kernels::SoftMargin::template soft_margin_row_lanes<false, true>(
          t, centre, dist, factor, inverse, padded, slope, positive_slope);
    else
      result.sum += Kernels::SoftMargin::template soft_margin_row_lanes<false, false>(
          t, centre, dist, factor, inverse, padded, slope, positive_slope);
    if (wanted) weights.add(a, positives[i].index, positive_slope * positives[i].distance.derivative);
  }
  result.count += static_cast<double>(k) * static_cast<double>(classes.negatives(a));
  if (!wanted) return;
  Kernels::SoftMargin::soft_margin_negative_weights(slope, dist, padded, distance);
  weights.add_row_lanes(a, static_cast<const T*>(slope), n);
}

}  // namespace mining
}  // namespace detail
}  // namespace metricloss
