#pragma once
// Cross-batch memory (XBM, Wang et al., CVPR 2020): a FIFO ring of past embeddings and their
// labels that later batches mine against as a reference set. No gradient flows into it.
//   metricloss::CrossBatchMemory<float> memory(capacity, dim);
//   auto slots = memory.enqueue(x, labels);          // this batch's rows in the memory
//   loss.forward_backward(tag, x, labels, memory.reference(slots), grad_x, metricloss::skip);
// enqueue copies the batch's last min(N, capacity) rows over the oldest ones (wrapping
// around) and returns, per row of the batch, its slot or -1 (not kept); as a self_index it
// keeps each query from being its own positive. Everything is allocated by the constructor.
#include <metricloss/detail/reference_view.hpp>
#include <metricloss/detail/validate.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/reference.hpp>
#include <metricloss/types.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

namespace metricloss {

namespace detail {
struct Ring;
}

/// Where the rows of one enqueued batch went: slot(i), or -1 for a row not kept (the first
/// N - capacity rows of a batch larger than the memory). Computed, not stored: a host object
/// whatever the memory's device, usable as a self_index.
class MemorySlots {
 public:
  MemorySlots() = default;
  Index size() const { return rows_; }
  Index operator[](Index i) const { return i < skipped_ ? Index(-1) : (first_ + i - skipped_) % capacity_; }

 private:
  friend struct detail::Ring;
  MemorySlots(Index rows, Index skipped, Index first, Index capacity)
      : rows_(rows), skipped_(skipped), first_(first), capacity_(capacity) {}
  Index rows_ = 0, skipped_ = 0, first_ = 0, capacity_ = 1;
};

namespace detail {

/// The FIFO bookkeeping of a memory (host or device): where the next batch goes.
struct Ring {
  Index capacity, size = 0, head = 0;

  /// A batch of `rows` rows: its last min(rows, capacity) are kept, the i-th of them in slot
  /// (first + i) % capacity.
  struct Placement {
    Index kept, skipped, first;
    MemorySlots slots;
  };
  Placement place(Index rows) {
    const Index kept = std::min(rows, capacity), skipped = rows - kept, first = head;
    head = (first + kept) % capacity;
    size = std::min(size + kept, capacity);
    return {kept, skipped, first, MemorySlots(rows, skipped, first, capacity)};
  }
};

/// The checks of a memory's constructor and of enqueue's shapes.
template <class T>
void check_memory_shape(const char* memory, Index capacity, Index dim) {
  if (capacity < 1 || dim < 1)
    throw invalid_argument(std::string("metricloss::") + memory + "<" + scalar_name<T>() + ">::" +
                           memory + ": capacity " + std::to_string(capacity) + " and dim " +
                           std::to_string(dim) + " must both be >= 1");
}

template <class T, class LX>
void check_enqueue(Validator& check, const MatrixView<const T>& x, const VectorView<LX>& labels, Index dim) {
  check.embeddings("x", x);
  if (x.cols != dim)
    check.fail("argument 'x' has shape " + shape_string(x.rows, x.cols) + ", expected " +
               std::to_string(dim) + " columns (the memory's dim)");
  check.labels("labels", labels, x.rows, "x");
}

}  // namespace detail

/// A FIFO ring of `capacity` embeddings of dimension `dim` (scalar T) with labels (type L).
template <class T, class L = std::int64_t>
class CrossBatchMemory {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "metricloss::CrossBatchMemory<T>: T must be float or double");
  static_assert(std::is_arithmetic<L>::value, "metricloss::CrossBatchMemory: labels are arithmetic");

 public:
  using scalar_type = T;
  using label_type = L;
  using Slots = MemorySlots;

  CrossBatchMemory(Index capacity, Index dim) : ring_{capacity}, dim_(dim) {
    detail::check_memory_shape<T>("CrossBatchMemory", capacity, dim);
    rows_.resize(capacity, dim);
    labels_.resize(capacity);
  }

  Index capacity() const { return ring_.capacity; }
  Index dim() const { return dim_; }
  /// Rows holding an embedding and a label (slots never written hold neither).
  Index size() const { return ring_.size; }

  /// Copies the batch (x: N x dim, labels: length N, any arithmetic type, converted to L)
  /// into the ring; returns the slots of its rows.
  template <class X, class LX>
  Slots enqueue(const Eigen::MatrixBase<X>& x, const Eigen::MatrixBase<LX>& labels) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::CrossBatchMemory<T>::enqueue: embeddings must have scalar type T");
    detail::Validator check("CrossBatchMemory", detail::scalar_name<T>(), "enqueue");
    const auto xv = detail::input_view(x);
    const auto lv = detail::label_view(labels);
    detail::check_enqueue(check, xv, lv, dim_);
    const detail::Ring::Placement at = ring_.place(xv.rows);
    for (Index i = 0; i < at.kept; ++i) {
      const Index slot = (at.first + i) % ring_.capacity;
      const T* from = xv.row(at.skipped + i);
      std::copy(from, from + dim_, rows_.row(slot).data());
      labels_[slot] = static_cast<L>(lv[at.skipped + i]);
    }
    return at.slots;
  }

  /// The valid rows as a reference set (no query among them).
  ReferenceSet<T, L> reference() const { return {{rows_view(), labels_view(), {}}}; }

  /// The valid rows as a reference set whose rows `slots` are the queries themselves (the
  /// batch just enqueued). `slots` must outlive the reference set's use.
  ReferenceSet<T, L> reference(const Slots& slots) const {
    return {{rows_view(), labels_view(), detail::self_index_of(slots)}};
  }

  /// The stored rows and labels, slot order (the first size() are valid).
  const RowMatrix<T>& rows() const { return rows_; }
  const Eigen::Matrix<L, Eigen::Dynamic, 1>& labels() const { return labels_; }

 private:
  detail::MatrixView<const T> rows_view() const { return {rows_.data(), ring_.size, dim_, dim_}; }
  detail::VectorView<L> labels_view() const { return {labels_.data(), ring_.size, 1}; }

  detail::Ring ring_;
  Index dim_;
  RowMatrix<T> rows_;
  Eigen::Matrix<L, Eigen::Dynamic, 1> labels_;
};

}  // namespace metricloss
