#pragma once
// `normalize = true` on a batch loss (API.md): the rows are L2-normalised inside the call,
// u_i = x_i / ||x_i||, the loss runs on u, and the gradient is chained through the
// normalisation, in place on the caller's gradient:
//   dL/dx_i = (g_i - u_i (u_i . g_i)) / ||x_i||,   g_i = dL/du_i (times top_diff),
// since du_i/dx_i = (I - u_i u_i^T) / ||x_i||. With a reference set Q and R alike.
//
// One mechanism for every batch loss face. After every check of the call has passed, the
// face's dispatch becomes (batch form, then reference form):
//
//   return detail::normalized(*this, tag, check, normalize, xv, gv,
//                             [&](auto path, const auto& x_rows, const auto& g_rows) {
//     return detail::Backend<Loss, decltype(path)>::forward_backward(*this, path, x_rows, lv,
//                                                                    g_rows, top_diff);
//   });
//
//   return detail::normalized(*this, tag, check, normalize, qv, ref.view, gq, gr,
//                             [&](auto path, const auto& q_rows, const auto& r_rows,
//                                 const auto& gq_rows, const auto& gr_rows) {
//     return detail::ReferenceBackend<Loss, decltype(path)>::forward_backward(
//         *this, path, q_rows, lv, r_rows, gq_rows, gr_rows, top_diff);
//   });
//
// plus the member `bool normalize = false;` and `#include <metricloss/detail/normalize.hpp>`.
//
// With normalize false the call goes straight through. A zero row fails through `check`
// before the backend runs, so nothing is written; a non-finite row gives a non-finite
// norm and so a NaN in its unit row: the backend's NaN loss and NaN gradient, as without
// normalize.
// The unit rows live in the functor's slot (NormalizedRows): nothing is allocated once
// warm. The host tags normalise here; a device tag does where DeviceNormalize<Tag> (batch
// form) or DeviceReferenceNormalize<Tag> (reference form) says so (backend/cuda/normalize.cuh,
// backend/cuda/reference.cuh: the loss runs on unit rows in device memory, with its gradient
// in workspace, hence the path tag and gradients the call receives; sharded calls:
// detail/sharded.hpp and backend/cuda/sharded.cuh). Any other tag rejects normalize = true.
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/reference_view.hpp>
#include <metricloss/detail/validate.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/exec.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <type_traits>

namespace metricloss {
namespace detail {

/// The tags whose inputs are host memory, where the rows are normalised here.
template <class Tag>
inline constexpr bool normalizes_on_host =
    std::is_same<Tag, scalar_tag>::value || std::is_same<Tag, simd_tag>::value;

/// A device tag that normalises (the batch form) specialises this with `available = true` and
/// `static T batch(loss, tag, check, x, grad, call)`.
template <class Tag>
struct DeviceNormalize {
  static constexpr bool available = false;
};

/// The same for the reference form: `static T reference(loss, tag, check, q, ref, grad_q,
/// grad_r, call)`.
template <class Tag>
struct DeviceReferenceNormalize {
  static constexpr bool available = false;
};

template <class Tag>
[[noreturn]] void reject_normalize_off_host(Validator& check) {
  static_assert(!normalizes_on_host<Tag>, "host tags normalise");
  check.fail("option 'normalize' runs on metricloss::scalar, metricloss::simd and "
             "metricloss::cuda so far");
}

/// A zero row under normalize = true, on any path.
[[noreturn]] inline void fail_zero_row(const Validator& check, const char* name, Index row, Index n,
                                       Index d) {
  check.fail(std::string("argument '") + name + "' has row " + std::to_string(row) + " of norm 0 ('" +
             name + "' is " + shape_string(n, d) + "); option 'normalize' needs every row nonzero");
}

/// ||row||_2, accumulated in double: 0 only for a zero row, NaN or inf for a non-finite one.
/// Sum of the squares in four interleaved partial sums: one chain of d dependent adds costs
/// d times an add's latency (a third of a small batch loss's time once normalised).
template <class T>
double row_norm(const T* row, Index d) {
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  Index i = 0;
  for (; i + 4 <= d; i += 4)
    for (int k = 0; k < 4; ++k) part[k] += static_cast<double>(row[i + k]) * static_cast<double>(row[i + k]);
  for (; i < d; ++i) part[0] += static_cast<double>(row[i]) * static_cast<double>(row[i]);
  const double sum = (part[0] + part[1]) + (part[2] + part[3]);
  // Every float row and ordinary double rows: the plain sum neither overflows nor loses
  // squares to underflow.
  if (sum >= 1e-290 && sum <= std::numeric_limits<double>::max()) return std::sqrt(sum);
  if (std::isnan(sum)) return sum;
  // Double rows with entries beyond ~1e154 or below ~1e-145: scaled by the largest entry.
  double largest = 0.0;
  for (Index c = 0; c < d; ++c) largest = std::max(largest, std::abs(static_cast<double>(row[c])));
  if (largest == 0.0 || std::isinf(largest)) return largest;
  double scaled = 0.0;
  for (Index c = 0; c < d; ++c) {
    const double v = static_cast<double>(row[c]) / largest;
    scaled += v * v;
  }
  return largest * std::sqrt(scaled);
}

/// One input's unit rows (dense, from a 64-byte boundary: the backends' bits must not
/// depend on where the scratch happens to lie) and its norms in double.
template <class T>
struct UnitRows {
  AlignedBuffer<T> rows;
  GrowOnlyBuffer<double> norms;

