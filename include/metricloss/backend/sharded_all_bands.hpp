#pragma once
// BatchTripletLoss with Mining::all over a group's global batch X on simd, by bands of the
// triangle (backend/sharded_batch_all.hpp, backend/simd/all_band.hpp): rank q takes the pairs
// of rows [b_q, b_{q+1}) (~N^2 / (2W), each unordered pair once) and publishes, per slot
// (anchor, positive) of the rows its band touches, the count and distance sum of the
// negatives below the slot's threshold (soft margin: sums of sigma and softplus); merged in
// rank order they give L and Z on every rank alike. Then, only when some rank asked for a
// gradient, each band's part of dL/dX, reduced as lifted's (backend/sharded_band.hpp).
#include <metricloss/backend/sharded_band.hpp>
#include <metricloss/backend/simd/all_band.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/sharded.hpp>

#include <cstddef>

namespace metricloss {
namespace detail {

template <class T>
class ShardedAllBands {
 public:
  /// This rank's band of X's triangle and every anchor's slots. False where the centred
  /// norms are too large for the product's values to stay finite (every rank alike).
  template <class Group>
  bool prepare(Group& group, const MatrixView<const T>& x, const LabelClasses& classes,
               double margin, Distance distance, bool soft_margin) {
    const Index n = x.rows;
    const int ranks = group.size();
    return band_.prepare(x, classes, margin, distance, soft_margin,
                         triangle_band_start(n, ranks, group.rank()),
                         triangle_band_start(n, ranks, group.rank() + 1));
  }

  /// Every band's slot parts, merged per slot in rank order (the same bits on every rank),
  /// give L and Z; then, where some rank asked for it, the bands' gradient parts, which each
  /// rank adds for its own rows. `classes`: X's labels, as given to prepare.
  template <class Group, class L>
  T forward_backward(Group& group, const ShardView<T, L>& batch, const LabelClasses& classes,
                     bool soft_margin, const MatrixView<T>& grad, T top_diff) {
    const int ranks = group.size();
    const Index n = batch.x.rows;
    TriangleBands& bands = bands_;
    bands.assign(n, ranks);
    AllBand<T>& band = band_;
    const AllBandSlot* mine = band.slots();
    const Index* slot_first = band.slot_first();
    // Band q's parts: the slots of rows [0, e_q), from slot_offset[q] in what is gathered.
    Index* slot_offset = slot_offset_.data(static_cast<std::size_t>(ranks) + 1);
    slot_offset[0] = 0;
    for (int q = 0; q < ranks; ++q) slot_offset[q + 1] = slot_offset[q] + slot_first[bands.end_of(q)];
    AllBandSlot* all = band_slots_.data(static_cast<std::size_t>(slot_offset[ranks]));
    gather(group, bytes_, [&](int q) { return slot_first[bands.end_of(q)]; }, mine, all);
    AllBandSlot* merged = merged_.data(static_cast<std::size_t>(slot_first[n]));
    const double* t = band.slot_thresholds();
    double sum = 0.0, count = 0.0;
    for (Index a = 0; a < n; ++a) {
      const Index f = slot_first[a], k = slot_first[a + 1] - f;
      if (k == 0) continue;
      const int from = bands.first_band(a);
      for (Index s = f; s < f + k; ++s) {
        AllBandSlot m;
        for (int q = from; q < ranks; ++q) {
          m.count += all[slot_offset[q] + s].count;
          m.sum += all[slot_offset[q] + s].sum;
        }
        merged[s] = m;
      }
      if (soft_margin) {
        for (Index s = f; s < f + k; ++s) sum += merged[s].sum;
        count += static_cast<double>(k) * static_cast<double>(classes.negatives(a));
      } else {
        for (Index s = f; s < f + k; ++s) {
          sum += merged[s].count * t[s] - merged[s].sum;
          count += merged[s].count;
        }
      }
    }
    if (count == 0.0) {
      fill_rows(grad, T(0));
      return T(0);
    }
    const T value = static_cast<T>(sum / count);
    if (!some_rank_wants_grad(batch.status, ranks)) return value;
    const T* part = band.gradient(merged, static_cast<double>(top_diff) / count);
    parts_.reduce(group, bytes_, bands, batch, part, grad);
    return value;
  }

 private:
  AllBand<T> band_;
  TriangleBands bands_;
  GrowOnlyBuffer<AllBandSlot> band_slots_, merged_;  // every band's slot parts; merged
  GrowOnlyBuffer<Index> slot_offset_;                 // W + 1: each band's first gathered slot
  GrowOnlyBuffer<std::size_t> bytes_;
  BandGradientParts<T> parts_;
};

}  // namespace detail
}  // namespace metricloss
