// BatchContrastiveLoss on CUDA: against a brute-force double transcription of API.md's
// formula and against the scalar path, for both distances, both reductions and both margin
// kinds (float and double; N = 1, sizes off the tiles; strided maps; label types); the tie
// regime (integer data at the margins, duplicated rows, offsets); degenerate batches; NaN
// propagation; finite differences in double; the large-offset float case; determinism with
// the deferred loss and the noexcept core; errors before the device is touched.
#include "device.cuh"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

using namespace mltest;
using ml::Distance;
using ml::Reduction;

namespace {

struct Options {
  double pos = 0.0, neg = 1.0;
  Distance distance = Distance::euclidean;
  Reduction reduction = Reduction::nonzero_mean;
  template <class T>
  ml::BatchContrastiveLoss<T> loss() const {
    ml::BatchContrastiveLoss<T> f(static_cast<T>(pos), static_cast<T>(neg), distance);
    f.reduction = reduction;
    return f;
  }
};

struct Expected {
  double loss = 0.0;
  Matrix<double> grad;
};

/// API.md's formula over the ordered pairs (a, j), a != j, distances by differences in
/// double: L = sum_+ [d - m_+]_+ / C_+ + sum_- [m_- - d]_+ / C_-, C the terms > 0 of a side
/// (nonzero_mean) or its pairs (mean), a side without any adding 0; the gradient by the
/// chain rule through d (0 at d = 0), times top_diff.
template <class L>
Expected brute_force(const Options& o, const Matrix<double>& x, const std::vector<L>& labels,
                     double top_diff) {
  const Index n = x.rows();
  const bool euclidean = o.distance == Distance::euclidean;
  double sum[2] = {0, 0}, active[2] = {0, 0}, pairs[2] = {0, 0};
  auto term_of = [&](Index a, Index j, bool positive) {
    const double d2 = (x.row(a) - x.row(j)).squaredNorm();
    const double d = euclidean ? std::sqrt(d2) : d2;
    return positive ? d - o.pos : o.neg - d;
  };
  for (Index a = 0; a < n; ++a)
    for (Index j = 0; j < n; ++j) {
      if (j == a) continue;
      const int side = labels[static_cast<std::size_t>(a)] == labels[static_cast<std::size_t>(j)] ? 0 : 1;
      const double h = term_of(a, j, side == 0);
      pairs[side] += 1;
      if (h > 0) {
        sum[side] += h;
        active[side] += 1;
      }
    }
  Expected e;
  double scale[2];
  for (int side = 0; side < 2; ++side) {
    const double c = o.reduction == Reduction::nonzero_mean ? active[side] : pairs[side];
    e.loss += c > 0 ? sum[side] / c : 0.0;
    scale[side] = c > 0 ? 1.0 / c : 0.0;
  }
  e.grad = Matrix<double>::Zero(n, x.cols());
  for (Index a = 0; a < n; ++a)
    for (Index j = 0; j < n; ++j) {
      if (j == a) continue;
      const bool positive = labels[static_cast<std::size_t>(a)] == labels[static_cast<std::size_t>(j)];
      if (!(term_of(a, j, positive) > 0)) continue;
      const Eigen::RowVectorXd diff = x.row(a) - x.row(j);
      const double d = diff.norm();
      // d(d)/d(x_a) = diff / d (0 at d = 0); d(d^2)/d(x_a) = 2 diff.
      const Eigen::RowVectorXd dd = euclidean ? (d > 0 ? Eigen::RowVectorXd(diff / d) : Eigen::RowVectorXd::Zero(x.cols()))
                                              : Eigen::RowVectorXd(2.0 * diff);
      const double s = (positive ? 1.0 : -1.0) * scale[positive ? 0 : 1] * top_diff;
      e.grad.row(a) += s * dd;
      e.grad.row(j) -= s * dd;
    }
  return e;
}

std::vector<Options> every_option() {
  std::vector<Options> out;
  for (auto distance : {Distance::euclidean, Distance::squared_euclidean})
    for (auto reduction : {Reduction::nonzero_mean, Reduction::mean})
      for (auto margins : {std::make_pair(0.0, 1.0), std::make_pair(0.3, 0.9)})
        out.push_back({margins.first, margins.second, distance, reduction});
  return out;
}

/// The cuda call against the scalar path and the brute force (double), padding untouched,
/// forward equal to forward_backward's loss.
template <class T, class L>
void check_parity(const Matrix<T>& x, const std::vector<L>& labels, const Options& o, Index pad) {
  const Index n = x.rows(), d = x.cols();
  const Eigen::Map<const Eigen::Matrix<L, Eigen::Dynamic, 1>> host_labels(labels.data(), n);
  ml::BatchContrastiveLoss<T> loss = o.loss<T>();
  const T sentinel = T(-12345), top_diff = T(1.25);
  Strided<T> g_scalar(Matrix<T>::Zero(n, d), pad, sentinel);
  const T scalar_value = loss.forward_backward(ml::scalar, x, host_labels, g_scalar.map(), top_diff);
  const DeviceStrided<T> dx(x, pad, sentinel);
  DeviceStrided<T> dg(Matrix<T>::Zero(n, d), pad, sentinel);
  const DeviceVectorOf<L> dl(labels);
  const T cuda_value = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map(), top_diff);
  CHECK(relatively_close(cuda_value, scalar_value, Tolerance<T>::loss, 1e-12));
  const Strided<T> g = dg.host();
  CHECK(ml::testing::compare_gradients(g.cmap(), g_scalar.map()).relative(1e-30) <= Tolerance<T>::gradient);
  CHECK(g.padding_is(sentinel));
  CHECK(loss.forward(ml::cuda, dx.cmap(), dl.map()) == cuda_value);
  const Expected e = brute_force(o, x.template cast<double>(), labels, static_cast<double>(top_diff));
  CHECK(relatively_close(cuda_value, e.loss, Tolerance<T>::loss, 1e-12));
  CHECK(ml::testing::compare_gradients(g.cmap(), e.grad).relative(1e-30) <= Tolerance<T>::gradient);
}

}  // namespace

