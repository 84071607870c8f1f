#pragma once
// Sharded batch losses (API.md, "Global batches across processes"): rank r of a group holds
// rows x_r (n_r >= 0) of X = concat_r(x_r); every rank returns the loss of X, bitwise the
// same on all ranks, and writes exactly its own rows of dL/dX * top_diff.
//
// One mechanism for every batch-loss face; its batch-form dispatch begins with
//
//   if constexpr (detail::is_sharded_v<Tag>)
//     return detail::run_sharded(*this, tag, "Loss", method, x, labels,
//                                std::forward<G>(grad_x), top_diff,
//                                [&](detail::Validator& c) { check_options(c); });
//
// A call is three steps, each a collective entered by every rank whatever it asked for
// (forward or forward_backward, normalize or not: the sequence never depends on them):
//  1. Agreement. Every rank validates its own arguments (a rank may hold no rows: 0 x D),
//     then the group exchanges one ShardStatus per rank. If any rank failed, every rank
//     throws the same invalid_argument naming the first failing rank and its message; D,
//     the scalar type, the label type and a nonempty X are checked on the exchanged
//     statuses, so all ranks reach the same verdict. No rank writes anything or waits in a
//     collective that another rank skipped.
//  2. The global batch: X and the labels gathered in rank order (normalize = true gathers
//     the unit rows; the gradient is chained on this rank's rows afterwards).
//  3. The loss. A loss with a ShardedBackend<Loss, Base> computes statistics for its own rows
//     and exchanges them (O(n_r N D) per rank). Every other loss runs the single-process
//     backend on the gathered X, O(N^2 D) on every rank, and keeps its rows of the
//     gradient: exact by construction (the same code on the same bits), the fallback until
//     the loss has its statistics.
// On a device tag (metricloss::cuda) steps 2 and 3 are ShardedDevice<Tag>'s: X gathered into
// device memory and the single-process device backend on it (backend/cuda/sharded.cuh).
// Scratch lives in the functor's slot (ShardedScratch): a warm call allocates nothing
// (a failing call does, to carry the messages).
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/normalize.hpp>
#include <metricloss/detail/validate.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/errors.hpp>
#include <metricloss/exec.hpp>
#include <metricloss/options.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

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

/// The loss's options and the host path (scalar or simd), hashed (FNV-1a over each option's
/// bits) and written out, from the loss's visit_options(visitor): ranks that differ in them
/// would choose different algorithms, and so different sequences of collectives.
inline const char* option_text(Mining m) {
  return m == Mining::all ? "all" : m == Mining::hard ? "hard" : "semihard";
}
inline const char* option_text(Distance d) {
  return d == Distance::euclidean ? "euclidean" : "squared_euclidean";
}
inline const char* option_text(Reduction r) {
  return r == Reduction::mean ? "mean" : "nonzero_mean";
}
inline const char* option_text(bool b) { return b ? "true" : "false"; }
/// The shortest decimal that reads back as v (0.2f prints as 0.2, not 0.200000003).
template <class T, std::enable_if_t<std::is_floating_point<T>::value, int> = 0>
std::string option_text(T v) {
  char text[40];
  for (int digits = std::numeric_limits<T>::digits10;; ++digits) {
    std::snprintf(text, sizeof text, "%.*g", digits, static_cast<double>(v));
    if (digits >= std::numeric_limits<T>::max_digits10 ||
        static_cast<T>(std::strtod(text, nullptr)) == v || v != v)
      return text;
  }
}

struct OptionsHash {
  std::uint64_t value = 14695981039346656037ull;
  template <class V>
  void operator()(const char*, const V& option) {
    unsigned char bytes[sizeof(V)];
    std::memcpy(bytes, &option, sizeof(V));
    for (unsigned char b : bytes) value = (value ^ b) * 1099511628211ull;
  }
};

struct OptionsText {
  std::string text;
  template <class V>
  void operator()(const char* name, const V& option) {
    text += (text.empty() ? "" : ", ") + std::string(name) + " = " + option_text(option);
  }
};

/// The path's name in the options (so that ranks on different paths disagree); the device
/// tags specialise it (backend/cuda/sharded.cuh).
template <class Base>
struct PathName {
  static constexpr const char* value = std::is_same<Base, scalar_tag>::value ? "scalar" : "simd";
};

template <class Base, class Loss>
std::uint64_t options_hash(const Loss& loss) {
  OptionsHash hash;
  loss.visit_options(hash);
  for (const char* c = PathName<Base>::value; *c != '\0'; ++c) hash("path", *c);
  return hash.value;
}

