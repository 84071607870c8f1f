// BatchContrastiveLoss against a brute-force transcription of API.md's formula (ordered pairs,
// distances by differences in double, gradients by the chain rule through d), on both CPU
// paths, in the batch form and against reference sets.
#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace mltest;
using Labels = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>;
using Selves = Eigen::VectorXi;

struct Options {
  double pos = 0.0, neg = 1.0;
  ml::Distance distance = ml::Distance::euclidean;
  ml::Reduction reduction = ml::Reduction::nonzero_mean;
  std::string name() const {
    return "pos " + std::to_string(pos) + " neg " + std::to_string(neg) +
           (distance == ml::Distance::euclidean ? " euclidean" : " squared") +
           (reduction == ml::Reduction::mean ? " mean" : " nonzero mean");
  }
  template <class T>
  ml::BatchContrastiveLoss<T> loss() const {
    ml::BatchContrastiveLoss<T> f(static_cast<T>(pos), static_cast<T>(neg), distance);
    f.reduction = reduction;
    return f;
  }
};

std::vector<Options> every_option() {
  std::vector<Options> out;
  for (auto distance : {ml::Distance::euclidean, ml::Distance::squared_euclidean})
    for (auto reduction : {ml::Reduction::nonzero_mean, ml::Reduction::mean})
      for (auto margins : {std::make_pair(0.0, 1.0), std::make_pair(0.3, 0.9)})
        out.push_back({margins.first, margins.second, distance, reduction});
  return out;
}

struct Expected {
  double loss = 0.0;
  Matrix<double> gq, gr;
  double gap = std::numeric_limits<double>::infinity();  // nearest hinge or zero distance
  double active = 0.0;  // ordered pairs with an active hinge
};

/// Whether the simd path applies this batch's weights one by one (DirectWeights) rather
/// than through the dense product: its active unordered pairs against N^2.
bool weights_direct(const Expected& e, Index n) {
  return e.active / 2 * ml::detail::tuning::direct_weights_per_pair <= double(n) * double(n);
}

/// API.md's formula over the ordered pairs (a in Q, j in R, j != self(a)), in double.
template <class T>
Expected brute_force(const Options& o, const Matrix<T>& qt, const Labels& yq, const Matrix<T>& rt,
                     const Labels& yr, const Selves& self) {
  const Matrix<double> q = qt.template cast<double>(), r = rt.template cast<double>();
  const bool euclid = o.distance == ml::Distance::euclidean;
  struct Pair {
    Index a, j;
    bool positive;
    double h, d;
  };
  std::vector<Pair> pairs;
  double pos_sum = 0, neg_sum = 0, pos_active = 0, neg_active = 0, pos_all = 0, neg_all = 0;
  Expected e;
  for (Index a = 0; a < q.rows(); ++a)
    for (Index j = 0; j < r.rows(); ++j) {
      if (self(a) == j) continue;
      const double d2 = (q.row(a) - r.row(j)).squaredNorm();
      const double d = euclid ? std::sqrt(d2) : d2;
      const bool positive = yq(a) == yr(j);
      const double h = positive ? d - o.pos : o.neg - d;
      e.gap = std::min(e.gap, std::abs(h));
      if (euclid) e.gap = std::min(e.gap, d);
      (positive ? pos_all : neg_all) += 1;
      if (h > 0) {
        e.active += 1;
        (positive ? pos_sum : neg_sum) += h;
        (positive ? pos_active : neg_active) += 1;
      }
      pairs.push_back({a, j, positive, h, d});
    }
  const bool nz = o.reduction == ml::Reduction::nonzero_mean;
  const double cp = nz ? pos_active : pos_all, cn = nz ? neg_active : neg_all;
  e.loss = (cp > 0 ? pos_sum / cp : 0) + (cn > 0 ? neg_sum / cn : 0);
  e.gq = Matrix<double>::Zero(q.rows(), q.cols());
  e.gr = Matrix<double>::Zero(r.rows(), r.cols());
  for (const Pair& p : pairs) {
    if (!(p.h > 0) || p.d == 0) continue;
    // dh/dd = +1 (positive) or -1 (negative); dd/dq_a = (q_a - r_j)/d or 2 (q_a - r_j).
    const double c = (p.positive ? 1.0 / cp : -1.0 / cn) * (euclid ? 1.0 / p.d : 2.0);
    const Eigen::RowVectorXd diff = q.row(p.a) - r.row(p.j);
    e.gq.row(p.a) += c * diff;
    e.gr.row(p.j) -= c * diff;
  }
  return e;
}

