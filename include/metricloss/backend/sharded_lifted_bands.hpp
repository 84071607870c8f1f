#pragma once
// LiftedStructureLoss over a group's global batch X on simd, by bands of the triangle
// (backend/sharded_lifted.hpp, backend/simd/lifted_band.hpp): rank q takes the pairs of rows
// [b_q, b_{q+1}) of the strictly lower triangle (~N^2 / (2W) each, each unordered pair once)
// and publishes its rows' partial statistics, merged in rank order into log S (N numbers a
// band's end), then partial c^ and loss parts (2 numbers a row), and last, only when some
// rank asked for a gradient, its band's part of dL/dX (rows [0, b_{q+1}) x D), which each
// rank adds for its own rows. The one gradient reduction: a pair's weight belongs to both
// its rows, which a band shares with other ranks.
#include <metricloss/backend/sharded_band.hpp>
#include <metricloss/backend/simd/lifted_band.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/sharded.hpp>

#include <cstddef>

namespace metricloss {
namespace detail {

template <class T>
class ShardedLiftedBands {
 public:
  /// Step 1 on this rank's band of X's triangle. False where the centred norms are too large
  /// for the product's values to stay finite (every rank alike).
  template <class Group>
  bool prepare(Group& group, const MatrixView<const T>& x, const LabelClasses& classes) {
    const Index n = x.rows;
    const int ranks = group.size();
    sums_ = band_.sums(x, classes.class_of(), triangle_band_start(n, ranks, group.rank()),
                       triangle_band_start(n, ranks, group.rank() + 1));
    return sums_ != nullptr;
  }

  /// The band's statistics merged over the ranks in rank order (the same bits on every
  /// rank), and the band's gradient parts, which each rank adds for its own rows (in double,
  /// in rank order). `classes`: X's labels, as given to prepare; |P| = `pairs`.
  template <class Group, class L>
  T forward_backward(Group& group, const ShardView<T, L>& batch, const LabelClasses& classes,
                     double margin, double pairs, const MatrixView<T>& grad, T top_diff) {
    const int ranks = group.size();
    const Index n = batch.x.rows;
    TriangleBands& bands = bands_;
    bands.assign(n, ranks);
    const auto end_of = [&](int q) { return bands.end_of(q); };

    // 1. log S of every row.
    LiftedBandSums* all_sums = band_sums_.data(static_cast<std::size_t>(bands.total()));
    gather(group, bytes_, end_of, sums_, all_sums);
    LiftedBandSums* parts = sum_parts_.data(static_cast<std::size_t>(ranks));
    double* log_s = log_s_.data(static_cast<std::size_t>(n));
    for (Index a = 0; a < n; ++a) {
      int count = 0;
      for (int q = bands.first_band(a); q < ranks; ++q) parts[count++] = all_sums[bands.offset(q) + a];
      log_s[a] = lifted_merged_log_normaliser(margin, parts, count);
    }

    // 2. c^ of every row, and the loss (row by row, each row's parts in rank order).
    const LiftedRowTotals* totals = band_.totals(log_s, [&](Index i, auto&& visit) {
      for (const Index* p = classes.members_begin(i); p != classes.members_end(i); ++p) visit(*p);
    });
    LiftedRowTotals* all = totals_.data(static_cast<std::size_t>(bands.total()));
    gather(group, bytes_, end_of, totals, all);
    double* coefficient = coefficient_.data(static_cast<std::size_t>(n));
    double sum = 0.0;
    for (Index a = 0; a < n; ++a) {
      double c = 0.0;
      for (int q = bands.first_band(a); q < ranks; ++q) {
        c += all[bands.offset(q) + a].scaled_coefficient;
        sum += all[bands.offset(q) + a].loss;
      }
      coefficient[a] = c;
    }
    const T value = static_cast<T>(sum / (2.0 * pairs));

    // 3. The gradient, only where some rank asked for it (the same choice on every rank).
    if (!some_rank_wants_grad(batch.status, ranks)) return value;
    const T* part = band_.gradient(log_s, coefficient, margin, pairs, top_diff);
    parts_.reduce(group, bytes_, bands, batch, part, grad);
    return value;
  }

 private:
  LiftedBand<T> band_;
  const LiftedBandSums* sums_ = nullptr;  // this band's, from prepare
  TriangleBands bands_;
  GrowOnlyBuffer<LiftedBandSums> band_sums_, sum_parts_;  // every band's parts; one row's
  GrowOnlyBuffer<double> log_s_, coefficient_;            // N: merged log S and c^
  GrowOnlyBuffer<LiftedRowTotals> totals_;                // every band's
  GrowOnlyBuffer<std::size_t> bytes_;
  BandGradientParts<T> parts_;
};

}  // namespace detail
}  // namespace metricloss
