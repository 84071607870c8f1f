// ContrastiveLoss: finite differences, an independent double reference, simd-vs-scalar
// parity, degenerate inputs, Caffe's semantics, bad input.
#include "support.hpp"

#include <cmath>
#include <cstring>
#include <limits>

using namespace mltest;
using ml::ContrastiveForm;

namespace {


/// Test-only reference written from API.md's formula, in double.
struct Reference {
  double loss;
  Matrix<double> grad_a, grad_b;
};
template <class T>
Reference reference(const Matrix<T>& a, const Matrix<T>& b, const std::vector<bool>& similar,
                    double margin, ContrastiveForm form, double top_diff) {
  const Index n = a.rows();
  Reference r{0.0, Matrix<double>::Zero(n, a.cols()), Matrix<double>::Zero(n, a.cols())};
  for (Index i = 0; i < n; ++i) {
    const Eigen::RowVectorXd diff = a.row(i).template cast<double>() - b.row(i).template cast<double>();
    const double d2 = diff.squaredNorm(), d = std::sqrt(d2);
    double coefficient = 0.0;  // d(bracket)/d(a_i) = coefficient * diff
    if (similar[static_cast<std::size_t>(i)]) {
      r.loss += d2;
      coefficient = 2.0;
    } else if (form == ContrastiveForm::hadsell) {
      if (d < margin) {
        r.loss += (margin - d) * (margin - d);
        coefficient = d > 0 ? -2.0 * (margin - d) / d : 0.0;
      }
    } else if (d2 < margin) {
      r.loss += margin - d2;
      coefficient = -2.0;
    }
    r.grad_a.row(i) = top_diff * coefficient / (2.0 * static_cast<double>(n)) * diff;
    r.grad_b.row(i) = -r.grad_a.row(i);
  }
  r.loss /= 2.0 * static_cast<double>(n);
  return r;
}

std::vector<bool> random_similar(Index n, std::mt19937_64& rng) {
  std::bernoulli_distribution coin(0.4);
  std::vector<bool> s(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < s.size(); ++i) s[i] = coin(rng);
  return s;
}
Eigen::VectorXf as_sim(const std::vector<bool>& s) {
  Eigen::VectorXf v(static_cast<Index>(s.size()));
  for (std::size_t i = 0; i < s.size(); ++i) v(static_cast<Index>(i)) = s[i] ? 1.0f : 0.0f;
  return v;
}

/// Moves pairs away from the loss's kinks (d = margin, d^2 = margin, d = 0) by more than the
/// finite-difference step.
template <class T>
void avoid_kinks(Matrix<T>& a, const Matrix<T>& b, double margin) {
  for (Index i = 0; i < a.rows(); ++i) {
    for (int attempt = 0; attempt < 100; ++attempt) {
      const double d = (a.row(i) - b.row(i)).template cast<double>().norm();
      if (std::abs(d - margin) > 1e-3 && std::abs(d * d - margin) > 1e-3 && d > 1e-3) break;
      a.row(i) = (a.row(i).array() * T(1.1)).matrix();
    }
  }
}

/// Keeps each dissimilar pair a quarter of the margin from its hinge's kink (d = margin, or
/// d^2 = margin for legacy), alternately outside (the difference grown) and inside (shrunk).
/// The simd path sums float lanes: its d is within about sqrt(D / lanes) 2^-24 of itself, and
/// a pair's hinge (m - d)^2 near the kink multiplies that relative error by 2d / (m - d),
/// which with one pair (N = 1) is the loss's own error; a quarter keeps it below API.md's
/// float bound (1e-5) up to D = 2100.
template <class T>
void keep_from_kinks(Matrix<T>& a, const Matrix<T>& b, const std::vector<bool>& similar, double margin,
                     ContrastiveForm form) {
  for (Index i = 0; i < a.rows(); ++i) {
    if (similar[static_cast<std::size_t>(i)]) continue;
    const T factor = i % 2 == 0 ? T(1.1) : T(0.9);
    for (int attempt = 0; attempt < 100; ++attempt) {
      const double d = (a.row(i) - b.row(i)).template cast<double>().norm();
      const double x = form == ContrastiveForm::hadsell ? d : d * d;
      if (std::abs(x - margin) > 0.25 * margin) break;
      a.row(i) = b.row(i) + factor * (a.row(i) - b.row(i));
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("contrastive matches the double reference", "[contrastive]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const std::uint64_t seed = GENERATE(1u, 2u, 3u);
  const Index d = GENERATE(1, 3, 16, 17, 100);
  const auto form = GENERATE(ContrastiveForm::hadsell, ContrastiveForm::legacy);
  CAPTURE(seed, d, form == ContrastiveForm::hadsell ? "hadsell" : "legacy");
  std::mt19937_64 rng(seed);
  const Index n = 37;
  const Matrix<T> a = uniform_matrix<T>(n, d, rng), b = uniform_matrix<T>(n, d, rng);
  const auto similar = random_similar(n, rng);
  const double margin = std::sqrt(static_cast<double>(d)) * 0.9;  // about half the pairs inside
  const T top_diff = T(0.75);
  ml::ContrastiveLoss<T> loss(static_cast<T>(margin), form);
  Matrix<T> ga(n, d), gb(n, d);
  const T value = loss.forward_backward(tag, a, b, as_sim(similar), ga, gb, top_diff);
  const Reference r = reference(a, b, similar, static_cast<T>(margin), form, top_diff);
  CHECK(relatively_close(value, r.loss, Tolerance<T>::loss));
  CHECK(ml::testing::compare_gradients(ga, r.grad_a).relative() <= Tolerance<T>::gradient);
  CHECK(ml::testing::compare_gradients(gb, r.grad_b).relative() <= Tolerance<T>::gradient);
  CHECK(loss.forward(tag, a, b, as_sim(similar)) == value);
}

TEMPLATE_TEST_CASE("contrastive gradients match finite differences", "[contrastive][gradcheck]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const std::uint64_t seed = GENERATE(11u, 12u);
  const Index d = GENERATE(1, 5, 19);
  const auto form = GENERATE(ContrastiveForm::hadsell, ContrastiveForm::legacy);
  const bool labels_overload = GENERATE(false, true);
  CAPTURE(seed, d, form == ContrastiveForm::hadsell ? "hadsell" : "legacy", labels_overload);
  std::mt19937_64 rng(seed);
  const Index n = 12;
  Matrix<double> a = uniform_matrix<double>(n, d, rng);
  const Matrix<double> b = uniform_matrix<double>(n, d, rng);
  const double margin = std::sqrt(static_cast<double>(d)) * 0.9;
  avoid_kinks(a, b, margin);
  const auto similar = random_similar(n, rng);
  Eigen::VectorXi labels_a(n), labels_b(n);
  for (Index i = 0; i < n; ++i) {
    labels_a(i) = static_cast<int>(i % 4);
    labels_b(i) = similar[static_cast<std::size_t>(i)] ? labels_a(i) : labels_a(i) + 1;
  }
  ml::ContrastiveLoss<double> loss(margin, form);
  const double top_diff = 1.3;
  auto evaluate = [&](const Matrix<double>& x, const Matrix<double>& y) {
    return labels_overload ? loss.forward(tag, x, y, labels_a, labels_b)
                           : loss.forward(tag, x, y, as_sim(similar));
  };
  Matrix<double> ga(n, d), gb(n, d);
  if (labels_overload)
    loss.forward_backward(tag, a, b, labels_a, labels_b, ga, gb, top_diff);
  else
    loss.forward_backward(tag, a, b, as_sim(similar), ga, gb, top_diff);
  const Matrix<double> fa = top_diff * ml::testing::numerical_gradient(
                                           [&](const Matrix<double>& x) { return evaluate(x, b); }, a);
  const Matrix<double> fb = top_diff * ml::testing::numerical_gradient(
                                           [&](const Matrix<double>& y) { return evaluate(a, y); }, b);
  CHECK(ml::testing::compare_gradients(ga, fa).relative() <= Tolerance<double>::finite_difference);
  CHECK(ml::testing::compare_gradients(gb, fb).relative() <= Tolerance<double>::finite_difference);
  // Linearisation along a random direction.
  const Matrix<double> v = ml::testing::random_direction(n, d, rng);
  const double slope = ml::testing::directional_derivative([&](const Matrix<double>& x) { return evaluate(x, b); }, a, v);
  CHECK(relatively_close(top_diff * slope, (ga.array() * v.array()).sum(), 1e-6, 1e-3));
}

TEMPLATE_TEST_CASE("contrastive simd agrees with scalar over sizes and strides",
                   "[contrastive][parity]", float, double) {
  using T = TestType;
  // 1000, 1100 and 2100: the SIMD rows' pipelined pass with a run-time batch count up to 8 KiB
  // per row, and one pass per row beyond (double at 1100, both types at 2100). 64 and 128-135:
  // rows of exactly 16 batches (AVX2 double, AVX2 float / AVX-512 double), unrolled.
  const Index d = GENERATE(1, 3, 15, 16, 17, 64, 128, 130, 255, 1000, 1100, 2100);
  const Index n = GENERATE(1, 2, 7, 64, 300);
  const Index pad = GENERATE(0, 5);
  const auto form = GENERATE(ContrastiveForm::hadsell, ContrastiveForm::legacy);
  const std::uint64_t seed = 1000u + static_cast<std::uint64_t>(d * 7 + n);
  CAPTURE(d, n, pad, seed);
  std::mt19937_64 rng(seed);
  Matrix<T> a = uniform_matrix<T>(n, d, rng);
  const Matrix<T> b = uniform_matrix<T>(n, d, rng);
  const auto similar = random_similar(n, rng);
  ml::ContrastiveLoss<T> loss(static_cast<T>(std::sqrt(static_cast<double>(d)) * 0.8), form);
  keep_from_kinks(a, b, similar, static_cast<double>(loss.margin), form);
  const T sentinel = T(-12345);
  Strided<T> as(a, pad, sentinel), bs(b, pad, sentinel);
  Strided<T> ga_scalar(Matrix<T>::Zero(n, d), pad, sentinel), gb_scalar = ga_scalar;
  Strided<T> ga_simd = ga_scalar, gb_simd = ga_scalar;
  const T scalar_value = loss.forward_backward(ml::scalar, as.cmap(), bs.cmap(), as_sim(similar),
                                               ga_scalar.map(), gb_scalar.map(), T(2));
  const T simd_value = loss.forward_backward(ml::simd, as.cmap(), bs.cmap(), as_sim(similar),
                                             ga_simd.map(), gb_simd.map(), T(2));
  CHECK(relatively_close(simd_value, scalar_value, Tolerance<T>::loss, 1e-12));
  CHECK(ml::testing::compare_gradients(ga_simd.map(), ga_scalar.map()).relative(1e-30) <= Tolerance<T>::gradient);
  CHECK(ml::testing::compare_gradients(gb_simd.map(), gb_scalar.map()).relative(1e-30) <= Tolerance<T>::gradient);
  CHECK(ga_simd.padding_is(sentinel));
  CHECK(gb_simd.padding_is(sentinel));
  CHECK(ga_scalar.padding_is(sentinel));
}

TEMPLATE_TEST_CASE("contrastive computes only the gradients asked for", "[contrastive]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  std::mt19937_64 rng(21);
  const Index n = 9, d = 21;
  const Matrix<T> a = uniform_matrix<T>(n, d, rng), b = uniform_matrix<T>(n, d, rng);
  const auto sim = as_sim(random_similar(n, rng));
  ml::ContrastiveLoss<T> loss(T(2));
  Matrix<T> ga(n, d), gb(n, d);
  const T full = loss.forward_backward(tag, a, b, sim, ga, gb);
  Matrix<T> only(n, d);
  only.setConstant(T(7));
  CHECK(loss.forward_backward(tag, a, b, sim, only, ml::skip) == full);
  CHECK(only == ga);
  only.setConstant(T(7));
  CHECK(loss.forward_backward(tag, a, b, sim, ml::skip, only) == full);
  CHECK(only == gb);
  CHECK(loss.forward_backward(tag, a, b, sim, ml::skip, ml::skip) == full);
}

TEMPLATE_TEST_CASE("contrastive at zero distance and other degenerate inputs", "[contrastive][degenerate]",
                   ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const auto form = GENERATE(ContrastiveForm::hadsell, ContrastiveForm::legacy);
  CAPTURE(form == ContrastiveForm::hadsell ? "hadsell" : "legacy");
  SECTION("coincident pairs, similar and dissimilar") {
    Matrix<T> a = Matrix<T>::Constant(4, 3, T(0.5));
    Eigen::VectorXi sim(4);
    sim << 1, 0, 1, 0;
    ml::ContrastiveLoss<T> loss(T(2), form);
    Matrix<T> ga(4, 3), gb(4, 3);
    const T value = loss.forward_backward(tag, a, a, sim, ga, gb);
    // Similar pairs add 0; dissimilar add margin^2 (hadsell) or margin (legacy); / (2N).
    const double expected = form == ContrastiveForm::hadsell ? 2 * 4.0 / 8 : 2 * 2.0 / 8;
    CHECK(relatively_close(value, expected, Tolerance<T>::loss));
    CHECK(ga.isZero(0));
    CHECK(gb.isZero(0));
    CHECK(ga.allFinite());
  }
  SECTION("N = 1, D = 1") {
    Matrix<T> a(1, 1), b(1, 1);
    a << T(0.25);
    b << T(1.0);
    Eigen::VectorXd sim = Eigen::VectorXd::Zero(1);
    ml::ContrastiveLoss<T> loss(T(1), form);
    Matrix<T> ga(1, 1), gb(1, 1);
    const T value = loss.forward_backward(tag, a, b, sim, ga, gb);
    const double expected = form == ContrastiveForm::hadsell ? 0.25 * 0.25 / 2 : (1 - 0.5625) / 2;
    CHECK(relatively_close(value, expected, Tolerance<T>::loss));
    const double expected_grad = form == ContrastiveForm::hadsell ? -(0.25 / 0.75) * -0.75 : 0.75;
    CHECK(relatively_close(ga(0, 0), expected_grad, Tolerance<T>::loss));
    CHECK(gb(0, 0) == -ga(0, 0));
  }
  SECTION("pairs beyond the margin contribute nothing") {
    Matrix<T> a = Matrix<T>::Zero(2, 2), b = Matrix<T>::Constant(2, 2, T(5));
    Eigen::VectorXi sim = Eigen::VectorXi::Zero(2);
    ml::ContrastiveLoss<T> loss(T(1), form);
    Matrix<T> ga(2, 2), gb(2, 2);
    CHECK(loss.forward_backward(tag, a, b, sim, ga, gb) == T(0));
    CHECK(ga.isZero(0));
  }
  SECTION("margin 0") {
    Matrix<T> a = Matrix<T>::Zero(2, 2), b = Matrix<T>::Constant(2, 2, T(0.1));
    Eigen::VectorXi sim = Eigen::VectorXi::Zero(2);
    ml::ContrastiveLoss<T> loss(T(0), form);
    CHECK(loss.forward(tag, a, b, sim) == T(0));
  }
  SECTION("NaN in the data propagates") {
    Matrix<T> a = Matrix<T>::Zero(2, 2), b = Matrix<T>::Zero(2, 2);
    a(1, 1) = std::numeric_limits<T>::quiet_NaN();
    Eigen::VectorXi sim = Eigen::VectorXi::Zero(2);
    ml::ContrastiveLoss<T> loss(T(1), form);
    CHECK(std::isnan(loss.forward(tag, a, b, sim)));
  }
}

TEMPLATE_TEST_CASE("contrastive in float is accurate at a large common offset", "[contrastive][numerics]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const auto form = GENERATE(ContrastiveForm::hadsell, ContrastiveForm::legacy);
  std::mt19937_64 rng(31);
  const Index n = 200, d = 128;
  const Matrix<float> a = uniform_matrix<float>(n, d, rng, 99.95, 100.05);
  const Matrix<float> b = uniform_matrix<float>(n, d, rng, 99.95, 100.05);
  const auto similar = random_similar(n, rng);
  ml::ContrastiveLoss<float> loss(0.45f, form);
  Matrix<float> ga(n, d), gb(n, d);
  const float value = loss.forward_backward(tag, a, b, as_sim(similar), ga, gb);
  const Reference r = reference(a, b, similar, 0.45f, form, 1.0);
  CHECK(relatively_close(value, r.loss, Tolerance<float>::loss));
  CHECK(ml::testing::compare_gradients(ga, r.grad_a).relative() <= Tolerance<float>::gradient);
}

TEMPLATE_TEST_CASE("contrastive follows Caffe's similarity semantics", "[contrastive][caffe]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  Matrix<double> a(6, 2), b = Matrix<double>::Zero(6, 2);
  a << 0.3, 0.4, 0.3, 0.4, 0.3, 0.4, 0.3, 0.4, 0.3, 0.4, 0.3, 0.4;  // every d = 0.5
  ml::ContrastiveLoss<double> loss(1.0);
  const double similar_term = 0.25, dissimilar_term = 0.25;  // d^2 and (1 - d)^2
  (void)dissimilar_term;
  // similar: 2, 1, -1, 1.5 (truncates to 1); dissimilar: 0.5, 0, -0.9.
  Eigen::VectorXd sim_d(6);
  sim_d << 2.0, 0.5, 1.0, -0.9, -1.0, 1.5;
  Eigen::VectorXf sim_f = sim_d.cast<float>();
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> sim_i(6);
  sim_i << 2, 0, 1, 0, -1, 1;
  Matrix<double> ga(6, 2), gb(6, 2), ga_i(6, 2), gb_i(6, 2);
  const double value = loss.forward_backward(tag, a, b, sim_d, ga, gb);
  CHECK(loss.forward_backward(tag, a, b, sim_i, ga_i, gb_i) == value);
  CHECK(loss.forward(tag, a, b, sim_f) == value);
  CHECK(ga == ga_i);
  CHECK(relatively_close(value, 6 * similar_term / 12, 1e-15));
  // Gradient rows tell similar (+diff/N) from dissimilar (-(m-d)/d diff/N).
  CHECK(ga(0, 0) > 0);
  CHECK(ga(1, 0) < 0);
  CHECK(ga(3, 0) < 0);
  CHECK(ga(5, 0) > 0);
  SECTION("two label vectors of int32, int64 and float") {
    Eigen::VectorXi la(6), lb(6);
    la << 1, 2, 3, 4, 5, 6;
    lb << 1, 0, 3, 0, 5, 6;  // similar exactly where sim_d truncates to nonzero
    Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> la64 = la.cast<std::int64_t>();
    Eigen::VectorXf lbf = lb.cast<float>();
    CHECK(loss.forward(tag, a, b, la, lb) == value);
    CHECK(loss.forward(tag, a, b, la64, lbf) == value);
    CHECK(loss.forward(tag, a, b, la.cast<float>().eval(), lbf) == value);
  }
}

TEMPLATE_TEST_CASE("contrastive rejects bad input and writes nothing", "[contrastive][errors]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  std::mt19937_64 rng(41);
  Matrix<float> a = uniform_matrix<float>(4, 3, rng), b = uniform_matrix<float>(4, 3, rng);
  Eigen::VectorXf sim = Eigen::VectorXf::Ones(4);
  Matrix<float> ga = Matrix<float>::Constant(4, 3, 9.0f), gb = ga;
  const Matrix<float> before = ga;
  ml::ContrastiveLoss<float> loss;
  const char* fn = "metricloss::ContrastiveLoss<float>::forward_backward";
  expect_invalid([&] { loss.forward_backward(tag, a, uniform_matrix<float>(4, 2, rng), sim, ga, gb); },
                 {fn, "'b'", "4x2", "4x3", "'a'"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, a, uniform_matrix<float>(5, 3, rng), sim, ga, gb); },
                 {fn, "'b'", "5x3", "4x3"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, a, b, Eigen::VectorXf::Ones(3).eval(), ga, gb); },
                 {fn, "'sim'", "length 3", "expected 4"}, ga, before);
  Eigen::VectorXi la = Eigen::VectorXi::Zero(4), lb5 = Eigen::VectorXi::Zero(5);
  expect_invalid([&] { loss.forward_backward(tag, a, b, la, lb5, ga, gb); },
                 {fn, "'labels_b'", "length 5", "expected 4"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, Matrix<float>(0, 3), Matrix<float>(0, 3),
                                             Eigen::VectorXf(0), ga, gb); },
                 {fn, "'a'", "0x3", "N >= 1"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, Matrix<float>(4, 0), Matrix<float>(4, 0), sim, ga, gb); },
                 {fn, "'a'", "4x0", "D >= 1"}, ga, before);
  Matrix<float> small(3, 3);
  expect_invalid([&] { loss.forward_backward(tag, a, b, sim, small, gb); },
                 {fn, "'grad_a'", "3x3", "4x3"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, a, b, sim, ga, Matrix<float>(4, 4)); },
                 {fn, "'grad_b'", "4x4", "4x3"}, ga, before);
  for (float bad : {-1.0f, std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    ml::ContrastiveLoss<float> bad_loss(bad);
    expect_invalid([&] { bad_loss.forward_backward(tag, a, b, sim, ga, gb); }, {fn, "'margin'"}, ga,
                   before);
  }
  // Overlaps: a gradient aliasing an input, or the other gradient.
  Matrix<float> a_copy = a;
  expect_invalid([&] { loss.forward_backward(tag, a_copy, b, sim, a_copy, gb); },
                 {fn, "'grad_a'", "overlaps", "'a'"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, a, b, sim, ga, ga); },
                 {fn, "'grad_b'", "overlaps", "'grad_a'"}, ga, before);
  ml::RowMap<float> shifted(gb.data() + 1, 3, 3, Eigen::OuterStride<>(3));
  expect_invalid([&] { loss.forward_backward(tag, a.topRows(3), b.topRows(3), sim.head(3), shifted, gb.topRows(3)); },
                 {fn, "'grad_b'", "overlaps", "'grad_a'"}, gb, before);
  Eigen::VectorXf sim_alias(12);
  ml::RowMap<float> grad_over_sim(sim_alias.data(), 4, 3, Eigen::OuterStride<>(3));
  expect_invalid([&] { loss.forward_backward(tag, a, b, sim_alias.head(4), grad_over_sim, gb); },
                 {fn, "'grad_a'", "overlaps", "'sim'"}, ga, before);
  expect_invalid([&] { loss.forward(tag, a, uniform_matrix<float>(4, 2, rng), sim); },
                 {"'b'", "4x2"}, ga, before);
}

TEMPLATE_TEST_CASE("contrastive is deterministic", "[contrastive]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  std::mt19937_64 rng(51);
  const Matrix<T> a = uniform_matrix<T>(100, 33, rng), b = uniform_matrix<T>(100, 33, rng);
  const auto sim = as_sim(random_similar(100, rng));
  ml::ContrastiveLoss<T> loss(T(3));
  Matrix<T> g1(100, 33), g2(100, 33);
  const T v1 = loss.forward_backward(tag, a, b, sim, g1, ml::skip);
  const T v2 = loss.forward_backward(tag, a, b, sim, g2, ml::skip);
  CHECK(std::memcmp(&v1, &v2, sizeof(T)) == 0);
  CHECK(std::memcmp(g1.data(), g2.data(), sizeof(T) * static_cast<std::size_t>(g1.size())) == 0);
}
