#pragma once
// Sharded calls with a reference set (API.md, "Global batches" with "Reference sets"): rank r
// holds the queries q_r (n_r >= 0 rows) of Q = concat_r(q_r), and every rank passes the same
// reference set R (its rows, labels and label type bitwise equal: the memory of a cross-batch
// memory fed the global batch, or any replicated candidates). Each rank's self_index, if
// any, gives its own queries' rows of R. Every rank returns the loss of (Q, R), the same bits
// on every rank; writes its rows of dL/dQ; and, when asked, all of dL/dR, the same bits on
// every rank.
//
// A call is run_sharded's steps (detail/sharded.hpp): the agreement, which also compares R's
// shape and a hash of its bytes and labels across ranks; then either
//  - the loss's statistics (ShardedReferenceBackend: BatchTripletLoss, every mining mode;
//    MultiSimilarityLoss), O(n_r N_r D) per rank: each query's terms depend on it and R
//    only, so each rank runs its own queries and the ranks exchange totals (and, for
//    grad_r, what it needs), added in rank order; or
//  - Q, its labels and self indices gathered in rank order and the single-process reference
//    path on (Q, R) on every rank, O(N_q N_r D) each, bitwise the single process's (the
//    other losses and modes: their normalisers or lifted's column sums couple the queries).
#include <metricloss/detail/normalize.hpp>
#include <metricloss/detail/sharded.hpp>
#include <metricloss/reference.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

namespace metricloss {
namespace detail {

/// A 64-bit hash of bytes, a word at a time (splitmix64's finaliser on each): the agreement
/// that every rank passes the same R. Not cryptographic; an accidental match of two
/// different reference sets has probability ~2^-64.
struct BytesHash {
  std::uint64_t value = 0x9E3779B97F4A7C15ull;

