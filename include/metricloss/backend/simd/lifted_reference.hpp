#pragma once
// The SIMD path of LiftedStructureLoss over queries Q against a reference set R: Q x R
// distances by one product on the jointly centred rows (CrossDistances, recomputed by
// differences where the product cancels), row normalisers over R and column normalisers
// over Q from two sweeps of that matrix in double lanes, one J per ordered positive pair,
// W = dL/dD2 on the same matrix, and dQ, dR by CrossDistances' two products. No R x R.
// Everything runs in double: a float call is widened (its precision plan is the batch path's
// and has not been ported yet; the double product costs about twice the float one).
#include <metricloss/backend/simd/cross.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/cross_classes.hpp>
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/lifted_structure.hpp>
#include <metricloss/reference.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

/// What the simd reference-set path of the lifted loss keeps (in the functor's slot).
struct SimdLiftedReferenceScratch : BackendSlot::Contents {
  CrossClasses classes;
  CrossDistances<double> cross;
  GrowOnlyBuffer<double> distance;                                  // N_q x stride: D
  GrowOnlyBuffer<double> candidate_class;                           // N_r: class ids (masks)
  GrowOnlyBuffer<double> row_nearest, row_sum, row_log, row_share;  // N_q: over R
  GrowOnlyBuffer<double> col_nearest, col_sum, col_log, col_share;  // N_r: over Q
  AlignedBuffer<double> q_wide, r_wide, gq_wide, gr_wide;           // a float call in double
};

/// exp of an argument clamped to [exp_floor, 0]: the negatives' arguments are nearest - D <= 0,
/// and the lanes that are no negative (masked out after) may hold +inf (a row or column
/// without negatives); xsimd 8.1's double exp converts its exponent to int64 with a scalar
/// cast, undefined for infinities, NaN and below about -6.4e18 (see lifted_sweeps.hpp).
inline xsimd::batch<double> bounded_exp(const xsimd::batch<double>& argument) {
  using B = xsimd::batch<double>;
  return xsimd::exp(xsimd::min(xsimd::max(argument, B(Numerics<double>::exp_floor)), B(0.0)));
}

/// The lanes of one query row against R: f(j, lanes of D, negative mask) over full batches,
/// then g(j) for the tail.
template <class Lanes, class Tail>
void for_each_negative_lane(const double* row, const double* candidate_class, Index nr,
                            double own, Lanes&& lanes, Tail&& tail) {
  using B = xsimd::batch<double>;
  constexpr Index width = static_cast<Index>(B::size);
  const B own_class(own);
  Index j = 0;
  for (; j + width <= nr; j += width)
    lanes(j, B::load_unaligned(row + j), B::load_unaligned(candidate_class + j) != own_class);
  for (; j < nr; ++j)
    if (candidate_class[j] != own) tail(j, row[j]);
}

