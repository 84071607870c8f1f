// Reference sets on CUDA (issues 15, 17): BatchTripletLoss (every mining, both distances, hinge
// and soft margin), LiftedStructureLoss, BatchContrastiveLoss and MultiSimilarityLoss (at the
// end: against the scalar path and, for multi-similarity, its brute force; integer data, the
// reduction, errors) of queries Q against candidates R, on the device:
// the brute force of reference_sets_reference.hpp (N_q != N_r both ways, D = 1, a query in R,
// queries with no positive, a large common offset, strided maps), the scalar path on the
// same data (double: 1e-12), tie-heavy integer data, the reduction to the CUDA batch loss
// (R = Q, self = identity), a permutation of R, grad_r skipped, the deferred loss and the
// core in caller-owned workspace, NaN propagation, and bad input (a self row with another
// label is found on the device: thrown with nothing written, or NaN at loss_to).
#include "device.cuh"

#include "../batch_triplet_reference.hpp"
#include "../multi_similarity_reference.hpp"
#include "../reference_sets_reference.hpp"

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

using namespace mltest;
using ml::Distance;
using ml::Mining;

namespace {

using Option = CrossOption;

/// Tie-heavy integer sets: entries in [-2, 2] (every distance and product exact in float and
/// double, many exact ties, hinges exactly at 0), rows 5 and 9 of R equal, 3 classes in runs.
struct IntegerSets {
  Matrix<double> q, r;
  CrossLabels yq, yr;
  IntegerSets(std::mt19937_64& rng, Index nq, Index nr, Index d) : q(nq, d), r(nr, d) {
    std::uniform_int_distribution<int> value(-2, 2);
    for (Index i = 0; i < q.size(); ++i) q.data()[i] = value(rng);
    for (Index i = 0; i < r.size(); ++i) r.data()[i] = value(rng);
    r.row(5) = r.row(9);
    yq = labels_of(tied_labels(nq, 3, rng));
    yr = labels_of(tied_labels(nr, 3, rng));
  }
};

std::vector<std::int64_t> as_vector(const CrossLabels& y) { return {y.data(), y.data() + y.size()}; }

/// Loss and both gradients of one call, back on the host.
template <class T>
struct Result {
  T loss;
  Matrix<T> grad_q, grad_r;
};

/// One call of the option's loss on `tag` (host tags: host matrices; ml::cuda: device
/// copies with `pad` columns of padding, checked to stay untouched).
template <class T, class Tag>
Result<T> call(Tag tag, const Option& o, double margin, const Matrix<T>& q, const CrossLabels& yq,
               const Matrix<T>& r, const CrossLabels& yr, const SelfIndices& self, T top_diff,
               Index pad = 0) {
  const Index nq = q.rows(), nr = r.rows(), d = q.cols();
  ml::LiftedStructureLoss<T> lifted(static_cast<T>(margin));
  ml::BatchTripletLoss<T> triplet(static_cast<T>(margin), o.mining, o.distance, o.soft_margin);
  Result<T> out{T(0), Matrix<T>(nq, d), Matrix<T>(nr, d)};
  if constexpr (std::is_same<Tag, ml::cuda_tag>::value) {
    const T sentinel = T(-777);
    const DeviceStrided<T> dq(q, pad, sentinel), dr(r, pad, sentinel);
    DeviceStrided<T> gq(Matrix<T>::Zero(nq, d), pad, sentinel), gr(Matrix<T>::Zero(nr, d), pad, sentinel);
    const DeviceVectorOf<std::int64_t> dyq(as_vector(yq)), dyr(as_vector(yr));
    const auto ref = ml::reference(dr.cmap(), dyr.map(), self);
    out.loss = o.lifted ? lifted.forward_backward(tag, dq.cmap(), dyq.map(), ref, gq.map(), gr.map(), top_diff)
                        : triplet.forward_backward(tag, dq.cmap(), dyq.map(), ref, gq.map(), gr.map(), top_diff);
    CHECK(gq.host().padding_is(sentinel));
    CHECK(gr.host().padding_is(sentinel));
    out.grad_q = gq.dense();
    out.grad_r = gr.dense();
  } else {
    const auto ref = ml::reference(r, yr, self);
    out.loss = o.lifted ? lifted.forward_backward(tag, q, yq, ref, out.grad_q, out.grad_r, top_diff)
                        : triplet.forward_backward(tag, q, yq, ref, out.grad_q, out.grad_r, top_diff);
  }
  return out;
}

/// Loss and both gradients against expected ones, gradients relative to the largest entry.
template <class T>
void check_close(const Result<T>& got, double loss, const Matrix<double>& gq, const Matrix<double>& gr,
                 double loss_tol, double grad_tol) {
  CAPTURE(loss, static_cast<double>(got.loss));
  CHECK(relatively_close(static_cast<double>(got.loss), loss, loss_tol, 1e-300));
  const double scale = std::max(largest_entry(gq, gr), 1e-300);
  const Matrix<double> eq = got.grad_q.template cast<double>() - gq;
  const Matrix<double> er = got.grad_r.template cast<double>() - gr;
  CAPTURE(scale, largest_entry(eq, Matrix<double>()), largest_entry(er, Matrix<double>()));
  CHECK(largest_entry(eq, er) <= grad_tol * scale);
}

}  // namespace

