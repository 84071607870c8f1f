// ContrastiveLoss on CUDA: parity with the scalar path (float and double, both forms, both
// similarity sources, sizes off multiples of 32, N = 1, strided maps, every layout), finite
// differences in double, gradient subsets, determinism, streams and the deferred loss, the
// large-offset float case, the noexcept core, and bad input (checked before any device work,
// so those cases run without a GPU too).
#include "device.cuh"

#include <cmath>
#include <cstring>
#include <limits>

using namespace mltest;
using ml::ContrastiveForm;

namespace {

std::vector<float> random_sim(Index n, std::mt19937_64& rng) {
  std::bernoulli_distribution coin(0.4);
  std::vector<float> s(static_cast<std::size_t>(n));
  for (auto& v : s) v = coin(rng) ? 1.0f : 0.0f;
  return s;
}

const char* form_name(ContrastiveForm form) {
  return form == ContrastiveForm::hadsell ? "hadsell" : "legacy";
}

}  // namespace

TEMPLATE_TEST_CASE("cuda contrastive agrees with scalar over sizes, strides and layouts",
                   "[cuda][contrastive][parity]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  // D covers the three layouts (<= 32: 8 lanes, <= 1024: warp, else block) and their edges.
  const Index d = GENERATE(1, 3, 31, 32, 33, 128, 1000, 1024, 1025, 3000);
  const Index n = GENERATE(1, 7, 300);
  const Index pad = GENERATE(0, 5);
  const auto form = GENERATE(ContrastiveForm::hadsell, ContrastiveForm::legacy);
  const bool labels_overload = GENERATE(false, true);
  const std::uint64_t seed = 5000u + static_cast<std::uint64_t>(d * 7 + n);
  CAPTURE(d, n, pad, form_name(form), labels_overload, seed);
  std::mt19937_64 rng(seed);
  const Matrix<T> a = uniform_matrix<T>(n, d, rng), b = uniform_matrix<T>(n, d, rng);
  const std::vector<float> sim = random_sim(n, rng);
  std::vector<std::int64_t> labels_a(static_cast<std::size_t>(n));
  std::vector<float> labels_b(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < labels_a.size(); ++i) {
    labels_a[i] = static_cast<std::int64_t>(i % 5);
    labels_b[i] = sim[i] != 0.0f ? static_cast<float>(i % 5) : 7.0f;
  }
  const Eigen::Map<const Eigen::VectorXf> host_sim(sim.data(), n);
  ml::ContrastiveLoss<T> loss(static_cast<T>(std::sqrt(static_cast<double>(d)) * 0.8), form);
  const T sentinel = T(-12345);
  const T top_diff = T(0.75);

  Strided<T> ga_scalar(Matrix<T>::Zero(n, d), pad, sentinel), gb_scalar = ga_scalar;
  const T scalar_value = loss.forward_backward(ml::scalar, a, b, host_sim, ga_scalar.map(),
                                               gb_scalar.map(), top_diff);

  DeviceStrided<T> da(a, pad, sentinel), db(b, pad, sentinel);
  DeviceStrided<T> dga(Matrix<T>::Zero(n, d), pad, sentinel), dgb(Matrix<T>::Zero(n, d), pad, sentinel);
  const DeviceVectorOf<float> dsim(sim);
  const DeviceVectorOf<std::int64_t> dla(labels_a);
  const DeviceVectorOf<float> dlb(labels_b);
  const T cuda_value =
      labels_overload
          ? loss.forward_backward(ml::cuda, da.cmap(), db.cmap(), dla.map(), dlb.map(), dga.map(),
                                  dgb.map(), top_diff)
          : loss.forward_backward(ml::cuda, da.cmap(), db.cmap(), dsim.map(), dga.map(), dgb.map(),
                                  top_diff);
  CHECK(relatively_close(cuda_value, scalar_value, Tolerance<T>::loss, 1e-12));
  const Strided<T> ga = dga.host(), gb = dgb.host();
  CHECK(ml::testing::compare_gradients(ga.cmap(), ga_scalar.map()).relative(1e-30) <= Tolerance<T>::gradient);
  CHECK(ml::testing::compare_gradients(gb.cmap(), gb_scalar.map()).relative(1e-30) <= Tolerance<T>::gradient);
  CHECK(ga.padding_is(sentinel));
  CHECK(gb.padding_is(sentinel));
  CHECK(loss.forward(ml::cuda, da.cmap(), db.cmap(), dsim.map()) == cuda_value);
}

