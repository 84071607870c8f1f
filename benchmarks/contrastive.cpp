// Contrastive forward_backward against its floor: one streaming pass that reads a and b and
// writes two N x D outputs (the bytes the fused kernel must move at least), on the same
// buffers as the loss (shape_buffers).
#include "common.hpp"

#include <xsimd/xsimd.hpp>

using namespace mlbench;

namespace {

template <class T>
void floor_stream(const Matrix<T>& a, const Matrix<T>& b, Matrix<T>& ga, Matrix<T>& gb) {
  using batch = xsimd::batch<T>;
  constexpr Index width = static_cast<Index>(batch::size);
  const Index size = a.size();
  const T *pa = a.data(), *pb = b.data();
  T *pga = ga.data(), *pgb = gb.data();
  Index j = 0;
  for (; j + width <= size; j += width) {
    const batch diff = batch::load_unaligned(pa + j) - batch::load_unaligned(pb + j);
    diff.store_unaligned(pga + j);
    (-diff).store_unaligned(pgb + j);
  }
  for (; j < size; ++j) {
    pga[j] = pa[j] - pb[j];
    pgb[j] = pb[j] - pa[j];
  }
}

/// The pairs, similarities and gradients of one shape, shared by the floor and the losses.
template <class T>
struct Pairs {
  Matrix<T> a, b, ga, gb;
  Eigen::VectorXi sim;
  Pairs(Index n, Index d)
      : a(uniform<T>(n, d, 1)), b(uniform<T>(n, d, 2)), ga(Matrix<T>::Zero(n, d)),
        gb(Matrix<T>::Zero(n, d)), sim(pk_labels(n, 2, 3).unaryExpr([](int v) { return v % 2; })) {}
};

template <class T>
void BM_floor(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  Pairs<T>& data = shape_buffers<Pairs<T>>(n, d);
  const Matrix<T>&a = data.a, &b = data.b;
  Matrix<T>&ga = data.ga, &gb = data.gb;
  for (auto _ : state) {
    floor_stream(a, b, ga, gb);
    benchmark::DoNotOptimize(ga.data());
    benchmark::DoNotOptimize(gb.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, 4.0 * n * d * sizeof(T), 0);
}

template <class T, class Tag>
void BM_contrastive(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  const auto form = static_cast<ml::ContrastiveForm>(state.range(2));
  Pairs<T>& data = shape_buffers<Pairs<T>>(n, d);
  const Matrix<T>&a = data.a, &b = data.b;
  const Eigen::VectorXi& sim = data.sim;
  Matrix<T>&ga = data.ga, &gb = data.gb;
  ml::ContrastiveLoss<T> loss(T(std::sqrt(static_cast<double>(d)) * 0.8), form);
  for (auto _ : state) {
    T value = loss.forward_backward(Tag{}, a, b, sim, ga, gb);
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  // a, b, ga, gb move N*D each; sim N; FLOPs: 3/element for d^2, 2 for the gradients.
  set_rates(state, 4.0 * n * d * sizeof(T) + n * sizeof(int), 5.0 * n * d);
}

void sizes(benchmark::internal::Benchmark* b, bool with_form) {
  for (long n : {256L, 65536L})
    for (long form : {0L, 1L}) {
      if (with_form) b->Args({n, 128, form});
      else if (form == 0) b->Args({n, 128});
    }
  b->ArgNames(with_form ? std::vector<std::string>{"N", "D", "form"} : std::vector<std::string>{"N", "D"});
}

}  // namespace

BENCHMARK_TEMPLATE(BM_floor, float)->Apply([](auto* b) { sizes(b, false); });
BENCHMARK_TEMPLATE(BM_contrastive, float, ml::simd_tag)->Apply([](auto* b) { sizes(b, true); });
BENCHMARK_TEMPLATE(BM_contrastive, float, ml::scalar_tag)->Apply([](auto* b) { sizes(b, true); });
BENCHMARK_TEMPLATE(BM_floor, double)->Apply([](auto* b) { sizes(b, false); });
BENCHMARK_TEMPLATE(BM_contrastive, double, ml::simd_tag)->Apply([](auto* b) { sizes(b, true); });


template <class T, class Tag>
void BM_contrastive_forward(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  const Pairs<T>& data = shape_buffers<Pairs<T>>(n, d);
  const Matrix<T>&a = data.a, &b = data.b;
  const Eigen::VectorXi& sim = data.sim;
  ml::ContrastiveLoss<T> loss(T(std::sqrt(static_cast<double>(d)) * 0.8));
  for (auto _ : state) {
    T value = loss.forward(Tag{}, a, b, sim);
    benchmark::DoNotOptimize(value);
  }
  set_rates(state, 2.0 * n * d * sizeof(T) + n * sizeof(int), 3.0 * n * d);
}
BENCHMARK_TEMPLATE(BM_contrastive_forward, float, ml::simd_tag)->Args({256, 128})->Args({65536, 128});
BENCHMARK_MAIN();
