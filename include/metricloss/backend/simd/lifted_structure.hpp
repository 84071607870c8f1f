#pragma once
// The SIMD path of the lifted structured loss: the factorisation of
// <metricloss/lifted_structure.hpp> with D2 from one X X^T product (detail::PairwiseDistances,
// lower triangle only, positive pairs recomputed by differences), the O(N^2) sqrt / exp of
// the row soft-maxes and the weights in xsimd batches, and dX from one (N x N)(N x D) product.
//
// Every N x N pass sweeps the lower triangle only, row by row: an entry (i, k), k < i, serves
// row i (row-wise, in registers) and row k (lane-wise into an N-vector of column sums, which
// stays in L1). Three sweeps: (1) D = sqrt(D2) in place and the nearest negatives; (2) the
// shifted exp-sums s_i; (3) after the O(|P|) pair terms, S = W + W^T of the negatives
// computed directly from both rows' soft-max factors, near pairs taken out, and S 1. The
// gradient product reads S from its lower triangle (row panels and transposed column
// panels), so neither D2 nor S is ever mirrored.
//
// Near pairs. The product forms S_ik (xc_i - xc_k) as S_ik xc_i - S_ik xc_k, whose rounding
// error is about eps |S_ik| (|xc_i| + |xc_k|) against a true size |S_ik| D_ik; with
// S_ik ~ 1/D_ik it grows without bound as two points approach each other (near-duplicate
// positives, and hard negatives, which carry the largest soft-max weight). Pairs with
// D2_ik < near_ratio (||xc_i||^2 + ||xc_k||^2) are therefore taken out of S and applied
// by differences of the original rows; what stays in the product has a relative error
// of at most ~ 2 eps / sqrt(near_ratio) = 64 eps.
//
// Far pairs. A negative's soft-max weight is exp(nearest_i - D_ik): an absolute error dD in
// D_ik moves it by dD relatively, so the gradient (relative to its largest entry) errs by up
// to ~2 max dD over the terms that carry weight. The product's D errs by about
// eps (n_i + n_k) / (2 D) and T's storage of D by eps D, both growing with the scale of the
// data (float: 1e-4 of the largest gradient entry is lost near D ~ 1e3). So every negative
// within `window` of either row's nearest whose estimated error exceeds `tolerance` is
// recomputed by differences in double, kept in a short list, and summed in double; its
// entry in the T matrix becomes +inf, so that the vectorised sweeps give it weight 0. At
// ordinary scales (float, D <~ 200) nothing is recomputed; see recompute_weighted. Where
// the list would hold a large share of the pairs (float, D of several hundred), the
// whole call runs in double instead when that is cheaper (in_double_pays).
#include <metricloss/backend/simd/rowops.hpp>
#include <metricloss/backend/simd/tuning.hpp>
#include <metricloss/detail/pairwise.hpp>
#include <metricloss/lifted_structure.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

template <class T>
struct Backend<LiftedStructureLoss<T>, simd_tag> {
  using batch = xsimd::batch<T>;
  static constexpr Index width = static_cast<Index>(batch::size);

