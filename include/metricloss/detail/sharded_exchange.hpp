#pragma once
// The exchanges of a sharded call (detail/sharded.hpp): each rank's status, published first,
// and gathers in rank order over a group's allgatherv.
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/views.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace metricloss {
namespace detail {

/// What each rank publishes before anything else is exchanged.
struct ShardStatus {
  std::int64_t rows;
  std::int64_t cols;
  std::int32_t ok;
  std::int32_t scalar_bytes;
  std::int32_t label_code;
  std::int32_t message_bytes;
  std::uint64_t options;  // OptionsHash of the loss's options and the host path
  // A call with a reference set (detail/sharded_reference.hpp): R's rows and hash (every
  // rank must pass the same R), whether this rank passed a self_index and wants grad_r.
  // -1, 0, 0, 0 for a batch call.
  std::int64_t reference_rows = -1;
  std::uint64_t reference_hash = 0;
  std::int32_t self_given = 0;
  std::int32_t wants_grad_r = 0;
  // Whether this rank asked for its rows' gradient (forward_backward with a nonempty
  // grad_x / grad_q): a statistics path that reduces gradient parts (lifted by bands) runs
  // that exchange only when some rank needs it, the same choice on every rank.
  std::int32_t wants_grad = 0;
  std::int32_t reserved = 0;  // no padding bytes in what is exchanged
};

/// The byte layout of one exchange: rank q sends counts[q] = bytes_of(q) bytes, landing at
/// offsets[q] (rank order, packed); `total` bytes in all. counts and offsets live in `bytes`.
struct ExchangeLayout {
  std::size_t* counts;
  std::size_t* offsets;
  std::size_t total;
};
template <class BytesOf>
ExchangeLayout exchange_layout(int ranks, GrowOnlyBuffer<std::size_t>& bytes, BytesOf&& bytes_of) {
  std::size_t* counts = bytes.data(2 * static_cast<std::size_t>(ranks));
  std::size_t* offsets = counts + ranks;
  std::size_t at = 0;
  for (int q = 0; q < ranks; ++q) {
    counts[q] = static_cast<std::size_t>(bytes_of(q));
    offsets[q] = at;
    at += counts[q];
  }
  return {counts, offsets, at};
}

/// Gathers count(q) elements of E from each rank q, in rank order (this rank sends
/// count(group.rank()) from `send`). Every rank must call it (a collective).
template <class Group, class E, class Count>
void gather(Group& group, GrowOnlyBuffer<std::size_t>& bytes, Count&& count, const E* send,
            E* recv) {
  const ExchangeLayout layout = exchange_layout(group.size(), bytes, [&](int q) {
    return static_cast<std::size_t>(count(q)) * sizeof(E);
  });
  group.allgatherv(send, layout.counts[group.rank()], recv, layout.counts, layout.offsets);
}

/// Gathers `per_row` elements of E for each row of each rank (rows from the statuses).
template <class Group, class E>
void gather_rows(Group& group, GrowOnlyBuffer<std::size_t>& bytes, const ShardStatus* status,
                 const E* send, Index per_row, E* recv) {
  gather(group, bytes, [&](int q) { return status[q].rows * per_row; }, send, recv);
}

/// Gathers every rank's rows (D values each) in rank order into `out`; this rank's `rows`
/// are copied dense into `dense` first when their stride is not D.
template <class Group, class T>
void gather_dense_rows(Group& group, GrowOnlyBuffer<std::size_t>& bytes, const ShardStatus* status,
                       const MatrixView<const T>& rows, GrowOnlyBuffer<T>& dense, T* out) {
  const Index d = rows.cols;
  const T* send = rows.data;
  if (rows.rows > 1 && rows.stride != d) {
    T* packed = dense.data(static_cast<std::size_t>(rows.rows * d));
    for (Index i = 0; i < rows.rows; ++i) std::memcpy(packed + i * d, rows.row(i), sizeof(T) * d);
    send = packed;
  }
  gather_rows(group, bytes, status, send, d, out);
}

/// Gathers every rank's labels in rank order into `out` (this rank's copied into `send`).
template <class Group, class L>
void gather_labels(Group& group, GrowOnlyBuffer<std::size_t>& bytes, const ShardStatus* status,
                   const VectorView<L>& labels, GrowOnlyBuffer<L>& send, L* out) {
  L* mine = send.data(static_cast<std::size_t>(labels.size));
  for (Index i = 0; i < labels.size; ++i) mine[i] = labels[i];
  gather_rows(group, bytes, status, static_cast<const L*>(mine), 1, out);
}

}  // namespace detail
}  // namespace metricloss
