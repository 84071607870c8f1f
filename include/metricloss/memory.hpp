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

/// A FIFO ring of `capacity` embeddings of dimension `dim` (scalar T) with labels (type L).
template <class T, class L = std::int64_t>
class CrossBatchMemory {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "metricloss::CrossBatchMemory<T>: T must be float or double");
  static_assert(std::is_arithmetic<L>::value, "metricloss::CrossBatchMemory: labels are arithmetic");

 public:
  using scalar_type = T;
  using label_type = L;

  /// Where the rows of one enqueued batch went: slot(i), or -1 for a row not kept (the
  /// first N - capacity rows of a batch larger than the memory). Computed, not stored.
  class Slots {
   public:
    Slots() = default;
    Index size() const { return rows_; }
    Index operator[](Index i) const {
      return i < skipped_ ? Index(-1) : (first_ + i - skipped_) % capacity_;
    }

   private:
    friend class CrossBatchMemory;
    Slots(Index rows, Index skipped, Index first, Index capacity)
        : rows_(rows), skipped_(skipped), first_(first), capacity_(capacity) {}
    Index rows_ = 0, skipped_ = 0, first_ = 0, capacity_ = 1;
  };

  CrossBatchMemory(Index capacity, Index dim)
      : capacity_(capacity), dim_(dim) {
    if (capacity < 1 || dim < 1)
      throw invalid_argument(std::string("metricloss::CrossBatchMemory<") +
                             detail::scalar_name<T>() + ">::CrossBatchMemory: capacity " +
                             std::to_string(capacity) + " and dim " + std::to_string(dim) +
                             " must both be >= 1");
    rows_.resize(capacity, dim);
    labels_.resize(capacity);
  }

  Index capacity() const { return capacity_; }
  Index dim() const { return dim_; }
  /// Rows holding an embedding and a label (slots never written hold neither).
  Index size() const { return size_; }

  /// Copies the batch (x: N x dim, labels: length N, any arithmetic type, converted to L)
  /// into the ring; returns the slots of its rows.
  template <class X, class LX>
  Slots enqueue(const Eigen::MatrixBase<X>& x, const Eigen::MatrixBase<LX>& labels) {
    static_assert(std::is_same<typename X::Scalar, T>::value,
                  "metricloss::CrossBatchMemory<T>::enqueue: embeddings must have scalar type T");
    detail::Validator check("CrossBatchMemory", detail::scalar_name<T>(), "enqueue");
    const auto xv = detail::input_view(x);
    check.embeddings("x", xv);
    if (xv.cols != dim_)
      check.fail("argument 'x' has shape " + detail::shape_string(xv.rows, xv.cols) +
                 ", expected " + std::to_string(dim_) + " columns (the memory's dim)");
    const auto lv = detail::label_view(labels);
    check.labels("labels", lv, xv.rows, "x");
    const Index kept = std::min(xv.rows, capacity_), skipped = xv.rows - kept;
    const Index first = head_;
    for (Index i = 0; i < kept; ++i) {
      const Index slot = (first + i) % capacity_;
      const T* from = xv.row(skipped + i);
      std::copy(from, from + dim_, rows_.row(slot).data());
      labels_[slot] = static_cast<L>(lv[skipped + i]);
    }
    head_ = (first + kept) % capacity_;
    size_ = std::min(size_ + kept, capacity_);
    return Slots(xv.rows, skipped, first, capacity_);
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
  detail::MatrixView<const T> rows_view() const { return {rows_.data(), size_, dim_, dim_}; }
  detail::VectorView<L> labels_view() const { return {labels_.data(), size_, 1}; }

  Index capacity_, dim_, size_ = 0, head_ = 0;
  RowMatrix<T> rows_;
  Eigen::Matrix<L, Eigen::Dynamic, 1> labels_;
};

}  // namespace metricloss
