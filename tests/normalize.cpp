// normalize = true on the batch losses (issue 17; API.md "Next"): BatchTripletLoss (every
// mining, distance and soft margin), LiftedStructureLoss, BatchContrastiveLoss and
// MultiSimilarityLoss (normalize_cases.hpp), batch and reference-set forms,
// scalar and simd, float and double. The call equals normalize = false on rows normalised
// by hand with the gradient chained by hand; finite differences on the raw rows; scale
// invariance; the reduction of R = Q, self = identity to the batch form; D = 1; strided
// inputs and gradients; a zero row is an invalid_argument with nothing written; a
// non-finite row gives NaN as without normalize.
#include "batch_triplet_reference.hpp"  // Labels, labels_of
#include "normalize_cases.hpp"
#include "support.hpp"

#include <metricloss/testing/gradcheck.hpp>

#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

using namespace mltest;
using namespace mltest::normalize_cases;
using ml::Distance;
using ml::Mining;

namespace {

/// The agreement of two computations of the same thing on the same unit rows: in double
/// rounding only; in float one rounding of the gradient and of the loss.
template <class T>
double same_rows_tolerance() {
  return std::is_same<T, double>::value ? same_formula_tolerance : 1e-5;
}

/// max |a - b| relative to max |b| (a floor keeps an all-zero b from demanding equality).
template <class A, class B>
double gradient_error(const A& a, const B& b) {
  const Matrix<double> ad = a.template cast<double>(), bd = b.template cast<double>();
  const double scale = std::max(bd.cwiseAbs().maxCoeff(), 1e-30);
  return (ad - bd).cwiseAbs().maxCoeff() / scale;
}

bool all_nan(const Matrix<double>& m) { return m.array().isNaN().all(); }

}  // namespace

TEMPLATE_TEST_CASE("normalize equals the loss of rows normalised by hand, gradient chained by hand",
                   "[normalize]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const std::uint64_t seed = 1701;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index n = 14, nr = 11, d = 6;
  const Matrix<T> x = uniform_matrix<T>(n, d, rng, -3.0, 3.0);
  const Matrix<T> r = uniform_matrix<T>(nr, d, rng, -0.5, 0.5);
  const Labels y = labels_of(random_labels(n, 4, rng));
  const Labels yr = labels_of(random_labels(nr, 4, rng));
  const Matrix<T> ux = unit_rows(x), ur = unit_rows(r);
  const double tol = same_rows_tolerance<T>();
  for (const Option& o : every_option()) {
    CAPTURE(o.name());
    // Batch form.
    Matrix<T> g(n, d), gu(n, d);
    const T value = with_loss<T>(o, true, [&](auto& loss) { return loss.forward_backward(tag, x, y, g); });
    const T by_hand = with_loss<T>(o, false, [&](auto& loss) { return loss.forward_backward(tag, ux, y, gu); });
    CAPTURE(value, by_hand);
    CHECK(relatively_close(value, by_hand, tol, 1e-30));
    CHECK(with_loss<T>(o, true, [&](auto& loss) { return loss.forward(tag, x, y); }) == value);
    const Matrix<double> expected = chained(x, gu);
    CHECK(expected.cwiseAbs().maxCoeff() > 0);
    CHECK(gradient_error(g, expected) <= tol);
    // Reference form: Q and R normalised alike.
    Matrix<T> gq(n, d), gr(nr, d), guq(n, d), gur(nr, d);
    const T cross = with_loss<T>(o, true, [&](auto& loss) {
      return loss.forward_backward(tag, x, y, ml::reference(r, yr), gq, gr);
    });
    const T cross_by_hand = with_loss<T>(o, false, [&](auto& loss) {
      return loss.forward_backward(tag, ux, y, ml::reference(ur, yr), guq, gur);
    });
    CAPTURE(cross, cross_by_hand);
    CHECK(relatively_close(cross, cross_by_hand, tol, 1e-30));
    const Matrix<double> expected_q = chained(x, guq), expected_r = chained(r, gur);
    const double scale = std::max(expected_q.cwiseAbs().maxCoeff(), expected_r.cwiseAbs().maxCoeff());
    CHECK(scale > 0);
    CHECK((gq.template cast<double>() - expected_q).cwiseAbs().maxCoeff() <= tol * scale);
    CHECK((gr.template cast<double>() - expected_r).cwiseAbs().maxCoeff() <= tol * scale);
  }
}

