#pragma once
// The row loop of TripletLoss's SIMD path (dispatched in backend/simd/triplet.hpp). Rows of
// up to 8 KiB per input go through one software-pipelined pass: while row i's roots, hinge
// and gradients are computed, row i + 1's squared distances are loaded and reduced, so that
// row i's stores wait only on its roots and division, not on its loads and reduction too.
// Each input row comes from memory once (the gradients reread it from L1) and each output
// row is written once. Up to 8 batches per row the batch count is a template argument
// (fully unrolled), beyond it a run-time count. triplet_forward_backward's block pass (the
// distances of 16 rows, then their gradients from L1) serialises a read phase and a write
// phase, which at L2-resident sizes do not overlap: at N = 256, D = 128 it took 1.4-2.0x
// the streaming floor, and in double at D = 128 it was 1.2x the time of the pipelined pass.
// Longer rows, which no longer fit twice in L1, take the block pass. Rows whose hinge lies
// near its kink against the lanes' rounding are recomputed in double, as there.
#include <metricloss/backend/simd/rowops.hpp>
#include <metricloss/triplet.hpp>

#include <xsimd/xsimd.hpp>

#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

/// distance_from_squared with square_root.
inline DistanceTerm distance_term(double squared, Distance distance) {
  const double d = distance == Distance::squared_euclidean ? squared : square_root(squared);
  return {d, distance_derivative(d, distance)};
}

#if defined(__GNUC__) || defined(__clang__)
#define METRICLOSS_SIMD_TRIPLET_COLD __attribute__((noinline, cold))
#elif defined(_MSC_VER)
#define METRICLOSS_SIMD_TRIPLET_COLD __declspec(noinline)
#else
#define METRICLOSS_SIMD_TRIPLET_COLD
#endif

/// The gradient rows of a triplet whose coefficient does not fit in T, scaled in double.
/// Out of line: inlined, its scalar loops make the row loop of every other row ~20% slower.
template <class T>
METRICLOSS_SIMD_TRIPLET_COLD void triplet_gradients_in_double(T* grad_a, T* grad_p, T* grad_n,
                                                             const T* a, const T* p, const T* n,
                                                             double c_p, double c_n, Index d) {
  ScalarRowOps::triplet_gradients(grad_a, grad_p, grad_n, a, p, n, c_p, c_n, d);
}

/// The coefficients of one row's gradients: grad_a = c_p (a - p) - c_n (a - n),
/// grad_p = -c_p (a - p), grad_n = c_n (a - n).
struct TripletCoefficients {
  double c_p = 0.0;
  double c_n = 0.0;
};

