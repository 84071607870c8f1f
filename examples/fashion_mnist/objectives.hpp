#pragma once
// A training objective = a batch sampler + a metricloss functor. Each turns the embeddings
// of its batch into a loss value and d(loss)/d(embeddings) with forward_backward(simd, ...),
// exactly as a user's training code calls the library. The labelled batch losses can also add
// the loss of the batch against a cross-batch memory of past embeddings (start_memory).
#include "data_parallel.hpp"
#include "samplers.hpp"

#include <metricloss/metricloss.hpp>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

namespace fashion_mnist {

namespace ml = metricloss;

/// Hyper-parameters of one training run; per-loss defaults come from default_settings().
struct Settings {
  std::string loss = "batch-all";
  float margin = 0.2f;
  float learning_rate = 1e-3f;
  bool l2_normalize = true;
  Index anchors_per_batch = 128;  // pairs / triplets per batch
  int classes_per_batch = 10;     // P of the P x K sampler
  int images_per_class = 16;      // K
  double positive_fraction = 0.5; // contrastive pairs that share a class
  bool soft_margin = false;       // batch-*: softplus instead of the hinge
  float pos_margin = 0.0f;        // batch-contrastive: hinge of the positive pairs
  /// l2_normalize done by the loss (its member normalize, on raw network outputs) instead of
  /// the network's last layer: batch-contrastive and multi-similarity, as in
  /// pytorch-metric-learning. Retrieval still uses the L2-normalised embeddings.
  bool loss_normalizes = false;
};

/// One rank's share of a data-parallel step (--ranks): data_parallel_gradient with its own
/// copy of the loss functor (a functor keeps scratch, so ranks on threads never share one).
class RankLoss {
 public:
  virtual ~RankLoss() = default;
  /// Leaves the global batch's parameter gradient in `replica` (the same on every rank) and
  /// returns the global batch's loss; `input` and `labels` are this rank's rows.
  virtual double step(EmbeddingNetwork& replica, AnyGroup& group, const Matrix& input,
                      const Labels& labels) = 0;
};

class Objective {
 public:
  virtual ~Objective() = default;
  /// Called at the start of every epoch.
  virtual void start_epoch(std::mt19937& rng) = 0;
  virtual Index batches_per_epoch() const = 0;
  /// Training-set indices of the images of batch `batch` of this epoch, in the loss's order.
  virtual std::vector<Index> sample(Index batch, std::mt19937& rng) = 0;
  /// The loss of the batch whose embeddings are `embeddings`, and its gradient (the batch
  /// alone, memory or not: what the fixed probe batches measure).
  virtual double loss_and_gradient(const Matrix& embeddings, const Labels& labels,
                                   Matrix& gradient) = 0;
  /// The loss the fixed probe batches measure before and after training (--check):
  /// loss_and_gradient's, except for a loss whose value can rise while every one of its terms
  /// falls (batch-contrastive's mean over the nonzero terms only: as easy pairs drop out, the
  /// mean of the rest grows), which is measured with a fixed denominator instead.
  virtual double probe_loss(const Matrix& embeddings, const Labels& labels, Matrix& gradient) {
    return loss_and_gradient(embeddings, labels, gradient);
  }
  /// A training step's loss and gradient: loss_and_gradient's, plus, once start_memory was
  /// called, weight x the loss of the batch against the memory (which it enters first).
  virtual double training_loss_and_gradient(const Matrix& embeddings, const Labels& labels,
                                            Matrix& gradient) {
    return loss_and_gradient(embeddings, labels, gradient);
  }
  /// Switches the cross-batch memory on with `capacity` rows of dimension `dim`, empty (the
  /// losses over one labelled batch only: loss_takes_memory()).
  virtual void start_memory(Index, Index, float) {
    throw std::logic_error("this loss has no cross-batch memory");
  }
  /// A rank of a data-parallel step; nullptr for the pair and triplet losses, whose batches
  /// have no global mining to share (loss_takes_ranks()).
  virtual std::unique_ptr<RankLoss> make_rank_loss() const { return nullptr; }
};

namespace detail {

using ConstRows = Eigen::Map<const Matrix>;
using Rows = Eigen::Map<Matrix>;

/// Block `part` of `parts` equal row blocks of `m`, as the maps the losses take.
inline ConstRows block(const Matrix& m, int part, int parts) {
  const Index rows = m.rows() / parts;
  return ConstRows(m.data() + part * rows * m.cols(), rows, m.cols());
}
inline Rows block(Matrix& m, int part, int parts) {
  const Index rows = m.rows() / parts;
  return Rows(m.data() + part * rows * m.cols(), rows, m.cols());
}
inline Eigen::Map<const Labels> block(const Labels& v, int part, int parts) {
  const Index rows = v.size() / parts;
  return Eigen::Map<const Labels>(v.data() + part * rows, rows);
}

/// Sampling shared by the pair and triplet objectives: one pass of shuffled anchors.
class AnchoredObjective : public Objective {
 public:
  AnchoredObjective(const Dataset& train, Index anchors_per_batch)
      : labels_(train.labels), classes_(train.labels), anchors_(train.size()),
        anchors_per_batch_(anchors_per_batch) {}
  void start_epoch(std::mt19937& rng) override { anchors_.shuffle(rng); }
  Index batches_per_epoch() const override {
    return (anchors_.size() + anchors_per_batch_ - 1) / anchors_per_batch_;
  }

