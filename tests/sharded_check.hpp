#pragma once
// The sharded calls' checks, shared by the thread-group test (tests/sharded.cpp) and the MPI
// test (tests/sharded_mpi.cpp): one rank's body, run by every rank of a group with the same
// arguments, so that every rank enters the same collectives in the same order. It records
// measurements instead of asserting (Catch2 is not thread-safe); the caller asserts.
//
// For every batch loss of the registry, every option (plus normalize = true, plus lifted at
// m = 0.2), scalar and simd, on the global batch X = concat of the shards:
//  - L and this rank's gradient rows against the single-process call on X (same tag);
//  - every rank's L bitwise equal (gathered through the group itself);
//  - a second call bitwise equal (L and the rows);
//  - forward equal to forward_backward's L.
#include "registry.hpp"

#include <metricloss/metricloss.hpp>
#include <metricloss/thread_group.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace mltest {
namespace sharded {

/// Runs body(rank_handle, rank) on W threads of one thread_group; returns when all are done.
template <class Body>
void on_threads(int ranks, Body&& body) {
  ml::thread_group team(ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      ml::thread_rank me = team.member(r);
      body(me, r);
    });
  for (auto& t : threads) t.join();
}

struct Record {
  std::string what;
  double loss = 0, reference = 0;
  double loss_error = 0;  // relative to max(|reference|, 1e-30)
  double grad_error = 0;  // max over this rank's rows, relative to the largest reference entry
  double loss_tolerance = 0, grad_tolerance = 0;
  bool same_on_all_ranks = false;
  bool repeatable = false;
  bool forward_matches = false;
};

/// The global batch of a layout: N = sum of the shards, labels with a class split across
/// ranks, a class held by the last nonempty rank only (labels 7), and row 0 a singleton
/// (label 100: with shards {1, ...} rank 0 holds no valid anchor). `integer` data: small
/// integer coordinates with repeated rows (exact ties, zero distances).
template <class T>
struct GlobalBatch {
  Matrix<T> x;
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels;
  std::vector<Index> first;  // each rank's first row

  GlobalBatch(const std::vector<Index>& shards, Index d, bool integer, std::uint64_t seed,
              double offset = 0.0, Index classes = 4) {
    Index n = 0;
    for (Index s : shards) {
      first.push_back(n);
      n += s;
    }
    std::mt19937_64 rng(seed);
    x = integer ? tied_matrix<T>(n, d, rng, -2, 2, offset)
                : uniform_matrix<T>(n, d, rng, -1.5, 1.5);
    labels.resize(n);
    for (Index i = 0; i < n; ++i) labels[i] = (i * 7) % classes;
    if (n > 0) labels[0] = 100;
    int last = -1;
    for (int r = 0; r < static_cast<int>(shards.size()); ++r)
      if (shards[static_cast<std::size_t>(r)] >= 2) last = r;
    if (last >= 0) {
      const Index end = first[static_cast<std::size_t>(last)] + shards[static_cast<std::size_t>(last)];
      labels[end - 1] = 7;
      labels[end - 2] = 7;
    }
  }
};

template <class T, class Group>
bool same_bits_on_all_ranks(Group& group, T value) {
  const int ranks = group.size();
  std::vector<T> all(static_cast<std::size_t>(ranks));
  std::vector<std::size_t> counts(static_cast<std::size_t>(ranks), sizeof(T)), offsets;
  for (int q = 0; q < ranks; ++q) offsets.push_back(static_cast<std::size_t>(q) * sizeof(T));
  group.allgatherv(&value, sizeof(T), all.data(), counts.data(), offsets.data());
  for (const T& v : all)
    if (std::memcmp(&v, &all[0], sizeof(T)) != 0) return false;
  return true;
}

