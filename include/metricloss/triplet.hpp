#pragma once
// Triplet loss over explicit triplets (anchor_i, positive_i, negative_i):
//
//   L = 1/N sum_i max(d(a_i, p_i) - d(a_i, n_i) + margin, 0)
//     d = ||.||^2 (Distance::squared_euclidean, FaceNet) or ||.||_2 (Distance::euclidean)
//
// With q_ap = ||a_i - p_i||^2, q_an = ||a_i - n_i||^2 and, for an active triplet (positive
// hinge), w_p = dd/dq (q_ap), w_n = dd/dq (q_an)  (1 squared; 1/(2d) Euclidean, 0 at d = 0):
//   dL/da_i = 2/N [w_p (a_i - p_i) - w_n (a_i - n_i)],
//   dL/dp_i = -2/N w_p (a_i - p_i),   dL/dn_i = 2/N w_n (a_i - n_i),
// and zero for inactive triplets (subgradient 0 at the hinge). No epsilon anywhere.
#include <metricloss/detail/triplet_math.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/narrow.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/validate.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/exec.hpp>
#include <metricloss/options.hpp>
#include <metricloss/types.hpp>

#include <cmath>
#include <type_traits>
#include <utility>

namespace metricloss {

namespace detail {

/// Whether a hinge argument d_ap - d_an + m lies within Numerics' hinge_rounding_factor
/// times the rounding of its two distances (or squared distances; each q errs by at most
/// unit * q), `values` their sum: inside it the sign would be the rounding's (two large
/// nearly equal distances, fuzz finding 3), and the row is recomputed in double. The factor
/// is the same for every T.
inline bool hinge_within_rounding(double argument, double values, double unit) {
  return std::fabs(argument) <= Numerics<double>::hinge_rounding_factor * unit * values;
}

/// hinge_within_rounding from the two squared distances.
inline bool hinge_near_rounding(double squared_positive, double squared_negative, double margin,
                                Distance distance, double unit) {
  if (unit == 0.0) return false;
  if (distance == Distance::squared_euclidean)
    return hinge_within_rounding(squared_positive - squared_negative + margin,
                                 squared_positive + squared_negative, unit);
  const double positive = std::sqrt(squared_positive), negative = std::sqrt(squared_negative);
  return hinge_within_rounding(positive - negative + margin, positive + negative, unit);
}

/// The fused pass shared by the CPU backends, parameterised on their row primitives.
/// Rows go in blocks: the two distances of each triplet of a block first (independent
/// reductions that overlap in the pipeline), then its gradients while its rows are still in
/// L1, so each input row is read from memory once and each output row written once.
template <class RowOps, class T>
double triplet_forward_backward(const MatrixView<const T>& anchor,
                                const MatrixView<const T>& positive,
                                const MatrixView<const T>& negative, double margin,
                                Distance distance, const MatrixView<T>& grad_anchor,
                                const MatrixView<T>& grad_positive,
                                const MatrixView<T>& grad_negative, double top_diff) {
  constexpr Index block = 16;  // 3 x 16 rows at D = 128 floats: 24 KiB, inside L1
  const Index n = anchor.rows, d = anchor.cols;
  const bool any_gradient = !grad_anchor.empty() || !grad_positive.empty() || !grad_negative.empty();
  const double scale = 2.0 * top_diff / static_cast<double>(n);
  double sum = 0.0;
  double coefficient_positive[block], coefficient_negative[block];
  for (Index i0 = 0; i0 < n; i0 += block) {
    const Index rows = n - i0 < block ? n - i0 : block;
    for (Index r = 0; r < rows; ++r) {
      const Index i = i0 + r;
      double squared_positive, squared_negative;
      RowOps::anchor_squared_distances(anchor.row(i), positive.row(i), negative.row(i), d,
                                       squared_positive, squared_negative);
      if (hinge_near_rounding(squared_positive, squared_negative, margin, distance,
                              RowOps::template sum_rounding_unit<T>(d)))  // rare
        RowOps::exact_anchor_squared_distances(anchor.row(i), positive.row(i), negative.row(i), d,
                                               squared_positive, squared_negative);
      const TripletTerm t = triplet_term(squared_positive, squared_negative, margin, distance,
                                         /*soft_margin=*/false);
      sum += t.loss;
      coefficient_positive[r] = scale * t.positive_weight;
      coefficient_negative[r] = scale * t.negative_weight;
    }
    if (!any_gradient) continue;
    for (Index r = 0; r < rows; ++r) {
      const Index i = i0 + r;
      RowOps::triplet_gradients(grad_anchor.empty() ? nullptr : grad_anchor.row(i),
                                grad_positive.empty() ? nullptr : grad_positive.row(i),
                                grad_negative.empty() ? nullptr : grad_negative.row(i),
                                anchor.row(i), positive.row(i), negative.row(i),
                                coefficient_positive[r], coefficient_negative[r], d);
    }
  }
  return sum / static_cast<double>(n);
}

}  // namespace detail

/// Triplet loss over explicit triplets (Schroff, Kalenichenko, Philbin 2015). See the formula
/// at the top of this header. One instance per thread.
template <class T>
class TripletLoss {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "metricloss::TripletLoss<T>: T must be float or double");

