// Batch losses of Q = 256 queries against a reference set R of N = 1024, 8192 and 65536 rows
// (D = 128; a cross-batch memory's shapes), float, against the two products any
// product-based implementation needs at the same shapes, in the same binary: Q R^T
// (256 x D by D x N) and W R (256 x N by N x D). Labels: 8 queries per class over 32 classes;
// R's labels uniform over 1024 classes, so a query has about N / 1024 positives in R.
// Counter scratch_bytes: heap in use after the first call of a fresh functor, less before
// (what the functor keeps: the path allocates nothing else, and nothing once warm).
#include "common.hpp"

#include <malloc.h>

using namespace mlbench;

namespace {

constexpr Index queries = 256;

template <class T>
struct Sets {
  Matrix<T> q, r, w, distances, out;
  Eigen::VectorXi q_labels, r_labels;
  Sets(Index n, Index d)
      : q(uniform<T>(queries, d, 1)), r(uniform<T>(n, d, 2)), w(uniform<T>(queries, n, 3)),
        distances(Matrix<T>::Zero(queries, n)), out(Matrix<T>::Zero(queries, d)),
        q_labels(pk_labels(queries, 8, 4)), r_labels(n) {
    std::mt19937_64 rng(5);
    std::uniform_int_distribution<int> u(0, 1023);
    for (Index j = 0; j < n; ++j) r_labels(j) = u(rng);
  }
};

std::size_t heap_in_use() {
  const struct mallinfo2 info = mallinfo2();
  return info.uordblks + info.hblkhd;
}

/// The two products of the shapes: Q R^T and W R.
template <class T>
void BM_products(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  Sets<T>& s = shape_buffers<Sets<T>>(n, d);
  for (auto _ : state) {
    s.distances.noalias() = s.q * s.r.transpose();
    s.out.noalias() = s.w * s.r;
    benchmark::DoNotOptimize(s.distances.data());
    benchmark::DoNotOptimize(s.out.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, (2.0 * queries * d + n * d + 2.0 * queries * n) * sizeof(T),
            4.0 * queries * n * d);
}

template <class T, class Tag, class Loss>
void run_loss(benchmark::State& state, Loss& loss) {
  const Index n = state.range(0), d = state.range(1);
  Sets<T>& s = shape_buffers<Sets<T>>(n, d);
  const auto ref = ml::reference(s.r, s.r_labels);
  // The memory use of the first (cold) call, then the timed warm calls.
  const std::size_t before = heap_in_use();
  T value = loss.forward_backward(Tag{}, s.q, s.q_labels, ref, s.out, ml::skip);
  const std::size_t after = heap_in_use();
  state.counters["scratch_bytes"] = static_cast<double>(after > before ? after - before : 0);
  for (auto _ : state) {
    value = loss.forward_backward(Tag{}, s.q, s.q_labels, ref, s.out, ml::skip);
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  // Q and R in, grad_q out, labels; FLOPs: those of the two products it is compared with.
  set_rates(state, (2.0 * queries * d + n * d) * sizeof(T) + (queries + n) * sizeof(int),
            4.0 * queries * n * d);
}

template <class T, class Tag>
void BM_reference_triplet(benchmark::State& state) {
  ml::BatchTripletLoss<T> loss(T(0.2), static_cast<ml::Mining>(state.range(3)));
  run_loss<T, Tag>(state, loss);
}

template <class T, class Tag>
void BM_reference_lifted(benchmark::State& state) {
  ml::LiftedStructureLoss<T> loss(T(1));
  run_loss<T, Tag>(state, loss);
}

void sizes(benchmark::internal::Benchmark* b, bool mining) {
  for (long n : {1024L, 8192L, 65536L})
    if (mining)
      for (long m : {0L, 1L, 2L}) b->Args({n, 128, queries, m});  // all, hard, semihard
    else
      b->Args({n, 128, queries});
  if (mining) b->ArgNames({"N", "D", "Q", "mining"});
  else b->ArgNames({"N", "D", "Q"});
  b->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK_TEMPLATE(BM_products, float)->Apply([](auto* b) { sizes(b, false); });
BENCHMARK_TEMPLATE(BM_reference_triplet, float, ml::simd_tag)->Apply([](auto* b) { sizes(b, true); });
BENCHMARK_TEMPLATE(BM_reference_lifted, float, ml::simd_tag)->Apply([](auto* b) { sizes(b, false); });
BENCHMARK_MAIN();
