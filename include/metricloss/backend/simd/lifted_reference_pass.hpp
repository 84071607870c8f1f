#pragma once
// The steps of the lifted loss's simd path over a reference set (backend/simd/lifted_reference.hpp),
// in T lanes: the Q x R matrix of CrossDistances<T>, D = sqrt(D2) and the nearest negatives of
// every row and column (sweep 1), the shifted exp-sums of rows and columns (sweep 2), the
// O(|P|) pair terms in double on exact distances, and W = dL/dD2 (sweep 3), whose two products
// CrossDistances applies. No R x R.
//
// Precision (float). A negative's soft-max weight exp(nearest - D) errs relatively by the
// error dD of D; the product gives D to ~ eps (n_a + m_j) / (2 D) and T stores it to eps D
// (lifted_precision.hpp). Where a negative that carries weight (within window + slack D of
// its row's or its column's nearest) could err by more than lifted_tolerance, precise() says
// no and the caller runs the call in double; at ordinary scales (float, D <~ 100) one O(N_q +
// N_r) look settles it. Double keeps every entry (as the batch path: storage_unit = 0).
#include <metricloss/backend/simd/cross.hpp>
#include <metricloss/backend/simd/exact.hpp>
#include <metricloss/backend/simd/lifted_sweeps.hpp>
#include <metricloss/backend/simd/triangle.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/cross_classes.hpp>
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/detail/numerics.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

/// The buffers of one precision (a float functor keeps both: its calls in double use the
/// double ones).
template <class T>
struct LiftedReferenceWork {
  CrossDistances<T> cross;
  GrowOnlyBuffer<T> candidate_class;                // N_r: class ids as T (masks)
  GrowOnlyBuffer<T> column_paired;                  // N_r: 1 where in a positive pair, else 0
  GrowOnlyBuffer<T> row_nearest, col_nearest;       // the nearest negatives, in T
  GrowOnlyBuffer<T> col_partial;                    // N_r: column sums' lanes
  GrowOnlyBuffer<T> row_factor, col_factor;         // -c / s in T, for sweep 3
  GrowOnlyBuffer<T> pair_weight;                    // |P|: the pairs' W, in pair order
  GrowOnlyBuffer<double> row_sum, row_log, row_share;  // N_q: s, a, c
  GrowOnlyBuffer<double> col_sum, col_log, col_share;  // N_r: the same over Q
};

template <class T>
struct LiftedReferencePass {
  using batch = xsimd::batch<T>;
  static constexpr Index width = static_cast<Index>(batch::size);
  using Sweeps = LiftedSweeps<T>;

  LiftedReferenceWork<T>& w;
  const CrossClasses& classes;
  const MatrixView<const T> q, r;
  const double margin;
  const Index nq, nr;
  Index stride = 0;
  T *distance = nullptr, *cls = nullptr, *row_nearest = nullptr, *col_nearest = nullptr;
  double *row_log = nullptr, *col_log = nullptr, *row_sum = nullptr, *col_sum = nullptr;
  double *row_share = nullptr, *col_share = nullptr;

  LiftedReferencePass(LiftedReferenceWork<T>& work, const CrossClasses& c, const MatrixView<const T>& q_,
                      const MatrixView<const T>& r_, double margin_)
      : w(work), classes(c), q(q_), r(r_), margin(margin_), nq(q_.rows), nr(r_.rows) {}

  static T own_value(Index c) { return static_cast<T>(c); }  // -1 (no class in R) matches none

  /// Sweep 1: D2 by the product, D = sqrt(D2) (into the buffer W will take) and the nearest
  /// negative of every row (row-wise) and column (lane-wise into col_nearest).
  void distances() {
    w.cross.compute(q, r);
    stride = w.cross.stride();
    distance = w.cross.weights_to_fill().data();  // D, until sweep 3 turns it into W in place
    cls = w.candidate_class.data(static_cast<std::size_t>(nr));
    for (Index j = 0; j < nr; ++j) cls[j] = static_cast<T>(classes.class_of(j));
    row_nearest = w.row_nearest.data(static_cast<std::size_t>(nq));
    col_nearest = w.col_nearest.data(static_cast<std::size_t>(nr));
    const T inf = std::numeric_limits<T>::infinity();
    std::fill(col_nearest, col_nearest + nr, inf);
    for (Index a = 0; a < nq; ++a)
      row_nearest[a] = Sweeps::template nearest_negative<true>(
          w.cross.squared_row(a), distance + a * stride, cls, own_value(classes.own_class(a)), nr, col_nearest);
  }

