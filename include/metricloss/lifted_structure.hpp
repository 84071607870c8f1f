#pragma once
// Lifted structured loss (Song, Xiang, Jegelka, Savarese, CVPR 2016) as Caffe's layer
// LiftedStructSimilaritySoftmaxLoss computes it, with exact distances:
//
//   D_ij = ||x_i - x_j||_2,   P = {(i, j) : i < j, y_i = y_j},   Neg(i) = {k : y_k != y_i}
//   J_ij = log( sum_{k in Neg(i)} exp(m - D_ik) + sum_{l in Neg(j)} exp(m - D_jl) ) + D_ij
//   L    = 1/(2|P|) sum_{(i,j) in P} max(J_ij, 0)^2
//
// Factorisation: O(N^2) work besides two GEMM-class products, where Caffe's loops over
// every negative of every positive pair cost O(|P| N D).
//
//   The normaliser of a pair is the sum of two per-row sums s_i = sum_{k in Neg(i)} exp(m - D_ik).
//   With a_i = log s_i (computed shifted by the row's nearest negative, so that no exp
//   overflows: a_i = m - min_k D_ik + log sum_k exp(min_k D_ik - D_ik)),
//     J_ij = logaddexp(a_i, a_j) + D_ij.
//   Let h_ij = max(J_ij, 0), so dL/dJ_ij = h_ij / |P|. J_ij depends on
//     D_ij:               dJ_ij/dD_ij = 1,
//     D_ik, k in Neg(i):  dJ_ij/dD_ik = -exp(m - D_ik) / (s_i + s_j) = -p_ik sigma(a_i - a_j),
//     D_jl, l in Neg(j):  the same with i and j exchanged,
//   where p_ik = exp(m - D_ik) / s_i is row i's soft-max over its negatives and
//   sigma(a_i - a_j) = s_i / (s_i + s_j) its share of the pair's normaliser. p_ik does not
//   depend on j, so summing over the pairs that contain row i factors into one coefficient
//   per row,
//     c_i = sum_{j : y_j = y_i, j != i} h_ij sigma(a_i - a_j),
//   and dL/dD_ik receives -c_i p_ik / |P| from row i's side (and -c_k p_ki / |P| from k's).
//   Hence the derivatives with respect to the distances form one N x N matrix G / |P| of
//   ordered entries (the unordered D_ik receives G_ik + G_ki):
//     G_ij = h_ij            (i < j, y_i = y_j),
//     G_ik = -c_i p_ik       (k in Neg(i)),
//     G_ij = 0               otherwise.
//   With W_ij = G_ij / (2 D_ij) = |P| dL/dD2_ij (0 where D_ij = 0) and S = W + W^T, since
//   dD2_ij/dx_i = 2 (x_i - x_j),
//     dL/dx_i = 2/|P| sum_j S_ij (x_i - x_j),   i.e.   dX = 2/|P| (diag(S 1) - S) X.
//
//   Cost: D2 by one X X^T product, O(N^2) exp/log/sqrt for a and W, O(|P|) for the pairs,
//   and dX by one (N x N)(N x D) product. The SIMD path does exactly that
//   (PairwiseDistances, positive distances recomputed by differences), sweeping
//   the lower triangle only (each unordered pair once, for its row and its column); the scalar
//   reference follows the same steps with loops and exact differences, in double.
//
// normalize = true: the loss of the L2-normalised rows (Q and R alike), the gradient chained
// through the normalisation (detail/normalize.hpp); a zero row is an invalid_argument.
//
// Edge cases. No epsilon: at D = 0 the (sub)gradient is 0. A row without negatives has
// a_i = -inf, so its pairs (one class) have J = -inf and add 0. |P| = 0: L = 0 and a zero
// gradient. A NaN label or a non-finite entry of x makes the loss and the gradient NaN.
//
// This header holds the options, validation and dispatch; the kernels are in
// backend/scalar/lifted_structure.hpp, backend/simd/lifted_structure.hpp (with
// lifted_sweeps.hpp and lifted_precision.hpp) and backend/cuda/lifted_structure.cuh, the
// per-pair maths in detail/lifted_structure_math.hpp (docs/design.md).
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/narrow.hpp>
#include <metricloss/detail/normalize.hpp>
#include <metricloss/detail/sharded.hpp>
#include <metricloss/detail/sharded_reference.hpp>
#include <metricloss/detail/validate.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/exec.hpp>
#include <metricloss/reference.hpp>
#include <metricloss/types.hpp>

#include <type_traits>
#include <utility>

namespace metricloss {

/// Lifted structured loss (Song et al. 2016; Caffe's LiftedStructSimilaritySoftmaxLoss) over
/// one batch of embeddings with labels. See the formula and its factorisation at the top
/// of this header. Holds reusable scratch memory: one instance per thread.
template <class T>
class LiftedStructureLoss {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "metricloss::LiftedStructureLoss<T>: T must be float or double");

 public:
  using scalar_type = T;

  T margin;
  /// Rows L2-normalised inside the call, the gradient chained through (a zero row throws).
  bool normalize = false;

  explicit LiftedStructureLoss(T margin_ = T(1)) : margin(margin_) {}

  /// Loss only.
  template <class Tag, class X, class L, std::enable_if_t<detail::is_label_vector_v<L>, int> = 0>
  T forward(Tag tag, const Eigen::MatrixBase<X>& x, const Eigen::MatrixBase<L>& labels) {
    return run(tag, "forward", x, labels, skip, T(1));
  }

