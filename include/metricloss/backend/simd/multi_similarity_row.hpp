#pragma once
// One anchor's row of MultiSimilarityLoss in double lanes (backend/simd/multi_similarity.hpp):
// the scalar row of detail/multi_similarity_math.hpp, its kept sets decided on exact
// similarities where the product's rounding could decide them.
#include <metricloss/backend/simd/similarities.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/multi_similarity_math.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace metricloss {
namespace detail {

/// One anchor's row as whole blocks of lanes (multi_similarity_row_lanes): its similarities
/// in double, each candidate's side (+1 positive, -1 negative, 0 neither: self, or past the
/// row's end, whose lanes read 0), and its exponents, then exponentials. Grow-only: a reused
/// functor allocates nothing.
struct MultiSimilarityRowBuffers {
  GrowOnlyBuffer<double> values, sides, z;
};

/// The side of each lane of block [j, j + lanes) of anchor a's row (past `end`: neither).
/// `own` is the anchor's class as a lane value (NaN without one: nothing is positive);
/// `iota` holds 0, 1, ..., lanes - 1.
inline xsimd::batch<double> multi_similarity_sides(const Index* class_of, Index j, Index end,
                                                   Index self, const xsimd::batch<double>& own,
                                                   const xsimd::batch<double>& iota) {
  using B = xsimd::batch<double>;
  using I = xsimd::batch<std::int64_t>;
  static_assert(I::size == B::size && sizeof(Index) == sizeof(std::int64_t),
                "class indices load as lanes of the similarities' width");
  constexpr Index lanes = static_cast<Index>(B::size);
  B cls;
  if (j + lanes <= end) {
    cls = xsimd::batch_cast<double>(I::load_unaligned(reinterpret_cast<const std::int64_t*>(class_of + j)));
  } else {
    alignas(64) double classes[lanes];
    for (Index l = 0; l < lanes; ++l) classes[l] = j + l < end ? static_cast<double>(class_of[j + l]) : -1.0;
    cls = B::load_aligned(classes);
  }
  const B at = iota + B(static_cast<double>(j));
  const auto candidate = (at < B(static_cast<double>(end))) && (at != B(static_cast<double>(self)));
  const auto same = cls == own;
  return xsimd::select(candidate && same, B(1.0), xsimd::select(candidate && !same, B(-1.0), B(0.0)));
}

/// The largest (or smallest) lane of a block.
inline double lanes_max(const xsimd::batch<double>& b) {
  alignas(64) double v[xsimd::batch<double>::size];
  b.store_aligned(v);
  return *std::max_element(v, v + xsimd::batch<double>::size);
}
inline double lanes_min(const xsimd::batch<double>& b) {
  alignas(64) double v[xsimd::batch<double>::size];
  b.store_aligned(v);
  return *std::min_element(v, v + xsimd::batch<double>::size);
}

/// multi_similarity_row in double lanes, with W's row written as T into `out` when given:
/// the same extremes (exact minima and maxima), kept sets, exponents and shifts, bit for bit
/// (and the row's stats into `stats` when given); a block holding a similarity within
/// widest_rounding(a) (>= every rounding(a, j)) of its kept-set limit goes pair by pair
/// through the scalar row's test, on the exact similarity where its own rounding could
/// decide it. The exponentials (xsimd's) and their sums (in lane
/// order) may differ from the scalar row's in the last bits (tests/mining_rounding.cpp).
/// Blocks whose shifted exponents are all <= -746 (e^-746 is 0 in double; not kept is -inf)
/// skip their exponentials.
///
/// Three passes over the row: its sides and extremes; the kept exponents with their
/// exponentials, under shifts predicted from the extremes (each side's largest exponent is
/// its most extreme similarity's, unless that one sits within rounding of the kept-set limit;
/// a wrong prediction repeats the pass with the right shifts, so the result never depends on
/// it); and W. Classes are read once, in the first pass. Similarities: CrossSimilarities, or
/// any type with its row(a), exact(a, j), rounding(a, j) and widest_rounding(a) (a test's).
template <class T, class Classes, class Similarities>
double multi_similarity_row_lanes(const MultiSimilarityRule& rule, const Classes& classes,
                                  const Similarities& s, Index a, Index end,
                                  MultiSimilarityRowBuffers& buffers, T* out, double scale,
                                  MultiSimilarityRowStats* stats = nullptr) {
  using B = xsimd::batch<double>;
  constexpr Index lanes = static_cast<Index>(B::size);
  constexpr double inf = std::numeric_limits<double>::infinity();
  const Index padded = (end + lanes - 1) / lanes * lanes;
  double* v = buffers.values.data(static_cast<std::size_t>(padded));
  double* side = buffers.sides.data(static_cast<std::size_t>(padded));
  double* z = buffers.z.data(static_cast<std::size_t>(padded));
  {
    const auto* row = s.row(a);  // one loop: GCC turns it into packed conversions
    for (Index j = 0; j < end; ++j) v[j] = static_cast<double>(row[j]);
    for (Index j = end; j < padded; ++j) v[j] = 0.0;
  }
  const Index own = classes.own_class(a), self = classes.self(a);
  const Index* class_of = classes.class_of();
  const B own_class(own >= 0 ? static_cast<double>(own) : std::numeric_limits<double>::quiet_NaN());
  alignas(64) double index[lanes];
  for (Index l = 0; l < lanes; ++l) index[l] = static_cast<double>(l);
  const B iota = B::load_aligned(index);
  const B pos_inf(inf), neg_inf(-inf), zero(0.0);
  // The extremes: the smallest positive and the largest negative similarity.
  B lanes_min_pos(inf), lanes_max_neg(-inf);
  for (Index j = 0; j < padded; j += lanes) {
    const B sides = multi_similarity_sides(class_of, j, end, self, own_class, iota);
    sides.store_unaligned(side + j);
    const B x = B::load_unaligned(v + j);
    lanes_min_pos = xsimd::min(lanes_min_pos, xsimd::select(sides > zero, x, pos_inf));
    lanes_max_neg = xsimd::max(lanes_max_neg, xsimd::select(sides < zero, x, neg_inf));
  }
  const double rounded_min_pos = lanes_min(lanes_min_pos), rounded_max_neg = lanes_max(lanes_max_neg);
  double min_pos = rounded_min_pos, max_neg = rounded_max_neg;
  const double slack = 2.0 * s.widest_rounding(a);
  if (!rule.keep_all && slack > 0.0) {
    // Only entries within twice the rounding of the approximate extreme can be the exact one.
    const B below(min_pos + slack), above(max_neg - slack);
    double exact_min = inf, exact_max = -inf;
    for (Index j = 0; j < padded; j += lanes) {
      const B x = B::load_unaligned(v + j), sides = B::load_unaligned(side + j);
      const auto near_min = (sides > zero) && (x <= below), near_max = (sides < zero) && (x >= above);
      if (xsimd::any(near_min || near_max))
        multi_similarity_exact_extremes(classes, s, a, j, std::min(j + lanes, end), min_pos + slack,
                                        max_neg - slack, exact_min, exact_max);
    }
    min_pos = exact_min;
    max_neg = exact_max;
  }
  // Kept: positives with S < max_neg + epsilon, negatives with S > min_pos - epsilon.
  const double pos_limit = max_neg + rule.epsilon, neg_limit = min_pos - rule.epsilon;
  const double widest = s.widest_rounding(a);
  const B pos_lim(pos_limit), neg_lim(neg_limit), bound(widest), base(rule.base),
      pos_slope(-rule.alpha), neg_slope(rule.beta), underflow(-746.0), floor(-1000.0);
  // Each side's shift, predicted: max(0, the exponent of its most extreme similarity), which
  // is the largest kept exponent unless no pair of the side is kept.
  const bool pos_may_keep = rounded_min_pos != inf && (rule.keep_all || rounded_min_pos < pos_limit + widest);
  const bool neg_may_keep = rounded_max_neg != -inf && (rule.keep_all || rounded_max_neg > neg_limit - widest);
  double pos_shift = pos_may_keep ? std::max(0.0, -rule.alpha * (rounded_min_pos - rule.base)) : 0.0;
  double neg_shift = neg_may_keep ? std::max(0.0, rule.beta * (rounded_max_neg - rule.base)) : 0.0;
  LogOnePlusSum pos, neg;
  B pos_sums(0.0), neg_sums(0.0);
  // z[j] = e^{z_j - shift} (0 where not kept), summed per side; then the true shifts.
  const auto exponentials = [&](double pos_shift_, double neg_shift_) {
    const B pos_by(pos_shift_), neg_by(neg_shift_);
    B pos_tops(-inf), neg_tops(-inf);
    double pos_top = -inf, neg_top = -inf;  // of the blocks settled pair by pair
    pos_sums = zero;
    neg_sums = zero;
    for (Index j = 0; j < padded; j += lanes) {
      const B x = B::load_unaligned(v + j), sides = B::load_unaligned(side + j);
      const auto p = sides > zero, n = sides < zero;
      B zj;
      if (!rule.keep_all && xsimd::any((p || n) && (xsimd::abs(x - xsimd::select(p, pos_lim, neg_lim)) <= bound))) {
        multi_similarity_exponents(rule, classes, s, a, j, std::min(j + lanes, end), pos_limit,
                                   neg_limit, z, pos_top, neg_top);
        zj = xsimd::select(p || n, B::load_unaligned(z + j), neg_inf);  // padded lanes: never written
      } else {
        const auto kept_pos = rule.keep_all ? p : p && (x < pos_lim);
        const auto kept_neg = rule.keep_all ? n : n && (x > neg_lim);
        const B centred = x - base;
        const B zp = xsimd::select(kept_pos, pos_slope * centred, neg_inf);
        const B zn = xsimd::select(kept_neg, neg_slope * centred, neg_inf);
        pos_tops = xsimd::max(pos_tops, zp);
        neg_tops = xsimd::max(neg_tops, zn);
        zj = xsimd::max(zp, zn);  // -inf unless kept
      }
      const B shifted = zj - xsimd::select(p, pos_by, neg_by);
      const B e = xsimd::all(shifted <= underflow) ? zero : xsimd::exp(xsimd::max(shifted, floor));
      pos_sums += xsimd::select(p, e, zero);
      neg_sums += xsimd::select(p, zero, e);
      if (out) e.store_unaligned(z + j);
    }
    pos_top = std::max(pos_top, lanes_max(pos_tops));
    neg_top = std::max(neg_top, lanes_max(neg_tops));
    pos.start(pos_top, pos_top != -inf);
    neg.start(neg_top, neg_top != -inf);
  };
  exponentials(pos_shift, neg_shift);
  if (pos.shift != pos_shift || neg.shift != neg_shift) {
    pos_shift = pos.shift;
    neg_shift = neg.shift;
    exponentials(pos_shift, neg_shift);
  }
  pos.sum += xsimd::hadd(pos_sums);
  neg.sum += xsimd::hadd(neg_sums);
  if (out) {
    // d/dS of (1/alpha) log(1 + sum e^{-alpha (S - base)}) and (1/beta) log(1 + sum e^{beta (S - base)}).
    const double pos_scale = -scale / pos.sum, neg_scale = scale / neg.sum;
    const B pos_w(pos_scale), neg_w(neg_scale);
    const Index full = end - end % lanes;
    for (Index j = 0; j < full; j += lanes) {
      const B w = B::load_unaligned(z + j) * xsimd::select(B::load_unaligned(side + j) > zero, pos_w, neg_w);
      w.store_unaligned(out + j);
    }
    for (Index j = full; j < end; ++j) out[j] = static_cast<T>(z[j] * (side[j] > 0.0 ? pos_scale : neg_scale));
  }
  const double loss = pos.value() / rule.alpha + neg.value() / rule.beta;
  if (stats != nullptr)
    *stats = {pos_limit, neg_limit, pos.shift, pos.sum, neg.shift, neg.sum, loss};
  return loss;
}

}  // namespace detail
}  // namespace metricloss