template <class T>
Expected brute_force_batch(const Options& o, const Matrix<T>& x, const Labels& y) {
  Expected e = brute_force(o, x, y, x, y, Selves::LinSpaced(x.rows(), 0, int(x.rows() - 1)));
  e.gq += e.gr;  // x in both roles
  return e;
}

double largest(const Matrix<double>& g) { return g.size() ? g.cwiseAbs().maxCoeff() : 0.0; }

template <class T>
void check_gradient(const Matrix<T>& got, const Matrix<double>& expected, double tol, double scale) {
  const double worst = (got.template cast<double>() - expected).cwiseAbs().maxCoeff();
  CAPTURE(worst, scale);
  CHECK(worst <= tol * std::max(scale, 1e-300));
}

Labels labels_from(const std::vector<std::int64_t>& v) {
  Labels y(static_cast<Index>(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) y(static_cast<Index>(i)) = v[i];
  return y;
}

}  // namespace

TEMPLATE_TEST_CASE("BatchContrastiveLoss matches the brute-force formula", "[batch_contrastive]",
                   ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  // Both weight sinks of the simd path: 3 classes activate many pairs (dense product),
  // n / 2 + 1 classes on spread-out rows few (weights one by one).
  int sides[2] = {0, 0};
  for (std::uint64_t seed : {11u, 12u, 13u}) {
    for (Index n : {Index(1), Index(2), Index(13), Index(40)}) {
      for (Index d : {Index(1), Index(5), Index(19)}) {
        for (double offset : {0.0, 100.0}) {
          for (Index classes : {Index(3), n / 2 + 1}) {
          CAPTURE(seed, n, d, offset, classes);
          std::mt19937_64 rng(seed);
          const double spread = offset == 0.0 ? 1.0 : 0.05;
          const Matrix<T> x = uniform_matrix<T>(n, d, rng, offset - spread, offset + spread);
          const Labels y = labels_from(random_labels(n, static_cast<int>(classes), rng));
          for (const Options& o : every_option()) {
            Options scaled = o;
            if (offset != 0.0) {  // margins on the scale of the data
              scaled.pos *= 0.05;
              scaled.neg *= 0.08;
            }
            CAPTURE(scaled.name());
            auto loss = scaled.template loss<T>();
            const Expected e = brute_force_batch(scaled, x, y);
            Strided<T> grad(Matrix<T>::Zero(n, d), 3, T(-7));
            const double top_diff = 0.75;
            const double l = loss.forward_backward(tag, x, y, grad.map(), T(top_diff));
            CHECK(relatively_close(l, e.loss, Tolerance<T>::loss, 1e-12));
            Matrix<T> g = grad.map();
            check_gradient(g, top_diff * e.gq, Tolerance<T>::gradient, top_diff * largest(e.gq));
            CHECK(grad.padding_is(T(-7)));
            CHECK(loss.forward(tag, x, y) == static_cast<T>(l));
            ++sides[weights_direct(e, n)];
          }
          }
        }
      }
    }
  }
  CAPTURE(sides[0], sides[1]);
  CHECK(sides[0] > 100);
  CHECK(sides[1] > 100);
}

TEMPLATE_TEST_CASE("BatchContrastiveLoss in the tie regime: hinges at exactly 0 are inactive",
                   "[batch_contrastive][ties]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  for (std::uint64_t seed = 100; seed < 112; ++seed) {
    CAPTURE(seed);
    std::mt19937_64 rng(seed);
    const Index n = 24 + Index(seed % 5), d = 3;
    const Matrix<T> x = tied_matrix<T>(n, d, rng, -2, 2, seed % 2 ? 1000.0 : 0.0);
    // 3 classes, or 12 (fewer active pairs: at the larger margins the weights go one by one).
    const Labels y = labels_from(tied_labels(n, seed % 3 ? 3 : 12, rng));
    // Integer margins: on the integer grid distances 1, 2 and squared distances 1..8 are
    // common, so many hinges sit at exactly 0.
    for (auto distance : {ml::Distance::euclidean, ml::Distance::squared_euclidean})
      for (auto reduction : {ml::Reduction::nonzero_mean, ml::Reduction::mean})
        for (auto margins : {std::make_pair(1.0, 2.0), std::make_pair(0.0, 1.0), std::make_pair(2.0, 4.0)}) {
          const Options o{margins.first, margins.second, distance, reduction};
          CAPTURE(o.name());
          auto loss = o.template loss<T>();
          const Expected e = brute_force_batch(o, x, y);
          Matrix<T> g(n, d);
          const double l = loss.forward_backward(tag, x, y, g);
          CHECK(relatively_close(l, e.loss, Tolerance<T>::loss, 1e-12));
          check_gradient(g, e.gq, Tolerance<T>::gradient, largest(e.gq));
          // The reference form on the same data (self = identity) agrees.
          const Selves self = Selves::LinSpaced(n, 0, int(n - 1));
          Matrix<T> gq(n, d), gr(n, d);
          const double lr = loss.forward_backward(tag, x, y, ml::reference(x, y, self), gq, gr);
          CHECK(relatively_close(lr, e.loss, Tolerance<T>::loss, 1e-12));
          check_gradient(Matrix<T>(gq + gr), e.gq, Tolerance<T>::gradient, largest(e.gq));
        }
  }
}

