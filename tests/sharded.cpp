// Sharded batch losses with ranks as threads (metricloss::thread_group), W = 1..5: the loss of
// the global batch on every rank, bitwise the same; each rank's rows of the gradient; errors
// on one rank thrown by all; a warm call allocates nothing. tests/sharded_mpi.cpp runs the
// same body with ranks as MPI processes.
#include "allocation_counter.hpp"
#include "sharded_check.hpp"


namespace {

using namespace mltest;
using mltest::sharded::Record;
using mltest::sharded::on_threads;

const std::vector<std::vector<Index>> layouts = {
    {18},          {0, 18},     {9, 9},          {7, 0, 11},      {6, 6, 6},
    {1, 1, 16},    {18, 0, 0},  {3, 0, 8, 7},    {1, 4, 0, 6, 7}, {2, 2, 2, 2, 2},
};

/// Batches of 301 rows: each rank's band of the triangle spans several product tiles (and
/// the lifted product's 128-row diagonal blocks), starts mid-tile, and holds rows of other
/// ranks' shards; empty shards.
const std::vector<std::vector<Index>> big_layouts = {
    {0, 301}, {150, 151}, {97, 0, 204}, {1, 50, 0, 120, 130}, {75, 76, 75, 75}};

/// For each layout and D: body(rank, shards, d, records) on one thread per rank, then the
/// records asserted on this thread.
template <class Body>
void on_layouts(const std::vector<std::vector<Index>>& all, std::initializer_list<Index> dims,
                Body&& body) {
  for (const auto& shards : all)
    for (Index d : dims) {
      const int ranks = static_cast<int>(shards.size());
      std::vector<std::vector<Record>> records(static_cast<std::size_t>(ranks));
      on_threads(ranks, [&](ml::thread_rank& me, int r) {
        body(me, shards, d, records[static_cast<std::size_t>(r)]);
      });
      for (const auto& rank_records : records) sharded::check_records(rank_records);
    }
}

template <class T>
void check_all_layouts(bool integer) {
  on_layouts(layouts, {5, 33}, [&](ml::thread_rank& me, const std::vector<Index>& shards, Index d,
                                   std::vector<Record>& mine) {
    sharded::check_layout<T>(me, ml::scalar.sharded(me), "scalar", shards, d, integer, mine);
    sharded::check_layout<T>(me, ml::simd.sharded(me), "simd", shards, d, integer, mine);
  });
}

}  // namespace

TEST_CASE("sharded over threads: every batch loss, double, W = 1..5", "[sharded]") {
  check_all_layouts<double>(false);
  check_all_layouts<double>(true);
}

TEST_CASE("sharded over threads: every batch loss, float, W = 1..5", "[sharded]") {
  check_all_layouts<float>(false);
  check_all_layouts<float>(true);
}

/// Losses whose hinges turn at integer squared distances, in both distances: batch-all with
/// margin 1, batch contrastive with margins 4 and 5 (squared: 16 and 25, where the integer
/// rows' squared distances crowd) and 7 and 2 (49 and 4: few active pairs);
/// multi-similarity with epsilon 0.
template <class T>
struct KinkConfigs {
  template <class F>
  void operator()(F&& f) const {
    for (ml::Distance distance : {ml::Distance::squared_euclidean, ml::Distance::euclidean}) {
      const bool squared = distance == ml::Distance::squared_euclidean;
      const std::string kind = squared ? "squared" : "euclidean";
      ml::BatchTripletLoss<T> all(T(1), ml::Mining::all);
      all.distance = distance;
      f("batch-all margin 1 " + kind, all);
      ml::BatchContrastiveLoss<T> pairs(T(squared ? 16 : 4), T(squared ? 25 : 5), distance);
      f("batch contrastive margins at 16 and 25 " + kind, pairs);
      // Few active pairs: each rank applies its weights one by one, as one process does
      // (tuning::direct_weights_per_pair), at margins that integer rows also meet exactly.
      ml::BatchContrastiveLoss<T> few(T(squared ? 49 : 7), T(squared ? 4 : 2), distance);
      f("batch contrastive margins at 49 and 4 " + kind, few);
    }
    // epsilon 0, normalised: a negative that duplicates an anchor's least similar positive
    // (the integer rows repeat rows across classes) sits exactly at its kept set's limit,
    // and the products of unit rows round.
    ml::MultiSimilarityLoss<T> ms(T(2), T(1), T(0), T(0));
    ms.normalize = true;
    f("multi-similarity epsilon 0 normalize", ms);
  }
};

