#pragma once
// Brute-force references of the batch losses over queries Q against a reference set R, in
// double, written from API.md's "Reference sets" text: anchors from Q, candidates from R,
// P(a) = {j in R : y_j = y_a, j != self(a)}, Neg(a) = {j in R : y_j != y_a}, ties to the
// lowest row of R, a hinge at exactly 0 inactive. Lifted: J_aj over ordered positive pairs,
// its normaliser summed term by term (no factorisation).
#include "batch_triplet_reference.hpp"
#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace mltest {

using CrossLabels = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>;
using SelfIndices = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>;

struct CrossReference {
  double loss = 0.0;
  Matrix<double> grad_q, grad_r;
  /// Smallest distance between competing candidates and |hinge argument| (as the batch
  /// reference's gap): finite differences and float comparisons need it away from 0.
  double gap = std::numeric_limits<double>::infinity();
};

/// d(q_a, r_j) and its derivative with respect to q_a (the negative for r_j); 0 at 0.
struct CrossDistance {
  const Matrix<double>& q;
  const Matrix<double>& r;
  bool squared;
  double operator()(Index a, Index j) const {
    const double s = (q.row(a) - r.row(j)).squaredNorm();
    return squared ? s : std::sqrt(s);
  }
  Eigen::RowVectorXd slope(Index a, Index j) const {
    const Eigen::RowVectorXd diff = q.row(a) - r.row(j);
    if (squared) return 2.0 * diff;
    const double d = diff.norm();
    return d > 0 ? (diff / d).eval() : (0.0 * diff).eval();
  }
};

inline CrossReference cross_triplet_brute_force(const Matrix<double>& q, const CrossLabels& yq,
                                                const Matrix<double>& r, const CrossLabels& yr,
                                                const SelfIndices& self, double margin,
                                                ml::Mining mining, ml::Distance distance,
                                                bool soft_margin, double top_diff) {
  const Index nq = q.rows(), nr = r.rows();
  const CrossDistance dist{q, r, distance == ml::Distance::squared_euclidean};
  CrossReference out;
  out.grad_q = Matrix<double>::Zero(nq, q.cols());
  out.grad_r = Matrix<double>::Zero(nr, q.cols());
  double count = 0.0;
  const auto add = [&](Index a, Index p, Index n, bool counts_when_inactive) {
    const double arg = dist(a, p) - dist(a, n) + margin;
    if (!soft_margin) out.gap = std::min(out.gap, std::abs(arg));
    const double value = soft_margin ? std::log1p(std::exp(arg)) : std::max(arg, 0.0);
    const double slope = soft_margin ? 1.0 / (1.0 + std::exp(-arg)) : (arg > 0 ? 1.0 : 0.0);
    if (counts_when_inactive || value > 0) count += 1.0;
    out.loss += value;
    out.grad_q.row(a) += slope * (dist.slope(a, p) - dist.slope(a, n));
    out.grad_r.row(p) -= slope * dist.slope(a, p);
    out.grad_r.row(n) += slope * dist.slope(a, n);
  };
  const auto positive = [&](Index a, Index j) { return yr(j) == yq(a) && j != self(a); };
  const auto negative = [&](Index a, Index j) { return yr(j) != yq(a); };
  const auto gap = [&](double x, double y) {
    if (std::isfinite(x) && std::isfinite(y)) out.gap = std::min(out.gap, std::abs(x - y));
  };
  for (Index a = 0; a < nq; ++a) {
    bool any_negative = false;
    for (Index j = 0; j < nr; ++j) any_negative = any_negative || negative(a, j);
    if (!any_negative) continue;
    if (mining == ml::Mining::all) {
      for (Index p = 0; p < nr; ++p)
        for (Index n = 0; n < nr; ++n)
          if (positive(a, p) && negative(a, n)) add(a, p, n, soft_margin);
    } else if (mining == ml::Mining::hard) {
      Index hp = -1, hn = -1;
      for (Index j = 0; j < nr; ++j) {
        if (positive(a, j) && (hp < 0 || dist(a, j) > dist(a, hp))) hp = j;
        if (negative(a, j) && (hn < 0 || dist(a, j) < dist(a, hn))) hn = j;
      }
      if (hp < 0) continue;
      for (Index j = 0; j < nr; ++j) {
        if (positive(a, j) && j != hp) gap(dist(a, j), dist(a, hp));
        if (negative(a, j) && j != hn) gap(dist(a, j), dist(a, hn));
      }
      add(a, hp, hn, true);
    } else {
      for (Index p = 0; p < nr; ++p) {
        if (!positive(a, p)) continue;
        Index chosen = -1, farthest = -1;
        for (Index n = 0; n < nr; ++n) {
          if (!negative(a, n)) continue;
          gap(dist(a, n), dist(a, p));
          if (farthest < 0 || dist(a, n) > dist(a, farthest)) farthest = n;
          if (dist(a, n) > dist(a, p) && (chosen < 0 || dist(a, n) < dist(a, chosen))) chosen = n;
        }
        const Index picked = chosen >= 0 ? chosen : farthest;
        for (Index n = 0; n < nr; ++n)
          if (negative(a, n) && n != picked && (chosen < 0 || dist(a, n) > dist(a, p)))
            gap(dist(a, n), dist(a, picked));
        add(a, p, picked, true);
      }
    }
  }
  if (count == 0.0) {
    out.loss = 0.0;
    out.grad_q.setZero();
    out.grad_r.setZero();
  } else {
    out.loss /= count;
    out.grad_q *= top_diff / count;
    out.grad_r *= top_diff / count;
  }
  return out;
}

