#pragma once
// The SIMD path of ContrastiveLoss. Rows of up to 8 KiB per input go through one
// software-pipelined pass, as TripletLoss's rows (backend/simd/triplet.hpp): while row i's
// root, division and gradients are computed, row i + 1's squared distance is loaded and
// reduced, so that row i's stores wait only on its own coefficient, and the loads of the
// next row are already under way. Longer rows take contrastive_forward_backward's one pass
// per row with SimdRowOps::fused_pair.
#include <metricloss/backend/simd/rowops.hpp>
#include <metricloss/contrastive.hpp>

#include <xsimd/xsimd.hpp>

namespace metricloss {
namespace detail {

#if defined(__GNUC__) || defined(__clang__)
#define METRICLOSS_SIMD_CONTRASTIVE_COLD __attribute__((noinline, cold))
#elif defined(_MSC_VER)
#define METRICLOSS_SIMD_CONTRASTIVE_COLD __declspec(noinline)
#else
#define METRICLOSS_SIMD_CONTRASTIVE_COLD
#endif

/// The gradient rows of a pair whose coefficient does not fit in T, scaled in double. Out of
/// line, so that its scalar loops stay out of the row loop.
template <class T>
METRICLOSS_SIMD_CONTRASTIVE_COLD void contrastive_gradients_in_double(T* grad_a, T* grad_b,
                                                                     const T* a, const T* b,
                                                                     double c, Index d) {
  ScalarRowOps::scaled_difference(grad_a, grad_b, a, b, c, d);
}

/// contrastive_forward_backward<SimdRowOps> for rows of exactly `Batches` full batches
/// (Batches < 0: counted at run time) and a tail shorter than one; `Wanted` is the set of
/// gradients written (1: grad_a, 2: grad_b). The arithmetic of SimdRowOps::fused_pair (lane
/// sums over even and odd batches, the tail's differences in T added in double; gradients
/// c (a - b) and -c (a - b) in T), so its results have the same bits.
///
/// Software-pipelined: iteration i loads and reduces row i + 1, then takes row i's term and
/// coefficient (contrastive_pair_from_distance, the root without libm's errno call) and
/// writes its gradients, reloading a - b from L1. In one pass per row, each row's stores
/// waited on the chain from its loads through the reduction, the root and the division, and
/// a mispredicted hinge threw the next row's loads away with them: hadsell took 1.2-1.65x
/// the streaming floor at N = 256, D = 128 (float), by run. Deeper pipelines (coefficients
/// one row or one block of 8 rows ahead of the stores) measured slower.
template <Index Batches, int Wanted, class T, class Source>
double contrastive_rows_pipelined(const MatrixView<const T>& a_view,
                                  const MatrixView<const T>& b_view, const Source& similarity,
                                  double margin, ContrastiveForm form,
                                  const MatrixView<T>& grad_a_view,
                                  const MatrixView<T>& grad_b_view, double top_diff) {
  using batch = xsimd::batch<T>;
  constexpr Index width = static_cast<Index>(batch::size);
  constexpr bool want_a = (Wanted & 1) != 0, want_b = (Wanted & 2) != 0;
  // Copies: the loop then keeps the pointers and strides in registers.
  const MatrixView<const T> a = a_view, b = b_view;
  const MatrixView<T> grad_a = grad_a_view, grad_b = grad_b_view;
  const Index n = a.rows, d = a.cols;
  const Index batches = Batches >= 0 ? Batches : d / width;
  const Index tail_begin = batches * width;
  const double scale = top_diff / static_cast<double>(n);
  const bool hadsell = form == ContrastiveForm::hadsell;
  double sum = 0.0;

  const auto squared_distance = [&](Index i) {
    const T *x = a.row(i), *y = b.row(i);
    batch acc0(T(0)), acc1(T(0));
    for (Index k = 0; k < batches; ++k) {
      const batch diff = batch::load_unaligned(x + k * width) - batch::load_unaligned(y + k * width);
      if (k % 2 == 0)
        acc0 = xsimd::fma(diff, diff, acc0);
      else
        acc1 = xsimd::fma(diff, diff, acc1);
    }
    double squared = batches > 0 ? static_cast<double>(xsimd::hadd(acc0 + acc1)) : 0.0;
    for (Index j = tail_begin; j < d; ++j) {
      const T t = x[j] - y[j];
      squared += static_cast<double>(t) * static_cast<double>(t);
    }
    return squared;
  };

  const auto gradients = [&](Index i, double coefficient) {
    const T *x = a.row(i), *y = b.row(i);
    T* ga = want_a ? grad_a.row(i) : nullptr;
    T* gb = want_b ? grad_b.row(i) : nullptr;
    if (!SimdRowOps::fits<T>(coefficient)) {
      contrastive_gradients_in_double(ga, gb, x, y, coefficient, d);
      return;
    }
    const T c = static_cast<T>(coefficient);
    const batch positive(c), negative(-c);
    for (Index k = 0; k < batches; ++k) {
      const batch diff = batch::load_unaligned(x + k * width) - batch::load_unaligned(y + k * width);
      if constexpr (want_a) (positive * diff).store_unaligned(ga + k * width);
      if constexpr (want_b) (negative * diff).store_unaligned(gb + k * width);
    }
    for (Index j = tail_begin; j < d; ++j) {
      const T t = x[j] - y[j];
      if constexpr (want_a) ga[j] = c * t;
      if constexpr (want_b) gb[j] = -c * t;
    }
  };

  // The squared distance of row i, reduced in the iteration before.
  double squared = n > 0 ? squared_distance(0) : 0.0;
  for (Index i = 0; i < n; ++i) {
    const double next = i + 1 < n ? squared_distance(i + 1) : 0.0;
    const double distance = hadsell ? square_root(squared) : squared;
    const PairTerm t = contrastive_pair_from_distance(squared, distance, similarity(i), margin, form);
    sum += t.term;
    if constexpr (Wanted != 0) gradients(i, scale * t.coefficient);
    squared = next;
  }
  return sum / (2.0 * static_cast<double>(n));
}

template <class T>
struct Backend<ContrastiveLoss<T>, simd_tag> {
  template <class Source>
  static T forward_backward(ContrastiveLoss<T>& loss, simd_tag, const MatrixView<const T>& a,
                            const MatrixView<const T>& b, const Source& similarity,
                            const MatrixView<T>& grad_a, const MatrixView<T>& grad_b,
                            T top_diff) {
    constexpr Index width = static_cast<Index>(xsimd::batch<T>::size);
    const int wanted = (grad_a.empty() ? 0 : 1) | (grad_b.empty() ? 0 : 2);
    const Args<Source> args{a, b, similarity, static_cast<double>(loss.margin), loss.form,
                            grad_a, grad_b, static_cast<double>(top_diff)};
    switch (a.cols / width) {
      case 0: return static_cast<T>(by_wanted<0>(wanted, args));
      case 1: return static_cast<T>(by_wanted<1>(wanted, args));
      case 2: return static_cast<T>(by_wanted<2>(wanted, args));
      case 3: return static_cast<T>(by_wanted<3>(wanted, args));
      case 4: return static_cast<T>(by_wanted<4>(wanted, args));
      case 5: return static_cast<T>(by_wanted<5>(wanted, args));
      case 6: return static_cast<T>(by_wanted<6>(wanted, args));
      case 7: return static_cast<T>(by_wanted<7>(wanted, args));
      case 8: return static_cast<T>(by_wanted<8>(wanted, args));
      // D = 128 in 8 lanes (float on AVX2, double on AVX-512), unrolled: hadsell went from
      // 1.4-1.5x to 1.1x the streaming floor at N = 256, D = 128, float, AVX2.
      case 16: return static_cast<T>(by_wanted<16>(wanted, args));
      default:
        // Two rows of both inputs (the one being written and the next) stay in L1.
        if (a.cols * static_cast<Index>(sizeof(T)) <= 8192)
          return static_cast<T>(by_wanted<-1>(wanted, args));
        return static_cast<T>(contrastive_forward_backward<SimdRowOps>(
            a, b, similarity, loss.margin, loss.form, grad_a, grad_b, top_diff));
    }
  }

 private:
  template <class Source>
  struct Args {
    const MatrixView<const T>& a;
    const MatrixView<const T>& b;
    const Source& similarity;
    double margin;
    ContrastiveForm form;
    const MatrixView<T>& grad_a;
    const MatrixView<T>& grad_b;
    double top_diff;
  };

  template <Index Batches, int Wanted, class Source>
  static double run(const Args<Source>& x) {
    return contrastive_rows_pipelined<Batches, Wanted, T>(x.a, x.b, x.similarity, x.margin,
                                                          x.form, x.grad_a, x.grad_b, x.top_diff);
  }

  template <Index Batches, class Source>
  static double by_wanted(int wanted, const Args<Source>& x) {
    switch (wanted) {
      case 0: return run<Batches, 0>(x);
      case 1: return run<Batches, 1>(x);
      case 2: return run<Batches, 2>(x);
      default: return run<Batches, 3>(x);
    }
  }
};

}  // namespace detail
}  // namespace metricloss

#undef METRICLOSS_SIMD_CONTRASTIVE_COLD
