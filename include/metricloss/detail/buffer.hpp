#pragma once
// Scratch storage of the backends: grow-only, so that a call at the same or a smaller size
// than an earlier one allocates nothing.
#include <metricloss/types.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace metricloss {
namespace detail {

/// Grow-only storage of T: data(size) keeps what the buffer held (up to its old size).
template <class T>
class GrowOnlyBuffer {
 public:
  T* data(std::size_t size) {
    if (storage_.size() < size) storage_.resize(size);
    return storage_.data();
  }

 private:
  std::vector<T> storage_;
};

/// Grow-only storage whose data starts on a 64-byte boundary: where a result's bits can
/// depend on the alignment of the memory it is computed in (the sign of a zero in a
/// vectorised product, fuzz finding 7), a reused functor must give the bits of a fresh one.
template <class T>
class AlignedBuffer {
 public:
  T* data(std::size_t size) {
    static_assert(64 % sizeof(T) == 0, "AlignedBuffer: T must divide a cache line");
    T* start = storage_.data(size + 64 / sizeof(T));
    const auto address = reinterpret_cast<std::uintptr_t>(start);
    return start + ((64 - address % 64) % 64) / sizeof(T);
  }

 private:
  GrowOnlyBuffer<T> storage_;
};

}  // namespace detail
}  // namespace metricloss