TEMPLATE_TEST_CASE("BatchContrastiveLoss degenerate batches", "[batch_contrastive]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  ml::BatchContrastiveLoss<T> loss;
  const Index d = 3;
  SECTION("one class: only the positive side") {
    Matrix<T> x(3, d);
    x << 0, 0, 0, 3, 4, 0, 0, 0, 1;
    const Labels y = Labels::Zero(3);
    Matrix<T> g(3, d);
    // Ordered positive distances 5, 1, sqrt(26) (each twice), all > 0.
    const double expected = (5.0 + 1.0 + std::sqrt(26.0)) / 3.0;
    CHECK(relatively_close(loss.forward_backward(tag, x, y, g), expected, Tolerance<T>::loss));
  }
  SECTION("classes of one: only the negative side; coincident rows have a zero subgradient") {
    Matrix<T> x(3, d);
    x << 0, 0, 0, 0, 0, 0, 0.5, 0, 0;
    Labels y(3);
    y << 1, 2, 3;
    Matrix<T> g(3, d);
    // Negative terms: 1 - 0 (rows 0, 1), 1 - 0.5 twice: mean over nonzero (all 3 unordered).
    const double l = loss.forward_backward(tag, x, y, g);
    CHECK(relatively_close(l, (1.0 + 0.5 + 0.5) / 3.0, Tolerance<T>::loss));
    // Row 2 is pushed away from rows 0 and 1; rows 0 and 1 feel only row 2.
    const Expected e = brute_force_batch(Options{}, x, y);
    check_gradient(g, e.gq, Tolerance<T>::gradient, largest(e.gq));
    CHECK(std::isfinite(g(0, 0)));
  }
  SECTION("N = 1 and all rows coincident") {
    Matrix<T> x = Matrix<T>::Constant(1, d, T(2));
    Labels y = Labels::Zero(1);
    Matrix<T> g = Matrix<T>::Constant(1, d, T(9));
    CHECK(loss.forward_backward(tag, x, y, g) == T(0));
    CHECK(g.isZero(0));
    Matrix<T> same = Matrix<T>::Constant(4, d, T(2));
    Labels two(4);
    two << 0, 1, 0, 1;
    Matrix<T> g4(4, d);
    CHECK(loss.forward_backward(tag, same, two, g4) == T(1));  // every negative at d = 0
    CHECK(g4.isZero(0));
  }
  SECTION("a NaN entry gives NaN") {
    Matrix<T> x = Matrix<T>::Ones(3, d);
    x(1, 1) = std::numeric_limits<T>::quiet_NaN();
    Matrix<T> g(3, d);
    const Labels zero = Labels::Zero(3);
    CHECK(std::isnan(loss.forward_backward(tag, x, zero, g)));
    CHECK(std::isnan(g(0, 0)));
  }
}

