// LiftedStructureLoss: Caffe's loops as an independent reference, finite differences,
// simd-vs-scalar parity, degenerate batches, float at a large offset, bad input,
// determinism and allocation-free reuse.
#include "allocation_counter.hpp"
#include "support.hpp"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

using namespace mltest;

namespace {

using Labels = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>;

Labels to_labels(const std::vector<std::int64_t>& v) {
  Labels l(static_cast<Index>(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) l(static_cast<Index>(i)) = v[i];
  return l;
}

/// P x K batch: `per_class` samples of each class, in shuffled order.
Labels pk_labels(Index n, Index per_class, std::mt19937_64& rng) {
  std::vector<std::int64_t> v(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = i / per_class;
  std::shuffle(v.begin(), v.end(), rng);
  return to_labels(v);
}

/// Points around one centre per class: `separation` sets how far the classes are apart
/// (large: many pairs have J < 0 and their hinge is inactive).
template <class T>
Matrix<T> clustered(const Labels& labels, Index d, double separation, std::mt19937_64& rng) {
  const Index classes = labels.maxCoeff() + 1;
  const Matrix<double> centres = uniform_matrix<double>(classes, d, rng, -separation, separation);
  const Matrix<double> noise = uniform_matrix<double>(labels.size(), d, rng);
  Matrix<T> x(labels.size(), d);
  for (Index i = 0; i < x.rows(); ++i)
    x.row(i) = (centres.row(labels(i)) + noise.row(i)).template cast<T>();
  return x;
}

/// Test-only reference: Caffe's LiftedStructSimilaritySoftmaxLossLayer<Dtype>::Forward_cpu
/// and Backward_cpu followed loop by loop (per positive pair, a loop over the negatives of
/// each end with a max-shifted soft-max and axpy-style updates), in double, with exact
/// distances by differences instead of Caffe's ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j. Where
/// Caffe would fail, API.md's rule: a pair with no negatives adds 0 (J = -inf), |P| = 0
/// gives L = 0.
struct CaffeResult {
  double loss = 0.0;
  Matrix<double> grad;
  double min_abs_j = std::numeric_limits<double>::infinity();  // distance to the hinge's kink
  double min_distance = std::numeric_limits<double>::infinity();
};
template <class T, class L>
CaffeResult caffe_lifted(const Matrix<T>& x_in, const L& label, double margin, double top_diff) {
  const Matrix<double> x = x_in.template cast<double>();
  const Index n = x.rows(), k_ = x.cols();
  Matrix<double> dist(n, n);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j) dist(i, j) = (x.row(i) - x.row(j)).norm();
  std::vector<std::vector<bool>> label_mat(static_cast<std::size_t>(n), std::vector<bool>(static_cast<std::size_t>(n)));
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j)
      label_mat[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)] = label(i) == label(j);
  auto same = [&](Index i, Index j) { return label_mat[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)]; };
  CaffeResult r;
  r.grad = Matrix<double>::Zero(n, k_);
  double num_constraints = 0.0;
  Eigen::RowVectorXd pos_diff(k_), neg_diff(k_);
  for (Index i = 0; i < n; ++i) {
    for (Index j = i + 1; j < n; ++j) {
      if (!same(i, j)) continue;
      const double dist_pos = dist(i, j);
      r.min_distance = std::min(r.min_distance, dist_pos);
      pos_diff = x.row(i) - x.row(j);
      std::vector<double> loss_aug_inference;
      for (Index k = 0; k < n; ++k)
        if (!same(i, k)) loss_aug_inference.push_back(margin - dist(i, k));
      for (Index k = 0; k < n; ++k)
        if (!same(j, k)) loss_aug_inference.push_back(margin - dist(j, k));
      num_constraints += 1.0;
      if (loss_aug_inference.empty()) continue;  // J = -inf (Caffe: max_element of nothing)
      const double max_elem = *std::max_element(loss_aug_inference.begin(), loss_aug_inference.end());
      double sum_exp = 0.0;
      for (double& v : loss_aug_inference) {
        v = std::exp(v - max_elem);
        sum_exp += v;
      }
      const double soft_maximum = std::log(sum_exp) + max_elem;
      r.min_abs_j = std::min(r.min_abs_j, std::abs(soft_maximum + dist_pos));
      const double this_loss = std::max(soft_maximum + dist_pos, 0.0);
      r.loss += this_loss * this_loss;
      double scaler = 2.0 * this_loss / dist_pos;
      r.grad.row(i) += scaler * pos_diff;
      r.grad.row(j) -= scaler * pos_diff;
      std::size_t neg_idx = 0;
      for (Index k = 0; k < n; ++k) {
        if (same(i, k)) continue;
        r.min_distance = std::min(r.min_distance, dist(i, k));
        neg_diff = x.row(i) - x.row(k);
        const double dJ_dDik = 2.0 * this_loss * -1.0 * loss_aug_inference[neg_idx++] / sum_exp;
        scaler = dJ_dDik / dist(i, k);
        r.grad.row(i) += scaler * neg_diff;
        r.grad.row(k) -= scaler * neg_diff;
      }
      for (Index k = 0; k < n; ++k) {
        if (same(j, k)) continue;
        neg_diff = x.row(j) - x.row(k);
        const double dJ_dDjk = 2.0 * this_loss * -1.0 * loss_aug_inference[neg_idx++] / sum_exp;
        scaler = dJ_dDjk / dist(j, k);
        r.grad.row(j) += scaler * neg_diff;
        r.grad.row(k) -= scaler * neg_diff;
      }
    }
  }
  if (num_constraints == 0.0) {
    r.grad.setZero();
    return r;
  }
  r.loss = r.loss / num_constraints / 2.0;
  r.grad *= top_diff / num_constraints / 2.0;  // Backward_cpu's alpha
  return r;
}