  /// Loss, and the gradient times top_diff written into grad_x (or `metricloss::skip`).
  template <class Tag, class X, class L, class G,
            std::enable_if_t<detail::is_label_vector_v<L> && detail::is_gradient_output_v<G>,
                             int> = 0>
  T forward_backward(Tag tag, const Eigen::MatrixBase<X>& x, const Eigen::MatrixBase<L>& labels,
                     G&& grad_x, T top_diff = T(1)) {
    return run(tag, "forward_backward", x, labels, std::forward<G>(grad_x), top_diff);
  }

  /// Loss of the queries q against a reference set (metricloss::reference): ordered positive
  /// pairs (a in Q, j in R, j != self(a)),
  ///   J_aj = log(sum_{k in R, y_k != y_a} e^{m - D_ak}
  ///              + sum_{l in Q, y_l != y_j} e^{m - D_lj}) + D_aj,
  ///   L = 1/(2|P|) sum max(J_aj, 0)^2: the second sum is a column of the same Q x R matrix.
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
    visit("normalize", normalize);
  }

 private:
  friend struct detail::BackendSlotAccess;
  detail::BackendSlot backend_slot_;  // each backend's scratch
  template <class, class>
  friend struct detail::Backend;

  void check_options(detail::Validator& check) const { check.margin(margin); }

  // The global batch of a group of ranks (detail/sharded.hpp).
  template <class Base, class Group, class X, class L, class G>
  T run_native(const sharded_tag<Base, Group>& tag, const char* method,
               const Eigen::MatrixBase<X>& x, const Eigen::MatrixBase<L>& labels, G&& grad_x,
               T top_diff) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::LiftedStructureLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    return detail::run_sharded(*this, tag, "LiftedStructureLoss", method, x, labels,
                               std::forward<G>(grad_x), top_diff,
                               [&](detail::Validator& check) { check_options(check); });
  }

  // Narrow (half / bfloat16) embeddings, reference set or gradients: the same call on their
  // widened values (detail/narrow.hpp); every other call goes straight to run_native
  // (its sharded_tag overload on a sharded tag).
  template <class Tag, class X, class L, class G>
  T run(const Tag& tag, const char* method, const Eigen::MatrixBase<X>& x,
        const Eigen::MatrixBase<L>& labels, G&& grad_x, T top_diff) {
    return detail::batch_call<T>(
        *this, tag, "LiftedStructureLoss", method, x, std::forward<G>(grad_x),
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
        *this, tag, "LiftedStructureLoss", method, q, ref, std::forward<GQ>(grad_q),
        std::forward<GR>(grad_r),
        [&](const auto& q_rows, const auto& r_set, auto&& gq_rows, auto&& gr_rows) {
          return run_reference_native(tag, method, q_rows, labels_q, r_set,
                                      std::forward<decltype(gq_rows)>(gq_rows),
                                      std::forward<decltype(gr_rows)>(gr_rows), top_diff);
        });
  }

  template <class Tag, class X, class L, class G>
  T run_native(const Tag& tag, const char* method, const Eigen::MatrixBase<X>& x,
               const Eigen::MatrixBase<L>& labels, G&& grad_x, T top_diff) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::LiftedStructureLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    detail::Validator check("LiftedStructureLoss", detail::scalar_name<T>(), method);
    const auto xv = detail::input_view(x);
    check.embeddings("x", xv);
    const auto lv = detail::label_view(labels);
    check.labels("labels", lv, xv.rows, "x");
    check_options(check);
    const auto gv = detail::gradient_view<T>(std::forward<G>(grad_x));
    check.gradient("grad_x", gv, "x", xv);
    return detail::normalized(*this, tag, check, normalize, xv, gv,
                              [&](auto path, const auto& x_rows, const auto& g_rows) {
      return detail::Backend<LiftedStructureLoss, decltype(path)>::forward_backward(*this, path, x_rows, lv,
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
                  "metricloss::LiftedStructureLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    return detail::run_sharded_reference(*this, tag, "LiftedStructureLoss", method, q, labels_q, ref,
                                         std::forward<GQ>(grad_q), std::forward<GR>(grad_r),
                                         top_diff,
                                         [&](detail::Validator& check) { check_options(check); });
  }

  template <class Tag, class X, class L, class LR, class GQ, class GR>
  T run_reference_native(const Tag& tag, const char* method, const Eigen::MatrixBase<X>& q,
                         const Eigen::MatrixBase<L>& labels_q, const ReferenceSet<T, LR>& ref,
                         GQ&& grad_q, GR&& grad_r, T top_diff) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::LiftedStructureLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    static_assert(detail::ReferenceBackend<LiftedStructureLoss, Tag>::available,
                  "metricloss::LiftedStructureLoss: reference sets run on metricloss::scalar, "
                  "metricloss::simd and metricloss::cuda (<metricloss/cuda.cuh>)");
    detail::Validator check("LiftedStructureLoss", detail::scalar_name<T>(), method);
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
      return detail::ReferenceBackend<LiftedStructureLoss, decltype(path)>::forward_backward(
          *this, path, q_rows, lv, r_rows, gq_rows, gr_rows, top_diff);
    });
  }

};

}  // namespace metricloss
