#pragma once
// Contrastive loss over pairs (a_i, b_i), d_i = ||a_i - b_i||_2:
//
//   L = 1/(2N) sum_i [ s_i d_i^2 + (1 - s_i) h_i ]
//     hadsell: h_i = max(m - d_i, 0)^2     legacy: h_i = max(m - d_i^2, 0)
//
//   dL/da_i = -dL/db_i = top_diff/N * c_i (a_i - b_i), with
//     c_i = 1 (similar);  hadsell: -(m - d_i)/d_i if 0 < d_i < m, else 0;
//     legacy: -1 if d_i^2 < m, else 0.
// No epsilon: at d_i = 0 the subgradient is exactly 0.
#include <metricloss/detail/contrastive_math.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/narrow.hpp>
#include <metricloss/detail/validate.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/exec.hpp>
#include <metricloss/types.hpp>

#include <string>
#include <type_traits>
#include <utility>

namespace metricloss {

namespace detail {

/// Similarity of pair i from one similarity vector (Caffe's third bottom blob).
template <class S>
struct SimilarityVector {
  VectorView<S> sim;
  METRICLOSS_HOST_DEVICE Similarity operator()(Index i) const { return similarity_of(sim[i]); }
};

/// Similarity of pair i from two label vectors: similar when the labels are equal.
template <class L, class M>
struct LabelPair {
  VectorView<L> labels_a;
  VectorView<M> labels_b;
  METRICLOSS_HOST_DEVICE Similarity operator()(Index i) const {
    return similarity_of(labels_a[i], labels_b[i]);
  }
};

/// The fused pass shared by the CPU backends, parameterised on their row primitives:
/// each row of a and b is read once, its distance reduced, and its gradients written.
template <class RowOps, class T, class Source>
double contrastive_forward_backward(const MatrixView<const T>& a, const MatrixView<const T>& b,
                                    const Source& similarity, double margin,
                                    ContrastiveForm form, const MatrixView<T>& grad_a,
                                    const MatrixView<T>& grad_b, double top_diff) {
  const Index n = a.rows, d = a.cols;
  const double scale = top_diff / static_cast<double>(n);
  double sum = 0.0;
  for (Index i = 0; i < n; ++i) {
    RowOps::fused_pair(a.row(i), b.row(i), d, grad_a.empty() ? nullptr : grad_a.row(i),
                       grad_b.empty() ? nullptr : grad_b.row(i), [&](double squared_distance) {
                         const PairTerm t =
                             contrastive_pair(squared_distance, similarity(i), margin, form);
                         sum += t.term;
                         return scale * t.coefficient;
                       });
  }
  return sum / (2.0 * static_cast<double>(n));
}

}  // namespace detail

/// Contrastive loss (Hadsell et al. 2006; Caffe's ContrastiveLossLayer). See the formula
/// at the top of this header. One instance per thread.
template <class T>
class ContrastiveLoss {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "metricloss::ContrastiveLoss<T>: T must be float or double");

 public:
  using scalar_type = T;

  T margin;
  ContrastiveForm form;

  explicit ContrastiveLoss(T margin_ = T(1), ContrastiveForm form_ = ContrastiveForm::hadsell)
      : margin(margin_), form(form_) {}

  /// Loss only; `sim` nonzero (after truncation to an integer, as Caffe) = similar pair.
  template <class Tag, class A, class B, class S,
            std::enable_if_t<detail::is_label_vector_v<S>, int> = 0>
  T forward(Tag tag, const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b,
            const Eigen::MatrixBase<S>& sim) {
    return with_similarity(tag, "forward", a, b, sim, skip, skip, T(1));
  }