TEMPLATE_TEST_CASE("cuda reference sets match the brute force and the scalar path",
                   "[cuda][reference]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  struct Shape {
    Index nq, nr, d;
    double offset;
    Index pad;
  };
  // R larger and smaller than Q, D = 1, a large common offset, sizes past one 32-tile and
  // one 256-thread block, D past one 32-column chunk.
  const Shape shapes[] = {{9, 40, 5, 0.0, 0}, {33, 6, 3, 0.0, 3}, {17, 17, 1, 0.0, 0},
                          {12, 25, 8, 100.0, 1}, {70, 300, 45, 0.0, 2}};
  std::uint64_t seed = 21503;
  for (const Shape& s : shapes) {
    for (const Option& o : every_cross_option()) {
      CAPTURE(s.nq, s.nr, s.d, s.offset, s.pad, o.name(), seed);
      std::mt19937_64 rng(seed++);
      const double lo = s.offset - (s.offset > 0 ? 0.05 : 1.0), hi = s.offset + (s.offset > 0 ? 0.05 : 1.0);
      // Labels 0..3 in R, 0..4 in Q: queries of class 4 have no positive in R.
      const CrossLabels yq = labels_of(random_labels(s.nq, 5, rng));
      CrossLabels yr = labels_of(random_labels(s.nr, 4, rng));
      const double margin = o.lifted ? 1.0 : 0.05 * static_cast<double>(s.d);
      Matrix<T> q, r;
      SelfIndices self = no_self(s.nq);
      for (int attempt = 0; attempt < 40; ++attempt) {  // float: decisions 1e-4 from a tie
        q = uniform_matrix<T>(s.nq, s.d, rng, lo, hi);
        r = uniform_matrix<T>(s.nr, s.d, rng, lo, hi);
        if (s.nr > 4) {  // a query that is a row of R
          r.row(2) = q.row(1);
          yr(2) = yq(1);
          self(1) = 2;
        }
        const CrossReference b = cross_brute_force(o, margin, q.template cast<double>(), yq,
                                                r.template cast<double>(), yr, self, 0.75);
        if (std::is_same<T, double>::value || o.lifted || b.gap > 1e-4 * (s.offset > 0 ? 0.01 : 1.0)) break;
      }
      const T top_diff = T(0.75);
      const Result<T> device = call(ml::cuda, o, margin, q, yq, r, yr, self, top_diff, s.pad);
      const CrossReference b = cross_brute_force(o, margin, q.template cast<double>(), yq,
                                              r.template cast<double>(), yr, self, 0.75);
      check_close(device, b.loss, b.grad_q, b.grad_r, Tolerance<T>::loss, Tolerance<T>::gradient);
      // The scalar path on the same data: the same formulas, exact distances on both.
      const Result<T> host = call(ml::scalar, o, margin, q, yq, r, yr, self, top_diff);
      const double same = std::is_same<T, double>::value ? 1e-12 : Tolerance<T>::gradient;
      check_close(device, static_cast<double>(host.loss), host.grad_q.template cast<double>(),
                  host.grad_r.template cast<double>(), std::is_same<T, double>::value ? 1e-12 : Tolerance<T>::loss, same);
    }
  }
}

TEST_CASE("cuda reference sets follow the tie rules on integer data", "[cuda][reference][ties]") {
  if (skip_without_device()) return;
  // Small integers: every distance exact in float and double, many exact ties between
  // candidates (duplicate rows, equal distances), decided by the lowest row of R.
  for (const std::uint64_t seed : {31501u, 31502u, 31503u}) {
    std::mt19937_64 rng(seed);
    const Index nq = 23, nr = 57, d = 3;
    const IntegerSets sets(rng, nq, nr, d);
    const Matrix<double>&q = sets.q, &r = sets.r;
    const CrossLabels &yq = sets.yq, &yr = sets.yr;
    for (const Option& o : every_cross_option()) {
      CAPTURE(seed, o.name());
      const double margin = 1.0;
      const CrossReference b = cross_brute_force(o, margin, q, yq, r, yr, no_self(nq), 0.5);
      const Result<double> dd = call(ml::cuda, o, margin, q, yq, r, yr, no_self(nq), 0.5);
      check_close(dd, b.loss, b.grad_q, b.grad_r, 1e-12, 1e-12);
      const Matrix<float> qf = q.cast<float>(), rf = r.cast<float>();
      const Result<float> df = call(ml::cuda, o, margin, qf, yq, rf, yr, no_self(nq), 0.5f);
      check_close(df, b.loss, b.grad_q, b.grad_r, Tolerance<float>::loss, Tolerance<float>::gradient);
    }
  }
}

TEMPLATE_TEST_CASE("cuda reference sets with R = Q and self = identity reduce to the batch loss",
                   "[cuda][reference]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  std::mt19937_64 rng(21504);
  const Index n = 37, d = 6;
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  const CrossLabels y = labels_of(random_labels(n, 5, rng));
  SelfIndices self(n);
  std::iota(self.data(), self.data() + n, std::int64_t(0));
  const double tol = std::is_same<T, double>::value ? 1e-12 : Tolerance<T>::gradient;
  for (const Option& o : every_cross_option()) {
    CAPTURE(o.name());
    const double margin = o.lifted ? 1.0 : 0.3;
    const Result<T> cross = call(ml::cuda, o, margin, x, y, x, y, self, T(1));
    const DeviceStrided<T> dx(x, 0, T(0));
    DeviceStrided<T> dg(Matrix<T>::Zero(n, d), 0, T(0));
    const DeviceVectorOf<std::int64_t> dy(as_vector(y));
    const T batch = o.lifted
        ? ml::LiftedStructureLoss<T>(static_cast<T>(margin)).forward_backward(ml::cuda, dx.cmap(), dy.map(), dg.map())
        : ml::BatchTripletLoss<T>(static_cast<T>(margin), o.mining, o.distance, o.soft_margin)
              .forward_backward(ml::cuda, dx.cmap(), dy.map(), dg.map());
    const Matrix<T> sum = cross.grad_q + cross.grad_r;
    Result<T> combined{cross.loss, sum, Matrix<T>(0, d)};
    check_close(combined, static_cast<double>(batch), dg.dense().template cast<double>(), Matrix<double>(0, d),
                std::is_same<T, double>::value ? 1e-12 : Tolerance<T>::loss, tol);
  }
}

TEST_CASE("cuda reference sets: permuting R and self_index permutes grad_r only", "[cuda][reference]") {
  if (skip_without_device()) return;
  std::mt19937_64 rng(21505);
  const Index nq = 11, nr = 29, d = 4;
  const Matrix<double> q = uniform_matrix<double>(nq, d, rng), r = uniform_matrix<double>(nr, d, rng);
  const CrossLabels yq = labels_of(random_labels(nq, 4, rng)), yr = labels_of(random_labels(nr, 4, rng));
  SelfIndices self = no_self(nq);
  std::vector<Index> perm(static_cast<std::size_t>(nr));
  std::iota(perm.begin(), perm.end(), Index(0));
  std::shuffle(perm.begin(), perm.end(), rng);
  Matrix<double> rp(nr, d);
  CrossLabels yrp(nr);
  for (Index i = 0; i < nr; ++i) {
    rp.row(i) = r.row(perm[static_cast<std::size_t>(i)]);
    yrp(i) = yr(perm[static_cast<std::size_t>(i)]);
  }
  for (const Option& o : every_cross_option()) {
    CAPTURE(o.name());
    const Result<double> a = call(ml::cuda, o, 0.4, q, yq, r, yr, self, 1.0);
    const Result<double> b = call(ml::cuda, o, 0.4, q, yq, rp, yrp, self, 1.0);
    CHECK(relatively_close(b.loss, a.loss, 1e-12, 1e-300));
    const double scale = std::max(largest_entry(a.grad_q, a.grad_r), 1e-300);
    CHECK((b.grad_q - a.grad_q).cwiseAbs().maxCoeff() <= 1e-12 * scale);
    double worst = 0.0;
    for (Index i = 0; i < nr; ++i)
      worst = std::max(worst, (b.grad_r.row(i) - a.grad_r.row(perm[static_cast<std::size_t>(i)])).cwiseAbs().maxCoeff());
    CHECK(worst <= 1e-12 * scale);
  }
}

