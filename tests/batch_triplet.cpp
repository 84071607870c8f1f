// BatchTripletLoss: a brute-force O(N^3) reference written from API.md, finite differences for
// every mining x distance x soft_margin, simd-vs-scalar parity over sizes and strides,
// degenerate batches, a float batch at a large common offset, bad input, determinism, and
// no allocation once warm.
#include "allocation_counter.hpp"
#include "batch_triplet_reference.hpp"
#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

using namespace mltest;
using ml::Distance;
using ml::Mining;

namespace {


/// A batch whose reference gap exceeds min_gap: no selection near a tie, no hinge near its
/// kink (finite differences and float-vs-double comparisons need both).
template <class T>
Matrix<T> untied_batch(Index n, Index d, const Labels& y, double margin, Mining mining,
                       Distance distance, bool soft_margin, std::mt19937_64& rng, double min_gap,
                       double lo = -1.0, double hi = 1.0) {
  for (int attempt = 0; attempt < 30; ++attempt) {
    Matrix<T> x = uniform_matrix<T>(n, d, rng, lo, hi);
    if (brute_force(x.template cast<double>(), y, margin, mining, distance, soft_margin, 1.0).gap > min_gap)
      return x;
  }
  FAIL("no batch without near ties");
  return {};
}

/// One batch drawn by untied_batch (float: every decision 1e-5 from a tie) for labels y,
/// through the loss on `tag` against the brute force; returns the reference loss.
template <class T, class Tag>
double check_untied_batch(Tag tag, const Labels& y, Index d, double margin, Mining mining,
                          Distance distance, bool soft_margin, std::mt19937_64& rng) {
  const Index n = y.size();
  const Matrix<T> x = untied_batch<T>(n, d, y, static_cast<T>(margin), mining, distance, soft_margin, rng,
                                      std::is_same<T, float>::value ? 1e-5 : 0.0);
  ml::BatchTripletLoss<T> loss(static_cast<T>(margin), mining, distance, soft_margin);
  Matrix<T> grad(n, d);
  const T value = loss.forward_backward(tag, x, y, grad);
  const Reference r = brute_force(x.template cast<double>(), y, static_cast<T>(margin), mining, distance,
                                  soft_margin, 1.0);
  CHECK(relatively_close(value, r.loss, Tolerance<T>::loss));
  CHECK(ml::testing::compare_gradients(grad, r.grad).relative() <= Tolerance<T>::gradient);
  return r.loss;
}

const Mining all_minings[] = {Mining::all, Mining::hard, Mining::semihard};

}  // namespace

TEST_CASE("the brute-force reference knows small cases by hand", "[batch_triplet][reference]") {
  // 1-D: x = 0, 1 (class 0) and 3 (class 1); Euclidean, margin 5.
  Matrix<double> x(3, 1);
  x << 0.0, 1.0, 3.0;
  const Labels y = labels_of({0, 0, 1});
  // Triplets (a, p, n): (0, 1, 2): 1 - 3 + 5 = 3;  (1, 0, 2): 1 - 2 + 5 = 4. Anchor 2: no positive.
  for (Mining mining : all_minings) {
    CAPTURE(name_of(mining, Distance::euclidean, false));
    const Reference r = brute_force(x, y, 5.0, mining, Distance::euclidean, false, 1.0);
    CHECK(r.loss == Approx(3.5));
    // d/dx0: (0,1,2) gives -1 (d01) + 1 (d02); (1,0,2) gives -1 (d10): total -1, / 2.
    CHECK(r.grad(0, 0) == Approx(-0.5));
    // d/dx2: -1 from each triplet (d02, d12 grow with x2), / 2.
    CHECK(r.grad(2, 0) == Approx(-1.0));
  }
}

TEMPLATE_TEST_CASE("batch triplet matches the brute-force reference", "[batch_triplet]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Mining mining = GENERATE(Mining::all, Mining::hard, Mining::semihard);
  const Distance distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const bool soft_margin = GENERATE(false, true);
  const std::uint64_t seed = GENERATE(1u, 2u);
  const Index d = GENERATE(3, 17);
  CAPTURE(name_of(mining, distance, soft_margin), seed, d);
  std::mt19937_64 rng(seed);
  const Index n = 40;
  const Labels y = labels_of(random_labels(n, 5, rng));
  const double margin = distance == Distance::euclidean ? 0.3 : 0.3 * static_cast<double>(d) / 3;
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  ml::BatchTripletLoss<T> loss(static_cast<T>(margin), mining, distance, soft_margin);
  Matrix<T> grad(n, d);
  const T top_diff = T(0.75);
  const T value = loss.forward_backward(tag, x, y, grad, top_diff);
  const Reference r = brute_force(x.template cast<double>(), y, static_cast<T>(margin), mining,
                                  distance, soft_margin, top_diff);
  CAPTURE(r.gap);
  CHECK(r.loss > 0);
  CHECK(relatively_close(value, r.loss, Tolerance<T>::loss));
  CHECK(ml::testing::compare_gradients(grad, r.grad).relative() <= Tolerance<T>::gradient);
  CHECK(loss.forward(tag, x, y) == value);
}

