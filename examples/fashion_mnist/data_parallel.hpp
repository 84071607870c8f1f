#pragma once
// Data-parallel training with global-batch mining (--ranks W). Every rank holds a replica of
// the network and a contiguous shard of each batch's rows. A step on rank r:
//   1. forward its shard through its replica;
//   2. the loss of the *global* batch with loss.forward_backward(base.sharded(group), ...),
//      which writes exactly this rank's rows of dL/dX (no averaging: top_diff = 1);
//   3. backward through its replica: the parameter gradient of its rows' share of L;
//   4. sum those shares across the group, in rank order, so every replica gets the same bits
//      and takes the same optimiser step.
// dL/dtheta = sum_r J_r^T dL/dx_r, so the summed gradient equals the single-process gradient
// on the concatenated batch up to the order of the sums (tests/example_data_parallel.cpp
// checks one step, W = 3, in double, to 1e-12).
//
// A framework that averages gradients over ranks (PyTorch DDP) divides that sum by W: pass
// top_diff = W there instead (docs/sharded.md).
#include "mlp.hpp"

#include <metricloss/metricloss.hpp>

#include <algorithm>
#include <cstddef>
#include <functional>
#include <utility>
#include <vector>

namespace fashion_mnist {

/// Rows [first, first + rows) of a batch of n rows: rank r's shard of W near-equal
/// contiguous shards (the first n % W ranks hold one row more; shards may be empty).
struct Shard {
  Eigen::Index first, rows;
};
inline Shard shard_of(Eigen::Index n, int ranks, int rank) {
  const Eigen::Index base = n / ranks, extra = n % ranks;
  return {rank * base + (rank < extra ? rank : extra), base + (rank < extra ? 1 : 0)};
}

/// A metricloss group (rank, size, allgatherv) behind a std::function, so that the training
/// loop is written once for threads (metricloss::thread_rank) and MPI (metricloss::mpi_group).
class AnyGroup {
 public:
  template <class Group>
  explicit AnyGroup(Group& group)
      : rank_(group.rank()), size_(group.size()),
        allgatherv_([&group](const void* send, std::size_t bytes, void* recv,
                             const std::size_t* counts, const std::size_t* offsets) {
          group.allgatherv(send, bytes, recv, counts, offsets);
        }) {}
  int rank() const { return rank_; }
  int size() const { return size_; }
  void allgatherv(const void* send, std::size_t bytes, void* recv, const std::size_t* counts,
                  const std::size_t* offsets) {
    allgatherv_(send, bytes, recv, counts, offsets);
  }

 private:
  int rank_, size_;
  std::function<void(const void*, std::size_t, void*, const std::size_t*, const std::size_t*)>
      allgatherv_;
};

/// Buffers a rank reuses from step to step.
template <class S>
struct DataParallelScratch {
  metricloss::RowMatrix<S> embedding_gradient;
  std::vector<S> mine, all;  // this rank's flattened parameter gradient; every rank's
  std::vector<std::size_t> counts, offsets;
};

/// Every rank's copy of `member` (&BasicParameter<S>::gradient or ::value) of every
/// parameter, flattened in parameters() order, gathered in rank order into scratch.all:
/// rank q's entry k at all[q * size + k]. Returns size (the same on every rank).
template <class S, class Group>
std::size_t gather_parameters(const BasicEmbeddingNetwork<S>& network, Group& group,
                              metricloss::RowMatrix<S> BasicParameter<S>::*member,
                              DataParallelScratch<S>& scratch) {
  scratch.mine.clear();
  for (const auto* p : network.parameters())
    scratch.mine.insert(scratch.mine.end(), (p->*member).data(),
                        (p->*member).data() + (p->*member).size());
  const std::size_t total = scratch.mine.size(), ranks = std::size_t(group.size());
  scratch.all.resize(total * ranks);
  scratch.counts.assign(ranks, total * sizeof(S));
  scratch.offsets.resize(ranks);
  for (std::size_t q = 0; q < ranks; ++q) scratch.offsets[q] = q * total * sizeof(S);
  group.allgatherv(scratch.mine.data(), total * sizeof(S), scratch.all.data(),
                   scratch.counts.data(), scratch.offsets.data());
  return total;
}

/// Replaces every parameter gradient of `network` by its sum over the group's ranks, added in
/// rank order 0, 1, ..., W-1 on every rank (so every replica holds the same bits).
template <class S, class Group>
void sum_gradients_over_ranks(BasicEmbeddingNetwork<S>& network, Group& group,
                              DataParallelScratch<S>& scratch) {
  const std::size_t total =
      gather_parameters(network, group, &BasicParameter<S>::gradient, scratch);
  const int ranks = group.size();
  std::size_t at = 0;
  for (auto* p : network.parameters()) {
    S* g = p->gradient.data();
    for (Eigen::Index k = 0; k < p->gradient.size(); ++k) {
      S sum = scratch.all[at + std::size_t(k)];
      for (int q = 1; q < ranks; ++q) sum += scratch.all[std::size_t(q) * total + at + std::size_t(k)];
      g[k] = sum;
    }
    at += std::size_t(p->gradient.size());
  }
}

/// Steps 1-4 above for one rank: leaves the global batch's parameter gradient in `network`
/// (every rank the same) and returns the global batch's loss (every rank the same bits).
/// `base` is metricloss::scalar or metricloss::simd; `input` and `labels` are this rank's rows.
template <class S, class Loss, class Base, class Group>
double data_parallel_gradient(BasicEmbeddingNetwork<S>& network, Loss& loss, Base base,
                              Group& group, const metricloss::RowMatrix<S>& input,
                              const Eigen::VectorXi& labels, DataParallelScratch<S>& scratch) {
  const metricloss::RowMatrix<S>& embeddings = network.forward(input);
  scratch.embedding_gradient.resize(embeddings.rows(), embeddings.cols());
  const double value =
      double(loss.forward_backward(base.sharded(group), embeddings, labels,
                                   scratch.embedding_gradient));
  network.backward(input, scratch.embedding_gradient);
  sum_gradients_over_ranks(network, group, scratch);
  return value;
}

}  // namespace fashion_mnist
