// The shipped finite-difference helper, checked on functions with known gradients.
#include "support.hpp"

using namespace mltest;

TEST_CASE("numerical_gradient recovers known gradients", "[gradcheck]") {
  std::mt19937_64 rng(7);
  const Matrix<double> x = uniform_matrix<double>(4, 3, rng, -2.0, 2.0);
  SECTION("sum of cubes") {
    auto f = [](const Matrix<double>& m) { return m.array().cube().sum(); };
    const Matrix<double> analytic = 3.0 * x.array().square();
    const auto numeric = ml::testing::numerical_gradient(f, x);
    CHECK(ml::testing::compare_gradients(analytic, numeric).relative() < 1e-8);
  }
  SECTION("a wrong gradient is detected") {
    auto f = [](const Matrix<double>& m) { return m.array().sin().sum(); };
    Matrix<double> wrong = x.array().cos();
    wrong(2, 1) += 1e-3;
    const auto comparison = ml::testing::compare_gradients(wrong, ml::testing::numerical_gradient(f, x));
    CHECK(comparison.relative() > 1e-4);
    CHECK(comparison.worst_row == 2);
    CHECK(comparison.worst_col == 1);
  }
  SECTION("directional derivative") {
    auto f = [](const Matrix<double>& m) { return m.squaredNorm(); };
    const Matrix<double> v = ml::testing::random_direction(4, 3, rng);
    CHECK(ml::testing::directional_derivative(f, x, v) == Approx((2.0 * x.array() * v.array()).sum()).epsilon(1e-8));
  }
}

TEST_CASE("central_difference_step is relative, floored, and exact", "[gradcheck]") {
  CHECK(ml::testing::central_difference_step(1000.0) == Approx(1e-3).epsilon(1e-6));
  CHECK(ml::testing::central_difference_step(0.0) == Approx(std::sqrt(2.220446049250313e-16)));
  const double x = 0.1, h = ml::testing::central_difference_step(x);
  CHECK((x + h) - x == h);
}

TEST_CASE("compare_gradients keeps a NaN", "[gradcheck]") {
  Matrix<double> a = Matrix<double>::Ones(2, 2), b = a;
  a(0, 0) = std::numeric_limits<double>::quiet_NaN();
  CHECK(std::isnan(ml::testing::compare_gradients(a, b).max_abs_difference));
}