 protected:
  std::vector<Index> anchors(Index batch) const {
    return anchors_.slice(batch * anchors_per_batch_, anchors_per_batch_);
  }
  const Labels& labels_;
  ClassIndex classes_;

 private:
  AnchorStream anchors_;
  Index anchors_per_batch_;
};

class ContrastiveObjective final : public AnchoredObjective {
 public:
  ContrastiveObjective(const Dataset& train, const Settings& s, ml::ContrastiveForm form)
      : AnchoredObjective(train, s.anchors_per_batch), loss_(s.margin, form),
        positive_fraction_(s.positive_fraction) {}
  std::vector<Index> sample(Index batch, std::mt19937& rng) override {
    return sample_pairs(anchors(batch), labels_, classes_, positive_fraction_, rng);
  }
  double loss_and_gradient(const Matrix& x, const Labels& y, Matrix& g) override {
    return loss_.forward_backward(ml::simd, block(x, 0, 2), block(x, 1, 2), block(y, 0, 2),
                                  block(y, 1, 2), block(g, 0, 2), block(g, 1, 2));
  }

 private:
  ml::ContrastiveLoss<float> loss_;
  double positive_fraction_;
};

class TripletObjective final : public AnchoredObjective {
 public:
  TripletObjective(const Dataset& train, const Settings& s)
      : AnchoredObjective(train, s.anchors_per_batch),
        loss_(s.margin, ml::Distance::squared_euclidean) {}
  std::vector<Index> sample(Index batch, std::mt19937& rng) override {
    return sample_triplets(anchors(batch), labels_, classes_, rng);
  }
  double loss_and_gradient(const Matrix& x, const Labels&, Matrix& g) override {
    return loss_.forward_backward(ml::simd, block(x, 0, 3), block(x, 1, 3), block(x, 2, 3),
                                  block(g, 0, 3), block(g, 1, 3), block(g, 2, 3));
  }

 private:
  ml::TripletLoss<float> loss_;
};

template <class Loss>
class LabelledRankLoss final : public RankLoss {
 public:
  explicit LabelledRankLoss(Loss loss) : loss_(std::move(loss)) {}
  double step(EmbeddingNetwork& replica, AnyGroup& group, const Matrix& input,
              const Labels& labels) override {
    return data_parallel_gradient(replica, loss_, ml::simd, group, input, labels, scratch_);
  }