/// triplet_forward_backward for rows of exactly `Batches` full batches (Batches < 0: counted
/// at run time) and a tail shorter than one; `Wanted` is the set of gradients written (1:
/// anchor, 2: positive, 4: negative), so that the row loop has no branches on it. The arithmetic of SimdRowOps'
/// anchor_squared_distances and triplet_gradients, so every subset of the gradients has the
/// same bits.
///
/// Software-pipelined: iteration i loads and reduces the squared distances of row i + 1,
/// then takes the roots, the hinge and the coefficients of row i and writes its gradients,
/// reloading its a - p and a - n from L1. In one pass per row (a - p and a - n kept in
/// registers) the row's 24 stores waited on the chain from its loads through the reduction,
/// two square roots and a division (~100 cycles), and with the store queue full the next
/// rows' loads could not start: 1.5-1.65x the floor at N = 256, D = 128 with Euclidean
/// distances, 1.2-1.27x pipelined. A third stage (the coefficients one row ahead too)
/// measured the same. A branch-free hinge with masked stores was slower (1.7x): every row's
/// stores then waited on the chain, where a predicted inactive row stores its zeros at once.
template <Index Batches, int Wanted, class T>
double triplet_rows_pipelined(const MatrixView<const T>& anchor_view,
                              const MatrixView<const T>& positive_view,
                              const MatrixView<const T>& negative_view, double margin,
                              Distance distance, const MatrixView<T>& grad_anchor_view,
                              const MatrixView<T>& grad_positive_view,
                              const MatrixView<T>& grad_negative_view, double top_diff) {
  using batch = xsimd::batch<T>;
  constexpr Index width = static_cast<Index>(batch::size);
  // Batches < 0: as many as the row holds, counted at run time (long rows).
  const Index batches = Batches >= 0 ? Batches : anchor_view.cols / width;
  const Index tail_begin = batches * width;
  constexpr bool want_a = (Wanted & 1) != 0, want_p = (Wanted & 2) != 0, want_n = (Wanted & 4) != 0;
  // Copies: the loop then keeps the pointers and strides in registers.
  const MatrixView<const T> anchor = anchor_view, positive = positive_view, negative = negative_view;
  const MatrixView<T> grad_anchor = grad_anchor_view, grad_positive = grad_positive_view,
                      grad_negative = grad_negative_view;
  const Index n = anchor.rows, d = anchor.cols;
  const double scale = 2.0 * top_diff / static_cast<double>(n);
  const double unit = SimdRowOps::sum_rounding_unit<T>(d);
  double sum = 0.0;

  const auto squared_distances = [&](Index i, double& squared_positive, double& squared_negative) {
    const T *a = anchor.row(i), *p = positive.row(i), *q = negative.row(i);
    batch acc_p0(T(0)), acc_p1(T(0)), acc_n0(T(0)), acc_n1(T(0));
    for (Index k = 0; k < batches; ++k) {
      const batch x = batch::load_unaligned(a + k * width);
      const batch to_p = x - batch::load_unaligned(p + k * width);
      const batch to_n = x - batch::load_unaligned(q + k * width);
      if (k % 2 == 0) {
        acc_p0 = xsimd::fma(to_p, to_p, acc_p0);
        acc_n0 = xsimd::fma(to_n, to_n, acc_n0);
      } else {
        acc_p1 = xsimd::fma(to_p, to_p, acc_p1);
        acc_n1 = xsimd::fma(to_n, to_n, acc_n1);
      }
    }
    squared_positive = batches > 0 ? static_cast<double>(xsimd::hadd(acc_p0 + acc_p1)) : 0.0;
    squared_negative = batches > 0 ? static_cast<double>(xsimd::hadd(acc_n0 + acc_n1)) : 0.0;
    ScalarRowOps::add_anchor_squared_distances(a, p, q, tail_begin, d, squared_positive, squared_negative);
  };

  // triplet_term, and triplet_forward_backward's recomputation in double of a row whose
  // hinge lies near its kink against the lanes' rounding (hinge_near_rounding), from one
  // pair of square roots. Adds the row's loss to sum (rows in order).
  const auto coefficients = [&](Index i, double squared_positive, double squared_negative) {
    DistanceTerm d_p = distance_term(squared_positive, distance);
    DistanceTerm d_n = distance_term(squared_negative, distance);
    double x = d_p.value - d_n.value + margin;
    if (hinge_within_rounding(x, d_p.value + d_n.value, unit)) {
      SimdRowOps::exact_anchor_squared_distances(anchor.row(i), positive.row(i), negative.row(i),
                                                 d, squared_positive, squared_negative);
      d_p = distance_term(squared_positive, distance);
      d_n = distance_term(squared_negative, distance);
      x = d_p.value - d_n.value + margin;
    }
    const HingeTerm h = hinge(x, /*soft_margin=*/false);
    sum += h.value;
    return TripletCoefficients{scale * (h.slope * d_p.derivative), scale * (h.slope * d_n.derivative)};
  };

  const auto gradients = [&](Index i, const TripletCoefficients& c) {
    T* ga = want_a ? grad_anchor.row(i) : nullptr;
    T* gp = want_p ? grad_positive.row(i) : nullptr;
    T* gn = want_n ? grad_negative.row(i) : nullptr;
    if (c.c_p == 0.0 && c.c_n == 0.0) {
      // Inactive: zeros, whatever the rows hold. Batch stores, not std::fill: a memset
      // call per row and output costs more than the row's arithmetic.
      const batch zero(T(0));
      for (Index k = 0; k < batches; ++k) {
        if constexpr (want_a) zero.store_unaligned(ga + k * width);
        if constexpr (want_p) zero.store_unaligned(gp + k * width);
        if constexpr (want_n) zero.store_unaligned(gn + k * width);
      }
      for (Index j = tail_begin; j < d; ++j) {
        if constexpr (want_a) ga[j] = T(0);
        if constexpr (want_p) gp[j] = T(0);
        if constexpr (want_n) gn[j] = T(0);
      }
      return;
    }
    const T *a = anchor.row(i), *p = positive.row(i), *q = negative.row(i);
    if (!SimdRowOps::fits<T>(c.c_p) || !SimdRowOps::fits<T>(c.c_n)) {
      triplet_gradients_in_double(ga, gp, gn, a, p, q, c.c_p, c.c_n, d);
      return;
    }
    const T cp = static_cast<T>(c.c_p), cn = static_cast<T>(c.c_n);
    const batch cpb(cp), cnb(cn);
    for (Index k = 0; k < batches; ++k) {
      const batch x = batch::load_unaligned(a + k * width);
      const batch scaled_p = cpb * (x - batch::load_unaligned(p + k * width));
      const batch to_n = x - batch::load_unaligned(q + k * width);
      if constexpr (want_a) xsimd::fnma(cnb, to_n, scaled_p).store_unaligned(ga + k * width);
      if constexpr (want_p) (-scaled_p).store_unaligned(gp + k * width);
      if constexpr (want_n) (cnb * to_n).store_unaligned(gn + k * width);
    }
    for (Index j = tail_begin; j < d; ++j) {
      const T scaled_p = cp * (a[j] - p[j]);
      if constexpr (want_a) ga[j] = multiply_add(-cn, a[j] - q[j], scaled_p);
      if constexpr (want_p) gp[j] = -scaled_p;
      if constexpr (want_n) gn[j] = cn * (a[j] - q[j]);
    }
  };

  // The squared distances of row i, reduced in the iteration before.
  double squared_positive = 0.0, squared_negative = 0.0;
  if (n > 0) squared_distances(0, squared_positive, squared_negative);
  for (Index i = 0; i < n; ++i) {
    double next_positive = 0.0, next_negative = 0.0;
    if (i + 1 < n) squared_distances(i + 1, next_positive, next_negative);
    const TripletCoefficients c = coefficients(i, squared_positive, squared_negative);
    if constexpr (Wanted != 0) gradients(i, c);
    squared_positive = next_positive;
    squared_negative = next_negative;
  }
  return sum / static_cast<double>(n);
}

}  // namespace detail
}  // namespace metricloss

#undef METRICLOSS_SIMD_TRIPLET_COLD
