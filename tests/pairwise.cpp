// The shared pairwise-distance helper of the batch losses' SIMD path.
#include "support.hpp"

#include <metricloss/backend/simd/cross.hpp>
#include <metricloss/backend/simd/pairwise.hpp>

using namespace mltest;

namespace {
template <class T>
Matrix<double> direct_squared(const Matrix<T>& x) {
  const Matrix<double> xd = x.template cast<double>();
  Matrix<double> sq(x.rows(), x.rows());
  for (Index i = 0; i < x.rows(); ++i)
    for (Index j = 0; j < x.rows(); ++j) sq(i, j) = (xd.row(i) - xd.row(j)).squaredNorm();
  return sq;
}
}  // namespace

TEMPLATE_TEST_CASE("pairwise squared distances are accurate", "[pairwise]", float, double) {
  using T = TestType;
  const Index n = GENERATE(1, 2, 17, 300);
  const Index d = GENERATE(1, 7, 128, 300);
  const double offset = GENERATE(0.0, 100.0);
  const std::uint64_t seed = static_cast<std::uint64_t>(n * 1000 + d);
  CAPTURE(n, d, offset, seed);
  std::mt19937_64 rng(seed);
  Matrix<T> x = uniform_matrix<T>(n, d, rng, offset - 0.05, offset + 0.05);
  if (n > 3) x.row(3) = x.row(1);  // coincident rows
  ml::detail::PairwiseDistances<T> pairwise;
  pairwise.compute(ml::detail::input_view(x));
  const Matrix<double> reference = direct_squared(x);
  const Matrix<double> computed = pairwise.squared().template cast<double>();
  // Every entry within (float) 1e-5 / (double) 1e-12 of itself.
  const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-12;
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j) {
      CAPTURE(i, j);
      REQUIRE(std::abs(computed(i, j) - reference(i, j)) <= tol * reference(i, j));
    }
}

TEMPLATE_TEST_CASE("gradient_from_weights is 2 (diag(S 1) - S) X", "[pairwise]", float, double) {
  using T = TestType;
  const Index n = GENERATE(1, 5, 130), d = GENERATE(1, 33);
  CAPTURE(n, d);
  std::mt19937_64 rng(static_cast<std::uint64_t>(n + d));
  const Matrix<T> x = uniform_matrix<T>(n, d, rng, 9.0, 11.0);
  const Matrix<T> w = uniform_matrix<T>(n, n, rng);
  ml::detail::PairwiseDistances<T> pairwise;
  pairwise.compute(ml::detail::input_view(x));
  pairwise.zeroed_weights() = w;
  Strided<T> grad(Matrix<T>::Zero(n, d), 3, T(-7));
  pairwise.gradient_from_weights(T(0.5), ml::detail::output_view(grad.map()));
  Matrix<double> expected = Matrix<double>::Zero(n, d);
  const Matrix<double> xd = x.template cast<double>(), wd = w.template cast<double>();
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j) {
      const double s = wd(i, j) + wd(j, i);
      expected.row(i) += 0.5 * 2.0 * s * (xd.row(i) - xd.row(j));
    }
  const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-12;
  CHECK(ml::testing::compare_gradients(grad.map(), expected).relative(1e-30) <= tol);
  CHECK(grad.padding_is(T(-7)));
}

