#pragma once
// MultiSimilarityLoss's maths, shared by its backends (the formula is in
// <metricloss/multi_similarity.hpp>): one anchor's row of similarities S_aj = <q_a, r_j> gives
// its kept pairs, its loss L_a and the row of dL_a/dS_a.
//
// The kept sets compare similarities with the side's extreme: a decision that a product
// value within its rounding of the limit would make is made on exact similarities, and the
// extremes themselves are exact (API.md's tie regime).
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
/// 1 + sum_k e^{z_k} = e^{shift} sum.
struct LogOnePlusSum {
  double shift = 0.0, sum = 1.0;
  bool any = false;

  void start(double z_max, bool kept) {
    shift = std::max(0.0, z_max);
    sum = std::exp(-shift);
    any = kept;
  }
  double value() const { return any ? shift + std::log(sum) : 0.0; }
};

/// e[j] = exp(e[j]) for j < n (exp(-inf) = 0): the plain loop (scalar path).
struct PlainExp {
  static void in_place(double* e, Index n) {
    for (Index j = 0; j < n; ++j) e[j] = std::exp(e[j]);
  }
};

/// Pair (a, j)'s exponent, -alpha (S - base) or beta (S - base), or -inf when the kept-set
/// rule drops it; v = row(a)[j], decided on exact(a, j) when within rounding(a, j) of its limit.
template <class Similarities>
double multi_similarity_exponent(const MultiSimilarityRule& rule, const Similarities& s, Index a,
                                 Index j, double v, bool positive, double pos_limit,
                                 double neg_limit) {
  if (!rule.keep_all) {
    const double limit = positive ? pos_limit : neg_limit;
    const double decided = std::abs(v - limit) <= s.rounding(a, j) ? s.exact(a, j) : v;
    if (positive ? !(decided < limit) : !(decided > limit))
      return -std::numeric_limits<double>::infinity();
  }
  return positive ? -rule.alpha * (v - rule.base) : rule.beta * (v - rule.base);
}

/// Anchor a against candidates [0, end) (self(a) skipped). `z` (length end) is scratch; when
/// `w` is given it receives w[j] = scale dL_a/dS_aj. Returns L_a. Exp::in_place(e, n) takes
/// the exponentials of the kept terms, shifted by their side's largest (each in (0, 1]).
/// Similarities: row(a), exact(a, j), rounding(a, j) (a bound on |row(a)[j] - exact(a, j)|)
/// and widest_rounding(a) (>= every rounding(a, j)); Classes: own_class, self, class_of().
template <class Exp = PlainExp, class Classes, class Similarities>
double multi_similarity_row(const MultiSimilarityRule& rule, const Classes& classes,
                            const Similarities& s, Index a, Index end, double* z, double* w,
                            double scale) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  const auto* row = s.row(a);
  const Index own = classes.own_class(a), self = classes.self(a);
  const Index* class_of = classes.class_of();
  const auto positive = [&](Index j) { return own >= 0 && class_of[j] == own; };
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
    for (Index j = 0; j < end; ++j) {
      if (j == self) continue;
      const double v = static_cast<double>(row[j]);
      if (positive(j) && v <= min_pos + slack) exact_min = std::min(exact_min, s.exact(a, j));
      if (!positive(j) && v >= max_neg - slack) exact_max = std::max(exact_max, s.exact(a, j));
    }
    min_pos = exact_min;
    max_neg = exact_max;
  }
  // Kept: positives with S < max_neg + epsilon, negatives with S > min_pos - epsilon.
  const double pos_limit = max_neg + rule.epsilon, neg_limit = min_pos - rule.epsilon;
  double pos_top = -inf, neg_top = -inf;
  for (Index j = 0; j < end; ++j) {
    z[j] = -inf;
    if (j == self) continue;
    const bool p = positive(j);
    z[j] = multi_similarity_exponent(rule, s, a, j, static_cast<double>(row[j]), p, pos_limit,
                                     neg_limit);
    if (p) pos_top = std::max(pos_top, z[j]);
    else neg_top = std::max(neg_top, z[j]);
  }
  LogOnePlusSum pos, neg;
  pos.start(pos_top, pos_top != -inf);
  neg.start(neg_top, neg_top != -inf);
  for (Index j = 0; j < end; ++j)
    if (z[j] != -inf) z[j] -= positive(j) ? pos.shift : neg.shift;
  Exp::in_place(z, end);  // z[j] = e^{z_j - shift}, 0 where not kept
  for (Index j = 0; j < end; ++j)
    if (z[j] != 0.0) (positive(j) ? pos.sum : neg.sum) += z[j];
  if (w != nullptr) {
    // d/dS of (1/alpha) log(1 + sum e^{-alpha (S - base)}) and (1/beta) log(1 + sum e^{beta (S - base)}).
    const double pos_scale = -scale / pos.sum, neg_scale = scale / neg.sum;
    for (Index j = 0; j < end; ++j) w[j] = z[j] * (positive(j) ? pos_scale : neg_scale);
  }
  return pos.value() / rule.alpha + neg.value() / rule.beta;
}

}  // namespace detail
}  // namespace metricloss