 public:
  using scalar_type = T;

  T margin;
  Distance distance;

  explicit TripletLoss(T margin_ = T(0.2), Distance distance_ = Distance::squared_euclidean)
      : margin(margin_), distance(distance_) {}

  /// Loss only.
  template <class Tag, class A, class P, class N>
  T forward(Tag tag, const Eigen::MatrixBase<A>& anchor, const Eigen::MatrixBase<P>& positive,
            const Eigen::MatrixBase<N>& negative) {
    return run(tag, "forward", anchor, positive, negative, skip, skip, skip, T(1));
  }

  /// Loss, and the gradients times top_diff written into grad_anchor, grad_positive and
  /// grad_negative (any of them may be `metricloss::skip`).
  template <class Tag, class A, class P, class N, class GA, class GP, class GN,
            std::enable_if_t<detail::is_gradient_output_v<GA> && detail::is_gradient_output_v<GP> &&
                                 detail::is_gradient_output_v<GN>,
                             int> = 0>
  T forward_backward(Tag tag, const Eigen::MatrixBase<A>& anchor,
                     const Eigen::MatrixBase<P>& positive, const Eigen::MatrixBase<N>& negative,
                     GA&& grad_anchor, GP&& grad_positive, GN&& grad_negative,
                     T top_diff = T(1)) {
    return run(tag, "forward_backward", anchor, positive, negative, std::forward<GA>(grad_anchor),
               std::forward<GP>(grad_positive), std::forward<GN>(grad_negative), top_diff);
  }

 private:
  // Narrow (half / bfloat16) embeddings or gradients: the same call on their widened values
  // (detail/narrow.hpp); every other call goes straight to run_native.
  template <class Tag, class A, class P, class N, class GA, class GP, class GN>
  T run(Tag tag, const char* method, const Eigen::MatrixBase<A>& anchor,
        const Eigen::MatrixBase<P>& positive, const Eigen::MatrixBase<N>& negative,
        GA&& grad_anchor, GP&& grad_positive, GN&& grad_negative, T top_diff) {
    if constexpr (detail::any_narrow_v<A, P, N, GA, GP, GN>) {
      return detail::widened<T>(
          *this, tag, "TripletLoss", method, false,
          [&](const auto& a_wide, const auto& p_wide, const auto& n_wide, auto&& ga_wide,
              auto&& gp_wide, auto&& gn_wide) {
            return run_native(tag, method, a_wide, p_wide, n_wide,
                              std::forward<decltype(ga_wide)>(ga_wide),
                              std::forward<decltype(gp_wide)>(gp_wide),
                              std::forward<decltype(gn_wide)>(gn_wide), top_diff);
          },
          detail::embedding_argument("anchor", anchor),
          detail::embedding_argument("positive", positive),
          detail::embedding_argument("negative", negative),
          detail::gradient_argument("grad_anchor", std::forward<GA>(grad_anchor)),
          detail::gradient_argument("grad_positive", std::forward<GP>(grad_positive)),
          detail::gradient_argument("grad_negative", std::forward<GN>(grad_negative)));
    } else {
      return run_native(tag, method, anchor, positive, negative, std::forward<GA>(grad_anchor),
                        std::forward<GP>(grad_positive), std::forward<GN>(grad_negative),
                        top_diff);
    }
  }

  template <class Tag, class A, class P, class N, class GA, class GP, class GN>
  T run_native(Tag tag, const char* method, const Eigen::MatrixBase<A>& anchor,
               const Eigen::MatrixBase<P>& positive, const Eigen::MatrixBase<N>& negative,
               GA&& grad_anchor, GP&& grad_positive, GN&& grad_negative, T top_diff) {
    detail::Validator check("TripletLoss", detail::scalar_name<T>(), method);
    const auto av = input(check, "anchor", anchor);
    const auto pv = input(check, "positive", positive);
    const auto nv = input(check, "negative", negative);
    check.same_shape("positive", pv, "anchor", av);
    check.same_shape("negative", nv, "anchor", av);
    check.margin(margin);
    detail::check_distance(check, distance);
    const auto ga = detail::gradient_view<T>(std::forward<GA>(grad_anchor));
    const auto gp = detail::gradient_view<T>(std::forward<GP>(grad_positive));
    const auto gn = detail::gradient_view<T>(std::forward<GN>(grad_negative));
    check.gradient("grad_anchor", ga, "anchor", av);
    check.gradient("grad_positive", gp, "anchor", av);
    check.gradient("grad_negative", gn, "anchor", av);
    return detail::Backend<TripletLoss, Tag>::forward_backward(*this, tag, av, pv, nv, ga, gp,
                                                               gn, top_diff);
  }

  friend struct detail::BackendSlotAccess;
  detail::BackendSlot backend_slot_;  // scratch of backends outside the CPU headers (CUDA)
  template <class X>
  static detail::MatrixView<const T> input(detail::Validator& check, const char* name,
                                           const Eigen::MatrixBase<X>& x) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::TripletLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    const auto view = detail::input_view(x);
    check.embeddings(name, view);
    return view;
  }
};

}  // namespace metricloss