TEST_CASE("cuda reference sets: forward, grad_r skipped, the deferred loss, the core", "[cuda][reference]") {
  if (skip_without_device()) return;
  std::mt19937_64 rng(21506);
  const Index nq = 10, nr = 40, d = 7;
  const Matrix<float> q = uniform_matrix<float>(nq, d, rng), r = uniform_matrix<float>(nr, d, rng);
  const CrossLabels yq = labels_of(random_labels(nq, 3, rng)), yr = labels_of(random_labels(nr, 3, rng));
  const DeviceStrided<float> dq(q, 0, 0.0f), dr(r, 0, 0.0f);
  DeviceStrided<float> gq(Matrix<float>::Zero(nq, d), 0, 0.0f), gq2(Matrix<float>::Zero(nq, d), 0, 0.0f),
      gr(Matrix<float>::Zero(nr, d), 0, 0.0f), gr2(Matrix<float>::Zero(nr, d), 0, 0.0f);
  const DeviceVectorOf<std::int64_t> dyq(as_vector(yq)), dyr(as_vector(yr));
  const auto ref = ml::reference(dr.cmap(), dyr.map());
  ml::BatchTripletLoss<float> batch(0.3f, Mining::semihard);
  ml::LiftedStructureLoss<float> lifted;
  const float l1 = batch.forward_backward(ml::cuda, dq.cmap(), dyq.map(), ref, gq.map(), gr.map());
  CHECK(batch.forward(ml::cuda, dq.cmap(), dyq.map(), ref) == l1);
  CHECK(batch.forward_backward(ml::cuda, dq.cmap(), dyq.map(), ref, gq2.map(), ml::skip) == l1);
  CHECK(gq2.dense() == gq.dense());
  const float l2 = lifted.forward_backward(ml::cuda, dq.cmap(), dyq.map(), ref, gq.map(), gr.map());
  CHECK(lifted.forward(ml::cuda, dq.cmap(), dyq.map(), ref) == l2);
  CHECK(lifted.forward_backward(ml::cuda, dq.cmap(), dyq.map(), ref, ml::skip, gr2.map()) == l2);
  CHECK(gr2.dense() == gr.dense());
  // The deferred loss on another stream: the same bits, nothing synchronised by the call.
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceBuffer<float> device_loss(1);
  DeviceStrided<float> gq3(Matrix<float>::Zero(nq, d), 0, 0.0f), gr3(Matrix<float>::Zero(nr, d), 0, 0.0f);
  CHECK(std::isnan(lifted.forward_backward(ml::cuda.on(stream).loss_to(device_loss.data()), dq.cmap(),
                                           dyq.map(), ref, gq3.map(), gr3.map())));
  check_cuda(cudaStreamSynchronize(stream));
  const float deferred = device_loss.download()[0];
  CHECK(std::memcmp(&deferred, &l2, sizeof deferred) == 0);
  CHECK(gr3.dense() == gr.dense());
  // The core in caller-owned workspace.
  const std::size_t bytes = ml::cuda_core::reference_workspace_bytes(nq, nr);
  DeviceBuffer<char> workspace(bytes);
  DeviceStrided<float> gq4(Matrix<float>::Zero(nq, d), 0, 0.0f);
  CHECK(ml::cuda_core::batch_triplet_reference_forward_backward<float, std::int64_t, std::int64_t>(
            workspace.data(), bytes, {dq.buffer.data(), nq, d, d}, {dyq.buffer.data(), nq, 1},
            {dr.buffer.data(), nr, d, d}, {dyr.buffer.data(), nr, 1}, nullptr, 0.3f, Mining::semihard,
            Distance::euclidean, false, {gq4.buffer.data(), nq, d, d}, {}, 1.0f, device_loss.data(),
            nullptr, stream) == cudaSuccess);
  check_cuda(cudaStreamSynchronize(stream));
  const float core = device_loss.download()[0];
  CHECK(std::memcmp(&core, &l1, sizeof core) == 0);
  CHECK(gq4.dense() == gq.dense());
  CHECK(ml::cuda_core::batch_triplet_reference_forward_backward<float, std::int64_t, std::int64_t>(
            workspace.data(), bytes - 1, {dq.buffer.data(), nq, d, d}, {dyq.buffer.data(), nq, 1},
            {dr.buffer.data(), nr, d, d}, {dyr.buffer.data(), nr, 1}, nullptr, 0.3f, Mining::semihard,
            Distance::euclidean, false, {}, {}, 1.0f, device_loss.data(), nullptr, stream) == cudaErrorInvalidValue);
  check_cuda(cudaStreamDestroy(stream));
}

