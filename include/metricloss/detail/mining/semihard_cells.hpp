#pragma once
// Mining::semihard's anchors with many positives over long rows (a reference set, a
// cross-batch memory): buckets by table look-up (mining/cells.hpp) instead of a binary
// search a row, and ties under rounding settled only where a row can beat a winner.

#include <metricloss/detail/mining/cells.hpp>
#include <metricloss/detail/mining/common.hpp>

#include <algorithm>
#include <limits>

namespace metricloss {
namespace detail {
namespace mining {

/// semihard_by_buckets (same contract, same selections) for long rows. Each value is looked
/// up in ThresholdCells and compared with its bucket's running minimum plus four roundings,
/// which few rows beat once the row is under way; the rows in marked cells are counted up
/// from their cell's lower bound, and those near a threshold get exact values, apart. Minima are kept lowest row first
/// whatever the order rows come in. False (value untouched) where cells do not pay.
template <class Classes, class Distances>
bool semihard_by_cells(Scratch& s, Index a, Index k, const Classes& classes,
                       const Distances& distances, double* value, Selection* chosen) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  const Index n = classes.candidates();
  const double* thresholds = s.thresholds.data(0);
  const double bound = distances.rounding(a, distances.widest());
  const bool ties = bound > 0.0;
  ThresholdCells cells;
  if (!cells.build(s.cells, thresholds, k, n, ties ? bound : 0.0)) return false;
  for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
    value[*p] = std::numeric_limits<double>::quiet_NaN();  // never a negative, bucket 0
  Index* nearest = s.nearest.data(static_cast<std::size_t>(k + 1));
  double* nearest_value = s.bucket_sum.data(static_cast<std::size_t>(k + 1));
  std::fill(nearest, nearest + k + 1, Index(-1));
  std::fill(nearest_value, nearest_value + k + 1, inf);
  // limit[code]: the value a row of that code must not exceed to be looked at. Marked
  // cells (code 0) come apart and bucket 0 (code 1) never counts.
  double* limit = s.limits.data(static_cast<std::size_t>(k + 2));
  limit[0] = limit[1] = -inf;
  std::fill(limit + 2, limit + k + 2, inf);
  const double slack = ties ? 4.0 * bound : 0.0;  // the windows below need 3
  Index* candidate = s.candidates.data(static_cast<std::size_t>(n));
  Index* candidate_bucket = s.candidate_buckets.data(static_cast<std::size_t>(n));
  Index candidates = 0;
  auto visit = [&](Index j, Index b) {
    const double v = value[j];
    candidate[candidates] = j;
    candidate_bucket[candidates++] = b;
    if (v < nearest_value[b] || (v == nearest_value[b] && j < nearest[b])) {
      nearest_value[b] = v;
      nearest[b] = j;
      limit[b + 1] = v + slack;
    }
  };
  Index* marked = s.near_rows.data(static_cast<std::size_t>(n));
  Index marked_count = 0;
  for (Index j = 0; j < n; ++j) {
    const Index code = cells.code(value[j]);
    marked[marked_count] = j;
    marked_count += code == 0 ? 1 : 0;
    if (value[j] <= limit[code]) visit(j, code - 1);
  }
  // Marked rows: buckets counted up from the cell's lower bound, exact values within a
  // row's rounding of a threshold (their rows requested a few ahead, as R may be a memory
  // of 10^5 rows).
  Index* bucket = s.buckets.data(static_cast<std::size_t>(n));
  Index* exact = s.exact_rows.data(static_cast<std::size_t>(n));
  unsigned char* is_exact = s.exact_flags.data(static_cast<std::size_t>(n));
  Index exact_count = 0;
  for (Index t = 0; t < marked_count; ++t) {
    const Index j = marked[t], b = count_from<false>(thresholds, k, cells.below(value[j]), value[j]);
    const double q = value[j], own_bound = ties ? distances.rounding(a, j) : 0.0;
    bucket[t] = b;
    if (ties && near_neighbour(thresholds, k, b, q, own_bound)) exact[exact_count++] = j;
  }
  for (Index e = 0; e < exact_count; ++e) {
    if (e + prefetch_distance < exact_count) prefetch_exact(distances, a, exact[e + prefetch_distance]);
    value[exact[e]] = distances.exact(a, exact[e]);
    is_exact[exact[e]] = 1;
  }
  for (Index t = 0; t < marked_count; ++t) {
    const Index j = marked[t];
    const Index b =
        is_exact[j] ? count_from<false>(thresholds, k, cells.below(value[j]), value[j]) : bucket[t];
    if (b > 0 && value[j] <= limit[b + 1]) visit(j, b);
  }
  // Suffix minima: nearest[i + 1] becomes the nearest negative farther than positive i.
  for (Index b = k - 1; b >= 1; --b)
    if (nearest_value[b + 1] < nearest_value[b]) {
      nearest_value[b] = nearest_value[b + 1];
      nearest[b] = nearest[b + 1];
    }
  bool any_largest = false;
  for (Index i = 0; i < k; ++i) any_largest = any_largest || nearest[i + 1] < 0;
  Index farthest = -1;
  double farthest_value = -inf;
  if (any_largest)
    for (Index j = 0; j < n; ++j)
      if (value[j] > farthest_value) {
        farthest_value = value[j];
        farthest = j;
      }
  for (Index i = 0; i < k; ++i)
    chosen[i] = nearest[i + 1] >= 0 ? Selection{nearest[i + 1], thresholds[i], false}
                                    : Selection{farthest, -inf, true};
  if (ties && any_largest) {  // rare: every row may be in the farthest's window
    count_thresholds_below<false>(thresholds, k, value, n, bucket);
    settle_bucket_windows(s, distances, a, value, bucket, nearest_value, n, chosen, k, bound,
                          farthest_value, candidate);
  } else if (ties) {
    // Row j beats selection i's winner w only on exact distances no farther apart than
    // their roundings: value[j] - value[w] <= bound when w's value is exact (and j's not:
    // two exact values were compared above), 2 bound when not (1.5 and 3 here, so that
    // the rounding of the difference cannot matter). Winners' values fall with i, so a
    // row's selections are those below its bucket until one is out of reach.
    for (Index c = 0; c < candidates; ++c) {
      const Index j = candidate[c];
      const double v = value[j];
      double e = is_exact[j] ? v : std::numeric_limits<double>::quiet_NaN();
      for (Index i = candidate_bucket[c] - 1; i >= 0; --i) {
        const Index first = nearest[i + 1];  // the winner on values
        const double gap = v - nearest_value[i + 1];
        if (gap > 3.0 * bound) break;
        Selection& sel = chosen[i];
        if (j == sel.chosen || (is_exact[j] && is_exact[first]) ||
            !(gap <= (is_exact[first] ? 1.5 : 3.0) * bound))
          continue;
        if (e != e) e = distances.exact(a, j);
        if (sel.exact != sel.exact)
          sel.exact = is_exact[sel.chosen] ? value[sel.chosen] : distances.exact(a, sel.chosen);
        if (e < sel.exact || (e == sel.exact && j < sel.chosen)) {
          sel.chosen = j;
          sel.exact = e;
        }
      }
    }
    for (Index i = 0; i < k; ++i)
      if (chosen[i].exact != chosen[i].exact && is_exact[chosen[i].chosen])
        chosen[i].exact = value[chosen[i].chosen];
  }
  for (Index e = 0; e < exact_count; ++e) is_exact[exact[e]] = 0;
  return true;
}

}  // namespace mining
}  // namespace detail
}  // namespace metricloss