  /// Whether every negative that carries weight has its D in T to the tolerance (always,
  /// in double). First one look at the extremes; then, only if that cannot tell, each entry.
  bool precise() const {
    if constexpr (Numerics<T>::storage_unit == 0.0) {
      return true;
    } else {
      constexpr double eps = Numerics<T>::epsilon, unit = Numerics<T>::storage_unit,
                       tolerance = Numerics<T>::lifted_tolerance,
                       window = Numerics<T>::soft_max_window, slack = Numerics<T>::soft_max_slack;
      if (nr >= (Index(1) << 24)) return false;  // class ids exact in float below 2^24
      const T* norms = w.cross.centred_norms();
      double lo = std::numeric_limits<double>::infinity(), hi = 0.0, nq_max = 0.0, nr_max = 0.0;
      const auto extremes = [&](const T* nearest, const T* n, Index count, double& norm) {
        for (Index i = 0; i < count; ++i) {
          const double v = static_cast<double>(nearest[i]);
          lo = std::min(lo, v);
          if (v < std::numeric_limits<double>::infinity()) hi = std::max(hi, v);
          norm = std::max(norm, static_cast<double>(n[i]));
        }
      };
      extremes(row_nearest, norms, nq, nq_max);
      extremes(col_nearest, norms + nq, nr, nr_max);
      if (!(nq_max + nr_max < 0.25 * static_cast<double>(std::numeric_limits<T>::max())))
        return false;  // D2 itself may overflow T
      hi = (hi + window) / (1.0 - slack);
      if (lo > 0.0 && 2.0 * (unit * hi + eps * (nq_max + nr_max) / (2.0 * lo)) < tolerance) return true;
      const batch storage2(static_cast<T>(2.0 * unit)), e(static_cast<T>(eps)),
          two_tolerance(static_cast<T>(2.0 * tolerance)), reach0(static_cast<T>(window)),
          reach1(static_cast<T>(slack)), zero(T(0));
      for (Index a = 0; a < nq; ++a) {
        const T* row = distance + a * stride;
        const T own = own_value(classes.own_class(a));
        const batch own_class(own), own_nearest(row_nearest[a]), own_norm(norms[a]);
        Index j = 0;
        for (; j + width <= nr; j += width) {
          const batch d = batch::load_unaligned(row + j);
          const batch reach = reach0 + reach1 * d;
          const auto weighted =
              (d - own_nearest < reach) | (d - batch::load_unaligned(col_nearest + j) < reach);
          const auto imprecise = storage2 * d * d + e * (own_norm + batch::load_unaligned(norms + nq + j)) >
                                 two_tolerance * d;
          if (xsimd::any((batch::load_unaligned(cls + j) != own_class) & weighted & imprecise & (d > zero)))
            return false;
        }
        for (; j < nr; ++j) {
          const T d = row[j];
          const T reach = static_cast<T>(window) + static_cast<T>(slack) * d;
          if (cls[j] != own && d > T(0) && (d - row_nearest[a] < reach || d - col_nearest[j] < reach) &&
              static_cast<T>(2.0 * unit) * d * d + static_cast<T>(eps) * (norms[a] + norms[nq + j]) >
                  static_cast<T>(2.0 * tolerance) * d)
            return false;
        }
      }
      return true;
    }
  }

  /// Sweep 2: s = sum exp(nearest - D) over the negatives of each row (lane sums in T over
  /// blocks, totalled in double) and of each column (ColumnSums: T lanes, flushed to double
  /// every 32 rows); then a = margin - nearest + log s. Only the columns in a positive pair
  /// have their s and a read (by the pairs, and by sweep 3 where c != 0), so a batch of columns
  /// with none skips its exponentials: in a cross-batch memory most rows of R share no class
  /// with Q (97 % in bench_reference), and the column exponentials are half of this sweep.
  void normalisers() {
    T* paired = w.column_paired.data(static_cast<std::size_t>(nr));
    std::fill(paired, paired + nr, T(0));
    for_each_pair([&](Index, Index j) { paired[j] = T(1); });
    row_sum = w.row_sum.data(static_cast<std::size_t>(nq));
    row_log = w.row_log.data(static_cast<std::size_t>(nq));
    col_log = w.col_log.data(static_cast<std::size_t>(nr));
    ColumnSums<T> columns(w.col_partial, w.col_sum, nr);
    col_sum = columns.total;
    const T inf = std::numeric_limits<T>::infinity();
    for (Index a = 0; a < nq; ++a) {
      const double total = Sweeps::shifted_exp_sums(distance + a * stride, cls, own_value(classes.own_class(a)),
                                                    row_nearest[a], col_nearest, nr, columns.partial, paired);
      row_sum[a] = row_nearest[a] < inf ? total : 0.0;  // no negative: the clamp's e^floor terms
      row_log[a] = lifted_log_normaliser(margin, static_cast<double>(row_nearest[a]), row_sum[a]);
      columns.rectangle_row_done(a);
    }
    columns.finish();
    for (Index j = 0; j < nr; ++j) {
      if (!(col_nearest[j] < inf)) col_sum[j] = 0.0;
      col_log[j] = lifted_log_normaliser(margin, static_cast<double>(col_nearest[j]), col_sum[j]);
    }
  }