TEST_CASE("cuda contrastive gradients match finite differences", "[cuda][contrastive][gradcheck]") {
  if (skip_without_device()) return;
  const Index d = GENERATE(1, 5, 40, 1100);
  const auto form = GENERATE(ContrastiveForm::hadsell, ContrastiveForm::legacy);
  CAPTURE(d, form_name(form));
  std::mt19937_64 rng(77);
  const Index n = 5;
  Matrix<double> a = uniform_matrix<double>(n, d, rng);
  const Matrix<double> b = uniform_matrix<double>(n, d, rng);
  const double margin = std::sqrt(static_cast<double>(d)) * 0.9;
  // Away from the kinks d = margin, d^2 = margin and d = 0 by more than the step.
  for (Index i = 0; i < n; ++i)
    for (int attempt = 0; attempt < 100; ++attempt) {
      const double dist = (a.row(i) - b.row(i)).norm();
      if (std::abs(dist - margin) > 1e-3 && std::abs(dist * dist - margin) > 1e-3 && dist > 1e-3) break;
      a.row(i) *= 1.1;
    }
  const std::vector<float> sim = {1.0f, 0.0f, 0.0f, 1.0f, 0.0f};
  const DeviceVectorOf<float> dsim(sim);
  ml::ContrastiveLoss<double> loss(margin, form);
  const double top_diff = 1.3;
  auto evaluate = [&](const Matrix<double>& x, const Matrix<double>& y) {
    const DeviceStrided<double> dx(x, 0, 0.0), dy(y, 0, 0.0);
    return loss.forward(ml::cuda, dx.cmap(), dy.cmap(), dsim.map());
  };
  const DeviceStrided<double> da(a, 0, 0.0), db(b, 0, 0.0);
  DeviceStrided<double> dga(Matrix<double>::Zero(n, d), 0, 0.0), dgb(Matrix<double>::Zero(n, d), 0, 0.0);
  loss.forward_backward(ml::cuda, da.cmap(), db.cmap(), dsim.map(), dga.map(), dgb.map(), top_diff);
  // Sampled coordinates keep D = 1100 cheap: a random direction checks every coordinate.
  const Matrix<double> v = ml::testing::random_direction(n, d, rng);
  const double slope_a = ml::testing::directional_derivative([&](const Matrix<double>& x) { return evaluate(x, b); }, a, v);
  const double slope_b = ml::testing::directional_derivative([&](const Matrix<double>& y) { return evaluate(a, y); }, b, v);
  const Matrix<double> ga = dga.dense(), gb = dgb.dense();
  CHECK(relatively_close(top_diff * slope_a, (ga.array() * v.array()).sum(), 1e-6, 1e-3));
  CHECK(relatively_close(top_diff * slope_b, (gb.array() * v.array()).sum(), 1e-6, 1e-3));
  if (d <= 40) {
    const Matrix<double> fa = top_diff * ml::testing::numerical_gradient(
                                             [&](const Matrix<double>& x) { return evaluate(x, b); }, a);
    CHECK(ml::testing::compare_gradients(ga, fa).relative() <= Tolerance<double>::finite_difference);
  }
}

