#pragma once
// Sharded calls with a reference set (detail/sharded_reference.hpp), shared by the thread-group
// test (tests/sharded_reference.cpp) and the MPI test (tests/sharded_mpi.cpp): one rank's
// body, run by every rank of a group with the same arguments. Queries Q = concat of the
// shards (sharded::GlobalBatch), R the same on every rank: copies of some queries (their
// self_index rows), rows of a class no query has, and other rows; integer data gives exact
// ties and zero distances. For every batch loss and option (plus normalize), scalar and
// simd, against the single-process reference call on (Q, R) with the same tag:
//  - L, this rank's rows of grad_q and all of grad_r within support.hpp's tolerances (the
//    gather-everything path gives the same bits; a statistics path adds in rank order);
//  - every rank's L and grad_r bitwise equal; a second call bitwise equal; forward equal to L.
// Which ranks pass a self_index varies (`self_mode`): all, none, or the odd ranks only (the
// others' queries then have none, as -1 in the single-process call).
#include "sharded_check.hpp"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace mltest {
namespace sharded {

struct ReferenceRecord {
  std::string what;
  double loss = 0, reference = 0;
  double loss_error = 0;    // relative to max(|reference|, 1e-30)
  double grad_q_error = 0;  // this rank's rows, relative to the largest entry of both gradients
  double grad_r_error = 0;  // all of grad_r, the same scale
  double loss_tolerance = 0, grad_tolerance = 0;
  bool same_on_all_ranks = false;  // L, and a hash of grad_r
  bool repeatable = false;
  bool forward_matches = false;
};

enum class SelfMode { all_ranks, no_rank, odd_ranks };

inline const char* self_mode_name(SelfMode m) {
  return m == SelfMode::all_ranks ? "self_index on every rank"
         : m == SelfMode::no_rank ? "no self_index" : "self_index on odd ranks";
}

/// R for a global batch of N queries: rows 0.. copies of queries 0, 3, 6, ... (at most 5;
/// their self_index rows), then two rows of label 9 (no query has it) and 6 more rows.
template <class T>
struct ReferenceOf {
  Matrix<T> r;
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels;
  std::vector<std::int64_t> self;  // per global query: its row of R or -1

