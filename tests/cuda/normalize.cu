// normalize = true on CUDA (backend/cuda/normalize.cuh), for every batch loss and option set
// of the host tests (normalize_cases.hpp), float and double: against the scalar path with
// normalize = true and against normalize = false on rows normalised and gradients chained by
// hand in double; rows of scales 1e-3 .. 1e3, N = 1, D = 1, D over a block, strided maps;
// double rows beyond the square range; a zero row (the value-returning call throws with
// nothing written, loss_to leaves NaN and an untouched gradient); a non-finite row gives
// NaN; determinism with the deferred loss and the cuda_core sequence
// normalize_rows -> core -> normalize_chain.
#include "device.cuh"
#include "../normalize_cases.hpp"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

using namespace mltest;
using namespace mltest::normalize_cases;

namespace {

/// Rows of x scaled by 10^u, u uniform in [-3, 3]: normalize must not see the scales.
template <class T>
Matrix<T> scaled_rows(const Matrix<double>& x, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(-3.0, 3.0);
  Matrix<double> out = x;
  for (Index i = 0; i < x.rows(); ++i) out.row(i) *= std::pow(10.0, u(rng));
  return out.template cast<T>();
}

/// One option on the device against scalar (both normalize = true) and against the loss of
/// the unit rows written by hand with the gradient chained by hand.
template <class T>
void check_parity(const Option& o, const Matrix<T>& x, const std::vector<std::int64_t>& labels, Index pad) {
  const Index n = x.rows(), d = x.cols();
  const Eigen::Map<const Labels> y(labels.data(), n);
  const T sentinel = T(-12345), top_diff = T(1.25);
  Strided<T> g_scalar(Matrix<T>::Zero(n, d), pad, sentinel);
  const DeviceStrided<T> dx(x, pad, sentinel);
  DeviceStrided<T> dg(Matrix<T>::Zero(n, d), pad, sentinel);
  const DeviceVectorOf<std::int64_t> dl(labels);
  const Matrix<T> ux = unit_rows(x);
  Matrix<T> gu = Matrix<T>::Zero(n, d);
  const T by_hand = with_loss<T>(o, false, [&](auto& loss) { return loss.forward_backward(ml::scalar, ux, y, gu, top_diff); });
  with_loss<T>(o, true, [&](auto& loss) {
    const T scalar_value = loss.forward_backward(ml::scalar, x, y, g_scalar.map(), top_diff);
    const T cuda_value = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map(), top_diff);
    CAPTURE(cuda_value, scalar_value, by_hand);
    CHECK(relatively_close(cuda_value, scalar_value, Tolerance<T>::loss, 1e-12));
    CHECK(relatively_close(cuda_value, by_hand, Tolerance<T>::loss, 1e-12));
    CHECK(loss.forward(ml::cuda, dx.cmap(), dl.map()) == cuda_value);
    return 0;
  });
  const Strided<T> g = dg.host();
  CHECK(g.padding_is(sentinel));
  CHECK(ml::testing::compare_gradients(g.cmap(), g_scalar.map()).relative(1e-30) <= Tolerance<T>::gradient);
  const Matrix<double> expected = chained(x, gu);
  CHECK(ml::testing::compare_gradients(g.cmap(), expected).relative(1e-30) <= Tolerance<T>::gradient);
}

}  // namespace

TEMPLATE_TEST_CASE("cuda normalize agrees with scalar normalize and with normalisation by hand",
                   "[cuda][normalize][parity]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  const Index n = GENERATE(1, 9, 64, 97);
  const Index d = GENERATE(1, 7, 130);
  const std::uint64_t seed = 1800 + static_cast<std::uint64_t>(n * 1000 + d);
  CAPTURE(n, d, seed);
  std::mt19937_64 rng(seed);
  const Matrix<T> x = scaled_rows<T>(uniform_matrix<double>(n, d, rng), rng);
  const std::vector<std::int64_t> labels = random_labels(n, 3, rng);
  for (const Option& o : every_option()) {
    CAPTURE(o.name());
    check_parity(o, x, labels, d == 7 ? 3 : 0);
  }
}