  /// Loss only; pair i is similar when labels_a[i] == labels_b[i].
  template <class Tag, class A, class B, class L, class M,
            std::enable_if_t<detail::is_label_vector_v<L> && detail::is_label_vector_v<M>, int> = 0>
  T forward(Tag tag, const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b,
            const Eigen::MatrixBase<L>& labels_a, const Eigen::MatrixBase<M>& labels_b) {
    return with_labels(tag, "forward", a, b, labels_a, labels_b, skip, skip, T(1));
  }

  /// Loss, and the gradients times top_diff written into grad_a and grad_b (either may be
  /// `metricloss::skip`).
  template <class Tag, class A, class B, class S, class GA, class GB,
            std::enable_if_t<detail::is_label_vector_v<S> && detail::is_gradient_output_v<GA> &&
                                 detail::is_gradient_output_v<GB>,
                             int> = 0>
  T forward_backward(Tag tag, const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b,
                     const Eigen::MatrixBase<S>& sim, GA&& grad_a, GB&& grad_b,
                     T top_diff = T(1)) {
    return with_similarity(tag, "forward_backward", a, b, sim, std::forward<GA>(grad_a),
                           std::forward<GB>(grad_b), top_diff);
  }

  template <class Tag, class A, class B, class L, class M, class GA, class GB,
            std::enable_if_t<detail::is_label_vector_v<L> && detail::is_label_vector_v<M> &&
                                 detail::is_gradient_output_v<GA> &&
                                 detail::is_gradient_output_v<GB>,
                             int> = 0>
  T forward_backward(Tag tag, const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b,
                     const Eigen::MatrixBase<L>& labels_a, const Eigen::MatrixBase<M>& labels_b,
                     GA&& grad_a, GB&& grad_b, T top_diff = T(1)) {
    return with_labels(tag, "forward_backward", a, b, labels_a, labels_b, std::forward<GA>(grad_a),
                       std::forward<GB>(grad_b), top_diff);
  }

 private:
  // Narrow (half / bfloat16) embeddings or gradients: the same call on their widened values
  // (detail/narrow.hpp); every other call goes straight to the *_native form.
  template <class Tag, class A, class B, class S, class GA, class GB>
  T with_similarity(Tag tag, const char* method, const Eigen::MatrixBase<A>& a,
                    const Eigen::MatrixBase<B>& b, const Eigen::MatrixBase<S>& sim, GA&& grad_a,
                    GB&& grad_b, T top_diff) {
    if constexpr (detail::any_narrow_v<A, B, GA, GB>) {
      return detail::widened<T>(
          *this, tag, "ContrastiveLoss", method, false,
          [&](const auto& a_wide, const auto& b_wide, auto&& ga_wide, auto&& gb_wide) {
            return similarity_native(tag, method, a_wide, b_wide, sim,
                                     std::forward<decltype(ga_wide)>(ga_wide),
                                     std::forward<decltype(gb_wide)>(gb_wide), top_diff);
          },
          detail::embedding_argument("a", a), detail::embedding_argument("b", b),
          detail::gradient_argument("grad_a", std::forward<GA>(grad_a)),
          detail::gradient_argument("grad_b", std::forward<GB>(grad_b)));
    } else {
      return similarity_native(tag, method, a, b, sim, std::forward<GA>(grad_a),
                               std::forward<GB>(grad_b), top_diff);
    }
  }

  template <class Tag, class A, class B, class L, class M, class GA, class GB>
  T with_labels(Tag tag, const char* method, const Eigen::MatrixBase<A>& a,
                const Eigen::MatrixBase<B>& b, const Eigen::MatrixBase<L>& labels_a,
                const Eigen::MatrixBase<M>& labels_b, GA&& grad_a, GB&& grad_b, T top_diff) {
    if constexpr (detail::any_narrow_v<A, B, GA, GB>) {
      return detail::widened<T>(
          *this, tag, "ContrastiveLoss", method, false,
          [&](const auto& a_wide, const auto& b_wide, auto&& ga_wide, auto&& gb_wide) {
            return labels_native(tag, method, a_wide, b_wide, labels_a, labels_b,
                                 std::forward<decltype(ga_wide)>(ga_wide),
                                 std::forward<decltype(gb_wide)>(gb_wide), top_diff);
          },
          detail::embedding_argument("a", a), detail::embedding_argument("b", b),
          detail::gradient_argument("grad_a", std::forward<GA>(grad_a)),
          detail::gradient_argument("grad_b", std::forward<GB>(grad_b)));
    } else {
      return labels_native(tag, method, a, b, labels_a, labels_b, std::forward<GA>(grad_a),
                           std::forward<GB>(grad_b), top_diff);
    }
  }

