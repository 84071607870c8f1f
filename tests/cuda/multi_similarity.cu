// MultiSimilarityLoss on CUDA: against a brute-force double transcription of API.md's
// formula and against the scalar path, for every option set of tests/multi_similarity.cpp
// (epsilon finite and +inf; float and double; N = 1, sizes off the tiles; strided maps;
// label types); the tie regime (integer rows, so that similarities land exactly on a kept
// set's limit); degenerate batches; NaN and Inf; finite differences in double; beta = 50 on
// unnormalised rows (e^{beta (S - base)} far beyond double's range without the shift);
// determinism with the deferred loss and the noexcept core; errors before the device.
#include "device.cuh"

#include "../multi_similarity_reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

using namespace mltest;

namespace {

using ms_reference::every_option;
using ms_reference::inf;
using ms_reference::Options;

struct Expected {
  double loss = 0.0;
  Matrix<double> grad;
};

/// The batch as Q = R = X with self = identity (multi_similarity_reference.hpp's brute force
/// of API.md's formula), grad = top_diff (grad_q + grad_r).
template <class L>
Expected brute_force(const Options& o, const Matrix<double>& x, const std::vector<L>& labels, double top_diff) {
  const Index n = x.rows();
  const Eigen::Map<const Eigen::Matrix<L, Eigen::Dynamic, 1>> y(labels.data(), n);
  const ms_reference::Expected e = ms_reference::brute_force(o, x, y, x, y, Eigen::VectorXi::LinSpaced(n, 0, int(n - 1)));
  return {e.loss, top_diff * (e.gq + e.gr)};
}

/// max |got - expected| against tol times the largest expected entry (W spans e^{beta ...}:
/// entrywise relative error would be dominated by entries that are rounding noise).
template <class T>
void check_gradient(const Matrix<T>& got, const Matrix<double>& expected, double tol) {
  const double scale = expected.size() ? expected.cwiseAbs().maxCoeff() : 0.0;
  const double worst = expected.size() ? (got.template cast<double>() - expected).cwiseAbs().maxCoeff() : 0.0;
  CAPTURE(worst, scale);
  CHECK(worst <= tol * std::max(scale, 1e-300));
}

/// The cuda call against the scalar path and the brute force, padding untouched, forward
/// equal to forward_backward's loss.
template <class T, class L>
void check_parity(const Matrix<T>& x, const std::vector<L>& labels, const Options& o, Index pad) {
  const Index n = x.rows(), d = x.cols();
  const Eigen::Map<const Eigen::Matrix<L, Eigen::Dynamic, 1>> host_labels(labels.data(), n);
  ml::MultiSimilarityLoss<T> loss = o.loss<T>();
  const T sentinel = T(-12345), top_diff = T(1.25);
  Matrix<T> g_scalar(n, d);
  const T scalar_value = loss.forward_backward(ml::scalar, x, host_labels, g_scalar, top_diff);
  const DeviceStrided<T> dx(x, pad, sentinel);
  DeviceStrided<T> dg(Matrix<T>::Zero(n, d), pad, sentinel);
  const DeviceVectorOf<L> dl(labels);
  const T cuda_value = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map(), top_diff);
  CHECK(relatively_close(cuda_value, scalar_value, Tolerance<T>::loss, 1e-12));
  const Strided<T> g = dg.host();
  check_gradient<T>(g.cmap(), g_scalar.template cast<double>(), Tolerance<T>::gradient);
  CHECK(g.padding_is(sentinel));
  CHECK(loss.forward(ml::cuda, dx.cmap(), dl.map()) == cuda_value);
  const Expected e = brute_force(o, x.template cast<double>(), labels, static_cast<double>(top_diff));
  CHECK(relatively_close(cuda_value, e.loss, Tolerance<T>::loss, 1e-12));
  check_gradient<T>(g.cmap(), e.grad, Tolerance<T>::gradient);
}

}  // namespace

TEMPLATE_TEST_CASE("cuda multi-similarity agrees with scalar and the formula", "[cuda][multi_similarity][parity]",
                   float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  const Options o = GENERATE(from_range(every_option()));
  const Index n = GENERATE(1, 2, 9, 64, 97, 300);
  const Index d = GENERATE(1, 7, 33);
  const int classes = GENERATE(1, 3, 6);
  const Index pad = n == 97 ? 2 : 0;
  const std::uint64_t seed = 15000u + static_cast<std::uint64_t>(n * 131 + d * 7 + classes);
  CAPTURE(o.alpha, o.beta, o.base, o.epsilon, n, d, classes, seed);
  std::mt19937_64 rng(seed);
  // Rows of norm about 1 (the cosine scale the options are written for).
  const Matrix<T> x = (uniform_matrix<double>(n, d, rng) * std::sqrt(3.0 / double(d))).template cast<T>();
  check_parity(x, random_labels(n, classes, rng), o, pad);
}

