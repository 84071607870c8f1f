#pragma once
// One anchor's row of MultiSimilarityLoss in double lanes (backend/simd/multi_similarity.hpp):
// the scalar row of detail/multi_similarity_math.hpp bit for bit, its kept sets decided on
// exact similarities where the product's rounding could decide them.
#include <metricloss/backend/simd/similarities.hpp>
#include <metricloss/backend/simd/widen.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/multi_similarity_math.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace metricloss {
namespace detail {

/// One block of `lanes` candidates [j, j + lanes) of anchor a's row (in double): the
/// similarities, and which lanes are positive and negative candidates (neither: self(a), or
/// past `end`, whose lanes read 0 and no class).
struct MultiSimilarityBlock {
  using B = xsimd::batch<double>;
  using M = xsimd::batch_bool<double>;
  using I = xsimd::batch<std::int64_t>;
  static_assert(I::size == B::size && sizeof(Index) == sizeof(std::int64_t),
                "class indices load as lanes of the similarities' width");
  static constexpr Index lanes = static_cast<Index>(B::size);

  B v;
  M pos, neg;

  /// `own` is the anchor's class as a lane value (NaN without one: nothing is positive);
  /// `iota` holds 0, 1, ..., lanes - 1.
  MultiSimilarityBlock(const double* row, const Index* class_of, Index j, Index end, Index self,
                       const B& own, const B& iota) {
    const B at = iota + B(static_cast<double>(j));
    B cls;
    if (j + lanes <= end) {
      v = B::load_unaligned(row + j);
      cls = xsimd::batch_cast<double>(I::load_unaligned(reinterpret_cast<const std::int64_t*>(class_of + j)));
    } else {
      alignas(64) double values[lanes], classes[lanes];
      for (Index l = 0; l < lanes; ++l) {
        values[l] = j + l < end ? row[j + l] : 0.0;
        classes[l] = j + l < end ? static_cast<double>(class_of[j + l]) : -1.0;
      }
      v = B::load_aligned(values);
      cls = B::load_aligned(classes);
    }
    const M candidate = (at < B(static_cast<double>(end))) && (at != B(static_cast<double>(self)));
    const M same = cls == own;
    pos = candidate && same;
    neg = candidate && !same;
  }
};

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
/// the same extremes (exact minima and maxima), kept sets and exponents, bit for bit (and
/// the row's stats into `stats` when given); a
/// block holding a similarity within widest_rounding(a) (>= every rounding(a, j)) of its
/// kept-set limit goes pair by pair through the scalar row's test, on the exact similarity
/// where its own rounding could decide it. Only the sums of exponentials add in lane order.
/// Blocks whose shifted exponents are all <= -746 (e^-746 is 0 in double; not kept is -inf)
/// skip their exponentials. `z` (length end) is scratch.
template <class T, class Classes>
double multi_similarity_row_lanes(const MultiSimilarityRule& rule, const Classes& classes,
                                  const CrossSimilarities<T>& s, Index a, Index end, double* z,
                                  GrowOnlyBuffer<double>& widened, T* out, double scale,
                                  MultiSimilarityRowStats* stats = nullptr) {
  using Block = MultiSimilarityBlock;
  using B = typename Block::B;
  constexpr Index lanes = Block::lanes;
  constexpr double inf = std::numeric_limits<double>::infinity();
  const double* row = widened_row(s.row(a), end, widened);
  const Index own = classes.own_class(a), self = classes.self(a);
  const Index* class_of = classes.class_of();
  const B own_class(own >= 0 ? static_cast<double>(own) : std::numeric_limits<double>::quiet_NaN());
  alignas(64) double index[lanes];
  for (Index l = 0; l < lanes; ++l) index[l] = static_cast<double>(l);
  const B iota = B::load_aligned(index);
  const auto block = [&](Index j) { return Block(row, class_of, j, end, self, own_class, iota); };
  const B pos_inf(inf), neg_inf(-inf);
  // The extremes: the smallest positive and the largest negative similarity.
  B lanes_min_pos(inf), lanes_max_neg(-inf);
  for (Index j = 0; j < end; j += lanes) {
    const Block b = block(j);
    lanes_min_pos = xsimd::min(lanes_min_pos, xsimd::select(b.pos, b.v, pos_inf));
    lanes_max_neg = xsimd::max(lanes_max_neg, xsimd::select(b.neg, b.v, neg_inf));
  }
  double min_pos = lanes_min(lanes_min_pos), max_neg = lanes_max(lanes_max_neg);
  const double slack = 2.0 * s.widest_rounding(a);
  if (!rule.keep_all && slack > 0.0) {
    // Only entries within twice the rounding of the approximate extreme can be the exact one.
    const B below(min_pos + slack), above(max_neg - slack);
    double exact_min = inf, exact_max = -inf;
    for (Index j = 0; j < end; j += lanes) {
      const Block b = block(j);
      const auto near_min = b.pos && (b.v <= below), near_max = b.neg && (b.v >= above);
      if (xsimd::any(near_min || near_max))
        multi_similarity_exact_extremes(classes, s, a, j, std::min(j + lanes, end), min_pos + slack,
                                        max_neg - slack, exact_min, exact_max);
    }
    min_pos = exact_min;
    max_neg = exact_max;
  }
  // Kept: positives with S < max_neg + epsilon, negatives with S > min_pos - epsilon.
  const double pos_limit = max_neg + rule.epsilon, neg_limit = min_pos - rule.epsilon;
  const B pos_lim(pos_limit), neg_lim(neg_limit), bound(s.widest_rounding(a)), base(rule.base),
      pos_slope(-rule.alpha), neg_slope(rule.beta);
  B pos_tops(-inf), neg_tops(-inf);
  double pos_top = -inf, neg_top = -inf;  // of the blocks settled pair by pair
  for (Index j = 0; j < end; j += lanes) {
    const Block b = block(j);
    if (!rule.keep_all) {
      const B limit = xsimd::select(b.pos, pos_lim, neg_lim);
      if (xsimd::any((b.pos || b.neg) && (xsimd::abs(b.v - limit) <= bound))) {
        multi_similarity_exponents(rule, classes, s, a, j, std::min(j + lanes, end), pos_limit,
                                   neg_limit, z, pos_top, neg_top);
        continue;
      }
    }
    const auto kept_pos = rule.keep_all ? b.pos : b.pos && (b.v < pos_lim);
    const auto kept_neg = rule.keep_all ? b.neg : b.neg && (b.v > neg_lim);
    const B centred = b.v - base;
    const B zp = xsimd::select(kept_pos, pos_slope * centred, neg_inf);
    const B zn = xsimd::select(kept_neg, neg_slope * centred, neg_inf);
    pos_tops = xsimd::max(pos_tops, zp);
    neg_tops = xsimd::max(neg_tops, zn);
    const B zj = xsimd::max(zp, zn);  // -inf unless kept
    if (j + lanes <= end) {
      zj.store_unaligned(z + j);
    } else {
      alignas(64) double tail[lanes];
      zj.store_aligned(tail);
      std::copy(tail, tail + (end - j), z + j);
    }
  }
  pos_top = std::max(pos_top, lanes_max(pos_tops));
  neg_top = std::max(neg_top, lanes_max(neg_tops));
  LogOnePlusSum pos, neg;
  pos.start(pos_top, pos_top != -inf);
  neg.start(neg_top, neg_top != -inf);
  // z[j] = e^{z_j - shift} (0 where not kept), summed per side.
  const B pos_shift(pos.shift), neg_shift(neg.shift), underflow(-746.0), floor(-1000.0), zero(0.0);
  B pos_sums(0.0), neg_sums(0.0);
  alignas(64) double padded[lanes];
  for (Index j = 0; j < end; j += lanes) {
    const bool full = j + lanes <= end;
    double* at = full ? z + j : padded;
    if (!full)
      for (Index l = 0; l < lanes; ++l) padded[l] = j + l < end ? z[j + l] : -inf;
    const Block b = block(j);
    const B shifted = B::load_unaligned(at) - xsimd::select(b.pos, pos_shift, neg_shift);
    const B e = xsimd::all(shifted <= underflow) ? zero : xsimd::exp(xsimd::max(shifted, floor));
    pos_sums += xsimd::select(b.pos, e, zero);
    neg_sums += xsimd::select(b.pos, zero, e);
    if (!out) continue;
    e.store_unaligned(at);
    if (!full) std::copy(padded, padded + (end - j), z + j);
  }
  pos.sum += xsimd::hadd(pos_sums);
  neg.sum += xsimd::hadd(neg_sums);
  if (out) {
    // d/dS of (1/alpha) log(1 + sum e^{-alpha (S - base)}) and (1/beta) log(1 + sum e^{beta (S - base)}).
    const double pos_scale = -scale / pos.sum, neg_scale = scale / neg.sum;
    const B pos_w(pos_scale), neg_w(neg_scale);
    const Index full = end - end % lanes;
    for (Index j = 0; j < full; j += lanes) {
      const Block b = block(j);
      (B::load_unaligned(z + j) * xsimd::select(b.pos, pos_w, neg_w)).store_unaligned(out + j);
    }
    for (Index j = full; j < end; ++j)
      out[j] = static_cast<T>(z[j] * (multi_similarity_positive(classes, a, j) ? pos_scale : neg_scale));
  }
  const double loss = pos.value() / rule.alpha + neg.value() / rule.beta;
  if (stats != nullptr)
    *stats = {pos_limit, neg_limit, pos.shift, pos.sum, neg.shift, neg.sum, loss};
  return loss;
}

}  // namespace detail
}  // namespace metricloss