TEST_CASE("cuda reference sets: bad input throws and writes nothing", "[cuda][reference][errors]") {
  if (skip_without_device()) return;
  std::mt19937_64 rng(21507);
  const Index nq = 4, nr = 6, d = 3;
  const Matrix<double> q = uniform_matrix<double>(nq, d, rng), r = uniform_matrix<double>(nr, d, rng);
  CrossLabels yq(nq), yr(nr);
  yq << 0, 1, 0, 1;
  yr << 0, 1, 0, 1, 2, 2;
  const DeviceStrided<double> dq(q, 0, 0.0), dr(r, 0, 0.0);
  DeviceStrided<double> gq(Matrix<double>::Constant(nq, d, 5.0), 0, 0.0), gr(Matrix<double>::Constant(nr, d, 5.0), 0, 0.0);
  const DeviceVectorOf<std::int64_t> dyq(as_vector(yq)), dyr(as_vector(yr));
  ml::BatchTripletLoss<double> loss;
  ml::LiftedStructureLoss<double> lifted;
  const auto untouched = [&] {
    CHECK((gq.dense().array() == 5.0).all());
    CHECK((gr.dense().array() == 5.0).all());
  };
  SelfIndices self = no_self(nq);
  self(2) = 1;  // labels_r[1] = 1, labels_q[2] = 0: found on the device
  for (int which = 0; which < 2; ++which) {
    const auto run = [&] {
      const auto ref = ml::reference(dr.cmap(), dyr.map(), self);
      if (which == 0) loss.forward_backward(ml::cuda, dq.cmap(), dyq.map(), ref, gq.map(), gr.map());
      else lifted.forward_backward(ml::cuda, dq.cmap(), dyq.map(), ref, gq.map(), gr.map());
    };
    expect_invalid_message(run, {"labels_r[1] differs from labels_q[2]",
                                  which == 0 ? "BatchTripletLoss<double>" : "LiftedStructureLoss<double>"});
    untouched();
  }
  // loss_to: NaN in device memory, the gradients untouched.
  DeviceBuffer<double> device_loss(1);
  CHECK(std::isnan(loss.forward_backward(ml::cuda.loss_to(device_loss.data()), dq.cmap(), dyq.map(),
                                         ml::reference(dr.cmap(), dyr.map(), self), gq.map(), gr.map())));
  check_cuda(cudaDeviceSynchronize());
  CHECK(std::isnan(device_loss.download()[0]));
  untouched();
  // Found on the host: a self entry out of range, R of the wrong width, grad_r's shape.
  self(2) = nr;
  expect_invalid_message([&] { loss.forward_backward(ml::cuda, dq.cmap(), dyq.map(), ml::reference(dr.cmap(), dyr.map(), self),
                                                      gq.map(), gr.map()); },
                          {"self_index[2] = 6"});
  const DeviceStrided<double> wide(uniform_matrix<double>(nr, d + 1, rng), 0, 0.0);
  expect_invalid_message([&] { loss.forward_backward(ml::cuda, dq.cmap(), dyq.map(), ml::reference(wide.cmap(), dyr.map()),
                                                      gq.map(), gr.map()); },
                          {"expected 3 columns"});
  DeviceStrided<double> wrong(Matrix<double>::Zero(nr + 1, d), 0, 0.0);
  expect_invalid_message([&] { lifted.forward_backward(ml::cuda, dq.cmap(), dyq.map(), ml::reference(dr.cmap(), dyr.map()),
                                                        gq.map(), wrong.map()); },
                          {"'grad_r' has shape 7x3"});
  untouched();
}

TEST_CASE("cuda reference sets: NaN labels and non-finite data give NaN", "[cuda][reference]") {
  if (skip_without_device()) return;
  std::mt19937_64 rng(21508);
  Matrix<double> q = uniform_matrix<double>(4, 2, rng), r = uniform_matrix<double>(5, 2, rng);
  CrossLabels yq(4), yr(5);
  yq << 0, 1, 0, 1;
  yr << 0, 1, 0, 1, 0;
  const Option hard{false, Mining::hard, Distance::euclidean, false};
  const Option lifted{true, Mining::all, Distance::euclidean, false};
  r(3, 1) = std::numeric_limits<double>::infinity();
  for (const Option& o : {hard, lifted}) {
    const Result<double> out = call(ml::cuda, o, 0.5, q, yq, r, yr, no_self(4), 1.0);
    CHECK(std::isnan(out.loss));
    CHECK(out.grad_q.array().isNaN().all());
    CHECK(out.grad_r.array().isNaN().all());
  }
  // A NaN label (float labels on the device).
  r(3, 1) = 0.0;
  const DeviceStrided<double> dq(q, 0, 0.0), dr(r, 0, 0.0);
  DeviceStrided<double> gq(Matrix<double>::Zero(4, 2), 0, 0.0), gr(Matrix<double>::Zero(5, 2), 0, 0.0);
  const DeviceVectorOf<float> dyq(std::vector<float>{0.0f, 1.0f, std::numeric_limits<float>::quiet_NaN(), 1.0f});
  const DeviceVectorOf<float> dyr(std::vector<float>{0.0f, 1.0f, 0.0f, 1.0f, 0.0f});
  CHECK(std::isnan(ml::LiftedStructureLoss<double>().forward_backward(
      ml::cuda, dq.cmap(), dyq.map(), ml::reference(dr.cmap(), dyr.map()), gq.map(), gr.map())));
  CHECK(gr.dense().array().isNaN().all());
}

TEST_CASE("cuda cross-batch memory: a FIFO ring on the device, as the host's", "[cuda][reference][memory]") {
  if (skip_without_device()) return;
  const std::uint64_t seed = 21509;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index capacity = 10, d = 3;
  for (const Index b : {Index(3), Index(4), Index(7), Index(13)}) {  // none divides 10; 13 > 10
    CAPTURE(b);
    ml::CrossBatchMemory<double> host(capacity, d);
    ml::DeviceCrossBatchMemory<double> device(capacity, d);
    CHECK(device.size() == 0);
    for (int k = 1; k <= 9; ++k) {
      CAPTURE(k);
      const Matrix<double> x = uniform_matrix<double>(b, d, rng);
      std::vector<float> y(static_cast<std::size_t>(b));  // float labels, stored as int64; label 0 too
      for (Index i = 0; i < b; ++i) y[static_cast<std::size_t>(i)] = static_cast<float>((k * 7 + i) % 3);
      const DeviceStrided<double> dx(x, 2, -1.0);
      const DeviceVectorOf<float> dy(y);
      const auto device_slots = device.enqueue(ml::cuda, dx.cmap(), dy.map());
      const auto host_slots = host.enqueue(x, Eigen::Map<const Eigen::VectorXf>(y.data(), b));
      REQUIRE(device.size() == std::min<Index>(k * b, capacity));
      REQUIRE(device.size() == host.size());
      REQUIRE(device_slots.size() == b);
      for (Index i = 0; i < b; ++i) CHECK(device_slots[i] == host_slots[i]);
      // The valid rows and labels, slot by slot, are the host memory's (itself checked
      // against the last rows enqueued in reference_sets.cpp).
      std::vector<double> rows(static_cast<std::size_t>(capacity * d));
      std::vector<std::int64_t> labels(static_cast<std::size_t>(capacity));
      check_cuda(cudaMemcpy(rows.data(), device.rows(), sizeof(double) * rows.size(), cudaMemcpyDeviceToHost));
      check_cuda(cudaMemcpy(labels.data(), device.labels(), sizeof(std::int64_t) * labels.size(), cudaMemcpyDeviceToHost));
      for (Index s = 0; s < device.size(); ++s) {
        CAPTURE(s);
        for (Index c = 0; c < d; ++c) CHECK(rows[static_cast<std::size_t>(s * d + c)] == host.rows()(s, c));
        CHECK(labels[static_cast<std::size_t>(s)] == host.labels()(s));
      }
    }
  }
  CHECK_THROWS_AS(ml::DeviceCrossBatchMemory<float>(0, 4), ml::invalid_argument);
  ml::DeviceCrossBatchMemory<float> memory(5, 3);
  const DeviceStrided<float> wide(Matrix<float>::Zero(2, 4), 0, 0.0f);
  const DeviceVectorOf<std::int64_t> two(std::vector<std::int64_t>{0, 1});
  expect_invalid_message([&] { memory.enqueue(ml::cuda, wide.cmap(), two.map()); },
                          {"DeviceCrossBatchMemory<float>::enqueue: argument 'x' has shape 2x4, expected 3 columns"});
  CHECK(memory.size() == 0);
}

