// BatchTripletLoss on CUDA: parity with the scalar path for every mining, distance and
// margin kind (float and double; N = 1, sizes off the tiles; strided maps; label types),
// degenerate batches, NaN propagation, finite differences in double, the large-offset float
// case, determinism with the deferred loss and the noexcept core.
#include "device.cuh"
#include "../batch_triplet_reference.hpp"

#include <cmath>
#include <cstring>
#include <limits>

using namespace mltest;
using ml::Distance;
using ml::Mining;

namespace {

const char* mining_name(Mining mining) {
  return mining == Mining::all ? "all" : mining == Mining::hard ? "hard" : "semihard";
}

template <class T, class L>
void check_parity(const Matrix<T>& x, const std::vector<L>& labels, const ml::BatchTripletLoss<T>& options,
                  Index pad) {
  const Index n = x.rows(), d = x.cols();
  const Eigen::Map<const Eigen::Matrix<L, Eigen::Dynamic, 1>> host_labels(labels.data(), n);
  ml::BatchTripletLoss<T> loss(options.margin, options.mining, options.distance, options.soft_margin);
  const T sentinel = T(-12345), top_diff = T(1.25);
  Strided<T> g_scalar(Matrix<T>::Zero(n, d), pad, sentinel);
  const T scalar_value = loss.forward_backward(ml::scalar, x, host_labels, g_scalar.map(), top_diff);
  const DeviceStrided<T> dx(x, pad, sentinel);
  DeviceStrided<T> dg(Matrix<T>::Zero(n, d), pad, sentinel);
  const DeviceVectorOf<L> dl(labels);
  const T cuda_value = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map(), top_diff);
  CHECK(relatively_close(cuda_value, scalar_value, Tolerance<T>::loss, 1e-12));
  const Strided<T> g = dg.host();
  CHECK(ml::testing::compare_gradients(g.cmap(), g_scalar.map()).relative(1e-30) <= Tolerance<T>::gradient);
  CHECK(g.padding_is(sentinel));
  CHECK(loss.forward(ml::cuda, dx.cmap(), dl.map()) == cuda_value);
}

}  // namespace

TEMPLATE_TEST_CASE("cuda batch triplet agrees with scalar", "[cuda][batch_triplet][parity]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  const auto mining = GENERATE(Mining::hard, Mining::semihard, Mining::all);
  const auto distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const bool soft_margin = GENERATE(false, true);
  const Index n = GENERATE(1, 2, 9, 64, 97);
  const Index d = GENERATE(1, 7, 33);
  const int classes = GENERATE(1, 3, 6);
  const Index pad = n == 97 ? 2 : 0;
  const std::uint64_t seed = 11000u + static_cast<std::uint64_t>(n * 131 + d * 7 + classes);
  CAPTURE(mining_name(mining), distance == Distance::euclidean, soft_margin, n, d, classes, seed);
  std::mt19937_64 rng(seed);
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  const double typical = distance == Distance::euclidean ? std::sqrt(d / 1.5) : d / 1.5;
  const ml::BatchTripletLoss<T> options(static_cast<T>(0.2 * typical), mining, distance, soft_margin);
  check_parity(x, random_labels(n, classes, rng), options, pad);
}

TEMPLATE_TEST_CASE("cuda batch triplet follows the tie rules on tie-heavy data", "[cuda][batch_triplet][ties]",
                   float, double) {
  // The tie regime of tests/batch_triplet.cpp: integer grids, duplicated rows, classes of
  // one, integer margins, offsets 0, 100 and 1e4; against the brute-force reference.
  if (skip_without_device()) return;
  using T = TestType;
  const auto mining = GENERATE(Mining::hard, Mining::semihard, Mining::all);
  const auto distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const bool soft_margin = GENERATE(false, true);
  for (std::uint64_t seed = 1; seed <= 36; ++seed) {
    std::mt19937_64 rng(seed);
    const Index shapes[][2] = {{7, 1}, {12, 2}, {30, 3}, {48, 2}, {40, 5}, {23, 17}};
    const Index n = shapes[seed % 6][0], d = shapes[seed % 6][1];
    const bool small_grid = seed % 2 == 0;
    const double offset = (seed / 2) % 3 == 0 ? 0.0 : (seed / 2) % 3 == 1 ? 100.0 : 1e4;
    const double margin = distance == Distance::euclidean ? 1.0 : (seed % 3 == 0 ? 1.0 : 2.0);
    const int classes = static_cast<int>(seed % 4) + 1;
    CAPTURE(mining_name(mining), distance == Distance::euclidean, soft_margin, seed, n, d, offset, margin);
    const Matrix<T> x = tied_matrix<T>(n, d, rng, small_grid ? 0 : -2, small_grid ? 2 : 3, offset);
    const std::vector<std::int64_t> labels = tied_labels(n, classes, rng);
    const Reference r = brute_force(x.template cast<double>(), labels_of(labels), margin, mining, distance,
                                    soft_margin, 1.5);
    ml::BatchTripletLoss<T> loss(static_cast<T>(margin), mining, distance, soft_margin);
    const DeviceStrided<T> dx(x, 0, T(0));
    DeviceStrided<T> dg(Matrix<T>::Zero(n, d), 0, T(0));
    const DeviceVectorOf<std::int64_t> dl(labels);
    const T value = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map(), T(1.5));
    CHECK(relatively_close(value, r.loss, Tolerance<T>::loss, 1e-30));
    const Strided<T> g = dg.host();
    CHECK(ml::testing::compare_gradients(g.cmap(), r.grad).relative(1e-30) <= Tolerance<T>::gradient);
  }
}