TEMPLATE_TEST_CASE("normalize's gradients match finite differences on the raw rows",
                   "[normalize][gradcheck]", ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const std::uint64_t seed = 1702;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index n = 10, nr = 9, d = 5;
  const Matrix<double> x = uniform_matrix<double>(n, d, rng, -2.0, 2.0);
  const Matrix<double> r = uniform_matrix<double>(nr, d, rng, -2.0, 2.0);
  const Labels y = labels_of({0, 1, 2, 0, 1, 2, 0, 1, 0, 2});
  const Labels yr = labels_of({2, 0, 1, 1, 0, 2, 0, 1, 2});
  const double top_diff = 1.3;
  const double tol = Tolerance<double>::finite_difference;
  for (const Option& o : every_option()) {
    CAPTURE(o.name());
    with_loss<double>(o, true, [&](auto& loss) {
      Matrix<double> g(n, d);
      loss.forward_backward(tag, x, y, g, top_diff);
      const auto f = [&](const Matrix<double>& z) { return loss.forward(tag, z, y); };
      const Matrix<double> numerical = top_diff * ml::testing::numerical_gradient(f, x);
      CHECK(g.cwiseAbs().maxCoeff() > 0);
      CHECK(ml::testing::compare_gradients(g, numerical).relative() <= tol);

      Matrix<double> gq(n, d), gr(nr, d);
      loss.forward_backward(tag, x, y, ml::reference(r, yr), gq, gr, top_diff);
      const auto fq = [&](const Matrix<double>& z) { return loss.forward(tag, z, y, ml::reference(r, yr)); };
      const auto fr = [&](const Matrix<double>& z) { return loss.forward(tag, x, y, ml::reference(z, yr)); };
      const Matrix<double> numerical_q = top_diff * ml::testing::numerical_gradient(fq, x);
      const Matrix<double> numerical_r = top_diff * ml::testing::numerical_gradient(fr, r);
      const double scale = std::max(numerical_q.cwiseAbs().maxCoeff(), numerical_r.cwiseAbs().maxCoeff());
      CHECK(scale > 0);
      CHECK((gq - numerical_q).cwiseAbs().maxCoeff() <= tol * scale);
      CHECK((gr - numerical_r).cwiseAbs().maxCoeff() <= tol * scale);
      return 0;
    });
  }
}

TEMPLATE_TEST_CASE("normalize makes the loss scale-invariant", "[normalize]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const std::uint64_t seed = 1703;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index n = 12, d = 7;
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  const Matrix<T> scaled = (x * T(3.7)).eval();
  const Labels y = labels_of(random_labels(n, 3, rng));
  for (const Option& o : every_option()) {
    CAPTURE(o.name());
    Matrix<T> g(n, d), gs(n, d);
    const T value = with_loss<T>(o, true, [&](auto& loss) { return loss.forward_backward(tag, x, y, g); });
    const T value_scaled = with_loss<T>(o, true, [&](auto& loss) { return loss.forward_backward(tag, scaled, y, gs); });
    CAPTURE(value, value_scaled);
    CHECK(relatively_close(value, value_scaled, Tolerance<T>::loss, 1e-30));
    // d/d(3.7 x) = (d/dx) / 3.7.
    const Matrix<double> unscaled = gs.template cast<double>() * 3.7;
    CHECK(g.cwiseAbs().maxCoeff() > 0);
    CHECK(gradient_error(unscaled, g) <= Tolerance<T>::gradient);
  }
}

TEMPLATE_TEST_CASE("normalize: a reference set R = Q with self = identity is the batch form",
                   "[normalize][reference]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const std::uint64_t seed = 1704;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index n = 17, d = 9;
  const Matrix<T> x = uniform_matrix<T>(n, d, rng, -4.0, 4.0);
  const Labels y = labels_of(random_labels(n, 4, rng));
  Eigen::VectorXi self(n);
  std::iota(self.data(), self.data() + n, 0);
  const double tol = std::is_same<T, double>::value ? same_formula_tolerance : Tolerance<T>::gradient;
  for (const Option& o : every_option()) {
    CAPTURE(o.name());
    Matrix<T> g(n, d), gq(n, d), gr(n, d);
    const T batch = with_loss<T>(o, true, [&](auto& loss) { return loss.forward_backward(tag, x, y, g); });
    const T cross = with_loss<T>(o, true, [&](auto& loss) {
      return loss.forward_backward(tag, x, y, ml::reference(x, y, self), gq, gr);
    });
    CAPTURE(batch, cross);
    CHECK(relatively_close(cross, batch, std::is_same<T, double>::value ? same_formula_tolerance : Tolerance<T>::loss, 1e-30));
    const Matrix<double> sum = gq.template cast<double>() + gr.template cast<double>();
    CHECK(gradient_error(sum, g) <= tol);
  }
}

