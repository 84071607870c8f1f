#pragma once
// Shared by bench_sharded (ranks as threads) and bench_sharded_mpi (ranks as MPI processes):
// a group that counts the bytes it receives, the memory of the "-memory" rows, and the rows'
// counters.
#include "common.hpp"

#include <cstddef>
#include <utility>

namespace mlbench {

/// Any metricloss group (viewed) that adds the bytes its allgatherv calls receive, from every
/// rank, its own included (as an MPI_Allgatherv's receive buffer holds them), to *received.
template <class Group>
class CountingGroup {
 public:
  CountingGroup(Group& group, double& received) : group_(&group), received_(&received) {}
  int rank() const { return group_->rank(); }
  int size() const { return group_->size(); }
  void allgatherv(const void* send, std::size_t bytes, void* recv, const std::size_t* counts,
                  const std::size_t* offsets) {
    for (int q = 0; q < size(); ++q) *received_ += static_cast<double>(counts[q]);
    group_->allgatherv(send, bytes, recv, counts, offsets);
  }

 private:
  Group* group_;
  double* received_;
};

/// A memory of N_r rows (grad_r skipped: no gradient flows into a memory).
struct Memory {
  Matrix<float> r;
  Eigen::VectorXi labels;
  Memory(Index n, Index d) : r(uniform<float>(n, d, 5)), labels(pk_labels(n, 8, 6)) {}
};

/// The call on rank tag `tag` (simd or simd.sharded) of rows x: the batch form, or queries
/// against `memory` when there is one.
template <class Loss, class Tag, class X, class Y, class G>
float call(Loss& loss, Tag tag, const X& x, const Y& labels, G&& grad, const Memory* memory) {
  if (memory == nullptr) return loss.forward_backward(tag, x, labels, std::forward<G>(grad));
  return loss.forward_backward(tag, x, labels, ml::reference(memory->r, memory->labels),
                               std::forward<G>(grad), ml::skip);
}

/// The counters of a sharded row (N x D float batch over `ranks` ranks): rank_over_single
/// (slowest rank's total time / the single-process call's), times_W, gathered_bytes (the
/// busiest rank's bytes per call), torch_gather_bytes (X and int64 labels), and the rates.
inline void set_sharded_counters(benchmark::State& state, Index n, Index d, int ranks,
                                 double rank_total, double single_total, double received,
                                 Index candidates = 0) {  // N_r against a reference set
  if (candidates == 0) candidates = n;
  const double ratio = rank_total / single_total;
  state.counters["rank_over_single"] = ratio;
  state.counters["times_W"] = ratio * ranks;
  const double x_bytes = static_cast<double>(n * d) * sizeof(float);
  state.counters["gathered_bytes"] = received;
  state.counters["torch_gather_bytes"] = x_bytes + static_cast<double>(n) * 8.0;
  set_rates(state, 2.0 * x_bytes / ranks, 4.0 * static_cast<double>(n) * candidates * d / ranks);
}

}  // namespace mlbench
