// Sharded batch losses on the CUDA path (API.md, "Global batches"): ranks as threads of one
// process on one GPU (metricloss::thread_group, W = 1..4: the host-staged gather) and, where
// NCCL is built, one NCCL rank (metricloss::nccl_group, W = 1: the device gather; NCCL
// refuses two ranks on one GPU). For BatchTripletLoss (hard, semihard, all; both distances;
// hinge and soft margin) and LiftedStructureLoss, float and double, shards {7, 0, 11},
// {6, 6, 6}, {1, 1, 16}, {18, 0, 0} and {4}, D in {5, 33}, strided device maps:
//  - every rank's L bitwise equal to the single-process CUDA call on X = concat(x_r);
//  - this rank's gradient rows bitwise equal to that call's rows, padding untouched;
//  - a second call bitwise equal; forward equal to forward_backward's L;
// half rows on thread ranks give the float call's L on the widened batch and, on each rank, its
// rows of that call's gradient rounded to half; and the agreement: a malformed call on one rank, a zero row under normalize, or one rank on another
// path (host memory on metricloss::scalar) make every rank throw metricloss::invalid_argument, nothing written.
#include "device.cuh"

#include <metricloss/thread_group.hpp>

#include <cuda_fp16.h>
#if defined(METRICLOSS_TEST_NCCL)
#include <metricloss/nccl.cuh>
#endif

#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

using namespace mltest;
using ml::Distance;
using ml::Mining;

namespace {

using Labels = std::vector<std::int64_t>;

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// The global batch: labels (i * 7) % 4 with row 0 a singleton (label 100), so a class is
/// split across ranks; integer coordinates with repeated rows on odd seeds (exact ties).
template <class T>
struct Batch {
  Matrix<T> x;
  Labels labels;
  std::vector<Index> shards, first;

  Batch(std::vector<Index> shards_, Index d, std::uint64_t seed) : shards(std::move(shards_)) {
    Index n = 0;
    for (Index s : shards) {
      first.push_back(n);
      n += s;
    }
    std::mt19937_64 rng(seed);
    x = seed % 2 ? tied_matrix<T>(n, d, rng, -2, 2) : uniform_matrix<T>(n, d, rng, -1.5, 1.5);
    labels.resize(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) labels[static_cast<std::size_t>(i)] = (i * 7) % 4;
    labels[0] = 100;
  }
  Index rows() const { return x.rows(); }
};

/// What one rank saw (Catch2 asserts on the main thread only).
template <class T>
struct RankRecord {
  T value = T(0), second = T(0), forward = T(0);
  bool rows_match = false, padding_kept = false, second_matches = false;
  std::string error;
};

/// One rank's calls: its rows of the batch on its own stream, as device maps with padding.
template <class T, class Loss, class Group>
RankRecord<T> rank_body(const Loss& options, const Batch<T>& batch, const Matrix<T>& reference_grad,
                        Group& group, T top_diff) {
  RankRecord<T> record;
  try {
    check_cuda(cudaSetDevice(0));
    cudaStream_t stream = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const int r = group.rank();
    const Index n_r = batch.shards[static_cast<std::size_t>(r)];
    const Index first = batch.first[static_cast<std::size_t>(r)];
    const Index d = batch.x.cols();
    const T sentinel = T(-777);
    const Matrix<T> rows = batch.x.middleRows(first, n_r);
    const DeviceStrided<T> x(rows, 1, sentinel);
    DeviceStrided<T> g(Matrix<T>::Zero(n_r, d), 1, sentinel);
    const DeviceVectorOf<std::int64_t> y(Labels(batch.labels.begin() + first,
                                                batch.labels.begin() + first + n_r));
    Loss loss = options;
    const auto tag = ml::cuda.on(stream).sharded(group);
    record.value = loss.forward_backward(tag, x.cmap(), y.map(), g.map(), top_diff);
    const Strided<T> got = g.host();
    const Matrix<T> mine = got.cmap();
    record.rows_match = true;
    for (Index i = 0; i < n_r; ++i)
      for (Index c = 0; c < d; ++c)
        if (!same_bits(mine(i, c), reference_grad(first + i, c))) record.rows_match = false;
    record.padding_kept = got.padding_is(sentinel);
    record.second = loss.forward_backward(tag, x.cmap(), y.map(), g.map(), top_diff);
    record.second_matches = g.host().storage == got.storage;
    record.forward = loss.forward(tag, x.cmap(), y.map());
    check_cuda(cudaStreamDestroy(stream));
  } catch (const std::exception& e) {
    record.error = e.what();
  }
  return record;
}

/// The single-process CUDA call on X: its loss and gradient (on the legacy stream).
template <class T, class Loss>
T single_process(const Loss& options, const Batch<T>& batch, T top_diff, Matrix<T>& grad) {
  Loss loss = options;
  const DeviceStrided<T> x(batch.x, 0, T(0));
  DeviceStrided<T> g(Matrix<T>::Zero(batch.rows(), batch.x.cols()), 0, T(0));
  const DeviceVectorOf<std::int64_t> y(batch.labels);
  const T value = loss.forward_backward(ml::cuda, x.cmap(), y.map(), g.map(), top_diff);
  grad = g.dense();
  return value;
}

template <class T>
void check_records(const std::vector<RankRecord<T>>& records, T reference) {
  for (std::size_t r = 0; r < records.size(); ++r) {
    CAPTURE(r);
    const RankRecord<T>& record = records[r];
    REQUIRE(record.error == "");
    CHECK(same_bits(record.value, reference));
    CHECK(record.rows_match);
    CHECK(record.padding_kept);
    CHECK(same_bits(record.second, record.value));
    CHECK(record.second_matches);
    CHECK(same_bits(record.forward, record.value));
  }
}

/// Every rank as a thread of one thread_group.
template <class T, class Loss>
void check_threads(const Loss& options, const Batch<T>& batch) {
  const T top_diff = T(1.5);
  Matrix<T> grad;
  const T reference = single_process(options, batch, top_diff, grad);
  const int ranks = static_cast<int>(batch.shards.size());
  ml::thread_group team(ranks);
  std::vector<RankRecord<T>> records(static_cast<std::size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      ml::thread_rank me = team.member(r);
      records[static_cast<std::size_t>(r)] = rank_body(options, batch, grad, me, top_diff);
    });
  for (auto& t : threads) t.join();
  check_records(records, reference);
}

