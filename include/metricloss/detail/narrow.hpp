#pragma once
// Half-precision embeddings (__half, __nv_bfloat16) on a device path. The CPU headers only
// name the hooks; <metricloss/cuda.cuh> (backend/cuda/narrow.cuh) fills them in. A call with
// narrow embeddings or gradients is the loss's own call on the widened values (widening is
// exact, so its loss and float gradients are bitwise those of the float call on the widened
// inputs); a narrow gradient is that gradient rounded to nearest even, once.
#include <metricloss/reference.hpp>
#include <metricloss/types.hpp>

#include <type_traits>
#include <utility>

namespace metricloss {
namespace detail {

/// An argument that holds narrow values: an Eigen matrix of them, or a reference set over them.
template <class X, class = void>
struct narrow_argument : std::false_type {};
template <class X>
struct narrow_argument<X, std::enable_if_t<is_eigen_dense<X>::value>>
    : std::bool_constant<is_narrow_v<typename X::Scalar>> {};
template <class S, class L>
struct narrow_argument<ReferenceSet<S, L>> : std::bool_constant<is_narrow_v<S>> {};
template <class... X>
inline constexpr bool any_narrow_v = (narrow_argument<remove_cvref_t<X>>::value || ...);

/// The narrow-call hook of an execution tag: available = true, and a static
/// run<T>(loss, tag, loss_name, method, keep_gradients, call, arguments...) where it exists.
template <class Tag>
struct DeviceNarrow {
  static constexpr bool available = false;
};

/// The roles of a call's matrix arguments, in the order the face's call takes them: an
/// embedding matrix or reference set (read), and a gradient output (written, or skip).
template <class X>
struct EmbeddingArgument {
  const char* name;
  const X& value;
};
template <class G>
struct GradientArgument {  // G: as deduced by a forwarding reference (U& or U)
  const char* name;
  G&& value;
};
template <class D>
EmbeddingArgument<D> embedding_argument(const char* name, const Eigen::MatrixBase<D>& value) {
  return {name, value.derived()};
}
template <class S, class L>
EmbeddingArgument<ReferenceSet<S, L>> embedding_argument(const char* name,
                                                         const ReferenceSet<S, L>& value) {
  return {name, value};
}
template <class G>
GradientArgument<G> gradient_argument(const char* name, G&& value) {
  return {name, std::forward<G>(value)};
}

/// The faces' entry for a call with narrow arguments: `call(widened...)` receives the
/// arguments in order, narrow embeddings as float (T) maps of their widened values and
/// narrow gradients as T maps whose values are rounded into the caller's afterwards. With
/// keep_gradients, a narrow gradient's staging starts as its widened current value, so what
/// the call leaves untouched (normalize's zero rows on a deferred call) stays untouched.
template <class T, class Loss, class Tag, class Call, class... Arguments>
T widened(Loss& loss, const Tag& tag, const char* loss_name, const char* method,
          bool keep_gradients, Call&& call, Arguments&&... arguments) {
  static_assert(DeviceNarrow<Tag>::available,
                "metricloss: half and bfloat16 embeddings run on metricloss::cuda "
                "(<metricloss/cuda.cuh>); widen them to float for the CPU paths");
  return DeviceNarrow<Tag>::template run<T>(loss, tag, loss_name, method, keep_gradients,
                                            std::forward<Call>(call),
                                            std::forward<Arguments>(arguments)...);
}

/// The batch form's entry of every batch-loss face: `native(x, grad_x)` with the caller's
/// arguments, or with their widened staging when either is narrow.
template <class T, class Loss, class Tag, class X, class G, class Native>
T batch_call(Loss& loss, const Tag& tag, const char* loss_name, const char* method,
             const Eigen::MatrixBase<X>& x, G&& grad_x, Native&& native) {
  if constexpr (any_narrow_v<X, G>) {
    return widened<T>(loss, tag, loss_name, method, loss.normalize, native,
                      embedding_argument("x", x),
                      gradient_argument("grad_x", std::forward<G>(grad_x)));
  } else {
    return native(x.derived(), std::forward<G>(grad_x));
  }
}

/// The reference form's entry: `native(q, ref, grad_q, grad_r)`, likewise.
template <class T, class Loss, class Tag, class X, class TR, class LR, class GQ, class GR,
          class Native>
T reference_call(Loss& loss, const Tag& tag, const char* loss_name, const char* method,
                 const Eigen::MatrixBase<X>& q, const ReferenceSet<TR, LR>& ref, GQ&& grad_q,
                 GR&& grad_r, Native&& native) {
  if constexpr (any_narrow_v<X, ReferenceSet<TR, LR>, GQ, GR>) {
    return widened<T>(loss, tag, loss_name, method, loss.normalize, native,
                      embedding_argument("q", q), embedding_argument("r", ref),
                      gradient_argument("grad_q", std::forward<GQ>(grad_q)),
                      gradient_argument("grad_r", std::forward<GR>(grad_r)));
  } else {
    static_assert(std::is_same<TR, T>::value,
                  "metricloss: a reference set must hold the loss's scalar type T (or, on "
                  "metricloss::cuda, __half or __nv_bfloat16)");
    return native(q.derived(), ref, std::forward<GQ>(grad_q), std::forward<GR>(grad_r));
  }
}

}  // namespace detail
}  // namespace metricloss
