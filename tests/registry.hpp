#pragma once
// The losses under test, listed once. Tests that hold for every loss (no allocation once
// warm, bitwise determinism) iterate `Losses` instead of naming each loss: a new loss is one
// entry here and one line in `Losses`.
//
// An entry is a struct with
//   name                          what CAPTURE prints;
//   configs<T>()                  every option combination worth covering, as {label, functor};
//   calls(tag, loss, data, out, visit)
//                                 every call form (forward_backward with dense, strided and
//                                 skipped gradients, top_diff, label types, reference sets
//                                 where the tag has them, forward): for
//                                 each, visit(label, call) where call() makes it and returns
//                                 the loss; gradients land in `out`.
#include "support.hpp"

#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace mltest {
namespace registry {

/// Every input any loss takes, made once per shape: pairs (a, b), triplets (a, b, c), and
/// batches a and `offset` (uniform in [99.9, 100.1): a common offset, with row 3 a copy of
/// row 1 so that coincident rows take the near-pair paths).
template <class T>
struct Data {
  Index n = 0, d = 0;
  Matrix<T> a, b, c, offset;
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels, other_labels;
  Eigen::VectorXf float_labels, sim;
  Eigen::VectorXi identity;  // self_index of a batch against itself

  Data(Index rows, Index cols, std::uint64_t seed) : n(rows), d(cols) {
    std::mt19937_64 rng(seed);
    a = uniform_matrix<T>(n, d, rng);
    b = uniform_matrix<T>(n, d, rng);
    c = uniform_matrix<T>(n, d, rng);
    offset = uniform_matrix<T>(n, d, rng, 99.9, 100.1);
    if (n > 3) offset.row(3) = offset.row(1);
    const auto drawn = random_labels(n, 4, rng);
    labels.resize(n);
    float_labels.resize(n);
    sim.resize(n);
    for (Index i = 0; i < n; ++i) {
      labels[i] = drawn[static_cast<std::size_t>(i)];
      float_labels[i] = static_cast<float>(labels[i]);
      sim[i] = static_cast<float>(labels[i] % 2);
    }
    other_labels = labels.reverse();
    identity = Eigen::VectorXi::LinSpaced(n, 0, static_cast<int>(n - 1));
  }
};

/// Gradient buffers: three dense and one with an outer stride of D + 3. Zeroed, so that
/// two runs of the same calls see the same bytes wherever a call skips a gradient.
template <class T>
struct Outputs {
  Matrix<T> g1, g2, g3;
  std::vector<T> strided_storage;
  ml::RowMap<T> strided;

