#pragma once
// BatchTripletLoss with Mining::all over a band of the lower triangle, for the sharded simd
// path (backend/sharded_batch_all.hpp). Rank q of W takes the pairs (i, j), j < i, of rows
// [b_q, b_{q+1}) (triangle_band_start, hard_band.hpp): ~N^2 / (2W) pairs, each unordered pair
// on exactly one rank. With t_ap = d_ap + m (anchor a's positives sorted by t: its slots),
// a negative pair (i, j) enters the triplets of anchor i (d_ij against t_i.) and of anchor j
// (against t_j.), so the band scans each of its rows twice: row i as anchor over j < i, and
// column j as anchor over its rows i > j. Per slot (a, p) it sums
//   hinge:       C_ap = #{n: d_an < t_ap} and S_ap = sum of those d_an,
//   soft margin: C_ap = sum_n sigma(t_ap - d_an) and S_ap = sum_n softplus(t_ap - d_an),
// which the ranks add: L = sum_ap (C_ap t_ap - S_ap) / Z, Z = sum C_ap (soft margin:
// S_ap / Z, Z = every triplet). The weights on D2 (dL/dD2 before top_diff / Z) are local to
// the band for negatives, -(#{p: d_in < t_ip} + #{p: d_jn < t_jp}) d'(d_ij) (soft margin:
// sums of sigma), and need the merged C for positives, C_ap d'(d_ap) + C_pa d'(d_pa).
// Every rank computes every anchor's thresholds from exact distances (O(N c D), as the single
// process's miner), and a product value within its rounding of a kink is replaced by the
// exact distance, as the miner decides it (mining::exact_near_kinks): the same triplets as
// the single process, ties included.
#include <metricloss/backend/simd/all_band_anchors.hpp>
#include <metricloss/backend/simd/all_band_lanes.hpp>
#include <metricloss/backend/simd/band_gradient.hpp>
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/mining/common.hpp>
#include <metricloss/detail/views.hpp>

#include <algorithm>
#include <limits>

namespace metricloss {
namespace detail {

template <class T>
class AllBand {
  /// Columns of a tile of the column role (soft margin, large classes): each transposed
  /// into a row of T.
  static constexpr Index column_tile = 32;

 public:
  /// The band's D2 (rows [first, end)) and every anchor's slots and thresholds. Returns false
  /// where the centred norms are too large for the product's values to stay finite (every
  /// rank, holding the same x, then returns false).
  bool prepare(const MatrixView<const T>& x, const LabelClasses& classes, double margin,
               Distance distance, bool soft_margin, Index first, Index end) {
    x_ = x;
    classes_ = &classes;
    distance_ = distance;
    soft_margin_ = soft_margin;
    first_ = first;
    end_ = end;
    pairwise_.compute_lower_rows(x, first, end, [](Index) {});
    const T* norms = pairwise_.centred_norms();
    widest_ = 0;
    for (Index j = 1; j < x.rows; ++j)
      if (norms[j] > norms[widest_]) widest_ = j;
    if (x.rows > 0 && !(T(4) * norms[widest_] <= std::numeric_limits<T>::max())) return false;
    anchors_.build(pairwise_, classes, margin, distance, widest_);
    return true;
  }

  /// Anchor a's slots are [slot_first()[a], slot_first()[a + 1]): its positives when it has
  /// negatives (else it has no triplet), sorted by threshold.
  const Index* slot_first() { return anchors_.slot_first(); }
  /// Every slot's threshold t_ap, ascending within an anchor.
  const double* slot_thresholds() { return anchors_.thresholds(); }

