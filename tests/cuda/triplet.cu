// TripletLoss on CUDA: parity with the scalar path (float and double, both distances, sizes
// off multiples of 32, N = 1, strided maps, every row layout), finite differences in double,
// gradient subsets, determinism and the deferred loss, the large-offset float case, the
// noexcept core, and bad input (checked on the host, so those run without a GPU).
#include "device.cuh"

#include <cmath>
#include <cstring>

using namespace mltest;
using ml::Distance;

namespace {
const char* distance_name(Distance distance) {
  return distance == Distance::euclidean ? "euclidean" : "squared_euclidean";
}
}  // namespace

TEMPLATE_TEST_CASE("cuda triplet agrees with scalar over sizes, strides and layouts",
                   "[cuda][triplet][parity]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  const Index d = GENERATE(1, 3, 31, 33, 128, 1000, 1025, 3000);
  const Index n = GENERATE(1, 7, 300);
  const Index pad = GENERATE(0, 3);
  const auto distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const std::uint64_t seed = 7000u + static_cast<std::uint64_t>(d * 7 + n);
  CAPTURE(d, n, pad, distance_name(distance), seed);
  std::mt19937_64 rng(seed);
  const Matrix<T> a = uniform_matrix<T>(n, d, rng), p = uniform_matrix<T>(n, d, rng),
                  q = uniform_matrix<T>(n, d, rng);
  // A margin of the order of the distances: some triplets active, some not.
  const double scale = distance == Distance::euclidean ? std::sqrt(static_cast<double>(d)) : static_cast<double>(d);
  ml::TripletLoss<T> loss(static_cast<T>(0.3 * scale), distance);
  const T sentinel = T(-12345), top_diff = T(1.5);
  Strided<T> ga_s(Matrix<T>::Zero(n, d), pad, sentinel), gp_s = ga_s, gn_s = ga_s;
  const T scalar_value = loss.forward_backward(ml::scalar, a, p, q, ga_s.map(), gp_s.map(), gn_s.map(), top_diff);
  const DeviceStrided<T> da(a, pad, sentinel), dp(p, pad, sentinel), dn(q, pad, sentinel);
  DeviceStrided<T> dga(Matrix<T>::Zero(n, d), pad, sentinel), dgp(Matrix<T>::Zero(n, d), pad, sentinel),
      dgn(Matrix<T>::Zero(n, d), pad, sentinel);
  const T cuda_value = loss.forward_backward(ml::cuda, da.cmap(), dp.cmap(), dn.cmap(), dga.map(),
                                             dgp.map(), dgn.map(), top_diff);
  CHECK(relatively_close(cuda_value, scalar_value, Tolerance<T>::loss, 1e-12));
  const Strided<T> ga = dga.host(), gp = dgp.host(), gn = dgn.host();
  CHECK(ml::testing::compare_gradients(ga.cmap(), ga_s.map()).relative(1e-30) <= Tolerance<T>::gradient);
  CHECK(ml::testing::compare_gradients(gp.cmap(), gp_s.map()).relative(1e-30) <= Tolerance<T>::gradient);
  CHECK(ml::testing::compare_gradients(gn.cmap(), gn_s.map()).relative(1e-30) <= Tolerance<T>::gradient);
  CHECK(ga.padding_is(sentinel));
  CHECK(gp.padding_is(sentinel));
  CHECK(gn.padding_is(sentinel));
  CHECK(loss.forward(ml::cuda, da.cmap(), dp.cmap(), dn.cmap()) == cuda_value);
}