TEMPLATE_TEST_CASE("batch triplet: a hinge at exactly 0 is inactive on every path (issue 13's case)",
                   "[batch_triplet][ties]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  Matrix<T> x(7, 1);
  x << 0, 1, 0, 2, 2, 0, 0;
  const Labels y = labels_of({1, 1, 0, 0, 0, 0, 1});
  ml::BatchTripletLoss<T> loss(T(1), Mining::all, Distance::squared_euclidean);
  Matrix<T> grad(7, 1);
  const T value = loss.forward_backward(tag, x, y, grad);
  // 104 summed over the 44 triplets with a positive hinge; four more sit exactly at 0 (the
  // simd path counted two of them: 104/46).
  const Reference r = brute_force(x.template cast<double>(), y, 1.0, Mining::all,
                                  Distance::squared_euclidean, false, 1.0);
  CHECK(r.zero_hinges == 4);
  CHECK(r.loss == Approx(104.0 / 44.0).epsilon(1e-15));
  CHECK(relatively_close(value, 104.0 / 44.0, Tolerance<T>::loss));
  CHECK(ml::testing::compare_gradients(grad, r.grad).relative() <= Tolerance<T>::gradient);
}

/// The tie regime: integer grids, duplicated rows, classes of one, integer margins (hinges
/// at exactly 0), negatives tied with positives, with and without a large common offset.
template <class T, class Tag>
void check_tie_regime(Tag tag, Mining mining, Distance distance, bool soft_margin,
                      std::uint64_t seed, Index& zero_hinges, Index& tied_selections) {
  std::mt19937_64 rng(seed);
  const Index shapes[][2] = {{7, 1}, {12, 2}, {30, 3}, {48, 2}, {40, 5}, {23, 17}};
  const auto& shape = shapes[seed % 6];
  const Index n = shape[0], d = shape[1];
  const bool small_grid = seed % 2 == 0;
  const double offset = (seed / 2) % 3 == 0 ? 0.0 : (seed / 2) % 3 == 1 ? 100.0 : 1e4;
  const double margin = distance == Distance::euclidean ? 1.0 : (seed % 3 == 0 ? 1.0 : 2.0);
  const int classes = static_cast<int>(seed % 4) + 1;
  CAPTURE(seed, n, d, offset, margin, classes, small_grid);
  const Matrix<T> x = tied_matrix<T>(n, d, rng, small_grid ? 0 : -2, small_grid ? 2 : 3, offset);
  const Labels y = labels_of(tied_labels(n, classes, rng));
  ml::BatchTripletLoss<T> loss(static_cast<T>(margin), mining, distance, soft_margin);
  Matrix<T> grad(n, d);
  const T top_diff = T(1.5);
  const T value = loss.forward_backward(tag, x, y, grad, top_diff);
  const Reference r = brute_force(x.template cast<double>(), y, margin, mining, distance,
                                  soft_margin, top_diff);
  CAPTURE(value, r.loss, r.zero_hinges, r.tied_selections);
  zero_hinges += r.zero_hinges;
  tied_selections += r.tied_selections;
  CHECK(relatively_close(value, r.loss, Tolerance<T>::loss, 1e-30));
  CHECK(ml::testing::compare_gradients(grad, r.grad).relative(1e-30) <= Tolerance<T>::gradient);
  CHECK(loss.forward(tag, x, y) == value);
}

TEMPLATE_TEST_CASE("batch triplet follows the tie rules on tie-heavy data", "[batch_triplet][ties]",
                   ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Mining mining = GENERATE(Mining::all, Mining::hard, Mining::semihard);
  const Distance distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const bool soft_margin = GENERATE(false, true);
  CAPTURE(name_of(mining, distance, soft_margin));
  Index zero_hinges = 0, tied_selections = 0;
  for (std::uint64_t seed = 1; seed <= 36; ++seed)
    check_tie_regime<T>(tag, mining, distance, soft_margin, seed, zero_hinges, tied_selections);
  // The regime exercises the rules it tests.
  if (!soft_margin) CHECK(zero_hinges > 0);
  if (mining != Mining::all) CHECK(tied_selections > 0);
}