template <class Base, class Loss>
std::string options_text(const Loss& loss) {
  OptionsText out;
  loss.visit_options(out);
  return out.text + " on metricloss::" + PathName<Base>::value;
}

/// Labels travel as raw bytes: every rank must pass the same label type.
template <class L>
constexpr std::int32_t label_code() {
  return static_cast<std::int32_t>(sizeof(L)) * 4 + (std::is_floating_point<L>::value ? 1 : 0) +
         (std::is_signed<L>::value ? 2 : 0);
}
inline std::string label_type_name(std::int32_t code) {
  const std::string kind = (code & 1) ? "floating-point" : (code & 2) ? "signed integer"
                                                                       : "unsigned integer";
  return std::to_string((code / 4) * 8) + "-bit " + kind;
}

/// A loss's statistics path over the global batch on host tag Base (O(n_r N D) per rank):
/// specialisations set `available` and define
///   static T forward_backward(Loss&, Base, Group&, const ShardView<T, L>&,
///                             const MatrixView<T>& grad_local, T top_diff);
/// whose collectives must not depend on whether grad_local is empty, and
///   static bool handles(const Loss&, int ranks)   (the options and group sizes it covers; one
///   rank never needs it; the rest gather everything).
template <class Loss, class Base>
struct ShardedBackend {
  static constexpr bool available = false;
};

/// Steps 2 and 3 on a device path, after the agreement (backend/cuda/sharded.cuh specialises
/// it for metricloss::cuda):
///   static T run(Loss&, const sharded_tag<Base, Group>&, const MatrixView<const T>& x,
///                const VectorView<L>& labels, const MatrixView<T>& grad, T top_diff,
///                const ShardStatus* status, Index n, Index first,
///                GrowOnlyBuffer<std::size_t>& bytes)
/// (n: the global batch's rows; first: this rank's first row in it).
template <class Base>
struct ShardedDevice;

/// The gathered batch and where this rank's rows lie in it.
template <class T, class L>
struct ShardView {
  MatrixView<const T> x;   // N x D, dense
  VectorView<L> labels;    // N
  Index first = 0;         // this rank's rows are [first, first + rows)
  Index rows = 0;
  const ShardStatus* status = nullptr;  // one per rank: rows per rank (for the statistics)
};

/// A rank's rows as a reference set's self index (SelfIndex::at): query a is row
/// *first + a of X.
inline Index shard_self_at(const void* first, Index a) {
  return *static_cast<const Index*>(first) + a;
}

/// A non-finite entry or a NaN label anywhere in X: every rank sees all of X, so every rank
/// reaches this verdict alike and no rank skips a collective.
template <class T, class L>
bool shard_not_finite(const ShardView<T, L>& batch) {
  const MatrixView<const T>& x = batch.x;
  for (Index i = 0; i < x.rows; ++i)
    for (Index c = 0; c < x.cols; ++c)
      if (!std::isfinite(x(i, c))) return true;
  if constexpr (std::is_floating_point<L>::value) {
    for (Index i = 0; i < batch.labels.size; ++i)
      if (std::isnan(batch.labels[i])) return true;
  }
  return false;
}