  template <class L>
  static T forward_backward(LiftedStructureLoss<T>& loss, simd_tag, const MatrixView<const T>& x,
                            const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff) {
    LiftedStructureScratch<T>& scratch = loss.scratch_;
    double value = 0.0;
    if (lifted_trivial_case(scratch.classes, labels, all_finite(x), grad, value))
      return static_cast<T>(value);
    const LabelClasses& classes = scratch.classes;
    const Index n = x.rows;
    const double margin = loss.margin;
    PairwiseDistances<T>& pairwise = scratch.pairwise;

    // Class ids as T (exact below 2^24 classes), compared lane-wise to mask the negatives.
    T* class_value = scratch.class_values.data(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) class_value[i] = static_cast<T>(classes.class_of(i));

    // D2 on the lower triangle only (each unordered pair once), exact for the positive
    // pairs; fused with sweep 1, on each row as soon as it is final: D = sqrt(D2) in place,
    // and the nearest negative of every row, from its part left of the diagonal (row-wise)
    // and right of it (the column, lane-wise).
    T* nearest = scratch.row_nearest.data(static_cast<std::size_t>(n));
    T* column_nearest = scratch.column_nearest.data(static_cast<std::size_t>(n));
    std::fill(column_nearest, column_nearest + n, std::numeric_limits<T>::infinity());
    pairwise.compute_lower(x, [&](Index i) {
      T* row = pairwise.squared().data() + i * pairwise.stride();  // sized by compute_lower
      classes.for_each_earlier_positive(i, [&](Index k) {
        row[k] = static_cast<T>(pairwise.exact_squared(k, i));
      });
      nearest[i] = nearest_negative<true>(row, class_value, class_value[i], i, column_nearest);
    });
    for (Index i = 0; i < n; ++i) nearest[i] = std::min(nearest[i], column_nearest[i]);
    T* distance = pairwise.squared().data();  // D, lower triangle k < i, rows `rows` apart
    const Index rows = pairwise.stride();

    // Float at large scales, where many weighted distances would need the list below: the
    // whole call in double when that is cheaper (in_double_pays).
    if constexpr (is_float) {
      const Index imprecise = count_imprecise(pairwise, distance, class_value, nearest);
      if (in_double_pays(imprecise, n, x.cols)) return in_double(loss, x, labels, grad, top_diff);
    }

    // The weighted negatives that T cannot give to the tolerance, exact and in double (the
    // scalar path's buffers, unused here, hold the list): (i n + k, D_ik) for k < i.
    const Index recomputed =
        recompute_weighted(pairwise, x, distance, class_value, nearest, column_nearest, scratch.distance);
    const double* exact = scratch.distance.data(0);
    // Each row's nearest in double, over the T entries and the list (T cannot hold a
    // recomputed distance to within exp's range beyond D ~ 1e10 in float): the shift of
    // the list's terms and of a_i. The T sweeps keep the T nearest (the least T entry) and
    // their sums are rescaled by exp(nearest_double - nearest_T) <= 1. (The scalar path's
    // buffers, unused here, hold these N-vectors.)
    double* exact_nearest = scratch.min_distance.data(static_cast<std::size_t>(n));
    double* rescale = scratch.weight.data(static_cast<std::size_t>(n));
    double* list_factor = scratch.row.data(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) {
      exact_nearest[i] = static_cast<double>(nearest[i]);
      rescale[i] = 0.0;  // first: the list's part of s_i
    }
    for (Index e = 0; e < recomputed; ++e) {
      const Index i = static_cast<Index>(exact[2 * e]) / n, k = static_cast<Index>(exact[2 * e]) % n;
      exact_nearest[i] = std::min(exact_nearest[i], exact[2 * e + 1]);
      exact_nearest[k] = std::min(exact_nearest[k], exact[2 * e + 1]);
    }

    // Sweep 2: s_i = sum_k exp(nearest_i - D_ik) over the negatives, again from the row
    // part and the column part of the triangle; a_i = log s_i + margin - nearest_i (every
    // row has negatives: two classes at least).
    double* log_normaliser = scratch.log_normaliser.data(static_cast<std::size_t>(n));
    double* shifted_sum = scratch.shifted_sum.data(static_cast<std::size_t>(n));
    {
      ColumnSums columns(scratch, n);
      for (Index i = 0; i < n; ++i) {
        shifted_sum[i] = shifted_exp_sums(distance + i * rows, class_value, class_value[i], nearest, i,
                                          columns.partial);
        columns.row_done(i);
      }
      columns.finish();
      for (Index e = 0; e < recomputed; ++e) {
        const Index i = static_cast<Index>(exact[2 * e]) / n, k = static_cast<Index>(exact[2 * e]) % n;
        const double dik = exact[2 * e + 1];
        rescale[i] += std::exp(exact_nearest[i] - dik);
        rescale[k] += std::exp(exact_nearest[k] - dik);
      }
      for (Index i = 0; i < n; ++i) {
        const double list_part = rescale[i];
        shifted_sum[i] += columns.total[i];
        // The T part, shifted by the T nearest (0 when there is none: no rescale).
        rescale[i] = recomputed == 0 ? 1.0
                     : shifted_sum[i] > 0.0 ? std::exp(exact_nearest[i] - static_cast<double>(nearest[i]))
                                            : 0.0;
        shifted_sum[i] = shifted_sum[i] * rescale[i] + list_part;
        // Every negative at +inf (d^2 overflowed): the scalar path's exp(inf - inf) is NaN,
        // which clamped_exp turns into 0.
        if (!(exact_nearest[i] < std::numeric_limits<double>::infinity()))
          shifted_sum[i] = std::numeric_limits<double>::quiet_NaN();
        log_normaliser[i] = lifted_log_normaliser(margin, exact_nearest[i], shifted_sum[i]);
      }
    }

    // Positive pairs: O(|P|) scalar work; their weights h_ij / (2 D_ij) go to (j, i).
    const bool gradient = !grad.empty();
    // S in its own buffer, rows padded (no 4 KiB-aliasing stride).
    const Index stride = padded_stride<T>(n);
    T* weight = gradient ? scratch.symmetric.data(static_cast<std::size_t>(n * stride)) : nullptr;
    double* coefficient = scratch.coefficient.data(static_cast<std::size_t>(n));
    std::fill(coefficient, coefficient + n, 0.0);
    double sum = 0.0;
    classes.for_each_positive_pair([&](Index i, Index j) {
      double dij = static_cast<double>(distance[j * rows + i]);
      // J_ij = ... + D_ij: T's rounding of D_ij (eps D) moves the hinge by as much.
      if (storage_unit * dij > tolerance) dij = std::sqrt(exact_squared(x, i, j));
      const LiftedPair pair = lifted_pair(log_normaliser[i], log_normaliser[j], dij);
      sum += pair.hinge * pair.hinge;
      if (!gradient) return;
      coefficient[i] += pair.hinge * pair.share_i;
      coefficient[j] += pair.hinge * pair.share_j;
      weight[j * stride + i] = static_cast<T>(weight_on_squared(pair.hinge, dij));
    });
    const auto pairs = static_cast<double>(classes.positive_pairs());
    if (!gradient) return static_cast<T>(sum / (2.0 * pairs));

    // Sweep 3: the symmetric weights S_ik = W_ik + W_ki of the negatives, straight into the
    // lower triangle, near pairs taken out, and the row sums S 1 (row and column parts).
    T* row_factor = scratch.row_factor.data(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) {
      list_factor[i] = -coefficient[i] / shifted_sum[i];
      row_factor[i] = static_cast<T>(list_factor[i] * rescale[i]);
    }
    const auto xc = pairwise.centred();
    T* threshold = scratch.near_threshold.data(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i)
      threshold[i] = static_cast<T>(near_ratio * static_cast<double>(xc.row(i).squaredNorm()));
    T* row_sums = scratch.column_nearest.data(0);  // free again: N entries
    T* near_sums = nullptr;
    {
      ColumnSums columns(scratch, n);
      for (Index i = 0; i < n; ++i) {
        const double own = symmetric_weights(i, distance + i * rows, class_value, nearest, row_factor, threshold,
                                             x, weight + i * stride, columns.partial, near_sums, scratch);
        columns.row_done(i);
        shifted_sum[i] = own;  // reused: the row part of S 1
      }
      columns.finish();
      // The recomputed negatives (0 in the sweep: D = +inf there), in double.
      for (Index e = 0; e < recomputed; ++e) {
        const Index i = static_cast<Index>(exact[2 * e]) / n, k = static_cast<Index>(exact[2 * e]) % n;
        const double dik = exact[2 * e + 1];
        const double both = list_factor[i] * std::exp(exact_nearest[i] - dik) +
                            list_factor[k] * std::exp(exact_nearest[k] - dik);
        T& slot = weight[i * stride + k];
        slot = static_cast<T>(weight_on_squared(both, dik));
        move_if_near(i, k, static_cast<T>(dik), threshold, x, slot, near_sums, scratch);
        shifted_sum[i] += static_cast<double>(slot);
        columns.total[k] += static_cast<double>(slot);
      }
      for (Index i = 0; i < n; ++i) row_sums[i] = static_cast<T>(shifted_sum[i] + columns.total[i]);
    }
    const T scale = static_cast<T>(static_cast<double>(top_diff) / pairs);
    pairwise.gradient_from_symmetric_weights(weight, stride, scale, row_sums, grad);
    if (near_sums != nullptr) {
      const T two_scale = T(2) * scale;
      for (Index i = 0; i < n; ++i) {
        T* out = grad.row(i);
        const T* add = near_sums + i * x.cols;
        for (Index c = 0; c < x.cols; ++c) out[c] += two_scale * add[c];
      }
    }
    return static_cast<T>(sum / (2.0 * pairs));
  }

