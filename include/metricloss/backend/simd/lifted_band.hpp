#pragma once
// The lifted structured loss over a band of the lower triangle, for the sharded simd path
// (backend/sharded_lifted.hpp). Rank q of W takes the pairs (i, j), j < i, of rows
// [b_q, b_{q+1}) (triangle_band_start, hard_band.hpp): ~N^2 / (2W) pairs, each unordered
// pair on exactly one rank, where a rank's own rows against X cost n_q N (at W = 2 the single
// process's whole triangle). A pair's terms reach both its rows, so the band yields partial
// quantities of the rows [0, e) it touches, which the ranks merge:
//  1. per row, its nearest negative in the band and sum_k e^{nearest - D_ik} over them
//     (LiftedBandSums): merged, log S of every row;
//  2. per row, its positive pairs' c^ = sum_p max(J, 0) S_i / (S_i + S_p) and loss part
//     (LiftedRowTotals);
//  3. the band's part of dL/dX (rows [0, e) x D), from one weight per pair: the gradient is
//     reduced over the ranks, the one sum a band cannot avoid.
// D2 comes from PairwiseDistances' product of the centred rows (small entries recomputed by
// differences); positive pairs' distances are exact (by differences in double). Exponentials
// are taken in T's lanes, each exponent <= 0: row i's shifted by its nearest negative in this
// band, so nothing overflows and no row sums to 0; sums gather ~64 terms in T, then double. Pairs close against
// their rows' norms are applied by differences, out of the product (as CrossDistances).
#include <metricloss/backend/simd/band_gradient.hpp>
#include <metricloss/backend/simd/hard_band.hpp>
#include <metricloss/backend/simd/lifted_band_rows.hpp>
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/backend/simd/products.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/views.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

/// Row a's part of its soft-max normaliser from one band: S_a = e^{m - nearest} sum.
struct LiftedBandSums {
  double nearest = std::numeric_limits<double>::infinity();  // inf: no negative of a here
  double sum = 0.0;
};

/// Row a's part of c^_a = c_a S_a and of the loss (pairs attributed to their lower row).
struct LiftedRowTotals {
  double scaled_coefficient = 0.0;
  double loss = 0.0;
};

/// log S_a from every band's LiftedBandSums of row a (count of them, in rank order): the
/// same bits on every rank.
inline double lifted_merged_log_normaliser(double margin, const LiftedBandSums* parts,
                                           int count) {
  double nearest = std::numeric_limits<double>::infinity();
  for (int q = 0; q < count; ++q) nearest = std::min(nearest, parts[q].nearest);
  double sum = 0.0;
  for (int q = 0; q < count; ++q)
    if (parts[q].sum > 0.0) sum += parts[q].sum * std::exp(nearest - parts[q].nearest);
  return lifted_log_normaliser(margin, nearest, sum);
}

template <class T>
class LiftedBand {
  using Rows = LiftedBandRows<T>;
  using Gradient = BandGradient<T>;
  static constexpr Index flush_rows = Gradient::flush_rows;

  struct Positive {
    Index i, j;       // j < i
    double distance;  // exact
  };

 public:
  /// Step 1 over rows [first, end) of x's triangle: returns the partial sums of rows
  /// [0, end), or nullptr where the centred norms are too large for the product's values to
  /// stay finite (every rank, holding the same x, then returns nullptr).
  const LiftedBandSums* sums(const MatrixView<const T>& x, const Index* class_of, Index first,
                             Index end) {
    x_ = x;
    first_ = first;
    end_ = end;
    // Class ids as T (exact below 2^24 rows in float): masks by compares in T's lanes.
    T* cls = classes_.data(static_cast<std::size_t>(end));
    for (Index j = 0; j < end; ++j) cls[j] = static_cast<T>(class_of[j]);
    const T inf = std::numeric_limits<T>::infinity();
    T* near_row = near_row_.data(static_cast<std::size_t>(end));
    T* near_col = near_col_.data(static_cast<std::size_t>(end));
    std::fill(near_row, near_row + end, inf);
    std::fill(near_col, near_col + end, inf);
    stride_ = padded_stride<T>(end);
    T* dist = distance_.data(static_cast<std::size_t>((end - first) * stride_));
    // Pass 1, each row while it is in cache: D and the nearest negatives, as row and column.
    pairwise_.compute_lower_rows(x, first, end, [&](Index i) {
      const T* sq = pairwise_.squared_row(i);
      T* row = dist + (i - first) * stride_;
      near_row[i] = Rows::distances(sq, i, cls, row, near_col);
    });
    const T* norms = pairwise_.centred_norms();
    T widest = T(0);
    for (Index j = 0; j < x.rows; ++j) widest = std::max(widest, norms[j]);
    if (!(T(4) * widest <= std::numeric_limits<T>::max())) return nullptr;

    // Pass 2: e^{nearest_i - D_ij} for row i's role and e^{nearest_j - D_ij} for j's, each
    // exponent <= 0 (floored at -1000: 0), in T's lanes, kept for the weights.
    T* nearest = nearest_.data(static_cast<std::size_t>(end));
    for (Index a = 0; a < end; ++a) nearest[a] = std::min(near_row[a], near_col[a]);
    double* sum = sum_.data(static_cast<std::size_t>(end));
    std::fill(sum, sum + end, 0.0);
    T* column = column_.data(static_cast<std::size_t>(end));
    std::fill(column, column + end, T(0));
    T* e_row = shifted_row_.data(static_cast<std::size_t>((end - first) * stride_));
    T* e_col = shifted_col_.data(static_cast<std::size_t>((end - first) * stride_));
    for (Index i = first; i < end; ++i) {
      const T* row = dist + (i - first) * stride_;
      T* er = e_row + (i - first) * stride_;
      T* ec = e_col + (i - first) * stride_;
      sum[i] += Rows::shifted(row, i, cls, nearest, er, ec, column);
      if ((i - first) % flush_rows == flush_rows - 1 || i + 1 == end) Gradient::flush(column, sum, i);
    }
    LiftedBandSums* out = sums_.data(static_cast<std::size_t>(end));
    for (Index a = 0; a < end; ++a) out[a] = LiftedBandSums{static_cast<double>(nearest[a]), sum[a]};
    return out;
  }