TEST_CASE("cuda cross-batch memory: the loss against the memory equals the loss against its rows",
          "[cuda][reference][memory]") {
  if (skip_without_device()) return;
  const std::uint64_t seed = 21510;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index capacity = 23, d = 6, b = 8;
  ml::CrossBatchMemory<float> host(capacity, d);
  ml::DeviceCrossBatchMemory<float> device(capacity, d);
  for (int k = 0; k < 5; ++k) {
    CAPTURE(k);
    const Matrix<float> x = uniform_matrix<float>(b, d, rng);
    const CrossLabels y = labels_of(random_labels(b, 3, rng));
    const DeviceStrided<float> dx(x, 0, 0.0f);
    const DeviceVectorOf<std::int64_t> dy(as_vector(y));
    const auto slots = device.enqueue(ml::cuda, dx.cmap(), dy.map());
    const auto host_slots = host.enqueue(x, y);
    for (const Option& o : every_cross_option()) {
      CAPTURE(o.name());
      DeviceStrided<float> gq(Matrix<float>::Zero(b, d), 0, 0.0f);
      Matrix<float> gq_host(b, d);
      float l, lh;
      if (o.lifted) {
        ml::LiftedStructureLoss<float> loss(1.0f);
        l = loss.forward_backward(ml::cuda, dx.cmap(), dy.map(), device.reference(slots), gq.map(), ml::skip);
        lh = loss.forward_backward(ml::scalar, x, y, host.reference(host_slots), gq_host, ml::skip);
      } else {
        ml::BatchTripletLoss<float> loss(0.3f, o.mining, o.distance, o.soft_margin);
        l = loss.forward_backward(ml::cuda, dx.cmap(), dy.map(), device.reference(slots), gq.map(), ml::skip);
        lh = loss.forward_backward(ml::scalar, x, y, host.reference(host_slots), gq_host, ml::skip);
      }
      CHECK(relatively_close(l, lh, Tolerance<float>::loss, 1e-30));
      CHECK((gq.dense() - gq_host).cwiseAbs().maxCoeff() <=
            Tolerance<float>::gradient * std::max(gq_host.cwiseAbs().maxCoeff(), 1e-30f));
    }
  }
}

namespace {

/// An all-pairs loss (BatchContrastiveLoss, MultiSimilarityLoss) against a reference set on
/// `tag` (ml::cuda: device copies with `pad` columns of padding, checked untouched).
template <class T, class Tag, class Loss>
Result<T> all_pairs_call(Tag tag, Loss loss, const Matrix<T>& q, const CrossLabels& yq,
                         const Matrix<T>& r, const CrossLabels& yr, const SelfIndices& self, T top_diff,
                         Index pad = 0) {
  const Index nq = q.rows(), nr = r.rows(), d = q.cols();
  Result<T> out{T(0), Matrix<T>(nq, d), Matrix<T>(nr, d)};
  if constexpr (std::is_same<Tag, ml::cuda_tag>::value) {
    const T sentinel = T(-777);
    const DeviceStrided<T> dq(q, pad, sentinel), dr(r, pad, sentinel);
    DeviceStrided<T> gq(Matrix<T>::Zero(nq, d), pad, sentinel), gr(Matrix<T>::Zero(nr, d), pad, sentinel);
    const DeviceVectorOf<std::int64_t> dyq(as_vector(yq)), dyr(as_vector(yr));
    out.loss = loss.forward_backward(tag, dq.cmap(), dyq.map(), ml::reference(dr.cmap(), dyr.map(), self), gq.map(),
                                     gr.map(), top_diff);
    CHECK(gq.host().padding_is(sentinel));
    CHECK(gr.host().padding_is(sentinel));
    out.grad_q = gq.dense();
    out.grad_r = gr.dense();
  } else {
    out.loss = loss.forward_backward(tag, q, yq, ml::reference(r, yr, self), out.grad_q, out.grad_r, top_diff);
  }
  return out;
}

template <class T>
std::vector<ml::BatchContrastiveLoss<T>> every_contrastive(Index d) {
  std::vector<ml::BatchContrastiveLoss<T>> out;
  const T scale = static_cast<T>(std::sqrt(static_cast<double>(d)) * 0.4);
  for (Distance distance : {Distance::euclidean, Distance::squared_euclidean})
    for (ml::Reduction reduction : {ml::Reduction::nonzero_mean, ml::Reduction::mean}) {
      ml::BatchContrastiveLoss<T> loss(T(0.2) * scale, T(1.1) * scale, distance);
      loss.reduction = reduction;
      out.push_back(loss);
    }
  return out;
}

/// R = Q and self = identity: the reference call is the CUDA batch loss, and grad_q + grad_r
/// its gradient (double, 1e-12).
template <class Loss>
void check_reduces_to_batch(Loss loss, const Matrix<double>& x, const CrossLabels& y) {
  const Index n = x.rows(), d = x.cols();
  SelfIndices self(n);
  std::iota(self.data(), self.data() + n, std::int64_t(0));
  const Result<double> cross = all_pairs_call(ml::cuda, loss, x, y, x, y, self, 1.0);
  const DeviceStrided<double> dx(x, 0, 0.0);
  DeviceStrided<double> dg(Matrix<double>::Zero(n, d), 0, 0.0);
  const DeviceVectorOf<std::int64_t> dy(as_vector(y));
  const double batch = loss.forward_backward(ml::cuda, dx.cmap(), dy.map(), dg.map());
  const Matrix<double> sum = cross.grad_q + cross.grad_r;
  check_close(Result<double>{cross.loss, sum, Matrix<double>(0, d)}, batch, dg.dense(), Matrix<double>(0, d), 1e-12,
              1e-12);
}

/// A self row with another label (query 4 against R's first row of another class): thrown
/// after the synchronisation, naming `name`, with grad_q untouched.
template <class Loss>
void check_self_label_error(Loss loss, const char* name, const Matrix<double>& q, const CrossLabels& yq,
                            const Matrix<double>& r, const CrossLabels& yr) {
  const DeviceStrided<double> dq(q, 0, 0.0), dr(r, 0, 0.0);
  DeviceStrided<double> gq(Matrix<double>::Constant(q.rows(), q.cols(), 5.0), 0, 0.0);
  const DeviceVectorOf<std::int64_t> dyq(as_vector(yq)), dyr(as_vector(yr));
  SelfIndices bad = no_self(q.rows());
  Index row = 0;
  while (yr(row) == yq(4)) ++row;
  bad(4) = row;
  expect_invalid_message([&] {
    loss.forward_backward(ml::cuda, dq.cmap(), dyq.map(), ml::reference(dr.cmap(), dyr.map(), bad), gq.map(), ml::skip);
  }, {name, "differs from labels_q[4]"});
  CHECK((gq.dense().array() == 5.0).all());
}

}  // namespace

