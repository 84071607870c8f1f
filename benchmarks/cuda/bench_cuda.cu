// CUDA benchmarks with their floors in one binary, all timed by cudaEvents around each
// iteration (UseManualTime + SetIterationTime):
//   contrastive fwd+bwd (and fwd only) and explicit triplets vs. a device-to-device copy
//   moving the same bytes as contrastive;
//   lifted structure and batch-hard triplets (fwd+bwd) vs. the cuBLAS GEMMs of their shapes
//   (X X^T: N x N x D, and S X: N x D x N), their compute floor.
// Targets (issue 5): contrastive at N = 65536, D = 128 >= 80% of the copy's GB/s; lifted at
// N = 8192, D = 512 within 2x of the two GEMMs.
// Half inputs and gradients (issue 19, phase 1: widened into float staging): contrastive
// against the copy of the half bytes, lifted and batch-hard against the float GEMMs.
// Run without a device, every benchmark reports "no CUDA device" through SkipWithError.
#include <metricloss/cuda.cuh>

#include "common.hpp"

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <vector>

namespace {

using namespace mlbench;

bool device_present(benchmark::State& state) {
  int count = 0;
  if (cudaGetDeviceCount(&count) == cudaSuccess && count > 0) return true;
  state.SkipWithError("no CUDA device");
  return false;
}

void check(cudaError_t code) {
  if (code != cudaSuccess) throw ml::cuda_error(code, "bench_cuda");
}

template <class T>
struct DeviceArray {
  T* data = nullptr;
  explicit DeviceArray(std::size_t count) { check(cudaMalloc(&data, sizeof(T) * count)); }
  DeviceArray(const T* host, std::size_t count) : DeviceArray(count) {
    check(cudaMemcpy(data, host, sizeof(T) * count, cudaMemcpyHostToDevice));
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(data); }
};

/// Times `enqueue` (stream-ordered work) per iteration with a pair of events.
template <class Enqueue>
void time_iterations(benchmark::State& state, cudaStream_t stream, Enqueue&& enqueue) {
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start));
  check(cudaEventCreate(&stop));
  enqueue();  // warm-up: workspace, caches, lazy module loading
  check(cudaStreamSynchronize(stream));
  for (auto _ : state) {
    check(cudaEventRecord(start, stream));
    enqueue();
    check(cudaEventRecord(stop, stream));
    check(cudaEventSynchronize(stop));
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(static_cast<double>(ms) * 1e-3);
  }
  check(cudaEventDestroy(start));
  check(cudaEventDestroy(stop));
}