template <class T>
double gradient_error(const Eigen::MatrixBase<T>& analytic, const Matrix<double>& reference) {
  return ml::testing::compare_gradients(analytic, reference).relative(1e-300);
}

}  // namespace

TEMPLATE_TEST_CASE("lifted structure agrees with Caffe's loops in double", "[lifted][caffe]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const std::uint64_t seed = GENERATE(1u, 2u, 3u);
  const Index n = GENERATE(5, 24, 61);
  const Index d = GENERATE(1, 8, 37);
  const int classes = GENERATE(2, 5);
  const double margin = GENERATE(0.0, 1.0, 3.0);
  CAPTURE(seed, n, d, classes, margin);
  std::mt19937_64 rng(seed);
  const Labels labels = to_labels(random_labels(n, classes, rng));
  const Matrix<double> x = uniform_matrix<double>(n, d, rng);
  ml::LiftedStructureLoss<double> loss(margin);
  Matrix<double> grad(n, d);
  const double top_diff = 0.7;
  const double value = loss.forward_backward(tag, x, labels, grad, top_diff);
  const CaffeResult caffe = caffe_lifted(x, labels, margin, top_diff);
  CHECK(relatively_close(value, caffe.loss, same_formula_tolerance, 1e-300));
  CHECK(gradient_error(grad, caffe.grad) <= same_formula_tolerance);
  CHECK(loss.forward(tag, x, labels) == value);
}

TEMPLATE_TEST_CASE("lifted structure agrees with Caffe's loops on clustered P x K batches",
                   "[lifted][caffe]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const std::uint64_t seed = GENERATE(4u, 5u);
  const Index per_class = GENERATE(2, 4);
  const double separation = GENERATE(0.5, 3.0);  // 3: some pairs with inactive hinges
  const Index n = 40, d = 19;
  CAPTURE(seed, per_class, separation);
  std::mt19937_64 rng(seed);
  const Labels labels = pk_labels(n, per_class, rng);
  const Matrix<T> x = clustered<T>(labels, d, separation, rng);
  ml::LiftedStructureLoss<T> loss(T(1));
  Matrix<T> grad(n, d);
  const T value = loss.forward_backward(tag, x, labels, grad);
  const CaffeResult caffe = caffe_lifted(x, labels, 1.0, 1.0);
  const double tol_loss = std::is_same<T, double>::value ? same_formula_tolerance : Tolerance<T>::loss;
  const double tol_grad = std::is_same<T, double>::value ? same_formula_tolerance : Tolerance<T>::gradient;
  CHECK(relatively_close(value, caffe.loss, tol_loss, 1e-300));
  CHECK(gradient_error(grad, caffe.grad) <= tol_grad);
}