TEST_CASE("cuda triplet gradients match finite differences", "[cuda][triplet][gradcheck]") {
  if (skip_without_device()) return;
  const Index d = GENERATE(1, 6, 45);
  const auto distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  CAPTURE(d, distance_name(distance));
  std::mt19937_64 rng(91);
  const Index n = 6;
  const Matrix<double> a = uniform_matrix<double>(n, d, rng), p = uniform_matrix<double>(n, d, rng),
                       q = uniform_matrix<double>(n, d, rng);
  ml::TripletLoss<double> loss(0.1, distance);
  // Keep every hinge argument away from 0 by more than the step: shift the margin.
  Matrix<double> ga(n, d), gp(n, d), gn(n, d);
  for (int attempt = 0; attempt < 50; ++attempt) {
    bool near_kink = false;
    for (Index i = 0; i < n; ++i) {
      const double qp = (a.row(i) - p.row(i)).squaredNorm(), qn = (a.row(i) - q.row(i)).squaredNorm();
      const double x = distance == Distance::euclidean ? std::sqrt(qp) - std::sqrt(qn) : qp - qn;
      near_kink = near_kink || std::abs(x + loss.margin) < 1e-3;
    }
    if (!near_kink) break;
    loss.margin += 0.0137;
  }
  const DeviceStrided<double> da(a, 0, 0.0), dp(p, 0, 0.0), dn(q, 0, 0.0);
  DeviceStrided<double> dga(ga, 0, 0.0), dgp(gp, 0, 0.0), dgn(gn, 0, 0.0);
  const double top_diff = 0.7;
  loss.forward_backward(ml::cuda, da.cmap(), dp.cmap(), dn.cmap(), dga.map(), dgp.map(), dgn.map(), top_diff);
  auto on_device = [&](const Matrix<double>& x, const Matrix<double>& y, const Matrix<double>& z) {
    const DeviceStrided<double> dx(x, 0, 0.0), dy(y, 0, 0.0), dz(z, 0, 0.0);
    return loss.forward(ml::cuda, dx.cmap(), dy.cmap(), dz.cmap());
  };
  const Matrix<double> fa = top_diff * ml::testing::numerical_gradient([&](const Matrix<double>& x) { return on_device(x, p, q); }, a);
  const Matrix<double> fp = top_diff * ml::testing::numerical_gradient([&](const Matrix<double>& y) { return on_device(a, y, q); }, p);
  const Matrix<double> fn = top_diff * ml::testing::numerical_gradient([&](const Matrix<double>& z) { return on_device(a, p, z); }, q);
  CHECK(ml::testing::compare_gradients(dga.dense(), fa).relative() <= Tolerance<double>::finite_difference);
  CHECK(ml::testing::compare_gradients(dgp.dense(), fp).relative() <= Tolerance<double>::finite_difference);
  CHECK(ml::testing::compare_gradients(dgn.dense(), fn).relative() <= Tolerance<double>::finite_difference);
}

TEMPLATE_TEST_CASE("cuda triplet computes only the gradients asked for, deterministically",
                   "[cuda][triplet]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  std::mt19937_64 rng(23);
  const Index n = 777, d = 100;
  const DeviceStrided<T> da(uniform_matrix<T>(n, d, rng), 0, T(0)), dp(uniform_matrix<T>(n, d, rng), 0, T(0)),
      dn(uniform_matrix<T>(n, d, rng), 0, T(0));
  ml::TripletLoss<T> loss(T(5));
  DeviceStrided<T> dga(Matrix<T>::Zero(n, d), 0, T(0)), dgp = DeviceStrided<T>(Matrix<T>::Zero(n, d), 0, T(0)),
      dgn(Matrix<T>::Zero(n, d), 0, T(0));
  const T full = loss.forward_backward(ml::cuda, da.cmap(), dp.cmap(), dn.cmap(), dga.map(), dgp.map(), dgn.map());
  const Matrix<T> ga = dga.dense(), gp = dgp.dense(), gn = dgn.dense();
  DeviceStrided<T> only(Matrix<T>::Constant(n, d, T(7)), 0, T(0));
  CHECK(loss.forward_backward(ml::cuda, da.cmap(), dp.cmap(), dn.cmap(), ml::skip, only.map(), ml::skip) == full);
  CHECK(only.dense() == gp);
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceBuffer<T> device_loss(1);
  CHECK(std::isnan(loss.forward_backward(ml::cuda.on(stream).loss_to(device_loss.data()), da.cmap(),
                                         dp.cmap(), dn.cmap(), ml::skip, ml::skip, only.map())));
  check_cuda(cudaStreamSynchronize(stream));
  const T stored = device_loss.download()[0];
  CHECK(std::memcmp(&stored, &full, sizeof(T)) == 0);
  CHECK(only.dense() == gn);
  const T again = loss.forward_backward(ml::cuda.on(stream), da.cmap(), dp.cmap(), dn.cmap(), dga.map(), ml::skip, ml::skip);
  CHECK(std::memcmp(&again, &full, sizeof(T)) == 0);
  CHECK(dga.dense() == ga);
  check_cuda(cudaStreamDestroy(stream));
}