/// Every batch-loss configuration of the registry, with normalize and lifted m = 0.2 added.
template <class T, class F>
void for_each_batch_config(F&& f) {
  registry::for_each_loss([&](auto entry) {
    using Entry = decltype(entry);
    if constexpr (std::is_base_of<registry::BatchCalls, Entry>::value) {
      auto configs = Entry::template configs<T>();
      const std::size_t plain = configs.size();
      for (std::size_t c = 0; c < plain; ++c)
        if (!configs[c].loss.normalize) {
          auto unit = configs[c];
          unit.loss.normalize = true;
          unit.label += ", normalize";
          configs.push_back(unit);
        }
      if constexpr (std::is_same<decltype(configs[0].loss), ml::LiftedStructureLoss<T>>::value)
        configs.push_back({"margin 0.2", ml::LiftedStructureLoss<T>(T(0.2))});
      for (auto& config : configs) f(std::string(Entry::name) + " " + config.label, config.loss);
    }
  });
}

/// On every rank, what rank 0's compute() returns and writes into `grads` (every rank would
/// compute the same bits: a single-process reference done once, not once a rank, while the
/// group's other ranks wait; the largest sharded tests spent most of their time there).
template <class T, class Group, class Compute, class... Grads>
T on_rank_zero(Group& group, Compute&& compute, Grads&... grads) {
  const int ranks = group.size();
  std::size_t total = 2;  // the value and a failure flag, then the gradients
  for (std::size_t size : {static_cast<std::size_t>(grads.size())...}) total += size;
  std::vector<T> packed(total, T(0)), shared(total);
  if (group.rank() == 0) {
    try {
      packed[0] = compute();
      T* at = packed.data() + 2;
      ((at = std::copy(grads.data(), grads.data() + grads.size(), at)), ...);
    } catch (...) {
      packed[1] = T(1);  // every rank throws below, so no rank waits in a later exchange
    }
  }
  const std::size_t bytes = sizeof(T) * total;
  std::vector<std::size_t> counts(static_cast<std::size_t>(ranks), 0), offsets(static_cast<std::size_t>(ranks), 0);
  counts[0] = bytes;
  group.allgatherv(packed.data(), group.rank() == 0 ? bytes : 0, shared.data(), counts.data(), offsets.data());
  if (shared[1] != T(0)) throw std::runtime_error("the single-process reference threw on rank 0");
  const T* from = shared.data() + 2;
  ((std::copy(from, from + grads.size(), grads.data()), from += grads.size()), ...);
  return shared[0];
}

