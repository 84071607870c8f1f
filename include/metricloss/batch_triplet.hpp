#pragma once
// Triplet loss with online mining over one labelled batch x (N x D), labels y:
//   P(a) = {p != a : y_p = y_a},  Neg(a) = {n : y_n != y_a},  d = ||.||_2 or ||.||^2,
//   h(x) = max(x, 0), or softplus(x) = log(1 + e^x) with soft_margin.
//
//   all:      L = sum_{a, p in P(a), n in Neg(a)} h(d_ap - d_an + m) / Z, Z = number of
//             triplets with h > 0 (every triplet with soft_margin); L = 0 when Z = 0.
//   hard:     L = mean over anchors with P(a), Neg(a) non-empty of
//             h(max_p d_ap - min_n d_an + m)                         (Hermans et al. 2017)
//   semihard: L = mean over (a, p in P(a)) with Neg(a) non-empty of h(d_ap - d_an* + m),
//             n* = argmin {d_an : d_an > d_ap}, else argmax_n d_an    (FaceNet; TF Addons)
//
// Gradient. Each mined term adds to W_ij = dL/dq_ij (q = squared distances, one entry per
// ordered pair): h'(x) dd/dq (q_ap) to W_ap and -h'(x) dd/dq (q_an) to W_an, with
// dd/dq = 1 (squared) or 1/(2d) (Euclidean; 0 at d = 0: no epsilon). The normaliser (Z,
// the anchors, the pairs) is piecewise constant and carries no gradient. Then
//   dL/dx_i = 2 sum_j S_ij (x_i - x_j),  S = W + W^T,   i.e.  dX = 2 (diag(S 1) - S) X.
//
// Paths. scalar: exact distances by differences and the sum above by loops, in double
// (O(N^2 D)). simd: the distances by one product on the centred batch
// (detail::PairwiseDistances), every distance that enters the loss of a mined term
// recomputed by differences (positives always; for hard and semihard also the mined
// negatives; for all the negatives keep the product's distances, accurate to ~1e-6
// relative in float). For all, dX by one (N x N)(N x D) product, except that the pairs
// close against their distance to the batch mean add their gradient by differences, where
// the product would cancel; hard and semihard give W two entries per mined term (O(N c) of
// N^2), applied by differences, 2 w (x_i - x_j), in O(entries D). Both paths share the
// mining (detail/batch_triplet_mining.hpp).
//
// normalize = true: the loss of the L2-normalised rows (Q and R alike), the gradient chained
// through the normalisation (detail/normalize.hpp); a zero row is an invalid_argument.
//
// Edge cases. Nothing to average (one class, singletons only, N = 1): L = 0 and a zero
// gradient. A NaN label or a non-finite entry of x makes the loss and every gradient entry
// NaN (mining is global: one NaN can change every selection).
//
// This header holds the options, validation and dispatch; the kernels are in
// backend/scalar/batch_triplet.hpp, backend/simd/batch_triplet.hpp and
// backend/cuda/batch_triplet.cuh, the selection rules in detail/batch_triplet_mining.hpp
// (docs/design.md).
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/narrow.hpp>
#include <metricloss/detail/normalize.hpp>
#include <metricloss/detail/sharded.hpp>
#include <metricloss/detail/sharded_reference.hpp>
#include <metricloss/detail/validate.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/exec.hpp>
#include <metricloss/options.hpp>
#include <metricloss/reference.hpp>
#include <metricloss/types.hpp>

#include <type_traits>
#include <utility>

namespace metricloss {

/// Triplet loss with online mining over a labelled batch (all, batch-hard, semihard). See the
/// formulas at the top of this header. One instance per thread; it keeps scratch memory.
template <class T>
class BatchTripletLoss {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "metricloss::BatchTripletLoss<T>: T must be float or double");

 public:
  using scalar_type = T;

  T margin;
  Mining mining;
  Distance distance;
  /// softplus(x) in place of max(x, 0).
  bool soft_margin;
  /// Rows L2-normalised inside the call, the gradient chained through (a zero row throws).
  bool normalize = false;

  explicit BatchTripletLoss(T margin_ = T(0.2), Mining mining_ = Mining::hard,
                            Distance distance_ = Distance::euclidean, bool soft_margin_ = false)
      : margin(margin_), mining(mining_), distance(distance_), soft_margin(soft_margin_) {}