TEMPLATE_TEST_CASE("cuda batch contrastive with a reference set matches the scalar path",
                   "[cuda][reference][batch_contrastive]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  struct Shape {
    Index nq, nr, d, pad;
  };
  const Shape shapes[] = {{9, 40, 5, 0}, {33, 6, 3, 2}, {17, 17, 1, 0}, {70, 300, 45, 1}};
  std::uint64_t seed = 21511;
  for (const Shape& s : shapes) {
    for (const auto& loss : every_contrastive<T>(s.d)) {
      CAPTURE(s.nq, s.nr, s.d, s.pad, static_cast<int>(loss.distance), static_cast<int>(loss.reduction), seed);
      std::mt19937_64 rng(seed++);
      const CrossLabels yq = labels_of(random_labels(s.nq, 5, rng));
      CrossLabels yr = labels_of(random_labels(s.nr, 4, rng));
      const Matrix<T> q = uniform_matrix<T>(s.nq, s.d, rng);
      Matrix<T> r = uniform_matrix<T>(s.nr, s.d, rng);
      SelfIndices self = no_self(s.nq);
      if (s.nr > 4) {
        r.row(2) = q.row(1);
        yr(2) = yq(1);
        self(1) = 2;
      }
      const Result<T> device = all_pairs_call(ml::cuda, loss, q, yq, r, yr, self, T(0.75), s.pad);
      // The scalar path in double on the same (rounded) data.
      ml::BatchContrastiveLoss<double> exact(loss.pos_margin, loss.neg_margin, loss.distance);
      exact.reduction = loss.reduction;
      const Result<double> h = all_pairs_call(ml::scalar, exact, q.template cast<double>().eval(), yq,
                                                r.template cast<double>().eval(), yr, self, 0.75);
      const bool is_double = std::is_same<T, double>::value;
      check_close(device, h.loss, h.grad_q, h.grad_r, is_double ? 1e-12 : Tolerance<T>::loss,
                  is_double ? 1e-12 : Tolerance<T>::gradient);
    }
  }
}

TEST_CASE("cuda batch contrastive with a reference set: integer data, the reduction, errors",
          "[cuda][reference][batch_contrastive]") {
  if (skip_without_device()) return;
  std::mt19937_64 rng(21512);
  // Integer data: hinges exactly at 0 (inactive) decided the same way on both paths.
  const Index nq = 23, nr = 57, d = 3;
  const IntegerSets sets(rng, nq, nr, d);
  const Matrix<double>&q = sets.q, &r = sets.r;
  const CrossLabels &yq = sets.yq, &yr = sets.yr;
  for (Distance distance : {Distance::euclidean, Distance::squared_euclidean}) {
    CAPTURE(static_cast<int>(distance));
    ml::BatchContrastiveLoss<double> loss(1.0, 2.0, distance);
    const Result<double> h = all_pairs_call(ml::scalar, loss, q, yq, r, yr, no_self(nq), 1.0);
    const Result<double> dd = all_pairs_call(ml::cuda, loss, q, yq, r, yr, no_self(nq), 1.0);
    check_close(dd, h.loss, h.grad_q, h.grad_r, 1e-12, 1e-12);
  }
  const Matrix<double> x = uniform_matrix<double>(31, 5, rng);
  const CrossLabels y = labels_of(random_labels(31, 4, rng));
  check_reduces_to_batch(ml::BatchContrastiveLoss<double>(0.1, 1.2), x, y);
  check_self_label_error(ml::BatchContrastiveLoss<double>(0.1, 1.2), "BatchContrastiveLoss<double>", q, yq, r, yr);
}

TEMPLATE_TEST_CASE("cuda multi-similarity with a reference set matches the brute force and the scalar path",
                   "[cuda][reference][multi_similarity]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  struct Shape {
    Index nq, nr, d, pad;
  };
  // R larger and smaller than Q, D = 1, past one 32-tile, one 256-thread block and one
  // 32-column chunk.
  const Shape shapes[] = {{9, 40, 5, 0}, {33, 6, 3, 2}, {17, 17, 1, 0}, {70, 300, 45, 1}};
  std::uint64_t seed = 21513;
  for (const Shape& s : shapes) {
    for (const ms_reference::Options& o : ms_reference::every_option()) {
      CAPTURE(s.nq, s.nr, s.d, s.pad, o.name(), seed);
      std::mt19937_64 rng(seed++);
      // Labels 0..3 in R, 0..4 in Q: queries of class 4 have no positive in R.
      const CrossLabels yq = labels_of(random_labels(s.nq, 5, rng));
      CrossLabels yr = labels_of(random_labels(s.nr, 4, rng));
      // Rows of norm about 1, as the loss is used (beta = 50 still reaches e^25).
      const double spread = 1.7 / std::sqrt(static_cast<double>(s.d));
      const Matrix<T> q = uniform_matrix<T>(s.nq, s.d, rng, -spread, spread);
      Matrix<T> r = uniform_matrix<T>(s.nr, s.d, rng, -spread, spread);
      SelfIndices self = no_self(s.nq);
      if (s.nr > 4) {  // a query that is a row of R
        r.row(2) = q.row(1);
        yr(2) = yq(1);
        self(1) = 2;
      }
      const Result<T> device = all_pairs_call(ml::cuda, o.template loss<T>(), q, yq, r, yr, self, T(0.75), s.pad);
      // The brute force on the same (rounded) data: S is exact on both (double sums of
      // products that are exact for float), so the kept sets agree and only the float
      // output rounding differs.
      const ms_reference::Expected e = ms_reference::brute_force(o, q, yq, r, yr, self);
      const bool is_double = std::is_same<T, double>::value;
      check_close(device, 0.75 * e.loss, 0.75 * e.gq, 0.75 * e.gr, is_double ? 1e-11 : Tolerance<T>::loss,
                  is_double ? 1e-11 : Tolerance<T>::gradient);
      const Result<double> h = all_pairs_call(ml::scalar, o.template loss<double>(), q.template cast<double>().eval(),
                                              yq, r.template cast<double>().eval(), yr, self, 0.75);
      check_close(device, h.loss, h.grad_q, h.grad_r, is_double ? 1e-12 : Tolerance<T>::loss,
                  is_double ? 1e-12 : Tolerance<T>::gradient);
    }
  }
}