/// The loss in double on double views; grad_q and grad_r (either may be empty) written.
inline double simd_lifted_reference_in_double(SimdLiftedReferenceScratch& work, double margin,
                                              const MatrixView<const double>& q,
                                              const MatrixView<const double>& r,
                                              const MatrixView<double>& grad_q,
                                              const MatrixView<double>& grad_r, double top_diff) {
  using B = xsimd::batch<double>;
  const CrossClasses& classes = work.classes;
  const Index nq = q.rows, nr = r.rows;
  const double pairs = static_cast<double>(classes.positive_pairs());
  if (pairs == 0.0) {
    fill_rows(grad_q, 0.0);
    fill_rows(grad_r, 0.0);
    return 0.0;
  }
  CrossDistances<double>& cross = work.cross;
  cross.compute(q, r);
  const Index stride = cross.stride();
  double* distance = work.distance.data(static_cast<std::size_t>(nq * stride));
  for (Index a = 0; a < nq; ++a) {
    const double* squared = cross.squared_row(a);
    for (Index j = 0; j < nr; ++j) distance[a * stride + j] = std::sqrt(squared[j]);
  }
  double* cls = work.candidate_class.data(static_cast<std::size_t>(nr));
  for (Index j = 0; j < nr; ++j) cls[j] = static_cast<double>(classes.class_of(j));
  const double inf = std::numeric_limits<double>::infinity();
  double* row_nearest = work.row_nearest.data(static_cast<std::size_t>(nq));
  double* row_sum = work.row_sum.data(static_cast<std::size_t>(nq));
  double* row_log = work.row_log.data(static_cast<std::size_t>(nq));
  double* row_share = work.row_share.data(static_cast<std::size_t>(nq));
  double* col_nearest = work.col_nearest.data(static_cast<std::size_t>(nr));
  double* col_sum = work.col_sum.data(static_cast<std::size_t>(nr));
  double* col_log = work.col_log.data(static_cast<std::size_t>(nr));
  double* col_share = work.col_share.data(static_cast<std::size_t>(nr));
  std::fill(col_nearest, col_nearest + nr, inf);
  std::fill(col_sum, col_sum + nr, 0.0);

  // Sweep 1: nearest negatives of every row and column.
  for (Index a = 0; a < nq; ++a) {
    const double* row = distance + a * stride;
    B best(inf);
    double tail_best = inf;
    for_each_negative_lane(row, cls, nr, static_cast<double>(classes.own_class(a)),
        [&](Index j, const B& d, const auto& negative) {
          const B masked = xsimd::select(negative, d, B(inf));
          best = xsimd::min(best, masked);
          xsimd::min(B::load_unaligned(col_nearest + j), masked).store_unaligned(col_nearest + j);
        },
        [&](Index j, double d) {
          tail_best = std::min(tail_best, d);
          col_nearest[j] = std::min(col_nearest[j], d);
        });
    double lanes[B::size];
    best.store_unaligned(lanes);
    for (const double v : lanes) tail_best = std::min(tail_best, v);
    row_nearest[a] = tail_best;
  }
  // Sweep 2: the shifted exp-sums (each term <= 1: shifted by the nearest).
  for (Index a = 0; a < nq; ++a) {
    const double* row = distance + a * stride;
    const B shift(row_nearest[a]);
    B sum(0.0);
    double tail_sum = 0.0;
    for_each_negative_lane(row, cls, nr, static_cast<double>(classes.own_class(a)),
        [&](Index j, const B& d, const auto& negative) {
          sum += xsimd::select(negative, bounded_exp(shift - d), B(0.0));
          const B shifted = B::load_unaligned(col_nearest + j) - d;
          const B column = xsimd::select(negative, bounded_exp(shifted), B(0.0));
          (B::load_unaligned(col_sum + j) + column).store_unaligned(col_sum + j);
        },
        [&](Index j, double d) {
          tail_sum += std::exp(row_nearest[a] - d);
          col_sum[j] += std::exp(col_nearest[j] - d);
        });
    row_sum[a] = xsimd::hadd(sum) + tail_sum;
    row_log[a] = lifted_log_normaliser(margin, row_nearest[a], row_sum[a]);
  }
  for (Index j = 0; j < nr; ++j)
    col_log[j] = lifted_log_normaliser(margin, col_nearest[j], col_sum[j]);

  // Positive pairs: the loss, the normalisers' coefficients, the positive weights.
  const bool gradient = !grad_q.empty() || !grad_r.empty();
  std::fill(row_share, row_share + nq, 0.0);
  std::fill(col_share, col_share + nr, 0.0);
  double* w = gradient ? cross.zeroed_weights().data() : nullptr;
  double sum = 0.0;
  for (Index a = 0; a < nq; ++a)
    for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p) {
      const Index j = *p;
      if (j == classes.self(a)) continue;
      const double d = distance[a * stride + j];
      const LiftedPair pair = lifted_pair(row_log[a], col_log[j], d);
      sum += pair.hinge * pair.hinge;
      if (!gradient) continue;
      row_share[a] += pair.hinge * pair.share_i;
      col_share[j] += pair.hinge * pair.share_j;
      w[a * stride + j] = weight_on_squared(pair.hinge, d);
    }
  if (!gradient) return sum / (2.0 * pairs);

  // Sweep 3: negative weights from both soft-maxes, -(c_a p_aj + c_j p_aj') / (2 D).
  for (Index j = 0; j < nr; ++j)  // now the column factors, -c_j / s_j
    col_share[j] = col_share[j] != 0.0 ? -col_share[j] / col_sum[j] : 0.0;
  for (Index a = 0; a < nq; ++a) {
    const double* row = distance + a * stride;
    double* wrow = w + a * stride;
    const double row_factor = row_share[a] != 0.0 ? -row_share[a] / row_sum[a] : 0.0;
    const B shift(row_nearest[a]), factor(row_factor);
    for_each_negative_lane(row, cls, nr, static_cast<double>(classes.own_class(a)),
        [&](Index j, const B& d, const auto& negative) {
          const B column = B::load_unaligned(col_share + j) *
                           bounded_exp(B::load_unaligned(col_nearest + j) - d);
          const B part = factor * bounded_exp(shift - d) + column;
          const B weight = xsimd::select(negative & (d > B(0.0)), part / (B(2.0) * d), B(0.0));
          (B::load_unaligned(wrow + j) + weight).store_unaligned(wrow + j);  // keeps positives
        },
        [&](Index j, double d) {
          wrow[j] += lifted_negative_weight(row_factor, std::exp(row_nearest[a] - d), d) +
                    lifted_negative_weight(col_share[j], std::exp(col_nearest[j] - d), d);
        });
  }
  cross.gradients(top_diff / pairs, grad_q, grad_r);
  return sum / (2.0 * pairs);
}

