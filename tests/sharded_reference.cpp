// Sharded calls with a reference set, ranks as threads (metricloss::thread_group), W = 1..5:
// queries sharded, R the same on every rank; the single-process loss of (Q, R) bitwise on
// every rank, each rank's rows of grad_q, all of grad_r; a reference set that differs
// between ranks, or a bad self_index on one rank, makes every rank throw and nothing is
// written; a warm call allocates nothing. tests/sharded_mpi.cpp runs the same body with
// ranks as MPI processes.
#include "allocation_counter.hpp"
#include "sharded_reference_check.hpp"


namespace {

using namespace mltest;
using mltest::sharded::ReferenceRecord;
using mltest::sharded::SelfMode;
using mltest::sharded::on_threads;

const std::vector<std::vector<Index>> layouts = {
    {18}, {9, 9}, {7, 0, 11}, {6, 6, 6}, {1, 1, 16}, {18, 0, 0}, {3, 0, 8, 7}, {1, 4, 0, 6, 7},
};

template <class T>
void check_all_layouts(bool integer) {
  for (std::size_t l = 0; l < layouts.size(); ++l) {
    const auto& shards = layouts[l];
    const SelfMode mode = static_cast<SelfMode>((l + (integer ? 1 : 0)) % 3);
    for (Index d : {Index(5), Index(33)}) {
      const int ranks = static_cast<int>(shards.size());
      std::vector<std::vector<ReferenceRecord>> records(static_cast<std::size_t>(ranks));
      on_threads(ranks, [&](ml::thread_rank& me, int r) {
        auto& mine = records[static_cast<std::size_t>(r)];
        sharded::check_reference_layout<T>(me, ml::scalar.sharded(me), "scalar", shards, d,
                                           integer, mode, mine);
        sharded::check_reference_layout<T>(me, ml::simd.sharded(me), "simd", shards, d, integer,
                                           mode, mine);
      });
      for (const auto& rank_records : records) sharded::check_reference_records(rank_records);
    }
  }
}

/// Rank `bad`'s call differs as `kind` says; returns this rank's message ("" if none) and
/// whether it wrote either gradient.
struct Outcome {
  std::string message;
  bool written = false;
};

enum class Odd { one_value, one_label, fewer_rows, self_out_of_range, zero_query_row };

Outcome odd_call(ml::thread_rank& me, int bad, Odd kind) {
  const int rank = me.rank();
  std::mt19937_64 rng(11);
  Matrix<double> q = uniform_matrix<double>(4, 5, rng);
  Matrix<double> r = uniform_matrix<double>(6, 5, rng);
  Eigen::VectorXi labels_q(4), labels_r(6);
  labels_q << 0, 1, 0, 1;
  labels_r << 0, 1, 2, 0, 1, 2;
  Eigen::VectorXi self = Eigen::VectorXi::Constant(4, -1);
  if (rank == bad) {
    if (kind == Odd::one_value) r(3, 2) = std::nextafter(r(3, 2), 2.0);
    if (kind == Odd::one_label) labels_r[5] = 7;
    if (kind == Odd::fewer_rows) r.conservativeResize(5, 5), labels_r.conservativeResize(5);
    if (kind == Odd::self_out_of_range) self[2] = 6;
    if (kind == Odd::zero_query_row) q.row(1).setZero();
  }
  Matrix<double> gq = Matrix<double>::Constant(4, 5, 42.0), gr = Matrix<double>::Constant(r.rows(), 5, 42.0);
  ml::LiftedStructureLoss<double> loss(1.0);
  loss.normalize = kind == Odd::zero_query_row;
  Outcome out;
  try {
    loss.forward_backward(ml::simd.sharded(me), q, labels_q, ml::reference(r, labels_r, self), gq, gr);
  } catch (const ml::invalid_argument& e) {
    out.message = e.what();
  }
  out.written = (gq.array() != 42.0).any() || (gr.array() != 42.0).any();
  return out;
}

}  // namespace

TEST_CASE("sharded reference sets over threads: every batch loss, double, W = 1..5",
          "[sharded][reference]") {
  check_all_layouts<double>(false);
  check_all_layouts<double>(true);
}

TEST_CASE("sharded reference sets over threads: every batch loss, float, W = 1..5",
          "[sharded][reference]") {
  check_all_layouts<float>(false);
  check_all_layouts<float>(true);
}