  /// Loss only.
  template <class Tag, class X, class L, std::enable_if_t<detail::is_label_vector_v<L>, int> = 0>
  T forward(Tag tag, const Eigen::MatrixBase<X>& x, const Eigen::MatrixBase<L>& labels) {
    return run(tag, "forward", x, labels, skip, T(1));
  }

  /// Loss, and its gradient times top_diff written into grad_x (or `metricloss::skip`).
  template <class Tag, class X, class L, class G,
            std::enable_if_t<detail::is_label_vector_v<L> && detail::is_gradient_output_v<G>, int> = 0>
  T forward_backward(Tag tag, const Eigen::MatrixBase<X>& x, const Eigen::MatrixBase<L>& labels,
                     G&& grad_x, T top_diff = T(1)) {
    return run(tag, "forward_backward", x, labels, std::forward<G>(grad_x), top_diff);
  }

  /// Loss of the queries q against a reference set (metricloss::reference): anchors are the
  /// rows of q, positives and negatives the rows of R.
  template <class Tag, class X, class L, class TR, class LR,
            std::enable_if_t<detail::is_label_vector_v<L>, int> = 0>
  T forward(Tag tag, const Eigen::MatrixBase<X>& q, const Eigen::MatrixBase<L>& labels_q,
            const ReferenceSet<TR, LR>& ref) {
    return run_reference(tag, "forward", q, labels_q, ref, skip, skip, T(1));
  }

  /// The same with the gradients times top_diff written into grad_q and grad_r (either may
  /// be `metricloss::skip`).
  template <class Tag, class X, class L, class TR, class LR, class GQ, class GR,
            std::enable_if_t<detail::is_label_vector_v<L> && detail::is_gradient_output_v<GQ> &&
                                 detail::is_gradient_output_v<GR>,
                             int> = 0>
  T forward_backward(Tag tag, const Eigen::MatrixBase<X>& q, const Eigen::MatrixBase<L>& labels_q,
                     const ReferenceSet<TR, LR>& ref, GQ&& grad_q, GR&& grad_r, T top_diff = T(1)) {
    return run_reference(tag, "forward_backward", q, labels_q, ref, std::forward<GQ>(grad_q),
                         std::forward<GR>(grad_r), top_diff);
  }

  /// Calls visit(name, value) for each option, in a fixed order: what a sharded call
  /// compares across ranks (every rank must pass the same options).
  template <class Visitor>
  void visit_options(Visitor&& visit) const {
    visit("margin", margin);
    visit("mining", mining);
    visit("distance", distance);
    visit("soft_margin", soft_margin);
    visit("normalize", normalize);
  }

 private:
  void check_options(detail::Validator& check) const {
    check.margin(margin);
    detail::check_mining(check, mining);
    detail::check_distance(check, distance);
  }

  // Narrow (half / bfloat16) embeddings, reference set or gradients: the same call on their
  // widened values (detail/narrow.hpp); every other call goes straight to run_native
  // (its sharded_tag overload on a sharded tag).
  template <class Tag, class X, class L, class G>
  T run(const Tag& tag, const char* method, const Eigen::MatrixBase<X>& x,
        const Eigen::MatrixBase<L>& labels, G&& grad_x, T top_diff) {
    return detail::batch_call<T>(
        *this, tag, "BatchTripletLoss", method, x, std::forward<G>(grad_x),
        [&](const auto& x_rows, auto&& g_rows) {
          return run_native(tag, method, x_rows, labels, std::forward<decltype(g_rows)>(g_rows),
                            top_diff);
        });
  }

  template <class Tag, class X, class L, class TR, class LR, class GQ, class GR>
  T run_reference(const Tag& tag, const char* method, const Eigen::MatrixBase<X>& q,
                  const Eigen::MatrixBase<L>& labels_q, const ReferenceSet<TR, LR>& ref,
                  GQ&& grad_q, GR&& grad_r, T top_diff) {
    return detail::reference_call<T>(
        *this, tag, "BatchTripletLoss", method, q, ref, std::forward<GQ>(grad_q),
        std::forward<GR>(grad_r),
        [&](const auto& q_rows, const auto& r_set, auto&& gq_rows, auto&& gr_rows) {
          return run_reference_native(tag, method, q_rows, labels_q, r_set,
                                      std::forward<decltype(gq_rows)>(gq_rows),
                                      std::forward<decltype(gr_rows)>(gr_rows), top_diff);
        });
  }