TEMPLATE_TEST_CASE("lifted structure gradients match finite differences",
                   "[lifted][gradcheck]", ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const std::uint64_t seed = GENERATE(11u, 12u, 13u);
  const Index d = GENERATE(1, 6, 23);
  const double separation = GENERATE(0.0, 2.5);
  CAPTURE(seed, d, separation);
  std::mt19937_64 rng(seed);
  const Index n = 14;
  const Labels labels = pk_labels(n, 3, rng);
  const Matrix<double> x = clustered<double>(labels, d, separation, rng);
  const double margin = 0.5;
  // Keep away from the kinks (J = 0 and D = 0) by far more than the step.
  const CaffeResult caffe = caffe_lifted(x, labels, margin, 1.0);
  CAPTURE(caffe.min_abs_j, caffe.min_distance);
  REQUIRE(caffe.min_abs_j > 1e-4);
  REQUIRE(caffe.min_distance > 1e-3);
  ml::LiftedStructureLoss<double> loss(margin);
  const double top_diff = 1.3;
  Matrix<double> grad(n, d);
  loss.forward_backward(tag, x, labels, grad, top_diff);
  const auto f = [&](const Matrix<double>& y) { return loss.forward(tag, y, labels); };
  const Matrix<double> numerical = top_diff * ml::testing::numerical_gradient(f, x);
  CHECK(gradient_error(grad, numerical) <= Tolerance<double>::finite_difference);
  const Matrix<double> v = ml::testing::random_direction(n, d, rng);
  const double slope = ml::testing::directional_derivative(f, x, v);
  CHECK(relatively_close(top_diff * slope, (grad.array() * v.array()).sum(), 1e-6, 1e-3));
}

TEMPLATE_TEST_CASE("lifted structure simd agrees with scalar over sizes and strides",
                   "[lifted][parity]", float, double) {
  using T = TestType;
  const Index n = GENERATE(1, 2, 3, 17, 33, 100);
  const Index d = GENERATE(1, 3, 16, 17, 130);
  const Index pad = GENERATE(0, 5);
  const std::uint64_t seed = 1000u + static_cast<std::uint64_t>(d * 7 + n);
  CAPTURE(n, d, pad, seed);
  std::mt19937_64 rng(seed);
  const Labels labels = to_labels(random_labels(n, static_cast<int>(n / 4 + 1), rng));
  // Labels as a strided column of a matrix (float, as Caffe passes them).
  Eigen::MatrixXf label_table(n, 3);
  label_table.col(1) = labels.cast<float>();
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  ml::LiftedStructureLoss<T> loss(T(0.8));
  const T sentinel = T(-12345);
  Strided<T> xs(x, pad, sentinel);
  Strided<T> grad_scalar(Matrix<T>::Zero(n, d), pad, sentinel), grad_simd = grad_scalar;
  const T scalar_value = loss.forward_backward(ml::scalar, xs.cmap(), labels, grad_scalar.map(), T(2));
  const T simd_value = loss.forward_backward(ml::simd, xs.cmap(), label_table.col(1), grad_simd.map(), T(2));
  CHECK(relatively_close(simd_value, scalar_value, Tolerance<T>::loss, 1e-30));
  CHECK(gradient_error(grad_simd.map(), grad_scalar.map().template cast<double>()) <= Tolerance<T>::gradient);
  CHECK(grad_simd.map().allFinite());
  CHECK(grad_simd.padding_is(sentinel));
  CHECK(grad_scalar.padding_is(sentinel));
}

