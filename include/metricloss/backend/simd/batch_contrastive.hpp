#pragma once
// The SIMD path of BatchContrastiveLoss on the batch core: distances by one product on the
// centred rows (PairwiseDistances; CrossDistances for a reference set), each hinge near its
// turn decided on the distance by differences, the rows of detail/batch_contrastive_math.hpp
// (the batch's lower triangle: each unordered pair once), and the gradient through a dense
// weight sink: one product, near pairs by differences.
#include <metricloss/backend/simd/batch_triplet.hpp>
#include <metricloss/backend/simd/cross.hpp>
#include <metricloss/backend/simd/pairwise.hpp>
#include <metricloss/backend/simd/reference.hpp>
#include <metricloss/backend/simd/tuning.hpp>
#include <metricloss/backend/simd/weight_sinks.hpp>
#include <metricloss/backend/simd/widen.hpp>
#include <metricloss/batch_contrastive.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/batch_contrastive_math.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/cross_classes.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace metricloss {
namespace detail {

/// What the simd path keeps between calls (in the functor's slot).
template <class T>
struct SimdBatchContrastiveScratch : BackendSlot::Contents {
  LabelClasses classes;
  PairwiseDistances<T> pairwise;           // the batch's distances and products
  GrowOnlyBuffer<T> norms;                 // N: ||x_i - mean||^2 (SplitWeights)
  GrowOnlyBuffer<double> direct_gradient;  // N x D: near pairs by differences (SplitWeights)
  GrowOnlyBuffer<double> weight_row;       // one row of W
  GrowOnlyBuffer<double> widened;          // one row of D2 in double (T = float)
  CrossClasses cross_classes;
  CrossDistances<T> cross;                 // Q x R distances and products
};

/// contrastive_row in double lanes: each pair's decision, term and w[j] are the scalar
/// row's bits (the same operations, sqrt included); only the sums add in lane order. A block
/// of lanes holding self(a), or a distance within `near` (>= every rounding(a, j)) of its
/// side's turn, goes through contrastive_pairs, which settles it on the exact distance.
/// `row` is distances.row(a) in double.
template <class Classes, class Distances>
void contrastive_row_lanes(const ContrastiveRule& rule, const Classes& classes,
                           const Distances& distances, const double* row, Index a, Index end,
                           double near, ContrastiveTotals& totals, double* w = nullptr,
                           double pos_scale = 0.0, double neg_scale = 0.0) {
  using B = xsimd::batch<double>;
  using I = xsimd::batch<std::int64_t>;
  static_assert(I::size == B::size && sizeof(Index) == sizeof(std::int64_t),
                "class indices load as lanes of the distances' width");
  constexpr Index lanes = static_cast<Index>(B::size);
  const Index own = classes.own_class(a), self = classes.self(a);
  const auto* class_of = reinterpret_cast<const std::int64_t*>(classes.class_of());
  // No class is NaN: an anchor without a class has no positives.
  const B own_class(own >= 0 ? static_cast<double>(own) : std::numeric_limits<double>::quiet_NaN());
  const B zero(0.0), one(1.0), half(0.5), bound(near), pos_turn(rule.pos_turn),
      neg_turn(rule.neg_turn), pos_margin(rule.pos_margin), neg_margin(rule.neg_margin),
      pos_w(pos_scale), neg_w(neg_scale);
  B pos_sum(0.0), neg_sum(0.0), pos_active(0.0), neg_active(0.0), positives(0.0);
  ContrastiveRowSums settled;  // the blocks and the tail done pair by pair
  const Index full = end - end % lanes;
  for (Index j = 0; j < full; j += lanes) {
    const B d2 = B::load_unaligned(row + j);
    const auto positive = xsimd::batch_cast<double>(I::load_unaligned(class_of + j)) == own_class;
    const B turn = xsimd::select(positive, pos_turn, neg_turn);
    if ((self >= j && self < j + lanes) || xsimd::any(xsimd::abs(d2 - turn) <= bound)) {
      contrastive_pairs(rule, classes, distances, a, j, j + lanes, settled, w, pos_scale, neg_scale);
      continue;
    }
    const B d = rule.euclidean ? xsimd::sqrt(d2) : d2;
    const B h = xsimd::select(positive, d - pos_margin, neg_margin - d);
    const auto active = h > zero;
    const B value = xsimd::select(active, h, zero), counted = xsimd::select(active, one, zero);
    pos_sum += xsimd::select(positive, value, zero);
    neg_sum += xsimd::select(positive, zero, value);
    pos_active += xsimd::select(positive, counted, zero);
    neg_active += xsimd::select(positive, zero, counted);
    positives += xsimd::select(positive, one, zero);
    if (w) {
      // ContrastiveRule's slopes: +-0.5 / d (0 at d = 0) or +-1, then the side's scale.
      const B slope = rule.euclidean ? xsimd::select(d > zero, half / d, zero) : one;
      const B signed_slope = xsimd::select(positive, slope, -slope);
      xsimd::select(active, signed_slope * xsimd::select(positive, pos_w, neg_w), zero)
          .store_unaligned(w + j);
    }
  }
  contrastive_pairs(rule, classes, distances, a, full, end, settled, w, pos_scale, neg_scale);
  ContrastiveRowSums sums;
  sums.pos_sum = xsimd::hadd(pos_sum) + settled.pos_sum;
  sums.neg_sum = xsimd::hadd(neg_sum) + settled.neg_sum;
  sums.pos_active = xsimd::hadd(pos_active) + settled.pos_active;
  sums.neg_active = xsimd::hadd(neg_active) + settled.neg_active;
  sums.positives = xsimd::hadd(positives) + settled.positives;
  sums.add_to(totals, contrastive_candidates(classes, a, end));
}

/// The first sweep of rows over the anchors, in lanes: the totals. `end(a)` is anchor a's
/// candidate range, `widened` holds a row of D2 in double.
template <class Classes, class Distances, class End>
ContrastiveTotals contrastive_totals(const ContrastiveRule& rule, const Classes& classes,
                                     const Distances& distances, End end,
                                     GrowOnlyBuffer<double>& widened) {
  ContrastiveTotals totals;
  const Index widest = distances.widest();
  for (Index a = 0; a < classes.anchors(); ++a)
    contrastive_row_lanes(rule, classes, distances, widened_row(distances.row(a), end(a), widened),
                          a, end(a), distances.rounding(a, widest), totals);
  return totals;
}

/// The second sweep: each anchor's w[j] = dL/dD2_aj for j < end(a), with the totals' scales,
/// into `sink` (row: room for the widest range).
template <class Classes, class Distances, class End, class Sink>
void contrastive_weights(const ContrastiveRule& rule, const Classes& classes,
                         const Distances& distances, End end, const ContrastiveTotals& totals,
                         Sink& sink, double* row, GrowOnlyBuffer<double>& widened) {
  ContrastiveTotals again;
  const double pos = totals.pos_scale(rule), neg = totals.neg_scale(rule);
  const Index widest = distances.widest();
  for (Index a = 0; a < classes.anchors(); ++a) {
    const Index e = end(a);
    contrastive_row_lanes(rule, classes, distances, widened_row(distances.row(a), e, widened), a,
                          e, distances.rounding(a, widest), again, row, pos, neg);
    sink.add_row(a, row, e);
  }
}

/// Both sweeps (the second only when the sink is enabled); returns the totals.
template <class Classes, class Distances, class End, class Sink>
ContrastiveTotals contrastive_sweeps(const ContrastiveRule& rule, const Classes& classes,
                                     const Distances& distances, End end, Sink& sink,
                                     double* row, GrowOnlyBuffer<double>& widened) {
  const ContrastiveTotals totals = contrastive_totals(rule, classes, distances, end, widened);
  if (sink.enabled()) contrastive_weights(rule, classes, distances, end, totals, sink, row, widened);
  return totals;
}

template <class T>
struct Backend<BatchContrastiveLoss<T>, simd_tag> {
  template <class L>
  static T forward_backward(BatchContrastiveLoss<T>& loss, simd_tag, const MatrixView<const T>& x,
                            const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<SimdBatchContrastiveScratch<T>>(loss);
    T value;
    if (batch_triplet_not_finite(work.classes, x, labels, grad, value)) return value;
    work.pairwise.compute_lower(x);  // the sweeps read the lower triangle only
    const ContrastiveRule rule(loss.pos_margin, loss.neg_margin, loss.distance, loss.reduction);
    const ProductSquaredDistances<T> distances{&work.pairwise};
    const auto lower = [](Index a) { return a; };
    const ContrastiveTotals totals = contrastive_totals(rule, work.classes, distances, lower, work.widened);
    if (!grad.empty()) {
      double* row = work.weight_row.data(static_cast<std::size_t>(x.rows));
      const auto apply = [&](auto&& sink) {
        contrastive_weights(rule, work.classes, distances, lower, totals, sink, row, work.widened);
        sink.gradient(work.pairwise, static_cast<double>(top_diff), grad);
      };
      // Each nonzero weight is an active hinge; few of them go by differences.
      const double active = totals.pos_active + totals.neg_active;
      const double n = static_cast<double>(x.rows);
      if (active * tuning::direct_weights_per_pair <= n * n) apply(DirectWeights<T>(work.direct_gradient, x));
      else apply(SplitWeights<T>(work, x));
    }
    return static_cast<T>(totals.loss(rule));
  }
};

template <class T>
struct ReferenceBackend<BatchContrastiveLoss<T>, simd_tag> {
  static constexpr bool available = true;

