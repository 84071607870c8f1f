// The peer of bench_contrastive: Caffe's ContrastiveLossLayer CPU algorithm
// (src/caffe/layers/contrastive_loss_layer.cpp), reimplemented line for line with the same
// BLAS calls as Caffe built against OpenBLAS (no MKL):
//   caffe_sub       -> the element loop of mkl_alternate.hpp (vsSub's replacement)
//   caffe_cpu_dot   -> cblas_sdot / cblas_ddot
//   caffe_cpu_axpby -> mkl_alternate.hpp's two-step cblas_?scal + cblas_?axpy
//   caffe_set(0)    -> memset
// Forward fills diff_ = a - b and dist_sq_; Backward walks diff_ once per bottom (a, then b).
// Same sizes, data, similarity pattern and margin as contrastive.cpp, so the report pairs
// BM_contrastive_caffe<T>/N/D/form with BM_contrastive<T, simd_tag>/N/D/form.
#include "common.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

extern "C" void openblas_set_num_threads(int num_threads);

using namespace mlbench;

namespace {

inline float blas_dot(int n, const float* x, const float* y) { return cblas_sdot(n, x, 1, y, 1); }
inline double blas_dot(int n, const double* x, const double* y) { return cblas_ddot(n, x, 1, y, 1); }
inline void blas_scal(int n, float alpha, float* x) { cblas_sscal(n, alpha, x, 1); }
inline void blas_scal(int n, double alpha, double* x) { cblas_dscal(n, alpha, x, 1); }
inline void blas_axpy(int n, float alpha, const float* x, float* y) { cblas_saxpy(n, alpha, x, 1, y, 1); }
inline void blas_axpy(int n, double alpha, const double* x, double* y) { cblas_daxpy(n, alpha, x, 1, y, 1); }

template <class T>
void caffe_sub(int n, const T* a, const T* b, T* y) {
  for (int i = 0; i < n; ++i) y[i] = a[i] - b[i];
}

template <class T>
void caffe_cpu_axpby(int n, T alpha, const T* x, T beta, T* y) {
  blas_scal(n, beta, y);
  blas_axpy(n, alpha, x, y);
}

template <class T>
void caffe_set(int n, T alpha, T* y) {
  if (alpha == 0) {
    std::memset(y, 0, sizeof(T) * static_cast<std::size_t>(n));
    return;
  }
  for (int i = 0; i < n; ++i) y[i] = alpha;
}

/// ContrastiveLossLayer<T> with its two scratch blobs, diff_ (N x C) and dist_sq_ (N).
template <class T>
struct CaffeContrastiveLayer {
  int num, channels;
  T margin;
  bool legacy_version;
  std::vector<T> diff, dist_sq;

  CaffeContrastiveLayer(int num_, int channels_, T margin_, bool legacy)
      : num(num_), channels(channels_), margin(margin_), legacy_version(legacy),
        diff(static_cast<std::size_t>(num_) * channels_), dist_sq(num_) {}

  T forward_cpu(const T* a, const T* b, const T* sim) {
    caffe_sub(num * channels, a, b, diff.data());
    T loss(0.0);
    for (int i = 0; i < num; ++i) {
      dist_sq[i] = blas_dot(channels, diff.data() + i * channels, diff.data() + i * channels);
      if (static_cast<int>(sim[i])) {
        loss += dist_sq[i];
      } else if (legacy_version) {
        loss += std::max(margin - dist_sq[i], T(0.0));
      } else {
        T dist = std::max<T>(margin - std::sqrt(dist_sq[i]), T(0.0));
        loss += dist * dist;
      }
    }
    return loss / static_cast<T>(num) / T(2);
  }