  /// Step 2, with every row's log S: the band's positive pairs' parts of c^ and of the loss,
  /// rows [0, end). Keeps the pairs for step 3. members(i, visit) visits the rows of i's
  /// class.
  template <class Members>
  const LiftedRowTotals* totals(const double* log_s, Members&& members) {
    LiftedRowTotals* out = totals_.data(static_cast<std::size_t>(end_));
    std::fill(out, out + end_, LiftedRowTotals{});
    Index count = 0;
    for (Index i = first_; i < end_; ++i)
      members(i, [&](Index j) {
        if (j < i) ++count;
      });
    Positive* pairs = positives_.data(static_cast<std::size_t>(count));
    count = 0;
    for (Index i = first_; i < end_; ++i)
      members(i, [&](Index j) {
        if (j >= i) return;
        const double distance = std::sqrt(pairwise_.exact(i, j));
        pairs[count++] = Positive{i, j, distance};
        const LiftedPair pair = lifted_pair(log_s[i], log_s[j], distance);
        out[i].scaled_coefficient += pair.hinge * pair.share_i;
        out[j].scaled_coefficient += pair.hinge * pair.share_j;
        out[j].loss += pair.hinge * pair.hinge;
      });
    positive_count_ = count;
    return out;
  }

  /// Step 3: the band's part of top_diff dL/dX, rows [0, end) x D (rows D apart), from
  /// every row's log S and c^ (merged over the ranks) and |P|.
  const T* gradient(const double* log_s, const double* scaled_coefficient, double margin,
                    double pairs, T top_diff) {
    const Index first = first_, end = end_, stride = stride_;
    const T* cls = classes_.data(0);
    // Row a's soft-max factor against this band's shift, over |P|: e^{m - D_ak} c_a / |P| =
    // c^_a e^{nearest_a - D_ak} e^{m - nearest_a - log S_a} / |P|, the last exponent <= 0.
    T* factor = factor_.data(static_cast<std::size_t>(end));
    const T* nearest = nearest_.data(0);
    for (Index a = 0; a < end; ++a)
      factor[a] = nearest[a] < std::numeric_limits<T>::infinity()
                      ? static_cast<T>(-scaled_coefficient[a] *
                                       std::exp(margin - static_cast<double>(nearest[a]) - log_s[a]) /
                                       pairs)
                      : T(0);
    gradient_.begin(x_, pairwise_.centred_norms(), end);
    double* row_sums = gradient_.row_sums();
    T* column = gradient_.column();
    T* w = distance_.data(0);  // the weights dL/dD2 replace the distances
    const T* e_row = shifted_row_.data(0);
    const T* e_col = shifted_col_.data(0);
    for (Index i = first; i < end; ++i) {
      T* row = w + (i - first) * stride;
      const T* er = e_row + (i - first) * stride;
      const T* ec = e_col + (i - first) * stride;
      const T* sq = pairwise_.squared_row(i);
      row_sums[i] += Rows::negative_weights(gradient_, i, cls, factor, er, ec, sq, row, column);
      if ((i - first) % flush_rows == flush_rows - 1 || i + 1 == end)
        gradient_.flush_columns(i);
    }
    // Positives, on their exact distances.
    const Positive* positives = positives_.data(0);
    for (Index p = 0; p < positive_count_; ++p) {
      const Positive& pair = positives[p];
      const double hinge = lifted_pair(log_s[pair.i], log_s[pair.j], pair.distance).hinge;
      const T weight = gradient_.apart(pair.i, pair.j,
                                       static_cast<T>(weight_on_squared(hinge / pairs, pair.distance)),
                                       pairwise_.squared_row(pair.i)[pair.j]);
      w[(pair.i - first) * stride + pair.j] = weight;
      row_sums[pair.i] += static_cast<double>(weight);
      row_sums[pair.j] += static_cast<double>(weight);
    }
    return gradient_.finish(pairwise_.centred(), w, stride, first, static_cast<double>(top_diff));
  }

 private:
  PairwiseDistances<T> pairwise_;
  MatrixView<const T> x_{};
  Index first_ = 0, end_ = 0, stride_ = 0, positive_count_ = 0;
  GrowOnlyBuffer<T> classes_, near_row_, near_col_, nearest_, column_, factor_;
  GrowOnlyBuffer<T> distance_;                  // band: D, then the weights dL/dD2
  GrowOnlyBuffer<T> shifted_row_, shifted_col_;  // band: e^{nearest - D} of both roles
  GrowOnlyBuffer<double> sum_;
  GrowOnlyBuffer<LiftedBandSums> sums_;
  GrowOnlyBuffer<LiftedRowTotals> totals_;
  GrowOnlyBuffer<Positive> positives_;
  BandGradient<T> gradient_;
};

}  // namespace detail
}  // namespace metricloss