TEMPLATE_TEST_CASE("cuda batch contrastive agrees with scalar and the formula", "[cuda][batch_contrastive][parity]",
                   float, double) {
  if (skip_without_device()) return;
  using T = TestType;
  const Options base = GENERATE(from_range(every_option()));
  const Index n = GENERATE(1, 2, 9, 64, 97, 300);
  const Index d = GENERATE(1, 7, 33);
  const int classes = GENERATE(1, 3, 6);
  const Index pad = n == 97 ? 2 : 0;
  const std::uint64_t seed = 13000u + static_cast<std::uint64_t>(n * 131 + d * 7 + classes);
  CAPTURE(base.pos, base.neg, base.distance == Distance::euclidean, base.reduction == Reduction::mean, n, d,
          classes, seed);
  std::mt19937_64 rng(seed);
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  // Margins on the scale of the data's distances, so that both sides have active and
  // inactive terms.
  const double typical = base.distance == Distance::euclidean ? std::sqrt(d / 1.5) : d / 1.5;
  Options o = base;
  o.pos *= typical;
  o.neg *= typical;
  check_parity(x, random_labels(n, classes, rng), o, pad);
}

TEMPLATE_TEST_CASE("cuda batch contrastive follows the tie rules on tie-heavy data",
                   "[cuda][batch_contrastive][ties]", float, double) {
  // Integer grids with integer margins put pairs exactly at a hinge's turn (inactive, not
  // counted by nonzero_mean); duplicated rows give d = 0 (zero subgradient); offsets 0, 100
  // and 1e4 cancel the product's digits.
  if (skip_without_device()) return;
  using T = TestType;
  const Options base = GENERATE(from_range(every_option()));
  for (std::uint64_t seed = 1; seed <= 24; ++seed) {
    std::mt19937_64 rng(seed);
    const Index shapes[][2] = {{7, 1}, {12, 2}, {30, 3}, {48, 2}, {40, 5}, {23, 17}};
    const Index n = shapes[seed % 6][0], d = shapes[seed % 6][1];
    const bool small_grid = seed % 2 == 0;
    const double offset = (seed / 2) % 3 == 0 ? 0.0 : (seed / 2) % 3 == 1 ? 100.0 : 1e4;
    Options o = base;
    o.pos = std::round(base.pos * 3);   // 0 or 1
    o.neg = std::round(base.neg * 3);   // 3
    const int classes = static_cast<int>(seed % 4) + 1;
    CAPTURE(base.distance == Distance::euclidean, base.reduction == Reduction::mean, o.pos, o.neg, seed, n, d,
            offset);
    const Matrix<T> x = tied_matrix<T>(n, d, rng, small_grid ? 0 : -2, small_grid ? 2 : 3, offset);
    const std::vector<std::int64_t> labels = tied_labels(n, classes, rng);
    const Expected e = brute_force(o, x.template cast<double>(), labels, 1.5);
    ml::BatchContrastiveLoss<T> loss = o.loss<T>();
    const DeviceStrided<T> dx(x, 0, T(0));
    DeviceStrided<T> dg(Matrix<T>::Zero(n, d), 0, T(0));
    const DeviceVectorOf<std::int64_t> dl(labels);
    const T value = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map(), T(1.5));
    CHECK(relatively_close(value, e.loss, Tolerance<T>::loss, 1e-30));
    CHECK(ml::testing::compare_gradients(dg.dense(), e.grad).relative(1e-30) <= Tolerance<T>::gradient);
  }
}

