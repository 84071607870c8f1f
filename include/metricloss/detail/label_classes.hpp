#pragma once
// The rows of one batch grouped by label, shared by the batch losses (batch triplet, lifted).
#include <metricloss/detail/views.hpp>
#include <metricloss/types.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace metricloss {
namespace detail {

/// The rows of one label vector grouped by class: dense class ids, and each class's rows in
/// increasing order. Labels compare with == (Caffe's rule). Allocates nothing once warm at
/// a given N.
class LabelClasses {
 public:
  /// Groups `labels`; false (and nothing usable) when a label is NaN.
  template <class L>
  bool assign(const VectorView<L>& labels) {
    const Index n = labels.size;
    size_ = n;
    if constexpr (std::is_floating_point<L>::value) {
      for (Index i = 0; i < n; ++i)
        if (labels[i] != labels[i]) return false;
    }
    Index* order = grown(order_, n);
    if (!counting_sort(labels, order)) {
      for (Index i = 0; i < n; ++i) order[i] = i;
      std::sort(order, order + n, [&](Index a, Index b) {
        const L la = labels[a], lb = labels[b];
        return la < lb || (!(lb < la) && a < b);
      });
    }
    Index* class_of = grown(class_of_, n);
    Index* start = grown(start_, n + 1);
    classes_ = 0;
    for (Index r = 0; r < n; ++r) {
      if (r == 0 || labels[order[r - 1]] != labels[order[r]]) start[classes_++] = r;
      class_of[order[r]] = classes_ - 1;
    }
    start[classes_] = n;
    positive_pairs_ = 0;
    for (Index c = 0; c < classes_; ++c) {
      const Index k = class_size(c);
      positive_pairs_ += k * (k - 1) / 2;
    }
    return true;
  }

  Index size() const { return size_; }
  /// The miner's view of one batch: every row is an anchor and a candidate, and is itself.
  Index anchors() const { return size_; }
  Index candidates() const { return size_; }
  Index self(Index a) const { return a; }
  Index own_class(Index a) const { return class_of(a); }
  Index classes() const { return classes_; }
  /// Each row's class id.
  const Index* class_of() const { return class_of_.data(); }
  Index class_of(Index i) const { return class_of_[static_cast<std::size_t>(i)]; }
  Index class_size(Index c) const { return start_[static_cast<std::size_t>(c + 1)] - start_[static_cast<std::size_t>(c)]; }
  /// |P|: the number of pairs i < j with equal labels.
  Index positive_pairs() const { return positive_pairs_; }

  /// The rows of class c, in increasing order.
  const Index* class_begin(Index c) const { return order_.data() + start_[static_cast<std::size_t>(c)]; }
  const Index* class_end(Index c) const { return order_.data() + start_[static_cast<std::size_t>(c + 1)]; }

  /// The class whose label equals `value` (labels as grouped by assign), or -1. Compared in
  /// the labels' common type, as == compares them.
  template <class L, class V>
  Index find(const VectorView<L>& labels, V value) const {
    using C = std::common_type_t<L, V>;
    const C v = static_cast<C>(value);
    Index lo = 0, hi = classes_;
    while (lo < hi) {
      const Index mid = lo + (hi - lo) / 2;
      if (static_cast<C>(labels[*class_begin(mid)]) < v) lo = mid + 1;
      else hi = mid;
    }
    return lo < classes_ && static_cast<C>(labels[*class_begin(lo)]) == v ? lo : -1;
  }

  /// The rows of row a's class, a included, in increasing order.
  const Index* members_begin(Index a) const { return order_.data() + start_[static_cast<std::size_t>(class_of(a))]; }
  const Index* members_end(Index a) const { return order_.data() + start_[static_cast<std::size_t>(class_of(a) + 1)]; }
  /// |P(a)| = class size - 1 and |Neg(a)| = N - class size.
  Index positives(Index a) const { return members_end(a) - members_begin(a) - 1; }
  Index negatives(Index a) const { return size_ - (members_end(a) - members_begin(a)); }

  /// f(k) for every row k < i of row i's class, in increasing k.
  template <class F>
  void for_each_earlier_positive(Index i, F&& f) const {
    for (const Index* p = members_begin(i); p != members_end(i) && *p < i; ++p) f(*p);
  }

  /// f(i, j) for every positive pair, i < j, class by class.
  template <class F>
  void for_each_positive_pair(F&& f) const {
    for (Index c = 0; c < classes_; ++c) {
      const Index* first = order_.data() + start_[static_cast<std::size_t>(c)];
      const Index* last = order_.data() + start_[static_cast<std::size_t>(c + 1)];
      for (const Index* p = first; p != last; ++p)
        for (const Index* q = p + 1; q != last; ++q) f(*p, *q);
    }
  }

 private:
  /// order = the rows sorted by (label, row), by counting, for integer labels spanning fewer
  /// than 2N + 1024 values (class ids, as users pass them); false otherwise, with order
  /// untouched. std::sort took 4.6 ms of a 114 ms batch-hard call on a memory of 65536 rows
  /// (bench_reference); this takes two passes over the labels.
  template <class L>
  bool counting_sort(const VectorView<L>& labels, Index* order) {
    if constexpr (!std::is_integral<L>::value) {
      return false;
    } else {
      const Index n = labels.size;
      if (n == 0) return true;
      L lo = labels[0], hi = labels[0];
      for (Index i = 1; i < n; ++i) {
        lo = std::min(lo, labels[i]);
        hi = std::max(hi, labels[i]);
      }
      // hi - lo, exact in 64 bits (conversion to unsigned is modulo 2^64).
      const auto key = [&](L v) { return static_cast<std::uint64_t>(v) - static_cast<std::uint64_t>(lo); };
      const std::uint64_t span = key(hi);
      if (span >= static_cast<std::uint64_t>(2 * n + 1024)) return false;
      const auto values = static_cast<Index>(span) + 1;
      Index* next = grown(counts_, 2 * n + 1024);  // sized by N alone: warm, no allocation
      std::fill(next, next + values, Index(0));
      for (Index i = 0; i < n; ++i) ++next[key(labels[i])];
      Index position = 0;  // counts to each value's first position
      for (Index v = 0; v < values; ++v) {
        const Index count = next[v];
        next[v] = position;
        position += count;
      }
      for (Index i = 0; i < n; ++i) order[next[key(labels[i])]++] = i;
      return true;
    }
  }

  static Index* grown(std::vector<Index>& v, Index size) {
    if (v.size() < static_cast<std::size_t>(size)) v.resize(static_cast<std::size_t>(size));
    return v.data();
  }

  Index size_ = 0, classes_ = 0, positive_pairs_ = 0;
  // Rows sorted by (label, row); the class of each row; each class's first sorted position.
  std::vector<Index> order_, class_of_, start_;
  std::vector<Index> counts_;  // counting_sort's, one per label value
};

}  // namespace detail
}  // namespace metricloss