template <class T>
struct ReferenceBackend<LiftedStructureLoss<T>, simd_tag> {
  static constexpr bool available = true;

  template <class L, class LR>
  static T forward_backward(LiftedStructureLoss<T>& loss, simd_tag, const MatrixView<const T>& q,
                            const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                            const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
    auto& work = scratch_of<SimdLiftedReferenceScratch>(loss);
    if (reference_not_finite(work.classes, q, labels, ref, grad_q, grad_r))
      return std::numeric_limits<T>::quiet_NaN();
    const double margin = static_cast<double>(loss.margin);
    if constexpr (std::is_same<T, double>::value) {
      return simd_lifted_reference_in_double(work, margin, q, ref.r, grad_q, grad_r, top_diff);
    } else {
      const auto widened = [](AlignedBuffer<double>& buffer, const MatrixView<const T>& m) {
        double* out = buffer.data(static_cast<std::size_t>(m.rows * m.cols));
        for (Index i = 0; i < m.rows; ++i)
          for (Index c = 0; c < m.cols; ++c) out[i * m.cols + c] = static_cast<double>(m(i, c));
        return MatrixView<const double>{out, m.rows, m.cols, m.cols};
      };
      const auto wide_gradient = [](AlignedBuffer<double>& buffer, const MatrixView<T>& g) {
        if (g.empty()) return MatrixView<double>{};
        return MatrixView<double>{buffer.data(static_cast<std::size_t>(g.rows * g.cols)), g.rows,
                                  g.cols, g.cols};
      };
      const MatrixView<double> gq = wide_gradient(work.gq_wide, grad_q);
      const MatrixView<double> gr = wide_gradient(work.gr_wide, grad_r);
      const double value = simd_lifted_reference_in_double(
          work, margin, widened(work.q_wide, q), widened(work.r_wide, ref.r), gq, gr,
          static_cast<double>(top_diff));
      const auto narrow = [](const MatrixView<double>& from, const MatrixView<T>& to) {
        for (Index i = 0; i < from.rows; ++i)
          for (Index c = 0; c < from.cols; ++c) to(i, c) = static_cast<T>(from(i, c));
      };
      narrow(gq, grad_q);
      narrow(gr, grad_r);
      return static_cast<T>(value);
    }
  }
};

}  // namespace detail
}  // namespace metricloss
