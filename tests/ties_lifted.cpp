// LiftedStructureLoss under exact ties (issue 13): integer and half grids, optionally at a
// large common offset, duplicated rows (D = 0, within a class and across classes), classes
// of one, and margins at which a negative's exponent margin - D_ik + D_ij is exactly 0.
// simd and scalar are each compared with a brute-force double reference written from
// API.md's formula (every pair, every negative of both ends, no factorisation), float and
// double, at API.md's tolerances, and with each other. Every input is exact in T and every
// squared distance exact in double, so no path has a rounding excuse to decide a pair, a
// negative set or a zero distance differently.
#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

using namespace mltest;

namespace {

using Labels = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>;

/// API.md's formula by brute force, in double, on exact squared distances:
///   J_ij = log(sum_{k: y_k != y_i} e^{m - D_ik} + sum_{l: y_l != y_j} e^{m - D_jl}) + D_ij,
///   L = 1/(2|P|) sum_{i<j, y_i = y_j} max(J_ij, 0)^2,
/// with dL/dJ_ij = J_ij / |P| (J > 0), dJ/dD_ij = 1, dJ/dD_rk = -(its soft-max weight), and
/// dD_ab/dx_a = (x_a - x_b) / D_ab, 0 where D_ab = 0. No negatives: J = -inf, adds 0.
struct Reference {
  double loss = 0.0;
  Matrix<double> grad;
  Index pairs = 0;
  Index pairs_without_negatives = 0;
  Index active_pairs = 0;
  Index zero_distances = 0;        // off-diagonal D = 0 entries (coincident rows)
  Index zero_negatives = 0;        // of those, across classes (a negative at D = 0)
  Index inactive_pairs = 0;        // J <= 0 (with negatives)
  Index exponents_at_zero = 0;     // margin - D_ek + D_ij == 0 exactly, e an end of a pair
};

Reference brute_force(const Matrix<double>& x, const Labels& y, double margin, double top_diff) {
  const Index n = x.rows();
  Reference r;
  r.grad = Matrix<double>::Zero(n, x.cols());
  const auto distance = [&](Index a, Index b) { return (x.row(a) - x.row(b)).norm(); };
  const auto add = [&](Index a, Index b, double coefficient) {
    const double dab = distance(a, b);
    if (dab == 0.0) return;  // subgradient 0 at D = 0
    r.grad.row(a) += coefficient / dab * (x.row(a) - x.row(b));
    r.grad.row(b) -= coefficient / dab * (x.row(a) - x.row(b));
  };
  for (Index a = 0; a < n; ++a)
    for (Index b = a + 1; b < n; ++b)
      if (distance(a, b) == 0.0) {
        ++r.zero_distances;
        if (y(a) != y(b)) ++r.zero_negatives;
      }
  double sum = 0.0;
  for (Index i = 0; i < n; ++i)
    for (Index j = i + 1; j < n; ++j) {
      if (y(i) != y(j)) continue;
      ++r.pairs;
      double largest = -std::numeric_limits<double>::infinity();
      for (Index e : {i, j})
        for (Index k = 0; k < n; ++k)
          if (y(k) != y(e)) largest = std::max(largest, margin - distance(e, k));
      if (largest == -std::numeric_limits<double>::infinity()) {
        ++r.pairs_without_negatives;
        continue;
      }
      double total = 0.0;
      for (Index e : {i, j})
        for (Index k = 0; k < n; ++k)
          if (y(k) != y(e)) total += std::exp(margin - distance(e, k) - largest);
      for (Index e : {i, j})
        for (Index k = 0; k < n; ++k)
          if (y(k) != y(e) && margin - distance(e, k) + distance(i, j) == 0.0) ++r.exponents_at_zero;
      const double J = largest + std::log(total) + distance(i, j);
      if (!(J > 0.0)) {
        ++r.inactive_pairs;
        continue;
      }
      ++r.active_pairs;
      sum += J * J;
      add(i, j, J);
      for (Index e : {i, j})
        for (Index k = 0; k < n; ++k)
          if (y(k) != y(e)) add(e, k, -J * std::exp(margin - distance(e, k) - largest) / total);
    }
  if (r.pairs > 0) {
    r.loss = sum / (2.0 * static_cast<double>(r.pairs));
    r.grad *= top_diff / static_cast<double>(r.pairs);
  }
  return r;
}

/// A tie-heavy batch: values on a small grid plus a common offset (exact in float at every
/// step used), about a third of the rows copies of earlier rows (some one grid step away),
/// `classes` classes with about one row in six in a class of its own.
struct TieBatch {
  Matrix<double> x;
  Labels y;
};

TieBatch tie_batch(Index n, Index d, int grid, double offset, int classes, std::mt19937_64& rng) {
  TieBatch b;
  b.x.resize(n, d);
  b.y.resize(n);
  std::uniform_int_distribution<int> byte(0, 255);
  const auto grid_value = [&](int v) {
    switch (grid) {
      case 0: return static_cast<double>(v % 5) - 2.0;    // {-2..2}
      case 1: return static_cast<double>(v % 4);          // {0..3}
      case 2: return static_cast<double>(v % 2);          // {0, 1}
      default: return static_cast<double>(v % 5) / 2.0 - 1.0;  // halves in [-1, 1]
    }
  };
  for (Index i = 0; i < n; ++i) {
    const int how = byte(rng);
    const Index source = i > 0 ? static_cast<Index>(byte(rng)) % i : 0;
    for (Index c = 0; c < d; ++c) {
      if (i > 0 && how < 64)
        b.x(i, c) = b.x(source, c);  // a duplicate
      else if (i > 0 && how < 96)      // one grid step from an earlier row
        b.x(i, c) = b.x(source, c) + (c == static_cast<Index>(how) % d ? 1.0 : 0.0);
      else
        b.x(i, c) = offset + grid_value(byte(rng));
    }
    const int label = byte(rng);
    b.y(i) = label < 42 ? 1000 + i : label % classes;
  }
  return b;
}

/// Margins that put exponents exactly at 0: D_ik - D_ij for a positive pair (i, j) and a
/// negative k of i, where both are whole numbers (a 1-D batch, or Pythagorean luck).
double margin_at_a_tie(const TieBatch& b, std::mt19937_64& rng) {
  const Index n = b.x.rows();
  std::vector<double> candidates;
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j) {
      if (j == i || b.y(j) != b.y(i)) continue;
      const double dij = (b.x.row(i) - b.x.row(j)).norm();
      for (Index k = 0; k < n; ++k) {
        if (b.y(k) == b.y(i)) continue;
        const double dik = (b.x.row(i) - b.x.row(k)).norm();
        if (dij == std::floor(dij) && dik == std::floor(dik) && dik >= dij) candidates.push_back(dik - dij);
      }
    }
  if (candidates.empty()) return 1.0;
  return candidates[std::uniform_int_distribution<std::size_t>(0, candidates.size() - 1)(rng)];
}