 private:
  static constexpr double near_ratio = Numerics<T>::near_ratio;

  /// Whether a float call with `imprecise` list entries runs faster in double. Fitted at
  /// N = 256 and 1024 (AVX-512): an entry of the list costs ~(44 + 0.077 d) ns; the float
  /// path ~N^2 (1.1 + 0.018 d) ns, the double call ~2.2x that, after ~0.4x of it is done.
  /// N = 1024, uniform data, 8 per class: d = 128 at +-30 (24 % of N^2 listed) 15.8 ms by
  /// the list, 9.8 in double; d = 512 at +-10 (50 %) 41.7 and 33.9; d = 32 at +-30 (3 %)
  /// stays with the list (3.6 against 4.3); d = 512 at +-30 (24 %) goes to double, 34.0
  /// against 31.5, the one case of those measured where the guess is wrong.
  static bool in_double_pays(Index imprecise, Index n, Index d) {
    using cost = tuning::lifted_in_double;
    const double entries = static_cast<double>(imprecise), dims = static_cast<double>(d);
    const double pairs = static_cast<double>(n) * static_cast<double>(n);
    return entries * (cost::entry + dims) > pairs * (cost::pair + cost::pair_per_dim * dims);
  }

  /// What a float functor keeps for in_double.
  struct InDouble : BackendSlot::Contents {
    LiftedStructureLoss<double> loss;
    GrowOnlyBuffer<double> x, grad;
  };