TEST_CASE("sharded over threads: hinges at exactly 0 decided as in one process",
          "[sharded][ties]") {
  // Integer rows: many batch-all negatives lie exactly at a kink, d_an = d_ap + 1, and many
  // pairs exactly at a contrastive margin (hinges at exactly 0: inactive), in squared
  // distances and, where D2 is a square, in distances. The ranks that meet a pair or triplet
  // from both ends must decide it alike, though their products (centred differently) round
  // differently.
  on_layouts(layouts, {5, 8}, [&](ml::thread_rank& me, const std::vector<Index>& shards, Index d,
                                  std::vector<Record>& mine) {
    sharded::check_layout_of<double>(me, ml::scalar.sharded(me), "scalar", shards, d, true, mine, KinkConfigs<double>{});
    sharded::check_layout_of<double>(me, ml::simd.sharded(me), "simd", shards, d, true, mine, KinkConfigs<double>{});
    sharded::check_layout_of<float>(me, ml::scalar.sharded(me), "scalar", shards, d, true, mine, KinkConfigs<float>{});
    sharded::check_layout_of<float>(me, ml::simd.sharded(me), "simd", shards, d, true, mine, KinkConfigs<float>{});
    // A common offset of 1000: similarities near 8e6 that float products round.
    sharded::check_layout_of<double>(me, ml::simd.sharded(me), "simd", shards, d, true, mine, KinkConfigs<double>{}, 1000.0);
    sharded::check_layout_of<float>(me, ml::simd.sharded(me), "simd", shards, d, true, mine, KinkConfigs<float>{}, 1000.0);
  });
}

/// A batch triplet mining mode in every form: hinge and soft margin, squared and Euclidean
/// distances (margin 0.5).
template <class T>
struct TripletForms {
  ml::Mining mining;
  const char* name;
  template <class F>
  void operator()(F&& f) const {
    for (ml::Distance distance : {ml::Distance::squared_euclidean, ml::Distance::euclidean})
      for (bool soft : {false, true}) {
        ml::BatchTripletLoss<T> loss(T(0.5), mining, distance, soft);
        f(std::string(name) + (soft ? " soft" : " hinge") +
              (distance == ml::Distance::squared_euclidean ? " squared" : " euclidean"),
          loss);
      }
  }
};

template <class T>
TripletForms<T> hard_forms() { return {ml::Mining::hard, "batch-hard"}; }
template <class T>
TripletForms<T> all_forms() { return {ml::Mining::all, "batch-all"}; }

TEST_CASE("sharded over threads: batch-hard by bands of the triangle, large batches",
          "[sharded][ties]") {
  // The simd path splits the triangle's rows between ranks (b_q = round(N sqrt(q / W))), so
  // each rank's band spans several product tiles, starts mid-tile, and holds anchors of
  // other ranks' shards as columns; integer rows tie at many hardest candidates (the lowest
  // row must win on every rank alike), the offset makes float products round.
  on_layouts(big_layouts, {3, 33}, [&](ml::thread_rank& me, const std::vector<Index>& shards,
                                       Index d, std::vector<Record>& mine) {
    for (bool integer : {false, true}) {
      sharded::check_layout_of<double>(me, ml::simd.sharded(me), "simd", shards, d, integer, mine, hard_forms<double>());
      sharded::check_layout_of<float>(me, ml::simd.sharded(me), "simd", shards, d, integer, mine, hard_forms<float>());
    }
    sharded::check_layout_of<double>(me, ml::simd.sharded(me), "simd", shards, d, true, mine, hard_forms<double>(), 1000.0);
    sharded::check_layout_of<float>(me, ml::simd.sharded(me), "simd", shards, d, true, mine, hard_forms<float>(), 1000.0);
    sharded::check_layout_of<double>(me, ml::scalar.sharded(me), "scalar", shards, d, true, mine, hard_forms<double>());
  });
}