struct Stream {
  cudaStream_t handle = nullptr;
  Stream() { check(cudaStreamCreateWithFlags(&handle, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(handle); }
};

/// Contrastive: reads a, b (N x D) and an int sim, writes grad_a and grad_b when `backward`.
template <class T, bool backward>
void BM_cuda_contrastive(benchmark::State& state) {
  if (!device_present(state)) return;
  const Index n = state.range(0), d = state.range(1);
  const Matrix<T> a = uniform<T>(n, d, 1), b = uniform<T>(n, d, 2);
  Eigen::VectorXi sim = pk_labels(n, 2, 3).unaryExpr([](int v) { return v % 2; });
  const std::size_t count = static_cast<std::size_t>(n * d);
  DeviceArray<T> da(a.data(), count), db(b.data(), count), dga(count), dgb(count), loss_value(1);
  DeviceArray<int> dsim(sim.data(), static_cast<std::size_t>(n));
  Eigen::Map<const Matrix<T>> A(da.data, n, d), B(db.data, n, d);
  Eigen::Map<Matrix<T>> GA(dga.data, n, d), GB(dgb.data, n, d);
  Eigen::Map<const Eigen::VectorXi> S(dsim.data, n);
  ml::ContrastiveLoss<T> loss(T(std::sqrt(static_cast<double>(d)) * 0.8));
  Stream stream;
  const auto tag = ml::cuda.on(stream.handle).loss_to(loss_value.data);
  time_iterations(state, stream.handle, [&] {
    if constexpr (backward)
      loss.forward_backward(tag, A, B, S, GA, GB);
    else
      loss.forward_backward(tag, A, B, S, ml::skip, ml::skip);
  });
  const double bytes = (backward ? 4.0 : 2.0) * static_cast<double>(count * sizeof(T)) +
                       static_cast<double>(n) * sizeof(int);
  // Per entry: difference and fma for the distance; difference and scale for the gradient.
  set_rates(state, bytes, (backward ? 4.0 : 2.0) * static_cast<double>(count));
}

/// The values of m rounded to half, row-major.
std::vector<__half> to_half(const Matrix<float>& m) {
  std::vector<__half> out(static_cast<std::size_t>(m.size()));
  for (Index i = 0; i < m.size(); ++i) out[static_cast<std::size_t>(i)] = __float2half_rn(m.data()[i]);
  return out;
}
using HalfRows = Eigen::Map<ml::RowMatrix<__half>>;
using ConstHalfRows = Eigen::Map<const ml::RowMatrix<__half>>;

/// Contrastive fwd+bwd on half rows with half gradients (a float loss): the bytes it must
/// move are half the float call's.
void BM_cuda_contrastive_half(benchmark::State& state) {
  if (!device_present(state)) return;
  const Index n = state.range(0), d = state.range(1);
  const std::vector<__half> a = to_half(uniform<float>(n, d, 1)), b = to_half(uniform<float>(n, d, 2));
  Eigen::VectorXi sim = pk_labels(n, 2, 3).unaryExpr([](int v) { return v % 2; });
  const std::size_t count = static_cast<std::size_t>(n * d);
  DeviceArray<__half> da(a.data(), count), db(b.data(), count), dga(count), dgb(count);
  DeviceArray<float> loss_value(1);
  DeviceArray<int> dsim(sim.data(), static_cast<std::size_t>(n));
  ConstHalfRows A(da.data, n, d), B(db.data, n, d);
  HalfRows GA(dga.data, n, d), GB(dgb.data, n, d);
  Eigen::Map<const Eigen::VectorXi> S(dsim.data, n);
  ml::ContrastiveLoss<float> loss(static_cast<float>(std::sqrt(static_cast<double>(d)) * 0.8));
  Stream stream;
  const auto tag = ml::cuda.on(stream.handle).loss_to(loss_value.data);
  time_iterations(state, stream.handle, [&] { loss.forward_backward(tag, A, B, S, GA, GB); });
  set_rates(state, 4.0 * static_cast<double>(count * sizeof(__half)) + static_cast<double>(n) * sizeof(int),
            4.0 * static_cast<double>(count));
}

/// The bandwidth floor: a device-to-device copy moving the bytes contrastive fwd+bwd moves
/// (2 N D elements read and written), reported as read + write bytes.
template <class T>
void BM_cuda_copy_floor(benchmark::State& state) {
  if (!device_present(state)) return;
  const Index n = state.range(0), d = state.range(1);
  const std::size_t bytes = 2 * static_cast<std::size_t>(n * d) * sizeof(T);
  DeviceArray<char> source(bytes), target(bytes);
  check(cudaMemset(source.data, 0, bytes));
  Stream stream;
  time_iterations(state, stream.handle, [&] {
    check(cudaMemcpyAsync(target.data, source.data, bytes, cudaMemcpyDeviceToDevice, stream.handle));
  });
  set_rates(state, 2.0 * static_cast<double>(bytes), 0.0);
}

void check(cublasStatus_t status) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error("bench_cuda: cuBLAS status " + std::to_string(static_cast<int>(status)));
}

cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                    int k, const float* alpha, const float* a, int lda, const float* b, int ldb,
                    const float* beta, float* c, int ldc) {
  return cublasSgemm(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                    int k, const double* alpha, const double* a, int lda, const double* b, int ldb,
                    const double* beta, double* c, int ldc) {
  return cublasDgemm(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/// The compute floor of the pairwise losses (lifted structure, batch mining): the Gram
/// matrix X X^T (N x N x D) and the gradient product W X (N x D x N), 4 N^2 D flops.
template <class T>
void BM_cublas_pairwise_gemms(benchmark::State& state) {
  if (!device_present(state)) return;
  const int n = static_cast<int>(state.range(0)), d = static_cast<int>(state.range(1));
  const Matrix<T> x = uniform<T>(n, d, 4);
  DeviceArray<T> dx(x.data(), static_cast<std::size_t>(n) * d);
  DeviceArray<T> gram(static_cast<std::size_t>(n) * n), grad(static_cast<std::size_t>(n) * d);
  Stream stream;
  cublasHandle_t handle;
  check(cublasCreate(&handle));
  check(cublasSetStream(handle, stream.handle));
  const T one = T(1), zero = T(0);
  // Row-major X (n x d) is column-major X^T (d x n): Gram = (X^T)^T X^T; grad^T = X^T Gram.
  time_iterations(state, stream.handle, [&] {
    check(gemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, n, d, &one, dx.data, d, dx.data, d, &zero,
               gram.data, n));
    check(gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, d, n, n, &one, dx.data, d, gram.data, n, &zero,
               grad.data, d));
  });
  check(cublasDestroy(handle));
  const double nn = static_cast<double>(n) * n;
  set_rates(state, (2.0 * n * d + nn + nn + 2.0 * n * d) * sizeof(T), 4.0 * nn * d);
}

/// The pairwise losses end to end (forward and gradient), against the two GEMMs above.
template <class Loss>
void BM_cuda_pairwise_loss(benchmark::State& state) {
  using T = typename Loss::scalar_type;
  if (!device_present(state)) return;
  const Index n = state.range(0), d = state.range(1);
  const Matrix<T> x = uniform<T>(n, d, 5);
  const Eigen::VectorXi labels = pk_labels(n, 4, 6);  // P x K batches, K = 4
  DeviceArray<T> dx(x.data(), static_cast<std::size_t>(n * d)), dg(static_cast<std::size_t>(n * d)), loss_value(1);
  DeviceArray<int> dl(labels.data(), static_cast<std::size_t>(n));
  Eigen::Map<const Matrix<T>> X(dx.data, n, d);
  Eigen::Map<Matrix<T>> G(dg.data, n, d);
  Eigen::Map<const Eigen::VectorXi> Y(dl.data, n);
  Loss loss;
  Stream stream;
  const auto tag = ml::cuda.on(stream.handle).loss_to(loss_value.data);
  time_iterations(state, stream.handle, [&] { loss.forward_backward(tag, X, Y, G); });
  const double nn = static_cast<double>(n) * static_cast<double>(n);
  set_rates(state, 2.0 * static_cast<double>(n * d) * sizeof(T) + 4.0 * nn * sizeof(T),
            4.0 * nn * static_cast<double>(d));
}

/// A pairwise loss on half rows with a half gradient, against the float GEMMs of its shape.
template <class Loss>
void BM_cuda_pairwise_loss_half(benchmark::State& state) {
  if (!device_present(state)) return;
  const Index n = state.range(0), d = state.range(1);
  const std::vector<__half> x = to_half(uniform<float>(n, d, 5));
  const Eigen::VectorXi labels = pk_labels(n, 4, 6);
  DeviceArray<__half> dx(x.data(), x.size()), dg(x.size());
  DeviceArray<float> loss_value(1);
  DeviceArray<int> dl(labels.data(), static_cast<std::size_t>(n));
  ConstHalfRows X(dx.data, n, d);
  HalfRows G(dg.data, n, d);
  Eigen::Map<const Eigen::VectorXi> Y(dl.data, n);
  Loss loss;
  Stream stream;
  const auto tag = ml::cuda.on(stream.handle).loss_to(loss_value.data);
  time_iterations(state, stream.handle, [&] { loss.forward_backward(tag, X, Y, G); });
  const double nn = static_cast<double>(n) * static_cast<double>(n);
  set_rates(state, 2.0 * static_cast<double>(n * d) * sizeof(__half) + 4.0 * nn * sizeof(float),
            4.0 * nn * static_cast<double>(d));
}

/// Explicit triplets: reads anchor, positive, negative and writes their three gradients.
template <class T>
void BM_cuda_triplet(benchmark::State& state) {
  if (!device_present(state)) return;
  const Index n = state.range(0), d = state.range(1);
  const std::size_t count = static_cast<std::size_t>(n * d);
  const Matrix<T> a = uniform<T>(n, d, 7), p = uniform<T>(n, d, 8), q = uniform<T>(n, d, 9);
  DeviceArray<T> da(a.data(), count), dp(p.data(), count), dn(q.data(), count), ga(count), gp(count), gn(count),
      loss_value(1);
  Eigen::Map<const Matrix<T>> A(da.data, n, d), P(dp.data, n, d), N(dn.data, n, d);
  Eigen::Map<Matrix<T>> GA(ga.data, n, d), GP(gp.data, n, d), GN(gn.data, n, d);
  ml::TripletLoss<T> loss(T(0.5) * static_cast<T>(d) / T(3));
  Stream stream;
  const auto tag = ml::cuda.on(stream.handle).loss_to(loss_value.data);
  time_iterations(state, stream.handle, [&] { loss.forward_backward(tag, A, P, N, GA, GP, GN); });
  set_rates(state, 6.0 * static_cast<double>(count * sizeof(T)), 8.0 * static_cast<double>(count));
}

/// The floor of a reference-set call: the two products of its shapes, Q R^T (N_q x N_r x D)
/// and W R (N_q x D x N_r), 4 N_q N_r D flops.
template <class T>
void BM_cublas_reference_gemms(benchmark::State& state) {
  if (!device_present(state)) return;
  const int nq = static_cast<int>(state.range(0)), nr = static_cast<int>(state.range(1)),
            d = static_cast<int>(state.range(2));
  const Matrix<T> q = uniform<T>(nq, d, 10), r = uniform<T>(nr, d, 11);
  DeviceArray<T> dq(q.data(), static_cast<std::size_t>(nq) * d), dr(r.data(), static_cast<std::size_t>(nr) * d);
  DeviceArray<T> cross(static_cast<std::size_t>(nq) * nr), grad(static_cast<std::size_t>(nq) * d);
  Stream stream;
  cublasHandle_t handle;
  check(cublasCreate(&handle));
  check(cublasSetStream(handle, stream.handle));
  const T one = T(1), zero = T(0);
  // Row-major Q R^T (nq x nr) is column-major (nr x nq) = R Q^T; grad (nq x d) row-major is
  // column-major R^T-shaped: grad^T (d x nq) = R^T (d x nr) W^T (nr x nq).
  time_iterations(state, stream.handle, [&] {
    check(gemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, nr, nq, d, &one, dr.data, d, dq.data, d, &zero,
               cross.data, nr));
    check(gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, d, nq, nr, &one, dr.data, d, cross.data, nr, &zero,
               grad.data, d));
  });
  check(cublasDestroy(handle));
  const double entries = static_cast<double>(nq) * nr;
  set_rates(state, (static_cast<double>(nq + nr) * d + 2.0 * entries + static_cast<double>(nq) * d) * sizeof(T),
            4.0 * entries * d);
}

