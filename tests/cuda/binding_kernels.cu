// The PyTorch binding's CUDA kernels (python/csrc/kernels_cuda.cu, behind kernels.hpp: no
// torch headers) against its CPU kernels (kernels_*.cpp) on the same data: every loss, float
// and double, gradients wanted or skipped, the loss left in device memory, and the
// reference-set form of every batch loss. Built by CI (whose
// torch has no CUDA, so the binding there is CPU-only) so that the CUDA TU always compiles;
// run where a GPU is.
#include "device.cuh"

#include "../../python/csrc/kernels.hpp"

#include <cmath>
#include <vector>

using namespace mltest;
namespace mlpy = metricloss_python;

namespace {

template <class T>
mlpy::Scalar scalar() {
  return std::is_same<T, float>::value ? mlpy::Scalar::f32 : mlpy::Scalar::f64;
}

template <class T>
mlpy::Rows rows(const T* data, Index n, Index d) {
  return {data, n, d, d};
}

template <class T>
mlpy::Grad grad(T* data, Index n, Index d) {
  return {data, n, d, d};
}

mlpy::Labels labels(const std::int64_t* data, Index n) { return {data, n, 1}; }

/// A loss and gradient computed on the host and on the device, compared.
template <class T>
struct Pair {
  Index n, d;
  Matrix<T> g_host;
  DeviceBuffer<T> g_device, loss_device;
  Pair(Index n_, Index d_) : n(n_), d(d_), g_host(Matrix<T>::Zero(n_, d_)), g_device(n_ * d_), loss_device(1) {}
  void check(double host_value, bool gradient) {
    check_cuda(cudaDeviceSynchronize());
    const double device_value = loss_device.download()[0];
    CAPTURE(host_value, device_value);
    CHECK(relatively_close(device_value, host_value, Tolerance<T>::loss, 1e-12));
    check_gradient(gradient);
  }
  /// The gradient alone (the loss of this call went to another Pair's slot).
  void check_gradient(bool gradient) {
    check_cuda(cudaDeviceSynchronize());
    if (!gradient) return;
    const std::vector<T> g = g_device.download();
    const Matrix<T> gd = Eigen::Map<const Matrix<T>>(g.data(), n, d);
    CHECK(ml::testing::compare_gradients(gd, g_host).relative(1e-30) <= Tolerance<T>::gradient);
  }
};

}  // namespace

TEST_CASE("the binding's CUDA kernels are built", "[cuda][binding]") { CHECK(mlpy::cuda_built()); }