namespace {
/// Batch-all over big_layouts with `classes` classes: simd, uniform and integer rows, and
/// integer rows at a common offset of 1000.
void check_batch_all_bands(Index classes) {
  on_layouts(big_layouts, {3, 33}, [&](ml::thread_rank& me, const std::vector<Index>& shards,
                                       Index d, std::vector<Record>& mine) {
    for (bool integer : {false, true}) {
      sharded::check_layout_of<double>(me, ml::simd.sharded(me), "simd", shards, d, integer, mine, all_forms<double>(), 0.0, classes);
      sharded::check_layout_of<float>(me, ml::simd.sharded(me), "simd", shards, d, integer, mine, all_forms<float>(), 0.0, classes);
    }
    sharded::check_layout_of<double>(me, ml::simd.sharded(me), "simd", shards, d, true, mine, all_forms<double>(), 1000.0, classes);
    sharded::check_layout_of<float>(me, ml::simd.sharded(me), "simd", shards, d, true, mine, all_forms<float>(), 1000.0, classes);
  });
}
}  // namespace

// The simd path splits the triangle's rows between ranks and scans each band's rows and
// columns as anchors: bands across the column tiles (32) and product blocks, empty shards;
// integer rows put negatives exactly at kinks, the offset makes float products round. Two
// cases, so that ctest runs them side by side (the slowest of the suite under the sanitizers).
TEST_CASE("sharded over threads: batch-all by bands of the triangle, large batches, 4 classes",
          "[sharded][ties]") {
  check_batch_all_bands(4);  // ~75 positives an anchor: the bucket sweeps
}

TEST_CASE("sharded over threads: batch-all by bands of the triangle, large batches, 40 classes",
          "[sharded][ties]") {
  check_batch_all_bands(40);  // ~7 positives an anchor: the row scans
}

/// The lifted loss in the forms its band path meets: margins 1 and 0.2 (few and many
/// active positive pairs), and on unit rows (not for integer rows: some are zero).
template <class T>
struct LiftedConfigs {
  bool unit_rows = true;
  template <class F>
  void operator()(F&& f) const {
    f("lifted margin 1", ml::LiftedStructureLoss<T>(T(1)));
    f("lifted margin 0.2", ml::LiftedStructureLoss<T>(T(0.2)));
    if (!unit_rows) return;
    ml::LiftedStructureLoss<T> unit(T(1));
    unit.normalize = true;
    f("lifted margin 1 normalize", unit);
  }
};

TEST_CASE("sharded over threads: lifted by bands of the triangle, large batches",
          "[sharded][lifted]") {
  // The simd path splits the triangle's rows between ranks and reduces the bands' gradient
  // parts: bands spanning several of the product's diagonal blocks (128 rows) and starting
  // mid-block, rows of one shard in several bands, empty shards; integer rows (coincident
  // points: zero distances, exact ties) and a common offset.
  on_layouts(big_layouts, {3, 33}, [&](ml::thread_rank& me, const std::vector<Index>& shards,
                                       Index d, std::vector<Record>& mine) {
    for (bool integer : {false, true}) {
      sharded::check_layout_of<double>(me, ml::simd.sharded(me), "simd", shards, d, integer, mine, LiftedConfigs<double>{!integer});
      sharded::check_layout_of<float>(me, ml::simd.sharded(me), "simd", shards, d, integer, mine, LiftedConfigs<float>{!integer});
    }
    sharded::check_layout_of<double>(me, ml::simd.sharded(me), "simd", shards, d, true, mine, LiftedConfigs<double>{false}, 1000.0);
    sharded::check_layout_of<float>(me, ml::simd.sharded(me), "simd", shards, d, true, mine, LiftedConfigs<float>{false}, 1000.0);
  });
}