// The query x reference form (backend/simd/cross.hpp): the rectangular core of reference
// sets and cross-batch memory.
TEMPLATE_TEST_CASE("query x reference squared distances are accurate", "[pairwise]", float, double) {
  using T = TestType;
  const Index m = GENERATE(1, 7, 130), k = GENERATE(1, 9, 67);
  const Index d = GENERATE(1, 17, 300);
  const double offset = GENERATE(0.0, 100.0, 1e4);
  const std::uint64_t seed = static_cast<std::uint64_t>(m * 100000 + k * 1000 + d);
  CAPTURE(m, k, d, offset, seed);
  std::mt19937_64 rng(seed);
  // A spread of 1e-3 of the offset: at 1e4 in float, |x|^2 ~ 1e8 * D against distances ~ 1e2 D.
  const double spread = offset == 0.0 ? 1.0 : 1e-3 * offset;
  Matrix<T> q = uniform_matrix<T>(m, d, rng, offset - spread, offset + spread);
  Matrix<T> r = uniform_matrix<T>(k, d, rng, offset - spread, offset + spread);
  if (m > 3 && k > 5) r.row(5) = q.row(3);  // coincident across the two sets: exactly 0
  ml::detail::CrossDistances<T> cross;
  cross.compute(ml::detail::input_view(q), ml::detail::input_view(r));
  const Matrix<double> qd = q.template cast<double>(), rd = r.template cast<double>();
  const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-12;
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < k; ++j) {
      CAPTURE(i, j);
      const double reference = (qd.row(i) - rd.row(j)).squaredNorm();
      const double computed = static_cast<double>(cross.squared()(i, j));
      REQUIRE(std::abs(computed - reference) <= tol * reference);
      REQUIRE(std::abs(computed - reference) <= cross.rounding_bound(i, j) + tol * reference);
    }
  if (m > 3 && k > 5) CHECK(cross.squared()(3, 5) == T(0));
}

TEMPLATE_TEST_CASE("query x reference gradients are 2 (diag(W 1) Q - W R) and 2 (diag(W^T 1) R - W^T Q)",
                   "[pairwise]", float, double) {
  using T = TestType;
  const Index m = GENERATE(1, 6, 140), k = GENERATE(1, 11, 70), d = GENERATE(1, 33);
  const double offset = GENERATE(0.0, 1e3);
  const std::uint64_t seed = static_cast<std::uint64_t>(m * 7919 + k * 31 + d);
  CAPTURE(m, k, d, offset, seed);
  std::mt19937_64 rng(seed);
  Matrix<T> q = uniform_matrix<T>(m, d, rng, offset - 1.0, offset + 1.0);
  Matrix<T> r = uniform_matrix<T>(k, d, rng, offset - 1.0, offset + 1.0);
  if (m > 2 && k > 2) {
    r.row(1) = q.row(2);                     // coincident: a weight there adds nothing
    r.row(2) = q.row(1);
    r(2, 0) = static_cast<T>(static_cast<double>(r(2, 0)) + 1e-3);  // near: by differences
  }
  const Matrix<T> w = uniform_matrix<T>(m, k, rng, -2.0, 2.0);
  ml::detail::CrossDistances<T> cross;
  cross.compute(ml::detail::input_view(q), ml::detail::input_view(r));
  cross.zeroed_weights() = w;
  Strided<T> grad_q(Matrix<T>::Zero(m, d), 2, T(-7)), grad_r(Matrix<T>::Zero(k, d), 5, T(-7));
  cross.gradients(T(0.5), ml::detail::output_view(grad_q.map()), ml::detail::output_view(grad_r.map()));
  Matrix<double> expected_q = Matrix<double>::Zero(m, d), expected_r = Matrix<double>::Zero(k, d);
  const Matrix<double> qd = q.template cast<double>(), rd = r.template cast<double>(),
                       wd = w.template cast<double>();
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < k; ++j) {
      const Eigen::RowVectorXd term = 0.5 * 2.0 * wd(i, j) * (qd.row(i) - rd.row(j));
      expected_q.row(i) += term;
      expected_r.row(j) -= term;
    }
  // Relative to the largest entry: the products' rounding is eps times the weights times the
  // centred rows (|xc| ~ 1 here, whatever the offset).
  const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-12;
  CHECK(ml::testing::compare_gradients(grad_q.map(), expected_q).relative(1e-30) <= tol);
  CHECK(ml::testing::compare_gradients(grad_r.map(), expected_r).relative(1e-30) <= tol);
  CHECK(grad_q.padding_is(T(-7)));
  CHECK(grad_r.padding_is(T(-7)));
  // Only one side wanted: the other is not touched.
  cross.zeroed_weights() = w;
  Strided<T> only_r(Matrix<T>::Zero(k, d), 1, T(-3));
  cross.gradients(T(0.5), ml::detail::MatrixView<T>{}, ml::detail::output_view(only_r.map()));
  CHECK(ml::testing::compare_gradients(only_r.map(), expected_r).relative(1e-30) <= tol);
}
