// The Fashion-MNIST example's data-parallel step (examples/fashion_mnist/data_parallel.hpp,
// --ranks W): one step on W = 3 ranks as threads, in double, against the single-process step
// on the concatenated batch. Each rank's summed parameter gradient within 1e-12 of the
// single-process one; L within 1e-12 and bitwise the same on every rank; every replica bitwise
// the same after its Adam step. (The parameters after the step are not compared with the
// single process's: Adam's first step is lr * sign(g), and a gradient that is zero in exact
// arithmetic, such as the last bias's under a translation-invariant loss, has a sign set by
// rounding.) Synthetic inputs: it runs without the data set.
#include "data_parallel.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace ml = metricloss;
namespace fm = fashion_mnist;
using Index = Eigen::Index;
using Matrix = ml::RowMatrix<double>;
using Network = fm::BasicEmbeddingNetwork<double>;

constexpr Index inputs = 12, hidden = 16, outputs = 5;

/// max |a - b| / (1 + max |b|) over the entries.
double relative_gap(const Matrix& a, const Matrix& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  if (a.size() == 0) return 0.0;
  return (a - b).cwiseAbs().maxCoeff() / (1.0 + b.cwiseAbs().maxCoeff());
}

bool bitwise_equal(const Matrix& a, const Matrix& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::equal(a.data(), a.data() + a.size(), b.data());
}

/// One data-parallel step on `shards.size()` threads against the single-process step.
template <class Loss, class Base>
void check_step(const Loss& prototype, Base base, const std::vector<Index>& shards,
                bool network_normalizes, unsigned seed) {
  CAPTURE(seed, network_normalizes);
  INFO("shards " << [&] {
    std::string s;
    for (Index n : shards) s += std::to_string(n) + " ";
    return s;
  }());
  std::mt19937 rng(seed);
  const Network initial(inputs, hidden, outputs, network_normalizes, rng);
  Index n = 0;
  for (Index rows : shards) n += rows;
  std::normal_distribution<double> normal(0.0, 1.0);
  const Matrix x = Matrix::NullaryExpr(n, inputs, [&] { return normal(rng); });
  // Classes 0..2 spread over the batch (split across ranks), class 3 in the last rows only
  // (on the last rank alone), and a singleton class 4 (an anchor without positives).
  Eigen::VectorXi labels(n);
  for (Index i = 0; i < n; ++i) labels[i] = int(i % 3);
  labels[n - 3] = labels[n - 2] = 3;
  labels[n - 1] = 4;

  // The single-process step on the concatenated batch.
  Network single = initial;
  Loss single_loss = prototype;
  const Matrix& embeddings = single.forward(x);
  Matrix gradient(embeddings.rows(), embeddings.cols());
  const double expected = double(single_loss.forward_backward(base, embeddings, labels, gradient));
  single.backward(x, gradient);
  std::vector<Matrix> expected_gradients;
  for (const auto* p : single.parameters()) expected_gradients.push_back(p->gradient);

  const int ranks = int(shards.size());
  std::vector<Network> replicas(std::size_t(ranks), initial);
  std::vector<double> values(static_cast<std::size_t>(ranks));
  std::vector<std::vector<Matrix>> gradients(static_cast<std::size_t>(ranks));
  ml::thread_group team(ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      ml::thread_rank me = team.member(r);
      fm::AnyGroup group(me);  // as the example calls it
      Index first = 0;
      for (int q = 0; q < r; ++q) first += shards[std::size_t(q)];
      const Index rows = shards[std::size_t(r)];
      const Matrix input = x.middleRows(first, rows);
      const Eigen::VectorXi mine = labels.segment(first, rows);
      Loss loss = prototype;
      fm::DataParallelScratch<double> scratch;
      Network& replica = replicas[std::size_t(r)];
      values[std::size_t(r)] =
          fm::data_parallel_gradient(replica, loss, base, group, input, mine, scratch);
      for (const auto* p : replica.parameters()) gradients[std::size_t(r)].push_back(p->gradient);
      fm::BasicAdam<double> optimizer;
      replica.update(optimizer);
    });
  for (auto& t : threads) t.join();

  for (int r = 0; r < ranks; ++r) {
    CAPTURE(r);
    CHECK(std::abs(values[std::size_t(r)] - expected) <= 1e-12 * (1.0 + std::abs(expected)));
    CHECK(std::memcmp(&values[std::size_t(r)], &values[0], sizeof(double)) == 0);
    for (std::size_t k = 0; k < expected_gradients.size(); ++k) {
      CAPTURE(k);
      CHECK(relative_gap(gradients[std::size_t(r)][k], expected_gradients[k]) <= 1e-12);
      CHECK(bitwise_equal(gradients[std::size_t(r)][k], gradients[0][k]));
      CHECK(bitwise_equal(replicas[std::size_t(r)].parameters()[k]->value,
                          replicas[0].parameters()[k]->value));
    }
  }
  // The step moved the network: a gradient of zero would pass every check above.
  double largest = 0.0;
  for (const Matrix& g : expected_gradients) largest = std::max(largest, g.cwiseAbs().maxCoeff());
  CHECK(largest > 1e-6);
}

template <class Loss>
void check_loss(const Loss& loss, bool network_normalizes) {
  for (const std::vector<Index>& shards :
       {std::vector<Index>{6, 6, 6}, {7, 0, 11}, {1, 1, 16}, {18, 0, 0}})
    for (unsigned seed : {1u, 2u}) {
      check_step(loss, ml::scalar, shards, network_normalizes, seed);
      check_step(loss, ml::simd, shards, network_normalizes, seed);
    }
}

}  // namespace

TEST_CASE("fashion_mnist --ranks: shard_of splits a batch into contiguous near-equal shards",
          "[example]") {
  for (Index n : {Index(0), Index(1), Index(7), Index(160)})
    for (int ranks : {1, 2, 3, 5}) {
      CAPTURE(n, ranks);
      Index next = 0;
      for (int r = 0; r < ranks; ++r) {
        const fm::Shard s = fm::shard_of(n, ranks, r);
        CHECK(s.first == next);
        CHECK(s.rows >= n / ranks);
        CHECK(s.rows <= n / ranks + 1);
        next += s.rows;
      }
      CHECK(next == n);
    }
}

TEST_CASE("fashion_mnist --ranks: one data-parallel step on 3 ranks equals the "
          "single-process step, double, 1e-12", "[example]") {
  using ml::Distance;
  using ml::Mining;
  SECTION("batch-all, batch-hard, semihard (hinge and soft margin)") {
    for (Mining mining : {Mining::all, Mining::hard, Mining::semihard})
      for (bool soft : {false, true}) {
        CAPTURE(int(mining), soft);
        ml::BatchTripletLoss<double> loss(0.2, mining, Distance::euclidean);
        loss.soft_margin = soft;
        check_loss(loss, true);
      }
  }
  SECTION("lifted") { check_loss(ml::LiftedStructureLoss<double>(1.0), false); }
  SECTION("batch-contrastive, normalised in the loss, nonzero mean") {
    ml::BatchContrastiveLoss<double> loss(0.0, 1.0, Distance::euclidean);
    loss.normalize = true;
    check_loss(loss, false);
  }
  SECTION("multi-similarity, normalised in the loss") {
    ml::MultiSimilarityLoss<double> loss;
    loss.normalize = true;
    check_loss(loss, false);
  }
}