  template <class Tag, class A, class B, class S, class GA, class GB>
  T similarity_native(Tag tag, const char* method, const Eigen::MatrixBase<A>& a,
                      const Eigen::MatrixBase<B>& b, const Eigen::MatrixBase<S>& sim, GA&& grad_a,
                      GB&& grad_b, T top_diff) {
    detail::Validator check("ContrastiveLoss", detail::scalar_name<T>(), method);
    const auto av = input(check, "a", a);
    const auto bv = input(check, "b", b);
    check.same_shape("b", bv, "a", av);
    const auto sv = detail::label_view(sim);
    check.labels("sim", sv, av.rows, "a");
    return run(tag, check, av, bv, detail::SimilarityVector<typename S::Scalar>{sv},
               std::forward<GA>(grad_a), std::forward<GB>(grad_b), top_diff);
  }

  template <class Tag, class A, class B, class L, class M, class GA, class GB>
  T labels_native(Tag tag, const char* method, const Eigen::MatrixBase<A>& a,
                  const Eigen::MatrixBase<B>& b, const Eigen::MatrixBase<L>& labels_a,
                  const Eigen::MatrixBase<M>& labels_b, GA&& grad_a, GB&& grad_b, T top_diff) {
    detail::Validator check("ContrastiveLoss", detail::scalar_name<T>(), method);
    const auto av = input(check, "a", a);
    const auto bv = input(check, "b", b);
    check.same_shape("b", bv, "a", av);
    const auto la = detail::label_view(labels_a);
    const auto lb = detail::label_view(labels_b);
    check.labels("labels_a", la, av.rows, "a");
    check.labels("labels_b", lb, av.rows, "a");
    return run(tag, check, av, bv,
               detail::LabelPair<typename L::Scalar, typename M::Scalar>{la, lb},
               std::forward<GA>(grad_a), std::forward<GB>(grad_b), top_diff);
  }

  friend struct detail::BackendSlotAccess;
  detail::BackendSlot backend_slot_;  // scratch of backends outside the CPU headers (CUDA)
  template <class X>
  static detail::MatrixView<const T> input(detail::Validator& check, const char* name,
                                           const Eigen::MatrixBase<X>& x) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::ContrastiveLoss<T>: embeddings must have scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    const auto view = detail::input_view(x);
    check.embeddings(name, view);
    return view;
  }

  template <class Tag, class Source, class GA, class GB>
  T run(const Tag& tag, detail::Validator& check, const detail::MatrixView<const T>& av,
        const detail::MatrixView<const T>& bv, const Source& similarity, GA&& grad_a,
        GB&& grad_b, T top_diff) {
    check.margin(margin);
    if (form != ContrastiveForm::hadsell && form != ContrastiveForm::legacy)
      check.fail("option 'form' has the undeclared value " + std::to_string(static_cast<int>(form)));
    const auto ga = detail::gradient_view<T>(std::forward<GA>(grad_a));
    const auto gb = detail::gradient_view<T>(std::forward<GB>(grad_b));
    check.gradient("grad_a", ga, "a", av);
    check.gradient("grad_b", gb, "a", av);
    return detail::Backend<ContrastiveLoss, Tag>::forward_backward(*this, tag, av, bv, similarity,
                                                                   ga, gb, top_diff);
  }
};

}  // namespace metricloss