 private:
  Loss loss_;
  DataParallelScratch<float> scratch_;
};

/// A loss over one labelled batch (batch triplet, lifted structure, batch contrastive,
/// multi-similarity) with a P x K sampler;
/// an epoch draws as many images as the training set holds.
template <class Loss>
class LabelledBatchObjective final : public Objective {
 public:
  LabelledBatchObjective(const Dataset& train, const Settings& s, Loss loss,
                         std::optional<Loss> probe = std::nullopt)
      : classes_(train.labels), train_size_(train.size()), loss_(std::move(loss)),
        probe_(std::move(probe)), classes_per_batch_(s.classes_per_batch),
        images_per_class_(s.images_per_class) {}
  void start_epoch(std::mt19937&) override {}
  Index batches_per_epoch() const override {
    const Index batch = Index(classes_per_batch_) * images_per_class_;
    return (train_size_ + batch - 1) / batch;
  }
  std::vector<Index> sample(Index, std::mt19937& rng) override {
    return sample_classes_by_images(classes_, classes_per_batch_, images_per_class_, rng);
  }
  double loss_and_gradient(const Matrix& x, const Labels& y, Matrix& g) override {
    return loss_.forward_backward(ml::simd, x, y, g);
  }
  double probe_loss(const Matrix& x, const Labels& y, Matrix& g) override {
    return probe_ ? probe_->forward_backward(ml::simd, x, y, g) : loss_and_gradient(x, y, g);
  }
  /// As in the XBM paper's trainer (Wang et al., CVPR 2020): the batch enters the memory
  /// first, then the batch's rows are the queries against everything the memory holds, its
  /// own rows included (the slots, as self_index, keep a row from being its own positive).
  /// The memory holds detached copies: no gradient flows into it (grad_r = skip).
  double training_loss_and_gradient(const Matrix& x, const Labels& y, Matrix& g) override {
    const double batch = loss_and_gradient(x, y, g);
    if (!memory_) return batch;
    const auto slots = memory_->enqueue(x, y);
    memory_gradient_.resize(g.rows(), g.cols());
    const double against_memory = loss_.forward_backward(
        ml::simd, x, y, memory_->reference(slots), memory_gradient_, ml::skip, memory_weight_);
    g += memory_gradient_;  // already times the weight (top_diff)
    return batch + double(memory_weight_) * against_memory;
  }
  void start_memory(Index capacity, Index dim, float weight) override {
    memory_.emplace(capacity, dim);
    memory_weight_ = weight;
  }
  std::unique_ptr<RankLoss> make_rank_loss() const override {
    return std::make_unique<LabelledRankLoss<Loss>>(loss_);
  }