  /// The band's parts of the slots of rows [0, end): slots [0, slot_first()[end]).
  const AllBandSlot* slots() {
    const Index first = first_, end = end_, stride = pairwise_.stride();
    const Index* slot_first = anchors_.slot_first();
    AllBandSlot* out = slots_.data(static_cast<std::size_t>(slot_first[end]));
    std::fill(out, out + slot_first[end], AllBandSlot{});
    T* w = weights_.data(static_cast<std::size_t>((end - first) * stride));
    double* value = value_.data(static_cast<std::size_t>(end));
    double* slope = slope_.data(static_cast<std::size_t>(end));
    const LabelClasses& classes = *classes_;
    // Row i as anchor against j < i: its row of W.
    for (Index i = first; i < end; ++i) {
      T* row = w + (i - first) * stride;
      const T* sq = pairwise_.squared_row(i);
      if (slot_first[i + 1] == slot_first[i]) {
        std::fill(row, row + i, T(0));
        continue;
      }
      if (soft_margin_) {
        anchors_.soft_scan(i, sq, i, out + slot_first[i], row, [&](T* dist) {
          for (const Index* m = classes.members_begin(i); m != classes.members_end(i) && *m < i; ++m)
            dist[*m] = std::numeric_limits<T>::infinity();
        });
        continue;
      }
      for (Index j = 0; j < i; ++j) value[j] = static_cast<double>(sq[j]);
      for (const Index* m = classes.members_begin(i); m != classes.members_end(i) && *m < i; ++m)
        value[*m] = std::numeric_limits<double>::quiet_NaN();
      anchors_.scan(i, value, i, [](Index r) { return r; }, out + slot_first[i], slope);
      for (Index j = 0; j < i; ++j) row[j] = static_cast<T>(slope[j]);
    }
    // Column j as anchor against its rows i > j: in lanes of anchors, or a tile of columns
    // at a time, transposed.
    if (!soft_margin_ && anchors_.widest_slots(end) <= scan_limit) {
      lanes_.run(pairwise_, anchors_, classes.class_of(), distance_, widest_, first, end, w, out);
      return out;
    }
    // The tile in T, +inf off the candidates (i <= j, j's class), read row by row (each row's
    // run of the tile's columns), each column replaced by its weights and added back.
    const T inf = std::numeric_limits<T>::infinity();
    T* tile = tile_.data(static_cast<std::size_t>(column_tile * (end - first)));
    for (Index j0 = 0; j0 < end; j0 += column_tile) {
      const Index width = std::min(column_tile, end - j0);
      const Index lo = std::max(first, j0 + 1);  // the first row below any of the tile's columns
      const Index rows = end - lo;
      if (rows <= 0) break;
      bool any = false;
      for (Index c = 0; c < width; ++c) any = any || slot_first[j0 + c + 1] > slot_first[j0 + c];
      if (!any) continue;
      for (Index i = lo; i < end; ++i) {
        const T* sq = pairwise_.squared_row(i) + j0;
        const Index below = std::min(width, i - j0);  // columns j0 + c < i
        for (Index c = 0; c < below; ++c) tile[c * rows + (i - lo)] = sq[c];
        for (Index c = below; c < width; ++c) tile[c * rows + (i - lo)] = inf;
      }
      for (Index c = 0; c < width; ++c) {
        const Index j = j0 + c;
        T* column = tile + c * rows;
        if (slot_first[j + 1] == slot_first[j]) {
          std::fill(column, column + rows, T(0));
          continue;
        }
        const Index* m = std::lower_bound(classes.members_begin(j), classes.members_end(j), lo);
        for (; m != classes.members_end(j) && *m < end; ++m) column[*m - lo] = inf;
        if (soft_margin_) {
          anchors_.soft_scan(j, column, rows, out + slot_first[j], column, [](T*) {});
          continue;
        }
        for (Index r = 0; r < rows; ++r)
          value[r] = column[r] < inf ? static_cast<double>(column[r]) : std::numeric_limits<double>::quiet_NaN();
        anchors_.scan(j, value, rows, [lo](Index r) { return lo + r; }, out + slot_first[j], slope);
        for (Index r = 0; r < rows; ++r) column[r] = static_cast<T>(slope[r]);
      }
      for (Index i = lo; i < end; ++i) {
        T* row = w + (i - first) * stride + j0;
        const Index below = std::min(width, i - j0);
        for (Index c = 0; c < below; ++c) row[c] += tile[c * rows + (i - lo)];
      }
    }
    return out;
  }

  /// The band's part of scale dL/dX (scale = top_diff / Z), rows [0, end) x D (rows D
  /// apart), from every slot's merged C (`merged`, indexed as slot_first()).
  const T* gradient(const AllBandSlot* merged, double scale) {
    const Index first = first_, end = end_, stride = pairwise_.stride();
    const Index* slot_first = anchors_.slot_first();
    const Index* position = anchors_.positions();
    const Index* rank = anchors_.ranks();
    const double* derivative = anchors_.derivatives();
    const LabelClasses& classes = *classes_;
    T* w = weights_.data(0);
    // W_ap = C_ap d'(d_ap), for anchor a's positive p (its e-th in class order).
    const auto positive_weight = [&](Index a, Index p) {
      if (slot_first[a + 1] == slot_first[a]) return 0.0;
      const Index e = slot_first[a] + position[p] - (position[a] < position[p] ? 1 : 0);
      return merged[slot_first[a] + rank[e]].count * derivative[e];
    };
    for (Index i = first; i < end; ++i)
      for (const Index* m = classes.members_begin(i); m != classes.members_end(i) && *m < i; ++m)
        w[(i - first) * stride + *m] = static_cast<T>(positive_weight(i, *m) + positive_weight(*m, i));
    gradient_.begin(x_, pairwise_.centred_norms(), end);
    for (Index i = first; i < end; ++i)
      gradient_.sweep_row(i, first, w + (i - first) * stride, pairwise_.squared_row(i));
    return gradient_.finish(pairwise_.centred(), w, stride, first, scale);
  }

 private:
  PairwiseDistances<T> pairwise_;
  AllBandAnchors<T> anchors_;
  AllBandLanes<T> lanes_;
  BandGradient<T> gradient_;
  MatrixView<const T> x_{};
  const LabelClasses* classes_ = nullptr;
  Distance distance_ = Distance::euclidean;
  bool soft_margin_ = false;
  Index first_ = 0, end_ = 0, widest_ = 0;
  GrowOnlyBuffer<double> value_, slope_;  // one anchor's candidates: D2, then weights
  GrowOnlyBuffer<T> tile_;                // the column role's tile, transposed
  GrowOnlyBuffer<AllBandSlot> slots_;
  GrowOnlyBuffer<T> weights_;  // band: dL/dD2 (before top_diff / Z), both roles
};

}  // namespace detail
}  // namespace metricloss