TEMPLATE_TEST_CASE("normalize at D = 1: rows of +-1, a zero gradient", "[normalize]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Index n = 8;
  Matrix<T> x(n, 1);
  x << T(0.5), T(-2), T(1.25), T(3), T(-0.75), T(-1), T(2.5), T(-4);
  const Matrix<T> signs = x.array().sign().matrix();
  const Labels y = labels_of({0, 0, 1, 1, 0, 1, 2, 2});
  for (const Option& o : every_option()) {
    CAPTURE(o.name());
    Matrix<T> g = Matrix<T>::Constant(n, 1, T(7)), gu(n, 1);
    const T value = with_loss<T>(o, true, [&](auto& loss) { return loss.forward_backward(tag, x, y, g); });
    const T on_signs = with_loss<T>(o, false, [&](auto& loss) { return loss.forward_backward(tag, signs, y, gu); });
    CHECK(value == on_signs);
    // u = +-1 exactly: (g - u (u g)) = 0, whatever dL/du is.
    CHECK((g.array() == T(0)).all());
    Matrix<T> gq = Matrix<T>::Constant(n, 1, T(7)), gr = Matrix<T>::Constant(n, 1, T(7));
    with_loss<T>(o, true, [&](auto& loss) {
      return loss.forward_backward(tag, x, y, ml::reference(x, y), gq, gr);
    });
    CHECK((gq.array() == T(0)).all());
    CHECK((gr.array() == T(0)).all());
  }
}

