#pragma once
// A float call run in double, for any loss: x widened, the same loss in double, the gradient
// rounded back to float. For float inputs at scales where the float path would have to
// recompute a large share of its terms in double anyway (the decision is the loss's: its
// precision plan and backend/simd/tuning.hpp's cost model).
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/views.hpp>

namespace metricloss {
namespace detail {

/// row[0, n) in double: the row itself, or widened into `buffer` by one loop (GCC turns it
/// into packed conversions; xsimd 8.1 converts a float load element by element).
inline const double* widened_row(const double* row, Index, GrowOnlyBuffer<double>&) { return row; }
inline const double* widened_row(const float* row, Index n, GrowOnlyBuffer<double>& buffer) {
  double* out = buffer.data(static_cast<std::size_t>(n));
  for (Index j = 0; j < n; ++j) out[j] = static_cast<double>(row[j]);
  return out;
}

/// What a float functor keeps for its calls in double: the double functor, and x and the
/// gradient in double from 64-byte boundaries (AlignedBuffer: a reused functor gives the
/// bits of a fresh one).
template <class WideLoss>
struct Widened : BackendSlot::Contents {
  WideLoss loss;
  AlignedBuffer<double> x, grad;
};

/// Returns call(wide, x in double, gradient in double or empty) as T, the gradient rounded
/// into grad; wide is a WideLoss kept in the float functor's slot (the caller sets its
/// options).
template <class WideLoss, class T, class Call>
T in_double(BackendSlot& slot, const MatrixView<const T>& x, const MatrixView<T>& grad, Call&& call) {
  Widened<WideLoss>& wide = slot.get<Widened<WideLoss>>();
  const Index n = x.rows, d = x.cols;
  const auto size = static_cast<std::size_t>(n * d);
  double* xd = wide.x.data(size);
  for (Index i = 0; i < n; ++i)
    for (Index c = 0; c < d; ++c) xd[i * d + c] = static_cast<double>(x(i, c));
  MatrixView<double> gd{};
  if (!grad.empty()) gd = MatrixView<double>{wide.grad.data(size), n, d, d};
  const double value = call(wide.loss, MatrixView<const double>{xd, n, d, d}, gd);
  for (Index i = 0; i < gd.rows; ++i)
    for (Index c = 0; c < d; ++c) grad(i, c) = static_cast<T>(gd(i, c));
  return static_cast<T>(value);
}

}  // namespace detail
}  // namespace metricloss
