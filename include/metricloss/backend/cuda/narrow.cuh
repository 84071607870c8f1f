#pragma once
// __half and __nv_bfloat16 embeddings and gradients on metricloss::cuda (every loss, every
// form: pairs, triplets, batch, reference set, normalize, loss_to, sharded):
//
//   ml::BatchTripletLoss<float> loss(0.2f, ml::Mining::semihard);
//   // x, labels, grad: device maps; x and grad may hold __half or __nv_bfloat16, grad also float
//   float L = loss.forward_backward(ml::cuda.on(stream), x_half, labels, grad_half, loss_scale);
//
// Phase 1 of the half path (docs/cuda.md): each narrow matrix is widened once into device
// staging of T (exact: every half and bfloat16 value is a float), the loss's own call runs on
// the staging, and each narrow gradient is that call's T gradient rounded to nearest even,
// once (top_diff, e.g. a GradScaler's scale, is applied before the rounding, so small
// gradients keep their digits and overflow becomes Inf). So, by construction:
//   - the loss, and a float gradient, are bitwise those of the float call on the widened
//     inputs;
//   - a narrow gradient is bitwise __float2half_rn / __float2bfloat16_rn of that float
//     gradient (__double2half / __double2bfloat16 for a double loss).
// Arguments are checked on the caller's memory first (shapes and strides, and no gradient
// overlapping an input or another gradient, in narrow bytes); the widened call then checks
// the rest, and nothing is written to a caller's gradient when it throws. Under normalize
// the staging of a narrow gradient starts as its current value, so a deferred call that
// leaves the gradient untouched (a zero row) leaves it untouched here too. The staging is
// kept per (functor, stream) beside the loss's workspaces: no allocation once warm.
// Reading the narrow values directly in each kernel (half the bytes for the memory-bound
// losses) is phase 2; this phase costs one widening pass per narrow matrix.
#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/detail/narrow.hpp>
#include <metricloss/detail/sharded_agreement.hpp>
#include <metricloss/detail/validate.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/reference.hpp>
#include <metricloss/types.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>