  /// The positive pairs, on distances by differences in double: returns sum h^2; with the
  /// gradient, each row's and column's c = sum h share and the pairs' W = h / (2 D), in
  /// pair order.
  double pair_terms(bool gradient) {
    row_share = w.row_share.data(static_cast<std::size_t>(nq));
    col_share = w.col_share.data(static_cast<std::size_t>(nr));
    std::fill(row_share, row_share + nq, 0.0);
    std::fill(col_share, col_share + nr, 0.0);
    T* pair_weight = gradient ? w.pair_weight.data(static_cast<std::size_t>(classes.positive_pairs())) : nullptr;
    double sum = 0.0;
    for_each_pair([&](Index a, Index j) {
      const double d = std::sqrt(exact_squared_distance(q.row(a), r.row(j), q.cols));
      const LiftedPair pair = lifted_pair(row_log[a], col_log[j], d);
      sum += pair.hinge * pair.hinge;
      if (!gradient) return;
      row_share[a] += pair.hinge * pair.share_i;
      col_share[j] += pair.hinge * pair.share_j;
      *pair_weight++ = static_cast<T>(weight_on_squared(pair.hinge, d));
    });
    return sum;
  }

  /// f(a, j) for the positive pairs, row by row.
  template <class F>
  void for_each_pair(F&& f) const {
    for (Index a = 0; a < nq; ++a)
      for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p)
        if (*p != classes.self(a)) f(a, *p);
  }

  /// Sweep 3, every entry of W over D (weights_to_fill, where distances() put D): on the
  /// negatives
  ///   W_aj = (f_a exp(nearest_a - D) + g_j exp(nearest_j - D)) / (2 D)
  /// (0 at D = 0), f = -c / s of the row, g of the column; the pairs' weights; 0 elsewhere.
  /// One buffer for D and W: a N_q x N_r matrix less to keep and to stream through.
  void weights() {
    T* out_weights = distance;
    T* row_factor = w.row_factor.data(static_cast<std::size_t>(nq));
    T* col_factor = w.col_factor.data(static_cast<std::size_t>(nr));
    for (Index a = 0; a < nq; ++a)
      row_factor[a] = static_cast<T>(row_share[a] != 0.0 ? -row_share[a] / row_sum[a] : 0.0);
    for (Index j = 0; j < nr; ++j)
      col_factor[j] = static_cast<T>(col_share[j] != 0.0 ? -col_share[j] / col_sum[j] : 0.0);
    const T inf = std::numeric_limits<T>::infinity();
    for (Index a = 0; a < nq; ++a) {
      const T* row = distance + a * stride;
      T* out = out_weights + a * stride;
      const T own = own_value(classes.own_class(a));
      const batch own_class(own), shift(row_nearest[a]), factor(row_factor[a]), zero(T(0)), far(inf);
      Index j = 0;
      for (; j + width <= nr; j += width) {
        const auto negative = batch::load_unaligned(cls + j) != own_class;
        const batch d = batch::load_unaligned(row + j);
        const batch nd = xsimd::select(negative, d, far);
        // g = 0 in every lane (no column of the batch in a pair with weight): g exp(...) is
        // +0 (the exp is finite), so adding +0 instead gives the same bits.
        const batch g = batch::load_unaligned(col_factor + j);
        const batch row_part = factor * Sweeps::clamped_exp(shift - nd);
        const batch both = xsimd::all(g == zero)
                               ? row_part + zero
                               : row_part + g * Sweeps::clamped_exp(batch::load_unaligned(col_nearest + j) - nd);
        xsimd::select(negative & (d > zero), both / (d + d), zero).store_unaligned(out + j);
      }
      for (; j < nr; ++j) {
        const T d = row[j];
        out[j] = cls[j] != own && d > T(0)
                     ? (row_factor[a] * Sweeps::clamped_exp(row_nearest[a] - d) +
                        col_factor[j] * Sweeps::clamped_exp(col_nearest[j] - d)) / (d + d)
                     : T(0);
      }
    }
    const T* pair_weight = w.pair_weight.data(0);
    for_each_pair([&](Index a, Index j) { out_weights[a * stride + j] = *pair_weight++; });
  }
};

}  // namespace detail
}  // namespace metricloss