TEMPLATE_TEST_CASE("batch triplet gradients match finite differences", "[batch_triplet][gradcheck]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const Mining mining = GENERATE(Mining::all, Mining::hard, Mining::semihard);
  const Distance distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const bool soft_margin = GENERATE(false, true);
  const Index d = GENERATE(1, 6);
  CAPTURE(name_of(mining, distance, soft_margin), d);
  std::mt19937_64 rng(100u + static_cast<std::uint64_t>(d));
  const Index n = 13;
  const Labels y = labels_of({0, 1, 2, 0, 1, 2, 0, 1, 0, 3, 1, 2, 0});
  const double margin = distance == Distance::euclidean ? 0.4 : 0.3 * static_cast<double>(d) / 3;
  const Matrix<double> x = untied_batch<double>(n, d, y, margin, mining, distance, soft_margin, rng, 1e-4);
  ml::BatchTripletLoss<double> loss(margin, mining, distance, soft_margin);
  const double top_diff = 1.3;
  Matrix<double> grad(n, d);
  loss.forward_backward(tag, x, y, grad, top_diff);
  const auto f = [&](const Matrix<double>& z) { return loss.forward(tag, z, y); };
  const Matrix<double> numerical = top_diff * ml::testing::numerical_gradient(f, x);
  CHECK(grad.cwiseAbs().maxCoeff() > 0);
  CHECK(ml::testing::compare_gradients(grad, numerical).relative() <= Tolerance<double>::finite_difference);
  // Linearisation along a random direction.
  const Matrix<double> v = ml::testing::random_direction(n, d, rng);
  const double slope = ml::testing::directional_derivative(f, x, v);
  CHECK(relatively_close(top_diff * slope, (grad.array() * v.array()).sum(), 1e-6, 1e-3));
}

TEMPLATE_TEST_CASE("batch triplet simd agrees with scalar over sizes and strides",
                   "[batch_triplet][parity]", float, double) {
  using T = TestType;
  const Index d = GENERATE(1, 3, 17, 128);
  const Index n = GENERATE(2, 7, 33, 130);
  const Index pad = GENERATE(0, 3);
  const Mining mining = GENERATE(Mining::all, Mining::hard, Mining::semihard);
  const Distance distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const bool soft_margin = GENERATE(false, true);
  const std::uint64_t seed = 3000u + static_cast<std::uint64_t>(d * 7 + n);
  CAPTURE(d, n, pad, seed, name_of(mining, distance, soft_margin));
  std::mt19937_64 rng(seed);
  const Labels y = labels_of(random_labels(n, std::max<int>(2, static_cast<int>(n / 4)), rng));
  const double margin = distance == Distance::euclidean ? 0.3 : 0.1 * static_cast<double>(d);
  // Offset 6: the product must handle it. In float the paths' distances differ by ~1e-7
  // relative, so a selection or a hinge within that of a tie may go either way: float
  // batches are drawn with every decision 1e-6 of the distances' scale away from a tie.
  // For N = 130 at D <= 3 no such batch exists (tens of thousands of decisions on a few
  // distinct distance values); double covers those sizes.
  const bool single = std::is_same<T, float>::value;
  if (single && n > 33 && d <= 3) return;
  const double scale = distance == Distance::euclidean ? std::sqrt(0.67 * static_cast<double>(d))
                                                       : 0.67 * static_cast<double>(d);
  const Matrix<T> x = untied_batch<T>(n, d, y, static_cast<T>(margin), mining, distance, soft_margin, rng,
                                      single ? 1e-6 * scale : 0.0, 5.0, 7.0);
  ml::BatchTripletLoss<T> loss(static_cast<T>(margin), mining, distance, soft_margin);
  const T sentinel = T(-12345);
  Strided<T> xs(x, pad, sentinel);
  const Strided<T> zero(Matrix<T>::Zero(n, d), pad, sentinel);
  Strided<T> g_scalar = zero, g_simd = zero;
  const T scalar_value = loss.forward_backward(ml::scalar, xs.cmap(), y, g_scalar.map(), T(2));
  const T simd_value = loss.forward_backward(ml::simd, xs.cmap(), y, g_simd.map(), T(2));
  CHECK(relatively_close(simd_value, scalar_value, Tolerance<T>::loss, 1e-12));
  CHECK(ml::testing::compare_gradients(g_simd.map(), g_scalar.map()).relative(1e-30) <= Tolerance<T>::gradient);
  CHECK(g_scalar.padding_is(sentinel));
  CHECK(g_simd.padding_is(sentinel));
  // And both against the brute force.
  const Reference r = brute_force(x.template cast<double>(), y, static_cast<T>(margin), mining, distance,
                                  soft_margin, 2.0);
  CHECK(relatively_close(scalar_value, r.loss, Tolerance<T>::loss, 1e-12));
  CHECK(ml::testing::compare_gradients(g_scalar.map(), r.grad).relative(1e-30) <= Tolerance<T>::gradient);
}