  void backward_cpu(T top_diff, const T* sim, T* a_diff, T* b_diff) {
    T* bottom_diff[2] = {a_diff, b_diff};
    for (int i = 0; i < 2; ++i) {
      const T sign = (i == 0) ? 1 : -1;
      const T alpha = sign * top_diff / static_cast<T>(num);
      T* bout = bottom_diff[i];
      for (int j = 0; j < num; ++j) {
        if (static_cast<int>(sim[j])) {
          caffe_cpu_axpby(channels, alpha, diff.data() + j * channels, T(0.0), bout + j * channels);
        } else {
          T mdist(0.0), beta(0.0);
          if (legacy_version) {
            mdist = margin - dist_sq[j];
            beta = -alpha;
          } else {
            T dist = std::sqrt(dist_sq[j]);
            mdist = margin - dist;
            beta = -alpha * mdist / (dist + T(1e-4));
          }
          if (mdist > T(0.0)) {
            caffe_cpu_axpby(channels, beta, diff.data() + j * channels, T(0.0), bout + j * channels);
          } else {
            caffe_set(channels, T(0), bout + j * channels);
          }
        }
      }
    }
  }
};

template <class T>
struct Inputs {
  Matrix<T> a, b, grad_a, grad_b;
  std::vector<T> sim;  // Caffe passes the similarity blob as Dtype
  T margin;
  Inputs(Index n, Index d)
      : a(uniform<T>(n, d, 1)), b(uniform<T>(n, d, 2)), grad_a(Matrix<T>::Zero(n, d)), grad_b(Matrix<T>::Zero(n, d)), sim(n),
        margin(T(std::sqrt(static_cast<double>(d)) * 0.8)) {
    const Eigen::VectorXi pattern = pk_labels(n, 2, 3).unaryExpr([](int v) { return v % 2; });
    for (Index i = 0; i < n; ++i) sim[i] = static_cast<T>(pattern(i));
  }
};

/// A peer that computes something else measures nothing: its loss and gradients must match
/// metricloss's scalar path (up to Caffe's float accumulation and its 1e-4 in the hadsell
/// gradient's denominator).
template <class T>
bool agrees_with_metricloss(CaffeContrastiveLayer<T>& layer, Inputs<T>& in, bool legacy) {
  const Index n = in.a.rows(), d = in.a.cols();
  const T caffe_loss = layer.forward_cpu(in.a.data(), in.b.data(), in.sim.data());
  layer.backward_cpu(T(1), in.sim.data(), in.grad_a.data(), in.grad_b.data());
  ml::ContrastiveLoss<T> loss(in.margin, legacy ? ml::ContrastiveForm::legacy : ml::ContrastiveForm::hadsell);
  Matrix<T> grad_a = Matrix<T>::Zero(n, d), grad_b = Matrix<T>::Zero(n, d);
  const Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>> sim(in.sim.data(), n);
  const T expected = loss.forward_backward(ml::scalar, in.a, in.b, sim, grad_a, grad_b);
  const double tolerance = std::is_same_v<T, float> ? 1e-3 : 1e-8;
  // Caffe's hadsell gradient divides by (d + 1e-4): about 1e-4 / d relative, d ~ 9 here.
  const double grad_tolerance = legacy ? tolerance : std::max(tolerance, 1e-4);
  const double scale = std::max<double>(grad_a.cwiseAbs().maxCoeff(), 1e-30);
  return std::abs(double(caffe_loss) - double(expected)) <= tolerance * std::abs(double(expected)) &&
         double((in.grad_a - grad_a).cwiseAbs().maxCoeff()) <= grad_tolerance * scale &&
         double((in.grad_b - grad_b).cwiseAbs().maxCoeff()) <= grad_tolerance * scale;
}

// Args: N, D, form (0 = hadsell, 1 = legacy), as BM_contrastive in contrastive.cpp.
template <class T>
void BM_contrastive_caffe(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  const bool legacy = state.range(2) == 1;
  openblas_set_num_threads(1);  // Caffe's CPU layer runs on one thread here, as metricloss
  Inputs<T> in(n, d);
  CaffeContrastiveLayer<T> layer(static_cast<int>(n), static_cast<int>(d), in.margin, legacy);
  if (!agrees_with_metricloss(layer, in, legacy)) {
    state.SkipWithError("the Caffe peer disagrees with metricloss's scalar path");
    return;
  }
  for (auto _ : state) {
    T value = layer.forward_cpu(in.a.data(), in.b.data(), in.sim.data());
    layer.backward_cpu(T(1), in.sim.data(), in.grad_a.data(), in.grad_b.data());
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  // The useful bytes and FLOPs of the loss, as contrastive.cpp counts them (not Caffe's extra
  // traffic through diff_), so bytes/s compare like for like.
  set_rates(state, 4.0 * n * d * sizeof(T) + n * sizeof(int), 5.0 * n * d);
}

template <class T>
void BM_contrastive_caffe_forward(benchmark::State& state) {
  const Index n = state.range(0), d = state.range(1);
  openblas_set_num_threads(1);
  Inputs<T> in(n, d);
  CaffeContrastiveLayer<T> layer(static_cast<int>(n), static_cast<int>(d), in.margin, false);
  for (auto _ : state) {
    T value = layer.forward_cpu(in.a.data(), in.b.data(), in.sim.data());
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  set_rates(state, 2.0 * n * d * sizeof(T) + n * sizeof(int), 3.0 * n * d);
}

void sizes(benchmark::internal::Benchmark* b) {
  for (long n : {256L, 65536L})
    for (long form : {0L, 1L}) b->Args({n, 128, form});
  b->ArgNames({"N", "D", "form"});
}

}  // namespace

BENCHMARK_TEMPLATE(BM_contrastive_caffe, float)->Apply(sizes);
BENCHMARK_TEMPLATE(BM_contrastive_caffe, double)->Apply(sizes);
BENCHMARK_TEMPLATE(BM_contrastive_caffe_forward, float)->Args({256, 128})->Args({65536, 128});
BENCHMARK_MAIN();
