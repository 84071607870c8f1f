#pragma once
// BatchTripletLoss's brute-force reference, O(N^3) over every triplet in double, written
// from API.md's text (lowest row on ties, a hinge at exactly 0 inactive): shared by the CPU
// and CUDA tests.
#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace mltest {

using ml::Distance;
using ml::Mining;

inline std::string name_of(Mining mining, Distance distance, bool soft_margin) {
  std::string name = mining == Mining::all ? "all" : mining == Mining::hard ? "hard" : "semihard";
  name += distance == Distance::euclidean ? " euclidean" : " squared_euclidean";
  return soft_margin ? name + " soft" : name;
}

using Labels = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>;

inline Labels labels_of(const std::vector<std::int64_t>& v) {
  Labels l(static_cast<Index>(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) l(static_cast<Index>(i)) = v[i];
  return l;
}

/// Test-only reference, brute force over every triplet, in double, from API.md's text.
struct Reference {
  double loss = 0.0;
  Matrix<double> grad;
  /// How far the data is from changing a selection or crossing a hinge kink: the smallest
  /// distance between competing candidates (hard: the two farthest positives, the two
  /// nearest negatives; semihard: d_an against d_ap, and the two nearest farther negatives)
  /// and |hinge argument| of every triplet that counts (without soft_margin).
  double gap = std::numeric_limits<double>::infinity();
  /// How often the rules of ties decided (the tie regime must exercise them): hinges of
  /// counted triplets at exactly 0, and selections with an exact tie for the best.
  Index zero_hinges = 0, tied_selections = 0;
};

inline Reference brute_force(const Matrix<double>& x, const Labels& y, double margin, Mining mining,
                      Distance distance, bool soft_margin, double top_diff) {
  const Index n = x.rows();
  const bool squared = distance == Distance::squared_euclidean;
  Matrix<double> dist(n, n);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j) {
      const double q = (x.row(i) - x.row(j)).squaredNorm();
      dist(i, j) = squared ? q : std::sqrt(q);
    }
  // d d_ij / d x_i; 0 at zero distance.
  auto ddist = [&](Index i, Index j) -> Eigen::RowVectorXd {
    const Eigen::RowVectorXd diff = x.row(i) - x.row(j);
    if (squared) return 2.0 * diff;
    return dist(i, j) > 0 ? (diff / dist(i, j)).eval() : (0.0 * diff).eval();
  };
  Reference r;
  r.grad = Matrix<double>::Zero(n, x.cols());
  double count = 0.0;
  auto add = [&](Index a, Index p, Index q, bool counts_when_inactive) {
    const double arg = dist(a, p) - dist(a, q) + margin;
    if (!soft_margin) r.gap = std::min(r.gap, std::abs(arg));
    if (!soft_margin && arg == 0.0) ++r.zero_hinges;
    double value, slope;
    if (soft_margin) {
      value = std::log1p(std::exp(arg));
      slope = 1.0 / (1.0 + std::exp(-arg));
    } else {
      value = std::max(arg, 0.0);
      slope = arg > 0 ? 1.0 : 0.0;
    }
    if (counts_when_inactive || value > 0) count += 1.0;
    r.loss += value;
    const Eigen::RowVectorXd gp = ddist(a, p), gn = ddist(a, q);
    r.grad.row(a) += slope * (gp - gn);
    r.grad.row(p) -= slope * gp;
    r.grad.row(q) += slope * gn;
  };
  // The gap between the best and the second best of a running selection.
  auto second = [&](double best, double runner_up) {
    if (std::isfinite(runner_up)) r.gap = std::min(r.gap, std::abs(best - runner_up));
    if (best == runner_up) ++r.tied_selections;
  };
  const double inf = std::numeric_limits<double>::infinity();
  for (Index a = 0; a < n; ++a) {
    bool has_negative = false;
    for (Index j = 0; j < n; ++j) has_negative = has_negative || y(j) != y(a);
    if (!has_negative) continue;
    if (mining == Mining::all) {
      for (Index p = 0; p < n; ++p)
        for (Index q = 0; q < n; ++q)
          if (p != a && y(p) == y(a) && y(q) != y(a)) add(a, p, q, soft_margin);
    } else if (mining == Mining::hard) {
      Index hardest_p = -1, hardest_n = -1;
      double p1 = -inf, p2 = -inf, n1 = inf, n2 = inf;
      for (Index j = 0; j < n; ++j) {
        const double v = dist(a, j);
        if (j != a && y(j) == y(a)) {
          if (hardest_p < 0 || v > dist(a, hardest_p)) hardest_p = j;
          if (v > p1) { p2 = p1; p1 = v; } else if (v > p2) p2 = v;
        }
        if (y(j) != y(a)) {
          if (hardest_n < 0 || v < dist(a, hardest_n)) hardest_n = j;
          if (v < n1) { n2 = n1; n1 = v; } else if (v < n2) n2 = v;
        }
      }
      if (hardest_p < 0) continue;
      second(p1, p2);
      second(n1, n2);
      add(a, hardest_p, hardest_n, true);
    } else {
      for (Index p = 0; p < n; ++p) {
        if (p == a || y(p) != y(a)) continue;
        Index chosen = -1, farthest = -1;
        double c1 = inf, c2 = inf, f1 = -inf, f2 = -inf;
        for (Index q = 0; q < n; ++q) {
          if (y(q) == y(a)) continue;
          const double v = dist(a, q);
          r.gap = std::min(r.gap, std::abs(v - dist(a, p)));
          if (farthest < 0 || v > dist(a, farthest)) farthest = q;
          if (v > f1) { f2 = f1; f1 = v; } else if (v > f2) f2 = v;
          if (v > dist(a, p)) {
            if (chosen < 0 || v < dist(a, chosen)) chosen = q;
            if (v < c1) { c2 = c1; c1 = v; } else if (v < c2) c2 = v;
          }
        }
        if (chosen >= 0) second(c1, c2);
        else second(f1, f2);
        add(a, p, chosen >= 0 ? chosen : farthest, true);
      }
    }
  }
  if (count == 0.0) {
    r.loss = 0.0;
    r.grad.setZero();
  } else {
    r.loss /= count;
    r.grad *= top_diff / count;
  }
  return r;
}

}  // namespace mltest