TEMPLATE_TEST_CASE("cuda batch triplet handles degenerate batches", "[cuda][batch_triplet][edge]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  const auto mining = GENERATE(Mining::hard, Mining::semihard, Mining::all);
  CAPTURE(mining_name(mining));
  std::mt19937_64 rng(17);
  const Index n = 30, d = 6;
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  const ml::BatchTripletLoss<T> options(T(0.3), mining);
  SECTION("singletons: nothing to average") {
    std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int32_t>(i);
    check_parity(x, labels, options, 0);
  }
  SECTION("coincident points") {
    Matrix<T> y = x;
    for (Index i = 0; i + 1 < n; i += 3) y.row(i + 1) = y.row(i);
    std::vector<float> labels(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<float>(i % 4);
    check_parity(y, labels, options, 0);
  }
  SECTION("NaN in the labels propagates") { check_nan_label_propagates(options, x); }
}

TEST_CASE("cuda batch triplet gradients match finite differences", "[cuda][batch_triplet][gradcheck]") {
  if (skip_without_device()) return;
  // Soft margin keeps every term smooth; random points keep the selections away from ties.
  const auto mining = GENERATE(Mining::hard, Mining::semihard, Mining::all);
  const auto distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  CAPTURE(mining_name(mining), distance == Distance::euclidean);
  std::mt19937_64 rng(29);
  const Index n = 10, d = 4;
  const Matrix<double> x = uniform_matrix<double>(n, d, rng);
  const std::vector<std::int64_t> labels = {0, 1, 2, 0, 1, 2, 0, 1, 2, 0};
  const DeviceVectorOf<std::int64_t> dl(labels);
  ml::BatchTripletLoss<double> loss(0.3, mining, distance, /*soft_margin=*/true);
  const double top_diff = 0.8;
  const DeviceStrided<double> dx(x, 0, 0.0);
  DeviceStrided<double> dg(Matrix<double>::Zero(n, d), 0, 0.0);
  loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map(), top_diff);
  const Matrix<double> numeric = top_diff * ml::testing::numerical_gradient(
                                                [&](const Matrix<double>& y) {
                                                  const DeviceStrided<double> dy(y, 0, 0.0);
                                                  return loss.forward(ml::cuda, dy.cmap(), dl.map());
                                                },
                                                x);
  CHECK(ml::testing::compare_gradients(dg.dense(), numeric).relative() <= Tolerance<double>::finite_difference);
}

TEST_CASE("cuda batch triplet in float is accurate at a large common offset", "[cuda][batch_triplet][numerics]") {
  if (skip_without_device()) return;
  const auto mining = GENERATE(Mining::hard, Mining::semihard, Mining::all);
  CAPTURE(mining_name(mining));
  std::mt19937_64 rng(37);
  const Index n = 96, d = 64;
  const Matrix<float> x = uniform_matrix<float>(n, d, rng, 99.95, 100.05);
  const auto labels = random_labels(n, 8, rng);
  const Eigen::Map<const Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>> host_labels(labels.data(), n);
  ml::BatchTripletLoss<double> reference_loss(0.05, mining);
  Matrix<double> reference_grad(n, d);
  const double reference = reference_loss.forward_backward(ml::scalar, x.cast<double>().eval(), host_labels, reference_grad);
  ml::BatchTripletLoss<float> loss(0.05f, mining);
  const DeviceStrided<float> dx(x, 0, 0.0f);
  DeviceStrided<float> dg(Matrix<float>::Zero(n, d), 0, 0.0f);
  const DeviceVectorOf<std::int64_t> dl(labels);
  const float value = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map());
  CHECK(relatively_close(value, reference, Tolerance<float>::loss));
  CHECK(ml::testing::compare_gradients(dg.dense(), reference_grad).relative() <= Tolerance<float>::gradient);
}

