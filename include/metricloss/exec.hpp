#pragma once
// Execution tags: empty value types passed first to every loss call (as xsimd's
// architectures and thrust's policies). Each loss has one backend specialisation per tag;
// a tag with no backend for a loss is a compile error, never a silent fallback.
#include <type_traits>

namespace metricloss {

/// Plain C++ loops: the reference every other path is tested against.
struct scalar_tag {
  explicit constexpr scalar_tag() = default;
};
/// xsimd batches for the best instruction set enabled at compile time (-march).
struct simd_tag {
  explicit constexpr simd_tag() = default;
};

inline constexpr scalar_tag scalar{};
inline constexpr simd_tag simd{};

namespace detail {

template <class...>
inline constexpr bool always_false = false;

/// Backend<Loss, Tag> holds the kernels of one loss for one execution tag. Each
/// backend/<tag>/<loss>.hpp specialises it; the primary template rejects the rest.
template <class Loss, class Tag>
struct Backend {
  static_assert(always_false<Loss, Tag>,
                "metricloss: this loss has no backend for this execution tag "
                "(include <metricloss/cuda.cuh> for metricloss::cuda)");
};

}  // namespace detail
}  // namespace metricloss
