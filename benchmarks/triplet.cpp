// TripletLoss forward_backward over explicit triplets against its floor: one streaming pass
// that reads anchor, positive and negative and writes three N x D outputs (the bytes the
// fused kernel must move at least), on the same buffers as the loss.
#include "common.hpp"

#include <xsimd/xsimd.hpp>

#include <map>
#include <memory>
#include <utility>

using namespace mlbench;

namespace {

template <class T>
void floor_stream(const Matrix<T>& a, const Matrix<T>& p, const Matrix<T>& n, Matrix<T>& ga,
                  Matrix<T>& gp, Matrix<T>& gn) {
  using batch = xsimd::batch<T>;
  constexpr Index width = static_cast<Index>(batch::size);
  const Index size = a.size();
  const T *pa = a.data(), *pp = p.data(), *pn = n.data();
  T *pga = ga.data(), *pgp = gp.data(), *pgn = gn.data();
  Index j = 0;
  for (; j + width <= size; j += width) {
    const batch x = batch::load_unaligned(pa + j), y = batch::load_unaligned(pp + j),
                z = batch::load_unaligned(pn + j);
    (x - y).store_unaligned(pga + j);
    (y - z).store_unaligned(pgp + j);
    (z - x).store_unaligned(pgn + j);
  }
  for (; j < size; ++j) {
    pga[j] = pa[j] - pp[j];
    pgp[j] = pp[j] - pn[j];
    pgn[j] = pn[j] - pa[j];
  }
}

/// The inputs and outputs of one shape, made once and shared by the floor and every loss of
/// that shape, so that all of them run on the same bytes at the same addresses. With buffers
/// of their own (allocated per run), the floor and the losses ran on different heap chunks
/// (other offsets within a page, other physical pages), and at N = 256, where six arrays of
/// 128 KiB share a 1 MiB L2, the placement alone moved the floor by up to 25% and a loss by
/// about 10%: the ratio measured the allocator as much as the kernel.
template <class T>
struct Triplets {
  Matrix<T> a, p, neg, ga, gp, gn;
};

template <class T>
Triplets<T>& triplets(Index n, Index d) {
  static std::map<std::pair<Index, Index>, std::unique_ptr<Triplets<T>>> shapes;
  std::unique_ptr<Triplets<T>>& slot = shapes[{n, d}];
  if (!slot)
    slot.reset(new Triplets<T>{uniform<T>(n, d, 1), uniform<T>(n, d, 2), uniform<T>(n, d, 3),
                               Matrix<T>::Zero(n, d), Matrix<T>::Zero(n, d), Matrix<T>::Zero(n, d)});
  return *slot;
}

template <class T>
void BM_floor(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  Triplets<T>& data = triplets<T>(n, d);
  const Matrix<T>&a = data.a, &p = data.p, &neg = data.neg;
  Matrix<T>&ga = data.ga, &gp = data.gp, &gn = data.gn;
  for (auto _ : state) {
    floor_stream(a, p, neg, ga, gp, gn);
    benchmark::DoNotOptimize(ga.data());
    benchmark::DoNotOptimize(gp.data());
    benchmark::DoNotOptimize(gn.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, 6.0 * n * d * sizeof(T), 0);
}

template <class T, class Tag>
void BM_triplet(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  const auto distance = static_cast<ml::Distance>(state.range(2));
  Triplets<T>& data = triplets<T>(n, d);
  const Matrix<T>&a = data.a, &p = data.p, &neg = data.neg;
  Matrix<T>&ga = data.ga, &gp = data.gp, &gn = data.gn;
  // About half the triplets active: d_ap - d_an is spread around 0 for uniform rows.
  ml::TripletLoss<T> loss(T(0.2), distance);
  for (auto _ : state) {
    T value = loss.forward_backward(Tag{}, a, p, neg, ga, gp, gn);
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  // Six N x D arrays move once; FLOPs: 6/element for the two d^2, 7 for the gradients.
  set_rates(state, 6.0 * n * d * sizeof(T), 13.0 * n * d);
}

void sizes(benchmark::internal::Benchmark* b, bool with_distance) {
  for (long n : {256L, 65536L})
    for (long distance : {0L, 1L}) {
      if (with_distance) b->Args({n, 128, distance});
      else if (distance == 0) b->Args({n, 128});
    }
  b->ArgNames(with_distance ? std::vector<std::string>{"N", "D", "distance"}
                            : std::vector<std::string>{"N", "D"});
}

}  // namespace

BENCHMARK_TEMPLATE(BM_floor, float)->Apply([](auto* b) { sizes(b, false); });
BENCHMARK_TEMPLATE(BM_triplet, float, ml::simd_tag)->Apply([](auto* b) { sizes(b, true); });
BENCHMARK_TEMPLATE(BM_triplet, float, ml::scalar_tag)->Apply([](auto* b) { sizes(b, true); });
BENCHMARK_TEMPLATE(BM_floor, double)->Apply([](auto* b) { sizes(b, false); });
BENCHMARK_TEMPLATE(BM_triplet, double, ml::simd_tag)->Apply([](auto* b) { sizes(b, true); });

BENCHMARK_MAIN();
