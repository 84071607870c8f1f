#pragma once
// BatchContrastiveLoss's maths, shared by its backends (the formula is in
// <metricloss/batch_contrastive.hpp>): one pair's term and its slope in D2, and one anchor's
// sweep over its candidates, first for the totals (sums and counts of each side), then for
// the row of W = dL/dD2 once the counts are known. A pair's term and the totals are
// METRICLOSS_HOST_DEVICE: the CUDA backend (backend/cuda/batch_contrastive.cuh) calls them.
#include <metricloss/config.hpp>
#include <metricloss/options.hpp>
#include <metricloss/types.hpp>

#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

/// A pair's term and d(term)/d(D2); both 0 when the hinge is not > 0.
struct ContrastiveTerm {
  double value = 0.0, slope = 0.0;
};

/// The options of one call, in double.
struct ContrastiveRule {
  double pos_margin, neg_margin;
  bool euclidean, nonzero_mean;
  /// The D2 at which each side's hinge turns (-inf: never): a product-form D2 within its
  /// rounding of these is recomputed by differences before the hinge is decided.
  double pos_turn, neg_turn;

  ContrastiveRule(double pos, double neg, Distance distance, Reduction reduction)
      : pos_margin(pos), neg_margin(neg), euclidean(distance == Distance::euclidean),
        nonzero_mean(reduction == Reduction::nonzero_mean) {
    const double never = -std::numeric_limits<double>::infinity();
    pos_turn = euclidean ? (pos >= 0.0 ? pos * pos : never) : pos;
    neg_turn = euclidean ? (neg > 0.0 ? neg * neg : never) : neg;
  }

  /// [d - pos_margin]_+ and its slope in D2 (0 at d = 0: no epsilon).
  METRICLOSS_HOST_DEVICE ContrastiveTerm positive(double d2) const {
    const double d = euclidean ? std::sqrt(d2) : d2;
    const double h = d - pos_margin;
    if (!(h > 0.0)) return {};
    return {h, euclidean ? (d > 0.0 ? 0.5 / d : 0.0) : 1.0};
  }
  /// [neg_margin - d]_+ and its slope in D2.
  METRICLOSS_HOST_DEVICE ContrastiveTerm negative(double d2) const {
    const double d = euclidean ? std::sqrt(d2) : d2;
    const double h = neg_margin - d;
    if (!(h > 0.0)) return {};
    return {h, euclidean ? (d > 0.0 ? -0.5 / d : 0.0) : -1.0};
  }
};

/// Each side's sum of terms, terms > 0, and pairs (counts in double: exact to 2^53).
struct ContrastiveTotals {
  double pos_sum = 0.0, neg_sum = 0.0;
  double pos_active = 0.0, neg_active = 0.0, pos_pairs = 0.0, neg_pairs = 0.0;

  METRICLOSS_HOST_DEVICE double pos_count(const ContrastiveRule& rule) const { return rule.nonzero_mean ? pos_active : pos_pairs; }
  METRICLOSS_HOST_DEVICE double neg_count(const ContrastiveRule& rule) const { return rule.nonzero_mean ? neg_active : neg_pairs; }
  /// L = pos_sum / C_+ + neg_sum / C_-, a side without terms adding 0.
  METRICLOSS_HOST_DEVICE double loss(const ContrastiveRule& rule) const {
    const double cp = pos_count(rule), cn = neg_count(rule);
    return (cp > 0.0 ? pos_sum / cp : 0.0) + (cn > 0.0 ? neg_sum / cn : 0.0);
  }
  /// dL/d(term) of each side: 1 / C (0 without terms).
  METRICLOSS_HOST_DEVICE double pos_scale(const ContrastiveRule& rule) const { const double c = pos_count(rule); return c > 0.0 ? 1.0 / c : 0.0; }
  METRICLOSS_HOST_DEVICE double neg_scale(const ContrastiveRule& rule) const { const double c = neg_count(rule); return c > 0.0 ? 1.0 / c : 0.0; }
};

