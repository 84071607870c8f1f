#pragma once
// The precision plan of the lifted loss's simd path (backend/simd/lifted_structure.hpp) for
// its far pairs. A negative's soft-max weight is exp(nearest_i - D_ik): an absolute error dD
// in D_ik moves it by dD relatively, so the gradient (relative to its largest entry) errs by
// up to ~2 max dD over the terms that carry weight. The product's D errs by about
// eps (n_i + n_k) / (2 D) and T's storage of D by eps D, both growing with the scale of the
// data (float: 1e-4 of the largest gradient entry is lost near D ~ 1e3). So every negative
// within `window` of either row's nearest whose estimated error exceeds `tolerance` is
// recomputed by differences in double, kept in a short list, and summed in double; its
// entry in the T matrix becomes +inf, so that the vectorised sweeps give it weight 0. At
// ordinary scales (float, D <~ 200) nothing is recomputed. Where the list would hold a large
// share of the pairs (float, D of several hundred), the whole call runs in double instead
// when that is cheaper (in_double_pays, backend/simd/widen.hpp).
#include <metricloss/backend/simd/exact.hpp>
#include <metricloss/backend/simd/lifted_recomputed.hpp>
#include <metricloss/backend/simd/lifted_sweeps.hpp>
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/backend/simd/tuning.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/detail/numerics.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

template <class T>
struct LiftedPrecision : LiftedRecomputedList {
  using Sweeps = LiftedSweeps<T>;
  using batch = typename Sweeps::batch;
  static constexpr Index width = Sweeps::width;

  static constexpr bool is_float = std::is_same<T, float>::value;
  static constexpr double eps = Numerics<T>::epsilon;
  /// Error allowed in a weighted distance (detail/numerics.hpp).
  static constexpr double tolerance = Numerics<T>::lifted_tolerance;
  /// Relative error of D held in T, that a recompute in double removes. Above D ~
  /// tolerance / eps (double: ~1e5) the scalar path's exact distances err by eps D as well:
  /// at D >~ 1e6 API.md's 1e-10 is out of reach of every path in double.
  static constexpr double storage_unit = Numerics<T>::storage_unit;
  /// A negative farther than this beyond both rows' nearest weighs nothing.
  static constexpr double window = Numerics<T>::soft_max_window;
  /// ... once widened by slack D for the rounding of the distances that decide it.
  static constexpr double slack = Numerics<T>::soft_max_slack;

  /// Whether a float call with `imprecise` list entries runs faster in double (the cost
  /// model of backend/simd/tuning.hpp).
  static bool in_double_pays(Index imprecise, Index n, Index d) {
    using cost = tuning::lifted_in_double;
    const double entries = static_cast<double>(imprecise), dims = static_cast<double>(d);
    const double pairs = static_cast<double>(n) * static_cast<double>(n);
    return entries * (cost::entry + dims) > pairs * (cost::pair + cost::pair_per_dim * dims);
  }

  /// Whether the negative (i, k), k < i, at D_ik = dik carries weight in row i's or row k's
  /// soft-max (D_ik - nearest < window + slack D_ik) and its distance in T errs by more
  /// than the tolerance by the estimate of recompute_weighted: 2 D dD > 2 D tolerance, for
  /// D > 0 (D = 0 is exact).
  static bool imprecise_entry(Index i, Index k, T dik, const T* class_value, const T* nearest,
                              const T* norms) {
    if (class_value[k] == class_value[i] || !(dik > T(0))) return false;
    const T reach = static_cast<T>(window) + static_cast<T>(slack) * dik;
    if (!(dik - nearest[i] < reach || dik - nearest[k] < reach)) return false;
    return static_cast<T>(2.0 * storage_unit) * dik * dik + static_cast<T>(eps) * (norms[i] + norms[k]) >
           static_cast<T>(2.0 * tolerance) * dik;
  }

  /// Sweeps the lower triangle for imprecise_entry: on_batch(i, k, lanes) for each full
  /// batch of row i from k (lanes: imprecise_entry lane-wise), on_entry(i, k) for the row's
  /// tail; nothing in one O(N) look where no weighted distance can be imprecise (the usual
  /// case).
  template <class OnBatch, class OnEntry>
  static void sweep_imprecise(PairwiseDistances<T>& pairwise, const T* distance,
                              const T* class_value, const T* nearest, OnBatch&& on_batch,
                              OnEntry&& on_entry) {
    const Index n = pairwise.size(), rows = pairwise.stride();
    const T* norms = pairwise.centred_norms();
    const batch storage2(static_cast<T>(2.0 * storage_unit)), unit(static_cast<T>(eps)),
        two_tolerance(static_cast<T>(2.0 * tolerance)), reach0(static_cast<T>(window)),
        reach1(static_cast<T>(slack)), zero(T(0));
    // Weighted negatives have D in [lo, hi] (lo the least nearest, hi the greatest plus the
    // reach), where dD is at most the bound below.
    {
      double lo = std::numeric_limits<double>::infinity(), hi = 0.0, norm = 0.0;
      for (Index i = 0; i < n; ++i) {
        lo = std::min(lo, static_cast<double>(nearest[i]));
        hi = std::max(hi, static_cast<double>(nearest[i]));
        norm = std::max(norm, static_cast<double>(norms[i]));
      }
      hi = (hi + window) / (1.0 - slack);
      if (lo > 0.0 && hi < std::numeric_limits<double>::infinity() &&
          2.0 * (storage_unit * hi + eps * norm / lo) < tolerance)
        return;
    }
    for (Index i = 1; i < n; ++i) {
      const T* row = distance + i * rows;
      const batch own_class(class_value[i]), own_nearest(nearest[i]), own_norm(norms[i]);
      Index k = 0;
      for (; k + width <= i; k += width) {
        const batch dik = batch::load_unaligned(row + k);
        const batch reach = reach0 + reach1 * dik;
        const auto weighted =
            (dik - own_nearest < reach) | (dik - batch::load_unaligned(nearest + k) < reach);
        const auto imprecise =
            storage2 * dik * dik + unit * (own_norm + batch::load_unaligned(norms + k)) > two_tolerance * dik;
        const auto negative = batch::load_unaligned(class_value + k) != own_class;
        on_batch(i, k, negative & weighted & imprecise & (dik > zero));
      }
      for (; k < i; ++k) on_entry(i, k);
    }
  }