#if defined(METRICLOSS_TEST_NCCL)
/// One NCCL rank on device 0 (the device gather through ncclBroadcast).
template <class T, class Loss>
void check_nccl(const Loss& options, const Batch<T>& batch) {
  const T top_diff = T(1.5);
  Matrix<T> grad;
  const T reference = single_process(options, batch, top_diff, grad);
  ncclComm_t comm = nullptr;
  int device = 0;
  REQUIRE(ncclCommInitAll(&comm, 1, &device) == ncclSuccess);
  std::vector<RankRecord<T>> records(1);
  {
    ml::nccl_group group(comm);
    records[0] = rank_body(options, batch, grad, group, top_diff);
  }
  ncclCommDestroy(comm);
  check_records(records, reference);
}
#endif

/// One loss on one batch: through one NCCL rank (`nccl`, where built) or thread ranks.
template <class T, class Loss>
void check_sharded(const Loss& loss, const Batch<T>& batch, bool nccl) {
#if defined(METRICLOSS_TEST_NCCL)
  if (nccl) return check_nccl(loss, batch);
#endif
  (void)nccl;
  check_threads(loss, batch);
}

template <class T>
std::vector<std::pair<std::string, std::function<void(const Batch<T>&, bool)>>> loss_cases() {
  std::vector<std::pair<std::string, std::function<void(const Batch<T>&, bool)>>> cases;
  for (Mining mining : {Mining::hard, Mining::semihard, Mining::all})
    for (Distance distance : {Distance::euclidean, Distance::squared_euclidean})
      for (bool soft : {false, true}) {
        const ml::BatchTripletLoss<T> loss(T(0.5), mining, distance, soft);
        const std::string name = std::string("batch_triplet ") +
                                 (mining == Mining::all    ? "all"
                                  : mining == Mining::hard ? "hard"
                                                           : "semihard") +
                                 (distance == Distance::euclidean ? " euclidean" : " squared") +
                                 (soft ? " soft" : " hinge");
        cases.emplace_back(name, [loss](const Batch<T>& batch, bool nccl) {
          check_sharded(loss, batch, nccl);
        });
      }
  for (T margin : {T(1), T(0.2)}) {
    const ml::LiftedStructureLoss<T> loss(margin);
    cases.emplace_back("lifted m=" + std::to_string(margin), [loss](const Batch<T>& batch, bool nccl) {
      check_sharded(loss, batch, nccl);
    });
  }
  for (Distance distance : {Distance::euclidean, Distance::squared_euclidean})
    for (ml::Reduction reduction : {ml::Reduction::nonzero_mean, ml::Reduction::mean}) {
      ml::BatchContrastiveLoss<T> loss(T(0.5), T(3), distance);
      loss.reduction = reduction;
      const std::string name = std::string("batch_contrastive") +
                               (distance == Distance::euclidean ? " euclidean" : " squared") +
                               (reduction == ml::Reduction::mean ? " mean" : " nonzero_mean");
      cases.emplace_back(name, [loss](const Batch<T>& batch, bool nccl) { check_sharded(loss, batch, nccl); });
    }
  for (T epsilon : {T(0.1), std::numeric_limits<T>::infinity()}) {
    const ml::MultiSimilarityLoss<T> loss(T(2), T(10), T(0.5), epsilon);
    cases.emplace_back("multi_similarity epsilon=" + std::to_string(epsilon),
                       [loss](const Batch<T>& batch, bool nccl) { check_sharded(loss, batch, nccl); });
  }
  // normalize = true: each rank's unit rows gathered, its gradient rows chained. Batches with
  // a zero row (possible among the integer ones) are the errors test's.
  auto add_normalized = [&cases](const std::string& name, auto loss) {
    loss.normalize = true;
    cases.emplace_back(name, [loss](const Batch<T>& batch, bool nccl) {
      if ((batch.x.rowwise().squaredNorm().array() == T(0)).any()) return;
      check_sharded(loss, batch, nccl);
    });
  };
  add_normalized("batch_triplet semihard normalize", ml::BatchTripletLoss<T>(T(0.2), Mining::semihard));
  add_normalized("lifted normalize", ml::LiftedStructureLoss<T>(T(1)));
  add_normalized("batch_contrastive normalize", ml::BatchContrastiveLoss<T>(T(0.1), T(1.8)));
  add_normalized("multi_similarity normalize", ml::MultiSimilarityLoss<T>(T(2), T(10), T(0.5), T(0.3)));
  return cases;
}

}  // namespace

