// TripletLoss over explicit triplets: an independent double reference, finite differences,
// simd-vs-scalar parity, optional gradients, degenerate inputs, a large common offset in
// float, bad input, determinism.
#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

using namespace mltest;
using ml::Distance;

namespace {


const char* name_of(Distance distance) {
  return distance == Distance::euclidean ? "euclidean" : "squared_euclidean";
}

/// Test-only reference written from API.md's formula, in double.
struct Reference {
  double loss;
  Matrix<double> grad_anchor, grad_positive, grad_negative;
};
template <class T>
Reference reference(const Matrix<T>& a, const Matrix<T>& p, const Matrix<T>& n, double margin,
                    Distance distance, double top_diff) {
  const Index rows = a.rows(), d = a.cols();
  Reference r{0.0, Matrix<double>::Zero(rows, d), Matrix<double>::Zero(rows, d),
              Matrix<double>::Zero(rows, d)};
  for (Index i = 0; i < rows; ++i) {
    const Eigen::RowVectorXd to_p = a.row(i).template cast<double>() - p.row(i).template cast<double>();
    const Eigen::RowVectorXd to_n = a.row(i).template cast<double>() - n.row(i).template cast<double>();
    const bool squared = distance == Distance::squared_euclidean;
    const double dp = squared ? to_p.squaredNorm() : to_p.norm();
    const double dn = squared ? to_n.squaredNorm() : to_n.norm();
    const double x = dp - dn + margin;
    if (x <= 0) continue;
    r.loss += x;
    // d dp / da = 2 (a - p) squared, (a - p)/dp Euclidean (0 at dp = 0).
    const Eigen::RowVectorXd grad_dp = squared ? (2.0 * to_p).eval()
                                               : (dp > 0 ? (to_p / dp).eval() : (0.0 * to_p).eval());
    const Eigen::RowVectorXd grad_dn = squared ? (2.0 * to_n).eval()
                                               : (dn > 0 ? (to_n / dn).eval() : (0.0 * to_n).eval());
    const double s = top_diff / static_cast<double>(rows);
    r.grad_anchor.row(i) = s * (grad_dp - grad_dn);
    r.grad_positive.row(i) = -s * grad_dp;
    r.grad_negative.row(i) = s * grad_dn;
  }
  r.loss /= static_cast<double>(rows);
  return r;
}

/// Moves negatives so that every triplet is away from the hinge kink and from zero
/// distances by more than the finite-difference step.
void avoid_kinks(const Matrix<double>& a, const Matrix<double>& p, Matrix<double>& n,
                 double margin, Distance distance) {
  for (Index i = 0; i < a.rows(); ++i) {
    for (int attempt = 0; attempt < 100; ++attempt) {
      const double qp = (a.row(i) - p.row(i)).squaredNorm(), qn = (a.row(i) - n.row(i)).squaredNorm();
      const bool squared = distance == Distance::squared_euclidean;
      const double x = (squared ? qp : std::sqrt(qp)) - (squared ? qn : std::sqrt(qn)) + margin;
      if (std::abs(x) > 1e-3 && qp > 1e-6 && qn > 1e-6) break;
      n.row(i) = a.row(i) + 1.3 * (n.row(i) - a.row(i));
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("triplet matches the double reference", "[triplet]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const std::uint64_t seed = GENERATE(1u, 2u, 3u);
  const Index d = GENERATE(1, 3, 16, 17, 100);
  const auto distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  CAPTURE(seed, d, name_of(distance));
  std::mt19937_64 rng(seed);
  const Index n = 37;
  const Matrix<T> a = uniform_matrix<T>(n, d, rng), p = uniform_matrix<T>(n, d, rng),
                  neg = uniform_matrix<T>(n, d, rng);
  // A margin that leaves some triplets active and some not.
  const double margin = distance == Distance::euclidean ? 0.3 : 0.3 * static_cast<double>(d);
  const T top_diff = T(0.75);
  ml::TripletLoss<T> loss(static_cast<T>(margin), distance);
  Matrix<T> ga(n, d), gp(n, d), gn(n, d);
  const T value = loss.forward_backward(tag, a, p, neg, ga, gp, gn, top_diff);
  const Reference r = reference(a, p, neg, static_cast<T>(margin), distance, top_diff);
  CHECK(r.loss > 0);
  CHECK(relatively_close(value, r.loss, Tolerance<T>::loss));
  CHECK(ml::testing::compare_gradients(ga, r.grad_anchor).relative() <= Tolerance<T>::gradient);
  CHECK(ml::testing::compare_gradients(gp, r.grad_positive).relative() <= Tolerance<T>::gradient);
  CHECK(ml::testing::compare_gradients(gn, r.grad_negative).relative() <= Tolerance<T>::gradient);
  CHECK(loss.forward(tag, a, p, neg) == value);
}

TEMPLATE_TEST_CASE("triplet gradients match finite differences", "[triplet][gradcheck]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const std::uint64_t seed = GENERATE(11u, 12u);
  const Index d = GENERATE(1, 5, 19);
  const auto distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  CAPTURE(seed, d, name_of(distance));
  std::mt19937_64 rng(seed);
  const Index n = 12;
  const Matrix<double> a = uniform_matrix<double>(n, d, rng), p = uniform_matrix<double>(n, d, rng);
  Matrix<double> neg = uniform_matrix<double>(n, d, rng);
  const double margin = distance == Distance::euclidean ? 0.3 : 0.3 * static_cast<double>(d);
  avoid_kinks(a, p, neg, margin, distance);
  ml::TripletLoss<double> loss(margin, distance);
  const double top_diff = 1.3;
  Matrix<double> ga(n, d), gp(n, d), gn(n, d);
  loss.forward_backward(tag, a, p, neg, ga, gp, gn, top_diff);
  using ml::testing::numerical_gradient;
  const Matrix<double> fa = top_diff * numerical_gradient([&](const Matrix<double>& x) { return loss.forward(tag, x, p, neg); }, a);
  const Matrix<double> fp = top_diff * numerical_gradient([&](const Matrix<double>& x) { return loss.forward(tag, a, x, neg); }, p);
  const Matrix<double> fn = top_diff * numerical_gradient([&](const Matrix<double>& x) { return loss.forward(tag, a, p, x); }, neg);
  CHECK(ml::testing::compare_gradients(ga, fa).relative() <= Tolerance<double>::finite_difference);
  CHECK(ml::testing::compare_gradients(gp, fp).relative() <= Tolerance<double>::finite_difference);
  CHECK(ml::testing::compare_gradients(gn, fn).relative() <= Tolerance<double>::finite_difference);
  // Linearisation along a random direction.
  const Matrix<double> v = ml::testing::random_direction(n, d, rng);
  const double slope = ml::testing::directional_derivative(
      [&](const Matrix<double>& x) { return loss.forward(tag, x, p, neg); }, a, v);
  CHECK(relatively_close(top_diff * slope, (ga.array() * v.array()).sum(), 1e-6, 1e-3));
}

TEMPLATE_TEST_CASE("triplet simd agrees with scalar over sizes and strides", "[triplet][parity]",
                   float, double) {
  using T = TestType;
  // 64 and 128-135: rows of exactly 16 batches (AVX2 double, AVX2 float / AVX-512 double).
  const Index d = GENERATE(1, 3, 15, 16, 17, 64, 128, 130, 255, 1100, 2100);
  const Index n = GENERATE(1, 2, 7, 64, 301);
  const Index pad = GENERATE(0, 5);
  const auto distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const std::uint64_t seed = 2000u + static_cast<std::uint64_t>(d * 7 + n);
  CAPTURE(d, n, pad, seed, name_of(distance));
  std::mt19937_64 rng(seed);
  const Matrix<T> a = uniform_matrix<T>(n, d, rng), p = uniform_matrix<T>(n, d, rng),
                  neg = uniform_matrix<T>(n, d, rng);
  ml::TripletLoss<T> loss(static_cast<T>(distance == Distance::euclidean ? 0.3 : 0.3 * static_cast<double>(d)), distance);
  const T sentinel = T(-12345);
  Strided<T> as(a, pad, sentinel), ps(p, pad, sentinel), ns(neg, pad, sentinel);
  const Strided<T> zero(Matrix<T>::Zero(n, d), pad, sentinel);
  Strided<T> ga_scalar = zero, gp_scalar = zero, gn_scalar = zero;
  Strided<T> ga_simd = zero, gp_simd = zero, gn_simd = zero;
  const T scalar_value = loss.forward_backward(ml::scalar, as.cmap(), ps.cmap(), ns.cmap(), ga_scalar.map(),
                                               gp_scalar.map(), gn_scalar.map(), T(2));
  const T simd_value = loss.forward_backward(ml::simd, as.cmap(), ps.cmap(), ns.cmap(), ga_simd.map(),
                                             gp_simd.map(), gn_simd.map(), T(2));
  CHECK(relatively_close(simd_value, scalar_value, Tolerance<T>::loss, 1e-12));
  // Relative to the largest entry of all three gradients: at D = 1 grad_anchor can cancel
  // to exactly 0 in one path and to a rounding error in the other.
  const double largest = std::max({gp_scalar.map().cwiseAbs().maxCoeff(), gn_scalar.map().cwiseAbs().maxCoeff(),
                                   ga_scalar.map().cwiseAbs().maxCoeff(), T(1e-30)});
  CHECK(ml::testing::compare_gradients(ga_simd.map(), ga_scalar.map()).relative(largest) <= Tolerance<T>::gradient);
  CHECK(ml::testing::compare_gradients(gp_simd.map(), gp_scalar.map()).relative(largest) <= Tolerance<T>::gradient);
  CHECK(ml::testing::compare_gradients(gn_simd.map(), gn_scalar.map()).relative(largest) <= Tolerance<T>::gradient);
  for (const auto* g : {&ga_simd, &gp_simd, &gn_simd, &ga_scalar, &gp_scalar, &gn_scalar})
    CHECK(g->padding_is(sentinel));
}

TEMPLATE_TEST_CASE("triplet computes only the gradients asked for", "[triplet]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  std::mt19937_64 rng(21);
  // 21: rows of compile-time batches; 300: batches counted at run time (simd path).
  const Index n = 9, d = GENERATE(21, 300);
  CAPTURE(d);
  const Matrix<T> a = uniform_matrix<T>(n, d, rng), p = uniform_matrix<T>(n, d, rng),
                  neg = uniform_matrix<T>(n, d, rng);
  ml::TripletLoss<T> loss(d == 21 ? T(2) : T(2.5));
  Matrix<T> ga(n, d), gp(n, d), gn(n, d);
  const T full = loss.forward_backward(tag, a, p, neg, ga, gp, gn);
  const int mask = GENERATE(0, 1, 2, 3, 4, 5, 6);
  CAPTURE(mask);
  Matrix<T> oa = Matrix<T>::Constant(n, d, T(7)), op = oa, on = oa;
  T value;
  switch (mask) {
    case 0: value = loss.forward_backward(tag, a, p, neg, oa, ml::skip, ml::skip); break;
    case 1: value = loss.forward_backward(tag, a, p, neg, ml::skip, op, ml::skip); break;
    case 2: value = loss.forward_backward(tag, a, p, neg, ml::skip, ml::skip, on); break;
    case 3: value = loss.forward_backward(tag, a, p, neg, oa, op, ml::skip); break;
    case 4: value = loss.forward_backward(tag, a, p, neg, oa, ml::skip, on); break;
    case 5: value = loss.forward_backward(tag, a, p, neg, ml::skip, op, on); break;
    default: value = loss.forward_backward(tag, a, p, neg, ml::skip, ml::skip, ml::skip); break;
  }
  CHECK(value == full);
  const bool want_a = mask == 0 || mask == 3 || mask == 4;
  const bool want_p = mask == 1 || mask == 3 || mask == 5;
  const bool want_n = mask == 2 || mask == 4 || mask == 5;
  CHECK((want_a ? oa == ga : oa.isConstant(T(7))));
  CHECK((want_p ? op == gp : op.isConstant(T(7))));
  CHECK((want_n ? on == gn : on.isConstant(T(7))));
}

TEMPLATE_TEST_CASE("triplet at zero distance and other degenerate inputs", "[triplet][degenerate]",
                   ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const auto distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  CAPTURE(name_of(distance));
  SECTION("anchor, positive and negative coincide: loss = margin, gradient 0") {
    const Matrix<T> a = Matrix<T>::Constant(4, 3, T(0.5));
    ml::TripletLoss<T> loss(T(0.25), distance);
    Matrix<T> ga(4, 3), gp(4, 3), gn(4, 3);
    const T value = loss.forward_backward(tag, a, a, a, ga, gp, gn);
    CHECK(relatively_close(value, 0.25, Tolerance<T>::loss));
    CHECK(ga.isZero(0));
    CHECK(gp.isZero(0));
    CHECK(gn.isZero(0));
  }
  SECTION("positive at the anchor: only the negative pulls") {
    Matrix<T> a(1, 2), n(1, 2);
    a << T(0), T(0);
    n << T(0.3), T(0.4);  // d_an = 0.5
    ml::TripletLoss<T> loss(T(1), distance);
    Matrix<T> ga(1, 2), gp(1, 2), gn(1, 2);
    const T value = loss.forward_backward(tag, a, a, n, ga, gp, gn);
    const bool squared = distance == Distance::squared_euclidean;
    CHECK(relatively_close(value, squared ? 0.75 : 0.5, Tolerance<T>::loss));
    CHECK(gp.isZero(0));
    CHECK(ga.allFinite());
    // dL/dn = -d(d_an)/dn = -(0.6, 0.8) for both distances (2 (n - a), and (n - a)/0.5).
    CHECK(relatively_close(gn(0, 0), -0.6, Tolerance<T>::loss));
    CHECK(relatively_close(gn(0, 1), -0.8, Tolerance<T>::loss));
    CHECK(ga == -gn);
  }
  SECTION("inactive triplets contribute nothing") {
    const Matrix<T> a = Matrix<T>::Zero(2, 2), n = Matrix<T>::Constant(2, 2, T(5));
    ml::TripletLoss<T> loss(T(1), distance);
    Matrix<T> ga(2, 2), gp(2, 2), gn(2, 2);
    CHECK(loss.forward_backward(tag, a, a, n, ga, gp, gn) == T(0));
    CHECK(ga.isZero(0));
    CHECK(gn.isZero(0));
  }
  SECTION("margin 0 and a tie is inactive") {
    const Matrix<T> a = Matrix<T>::Zero(2, 2), p = Matrix<T>::Constant(2, 2, T(0.1));
    ml::TripletLoss<T> loss(T(0), distance);
    Matrix<T> ga(2, 2);
    CHECK(loss.forward_backward(tag, a, p, p, ga, ml::skip, ml::skip) == T(0));
    CHECK(ga.isZero(0));
  }
  SECTION("NaN in the data propagates") {
    Matrix<T> a = Matrix<T>::Zero(2, 2);
    const Matrix<T> p = Matrix<T>::Zero(2, 2), n = Matrix<T>::Ones(2, 2);
    a(1, 1) = std::numeric_limits<T>::quiet_NaN();
    ml::TripletLoss<T> loss(T(1), distance);
    Matrix<T> ga(2, 2);
    CHECK(std::isnan(loss.forward_backward(tag, a, p, n, ga, ml::skip, ml::skip)));
    CHECK(std::isnan(ga(1, 0)));
  }
}

TEMPLATE_TEST_CASE("triplet in float is accurate at a large common offset", "[triplet][numerics]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const auto distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  CAPTURE(name_of(distance));
  std::mt19937_64 rng(31);
  const Index n = 200, d = 128;
  const Matrix<float> a = uniform_matrix<float>(n, d, rng, 99.95, 100.05);
  const Matrix<float> p = uniform_matrix<float>(n, d, rng, 99.95, 100.05);
  const Matrix<float> neg = uniform_matrix<float>(n, d, rng, 99.95, 100.05);
  const float margin = 0.05f;  // d ~ 0.46 and q ~ 0.21: most triplets active, some not
  ml::TripletLoss<float> loss(margin, distance);
  Matrix<float> ga(n, d), gp(n, d), gn(n, d);
  const float value = loss.forward_backward(tag, a, p, neg, ga, gp, gn);
  const Reference r = reference(a, p, neg, margin, distance, 1.0);
  CHECK(r.loss > 0);
  CHECK(relatively_close(value, r.loss, Tolerance<float>::loss));
  CHECK(ml::testing::compare_gradients(ga, r.grad_anchor).relative() <= Tolerance<float>::gradient);
  CHECK(ml::testing::compare_gradients(gp, r.grad_positive).relative() <= Tolerance<float>::gradient);
  CHECK(ml::testing::compare_gradients(gn, r.grad_negative).relative() <= Tolerance<float>::gradient);
}

TEMPLATE_TEST_CASE("triplet rejects bad input and writes nothing", "[triplet][errors]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  std::mt19937_64 rng(41);
  const Matrix<float> a = uniform_matrix<float>(4, 3, rng), p = uniform_matrix<float>(4, 3, rng),
                      n = uniform_matrix<float>(4, 3, rng);
  Matrix<float> ga = Matrix<float>::Constant(4, 3, 9.0f), gp = ga, gn = ga;
  const Matrix<float> before = ga;
  ml::TripletLoss<float> loss;
  const char* fn = "metricloss::TripletLoss<float>::forward_backward";
  expect_invalid([&] { loss.forward_backward(tag, a, uniform_matrix<float>(4, 2, rng), n, ga, gp, gn); },
                 {fn, "'positive'", "4x2", "4x3", "'anchor'"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, a, p, uniform_matrix<float>(5, 3, rng), ga, gp, gn); },
                 {fn, "'negative'", "5x3", "4x3", "'anchor'"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, Matrix<float>(0, 3), Matrix<float>(0, 3), Matrix<float>(0, 3), ga, gp, gn); },
                 {fn, "'anchor'", "0x3", "N >= 1"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, Matrix<float>(4, 0), Matrix<float>(4, 0), Matrix<float>(4, 0), ga, gp, gn); },
                 {fn, "'anchor'", "4x0", "D >= 1"}, ga, before);
  Matrix<float> small(3, 3);
  expect_invalid([&] { loss.forward_backward(tag, a, p, n, small, gp, gn); },
                 {fn, "'grad_anchor'", "3x3", "4x3"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, a, p, n, ga, Matrix<float>(4, 4), gn); },
                 {fn, "'grad_positive'", "4x4", "4x3"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, a, p, n, ga, gp, Matrix<float>(2, 3)); },
                 {fn, "'grad_negative'", "2x3", "4x3"}, ga, before);
  for (float bad : {-1.0f, std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    ml::TripletLoss<float> bad_loss(bad);
    expect_invalid([&] { bad_loss.forward_backward(tag, a, p, n, ga, gp, gn); }, {fn, "'margin'"}, ga, before);
  }
  ml::TripletLoss<float> bad_distance(0.2f, static_cast<Distance>(7));
  expect_invalid([&] { bad_distance.forward_backward(tag, a, p, n, ga, gp, gn); }, {fn, "'distance'"}, ga,
                 before);
  // Overlaps: a gradient aliasing an input, or another gradient.
  Matrix<float> n_copy = n;
  expect_invalid([&] { loss.forward_backward(tag, a, p, n_copy, ga, gp, n_copy); },
                 {fn, "'grad_negative'", "overlaps", "'negative'"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, a, p, n, ga, ga, gn); },
                 {fn, "'grad_positive'", "overlaps", "'grad_anchor'"}, ga, before);
  expect_invalid([&] { loss.forward_backward(tag, a, p, n, ml::skip, gn, gn); },
                 {fn, "'grad_negative'", "overlaps", "'grad_positive'"}, gn, before);
  ml::RowMap<float> shifted(gp.data() + 2, 3, 3, Eigen::OuterStride<>(3));
  expect_invalid([&] { loss.forward_backward(tag, a.topRows(3), p.topRows(3), n.topRows(3), gp.topRows(3), ml::skip, shifted); },
                 {fn, "'grad_negative'", "overlaps", "'grad_anchor'"}, gp, before);
  expect_invalid([&] { loss.forward(tag, a, p, uniform_matrix<float>(4, 2, rng)); }, {"'negative'", "4x2"}, ga,
                 before);
}

TEMPLATE_TEST_CASE("triplet is deterministic", "[triplet]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  std::mt19937_64 rng(51);
  const Matrix<T> a = uniform_matrix<T>(100, 33, rng), p = uniform_matrix<T>(100, 33, rng),
                  n = uniform_matrix<T>(100, 33, rng);
  ml::TripletLoss<T> loss(T(0.3), Distance::euclidean);
  Matrix<T> g1(100, 33), g2(100, 33);
  const T v1 = loss.forward_backward(tag, a, p, n, g1, ml::skip, ml::skip);
  const T v2 = loss.forward_backward(tag, a, p, n, g2, ml::skip, ml::skip);
  CHECK(std::memcmp(&v1, &v2, sizeof(T)) == 0);
  CHECK(std::memcmp(g1.data(), g2.data(), sizeof(T) * static_cast<std::size_t>(g1.size())) == 0);
}
