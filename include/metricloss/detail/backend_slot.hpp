#pragma once
// Per-functor scratch for a backend the CPU headers cannot name (the CUDA workspaces): the
// backend creates its contents on first use and they die with the functor, so scratch is
// never global or shared between instances. A copied functor starts with an empty slot.
#include <memory>
#include <type_traits>

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
    if (this != &other) contents_.reset();
    return *this;
  }
  BackendSlot(BackendSlot&&) noexcept = default;
  BackendSlot& operator=(BackendSlot&&) noexcept = default;

  /// The contents of type C, created on first use (or replacing another backend's).
  template <class C>
  C& get() {
    static_assert(std::is_base_of<Contents, C>::value, "slot contents derive from Contents");
    if (C* existing = dynamic_cast<C*>(contents_.get())) return *existing;
    contents_ = std::make_unique<C>();
    return static_cast<C&>(*contents_);
  }

  /// Frees the contents now (e.g. device memory after an unusually large batch).
  void reset() noexcept { contents_.reset(); }

 private:
  std::unique_ptr<Contents> contents_;
};

/// Every functor befriends this, so backends reach the slot without a public member.
struct BackendSlotAccess {
  template <class Loss>
  static BackendSlot& of(Loss& loss) {
    return loss.backend_slot_;
  }
};

}  // namespace detail
}  // namespace metricloss
