#pragma once
// Queries Q against a reference set R, grouped for the miner and the lifted loss: anchors are
// the rows of Q, candidates the rows of R. P(a) = {j in R : y_j = y_a, j != self(a)},
// Neg(a) = {j in R : y_j != y_a}.
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/reference_view.hpp>

#include <cstddef>
#include <type_traits>
#include <vector>

namespace metricloss {
namespace detail {

/// The interface of LabelClasses that the miner uses (anchors, candidates, self, own_class,
/// class_of, members, positives, negatives), for Q x R. Allocates nothing once warm.
class CrossClasses {
 public:
  /// Groups R's labels and finds each query's class in R; false when a label is NaN.
  template <class LQ, class LR>
  bool assign(const VectorView<LQ>& q_labels, const VectorView<LR>& r_labels,
              const SelfIndex& self) {
    if (!candidates_.assign(r_labels)) return false;
    anchors_ = q_labels.size;
    if (own_.size() < static_cast<std::size_t>(anchors_)) {
      own_.resize(static_cast<std::size_t>(anchors_));
      self_.resize(static_cast<std::size_t>(anchors_));
    }
    positive_pairs_ = 0;
    for (Index a = 0; a < anchors_; ++a) {
      const LQ y = q_labels[a];
      if constexpr (std::is_floating_point<LQ>::value) {
        if (y != y) return false;
      }
      const Index c = candidates_.find(r_labels, y);
      own_[static_cast<std::size_t>(a)] = c;
      self_[static_cast<std::size_t>(a)] = self[a];
      positive_pairs_ += positives(a);
    }
    return true;
  }

  Index anchors() const { return anchors_; }
  Index candidates() const { return candidates_.size(); }
  Index self(Index a) const { return self_[static_cast<std::size_t>(a)]; }
  /// Query a's class among R's classes, or -1 when no row of R shares its label.
  Index own_class(Index a) const { return own_[static_cast<std::size_t>(a)]; }
  /// Each candidate's class id.
  const Index* class_of() const { return candidates_.class_of(); }
  Index class_of(Index j) const { return candidates_.class_of(j); }

  /// The rows of R with query a's label (self(a) included), in increasing order.
  const Index* members_begin(Index a) const {
    const Index c = own_class(a);
    return c < 0 ? nullptr : candidates_.class_begin(c);
  }
  const Index* members_end(Index a) const {
    const Index c = own_class(a);
    return c < 0 ? nullptr : candidates_.class_end(c);
  }
  Index members(Index a) const { return members_end(a) - members_begin(a); }
  /// |P(a)|, |Neg(a)|. self(a), where given, has a's label (the face checks it).
  Index positives(Index a) const { return members(a) - (self(a) >= 0 && members(a) > 0 ? 1 : 0); }
  Index negatives(Index a) const { return candidates() - members(a); }
  /// |P| = sum_a |P(a)|: ordered (query, candidate) positive pairs.
  Index positive_pairs() const { return positive_pairs_; }

 private:
  LabelClasses candidates_;
  Index anchors_ = 0, positive_pairs_ = 0;
  std::vector<Index> own_, self_;
};

}  // namespace detail
}  // namespace metricloss