TEMPLATE_TEST_CASE("normalize reads strided rows and writes strided gradients", "[normalize]",
                   ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const std::uint64_t seed = 1705;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index n = 11, nr = 6, d = 5;
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  const Matrix<T> r = uniform_matrix<T>(nr, d, rng);
  const Labels y = labels_of(random_labels(n, 3, rng));
  const Labels yr = labels_of(random_labels(nr, 3, rng));
  const T sentinel = T(-123.5);
  const T top_diff = T(-0.5);
  for (const Option& o : every_option()) {
    CAPTURE(o.name());
    Strided<T> xs(x, 3, sentinel), rs(r, 2, sentinel);
    Strided<T> gs(Matrix<T>::Zero(n, d), 2, sentinel), gqs(Matrix<T>::Zero(n, d), 4, sentinel),
        grs(Matrix<T>::Zero(nr, d), 1, sentinel);
    Matrix<T> g(n, d), gq(n, d), gr(nr, d);
    with_loss<T>(o, true, [&](auto& loss) {
      const T dense = loss.forward_backward(tag, x, y, g, top_diff);
      auto gmap = gs.map();
      CHECK(loss.forward_backward(tag, xs.cmap(), y, gmap, top_diff) == dense);
      const T cross = loss.forward_backward(tag, x, y, ml::reference(r, yr), gq, gr, top_diff);
      auto gqmap = gqs.map();
      auto grmap = grs.map();
      CHECK(loss.forward_backward(tag, xs.cmap(), y, ml::reference(rs.cmap(), yr), gqmap, grmap,
                                  top_diff) == cross);
      CHECK(gradient_error(gmap, g) == 0.0);
      CHECK(gradient_error(gqmap, gq) == 0.0);
      CHECK(gradient_error(grmap, gr) == 0.0);
      return 0;
    });
    CHECK(gs.padding_is(sentinel));
    CHECK(gqs.padding_is(sentinel));
    CHECK(grs.padding_is(sentinel));
    // top_diff scales the chained gradient.
    Matrix<T> g1(n, d);
    with_loss<T>(o, true, [&](auto& loss) { return loss.forward_backward(tag, x, y, g1); });
    CHECK(gradient_error(g1.template cast<double>() * static_cast<double>(top_diff), g) <=
          same_rows_tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("normalize: a zero row is an invalid_argument and nothing is written",
                   "[normalize][errors]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Index n = 5, d = 3;
  std::mt19937_64 rng(1706);
  Matrix<T> x = uniform_matrix<T>(n, d, rng);
  x.row(2).setZero();
  x(2, 1) = -T(0);  // a negative zero is zero too
  const Matrix<T> good = uniform_matrix<T>(n, d, rng);
  Matrix<T> r = uniform_matrix<T>(4, d, rng);
  r.row(3).setZero();
  const Labels y = labels_of({0, 1, 0, 1, 2});
  const Labels yr = labels_of({1, 0, 2, 0});
  const Matrix<T> sentinel = Matrix<T>::Constant(n, d, T(7));
  const Matrix<T> sentinel_r = Matrix<T>::Constant(4, d, T(7));
  const std::string scalar = ml::detail::scalar_name<T>();
  for (const Option& o : every_option()) {
    CAPTURE(o.name());
    const std::string loss_name = o.loss_name();
    const std::string fb = "metricloss::" + loss_name + "<" + scalar + ">::forward_backward";
    const std::string fw = "metricloss::" + loss_name + "<" + scalar + ">::forward";
    Matrix<T> g = sentinel, gr = sentinel_r;
    with_loss<T>(o, true, [&](auto& loss) {
      expect_invalid([&] { loss.forward_backward(tag, x, y, g); },
                     {fb.c_str(), "argument 'x' has row 2 of norm 0", "'x' is 5x3", "normalize"}, g,
                     sentinel);
      expect_invalid([&] { loss.forward(tag, x, y); }, {fw.c_str(), "argument 'x' has row 2"}, g,
                     sentinel);
      // In Q, and in R (checked before anything is written, so grad_q stays too).
      Matrix<T> g_good = sentinel;
      expect_invalid([&] { loss.forward_backward(tag, x, y, ml::reference(good, y), g, g_good); },
                     {fb.c_str(), "argument 'q' has row 2 of norm 0"}, g, sentinel);
      CHECK(g_good == sentinel);
      expect_invalid([&] { loss.forward_backward(tag, good, y, ml::reference(r, yr), g, gr); },
                     {fb.c_str(), "argument 'r' has row 3 of norm 0", "'r' is 4x3"}, g, sentinel);
      CHECK(gr == sentinel_r);
      return 0;
    });
    // Without normalize a zero row is an ordinary row.
    with_loss<T>(o, false, [&](auto& loss) {
      CHECK_NOTHROW(loss.forward_backward(tag, x, y, g));
      CHECK_NOTHROW(loss.forward_backward(tag, good, y, ml::reference(r, yr), g, gr));
      return 0;
    });
  }
}

TEMPLATE_TEST_CASE("normalize: a non-finite row gives a NaN loss and NaN gradients, no throw",
                   "[normalize]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Index n = 6, d = 4;
  std::mt19937_64 rng(1707);
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  const Labels y = labels_of({0, 1, 0, 1, 2, 2});
  for (const T bad : {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()}) {
    CAPTURE(bad);
    Matrix<T> with_bad = x;
    with_bad(3, 2) = bad;
    for (const Option& o : every_option()) {
      CAPTURE(o.name());
      with_loss<T>(o, true, [&](auto& loss) {
        Matrix<T> g = Matrix<T>::Zero(n, d), gq = g, gr = g;
        T value = T(0);
        CHECK_NOTHROW(value = loss.forward_backward(tag, with_bad, y, g));
        CHECK(std::isnan(value));
        CHECK(all_nan(g.template cast<double>()));
        CHECK(std::isnan(loss.forward(tag, with_bad, y)));
        // In R.
        CHECK_NOTHROW(value = loss.forward_backward(tag, x, y, ml::reference(with_bad, y), gq, gr));
        CHECK(std::isnan(value));
        CHECK(all_nan(gq.template cast<double>()));
        CHECK(all_nan(gr.template cast<double>()));
        return 0;
      });
    }
  }
}

TEST_CASE("normalize: rows beyond double's square range are normalised exactly", "[normalize]") {
  // ||x||^2 overflows (1e200) or underflows (1e-200) in double: the norm is scaled.
  const Labels y = labels_of({0, 0, 1, 1});
  Matrix<double> x(4, 2);
  x << 3, 4, 1, 2, -2, 1, 0.5, -0.25;
  for (const double scale : {1e200, 1e-200}) {
    CAPTURE(scale);
    for (const Option& o : every_option()) {
      CAPTURE(o.name());
      Matrix<double> g(4, 2), gs(4, 2);
      const Matrix<double> scaled = x * scale;
      const double value = with_loss<double>(o, true, [&](auto& loss) { return loss.forward_backward(ml::scalar, x, y, g); });
      const double value_scaled = with_loss<double>(o, true, [&](auto& loss) {
        return loss.forward_backward(ml::simd, scaled, y, gs);
      });
      CHECK(relatively_close(value_scaled, value, same_formula_tolerance, 1e-30));
      CHECK(gradient_error((gs * scale).eval(), g) <= same_formula_tolerance);
    }
  }
}
