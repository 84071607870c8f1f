#pragma once
// What a backend sees of a reference set: the candidates R, their labels, and which row of
// R each query is itself (SelfIndex, read through the caller's object without a copy).
#include <metricloss/detail/views.hpp>

namespace metricloss {
namespace detail {

/// self(a) = the row of R that is query a itself, or -1. Reads the caller's vector (an
/// Eigen integer vector, or any object with size() and operator[], e.g. the slots of a
/// CrossBatchMemory) through one function pointer: no copy, no allocation.
struct SelfIndex {
  const void* object = nullptr;
  Index size = 0;
  Index (*at)(const void*, Index) = nullptr;

  bool given() const { return at != nullptr; }
  Index operator[](Index a) const { return at == nullptr ? Index(-1) : at(object, a); }
};

template <class T, class L>
struct ReferenceView {
  MatrixView<const T> r;
  VectorView<L> labels;
  SelfIndex self;
};

}  // namespace detail
}  // namespace metricloss