 private:
  ClassIndex classes_;
  Index train_size_;
  Loss loss_;
  std::optional<Loss> probe_;  // probe_loss's functor, when not loss_
  int classes_per_batch_, images_per_class_;
  std::optional<ml::CrossBatchMemory<float, int>> memory_;
  float memory_weight_ = 0.0f;
  Matrix memory_gradient_;
};

template <class Loss>
std::unique_ptr<Objective> labelled_batch(const Dataset& train, const Settings& s, Loss loss,
                                          std::optional<Loss> probe = std::nullopt) {
  return std::make_unique<LabelledBatchObjective<Loss>>(train, s, std::move(loss),
                                                         std::move(probe));
}

}  // namespace detail

inline const std::vector<std::string>& loss_names() {
  static const std::vector<std::string> names = {
      "contrastive", "legacy", "triplet",           "batch-all",       "batch-hard",
      "semihard",    "lifted", "batch-contrastive", "multi-similarity"};
  return names;
}

/// The losses that take a cross-batch memory (--memory): those over one labelled batch.
inline bool loss_takes_memory(const std::string& loss) {
  return loss == "batch-all" || loss == "batch-hard" || loss == "semihard" || loss == "lifted" ||
         loss == "batch-contrastive" || loss == "multi-similarity";
}

/// The losses that train data-parallel (--ranks): the same, each sharded over the ranks.
inline bool loss_takes_ranks(const std::string& loss) { return loss_takes_memory(loss); }

/// Per-loss settings tuned on this data set (RESULTS.md has the sweeps' outcome). Every loss
/// but lifted trains best on the unit sphere: without the L2 normalisation the network can
/// shrink or inflate all distances at once, and the triplet/contrastive losses then spend
/// their steps on scale (batch-hard collapses to a point). Lifted structure's log-sum-exp
/// needs distances larger than the sphere's diameter of 2 to separate classes.
inline Settings default_settings(const std::string& loss) {
  Settings s;
  s.loss = loss;
  if (loss == "contrastive") {
    s.margin = 0.7f;  // dissimilar pairs pushed to ~41 degrees apart on the unit sphere
    // Fewer similar pairs than half: pulling every same-class pair to distance 0 fights
    // the spread that nearest-neighbour retrieval needs within a class.
    s.positive_fraction = 0.25;
  } else if (loss == "legacy") {
    // d^2 < 0.5 on the unit sphere: dissimilar pairs must be about 41 degrees apart.
    s.margin = 0.5f;
    s.positive_fraction = 0.1;  // the natural rate of two independent streams
  } else if (loss == "triplet") {
    s.margin = 0.5f;  // squared distances on the unit sphere lie in [0, 4]
  } else if (loss == "batch-all" || loss == "semihard") {
    s.margin = 0.2f;
  } else if (loss == "batch-hard") {
    s.margin = 0.2f;
    // With 16 images a class, the hardest positive of Fashion-MNIST's shirt / T-shirt /
    // pullover classes is often an outlier and training stalls at loss = margin; 4 works.
    s.images_per_class = 4;
  } else if (loss == "lifted") {
    s.margin = 1.0f;
    s.l2_normalize = false;
  } else if (loss == "batch-contrastive") {
    // pytorch-metric-learning's defaults: pos_margin 0, neg_margin 1 (here `margin`),
    // Euclidean distances of the L2-normalised rows (normalize = true in the loss).
    s.margin = 1.0f;
    s.pos_margin = 0.0f;
    s.loss_normalizes = true;
  } else if (loss == "multi-similarity") {
    // alpha 2, beta 50, base 0.5, epsilon 0.1 (the loss's defaults, the paper's and PML's);
    // cosine similarities (normalize = true in the loss). `margin` is unused.
    s.loss_normalizes = true;
  } else {
    throw std::invalid_argument("unknown loss '" + loss + "'");
  }
  return s;
}

/// The objective that trains with the loss `s.loss`; training must outlive it.
inline std::unique_ptr<Objective> make_objective(const Dataset& train, const Settings& s) {
  using ml::Distance;
  using ml::Mining;
  if (s.loss == "contrastive")
    return std::make_unique<detail::ContrastiveObjective>(train, s, ml::ContrastiveForm::hadsell);
  if (s.loss == "legacy")
    return std::make_unique<detail::ContrastiveObjective>(train, s, ml::ContrastiveForm::legacy);
  if (s.loss == "triplet") return std::make_unique<detail::TripletObjective>(train, s);
  const auto batch_triplet = [&](Mining mining) {
    ml::BatchTripletLoss<float> loss(s.margin, mining, Distance::euclidean);
    loss.soft_margin = s.soft_margin;
    return detail::labelled_batch(train, s, loss);
  };
  if (s.loss == "batch-all") return batch_triplet(Mining::all);
  if (s.loss == "batch-hard") return batch_triplet(Mining::hard);
  if (s.loss == "semihard") return batch_triplet(Mining::semihard);
  if (s.loss == "lifted")
    return detail::labelled_batch(train, s, ml::LiftedStructureLoss<float>(s.margin));
  if (s.loss == "batch-contrastive") {
    ml::BatchContrastiveLoss<float> loss(s.pos_margin, s.margin, Distance::euclidean);
    loss.normalize = s.l2_normalize && s.loss_normalizes;
    // Trained as PML's (Reduction::nonzero_mean); probed over every pair (Reduction::mean).
    ml::BatchContrastiveLoss<float> probe = loss;
    probe.reduction = ml::Reduction::mean;
    return detail::labelled_batch(train, s, loss, std::optional(probe));
  }
  if (s.loss == "multi-similarity") {
    ml::MultiSimilarityLoss<float> loss;  // alpha 2, beta 50, base 0.5, epsilon 0.1
    loss.normalize = s.l2_normalize && s.loss_normalizes;
    return detail::labelled_batch(train, s, loss);
  }
  throw std::invalid_argument("unknown loss '" + s.loss + "'");
}

}  // namespace fashion_mnist
