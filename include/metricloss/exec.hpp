#pragma once
// Execution tags: empty value types passed first to every loss call (as xsimd's
// architectures and thrust's policies). Each loss has one backend specialisation per tag;
// a tag with no backend for a loss is a compile error, never a silent fallback.
#include <type_traits>

namespace metricloss {

/// A batch loss over the global batch of a group of ranks (API.md, "Global batches"): rank r
/// passes its rows x_r of X = concat_r(x_r); every rank gets the loss of X and writes its own
/// rows of dL/dX. Made by `metricloss::simd.sharded(group)`; the group is viewed, not owned.
/// Group: a concept (docs/API.md) met by metricloss::thread_rank (<metricloss/thread_group.hpp>)
/// and metricloss::mpi_group (<metricloss/mpi.hpp>).
template <class Base, class Group>
struct sharded_tag {
  Base base;
  Group* group;
};

/// Plain C++ loops: the reference every other path is tested against.
struct scalar_tag {
  explicit constexpr scalar_tag() = default;
  /// This path over a group's global batch.
  template <class Group>
  constexpr sharded_tag<scalar_tag, Group> sharded(Group& group) const {
    return {*this, &group};
  }
};
/// xsimd batches for the best instruction set enabled at compile time (-march).
struct simd_tag {
  explicit constexpr simd_tag() = default;
  /// This path over a group's global batch.
  template <class Group>
  constexpr sharded_tag<simd_tag, Group> sharded(Group& group) const {
    return {*this, &group};
  }
};

inline constexpr scalar_tag scalar{};
inline constexpr simd_tag simd{};

namespace detail {

template <class...>
inline constexpr bool always_false = false;

template <class Tag>
struct is_sharded : std::false_type {};
template <class Base, class Group>
struct is_sharded<sharded_tag<Base, Group>> : std::true_type {};
template <class Tag>
inline constexpr bool is_sharded_v = is_sharded<Tag>::value;

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