  /// `size` doubles of `buffer` from a 64-byte boundary: the sign of a zero in the double
  /// path's gradient can follow the alignment of where it is written (fuzz finding 7), and
  /// a reused functor must give the bits of a fresh one.
  static double* aligned_doubles(GrowOnlyBuffer<double>& buffer, Index size) {
    double* data = buffer.data(static_cast<std::size_t>(size) + 8);
    const std::uintptr_t address = reinterpret_cast<std::uintptr_t>(data);
    return data + ((64 - address % 64) % 64) / sizeof(double);
  }

  /// The call in double: x widened, the double path, the gradient rounded to T. Its
  /// distances meet double's tolerance, so every weighted one is within float's.
  template <class L>
  static T in_double(LiftedStructureLoss<T>& loss, const MatrixView<const T>& x,
                     const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff) {
    InDouble& wide = loss.scratch_.in_double.template get<InDouble>();
    const Index n = x.rows, d = x.cols;
    double* xd = aligned_doubles(wide.x, n * d);
    for (Index i = 0; i < n; ++i)
      for (Index c = 0; c < d; ++c) xd[i * d + c] = static_cast<double>(x(i, c));
    MatrixView<double> gd{};
    if (!grad.empty()) gd = MatrixView<double>{aligned_doubles(wide.grad, n * d), n, d, d};
    wide.loss.margin = static_cast<double>(loss.margin);
    const double value = Backend<LiftedStructureLoss<double>, simd_tag>::forward_backward(
        wide.loss, simd_tag{}, MatrixView<const double>{xd, n, d, d}, labels, gd,
        static_cast<double>(top_diff));
    for (Index i = 0; i < gd.rows; ++i)
      for (Index c = 0; c < d; ++c) grad(i, c) = static_cast<T>(gd(i, c));
    return static_cast<T>(value);
  }

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
  /// ... once the window is widened by what the (T) distances that decide it may err: D and
  /// the nearest each by ~ eps D (storage) + eps (n_i + n_k) / (2 D) < eps D / (2 ratio)
  /// (the product's entries have D2 > ratio (n_i + n_k)), with a margin of 8.
  static constexpr double slack =
      16.0 * (1.0 + 1.0 / (2.0 * Numerics<T>::recompute_ratio)) * eps;