/// A reference-set loss end to end: queries (labels of 64 classes) against R, grad_q and
/// grad_r (all of R's rows, as a gallery would; a memory skips grad_r).
template <class Loss, int Mining>
void BM_cuda_reference_loss(benchmark::State& state) {
  using T = typename Loss::scalar_type;
  if (!device_present(state)) return;
  const Index nq = state.range(0), nr = state.range(1), d = state.range(2);
  const Matrix<T> q = uniform<T>(nq, d, 12), r = uniform<T>(nr, d, 13);
  Eigen::VectorXi yq(nq), yr(nr);
  for (Index i = 0; i < nq; ++i) yq(i) = static_cast<int>(i % 64);
  for (Index j = 0; j < nr; ++j) yr(j) = static_cast<int>((j * 7) % 64);
  DeviceArray<T> dq(q.data(), static_cast<std::size_t>(nq * d)), dr(r.data(), static_cast<std::size_t>(nr * d)),
      gq(static_cast<std::size_t>(nq * d)), gr(static_cast<std::size_t>(nr * d)), loss_value(1);
  DeviceArray<int> dyq(yq.data(), static_cast<std::size_t>(nq)), dyr(yr.data(), static_cast<std::size_t>(nr));
  Eigen::Map<const Matrix<T>> Q(dq.data, nq, d), R(dr.data, nr, d);
  Eigen::Map<Matrix<T>> GQ(gq.data, nq, d), GR(gr.data, nr, d);
  Eigen::Map<const Eigen::VectorXi> YQ(dyq.data, nq), YR(dyr.data, nr);
  Loss loss;
  if constexpr (Mining >= 0) loss.mining = static_cast<ml::Mining>(Mining);
  Stream stream;
  const auto tag = ml::cuda.on(stream.handle).loss_to(loss_value.data);
  const auto ref = ml::reference(R, YR);
  time_iterations(state, stream.handle, [&] { loss.forward_backward(tag, Q, YQ, ref, GQ, GR); });
  const double entries = static_cast<double>(nq) * static_cast<double>(nr);
  set_rates(state, 2.0 * static_cast<double>((nq + nr) * d) * sizeof(T) + 2.0 * entries * sizeof(double),
            4.0 * entries * static_cast<double>(d));
}