TEST_CASE("cuda multi-similarity with a reference set: ties, R = Q, the deferred loss, errors",
          "[cuda][reference][multi_similarity]") {
  if (skip_without_device()) return;
  std::mt19937_64 rng(21514);
  // Integer rows: similarities land exactly on a kept set's limit (epsilon 0 and 1), where
  // the pair is not kept; float and double decide as the scalar path does.
  const Index nq = 23, nr = 57, d = 3;
  const IntegerSets sets(rng, nq, nr, d);
  const Matrix<double>&q = sets.q, &r = sets.r;
  const CrossLabels &yq = sets.yq, &yr = sets.yr;
  for (const double epsilon : {0.0, 1.0, ms_reference::inf}) {
    CAPTURE(epsilon);
    const ms_reference::Options o{0.5, 0.25, 1.0, epsilon};
    const ms_reference::Expected e = ms_reference::brute_force(o, q, yq, r, yr, no_self(nq));
    const Result<double> h = all_pairs_call(ml::scalar, o.loss<double>(), q, yq, r, yr, no_self(nq), 1.0);
    const Result<double> dd = all_pairs_call(ml::cuda, o.loss<double>(), q, yq, r, yr, no_self(nq), 1.0);
    check_close(dd, e.loss, e.gq, e.gr, 1e-12, 1e-12);
    check_close(dd, h.loss, h.grad_q, h.grad_r, 1e-12, 1e-12);
    const Matrix<float> qf = q.cast<float>(), rf = r.cast<float>();
    const Result<float> df = all_pairs_call(ml::cuda, o.loss<float>(), qf, yq, rf, yr, no_self(nq), 1.0f);
    check_close(df, e.loss, e.gq, e.gr, Tolerance<float>::loss, Tolerance<float>::gradient);
  }
  const Matrix<double> x = uniform_matrix<double>(31, 5, rng, -0.6, 0.6);
  const CrossLabels y = labels_of(random_labels(31, 4, rng));
  for (const ms_reference::Options& o : ms_reference::every_option()) {
    CAPTURE(o.name());
    check_reduces_to_batch(o.loss<double>(), x, y);
  }
  // The value, forward, grad_r skipped, and the deferred loss on another stream: the same bits.
  const Matrix<float> qf = uniform_matrix<float>(10, 7, rng, -0.5f, 0.5f), rf = uniform_matrix<float>(40, 7, rng, -0.5f, 0.5f);
  const CrossLabels yq10 = labels_of(random_labels(10, 3, rng)), yr40 = labels_of(random_labels(40, 3, rng));
  const DeviceStrided<float> dq(qf, 0, 0.0f), dr(rf, 0, 0.0f);
  DeviceStrided<float> gq(Matrix<float>::Zero(10, 7), 0, 0.0f), gq2(Matrix<float>::Zero(10, 7), 0, 0.0f),
      gr(Matrix<float>::Zero(40, 7), 0, 0.0f);
  const DeviceVectorOf<std::int64_t> dyq(as_vector(yq10)), dyr(as_vector(yr40));
  const auto ref = ml::reference(dr.cmap(), dyr.map());
  ml::MultiSimilarityLoss<float> loss;
  const float l = loss.forward_backward(ml::cuda, dq.cmap(), dyq.map(), ref, gq.map(), gr.map());
  CHECK(loss.forward(ml::cuda, dq.cmap(), dyq.map(), ref) == l);
  CHECK(loss.forward_backward(ml::cuda, dq.cmap(), dyq.map(), ref, gq2.map(), ml::skip) == l);
  CHECK(gq2.dense() == gq.dense());
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceBuffer<float> device_loss(1);
  DeviceStrided<float> gr3(Matrix<float>::Zero(40, 7), 0, 0.0f);
  CHECK(std::isnan(loss.forward_backward(ml::cuda.on(stream).loss_to(device_loss.data()), dq.cmap(), dyq.map(),
                                         ref, ml::skip, gr3.map())));
  check_cuda(cudaStreamSynchronize(stream));
  const float deferred = device_loss.download()[0];
  CHECK(std::memcmp(&deferred, &l, sizeof deferred) == 0);
  CHECK(gr3.dense() == gr.dense());
  check_cuda(cudaStreamDestroy(stream));
  // Non-finite data: NaN loss and gradients.
  Matrix<double> qn = q;
  qn(3, 1) = std::numeric_limits<double>::quiet_NaN();
  const Result<double> nan_out = all_pairs_call(ml::cuda, ml::MultiSimilarityLoss<double>(), qn, yq, r, yr,
                                                no_self(nq), 1.0);
  CHECK(std::isnan(nan_out.loss));
  CHECK(nan_out.grad_r.array().isNaN().all());
  check_self_label_error(ml::MultiSimilarityLoss<double>(), "MultiSimilarityLoss<double>", q, yq, r, yr);
}

namespace {

/// Every batch loss with normalize = true, as the face sets it.
template <class T>
struct NormalizedLosses {
  ml::BatchTripletLoss<T> hard{T(0.3), Mining::hard}, all{T(0.2), Mining::all, Distance::squared_euclidean};
  ml::BatchTripletLoss<T> semihard{T(0.2), Mining::semihard, Distance::euclidean, true};
  ml::LiftedStructureLoss<T> lifted{T(1)};
  ml::BatchContrastiveLoss<T> contrastive{T(0.1), T(1.2)};
  ml::MultiSimilarityLoss<T> ms{};
  NormalizedLosses() {
    hard.normalize = all.normalize = semihard.normalize = lifted.normalize = contrastive.normalize =
        ms.normalize = true;
  }
  /// f(name, loss) for each.
  template <class F>
  void each(F&& f) {
    f("hard", hard);
    f("all", all);
    f("semihard soft", semihard);
    f("lifted", lifted);
    f("batch contrastive", contrastive);
    f("multi-similarity", ms);
  }
};

}  // namespace