using HalfRows = Eigen::Map<ml::RowMatrix<__half>, Eigen::Unaligned, Eigen::OuterStride<>>;
using ConstHalfRows = Eigen::Map<const ml::RowMatrix<__half>, Eigen::Unaligned, Eigen::OuterStride<>>;

TEST_CASE("cuda sharded: half rows on thread ranks match the float call on the widened batch",
          "[cuda][sharded][narrow]") {
  if (skip_without_device()) return;
  const Batch<float> batch({7, 0, 11}, 9, 932);
  Batch<float> wide = batch;  // the rows each rank holds, as the float call sees them
  for (Index i = 0; i < wide.x.size(); ++i)
    wide.x.data()[i] = __half2float(__float2half_rn(batch.x.data()[i]));
  auto check = [&](auto options) {
    Matrix<float> grad;
    const float reference = single_process(options, wide, 1.5f, grad);
    const int ranks = static_cast<int>(batch.shards.size());
    ml::thread_group team(ranks);
    std::vector<float> values(static_cast<std::size_t>(ranks));
    std::vector<Index> wrong(static_cast<std::size_t>(ranks), -1);
    std::vector<std::string> errors(static_cast<std::size_t>(ranks));
    std::vector<std::thread> threads;
    for (int r = 0; r < ranks; ++r)
      threads.emplace_back([&, r] {
        try {
          ml::thread_rank me = team.member(r);
          const auto k = static_cast<std::size_t>(r);
          const Index n_r = batch.shards[k], first = batch.first[k], d = batch.x.cols();
          std::vector<__half> rows(static_cast<std::size_t>(n_r * d));
          for (Index i = 0; i < n_r; ++i)
            for (Index c = 0; c < d; ++c)
              rows[static_cast<std::size_t>(i * d + c)] = __float2half_rn(batch.x(first + i, c));
          const DeviceBuffer<__half> x(rows);
          DeviceBuffer<__half> g(rows.size());
          const DeviceVectorOf<std::int64_t> y(Labels(batch.labels.begin() + first,
                                                      batch.labels.begin() + first + n_r));
          auto loss = options;
          values[k] = loss.forward_backward(ml::cuda.sharded(me),
                                            ConstHalfRows(x.data(), n_r, d, Eigen::OuterStride<>(d)), y.map(),
                                            HalfRows(g.data(), n_r, d, Eigen::OuterStride<>(d)), 1.5f);
          check_cuda(cudaDeviceSynchronize());
          const std::vector<__half> got = g.download();
          Index bad = 0;
          for (Index i = 0; i < n_r; ++i)
            for (Index c = 0; c < d; ++c) {
              const __half want = __float2half_rn(grad(first + i, c));
              bad += std::memcmp(&got[static_cast<std::size_t>(i * d + c)], &want, sizeof want) != 0;
            }
          wrong[k] = bad;
        } catch (const std::exception& e) {
          errors[static_cast<std::size_t>(r)] = e.what();
        }
      });
    for (auto& t : threads) t.join();
    for (int r = 0; r < ranks; ++r) {
      const auto k = static_cast<std::size_t>(r);
      CAPTURE(r, errors[k]);
      REQUIRE(errors[k] == "");
      CHECK(same_bits(values[k], reference));
      CHECK(wrong[k] == 0);
    }
  };
  check(ml::BatchTripletLoss<float>(0.5f, Mining::semihard));
  check(ml::LiftedStructureLoss<float>(1.0f));
  ml::MultiSimilarityLoss<float> normalized(2.0f, 10.0f, 0.5f, 0.3f);
  normalized.normalize = true;
  check(normalized);

  // Rank 2's half gradient over its own input (caught by the staging's checks, before the
  // loss's agreement): every rank throws the same error, nothing is written.
  ml::thread_group team(3);
  std::vector<std::string> errors(3);
  std::vector<int> written(3, -1);
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r)
    threads.emplace_back([&, r] {
      const auto k = static_cast<std::size_t>(r);
      try {
        ml::thread_rank me = team.member(r);
        const Index n_r = 4, d = 5;
        const std::vector<__half> rows(static_cast<std::size_t>(n_r * d), __float2half_rn(0.25f * float(r + 1)));
        DeviceBuffer<__half> x(rows), g(rows);
        const DeviceVectorOf<std::int64_t> y(Labels{0, 1, 0, 1});
        ml::BatchTripletLoss<float> loss;
        try {
          loss.forward_backward(ml::cuda.sharded(me), ConstHalfRows(x.data(), n_r, d, Eigen::OuterStride<>(d)),
                                y.map(), HalfRows(r == 2 ? x.data() : g.data(), n_r, d, Eigen::OuterStride<>(d)));
          errors[k] = "no error";
        } catch (const ml::invalid_argument& e) {
          errors[k] = e.what();
        }
        check_cuda(cudaDeviceSynchronize());
        const auto unchanged = [&](const DeviceBuffer<__half>& b) {
          return std::memcmp(b.download().data(), rows.data(), rows.size() * sizeof(__half)) == 0;
        };
        written[k] = unchanged(x) && unchanged(g) ? 0 : 1;
      } catch (const std::exception& e) {
        errors[k] = std::string("unexpected: ") + e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < 3; ++r) {
    const auto k = static_cast<std::size_t>(r);
    CAPTURE(r, errors[k]);
    CHECK(errors[k] == errors[0]);
    CHECK(written[k] == 0);
  }
  CHECK(errors[0].find("metricloss::BatchTripletLoss<float>::forward_backward: rank 2 of 3: argument "
                       "'grad_x' overlaps argument 'x'") != std::string::npos);
}

TEMPLATE_TEST_CASE("cuda sharded: thread ranks match the single-process cuda call bitwise",
                   "[cuda][sharded]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  const std::vector<std::vector<Index>> layouts{{4}, {7, 0, 11}, {6, 6, 6}, {1, 1, 16}, {18, 0, 0}, {3, 5, 2, 8}};
  const auto layout = static_cast<std::size_t>(GENERATE(0, 1, 2, 3, 4, 5));
  const Index d = GENERATE(5, 33);
  const std::uint64_t seed = 700u + layout * 10u + static_cast<std::uint64_t>(d);
  const Batch<T> batch(layouts[layout], d, seed);
  for (const auto& c : loss_cases<T>()) {
    CAPTURE(c.first, layout, d, seed);
    c.second(batch, false);
  }
}

#if defined(METRICLOSS_TEST_NCCL)
TEMPLATE_TEST_CASE("cuda sharded: one NCCL rank matches the single-process cuda call bitwise",
                   "[cuda][sharded][nccl]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  const Index d = GENERATE(5, 33);
  const std::uint64_t seed = 900u + static_cast<std::uint64_t>(d);
  const Batch<T> batch({18}, d, seed);
  for (const auto& c : loss_cases<T>()) {
    CAPTURE(c.first, d, seed);
    c.second(batch, true);
  }
}
#endif

TEST_CASE("cuda sharded: a malformed call on one rank makes every rank throw",
          "[cuda][sharded][errors]") {
  if (skip_without_device()) return;
  // 0: rank 1's labels one short; 1: normalize = true everywhere and rank 1's row 2 zero;
  // 2: rank 2 on metricloss::scalar.
  const int kind = GENERATE(0, 1, 2);
  CAPTURE(kind);
  const int ranks = 3;
  ml::thread_group team(ranks);
  std::vector<std::string> messages(ranks);
  std::vector<bool> written(ranks, false);
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      ml::thread_rank me = team.member(r);
      try {
        check_cuda(cudaSetDevice(0));
        std::mt19937_64 rng(5);
        Matrix<double> host_x = uniform_matrix<double>(4, 5, rng);
        if (kind == 1 && r == 1) host_x.row(2).setZero();
        ml::BatchTripletLoss<double> loss(0.2, Mining::hard);
        loss.normalize = kind == 1;
        if (kind == 2 && r == 2) {
          Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> y = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>::Zero(4);
          Matrix<double> g = Matrix<double>::Constant(4, 5, 42.0);
          try {
            loss.forward_backward(ml::scalar.sharded(me), host_x, y, g);
          } catch (...) {
            written[static_cast<std::size_t>(r)] = (g.array() != 42.0).any();
            throw;
          }
          return;
        }
        const DeviceStrided<double> x(host_x, 0, 0.0);
        DeviceStrided<double> g(Matrix<double>::Constant(4, 5, 42.0), 0, 0.0);
        const DeviceVectorOf<std::int64_t> y(Labels(kind == 0 && r == 1 ? 3 : 4, 0));
        try {
          loss.forward_backward(ml::cuda.sharded(me), x.cmap(), y.map(), g.map());
        } catch (...) {
          written[static_cast<std::size_t>(r)] = (g.dense().array() != 42.0).any();
          throw;
        }
      } catch (const ml::invalid_argument& e) {
        messages[static_cast<std::size_t>(r)] = e.what();
      } catch (const std::exception& e) {
        messages[static_cast<std::size_t>(r)] = std::string("wrong exception: ") + e.what();
      }
    });
  for (auto& t : threads) t.join();
  const std::string expected = kind == 0   ? "rank 1 of 3: argument 'labels'"
                               : kind == 1 ? "rank 1 of 3: argument 'x' has row 2 of norm 0"
                                           : "every rank needs the same loss options and path";
  for (int r = 0; r < ranks; ++r) {
    CAPTURE(r, messages[static_cast<std::size_t>(r)]);
    CHECK(messages[static_cast<std::size_t>(r)].find(expected) != std::string::npos);
    CHECK(messages[static_cast<std::size_t>(r)] == messages[0]);
    CHECK_FALSE(written[static_cast<std::size_t>(r)]);
  }
  if (kind == 2) CHECK(messages[0].find("on metricloss::cuda") != std::string::npos);
}