  /// How many entries recompute_weighted lists.
  static Index count_imprecise(PairwiseDistances<T>& pairwise, const T* distance,
                               const T* class_value, const T* nearest) {
    const T* norms = pairwise.centred_norms();
    const Index rows = pairwise.stride();
    Index count = 0;
    batch lanes(T(0));
    Index row = -1;
    const batch one(T(1)), zero(T(0));
    sweep_imprecise(
        pairwise, distance, class_value, nearest,
        [&](Index i, Index, const auto& mask) {
          if (i != row) {  // per row, so that T's lanes count exactly
            count += static_cast<Index>(xsimd::hadd(lanes));
            lanes = zero;
            row = i;
          }
          lanes += xsimd::select(mask, one, zero);
        },
        [&](Index i, Index k) {
          if (imprecise_entry(i, k, distance[i * rows + k], class_value, nearest, norms)) ++count;
        });
    return count + static_cast<Index>(xsimd::hadd(lanes));
  }

  /// Finds the negatives (i, k), k < i, that carry weight in row i's or row k's soft-max
  /// (D_ik - nearest < window + slack D_ik) and whose distance in T errs by more than the
  /// tolerance by the estimate
  ///   dD ~ storage_unit D + eps (n_i + n_k) / (2 D)
  /// (the product's error on D2 is about eps/2 (n_i + n_k) rms, at most ~6x that in
  /// practice, at d = 16..512; numerics.hpp's rounding_unit bound is 30-200x larger and would
  /// recompute everything at ordinary scales). Float at D ~ 1..10 and d = 128: dD ~ 1e-6,
  /// nothing recomputed; D ~ 1e2: ~1e-5; beyond ~ 200 every weighted negative is. Those
  /// are recomputed by differences into `storage` as Recomputed {i, k, D_ik}, their T entry
  /// set to +inf, and the nearest found again over the T entries left (+inf if none).
  /// Returns their count.
  static Index recompute_weighted(PairwiseDistances<T>& pairwise, const MatrixView<const T>& x,
                                  T* distance, const T* class_value, T* nearest,
                                  T* column_nearest, GrowOnlyBuffer<Recomputed>& storage) {
    const Index n = pairwise.size();
    const T infinity = std::numeric_limits<T>::infinity();
    const T* norms = pairwise.centred_norms();
    const Index rows = pairwise.stride();
    Index count = 0;
    const auto record = [&](Index i, Index k) {
      storage.data(static_cast<std::size_t>(count + 1))[count] =
          Recomputed{i, k, std::sqrt(exact_squared_distance(x.row(i), x.row(k), x.cols))};
      ++count;
      distance[i * rows + k] = infinity;
    };
    const batch one(T(1)), zero(T(0));
    sweep_imprecise(
        pairwise, distance, class_value, nearest,
        [&](Index i, Index k, const auto& mask) {
          if (!xsimd::any(mask)) return;
          alignas(64) T lanes[width];
          xsimd::select(mask, one, zero).store_aligned(lanes);
          for (Index lane = 0; lane < width; ++lane)
            if (lanes[lane] != T(0)) record(i, k + lane);
        },
        [&](Index i, Index k) {
          if (imprecise_entry(i, k, distance[i * rows + k], class_value, nearest, norms)) record(i, k);
        });
    if (count == 0) return 0;
    // The nearest again, over the T entries the sweeps will use: the old one may come from
    // a product entry too short by far more than the window.
    std::fill(nearest, nearest + n, infinity);
    std::fill(column_nearest, column_nearest + n, infinity);
    for (Index i = 1; i < n; ++i) {
      T* row = distance + i * pairwise.stride();
      nearest[i] = Sweeps::template nearest_negative<false>(row, row, class_value, class_value[i], i, column_nearest);
    }
    for (Index i = 0; i < n; ++i) nearest[i] = std::min(nearest[i], column_nearest[i]);
    return count;
  }

  /// s_i from its parts: `sums` holds the T sweeps' row parts (shifted by the T nearest),
  /// `column_total` their column parts, `rescale` the list's part (shifted by exact_nearest).
  /// The T part is rescaled to the exact nearest (0 when it has no term), and `rescale`
  /// becomes that factor (1 when nothing was listed).
  static void merge_sums(Index n, bool listed, const T* nearest, const double* exact_nearest,
                         const double* column_total, double* rescale, double* sums) {
    for (Index i = 0; i < n; ++i) {
      const double list_part = rescale[i];
      sums[i] += column_total[i];
      rescale[i] = !listed ? 1.0
                   : sums[i] > 0.0 ? std::exp(exact_nearest[i] - static_cast<double>(nearest[i]))
                                   : 0.0;
      sums[i] = sums[i] * rescale[i] + list_part;
      // Every negative at +inf (d^2 overflowed): the scalar path's exp(inf - inf) is NaN,
      // which clamped_exp turns into 0.
      if (!(exact_nearest[i] < std::numeric_limits<double>::infinity()))
        sums[i] = std::numeric_limits<double>::quiet_NaN();
    }
  }
};

}  // namespace detail
}  // namespace metricloss