TEMPLATE_TEST_CASE("cuda batch triplet is deterministic; core and deferred loss", "[cuda][batch_triplet][core]",
                   float, double) {
  using T = TestType;
  namespace core = ml::cuda_core;
  const Index n = 200, d = 24;
  const std::size_t bytes = core::batch_triplet_workspace_bytes<T>(n, d);
  CHECK(bytes >= (sizeof(T) + sizeof(double)) * static_cast<std::size_t>(n * n));
  T* no_loss = nullptr;
  CHECK(core::batch_triplet_forward_backward<T, int>(nullptr, bytes, {}, {}, T(1), Mining::hard, Distance::euclidean,
                                                     false, {}, T(1), no_loss, nullptr) == cudaErrorInvalidValue);
  if (skip_without_device()) return;
  std::mt19937_64 rng(47);
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  const auto labels = random_labels(n, 12, rng);
  // Each mining with exactly its own workspace (hard's sparse W is the smallest).
  for (const Mining mining : {Mining::semihard, Mining::hard}) {
    CAPTURE(mining_name(mining));
    check_deterministic_core(ml::BatchTripletLoss<T>(T(0.5), mining), x, labels,
                             core::batch_triplet_workspace_bytes<T>(n, d, mining),
                             [mining](void* workspace, std::size_t size, auto xv, auto lv, auto gv, T* loss,
                                      cudaStream_t s) {
                               return core::batch_triplet_forward_backward<T, std::int64_t>(
                                   workspace, size, xv, lv, T(0.5), mining, Distance::euclidean, false, gv, T(1),
                                   loss, s);
                             });
  }
}

TEMPLATE_TEST_CASE("cuda batch triplet sizes its workspace by mining", "[cuda][batch_triplet][core]", float,
                   double) {
  // No device needed: the sizes, and a too-small workspace refused before anything is enqueued.
  using T = TestType;
  namespace core = ml::cuda_core;
  const Index n = 300, d = 5;
  const auto square = static_cast<std::size_t>(n * n);
  const std::size_t hard = core::batch_triplet_workspace_bytes<T>(n, d, Mining::hard);
  const std::size_t semihard = core::batch_triplet_workspace_bytes<T>(n, d, Mining::semihard);
  const std::size_t all = core::batch_triplet_workspace_bytes<T>(n, d, Mining::all);
  CAPTURE(hard, semihard, all);
  CHECK(semihard == all);
  CHECK(all == core::batch_triplet_workspace_bytes<T>(n, d));
  CHECK(all >= (sizeof(T) + sizeof(double)) * square);
  // Hard keeps D2 (N x N of T) but no N x N weights: two rows and two weights per anchor.
  CHECK(hard >= sizeof(T) * square);
  // all - hard: the N x N doubles less hard's 24 bytes per anchor (32 allows for alignment).
  CHECK(all - hard >= sizeof(double) * square - 32 * static_cast<std::size_t>(n));
  CHECK(all - hard < sizeof(double) * square);
  // A workspace one byte short is refused with nothing enqueued (a host pointer is never read).
  alignas(256) static char host_bytes[256];
  T* const loss = reinterpret_cast<T*>(host_bytes);
  const core::DeviceMatrix<const T> xv{reinterpret_cast<const T*>(host_bytes), n, d, d};
  const core::DeviceVector<int> lv{reinterpret_cast<const int*>(host_bytes), n, 1};
  const core::DeviceMatrix<T> gv{reinterpret_cast<T*>(host_bytes), n, d, d};
  for (const Mining mining : {Mining::hard, Mining::semihard, Mining::all}) {
    CAPTURE(mining_name(mining));
    const std::size_t bytes = core::batch_triplet_workspace_bytes<T>(n, d, mining);
    CHECK(core::batch_triplet_forward_backward<T, int>(host_bytes, bytes - 1, xv, lv, T(1), mining,
                                                       Distance::euclidean, false, gv, T(1), loss,
                                                       nullptr) == cudaErrorInvalidValue);
  }
  CHECK(core::batch_triplet_forward_backward<T, int>(host_bytes, hard, xv, lv, T(1), Mining::semihard,
                                                     Distance::euclidean, false, gv, T(1), loss,
                                                     nullptr) == cudaErrorInvalidValue);
}

TEST_CASE("cuda batch triplet rejects bad input before touching the device", "[cuda][batch_triplet][errors]") {
  std::mt19937_64 rng(49);
  Matrix<float> x = uniform_matrix<float>(4, 3, rng), g(4, 2);
  Eigen::VectorXi labels = Eigen::VectorXi::Zero(4);
  ml::BatchTripletLoss<float> loss;
  std::string message = "no exception";
  try {
    loss.forward_backward(ml::cuda, x, labels, g);
  } catch (const ml::invalid_argument& e) {
    message = e.what();
  }
  CAPTURE(message);
  CHECK(message.find("metricloss::BatchTripletLoss<float>::forward_backward") != std::string::npos);
  CHECK(message.find("'grad_x'") != std::string::npos);
}
