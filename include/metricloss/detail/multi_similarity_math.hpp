#pragma once
// MultiSimilarityLoss's maths, shared by its backends (the formula is in
// <metricloss/multi_similarity.hpp>): one anchor's row of similarities S_aj = <q_a, r_j> gives
// its kept pairs, its loss L_a and the row of dL_a/dS_a.
//
// The kept sets compare similarities with the side's extreme: a decision that a product
// value within its rounding of the limit would make is made on exact similarities, and the
// extremes themselves are exact (API.md's tie regime).
#include <metricloss/config.hpp>
#include <metricloss/types.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

/// The options of one call, in double.
struct MultiSimilarityRule {
  double alpha, beta, base, epsilon;
  bool keep_all;  // epsilon = +inf: every pair is kept, with or without the other side

  MultiSimilarityRule(double alpha_, double beta_, double base_, double epsilon_)
      : alpha(alpha_), beta(beta_), base(base_), epsilon(epsilon_),
        keep_all(std::isinf(epsilon_) && epsilon_ > 0) {}
};

/// log(1 + sum_k e^{z_k}) with the largest exponent (or 0) factored out, so that no exp
/// overflows (beta = 50 makes e^{beta (S - base)} reach e^25 at S = 1, more unnormalised):
/// 1 + sum_k e^{z_k} = e^{shift} sum. Host and device (backend/cuda/multi_similarity.cuh).
struct LogOnePlusSum {
  double shift = 0.0, sum = 1.0;
  bool any = false;

  METRICLOSS_HOST_DEVICE void start(double z_max, bool kept) {
    shift = std::max(0.0, z_max);
    sum = std::exp(-shift);
    any = kept;
  }
  METRICLOSS_HOST_DEVICE double value() const { return any ? shift + std::log(sum) : 0.0; }
};

/// What anchor a's row of W depends on besides its similarities (the sharded path publishes
/// it, backend/sharded_multi_similarity.hpp): the kept sets' limits, each side's shift and
/// sum of e^{z - shift} (with the 1 of log(1 + sum)), and L_a.
struct MultiSimilarityRowStats {
  double pos_limit = 0.0, neg_limit = 0.0;
  double pos_shift = 0.0, pos_sum = 1.0, neg_shift = 0.0, neg_sum = 1.0;
  double loss = 0.0;
};

/// scale dL_a/dS_aj for candidate j of anchor a from a's stats and S_aj: `v` the similarity
/// to weigh and to decide by, `exact()` the exact one, taken where v lies within `rounding`
/// of its side's limit, as multi_similarity_exponents decides (so every approximation of
/// S_aj within its rounding gets a's decision).
template <class Exact>
double multi_similarity_weight(const MultiSimilarityRule& rule,
                               const MultiSimilarityRowStats& stats, bool positive, double v,
                               double rounding, Exact&& exact, double scale) {
  if (!rule.keep_all) {
    const double limit = positive ? stats.pos_limit : stats.neg_limit;
    const double decided = std::abs(v - limit) <= rounding ? exact() : v;
    if (positive ? !(decided < limit) : !(decided > limit)) return 0.0;
  }
  const double z = positive ? -rule.alpha * (v - rule.base) : rule.beta * (v - rule.base);
  const double e = std::exp(z - (positive ? stats.pos_shift : stats.neg_shift));
  return positive ? -scale * e / stats.pos_sum : scale * e / stats.neg_sum;
}

/// e[j] = exp(e[j]) for j < n (exp(-inf) = 0): the plain loop (scalar path).
struct PlainExp {
  static void in_place(double* e, Index n) {
    for (Index j = 0; j < n; ++j) e[j] = std::exp(e[j]);
  }
};

/// Whether candidate j is a positive of anchor a.
template <class Classes>
bool multi_similarity_positive(const Classes& classes, Index a, Index j) {
  const Index own = classes.own_class(a);
  return own >= 0 && classes.class_of()[j] == own;
}

/// The exact extremes over candidates [begin, end) of anchor a (self(a) skipped): a positive
/// with row(a)[j] <= below lowers exact_min to exact(a, j), a negative with row(a)[j] >= above
/// raises exact_max.
template <class Classes, class Similarities>
void multi_similarity_exact_extremes(const Classes& classes, const Similarities& s, Index a,
                                     Index begin, Index end, double below, double above,
                                     double& exact_min, double& exact_max) {
  const auto* row = s.row(a);
  const Index self = classes.self(a);
  for (Index j = begin; j < end; ++j) {
    if (j == self) continue;
    const double v = static_cast<double>(row[j]);
    const bool p = multi_similarity_positive(classes, a, j);
    if (p && v <= below) exact_min = std::min(exact_min, s.exact(a, j));
    if (!p && v >= above) exact_max = std::max(exact_max, s.exact(a, j));
  }
}

