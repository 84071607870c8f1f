// LiftedStructureLoss forward_backward against its floor and its peer, P x K batches of 8
// samples per class.
//   floor: the two GEMM-class products the factorisation cannot avoid, X X^T (N x N x D) and
//          (N x N)(N x D), as plain Eigen products, on the loss's x and N x D output
//          (shape_buffers).
//   peer:  Caffe's CPU layer (LiftedStructSimilaritySoftmaxLossLayer::Forward_cpu and
//          Backward_cpu) reimplemented with the same BLAS calls (dot, gemm, axpy, scal) on
//          single-threaded OpenBLAS: O(|P| N D), so it runs at the smaller sizes only.
// Goal at N = 1024, D = 128: lifted <= 2 x floor, and >= 50 x faster than the peer.
#include "common.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#if METRICLOSS_BENCH_OPENBLAS
#include <cblas.h>
extern "C" void openblas_set_num_threads(int num_threads);
#endif

using namespace mlbench;

namespace {

constexpr int per_class = 8;

/// One shape's batch, labels and N x D output (the floor's (N x N) X and the loss's
/// gradient), and the floor's own N x N operands.
template <class T>
struct Batch {
  Matrix<T> x, weights, gram, out;
  Eigen::VectorXi labels;
  Batch(Index n, Index d)
      : x(uniform<T>(n, d, 1)), weights(uniform<T>(n, n, 2)), gram(Matrix<T>::Zero(n, n)),
        out(Matrix<T>::Zero(n, d)), labels(pk_labels(n, per_class, 3)) {}
};

template <class T>
void BM_floor_products(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  Batch<T>& data = shape_buffers<Batch<T>>(n, d);
  const Matrix<T>&x = data.x, &weights = data.weights;
  Matrix<T>&gram = data.gram, &propagated = data.out;
  for (auto _ : state) {
    gram.noalias() = x * x.transpose();
    propagated.noalias() = weights * x;
    benchmark::DoNotOptimize(gram.data());
    benchmark::DoNotOptimize(propagated.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, (2.0 * n * d + 2.0 * n * n) * sizeof(T), 4.0 * n * n * d);
}

template <class T, class Tag>
void BM_lifted(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  const bool gradient = state.range(2) != 0;
  Batch<T>& data = shape_buffers<Batch<T>>(n, d);
  const Matrix<T>& x = data.x;
  const Eigen::VectorXi& labels = data.labels;
  ml::LiftedStructureLoss<T> loss(T(1));
  Matrix<T>& grad = data.out;
  const T first = loss.forward_backward(Tag{}, x, labels, grad);
  if (!(std::isfinite(first) && first > T(0) && grad.allFinite())) {
    state.SkipWithError("LiftedStructureLoss returned a non-finite or zero loss");
    return;
  }
  for (auto _ : state) {
    const T value = gradient ? loss.forward_backward(Tag{}, x, labels, grad)
                             : loss.forward(Tag{}, x, labels);
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  set_rates(state, (gradient ? 2.0 : 1.0) * n * d * sizeof(T), (gradient ? 4.0 : 2.0) * n * n * d);
}

#if METRICLOSS_BENCH_OPENBLAS
/// Caffe's layer, call for call (float: cblas_s*). Blob scratch is allocated once, as
/// Caffe's blobs are reshaped without reallocation once large enough.
class CaffeLiftedStruct {
 public:
  explicit CaffeLiftedStruct(Index n, Index k)
      : dot_(n), ones_(n, 1.0f), dist_sq_(n * n), pos_diff_(k), neg_diff_(k),
        loss_aug_inference_(2 * n), summer_vec_(2 * n) {}

  float forward_backward(const float* bin, const int* label, Index n_, Index k_, float margin,
                         float* bout, float top_diff) {
    const int n = static_cast<int>(n_), kk = static_cast<int>(k_);
    for (int i = 0; i < n; ++i) dot_[i] = cblas_sdot(kk, bin + i * kk, 1, bin + i * kk, 1);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, kk, -2.0f, bin, kk, bin, kk, 0.0f,
                dist_sq_.data(), n);
    for (int i = 0; i < n; ++i) cblas_saxpy(n, dot_[i], ones_.data(), 1, dist_sq_.data() + i * n, 1);
    for (int i = 0; i < n; ++i) cblas_saxpy(n, 1.0f, dot_.data(), 1, dist_sq_.data() + i * n, 1);
    // As Caffe: a vector<vector<bool>> built on every forward.
    std::vector<std::vector<bool>> label_mat(n, std::vector<bool>(n, false));
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) label_mat[i][j] = label[i] == label[j];
    float loss = 0.0f, num_constraints = 0.0f;
    for (int i = 0; i < n; ++i) std::fill(bout + i * kk, bout + (i + 1) * kk, 0.0f);
    for (int i = 0; i < n; ++i) {
      for (int j = i + 1; j < n; ++j) {
        if (!label_mat[i][j]) continue;
        const float dist_pos = std::sqrt(dist_sq_[i * n + j]);
        for (int c = 0; c < kk; ++c) pos_diff_[c] = bin[i * kk + c] - bin[j * kk + c];  // caffe_sub
        int num_negatives = 0;
        for (int k = 0; k < n; ++k) num_negatives += !label_mat[i][k];
        for (int k = 0; k < n; ++k) num_negatives += !label_mat[j][k];
        std::fill(summer_vec_.begin(), summer_vec_.begin() + num_negatives, 1.0f);
        int neg_idx = 0;
        for (int k = 0; k < n; ++k)
          if (!label_mat[i][k]) loss_aug_inference_[neg_idx++] = margin - std::sqrt(dist_sq_[i * n + k]);
        for (int k = 0; k < n; ++k)
          if (!label_mat[j][k]) loss_aug_inference_[neg_idx++] = margin - std::sqrt(dist_sq_[j * n + k]);
        const float max_elem =
            *std::max_element(loss_aug_inference_.begin(), loss_aug_inference_.begin() + num_negatives);
        for (int q = 0; q < num_negatives; ++q) loss_aug_inference_[q] -= max_elem;  // caffe_add_scalar
        for (int q = 0; q < num_negatives; ++q) loss_aug_inference_[q] = std::exp(loss_aug_inference_[q]);  // caffe_exp
        const float soft_maximum =
            std::log(cblas_sdot(num_negatives, summer_vec_.data(), 1, loss_aug_inference_.data(), 1)) + max_elem;
        const float this_loss = std::max(soft_maximum + dist_pos, 0.0f);
        loss += this_loss * this_loss;
        num_constraints += 1.0f;
        const float sum_exp = cblas_sdot(num_negatives, summer_vec_.data(), 1, loss_aug_inference_.data(), 1);
        float scaler = 2.0f * this_loss / dist_pos;
        cblas_saxpy(kk, scaler, pos_diff_.data(), 1, bout + i * kk, 1);
        cblas_saxpy(kk, -scaler, pos_diff_.data(), 1, bout + j * kk, 1);
        neg_idx = 0;
        for (int side = 0; side < 2; ++side) {
          const int a = side == 0 ? i : j;
          for (int k = 0; k < n; ++k) {
            if (label_mat[a][k]) continue;
            for (int c = 0; c < kk; ++c) neg_diff_[c] = bin[a * kk + c] - bin[k * kk + c];
            const float dJ_dD = 2.0f * this_loss * -1.0f * loss_aug_inference_[neg_idx++] / sum_exp;
            scaler = dJ_dD / std::sqrt(dist_sq_[a * n + k]);
            cblas_saxpy(kk, scaler, neg_diff_.data(), 1, bout + a * kk, 1);
            cblas_saxpy(kk, -scaler, neg_diff_.data(), 1, bout + k * kk, 1);
          }
        }
      }
    }
    loss = loss / num_constraints / 2.0f;
    const float alpha = top_diff / num_constraints / 2.0f;  // Backward_cpu
    for (int i = 0; i < n; ++i) cblas_sscal(kk, alpha, bout + i * kk, 1);
    return loss;
  }

 private:
  std::vector<float> dot_, ones_, dist_sq_, pos_diff_, neg_diff_, loss_aug_inference_, summer_vec_;
};

void BM_caffe_peer(benchmark::State& state) {
  openblas_set_num_threads(1);
  const Index n = state.range(0), d = state.range(1);
  const Matrix<float> x = uniform<float>(n, d, 1);
  const Eigen::VectorXi labels = pk_labels(n, per_class, 3);
  Matrix<float> grad = Matrix<float>::Zero(n, d), ours = Matrix<float>::Zero(n, d);
  CaffeLiftedStruct caffe(n, d);
  // The peer must compute what we compute (to float accuracy: its distances come from the
  // dot-product expansion) before its time means anything.
  const float peer_value = caffe.forward_backward(x.data(), labels.data(), n, d, 1.0f, grad.data(), 1.0f);
  ml::LiftedStructureLoss<float> loss(1.0f);
  const float value = loss.forward_backward(ml::simd, x, labels, ours);
  const double grad_error = (grad - ours).cwiseAbs().maxCoeff() / ours.cwiseAbs().maxCoeff();
  if (!(std::abs(peer_value - value) <= 1e-3f * std::abs(value)) || !(grad_error <= 1e-2)) {
    state.SkipWithError("the Caffe peer disagrees with LiftedStructureLoss");
    return;
  }
  for (auto _ : state) {
    const float value = caffe.forward_backward(x.data(), labels.data(), n, d, 1.0f, grad.data(), 1.0f);
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  set_rates(state, 2.0 * n * d * sizeof(float), 0);
}
#endif

void all_sizes(benchmark::internal::Benchmark* b, bool with_gradient_flag) {
  for (long n : {256L, 1024L, 4096L})
    for (long d : {128L, 512L}) {
      if (with_gradient_flag) b->Args({n, d, 1});
      else b->Args({n, d});
    }
  b->ArgNames(with_gradient_flag ? std::vector<std::string>{"N", "D", "grad"}
                                 : std::vector<std::string>{"N", "D"});
  b->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK_TEMPLATE(BM_floor_products, float)->Apply([](auto* b) { all_sizes(b, false); });
BENCHMARK_TEMPLATE(BM_lifted, float, ml::simd_tag)->Apply([](auto* b) {
  all_sizes(b, true);
  b->Args({1024, 128, 0});  // forward only
});
BENCHMARK_TEMPLATE(BM_floor_products, double)->Args({1024, 128})->ArgNames({"N", "D"})->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_lifted, double, ml::simd_tag)->Args({1024, 128, 1})->ArgNames({"N", "D", "grad"})->Unit(benchmark::kMillisecond);
// The scalar reference is O(N^2 D) in double with plain loops: smallest size only.
BENCHMARK_TEMPLATE(BM_lifted, float, ml::scalar_tag)->Args({256, 128, 1})->ArgNames({"N", "D", "grad"})->Unit(benchmark::kMillisecond);
#if METRICLOSS_BENCH_OPENBLAS
// The peer is O(|P| N D) ~ 7 N^2 D / 2 BLAS-1 work: N = 4096 would take seconds per call.
BENCHMARK(BM_caffe_peer)->Args({256, 128})->Args({256, 512})->Args({1024, 128})->Args({1024, 512})
    ->ArgNames({"N", "D"})->Unit(benchmark::kMillisecond);
#endif

BENCHMARK_MAIN();