inline CrossReference cross_lifted_brute_force(const Matrix<double>& q, const CrossLabels& yq,
                                               const Matrix<double>& r, const CrossLabels& yr,
                                               const SelfIndices& self, double margin,
                                               double top_diff) {
  const Index nq = q.rows(), nr = r.rows();
  const CrossDistance dist{q, r, false};
  CrossReference out;
  out.grad_q = Matrix<double>::Zero(nq, q.cols());
  out.grad_r = Matrix<double>::Zero(nr, q.cols());
  struct Term {
    Index a, j;
    double value;
  };
  double pairs = 0.0;
  for (Index a = 0; a < nq; ++a)
    for (Index j = 0; j < nr; ++j)
      if (yr(j) == yq(a) && j != self(a)) pairs += 1.0;
  if (pairs == 0.0) return out;
  const auto add_distance = [&](Index a, Index j, double w) {  // w dD_aj
    out.grad_q.row(a) += w * dist.slope(a, j);
    out.grad_r.row(j) -= w * dist.slope(a, j);
  };
  std::vector<Term> terms;
  for (Index a = 0; a < nq; ++a)
    for (Index j = 0; j < nr; ++j) {
      if (!(yr(j) == yq(a) && j != self(a))) continue;
      terms.clear();
      for (Index k = 0; k < nr; ++k)
        if (yr(k) != yq(a)) terms.push_back({a, k, margin - dist(a, k)});
      for (Index l = 0; l < nq; ++l)
        if (yq(l) != yr(j)) terms.push_back({l, j, margin - dist(l, j)});
      if (terms.empty()) continue;  // J = -inf
      double top = -std::numeric_limits<double>::infinity();
      for (const Term& t : terms) top = std::max(top, t.value);
      double s = 0.0;
      for (const Term& t : terms) s += std::exp(t.value - top);
      const double J = top + std::log(s) + dist(a, j);
      if (!(J > 0.0)) continue;
      out.loss += J * J;
      const double dJ = J / pairs * top_diff;  // d(J^2 / (2|P|)) / dJ, times top_diff
      add_distance(a, j, dJ);
      for (const Term& t : terms) add_distance(t.a, t.j, -dJ * std::exp(t.value - top) / s);
    }
  out.loss /= 2.0 * pairs;
  return out;
}

/// One reference-set loss of the brute force: lifted, or batch triplet with its options.
struct CrossOption {
  bool lifted;
  ml::Mining mining;
  ml::Distance distance;
  bool soft_margin;
  std::string name() const { return lifted ? "lifted" : name_of(mining, distance, soft_margin); }
};

/// Lifted, and batch triplet with every mining, distance and margin form.
inline std::vector<CrossOption> every_cross_option() {
  std::vector<CrossOption> out{{true, ml::Mining::all, ml::Distance::euclidean, false}};
  for (ml::Mining m : {ml::Mining::all, ml::Mining::hard, ml::Mining::semihard})
    for (ml::Distance d : {ml::Distance::euclidean, ml::Distance::squared_euclidean})
      for (bool soft : {false, true}) out.push_back({false, m, d, soft});
  return out;
}

inline CrossReference cross_brute_force(const CrossOption& o, double margin, const Matrix<double>& q,
                                        const CrossLabels& yq, const Matrix<double>& r,
                                        const CrossLabels& yr, const SelfIndices& self,
                                        double top_diff = 1.0) {
  return o.lifted ? cross_lifted_brute_force(q, yq, r, yr, self, margin, top_diff)
                  : cross_triplet_brute_force(q, yq, r, yr, self, margin, o.mining, o.distance,
                                              o.soft_margin, top_diff);
}

/// The largest |entry| of a and b (0 when both are empty).
inline double largest_entry(const Matrix<double>& a, const Matrix<double>& b) {
  return std::max(a.size() ? a.cwiseAbs().maxCoeff() : 0.0, b.size() ? b.cwiseAbs().maxCoeff() : 0.0);
}

/// No query is a row of R.
inline SelfIndices no_self(Index n) { return SelfIndices::Constant(n, -1); }

}  // namespace mltest
