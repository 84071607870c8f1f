#pragma once
// Reference sets: a batch loss over queries Q (N_q x D, the anchors) against candidates R
// (N_r x D, with labels), e.g. a memory of past batches (API.md, "Next"):
//   auto ref = metricloss::reference(r, labels_r);               // no query is in R
//   auto ref = metricloss::reference(r, labels_r, self_index);   // self_index[a]: the row of R
//                                                                 // that is q_a itself, or -1
//   loss.forward(tag, q, labels_q, ref);
//   loss.forward_backward(tag, q, labels_q, ref, grad_q, grad_r, top_diff);  // grad_r may be skip
// P(a) = {j in R : y_j = y_a, j != self(a)}, Neg(a) = {j in R : y_j != y_a}, d_aj = d(q_a, r_j).
// Like an Eigen::Map, a ReferenceSet views its arguments: they must outlive its use.
#include <metricloss/detail/reference_view.hpp>
#include <metricloss/detail/validate.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/types.hpp>

#include <string>
#include <type_traits>
#include <utility>

namespace metricloss {

/// Candidates R with labels, and optionally which row of R each query is (see reference()).
template <class T, class L>
struct ReferenceSet {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value ||
                    detail::is_narrow_v<T>,
                "metricloss::ReferenceSet: R must hold float or double (or, on metricloss::cuda, "
                "__half or __nv_bfloat16)");
  using scalar_type = T;
  using label_type = L;
  detail::ReferenceView<T, L> view;
};

namespace detail {

/// The reference-set path of a loss on a tag: each backend that has one specialises it with
/// `available = true` and a static forward_backward(loss, tag, q, labels_q, ref, grad_q,
/// grad_r, top_diff).
template <class Loss, class Tag>
struct ReferenceBackend {
  static constexpr bool available = false;
};

template <class Derived>
Index eigen_self_at(const void* object, Index a) {
  return static_cast<Index>(static_cast<const Derived*>(object)->coeff(a));
}
template <class S>
Index indexable_self_at(const void* object, Index a) {
  return static_cast<Index>((*static_cast<const S*>(object))[a]);
}

template <class S>
SelfIndex self_index_of(const S& self) {
  if constexpr (std::is_base_of<Eigen::EigenBase<S>, S>::value) {
    static_assert(S::IsVectorAtCompileTime, "metricloss::reference: self_index must be a vector");
    static_assert(std::is_integral<typename S::Scalar>::value,
                  "metricloss::reference: self_index must hold integers");
    return {&self, static_cast<Index>(self.size()), &eigen_self_at<S>};
  } else {
    static_assert(std::is_integral<remove_cvref_t<decltype(self[Index(0)])>>::value,
                  "metricloss::reference: self_index must be an integer vector, or an object "
                  "with size() and an integer operator[]");
    return {&self, static_cast<Index>(self.size()), &indexable_self_at<S>};
  }
}

/// self_index[a] = s names a row of R whose label is not q_a's (found here on the host, or by
/// a device path after its synchronisation).
[[noreturn]] inline void fail_self_label(const Validator& check, Index a, Index s) {
  check.fail("argument 'self_index' has self_index[" + std::to_string(a) + "] = " +
             std::to_string(s) + ", but labels_r[" + std::to_string(s) +
             "] differs from labels_q[" + std::to_string(a) +
             "]: the row of 'r' that is q_a itself has q_a's label");
}

/// The checks of a call with a reference set: R's shape against Q's, R's labels, self_index
/// (length N_q, entries in [-1, N_r), and a row of R with the query's label), and the two
/// gradients' shapes and overlaps. Nothing is written before they pass. On a device tag
/// (labels_on_host = false) the labels are device memory: the self row's label is checked
/// by the device path, which reports it the same way (backend/cuda/reference.cuh).
template <class T, class LQ, class LR>
void check_reference(Validator& check, const MatrixView<const T>& q, const VectorView<LQ>& labels_q,
                     const ReferenceView<T, LR>& ref, const MatrixView<T>& grad_q,
                     const MatrixView<T>& grad_r, bool labels_on_host = true) {
  check.embeddings("r", ref.r);
  if (ref.r.cols != q.cols)
    check.fail("argument 'r' has shape " + shape_string(ref.r.rows, ref.r.cols) + ", expected " +
               std::to_string(q.cols) + " columns (the D of 'q', " +
               shape_string(q.rows, q.cols) + ")");
  check.labels("labels_r", ref.labels, ref.r.rows, "r");
  if (ref.self.given()) {
    if (ref.self.size != q.rows)
      check.fail("argument 'self_index' has length " + std::to_string(ref.self.size) +
                 ", expected " + std::to_string(q.rows) + " (the rows of 'q')");
    for (Index a = 0; a < q.rows; ++a) {
      const Index s = ref.self[a];
      if (s < -1 || s >= ref.r.rows)
        check.fail("argument 'self_index' has self_index[" + std::to_string(a) + "] = " +
                   std::to_string(s) + ", neither -1 (none) nor a row of 'r' (0 to " +
                   std::to_string(ref.r.rows - 1) + "; 'r' is " +
                   shape_string(ref.r.rows, ref.r.cols) + ")");
      if (s < 0 || !labels_on_host) continue;
      using C = std::common_type_t<LQ, LR>;
      const C yq = static_cast<C>(labels_q[a]), yr = static_cast<C>(ref.labels[s]);
      if (yq == yq && yr == yr && !(yq == yr))  // NaN labels propagate as NaN instead
        fail_self_label(check, a, s);
    }
  }
  check.gradient("grad_q", grad_q, "q", q);
  check.gradient("grad_r", grad_r, "r", ref.r);
}

}  // namespace detail

/// A reference set of candidates r (N_r x D, row-major, any outer stride) with labels
/// (length N_r, any arithmetic type). No query is a row of r.
template <class R, class L>
ReferenceSet<typename R::Scalar, typename L::Scalar> reference(const Eigen::MatrixBase<R>& r,
                                                               const Eigen::MatrixBase<L>& labels) {
  return {{detail::input_view(r), detail::label_view(labels), {}}};
}

/// The same, where self_index[a] is the row of r that is query a itself (or -1): it is then
/// neither a positive nor a negative of a. self_index: an Eigen integer vector of length
/// N_q, or an object with size() and an integer operator[] (CrossBatchMemory's slots).
template <class R, class L, class S>
ReferenceSet<typename R::Scalar, typename L::Scalar> reference(const Eigen::MatrixBase<R>& r,
                                                               const Eigen::MatrixBase<L>& labels,
                                                               const S& self_index) {
  return {{detail::input_view(r), detail::label_view(labels), detail::self_index_of(self_index)}};
}

}  // namespace metricloss
