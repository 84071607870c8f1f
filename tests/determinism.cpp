// API.md: "Same inputs, same tag, same build: bitwise the same outputs. Functors hold their
// options and reusable scratch memory; one instance per thread." Every registered loss
// (tests/registry.hpp), every option and call form, both CPU paths: the same calls twice on
// one functor (cold, then warm scratch) give bitwise-equal losses and gradients, and so do
// two threads that each own a functor.
#include "registry.hpp"
#include "support.hpp"

#include <cstring>
#include <thread>

namespace {

using mltest::Matrix;
using mltest::ml::Index;
namespace ml = metricloss;
namespace registry = mltest::registry;

/// The loss and every gradient of one call, as bytes.
struct Result {
  std::vector<unsigned char> bytes;
  template <class T>
  void add(const T& value) {
    append(&value, sizeof(T));
  }
  template <class T>
  void add(const Matrix<T>& m) {
    append(m.data(), sizeof(T) * static_cast<std::size_t>(m.size()));
  }
  // resize and memcpy: GCC 12 misreads vector::insert's inlined memmove (-Wnonnull).
  void append(const void* p, std::size_t size) {
    const std::size_t at = bytes.size();
    bytes.resize(at + size);
    if (size > 0) std::memcpy(bytes.data() + at, p, size);
  }
};

/// Every call form of one configured functor, in order: each call's loss and every gradient
/// buffer after it.
template <class Tag, class Entry, class Loss, class T>
Result run_calls(Loss& loss, const registry::Data<T>& data) {
  registry::Outputs<T> out(data.n, data.d);
  Result r;
  Entry::calls(Tag{}, loss, data, out, [&](const std::string&, auto&& call) {
    r.add(call());
    r.add(out.g1);
    r.add(out.g2);
    r.add(out.g3);
    r.add(Matrix<T>(out.strided));
  });
  return r;
}

template <class T, class Tag>
void check_determinism() {
  // D not a multiple of any batch width (tails too); the batch at an offset has coincident
  // rows: every special path taken.
  const registry::Data<T> data(48, 37, 2026);
  registry::for_each_loss([&](auto entry) {
    using Entry = decltype(entry);
    for (const auto& config : Entry::template configs<T>()) {
      CAPTURE(Entry::name, config.label);
      // The same functor twice: cold scratch, then warm.
      auto same = config.loss;
      const Result first = run_calls<Tag, Entry>(same, data);
      const Result second = run_calls<Tag, Entry>(same, data);
      CHECK(first.bytes == second.bytes);
      // Two threads, each with its own functor, against this thread's result.
      auto in_one = config.loss, in_two = config.loss;
      Result one, two;
      std::thread t1([&] { one = run_calls<Tag, Entry>(in_one, data); });
      std::thread t2([&] { two = run_calls<Tag, Entry>(in_two, data); });
      t1.join();
      t2.join();
      CHECK(one.bytes == first.bytes);
      CHECK(two.bytes == first.bytes);
    }
  });
}

}  // namespace

TEMPLATE_TEST_CASE("every loss is bitwise deterministic, across calls and threads",
                   "[determinism]", ml::scalar_tag, ml::simd_tag) {
  SECTION("float") { check_determinism<float, TestType>(); }
  SECTION("double") { check_determinism<double, TestType>(); }
}

namespace {

/// Every output of every loss written at `shift` elements past a 64-byte boundary: the same
/// bits for every shift (API.md: same inputs, same bits; where the caller's buffers happen to
/// lie is not an input). Small batches matter most: Eigen's products at small sizes peel by
/// the destination's alignment, so a product written straight into the caller's gradient
/// rounded differently with its address.
template <class T, class Tag>
std::vector<Result> at_every_shift(Index n, Index d, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const Matrix<T> x = mltest::uniform_matrix<T>(n, d, rng, -2.0, 2.0);
  const Matrix<T> y = mltest::uniform_matrix<T>(n, d, rng, -2.0, 2.0);
  const Matrix<T> z = mltest::uniform_matrix<T>(n, d, rng, -2.0, 2.0);
  Eigen::VectorXi labels(n);
  for (Index i = 0; i < n; ++i) labels[i] = static_cast<int>(i % 3);
  Eigen::VectorXf sim(n);
  for (Index i = 0; i < n; ++i) sim[i] = static_cast<float>(i % 2);
  constexpr Index line = 64 / static_cast<Index>(sizeof(T));
  std::vector<Result> out;
  for (Index shift = 0; shift < line; ++shift) {
    std::vector<T> storage(static_cast<std::size_t>(3 * (n * d + 2 * line)));
    T* base = storage.data();
    base += (line - (reinterpret_cast<std::uintptr_t>(base) / sizeof(T)) % line) % line;
    const auto at = [&](Index k) {
      return ml::RowMap<T>(base + k * (n * d + line) + shift, n, d, Eigen::OuterStride<>(d));
    };
    ml::RowMap<T> g1 = at(0), g2 = at(1), g3 = at(2);
    Result r;
    ml::LiftedStructureLoss<T> lifted;
    r.add(lifted.forward_backward(Tag{}, x, labels, g1));
    r.add(Matrix<T>(g1));
    for (auto mining : {ml::Mining::all, ml::Mining::hard}) {
      ml::BatchTripletLoss<T> batch(T(0.2), mining);
      r.add(batch.forward_backward(Tag{}, x, labels, g1));
      r.add(Matrix<T>(g1));
    }
    ml::ContrastiveLoss<T> contrastive;
    r.add(contrastive.forward_backward(Tag{}, x, y, sim, g1, g2));
    r.add(Matrix<T>(g1));
    r.add(Matrix<T>(g2));
    ml::TripletLoss<T> triplet;
    r.add(triplet.forward_backward(Tag{}, x, y, z, g1, g2, g3));
    r.add(Matrix<T>(g1));
    r.add(Matrix<T>(g2));
    r.add(Matrix<T>(g3));
    out.push_back(r);
  }
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("outputs do not depend on where the caller's gradient buffers lie",
                   "[determinism]", ml::scalar_tag, ml::simd_tag) {
  for (const auto& shape : {std::pair<Index, Index>{7, 5}, {12, 3}, {40, 37}, {130, 20}}) {
    const std::uint64_t seed = static_cast<std::uint64_t>(shape.first * 100 + shape.second);
    CAPTURE(shape.first, shape.second, seed);
    const std::vector<Result> f = at_every_shift<float, TestType>(shape.first, shape.second, seed);
    for (std::size_t s = 1; s < f.size(); ++s) {
      CAPTURE(s);
      CHECK(f[s].bytes == f[0].bytes);
    }
    const std::vector<Result> g = at_every_shift<double, TestType>(shape.first, shape.second, seed);
    for (std::size_t s = 1; s < g.size(); ++s) {
      CAPTURE(s);
      CHECK(g[s].bytes == g[0].bytes);
    }
  }
}
