// Sharded batch losses with ranks as MPI processes (issue 16): run under
//   mpiexec -n W bench_sharded_mpi [benchmark flags]
// (scripts/bench runs W = 1, 2, 4). Every rank builds the same global batch X (float,
// D = 128, 8 rows a class) and holds rows [N r / W, N (r + 1) / W) of it. Each iteration:
// a barrier, the single-process simd call on all of X (on every rank at once, so that it runs
// under the same contention as the ranks), a barrier, the sharded call. Wall times, the
// slowest rank's (MPI_Allreduce max), gathers and waits in the collectives included: what a
// training step would wait for. Counters:
//   rank_over_single   slowest rank's sharded call / slowest rank's single-process call;
//   times_W            rank_over_single * W;
//   gathered_bytes     bytes the busiest rank receives per call, counted at the group;
//   torch_gather_bytes what a gather-everything wrapper receives (X and labels as int64).
// The "-memory" rows shard N = 1024 queries against a reference set of 4096 rows that every
// rank builds alike (a cross-batch memory), grad_r skipped, as bench_sharded's.
// Rank 0 reports; the other ranks run the same benchmarks with their output discarded. The
// iteration counts are fixed and random interleaving is refused: every rank must make the
// same sequence of collectives. W = 4 on a 2-core machine is oversubscribed (OpenMPI polls
// while it waits): its times are an upper bound.
#include "sharded_common.hpp"

#include <metricloss/mpi.hpp>

#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

using namespace mlbench;

namespace {

double slowest(double seconds) {
  double out = 0.0;
  MPI_Allreduce(&seconds, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

template <class Loss>
void run(benchmark::State& state, Loss prototype, Index memory_rows = 0) {
  const Index n = state.range(0), d = state.range(1);
  ml::mpi_group world(MPI_COMM_WORLD);
  double received_bytes = 0.0;
  CountingGroup<ml::mpi_group> group(world, received_bytes);
  const int ranks = group.size(), r = group.rank();
  const Matrix<float> x = uniform<float>(n, d, 1);
  const Eigen::VectorXi labels = pk_labels(n, 8, 3);
  std::optional<Memory> memory_data;
  if (memory_rows > 0) memory_data.emplace(memory_rows, d);
  const Memory* memory = memory_data ? &*memory_data : nullptr;
  Matrix<float> grad(n, d);
  const Index first = n * r / ranks, rows = n * (r + 1) / ranks - first;
  const Matrix<float> x_local = x.middleRows(first, rows);
  const Eigen::VectorXi labels_local = labels.segment(first, rows);
  Matrix<float> grad_local(rows, d);
  Loss single = prototype, sharded = prototype;
  // Warm: scratch allocated and faulted in; then the bytes of one call.
  call(single, ml::simd, x, labels, grad, memory);
  call(sharded, ml::simd.sharded(group), x_local, labels_local, grad_local, memory);
  received_bytes = 0.0;
  call(sharded, ml::simd.sharded(group), x_local, labels_local, grad_local, memory);
  const double received = slowest(received_bytes);  // the busiest rank's
  double single_total = 0.0, rank_total = 0.0;
  for (auto _ : state) {
    MPI_Barrier(MPI_COMM_WORLD);
    double start = MPI_Wtime();
    benchmark::DoNotOptimize(call(single, ml::simd, x, labels, grad, memory));
    const double single_seconds = slowest(MPI_Wtime() - start);
    MPI_Barrier(MPI_COMM_WORLD);
    start = MPI_Wtime();
    benchmark::DoNotOptimize(
        call(sharded, ml::simd.sharded(group), x_local, labels_local, grad_local, memory));
    const double rank_seconds = slowest(MPI_Wtime() - start);
    single_total += single_seconds;
    rank_total += rank_seconds;
    state.SetIterationTime(rank_seconds);
  }
  set_sharded_counters(state, n, d, ranks, rank_total, single_total, received, memory_rows);
}

}  // namespace

// Names "BM_sharded_mpi/loss:<loss>/N:<N>/D:128/W:<W>", as bench_sharded's.
int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  // Flags that would let ranks run different sequences of benchmarks or iterations are
  // dropped (scripts/bench passes the same flags to every binary); rank 0 alone writes.
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--benchmark_enable_random_interleaving", 0) == 0 ||
        arg.rfind("--benchmark_min_time", 0) == 0)
      continue;
    if (rank != 0 && arg.rfind("--benchmark_out", 0) == 0) continue;
    args.push_back(argv[i]);
  }
  int count = static_cast<int>(args.size());
  if (rank != 0 && !std::freopen("/dev/null", "w", stdout)) MPI_Abort(MPI_COMM_WORLD, 1);
  const auto add = [&](const char* name, auto prototype, int iterations) {
    for (long n : {1024L, 4096L}) {
      const std::string full = std::string("BM_sharded_mpi/loss:") + name + "/N:" +
                               std::to_string(n) + "/D:128/W:" + std::to_string(ranks);
      benchmark::RegisterBenchmark(full.c_str(), [prototype](benchmark::State& state) {
        run(state, prototype);
      })->Args({n, 128})->UseManualTime()->Iterations(n == 1024 ? iterations : iterations / 4)
        ->Unit(benchmark::kMillisecond);
    }
  };
  add("hard", ml::BatchTripletLoss<float>(0.2f, ml::Mining::hard), 40);
  add("semihard", ml::BatchTripletLoss<float>(0.2f, ml::Mining::semihard), 40);
  add("all", ml::BatchTripletLoss<float>(0.2f, ml::Mining::all), 20);
  add("lifted", ml::LiftedStructureLoss<float>(1.0f), 20);
  // "loss:<loss>-memory": 1024 queries sharded against a memory of 4096 rows.
  const auto add_memory = [&](const char* name, auto prototype) {
    const std::string full = std::string("BM_sharded_mpi/loss:") + name +
                             "-memory/N:1024/R:4096/D:128/W:" + std::to_string(ranks);
    benchmark::RegisterBenchmark(full.c_str(), [prototype](benchmark::State& state) {
      run(state, prototype, 4096);
    })->Args({1024, 128})->UseManualTime()->Iterations(10)->Unit(benchmark::kMillisecond);
  };
  add_memory("hard", ml::BatchTripletLoss<float>(0.2f, ml::Mining::hard));
  add_memory("multi-similarity", ml::MultiSimilarityLoss<float>());
  add_memory("lifted", ml::LiftedStructureLoss<float>(1.0f));
  benchmark::Initialize(&count, args.data());
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) MPI_Abort(MPI_COMM_WORLD, 1);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}