/// What a functor keeps for its sharded calls (in its slot).
template <class T, class L>
struct ShardedScratch : BackendSlot::Contents {
  AlignedBuffer<T> x;             // N x D: the global batch
  AlignedBuffer<T> grad;          // N x D: its gradient (the gather-everything path)
  GrowOnlyBuffer<T> send;         // this rank's rows made dense when x is strided
  GrowOnlyBuffer<L> labels;       // N
  GrowOnlyBuffer<L> send_labels;  // this rank's labels made dense
  GrowOnlyBuffer<ShardStatus> status;
  GrowOnlyBuffer<std::size_t> bytes;  // 2 W: counts and offsets of one exchange
  UnitRows<T> unit;               // normalize = true: this rank's unit rows
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

/// Runs a rank's own checks; returns their failure's message without the function's prefix
/// ("" when they pass), for the agreement.
template <class Checks>
std::string local_error(Validator& check, Checks&& checks) {
  try {
    checks();
  } catch (const invalid_argument& failure) {
    const std::string prefix = check.function() + ": ";
    std::string error = failure.what();
    if (error.compare(0, prefix.size(), prefix) == 0) error.erase(0, prefix.size());
    return error.empty() ? "invalid argument" : error;
  }
  return std::string();
}

/// Every rank's text in rank order, each rank's length(q) known on every rank (a collective;
/// the failing calls' messages only: it allocates).
template <class Group, class Length>
std::vector<std::string> gather_texts(Group& group, GrowOnlyBuffer<std::size_t>& bytes,
                                      const std::string& mine, Length&& length) {
  const int ranks = group.size();
  std::size_t total = 0;
  for (int q = 0; q < ranks; ++q) total += static_cast<std::size_t>(length(q));
  std::string all(total, ' ');
  gather(group, bytes, length, mine.data(), &all[0]);
  std::vector<std::string> texts;
  std::size_t at = 0;
  for (int q = 0; q < ranks; ++q) {
    const auto n = static_cast<std::size_t>(length(q));
    texts.push_back(all.substr(at, n));
    at += n;
  }
  return texts;
}

/// Step 1: exchanges the statuses and throws, on every rank alike, when any rank's
/// arguments failed or the ranks disagree. `error` is this rank's message (empty: passed);
/// `describe_options()` writes this rank's options out (called only when they differ).
template <class Group, class DescribeOptions>
void agree(Group& group, Validator& check, ShardStatus mine, const std::string& error,
           GrowOnlyBuffer<ShardStatus>& statuses, GrowOnlyBuffer<std::size_t>& bytes,
           DescribeOptions&& describe_options) {
  const int ranks = group.size();
  ShardStatus* status = statuses.data(static_cast<std::size_t>(ranks));
  gather(group, bytes, [](int) { return 1; }, &mine, status);
  const std::string of = " of " + std::to_string(ranks);
  int failed = -1, failures = 0;
  for (int q = 0; q < ranks; ++q)
    if (!status[q].ok) {
      if (failed < 0) failed = q;
      ++failures;
    }
  if (failed >= 0) {
    // The messages themselves, so that every rank throws the same one.
    const auto messages =
        gather_texts(group, bytes, error, [&](int q) { return status[q].message_bytes; });
    check.fail("rank " + std::to_string(failed) + of + ": " +
               messages[static_cast<std::size_t>(failed)] +
               (failures > 1 ? " (and " + std::to_string(failures - 1) + " more rank" +
                                   (failures > 2 ? "s" : "") + " failed)"
                             : std::string()));
  }
  std::int64_t total = 0;
  for (int q = 0; q < ranks; ++q) {
    total += status[q].rows;
    if (status[q].scalar_bytes != status[0].scalar_bytes)
      check.fail("rank " + std::to_string(q) + of + " calls with " +
                 std::to_string(status[q].scalar_bytes * 8) + "-bit embeddings, rank 0 with " +
                 std::to_string(status[0].scalar_bytes * 8) + "-bit");
    if (status[q].label_code != status[0].label_code)
      check.fail("rank " + std::to_string(q) + of + " passes " +
                 label_type_name(status[q].label_code) + " labels, rank 0 " +
                 label_type_name(status[0].label_code) + " labels; every rank needs the same type");
    if (status[q].cols != status[0].cols)
      check.fail("argument 'x' on rank " + std::to_string(q) + of + " has shape " +
                 shape_string(status[q].rows, status[q].cols) + ", on rank 0 " +
                 shape_string(status[0].rows, status[0].cols) +
                 "; every rank needs the same D (a rank without rows passes 0 x D)");
  }
  for (int q = 1; q < ranks; ++q) {
    if (status[q].reference_rows != status[0].reference_rows)
      check.fail("argument 'r' on rank " + std::to_string(q) + of + " has " +
                 std::to_string(status[q].reference_rows) + " rows, on rank 0 " +
                 std::to_string(status[0].reference_rows) +
                 "; every rank needs the same reference set");
    if (status[q].reference_hash != status[0].reference_hash)
      check.fail("arguments 'r' and 'labels_r' on rank " + std::to_string(q) + of +
                 " differ from rank 0's (the same shape, other bits); every rank needs the "
                 "same reference set, bitwise");
  }
  int differs = -1;
  for (int q = 1; q < ranks && differs < 0; ++q)
    if (status[q].options != status[0].options) differs = q;
  if (differs > 0) {
    // Every rank learns that rank `differs` differs from rank 0, and exchanges its text.
    const std::string text = describe_options();
    // Two rounds: the lengths, then the texts (a failing call may allocate).
    std::vector<std::uint64_t> length(static_cast<std::size_t>(ranks));
    const std::uint64_t my_length = text.size();
    gather(group, bytes, [](int) { return 1; }, &my_length, length.data());
    const auto texts = gather_texts(group, bytes, text,
                                    [&](int q) { return length[static_cast<std::size_t>(q)]; });
    check.fail("rank " + std::to_string(differs) + of + " calls with " +
               texts[static_cast<std::size_t>(differs)] + ", rank 0 with " + texts[0] +
               "; every rank needs the same loss options and path");
  }
  if (total == 0)
    check.fail("argument 'x' has 0 rows on every rank" + of +
               "; the global batch needs N >= 1 rows");
}

template <class Loss, class Base, class Group, class X, class L, class G, class CheckOptions>
typename Loss::scalar_type run_sharded(Loss& loss, const sharded_tag<Base, Group>& tag,
                                       const char* name, const char* method,
                                       const Eigen::MatrixBase<X>& x,
                                       const Eigen::MatrixBase<L>& labels, G&& grad_x,
                                       typename Loss::scalar_type top_diff,
                                       CheckOptions&& check_options) {
  using T = typename Loss::scalar_type;
  using Label = typename L::Scalar;
  Validator check(name, scalar_name<T>(), method);
  Group& group = *tag.group;
  const auto xv = input_view(x);
  const auto lv = label_view(labels);
  auto gv = gradient_view<T>(std::forward<G>(grad_x));
  // A rank without rows may pass a 0 x D gradient that has no storage.
  if (gv.rows == 0 && gv.stride < 0 && xv.rows == 0) gv = MatrixView<T>{};
  auto& work = scratch_of<ShardedScratch<T, Label>>(loss);

  // 1. Every rank's own checks, then the agreement.
  MatrixView<const T> rows = xv;
  const std::string error = local_error(check, [&] {
    if (xv.rows > 0)
      check.embeddings("x", xv);
    else if (xv.cols < 1)
      check.fail("argument 'x' has shape " + shape_string(xv.rows, xv.cols) +
                 "; a rank without rows passes 0 x D, D >= 1");
    check.labels("labels", lv, xv.rows, "x");
    check_options(check);
    check.gradient("grad_x", gv, "x", xv);
    if constexpr (normalizes_on_host<Base>) {
      if (loss.normalize) rows = work.unit.of(check, "x", xv);
    } else {
      if (loss.normalize) reject_normalize_off_host<Base>(check);
    }
  });
  ShardStatus mine{static_cast<std::int64_t>(xv.rows), static_cast<std::int64_t>(xv.cols),
                   error.empty() ? 1 : 0, static_cast<std::int32_t>(sizeof(T)),
                   label_code<Label>(), static_cast<std::int32_t>(error.size()),
                   options_hash<Base>(loss)};
  mine.wants_grad = gv.empty() ? 0 : 1;
  agree(group, check, mine, error, work.status, work.bytes,
        [&] { return options_text<Base>(loss); });

  // The global batch's rows, and where this rank's begin.
  const int ranks = group.size();
  const ShardStatus* status = work.status.data(static_cast<std::size_t>(ranks));
  Index n = 0, first = 0;
  for (int q = 0; q < ranks; ++q) {
    if (q == group.rank()) first = n;
    n += static_cast<Index>(status[q].rows);
  }
  if constexpr (!normalizes_on_host<Base>) {
    return ShardedDevice<Base>::run(loss, tag, xv, lv, gv, top_diff, status, n, first,
                                    work.bytes);
  } else {
    // 2. The global batch, in rank order.
    const Index d = xv.cols;
    T* all_x = work.x.data(static_cast<std::size_t>(n * d));
    gather_dense_rows(group, work.bytes, status, rows, work.send, all_x);
    Label* all_labels = work.labels.data(static_cast<std::size_t>(n));
    gather_labels(group, work.bytes, status, lv, work.send_labels, all_labels);
    const ShardView<T, Label> batch{{all_x, n, d, d}, {all_labels, n, 1}, first, xv.rows,
                                    status};

    // 3. The loss: the loss's statistics, or the single-process backend on X.
    T value = T(0);
    bool done = false;
    if constexpr (ShardedBackend<Loss, Base>::available) {
      if (ShardedBackend<Loss, Base>::handles(loss, ranks)) {
        value = ShardedBackend<Loss, Base>::forward_backward(loss, tag.base, group, batch, gv,
                                                             top_diff);
        done = true;
      }
    }
    if (!done) {
      MatrixView<T> all_grad{};
      if (!gv.empty()) all_grad = {work.grad.data(static_cast<std::size_t>(n * d)), n, d, d};
      value = Backend<Loss, Base>::forward_backward(loss, tag.base, batch.x, batch.labels, all_grad,
                                                    top_diff);
      for (Index i = 0; i < gv.rows && !gv.empty(); ++i)
        std::memcpy(gv.row(i), all_grad.row(first + i), sizeof(T) * d);
    }
    if (loss.normalize) work.unit.chain(xv, gv);
    return value;
  }
}

}  // namespace detail
}  // namespace metricloss