TEMPLATE_TEST_CASE("lifted structure on degenerate batches", "[lifted][degenerate]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  ml::LiftedStructureLoss<T> loss(T(1));
  SECTION("all points coincident, two classes") {
    const Matrix<T> x = Matrix<T>::Constant(4, 3, T(0.5));
    const Labels labels = to_labels({0, 0, 1, 1});
    Matrix<T> grad(4, 3);
    // Every D = 0: each pair's normaliser is 4 e^m, J = m + log 4; |P| = 2.
    const T value = loss.forward_backward(tag, x, labels, grad);
    const double j = 1.0 + std::log(4.0);
    CHECK(relatively_close(value, j * j / 2.0, Tolerance<T>::loss));
    CHECK(grad.isZero(0));
  }
  SECTION("a coincident positive pair and a coincident negative pair") {
    std::mt19937_64 rng(61);
    Matrix<T> x = uniform_matrix<T>(9, 5, rng);
    x.row(1) = x.row(0);  // positive pair at D = 0
    x.row(4) = x.row(2);  // negative pair at D = 0
    const Labels labels = to_labels({0, 0, 1, 2, 1, 2, 0, 1, 2});
    Matrix<T> grad(9, 5), reference(9, 5);
    const T value = loss.forward_backward(tag, x, labels, grad);
    ml::LiftedStructureLoss<double> loss_double(1.0);
    Matrix<double> grad_double(9, 5);
    const double expected = loss_double.forward_backward(ml::scalar, x.template cast<double>().eval(), labels, grad_double);
    CHECK(std::isfinite(value));
    CHECK(grad.allFinite());
    CHECK(relatively_close(value, expected, Tolerance<T>::loss));
    CHECK(gradient_error(grad, grad_double) <= Tolerance<T>::gradient);
  }
  SECTION("one class: no negatives, every J = -inf") {
    std::mt19937_64 rng(62);
    const Matrix<T> x = uniform_matrix<T>(6, 4, rng);
    Matrix<T> grad = Matrix<T>::Constant(6, 4, T(3));
    CHECK(loss.forward_backward(tag, x, Labels::Constant(6, 7).eval(), grad) == T(0));
    CHECK(grad.isZero(0));
  }
  SECTION("no positive pairs: all labels distinct, and N = 1") {
    std::mt19937_64 rng(63);
    const Matrix<T> x = uniform_matrix<T>(5, 4, rng);
    Matrix<T> grad = Matrix<T>::Constant(5, 4, T(3));
    CHECK(loss.forward_backward(tag, x, to_labels({4, 3, 2, 1, 0}), grad) == T(0));
    CHECK(grad.isZero(0));
    Matrix<T> grad1 = Matrix<T>::Constant(1, 4, T(3));
    CHECK(loss.forward_backward(tag, x.topRows(1), to_labels({0}), grad1) == T(0));
    CHECK(grad1.isZero(0));
  }
  SECTION("N = 2") {
    Matrix<T> x(2, 1);
    x << T(0.25), T(1.0);
    Matrix<T> grad = Matrix<T>::Constant(2, 1, T(3));
    CHECK(loss.forward_backward(tag, x, to_labels({1, 1}), grad) == T(0));  // one class
    CHECK(grad.isZero(0));
    CHECK(loss.forward_backward(tag, x, to_labels({1, 2}), grad) == T(0));  // no positives
    CHECK(grad.isZero(0));
  }
  SECTION("N = 3, D = 1, by hand") {
    // x = (0, 1, 3), labels (0, 0, 1): D01 = 1, negatives D02 = 3, D12 = 2.
    // J = log(e^(m-3) + e^(m-2)) + 1, L = J^2 / 2.
    Matrix<T> x(3, 1);
    x << T(0), T(1), T(3);
    Matrix<T> grad(3, 1);
    const T value = loss.forward_backward(tag, x, to_labels({0, 0, 1}), grad);
    const double j = std::log(std::exp(-2.0) + std::exp(-1.0)) + 1.0;
    CHECK(relatively_close(value, j * j / 2.0, Tolerance<T>::loss));
    // dL/dx = J dJ/dx: dJ/dx0 = -1 + p02 * (-1)... written out: dJ/dD01 = 1,
    // dJ/dD02 = -p02, dJ/dD12 = -p12 with p the soft-max of (-3, -2).
    const double p02 = std::exp(-3.0) / (std::exp(-3.0) + std::exp(-2.0)), p12 = 1.0 - p02;
    const double g0 = j * (-1.0 + p02), g1 = j * (1.0 + p12), g2 = j * (-p02 - p12);
    CHECK(relatively_close(grad(0, 0), g0, Tolerance<T>::loss));
    CHECK(relatively_close(grad(1, 0), g1, Tolerance<T>::loss));
    CHECK(relatively_close(grad(2, 0), g2, Tolerance<T>::loss));
  }
  SECTION("classes far apart: every hinge inactive, no underflow trouble") {
    std::mt19937_64 rng(64);
    const Labels labels = pk_labels(12, 3, rng);
    const Matrix<T> x = clustered<T>(labels, 3, 1e4, rng);
    Matrix<T> grad(12, 3);
    CHECK(loss.forward_backward(tag, x, labels, grad) == T(0));
    CHECK(grad.isZero(0));
  }
  SECTION("margin 0 and a large margin stay finite") {
    std::mt19937_64 rng(65);
    const Labels labels = pk_labels(16, 4, rng);
    const Matrix<T> x = uniform_matrix<T>(16, 7, rng, -50.0, 50.0);
    for (double margin : {0.0, 500.0}) {
      CAPTURE(margin);
      ml::LiftedStructureLoss<T> m(static_cast<T>(margin));
      Matrix<T> grad(16, 7);
      const T value = m.forward_backward(tag, x, labels, grad);
      const CaffeResult caffe = caffe_lifted(x, labels, static_cast<T>(margin), 1.0);
      CHECK(relatively_close(value, caffe.loss, Tolerance<T>::loss));
      CHECK(gradient_error(grad, caffe.grad) <= Tolerance<T>::gradient);
    }
  }
  SECTION("NaN or infinity in the data, or a NaN label, give NaN") {
    std::mt19937_64 rng(66);
    Matrix<T> x = uniform_matrix<T>(6, 3, rng);
    const Labels labels = to_labels({0, 0, 1, 1, 2, 2});
    Matrix<T> grad(6, 3);
    x(3, 1) = std::numeric_limits<T>::quiet_NaN();
    CHECK(std::isnan(loss.forward_backward(tag, x, labels, grad)));
    CHECK(grad.array().isNaN().all());
    x(3, 1) = std::numeric_limits<T>::infinity();
    CHECK(std::isnan(loss.forward(tag, x, labels)));
    x(3, 1) = T(0);
    Eigen::VectorXd nan_label = labels.cast<double>();
    nan_label(2) = std::numeric_limits<double>::quiet_NaN();
    CHECK(std::isnan(loss.forward_backward(tag, x, nan_label, grad)));
    CHECK(grad.array().isNaN().all());
  }
}

