#pragma once
// Per-functor scratch of the backends: every backend keeps its own contents (buffers, CUDA
// workspaces) in the functor's slot, created on first use, dying with the functor, so
// scratch is never global or shared between instances and the public headers declare none
// of it. Each backend type gets its own entry: a functor driven by several tags keeps the
// scratch of each (no reallocation when they alternate). A copied functor starts empty.
#include <cstddef>
#include <memory>
#include <type_traits>
#include <utility>

namespace metricloss {
namespace detail {

class BackendSlot {
 public:
  /// What a backend keeps in the slot derives from this.
  struct Contents {
    virtual ~Contents() = default;
  };

  BackendSlot() = default;
  BackendSlot(const BackendSlot&) noexcept {}
  BackendSlot& operator=(const BackendSlot& other) noexcept {
    if (this != &other) reset();
    return *this;
  }
  BackendSlot(BackendSlot&&) noexcept = default;
  BackendSlot& operator=(BackendSlot&&) noexcept = default;

  /// The contents of type C, created on first use. Once warm: no allocation, one
  /// dynamic_cast per entry looked at.
  template <class C>
  C& get() {
    static_assert(std::is_base_of<Contents, C>::value, "slot contents derive from Contents");
    for (auto& entry : entries_)
      if (C* existing = dynamic_cast<C*>(entry.get())) return *existing;
    for (auto& entry : entries_)
      if (!entry) return static_cast<C&>(*(entry = std::make_unique<C>()));
    // Every entry taken (more backends than entries on one functor): the oldest gives way.
    for (std::size_t e = 0; e + 1 < capacity; ++e) entries_[e] = std::move(entries_[e + 1]);
    return static_cast<C&>(*(entries_[capacity - 1] = std::make_unique<C>()));
  }

  /// Frees every backend's contents now.
  void reset() noexcept {
    for (auto& entry : entries_) entry.reset();
  }

  /// Frees the contents of type C now (e.g. device memory after an unusually large batch).
  template <class C>
  void reset() noexcept {
    for (auto& entry : entries_)
      if (dynamic_cast<C*>(entry.get()) != nullptr) entry.reset();
  }

 private:
  // Per functor: the batch and reference-set scratch of scalar and simd, cuda's, the
  // float-in-double call and the normalised rows of the host and of cuda
  // (detail/normalize.hpp, backend/cuda/normalize.cuh): eight at most.
  static constexpr std::size_t capacity = 8;
  std::unique_ptr<Contents> entries_[capacity];
};

/// Every functor befriends this, so backends reach the slot without a public member.
struct BackendSlotAccess {
  template <class Loss>
  static BackendSlot& of(Loss& loss) {
    return loss.backend_slot_;
  }
};

/// A backend's scratch of type C in the functor's slot.
template <class C, class Loss>
C& scratch_of(Loss& loss) {
  return BackendSlotAccess::of(loss).template get<C>();
}

}  // namespace detail
}  // namespace metricloss
