#pragma once
// Multi-similarity loss (Wang, Han, Huang, Dong, Scott, CVPR 2019) over a labelled batch, as
// pytorch-metric-learning's MultiSimilarityLoss with its MultiSimilarityMiner:
//
//   S_ij = <x_i, x_j>  (cosine similarity with normalize = true)
//   anchor i keeps the positives p with S_ip < max_{n in Neg(i)} S_in + epsilon
//               and the negatives n with S_in > min_{p in P(i)} S_ip - epsilon
//   L_i = (1/alpha) log(1 + sum_{kept p} e^{-alpha (S_ip - base)})
//       + (1/beta)  log(1 + sum_{kept n} e^{beta (S_in - base)})      (an empty side adds 0)
//   L   = (1/N) sum_i L_i over all N anchors.
// epsilon = +inf keeps every pair (the loss without its miner). With a finite epsilon both
// kept sets are empty or neither.
//
// Gradient. dL/dS_ip = -(1/N) e^{-alpha (S_ip - base)} / (1 + sum_p ...) and
// dL/dS_in = (1/N) e^{beta (S_in - base)} / (1 + sum_n ...) for kept pairs, 0 otherwise; with
// W = dL/dS, dX = (W + W^T) X (the similarity form of the batch core: one product on the
// simd path). A reference set takes anchors from Q and candidates from R (j != self(a)):
// dQ = W R, dR = W^T Q.
//
// normalize = true: the loss of the L2-normalised rows (Q and R alike), the gradient chained
// through the normalisation (detail/normalize.hpp).
//
// The kept sets compare exact similarities where the product's rounding could decide them
// (API.md's tie regime); the exponentials are taken with the largest exponent factored out.
// A NaN label or a non-finite entry makes the loss and the gradient NaN.
//
// This header holds the options, validation and dispatch; the per-anchor maths is in
// detail/multi_similarity_math.hpp, the kernels in backend/scalar/multi_similarity.hpp and
// backend/simd/multi_similarity.hpp.
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

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

namespace metricloss {

/// Multi-similarity loss over a labelled batch (or queries against a reference set). See the
/// formula at the top of this header. One instance per thread; it keeps scratch memory.
template <class T>
class MultiSimilarityLoss {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "metricloss::MultiSimilarityLoss<T>: T must be float or double");

 public:
  using scalar_type = T;

  T alpha;
  T beta;
  T base;
  /// The miner's margin; +infinity keeps every pair.
  T epsilon;
  /// Rows L2-normalised inside the call, the gradient chained through (a zero row throws):
  /// S is then the cosine similarity, pytorch-metric-learning's default.
  bool normalize = false;

  explicit MultiSimilarityLoss(T alpha_ = T(2), T beta_ = T(50), T base_ = T(0.5),
                               T epsilon_ = T(0.1))
      : alpha(alpha_), beta(beta_), base(base_), epsilon(epsilon_) {}

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
    visit("alpha", alpha);
    visit("beta", beta);
    visit("base", base);
    visit("epsilon", epsilon);
    visit("normalize", normalize);
  }

 private:
  void check_options(detail::Validator& check) const {
    const auto option = [&](const char* name, T value, bool ok, const char* rule) {
      if (!ok)
        check.fail(std::string("option '") + name + "' is " +
                   detail::Validator::number(static_cast<double>(value)) + "; it must be " + rule);
    };
    option("alpha", alpha, std::isfinite(alpha) && alpha > T(0), "finite and > 0");
    option("beta", beta, std::isfinite(beta) && beta > T(0), "finite and > 0");
    option("base", base, std::isfinite(base), "finite");
    option("epsilon", epsilon, std::isfinite(epsilon) || epsilon == std::numeric_limits<T>::infinity(),
           "finite or +infinity (keep every pair)");
  }

  // Narrow (half / bfloat16) embeddings, reference set or gradients: the same call on their
  // widened values (detail/narrow.hpp); every other call goes straight to run_native
  // (its sharded_tag overload on a sharded tag).
  template <class Tag, class X, class L, class G>
  T run(const Tag& tag, const char* method, const Eigen::MatrixBase<X>& x,
        const Eigen::MatrixBase<L>& labels, G&& grad_x, T top_diff) {
    return detail::batch_call<T>(
        *this, tag, "MultiSimilarityLoss", method, x, std::forward<G>(grad_x),
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
        *this, tag, "MultiSimilarityLoss", method, q, ref, std::forward<GQ>(grad_q),
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
                  "metricloss::MultiSimilarityLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    return detail::run_sharded(*this, tag, "MultiSimilarityLoss", method, x, labels,
                               std::forward<G>(grad_x), top_diff,
                               [&](detail::Validator& check) { check_options(check); });
  }

  template <class Tag, class X, class L, class G>
  T run_native(Tag tag, const char* method, const Eigen::MatrixBase<X>& x,
               const Eigen::MatrixBase<L>& labels, G&& grad_x, T top_diff) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::MultiSimilarityLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    detail::Validator check("MultiSimilarityLoss", detail::scalar_name<T>(), method);
    const auto xv = detail::input_view(x);
    check.embeddings("x", xv);
    const auto lv = detail::label_view(labels);
    check.labels("labels", lv, xv.rows, "x");
    check_options(check);
    const auto gv = detail::gradient_view<T>(std::forward<G>(grad_x));
    check.gradient("grad_x", gv, "x", xv);
    return detail::normalized(*this, tag, check, normalize, xv, gv,
                              [&](auto path, const auto& x_rows, const auto& g_rows) {
      return detail::Backend<MultiSimilarityLoss, decltype(path)>::forward_backward(*this, path, x_rows, lv,
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
                  "metricloss::MultiSimilarityLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    return detail::run_sharded_reference(*this, tag, "MultiSimilarityLoss", method, q, labels_q, ref,
                                         std::forward<GQ>(grad_q), std::forward<GR>(grad_r),
                                         top_diff,
                                         [&](detail::Validator& check) { check_options(check); });
  }

  template <class Tag, class X, class L, class LR, class GQ, class GR>
  T run_reference_native(Tag tag, const char* method, const Eigen::MatrixBase<X>& q,
                         const Eigen::MatrixBase<L>& labels_q, const ReferenceSet<T, LR>& ref,
                         GQ&& grad_q, GR&& grad_r, T top_diff) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::MultiSimilarityLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    static_assert(detail::ReferenceBackend<MultiSimilarityLoss, Tag>::available,
                  "metricloss::MultiSimilarityLoss: reference sets run on metricloss::scalar, "
                  "metricloss::simd and metricloss::cuda (<metricloss/cuda.cuh>)");
    detail::Validator check("MultiSimilarityLoss", detail::scalar_name<T>(), method);
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
      return detail::ReferenceBackend<MultiSimilarityLoss, decltype(path)>::forward_backward(
          *this, path, q_rows, lv, r_rows, gq_rows, gr_rows, top_diff);
    });
  }

  friend struct detail::BackendSlotAccess;
  detail::BackendSlot backend_slot_;  // each backend's scratch
  template <class, class>
  friend struct detail::Backend;
};

}  // namespace metricloss
