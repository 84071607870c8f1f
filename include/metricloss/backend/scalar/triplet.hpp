#pragma once
#include <metricloss/backend/scalar/rowops.hpp>
#include <metricloss/triplet.hpp>

namespace metricloss {
namespace detail {

template <class T>
struct Backend<TripletLoss<T>, scalar_tag> {
  static T forward_backward(TripletLoss<T>& loss, scalar_tag, const MatrixView<const T>& anchor,
                            const MatrixView<const T>& positive,
                            const MatrixView<const T>& negative, const MatrixView<T>& grad_anchor,
                            const MatrixView<T>& grad_positive,
                            const MatrixView<T>& grad_negative, T top_diff) {
    return static_cast<T>(triplet_forward_backward<ScalarRowOps>(
        anchor, positive, negative, loss.margin, loss.distance, grad_anchor, grad_positive,
        grad_negative, top_diff));
  }
};

}  // namespace detail
}  // namespace metricloss