struct PathResult {
  double loss = 0.0, forward_only = 0.0;
  Matrix<double> grad;
};

template <class T, class Tag>
PathResult run_path(Tag tag, const Matrix<T>& x, const Labels& y, double margin, double top_diff,
                    Index pad) {
  ml::LiftedStructureLoss<T> loss(static_cast<T>(margin));
  // Gradient through a map with padding between rows (the padding must stay untouched).
  Strided<T> g(Matrix<T>::Zero(x.rows(), x.cols()), pad, T(-7.25));
  PathResult r;
  auto grad = g.map();
  r.loss = static_cast<double>(loss.forward_backward(tag, x, y, grad, static_cast<T>(top_diff)));
  CHECK(g.padding_is(T(-7.25)));
  r.forward_only = static_cast<double>(loss.forward(tag, x, y));
  r.grad = Matrix<T>(g.cmap()).template cast<double>();
  return r;
}

/// The path against the reference: loss within API.md's relative bound, gradient within
/// it of the reference's largest entry; a zero reference must be met exactly (no rounding
/// makes a pair active or a gradient appear where the exact formula has none).
void check_path(const char* path, const PathResult& got, const Reference& ref, double loss_tolerance,
                double gradient_tolerance) {
  CAPTURE(path, ref.loss, got.loss, got.forward_only);
  CHECK(std::abs(got.loss - ref.loss) <= loss_tolerance * std::abs(ref.loss));
  CHECK(got.forward_only == got.loss);
  const auto comparison = ml::testing::compare_gradients(got.grad, ref.grad);
  CAPTURE(comparison.max_abs_difference, comparison.max_abs_reference, comparison.worst_row,
          comparison.worst_col);
  CHECK(comparison.max_abs_difference <= gradient_tolerance * comparison.max_abs_reference);
}

template <class T>
Reference check_batch(const TieBatch& b, double margin, double top_diff, Index pad) {
  const Matrix<T> x = b.x.template cast<T>();
  REQUIRE(x.template cast<double>() == b.x);  // exact in T
  const Reference ref = brute_force(b.x, b.y, margin, top_diff);
  CAPTURE(ref.pairs, ref.pairs_without_negatives, ref.active_pairs, ref.zero_distances);
  const PathResult scalar = run_path<T>(ml::scalar, x, b.y, margin, top_diff, pad);
  const PathResult simd = run_path<T>(ml::simd, x, b.y, margin, top_diff, pad);
  check_path("scalar", scalar, ref, Tolerance<T>::loss, Tolerance<T>::gradient);
  check_path("simd", simd, ref, Tolerance<T>::loss, Tolerance<T>::gradient);
  // And with each other, at twice the bound (each is within it of the exact value).
  CHECK(std::abs(simd.loss - scalar.loss) <= 2.0 * Tolerance<T>::loss * std::abs(scalar.loss));
  const auto comparison = ml::testing::compare_gradients(simd.grad, scalar.grad);
  CAPTURE(comparison.max_abs_difference, comparison.max_abs_reference);
  CHECK(comparison.max_abs_difference <= 2.0 * Tolerance<T>::gradient * comparison.max_abs_reference);
  return ref;
}

}  // namespace