TEMPLATE_TEST_CASE("lifted structure is accurate for near-duplicate points", "[lifted][numerics]",
                   ALL_CASES) {
  // Near pairs carry weights ~ 1/D: a product that forms S_ik x_i - S_ik x_k would lose
  // every digit of their gradient; they must be applied by differences.
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const double gap = GENERATE(1e-2, 1e-4, 1e-6);
  const double offset = GENERATE(0.0, 100.0);
  CAPTURE(gap, offset);
  // Below ~100 ulp of the offset the nudged points round onto each other.
  if (gap < 100.0 * std::numeric_limits<T>::epsilon() * offset) return;
  std::mt19937_64 rng(81);
  const Index n = 64, d = 32;
  const Labels labels = pk_labels(n, 4, rng);
  Matrix<T> x = uniform_matrix<T>(n, d, rng, offset - 1.0, offset + 1.0);
  const Matrix<T> nudge = uniform_matrix<T>(n, d, rng, -gap, gap);
  for (Index i = 1; i < n; ++i)
    for (Index j = 0; j < i; ++j)
      if (i % 5 == 0 && j == i - 1) x.row(i) = x.row(j) + nudge.row(i);  // positives and negatives
  ml::LiftedStructureLoss<T> loss(T(1));
  Matrix<T> grad(n, d);
  const T value = loss.forward_backward(tag, x, labels, grad);
  const CaffeResult reference = caffe_lifted(x, labels, 1.0, 1.0);
  CHECK(relatively_close(value, reference.loss, Tolerance<T>::loss));
  CHECK(gradient_error(grad, reference.grad) <= Tolerance<T>::gradient);
}