TEMPLATE_TEST_CASE("batch triplet soft margin at every distance scale", "[batch_triplet][numerics]",
                   ALL_CASES) {
  // Mining::all with soft_margin: the simd path takes exp(-|x|) from per-row factors where a
  // row's distances and thresholds span little enough, else one exp per entry with its
  // argument clamped; at the large scales many softplus terms underflow to 0 and others are
  // in the thousands.
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Distance distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const double scale = GENERATE(0.01, 1.0, 30.0, 300.0);
  CAPTURE(name_of(Mining::all, distance, true), scale);
  std::mt19937_64 rng(123);
  const Index n = 45, d = 12;
  const Labels y = labels_of(random_labels(n, 6, rng));
  const Matrix<T> x = uniform_matrix<T>(n, d, rng, -scale, scale);
  ml::BatchTripletLoss<T> loss(T(0.2), Mining::all, distance, true);
  Matrix<T> grad(n, d);
  const T value = loss.forward_backward(tag, x, y, grad);
  const Reference r = brute_force(x.template cast<double>(), y, T(0.2), Mining::all, distance, true, 1.0);
  CHECK(relatively_close(value, r.loss, Tolerance<T>::loss));
  CHECK(ml::testing::compare_gradients(grad, r.grad).relative() <= Tolerance<T>::gradient);
  CHECK(loss.forward(tag, x, y) == value);
}

TEMPLATE_TEST_CASE("batch triplet with large classes", "[batch_triplet]", ALL_CASES) {
  // More than 16 positives per anchor: the buckets come from a binary search per negative
  // rather than one pass per positive.
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Mining mining = GENERATE(Mining::all, Mining::hard, Mining::semihard);
  const bool soft_margin = GENERATE(false, true);
  const Distance distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  CAPTURE(name_of(mining, distance, soft_margin));
  std::mt19937_64 rng(97);
  const Index n = 70, d = 9;
  const Labels y = labels_of(random_labels(n, 2, rng));
  const double margin = distance == Distance::euclidean ? 0.3 : 1.0;
  check_untied_batch<T>(tag, y, d, margin, mining, distance, soft_margin, rng);
}

TEMPLATE_TEST_CASE("batch triplet at the boundary between row scans and buckets", "[batch_triplet]",
                   ALL_CASES) {
  // Anchors with 16 positives take one scan per positive (MiningScans), with 17 the bucket
  // sweeps; one batch holds both, and classes of 1 to 3 beside them.
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Mining mining = GENERATE(Mining::all, Mining::hard, Mining::semihard);
  const bool soft_margin = GENERATE(false, true);
  const Distance distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const std::uint64_t seed = 515;
  CAPTURE(name_of(mining, distance, soft_margin), seed);
  std::mt19937_64 rng(seed);
  std::vector<std::int64_t> labels;
  for (int c : {17, 18, 1, 2, 3})
    for (int r = 0; r < c; ++r) labels.push_back(c);
  std::shuffle(labels.begin(), labels.end(), rng);
  const Labels y = labels_of(labels);
  const double margin = distance == Distance::euclidean ? 0.3 : 0.5;
  CHECK(check_untied_batch<T>(tag, y, 6, margin, mining, distance, soft_margin, rng) > 0);
}

TEMPLATE_TEST_CASE("the simd path's sparse W gives the gradient of the dense W", "[batch_triplet]",
                   float, double) {
  // Hard and semihard keep W as a list of entries applied by differences; all keeps it
  // dense (SplitWeights). The same entries, by add, add_row and add_row_lanes, must give
  // the same gradient.
  using T = TestType;
  const std::uint64_t seed = 77;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index n = 37, d = 19;
  Matrix<T> x = uniform_matrix<T>(n, d, rng, 4.0, 6.0);
  x.row(5) = x.row(2);  // a close pair: SplitWeights takes it by differences too
  const auto view = ml::detail::input_view(x);
  ml::detail::SimdBatchTripletScratch<T> dense_work, sparse_work;
  dense_work.pairwise.compute(view);
  sparse_work.pairwise.compute(view);
  ml::detail::SplitWeights<T> dense(dense_work, view);
  ml::detail::SparseWeights<T> sparse(sparse_work, view);
  std::uniform_int_distribution<Index> row(0, n - 1);
  std::uniform_real_distribution<double> weight(-2.0, 2.0);
  for (int e = 0; e < 50; ++e) {
    const Index i = row(rng), j = row(rng);
    const double w = weight(rng);
    dense.add(i, j, w);
    sparse.add(i, j, w);
  }
  dense.add(2, 5, 0.25);
  sparse.add(2, 5, 0.25);
  std::vector<double> wide(static_cast<std::size_t>(n));
  std::vector<T> narrow(static_cast<std::size_t>(n));
  for (Index j = 0; j < n; ++j) {
    wide[static_cast<std::size_t>(j)] = j % 3 == 0 ? 0.0 : weight(rng);
    narrow[static_cast<std::size_t>(j)] = j % 4 == 0 ? T(0) : static_cast<T>(weight(rng));
  }
  dense.add_row(7, wide.data(), n);
  sparse.add_row(7, wide.data(), n);
  dense.add_row_lanes(11, narrow.data(), n);
  sparse.add_row_lanes(11, narrow.data(), n);
  Matrix<T> g_dense(n, d), g_sparse(n, d);
  dense.gradient(dense_work.pairwise, 0.7, ml::detail::output_view(g_dense));
  sparse.gradient(sparse_work.pairwise, 0.7, ml::detail::output_view(g_sparse));
  const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-12;
  CHECK(ml::testing::compare_gradients(g_sparse, g_dense.template cast<double>()).relative(1e-30) <= tol);
  CHECK(g_sparse.norm() > 0);
}