/// One rank's checks of one layout on one tag and type, for each loss that
/// for_each_config(f) hands to f(name, loss). `shards` has group.size() entries.
template <class T, class Tag, class Group, class ForEachConfig>
void check_layout_of(Group& group, Tag tag, const char* tag_name, const std::vector<Index>& shards,
                     Index d, bool integer, std::vector<Record>& records,
                     ForEachConfig&& for_each_config, double offset = 0.0, Index classes = 4) {
  const int rank = group.rank();
  const GlobalBatch<T> global(shards, d, integer, 20261203u + static_cast<std::uint64_t>(d), offset,
                              classes);
  const Index first = global.first[static_cast<std::size_t>(rank)];
  const Index rows = shards[static_cast<std::size_t>(rank)];
  const Matrix<T> x = global.x.middleRows(first, rows);
  const Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels =
      global.labels.segment(first, rows);
  std::string layout = "shards {";
  for (std::size_t q = 0; q < shards.size(); ++q)
    layout += std::to_string(shards[q]) + (q + 1 == shards.size() ? "}" : ", ");
  layout += " D " + std::to_string(d) + (integer ? " integer" : " uniform") + (offset != 0.0 ? " offset " + std::to_string(offset) : std::string()) +
            (classes != 4 ? " classes " + std::to_string(classes) : std::string()) + " " + tag_name +
            " " + ml::detail::scalar_name<T>() + " rank " + std::to_string(rank);
  for_each_config([&](const std::string& name, const auto& configured) {
    auto loss = configured;  // the sharded functor
    auto single = configured;
    Matrix<T> reference_grad(global.x.rows(), d);
    const T reference = on_rank_zero<T>(group, [&] {
      return single.forward_backward(tag.base, global.x, global.labels, reference_grad, T(1.5));
    }, reference_grad);

    Matrix<T> grad(rows, d), again(rows, d);
    const T value = loss.forward_backward(tag, x, labels, grad, T(1.5));
    const T value_again = loss.forward_backward(tag, x, labels, again, T(1.5));
    const T forward_value = loss.forward(tag, x, labels);

    Record r;
    r.what = name + ", " + layout;
    r.loss = static_cast<double>(value);
    r.reference = static_cast<double>(reference);
    r.loss_tolerance = Tolerance<T>::loss;
    r.grad_tolerance = Tolerance<T>::gradient;
    r.loss_error = std::abs(r.loss - r.reference) / std::max(std::abs(r.reference), 1e-30);
    if (r.loss == r.reference) r.loss_error = 0;  // NaN == NaN is not, and stays NaN
    const double scale = reference_grad.size() ? static_cast<double>(reference_grad.cwiseAbs().maxCoeff()) : 0;
    for (Index i = 0; i < rows; ++i)
      for (Index k = 0; k < d; ++k) {
        const double e = std::abs(static_cast<double>(grad(i, k)) -
                                  static_cast<double>(reference_grad(first + i, k)));
        r.grad_error = std::max(r.grad_error, scale > 0 ? e / scale : e);
      }
    r.same_on_all_ranks = same_bits_on_all_ranks(group, value);
    r.repeatable = std::memcmp(&value, &value_again, sizeof(T)) == 0 &&
                   (rows == 0 || std::memcmp(grad.data(), again.data(), sizeof(T) * static_cast<std::size_t>(grad.size())) == 0);
    r.forward_matches = std::memcmp(&value, &forward_value, sizeof(T)) == 0;
    records.push_back(r);
  });
}

/// check_layout_of over every batch-loss configuration of the registry.
template <class T, class Tag, class Group>
void check_layout(Group& group, Tag tag, const char* tag_name, const std::vector<Index>& shards,
                  Index d, bool integer, std::vector<Record>& records) {
  check_layout_of<T>(group, tag, tag_name, shards, d, integer, records,
                     [](auto&& f) { for_each_batch_config<T>(f); });
}

/// Asserts every record (on the calling thread: Catch2 is not thread-safe).
inline void check_records(const std::vector<Record>& records) {
  for (const Record& r : records) {
    CAPTURE(r.what, r.loss, r.reference);
    CHECK(r.loss_error <= r.loss_tolerance);
    CHECK(r.grad_error <= r.grad_tolerance);
    CHECK(r.same_on_all_ranks);
    CHECK(r.repeatable);
    CHECK(r.forward_matches);
  }
}

/// A malformed call on rank `bad` (labels one short, or D + 1 columns): every rank must throw
/// metricloss::invalid_argument naming that rank. Returns this rank's message ("" if none).
template <class T, class Tag, class Group>
std::string malformed_call(Group& group, Tag tag, int bad, bool wrong_d) {
  const int rank = group.rank();
  const Index d = 5 + (wrong_d && rank == bad ? 1 : 0);
  std::mt19937_64 rng(5);
  const Matrix<T> x = uniform_matrix<T>(4, d, rng);
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels(rank == bad && !wrong_d ? 3 : 4);
  labels.setZero();
  Matrix<T> grad(4, d);
  grad.setConstant(T(42));
  ml::BatchTripletLoss<T> loss(T(0.2), ml::Mining::hard);
  try {
    loss.forward_backward(tag, x, labels, grad);
  } catch (const ml::invalid_argument& e) {
    // Nothing written.
    if ((grad.array() != T(42)).any()) return std::string("gradient written: ") + e.what();
    return e.what();
  }
  return "";
}

}  // namespace sharded
}  // namespace mltest