  ReferenceOf(const GlobalBatch<T>& global, bool integer, std::uint64_t seed) {
    const Index n = global.x.rows(), d = global.x.cols();
    self.assign(static_cast<std::size_t>(n), -1);
    std::vector<Index> copied;
    for (Index a = 0; a < n && copied.size() < 5; a += 3) copied.push_back(a);
    const Index extra = 8, rows = static_cast<Index>(copied.size()) + extra;
    std::mt19937_64 rng(seed);
    const Matrix<T> other = integer ? tied_matrix<T>(extra, d, rng, -2, 2, 0.0)
                                    : uniform_matrix<T>(extra, d, rng, -1.5, 1.5);
    r.resize(rows, d);
    labels.resize(rows);
    Index at = 0;
    for (Index a : copied) {
      r.row(at) = global.x.row(a);
      labels[at] = global.labels[a];
      self[static_cast<std::size_t>(a)] = at;
      ++at;
    }
    for (Index e = 0; e < extra; ++e, ++at) {
      r.row(at) = other.row(e);
      labels[at] = e < 2 ? 9 : (e * 5) % 4;
    }
  }
};

inline std::uint64_t bytes_hash(const void* data, std::size_t bytes) {
  ml::detail::BytesHash hash;
  hash.add(data, bytes);
  return hash.value;
}

/// One rank's checks of one layout on one tag and type, every batch-loss configuration.
template <class T, class Tag, class Group>
void check_reference_layout(Group& group, Tag tag, const char* tag_name,
                            const std::vector<Index>& shards, Index d, bool integer,
                            SelfMode self_mode, std::vector<ReferenceRecord>& records) {
  const int rank = group.rank();
  const std::uint64_t seed = 20261204u + static_cast<std::uint64_t>(d);
  const GlobalBatch<T> global(shards, d, integer, seed);
  const ReferenceOf<T> ref(global, integer, seed + 1);
  const Index first = global.first[static_cast<std::size_t>(rank)];
  const Index rows = shards[static_cast<std::size_t>(rank)];
  const Index n = global.x.rows(), n_r = ref.r.rows();
  const Matrix<T> q = global.x.middleRows(first, rows);
  const Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels = global.labels.segment(first, rows);
  // The single process's self_index: -1 for the queries of ranks that pass none.
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> self_all(n), self_mine(rows);
  bool any = false;
  for (int s = 0; s < static_cast<int>(shards.size()); ++s) {
    const bool passes = self_mode == SelfMode::all_ranks ||
                        (self_mode == SelfMode::odd_ranks && s % 2 == 1);
    any = any || passes;
    for (Index a = global.first[static_cast<std::size_t>(s)];
         a < global.first[static_cast<std::size_t>(s)] + shards[static_cast<std::size_t>(s)]; ++a)
      self_all[a] = passes ? ref.self[static_cast<std::size_t>(a)] : -1;
  }
  self_mine = self_all.segment(first, rows);
  const bool i_pass = self_mode == SelfMode::all_ranks ||
                      (self_mode == SelfMode::odd_ranks && rank % 2 == 1);
  std::string layout = "shards {";
  for (std::size_t s = 0; s < shards.size(); ++s)
    layout += std::to_string(shards[s]) + (s + 1 == shards.size() ? "}" : ", ");
  layout += " N_r " + std::to_string(n_r) + " D " + std::to_string(d) +
            (integer ? " integer " : " uniform ") + self_mode_name(self_mode) + " " + tag_name +
            " " + ml::detail::scalar_name<T>() + " rank " + std::to_string(rank);

  for_each_batch_config<T>([&](const std::string& name, const auto& configured) {
    auto loss = configured;
    auto single = configured;
    Matrix<T> single_gq(n, d), single_gr(n_r, d);
    const T reference = on_rank_zero<T>(group, [&] {
      return any ? single.forward_backward(tag.base, global.x, global.labels,
                                           ml::reference(ref.r, ref.labels, self_all), single_gq,
                                           single_gr, T(1.5))
                 : single.forward_backward(tag.base, global.x, global.labels,
                                           ml::reference(ref.r, ref.labels), single_gq, single_gr,
                                           T(1.5));
    }, single_gq, single_gr);
    Matrix<T> gq(rows, d), gq_again(rows, d), gr(n_r, d), gr_again(n_r, d);
    const auto call = [&](Matrix<T>& out_q, Matrix<T>& out_r) {
      return i_pass ? loss.forward_backward(tag, q, labels, ml::reference(ref.r, ref.labels, self_mine),
                                            out_q, out_r, T(1.5))
                    : loss.forward_backward(tag, q, labels, ml::reference(ref.r, ref.labels),
                                            out_q, out_r, T(1.5));
    };
    const T value = call(gq, gr);
    const T value_again = call(gq_again, gr_again);
    const T forward_value = i_pass ? loss.forward(tag, q, labels, ml::reference(ref.r, ref.labels, self_mine))
                                   : loss.forward(tag, q, labels, ml::reference(ref.r, ref.labels));

    ReferenceRecord rec;
    rec.what = name + ", " + layout;
    rec.loss = static_cast<double>(value);
    rec.reference = static_cast<double>(reference);
    rec.loss_tolerance = Tolerance<T>::loss;
    rec.grad_tolerance = Tolerance<T>::gradient;
    rec.loss_error = std::abs(rec.loss - rec.reference) / std::max(std::abs(rec.reference), 1e-30);
    if (rec.loss == rec.reference) rec.loss_error = 0;  // NaN == NaN is not, and stays NaN
    // API.md: reference-set gradients are relative to the largest entry of both.
    const double scale = std::max(static_cast<double>(single_gq.cwiseAbs().maxCoeff()),
                                  static_cast<double>(single_gr.cwiseAbs().maxCoeff()));
    const auto error = [&](double got, double want) {
      const double e = std::abs(got - want);
      return scale > 0 ? e / scale : e;
    };
    for (Index i = 0; i < rows; ++i)
      for (Index k = 0; k < d; ++k)
        rec.grad_q_error = std::max(rec.grad_q_error, error(static_cast<double>(gq(i, k)),
                                                            static_cast<double>(single_gq(first + i, k))));
    for (Index j = 0; j < n_r; ++j)
      for (Index k = 0; k < d; ++k)
        rec.grad_r_error = std::max(rec.grad_r_error, error(static_cast<double>(gr(j, k)),
                                                            static_cast<double>(single_gr(j, k))));
    const std::size_t row_bytes = sizeof(T) * static_cast<std::size_t>(d);
    rec.same_on_all_ranks =
        same_bits_on_all_ranks(group, value) &&
        same_bits_on_all_ranks(group, bytes_hash(gr.data(), row_bytes * static_cast<std::size_t>(n_r)));
    rec.repeatable = std::memcmp(&value, &value_again, sizeof(T)) == 0 &&
                     (rows == 0 || std::memcmp(gq.data(), gq_again.data(),
                                               row_bytes * static_cast<std::size_t>(rows)) == 0) &&
                     std::memcmp(gr.data(), gr_again.data(), row_bytes * static_cast<std::size_t>(n_r)) == 0;
    rec.forward_matches = std::memcmp(&value, &forward_value, sizeof(T)) == 0;
    records.push_back(rec);
  });
}

inline void check_reference_records(const std::vector<ReferenceRecord>& records) {
  for (const ReferenceRecord& r : records) {
    CAPTURE(r.what, r.loss, r.reference);
    CHECK(r.loss_error <= r.loss_tolerance);
    CHECK(r.grad_q_error <= r.grad_tolerance);
    CHECK(r.grad_r_error <= r.grad_tolerance);
    CHECK(r.same_on_all_ranks);
    CHECK(r.repeatable);
    CHECK(r.forward_matches);
  }
}

}  // namespace sharded
}  // namespace mltest