TEMPLATE_TEST_CASE("batch triplet on degenerate batches", "[batch_triplet][degenerate]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Mining mining = GENERATE(Mining::all, Mining::hard, Mining::semihard);
  const Distance distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const bool soft_margin = GENERATE(false, true);
  CAPTURE(name_of(mining, distance, soft_margin));
  ml::BatchTripletLoss<T> loss(T(0.5), mining, distance, soft_margin);
  std::mt19937_64 rng(61);
  auto expect_zero = [&](const Matrix<T>& x, const Labels& y) {
    Matrix<T> grad = Matrix<T>::Constant(x.rows(), x.cols(), T(7));
    CHECK(loss.forward_backward(tag, x, y, grad) == T(0));
    CHECK(grad.isZero(0));
  };
  SECTION("one class: nothing to average") {
    expect_zero(uniform_matrix<T>(6, 4, rng), labels_of({3, 3, 3, 3, 3, 3}));
  }
  SECTION("all labels distinct: no positives") {
    expect_zero(uniform_matrix<T>(6, 4, rng), labels_of({0, 1, 2, 3, 4, 5}));
  }
  SECTION("N = 1") { expect_zero(uniform_matrix<T>(1, 3, rng), labels_of({0})); }
  SECTION("N = 2, one class and two classes") {
    expect_zero(uniform_matrix<T>(2, 3, rng), labels_of({1, 1}));
    expect_zero(uniform_matrix<T>(2, 3, rng), labels_of({1, 2}));
  }
  SECTION("singletons beside a pair") {
    Matrix<T> x = uniform_matrix<T>(4, 2, rng);
    const Labels y = labels_of({0, 1, 0, 2});
    Matrix<T> grad(4, 2);
    const T value = loss.forward_backward(tag, x, y, grad);
    const Reference r = brute_force(x.template cast<double>(), y, 0.5, mining, distance, soft_margin, 1.0);
    CHECK(relatively_close(value, r.loss, Tolerance<T>::loss, 1e-12));
    CHECK(ml::testing::compare_gradients(grad, r.grad).relative(1e-30) <= Tolerance<T>::gradient);
  }
  SECTION("coincident points: loss from the margin, zero gradient") {
    const Matrix<T> x = Matrix<T>::Constant(6, 3, T(0.25));
    const Labels y = labels_of({0, 0, 1, 1, 2, 2});
    Matrix<T> grad(6, 3);
    const T value = loss.forward_backward(tag, x, y, grad);
    const double expected = soft_margin ? std::log1p(std::exp(0.5)) : 0.5;
    CHECK(relatively_close(value, expected, Tolerance<T>::loss));
    CHECK(grad.isZero(0));
  }
  SECTION("coincident positives among distinct points") {
    Matrix<T> x = uniform_matrix<T>(8, 5, rng);
    x.row(4) = x.row(0);
    x.row(5) = x.row(0);
    const Labels y = labels_of({0, 1, 2, 1, 0, 0, 2, 1});
    Matrix<T> grad(8, 5);
    const T value = loss.forward_backward(tag, x, y, grad);
    CHECK(grad.allFinite());
    const Reference r = brute_force(x.template cast<double>(), y, 0.5, mining, distance, soft_margin, 1.0);
    CHECK(relatively_close(value, r.loss, Tolerance<T>::loss, 1e-12));
    CHECK(ml::testing::compare_gradients(grad, r.grad).relative(1e-30) <= Tolerance<T>::gradient);
  }
  SECTION("nearly coincident points stay finite and accurate") {
    Matrix<T> x = Matrix<T>::Constant(6, 4, T(3));
    x(1, 0) += T(1e-3);  // a close positive pair: its product term would cancel
    x(2, 1) += T(1);
    x(3, 1) += T(1.1);
    x(4, 2) += T(2);
    x(5, 3) += T(1e-30);
    const Labels y = labels_of({0, 0, 1, 1, 2, 2});
    Matrix<T> grad(6, 4);
    const T value = loss.forward_backward(tag, x, y, grad);
    CHECK(grad.allFinite());
    const Reference r = brute_force(x.template cast<double>(), y, 0.5, mining, distance, soft_margin, 1.0);
    CHECK(relatively_close(value, r.loss, Tolerance<T>::loss, 1e-12));
    CHECK(ml::testing::compare_gradients(grad, r.grad).relative(1e-30) <= Tolerance<T>::gradient);
  }
  SECTION("margin 0") {
    ml::BatchTripletLoss<T> zero_margin(T(0), mining, distance, soft_margin);
    const Matrix<T> x = uniform_matrix<T>(6, 3, rng);
    CHECK(std::isfinite(zero_margin.forward(tag, x, labels_of({0, 0, 1, 1, 2, 2}))));
  }
  SECTION("NaN in the data or the labels propagates") {
    Matrix<T> x = uniform_matrix<T>(5, 3, rng);
    Matrix<T> grad(5, 3);
    Eigen::Matrix<T, Eigen::Dynamic, 1> y(5);
    y << T(0), T(0), T(1), T(1), T(2);
    y(4) = std::numeric_limits<T>::quiet_NaN();
    CHECK(std::isnan(loss.forward_backward(tag, x, y, grad)));
    CHECK(grad.array().isNaN().all());
    y(4) = T(2);
    x(3, 1) = std::numeric_limits<T>::infinity();
    CHECK(std::isnan(loss.forward_backward(tag, x, y, grad)));
    CHECK(grad.array().isNaN().all());
  }
}

