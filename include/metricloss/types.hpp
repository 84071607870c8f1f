#pragma once
#include <Eigen/Core>

#include <type_traits>

namespace metricloss {

using Index = Eigen::Index;

/// Row-major dynamic matrix: one embedding per row, the layout every loss expects.
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Maps over caller-owned row-major memory with any outer (row) stride >= cols.
template <class T>
using RowMap = Eigen::Map<RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using ConstRowMap = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Pass `metricloss::skip` in place of a gradient output that is not wanted
/// (Caffe's propagate_down = false): it is neither computed nor written.
struct skip_t {
  explicit constexpr skip_t() = default;
};
inline constexpr skip_t skip{};

namespace detail {

template <class X>
using remove_cvref_t = std::remove_cv_t<std::remove_reference_t<X>>;

/// True for the narrow storage types (__half, __nv_bfloat16) that a device path widens on
/// load; specialised by <metricloss/cuda.cuh> (backend/cuda/narrow.cuh), false elsewhere.
template <class S>
struct narrow_scalar : std::false_type {};
template <class S>
inline constexpr bool is_narrow_v = narrow_scalar<std::remove_cv_t<S>>::value;

template <class X, class = void>
struct is_eigen_dense : std::false_type {};
template <class X>
struct is_eigen_dense<X, std::enable_if_t<std::is_base_of<Eigen::DenseBase<X>, X>::value>>
    : std::true_type {};

// A label / similarity vector: an Eigen vector (compile-time) of an arithmetic type.
template <class X, class = void>
struct is_label_vector : std::false_type {};
template <class X>
struct is_label_vector<X, std::enable_if_t<is_eigen_dense<X>::value>>
    : std::bool_constant<X::IsVectorAtCompileTime &&
                         std::is_arithmetic<typename X::Scalar>::value> {};

// A writable row-major matrix with direct access, or skip.
template <class X, class = void>
struct is_gradient_output : std::false_type {};
template <>
struct is_gradient_output<skip_t> : std::true_type {};
template <class X>
struct is_gradient_output<X, std::enable_if_t<is_eigen_dense<X>::value>>
    : std::bool_constant<bool(X::IsRowMajor) && !bool(X::IsVectorAtCompileTime) &&
                         (int(Eigen::internal::traits<X>::Flags) & Eigen::LvalueBit) != 0 &&
                         (int(Eigen::internal::traits<X>::Flags) & Eigen::DirectAccessBit) != 0> {};

template <class X>
inline constexpr bool is_label_vector_v = is_label_vector<remove_cvref_t<X>>::value;
template <class X>
inline constexpr bool is_gradient_output_v = is_gradient_output<remove_cvref_t<X>>::value;

}  // namespace detail
}  // namespace metricloss