TEST_CASE("sharded over threads: ranks mixing forward and forward_backward", "[sharded][lifted]") {
  // Lifted by bands reduces gradient parts only when some rank asks for a gradient: a rank
  // calling forward must still send its band's part to the ranks that do.
  const std::vector<Index> shards = {40, 0, 97, 63};
  const sharded::GlobalBatch<double> global(shards, 9, false, 77u);
  ml::LiftedStructureLoss<double> single(1.0);
  Matrix<double> reference_grad(global.x.rows(), 9);
  const double reference = single.forward_backward(ml::simd, global.x, global.labels, reference_grad);
  for (int forward_rank = 0; forward_rank < 4; ++forward_rank) {
    std::vector<double> values(4), errors(4, 0.0);
    on_threads(4, [&](ml::thread_rank& me, int r) {
      const Index first = global.first[static_cast<std::size_t>(r)];
      const Index rows = shards[static_cast<std::size_t>(r)];
      const Matrix<double> x = global.x.middleRows(first, rows);
      const Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> y = global.labels.segment(first, rows);
      ml::LiftedStructureLoss<double> loss(1.0);
      if (r == forward_rank) {
        values[static_cast<std::size_t>(r)] = loss.forward(ml::simd.sharded(me), x, y);
        return;
      }
      Matrix<double> g(rows, 9);
      values[static_cast<std::size_t>(r)] = loss.forward_backward(ml::simd.sharded(me), x, y, g);
      if (rows > 0)
        errors[static_cast<std::size_t>(r)] =
            (g - reference_grad.middleRows(first, rows)).cwiseAbs().maxCoeff();
    });
    CAPTURE(forward_rank, reference);
    for (int r = 0; r < 4; ++r) {
      CAPTURE(r, values[static_cast<std::size_t>(r)], errors[static_cast<std::size_t>(r)]);
      CHECK(relatively_close(values[static_cast<std::size_t>(r)], reference, Tolerance<double>::loss));
      CHECK(errors[static_cast<std::size_t>(r)] <=
            Tolerance<double>::gradient * reference_grad.cwiseAbs().maxCoeff());
      CHECK(std::memcmp(&values[static_cast<std::size_t>(r)], &values[0], sizeof(double)) == 0);
    }
  }
}

TEST_CASE("sharded over threads: a malformed call on one rank makes every rank throw",
          "[sharded][errors]") {
  for (int ranks : {1, 3}) {
    for (bool wrong_d : {false, true}) {
      if (wrong_d && ranks == 1) continue;  // one rank cannot disagree with itself
      const int bad = ranks - 1;
      std::vector<std::string> messages(static_cast<std::size_t>(ranks));
      on_threads(ranks, [&](ml::thread_rank& me, int r) {
        messages[static_cast<std::size_t>(r)] =
            sharded::malformed_call<double>(me, ml::simd.sharded(me), bad, wrong_d);
      });
      for (const auto& m : messages) {
        CAPTURE(ranks, wrong_d, m);
        CHECK(m.find("metricloss::BatchTripletLoss<double>::forward_backward: ") == 0);
        CHECK(m.find("rank " + std::to_string(bad) + " of " + std::to_string(ranks)) !=
              std::string::npos);
        CHECK(m == messages[0]);
      }
    }
  }
}

