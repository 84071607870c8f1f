// BatchContrastiveLoss and MultiSimilarityLoss (issue 17) forward_backward over every pair of
// a labelled batch, against the same floor as the batch-triplet rows (batch_triplet.cpp): the
// two GEMM-class products any product-based implementation needs, X X^T (N x D by D x N) and
// (N x N) X, at the same shapes and in the same binary. Batches of 8 samples per class, default
// options, normalize = false and true. The products and the losses of a shape read the same x
// and write the same N x D output (shape_buffers). scripts/bench_report.py files the rows of
// this one binary under two losses by the benchmark's name, and the floor under both. Each
// loss is timed warm (one call before the timed loop), as a training loop calls it.
#include "common.hpp"

#include <algorithm>
#include <vector>

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

/// forward_backward of `Loss` (default options) on the shape's batch; range(2) = normalize.
template <class T, class Tag, template <class> class Loss>
void run_loss(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  Batch<T>& data = shape_buffers<Batch<T>>(n, d);
  const Matrix<T>& x = data.x;
  const Eigen::VectorXi& labels = data.labels;
  Matrix<T>& grad = data.out;
  Loss<T> loss;
  loss.normalize = state.range(2) != 0;
  // One call first: the functor's scratch (at N = 4096 two N x N buffers, 128 MiB) is
  // allocated and faulted in on its first call. A training loop calls one functor thousands
  // of times; at N = 4096 a repetition is a single call, so without this every repetition
  // timed the first call (2-4x the steady state, 2026-12-03).
  loss.forward_backward(Tag{}, x, labels, grad);
  for (auto _ : state) {
    T value = loss.forward_backward(Tag{}, x, labels, grad);
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  // x in, grad out, labels; FLOPs: those of the two products it is compared with.
  set_rates(state, 2.0 * n * d * sizeof(T) + n * sizeof(int), 4.0 * n * n * d);
}

template <class T, class Tag>
void BM_batch_contrastive(benchmark::State& state) {
  run_loss<T, Tag, ml::BatchContrastiveLoss>(state);
}

template <class T, class Tag>
void BM_multi_similarity(benchmark::State& state) {
  run_loss<T, Tag, ml::MultiSimilarityLoss>(state);
}

/// BatchContrastiveLoss at N = 1024, D = 128 with neg_margin at the range(2)-th percentile of
/// the negative pairs' distances, so that about that share of them is active: the density of
/// W, which decides between its two weight sinks (tuning::direct_weights_per_pair; refit it
/// by building this binary with that number at 0 and at 1e9 and finding where the two rows
/// cross). Counter `active`: the share of unordered pairs with an active hinge.
template <class T>
void BM_batch_contrastive_density(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  Batch<T>& data = shape_buffers<Batch<T>>(n, d);
  const Matrix<T>& x = data.x;
  const Eigen::VectorXi& labels = data.labels;
  std::vector<double> negatives;
  Index positives = 0;
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < i; ++j) {
      if (labels(i) == labels(j)) {
        ++positives;
        continue;
      }
      negatives.push_back((x.row(i) - x.row(j)).template cast<double>().norm());
    }
  const auto at = negatives.begin() + static_cast<std::ptrdiff_t>(negatives.size() * state.range(2) / 100);
  std::nth_element(negatives.begin(), at, negatives.end());
  ml::BatchContrastiveLoss<T> loss(T(0), static_cast<T>(*at));
  Matrix<T>& grad = data.out;
  loss.forward_backward(ml::simd, x, labels, grad);
  for (auto _ : state) {
    T value = loss.forward_backward(ml::simd, x, labels, grad);
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  set_rates(state, 2.0 * n * d * sizeof(T) + n * sizeof(int), 4.0 * n * n * d);
  state.counters["active"] = (static_cast<double>(positives) + static_cast<double>(at - negatives.begin())) /
                             (0.5 * static_cast<double>(n) * static_cast<double>(n - 1));
}

void product_sizes(benchmark::internal::Benchmark* b) {
  for (long n : {256L, 1024L, 4096L}) b->Args({n, 128});
  b->ArgNames({"N", "D"});
  b->Unit(benchmark::kMillisecond);
}

void loss_sizes(benchmark::internal::Benchmark* b) {
  for (long n : {256L, 1024L, 4096L})
    for (long normalize : {0L, 1L}) b->Args({n, 128, normalize});
  b->ArgNames({"N", "D", "normalize"});
  b->Unit(benchmark::kMillisecond);
}

void density_sizes(benchmark::internal::Benchmark* b) {
  for (long percent : {1L, 3L, 6L, 9L, 12L, 15L, 20L, 30L}) b->Args({1024, 128, percent});
  b->ArgNames({"N", "D", "negatives%"});
  b->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK_TEMPLATE(BM_products, float)->Apply(product_sizes);
BENCHMARK_TEMPLATE(BM_batch_contrastive, float, ml::simd_tag)->Apply(loss_sizes);
BENCHMARK_TEMPLATE(BM_multi_similarity, float, ml::simd_tag)->Apply(loss_sizes);
BENCHMARK_TEMPLATE(BM_batch_contrastive_density, float)->Apply(density_sizes);

BENCHMARK_MAIN();
