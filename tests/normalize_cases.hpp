#pragma once
// The option registry of the normalize tests, shared by tests/normalize.cpp (host) and
// tests/cuda/normalize.cu: every batch loss and option set, the functor of each (margins for
// unit rows), and normalisation and its chain rule written by hand in double.
#include "batch_triplet_reference.hpp"  // name_of
#include "support.hpp"

#include <limits>
#include <string>
#include <vector>

namespace mltest {
namespace normalize_cases {

using ml::Distance;
using ml::Mining;

enum class Kind { triplet, lifted, contrastive, multi_similarity };

struct Option {
  Kind kind;
  Mining mining;
  Distance distance;
  bool soft_margin;  // BatchTripletLoss; for BatchContrastiveLoss: Reduction::mean
  std::string name() const {
    switch (kind) {
      case Kind::lifted: return "lifted";
      case Kind::contrastive:
        return std::string("contrastive ") + (distance == Distance::euclidean ? "euclidean" : "squared") +
               (soft_margin ? " mean" : " nonzero mean");
      case Kind::multi_similarity: return soft_margin ? "multi-similarity all pairs" : "multi-similarity";
      default: return name_of(mining, distance, soft_margin);
    }
  }
  const char* loss_name() const {
    switch (kind) {
      case Kind::lifted: return "LiftedStructureLoss";
      case Kind::contrastive: return "BatchContrastiveLoss";
      case Kind::multi_similarity: return "MultiSimilarityLoss";
      default: return "BatchTripletLoss";
    }
  }
};

inline std::vector<Option> every_option() {
  std::vector<Option> out{{Kind::lifted, Mining::all, Distance::euclidean, false}};
  for (Mining m : {Mining::all, Mining::hard, Mining::semihard})
    for (Distance d : {Distance::euclidean, Distance::squared_euclidean})
      for (bool soft : {false, true}) out.push_back({Kind::triplet, m, d, soft});
  for (Distance d : {Distance::euclidean, Distance::squared_euclidean})
    for (bool mean : {false, true}) out.push_back({Kind::contrastive, Mining::all, d, mean});
  for (bool all : {false, true}) out.push_back({Kind::multi_similarity, Mining::all, Distance::euclidean, all});
  return out;
}

/// f(loss) with the option's functor (margins for unit rows: distances in [0, 2]).
template <class T, class F>
auto with_loss(const Option& o, bool normalize, F&& f) {
  if (o.kind == Kind::lifted) {
    ml::LiftedStructureLoss<T> loss(T(1));
    loss.normalize = normalize;
    return f(loss);
  }
  if (o.kind == Kind::contrastive) {  // margins for unit rows (distances in [0, 2])
    ml::BatchContrastiveLoss<T> loss(T(0.1), T(1.8), o.distance);
    loss.reduction = o.soft_margin ? ml::Reduction::mean : ml::Reduction::nonzero_mean;
    loss.normalize = normalize;
    return f(loss);
  }
  if (o.kind == Kind::multi_similarity) {  // epsilon 0.3 or +inf (every pair)
    ml::MultiSimilarityLoss<T> loss(T(2), T(10), T(0.5),
                                    o.soft_margin ? std::numeric_limits<T>::infinity() : T(0.3));
    loss.normalize = normalize;
    return f(loss);
  }
  ml::BatchTripletLoss<T> loss(T(0.2), o.mining, o.distance, o.soft_margin);
  loss.normalize = normalize;
  return f(loss);
}

/// The rows of x divided by their norms, both in double, rounded to T.
template <class T>
Matrix<T> unit_rows(const Matrix<T>& x) {
  Matrix<T> u(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    const double norm = x.row(i).template cast<double>().norm();
    for (Index c = 0; c < x.cols(); ++c) u(i, c) = static_cast<T>(static_cast<double>(x(i, c)) / norm);
  }
  return u;
}

/// dL/dx from dL/du by hand, in double: (g - u (u . g)) / ||x||.
template <class T>
Matrix<double> chained(const Matrix<T>& x, const Matrix<T>& grad_u) {
  Matrix<double> out(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    const Eigen::RowVectorXd xi = x.row(i).template cast<double>();
    const double norm = xi.norm();
    const Eigen::RowVectorXd u = xi / norm;
    const Eigen::RowVectorXd g = grad_u.row(i).template cast<double>();
    out.row(i) = (g - u * u.dot(g)) / norm;
  }
  return out;
}

}  // namespace normalize_cases
}  // namespace mltest
