// API.md: "Same inputs, same tag, same build: bitwise the same outputs. Functors hold their
// options and reusable scratch memory; one instance per thread." Every loss, every option,
// both CPU paths: the same call twice on one functor (cold, then warm scratch) gives
// bitwise-equal loss and gradients, and so do two threads that each own a functor.
#include "support.hpp"

#include <cstring>
#include <functional>
#include <thread>

namespace {

using mltest::Matrix;
using mltest::ml::Index;
namespace ml = metricloss;

/// The loss and every gradient of one call, as bytes.
struct Result {
  std::vector<unsigned char> bytes;
  template <class T>
  void add(const T& value) {
    const auto* p = reinterpret_cast<const unsigned char*>(&value);
    bytes.insert(bytes.end(), p, p + sizeof(T));
  }
  template <class T>
  void add(const Matrix<T>& m) {
    const auto* p = reinterpret_cast<const unsigned char*>(m.data());
    bytes.insert(bytes.end(), p, p + sizeof(T) * static_cast<std::size_t>(m.size()));
  }
};

/// One configured call: runs on the functor it is given (or a new one), returns its result.
using Case = std::function<Result()>;

template <class T, class Tag>
std::vector<std::pair<std::string, std::function<Case()>>> cases() {
  // Each entry makes a Case owning its functor and data, so that threads share nothing.
  std::vector<std::pair<std::string, std::function<Case()>>> out;
  const Index n = 48, d = 37;  // D not a multiple of any batch width: tails too
  std::mt19937_64 rng(2026);
  const Matrix<T> a = mltest::uniform_matrix<T>(n, d, rng), b = mltest::uniform_matrix<T>(n, d, rng),
                  c = mltest::uniform_matrix<T>(n, d, rng);
  // A batch with a common offset and a few coincident rows: every special path taken.
  Matrix<T> x = mltest::uniform_matrix<T>(n, d, rng, 99.9, 100.1);
  x.row(5) = x.row(4);
  x.row(9) = x.row(4);
  const auto labels64 = mltest::random_labels(n, 5, rng);
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels(n);
  for (Index i = 0; i < n; ++i) labels[i] = labels64[static_cast<std::size_t>(i)];
  Eigen::VectorXf sim(n);
  for (Index i = 0; i < n; ++i) sim[i] = static_cast<float>(labels[i] % 2);

  for (auto form : {ml::ContrastiveForm::hadsell, ml::ContrastiveForm::legacy})
    out.emplace_back(std::string("contrastive ") + (form == ml::ContrastiveForm::hadsell ? "hadsell" : "legacy"),
                     [=] {
                       return Case([=, loss = ml::ContrastiveLoss<T>(T(1.5), form)]() mutable {
                         Matrix<T> ga(n, d), gb(n, d);
                         Result r;
                         r.add(loss.forward_backward(Tag{}, a, b, sim, ga, gb, T(0.5)));
                         r.add(ga);
                         r.add(gb);
                         r.add(loss.forward_backward(Tag{}, a, b, labels, labels.reverse().eval(), ga, ml::skip));
                         r.add(ga);
                         return r;
                       });
                     });
  for (auto distance : {ml::Distance::euclidean, ml::Distance::squared_euclidean})
    out.emplace_back(std::string("triplet ") + (distance == ml::Distance::euclidean ? "euclidean" : "squared"),
                     [=] {
                       return Case([=, loss = ml::TripletLoss<T>(T(0.3), distance)]() mutable {
                         Matrix<T> ga(n, d), gp(n, d), gn(n, d);
                         Result r;
                         r.add(loss.forward_backward(Tag{}, a, b, c, ga, gp, gn));
                         r.add(ga);
                         r.add(gp);
                         r.add(gn);
                         return r;
                       });
                     });
  const Matrix<T>* const batches[] = {&a, &x};
  for (const Matrix<T>* data : batches)
    out.emplace_back(std::string("lifted structure") + (data == &x ? " at an offset" : ""), [=, batch = *data] {
      return Case([=, loss = ml::LiftedStructureLoss<T>(T(1))]() mutable {
        Matrix<T> g(n, d);
        Result r;
        r.add(loss.forward_backward(Tag{}, batch, labels, g, T(2)));
        r.add(g);
        return r;
      });
    });
  for (auto mining : {ml::Mining::all, ml::Mining::hard, ml::Mining::semihard})
    for (auto distance : {ml::Distance::euclidean, ml::Distance::squared_euclidean})
      for (bool soft : {false, true})
        for (const Matrix<T>* data : batches)
          out.emplace_back("batch triplet mining " + std::to_string(static_cast<int>(mining)) +
                               " distance " + std::to_string(static_cast<int>(distance)) +
                               (soft ? " soft" : "") + (data == &x ? " at an offset" : ""),
                           [=, batch = *data] {
                             return Case([=, loss = ml::BatchTripletLoss<T>(T(0.2), mining, distance, soft)]() mutable {
                               Matrix<T> g(n, d);
                               Result r;
                               r.add(loss.forward_backward(Tag{}, batch, labels, g));
                               r.add(g);
                               return r;
                             });
                           });
  return out;
}

template <class T, class Tag>
void check_determinism() {
  for (const auto& [name, make] : cases<T, Tag>()) {
    CAPTURE(name);
    // The same functor twice: cold scratch, then warm.
    Case same = make();
    const Result first = same();
    const Result second = same();
    CHECK(first.bytes == second.bytes);
    // Two threads, each with its own functor, against this thread's result.
    Case in_one = make(), in_two = make();
    Result one, two;
    std::thread t1([&] { one = in_one(); });
    std::thread t2([&] { two = in_two(); });
    t1.join();
    t2.join();
    CHECK(one.bytes == first.bytes);
    CHECK(two.bytes == first.bytes);
  }
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
  for (const auto shape : {std::pair<Index, Index>{7, 5}, {12, 3}, {40, 37}, {130, 20}}) {
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
