// LiftedStructureLoss on CUDA: parity with the scalar path (float and double; N = 1 and
// sizes off the 64-wide tiles; strided maps; label types), finite differences in double,
// the large-offset float case, degenerate batches (one class, singletons, coincident
// points), NaN propagation, determinism and the deferred loss, the noexcept core.
#include "device.cuh"

#include <cmath>
#include <cstring>
#include <limits>

using namespace mltest;

namespace {

/// Labels of `classes` classes, as float (Caffe's convention) and int64.
std::vector<float> labels_of(Index n, int classes, std::mt19937_64& rng) {
  std::vector<float> labels(static_cast<std::size_t>(n));
  const auto drawn = random_labels(n, classes, rng);
  for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<float>(drawn[i]);
  return labels;
}

/// Runs the CUDA path and the scalar path on the same data; checks loss and gradient.
template <class T, class L>
void check_parity(const Matrix<T>& x, const std::vector<L>& labels, T margin, Index pad) {
  const Index n = x.rows(), d = x.cols();
  const Eigen::Map<const Eigen::Matrix<L, Eigen::Dynamic, 1>> host_labels(labels.data(), n);
  ml::LiftedStructureLoss<T> loss(margin);
  const T sentinel = T(-12345), top_diff = T(0.9);
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

TEMPLATE_TEST_CASE("cuda lifted structure agrees with scalar", "[cuda][lifted][parity]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  const Index n = GENERATE(1, 2, 7, 64, 65, 130);
  const Index d = GENERATE(1, 5, 16, 17, 129);
  const int classes = GENERATE(2, 5);
  const Index pad = GENERATE(0, 3);
  const std::uint64_t seed = 9000u + static_cast<std::uint64_t>(n * 31 + d);
  CAPTURE(n, d, classes, pad, seed);
  std::mt19937_64 rng(seed);
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  const T margin = static_cast<T>(std::sqrt(static_cast<double>(d)) * 0.5);
  check_parity(x, labels_of(n, classes, rng), margin, pad);
  check_parity(x, random_labels(n, classes, rng), margin, pad);
}

TEMPLATE_TEST_CASE("cuda lifted structure handles degenerate batches", "[cuda][lifted][edge]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  std::mt19937_64 rng(71);
  const Index n = 40, d = 8;
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  SECTION("one class: no negatives, L = 0") {
    check_parity(x, std::vector<float>(static_cast<std::size_t>(n), 3.0f), T(1), 0);
  }
  SECTION("singletons: no positive pairs, L = 0") {
    std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int32_t>(i);
    check_parity(x, labels, T(1), 0);
  }
  SECTION("coincident points: zero distances give zero subgradients") {
    Matrix<T> y = x;
    for (Index i = 0; i < n; i += 2) y.row(i + 1) = y.row(i);
    std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int32_t>(i % 3);
    check_parity(y, labels, T(2), 0);
  }
  SECTION("NaN in the data propagates") {
    Matrix<T> y = x;
    y(3, 4) = std::numeric_limits<T>::quiet_NaN();
    const DeviceStrided<T> dy(y, 0, T(0));
    DeviceStrided<T> dg(Matrix<T>::Zero(n, d), 0, T(0));
    const DeviceVectorOf<float> dl(labels_of(n, 3, rng));
    ml::LiftedStructureLoss<T> loss;
    CHECK(std::isnan(loss.forward_backward(ml::cuda, dy.cmap(), dl.map(), dg.map())));
    CHECK(dg.dense().array().isNaN().all());
  }
}

TEMPLATE_TEST_CASE("cuda lifted structure is accurate for near-duplicate points", "[cuda][lifted][numerics]",
                   float, double) {
  // Near pairs carry weights ~ 1/D: a product forming S_ik x_i - S_ik x_k would lose every
  // digit of their gradient; they must be applied by differences. The scalar path (all in
  // double on the same inputs) is the reference.
  if (skip_without_device()) return;
  using T = TestType;
  const double gap = GENERATE(1e-2, 1e-4, 1e-6);
  const double offset = GENERATE(0.0, 100.0);
  CAPTURE(gap, offset);
  // Below ~100 ulp of the offset the nudged points round onto each other.
  if (gap < 100.0 * std::numeric_limits<T>::epsilon() * offset) return;
  std::mt19937_64 rng(81);
  const Index n = 64, d = 32;
  Matrix<T> x = uniform_matrix<T>(n, d, rng, offset - 1.0, offset + 1.0);
  const Matrix<T> nudge = uniform_matrix<T>(n, d, rng, -gap, gap);
  for (Index i = 5; i < n; i += 5) x.row(i) = x.row(i - 1) + nudge.row(i);
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int32_t>((i / 4) % 16);
  check_parity(x, labels, T(1), 0);
}

TEST_CASE("cuda lifted structure gradients match finite differences", "[cuda][lifted][gradcheck]") {
  if (skip_without_device()) return;
  const Index d = GENERATE(1, 6, 70);
  CAPTURE(d);
  std::mt19937_64 rng(81);
  const Index n = 9;
  const Matrix<double> x = uniform_matrix<double>(n, d, rng);
  std::vector<std::int64_t> labels = {0, 0, 1, 1, 1, 2, 2, 0, 3};
  const DeviceVectorOf<std::int64_t> dl(labels);
  ml::LiftedStructureLoss<double> loss(std::sqrt(static_cast<double>(d)));
  const double top_diff = 1.7;
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

TEST_CASE("cuda lifted structure in float is accurate at a large common offset", "[cuda][lifted][numerics]") {
  if (skip_without_device()) return;
  std::mt19937_64 rng(35);
  const Index n = 96, d = 128;
  const Matrix<float> x = uniform_matrix<float>(n, d, rng, 99.95, 100.05);
  const std::vector<float> labels = labels_of(n, 6, rng);
  const Eigen::Map<const Eigen::VectorXf> host_labels(labels.data(), n);
  ml::LiftedStructureLoss<double> reference_loss(0.5);
  Matrix<double> reference_grad(n, d);
  const double reference = reference_loss.forward_backward(ml::scalar, x.cast<double>().eval(), host_labels, reference_grad);
  ml::LiftedStructureLoss<float> loss(0.5f);
  const DeviceStrided<float> dx(x, 0, 0.0f);
  DeviceStrided<float> dg(Matrix<float>::Zero(n, d), 0, 0.0f);
  const DeviceVectorOf<float> dl(labels);
  const float value = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map());
  CHECK(relatively_close(value, reference, Tolerance<float>::loss));
  CHECK(ml::testing::compare_gradients(dg.dense(), reference_grad).relative() <= Tolerance<float>::gradient);
}

TEMPLATE_TEST_CASE("cuda lifted structure is deterministic; core and deferred loss", "[cuda][lifted][core]",
                   float, double) {
  using T = TestType;
  namespace core = ml::cuda_core;
  const Index n = 300, d = 40;
  const std::size_t bytes = core::lifted_structure_workspace_bytes<T>(n, d);
  CHECK(bytes >= sizeof(T) * static_cast<std::size_t>(n * n));
  T* no_loss = nullptr;
  CHECK(core::lifted_structure_forward_backward<T, int>(nullptr, bytes, {}, {}, T(1), {}, T(1), no_loss, nullptr) ==
        cudaErrorInvalidValue);
  if (skip_without_device()) return;
  std::mt19937_64 rng(73);
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  // The core in caller-owned workspace gives the same bits.
  check_deterministic_core(ml::LiftedStructureLoss<T>(T(3)), x, labels_of(n, 10, rng), bytes,
                           [](void* workspace, std::size_t size, auto xv, auto lv, auto gv, T* loss, cudaStream_t s) {
                             return core::lifted_structure_forward_backward<T, float>(workspace, size, xv, lv, T(3),
                                                                                      gv, T(1), loss, s);
                           });
}

TEST_CASE("cuda lifted structure rejects bad input before touching the device", "[cuda][lifted][errors]") {
  std::mt19937_64 rng(45);
  Matrix<float> x = uniform_matrix<float>(4, 3, rng), g(4, 3);
  Eigen::VectorXi labels = Eigen::VectorXi::Zero(5);
  ml::LiftedStructureLoss<float> loss;
  std::string message = "no exception";
  try {
    loss.forward_backward(ml::cuda, x, labels, g);
  } catch (const ml::invalid_argument& e) {
    message = e.what();
  }
  CAPTURE(message);
  CHECK(message.find("metricloss::LiftedStructureLoss<float>::forward_backward") != std::string::npos);
  CHECK(message.find("'labels'") != std::string::npos);
}
