#pragma once
// What the sharded losses that split the lower triangle into bands (lifted,
// backend/sharded_lifted.hpp; batch-all, backend/sharded_batch_all.hpp) share: where each
// band's per-row parts land when gathered, and the one gradient reduction a band cannot
// avoid (a pair's weight belongs to both its rows, which a band shares with other ranks).
#include <metricloss/backend/simd/hard_band.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/sharded.hpp>

#include <algorithm>

namespace metricloss {
namespace detail {

/// Band q of W holds rows [b_q, b_{q+1}) of the triangle and touches rows [0, e_q),
/// e_q = b_{q+1} nondecreasing: gathered per-row parts of band q sit at offset(q) + a.
class TriangleBands {
 public:
  void assign(Index n, int ranks) {
    ranks_ = ranks;
    Index* offset = offset_.data(static_cast<std::size_t>(ranks) + 1);
    offset[0] = 0;
    for (int q = 0; q < ranks; ++q) offset[q + 1] = offset[q] + triangle_band_start(n, ranks, q + 1);
  }
  int ranks() const { return ranks_; }
  Index offset(int q) const { return offset_.data(0)[q]; }
  /// e_q: the rows band q touches.
  Index end_of(int q) const { return offset(q + 1) - offset(q); }
  /// Every band's rows, gathered.
  Index total() const { return offset(ranks_); }
  /// The first band that touches row a (every later one does too).
  int first_band(Index a) const {
    int q = 0;
    while (end_of(q) <= a) ++q;
    return q;
  }

 private:
  mutable GrowOnlyBuffer<Index> offset_;
  int ranks_ = 0;
};

/// Whether some rank asked for a gradient: the same answer on every rank.
inline bool some_rank_wants_grad(const ShardStatus* status, int ranks) {
  for (int q = 0; q < ranks; ++q)
    if (status[q].wants_grad != 0) return true;
  return false;
}

/// The gradient reduction over the bands: each rank's band part (rows [0, e_q) x D), summed
/// for this rank's rows in rank order, in double.
template <class T>
class BandGradientParts {
 public:
  /// Rank q sends its part of the rows it does not own, [0, lo_q) and [hi_q, e_q) (its own
  /// rows [f_q, f_q + n_q) clipped to the band's end): a rank needs the others' parts of its
  /// rows only. Every rank takes part (a collective); grad may be empty.
  template <class Group, class L>
  void reduce(Group& group, GrowOnlyBuffer<std::size_t>& bytes, const TriangleBands& bands,
              const ShardView<T, L>& batch, const T* part, const MatrixView<T>& grad) {
    const int ranks = bands.ranks();
    const Index d = batch.x.cols;
    // own[3q..3q+2]: lo_q, hi_q, and where q's rows land in what every rank receives.
    Index* own = own_rows_.data(3 * static_cast<std::size_t>(ranks));
    Index received = 0, at = 0;
    for (int q = 0; q < ranks; ++q) {
      const Index e = bands.end_of(q), f = at;
      at += static_cast<Index>(batch.status[q].rows);
      own[3 * q] = std::min(f, e);
      own[3 * q + 1] = std::min<Index>(at, e);
      own[3 * q + 2] = received;
      received += e - (own[3 * q + 1] - own[3 * q]);
    }
    const int me = group.rank();
    const Index lo = own[3 * me], hi = own[3 * me + 1], e = bands.end_of(me);
    T* send = send_.data(static_cast<std::size_t>((e - (hi - lo)) * d));
    std::copy(part, part + lo * d, send);
    std::copy(part + hi * d, part + e * d, send + lo * d);
    T* all_parts = parts_.data(static_cast<std::size_t>(received * d));
    gather(group, bytes,
           [&](int q) { return (bands.end_of(q) - (own[3 * q + 1] - own[3 * q])) * d; },
           static_cast<const T*>(send), all_parts);
    if (grad.empty()) return;
    // Each row's parts in rank order (this rank's own from `part`), added in double.
    const T** source = part_rows_.data(static_cast<std::size_t>(ranks));
    for (Index i = 0; i < batch.rows; ++i) {
      const Index a = batch.first + i;
      int count = 0;
      for (int q = bands.first_band(a); q < ranks; ++q) {
        // a is this rank's: outside q's own rows, so in q's first or second run.
        const Index row = a < own[3 * q] ? a : own[3 * q] + (a - own[3 * q + 1]);
        source[count++] = q == me ? part + a * d : all_parts + (own[3 * q + 2] + row) * d;
      }
      T* out = grad.row(i);
      for (Index c = 0; c < d; ++c) {
        double g = 0.0;
        for (int k = 0; k < count; ++k) g += static_cast<double>(source[k][c]);
        out[c] = static_cast<T>(g);
      }
    }
  }

 private:
  GrowOnlyBuffer<T> parts_;          // every other rank's parts of rows it does not own
  GrowOnlyBuffer<T> send_;           // this rank's, packed
  GrowOnlyBuffer<Index> own_rows_;   // 3 W
  GrowOnlyBuffer<const T*> part_rows_;
};

}  // namespace detail
}  // namespace metricloss