  /// exp with its argument clamped from below (-inf, NaN included: x86's max returns its
  /// second operand for NaN) to where exp is 0 in T anyway (e^-104 and e^-746 round to 0):
  /// xsimd 8.1's double exp on AVX-512 converts the exponent to int64 with a scalar cast,
  /// undefined below about -6.4e18 and for NaN. Callers keep the argument <= 0 (lanes
  /// that are no negative get D = +inf) and restore the scalar path's NaN row by row.
  static batch clamped_exp(const batch& argument) {
    constexpr T lowest = Numerics<T>::exp_floor;
    return xsimd::exp(xsimd::max(argument, batch(lowest)));
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
  /// are recomputed by differences into `storage` as pairs (i n + k, D_ik), their T entry
  /// set to +inf, and the nearest found again over the T entries left (+inf if none).
  /// Returns their count.
  static Index recompute_weighted(PairwiseDistances<T>& pairwise, const MatrixView<const T>& x,
                                  T* distance, const T* class_value, T* nearest,
                                  T* column_nearest, GrowOnlyBuffer<double>& storage) {
    const Index n = pairwise.size();
    const T infinity = std::numeric_limits<T>::infinity();
    const T* norms = pairwise.centred_norms();
    const Index rows = pairwise.stride();
    Index count = 0;
    const auto record = [&](Index i, Index k) {
      double* list = storage.data(static_cast<std::size_t>(2 * (count + 1)));
      list[2 * count] = static_cast<double>(i * n + k);
      list[2 * count + 1] = std::sqrt(exact_squared(x, i, k));
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
    for (Index i = 1; i < n; ++i)
      nearest[i] = nearest_negative<false>(distance + i * pairwise.stride(), class_value, class_value[i], i, column_nearest);
    for (Index i = 0; i < n; ++i) nearest[i] = std::min(nearest[i], column_nearest[i]);
    return count;
  }

  /// ||x_i - x_k||^2 with every difference and sum in double (PairwiseDistances'
  /// exact_squared sums lanes in T: (d + 8) u_T of itself, ~eps D on D in float), in
  /// double lanes widened as they load, four independent sums: at large scales every
  /// weighted negative comes here (Eigen's cast expression ran one scalar chain of d adds,
  /// 15x the whole loss at N = 1024, D = 512).
  static double exact_squared(const MatrixView<const T>& x, Index i, Index k) {
    using wide = xsimd::batch<double>;
    constexpr Index lanes = static_cast<Index>(wide::size);
    const T *a = x.row(i), *b = x.row(k);
    const Index d = x.cols;
    wide acc[4] = {wide(0.0), wide(0.0), wide(0.0), wide(0.0)};
    Index j = 0;
    for (; j + 4 * lanes <= d; j += 4 * lanes)
      for (Index s = 0; s < 4; ++s) {
        const wide diff = wide::load_unaligned(a + j + s * lanes) - wide::load_unaligned(b + j + s * lanes);
        acc[s] = xsimd::fma(diff, diff, acc[s]);
      }
    for (; j + lanes <= d; j += lanes) {
      const wide diff = wide::load_unaligned(a + j) - wide::load_unaligned(b + j);
      acc[0] = xsimd::fma(diff, diff, acc[0]);
    }
    double sum = xsimd::hadd((acc[0] + acc[1]) + (acc[2] + acc[3]));
    for (; j < d; ++j) {
      const double diff = static_cast<double>(a[j]) - static_cast<double>(b[j]);
      sum += diff * diff;
    }
    return sum;
  }

  /// The same for one T, for the rows' tails: NaN (inf - inf: a recomputed entry, +inf,
  /// of a row whose T nearest is +inf) gives 0 as in the batches.
  static T clamped_exp(T argument) {
    constexpr T lowest = Numerics<T>::exp_floor;
    return std::exp(argument > lowest ? argument : lowest);
  }

  /// Column sums over the lower triangle: lane-wise partial sums in T over blocks of
  /// `rows` rows, totalled in double.
  struct ColumnSums {
    static constexpr Index rows = 32;
    T* partial;
    double* total;
    Index n;
    ColumnSums(LiftedStructureScratch<T>& scratch, Index n_)
        : partial(scratch.column_partial.data(static_cast<std::size_t>(n_))),
          total(scratch.column_total.data(static_cast<std::size_t>(n_))), n(n_) {
      std::fill(partial, partial + n, T(0));
      std::fill(total, total + n, 0.0);
    }
    void row_done(Index i) {
      if ((i + 1) % rows == 0) flush(i);
    }
    void finish() { flush(n); }
    void flush(Index end) {  // rows up to `end` have written columns k < end
      for (Index k = 0; k < end; ++k) {
        total[k] += static_cast<double>(partial[k]);
        partial[k] = T(0);
      }
    }
  };

  /// Row i's nearest negative among k < i, folding each such entry into column_nearest[k]
  /// too (the column's part of row k's nearest). Roots: the row holds squared distances,
  /// replaced by their roots on the way.
  template <bool Roots>
  static T nearest_negative(T* row, const T* class_value, T own, Index i, T* column_nearest) {
    const T infinity = std::numeric_limits<T>::infinity();
    const batch own_class(own), far(infinity);
    batch nearest(infinity);
    Index k = 0;
    for (; k + width <= i; k += width) {
      batch dik = batch::load_unaligned(row + k);
      if constexpr (Roots) {
        dik = xsimd::sqrt(dik);
        dik.store_unaligned(row + k);
      }
      const batch masked =
          xsimd::select(batch::load_unaligned(class_value + k) != own_class, dik, far);
      nearest = xsimd::min(nearest, masked);
      xsimd::min(batch::load_unaligned(column_nearest + k), masked).store_unaligned(column_nearest + k);
    }
    alignas(64) T lanes[width];
    nearest.store_aligned(lanes);
    T result = infinity;
    for (Index lane = 0; lane < width; ++lane) result = std::min(result, lanes[lane]);
    for (; k < i; ++k) {
      if constexpr (Roots) row[k] = std::sqrt(row[k]);
      if (class_value[k] != own) {
        result = std::min(result, row[k]);
        column_nearest[k] = std::min(column_nearest[k], row[k]);
      }
    }
    return result;
  }

  /// Row i of the lower triangle: returns sum_{k < i} exp(nearest_i - D_ik) over the
  /// negatives (lane sums in T over blocks of `block` batches, totalled in double) and adds
  /// exp(nearest_k - D_ik) to column_partial[k].
  static double shifted_exp_sums(const T* row, const T* class_value, T own, const T* nearest,
                                 Index i, T* column_partial) {
    constexpr Index block = 32;
    const batch own_class(own), shift(nearest[i]), far(std::numeric_limits<T>::infinity());
    double total = 0.0;
    Index k = 0;
    while (k + width <= i) {
      batch lanes(T(0));
      for (Index b = 0; b < block && k + width <= i; ++b, k += width) {
        // No negative: D = +inf, so that its exp is 0 (and its argument never positive).
        const batch dik = xsimd::select(batch::load_unaligned(class_value + k) != own_class,
                                        batch::load_unaligned(row + k), far);
        lanes += clamped_exp(shift - dik);
        const batch column = clamped_exp(batch::load_unaligned(nearest + k) - dik);
        (batch::load_unaligned(column_partial + k) + column).store_unaligned(column_partial + k);
      }
      total += static_cast<double>(xsimd::hadd(lanes));
    }
    for (; k < i; ++k) {
      if (class_value[k] == own) continue;
      total += static_cast<double>(clamped_exp(nearest[i] - row[k]));
      column_partial[k] += clamped_exp(nearest[k] - row[k]);
    }
    return total;
  }

  /// Row i of the lower triangle of S, from row i of D (`row`): for a negative k,
  ///   S_ik = (f_i exp(nearest_i - D_ik) + f_k exp(nearest_k - D_ik)) / (2 D_ik)
  /// (0 at D_ik = 0) with f = row_factor; positive entries keep the pair weight already
  /// there. Near pairs (see the top of this file) are moved out of S into near_sums by
  /// differences of the original rows. Returns the row part of S 1 (k < i) and adds S_ik
  /// to column_partial[k].
  static double symmetric_weights(Index i, const T* row, const T* class_value,
                                  const T* nearest, const T* row_factor, const T* threshold,
                                  const MatrixView<const T>& x, T* out, T* column_partial,
                                  T*& near_sums, LiftedStructureScratch<T>& scratch) {
    constexpr Index block = 32;
    const T own = class_value[i];
    const batch own_class(own), shift(nearest[i]), factor(row_factor[i]), zero(T(0)),
        own_threshold(threshold[i]), far(std::numeric_limits<T>::infinity());
    double total = 0.0;
    Index k = 0;
    while (k + width <= i) {
      batch lanes(T(0));
      for (Index b = 0; b < block && k + width <= i; ++b, k += width) {
        const auto negative = batch::load_unaligned(class_value + k) != own_class;
        const batch dik = batch::load_unaligned(row + k);
        const batch negative_dik = xsimd::select(negative, dik, far);  // as in shifted_exp_sums
        const batch both = factor * clamped_exp(shift - negative_dik) +
                           batch::load_unaligned(row_factor + k) *
                               clamped_exp(batch::load_unaligned(nearest + k) - negative_dik);
        const batch w = xsimd::select(dik > zero, both / (dik + dik), zero);
        batch s = xsimd::select(negative, w, batch::load_unaligned(out + k));
        // D2_ik < near_ratio n_i + near_ratio n_k, lane-wise: rare, so test before looking.
        if (xsimd::any(dik * dik < own_threshold + batch::load_unaligned(threshold + k))) {
          s.store_unaligned(out + k);
          for (Index lane = k; lane < k + width; ++lane)
            move_if_near(i, lane, row[lane], threshold, x, out[lane], near_sums, scratch);
          s = batch::load_unaligned(out + k);
        }
        s.store_unaligned(out + k);
        lanes += s;
        (batch::load_unaligned(column_partial + k) + s).store_unaligned(column_partial + k);
      }
      total += static_cast<double>(xsimd::hadd(lanes));
    }
    for (; k < i; ++k) {
      const T dik = row[k];
      T s = out[k];
      if (class_value[k] != own)
        s = dik > T(0) ? (row_factor[i] * clamped_exp(nearest[i] - dik) +
                          row_factor[k] * clamped_exp(nearest[k] - dik)) / (dik + dik)
                       : T(0);
      out[k] = s;
      move_if_near(i, k, dik, threshold, x, out[k], near_sums, scratch);
      total += static_cast<double>(out[k]);
      column_partial[k] += out[k];
    }
    return total;
  }

  /// When (i, k) is a near pair, moves s = S_ik out: near_sums_i += s (x_i - x_k),
  /// near_sums_k -= s (x_i - x_k), and s = 0.
  static void move_if_near(Index i, Index k, T distance, const T* threshold,
                           const MatrixView<const T>& x, T& s, T*& near_sums,
                           LiftedStructureScratch<T>& scratch) {
    if (!(distance * distance < threshold[i] + threshold[k])) return;
    const Index n = x.rows, d = x.cols;
    const T value = s;
    s = T(0);
    if (value == T(0)) return;
    if (near_sums == nullptr) {
      near_sums = scratch.near_gradient.data(static_cast<std::size_t>(n * d));
      std::fill(near_sums, near_sums + n * d, T(0));
    }
    const T* xi = x.row(i);
    const T* xk = x.row(k);
    T* gi = near_sums + i * d;
    T* gk = near_sums + k * d;
    for (Index c = 0; c < d; ++c) {
      const T v = value * (xi[c] - xk[c]);
      gi[c] += v;
      gk[c] -= v;
    }
  }

  /// Finite iff every x - x is 0 (it is NaN for NaN and +-inf).
  static bool all_finite(const MatrixView<const T>& x) {
    const Index d = x.cols, full = d / width * width;
    batch probe(T(0));
    T tail = T(0);
    for (Index i = 0; i < x.rows; ++i) {
      const T* row = x.row(i);
      for (Index c = 0; c < full; c += width) {
        const batch v = batch::load_unaligned(row + c);
        probe += v - v;
      }
      for (Index c = full; c < d; ++c) tail += row[c] - row[c];
    }
    return xsimd::all(probe == batch(T(0))) && tail == T(0);
  }
};

}  // namespace detail
}  // namespace metricloss