  /// Fills rows and norms from x; a zero row fails through `check`, naming `name`.
  MatrixView<const T> of(Validator& check, const char* name, const MatrixView<const T>& x) {
    const Index n = x.rows, d = x.cols;
    T* unit = rows.data(static_cast<std::size_t>(n * d));
    double* norm = norms.data(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) {
      norm[i] = row_norm(x.row(i), d);
      if (norm[i] == 0.0) fail_zero_row(check, name, i, n, d);
      // By the reciprocal (within an ulp of the quotient in double, then rounded to T): a
      // division per entry cost as much as the rest of the normalisation.
      const double inverse = 1.0 / norm[i];
      const T* xi = x.row(i);
      for (Index c = 0; c < d; ++c) unit[i * d + c] = static_cast<T>(static_cast<double>(xi[c]) * inverse);
    }
    return {unit, n, d, d};
  }

  /// grad holds dL/du; overwrites it with dL/dx = (g - u (u . g)) / ||x||, u = x / ||x||
  /// taken from x in double (not the rounded unit rows).
  void chain(const MatrixView<const T>& x, const MatrixView<T>& grad) {
    if (grad.empty()) return;
    const double* norm = norms.data(0);
    const Index d = x.cols;
    for (Index i = 0; i < x.rows; ++i) {
      const T* xi = x.row(i);
      T* gi = grad.row(i);
      const double inverse = 1.0 / norm[i];
      double part[4] = {0.0, 0.0, 0.0, 0.0};  // u_i . g_i in four partial sums (row_norm)
      Index c = 0;
      for (; c + 4 <= d; c += 4)
        for (int k = 0; k < 4; ++k)
          part[k] += static_cast<double>(xi[c + k]) * inverse * static_cast<double>(gi[c + k]);
      for (; c < d; ++c) part[0] += static_cast<double>(xi[c]) * inverse * static_cast<double>(gi[c]);
      const double along = (part[0] + part[1]) + (part[2] + part[3]);
      for (c = 0; c < d; ++c)
        gi[c] = static_cast<T>((static_cast<double>(gi[c]) - static_cast<double>(xi[c]) * inverse * along) *
                               inverse);
    }
  }
};

/// What a functor keeps for normalize = true: the unit rows of x (or Q) and of R.
template <class T>
struct NormalizedRows : BackendSlot::Contents {
  UnitRows<T> x, r;
};

/// The batch form: call(tag, x, grad); or call(tag, unit rows of x, grad) with grad chained
/// afterwards in place; or, on a device tag, DeviceNormalize's own sequence.
template <class Loss, class Tag, class T, class Call>
auto normalized(Loss& loss, Tag tag, Validator& check, bool normalize, const MatrixView<const T>& x,
                const MatrixView<T>& grad, Call&& call) {
  if (!normalize) return call(tag, x, grad);
  if constexpr (normalizes_on_host<Tag>) {
    auto& unit = scratch_of<NormalizedRows<T>>(loss);
    const auto value = call(tag, unit.x.of(check, "x", x), grad);
    unit.x.chain(x, grad);
    return value;
  } else if constexpr (DeviceNormalize<Tag>::available) {
    return DeviceNormalize<Tag>::batch(loss, tag, check, x, grad, call);
  } else {
    reject_normalize_off_host<Tag>(check);
  }
}

/// The reference form: call(tag, q, ref, grad_q, grad_r), or call on the unit rows of Q and
/// of R, with grad_q and grad_r chained afterwards; or DeviceReferenceNormalize's sequence.
template <class Loss, class Tag, class T, class LR, class Call>
auto normalized(Loss& loss, Tag tag, Validator& check, bool normalize, const MatrixView<const T>& q,
                const ReferenceView<T, LR>& ref, const MatrixView<T>& grad_q,
                const MatrixView<T>& grad_r, Call&& call) {
  if (!normalize) return call(tag, q, ref, grad_q, grad_r);
  if constexpr (normalizes_on_host<Tag>) {
    auto& unit = scratch_of<NormalizedRows<T>>(loss);
    const MatrixView<const T> unit_q = unit.x.of(check, "q", q);
    ReferenceView<T, LR> unit_ref = ref;
    unit_ref.r = unit.r.of(check, "r", ref.r);
    const auto value = call(tag, unit_q, unit_ref, grad_q, grad_r);
    unit.x.chain(q, grad_q);
    unit.r.chain(ref.r, grad_r);
    return value;
  } else if constexpr (DeviceReferenceNormalize<Tag>::available) {
    return DeviceReferenceNormalize<Tag>::reference(loss, tag, check, q, ref, grad_q, grad_r, call);
  } else {
    reject_normalize_off_host<Tag>(check);
  }
}

}  // namespace detail
}  // namespace metricloss