TEMPLATE_TEST_CASE("BatchContrastiveLoss gradients match finite differences",
                   "[batch_contrastive][gradcheck]", ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const std::uint64_t seed = 1707;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index n = 9, nr = 12, d = 4;
  const Labels y = labels_from({0, 1, 2, 0, 1, 0, 2, 1, 0});
  const Labels yr = labels_from({0, 1, 2, 0, 1, 2, 0, 1, 4, 0, 2, 0});
  Selves self = Selves::Constant(n, -1);
  self(0) = 0;
  for (const Options& o : every_option()) {
    CAPTURE(o.name());
    auto loss = o.template loss<double>();
    Matrix<double> x, r;
    for (int attempt = 0; attempt < 50; ++attempt) {
      x = uniform_matrix<double>(n, d, rng, -0.6, 0.6);
      r = uniform_matrix<double>(nr, d, rng, -0.6, 0.6);
      r.row(0) = x.row(0);
      if (brute_force_batch(o, x, y).gap > 1e-3 && brute_force(o, x, y, r, yr, self).gap > 1e-3)
        break;
    }
    const double top_diff = 1.3;
    Matrix<double> g(n, d);
    loss.forward_backward(tag, x, y, g, top_diff);
    const auto f = [&](const Matrix<double>& z) { return loss.forward(tag, z, y); };
    const Matrix<double> numeric = top_diff * ml::testing::numerical_gradient(f, x);
    CHECK(largest(g) > 0);
    CHECK(ml::testing::compare_gradients(g, numeric).relative() <= Tolerance<double>::finite_difference);
    Matrix<double> gq(n, d), gr(nr, d);
    loss.forward_backward(tag, x, y, ml::reference(r, yr, self), gq, gr, top_diff);
    const auto fq = [&](const Matrix<double>& z) { return loss.forward(tag, z, y, ml::reference(r, yr, self)); };
    const auto fr = [&](const Matrix<double>& z) { return loss.forward(tag, x, y, ml::reference(z, yr, self)); };
    CHECK(ml::testing::compare_gradients(gq, top_diff * ml::testing::numerical_gradient(fq, x)).relative() <=
          Tolerance<double>::finite_difference);
    CHECK(ml::testing::compare_gradients(gr, top_diff * ml::testing::numerical_gradient(fr, r)).relative() <=
          Tolerance<double>::finite_difference);
  }
  // Few active pairs (classes of two, spread-out rows): the simd path's weights go one by one.
  const Index m = 24;
  const Labels pairs = labels_from({0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11});
  for (const Options& o : every_option()) {
    CAPTURE(o.name());
    auto loss = o.template loss<double>();
    Matrix<double> x;
    for (int attempt = 0; attempt < 50; ++attempt) {
      x = uniform_matrix<double>(m, d, rng, -4.0, 4.0);
      if (brute_force_batch(o, x, pairs).gap > 1e-3) break;
    }
    CHECK(weights_direct(brute_force_batch(o, x, pairs), m));
    Matrix<double> g(m, d);
    loss.forward_backward(tag, x, pairs, g, 1.3);
    const auto f = [&](const Matrix<double>& z) { return loss.forward(tag, z, pairs); };
    CHECK(largest(g) > 0);
    CHECK(ml::testing::compare_gradients(g, 1.3 * ml::testing::numerical_gradient(f, x)).relative() <=
          Tolerance<double>::finite_difference);
  }
}

