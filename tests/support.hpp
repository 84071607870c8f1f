#pragma once
// Shared test support: every tolerance lives here, by type, with the reason, and the
// seeded data generators every loss test uses.
#include <metricloss/metricloss.hpp>
#include <metricloss/testing/gradcheck.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <random>
#include <vector>
#include <utility>

namespace mltest {

namespace ml = metricloss;
using ml::Index;

/// API.md's accuracy contract, against the formulas evaluated in double on the same
/// (rounded) inputs. Gradients are measured relative to the largest reference entry.
template <class T>
struct Tolerance;
template <>
struct Tolerance<double> {
  static constexpr double loss = 1e-10;
  static constexpr double gradient = 1e-10;
  /// Central differences (h ~ 1e-6) are good to ~1e-9 for smooth losses; analytic
  /// gradients are checked against them at 1e-6 of the largest entry.
  static constexpr double finite_difference = 1e-6;
};
template <>
struct Tolerance<float> {
  static constexpr double loss = 1e-5;
  static constexpr double gradient = 1e-4;
};

/// |value - reference| <= tol * max(|reference|, floor): floor keeps tiny or zero losses
/// from demanding exact equality.
inline bool relatively_close(double value, double reference, double tol, double floor = 1e-30) {
  return std::abs(value - reference) <= tol * std::max(std::abs(reference), floor);
}

template <class T>
using Matrix = ml::RowMatrix<T>;

/// Uniform entries in [lo, hi).
template <class T>
Matrix<T> uniform_matrix(Index rows, Index cols, std::mt19937_64& rng, double lo = -1.0,
                         double hi = 1.0) {
  std::uniform_real_distribution<double> u(lo, hi);
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(u(rng));
  return m;
}

/// Integer labels in [0, classes).
inline std::vector<std::int64_t> random_labels(Index n, int classes, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> u(0, classes - 1);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(n));
  for (auto& l : labels) l = u(rng);
  return labels;
}

/// Tie-heavy data (the tie regime): integer coordinates in [lo, hi] plus a common `offset`,
/// exact in float and double, with about a quarter of the rows copies of earlier rows.
/// Small grids make exact ties ordinary: equal distances, negatives tied with positives,
/// and hinges at exactly 0 for integer margins.
template <class T>
Matrix<T> tied_matrix(Index rows, Index cols, std::mt19937_64& rng, int lo, int hi,
                      double offset = 0.0) {
  std::uniform_int_distribution<int> u(lo, hi);
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(offset + u(rng));
  std::uniform_int_distribution<int> coin(0, 3);
  for (Index i = 1; i < rows; ++i)
    if (coin(rng) == 0) m.row(i) = m.row(std::uniform_int_distribution<Index>(0, i - 1)(rng));
  return m;
}

/// Labels for the tie regime: `classes` classes, and about one row in six in a class of
/// its own (no positive).
inline std::vector<std::int64_t> tied_labels(Index n, int classes, std::mt19937_64& rng) {
  std::vector<std::int64_t> labels = random_labels(n, classes, rng);
  std::uniform_int_distribution<int> coin(0, 5);
  for (std::size_t i = 0; i < labels.size(); ++i)
    if (coin(rng) == 0) labels[i] = 1000 + static_cast<std::int64_t>(i);
  return labels;
}

/// Storage for a row-major matrix with an outer stride larger than D (padding filled with
/// a sentinel, so that a kernel reading or writing padding is caught).
template <class T>
struct Strided {
  std::vector<T> storage;
  Index rows, cols, stride;
  Strided(const Matrix<T>& m, Index pad, T sentinel)
      : storage(static_cast<std::size_t>(m.rows() * (m.cols() + pad)), sentinel),
        rows(m.rows()), cols(m.cols()), stride(m.cols() + pad) {
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) storage[static_cast<std::size_t>(i * stride + j)] = m(i, j);
  }
  ml::RowMap<T> map() { return ml::RowMap<T>(storage.data(), rows, cols, Eigen::OuterStride<>(stride)); }
  ml::ConstRowMap<T> cmap() const {
    return ml::ConstRowMap<T>(storage.data(), rows, cols, Eigen::OuterStride<>(stride));
  }
  bool padding_is(T sentinel) const {
    for (Index i = 0; i < rows; ++i)
      for (Index j = cols; j < stride; ++j)
        if (storage[static_cast<std::size_t>(i * stride + j)] != sentinel) return false;
    return true;
  }
};

}  // namespace mltest

namespace mltest {
/// One formula evaluated in double by two algorithms (a factorised kernel against a literal
/// transcription of Caffe's loops): they differ by rounding only (~1e-14 relative for the
/// batch sizes tested), so they must agree far inside API.md's 1e-10.
inline constexpr double same_formula_tolerance = 1e-12;

/// Runs `call` and checks that it throws ml::invalid_argument whose message contains every
/// fragment.
template <class Call>
void expect_invalid_message(Call&& call, std::initializer_list<const char*> fragments) {
  try {
    call();
    FAIL("no exception thrown");
  } catch (const ml::invalid_argument& e) {
    const std::string message = e.what();
    CAPTURE(message);
    for (const char* fragment : fragments) CHECK(message.find(fragment) != std::string::npos);
  }
}

/// The same, and `output` still equals `before` (nothing written).
template <class Call, class Output>
void expect_invalid(Call&& call, std::initializer_list<const char*> fragments,
                    const Output& output, const Output& before) {
  expect_invalid_message(std::forward<Call>(call), fragments);
  CHECK(output == before);
}


/// One test body per scalar type and CPU path: TEMPLATE_TEST_CASE(..., ALL_CASES).
template <class T_, class Tag_>
struct Case {
  using T = T_;
  using Tag = Tag_;
};
#define ALL_CASES                                                                     \
  (mltest::Case<float, metricloss::scalar_tag>), (mltest::Case<float, metricloss::simd_tag>), \
      (mltest::Case<double, metricloss::scalar_tag>), (mltest::Case<double, metricloss::simd_tag>)

}  // namespace mltest
