#pragma once
// Online triplet mining over one labelled batch, shared by the CPU backends of
// BatchTripletLoss. A backend supplies the squared distances and receives the gradient as
// weights on squared distances; the selection and the loss are decided here only.
//
//   Distances: row(a)[j]  squared distance used to select (approximate on the simd path),
//              exact(a, j) squared distance by differences, used in the loss of mined pairs;
//              rounding(a, j) a bound on |row(a)[j] - exact(a, j)| (0 when exact);
//              widest() a j whose rounding(a, j) is the largest of row a, for every a.
//   Weights:   enabled()   false when no gradient is wanted;
//              add(i, j, w) adds w = d(sum)/d q_ij, where sum is the loss before division by
//              its count (the caller scales by top_diff / count);
//              add_row(i, w, n) adds w[j] to every (i, j) (zeros included);
//              add_row_lanes(i, w, n) the same with w in the distances' type (only where
//              Kernels::soft_margin_lanes).
//   Kernels:   the backend's part, handed in: RowOps (row primitives: square roots, a
//              soft-margin row over double distances), Scans (the row scans:
//              ScalarMiningScans or SimdMiningScans), soft_margin_lanes and, where it is
//              true, SoftMargin (the soft-margin rows in lanes of T: SimdSoftMargin).
//
// Selection compares squared distances: d is monotone in q for both Distance kinds. Costs,
// with c = the largest class size and k = c - 1 positives per anchor:
//   hard      O(N^2): one pass over each anchor's row.
//   semihard  k <= scan_limit (16): one scan of the anchor's row per positive, in lanes
//             (Kernels::Scans), for the nearest negative farther than it; O(N^2 c) but a few
//             cycles per 8 entries. More positives: O(N^2 log c), the positives sorted by
//             distance cut the negatives into buckets (binary search), and a suffix minimum
//             over buckets gives every positive its nearest farther negative. Long rows
//             (>= 128 candidates a positive, a reference set's) look buckets up in a table
//             of cells over the thresholds instead (mining/cells.hpp): O(N) a row.
//   all       the same regimes with counts and sums of the negatives' distances below
//             each threshold give, per positive, the number of active triplets and their
//             summed hinge (sum over active n of d_ap + m - d_an), and per negative the
//             number of positives it is active with. soft_margin: O(N^2 c), since softplus
//             does not factor (its exp does: see SimdRowOps' lane kernels).
//
// The selection rules live one per file in detail/mining/ (hard, semihard, semihard_cells,
// all, all_soft), over the shared scratch and tie settling of detail/mining/common.hpp and
// the bucket table of detail/mining/cells.hpp.

#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/mining/all.hpp>
#include <metricloss/detail/mining/common.hpp>
#include <metricloss/detail/mining/hard.hpp>
#include <metricloss/detail/mining/semihard.hpp>
#include <metricloss/options.hpp>

namespace metricloss {
namespace detail {

/// Mining with its per-anchor scratch memory (grow-only). Kernels::RowOps (the backend's
/// row primitives) supplies the O(N^2 c) inner loop of Mining::all with soft_margin:
/// soft_margin_row over double distances, or the soft_margin_*lanes kernels over the
/// distances in their own type (see mining::all_soft_anchor_lanes).
class TripletMiner {
 public:
  /// Classes: LabelClasses (one batch: anchors and candidates are its rows) or CrossClasses
  /// (anchors Q, candidates R).
  template <class Kernels, class Classes, class Distances, class Weights>
  MiningResult mine(Mining mode, const Classes& classes, const Distances& distances,
                    double margin, Distance distance, bool soft_margin, Weights& weights) {
    switch (mode) {
      case Mining::hard:
        return mining::hard<Kernels>(scratch_, classes, distances, margin, distance, soft_margin,
                                     weights);
      case Mining::semihard:
        return mining::semihard<Kernels>(scratch_, classes, distances, margin, distance,
                                         soft_margin, weights);
      case Mining::all:
        return mining::all<Kernels>(scratch_, classes, distances, margin, distance, soft_margin,
                                    weights);
    }
    return {};
  }

 private:
  mining::Scratch scratch_;
};

}  // namespace detail
}  // namespace metricloss