TEMPLATE_TEST_CASE("lifted structure under exact ties: simd, scalar and a brute-force reference agree",
                   "[lifted][ties]", float, double) {
  using T = TestType;
  const double offsets[] = {0.0, 100.0, -100.0, 1e4, 4096.5};
  const Index sizes[] = {2, 3, 5, 7, 9, 16, 17, 24, 33, 40, 64, 71};
  // How many batches hit each kind of tie (the regime must exercise them all).
  int zero_negatives = 0, zero_positives = 0, without_negatives = 0, inactive = 0, at_zero = 0;
  for (std::uint64_t seed = 1; seed <= 240; ++seed) {
    std::mt19937_64 rng(seed * 7919);
    const Index n = sizes[seed % 12];
    const Index d = 1 + static_cast<Index>(rng() % 5);
    const int grid = static_cast<int>(rng() % 4);
    const double offset = offsets[rng() % 5];
    const int classes = 1 + static_cast<int>(rng() % 4);
    const TieBatch b = tie_batch(n, d, grid, offset, classes, rng);
    const double small_margins[] = {0.0, 1.0, 2.0, 0.5};
    const double margin = rng() % 3 == 0 ? margin_at_a_tie(b, rng) : small_margins[rng() % 4];
    const double top_diff = rng() % 4 == 0 ? -2.0 : 1.0;
    const Index pad = static_cast<Index>(rng() % 3);
    CAPTURE(seed, n, d, grid, offset, classes, margin, top_diff, pad);
    const Reference ref = check_batch<T>(b, margin, top_diff, pad);
    zero_negatives += ref.zero_negatives > 0;
    zero_positives += ref.zero_distances > ref.zero_negatives;
    without_negatives += ref.pairs_without_negatives > 0;
    inactive += ref.inactive_pairs > 0;
    at_zero += ref.exponents_at_zero > 0;
  }
  CAPTURE(zero_negatives, zero_positives, without_negatives, inactive, at_zero);
  CHECK(zero_negatives >= 40);
  CHECK(zero_positives >= 40);
  CHECK(without_negatives >= 10);
  CHECK(inactive >= 10);
  CHECK(at_zero >= 40);
}

TEMPLATE_TEST_CASE("lifted structure under exact ties: hand-made smallest cases", "[lifted][ties]", float,
                   double) {
  using T = TestType;
  SECTION("every row coincident, two classes: every D = 0, J = m + log 4, zero gradient") {
    Matrix<double> x = Matrix<double>::Constant(4, 2, 3.0);
    Labels y(4);
    y << 0, 0, 1, 1;
    const Reference ref = brute_force(x, y, 1.0, 1.0);
    CHECK(ref.loss == Approx(std::pow(1.0 + std::log(4.0), 2) / 2.0));
    CHECK(ref.grad.isZero(0.0));
    check_batch<T>({x, y}, 1.0, 1.0, 1);
  }
  SECTION("a negative coincident with one end of a pair, at a large offset") {
    Matrix<double> x(4, 1);
    x << 1e4, 1e4 + 1, 1e4, 1e4 + 3;  // row 2 (class 1) sits on row 0 (class 0)
    Labels y(4);
    y << 0, 0, 1, 2;
    check_batch<T>({x, y}, 1.0, 1.0, 0);
  }
  SECTION("a pair with no negatives next to one with negatives") {
    Matrix<double> x(5, 1);
    x << 0, 1, 0, 2, 2;
    Labels y(5);
    y << 0, 0, 1, 1, 1;
    check_batch<T>({x, y}, 2.0, 1.0, 0);
    Labels one_class(5);
    one_class << 4, 4, 4, 4, 4;  // |P| = 10, no negatives: L = 0, zero gradient
    const Reference ref = brute_force(x, one_class, 2.0, 1.0);
    CHECK(ref.loss == 0.0);
    check_batch<T>({x, one_class}, 2.0, 1.0, 0);
  }
  SECTION("exponents exactly at 0: D_ik - D_ij = margin for every negative, 1-D") {
    // Pair (0, 1) at D = 1; row 0's negatives both at D = 2 = D_01 + margin (margin 1),
    // row 1's at 1 and 3.
    Matrix<double> x(4, 1);
    x << 0, 1, 2, -2;
    Labels y(4);
    y << 0, 0, 1, 2;
    check_batch<T>({x, y}, 1.0, 1.0, 0);
    check_batch<T>({x, y}, 0.0, 1.0, 0);
  }
  SECTION("issue 13's batch-triplet case as a lifted batch") {
    Matrix<double> x(7, 1);
    x << 0, 1, 0, 2, 2, 0, 0;
    Labels y(7);
    y << 1, 1, 0, 0, 0, 0, 1;
    check_batch<T>({x, y}, 1.0, 1.0, 0);
  }
}
