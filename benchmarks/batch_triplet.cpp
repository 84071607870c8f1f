// BatchTripletLoss forward_backward with online mining against the two GEMM-class products
// any product-based implementation needs, at the same shapes and in the same binary:
// X X^T (N x D by D x N) and (N x N) X. Batches of 8 samples per class. The products and the
// losses of a shape read the same x and write the same N x D output (shape_buffers).
#include "common.hpp"

using namespace mlbench;

namespace {

constexpr int per_class = 8;

/// One shape's batch, labels and N x D output (the products' (N x N) X and the losses'
/// gradient), and the products' own N x N operands.
template <class T>
struct Batch {
  Matrix<T> x, w, gram, out;
  Eigen::VectorXi labels;
  Batch(Index n, Index d)
      : x(uniform<T>(n, d, 1)), w(uniform<T>(n, n, 2)), gram(Matrix<T>::Zero(n, n)),
        out(Matrix<T>::Zero(n, d)), labels(pk_labels(n, per_class, 3)) {}
};

/// The two Eigen products: the Gram matrix of the batch and an N x N matrix times the batch.
template <class T>
void BM_products(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  Batch<T>& data = shape_buffers<Batch<T>>(n, d);
  const Matrix<T>&x = data.x, &w = data.w;
  Matrix<T>&gram = data.gram, &out = data.out;
  for (auto _ : state) {
    gram.noalias() = x * x.transpose();
    out.noalias() = w * x;
    benchmark::DoNotOptimize(gram.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, (2.0 * n * d + 2.0 * n * n + n * d) * sizeof(T), 4.0 * n * n * d);
}

template <class T, class Tag>
void BM_batch_triplet(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  const auto mining = static_cast<ml::Mining>(state.range(2));
  const bool soft_margin = state.range(3) != 0;
  Batch<T>& data = shape_buffers<Batch<T>>(n, d);
  const Matrix<T>& x = data.x;
  const Eigen::VectorXi& labels = data.labels;
  Matrix<T>& grad = data.out;
  ml::BatchTripletLoss<T> loss(T(0.2), mining, ml::Distance::euclidean, soft_margin);
  for (auto _ : state) {
    T value = loss.forward_backward(Tag{}, x, labels, grad);
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  // x in, grad out, labels; FLOPs: those of the two products it is compared with.
  set_rates(state, 2.0 * n * d * sizeof(T) + n * sizeof(int), 4.0 * n * n * d);
}

void product_sizes(benchmark::internal::Benchmark* b) {
  for (long n : {256L, 1024L, 4096L}) b->Args({n, 128});
  b->ArgNames({"N", "D"});
}

void mining_sizes(benchmark::internal::Benchmark* b, long max_n) {
  for (long n : {256L, 1024L, 4096L})
    for (long mining : {0L, 1L, 2L})  // all, hard, semihard
      for (long soft : {0L, 1L})
        if (n <= max_n) b->Args({n, 128, mining, soft});
  b->ArgNames({"N", "D", "mining", "soft"});
  b->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK_TEMPLATE(BM_products, float)->Apply(product_sizes)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_batch_triplet, float, ml::simd_tag)->Apply([](auto* b) { mining_sizes(b, 4096); });
BENCHMARK_TEMPLATE(BM_batch_triplet, float, ml::scalar_tag)->Apply([](auto* b) { mining_sizes(b, 1024); });
BENCHMARK_TEMPLATE(BM_products, double)->Apply(product_sizes)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_batch_triplet, double, ml::simd_tag)->Apply([](auto* b) { mining_sizes(b, 1024); });

BENCHMARK_MAIN();