TEMPLATE_TEST_CASE("cuda multi-similarity follows the tie rules on integer rows", "[cuda][multi_similarity][ties]",
                   float, double) {
  // Integer rows and integer base and epsilon: similarities are integers, so pairs sit
  // exactly on a kept set's limit (strict: not kept) and extremes tie; duplicated rows and
  // classes of one come with tied_labels.
  if (skip_without_device()) return;
  using T = TestType;
  const Options tie_options[] = {{1, 2, 0, 0}, {0.5, 1, 1, 1}, {1, 3, 0, 2}, {2, 1, -1, inf}};
  const Options o = GENERATE_REF(from_range(std::vector<Options>(std::begin(tie_options), std::end(tie_options))));
  for (std::uint64_t seed = 1; seed <= 24; ++seed) {
    std::mt19937_64 rng(seed);
    const Index shapes[][2] = {{7, 1}, {12, 2}, {30, 3}, {48, 2}, {40, 5}, {23, 17}};
    const Index n = shapes[seed % 6][0], d = shapes[seed % 6][1];
    const int classes = static_cast<int>(seed % 4) + 1;
    CAPTURE(o.alpha, o.beta, o.base, o.epsilon, seed, n, d, classes);
    const Matrix<T> x = tied_matrix<T>(n, d, rng, -1, 1);
    const std::vector<std::int64_t> labels = tied_labels(n, classes, rng);
    const Expected e = brute_force(o, x.template cast<double>(), labels, 1.5);
    ml::MultiSimilarityLoss<T> loss = o.loss<T>();
    const DeviceStrided<T> dx(x, 0, T(0));
    DeviceStrided<T> dg(Matrix<T>::Zero(n, d), 0, T(0));
    const DeviceVectorOf<std::int64_t> dl(labels);
    const T value = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map(), T(1.5));
    CHECK(relatively_close(value, e.loss, Tolerance<T>::loss, 1e-30));
    check_gradient<T>(dg.dense(), e.grad, Tolerance<T>::gradient);
  }
}

TEMPLATE_TEST_CASE("cuda multi-similarity handles degenerate batches", "[cuda][multi_similarity][edge]", float,
                   double) {
  if (skip_without_device()) return;
  using T = TestType;
  const Options o = GENERATE(from_range(every_option()));
  CAPTURE(o.alpha, o.beta, o.base, o.epsilon);
  std::mt19937_64 rng(17);
  const Index n = 30, d = 6;
  const Matrix<T> x = (uniform_matrix<double>(n, d, rng) * 0.7).template cast<T>();
  SECTION("classes of one: no positives") {
    std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int32_t>(i);
    check_parity(x, labels, o, 0);
  }
  SECTION("one class: no negatives") {
    check_parity(x, std::vector<std::int32_t>(static_cast<std::size_t>(n), 4), o, 0);
  }
  SECTION("duplicated rows") {
    Matrix<T> y = x;
    for (Index i = 0; i + 1 < n; i += 3) y.row(i + 1) = y.row(i);
    std::vector<float> labels(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<float>(i % 4);
    check_parity(y, labels, o, 0);
  }
  SECTION("NaN in the labels propagates") { check_nan_label_propagates(o.loss<T>(), x); }
  SECTION("a non-finite entry propagates") {
    Matrix<T> y = x;
    y(5, 2) = -std::numeric_limits<T>::infinity();
    const DeviceStrided<T> dx(y, 0, T(0));
    DeviceStrided<T> dg(Matrix<T>::Zero(n, d), 0, T(0));
    const DeviceVectorOf<std::int64_t> dl(random_labels(n, 3, rng));
    ml::MultiSimilarityLoss<T> loss = o.loss<T>();
    CHECK(std::isnan(loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map())));
    CHECK(dg.dense().array().isNaN().all());
  }
}