TEMPLATE_TEST_CASE("lifted structure in float is accurate at a large common offset",
                   "[lifted][numerics]", ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const double margin = GENERATE(0.5, 2.0);
  const Index per_class = GENERATE(2, 8);
  CAPTURE(margin, per_class);
  std::mt19937_64 rng(31);
  const Index n = 160, d = 128;
  const Labels labels = pk_labels(n, per_class, rng);
  const Matrix<float> x = uniform_matrix<float>(n, d, rng, 99.95, 100.05);
  ml::LiftedStructureLoss<float> loss(static_cast<float>(margin));
  Matrix<float> grad(n, d);
  const float value = loss.forward_backward(tag, x, labels, grad);
  const CaffeResult reference = caffe_lifted(x, labels, margin, 1.0);  // double, same inputs
  CHECK(relatively_close(value, reference.loss, Tolerance<float>::loss));
  CHECK(gradient_error(grad, reference.grad) <= Tolerance<float>::gradient);
}

namespace {

/// loss (margin 1) on the simd path against Caffe's loops in double on the same inputs,
/// whose gradient must not be all zero; returns the loss, the gradient left in grad.
float check_float_simd_against_caffe(ml::LiftedStructureLoss<float>& loss, const Matrix<float>& x,
                                     const Labels& labels, Matrix<float>& grad) {
  const float value = loss.forward_backward(ml::simd, x, labels, grad);
  const CaffeResult reference = caffe_lifted(x, labels, 1.0, 1.0);
  REQUIRE(reference.grad.cwiseAbs().maxCoeff() > 0.0);
  CHECK(relatively_close(value, reference.loss, Tolerance<float>::loss));
  CHECK(gradient_error(grad, reference.grad) <= Tolerance<float>::gradient);
  return value;
}

}  // namespace

TEST_CASE("lifted structure simd in float is accurate when distances are large",
          "[lifted][numerics]") {
  // A negative weighs exp(nearest - D): an absolute error in D moves its weight by as much,
  // relatively, and float's distances (the product's, and D held in float) err by ~eps D.
  // 16 tight sites at scale S, class c on sites c and c + 8: each row's nearest negatives
  // are a whole site at D ~ S, all within a few units of each other (all carry weight),
  // and pairs across a class's two sites have active hinges.
  const double scale = GENERATE(1e3, 1e4, 1e5);
  CAPTURE(scale);
  const Index n = 64, d = 16;
  for (std::uint64_t seed = 0; seed < 3; ++seed) {
    CAPTURE(seed);
    std::mt19937_64 rng(seed);
    Labels labels(n);
    for (Index i = 0; i < n; ++i) labels(i) = i % 8;
    const Matrix<double> sites = uniform_matrix<double>(16, d, rng, -scale, scale);
    const Matrix<double> noise = uniform_matrix<double>(n, d, rng);
    Matrix<float> x(n, d);
    for (Index i = 0; i < n; ++i) x.row(i) = (sites.row(i % 16) + noise.row(i)).cast<float>();
    ml::LiftedStructureLoss<float> loss(1.0f);
    Matrix<float> grad(n, d);
    check_float_simd_against_caffe(loss, x, labels, grad);
  }
}