TEMPLATE_TEST_CASE("semihard never takes a negative tied with the positive for a farther one",
                   "[batch_triplet][semihard][degenerate]", ALL_CASES) {
  // A negative that duplicates a positive row has d_an == d_ap exactly: not "farther". The
  // product's distances carry rounding (here at offset 100), so a path that compared them
  // with exact ones would take the duplicate and pay the whole margin (first seen on CUDA).
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Distance distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const bool soft_margin = GENERATE(false, true);
  const std::uint64_t seed = GENERATE(71u, 72u, 73u);
  CAPTURE(distance == Distance::euclidean, soft_margin, seed);
  std::mt19937_64 rng(seed);
  const Index n = 40, d = 16;
  Labels y(n);
  for (Index i = 0; i < n; ++i) y(i) = i % 5;
  Matrix<T> x = uniform_matrix<T>(n, d, rng, 99.0, 101.0);
  for (Index j = 2; j < n; j += 6) x.row(j) = x.row(j - 1);  // labels differ by one
  const double margin = distance == Distance::euclidean ? 0.5 : 2.0;
  ml::BatchTripletLoss<T> loss(static_cast<T>(margin), Mining::semihard, distance, soft_margin);
  Matrix<T> grad(n, d);
  const T value = loss.forward_backward(tag, x, y, grad);
  const Reference r = brute_force(x.template cast<double>(), y, margin, Mining::semihard, distance,
                                  soft_margin, 1.0);
  CHECK(relatively_close(value, r.loss, Tolerance<T>::loss));
  CHECK(ml::testing::compare_gradients(grad, r.grad).relative() <= Tolerance<T>::gradient);
}

TEMPLATE_TEST_CASE("semihard and hard settle near-ties on exact distances in float",
                   "[batch_triplet][semihard][degenerate]", ALL_CASES) {
  // Unit rows of a small integer grid with repeated rows: negatives whose distances to an
  // anchor differ by a few 1e-8 relative, below float's resolution of a distance computed in
  // float. Selection must follow the exact (double) distances of the float inputs, as the
  // scalar path and reference sets do: the simd batch path once settled these ties on float
  // lane sums and took the farther negative (found by the sharded tests: semihard, D = 33,
  // anchor 6, negatives 5 and 8 at 2.00000014 and 2.00000007).
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Mining mining = GENERATE(Mining::semihard, Mining::hard);
  const Distance distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const std::uint64_t seed = GENERATE(20261236u, 11u, 12u, 13u);
  CAPTURE(seed, distance == Distance::euclidean, mining == Mining::hard);
  std::mt19937_64 rng(seed);
  const Index n = 18, d = 33;
  // Float values for both types: the exact distances of float inputs are separated by far
  // more than double's rounding, so every path can resolve them (double-valued unit rows
  // have "ties" at 1e-16 that no summation order settles the same way).
  Matrix<float> grid = tied_matrix<float>(n, d, rng, -2, 2);
  for (Index i = 0; i < n; ++i) {
    double norm = 0;
    for (Index k = 0; k < d; ++k) norm += static_cast<double>(grid(i, k)) * static_cast<double>(grid(i, k));
    for (Index k = 0; k < d; ++k) grid(i, k) = static_cast<float>(static_cast<double>(grid(i, k)) / std::sqrt(norm));
  }
  const Matrix<T> x = grid.template cast<T>();
  Labels y(n);
  for (Index i = 0; i < n; ++i) y(i) = (i * 7) % 4;
  y(0) = 100;
  y(16) = y(17) = 7;
  ml::BatchTripletLoss<T> loss(T(0.2), mining, distance);
  Matrix<T> grad(n, d);
  const T value = loss.forward_backward(tag, x, y, grad);
  const Reference r = brute_force(x.template cast<double>(), y, 0.2, mining, distance, false, 1.0);
  CHECK(relatively_close(value, r.loss, Tolerance<T>::loss));
  CHECK(ml::testing::compare_gradients(grad, r.grad).relative() <= Tolerance<T>::gradient);
}

