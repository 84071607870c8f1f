#pragma once
// The SIMD path of MultiSimilarityLoss on the similarity form of the batch core: S by one
// product (CrossSimilarities, the batch as Q = R = X with self = identity), the rows of
// detail/multi_similarity_math.hpp with their kept sets decided on exact similarities where
// the product's rounding could decide them, and the gradient by one product (batch) or two
// (reference set).
#include <metricloss/backend/scalar/multi_similarity.hpp>
#include <metricloss/backend/simd/similarities.hpp>
#include <metricloss/backend/simd/widen.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/cross_classes.hpp>
#include <metricloss/detail/label_classes.hpp>
#include <metricloss/detail/multi_similarity_math.hpp>
#include <metricloss/multi_similarity.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace metricloss {
namespace detail {

/// e[j] = exp(e[j]) in double lanes (xsimd::exp; the tail through one padded batch, so every
/// entry takes the same kernel): the sharded lifted rows' exponentials (backend/sharded_lifted.hpp). Inputs below
/// -1000 (-inf: not kept) are raised to it first: e^-1000 is 0 in double all the same, and
/// xsimd's exp converts x / ln 2 to an integer before it selects 0, which for -inf is undefined.
struct LanesExp {
  static void in_place(double* e, Index n) {
    using batch = xsimd::batch<double>;
    constexpr Index lanes = static_cast<Index>(batch::size);
    const batch floor(-1000.0);
    Index j = 0;
    for (; j + lanes <= n; j += lanes)
      xsimd::exp(xsimd::max(batch::load_unaligned(e + j), floor)).store_unaligned(e + j);
    if (j == n) return;
    alignas(64) double tail[lanes];
    for (Index k = 0; k < lanes; ++k) tail[k] = j + k < n ? e[j + k] : -1000.0;
    xsimd::exp(xsimd::max(batch::load_aligned(tail), floor)).store_aligned(tail);
    for (Index k = 0; j + k < n; ++k) e[j + k] = tail[k];
  }
};

template <class T>
struct SimdMultiSimilarityScratch : BackendSlot::Contents {
  LabelClasses batch_classes;
  CrossClasses cross_classes;
  CrossSimilarities<T> similarities;
  GrowOnlyBuffer<double> exponents;  // one anchor's kept exponents, then their exponentials
  GrowOnlyBuffer<double> widened;    // one anchor's similarities in double (T = float)
};

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

/// Every anchor's row in order; W's rows into `similarities` when `gradient`. Returns sum L_a.
template <class T, class Classes>
double simd_multi_similarity_rows(const MultiSimilarityRule& rule, const Classes& classes,
                                  SimdMultiSimilarityScratch<T>& work, Index candidates,
                                  bool gradient, double scale) {
  double* z = work.exponents.data(static_cast<std::size_t>(candidates));
  double sum = 0.0;
  for (Index a = 0; a < classes.anchors(); ++a)
    sum += multi_similarity_row_lanes(rule, classes, work.similarities, a, candidates, z,
                                      work.widened, gradient ? work.similarities.weight_row(a) : nullptr, scale);
  return sum;
}

template <class T>
struct Backend<MultiSimilarityLoss<T>, simd_tag> {
  template <class L>
  static T forward_backward(MultiSimilarityLoss<T>& loss, simd_tag, const MatrixView<const T>& x,
                            const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff) {
    auto& work = scratch_of<SimdMultiSimilarityScratch<T>>(loss);
    T value;
    if (batch_triplet_not_finite(work.batch_classes, x, labels, grad, value)) return value;
    work.similarities.compute_symmetric(x);
    const double n = static_cast<double>(x.rows);
    const double sum = simd_multi_similarity_rows(rule_of(loss), work.batch_classes, work, x.rows,
                                                  !grad.empty(), static_cast<double>(top_diff) / n);
    if (!grad.empty()) work.similarities.symmetric_gradient(grad);
    return static_cast<T>(sum / n);
  }
};

template <class T>
struct ReferenceBackend<MultiSimilarityLoss<T>, simd_tag> {
  static constexpr bool available = true;

  template <class L, class LR>
  static T forward_backward(MultiSimilarityLoss<T>& loss, simd_tag, const MatrixView<const T>& q,
                            const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                            const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
    auto& work = scratch_of<SimdMultiSimilarityScratch<T>>(loss);
    if (reference_not_finite(work.cross_classes, q, labels, ref, grad_q, grad_r))
      return std::numeric_limits<T>::quiet_NaN();
    work.similarities.compute(q, ref.r);
    const bool gradient = !grad_q.empty() || !grad_r.empty();
    const double n = static_cast<double>(q.rows);
    const double sum = simd_multi_similarity_rows(rule_of(loss), work.cross_classes, work, ref.r.rows,
                                                  gradient, static_cast<double>(top_diff) / n);
    if (gradient) work.similarities.gradients(grad_q, grad_r);
    return static_cast<T>(sum / n);
  }
};

}  // namespace detail
}  // namespace metricloss
