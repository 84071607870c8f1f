// MultiSimilarityLoss against a brute-force transcription of API.md's formula (similarities
// by loops in double, kept sets by the written rule, gradients by the chain rule through S),
// on both CPU paths, in the batch form and against reference sets.
#include "multi_similarity_reference.hpp"
#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace mltest;
using namespace mltest::ms_reference;
using Selves = Eigen::VectorXi;

template <class T>
Expected brute_force_batch(const Options& o, const Matrix<T>& x, const Labels& y) {
  Expected e = brute_force(o, x, y, x, y, Selves::LinSpaced(x.rows(), 0, int(x.rows() - 1)));
  e.gq += e.gr;
  return e;
}

double largest(const Matrix<double>& g) { return g.size() ? g.cwiseAbs().maxCoeff() : 0.0; }

template <class T>
void check_gradient(const Matrix<T>& got, const Matrix<double>& expected, double tol, double scale) {
  const double worst = (got.template cast<double>() - expected).cwiseAbs().maxCoeff();
  CAPTURE(worst, scale);
  CHECK(worst <= tol * std::max(scale, 1e-300));
}

/// The batch call against brute_force_batch: loss and gradient. Returns the loss.
template <class T, class Tag>
double check_batch(Tag tag, const Options& o, const Matrix<T>& x, const Labels& y) {
  auto loss = o.template loss<T>();
  const Expected e = brute_force_batch(o, x, y);
  Matrix<T> g(x.rows(), x.cols());
  const double l = loss.forward_backward(tag, x, y, g);
  CHECK(relatively_close(l, e.loss, Tolerance<T>::loss, 1e-12));
  check_gradient(g, e.gq, Tolerance<T>::gradient, largest(e.gq));
  return l;
}

Labels labels_from(const std::vector<std::int64_t>& v) {
  Labels y(static_cast<Index>(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) y(static_cast<Index>(i)) = v[i];
  return y;
}

template <class T>
Matrix<T> unit_rows(Matrix<T> m) {
  for (Index i = 0; i < m.rows(); ++i) m.row(i) /= m.row(i).norm();
  return m;
}

}  // namespace

