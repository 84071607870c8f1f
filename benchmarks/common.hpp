#pragma once
// Shared benchmark helpers: seeded data and the counters every benchmark reports.
#include <metricloss/metricloss.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <utility>
#include <vector>

namespace mlbench {

namespace ml = metricloss;
using ml::Index;
template <class T>
using Matrix = ml::RowMatrix<T>;

template <class T>
Matrix<T> uniform(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(u(rng));
  return m;
}

/// Labels for P x K batches: classes of `per_class` consecutive samples, shuffled.
inline Eigen::VectorXi pk_labels(Index n, int per_class, std::uint64_t seed) {
  Eigen::VectorXi labels(n);
  for (Index i = 0; i < n; ++i) labels(i) = static_cast<int>(i / per_class);
  std::mt19937_64 rng(seed);
  std::shuffle(labels.data(), labels.data() + n, rng);
  return labels;
}

/// The buffers of one benchmark shape (N, D), made on first use by Buffers(n, d) and kept for
/// the life of the binary, so that a floor and every loss divided by it run on the same bytes
/// at the same addresses. With buffers of their own per run they landed on different heap
/// chunks, and at L2-resident sizes the placement alone moved a floor by up to 25 % (e464963):
/// the ratio then measured the allocator as much as the kernel. One cache per Buffers type.
template <class Buffers>
Buffers& shape_buffers(Index n, Index d) {
  static std::map<std::pair<Index, Index>, std::unique_ptr<Buffers>> shapes;
  std::unique_ptr<Buffers>& slot = shapes[{n, d}];
  if (!slot) slot = std::make_unique<Buffers>(n, d);
  return *slot;
}

/// Bytes moved and floating-point operations per iteration, reported as rates.
inline void set_rates(benchmark::State& state, double bytes, double flops) {
  const auto iterations = static_cast<double>(state.iterations());
  state.counters["bytes_per_second"] =
      benchmark::Counter(bytes * iterations, benchmark::Counter::kIsRate, benchmark::Counter::kIs1024);
  if (flops > 0)
    state.counters["flops"] = benchmark::Counter(flops * iterations, benchmark::Counter::kIsRate);
  state.counters["bytes"] = bytes;
}

}  // namespace mlbench
