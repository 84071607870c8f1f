#pragma once
#include <metricloss/backend/scalar/rowops.hpp>
#include <metricloss/contrastive.hpp>

namespace metricloss {
namespace detail {

template <class T>
struct Backend<ContrastiveLoss<T>, scalar_tag> {
  template <class Source>
  static T forward_backward(ContrastiveLoss<T>& loss, scalar_tag, const MatrixView<const T>& a,
                            const MatrixView<const T>& b, const Source& similarity,
                            const MatrixView<T>& grad_a, const MatrixView<T>& grad_b,
                            T top_diff) {
    return static_cast<T>(contrastive_forward_backward<ScalarRowOps>(
        a, b, similarity, loss.margin, loss.form, grad_a, grad_b, top_diff));
  }
};

}  // namespace detail
}  // namespace metricloss