TEMPLATE_TEST_CASE("cuda batch contrastive handles degenerate batches", "[cuda][batch_contrastive][edge]", float,
                   double) {
  if (skip_without_device()) return;
  using T = TestType;
  const Options o = GENERATE(from_range(every_option()));
  CAPTURE(o.pos, o.neg, o.distance == Distance::euclidean, o.reduction == Reduction::mean);
  std::mt19937_64 rng(17);
  const Index n = 30, d = 6;
  const Matrix<T> x = uniform_matrix<T>(n, d, rng, -0.2, 0.2);
  SECTION("classes of one: no positive pairs") {
    std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int32_t>(i);
    check_parity(x, labels, o, 0);
  }
  SECTION("one class: no negative pairs") {
    check_parity(x, std::vector<std::int32_t>(static_cast<std::size_t>(n), 4), o, 0);
  }
  SECTION("coincident points") {
    Matrix<T> y = x;
    for (Index i = 0; i + 1 < n; i += 3) y.row(i + 1) = y.row(i);
    std::vector<float> labels(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<float>(i % 4);
    check_parity(y, labels, o, 0);
  }
  SECTION("NaN in the labels propagates") { check_nan_label_propagates(o.loss<T>(), x); }
  SECTION("a non-finite row propagates") {
    Matrix<T> y = x;
    y(5, 2) = std::numeric_limits<T>::infinity();
    const DeviceStrided<T> dx(y, 0, T(0));
    DeviceStrided<T> dg(Matrix<T>::Zero(n, d), 0, T(0));
    const DeviceVectorOf<std::int64_t> dl(random_labels(n, 3, rng));
    ml::BatchContrastiveLoss<T> loss = o.loss<T>();
    CHECK(std::isnan(loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map())));
    CHECK(dg.dense().array().isNaN().all());
  }
}

TEST_CASE("cuda batch contrastive gradients match finite differences", "[cuda][batch_contrastive][gradcheck]") {
  if (skip_without_device()) return;
  // Random points keep every pair away from its hinge's turn, where L has a kink.
  const Options base = GENERATE(from_range(every_option()));
  CAPTURE(base.pos, base.neg, base.distance == Distance::euclidean, base.reduction == Reduction::mean);
  std::mt19937_64 rng(29);
  const Index n = 10, d = 4;
  const Matrix<double> x = uniform_matrix<double>(n, d, rng);
  Options o = base;
  const double typical = o.distance == Distance::euclidean ? std::sqrt(d / 1.5) : d / 1.5;
  o.pos *= typical;
  o.neg *= typical;
  const std::vector<std::int64_t> labels = {0, 1, 2, 0, 1, 2, 0, 1, 2, 0};
  const DeviceVectorOf<std::int64_t> dl(labels);
  ml::BatchContrastiveLoss<double> loss = o.loss<double>();
  const double top_diff = 0.8;
  const DeviceStrided<double> dx(x, 0, 0.0);
  DeviceStrided<double> dg(Matrix<double>::Zero(n, d), 0, 0.0);
  loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map(), top_diff);
  const Matrix<double> numeric = top_diff * ml::testing::numerical_gradient(
                                                [&](const Matrix<double>& y) {
                                                  const DeviceStrided<double> dy(y, 0, 0.0);
                                                  return loss.forward(ml::cuda, dy.cmap(), dl.map());
                                                },
                                                x);
  CHECK(ml::testing::compare_gradients(dg.dense(), numeric).relative() <= Tolerance<double>::finite_difference);
}

