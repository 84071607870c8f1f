#pragma once
// Batch-hard's statistics over a band of the lower triangle, for the sharded simd path
// (backend/sharded_batch_triplet.hpp). Rank q of W takes rows [b_q, b_{q+1}) of the strictly
// lower triangle of X's distances, b_q = round(N sqrt(q / W)): ~N^2 / (2W) pairs each, every
// unordered pair on exactly one rank whatever the shards, where a rank mining its own rows
// against all of X computes n_q N (at W = 2, as many as the single process's triangle).
// A pair (i, j), j < i, is a candidate of anchor i and of anchor j. Per row a of X the band
// yields the exact farthest positive and nearest negative among the candidates it holds,
// ties to the lowest row; merged over the ranks by the same rule they are the single
// process's selection (mining/hard.hpp), the exact extremes over all of X.
// Product values select: a candidate whose value lies within twice the product's rounding
// of its anchor's selected value is compared on its exact distance, which is symmetric
// (exact_squared_distance squares differences), so both of a pair's anchors see one value.
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/views.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

/// One anchor's hardest candidates among some rows of X (exchanged between ranks as bytes).
struct HardExtremes {
  double positive = 0.0, negative = 0.0;  // exact squared distances
  Index positive_row = -1, negative_row = -1;  // -1: none

  void take_positive(double e, Index j) {
    if (positive_row < 0 || e > positive || (e == positive && j < positive_row)) {
      positive = e;
      positive_row = j;
    }
  }
  void take_negative(double e, Index j) {
    if (negative_row < 0 || e < negative || (e == negative && j < negative_row)) {
      negative = e;
      negative_row = j;
    }
  }
  void merge(const HardExtremes& other) {
    if (other.positive_row >= 0) take_positive(other.positive, other.positive_row);
    if (other.negative_row >= 0) take_negative(other.negative, other.negative_row);
  }
};

/// b_q of W bands over n rows (b_0 = 0, b_W = n): equal areas of the triangle. The same
/// arithmetic on every rank, so every rank agrees on every band.
inline Index triangle_band_start(Index n, int ranks, int q) {
  if (q <= 0) return 0;
  if (q >= ranks) return n;
  const double b = std::round(static_cast<double>(n) * std::sqrt(static_cast<double>(q) / ranks));
  return std::min<Index>(n, std::max<Index>(0, static_cast<Index>(b)));
}

template <class T>
class HardBand {
  // Class ids as wide as T: the passes' compares and selects vectorise in one lane width.
  using Class = typename std::conditional<sizeof(T) == 4, std::int32_t, std::int64_t>::type;

 public:
  /// The extremes of rows [0, end) over the pairs of rows [first, end) of X's lower
  /// triangle; class_of[i] is row i's class. False, with nothing to use, where the centred
  /// norms are too large for the product's values to stay finite (the caller mines another
  /// way): then every rank, holding the same X, returns false.
  bool compute(const MatrixView<const T>& x, const Index* class_of, Index first, Index end) {
    const Index d = x.cols;
    Class* cls = classes_.data(static_cast<std::size_t>(end));
    for (Index j = 0; j < end; ++j) cls[j] = static_cast<Class>(class_of[j]);
    T* top_positive = top_positive_.data(static_cast<std::size_t>(end));
    T* top_negative = top_negative_.data(static_cast<std::size_t>(end));
    const T inf = std::numeric_limits<T>::infinity();
    std::fill(top_positive, top_positive + end, -inf);
    std::fill(top_negative, top_negative + end, inf);
    // Pass 1, each row while it is in cache: the selected values, anchor i over j < i and
    // anchor j over this band's rows below it.
    pairwise_.compute_lower_rows(x, first, end, [&](Index i) {
      const T* row = pairwise_.squared_row(i);
      const Class ci = cls[i];
      T far = -inf, near = inf;
      for (Index j = 0; j < i; ++j) {
        const T v = row[j];
        const bool same = cls[j] == ci;
        far = same && v > far ? v : far;
        near = !same && v < near ? v : near;
        top_positive[j] = same && v > top_positive[j] ? v : top_positive[j];
        top_negative[j] = !same && v < top_negative[j] ? v : top_negative[j];
      }
      if (far > top_positive[i]) top_positive[i] = far;
      if (near < top_negative[i]) top_negative[i] = near;
    });
    const T* norms = pairwise_.centred_norms();
    T widest = T(0);
    for (Index j = 0; j < x.rows; ++j) widest = std::max(widest, norms[j]);
    // n_i + n_j and its product terms stay below T's largest value (4 n_max), so every
    // value is finite and the windows below hold.
    if (!(T(4) * widest <= std::numeric_limits<T>::max())) return false;

    // Each anchor's window, as limits in T rounded outward: a positive at or above low,
    // a negative at or below high, is compared on its exact distance.
    T* low = low_.data(static_cast<std::size_t>(end));
    T* high = high_.data(static_cast<std::size_t>(end));
    const double unit = product_rounding_unit<T>(d);
    for (Index a = 0; a < end; ++a) {
      const double bound = unit * (static_cast<double>(norms[a]) + static_cast<double>(widest));
      const double half = 2.0 * bound * (1.0 + Numerics<double>::kink_slack);
      low[a] = outward(static_cast<double>(top_positive[a]) - half, -inf);
      high[a] = outward(static_cast<double>(top_negative[a]) + half, inf);
    }
    HardExtremes* out = extremes_.data(static_cast<std::size_t>(end));
    std::fill(out, out + end, HardExtremes{});
    // Pass 2: the candidates in a window, on exact distances.
    for (Index i = first; i < end; ++i) {
      const T* row = pairwise_.squared_row(i);
      const Class ci = cls[i];
      const T low_i = low[i], high_i = high[i];
      for (Index j = 0; j < i; ++j) {
        const T v = row[j];
        const bool same = cls[j] == ci;
        const bool for_i = same ? v >= low_i : v <= high_i;
        const bool for_j = same ? v >= low[j] : v <= high[j];
        if (!(for_i || for_j)) continue;
        const double e = pairwise_.exact(i, j);
        if (same) {
          if (for_i) out[i].take_positive(e, j);
          if (for_j) out[j].take_positive(e, i);
        } else {
          if (for_i) out[i].take_negative(e, j);
          if (for_j) out[j].take_negative(e, i);
        }
      }
    }
    return true;
  }

  /// Rows [0, end) of the last compute().
  const HardExtremes* extremes() { return extremes_.data(0); }

 private:
  /// v in T, rounded away from the window's centre (toward `away`).
  static T outward(double v, T away) {
    if (v != v) return away;
    T t = static_cast<T>(v);
    if (away < T(0) ? static_cast<double>(t) > v : static_cast<double>(t) < v)
      t = std::nextafter(t, away);
    return t;
  }

  PairwiseDistances<T> pairwise_;
  GrowOnlyBuffer<Class> classes_;
  GrowOnlyBuffer<T> top_positive_, top_negative_, low_, high_;
  GrowOnlyBuffer<HardExtremes> extremes_;
};

}  // namespace detail
}  // namespace metricloss