/// Every rank's message when rank `odd` calls `odd_call` and the others `call` (both take
/// the rank handle, x, labels and grad); "" where nothing was thrown; "written" where a
/// gradient was written before the throw.
template <class Call, class OddCall>
std::vector<std::string> mixed_calls(int ranks, int odd, Call&& call, OddCall&& odd_call) {
  std::vector<std::string> messages(static_cast<std::size_t>(ranks));
  on_threads(ranks, [&](ml::thread_rank& me, int r) {
    std::mt19937_64 rng(static_cast<std::uint64_t>(r) + 11);
    const Matrix<double> x = uniform_matrix<double>(4, 5, rng);
    Eigen::VectorXi labels(4);
    labels << 0, 1, 0, 1;
    Matrix<double> grad = Matrix<double>::Constant(4, 5, 42.0);
    try {
      if (r == odd) odd_call(me, x, labels, grad);
      else call(me, x, labels, grad);
    } catch (const ml::invalid_argument& e) {
      messages[static_cast<std::size_t>(r)] = (grad.array() != 42.0).any() ? "written" : e.what();
    }
  });
  return messages;
}

TEST_CASE("sharded over threads: ranks with different options or paths all throw, naming them",
          "[sharded][errors]") {
  // Different options choose different algorithms, and so different collectives: a rank in
  // batch-hard's statistics and one in batch-all's gather would wait on each other forever.
  const auto with = [](ml::Mining mining, double margin) {
    return [=](ml::thread_rank& me, const Matrix<double>& x, const Eigen::VectorXi& y,
               Matrix<double>& g) {
      ml::BatchTripletLoss<double> loss(margin, mining);
      loss.forward_backward(ml::simd.sharded(me), x, y, g);
    };
  };
  SECTION("mining") {
    for (const auto& m : mixed_calls(3, 2, with(ml::Mining::hard, 0.2), with(ml::Mining::all, 0.2))) {
      CAPTURE(m);
      CHECK(m == "metricloss::BatchTripletLoss<double>::forward_backward: rank 2 of 3 calls with "
                 "margin = 0.2, mining = all, distance = euclidean, soft_margin = false, "
                 "normalize = false on metricloss::simd, rank 0 with margin = 0.2, mining = hard, "
                 "distance = euclidean, soft_margin = false, normalize = false on "
                 "metricloss::simd; every rank needs the same loss options and path");
    }
  }
  SECTION("margin") {
    for (const auto& m : mixed_calls(2, 1, with(ml::Mining::hard, 0.2), with(ml::Mining::hard, 0.3))) {
      CAPTURE(m);
      CHECK(m.find("rank 1 of 2 calls with margin = 0.3,") != std::string::npos);
      CHECK(m.find("rank 0 with margin = 0.2,") != std::string::npos);
    }
  }
  SECTION("path: lifted on scalar and simd (4 ranks: the paths choose different algorithms)") {
    const auto lifted = [](auto tag_of) {
      return [=](ml::thread_rank& me, const Matrix<double>& x, const Eigen::VectorXi& y,
                 Matrix<double>& g) {
        ml::LiftedStructureLoss<double> loss(1.0);
        loss.forward_backward(tag_of(me), x, y, g);
      };
    };
    const auto scalar = lifted([](ml::thread_rank& me) { return ml::scalar.sharded(me); });
    const auto simd = lifted([](ml::thread_rank& me) { return ml::simd.sharded(me); });
    for (const auto& m : mixed_calls(4, 0, simd, scalar)) {
      CAPTURE(m);
      CHECK(m == "metricloss::LiftedStructureLoss<double>::forward_backward: rank 1 of 4 calls "
                 "with margin = 1, normalize = false on metricloss::simd, rank 0 with margin = 1, "
                 "normalize = false on metricloss::scalar; every rank needs the same loss "
                 "options and path");
    }
  }
  SECTION("normalize, batch contrastive and multi-similarity") {
    const auto contrastive = [](bool normalize, ml::Reduction reduction) {
      return [=](ml::thread_rank& me, const Matrix<double>& x, const Eigen::VectorXi& y,
                 Matrix<double>& g) {
        ml::BatchContrastiveLoss<double> loss(0.0, 1.0);
        loss.normalize = normalize;
        loss.reduction = reduction;
        loss.forward_backward(ml::scalar.sharded(me), x, y, g);
      };
    };
    for (const auto& m : mixed_calls(3, 1, contrastive(false, ml::Reduction::mean),
                                     contrastive(true, ml::Reduction::mean))) {
      CAPTURE(m);
      CHECK(m.find("rank 1 of 3 calls with pos_margin = 0, neg_margin = 1, distance = euclidean, "
                   "reduction = mean, normalize = true on metricloss::scalar") !=
            std::string::npos);
    }
    for (const auto& m : mixed_calls(3, 2, contrastive(false, ml::Reduction::mean),
                                     contrastive(false, ml::Reduction::nonzero_mean))) {
      CAPTURE(m);
      CHECK(m.find("rank 2 of 3 calls with pos_margin = 0, neg_margin = 1, distance = euclidean, "
                   "reduction = nonzero_mean") != std::string::npos);
    }
    const auto ms = [](double beta) {
      return [=](ml::thread_rank& me, const Matrix<double>& x, const Eigen::VectorXi& y,
                 Matrix<double>& g) {
        ml::MultiSimilarityLoss<double> loss(2.0, beta);
        loss.forward_backward(ml::simd.sharded(me), x, y, g);
      };
    };
    for (const auto& m : mixed_calls(2, 1, ms(50.0), ms(40.0))) {
      CAPTURE(m);
      CHECK(m.find("rank 1 of 2 calls with alpha = 2, beta = 40, base = 0.5, epsilon = 0.1, "
                   "normalize = false on metricloss::simd, rank 0 with alpha = 2, beta = 50,") !=
            std::string::npos);
    }
  }
  SECTION("the same options on every rank pass") {
    for (const auto& m : mixed_calls(3, 1, with(ml::Mining::hard, 0.2), with(ml::Mining::hard, 0.2)))
      CHECK(m.empty());
  }
}

