#pragma once
// Non-owning views over Eigen inputs and outputs, so that kernels see one type per scalar
// whatever the caller passed (Map, Map with OuterStride, plain matrix), with no copy.
#include <metricloss/config.hpp>
#include <metricloss/types.hpp>

#include <cstddef>
#include <type_traits>

namespace metricloss {
namespace detail {

/// Row-major matrix view: element (i, j) at data[i * stride + j].
template <class T>
struct MatrixView {
  T* data = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index stride = 0;

  METRICLOSS_HOST_DEVICE T* row(Index i) const { return data + i * stride; }
  METRICLOSS_HOST_DEVICE T& operator()(Index i, Index j) const { return data[i * stride + j]; }
  METRICLOSS_HOST_DEVICE bool empty() const { return data == nullptr; }
  /// One past the last element touched: the extent used by overlap checks.
  std::size_t extent_bytes() const {
    return rows == 0 || cols == 0
               ? 0
               : static_cast<std::size_t>((rows - 1) * stride + cols) * sizeof(T);
  }
};

/// Strided vector view (labels may be a column of a larger matrix).
template <class L>
struct VectorView {
  const L* data = nullptr;
  Index size = 0;
  Index stride = 1;

  METRICLOSS_HOST_DEVICE L operator[](Index i) const { return data[i * stride]; }
  std::size_t extent_bytes() const {
    return size == 0 ? 0 : static_cast<std::size_t>((size - 1) * stride + 1) * sizeof(L);
  }
};

template <class Derived>
constexpr void require_embedding_layout() {
  static_assert(bool(Derived::IsRowMajor) || Derived::ColsAtCompileTime == 1,
                "metricloss: embeddings must be row-major (use metricloss::RowMatrix<T>)");
  static_assert((int(Eigen::internal::traits<Derived>::Flags) & Eigen::DirectAccessBit) != 0,
                "metricloss: embeddings must have direct memory access (a Map or a Matrix)");
  static_assert(Derived::InnerStrideAtCompileTime == 1 ||
                    Derived::InnerStrideAtCompileTime == Eigen::Dynamic,
                "metricloss: embeddings must have inner stride 1");
}

/// View of an input embedding matrix (row-major, direct access).
template <class Derived>
MatrixView<const typename Derived::Scalar> input_view(const Eigen::MatrixBase<Derived>& m) {
  require_embedding_layout<Derived>();
  const Derived& d = m.derived();
  return {d.data(), d.rows(), d.cols(), d.rows() <= 1 ? d.cols() : d.outerStride()};
}

/// View of a gradient output; `skip` gives an empty view.
template <class X>
auto output_view(X&& out) {
  using D = remove_cvref_t<X>;
  if constexpr (std::is_same<D, skip_t>::value) {
    return skip_t{};
  } else {
    require_embedding_layout<D>();
    using S = typename D::Scalar;
    return MatrixView<S>{const_cast<S*>(out.data()), out.rows(), out.cols(),
                         out.rows() <= 1 ? out.cols() : out.outerStride()};
  }
}

/// View of a gradient argument: empty for `skip`. A matrix without storage (null data, e.g.
/// one never resized) is not a skip: its view keeps its shape with stride -1, which
/// Validator::gradient rejects.
template <class T, class X>
MatrixView<T> gradient_view(X&& out) {
  using D = remove_cvref_t<X>;
  if constexpr (std::is_same<D, skip_t>::value) {
    return MatrixView<T>{};
  } else {
    static_assert(std::is_same<typename D::Scalar, T>::value,
                  "metricloss: a gradient must have the loss's scalar type");
    if (out.data() == nullptr) return MatrixView<T>{nullptr, out.rows(), out.cols(), -1};
    return output_view(std::forward<X>(out));
  }
}

template <class Derived>
VectorView<typename Derived::Scalar> label_view(const Eigen::MatrixBase<Derived>& v) {
  static_assert(Derived::IsVectorAtCompileTime, "metricloss: labels must be an Eigen vector");
  static_assert((int(Eigen::internal::traits<Derived>::Flags) & Eigen::DirectAccessBit) != 0,
                "metricloss: labels must have direct memory access (a Map or a Matrix)");
  const Derived& d = v.derived();
  return {d.data(), d.size(), d.size() <= 1 ? 1 : d.innerStride()};
}

}  // namespace detail
}  // namespace metricloss