  template <class L, class LR>
  static T forward_backward(BatchContrastiveLoss<T>& loss, simd_tag, const MatrixView<const T>& q,
                            const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                            const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
    auto& work = scratch_of<SimdBatchContrastiveScratch<T>>(loss);
    if (reference_not_finite(work.cross_classes, q, labels, ref, grad_q, grad_r))
      return std::numeric_limits<T>::quiet_NaN();
    work.cross.compute(q, ref.r);
    const ContrastiveRule rule(loss.pos_margin, loss.neg_margin, loss.distance, loss.reduction);
    const bool gradient = !grad_q.empty() || !grad_r.empty();
    CrossDenseWeights<T> weights;
    if (gradient) weights = {work.cross.zeroed_weights().data(), work.cross.stride()};
    const Index nr = ref.r.rows;
    double* row = work.weight_row.data(static_cast<std::size_t>(nr));
    const ContrastiveTotals totals = contrastive_sweeps(
        rule, work.cross_classes, CrossProductDistances<T>{&work.cross, work.cross.widest_reference()},
        [nr](Index) { return nr; }, weights, row, work.widened);
    if (gradient) work.cross.gradients(top_diff, grad_q, grad_r);
    return static_cast<T>(totals.loss(rule));
  }
};

}  // namespace detail
}  // namespace metricloss