TEMPLATE_TEST_CASE("BatchContrastiveLoss against reference sets", "[batch_contrastive][reference]",
                   ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const std::uint64_t seed = 2024;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index nq = 17, d = 7;
  const Matrix<T> q = uniform_matrix<T>(nq, d, rng);
  const Labels yq = labels_from(random_labels(nq, 4, rng));
  for (const Options& o : every_option()) {
    CAPTURE(o.name());
    auto loss = o.template loss<T>();
    SECTION("R = Q with self = identity is the batch loss") {
      Matrix<T> g(nq, d), gq(nq, d), gr(nq, d);
      const double batch = loss.forward_backward(tag, q, yq, g);
      const Selves self = Selves::LinSpaced(nq, 0, int(nq - 1));
      const double cross = loss.forward_backward(tag, q, yq, ml::reference(q, yq, self), gq, gr);
      const double tol = std::is_same<T, double>::value ? 1e-12 : Tolerance<T>::loss;
      CHECK(relatively_close(cross, batch, tol));
      const Matrix<double> sum = (gq + gr).template cast<double>();
      check_gradient(g, sum, std::is_same<T, double>::value ? 1e-12 : Tolerance<T>::gradient, largest(sum));
    }
    for (Index nr : {Index(5), Index(31)}) {
      CAPTURE(nr);
      const Matrix<T> r = uniform_matrix<T>(nr, d, rng);
      Labels yr = labels_from(random_labels(nr, 4, rng));
      yr(0) = 99;  // a class no query has
      const Selves none = Selves::Constant(nq, -1);
      Matrix<T> gq(nq, d), gr(nr, d);
      const double l = loss.forward_backward(tag, q, yq, ml::reference(r, yr), gq, gr);
      const Expected e = brute_force(o, q, yq, r, yr, none);
      CHECK(relatively_close(l, e.loss, Tolerance<T>::loss, 1e-12));
      const double scale = std::max(largest(e.gq), largest(e.gr));
      check_gradient(gq, e.gq, Tolerance<T>::gradient, scale);
      check_gradient(gr, e.gr, Tolerance<T>::gradient, scale);
      // Permuting R leaves L and grad_q unchanged and permutes grad_r.
      std::vector<Index> order(static_cast<std::size_t>(nr));
      for (Index j = 0; j < nr; ++j) order[static_cast<std::size_t>(j)] = nr - 1 - j;
      Matrix<T> rp(nr, d), gqp(nq, d), grp(nr, d);
      Labels yrp(nr);
      for (Index j = 0; j < nr; ++j) {
        rp.row(j) = r.row(order[static_cast<std::size_t>(j)]);
        yrp(j) = yr(order[static_cast<std::size_t>(j)]);
      }
      const double lp = loss.forward_backward(tag, q, yq, ml::reference(rp, yrp), gqp, grp);
      CHECK(relatively_close(lp, l, std::is_same<T, double>::value ? 1e-12 : Tolerance<T>::loss));
      check_gradient(gqp, gq.template cast<double>(), std::is_same<T, double>::value ? 1e-12 : Tolerance<T>::gradient, scale);
      for (Index j = 0; j < nr; ++j)
        check_gradient(Matrix<T>(grp.row(j)), gr.row(order[static_cast<std::size_t>(j)]).template cast<double>(),
                       std::is_same<T, double>::value ? 1e-12 : Tolerance<T>::gradient, scale);
      // grad_r skipped: grad_q is unchanged.
      Matrix<T> only(nq, d);
      loss.forward_backward(tag, q, yq, ml::reference(r, yr), only, ml::skip);
      CHECK(only == gq);
    }
  }
}

TEMPLATE_TEST_CASE("BatchContrastiveLoss: scalar and simd agree", "[batch_contrastive][parity]",
                   float, double) {
  using T = TestType;
  std::mt19937_64 rng(31337);
  const Index n = 70, d = 33;
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  for (Index classes : {Index(5), Index(35)}) {  // many active pairs, and few
  CAPTURE(classes);
  const Labels y = labels_from(random_labels(n, static_cast<int>(classes), rng));
  for (const Options& o : every_option()) {
    CAPTURE(o.name());
    auto loss = o.template loss<T>();
    Matrix<T> gs(n, d), gv(n, d);
    const double ls = loss.forward_backward(ml::scalar, x, y, gs);
    const double lv = loss.forward_backward(ml::simd, x, y, gv);
    CHECK(relatively_close(lv, ls, Tolerance<T>::loss));
    check_gradient(gv, gs.template cast<double>(), Tolerance<T>::gradient,
                   largest(gs.template cast<double>()));
  }
  }
}

TEST_CASE("BatchContrastiveLoss rejects bad options and leaves outputs unwritten",
          "[batch_contrastive][errors]") {
  using T = double;
  Matrix<T> x = Matrix<T>::Ones(4, 3), g = Matrix<T>::Constant(4, 3, 5.0);
  const Matrix<T> before = g;
  Labels y = Labels::Zero(4);
  ml::BatchContrastiveLoss<T> loss(0.0, std::numeric_limits<T>::infinity());
  expect_invalid([&] { loss.forward_backward(ml::simd, x, y, g); },
                 {"BatchContrastiveLoss<double>::forward_backward", "neg_margin", "inf"}, g, before);
  loss.neg_margin = 1;
  loss.pos_margin = std::numeric_limits<T>::quiet_NaN();
  expect_invalid([&] { loss.forward_backward(ml::scalar, x, y, g); }, {"pos_margin", "nan"}, g, before);
  loss.pos_margin = 0;
  loss.reduction = static_cast<ml::Reduction>(9);
  expect_invalid([&] { loss.forward_backward(ml::scalar, x, y, g); }, {"reduction", "9"}, g, before);
  loss.reduction = ml::Reduction::mean;
  Matrix<T> r = Matrix<T>::Ones(5, 2);
  const Labels yr = Labels::Zero(5);
  expect_invalid([&] { loss.forward_backward(ml::simd, x, y, ml::reference(r, yr), g, ml::skip); },
                 {"'r' has shape 5x2", "3 columns"}, g, before);
}