/// One anchor's sums over some of its candidates (counts in double).
struct ContrastiveRowSums {
  double pos_sum = 0.0, neg_sum = 0.0, pos_active = 0.0, neg_active = 0.0, positives = 0.0;

  /// Adds the row's sums to `totals`: `candidates` pairs, `positives` of them positive.
  void add_to(ContrastiveTotals& totals, double candidates) const {
    totals.pos_sum += pos_sum;
    totals.neg_sum += neg_sum;
    totals.pos_active += pos_active;
    totals.neg_active += neg_active;
    totals.pos_pairs += positives;
    totals.neg_pairs += candidates - positives;
  }
};

/// Anchor a against candidates [begin, end) (self(a) skipped), in order: adds the pairs to
/// `sums`, and, when w is given, writes w[j] = dL/dD2_aj for j in the range (pos_scale,
/// neg_scale from the totals of every row). Distances: row(a) (D2 in any type), exact(a, j)
/// and rounding(a, j) (a bound on |row(a)[j] - exact(a, j)|); Classes: own_class, self,
/// class_of().
template <class Classes, class Distances>
void contrastive_pairs(const ContrastiveRule& rule, const Classes& classes,
                       const Distances& distances, Index a, Index begin, Index end,
                       ContrastiveRowSums& sums, double* w, double pos_scale, double neg_scale) {
  const auto* row = distances.row(a);
  const Index own = classes.own_class(a), self = classes.self(a);
  const Index* class_of = classes.class_of();
  // The sums run in locals and join `sums` once. Accumulated in the struct itself, GCC 12
  // -O3 -march=native made test_batch_contrastive's scalar float forward and
  // forward_backward differ by one ulp (gone with -fno-tree-slp-vectorize; the cause is not
  // pinned down); with locals they agree.
  double pos_sum = 0.0, neg_sum = 0.0, pos_active = 0.0, neg_active = 0.0, positives = 0.0;
  for (Index j = begin; j < end; ++j) {
    if (j == self) {
      if (w) w[j] = 0.0;
      continue;
    }
    const bool positive = own >= 0 && class_of[j] == own;
    double d2 = static_cast<double>(row[j]);
    if (std::abs(d2 - (positive ? rule.pos_turn : rule.neg_turn)) <= distances.rounding(a, j))
      d2 = distances.exact(a, j);
    const ContrastiveTerm term = positive ? rule.positive(d2) : rule.negative(d2);
    const double active = term.value > 0.0 ? 1.0 : 0.0;
    if (positive) {
      positives += 1.0;
      pos_sum += term.value;
      pos_active += active;
    } else {
      neg_sum += term.value;
      neg_active += active;
    }
    if (w) w[j] = term.slope * (positive ? pos_scale : neg_scale);
  }
  sums.pos_sum += pos_sum;
  sums.neg_sum += neg_sum;
  sums.pos_active += pos_active;
  sums.neg_active += neg_active;
  sums.positives += positives;
}

/// The candidates of anchor a among [0, end): every one but itself.
template <class Classes>
double contrastive_candidates(const Classes& classes, Index a, Index end) {
  const Index self = classes.self(a);
  return static_cast<double>(end - (self >= 0 && self < end ? 1 : 0));
}

/// Anchor a against candidates [0, end), in order (the scalar path's row): its pairs added
/// to `totals`, and w as in contrastive_pairs.
template <class Classes, class Distances>
void contrastive_row(const ContrastiveRule& rule, const Classes& classes,
                     const Distances& distances, Index a, Index end, ContrastiveTotals& totals,
                     double* w = nullptr, double pos_scale = 0.0, double neg_scale = 0.0) {
  ContrastiveRowSums sums;
  contrastive_pairs(rule, classes, distances, a, 0, end, sums, w, pos_scale, neg_scale);
  sums.add_to(totals, contrastive_candidates(classes, a, end));
}

}  // namespace detail
}  // namespace metricloss