  static std::uint64_t mix(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  void add(const void* data, std::size_t bytes) {
    const auto* b = static_cast<const unsigned char*>(data);
    std::size_t i = 0;
    for (; i + 8 <= bytes; i += 8) {
      std::uint64_t word;
      std::memcpy(&word, b + i, 8);
      value = mix(value ^ word);
    }
    std::uint64_t tail = 0;
    std::memcpy(&tail, b + i, bytes - i);
    value = mix(value ^ tail ^ (static_cast<std::uint64_t>(bytes - i) << 56));
  }
  void add(std::uint64_t word) { add(&word, sizeof word); }
};

/// R's shape, label type, rows and labels, hashed.
template <class T, class LR>
std::uint64_t reference_hash(const ReferenceView<T, LR>& ref) {
  BytesHash hash;
  hash.add(static_cast<std::uint64_t>(ref.r.rows));
  hash.add(static_cast<std::uint64_t>(ref.r.cols));
  hash.add(static_cast<std::uint64_t>(label_code<LR>()));
  for (Index i = 0; i < ref.r.rows; ++i)
    hash.add(ref.r.row(i), sizeof(T) * static_cast<std::size_t>(ref.r.cols));
  for (Index i = 0; i < ref.labels.size; ++i) {
    const LR y = ref.labels[i];
    hash.add(&y, sizeof y);
  }
  return hash.value;
}

/// The gathered self indices as a SelfIndex.
inline Index gathered_self_at(const void* all, Index a) {
  return static_cast<Index>(static_cast<const std::int64_t*>(all)[a]);
}

/// This rank's queries (under normalize: their unit rows) and R (the same on every rank;
/// self: this rank's self_index), for a loss's statistics path.
template <class T, class L, class LR>
struct ShardedQueries {
  MatrixView<const T> q;     // n_r x D, any stride
  VectorView<L> labels;      // n_r
  ReferenceView<T, LR> ref;  // R, its labels, this rank's self_index
  const ShardStatus* status = nullptr;  // one per rank
  Index first = 0;           // this rank's first query in Q
  Index n = 0;               // N_q
  bool any_grad_r = false;   // some rank wants grad_r: the collectives that it needs run
};

/// A loss's statistics path with a reference set on host tag Base, O(n_r N_r D) per rank:
/// specialisations set `available` and define
///   static bool handles(const Loss&, int ranks)
///   static T forward_backward(Loss&, Base, Group&, const ShardedQueries<T, L, LR>&,
///                             const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff)
/// whose collectives depend on nothing but what every rank knows alike (the statuses, the
/// options, R). The rest gather Q and run the single-process reference path.
template <class Loss, class Base>
struct ShardedReferenceBackend {
  static constexpr bool available = false;
};

/// grad_r from every rank's part of it (N_r x D each, dense): `parts` holds this rank's part
/// in its first N_r x D values and receives every rank's after them; grad_r (if wanted) is
/// their sum in rank order, in double: the same bits on every rank. A collective.
template <class Group, class T>
void add_grad_r_parts(Group& group, GrowOnlyBuffer<std::size_t>& bytes, T* parts, Index nr,
                      Index d, const MatrixView<T>& grad_r) {
  T* all = parts + nr * d;
  gather(group, bytes, [&](int) { return nr * d; }, static_cast<const T*>(parts), all);
  if (grad_r.empty()) return;
  const int ranks = group.size();
  for (Index j = 0; j < nr; ++j)
    for (Index k = 0; k < d; ++k) {
      double g = 0.0;
      for (int q = 0; q < ranks; ++q) g += static_cast<double>(all[(q * nr + j) * d + k]);
      grad_r.row(j)[k] = static_cast<T>(g);
    }
}

/// What a functor keeps for its sharded reference calls (in its slot).
template <class T, class L>
struct ShardedReferenceScratch : BackendSlot::Contents {
  AlignedBuffer<T> q;             // N_q x D: the global queries
  AlignedBuffer<T> grad;          // N_q x D: their gradient
  GrowOnlyBuffer<T> send;         // this rank's rows made dense when q is strided
  GrowOnlyBuffer<L> labels, send_labels;
  GrowOnlyBuffer<std::int64_t> self, send_self;
  GrowOnlyBuffer<ShardStatus> status;
  GrowOnlyBuffer<std::size_t> bytes;
};

/// The reference form's sharded call: what each loss's run_reference does for a
/// sharded_tag (the loss's name, the method, and its options' checks as in run_sharded).
template <class Loss, class Base, class Group, class X, class L, class LR, class GQ, class GR,
          class CheckOptions>
typename Loss::scalar_type run_sharded_reference(
    Loss& loss, const sharded_tag<Base, Group>& tag, const char* name, const char* method,
    const Eigen::MatrixBase<X>& q, const Eigen::MatrixBase<L>& labels_q,
    const ReferenceSet<typename Loss::scalar_type, LR>& ref, GQ&& grad_q, GR&& grad_r,
    typename Loss::scalar_type top_diff, CheckOptions&& check_options) {
  using T = typename Loss::scalar_type;
  using Label = typename L::Scalar;
  // Host memory only: R's hash and the gathers read the inputs here.
  static_assert(ReferenceBackend<Loss, Base>::available && normalizes_on_host<Base>,
                "metricloss: a sharded call with a reference set runs on metricloss::scalar and "
                "metricloss::simd so far");
  Validator check(name, scalar_name<T>(), method);
  Group& group = *tag.group;
  const auto qv = input_view(q);
  const auto lv = label_view(labels_q);
  auto gq = gradient_view<T>(std::forward<GQ>(grad_q));
  const auto gr = gradient_view<T>(std::forward<GR>(grad_r));
  // A rank without queries may pass a 0 x D gradient that has no storage.
  if (gq.rows == 0 && gq.stride < 0 && qv.rows == 0) gq = MatrixView<T>{};
  auto& work = scratch_of<ShardedReferenceScratch<T, Label>>(loss);

  // 1. Every rank's own checks (R and self_index included; under normalize, no zero row in
  // its queries or in R), then the agreement, R's hash with it.
  const std::string error = local_error(check, [&] {
    if (qv.rows > 0)
      check.embeddings("q", qv);
    else if (qv.cols < 1)
      check.fail("argument 'q' has shape " + shape_string(qv.rows, qv.cols) +
                 "; a rank without queries passes 0 x D, D >= 1");
    check.labels("labels_q", lv, qv.rows, "q");
    check_options(check);
    check_reference(check, qv, lv, ref.view, gq, gr);
    if (loss.normalize) {
      auto& unit = scratch_of<NormalizedRows<T>>(loss);
      unit.x.of(check, "q", qv);
      unit.r.of(check, "r", ref.view.r);
    }
  });
  ShardStatus mine{static_cast<std::int64_t>(qv.rows), static_cast<std::int64_t>(qv.cols),
                   error.empty() ? 1 : 0, static_cast<std::int32_t>(sizeof(T)),
                   label_code<Label>(), static_cast<std::int32_t>(error.size()),
                   options_hash<Base>(loss)};
  mine.reference_rows = static_cast<std::int64_t>(ref.view.r.rows);
  mine.reference_hash = error.empty() ? reference_hash(ref.view) : 0;
  mine.self_given = ref.view.self.given() ? 1 : 0;
  mine.wants_grad_r = gr.empty() ? 0 : 1;
  mine.wants_grad = gq.empty() ? 0 : 1;
  agree(group, check, mine, error, work.status, work.bytes,
        [&] { return options_text<Base>(loss); });

  const int ranks = group.size();
  const ShardStatus* status = work.status.data(static_cast<std::size_t>(ranks));
  Index n = 0, first = 0;
  bool self_given = false, any_grad_r = false;
  for (int s = 0; s < ranks; ++s) {
    if (s == group.rank()) first = n;
    n += static_cast<Index>(status[s].rows);
    self_given = self_given || status[s].self_given != 0;
    any_grad_r = any_grad_r || status[s].wants_grad_r != 0;
  }

  // The loss's statistics, where it has them: this rank's queries (unit rows under
  // normalize, chained afterwards) against R.
  if constexpr (ShardedReferenceBackend<Loss, Base>::available) {
    if (ShardedReferenceBackend<Loss, Base>::handles(loss, ranks))
      return normalized(loss, tag.base, check, loss.normalize, qv, ref.view, gq, gr,
                        [&](auto, const auto& q_rows, const auto& r_rows, const auto& gq_rows,
                            const auto& gr_rows) {
        const ShardedQueries<T, Label, LR> mine_q{q_rows, lv, r_rows, status, first, n, any_grad_r};
        return ShardedReferenceBackend<Loss, Base>::forward_backward(loss, tag.base, group, mine_q,
                                                                     gq_rows, gr_rows, top_diff);
      });
  }

  // 2. The global queries, their labels and self indices (-1: none), in rank order.
  const Index d = qv.cols;
  T* all_q = work.q.data(static_cast<std::size_t>(n * d));
  gather_dense_rows(group, work.bytes, status, qv, work.send, all_q);
  Label* all_labels = work.labels.data(static_cast<std::size_t>(n));
  gather_labels(group, work.bytes, status, lv, work.send_labels, all_labels);
  ReferenceView<T, LR> global_ref{ref.view.r, ref.view.labels, {}};
  if (self_given) {
    std::int64_t* send_self = work.send_self.data(static_cast<std::size_t>(qv.rows));
    for (Index a = 0; a < qv.rows; ++a) send_self[a] = static_cast<std::int64_t>(ref.view.self[a]);
    std::int64_t* all_self = work.self.data(static_cast<std::size_t>(n));
    gather_rows(group, work.bytes, status, static_cast<const std::int64_t*>(send_self), 1,
                all_self);
    global_ref.self = SelfIndex{all_self, n, &gathered_self_at};
  }

  // 3. The single-process reference path on (Q, R): the same code on the same bits on
  // every rank; this rank keeps its rows of dL/dQ.
  const MatrixView<const T> global_q{all_q, n, d, d};
  const VectorView<Label> global_labels{all_labels, n, 1};
  MatrixView<T> all_grad{};
  if (!gq.empty()) all_grad = {work.grad.data(static_cast<std::size_t>(n * d)), n, d, d};
  const T value = normalized(loss, tag.base, check, loss.normalize, global_q, global_ref, all_grad,
                             gr, [&](auto path, const auto& q_rows, const auto& r_rows,
                                     const auto& gq_rows, const auto& gr_rows) {
    return ReferenceBackend<Loss, decltype(path)>::forward_backward(loss, path, q_rows, global_labels,
                                                                    r_rows, gq_rows, gr_rows, top_diff);
  });
  for (Index i = 0; i < gq.rows && !gq.empty(); ++i)
    std::memcpy(gq.row(i), all_grad.row(first + i), sizeof(T) * d);
  return value;
}

}  // namespace detail
}  // namespace metricloss