namespace metricloss {
namespace detail {

template <>
struct narrow_scalar<__half> : std::true_type {};
template <>
struct narrow_scalar<__nv_bfloat16> : std::true_type {};

namespace cuda {

__device__ inline float widen_value(__half v) { return __half2float(v); }
__device__ inline float widen_value(__nv_bfloat16 v) { return __bfloat162float(v); }

/// Round to nearest even, once, from the compute type.
template <class S>
struct RoundTo;
template <>
struct RoundTo<__half> {
  __device__ static __half from(float v) { return __float2half_rn(v); }
  __device__ static __half from(double v) { return __double2half(v); }
};
template <>
struct RoundTo<__nv_bfloat16> {
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  __device__ static __nv_bfloat16 from(double v) { return __double2bfloat16(v); }
};

/// out (compact rows x cols of T) = the widened rows of `in`: a block per row, grid-strided.
template <class S, class T>
__global__ void widen_rows_kernel(MatrixView<const S> in, T* out) {
  for (Index i = blockIdx.x; i < in.rows; i += gridDim.x) {
    const S* row = in.row(i);
    T* o = out + i * in.cols;
    for (Index j = threadIdx.x; j < in.cols; j += blockDim.x)
      o[j] = static_cast<T>(widen_value(row[j]));
  }
}

/// The rows of `out` = the compact rows x cols of `in`, each rounded to nearest even.
template <class T, class S>
__global__ void round_rows_kernel(const T* in, MatrixView<S> out) {
  for (Index i = blockIdx.x; i < out.rows; i += gridDim.x) {
    const T* row = in + i * out.cols;
    S* o = out.row(i);
    for (Index j = threadIdx.x; j < out.cols; j += blockDim.x) o[j] = RoundTo<S>::from(row[j]);
  }
}

inline dim3 rows_grid(Index rows) {
  return dim3(static_cast<unsigned>(std::min<Index>(rows, Index(1) << 16)));
}
constexpr unsigned kNarrowBlock = 128;

template <class S, class T>
void widen_rows(const MatrixView<const S>& in, T* out, cudaStream_t stream) {
  if (in.rows < 1 || in.cols < 1) return;
  widen_rows_kernel<S, T><<<rows_grid(in.rows), kNarrowBlock, 0, stream>>>(in, out);
}

/// The stream a narrow call's staging work is ordered on.
inline cudaStream_t stream_of(const cuda_tag& tag) { return tag.stream; }
template <class U>
cudaStream_t stream_of(const cuda_deferred_tag<U>& tag) {
  return tag.stream;
}
template <class Group>
cudaStream_t stream_of(const sharded_tag<cuda_tag, Group>& tag) {
  return tag.base.stream;
}

template <class S>
MatrixView<S> caller_gradient_view(S* data, Index rows, Index cols, Index stride) {
  // A matrix without storage is not a skip (Validator::gradient rejects stride -1), except
  // 0 x D, which a sharded rank without rows may pass.
  if (data == nullptr) return MatrixView<S>{nullptr, rows, cols, rows == 0 ? cols : Index(-1)};
  return MatrixView<S>{data, rows, cols, stride};
}

template <class G>
auto caller_gradient(G&& g) {
  auto view = output_view(std::forward<G>(g));
  return caller_gradient_view(view.data, view.rows, view.cols, view.stride);
}

// Each argument of a narrow call, staged: get() is what the widened call receives,
// finish(stream) rounds a narrow gradient into the caller's memory afterwards.
template <class X>
struct PassedThrough {
  const X& value;
  const X& get() const { return value; }
  void finish(cudaStream_t) const {}
};
template <class T>
struct WidenedMatrix {
  ConstRowMap<T> map;
  const ConstRowMap<T>& get() const { return map; }
  void finish(cudaStream_t) const {}
};
template <class T, class L>
struct WidenedReference {
  ReferenceSet<T, L> set;
  const ReferenceSet<T, L>& get() const { return set; }
  void finish(cudaStream_t) const {}
};
template <class G>
struct PassedGradient {
  G&& value;
  G&& get() { return static_cast<G&&>(value); }
  void finish(cudaStream_t) const {}
};
template <class T, class S>
struct StagedGradient {
  RowMap<T> map;
  MatrixView<S> target;
  RowMap<T>& get() { return map; }
  void finish(cudaStream_t stream) const {
    if (target.rows < 1 || target.cols < 1) return;
    round_rows_kernel<T, S><<<rows_grid(target.rows), kNarrowBlock, 0, stream>>>(map.data(),
                                                                                target);
  }
};

template <class T>
class NarrowStager {
 public:
  NarrowStager(void* base, cudaStream_t stream, bool keep_gradients)
      : carver_(base), stream_(stream), keep_(keep_gradients) {}

  std::size_t bytes() const { return carver_.bytes(); }

  template <class X>
  auto stage(const EmbeddingArgument<X>& argument) {
    if constexpr (narrow_argument<X>::value) {
      if constexpr (is_eigen_dense<X>::value) {
        return WidenedMatrix<T>{widened(input_view(argument.value))};
      } else {
        using L = typename X::label_type;
        const ConstRowMap<T> r = widened(argument.value.view.r);
        return WidenedReference<T, L>{
            {{input_view(r), argument.value.view.labels, argument.value.view.self}}};
      }
    } else {
      return PassedThrough<X>{argument.value};
    }
  }

  template <class G>
  auto stage(GradientArgument<G>&& argument) {
    using D = remove_cvref_t<G>;
    if constexpr (narrow_argument<D>::value) {
      using S = typename D::Scalar;
      const MatrixView<S> target = caller_gradient(std::forward<G>(argument.value));
      T* staging = carver_.template take<T>(count(target.rows, target.cols));
      if (keep_ && staging)
        widen_rows(MatrixView<const S>{target.data, target.rows, target.cols, target.stride},
                   staging, stream_);
      return StagedGradient<T, S>{
          RowMap<T>(staging, target.rows, target.cols, Eigen::OuterStride<>(compact(target.cols))),
          target};
    } else {
      return PassedGradient<G>{std::forward<G>(argument.value)};
    }
  }

 private:
  static std::size_t count(Index rows, Index cols) {
    return rows > 0 && cols > 0 ? static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols)
                                : 0;
  }
  static Index compact(Index cols) { return std::max<Index>(cols, 1); }