/// Candidates [begin, end) of anchor a: z[j] = -alpha (S - base) or beta (S - base) for a
/// kept pair, -inf otherwise (and for self(a)), each side's largest into pos_top / neg_top.
/// Kept: positives with S < pos_limit, negatives with S > neg_limit, decided on exact(a, j)
/// where row(a)[j] is within rounding(a, j) of its limit; every pair when rule.keep_all.
template <class Classes, class Similarities>
void multi_similarity_exponents(const MultiSimilarityRule& rule, const Classes& classes,
                                const Similarities& s, Index a, Index begin, Index end,
                                double pos_limit, double neg_limit, double* z, double& pos_top,
                                double& neg_top) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  const auto* row = s.row(a);
  const Index self = classes.self(a);
  for (Index j = begin; j < end; ++j) {
    z[j] = -inf;
    if (j == self) continue;
    const double v = static_cast<double>(row[j]);
    const bool p = multi_similarity_positive(classes, a, j);
    if (!rule.keep_all) {
      const double limit = p ? pos_limit : neg_limit;
      const double decided = std::abs(v - limit) <= s.rounding(a, j) ? s.exact(a, j) : v;
      if (p ? !(decided < limit) : !(decided > limit)) continue;
    }
    z[j] = p ? -rule.alpha * (v - rule.base) : rule.beta * (v - rule.base);
    if (p) pos_top = std::max(pos_top, z[j]);
    else neg_top = std::max(neg_top, z[j]);
  }
}

/// Anchor a against candidates [0, end) (self(a) skipped). `z` (length end) is scratch; when
/// `w` is given it receives w[j] = scale dL_a/dS_aj; when `stats` is, the row's stats.
/// Returns L_a. The scalar path's row;
/// the simd path's is multi_similarity_row_lanes (backend/simd/multi_similarity.hpp).
/// Similarities: row(a), exact(a, j), rounding(a, j) (a bound on |row(a)[j] - exact(a, j)|)
/// and widest_rounding(a) (>= every rounding(a, j)); Classes: own_class, self, class_of().
template <class Classes, class Similarities>
double multi_similarity_row(const MultiSimilarityRule& rule, const Classes& classes,
                            const Similarities& s, Index a, Index end, double* z, double* w,
                            double scale, MultiSimilarityRowStats* stats = nullptr) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  const auto* row = s.row(a);
  const Index self = classes.self(a);
  const auto positive = [&](Index j) { return multi_similarity_positive(classes, a, j); };
  // The extremes: the smallest positive and the largest negative similarity.
  double min_pos = inf, max_neg = -inf;
  for (Index j = 0; j < end; ++j) {
    if (j == self) continue;
    const double v = static_cast<double>(row[j]);
    if (positive(j)) min_pos = std::min(min_pos, v);
    else max_neg = std::max(max_neg, v);
  }
  const double slack = 2.0 * s.widest_rounding(a);
  if (!rule.keep_all && slack > 0.0) {
    // Only entries within twice the rounding of the approximate extreme can be the exact one.
    double exact_min = inf, exact_max = -inf;
    multi_similarity_exact_extremes(classes, s, a, 0, end, min_pos + slack, max_neg - slack,
                                    exact_min, exact_max);
    min_pos = exact_min;
    max_neg = exact_max;
  }
  // Kept: positives with S < max_neg + epsilon, negatives with S > min_pos - epsilon.
  const double pos_limit = max_neg + rule.epsilon, neg_limit = min_pos - rule.epsilon;
  double pos_top = -inf, neg_top = -inf;
  multi_similarity_exponents(rule, classes, s, a, 0, end, pos_limit, neg_limit, z, pos_top,
                             neg_top);
  LogOnePlusSum pos, neg;
  pos.start(pos_top, pos_top != -inf);
  neg.start(neg_top, neg_top != -inf);
  for (Index j = 0; j < end; ++j)
    if (z[j] != -inf) z[j] -= positive(j) ? pos.shift : neg.shift;
  PlainExp::in_place(z, end);  // z[j] = e^{z_j - shift}, 0 where not kept
  for (Index j = 0; j < end; ++j)
    if (z[j] != 0.0) (positive(j) ? pos.sum : neg.sum) += z[j];
  if (w != nullptr) {
    // d/dS of (1/alpha) log(1 + sum e^{-alpha (S - base)}) and (1/beta) log(1 + sum e^{beta (S - base)}).
    const double pos_scale = -scale / pos.sum, neg_scale = scale / neg.sum;
    for (Index j = 0; j < end; ++j) w[j] = z[j] * (positive(j) ? pos_scale : neg_scale);
  }
  const double loss = pos.value() / rule.alpha + neg.value() / rule.beta;
  if (stats != nullptr)
    *stats = {pos_limit, neg_limit, pos.shift, pos.sum, neg.shift, neg.sum, loss};
  return loss;
}

}  // namespace detail
}  // namespace metricloss