TEST_CASE("sharded over threads: an empty global batch, and mixed label types, throw",
          "[sharded][errors]") {
  std::vector<std::string> messages(2);
  on_threads(2, [&](ml::thread_rank& me, int r) {
    Matrix<double> x(0, 4), g(0, 4);
    Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels(0);
    ml::LiftedStructureLoss<double> loss(1.0);
    try {
      loss.forward_backward(ml::scalar.sharded(me), x, labels, g);
    } catch (const ml::invalid_argument& e) {
      messages[static_cast<std::size_t>(r)] = e.what();
    }
  });
  for (const auto& m : messages) {
    CAPTURE(m);
    CHECK(m.find("0 rows on every rank of 2") != std::string::npos);
  }
  on_threads(2, [&](ml::thread_rank& me, int r) {
    Matrix<double> x = Matrix<double>::Ones(2, 4), g(2, 4);
    Eigen::VectorXi int_labels = Eigen::VectorXi::Zero(2);
    Eigen::VectorXd double_labels = Eigen::VectorXd::Zero(2);
    ml::LiftedStructureLoss<double> loss(1.0);
    try {
      if (r == 0) loss.forward_backward(ml::scalar.sharded(me), x, int_labels, g);
      else loss.forward_backward(ml::scalar.sharded(me), x, double_labels, g);
    } catch (const ml::invalid_argument& e) {
      messages[static_cast<std::size_t>(r)] = e.what();
    }
  });
  for (const auto& m : messages) {
    CAPTURE(m);
    CHECK(m.find("rank 1 of 2 passes 64-bit floating-point labels, rank 0 32-bit signed integer") !=
          std::string::npos);
  }
}

