#pragma once
// The column role of a batch-all band (backend/simd/all_band.hpp) with the hinge, where every
// anchor has at most scan_limit slots: anchors j side by side in lanes, each against its own
// thresholds, over the band's rows i > j. No transposition.
#include <metricloss/backend/simd/all_band_anchors.hpp>
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/mining/common.hpp>
#include <metricloss/detail/triplet_math.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

template <class T>
class AllBandLanes {
 public:
  /// Anchors [0, end) over the band's rows [first, end) of `pairwise` (squared rows
  /// `stride` apart in w): adds each entry's weight on D2 to w and the anchors' slot parts to
  /// `out`. `widest` is the row of the largest centred norm.
  void run(PairwiseDistances<T>& pairwise, AllBandAnchors<T>& anchors, const Index* class_of,
           Distance distance, Index widest, Index first, Index end, T* w, AllBandSlot* out) {
    using lanes = xsimd::batch<double>;
    constexpr Index width = static_cast<Index>(lanes::size);
    constexpr Index row_block = 64, chunk = 128;
    const Index stride = pairwise.stride();
    const Index* slot_first = anchors.slot_first();
    const Index k_max = anchors.widest_slots(end);
    if (k_max == 0) return;
    const double inf = std::numeric_limits<double>::infinity();
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const Index padded = (end + width - 1) / width * width;
    double* t = lane_threshold_.data(static_cast<std::size_t>(k_max * padded));
    double* kink = lane_kink_.data(static_cast<std::size_t>(k_max * padded));
    double* bound = lane_bound_.data(static_cast<std::size_t>(padded));
    double* cls = lane_class_.data(static_cast<std::size_t>(padded));
    const double* thresholds = anchors.thresholds();
    const double* kinks = anchors.kinks();
    const double* slack = anchors.slacks();
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
      const double rounding = j < end ? pairwise.rounding_bound(j, widest) : 0.0;
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
    const bool euclidean = distance == Distance::euclidean;
    for (Index i0 = first; i0 < end; i0 += row_block) {
      const Index i1 = std::min(i0 + row_block, end);
      for (Index j0 = 0; j0 + 1 < i1; j0 += chunk)
        for (Index i = std::max(i0, j0 + 1); i < i1; ++i) {
          const Index j1 = std::min(j0 + chunk, i);  // row i's entries [j0, j1) in this chunk
          const Index jn = j0 + (j1 - j0 + width - 1) / width * width;
          const T* sq = pairwise.squared_row(i);
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
                  const double own = pairwise.rounding_bound(a, i) + slack[a];
                  for (Index s = 0; s < k; ++s)
                    if (std::abs(lane[l] - kinks[f + s]) <= own) {
                      lane[l] = pairwise.exact(a, i);
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

 private:
  // Per anchor lane: thresholds and kinks by slot, sums (by at(s, j), aligned loads), bounds,
  // classes; one chunk of a row's values and weights.
  AlignedBuffer<double> lane_threshold_, lane_kink_, lane_sums_;
  GrowOnlyBuffer<double> lane_bound_, lane_class_, value_, slope_;
};

}  // namespace detail
}  // namespace metricloss
