#pragma once
// Central finite differences for checking analytic gradients (as sophus/num_diff.hpp),
// shipped so that users can check their own use of the losses the way our tests do.
//
//   df/dx_k ~ (f(x + h e_k) - f(x - h e_k)) / (2h),  h = max(relative_step |x_k|, min_step)
//
// The truncation error is O(h^2 f''') and the rounding error O(eps |f| / h); with the
// default relative step 1e-6 in double both are around 1e-10 relative for smooth f. Keep
// points away from kinks (hinges, zero distances) by more than h.
#include <metricloss/types.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

namespace metricloss {
namespace testing {

struct GradcheckOptions {
  double relative_step = 1e-6;
  double min_step = std::sqrt(std::numeric_limits<double>::epsilon());
};

/// The step used for coordinate value x, adjusted so that x + h is exactly representable.
inline double central_difference_step(double x, const GradcheckOptions& options = {}) {
  const double h = std::max(options.relative_step * std::abs(x), options.min_step);
  volatile double shifted = x + h;  // volatile: keep the compiler from folding (x + h) - x
  return shifted - x;
}

/// Numerical gradient of a scalar function f(const RowMatrix<double>&) at x.
template <class F>
RowMatrix<double> numerical_gradient(F&& f, const RowMatrix<double>& x,
                                     const GradcheckOptions& options = {}) {
  RowMatrix<double> point = x;
  RowMatrix<double> gradient(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    for (Index j = 0; j < x.cols(); ++j) {
      const double original = x(i, j);
      const double h = central_difference_step(original, options);
      point(i, j) = original + h;
      const double up = static_cast<double>(f(static_cast<const RowMatrix<double>&>(point)));
      point(i, j) = original - h;
      const double down = static_cast<double>(f(static_cast<const RowMatrix<double>&>(point)));
      point(i, j) = original;
      gradient(i, j) = (up - down) / (2.0 * h);
    }
  }
  return gradient;
}

/// Directional derivative of f at x along v (manif's linearisation check,
/// f(x + h v) ~ f(x) + h <grad f, v>), by central differences with step h.
template <class F>
double directional_derivative(F&& f, const RowMatrix<double>& x, const RowMatrix<double>& v,
                              double h = 1e-6) {
  const RowMatrix<double> up = x + h * v;
  const RowMatrix<double> down = x - h * v;
  return (static_cast<double>(f(up)) - static_cast<double>(f(down))) / (2.0 * h);
}

/// Largest entry-wise difference between two gradients, relative to the largest entry
/// of the reference (the measure API.md states its tolerances in).
struct GradientComparison {
  double max_abs_difference = 0.0;
  double max_abs_reference = 0.0;
  Index worst_row = -1;
  Index worst_col = -1;
  /// max |analytic - reference| / max(max |reference|, floor).
  double relative(double floor = std::numeric_limits<double>::min()) const {
    return max_abs_difference / std::max(max_abs_reference, floor);
  }
};

template <class DA, class DB>
GradientComparison compare_gradients(const Eigen::MatrixBase<DA>& analytic,
                                     const Eigen::MatrixBase<DB>& reference) {
  GradientComparison result;
  for (Index i = 0; i < reference.rows(); ++i) {
    for (Index j = 0; j < reference.cols(); ++j) {
      const double r = static_cast<double>(reference(i, j));
      const double difference = std::abs(static_cast<double>(analytic(i, j)) - r);
      result.max_abs_reference = std::max(result.max_abs_reference, std::abs(r));
      // A NaN difference is recorded and then kept.
      if (!std::isnan(result.max_abs_difference) && !(difference <= result.max_abs_difference)) {
        result.max_abs_difference = difference;
        result.worst_row = i;
        result.worst_col = j;
      }
    }
  }
  return result;
}

/// A random direction with entries uniform in [-1, 1], from a caller-seeded engine.
template <class Engine>
RowMatrix<double> random_direction(Index rows, Index cols, Engine& engine) {
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  RowMatrix<double> v(rows, cols);
  for (Index i = 0; i < v.size(); ++i) v.data()[i] = uniform(engine);
  return v;
}

}  // namespace testing
}  // namespace metricloss