TEMPLATE_TEST_CASE("batch triplet accepts labels of any arithmetic type", "[batch_triplet]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  std::mt19937_64 rng(71);
  const Matrix<double> x = uniform_matrix<double>(9, 4, rng);
  Eigen::VectorXi y32(9);
  y32 << 5, -1, 5, 7, -1, 7, 5, 2, 2;
  const Labels y64 = y32.cast<std::int64_t>();
  const Eigen::VectorXf yf = y32.cast<float>();
  const Eigen::VectorXd yd = y32.cast<double>();
  const Eigen::Matrix<std::uint8_t, Eigen::Dynamic, 1> y8 = (y32.array() + 1).cast<std::uint8_t>();
  ml::BatchTripletLoss<double> loss(0.3, Mining::semihard);
  const double value = loss.forward(tag, x, y32);
  CHECK(loss.forward(tag, x, y64) == value);
  CHECK(loss.forward(tag, x, yf) == value);
  CHECK(loss.forward(tag, x, yd) == value);
  CHECK(loss.forward(tag, x, y8) == value);
  // A label column of a larger matrix (inner stride 2).
  Eigen::Matrix<int, Eigen::Dynamic, 2> two(9, 2);
  two.col(0) = y32;
  two.col(1).setZero();
  CHECK(loss.forward(tag, x, two.col(0)) == value);
}

TEMPLATE_TEST_CASE("batch triplet in float is accurate at a large common offset",
                   "[batch_triplet][numerics]", ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const Mining mining = GENERATE(Mining::all, Mining::hard, Mining::semihard);
  const Distance distance = GENERATE(Distance::euclidean, Distance::squared_euclidean);
  const bool soft_margin = GENERATE(false, true);
  CAPTURE(name_of(mining, distance, soft_margin));
  std::mt19937_64 rng(81);
  const Index n = 64, d = 128;
  Labels y(n);
  for (Index i = 0; i < n; ++i) y(i) = i % 8;  // 8 classes of 8
  // d ~ 0.46 +- 0.02, q ~ 0.21 +- 0.02: a margin that leaves many triplets active, not all.
  // No decision within 1e-6 of a tie: float distances are good to ~1e-7 here.
  const float margin = 0.02f;
  const Matrix<float> x = untied_batch<float>(n, d, y, margin, mining, distance, soft_margin, rng, 1e-6,
                                              99.95, 100.05);
  ml::BatchTripletLoss<float> loss(margin, mining, distance, soft_margin);
  Matrix<float> grad(n, d);
  const float value = loss.forward_backward(tag, x, y, grad);
  const Reference r = brute_force(x.cast<double>(), y, margin, mining, distance, soft_margin, 1.0);
  CAPTURE(r.gap);
  CHECK(r.loss > 0);
  CHECK(relatively_close(value, r.loss, Tolerance<float>::loss));
  CHECK(ml::testing::compare_gradients(grad, r.grad).relative() <= Tolerance<float>::gradient);
}

TEMPLATE_TEST_CASE("batch triplet computes the gradient only when asked", "[batch_triplet]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Mining mining = GENERATE(Mining::all, Mining::hard, Mining::semihard);
  std::mt19937_64 rng(91);
  const Matrix<T> x = uniform_matrix<T>(20, 9, rng);
  const Labels y = labels_of(random_labels(20, 4, rng));
  ml::BatchTripletLoss<T> loss(T(0.3), mining);
  Matrix<T> grad(20, 9);
  const T full = loss.forward_backward(tag, x, y, grad);
  CHECK(loss.forward_backward(tag, x, y, ml::skip) == full);
  CHECK(loss.forward(tag, x, y) == full);
  // top_diff scales the gradient only.
  Matrix<T> scaled(20, 9);
  CHECK(loss.forward_backward(tag, x, y, scaled, T(-2)) == full);
  CHECK(ml::testing::compare_gradients(scaled, (T(-2) * grad).eval()).relative() <= Tolerance<T>::gradient);
}