TEMPLATE_TEST_CASE("the binding's CUDA kernels agree with its CPU kernels", "[cuda][binding]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  const Index n = 48, d = 20;
  std::mt19937_64 rng(1900);
  const Matrix<T> x = uniform_matrix<T>(n, d, rng), y = uniform_matrix<T>(n, d, rng),
                  z = uniform_matrix<T>(n, d, rng);
  const std::vector<std::int64_t> classes = random_labels(n, 5, rng), other = random_labels(n, 5, rng);
  const DeviceBuffer<T> dx(std::vector<T>(x.data(), x.data() + n * d)),
      dy(std::vector<T>(y.data(), y.data() + n * d)), dz(std::vector<T>(z.data(), z.data() + n * d));
  const DeviceBuffer<std::int64_t> dc(classes), dother(other);
  const mlpy::Device device{0, nullptr};
  mlpy::CudaLosses cuda;
  const bool gradient = GENERATE(true, false);
  CAPTURE(gradient);
  auto want = [&](auto* data) { return gradient ? grad(data, n, d) : grad(decltype(data)(nullptr), n, d); };
  const auto s = scalar<T>();
  SECTION("BatchTripletLoss, every mining, normalize") {
    for (int mining : {0, 1, 2})
      for (bool normalize : {false, true}) {
        CAPTURE(mining, normalize);
        mlpy::BatchTriplet host;
        Pair<T> p(n, d);
        const double v = host.run(s, 0.2, mining, 0, false, normalize, rows(x.data(), n, d),
                                  labels(classes.data(), n), want(p.g_host.data()));
        cuda.batch_triplet(s, 0.2, mining, 0, false, normalize, rows(dx.data(), n, d), labels(dc.data(), n),
                           want(p.g_device.data()), device, p.loss_device.data());
        p.check(v, gradient);
      }
  }
  SECTION("LiftedStructureLoss") {
    mlpy::Lifted host;
    Pair<T> p(n, d);
    const double v = host.run(s, 1.0, false, rows(x.data(), n, d), labels(classes.data(), n), want(p.g_host.data()));
    cuda.lifted(s, 1.0, false, rows(dx.data(), n, d), labels(dc.data(), n), want(p.g_device.data()), device,
                p.loss_device.data());
    p.check(v, gradient);
  }
  SECTION("every batch loss against a reference set, self_index on the host") {
    // Q = the first 16 rows of x, R = y with row 5 a copy of query 2 (self_index[2] = 5).
    const Index nq = 16;
    Matrix<T> r = y;
    r.row(5) = x.row(2);
    std::vector<std::int64_t> yr = other;
    yr[5] = classes[2];
    std::vector<std::int64_t> self(static_cast<std::size_t>(nq), -1);
    self[2] = 5;
    const DeviceBuffer<T> dr(std::vector<T>(r.data(), r.data() + n * d));
    const DeviceBuffer<std::int64_t> dyr(yr);
    const mlpy::Reference host_ref{rows(r.data(), n, d), labels(yr.data(), n), labels(self.data(), nq)};
    const mlpy::Reference device_ref{rows(dr.data(), n, d), labels(dyr.data(), n), labels(self.data(), nq)};
    for (int mining : {0, 1, 2}) {
      CAPTURE(mining);
      mlpy::BatchTriplet host;
      Pair<T> pq(nq, d), pr(n, d);
      const double v = host.run(s, 0.2, mining, 0, false, false, rows(x.data(), nq, d), labels(classes.data(), nq),
                                host_ref, gradient ? grad(pq.g_host.data(), nq, d) : grad<T>(nullptr, nq, d),
                                want(pr.g_host.data()));
      cuda.batch_triplet(s, 0.2, mining, 0, false, false, rows(dx.data(), nq, d), labels(dc.data(), nq), device_ref,
                         gradient ? grad(pq.g_device.data(), nq, d) : grad<T>(nullptr, nq, d),
                         want(pr.g_device.data()), device, pq.loss_device.data());
      pq.check(v, gradient);
      pr.check_gradient(gradient);
    }
    mlpy::Lifted host;
    Pair<T> pq(nq, d), pr(n, d);
    const double v = host.run(s, 1.0, false, rows(x.data(), nq, d), labels(classes.data(), nq), host_ref,
                              gradient ? grad(pq.g_host.data(), nq, d) : grad<T>(nullptr, nq, d),
                              want(pr.g_host.data()));
    cuda.lifted(s, 1.0, false, rows(dx.data(), nq, d), labels(dc.data(), nq), device_ref,
                gradient ? grad(pq.g_device.data(), nq, d) : grad<T>(nullptr, nq, d), want(pr.g_device.data()),
                device, pq.loss_device.data());
    pq.check(v, gradient);
    pr.check_gradient(gradient);
    const mlpy::BatchContrastiveOptions bc{0.1, 1.8, 0, 1, false};
    mlpy::BatchContrastive host_bc;
    Pair<T> cq(nq, d), cr(n, d);
    double w = host_bc.run(s, bc, rows(x.data(), nq, d), labels(classes.data(), nq), host_ref,
                           gradient ? grad(cq.g_host.data(), nq, d) : grad<T>(nullptr, nq, d), want(cr.g_host.data()));
    cuda.batch_contrastive(s, bc, rows(dx.data(), nq, d), labels(dc.data(), nq), device_ref,
                           gradient ? grad(cq.g_device.data(), nq, d) : grad<T>(nullptr, nq, d),
                           want(cr.g_device.data()), device, cq.loss_device.data());
    cq.check(w, gradient);
    cr.check_gradient(gradient);
    const mlpy::MultiSimilarityOptions ms{2, 10, 0.5, 0.3, false};
    mlpy::MultiSimilarity host_ms;
    Pair<T> mq(nq, d), mr(n, d);
    w = host_ms.run(s, ms, rows(x.data(), nq, d), labels(classes.data(), nq), host_ref,
                    gradient ? grad(mq.g_host.data(), nq, d) : grad<T>(nullptr, nq, d), want(mr.g_host.data()));
    cuda.multi_similarity(s, ms, rows(dx.data(), nq, d), labels(dc.data(), nq), device_ref,
                          gradient ? grad(mq.g_device.data(), nq, d) : grad<T>(nullptr, nq, d),
                          want(mr.g_device.data()), device, mq.loss_device.data());
    mq.check(w, gradient);
    mr.check_gradient(gradient);
  }
  SECTION("BatchContrastiveLoss and MultiSimilarityLoss, normalised") {
    const mlpy::BatchContrastiveOptions bc{0.1, 1.8, 0, 0, true};
    mlpy::BatchContrastive host_bc;
    Pair<T> p(n, d);
    double v = host_bc.run(s, bc, rows(x.data(), n, d), labels(classes.data(), n), want(p.g_host.data()));
    cuda.batch_contrastive(s, bc, rows(dx.data(), n, d), labels(dc.data(), n), want(p.g_device.data()), device,
                           p.loss_device.data());
    p.check(v, gradient);
    const mlpy::MultiSimilarityOptions ms{2, 10, 0.5, 0.3, true};
    mlpy::MultiSimilarity host_ms;
    Pair<T> q(n, d);
    v = host_ms.run(s, ms, rows(x.data(), n, d), labels(classes.data(), n), want(q.g_host.data()));
    cuda.multi_similarity(s, ms, rows(dx.data(), n, d), labels(dc.data(), n), want(q.g_device.data()), device,
                          q.loss_device.data());
    q.check(v, gradient);
  }
  SECTION("ContrastiveLoss (similarity flags and two label vectors) and TripletLoss") {
    mlpy::Contrastive host_c;
    Pair<T> pa(n, d), pb(n, d);
    double v = host_c.run(s, 1.0, 0, rows(x.data(), n, d), rows(y.data(), n, d), labels(classes.data(), n),
                          want(pa.g_host.data()), want(pb.g_host.data()));
    cuda.contrastive(s, 1.0, 0, rows(dx.data(), n, d), rows(dy.data(), n, d), labels(dc.data(), n),
                     want(pa.g_device.data()), want(pb.g_device.data()), device, pa.loss_device.data());
    pa.check(v, gradient);
    pb.check_gradient(gradient);
    v = host_c.run(s, 1.0, 1, rows(x.data(), n, d), rows(y.data(), n, d), labels(classes.data(), n),
                   labels(other.data(), n), want(pa.g_host.data()), want(pb.g_host.data()));
    cuda.contrastive(s, 1.0, 1, rows(dx.data(), n, d), rows(dy.data(), n, d), labels(dc.data(), n),
                     labels(dother.data(), n), want(pa.g_device.data()), want(pb.g_device.data()), device,
                     pa.loss_device.data());
    pa.check(v, gradient);
    pb.check_gradient(gradient);
    mlpy::Triplet host_t;
    Pair<T> ta(n, d), tp(n, d), tn(n, d);
    v = host_t.run(s, 0.2, 1, rows(x.data(), n, d), rows(y.data(), n, d), rows(z.data(), n, d),
                   want(ta.g_host.data()), want(tp.g_host.data()), want(tn.g_host.data()));
    cuda.triplet(s, 0.2, 1, rows(dx.data(), n, d), rows(dy.data(), n, d), rows(dz.data(), n, d),
                 want(ta.g_device.data()), want(tp.g_device.data()), want(tn.g_device.data()), device,
                 ta.loss_device.data());
    ta.check(v, gradient);
    tp.check_gradient(gradient);
    tn.check_gradient(gradient);
  }
}