TEMPLATE_TEST_CASE("cuda reference sets with normalize = true match the scalar path",
                   "[cuda][reference][normalize]", float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  struct Shape {
    Index nq, nr, d, pad;
    double offset;
  };
  // Unnormalised rows far from the sphere, a large common offset, D = 1 (every unit row is
  // +-1: ties everywhere), R past one block.
  const Shape shapes[] = {{9, 40, 5, 0, 0.0}, {33, 6, 3, 2, 0.0}, {12, 25, 8, 1, 50.0}, {17, 17, 1, 0, 0.0},
                          {40, 300, 45, 1, 0.0}};
  std::uint64_t seed = 21515;
  for (const Shape& s : shapes) {
    std::mt19937_64 rng(seed);
    CAPTURE(s.nq, s.nr, s.d, s.pad, s.offset, seed);
    ++seed;
    const CrossLabels yq = labels_of(random_labels(s.nq, 5, rng));
    CrossLabels yr = labels_of(random_labels(s.nr, 4, rng));
    const Matrix<T> q = (uniform_matrix<double>(s.nq, s.d, rng, -3.0, 3.0).array() + s.offset).matrix().template cast<T>();
    Matrix<T> r = (uniform_matrix<double>(s.nr, s.d, rng, -3.0, 3.0).array() + s.offset).matrix().template cast<T>();
    SelfIndices self = no_self(s.nq);
    if (s.nr > 4) {  // a query that is a row of R
      r.row(2) = q.row(1);
      yr(2) = yq(1);
      self(1) = 2;
    }
    NormalizedLosses<T> device;
    NormalizedLosses<T> host;
    std::vector<std::pair<std::string, Result<T>>> got;
    device.each([&](const char* name, auto& loss) {
      got.emplace_back(name, all_pairs_call(ml::cuda, loss, q, yq, r, yr, self, T(0.75), s.pad));
    });
    std::size_t k = 0;
    host.each([&](const char* name, auto& loss) {
      CAPTURE(name);
      const Result<T> h = all_pairs_call(ml::scalar, loss, q, yq, r, yr, self, T(0.75));
      const Result<T>& dv = got[k++].second;
      // The unit rows are the host's to within an ulp of T (the norm's order of summation):
      // float decisions may move with them, hence the float bounds of API.md.
      const bool is_double = std::is_same<T, double>::value;
      check_close(dv, static_cast<double>(h.loss), h.grad_q.template cast<double>(), h.grad_r.template cast<double>(),
                  is_double ? 1e-10 : Tolerance<T>::loss, is_double ? 1e-10 : Tolerance<T>::gradient);
    });
  }
}

TEST_CASE("cuda reference sets with normalize = true: zero rows, the self label, loss_to, skipped gradients",
          "[cuda][reference][normalize][errors]") {
  if (skip_without_device()) return;
  std::mt19937_64 rng(21516);
  const Index nq = 6, nr = 9, d = 4;
  Matrix<double> q = uniform_matrix<double>(nq, d, rng), r = uniform_matrix<double>(nr, d, rng);
  CrossLabels yq(nq), yr(nr);
  yq << 0, 1, 0, 1, 2, 2;
  yr << 0, 1, 0, 1, 0, 1, 2, 2, 0;
  NormalizedLosses<double> losses;
  losses.each([&](const char* name, auto& loss) {
    CAPTURE(name);
    const auto run = [&](const Matrix<double>& qm, const Matrix<double>& rm, const SelfIndices& self, auto tag,
                         bool with_grad_r) {
      const DeviceStrided<double> dq(qm, 1, -7.0), dr(rm, 1, -7.0);
      DeviceStrided<double> gq(Matrix<double>::Constant(nq, d, 5.0), 1, -7.0),
          gr(Matrix<double>::Constant(nr, d, 5.0), 1, -7.0);
      const DeviceVectorOf<std::int64_t> dyq(as_vector(yq)), dyr(as_vector(yr));
      const auto ref = ml::reference(dr.cmap(), dyr.map(), self);
      double value = with_grad_r ? loss.forward_backward(tag, dq.cmap(), dyq.map(), ref, gq.map(), gr.map())
                                 : loss.forward_backward(tag, dq.cmap(), dyq.map(), ref, gq.map(), ml::skip);
      check_cuda(cudaDeviceSynchronize());
      CHECK(gq.host().padding_is(-7.0));
      CHECK(gr.host().padding_is(-7.0));
      return std::make_tuple(value, gq.dense(), gr.dense());
    };
    const auto untouched = [&](const Matrix<double>& g) { CHECK((g.array() == 5.0).all()); };
    // A zero row of Q, of R, and a self row with another label: thrown, nothing written; the
    // self label is reported first, then Q's zero row, as the host checks them.
    Matrix<double> qz = q, rz = r;
    qz.row(3).setZero();
    rz.row(7).setZero();
    SelfIndices bad = no_self(nq);
    bad(2) = 1;  // labels_r[1] = 1, labels_q[2] = 0
    expect_invalid_message([&] { run(qz, r, no_self(nq), ml::cuda, true); }, {"argument 'q' has row 3 of norm 0"});
    expect_invalid_message([&] { run(q, rz, no_self(nq), ml::cuda, true); }, {"argument 'r' has row 7 of norm 0"});
    expect_invalid_message([&] { run(qz, rz, bad, ml::cuda, true); }, {"labels_r[1] differs from labels_q[2]"});
    expect_invalid_message([&] { run(q, rz, no_self(nq), ml::cuda, false); }, {"argument 'r' has row 7 of norm 0"});
    // The messages are the host's.
    expect_invalid_message([&] {
      Matrix<double> gq(nq, d), gr(nr, d);
      loss.forward_backward(ml::scalar, q, yq, ml::reference(rz, yr), gq, gr);
    }, {"argument 'r' has row 7 of norm 0"});
    // loss_to: NaN at d_loss, both gradients untouched.
    DeviceBuffer<double> device_loss(1);
    const auto [v1, g1q, g1r] = run(qz, r, no_self(nq), ml::cuda.loss_to(device_loss.data()), true);
    CHECK(std::isnan(v1));
    CHECK(std::isnan(device_loss.download()[0]));
    untouched(g1q);
    untouched(g1r);
    const auto [v2, g2q, g2r] = run(q, r, bad, ml::cuda.loss_to(device_loss.data()), true);
    CHECK(std::isnan(device_loss.download()[0]));
    untouched(g2q);
    untouched(g2r);
    // Valid input: loss_to gives the value's bits; grad_r skipped leaves it and grad_q alike.
    const auto [v3, g3q, g3r] = run(q, r, no_self(nq), ml::cuda, true);
    const auto [v4, g4q, g4r] = run(q, r, no_self(nq), ml::cuda.loss_to(device_loss.data()), true);
    const double deferred = device_loss.download()[0];
    CHECK(std::memcmp(&deferred, &v3, sizeof deferred) == 0);
    CHECK(g4q == g3q);
    CHECK(g4r == g3r);
    const auto [v5, g5q, g5r] = run(q, r, no_self(nq), ml::cuda, false);
    CHECK(v5 == v3);
    CHECK(g5q == g3q);
    untouched(g5r);
    (void)v2;
    (void)v4;
  });
}