TEST_CASE("sharded reference sets over threads: R differing between ranks, or a bad argument "
          "on one rank, makes every rank throw and write nothing",
          "[sharded][reference][errors]") {
  const std::pair<Odd, std::string> cases[] = {
      {Odd::one_value, "arguments 'r' and 'labels_r' on rank 2 of 3 differ from rank 0's (the "
                       "same shape, other bits); every rank needs the same reference set, bitwise"},
      {Odd::one_label, "arguments 'r' and 'labels_r' on rank 1 of 3 differ from rank 0's"},
      {Odd::fewer_rows, "argument 'r' on rank 2 of 3 has 5 rows, on rank 0 6; every rank needs "
                        "the same reference set"},
      {Odd::self_out_of_range, "rank 1 of 3: argument 'self_index' has self_index[2] = 6, "
                               "neither -1 (none) nor a row of 'r'"},
      {Odd::zero_query_row, "rank 2 of 3: argument 'q' has row 1 of norm 0"},
  };
  for (const auto& c : cases) {
    const int bad = c.first == Odd::one_label || c.first == Odd::self_out_of_range ? 1 : 2;
    std::vector<Outcome> outcomes(3);
    on_threads(3, [&](ml::thread_rank& me, int r) {
      outcomes[static_cast<std::size_t>(r)] = odd_call(me, bad, c.first);
    });
    for (const Outcome& o : outcomes) {
      CAPTURE(c.second, o.message);
      CHECK(o.message.find("metricloss::LiftedStructureLoss<double>::forward_backward: ") == 0);
      CHECK(o.message.find(c.second) != std::string::npos);
      CHECK(o.message == outcomes[0].message);
      CHECK_FALSE(o.written);
    }
  }
}

TEST_CASE("sharded reference sets over threads: a non-finite query on one rank gives NaN on "
          "every rank (hard, semihard, multi-similarity, lifted, all)",
          "[sharded][reference]") {
  const std::vector<Index> shards{5, 0, 7};
  const sharded::GlobalBatch<double> global(shards, 4, false, 9);
  const sharded::ReferenceOf<double> ref(global, false, 10);
  for (int kind = 0; kind < 5; ++kind) {
    std::vector<int> nan_everywhere(3, 0);
    on_threads(3, [&](ml::thread_rank& me, int r) {
      const Index first = global.first[static_cast<std::size_t>(r)];
      const Index rows = shards[static_cast<std::size_t>(r)];
      Matrix<double> q = global.x.middleRows(first, rows);
      if (r == 2) q(3, 1) = std::numeric_limits<double>::infinity();
      const Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels = global.labels.segment(first, rows);
      Matrix<double> gq(rows, 4), gr(ref.r.rows(), 4);
      const auto set = ml::reference(ref.r, ref.labels);
      double value = 0;
      if (kind == 0) value = ml::BatchTripletLoss<double>(0.2, ml::Mining::hard).forward_backward(ml::simd.sharded(me), q, labels, set, gq, gr);
      if (kind == 1) value = ml::BatchTripletLoss<double>(0.2, ml::Mining::semihard).forward_backward(ml::scalar.sharded(me), q, labels, set, gq, gr);
      if (kind == 2) value = ml::MultiSimilarityLoss<double>().forward_backward(ml::simd.sharded(me), q, labels, set, gq, gr);
      if (kind == 3) value = ml::LiftedStructureLoss<double>().forward_backward(ml::simd.sharded(me), q, labels, set, gq, gr);
      if (kind == 4) value = ml::BatchTripletLoss<double>(0.2, ml::Mining::all).forward_backward(ml::scalar.sharded(me), q, labels, set, gq, gr);
      nan_everywhere[static_cast<std::size_t>(r)] =
          std::isnan(value) && gq.array().isNaN().all() && gr.array().isNaN().all();
    });
    CAPTURE(kind);
    CHECK(nan_everywhere == std::vector<int>{1, 1, 1});
  }
}

