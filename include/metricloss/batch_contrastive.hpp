#pragma once
// Contrastive loss over every pair of a labelled batch (pytorch-metric-learning's
// ContrastiveLoss with its default reducer; Hadsell et al. 2006 with linear hinges):
//
//   d_ij = ||x_i - x_j||_2 (or its square),   over ordered pairs i != j,
//   positive (y_i = y_j):  l_ij = [d_ij - pos_margin]_+
//   negative (y_i != y_j): l_ij = [neg_margin - d_ij]_+
//   L = (mean of the positive terms) + (mean of the negative terms), each 0 without terms,
//   the means over the terms > 0 (Reduction::nonzero_mean) or over every pair of the side
//   (Reduction::mean).
//
// Gradient. With C_+ and C_- the two counts, dL/dD2_ij = s_ij / C_side where s_ij is the
// slope of the pair's term in D2 = d_ij^2: +-1/(2 d_ij) (Euclidean), +-1 (squared), and 0
// for a term that is 0 (a hinge at exactly 0 is inactive) or at d_ij = 0 (no epsilon: the
// subgradient of ||x_i - x_j|| at 0 is 0). dL/dx_i = 2 sum_j (W_ij + W_ji) (x_i - x_j): the
// weight-matrix form of every batch loss (docs/design.md), one product on the simd path.
// The term of (i, j) equals that of (j, i), so the batch form sweeps each unordered pair once.
//
// A reference set (metricloss::reference) takes the ordered pairs (a in Q, j in R,
// j != self(a)) instead, with the same means.
//
// normalize = true: the loss of the L2-normalised rows (Q and R alike), the gradient chained
// through the normalisation (detail/normalize.hpp): pytorch-metric-learning's default.
//
// Edge cases: one class (no negatives), classes of one (no positives): that side adds 0.
// A NaN label or a non-finite entry makes the loss and the gradient NaN.
//
// This header holds the options, validation and dispatch; the per-pair maths is in
// detail/batch_contrastive_math.hpp, the kernels in backend/scalar/batch_contrastive.hpp and
// backend/simd/batch_contrastive.hpp.
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

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

namespace metricloss {

/// Contrastive loss over all pairs of a labelled batch (or of queries against a reference
/// set). See the formula at the top of this header. One instance per thread; it keeps
/// scratch memory.
template <class T>
class BatchContrastiveLoss {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "metricloss::BatchContrastiveLoss<T>: T must be float or double");

 public:
  using scalar_type = T;

  T pos_margin;
  T neg_margin;
  Distance distance;
  Reduction reduction = Reduction::nonzero_mean;
  /// Rows L2-normalised inside the call, the gradient chained through (a zero row throws).
  bool normalize = false;

  explicit BatchContrastiveLoss(T pos_margin_ = T(0), T neg_margin_ = T(1),
                                Distance distance_ = Distance::euclidean)
      : pos_margin(pos_margin_), neg_margin(neg_margin_), distance(distance_) {}

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

  /// Loss of the queries q against a reference set (metricloss::reference).
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
    visit("pos_margin", pos_margin);
    visit("neg_margin", neg_margin);
    visit("distance", distance);
    visit("reduction", reduction);
    visit("normalize", normalize);
  }

 private:
  void check_options(detail::Validator& check) const {
    for (const auto& option : {std::make_pair("pos_margin", pos_margin),
                               std::make_pair("neg_margin", neg_margin)})
      if (!std::isfinite(option.second))
        check.fail(std::string("option '") + option.first + "' is " +
                   detail::Validator::number(static_cast<double>(option.second)) + "; it must be finite");
    detail::check_distance(check, distance);
    if (reduction != Reduction::nonzero_mean && reduction != Reduction::mean)
      check.fail("option 'reduction' has the undeclared value " +
                 std::to_string(static_cast<int>(reduction)));
  }

  // Narrow (half / bfloat16) embeddings, reference set or gradients: the same call on their
  // widened values (detail/narrow.hpp); every other call goes straight to run_native
  // (its sharded_tag overload on a sharded tag).
  template <class Tag, class X, class L, class G>
  T run(const Tag& tag, const char* method, const Eigen::MatrixBase<X>& x,
        const Eigen::MatrixBase<L>& labels, G&& grad_x, T top_diff) {
    return detail::batch_call<T>(
        *this, tag, "BatchContrastiveLoss", method, x, std::forward<G>(grad_x),
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
        *this, tag, "BatchContrastiveLoss", method, q, ref, std::forward<GQ>(grad_q),
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
                  "metricloss::BatchContrastiveLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    return detail::run_sharded(*this, tag, "BatchContrastiveLoss", method, x, labels,
                               std::forward<G>(grad_x), top_diff,
                               [&](detail::Validator& check) { check_options(check); });
  }

  template <class Tag, class X, class L, class G>
  T run_native(Tag tag, const char* method, const Eigen::MatrixBase<X>& x,
               const Eigen::MatrixBase<L>& labels, G&& grad_x, T top_diff) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::BatchContrastiveLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    detail::Validator check("BatchContrastiveLoss", detail::scalar_name<T>(), method);
    const auto xv = detail::input_view(x);
    check.embeddings("x", xv);
    const auto lv = detail::label_view(labels);
    check.labels("labels", lv, xv.rows, "x");
    check_options(check);
    const auto gv = detail::gradient_view<T>(std::forward<G>(grad_x));
    check.gradient("grad_x", gv, "x", xv);
    return detail::normalized(*this, tag, check, normalize, xv, gv,
                              [&](auto path, const auto& x_rows, const auto& g_rows) {
      return detail::Backend<BatchContrastiveLoss, decltype(path)>::forward_backward(*this, path, x_rows, lv,
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
                  "metricloss::BatchContrastiveLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    return detail::run_sharded_reference(*this, tag, "BatchContrastiveLoss", method, q, labels_q, ref,
                                         std::forward<GQ>(grad_q), std::forward<GR>(grad_r),
                                         top_diff,
                                         [&](detail::Validator& check) { check_options(check); });
  }

  template <class Tag, class X, class L, class LR, class GQ, class GR>
  T run_reference_native(Tag tag, const char* method, const Eigen::MatrixBase<X>& q,
                         const Eigen::MatrixBase<L>& labels_q, const ReferenceSet<T, LR>& ref,
                         GQ&& grad_q, GR&& grad_r, T top_diff) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::BatchContrastiveLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    static_assert(detail::ReferenceBackend<BatchContrastiveLoss, Tag>::available,
                  "metricloss::BatchContrastiveLoss: reference sets run on metricloss::scalar, "
                  "metricloss::simd and metricloss::cuda (<metricloss/cuda.cuh>)");
    detail::Validator check("BatchContrastiveLoss", detail::scalar_name<T>(), method);
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
      return detail::ReferenceBackend<BatchContrastiveLoss, decltype(path)>::forward_backward(
          *this, path, q_rows, lv, r_rows, gq_rows, gr_rows, top_diff);
    });
  }

  friend struct detail::BackendSlotAccess;
  detail::BackendSlot backend_slot_;  // each backend's scratch
  template <class, class>
  friend struct detail::Backend;
};

}  // namespace metricloss