  // The global batch of a group of ranks (detail/sharded.hpp).
  template <class Base, class Group, class X, class L, class G>
  T run_native(const sharded_tag<Base, Group>& tag, const char* method,
               const Eigen::MatrixBase<X>& x, const Eigen::MatrixBase<L>& labels, G&& grad_x,
               T top_diff) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::BatchTripletLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    return detail::run_sharded(*this, tag, "BatchTripletLoss", method, x, labels,
                               std::forward<G>(grad_x), top_diff,
                               [&](detail::Validator& check) { check_options(check); });
  }

  template <class Tag, class X, class L, class G>
  T run_native(Tag tag, const char* method, const Eigen::MatrixBase<X>& x,
               const Eigen::MatrixBase<L>& labels, G&& grad_x, T top_diff) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::BatchTripletLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    detail::Validator check("BatchTripletLoss", detail::scalar_name<T>(), method);
    const auto xv = detail::input_view(x);
    check.embeddings("x", xv);
    const auto lv = detail::label_view(labels);
    check.labels("labels", lv, xv.rows, "x");
    check_options(check);
    const auto gv = detail::gradient_view<T>(std::forward<G>(grad_x));
    check.gradient("grad_x", gv, "x", xv);
    return detail::normalized(*this, tag, check, normalize, xv, gv,
                              [&](auto path, const auto& x_rows, const auto& g_rows) {
      return detail::Backend<BatchTripletLoss, decltype(path)>::forward_backward(*this, path, x_rows, lv,
                                                                   g_rows, top_diff);
    });
  }

  // Queries sharded over a group's ranks, R the same on every rank
  // (detail/sharded_reference.hpp).
  template <class Base, class Group, class X, class L, class LR, class GQ, class GR>
  T run_reference_native(const sharded_tag<Base, Group>& tag, const char* method,
                         const Eigen::MatrixBase<X>& q, const Eigen::MatrixBase<L>& labels_q,
                         const ReferenceSet<T, LR>& ref, GQ&& grad_q, GR&& grad_r, T top_diff) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::BatchTripletLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    return detail::run_sharded_reference(*this, tag, "BatchTripletLoss", method, q, labels_q, ref,
                                         std::forward<GQ>(grad_q), std::forward<GR>(grad_r),
                                         top_diff,
                                         [&](detail::Validator& check) { check_options(check); });
  }

  template <class Tag, class X, class L, class LR, class GQ, class GR>
  T run_reference_native(Tag tag, const char* method, const Eigen::MatrixBase<X>& q,
                         const Eigen::MatrixBase<L>& labels_q, const ReferenceSet<T, LR>& ref,
                         GQ&& grad_q, GR&& grad_r, T top_diff) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::BatchTripletLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    static_assert(detail::ReferenceBackend<BatchTripletLoss, Tag>::available,
                  "metricloss::BatchTripletLoss: reference sets run on metricloss::scalar, "
                  "metricloss::simd and metricloss::cuda (<metricloss/cuda.cuh>)");
    detail::Validator check("BatchTripletLoss", detail::scalar_name<T>(), method);
    const auto qv = detail::input_view(q);
    check.embeddings("q", qv);
    const auto lv = detail::label_view(labels_q);
    check.labels("labels_q", lv, qv.rows, "q");
    check_options(check);
    const auto gq = detail::gradient_view<T>(std::forward<GQ>(grad_q));
    const auto gr = detail::gradient_view<T>(std::forward<GR>(grad_r));
    detail::check_reference(check, qv, lv, ref.view, gq, gr, detail::normalizes_on_host<Tag>);
    return detail::normalized(*this, tag, check, normalize, qv, ref.view, gq, gr,
                              [&](auto path, const auto& q_rows, const auto& r_rows,
                                  const auto& gq_rows, const auto& gr_rows) {
      return detail::ReferenceBackend<BatchTripletLoss, decltype(path)>::forward_backward(
          *this, path, q_rows, lv, r_rows, gq_rows, gr_rows, top_diff);
    });
  }

  friend struct detail::BackendSlotAccess;
  detail::BackendSlot backend_slot_;  // each backend's scratch
  template <class, class>
  friend struct detail::Backend;
};

}  // namespace metricloss
