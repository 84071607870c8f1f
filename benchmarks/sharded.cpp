// Sharded batch losses (issue 16): the per-rank cost of a global batch split over W ranks
// (threads of one metricloss::thread_group), against the single-process call on the same X.
//
// Each iteration runs, on the same bytes, the single-process forward_backward of X and then
// the sharded call with W ranks, each rank holding N / W rows; it measures CPU time per
// thread (CLOCK_THREAD_CPUTIME_ID), so that W = 4 threads on two cores still measure each
// rank's own work. The row's time is the slowest rank's CPU time; its counters:
//   rank_over_single   slowest rank's CPU time / the single-process call's (goal: about 1/W,
//                      at most 1.3/W at W = 2, for the losses with exchanged statistics);
//   times_W            rank_over_single * W (1: perfect division of the work; W: every rank
//                      repeats the whole loss, as pytorch-metric-learning's wrapper does);
//   gathered_bytes     bytes the busiest rank receives per call, counted at the group's
//                      allgatherv (X, labels, statuses, statistics: everything exchanged);
//   torch_gather_bytes what a gather-everything wrapper receives (X and labels as int64).
// The ranks' agreement and gathers run inside the timed call (as threads they are memcpy).
// The "-memory" rows shard N = 1024 queries against a reference set of 4096 rows held by
// every rank (a cross-batch memory), grad_r skipped.
#include "sharded_common.hpp"

#include <metricloss/thread_group.hpp>

#include <ctime>
#include <thread>

using namespace mlbench;

namespace {

double thread_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

struct Batch {
  Matrix<float> x, grad;
  Eigen::VectorXi labels;
  Batch(Index n, Index d)
      : x(uniform<float>(n, d, 1)), grad(Matrix<float>::Zero(n, d)), labels(pk_labels(n, 8, 3)) {}
};

template <class Loss>
void run(benchmark::State& state, Loss prototype, Index memory_rows = 0) {
  const Index n = state.range(0), d = state.range(1);
  const int ranks = static_cast<int>(state.range(2));
  Batch& data = shape_buffers<Batch>(n, d);
  const Memory* memory = memory_rows > 0 ? &shape_buffers<Memory>(memory_rows, d) : nullptr;
  ml::thread_group team(ranks);
  std::vector<Loss> losses(static_cast<std::size_t>(ranks), prototype);
  Loss single = prototype;
  std::vector<double> cpu(static_cast<std::size_t>(ranks));
  std::vector<double> received(static_cast<std::size_t>(ranks));
  const auto shard = [&](int r) {  // rows [first, first + rows) of rank r
    const Index first = n * r / ranks, end = n * (r + 1) / ranks;
    return std::make_pair(first, end - first);
  };
  const auto sharded_call = [&] {
    std::vector<std::thread> threads;
    for (int r = 0; r < ranks; ++r)
      threads.emplace_back([&, r] {
        ml::thread_rank rank = team.member(r);
        CountingGroup<ml::thread_rank> me(rank, received[static_cast<std::size_t>(r)]);
        const auto [first, rows] = shard(r);
        const double start = thread_cpu_seconds();
        const float value = call(losses[static_cast<std::size_t>(r)], ml::simd.sharded(me),
                                 data.x.middleRows(first, rows), data.labels.segment(first, rows),
                                 data.grad.middleRows(first, rows), memory);
        benchmark::DoNotOptimize(value);
        cpu[static_cast<std::size_t>(r)] = thread_cpu_seconds() - start;
      });
    for (auto& t : threads) t.join();
  };
  // Warm: every functor's scratch allocated and faulted in.
  call(single, ml::simd, data.x, data.labels, data.grad, memory);
  sharded_call();
  const double received_per_call = *std::max_element(received.begin(), received.end());
  double single_total = 0, rank_total = 0;
  for (auto _ : state) {
    const double start = thread_cpu_seconds();
    const float value = call(single, ml::simd, data.x, data.labels, data.grad, memory);
    benchmark::DoNotOptimize(value);
    const double single_cpu = thread_cpu_seconds() - start;
    sharded_call();
    const double slowest = *std::max_element(cpu.begin(), cpu.end());
    single_total += single_cpu;
    rank_total += slowest;
    state.SetIterationTime(slowest);
  }
  set_sharded_counters(state, n, d, ranks, rank_total, single_total, received_per_call, memory_rows);
}

}  // namespace

// Names "BM_sharded/loss:<loss>/N:<N>/D:128/W:<W>", so that scripts/bench_report.py files
// each loss's rows apart and puts rank_over_single in its "÷ floor" column.
int main(int argc, char** argv) {
  const auto add = [](const char* name, auto prototype) {
    for (long n : {1024L, 4096L})
      for (long w : {1L, 2L, 4L}) {
        const std::string full = std::string("BM_sharded/loss:") + name + "/N:" + std::to_string(n) +
                                 "/D:128/W:" + std::to_string(w);
        benchmark::RegisterBenchmark(full.c_str(), [prototype](benchmark::State& state) {
          run(state, prototype);
        })->Args({n, 128, w})->UseManualTime()->Unit(benchmark::kMillisecond);
      }
  };
  add("hard", ml::BatchTripletLoss<float>(0.2f, ml::Mining::hard));
  add("semihard", ml::BatchTripletLoss<float>(0.2f, ml::Mining::semihard));
  add("all", ml::BatchTripletLoss<float>(0.2f, ml::Mining::all));
  add("lifted", ml::LiftedStructureLoss<float>(1.0f));
  add("contrastive", ml::BatchContrastiveLoss<float>(0.0f, 1.0f));
  add("multi-similarity", [] {
    ml::MultiSimilarityLoss<float> loss;
    loss.normalize = true;
    return loss;
  }());
  // Queries sharded against a memory of 4096 rows, the same on every rank (grad_r skipped):
  // "loss:<loss>-memory". Hard and multi-similarity by statistics; lifted gathers Q.
  const auto add_memory = [](const char* name, auto prototype) {
    for (long w : {1L, 2L, 4L}) {
      const std::string full = std::string("BM_sharded/loss:") + name + "-memory/N:1024/R:4096/D:128/W:" +
                               std::to_string(w);
      benchmark::RegisterBenchmark(full.c_str(), [prototype](benchmark::State& state) {
        run(state, prototype, 4096);
      })->Args({1024, 128, w})->UseManualTime()->Unit(benchmark::kMillisecond);
    }
  };
  add_memory("hard", ml::BatchTripletLoss<float>(0.2f, ml::Mining::hard));
  add_memory("multi-similarity", ml::MultiSimilarityLoss<float>());
  add_memory("lifted", ml::LiftedStructureLoss<float>(1.0f));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