TEMPLATE_TEST_CASE("batch triplet rejects bad input and writes nothing", "[batch_triplet][errors]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  std::mt19937_64 rng(41);
  Matrix<float> x = uniform_matrix<float>(4, 3, rng);
  const Eigen::VectorXi y = Eigen::VectorXi::LinSpaced(4, 0, 1);
  Matrix<float> grad = Matrix<float>::Constant(4, 3, 9.0f);
  const Matrix<float> before = grad;
  ml::BatchTripletLoss<float> loss;
  const char* fn = "metricloss::BatchTripletLoss<float>::forward_backward";
  expect_invalid([&] { loss.forward_backward(tag, x, Eigen::VectorXi::Zero(3).eval(), grad); },
                 {fn, "'labels'", "length 3", "expected 4", "'x'"}, grad, before);
  expect_invalid([&] { loss.forward_backward(tag, Matrix<float>(0, 3), Eigen::VectorXi(0), grad); },
                 {fn, "'x'", "0x3", "N >= 1"}, grad, before);
  expect_invalid([&] { loss.forward_backward(tag, Matrix<float>(4, 0), y, grad); },
                 {fn, "'x'", "4x0", "D >= 1"}, grad, before);
  Matrix<float> small(3, 3);
  expect_invalid([&] { loss.forward_backward(tag, x, y, small); }, {fn, "'grad_x'", "3x3", "4x3"}, grad,
                 before);
  expect_invalid([&] { loss.forward_backward(tag, x, y, Matrix<float>(4, 4)); },
                 {fn, "'grad_x'", "4x4", "4x3"}, grad, before);
  for (float bad : {-1.0f, std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    ml::BatchTripletLoss<float> bad_loss(bad);
    expect_invalid([&] { bad_loss.forward_backward(tag, x, y, grad); }, {fn, "'margin'"}, grad, before);
  }
  ml::BatchTripletLoss<float> bad_mining(0.2f, static_cast<Mining>(9));
  expect_invalid([&] { bad_mining.forward_backward(tag, x, y, grad); }, {fn, "'mining'"}, grad, before);
  ml::BatchTripletLoss<float> bad_distance(0.2f, Mining::all, static_cast<Distance>(-1));
  expect_invalid([&] { bad_distance.forward_backward(tag, x, y, grad); }, {fn, "'distance'"}, grad, before);
  // Overlaps: the gradient aliasing x or the labels.
  Matrix<float> x_copy = x;
  expect_invalid([&] { loss.forward_backward(tag, x_copy, y, x_copy); }, {fn, "'grad_x'", "overlaps", "'x'"},
                 grad, before);
  ml::RowMap<float> shifted(x_copy.data() + 5, 2, 3, Eigen::OuterStride<>(3));
  expect_invalid([&] { loss.forward_backward(tag, x_copy.topRows(2), y.head(2), shifted); },
                 {fn, "'grad_x'", "overlaps", "'x'"}, grad, before);
  Eigen::VectorXf labels_storage(12);
  labels_storage.head(4) << 0, 0, 1, 1;
  ml::RowMap<float> grad_over_labels(labels_storage.data(), 4, 3, Eigen::OuterStride<>(3));
  expect_invalid([&] { loss.forward_backward(tag, x, labels_storage.head(4), grad_over_labels); },
                 {fn, "'grad_x'", "overlaps", "'labels'"}, grad, before);
  CHECK(x == x_copy);
  expect_invalid([&] { loss.forward(tag, x, Eigen::VectorXi::Zero(5).eval()); }, {"'labels'", "length 5"},
                 grad, before);
}

TEMPLATE_TEST_CASE("batch triplet is deterministic and allocates nothing once warm",
                   "[batch_triplet]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const Mining mining = GENERATE(Mining::all, Mining::hard, Mining::semihard);
  const bool soft_margin = GENERATE(false, true);
  CAPTURE(name_of(mining, Distance::euclidean, soft_margin));
  std::mt19937_64 rng(51);
  const Index n = 300, d = 33;  // big enough for the tiled products
  const Matrix<T> x = uniform_matrix<T>(n, d, rng);
  const Labels y = labels_of(random_labels(n, 40, rng));
  ml::BatchTripletLoss<T> loss(T(0.3), mining, Distance::euclidean, soft_margin);
  Matrix<T> g1(n, d), g2(n, d);
  const T v1 = loss.forward_backward(tag, x, y, g1);
  const long before = allocation_count();
  const T v2 = loss.forward_backward(tag, x, y, g2);
  const T v3 = loss.forward_backward(tag, x.topRows(n - 10), y.head(n - 10), g2.topRows(n - 10));
  const long allocated = allocation_count() - before;
  CHECK(allocated == 0);
  CHECK(std::isfinite(v3));
  loss.forward_backward(tag, x, y, g2);
  CHECK(std::memcmp(&v1, &v2, sizeof(T)) == 0);
  CHECK(std::memcmp(g1.data(), g2.data(), sizeof(T) * static_cast<std::size_t>(g1.size())) == 0);
}
