#pragma once
// Recall@K (Song et al. 2016): the fraction of queries whose K nearest neighbours (exact,
// Euclidean, the query itself excluded) contain an image of the query's class.
#include "dataset.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <limits>

namespace fashion_mnist {

inline constexpr std::array<int, 4> recall_ks = {1, 2, 4, 8};

struct Recall {
  std::array<double, recall_ks.size()> at{};  // at[i] = Recall@recall_ks[i]
};

namespace detail {

inline constexpr int neighbour_count = recall_ks.back();

/// Indices of the `neighbour_count` smallest entries of `distances`, nearest first.
inline std::array<Eigen::Index, neighbour_count> nearest(const float* distances, Eigen::Index n) {
  std::array<Eigen::Index, neighbour_count> best;
  std::array<float, neighbour_count> best_distance;
  best_distance.fill(std::numeric_limits<float>::infinity());
  best.fill(-1);
  for (Eigen::Index j = 0; j < n; ++j) {
    float d = distances[j];
    if (!(d < best_distance.back())) continue;
    // Insertion into the sorted list; ties keep the lower index first (deterministic).
    int slot = neighbour_count - 1;
    while (slot > 0 && d < best_distance[std::size_t(slot - 1)]) {
      best_distance[std::size_t(slot)] = best_distance[std::size_t(slot - 1)];
      best[std::size_t(slot)] = best[std::size_t(slot - 1)];
      --slot;
    }
    best_distance[std::size_t(slot)] = d;
    best[std::size_t(slot)] = j;
  }
  return best;
}

}  // namespace detail

/// Recall@1,2,4,8 of every row of `points` searched against all the others.
inline Recall recall_at_k(const Matrix& points, const Labels& labels) {
  const Eigen::Index n = points.rows();
  const Eigen::VectorXf squared_norms = points.rowwise().squaredNorm();
  std::array<Eigen::Index, recall_ks.size()> hits{};
  // ||q - x||^2 = ||q||^2 + ||x||^2 - 2 q.x, one GEMM per block of queries. The ||q||^2
  // term is the same for every candidate of a query and so is left out of the ranking.
  constexpr Eigen::Index block_rows = 512;
  Matrix distances;
  for (Eigen::Index first = 0; first < n; first += block_rows) {
    const Eigen::Index rows = std::min(block_rows, n - first);
    distances.noalias() = points.middleRows(first, rows) * points.transpose();
    distances = (-2.0f * distances).rowwise() + squared_norms.transpose();
    for (Eigen::Index q = 0; q < rows; ++q) {
      const Eigen::Index query = first + q;
      distances(q, query) = std::numeric_limits<float>::infinity();
      const auto neighbours = detail::nearest(distances.row(q).data(), n);
      for (std::size_t k = 0; k < recall_ks.size(); ++k) {
        const auto end = neighbours.begin() + recall_ks[k];
        hits[k] += std::any_of(neighbours.begin(), end, [&](Eigen::Index j) {
          return j >= 0 && labels[j] == labels[query];
        });
      }
    }
  }
  Recall recall;
  for (std::size_t k = 0; k < recall_ks.size(); ++k) recall.at[k] = double(hits[k]) / double(n);
  return recall;
}

}  // namespace fashion_mnist
