#pragma once
// How training batches are drawn. Every sampler returns the indices (into the training
// set) of the images to embed, in the order the loss expects its inputs.
#include "dataset.hpp"

#include <algorithm>
#include <array>
#include <numeric>
#include <random>
#include <vector>

namespace fashion_mnist {

using Index = Eigen::Index;

/// The training images of each class.
class ClassIndex {
 public:
  explicit ClassIndex(const Labels& labels) {
    for (Index i = 0; i < labels.size(); ++i) members_[std::size_t(labels[i])].push_back(i);
  }
  const std::vector<Index>& members(int label) const { return members_[std::size_t(label)]; }
  std::vector<int> populated_classes(Index at_least) const {
    std::vector<int> classes;
    for (int c = 0; c < class_count; ++c)
      if (Index(members_[std::size_t(c)].size()) >= at_least) classes.push_back(c);
    return classes;
  }

  /// A uniformly random image of class `label` other than `except` (`except` itself only if
  /// it is the class's sole image).
  Index other_member(int label, Index except, std::mt19937& rng) const {
    const auto& pool = members(label);
    if (pool.size() < 2) return pool.front();
    std::uniform_int_distribution<std::size_t> pick(0, pool.size() - 2);
    const Index chosen = pool[pick(rng)];
    return chosen == except ? pool.back() : chosen;
  }

  /// A uniformly random image whose class differs from `label`.
  Index member_of_other_class(int label, std::mt19937& rng) const {
    std::size_t others = 0;
    for (int c = 0; c < class_count; ++c)
      if (c != label) others += members(c).size();
    std::uniform_int_distribution<std::size_t> pick(0, others - 1);
    std::size_t position = pick(rng);
    for (int c = 0;; ++c) {
      if (c == label) continue;
      if (position < members(c).size()) return members(c)[position];
      position -= members(c).size();
    }
  }

 private:
  std::array<std::vector<Index>, class_count> members_;
};

/// Anchors visit the training set in a fresh random order every epoch.
class AnchorStream {
 public:
  explicit AnchorStream(Index size) : order_(std::size_t(size)) {
    std::iota(order_.begin(), order_.end(), Index(0));
  }
  Index size() const { return Index(order_.size()); }
  /// A fresh permutation that depends on `rng` only, not on earlier epochs.
  void shuffle(std::mt19937& rng) {
    std::iota(order_.begin(), order_.end(), Index(0));
    std::shuffle(order_.begin(), order_.end(), rng);
  }
  /// Anchors [first, first + count) of this epoch's order, clipped at the end.
  std::vector<Index> slice(Index first, Index count) const {
    const Index last = std::min(first + count, size());
    return {order_.begin() + first, order_.begin() + last};
  }

 private:
  std::vector<Index> order_;
};

/// Two label streams for the contrastive loss, as the softmax + contrastive (siamese) seed
/// feeds Caffe: stream A is the shuffled training set, stream B pairs each image with a
/// partner that shares its class with probability `positive_fraction` (a plain second
/// shuffle would give 10% similar pairs, too few for the attractive term to shape classes).
/// Returns [a_0 .. a_{B-1}, b_0 .. b_{B-1}].
inline std::vector<Index> sample_pairs(const std::vector<Index>& anchors, const Labels& labels,
                                       const ClassIndex& classes, double positive_fraction,
                                       std::mt19937& rng) {
  std::bernoulli_distribution similar(positive_fraction);
  std::vector<Index> rows(anchors);
  for (Index anchor : anchors) {
    const int label = labels[anchor];
    rows.push_back(similar(rng) ? classes.other_member(label, anchor, rng)
                                : classes.member_of_other_class(label, rng));
  }
  return rows;
}

/// Random triplets: for each anchor a positive of its class and a negative of another.
/// Returns [anchors, positives, negatives].
inline std::vector<Index> sample_triplets(const std::vector<Index>& anchors, const Labels& labels,
                                          const ClassIndex& classes, std::mt19937& rng) {
  std::vector<Index> rows(anchors), negatives;
  for (Index anchor : anchors) {
    rows.push_back(classes.other_member(labels[anchor], anchor, rng));
    negatives.push_back(classes.member_of_other_class(labels[anchor], rng));
  }
  rows.insert(rows.end(), negatives.begin(), negatives.end());
  return rows;
}

/// The P x K sampler of Hermans, Beyer & Leibe (2017): P random classes, K random images
/// of each (without replacement), so that every anchor has positives and negatives to mine.
inline std::vector<Index> sample_classes_by_images(const ClassIndex& classes, int classes_per_batch,
                                                   int images_per_class, std::mt19937& rng) {
  std::vector<int> candidates = classes.populated_classes(images_per_class);
  std::shuffle(candidates.begin(), candidates.end(), rng);
  candidates.resize(std::min(candidates.size(), std::size_t(classes_per_batch)));
  std::vector<Index> rows;
  for (int label : candidates) {
    std::vector<Index> pool = classes.members(label);
    // Partial Fisher-Yates: the first K entries become a uniform sample without replacement.
    for (int k = 0; k < images_per_class; ++k) {
      std::uniform_int_distribution<std::size_t> pick(std::size_t(k), pool.size() - 1);
      std::swap(pool[std::size_t(k)], pool[pick(rng)]);
      rows.push_back(pool[std::size_t(k)]);
    }
  }
  return rows;
}

}  // namespace fashion_mnist