TEST_CASE("cuda batch contrastive in float is accurate at a large common offset",
          "[cuda][batch_contrastive][numerics]") {
  if (skip_without_device()) return;
  const auto distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  CAPTURE(distance == Distance::euclidean);
  std::mt19937_64 rng(37);
  const Index n = 96, d = 64;
  const Matrix<float> x = uniform_matrix<float>(n, d, rng, 99.95, 100.05);
  const auto labels = random_labels(n, 8, rng);
  const Eigen::Map<const Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>> host_labels(labels.data(), n);
  const double neg = distance == Distance::euclidean ? 0.5 : 0.25;
  ml::BatchContrastiveLoss<double> reference_loss(0.1, neg, distance);
  Matrix<double> reference_grad(n, d);
  const double reference =
      reference_loss.forward_backward(ml::scalar, x.cast<double>().eval(), host_labels, reference_grad);
  ml::BatchContrastiveLoss<float> loss(0.1f, static_cast<float>(neg), distance);
  const DeviceStrided<float> dx(x, 0, 0.0f);
  DeviceStrided<float> dg(Matrix<float>::Zero(n, d), 0, 0.0f);
  const DeviceVectorOf<std::int64_t> dl(labels);
  const float value = loss.forward_backward(ml::cuda, dx.cmap(), dl.map(), dg.map());
  CHECK(relatively_close(value, reference, Tolerance<float>::loss));
  CHECK(ml::testing::compare_gradients(dg.dense(), reference_grad).relative() <= Tolerance<float>::gradient);
}

TEMPLATE_TEST_CASE("cuda batch contrastive is deterministic; core and deferred loss",
                   "[cuda][batch_contrastive][core]", float, double) {
  using T = TestType;
  namespace core = ml::cuda_core;
  const Index n = 200, d = 24;
  const std::size_t bytes = core::batch_contrastive_workspace_bytes<T>(n, d);
  CHECK(bytes >= (sizeof(T) + sizeof(double)) * static_cast<std::size_t>(n * n));
  T* no_loss = nullptr;
  CHECK(core::batch_contrastive_forward_backward<T, int>(nullptr, bytes, {}, {}, T(0), T(1), Distance::euclidean,
                                                         Reduction::nonzero_mean, {}, T(1), no_loss,
                                                         nullptr) == cudaErrorInvalidValue);
  if (skip_without_device()) return;
  std::mt19937_64 rng(47);
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  check_deterministic_core(ml::BatchContrastiveLoss<T>(T(0.5), T(3)), x, random_labels(n, 12, rng), bytes,
                           [](void* workspace, std::size_t size, auto xv, auto lv, auto gv, T* loss, cudaStream_t s) {
                             return core::batch_contrastive_forward_backward<T, std::int64_t>(
                                 workspace, size, xv, lv, T(0.5), T(3), Distance::euclidean,
                                 Reduction::nonzero_mean, gv, T(1), loss, s);
                           });
}

TEST_CASE("cuda batch contrastive rejects bad input before touching the device", "[cuda][batch_contrastive][errors]") {
  // Host maps: the checks run before anything is enqueued, so no device is needed.
  std::mt19937_64 rng(49);
  const Matrix<float> x = uniform_matrix<float>(4, 3, rng);
  const Eigen::VectorXi labels = (Eigen::VectorXi(4) << 0, 0, 1, 1).finished();
  auto message_of = [&](ml::BatchContrastiveLoss<float>& loss, Matrix<float>& g) {
    std::string message = "no exception";
    try {
      loss.forward_backward(ml::cuda, x, labels, g);
    } catch (const ml::invalid_argument& e) {
      message = e.what();
    }
    return message;
  };
  ml::BatchContrastiveLoss<float> loss;
  SECTION("a gradient of the wrong shape") {
    Matrix<float> g = Matrix<float>::Constant(4, 2, 7.0f);
    const std::string message = message_of(loss, g);
    CAPTURE(message);
    CHECK(message.find("metricloss::BatchContrastiveLoss<float>::forward_backward") != std::string::npos);
    CHECK(message.find("'grad_x'") != std::string::npos);
    CHECK((g.array() == 7.0f).all());
  }
  SECTION("a non-finite margin") {
    loss.neg_margin = std::numeric_limits<float>::infinity();
    Matrix<float> g = Matrix<float>::Constant(4, 3, 7.0f);
    const std::string message = message_of(loss, g);
    CAPTURE(message);
    CHECK(message.find("'neg_margin'") != std::string::npos);
    CHECK((g.array() == 7.0f).all());
  }
}