void contrastive_sizes(benchmark::internal::Benchmark* b) {
  for (auto d : {32, 128, 512, 2048}) b->Args({65536, d});
  b->Args({1024, 128})->UseManualTime()->Unit(benchmark::kMicrosecond);
}
void lifted_sizes(benchmark::internal::Benchmark* b) {
  b->Args({1024, 128})->Args({8192, 512})->UseManualTime()->Unit(benchmark::kMicrosecond);
}

void reference_sizes(benchmark::internal::Benchmark* b) {
  for (auto nr : {1024, 8192, 65536}) b->Args({256, nr, 128});
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}
void reference_small_sizes(benchmark::internal::Benchmark* b) {
  for (auto nr : {1024, 8192}) b->Args({256, nr, 128});
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace

// <T, backward>: fwd+bwd, then fwd only.
BENCHMARK_TEMPLATE(BM_cuda_contrastive, float, true)->Apply(contrastive_sizes);
BENCHMARK_TEMPLATE(BM_cuda_contrastive, float, false)->Apply(contrastive_sizes);
BENCHMARK_TEMPLATE(BM_cuda_copy_floor, float)->Apply(contrastive_sizes);
BENCHMARK_TEMPLATE(BM_cuda_contrastive, double, true)->Apply(contrastive_sizes);
BENCHMARK_TEMPLATE(BM_cuda_copy_floor, double)->Apply(contrastive_sizes);
BENCHMARK_TEMPLATE(BM_cuda_triplet, float)->Apply(contrastive_sizes);
BENCHMARK_TEMPLATE(BM_cublas_pairwise_gemms, float)->Apply(lifted_sizes);
BENCHMARK_TEMPLATE(BM_cuda_pairwise_loss, ml::LiftedStructureLoss<float>)->Apply(lifted_sizes);
BENCHMARK_TEMPLATE(BM_cuda_pairwise_loss, ml::BatchTripletLoss<float>)->Apply(lifted_sizes);
BENCHMARK_TEMPLATE(BM_cublas_pairwise_gemms, double)->Apply(lifted_sizes);
// Half rows and gradients.
BENCHMARK(BM_cuda_contrastive_half)->Apply(contrastive_sizes);
BENCHMARK_TEMPLATE(BM_cuda_copy_floor, __half)->Apply(contrastive_sizes);
BENCHMARK_TEMPLATE(BM_cuda_pairwise_loss_half, ml::LiftedStructureLoss<float>)->Apply(lifted_sizes);
BENCHMARK_TEMPLATE(BM_cuda_pairwise_loss_half, ml::BatchTripletLoss<float>)->Apply(lifted_sizes);
// Reference sets (issue 15's shapes): N_q = 256 against N_r = 1024, 8192, 65536, D = 128;
// semihard and all walk each anchor's positives (O(N_q |P| N_r)): the two smaller sets only.
BENCHMARK_TEMPLATE(BM_cublas_reference_gemms, float)->Apply(reference_sizes);
BENCHMARK_TEMPLATE(BM_cuda_reference_loss, ml::BatchTripletLoss<float>, 1)->Apply(reference_sizes);
BENCHMARK_TEMPLATE(BM_cuda_reference_loss, ml::LiftedStructureLoss<float>, -1)->Apply(reference_sizes);
BENCHMARK_TEMPLATE(BM_cuda_reference_loss, ml::BatchContrastiveLoss<float>, -1)->Apply(reference_sizes);
BENCHMARK_TEMPLATE(BM_cuda_reference_loss, ml::MultiSimilarityLoss<float>, -1)->Apply(reference_sizes);
BENCHMARK_TEMPLATE(BM_cuda_reference_loss, ml::BatchTripletLoss<float>, 2)->Apply(reference_small_sizes);
BENCHMARK_TEMPLATE(BM_cuda_reference_loss, ml::BatchTripletLoss<float>, 0)->Apply(reference_small_sizes);

BENCHMARK_MAIN();