TEST_CASE("lifted structure simd in float at large scales, by the list and in double",
          "[lifted][numerics]") {
  // Uniform data at +-30 per coordinate (D ~ 400 at d = 128): about two thirds of the pairs
  // (21092 of the 32640) are weighted negatives that float cannot give to the tolerance, and
  // the call runs in double (in_double_pays); at d = 16 and +-44, 1788 are, and they are
  // recomputed into the list. Both against the double reference.
  const Index d = GENERATE(16, 128);
  const double scale = d == 16 ? 44.0 : 30.0;
  const std::uint64_t seed = 404;
  CAPTURE(d, scale, seed);
  std::mt19937_64 rng(seed);
  const Index n = 256;
  const Labels labels = pk_labels(n, 8, rng);
  const Matrix<float> x = uniform_matrix<float>(n, d, rng, -scale, scale);
  ml::LiftedStructureLoss<float> loss(1.0f);
  Matrix<float> grad(n, d);
  const float value = check_float_simd_against_caffe(loss, x, labels, grad);
  // Warm: the next call allocates nothing, in double too.
  const long before = allocation_count();
  CHECK(loss.forward(ml::simd, x, labels) == value);
  CHECK(loss.forward_backward(ml::simd, x, labels, grad) == value);
  CHECK(allocation_count() - before == 0);
  // A copy starts with empty scratch and gives the same bits.
  ml::LiftedStructureLoss<float> copy = loss;
  Matrix<float> again(n, d);
  CHECK(copy.forward_backward(ml::simd, x, labels, again) == value);
  CHECK(again == grad);
}

TEMPLATE_TEST_CASE("lifted structure accepts every label type", "[lifted]", ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  std::mt19937_64 rng(71);
  const Labels labels = pk_labels(20, 4, rng);
  const Matrix<double> x = uniform_matrix<double>(20, 6, rng);
  ml::LiftedStructureLoss<double> loss;
  Matrix<double> grad(20, 6), grad_other(20, 6);
  const double value = loss.forward_backward(tag, x, labels, grad);
  const Eigen::VectorXi labels_int = labels.cast<int>();
  const Eigen::VectorXf labels_float = labels.cast<float>();
  const Eigen::VectorXd labels_double = (labels.cast<double>().array() - 0.5).matrix();
  CHECK(loss.forward(tag, x, labels_int) == value);
  CHECK(loss.forward(tag, x, labels_float) == value);
  CHECK(loss.forward_backward(tag, x, labels_double, grad_other) == value);
  CHECK(grad_other == grad);
  Eigen::Map<const Labels> mapped(labels.data(), labels.size());
  Eigen::Map<const Matrix<double>> x_map(x.data(), 20, 6);
  CHECK(loss.forward(tag, x_map, mapped) == value);
  CHECK(loss.forward_backward(tag, x, labels, ml::skip) == value);
}