TEST_CASE("cuda triplet in float is accurate at a large common offset", "[cuda][triplet][numerics]") {
  if (skip_without_device()) return;
  const auto distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  std::mt19937_64 rng(33);
  const Index n = 200, d = 128;
  const Matrix<float> a = uniform_matrix<float>(n, d, rng, 99.95, 100.05),
                      p = uniform_matrix<float>(n, d, rng, 99.95, 100.05),
                      q = uniform_matrix<float>(n, d, rng, 99.95, 100.05);
  const float margin = distance == Distance::euclidean ? 0.05f : 0.02f;
  ml::TripletLoss<double> reference_loss(margin, distance);
  Matrix<double> ra(n, d);
  const double reference = reference_loss.forward_backward(ml::scalar, a.cast<double>().eval(), p.cast<double>().eval(),
                                                           q.cast<double>().eval(), ra, ml::skip, ml::skip);
  ml::TripletLoss<float> loss(margin, distance);
  const DeviceStrided<float> da(a, 0, 0.0f), dp(p, 0, 0.0f), dn(q, 0, 0.0f);
  DeviceStrided<float> dga(Matrix<float>::Zero(n, d), 0, 0.0f);
  const float value = loss.forward_backward(ml::cuda, da.cmap(), dp.cmap(), dn.cmap(), dga.map(), ml::skip, ml::skip);
  CHECK(relatively_close(value, reference, Tolerance<float>::loss));
  CHECK(ml::testing::compare_gradients(dga.dense(), ra).relative() <= Tolerance<float>::gradient);
}

TEMPLATE_TEST_CASE("cuda triplet core works in caller-owned workspace", "[cuda][triplet][core]", float, double) {
  using T = TestType;
  namespace core = ml::cuda_core;
  const std::size_t bytes = core::triplet_workspace_bytes<T>(50, 2000);
  CHECK(bytes >= sizeof(double));
  T* no_loss = nullptr;
  CHECK(core::triplet_forward_backward<T>(nullptr, bytes, {}, {}, {}, T(1), Distance::euclidean, {}, {}, {},
                                          T(1), no_loss, nullptr) == cudaErrorInvalidValue);
  if (skip_without_device()) return;
  std::mt19937_64 rng(63);
  const Index n = 50, d = 2000;
  const Matrix<T> a = uniform_matrix<T>(n, d, rng), p = uniform_matrix<T>(n, d, rng), q = uniform_matrix<T>(n, d, rng);
  ml::TripletLoss<T> loss(T(30), Distance::euclidean);
  Matrix<T> gn_scalar(n, d);
  const T scalar_value = loss.forward_backward(ml::scalar, a, p, q, ml::skip, ml::skip, gn_scalar);
  const DeviceStrided<T> da(a, 0, T(0)), dp(p, 0, T(0)), dn(q, 0, T(0));
  DeviceStrided<T> dgn(Matrix<T>::Zero(n, d), 0, T(0));
  DeviceBuffer<char> workspace(bytes);
  DeviceBuffer<T> device_loss(1);
  const core::DeviceMatrix<const T> av{da.buffer.data(), n, d, d}, pv{dp.buffer.data(), n, d, d},
      nv{dn.buffer.data(), n, d, d};
  const core::DeviceMatrix<T> gnv{dgn.buffer.data(), n, d, d};
  CHECK(core::triplet_forward_backward<T>(workspace.data(), bytes, av, pv, nv, T(30), Distance::euclidean, {}, {},
                                          gnv, T(1), device_loss.data(), nullptr) == cudaSuccess);
  check_cuda(cudaDeviceSynchronize());
  CHECK(relatively_close(device_loss.download()[0], scalar_value, Tolerance<T>::loss));
  CHECK(ml::testing::compare_gradients(dgn.dense(), gn_scalar).relative() <= Tolerance<T>::gradient);
}

TEST_CASE("cuda triplet rejects bad input before touching the device", "[cuda][triplet][errors]") {
  std::mt19937_64 rng(43);
  Matrix<float> a = uniform_matrix<float>(4, 3, rng), p = uniform_matrix<float>(4, 3, rng);
  Matrix<float> ga(4, 3);
  ml::TripletLoss<float> loss;
  std::string message = "no exception";
  try {
    loss.forward_backward(ml::cuda, a, p, uniform_matrix<float>(5, 3, rng), ga, ml::skip, ml::skip);
  } catch (const ml::invalid_argument& e) {
    message = e.what();
  }
  CAPTURE(message);
  CHECK(message.find("metricloss::TripletLoss<float>::forward_backward") != std::string::npos);
  CHECK(message.find("'negative'") != std::string::npos);
}
