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
#include <metricloss/detail/sharded_agreement.hpp>
#include <metricloss/detail/sharded_exchange.hpp>
#include <metricloss/detail/sharded_options.hpp>
#include <metricloss/detail/validate.hpp>
#include <metricloss/detail/views.hpp>
#include <metricloss/errors.hpp>
#include <metricloss/exec.hpp>
#include <metricloss/options.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

namespace metricloss {
namespace detail {

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
    } else if constexpr (DeviceNormalize<Base>::available) {
      // The unit rows stay on the device (ShardedDevice reads them); a zero row fails here.
      if (loss.normalize) ShardedDevice<Base>::normalize_rows(loss, tag, check, xv, !gv.empty());
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