TEMPLATE_TEST_CASE("cuda normalize: a zero row throws with nothing written; loss_to gives NaN",
                   "[cuda][normalize][errors]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  const Index n = 5, d = 3;
  std::mt19937_64 rng(1806);
  Matrix<T> x = uniform_matrix<T>(n, d, rng);
  x.row(2).setZero();
  x(2, 1) = -T(0);  // a negative zero is zero too
  x.row(4).setZero();
  const Matrix<T> good = uniform_matrix<T>(n, d, rng);
  const std::vector<std::int64_t> labels{0, 1, 0, 1, 2};
  const DeviceStrided<T> dx(x, 2, T(5)), dgood(good, 0, T(0));
  const DeviceVectorOf<std::int64_t> dl(labels);
  const Matrix<T> sentinel = Matrix<T>::Constant(n, d, T(7));
  const std::string scalar = ml::detail::scalar_name<T>();
  for (const Option& o : every_option()) {
    CAPTURE(o.name());
    const std::string function = "metricloss::" + std::string(o.loss_name()) + "<" + scalar + ">::";
    DeviceStrided<T> dg(sentinel, 1, T(9));
    with_loss<T>(o, true, [&](auto& loss) {
      for (const bool gradient : {true, false}) {
        CAPTURE(gradient);
        std::string message;
        try {
          if (gradient)
            loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map());
          else
            loss.forward(ml::cuda, dx.cmap(), dl.map());
        } catch (const ml::invalid_argument& e) {
          message = e.what();
        }
        CAPTURE(message);
        CHECK(message.find(function + (gradient ? "forward_backward" : "forward")) != std::string::npos);
        CHECK(message.find("argument 'x' has row 2 of norm 0") != std::string::npos);  // the lowest
        CHECK(message.find("'x' is 5x3") != std::string::npos);
        CHECK(message.find("normalize") != std::string::npos);
        CHECK(dg.dense() == sentinel);
        CHECK(dg.host().padding_is(T(9)));
      }
      // Deferred: NaN at d_loss, the gradient untouched.
      DeviceBuffer<T> device_loss(std::vector<T>{T(3)});
      CHECK(std::isnan(loss.forward_backward(ml::cuda.loss_to(device_loss.data()), dx.cmap(), dl.map(), dg.map())));
      check_cuda(cudaDeviceSynchronize());
      CHECK(std::isnan(device_loss.download()[0]));
      CHECK(dg.dense() == sentinel);
      // The functor is unharmed: a good batch runs, then the zero row is caught again.
      DeviceStrided<T> dg_good(Matrix<T>::Zero(n, d), 0, T(0));
      CHECK(std::isfinite(loss.forward_backward(ml::cuda, dgood.cmap(), dl.map(), dg_good.map())));
      CHECK_THROWS_AS(loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map()), ml::invalid_argument);
      return 0;
    });
    // Without normalize a zero row is an ordinary row.
    with_loss<T>(o, false, [&](auto& loss) {
      CHECK(std::isfinite(loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map())));
      return 0;
    });
  }
}

TEMPLATE_TEST_CASE("cuda normalize: a non-finite row gives a NaN loss and NaN gradients, no throw",
                   "[cuda][normalize]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  const Index n = 6, d = 4;
  std::mt19937_64 rng(1807);
  const std::vector<std::int64_t> labels{0, 1, 0, 1, 2, 2};
  const DeviceVectorOf<std::int64_t> dl(labels);
  for (const T bad : {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()}) {
    CAPTURE(bad);
    Matrix<T> x = uniform_matrix<T>(n, d, rng);
    x(3, 2) = bad;
    const DeviceStrided<T> dx(x, 0, T(0));
    for (const Option& o : every_option()) {
      CAPTURE(o.name());
      with_loss<T>(o, true, [&](auto& loss) {
        DeviceStrided<T> dg(Matrix<T>::Zero(n, d), 0, T(0));
        T value = T(0);
        CHECK_NOTHROW(value = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map()));
        CHECK(std::isnan(value));
        CHECK(dg.dense().array().isNaN().all());
        return 0;
      });
    }
  }
}