TEMPLATE_TEST_CASE("cuda contrastive computes only the gradients asked for, deterministically",
                   "[cuda][contrastive]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  std::mt19937_64 rng(21);
  const Index n = 1000, d = 65;
  const DeviceStrided<T> da(uniform_matrix<T>(n, d, rng), 0, T(0)), db(uniform_matrix<T>(n, d, rng), 0, T(0));
  const DeviceVectorOf<float> dsim(random_sim(n, rng));
  ml::ContrastiveLoss<T> loss(T(8));
  DeviceStrided<T> dga(Matrix<T>::Zero(n, d), 0, T(0)), dgb(Matrix<T>::Zero(n, d), 0, T(0));
  const T full = loss.forward_backward(ml::cuda, da.cmap(), db.cmap(), dsim.map(), dga.map(), dgb.map());
  const Matrix<T> ga = dga.dense(), gb = dgb.dense();
  DeviceStrided<T> only(Matrix<T>::Constant(n, d, T(7)), 0, T(0));
  CHECK(loss.forward_backward(ml::cuda, da.cmap(), db.cmap(), dsim.map(), only.map(), ml::skip) == full);
  CHECK(only.dense() == ga);
  CHECK(loss.forward_backward(ml::cuda, da.cmap(), db.cmap(), dsim.map(), ml::skip, only.map()) == full);
  CHECK(only.dense() == gb);
  // Bitwise repeatable, including through a second stream and the deferred loss.
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceBuffer<T> device_loss(1);
  const T deferred = loss.forward_backward(ml::cuda.on(stream).loss_to(device_loss.data()),
                                           da.cmap(), db.cmap(), dsim.map(), only.map(), ml::skip);
  CHECK(std::isnan(deferred));
  check_cuda(cudaStreamSynchronize(stream));
  const T stored = device_loss.download()[0];
  CHECK(std::memcmp(&stored, &full, sizeof(T)) == 0);
  CHECK(only.dense() == ga);
  const T again = loss.forward_backward(ml::cuda.on(stream), da.cmap(), db.cmap(), dsim.map(), dga.map(), ml::skip);
  CHECK(std::memcmp(&again, &full, sizeof(T)) == 0);
  CHECK(dga.dense() == ga);
  check_cuda(cudaStreamDestroy(stream));
}

TEST_CASE("cuda contrastive in float is accurate at a large common offset", "[cuda][contrastive][numerics]") {
  if (skip_without_device()) return;
  const auto form = GENERATE(ContrastiveForm::hadsell, ContrastiveForm::legacy);
  std::mt19937_64 rng(31);
  const Index n = 200, d = 128;
  const Matrix<float> a = uniform_matrix<float>(n, d, rng, 99.95, 100.05);
  const Matrix<float> b = uniform_matrix<float>(n, d, rng, 99.95, 100.05);
  const std::vector<float> sim = random_sim(n, rng);
  const Eigen::Map<const Eigen::VectorXf> host_sim(sim.data(), n);
  // The exact reference: the double path on the same rounded inputs.
  ml::ContrastiveLoss<double> reference_loss(0.45, form);
  Matrix<double> ra(n, d), rb(n, d);
  const double reference = reference_loss.forward_backward(ml::scalar, a.cast<double>().eval(),
                                                           b.cast<double>().eval(), host_sim, ra, rb);
  ml::ContrastiveLoss<float> loss(0.45f, form);
  const DeviceStrided<float> da(a, 0, 0.0f), db(b, 0, 0.0f);
  const DeviceVectorOf<float> dsim(sim);
  DeviceStrided<float> dga(Matrix<float>::Zero(n, d), 0, 0.0f);
  const float value = loss.forward_backward(ml::cuda, da.cmap(), db.cmap(), dsim.map(), dga.map(), ml::skip);
  CHECK(relatively_close(value, reference, Tolerance<float>::loss));
  CHECK(ml::testing::compare_gradients(dga.dense(), ra).relative() <= Tolerance<float>::gradient);
}

