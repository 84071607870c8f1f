#pragma once
// Buckets of sorted thresholds by table look-up: the span of the thresholds cut into cells
// of equal width, each cell knowing its bucket unless a threshold (widened by `reach`) lies
// within one cell of it. A look-up is a subtraction, a product and a load where a binary
// search over k thresholds is log2(k) dependent loads; the few values in a marked cell are
// counted up from the cell's lower bound (and take whatever test `reach` stands for).

#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/views.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace metricloss {
namespace detail {
namespace mining {

/// code(v): 0 when v's cell is marked, else 1 + the number of thresholds below v (the same
/// strictly or at most: no threshold lies in an unmarked cell), and for every v in an
/// unmarked cell |v - t_i| > reach for every i (fl(v - t_i) too). below(v): a number of
/// thresholds lying below every value within reach of v's cell by more than a cell's width
/// (the bucket of an unmarked cell; in a marked one, those of the thresholds marking it
/// that come first): a search from there (count_from) takes a step or two.
class ThresholdCells {
 public:
  /// Cells for t[0..k) (sorted, finite) and `reach` >= 0 over rows of n values; false (and
  /// nothing to look up) where a table does not pay: too few values per cell, too few
  /// cells per threshold, or a span too narrow for its cells to be resolved in double.
  bool build(GrowOnlyBuffer<std::int16_t>& storage, const double* t, Index k, Index n,
             double reach) {
    constexpr Index max_cells = 16384, cells_per_threshold = 32;
    if (k <= 0 || k >= std::numeric_limits<std::int16_t>::max() || !(reach >= 0.0) ||
        !std::isfinite(t[0]) || !std::isfinite(t[k - 1]))
      return false;
    Index cells = 256;
    while (cells * 2 <= std::min(max_cells, n / 4)) cells *= 2;
    if (cells * 4 > n || cells < cells_per_threshold * k) return false;
    // Cells 0, 1 and the last two lie beyond every threshold's reach and its one-cell
    // margin: values off the span are clamped into them.
    const double width = ((t[k - 1] - t[0]) + 2.0 * reach) / static_cast<double>(cells - 6);
    lo_ = t[0] - reach - 2.0 * width;
    const double magnitude = std::max({std::abs(lo_), std::abs(t[k - 1]) + reach, reach});
    // Values a cell apart must differ by far more than the rounding of these sums.
    if (!(width > 0x1p-30 * magnitude) || !std::isfinite(width) || !std::isfinite(magnitude))
      return false;
    scale_ = 1.0 / width;
    last_ = cells - 1;
    std::int16_t* code = storage.data(static_cast<std::size_t>(2 * cells));
    std::int16_t* below = code + cells;
    table_ = code;
    below_ = below;
    // Threshold i marks the cells of [t_i - reach, t_i + reach] and one on each side;
    // the unmarked cells between thresholds i - 1 and i hold bucket i (code i + 1).
    Index next = 0;
    for (Index i = 0; i < k; ++i) {
      const Index first = std::max(cell(t[i] - reach) - 1, next);
      const Index end = std::min(cell(t[i] + reach) + 2, cells);
      std::fill(code + next, code + first, static_cast<std::int16_t>(i + 1));
      std::fill(below + next, below + first, static_cast<std::int16_t>(i));
      std::fill(code + first, code + end, static_cast<std::int16_t>(0));
      std::fill(below + first, below + end, static_cast<std::int16_t>(i));
      next = std::max(next, end);
    }
    std::fill(code + next, code + cells, static_cast<std::int16_t>(k + 1));
    std::fill(below + next, below + cells, static_cast<std::int16_t>(k));
    return true;
  }

  /// The cell of v, off the span clamped to the first or last (NaN: the first).
  Index cell(double v) const {
    const double x = (v - lo_) * scale_;
    return x >= 0.0 ? (x < static_cast<double>(last_) ? static_cast<Index>(x) : last_) : 0;
  }

  Index code(double v) const { return table_[cell(v)]; }
  Index below(double v) const { return below_[cell(v)]; }

 private:
  const std::int16_t* table_ = nullptr;
  const std::int16_t* below_ = nullptr;
  double lo_ = 0.0, scale_ = 0.0;
  Index last_ = 0;
};

/// The number of sorted thresholds t[0..k) below v (strictly, or at most v), counted up
/// from `from`, a number of them known to be below v (ThresholdCells::below).
template <bool OrEqual>
inline Index count_from(const double* t, Index k, Index from, double v) {
  while (from < k && (OrEqual ? t[from] <= v : t[from] < v)) ++from;
  return from;
}

}  // namespace mining
}  // namespace detail
}  // namespace metricloss