TEMPLATE_TEST_CASE("lifted structure rejects bad input and writes nothing", "[lifted][errors]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  std::mt19937_64 rng(41);
  Matrix<float> x = uniform_matrix<float>(4, 3, rng);
  const Labels labels = to_labels({0, 0, 1, 1});
  Matrix<float> grad = Matrix<float>::Constant(4, 3, 9.0f);
  const Matrix<float> before = grad;
  ml::LiftedStructureLoss<float> loss;
  const char* fn = "metricloss::LiftedStructureLoss<float>::forward_backward";
  expect_invalid([&] { loss.forward_backward(tag, Matrix<float>(0, 3), Labels(0), grad); },
                 {fn, "'x'", "0x3", "N >= 1"}, grad, before);
  expect_invalid([&] { loss.forward_backward(tag, Matrix<float>(4, 0), labels, grad); },
                 {fn, "'x'", "4x0", "D >= 1"}, grad, before);
  ml::ConstRowMap<float> narrow(x.data(), 2, 3, Eigen::OuterStride<>(2));
  expect_invalid([&] { loss.forward_backward(tag, narrow, labels.head(2), grad.topRows(2)); },
                 {fn, "'x'", "outer stride 2", "D = 3"}, grad, before);
  expect_invalid([&] { loss.forward_backward(tag, x, to_labels({0, 0, 1}), grad); },
                 {fn, "'labels'", "length 3", "expected 4", "'x'"}, grad, before);
  expect_invalid([&] { loss.forward_backward(tag, x, to_labels({0, 0, 1, 1, 2}), grad); },
                 {fn, "'labels'", "length 5", "expected 4"}, grad, before);
  expect_invalid([&] { loss.forward_backward(tag, x, labels, Matrix<float>(4, 4)); },
                 {fn, "'grad_x'", "4x4", "4x3"}, grad, before);
  expect_invalid([&] { loss.forward_backward(tag, x, labels, Matrix<float>(3, 3)); },
                 {fn, "'grad_x'", "3x3", "4x3"}, grad, before);
  for (float bad : {-1.0f, std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    ml::LiftedStructureLoss<float> bad_loss(1.0f);
    bad_loss.margin = bad;
    expect_invalid([&] { bad_loss.forward_backward(tag, x, labels, grad); }, {fn, "'margin'"}, grad,
                   before);
  }
  Matrix<float> x_copy = x;
  expect_invalid([&] { loss.forward_backward(tag, x_copy, labels, x_copy); },
                 {fn, "'grad_x'", "overlaps", "'x'"}, grad, before);
  ml::RowMap<float> shifted(x_copy.data() + 5, 2, 3, Eigen::OuterStride<>(3));
  expect_invalid([&] { loss.forward_backward(tag, x_copy.topRows(2), labels.head(2), shifted); },
                 {fn, "'grad_x'", "overlaps", "'x'"}, grad, before);
  CHECK(x_copy == x);
  Eigen::VectorXf label_storage = Eigen::VectorXf::Zero(12);
  ml::RowMap<float> grad_over_labels(label_storage.data(), 4, 3, Eigen::OuterStride<>(3));
  expect_invalid([&] { loss.forward_backward(tag, x, label_storage.head(4), grad_over_labels); },
                 {fn, "'grad_x'", "overlaps", "'labels'"}, grad, before);
  CHECK(label_storage.isZero(0));
  expect_invalid([&] { loss.forward(tag, x, to_labels({0, 1})); },
                 {"metricloss::LiftedStructureLoss<float>::forward:", "'labels'", "length 2"}, grad, before);
}

TEMPLATE_TEST_CASE("lifted structure is deterministic and reuses its scratch", "[lifted]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  std::mt19937_64 rng(51);
  const Labels labels = pk_labels(100, 5, rng);
  const Matrix<T> x = uniform_matrix<T>(100, 33, rng);
  const Labels small_labels = pk_labels(50, 3, rng);
  const Matrix<T> small = uniform_matrix<T>(50, 20, rng);
  ml::LiftedStructureLoss<T> loss(T(0.5)), fresh(T(0.5));
  Matrix<T> g1(100, 33), g2(100, 33), g_small(50, 20), g_fresh(50, 20);
  const T v1 = loss.forward_backward(tag, x, labels, g1);
  const T v_small = loss.forward_backward(tag, small, small_labels, g_small);  // warm at a larger size
  const T v2 = loss.forward_backward(tag, x, labels, g2);
  CHECK(std::memcmp(&v1, &v2, sizeof(T)) == 0);
  CHECK(std::memcmp(g1.data(), g2.data(), sizeof(T) * static_cast<std::size_t>(g1.size())) == 0);
  const T v_fresh = fresh.forward_backward(tag, small, small_labels, g_fresh);
  CHECK(std::memcmp(&v_small, &v_fresh, sizeof(T)) == 0);
  CHECK(std::memcmp(g_small.data(), g_fresh.data(), sizeof(T) * static_cast<std::size_t>(g_small.size())) == 0);

  SECTION("no heap allocation once warm") {
    const long before = allocation_count();
    const T v3 = loss.forward_backward(tag, x, labels, g2);
    const T v4 = loss.forward_backward(tag, small, small_labels, g_small);
    const T v5 = loss.forward(tag, x, labels);
    CHECK(allocation_count() - before == 0);
    CHECK(v3 == v1);
    CHECK(v4 == v_small);
    CHECK(v5 == v1);
  }
}
