#pragma once
// What the sharded batch-triplet paths share (backend/sharded_batch_triplet.hpp, a global
// batch; backend/sharded_reference_triplet.hpp, queries against a reference set): the totals
// each rank publishes, the functor's scratch, and mining this rank's anchors against a
// reference set by the tag's reference-set path.
#include <metricloss/backend/scalar/reference.hpp>
#include <metricloss/backend/simd/hard_band.hpp>
#include <metricloss/backend/simd/reference.hpp>
#include <metricloss/batch_triplet.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/batch_triplet_mining.hpp>
#include <metricloss/detail/label_classes.hpp>

#include <cstddef>
#include <type_traits>

namespace metricloss {
namespace detail {

/// This rank's mining totals, published to every rank.
struct ShardTotals {
  double sum = 0.0;
  double count = 0.0;
  double entries = 0.0;  // exact: entries < 2^53
};

/// What the statistics path keeps between calls (in the functor's slot).
template <class T>
struct ShardedTripletScratch : BackendSlot::Contents {
  CrossClasses classes;
  TripletMiner miner;
  CrossDistances<T> cross;                  // simd: Q x X by the centred product
  GrowOnlyBuffer<double> squared;           // scalar: Q x X by differences
  GrowOnlyBuffer<WeightEntry> entries;      // this rank's W entries (then anchor as a row of X)
  GrowOnlyBuffer<WeightEntry> all_entries;  // every rank's
  GrowOnlyBuffer<ShardTotals> totals;       // one per rank
  GrowOnlyBuffer<double> sums;              // n_r x D: this rank's gradient in double
  GrowOnlyBuffer<std::size_t> bytes;
  LabelClasses labels;                      // simd hard: X's classes
  HardBand<T> band;                         // simd hard: this rank's band of the triangle
  GrowOnlyBuffer<HardExtremes> all_extremes;
  GrowOnlyBuffer<Index> published;          // simd hard: rows of extremes from each rank
  AlignedBuffer<T> all_q;                   // reference sets: Q gathered (for grad_r)
  GrowOnlyBuffer<T> send;                   // reference sets: this rank's rows made dense
  GrowOnlyBuffer<T> parts;                  // reference sets, all: grad_r's parts
  GrowOnlyBuffer<double> dense;             // reference sets, all, scalar: n_r x N_r weights
  ScalarReferenceScratch scalar;            // reference sets, all, scalar: a gradient row
};

/// This rank's anchors q against ref (work.classes assigned) on the tag's reference-set path:
/// their terms into `sink` (anchors as rows of q); sum and count.
template <class Base, class T, class L>
MiningResult mine_sharded_triplets(BatchTripletLoss<T>& loss, ShardedTripletScratch<T>& work,
                                   const MatrixView<const T>& q, const ReferenceView<T, L>& ref,
                                   CrossSparseWeights<T>& sink) {
  if constexpr (std::is_same<Base, simd_tag>::value) {
    work.cross.compute(q, ref.r);
    const CrossProductDistances<T> distances{&work.cross, work.cross.widest_reference()};
    return work.miner.template mine<SimdMiningKernels>(loss.mining, work.classes, distances,
                                                       loss.margin, loss.distance,
                                                       loss.soft_margin, sink);
  } else {
    const Index nr = ref.r.rows;
    double* squared = work.squared.data(static_cast<std::size_t>(q.rows * nr));
    cross_distances(q, ref.r, false, squared);
    return work.miner.template mine<ScalarMiningKernels>(
        loss.mining, work.classes, ExactSquaredDistances{squared, nr}, loss.margin,
        loss.distance, loss.soft_margin, sink);
  }
}

}  // namespace detail
}  // namespace metricloss