TEST_CASE("cuda normalize: double rows beyond the square range are normalised exactly", "[cuda][normalize]") {
  if (skip_without_device()) return;
  const Index n = 8, d = 5;
  std::mt19937_64 rng(1808);
  const Matrix<double> x = uniform_matrix<double>(n, d, rng);
  const std::vector<std::int64_t> labels{0, 1, 0, 1, 2, 2, 0, 1};
  const DeviceVectorOf<std::int64_t> dl(labels);
  const DeviceStrided<double> dx(x, 0, 0.0);
  for (const Option& o : every_option()) {
    CAPTURE(o.name());
    with_loss<double>(o, true, [&](auto& loss) {
      DeviceStrided<double> dg(Matrix<double>::Zero(n, d), 0, 0.0);
      const double value = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map());
      const Matrix<double> g = dg.dense();
      for (const double scale : {1e200, 1e-200}) {
        CAPTURE(scale);
        const DeviceStrided<double> ds(Matrix<double>(x * scale), 0, 0.0);
        DeviceStrided<double> dgs(Matrix<double>::Zero(n, d), 0, 0.0);
        const double scaled = loss.forward_backward(ml::cuda, ds.cmap(), dl.map(), dgs.map());
        CHECK(relatively_close(scaled, value, 1e-12, 1e-12));
        // dL/dx scales as 1/scale.
        CHECK(ml::testing::compare_gradients(Matrix<double>(dgs.dense() * scale), g).relative(1e-30) <= 1e-12);
      }
      return 0;
    });
  }
}

TEMPLATE_TEST_CASE("cuda normalize is deterministic, deferred and through cuda_core",
                   "[cuda][normalize][determinism]", float, double) {
  using T = TestType;
  namespace core = ml::cuda_core;
  const Index n = 70, d = 33;
  const std::size_t norm_bytes = core::normalize_workspace_bytes<T>(n, d, true);
  CHECK(norm_bytes >= 2 * sizeof(T) * static_cast<std::size_t>(n * d));
  CHECK(core::normalize_workspace_bytes<T>(n, d, false) < norm_bytes);
  {  // Bad arguments are reported, not enqueued: no device needed.
    ml::detail::MatrixView<T> unit, unit_grad;
    CHECK(core::normalize_rows<T>(nullptr, norm_bytes, {}, true, &unit, &unit_grad, nullptr) == cudaErrorInvalidValue);
    T* no_loss = nullptr;
    CHECK(core::normalize_chain<T>(nullptr, norm_bytes, {}, {}, no_loss, nullptr, nullptr) == cudaErrorInvalidValue);
  }
  if (skip_without_device()) return;
  std::mt19937_64 rng(1809);
  const Matrix<T> x = scaled_rows<T>(uniform_matrix<double>(n, d, rng), rng);
  const std::vector<std::int64_t> labels = random_labels(n, 6, rng);
  ml::MultiSimilarityLoss<T> loss(T(2), T(10), T(0.5), T(0.3));
  loss.normalize = true;
  const std::size_t loss_bytes = core::multi_similarity_workspace_bytes<T>(n, d);
  const std::size_t bytes = ml::detail::cuda::aligned_bytes(norm_bytes) + loss_bytes;
  // The cuda_core sequence: unit rows, the core on them, the chain (in one workspace).
  check_deterministic_core(loss, x, labels, bytes,
                           [&](void* workspace, std::size_t size, auto xv, auto lv, auto gv, T* device_loss,
                               cudaStream_t s) {
                             char* base = static_cast<char*>(workspace);
                             char* rest = base + ml::detail::cuda::aligned_bytes(norm_bytes);
                             if (size < bytes) return cudaErrorInvalidValue;
                             core::DeviceMatrix<T> unit, unit_grad;
                             cudaError_t e = core::normalize_rows<T>(base, norm_bytes, xv, !gv.empty(), &unit,
                                                                     &unit_grad, s);
                             if (e != cudaSuccess) return e;
                             e = core::multi_similarity_forward_backward<T, std::int64_t>(
                                 rest, loss_bytes, {unit.data, n, d, d}, lv, T(2), T(10), T(0.5), T(0.3), unit_grad,
                                 T(1), device_loss, s);
                             if (e != cudaSuccess) return e;
                             return core::normalize_chain<T>(base, norm_bytes, xv, gv, device_loss, nullptr, s);
                           });
}