TEST_CASE("cuda multi-similarity gradients match finite differences", "[cuda][multi_similarity][gradcheck]") {
  if (skip_without_device()) return;
  // Random rows keep every similarity away from its kept set's limit, where L jumps.
  const Options o = GENERATE(from_range(every_option()));
  CAPTURE(o.alpha, o.beta, o.base, o.epsilon);
  std::mt19937_64 rng(29);
  const Index n = 10, d = 4;
  const Matrix<double> x = uniform_matrix<double>(n, d, rng) * 0.8;
  const std::vector<std::int64_t> labels = {0, 1, 2, 0, 1, 2, 0, 1, 2, 0};
  const DeviceVectorOf<std::int64_t> dl(labels);
  ml::MultiSimilarityLoss<double> loss = o.loss<double>();
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

TEMPLATE_TEST_CASE("cuda multi-similarity is stable with beta = 50 on unnormalised rows",
                   "[cuda][multi_similarity][numerics]", float, double) {
  // |S| up to ~40: e^{50 (S - 0.5)} is e^{1975}, beyond double; the shift keeps it finite.
  if (skip_without_device()) return;
  using T = TestType;
  const double epsilon = GENERATE(0.1, inf);
  CAPTURE(epsilon);
  std::mt19937_64 rng(37);
  const Index n = 96, d = 16;
  const Matrix<T> x = (uniform_matrix<double>(n, d, rng) * 2.5).template cast<T>();
  check_parity(x, random_labels(n, 8, rng), Options{2, 50, 0.5, epsilon}, 0);
}

TEMPLATE_TEST_CASE("cuda multi-similarity is deterministic; core and deferred loss", "[cuda][multi_similarity][core]",
                   float, double) {
  using T = TestType;
  namespace core = ml::cuda_core;
  const Index n = 200, d = 24;
  const std::size_t bytes = core::multi_similarity_workspace_bytes<T>(n, d);
  CHECK(bytes >= (sizeof(T) + sizeof(double)) * static_cast<std::size_t>(n * n));
  T* no_loss = nullptr;
  CHECK(core::multi_similarity_forward_backward<T, int>(nullptr, bytes, {}, {}, T(2), T(50), T(0.5), T(0.1), {}, T(1),
                                                        no_loss, nullptr) == cudaErrorInvalidValue);
  if (skip_without_device()) return;
  std::mt19937_64 rng(47);
  const Matrix<T> x = (uniform_matrix<double>(n, d, rng) * 0.35).template cast<T>();
  check_deterministic_core(ml::MultiSimilarityLoss<T>(), x, random_labels(n, 12, rng), bytes,
                           [](void* workspace, std::size_t size, auto xv, auto lv, auto gv, T* loss, cudaStream_t s) {
                             return core::multi_similarity_forward_backward<T, std::int64_t>(
                                 workspace, size, xv, lv, T(2), T(50), T(0.5), T(0.1), gv, T(1), loss, s);
                           });
}

TEST_CASE("cuda multi-similarity rejects bad input before touching the device", "[cuda][multi_similarity][errors]") {
  // Host maps: the checks run before anything is enqueued, so no device is needed.
  std::mt19937_64 rng(49);
  const Matrix<float> x = uniform_matrix<float>(4, 3, rng);
  const Eigen::VectorXi labels = (Eigen::VectorXi(4) << 0, 0, 1, 1).finished();
  auto message_of = [&](ml::MultiSimilarityLoss<float>& loss, Matrix<float>& g) {
    std::string message = "no exception";
    try {
      loss.forward_backward(ml::cuda, x, labels, g);
    } catch (const ml::invalid_argument& e) {
      message = e.what();
    }
    return message;
  };
  ml::MultiSimilarityLoss<float> loss;
  SECTION("a gradient of the wrong shape") {
    Matrix<float> g = Matrix<float>::Constant(4, 2, 7.0f);
    const std::string message = message_of(loss, g);
    CAPTURE(message);
    CHECK(message.find("metricloss::MultiSimilarityLoss<float>::forward_backward") != std::string::npos);
    CHECK(message.find("'grad_x'") != std::string::npos);
    CHECK((g.array() == 7.0f).all());
  }
  SECTION("alpha not > 0") {
    loss.alpha = 0.0f;
    Matrix<float> g = Matrix<float>::Constant(4, 3, 7.0f);
    const std::string message = message_of(loss, g);
    CAPTURE(message);
    CHECK(message.find("'alpha'") != std::string::npos);
    CHECK((g.array() == 7.0f).all());
  }
}