  template <class S>
  ConstRowMap<T> widened(const MatrixView<const S>& in) {
    T* staging = carver_.template take<T>(count(in.rows, in.cols));
    if (staging) widen_rows(in, staging, stream_);
    return ConstRowMap<T>(staging, in.rows, in.cols, Eigen::OuterStride<>(compact(in.cols)));
  }

  WorkspaceCarver carver_;
  cudaStream_t stream_;
  bool keep_;
};

// The caller's memory, checked before anything is enqueued: each embedding's shape and
// stride, each gradient's stride and storage, and no gradient over an input or another
// gradient (in the narrow type's bytes). Shapes against each other are the widened call's.
template <class X>
void check_caller_input(Validator& check, const EmbeddingArgument<X>& argument) {
  if constexpr (is_eigen_dense<X>::value) {
    const auto view = input_view(argument.value);
    if (view.rows >= 1 && view.cols >= 1) check.embeddings(argument.name, view);
  } else {
    if (argument.value.view.r.rows >= 1 && argument.value.view.r.cols >= 1)
      check.embeddings(argument.name, argument.value.view.r);
  }
}
template <class G>
void check_caller_input(Validator&, const GradientArgument<G>&) {}

template <class X>
void check_caller_output(Validator&, const EmbeddingArgument<X>&) {}
template <class G>
void check_caller_output(Validator& check, const GradientArgument<G>& argument) {
  if constexpr (!std::is_same<remove_cvref_t<G>, skip_t>::value) {
    auto& g = argument.value;
    const auto view = caller_gradient(g);
    check.gradient(argument.name, view, argument.name, view);
  }
}

/// The caller-memory checks: they throw; on a sharded tag a failure joins the agreement
/// instead, so that every rank throws it.
template <class Tag, class Checks>
void check_caller(Validator&, const Tag&, Checks&& checks) {
  checks();
}
template <class Group, class Checks>
void check_caller(Validator& check, const sharded_tag<cuda_tag, Group>& tag, Checks&& checks) {
  const std::string error = local_error(check, checks);
  if (!error.empty()) fail_agreement(*tag.group, check, error);
}

/// DeviceNarrow of the cuda tags (loss in host or device memory, single process or sharded).
struct NarrowOnDevice {
  static constexpr bool available = true;

  template <class T, class Loss, class Tag, class Call, class... Arguments>
  static T run(Loss& loss, const Tag& tag, const char* loss_name, const char* method,
               bool keep_gradients, Call&& call, Arguments&&... arguments) {
    Validator check(loss_name, scalar_name<T>(), method);
    check_caller(check, tag, [&] {
      (check_caller_input(check, arguments), ...);
      (check_caller_output(check, arguments), ...);
    });
    const cudaStream_t stream = stream_of(tag);
    const char* where = "metricloss: half / bfloat16 staging";

    NarrowStager<T> counter(nullptr, stream, keep_gradients);
    (void)std::tuple<decltype(counter.stage(std::forward<Arguments>(arguments)))...>{
        counter.stage(std::forward<Arguments>(arguments))...};
    Workspace& workspace = scratch_of<NarrowWorkspaces>(loss).per_stream.for_stream(stream);
    NarrowStager<T> stager(workspace.device_memory(std::max<std::size_t>(counter.bytes(), 256)),
                           stream, keep_gradients);
    // Braces: the arguments are staged left to right.
    std::tuple<decltype(stager.stage(std::forward<Arguments>(arguments)))...> staged{
        stager.stage(std::forward<Arguments>(arguments))...};
    throw_on_error(cudaGetLastError(), where);
    const T value = std::apply([&](auto&... s) { return call(s.get()...); }, staged);
    std::apply([&](auto&... s) { (s.finish(stream), ...); }, staged);
    throw_on_error(cudaGetLastError(), where);
    return value;
  }
};

}  // namespace cuda

template <>
struct DeviceNarrow<cuda_tag> : cuda::NarrowOnDevice {};
template <class U>
struct DeviceNarrow<cuda_deferred_tag<U>> : cuda::NarrowOnDevice {};
template <class Group>
struct DeviceNarrow<sharded_tag<cuda_tag, Group>> : cuda::NarrowOnDevice {};

}  // namespace detail
}  // namespace metricloss