TEMPLATE_TEST_CASE("cuda contrastive core works in caller-owned workspace", "[cuda][contrastive][core]",
                   float, double) {
  using T = TestType;
  namespace core = ml::cuda_core;
  const core::DeviceMatrix<const T> none{};
  const core::DeviceVector<int> no_labels{};
  T* no_loss = nullptr;
  // Argument errors are reported before any launch: these run without a device.
  const std::size_t bytes = core::contrastive_workspace_bytes<T>(100, 64);
  CHECK(bytes >= sizeof(double));
  CHECK(core::contrastive_workspace_bytes<T>(1, 1) >= sizeof(double));
  CHECK(core::contrastive_forward_backward<T>(nullptr, bytes, none, none, no_labels, T(1),
                                              ContrastiveForm::hadsell, {}, {}, T(1), no_loss,
                                              nullptr) == cudaErrorInvalidValue);
  if (skip_without_device()) return;
  std::mt19937_64 rng(61);
  const Index n = 100, d = 64;
  const Matrix<T> a = uniform_matrix<T>(n, d, rng), b = uniform_matrix<T>(n, d, rng);
  const std::vector<float> sim = random_sim(n, rng);
  ml::ContrastiveLoss<T> loss(T(4));
  Matrix<T> ga_scalar(n, d);
  const T scalar_value = loss.forward_backward(ml::scalar, a, b, Eigen::Map<const Eigen::VectorXf>(sim.data(), n),
                                               ga_scalar, ml::skip);
  const DeviceStrided<T> da(a, 0, T(0)), db(b, 0, T(0));
  DeviceStrided<T> dga(Matrix<T>::Zero(n, d), 0, T(0));
  const DeviceVectorOf<float> dsim(sim);
  DeviceBuffer<char> workspace(bytes);
  DeviceBuffer<T> device_loss(1);
  const core::DeviceMatrix<const T> av{da.buffer.data(), n, d, d}, bv{db.buffer.data(), n, d, d};
  const core::DeviceMatrix<T> gav{dga.buffer.data(), n, d, d};
  const core::DeviceVector<float> sv{dsim.buffer.data(), n, 1};
  CHECK(core::contrastive_forward_backward<T>(workspace.data(), bytes - 1, av, bv, sv, T(4),
                                              ContrastiveForm::hadsell, gav, {}, T(1),
                                              device_loss.data(), nullptr) == cudaErrorInvalidValue);
  CHECK(core::contrastive_forward_backward<T>(workspace.data(), bytes, av, bv, sv, T(4),
                                              ContrastiveForm::hadsell, gav, {}, T(1),
                                              device_loss.data(), nullptr) == cudaSuccess);
  check_cuda(cudaDeviceSynchronize());
  CHECK(relatively_close(device_loss.download()[0], scalar_value, Tolerance<T>::loss));
  CHECK(ml::testing::compare_gradients(dga.dense(), ga_scalar).relative() <= Tolerance<T>::gradient);
}

TEST_CASE("cuda contrastive rejects bad input before touching the device", "[cuda][contrastive][errors]") {
  // Validation happens on the host before anything is enqueued, so plain host memory serves
  // as stand-in pointers and this runs without a device.
  std::mt19937_64 rng(41);
  Matrix<float> a = uniform_matrix<float>(4, 3, rng), b = uniform_matrix<float>(4, 3, rng);
  Eigen::VectorXf sim = Eigen::VectorXf::Ones(4);
  Matrix<float> ga(4, 3), gb(4, 3);
  ml::ContrastiveLoss<float> loss;
  const std::string fn = "metricloss::ContrastiveLoss<float>::forward_backward";
  auto message_of = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const ml::invalid_argument& e) {
      return e.what();
    }
    return "no exception";
  };
  std::string m = message_of([&] { loss.forward_backward(ml::cuda, a, uniform_matrix<float>(4, 2, rng), sim, ga, gb); });
  CAPTURE(m);
  CHECK(m.find(fn) != std::string::npos);
  CHECK(m.find("4x2") != std::string::npos);
  m = message_of([&] { loss.forward_backward(ml::cuda, a, b, sim, ga, ga); });
  CHECK(m.find("overlaps") != std::string::npos);
  ml::ContrastiveLoss<float> bad(-1.0f);
  m = message_of([&] { bad.forward(ml::cuda, a, b, sim); });
  CHECK(m.find("'margin'") != std::string::npos);
  float* null_loss = nullptr;
  m = message_of([&] { loss.forward_backward(ml::cuda.loss_to(null_loss), a, b, sim, ga, gb); });
  CHECK(m.find("loss_to") != std::string::npos);
}

TEST_CASE("cuda_error carries the CUDA error and its string", "[cuda][errors]") {
  const ml::cuda_error error(cudaErrorInvalidValue, "where");
  CHECK(error.code() == cudaErrorInvalidValue);
  const std::string message = error.what();
  CHECK(message.find("where") != std::string::npos);
  CHECK(message.find("cudaErrorInvalidValue") != std::string::npos);
  CHECK(dynamic_cast<const std::runtime_error*>(&error) != nullptr);
}
