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
#include <metricloss/backend/simd/band_gradient.hpp>
#include <metricloss/backend/simd/mining_scans.hpp>
#include <metricloss/backend/simd/pair_rowops.hpp>
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/backend/simd/softplus.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/mining/common.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/detail/triplet_math.hpp>
#include <metricloss/detail/views.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace metricloss {
namespace detail {

/// One slot's part from one band: hinge, the count and distance sum of the negatives below
/// its threshold; soft margin, the sums of sigma and of softplus over the negatives.
struct AllBandSlot {
  double count = 0.0;
  double sum = 0.0;
};

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
    thresholds(margin);
    return true;
  }

  /// Anchor a's slots are [slot_first()[a], slot_first()[a + 1]): its positives when it has
  /// negatives (else it has no triplet), sorted by threshold.
  const Index* slot_first() { return slot_first_.data(0); }
  /// Every slot's threshold t_ap, ascending within an anchor.
  const double* slot_thresholds() { return threshold_.data(0); }

  /// The band's parts of the slots of rows [0, end): slots [0, slot_first()[end]).
  const AllBandSlot* slots() {
    const Index first = first_, end = end_, stride = pairwise_.stride();
    const Index* slot_first = slot_first_.data(0);
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
        soft_scan(i, sq, i, out + slot_first[i], row, [&](T* dist) {
          for (const Index* m = classes.members_begin(i); m != classes.members_end(i) && *m < i; ++m)
            dist[*m] = std::numeric_limits<T>::infinity();
        });
        continue;
      }
      for (Index j = 0; j < i; ++j) value[j] = static_cast<double>(sq[j]);
      for (const Index* m = classes.members_begin(i); m != classes.members_end(i) && *m < i; ++m)
        value[*m] = std::numeric_limits<double>::quiet_NaN();
      scan(i, value, i, [](Index r) { return r; }, out + slot_first[i], slope);
      for (Index j = 0; j < i; ++j) row[j] = static_cast<T>(slope[j]);
    }
    // Column j as anchor against its rows i > j: in lanes of anchors, or a tile of columns
    // at a time, transposed.
    if (!soft_margin_ && widest_slots(end) <= scan_limit) {
      columns_by_lanes(w, out);
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
          soft_scan(j, column, rows, out + slot_first[j], column, [](T*) {});
          continue;
        }
        for (Index r = 0; r < rows; ++r)
          value[r] = column[r] < inf ? static_cast<double>(column[r]) : std::numeric_limits<double>::quiet_NaN();
        scan(j, value, rows, [lo](Index r) { return lo + r; }, out + slot_first[j], slope);
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
    const Index* slot_first = slot_first_.data(0);
    const Index* position = position_.data(0);
    const Index* rank = rank_.data(0);
    const double* derivative = derivative_.data(0);
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
  /// Slots, thresholds (ascending per anchor), kinks and slacks of every anchor, and for each
  /// (anchor, positive in class order) its slot's rank and d'(d_ap).
  void thresholds(double margin) {
    const LabelClasses& classes = *classes_;
    const Index n = x_.rows;
    Index* position = position_.data(static_cast<std::size_t>(n));
    for (Index c = 0; c < classes.classes(); ++c)
      for (const Index* m = classes.class_begin(c); m != classes.class_end(c); ++m)
        position[*m] = m - classes.class_begin(c);
    Index* slot_first = slot_first_.data(static_cast<std::size_t>(n) + 1);
    slot_first[0] = 0;
    Index widest_class = 0;
    for (Index a = 0; a < n; ++a) {
      const Index k = classes.negatives(a) > 0 ? classes.positives(a) : 0;
      slot_first[a + 1] = slot_first[a] + k;
      widest_class = std::max(widest_class, k);
    }
    const Index total = slot_first[n];
    double* t = threshold_.data(static_cast<std::size_t>(total));
    double* kink = kink_.data(static_cast<std::size_t>(total));
    double* derivative = derivative_.data(static_cast<std::size_t>(total));
    Index* rank = rank_.data(static_cast<std::size_t>(total));
    double* slack = slack_.data(static_cast<std::size_t>(n));
    double* key = key_.data(static_cast<std::size_t>(widest_class));
    Index* order = order_.data(static_cast<std::size_t>(widest_class));
    for (Index a = 0; a < n; ++a) {
      const Index f = slot_first[a], k = slot_first[a + 1] - f;
      slack[a] = 0.0;
      if (k == 0) continue;
      Index e = 0;
      for (const Index* p = classes.members_begin(a); p != classes.members_end(a); ++p) {
        if (*p == a) continue;
        const DistanceTerm d = distance_from_squared(pairwise_.exact(a, *p), distance_);
        key[e] = d.value + margin;
        derivative[f + e] = d.derivative;
        ++e;
      }
      std::iota(order, order + k, Index(0));
      std::sort(order, order + k, [&](Index u, Index v) { return key[u] < key[v] || (key[u] == key[v] && u < v); });
      double largest = 0.0;
      for (Index s = 0; s < k; ++s) {
        t[f + s] = key[order[s]];
        rank[f + order[s]] = s;
        // The kink as a squared distance (none below a threshold t <= 0 under Euclidean).
        if (distance_ == Distance::squared_euclidean || t[f + s] > 0.0) {
          kink[f + s] = distance_ == Distance::squared_euclidean ? t[f + s] : t[f + s] * t[f + s];
          largest = std::max(largest, std::abs(kink[f + s]));
        } else {
          kink[f + s] = -std::numeric_limits<double>::infinity();
        }
      }
      slack[a] = largest * Numerics<double>::kink_slack;
    }
  }

  /// The most slots of an anchor among rows [0, end).
  Index widest_slots(Index end) {
    const Index* slot_first = slot_first_.data(0);
    Index k = 0;
    for (Index j = 0; j < end; ++j) k = std::max(k, slot_first[j + 1] - slot_first[j]);
    return k;
  }

  /// The column role with the hinge where every anchor has at most scan_limit slots: row by
  /// row, the entries j < i of row i side by side as candidates of anchors j, each lane
  /// against its own anchor's thresholds (padded with -inf, which nothing lies below), with
  /// the per-anchor counts and sums kept in lanes. In blocks of rows and chunks of columns,
  /// so that a chunk's thresholds and sums stay in L1. No transposition.
  void columns_by_lanes(T* w, AllBandSlot* out) {
    using lanes = xsimd::batch<double>;
    constexpr Index width = static_cast<Index>(lanes::size);
    constexpr Index row_block = 64, chunk = 128;
    const Index first = first_, end = end_, stride = pairwise_.stride();
    const Index* slot_first = slot_first_.data(0);
    const Index k_max = widest_slots(end);
    if (k_max == 0) return;
    const double inf = std::numeric_limits<double>::infinity();
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const Index padded = (end + width - 1) / width * width;
    double* t = lane_threshold_.data(static_cast<std::size_t>(k_max * padded));
    double* kink = lane_kink_.data(static_cast<std::size_t>(k_max * padded));
    double* bound = lane_bound_.data(static_cast<std::size_t>(padded));
    double* cls = lane_class_.data(static_cast<std::size_t>(padded));
    const double* thresholds = threshold_.data(0);
    const double* kinks = kink_.data(0);
    const double* slack = slack_.data(0);
    const Index* class_of = classes_->class_of();
    bool any_bound = false;
    // Slot s of anchor j at at(s, j): a group's k_max batches side by side (a layout by s,
    // padded apart, put every batch of a column chunk in one cache set at N = 4096).
    const auto at = [&](Index s, Index j) { return ((j / width) * k_max + s) * width + j % width; };
    for (Index j = 0; j < padded; ++j) {
      const Index f = j < end ? slot_first[j] : 0, k = j < end ? slot_first[j + 1] - f : 0;
      for (Index s = 0; s < k_max; ++s) {
        t[at(s, j)] = s < k ? thresholds[f + s] : -inf;
        kink[at(s, j)] = s < k ? kinks[f + s] : nan;
      }
      const double rounding = j < end ? pairwise_.rounding_bound(j, widest_) : 0.0;
      bound[j] = rounding > 0.0 ? rounding + slack[j] : -1.0;  // -1: never near
      any_bound = any_bound || rounding > 0.0;
      cls[j] = j < end ? static_cast<double>(class_of[j]) : -1.0;
    }
    double* acc = lane_sums_.data(static_cast<std::size_t>(2 * k_max * padded));
    std::fill(acc, acc + 2 * k_max * padded, 0.0);
    double* count_of = acc;                    // [at(s, j)]
    double* sum_of = acc + k_max * padded;     // [at(s, j)]
    double* value = value_.data(static_cast<std::size_t>(chunk));
    double* slope = slope_.data(static_cast<std::size_t>(chunk));
    const lanes zero(0.0), one(1.0), half(0.5), infinity(inf), not_a_number(nan);
    const bool euclidean = distance_ == Distance::euclidean;
    for (Index i0 = first; i0 < end; i0 += row_block) {
      const Index i1 = std::min(i0 + row_block, end);
      for (Index j0 = 0; j0 + 1 < i1; j0 += chunk)
        for (Index i = std::max(i0, j0 + 1); i < i1; ++i) {
          const Index j1 = std::min(j0 + chunk, i);  // row i's entries [j0, j1) in this chunk
          const Index jn = j0 + (j1 - j0 + width - 1) / width * width;
          const T* sq = pairwise_.squared_row(i);
          for (Index j = j0; j < j1; ++j) value[j - j0] = static_cast<double>(sq[j]);
          for (Index j = j1; j < jn; ++j) value[j - j0] = nan;
          const lanes ci(static_cast<double>(class_of[i]));
          for (Index j = j0; j < jn; j += width) {
            const Index group = (j / width) * k_max * width;  // at(0, j)
            lanes x = xsimd::select(lanes::load_unaligned(cls + j) == ci, not_a_number,
                                    lanes::load_unaligned(value + (j - j0)));
            // As mining::exact_near_kinks, for each lane's anchor: rare.
            if (any_bound) {
              const lanes b = lanes::load_unaligned(bound + j);
              auto near = xsimd::abs(x - lanes::load_aligned(kink + group)) <= b;
              for (Index s = 1; s < k_max; ++s)
                near = near | (xsimd::abs(x - lanes::load_aligned(kink + group + s * width)) <= b);
              if (xsimd::any(near)) {
                alignas(64) double lane[width];
                x.store_aligned(lane);
                for (Index l = 0; l < width && j + l < j1; ++l) {
                  const Index a = j + l, f = slot_first[a], k = slot_first[a + 1] - f;
                  const double own = pairwise_.rounding_bound(a, i) + slack[a];
                  for (Index s = 0; s < k; ++s)
                    if (std::abs(lane[l] - kinks[f + s]) <= own) {
                      lane[l] = pairwise_.exact(a, i);
                      break;
                    }
                }
                x = lanes::load_aligned(lane);
              }
            }
            if (euclidean) x = xsimd::sqrt(x);
            lanes count(0.0);
            for (Index s = 0; s < k_max; ++s) {
              const auto below = x < lanes::load_aligned(t + group + s * width);
              const lanes hit = xsimd::select(below, one, zero);
              double* c = count_of + group + s * width;
              double* m = sum_of + group + s * width;
              (lanes::load_aligned(c) + hit).store_aligned(c);
              (lanes::load_aligned(m) + xsimd::select(below, x, zero)).store_aligned(m);
              count += hit;
            }
            // -#{s: d < t_js} d'(d): 0.5 / d under Euclidean, 0 at d = 0 or NaN.
            const lanes derivative =
                euclidean ? half / xsimd::select(x > zero, x, infinity) : one;
            (-count * derivative).store_unaligned(slope + (j - j0));
          }
          T* row = w + (i - first) * stride;
          for (Index j = j0; j < j1; ++j) row[j] += static_cast<T>(slope[j - j0]);
        }
    }
    for (Index j = 0; j < end; ++j) {
      const Index f = slot_first[j], k = slot_first[j + 1] - f;
      for (Index s = 0; s < k; ++s) {
        out[f + s].count += count_of[at(s, j)];
        out[f + s].sum += sum_of[at(s, j)];
      }
    }
  }

  /// Soft margin, anchor a over m candidates with product D2 `squared` (T; +inf, or set to
  /// +inf in the distances by mark(dist): not a negative of a), as the miner's
  /// all_soft_anchor_lanes: adds a's slot parts to `out` and writes the candidates' weights
  /// on D2 to weight[0, m) (which may be `squared`).
  template <class Mark>
  void soft_scan(Index a, const T* squared, Index m, AllBandSlot* out, T* weight, Mark&& mark) {
    const Index f = slot_first_.data(0)[a], k = slot_first_.data(0)[a + 1] - f;
    const double* t = threshold_.data(0) + f;
    const Index padded = SimdSoftMargin::soft_margin_padded<T>(m);
    T* dist = soft_.data(static_cast<std::size_t>(4 * padded));
    T* factor = dist + padded;
    T* inverse = factor + padded;
    T* slope = inverse + padded;
    SimdSoftMargin::soft_margin_distances(squared, m, padded, distance_, dist);
    mark(dist);
    double centre = 0.0;
    const bool factored =
        SimdSoftMargin::soft_margin_factors(dist, padded, t[0], t[k - 1], factor, inverse, centre);
    std::fill(slope, slope + padded, T(0));
    for (Index s = 0; s < k; ++s) {
      double positive_slope = 0.0;
      out[s].sum += factored
                        ? SimdSoftMargin::soft_margin_row_lanes<true, true>(
                              t[s], centre, dist, factor, inverse, padded, slope, positive_slope)
                        : SimdSoftMargin::soft_margin_row_lanes<false, true>(
                              t[s], centre, dist, factor, inverse, padded, slope, positive_slope);
      out[s].count += positive_slope;
    }
    SimdSoftMargin::soft_margin_negative_weights(slope, dist, padded, distance_);
    std::copy(slope, slope + m, weight);
  }

  /// The hinge, anchor a over m candidates: value[r] their squared product distances (NaN:
  /// not a negative of a), global(r) their rows. Adds a's slot parts to `out` and leaves in
  /// slope[r] the candidates' weights on D2 (0 off the negatives).
  template <class Global>
  void scan(Index a, double* value, Index m, Global&& global, AllBandSlot* out, double* slope) {
    const Index f = slot_first_.data(0)[a], k = slot_first_.data(0)[a + 1] - f;
    const double* t = threshold_.data(0) + f;
    // As mining::exact_near_kinks: which side of a kink a value lies on decides its triplet.
    const double bound = pairwise_.rounding_bound(a, widest_);
    if (bound > 0.0) {
      const double* kink = kink_.data(0) + f;
      const double slack = slack_.data(0)[a];
      SimdMiningScans::near_thresholds(value, m, kink, k, bound + slack, [&](Index r) {
        const Index j = global(r);
        const double own = pairwise_.rounding_bound(a, j) + slack;
        for (Index s = 0; s < k; ++s)
          if (std::abs(value[r] - kink[s]) <= own) {
            value[r] = pairwise_.exact(a, j);  // rare
            return;
          }
      });
    }
    if (distance_ == Distance::euclidean) SimdPairRowOps::square_root_in_place(value, m);
    if (k <= scan_limit) {
      double* active = active_.data(static_cast<std::size_t>(2 * k));
      SimdMiningScans::below_thresholds(value, m, t, k, distance_, active, active + k, slope);
      for (Index s = 0; s < k; ++s) {
        out[s].count += active[s];
        out[s].sum += active[k + s];
      }
    } else {
      // Bucket b: the negatives with b thresholds <= d, below the thresholds b..k-1.
      Index* bucket = bucket_.data(static_cast<std::size_t>(m));
      double* counts = active_.data(static_cast<std::size_t>(2 * (k + 1)));
      double* sums = counts + k + 1;
      std::fill(counts, counts + 2 * (k + 1), 0.0);
      count_thresholds_below<true>(t, k, value, m, bucket);
      for (Index r = 0; r < m; ++r) {
        if (value[r] != value[r]) {
          slope[r] = 0.0;
          continue;
        }
        counts[bucket[r]] += 1.0;
        sums[bucket[r]] += value[r];
        slope[r] = -static_cast<double>(k - bucket[r]) * distance_derivative(value[r], distance_);
      }
      double below = 0.0, below_sum = 0.0;
      for (Index s = 0; s < k; ++s) {
        below += counts[s];
        below_sum += sums[s];
        out[s].count += below;
        out[s].sum += below_sum;
      }
    }
  }

  PairwiseDistances<T> pairwise_;
  BandGradient<T> gradient_;
  MatrixView<const T> x_{};
  const LabelClasses* classes_ = nullptr;
  Distance distance_ = Distance::euclidean;
  bool soft_margin_ = false;
  Index first_ = 0, end_ = 0, widest_ = 0;
  GrowOnlyBuffer<Index> position_, slot_first_, rank_, order_, bucket_;
  GrowOnlyBuffer<double> threshold_, kink_, derivative_, slack_, key_;
  GrowOnlyBuffer<double> value_, slope_, active_;
  GrowOnlyBuffer<T> tile_, soft_;  // the column role's tile; soft_scan's rows
  // columns_by_lanes: per anchor lane, thresholds and kinks by slot, bounds, classes, sums.
  AlignedBuffer<double> lane_threshold_, lane_kink_, lane_sums_;  // by at(s, j), aligned loads
  GrowOnlyBuffer<double> lane_bound_, lane_class_;
  GrowOnlyBuffer<AllBandSlot> slots_;
  GrowOnlyBuffer<T> weights_;  // band: dL/dD2 (before top_diff / Z), both roles
};

}  // namespace detail
}  // namespace metricloss
