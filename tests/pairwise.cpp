// The shared pairwise-distance helper of the batch losses' SIMD path.
#include "support.hpp"

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

