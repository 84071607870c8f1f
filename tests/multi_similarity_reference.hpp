#pragma once
// MultiSimilarityLoss's brute force for queries against a reference set: API.md's formula
// in double (similarities by Eigen's product of the double rows, kept sets by the written
// rule, gradients by the chain rule through S). Shared by tests/multi_similarity.cpp and
// tests/cuda/reference.cu.
#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace mltest {
namespace ms_reference {

using Labels = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>;
constexpr double inf = std::numeric_limits<double>::infinity();

struct Options {
  double alpha = 2, beta = 50, base = 0.5, epsilon = 0.1;
  std::string name() const {
    return "alpha " + std::to_string(alpha) + " beta " + std::to_string(beta) + " base " +
           std::to_string(base) + " epsilon " + std::to_string(epsilon);
  }
  template <class T>
  ml::MultiSimilarityLoss<T> loss() const {
    return ml::MultiSimilarityLoss<T>(static_cast<T>(alpha), static_cast<T>(beta),
                                      static_cast<T>(base), static_cast<T>(epsilon));
  }
};

inline std::vector<Options> every_option() {
  return {{2, 50, 0.5, 0.1}, {2, 50, 0.5, inf}, {1, 10, 0.2, 0.5}, {3, 5, -0.1, 0.0}, {0.5, 2, 0.0, inf}};
}

struct Expected {
  double loss = 0.0;
  Matrix<double> gq, gr;
  double gap = inf;  // nearest similarity to its kept-set limit
};

/// API.md's formula: anchors from Q, candidates j != self(a) from R, in double. Labels and
/// self: Eigen vectors (any label type compared with ==).
template <class T, class LQ, class LR, class Self>
Expected brute_force(const Options& o, const Matrix<T>& qt, const LQ& yq, const Matrix<T>& rt,
                     const LR& yr, const Self& self) {
  const Matrix<double> q = qt.template cast<double>(), r = rt.template cast<double>();
  const Matrix<double> s = q * r.transpose();
  Expected e;
  e.gq = Matrix<double>::Zero(q.rows(), q.cols());
  e.gr = Matrix<double>::Zero(r.rows(), r.cols());
  const double n = static_cast<double>(q.rows());
  for (Index a = 0; a < q.rows(); ++a) {
    double min_pos = inf, max_neg = -inf;
    for (Index j = 0; j < r.rows(); ++j) {
      if (j == self(a)) continue;
      if (yq(a) == yr(j)) min_pos = std::min(min_pos, s(a, j));
      else max_neg = std::max(max_neg, s(a, j));
    }
    std::vector<Index> kept_p, kept_n;
    for (Index j = 0; j < r.rows(); ++j) {
      if (j == self(a)) continue;
      const bool p = yq(a) == yr(j);
      if (std::isinf(o.epsilon)) {
        (p ? kept_p : kept_n).push_back(j);
        continue;
      }
      const double limit = p ? max_neg + o.epsilon : min_pos - o.epsilon;
      if (std::isfinite(limit)) e.gap = std::min(e.gap, std::abs(s(a, j) - limit));
      if (p ? s(a, j) < limit : s(a, j) > limit) (p ? kept_p : kept_n).push_back(j);
    }
    // (1/c) log(1 + sum e^{c' (..)}) with the largest exponent factored out.
    const auto side = [&](const std::vector<Index>& kept, double c, double sign) {
      if (kept.empty()) return 0.0;
      double top = 0.0;
      for (Index j : kept) top = std::max(top, sign * c * (s(a, j) - o.base));
      double sum = std::exp(-top);
      for (Index j : kept) sum += std::exp(sign * c * (s(a, j) - o.base) - top);
      for (Index j : kept) {
        const double dlds = sign * std::exp(sign * c * (s(a, j) - o.base) - top) / sum / n;
        e.gq.row(a) += dlds * r.row(j);
        e.gr.row(j) += dlds * q.row(a);
      }
      return (top + std::log(sum)) / c;
    };
    e.loss += (side(kept_p, o.alpha, -1.0) + side(kept_n, o.beta, 1.0)) / n;
  }
  return e;
}

}  // namespace ms_reference
}  // namespace mltest