TEST_CASE("sharded reference sets over threads: strided queries, gradients and R give the "
          "dense call's bits",
          "[sharded][reference]") {
  const std::vector<Index> shards{4, 0, 9};
  const Index d = 7, pad = 3;
  const sharded::GlobalBatch<float> global(shards, d, false, 21);
  const sharded::ReferenceOf<float> ref(global, false, 22);
  using Strided = Eigen::Map<const Matrix<float>, 0, Eigen::OuterStride<>>;
  using StridedOut = Eigen::Map<Matrix<float>, 0, Eigen::OuterStride<>>;
  // R with padded rows, the same on every rank.
  Matrix<float> r_storage = Matrix<float>::Zero(ref.r.rows(), d + pad);
  r_storage.leftCols(d) = ref.r;
  const Strided r(r_storage.data(), ref.r.rows(), d, Eigen::OuterStride<>(d + pad));
  std::vector<int> same(3 * 4, 0);
  on_threads(3, [&](ml::thread_rank& me, int k) {
    const Index first = global.first[static_cast<std::size_t>(k)];
    const Index rows = shards[static_cast<std::size_t>(k)];
    const Matrix<float> q = global.x.middleRows(first, rows);
    Matrix<float> q_storage = Matrix<float>::Zero(rows, d + pad);
    q_storage.leftCols(d) = q;
    const Strided q_strided(q_storage.data(), rows, d, Eigen::OuterStride<>(d + pad));
    const Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels = global.labels.segment(first, rows);
    int c = 0;
    const auto compare = [&](auto loss) {
      Matrix<float> gq(rows, d), gr(ref.r.rows(), d);
      Matrix<float> gq_storage = Matrix<float>::Zero(rows, d + pad);
      Matrix<float> gr_storage = Matrix<float>::Zero(ref.r.rows(), d + pad);
      StridedOut gq_strided(gq_storage.data(), rows, d, Eigen::OuterStride<>(d + pad));
      StridedOut gr_strided(gr_storage.data(), ref.r.rows(), d, Eigen::OuterStride<>(d + pad));
      auto other = loss;
      const float dense = loss.forward_backward(ml::simd.sharded(me), q, labels,
                                                ml::reference(ref.r, ref.labels), gq, gr);
      const float strided = other.forward_backward(ml::simd.sharded(me), q_strided, labels,
                                                   ml::reference(r, ref.labels), gq_strided, gr_strided);
      same[static_cast<std::size_t>(k * 4 + c++)] =
          std::memcmp(&dense, &strided, sizeof(float)) == 0 && Matrix<float>(gq_strided) == gq &&
          Matrix<float>(gr_strided) == gr;
    };
    compare(ml::BatchTripletLoss<float>(0.2f, ml::Mining::semihard));
    compare(ml::BatchTripletLoss<float>(0.2f, ml::Mining::all));
    compare(ml::MultiSimilarityLoss<float>());
    compare(ml::BatchContrastiveLoss<float>(0.1f, 0.9f));  // gathers Q
  });
  CHECK(same == std::vector<int>(12, 1));
}

TEST_CASE("sharded reference sets over threads: a warm call allocates nothing",
          "[sharded][reference][allocation]") {
  const std::vector<Index> shards{5, 0, 7};
  const sharded::GlobalBatch<float> global(shards, 9, false, 3);
  const sharded::ReferenceOf<float> ref(global, false, 4);
  long before = 0, after = 0;
  on_threads(3, [&](ml::thread_rank& me, int r) {
    const Index first = global.first[static_cast<std::size_t>(r)];
    const Index rows = shards[static_cast<std::size_t>(r)];
    const Matrix<float> q = global.x.middleRows(first, rows);
    const Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels = global.labels.segment(first, rows);
    std::vector<std::int64_t> self(ref.self.begin() + first, ref.self.begin() + first + rows);
    Matrix<float> gq(rows, 9), gr(ref.r.rows(), 9);
    ml::BatchTripletLoss<float> hard(0.2f, ml::Mining::hard);
    ml::LiftedStructureLoss<float> lifted(1.0f);
    lifted.normalize = true;
    ml::BatchContrastiveLoss<float> contrastive(0.0f, 1.0f);
    ml::MultiSimilarityLoss<float> ms;
    const auto calls = [&] {
      const auto with_self = ml::reference(ref.r, ref.labels, self);
      hard.forward_backward(ml::simd.sharded(me), q, labels, with_self, gq, gr);
      lifted.forward_backward(ml::simd.sharded(me), q, labels, with_self, gq, ml::skip);
      contrastive.forward_backward(ml::scalar.sharded(me), q, labels, ml::reference(ref.r, ref.labels), gq, gr);
      ms.forward(ml::simd.sharded(me), q, labels, with_self);
    };
    calls();  // warm
    const auto barrier = [&] {
      std::size_t zeros[3] = {0, 0, 0};
      me.allgatherv(nullptr, 0, nullptr, zeros, zeros);
    };
    barrier();
    if (r == 0) before = allocation_count();
    barrier();
    calls();
    barrier();
    if (r == 0) after = allocation_count();
  });
  CHECK(after - before == 0);
}