TEMPLATE_TEST_CASE("MultiSimilarityLoss matches the brute-force formula", "[multi_similarity]",
                   ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  for (std::uint64_t seed : {21u, 22u}) {
    for (Index n : {Index(1), Index(2), Index(13), Index(40)}) {
      for (Index d : {Index(1), Index(5), Index(19)}) {
        for (bool unit : {true, false}) {
          CAPTURE(seed, n, d, unit);
          std::mt19937_64 rng(seed);
          Matrix<T> x = uniform_matrix<T>(n, d, rng, -0.4, 0.4);
          if (unit) x = unit_rows(x);
          const Labels y = labels_from(random_labels(n, 3, rng));
          for (const Options& o : every_option()) {
            CAPTURE(o.name());
            auto loss = o.template loss<T>();
            const Expected e = brute_force_batch(o, x, y);
            Strided<T> grad(Matrix<T>::Zero(n, d), 3, T(-7));
            const double top_diff = 0.75;
            const double l = loss.forward_backward(tag, x, y, grad.map(), T(top_diff));
            CHECK(relatively_close(l, e.loss, Tolerance<T>::loss, 1e-12));
            const Matrix<T> g = grad.map();
            check_gradient(g, top_diff * e.gq, Tolerance<T>::gradient, top_diff * largest(e.gq));
            CHECK(grad.padding_is(T(-7)));
            CHECK(loss.forward(tag, x, y) == static_cast<T>(l));
          }
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("MultiSimilarityLoss in the tie regime: kept sets on exact similarities",
                   "[multi_similarity][ties]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  for (std::uint64_t seed = 200; seed < 212; ++seed) {
    CAPTURE(seed);
    std::mt19937_64 rng(seed);
    const Index n = 24 + Index(seed % 5), d = 3;
    const Matrix<T> x = tied_matrix<T>(n, d, rng, -2, 2, seed % 2 ? 20.0 : 0.0);
    const Labels y = labels_from(tied_labels(n, 3, rng));
    // Integer similarities and integer epsilons: S_ip = max S_in + epsilon is common.
    for (double epsilon : {0.0, 1.0, 2.0, inf}) {
      const Options o{0.5, 0.25, 1.0, epsilon};
      CAPTURE(o.name());
      auto loss = o.template loss<T>();
      const Expected e = brute_force_batch(o, x, y);
      check_batch(tag, o, x, y);
      const Selves self = Selves::LinSpaced(n, 0, int(n - 1));
      Matrix<T> gq(n, d), gr(n, d);
      const double lr = loss.forward_backward(tag, x, y, ml::reference(x, y, self), gq, gr);
      CHECK(relatively_close(lr, e.loss, Tolerance<T>::loss, 1e-12));
      check_gradient(Matrix<T>(gq + gr), e.gq, Tolerance<T>::gradient, largest(e.gq));
    }
  }
}

TEMPLATE_TEST_CASE("MultiSimilarityLoss: a tie the product's rounding breaks is decided exactly",
                   "[multi_similarity][ties]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  // Anchor 0 is all ones; the positive p holds r and the negative k holds r reversed, so
  // <x_0, x_p> = <x_0, x_k> exactly (each a sum of the same 64 floats, exact in double),
  // while a float product adds them in two orders. With epsilon = 0 neither is kept; a kept
  // set decided on the rounded similarities keeps one of them. 16 zero rows of a third class
  // around them: full blocks of lanes and a tail.
  const Index n = 19, d = 64, p = 9, k = 13;
  Index broken = 0;  // seeds whose sequential float sums differ (the tie can break)
  for (std::uint64_t seed = 300; seed < 316; ++seed) {
    CAPTURE(seed);
    std::mt19937_64 rng(seed);
    // Float values for T = double too: their sums in double are exact in any order.
    const Matrix<T> r = uniform_matrix<float>(1, d, rng, 0.0, 0.03).template cast<T>();
    Matrix<T> x = Matrix<T>::Zero(n, d);
    x.row(0).setOnes();
    x.row(p) = r;
    x.row(k) = r.rowwise().reverse();
    float forward = 0.0f, backward = 0.0f;
    for (Index c = 0; c < d; ++c) {
      forward += static_cast<float>(r(0, c));
      backward += static_cast<float>(r(0, d - 1 - c));
    }
    if (forward != backward) ++broken;
    Labels y = Labels::Constant(n, 2);
    y(0) = 0;
    y(p) = 0;
    y(k) = 1;
    for (const Options& o : {Options{2, 50, 0.5, 0.0}, Options{1, 10, 1.0, 0.0}}) {
      CAPTURE(o.name());
      check_batch(tag, o, x, y);
    }
  }
  CHECK(broken > 0);
}

TEMPLATE_TEST_CASE("MultiSimilarityLoss degenerate batches and large exponents",
                   "[multi_similarity]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Index d = 4;
  std::mt19937_64 rng(77);
  SECTION("one class: nothing kept with a finite epsilon, the positive side with +inf") {
    const Matrix<T> x = unit_rows(uniform_matrix<T>(5, d, rng));
    const Labels y = Labels::Zero(5);
    Matrix<T> g = Matrix<T>::Constant(5, d, T(3));
    CHECK(ml::MultiSimilarityLoss<T>().forward_backward(tag, x, y, g) == T(0));
    CHECK(g.isZero(0));
    const Options all{2, 50, 0.5, inf};
    auto loss = all.template loss<T>();
    const Expected e = brute_force_batch(all, x, y);
    CHECK(e.loss > 0);
    CHECK(relatively_close(loss.forward_backward(tag, x, y, g), e.loss, Tolerance<T>::loss));
    check_gradient(g, e.gq, Tolerance<T>::gradient, largest(e.gq));
  }
  SECTION("classes of one, N = 1, duplicated rows") {
    const Matrix<T> x = unit_rows(uniform_matrix<T>(5, d, rng));
    Labels y(5);
    y << 0, 1, 2, 3, 4;
    Matrix<T> g(5, d);
    CHECK(ml::MultiSimilarityLoss<T>().forward_backward(tag, x, y, g) == T(0));
    CHECK(g.isZero(0));
    Matrix<T> one = x.topRows(1), g1(1, d);
    const Labels y1 = Labels::Zero(1);
    CHECK(ml::MultiSimilarityLoss<T>(2, 50, 0.5, T(INFINITY)).forward_backward(tag, one, y1, g1) == T(0));
    Matrix<T> dup(6, d);
    for (Index i = 0; i < 6; ++i) dup.row(i) = x.row(i / 2);
    Labels yd(6);
    yd << 0, 0, 1, 1, 0, 1;
    for (const Options& o : every_option()) {
      CAPTURE(o.name());
      auto loss = o.template loss<T>();
      Matrix<T> gd(6, d);
      const Expected e = brute_force_batch(o, dup, yd);
      CHECK(relatively_close(loss.forward_backward(tag, dup, yd, gd), e.loss, Tolerance<T>::loss, 1e-12));
      check_gradient(gd, e.gq, Tolerance<T>::gradient, largest(e.gq));
    }
  }
  SECTION("S near +-1 with alpha and beta large: finite and as the formula") {
    Matrix<T> x(6, d);
    const Eigen::Matrix<T, 1, Eigen::Dynamic> u = unit_rows(uniform_matrix<T>(1, d, rng));
    for (Index i = 0; i < 6; ++i) x.row(i) = (i % 3 == 2 ? T(-1) : T(1)) * u + T(1e-3) * uniform_matrix<T>(1, d, rng);
    x = unit_rows(x);
    Labels y(6);
    y << 0, 1, 0, 1, 0, 1;
    for (const Options& o : {Options{40, 50, 0.5, inf}, Options{2, 200, -0.5, inf}, Options{100, 100, 0.0, 0.1}}) {
      CAPTURE(o.name());
      auto loss = o.template loss<T>();
      Matrix<T> g(6, d);
      const Expected e = brute_force_batch(o, x, y);
      const double l = loss.forward_backward(tag, x, y, g);
      CHECK(std::isfinite(l));
      CHECK(g.allFinite());
      CHECK(relatively_close(l, e.loss, Tolerance<T>::loss, 1e-12));
      check_gradient(g, e.gq, Tolerance<T>::gradient, largest(e.gq));
    }
  }
  SECTION("a NaN entry gives NaN") {
    Matrix<T> x = Matrix<T>::Ones(3, d);
    x(2, 0) = std::numeric_limits<T>::quiet_NaN();
    Matrix<T> g(3, d);
    const Labels y = Labels::Zero(3);
    CHECK(std::isnan(ml::MultiSimilarityLoss<T>().forward_backward(tag, x, y, g)));
    CHECK(std::isnan(g(0, 0)));
  }
}

TEMPLATE_TEST_CASE("MultiSimilarityLoss gradients match finite differences",
                   "[multi_similarity][gradcheck]", ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const std::uint64_t seed = 1808;
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
    for (int attempt = 0; attempt < 200; ++attempt) {
      x = uniform_matrix<double>(n, d, rng, -0.5, 0.5);
      r = uniform_matrix<double>(nr, d, rng, -0.5, 0.5);
      r.row(0) = x.row(0);
      if (brute_force_batch(o, x, y).gap > 1e-3 && brute_force(o, x, y, r, yr, self).gap > 1e-3) break;
    }
    const double top_diff = 1.3;
    Matrix<double> g(n, d);
    loss.forward_backward(tag, x, y, g, top_diff);
    const auto f = [&](const Matrix<double>& z) { return loss.forward(tag, z, y); };
    CHECK(largest(g) > 0);
    CHECK(ml::testing::compare_gradients(g, top_diff * ml::testing::numerical_gradient(f, x)).relative() <=
          Tolerance<double>::finite_difference);
    Matrix<double> gq(n, d), gr(nr, d);
    loss.forward_backward(tag, x, y, ml::reference(r, yr, self), gq, gr, top_diff);
    const auto fq = [&](const Matrix<double>& z) { return loss.forward(tag, z, y, ml::reference(r, yr, self)); };
    const auto fr = [&](const Matrix<double>& z) { return loss.forward(tag, x, y, ml::reference(z, yr, self)); };
    CHECK(ml::testing::compare_gradients(gq, top_diff * ml::testing::numerical_gradient(fq, x)).relative() <=
          Tolerance<double>::finite_difference);
    CHECK(ml::testing::compare_gradients(gr, top_diff * ml::testing::numerical_gradient(fr, r)).relative() <=
          Tolerance<double>::finite_difference);
  }
}

TEMPLATE_TEST_CASE("MultiSimilarityLoss against reference sets", "[multi_similarity][reference]",
                   ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const std::uint64_t seed = 2025;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index nq = 17, d = 7;
  const Matrix<T> q = unit_rows(uniform_matrix<T>(nq, d, rng));
  const Labels yq = labels_from(random_labels(nq, 4, rng));
  const bool is_double = std::is_same<T, double>::value;
  for (const Options& o : every_option()) {
    CAPTURE(o.name());
    auto loss = o.template loss<T>();
    {
      INFO("R = Q with self = identity is the batch loss");
      Matrix<T> g(nq, d), gq(nq, d), gr(nq, d);
      const double batch = loss.forward_backward(tag, q, yq, g);
      const Selves self = Selves::LinSpaced(nq, 0, int(nq - 1));
      const double cross = loss.forward_backward(tag, q, yq, ml::reference(q, yq, self), gq, gr);
      CHECK(relatively_close(cross, batch, is_double ? 1e-12 : Tolerance<T>::loss));
      const Matrix<double> sum = (gq + gr).template cast<double>();
      check_gradient(g, sum, is_double ? 1e-12 : Tolerance<T>::gradient, largest(sum));
    }
    for (Index nr : {Index(5), Index(31)}) {
      CAPTURE(nr);
      const Matrix<T> r = unit_rows(uniform_matrix<T>(nr, d, rng));
      Labels yr = labels_from(random_labels(nr, 4, rng));
      yr(0) = 99;
      const Selves none = Selves::Constant(nq, -1);
      Matrix<T> gq(nq, d), gr(nr, d);
      const double l = loss.forward_backward(tag, q, yq, ml::reference(r, yr), gq, gr);
      const Expected e = brute_force(o, q, yq, r, yr, none);
      CHECK(relatively_close(l, e.loss, Tolerance<T>::loss, 1e-12));
      const double scale = std::max(largest(e.gq), largest(e.gr));
      check_gradient(gq, e.gq, Tolerance<T>::gradient, scale);
      check_gradient(gr, e.gr, Tolerance<T>::gradient, scale);
      Matrix<T> rp(nr, d), gqp(nq, d), grp(nr, d);
      Labels yrp(nr);
      for (Index j = 0; j < nr; ++j) {
        rp.row(j) = r.row(nr - 1 - j);
        yrp(j) = yr(nr - 1 - j);
      }
      const double lp = loss.forward_backward(tag, q, yq, ml::reference(rp, yrp), gqp, grp);
      CHECK(relatively_close(lp, l, is_double ? 1e-12 : Tolerance<T>::loss));
      check_gradient(gqp, gq.template cast<double>(), is_double ? 1e-12 : Tolerance<T>::gradient, scale);
      check_gradient(grp, gr.colwise().reverse().template cast<double>(), is_double ? 1e-12 : Tolerance<T>::gradient, scale);
      Matrix<T> only(nq, d);
      loss.forward_backward(tag, q, yq, ml::reference(r, yr), only, ml::skip);
      CHECK(only == gq);
    }
  }
}

TEMPLATE_TEST_CASE("MultiSimilarityLoss: scalar and simd agree", "[multi_similarity][parity]", float,
                   double) {
  using T = TestType;
  std::mt19937_64 rng(4242);
  const Index n = 70, d = 33;
  const Matrix<T> x = unit_rows(uniform_matrix<T>(n, d, rng));
  const Labels y = labels_from(random_labels(n, 5, rng));
  for (const Options& o : every_option()) {
    CAPTURE(o.name());
    auto loss = o.template loss<T>();
    Matrix<T> gs(n, d), gv(n, d);
    const double ls = loss.forward_backward(ml::scalar, x, y, gs);
    const double lv = loss.forward_backward(ml::simd, x, y, gv);
    CHECK(relatively_close(lv, ls, Tolerance<T>::loss));
    check_gradient(gv, gs.template cast<double>(), Tolerance<T>::gradient, largest(gs.template cast<double>()));
  }
}

TEST_CASE("MultiSimilarityLoss rejects bad options and leaves outputs unwritten",
          "[multi_similarity][errors]") {
  using T = float;
  Matrix<T> x = Matrix<T>::Ones(4, 3), g = Matrix<T>::Constant(4, 3, 5.0f);
  const Matrix<T> before = g;
  const Labels y = Labels::Zero(4);
  ml::MultiSimilarityLoss<T> loss(0.0f);
  expect_invalid([&] { loss.forward_backward(ml::simd, x, y, g); },
                 {"MultiSimilarityLoss<float>::forward_backward", "'alpha' is 0", "> 0"}, g, before);
  loss.alpha = 2;
  loss.beta = std::numeric_limits<T>::quiet_NaN();
  expect_invalid([&] { loss.forward_backward(ml::scalar, x, y, g); }, {"'beta' is nan"}, g, before);
  loss.beta = 50;
  loss.base = std::numeric_limits<T>::infinity();
  expect_invalid([&] { loss.forward_backward(ml::scalar, x, y, g); }, {"'base' is inf"}, g, before);
  loss.base = 0.5f;
  loss.epsilon = -std::numeric_limits<T>::infinity();
  expect_invalid([&] { loss.forward_backward(ml::simd, x, y, g); }, {"'epsilon' is -inf", "+infinity"}, g, before);
  loss.epsilon = std::numeric_limits<T>::infinity();
  CHECK(loss.forward_backward(ml::simd, x, y, g) > 0);  // +inf: every pair
}