  Outputs(Index n, Index d)
      : g1(Matrix<T>::Zero(n, d)), g2(Matrix<T>::Zero(n, d)), g3(Matrix<T>::Zero(n, d)),
        strided_storage(static_cast<std::size_t>(n * (d + 3)), T(0)),
        strided(strided_storage.data(), n, d, Eigen::OuterStride<>(d + 3)) {}
  Outputs(const Outputs&) = delete;  // `strided` points into this object's storage
  Outputs& operator=(const Outputs&) = delete;
};

template <class Loss>
struct Configured {
  std::string label;
  Loss loss;
};

inline const char* distance_name(ml::Distance d) {
  return d == ml::Distance::euclidean ? "euclidean" : "squared";
}
inline const char* mining_name(ml::Mining m) {
  return m == ml::Mining::all ? "all" : m == ml::Mining::hard ? "hard" : "semihard";
}

struct Contrastive {
  static constexpr const char* name = "ContrastiveLoss";
  template <class T>
  static std::vector<Configured<ml::ContrastiveLoss<T>>> configs() {
    return {{"hadsell", ml::ContrastiveLoss<T>(T(1.2), ml::ContrastiveForm::hadsell)},
            {"legacy", ml::ContrastiveLoss<T>(T(1.2), ml::ContrastiveForm::legacy)}};
  }
  template <class Tag, class Loss, class T, class Visit>
  static void calls(Tag tag, Loss& loss, const Data<T>& x, Outputs<T>& out, Visit&& visit) {
    visit("similarity, both gradients, top_diff", [&] {
      return loss.forward_backward(tag, x.a, x.b, x.sim, out.g1, out.g2, T(0.5));
    });
    visit("two label vectors, strided first gradient, second skipped", [&] {
      return loss.forward_backward(tag, x.a, x.b, x.labels, x.other_labels, out.strided, ml::skip);
    });
    visit("forward", [&] { return loss.forward(tag, x.a, x.b, x.sim); });
  }
};

struct Triplet {
  static constexpr const char* name = "TripletLoss";
  template <class T>
  static std::vector<Configured<ml::TripletLoss<T>>> configs() {
    std::vector<Configured<ml::TripletLoss<T>>> out;
    for (auto distance : {ml::Distance::euclidean, ml::Distance::squared_euclidean})
      out.push_back({distance_name(distance), ml::TripletLoss<T>(T(0.3), distance)});
    return out;
  }
  template <class Tag, class Loss, class T, class Visit>
  static void calls(Tag tag, Loss& loss, const Data<T>& x, Outputs<T>& out, Visit&& visit) {
    visit("three gradients", [&] {
      return loss.forward_backward(tag, x.a, x.b, x.c, out.g1, out.g2, out.g3);
    });
    visit("positive's gradient only, strided", [&] {
      return loss.forward_backward(tag, x.a, x.b, x.c, ml::skip, out.strided, ml::skip);
    });
    visit("forward", [&] { return loss.forward(tag, x.a, x.b, x.c); });
  }
};

/// The batch losses' call forms, on the uniform batch and on the one at an offset.
struct BatchCalls {
  template <class Tag, class Loss, class T, class Visit>
  static void calls(Tag tag, Loss& loss, const Data<T>& x, Outputs<T>& out, Visit&& visit) {
    for (const Matrix<T>* batch : {&x.a, &x.offset}) {
      const std::string at = batch == &x.offset ? " (at an offset)" : "";
      visit("int64 labels" + at, [&, batch] {
        return loss.forward_backward(tag, *batch, x.labels, out.g1);
      });
      visit("float labels, strided gradient, top_diff -1" + at, [&, batch] {
        return loss.forward_backward(tag, *batch, x.float_labels, out.strided, T(-1));
      });
      visit("forward" + at, [&, batch] { return loss.forward(tag, *batch, x.labels); });
    }
    // Against a reference set (where the tag has that path): queries a against candidates
    // b, and the batch against itself with self = identity.
    if constexpr (ml::detail::ReferenceBackend<Loss, Tag>::available) {
      visit("reference set, both gradients", [&] {
        return loss.forward_backward(tag, x.a, x.labels, ml::reference(x.b, x.other_labels),
                                     out.g1, out.g2);
      });
      visit("reference set with self, grad_r skipped, strided grad_q", [&] {
        return loss.forward_backward(tag, x.offset, x.labels,
                                     ml::reference(x.offset, x.labels, x.identity), out.strided,
                                     ml::skip);
      });
      visit("reference set, forward", [&] {
        return loss.forward(tag, x.a, x.labels, ml::reference(x.b, x.float_labels));
      });
    }
  }
};

struct LiftedStructure : BatchCalls {
  static constexpr const char* name = "LiftedStructureLoss";
  template <class T>
  static std::vector<Configured<ml::LiftedStructureLoss<T>>> configs() {
    return {{"margin 1", ml::LiftedStructureLoss<T>(T(1))}};
  }
};

struct BatchTriplet : BatchCalls {
  static constexpr const char* name = "BatchTripletLoss";
  template <class T>
  static std::vector<Configured<ml::BatchTripletLoss<T>>> configs() {
    std::vector<Configured<ml::BatchTripletLoss<T>>> out;
    for (auto mining : {ml::Mining::all, ml::Mining::hard, ml::Mining::semihard})
      for (auto distance : {ml::Distance::euclidean, ml::Distance::squared_euclidean})
        for (bool soft : {false, true})
          out.push_back({std::string(mining_name(mining)) + " " + distance_name(distance) +
                             (soft ? " soft margin" : ""),
                         ml::BatchTripletLoss<T>(T(0.2), mining, distance, soft)});
    return out;
  }
};

struct BatchContrastive : BatchCalls {
  static constexpr const char* name = "BatchContrastiveLoss";
  template <class T>
  static std::vector<Configured<ml::BatchContrastiveLoss<T>>> configs() {
    std::vector<Configured<ml::BatchContrastiveLoss<T>>> out;
    for (auto distance : {ml::Distance::euclidean, ml::Distance::squared_euclidean})
      for (auto reduction : {ml::Reduction::nonzero_mean, ml::Reduction::mean}) {
        ml::BatchContrastiveLoss<T> loss(T(0.1), T(0.8), distance);
        loss.reduction = reduction;
        out.push_back({std::string(distance_name(distance)) +
                           (reduction == ml::Reduction::mean ? " mean" : " nonzero mean"),
                       loss});
      }
    ml::BatchContrastiveLoss<T> unit;
    unit.normalize = true;
    out.push_back({"normalize", unit});
    return out;
  }
};

struct MultiSimilarity : BatchCalls {
  static constexpr const char* name = "MultiSimilarityLoss";
  template <class T>
  static std::vector<Configured<ml::MultiSimilarityLoss<T>>> configs() {
    std::vector<Configured<ml::MultiSimilarityLoss<T>>> out;
    out.push_back({"epsilon 0.1", ml::MultiSimilarityLoss<T>(T(2), T(5), T(0.5), T(0.1))});
    out.push_back({"every pair", ml::MultiSimilarityLoss<T>(T(2), T(5), T(0.5),
                                                             std::numeric_limits<T>::infinity())});
    ml::MultiSimilarityLoss<T> unit;
    unit.normalize = true;
    out.push_back({"normalize, defaults", unit});
    return out;
  }
};

// fuzz/fuzz_losses.cpp's selector indexes this list, and fuzz/CMakeLists.txt reads this line
// (one fuzz_<loss> target per entry): append new losses, keep the order (fuzz/corpus decodes by it).
using Losses = std::tuple<Contrastive, Triplet, LiftedStructure, BatchTriplet, BatchContrastive, MultiSimilarity>;

/// f(Entry{}) for every registered loss.
template <class F>
void for_each_loss(F&& f) {
  std::apply([&](auto... entry) { (f(entry), ...); }, Losses{});
}

}  // namespace registry
}  // namespace mltest