TEST_CASE("sharded over threads: a warm call allocates nothing", "[sharded][allocation]") {
  for (const std::vector<Index>& shards : {std::vector<Index>{12}, std::vector<Index>{5, 0, 7}}) {
    const int ranks = static_cast<int>(shards.size());
    const sharded::GlobalBatch<float> global(shards, 9, false, 3);
    long before = 0, after = 0;
    on_threads(ranks, [&](ml::thread_rank& me, int r) {
      const Index first = global.first[static_cast<std::size_t>(r)];
      const Index rows = shards[static_cast<std::size_t>(r)];
      const Matrix<float> x = global.x.middleRows(first, rows);
      const Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels = global.labels.segment(first, rows);
      Matrix<float> grad(rows, 9);
      ml::BatchTripletLoss<float> hard(0.2f, ml::Mining::hard);
      ml::BatchTripletLoss<float> semihard(0.2f, ml::Mining::semihard);
      ml::BatchTripletLoss<float> all(0.2f, ml::Mining::all);
      ml::LiftedStructureLoss<float> lifted(1.0f);
      lifted.normalize = true;
      ml::BatchContrastiveLoss<float> contrastive(0.0f, 1.0f);
      ml::MultiSimilarityLoss<float> ms;
      ms.normalize = true;
      const auto calls = [&] {
        hard.forward_backward(ml::simd.sharded(me), x, labels, grad);
        semihard.forward_backward(ml::scalar.sharded(me), x, labels, grad);
        all.forward_backward(ml::simd.sharded(me), x, labels, grad);
        lifted.forward_backward(ml::simd.sharded(me), x, labels, grad);
        contrastive.forward_backward(ml::simd.sharded(me), x, labels, grad);
        ms.forward_backward(ml::scalar.sharded(me), x, labels, grad);
        hard.forward(ml::scalar.sharded(me), x, labels);
      };
      calls();  // warm
      const auto barrier = [&] {  // a collective of no bytes
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
    CAPTURE(ranks);
    CHECK(after - before == 0);
  }
}

TEST_CASE("sharded over threads: lifted's statistics at large scales stay within the bounds",
          "[sharded][lifted]") {
  // The statistics paths (simd: by bands; scalar: rows against X) read their negatives'
  // distances from the product, without the single-process path's exact list:
  // measured here against the scalar path in double on the same (rounded) inputs, uniform data
  // at +-30 (norms ~ 1e5 at D = 512), 8 rows per class.
  for (const Index d : {Index(32), Index(128), Index(512)})
    for (const double scale : {1.0, 30.0}) {
      const Index n = 64;
      const int ranks = 4;
      std::mt19937_64 rng(static_cast<std::uint64_t>(d) * 7 + static_cast<std::uint64_t>(scale));
      const Matrix<float> x = uniform_matrix<float>(n, d, rng, -scale, scale);
      Eigen::VectorXi y(n);
      for (Index i = 0; i < n; ++i) y[i] = static_cast<int>(i / 8);
      Matrix<double> reference_grad(n, d);
      ml::LiftedStructureLoss<double> reference(1.0);
      const double expected =
          reference.forward_backward(ml::scalar, x.cast<double>().eval(), y, reference_grad);
      Matrix<float> grad(n, d);
      std::vector<float> values(static_cast<std::size_t>(ranks));
      on_threads(ranks, [&](ml::thread_rank& me, int r) {
        const Index first = n / ranks * r, rows = n / ranks;
        Matrix<float> g(rows, d);
        ml::LiftedStructureLoss<float> loss(1.0f);
        values[static_cast<std::size_t>(r)] = loss.forward_backward(
            ml::simd.sharded(me), x.middleRows(first, rows), y.segment(first, rows), g);
        grad.middleRows(first, rows) = g;
      });
      CAPTURE(d, scale, expected, values[0]);
      CHECK(relatively_close(values[0], expected, Tolerance<float>::loss));
      CHECK(ml::testing::compare_gradients(grad, reference_grad).relative() <=
            Tolerance<float>::gradient);
    }
}
